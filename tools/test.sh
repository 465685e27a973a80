#!/usr/bin/env bash
# Set up ptprobe with its test dependencies and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e '.[test]'
exec python3 -m pytest -q "$@"
