#!/usr/bin/env python3
"""Benchmark ptprobe.unwind: the cost of one stack unwind of 5, 20 and 50 frames.

    python3 tools/bench_unwind.py [--json] [--runs N] [--repeat N]

tests/c/unwind_target.c (-O2 -fomit-frame-pointer, so every step is CFI) runs
``recurse 60`` and stops itself; the tool seizes it and unwinds the stopped
thread with ``max_frames`` 5, 20 and 50 (frames: syscall in libc, stop_here, then
recurse ...; libc's CFI is used for the first step). For each depth:

* ``cold``: a new :class:`~ptprobe.unwind.Unwinder` and freshly opened
  ElfFiles: the first unwind in a process, paying for libc's .eh_frame index,
  the FDEs it needs, libc's symbol table and, where /usr/lib/debug holds it,
  libc's separate debug file (``.symtab``: the static functions' names);
* ``cold, no debug file``: the same with ``debug_roots=()``;
* ``new unwinder``: a new Unwinder, ElfFiles already used (their symbol tables
  loaded, as the engine's are once a probe was resolved in them);
* ``cached``: the same Unwinder again (the steady state of ``hit.stack()``);

each the median of --runs runs (cached: of --repeat unwinds), with the number
of read_memory calls one unwind makes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ptprobe import linux  # noqa: E402
from ptprobe.elf import ElfFile  # noqa: E402
from ptprobe import procfs  # noqa: E402
from ptprobe.objects import scan_objects  # noqa: E402
from ptprobe.unwind import ObjectInfo, Unwinder, object_finder  # noqa: E402

DEPTHS = (5, 20, 50)


def build(out_dir: str) -> str:
    exe = os.path.join(out_dir, "unwind_target")
    subprocess.run(["gcc", "-g", "-O2", "-fomit-frame-pointer", str(REPO / "tests/c/unwind_target.c"),
                    "-o", exe], check=True)
    return exe


def wait_stopped(pid: int, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        with open(f"/proc/{pid}/stat") as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        if time.monotonic() > deadline:
            raise SystemExit(f"target {pid} did not stop")
        time.sleep(0.002)


def measure(pid: int, runs: int, repeat: int) -> Dict[str, Dict[str, float]]:
    mem = linux.Memory(pid)
    objects = scan_objects(procfs.read_maps(pid))
    regs = linux.get_regs(pid)
    calls = [0]

    def read(address: int, size: int) -> bytes:
        calls[0] += 1
        return mem.read(address, size)

    def fresh_objects() -> Callable:
        return object_finder([ObjectInfo(o.path, ElfFile(o.path), o.bias, o.start, o.end)
                              for o in objects.values()])

    results: Dict[str, Dict[str, float]] = {}
    for depth in DEPTHS:
        row: Dict[str, float] = {}

        def timed(unwinder: Unwinder, find: Callable) -> float:
            calls[0] = 0
            start = time.perf_counter()
            stack = unwinder.unwind(regs, read, find, max_frames=depth)
            elapsed = time.perf_counter() - start
            assert len(stack) == depth, (depth, stack)
            return elapsed

        row["cold_ms"] = 1e3 * statistics.median(timed(Unwinder(), fresh_objects()) for _ in range(runs))
        row["cold_no_debug_file_ms"] = 1e3 * statistics.median(
            timed(Unwinder(debug_roots=()), fresh_objects()) for _ in range(runs))
        warm_find = fresh_objects()
        timed(Unwinder(), warm_find)
        row["new_unwinder_ms"] = 1e3 * statistics.median(timed(Unwinder(), warm_find) for _ in range(runs))
        unwinder = Unwinder()
        timed(unwinder, warm_find)
        row["cached_us"] = 1e6 * statistics.median(timed(unwinder, warm_find) for _ in range(repeat))
        row["cached_us_per_frame"] = row["cached_us"] / depth
        row["reads_per_unwind"] = calls[0]
        results[str(depth)] = row
    mem.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--runs", type=int, default=5, help="runs of each cold measurement (median)")
    parser.add_argument("--repeat", type=int, default=200, help="cached unwinds measured (median)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ptprobe-bench-unwind-") as tmp:
        exe = build(tmp)
        proc = subprocess.Popen([exe, "recurse", "60"], stdin=subprocess.DEVNULL)
        try:
            wait_stopped(proc.pid)
            linux.seize(proc.pid, 0)
            linux.interrupt(proc.pid)
            linux.wait_tid(proc.pid)
            results = measure(proc.pid, args.runs, args.repeat)
        finally:
            proc.kill()
            proc.wait(timeout=30)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'frames':>6} {'cold ms':>9} {'cold, no dbg ms':>16} {'new unwinder ms':>16} "
          f"{'cached us':>10} {'us/frame':>9} {'reads':>6}")
    for depth, row in results.items():
        print(f"{depth:>6} {row['cold_ms']:>9.1f} {row['cold_no_debug_file_ms']:>16.1f} "
              f"{row['new_unwinder_ms']:>16.2f} {row['cached_us']:>10.0f} "
              f"{row['cached_us_per_frame']:>9.1f} {row['reads_per_unwind']:>6.0f}")


if __name__ == "__main__":
    main()
