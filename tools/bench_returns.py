#!/usr/bin/env python3
"""Benchmark return probes and hit.stack() (not a test: figures for the README).

    python3 tools/bench_returns.py [--json] [--runs N] [--calls N]

tools/bench_returns_target.c calls target() N times in a loop it times itself
(CLOCK_MONOTONIC). Each case runs it --runs times; the figure is the median of
(loop time - the native loop time) / N, in microseconds per call:

* ``entry``: a uprobe on target() without a handler (one stop per call);
* ``return``: a uretprobe on target() without a handler (entry and return: two
  stops per call), to compare with twice ``entry``;
* ``return + handler``: the same with a handler that reads ``hit.retval``;
* on a nop5 build (jmp entry, ``syscall`` trampoline) and a plain build (int3
  entry; with ``--no-seccomp`` the ``int3`` trampoline too);
* as root with tracefs, the kernel's uprobe (``p:``) and uretprobe (``r:``) on
  the same function, for scale.

``stack D``: a handler on leaf(), 60 frames deep, times ``hit.stack(D)`` for D
= 5, 20 and 50 (median over the hits; the unwinder's caches warm after the
first). ptprobe runs with its default placement (tracer and a single-threaded
program on one CPU); the machine may be shared, so read ratios from one run.
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
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import ptprobe  # noqa: E402
from bench import EVENT_GROUP, KernelUprobes, file_offset  # noqa: E402


class _Quiet(ptprobe.Observer):
    def notice(self, text: str) -> None:
        pass


def build(workdir: str) -> Dict[str, str]:
    src = str(REPO / "tools" / "bench_returns_target.c")
    plain = os.path.join(workdir, "plain")
    nop5 = os.path.join(workdir, "nop5")
    subprocess.run(["gcc", "-O2", "-fno-pie", "-no-pie", src, "-o", plain], check=True)
    obj = os.path.join(workdir, "nop5.o")
    subprocess.run(["gcc", "-O2", "-fno-pie", "-pg", "-mfentry", "-mnop-mcount", "-c", src, "-o", obj], check=True)
    subprocess.run(["gcc", "-no-pie", obj, "-o", nop5], check=True)
    return {"plain": plain, "nop5": nop5}


def elapsed(stdout: str) -> int:
    for line in stdout.splitlines():
        if line.startswith("elapsed "):
            return int(line.split()[1])
    raise SystemExit(f"no elapsed line in {stdout!r}")


def native(exe: str, calls: int) -> int:
    return elapsed(subprocess.run([exe, "calls", str(calls)], capture_output=True, text=True,
                                  check=True, timeout=600).stdout)


def traced(exe: str, argv: List[str], specs: List[str], handler: Optional[Callable], **options) -> int:
    out_path = tempfile.mktemp(prefix="ptprobe-bench-ret-")
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT, 0o600)
    saved = os.dup(1)
    os.dup2(fd, 1)
    try:
        with ptprobe.run([exe] + argv, observer=_Quiet(), **options) as session:
            for spec in specs:
                session.probe(spec, handler)
            status = session.wait()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(fd)
    with open(out_path) as fh:
        text = fh.read()
    os.unlink(out_path)
    if status != 0:
        raise SystemExit(f"{exe} exited with {status}")
    return elapsed(text)


def per_call(samples: List[int], base: int, calls: int) -> float:
    return (statistics.median(samples) - base) / calls / 1000.0


def kernel_cases(exes: Dict[str, str], calls: int, runs: int, base: Dict[str, int]) -> Dict[str, float]:
    kernel = KernelUprobes()
    why = kernel.setup()
    if why is not None:
        print(f"kernel uprobes skipped: {why}", file=sys.stderr)
        return {}
    out: Dict[str, float] = {}
    try:
        for build_name, exe in exes.items():
            offset = file_offset(exe, "target")
            for kind in ("p", "r"):
                name = f"ret_{kind}_{build_name}"
                with_kind = kind
                # KernelUprobes.add writes "p:"; a return probe is the same line with "r:"
                kernel._write("uprobe_events", f"{with_kind}:{EVENT_GROUP}/{name} {exe}:{offset:#x}")
                kernel.events.append(name)
                samples = []
                for _ in range(runs):
                    stdout, hits = kernel.run(name, [exe, "calls", str(calls)])
                    if hits != calls:
                        raise SystemExit(f"kernel {kind}: {hits} hits, expected {calls}")
                    samples.append(elapsed(stdout))
                out[f"kernel {'uretprobe' if kind == 'r' else 'uprobe'}, {build_name}"] = \
                    per_call(samples, base[build_name], calls)
                kernel.remove(name)
    finally:
        kernel.cleanup()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    calls, runs = args.calls, args.runs
    results: Dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="ptprobe-bench-ret-") as tmp:
        exes = build(tmp)
        base = {name: statistics.median(native(exe, calls) for _ in range(runs)) for name, exe in exes.items()}
        results.update({f"native ns/call, {name}": base[name] / calls for name in exes})

        def retval(hit: ptprobe.Hit) -> None:
            hit.retval  # noqa: B018 - read it, as a handler would

        cases = [
            ("entry", "nop5", "uprobe", None, {}),
            ("return", "nop5", "uretprobe", None, {}),
            ("return + handler", "nop5", "uretprobe", retval, {}),
            ("entry", "plain", "uprobe", None, {}),
            ("return", "plain", "uretprobe", None, {}),
            ("return + handler", "plain", "uretprobe", retval, {}),
            ("entry", "plain, no seccomp", "uprobe", None, {"seccomp": False}),
            ("return", "plain, no seccomp", "uretprobe", None, {"seccomp": False}),
        ]
        # interleave the cases run by run: the machine's load drifts
        samples: Dict[str, List[int]] = {}
        for _ in range(runs):
            for label, build_name, kind, handler, options in cases:
                exe = exes[build_name.split(",")[0]]
                key = f"{label}, {build_name}"
                samples.setdefault(key, []).append(
                    traced(exe, ["calls", str(calls)], [f"{kind}:{exe}:target"], handler, **options))
        for label, build_name, _, _, _ in cases:
            key = f"{label}, {build_name}"
            results[key] = per_call(samples[key], base[build_name.split(",")[0]], calls)
        for build_name in ("nop5", "plain", "plain, no seccomp"):
            results[f"ratio return / (2 x entry), {build_name}"] = \
                results[f"return, {build_name}"] / (2 * results[f"entry, {build_name}"])
        results.update(kernel_cases(exes, calls, runs, base))

        # stacks: hit.stack(D) timed inside a handler on leaf(), 60 frames down
        for depth in (5, 20, 50):
            times: List[float] = []

            def take(hit: ptprobe.Hit, depth: int = depth) -> None:
                start = time.perf_counter()
                stack = hit.stack(depth)
                times.append(time.perf_counter() - start)
                assert len(stack) == depth, stack

            traced(exes["plain"], ["stack", "300", "60"], [f"uprobe:{exes['plain']}:leaf"], take)
            results[f"hit.stack({depth}) us"] = statistics.median(times[1:]) * 1e6
            results[f"hit.stack({depth}) us per frame"] = results[f"hit.stack({depth}) us"] / depth
    if args.json:
        print(json.dumps(results, indent=1))
        return
    for key, value in results.items():
        print(f"{key:<45} {value:10.3f}")


if __name__ == "__main__":
    main()
