#!/usr/bin/env python3
"""Benchmark ptprobe's actions inside the program: counting and recording with no stop.

    python3 tools/bench_inprogram.py [--json] [--runs N] [--quick]

Also run by tools/bench.py as its "in the program" section. On the nop5 site of
tools/bench_target.c (a function entry), every number a median of --runs runs:

* the bare call (no probe) and the kernel's uprobe on the same site (root, tracefs);
* a counting probe (no handler): ns per hit in the program, with 1, 2 and 4
  hitting threads, left to the scheduler (ptprobe's own placement on);
* a recording probe, 6 argument registers per record, the ring large enough for
  the whole run (the consumer keeps up): ns per record in the program;
* the Python consumer's sustained rate (records delivered per second of the
  whole run, the program throttled by a full ring when the consumer lags), with
  a trivial handler and with a handler that formats the CLI's JSON line;
* the stop path on the same site with a trivial handler, for the ratios.

Rates from the program's own timing of its measured phase (as in tools/bench.py),
except the consumer's, which is wall time from the start of wait() to its end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Optional

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "tools"
sys.path.insert(0, str(REPO))

import ptprobe  # noqa: E402

SITE = "nop5"


class _Quiet(ptprobe.Observer):
    def notice(self, text: str) -> None:
        pass


def build(workdir: Path) -> str:
    target = workdir / "bench_target"
    subprocess.run(["gcc", "-O2", "-fno-pie", "-no-pie", "-pthread", str(TOOLS / "bench_target.c"),
                    "-o", str(target)], check=True, capture_output=True, text=True)
    return str(target)


def _ns_per_iter(outfile: str) -> float:
    with open(outfile) as fh:
        values = dict(t.split("=") for t in fh.read().split() if "=" in t)
    return int(values["ns"]) / int(values["iterations"])


def native(target: str, n: int, threads: int, outfile: str) -> float:
    subprocess.run([target, SITE, str(n), str(threads), "0", outfile], check=True, capture_output=True)
    return _ns_per_iter(outfile)


def traced(target: str, n: int, threads: int, outfile: str, *, record: bool = False,
           handler: Optional[Callable] = None, in_program: bool = True, ring_size: int = 4 << 20,
           wall: bool = False) -> float:
    """ns per hit in the program (or, with *wall*, per record of the whole wait())."""
    session = ptprobe.run([target, SITE, str(n), str(threads), "10", outfile], observer=_Quiet(),
                          in_program=in_program, ring_size=ring_size)
    with session:
        spec = f"uprobe:{target}:site_{SITE}"
        probe = session.record(spec, handler) if record else session.probe(spec, handler)
        start = time.perf_counter()
        status = session.wait()
        elapsed = time.perf_counter() - start
    expected = (n + 10) * max(threads, 1)
    if status != 0 or probe.hits != expected:
        raise SystemExit(f"bench_inprogram: status {status}, {probe.hits} hits, expected {expected}")
    if record and in_program and probe.sites[0].action != "record":
        raise SystemExit("bench_inprogram: the site does not record in the program")
    return elapsed * 1e9 / expected if wall else _ns_per_iter(outfile)


def kernel_uprobe(target: str, n: int, outfile: str) -> Optional[float]:
    """ns per hit of the kernel's uprobe on the site (None when not possible)."""
    sys.path.insert(0, str(TOOLS))
    import bench  # tools/bench.py: its tracefs helper
    kernel = bench.KernelUprobes()
    if kernel.setup() is not None:
        return None
    try:
        kernel.add("inprog_nop5", target, bench.file_offset(target, f"site_{SITE}"))
        out, count = kernel.run("inprog_nop5", [target, SITE, str(n), "0", "0", outfile])
        return _ns_per_iter(outfile) if count == n else None
    except (OSError, bench.BenchError, subprocess.SubprocessError):
        return None
    finally:
        kernel.cleanup()


