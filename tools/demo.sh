#!/usr/bin/env bash
# Set up ptprobe, build the bundled example and probe it: ptprobe's main job in one command.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e .
mkdir -p build
# -pg -mfentry -mnop-mcount: a 5-byte NOP at every function entry (the jmp fast path);
# compiled and linked apart so that the program does not write gmon.out.
gcc -O1 -g -pg -mfentry -mnop-mcount -fno-pie -c -o build/demo.o examples/demo.c
gcc -no-pie -o build/demo build/demo.o
exec ptprobe run -p uprobe:build/demo:compute \
    -f 'compute(qty=%d, price=%d)' -- build/demo "$@"
