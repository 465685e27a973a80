#!/usr/bin/env bash
# Build the bundled example and probe it: ptprobe's main job in one command.
# ptprobe and its dependencies come from the project's .venv (see tools/venv.sh); the
# example is built in a temporary directory, removed afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/venv.sh
ptprobe_venv
work="$(mktemp -d "${TMPDIR:-/tmp}/ptprobe-demo.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# -pg -mfentry -mnop-mcount: a 5-byte NOP at every function entry (the jmp fast path);
# compiled and linked apart so that the program does not write gmon.out.
gcc -O1 -g -pg -mfentry -mnop-mcount -fno-pie -c -o "$work/demo.o" examples/demo.c
gcc -no-pie -o "$work/demo" "$work/demo.o"
cd "$work"
"$PTPROBE_PYTHON" -m ptprobe run -p uprobe:./demo:compute -f 'compute(qty=%d, price=%d)' -- ./demo "$@"
