#!/usr/bin/env bash
# Run the test suite with the project's .venv (see tools/venv.sh). Test programs are
# compiled into ${PTPROBE_TEST_BUILD:-/tmp/ptprobe-test-build}, hypothesis keeps its data
# in ${TMPDIR:-/tmp}/ptprobe-hypothesis, and pytest writes no cache: nothing lands in the
# tree. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/venv.sh
ptprobe_venv test
export HYPOTHESIS_STORAGE_DIRECTORY="${HYPOTHESIS_STORAGE_DIRECTORY:-${TMPDIR:-/tmp}/ptprobe-hypothesis}"
exec "$PTPROBE_PYTHON" -m pytest -q -p no:cacheprovider "$@"
