#!/usr/bin/env bash
# Set up ptprobe, build the bundled example and probe it: ptprobe's main job in one command.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e .
mkdir -p build
gcc -O1 -g -pg -mfentry -mnop-mcount -fno-pie -no-pie -o build/demo examples/demo.c
exec ptprobe run -p uprobe:build/demo:compute \
    -f 'compute(qty=%d, price=%d)' -- build/demo "$@"