def run(runs: int, quick: bool) -> Dict:
    n_count = 200_000 if quick else 20_000_000
    n_record = 20_000 if quick else 2_000_000
    n_consume = 10_000 if quick else 400_000
    n_stop = 2_000 if quick else 50_000
    workdir = Path(tempfile.mkdtemp(prefix="ptprobe-inprog-"))
    out = str(workdir / "out")

    def med(fn: Callable[[], float]) -> float:
        return statistics.median(fn() for _ in range(runs))

    trivial = lambda r: None  # noqa: E731

    def cli_line(r) -> None:
        json.dumps({"probe": r.probe.name, "name": r.name, "pid": r.pid, "tid": r.tid, "address": r.address,
                    "time_ns": r.time_ns, "args": list(r.args)})

    try:
        target = build(workdir)
        res: Dict = {"runs": runs, "quick": quick}
        res["bare_call_ns"] = med(lambda: native(target, n_count, 0, out))
        res["kernel_uprobe_ns"] = kernel_uprobe(target, n_count // 20, out)
        res["count_ns"] = {str(t): med(lambda t=t: traced(target, n_count // max(t, 1), t, out)) for t in (0, 2, 4)}
        ring = 1 << max(16, (n_record * 72 * 2 - 1).bit_length())
        res["record_ns"] = med(lambda: traced(target, n_record, 0, out, record=True, handler=trivial, ring_size=ring))
        res["consumer_trivial_ns"] = med(lambda: traced(target, n_consume, 0, out, record=True, handler=trivial,
                                                        wall=True))
        res["consumer_json_ns"] = med(lambda: traced(target, n_consume, 0, out, record=True, handler=cli_line,
                                                     wall=True))
        res["stop_handler_ns"] = med(lambda: traced(target, n_stop, 0, out, handler=lambda hit: None,
                                                    in_program=False, wall=True))
        res["stop_json_ns"] = med(lambda: traced(target, n_stop, 0, out, handler=lambda hit: json.dumps(
            {"probe": hit.probe.name, "name": hit.name, "pid": hit.pid, "tid": hit.tid, "address": hit.address,
             "args": list(hit.args)}), in_program=False, wall=True))
        res["stop_2threads_default_ns"] = med(lambda: traced(target, n_stop // 2, 2, out, in_program=False))
        return res
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def format_report(res: Dict) -> str:
    count = res["count_ns"]
    lines = [f"In the program (nop5 function entry; median of {res['runs']} run(s)):"]
    lines.append(f"  bare call                          {res['bare_call_ns']:8.2f} ns")
    kern = res.get("kernel_uprobe_ns")
    lines.append(f"  kernel uprobe                      {kern:8.2f} ns" if kern else "  kernel uprobe              (not measured)")
    for t, ns in count.items():
        threads = max(int(t), 1)
        lines.append(f"  count, {threads} thread{'s' if threads > 1 else ' '}                   {ns:8.2f} ns/hit"
                     f"  {1e3 / ns:8.1f} M hits/s" + (f"  ({kern / ns:.0f}x kernel uprobe)" if kern and t == '0' else ""))
    one = count["0"]
    lines.append(f"  count, 2 threads over 1            {one / count['2']:8.2f}x throughput")
    lines.append(f"  record 6 args, 1 thread            {res['record_ns']:8.2f} ns/record  "
                 f"{1e3 / res['record_ns']:8.1f} M records/s (in the program)")
    lines.append(f"  consumer, trivial handler          {res['consumer_trivial_ns'] / 1000:8.2f} us/record "
                 f"{1e9 / res['consumer_trivial_ns']:8.0f} records/s")
    lines.append(f"  consumer, JSON line handler        {res['consumer_json_ns'] / 1000:8.2f} us/record "
                 f"{1e9 / res['consumer_json_ns']:8.0f} records/s")
    lines.append(f"  stop path, trivial handler         {res['stop_handler_ns'] / 1000:8.2f} us/hit    "
                 f"(records {res['stop_handler_ns'] / res['consumer_trivial_ns']:.1f}x faster)")
    lines.append(f"  stop path, JSON line handler       {res['stop_json_ns'] / 1000:8.2f} us/hit    "
                 f"(records {res['stop_json_ns'] / res['consumer_json_ns']:.1f}x faster)")
    lines.append(f"  stop path, 2 threads, scheduler    {res['stop_2threads_default_ns'] / 1000:8.2f} us/hit    "
                 f"(counting in the program: {res['stop_2threads_default_ns'] / count['2']:.0f}x faster)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    res = run(args.runs or (1 if args.quick else 5), args.quick)
    print(json.dumps(res, indent=2) if args.json else format_report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
