#!/usr/bin/env python3
"""Benchmark ptprobe's probe hits against the C limit and the kernel's uprobes.

    python3 tools/bench.py [--json] [--runs N] [--hits N] [--quick] [--no-lua] [--placement-only]

What it measures (every number a median of --runs runs):

* baselines: the target's loop with no probe (ns per iteration) and a
  ``syscall(SYS_getpgid, 0)`` loop;
* the C limit (tools/ctracer.c): the least a ptrace tracer can do per stop,
  for a self-returning slot, a seed slot and an int3 followed by a nop;
* the Python limit (tools/pylimit.py): the same tracer loop in Python with
  ptprobe's own system calls, so the C-to-Python gap is the interpreter's and
  the Python-to-ptprobe gap is ptprobe's bookkeeping;
* ptprobe through its Python API on every kind of site in
  tools/bench_target.c (nop5 by jmp with self-returning and seed slots and by
  int3, the USDT nop combos by jmp and by int3, a 1-byte nop, ``push %rbp`` and
  ``ret`` by int3), without and with a trivial handler;
* the kernel's own uprobes on the same sites (root only: tracefs is mounted if
  needed and unmounted again, the ptbench/* events are removed afterwards;
  hits counted with ``perf stat -e ptbench:SITE``, else from uprobe_profile);
* arming and disarming 1,000 sites;
* fairness: 16 and 64 threads calling one probed nop5 for --fair-seconds (each
  counting its calls), untraced and through ptprobe (self-returning slot, seed
  slot, int3; ptprobe's default placement): the min, median and max of the calls
  per thread, and min/median (the goal: at least 0.1). ``--fairness-only`` runs
  just this part;
* work inside the program (tools/bench_inprogram.py): counting and recording
  with no stop, against the kernel's uprobes and against stops;
* call graphs (tools/bench_calls.py): the cost of a recorded call against the
  bare call and uftrace, and a whole Lua interpreter recorded (``--no-lua``
  leaves it out);
* CPU placement policies on multi-threaded programs (also alone, with
  ``--placement-only``): 1, 2, 4 and 16 hitting threads and a single-threaded
  program, and one hitting thread beside 7 that hit nothing (whose rounds per
  second are measured too, and without a tracer), under ``colocate`` "single"
  (the default before "hitting"), "all", "hitting" (the default) and "off".

Hit rates come from the target itself: it times its measured phase with the
vDSO clock after a warm-up, so start-up and arming are not counted. Each
traced case runs with one and with two hitting threads and under three CPU
placements: ``default`` (the scheduler decides), ``same`` (tracer and tracee
pinned to one CPU) and ``split`` (tracer on one CPU, tracee on another);
ptprobe's own placement is off in these three and measured in two more:
``auto``, nothing imposed, ptprobe left to its default policy, which pins
itself and a single-threaded program to one CPU, and the threads that hit
probes often (with one hitting thread the target is then single-threaded, its
main thread runs the loop; with two it has three threads, two of them hitting);
and ``all``, nothing imposed, ``colocate="all"``: every thread pinned with
ptprobe. Under these two the warm-up is at least OWN_WARMUP hits per thread:
the default policy watches the threads for a moment before it pins them.

Ratios are throughput ratios: ``jmp/int3`` is the jmp's hits/s over the int3's
on the same site (above 1: the jmp is faster); ``ptprobe/C`` is ptprobe's
hits/s over the C tracer's for the same stop type (1.0 would be the limit).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import ptprobe  # noqa: E402
from ptprobe import arch  # noqa: E402

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
TRACEFS = "/sys/kernel/tracing"
EVENT_GROUP = "ptbench"

#: site name in bench_target.c -> the slot kinds/mechanisms measured on it
SITES = ["nop1", "push", "ret", "nop5", "usdt_nop", "usdt_nop1_5", "usdt_nop1_10"]

#: (site, mechanism, handler): mechanism "return"/"seed" = jmp through that slot kind
PTPROBE_CASES: List[Tuple[str, str, bool]] = [
    ("nop5", "return", False), ("nop5", "seed", False), ("nop5", "int3", False),
    ("nop5", "return", True), ("nop5", "seed", True), ("nop5", "int3", True),
    ("usdt_nop1_5", "return", False), ("usdt_nop1_5", "int3", False),
    ("usdt_nop1_10", "return", False), ("usdt_nop1_10", "int3", False),
    ("nop1", "int3", False), ("usdt_nop", "int3", False),
    ("push", "int3", False), ("ret", "int3", False),
]
C_MODES = ["return", "seed", "int3"]
PLACEMENTS = ["default", "same", "split"]
AUTO = "auto"        # ptprobe only: nothing imposed, ptprobe's own placement (colocate=True)
ALL = "all"          # ptprobe only: nothing imposed, colocate="all" (every thread pinned with ptprobe)
OWN_PLACEMENTS = {AUTO: True, ALL: "all"}
#: warm-up hits per thread under ptprobe's own placement, at least: its default policy
#: pins the threads that hit often after watching them for a moment (placement.REVIEW_PERIOD)
OWN_WARMUP = 5000

#: the placement section: (hitting threads, threads that hit nothing); 0 hitting threads
#: = a single-threaded program whose main thread hits
PLACEMENT_CASES: List[Tuple[int, int]] = [(0, 0), (1, 0), (2, 0), (4, 0), (16, 0), (1, 7)]
#: colocate values compared there: "single" was the default before "hitting"
PLACEMENT_POLICIES = ["single", "all", "hitting", "off"]
NOISY = 1.5          # the table marks a median whose runs spread more than this (max/min)
FAIR_THREADS = [16, 64]
FAIR_MECHANISMS = ["native", "return", "seed", "int3"]


class BenchError(Exception):
    pass


class QuietObserver(ptprobe.Observer):
    """Collects ptprobe's notices instead of logging them."""

    def __init__(self) -> None:
        self.notices: List[str] = []

    def notice(self, text: str) -> None:
        self.notices.append(text)

    def handler_error(self, probe, hit, error) -> None:
        self.notices.append(f"handler error: {error!r}")


def trivial_handler(hit: ptprobe.Hit) -> None:
    """The 'trivial handler' case: a Python call per hit, nothing read."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- building
def build(workdir: Path) -> Tuple[str, str]:
    """Compile the target (non-PIE) and the C tracer; return their paths."""
    if shutil.which("gcc") is None:
        raise BenchError("gcc is not installed")
    target = workdir / "bench_target"
    tracer = workdir / "ctracer"
    subprocess.run(["gcc", "-O2", "-fno-pie", "-no-pie", "-pthread", str(TOOLS / "bench_target.c"),
                    "-o", str(target)], check=True, capture_output=True, text=True)
    subprocess.run(["gcc", "-O2", "-pthread", f"-DSLOT_NR={arch.SLOT_SYSCALL_NR:#x}",
                    str(TOOLS / "ctracer.c"), "-o", str(tracer)], check=True, capture_output=True, text=True)
    return str(target), str(tracer)


def parse_line(text: str) -> Dict[str, int]:
    """``mode=x threads=1 iterations=N ns=T`` -> {"threads": 1, "iterations": N, "ns": T}."""
    values: Dict[str, int] = {}
    for line in text.splitlines():
        for token in line.split():
            key, sep, value = token.partition("=")
            if sep and value.lstrip("-").isdigit():
                values[key] = int(value)
    if "ns" not in values or "iterations" not in values:
        raise BenchError(f"no timing in the target's output: {text!r}")
    return values


# --------------------------------------------------------------------------- placement
class Placement:
    """CPU placement of the tracer (this thread) and the tracee."""

    def __init__(self) -> None:
        self.original = os.sched_getaffinity(0)
        cpus = sorted(self.original)
        self.cpu_a = cpus[0]
        self.cpu_b = cpus[1] if len(cpus) > 1 else None

    def available(self, name: str) -> bool:
        return name != "split" or self.cpu_b is not None

    def cpus(self, name: str) -> Tuple[Optional[int], Optional[int]]:
        """(tracer CPU, tracee CPU); None = not pinned."""
        if name == "same":
            return self.cpu_a, self.cpu_a
        if name == "split":
            return self.cpu_a, self.cpu_b
        return None, None           # default, auto

    @contextlib.contextmanager
    def tracer(self, name: str) -> Iterator[Optional[int]]:
        """Pin this thread for *name*; yield the CPU the tracee should be moved to (or None)."""
        tracer_cpu, tracee_cpu = self.cpus(name)
        if tracer_cpu is not None:
            os.sched_setaffinity(0, {tracer_cpu})
        try:
            yield tracee_cpu if tracee_cpu != tracer_cpu else None
        finally:
            os.sched_setaffinity(0, self.original)


# --------------------------------------------------------------------------- one run of each kind
def native_once(target: str, mode: str, n: int, threads: int = 1) -> Dict[str, int]:
    out = subprocess.run([target, mode, str(n), str(threads)], check=True, capture_output=True, text=True)
    return parse_line(out.stdout)


def ctracer_once(tracer: str, mode: str, n: int, threads: int, warmup: int,
                 placement: Placement, where: str, python: bool = False) -> Dict[str, int]:
    """One run of the C limit, or with *python* of the Python limit (tools/pylimit.py
    tracing the same child)."""
    tracer_cpu, tracee_cpu = placement.cpus(where)
    prefix = [sys.executable, str(TOOLS / "pylimit.py")] if python else []
    argv = prefix + [tracer, mode, str(n), str(threads), str(warmup),
                     str(-1 if tracer_cpu is None else tracer_cpu), str(-1 if tracee_cpu is None else tracee_cpu)]
    name = "pylimit" if python else "ctracer"
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise BenchError(f"{name} {mode} failed ({out.returncode}): {out.stderr.strip()}")
    values = parse_line(out.stdout)
    if values.get("stops") != (n + warmup) * threads:
        raise BenchError(f"{name} {mode}: {values.get('stops')} stops, expected {(n + warmup) * threads}")
    return values


def ptprobe_once(target: str, outfile: str, site: str, mechanism: str, handler: bool, n: int,
                 threads: int, warmup: int, placement: Placement, where: str,
                 own_warmup: int = OWN_WARMUP) -> Dict[str, int]:
    observer = QuietObserver()
    slots = "seed" if mechanism == "seed" else "return"
    seccomp = mechanism != "int3"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(outfile)
    with placement.tracer(where) as tracee_cpu:
        # auto, one hitting thread: a single-threaded target (THREADS 0), what the policy is for
        workers = 0 if where == AUTO and threads == 1 else threads
        if where in OWN_PLACEMENTS:
            warmup = max(warmup, own_warmup)
        # in_program=False: these cases measure the stop path (a probe without a handler
        # would otherwise count inside the program: see the "in the program" section)
        session = ptprobe.run([target, site, str(n), str(workers), str(warmup), outfile],
                              slots=slots, seccomp=seccomp, observer=observer,
                              colocate=OWN_PLACEMENTS.get(where, False), in_program=False)
        with session:
            if tracee_cpu is not None:
                os.sched_setaffinity(session.main_pid, {tracee_cpu})
            probe = session.probe(f"uprobe:{target}:site_{site}", trivial_handler if handler else None)
            mechanisms = {s.mechanism for s in probe.sites}
            status = session.wait()
    expected = "int3" if mechanism == "int3" else "jmp"
    if mechanisms != {expected}:
        raise BenchError(f"{site}/{mechanism}: armed as {sorted(mechanisms)}, not {expected} "
                         f"({'; '.join(observer.notices)})")
    if status != 0:
        raise BenchError(f"{site}/{mechanism}: target exited with {status}")
    if probe.hits != (n + warmup) * threads:
        raise BenchError(f"{site}/{mechanism}: {probe.hits} hits counted, expected {(n + warmup) * threads}")
    with open(outfile) as fh:
        return parse_line(fh.read())


def fairness_once(target: str, outfile: str, mechanism: str, threads: int, seconds: int) -> Dict:
    """*threads* threads call the nop5 site for *seconds*, untraced ("native") or
    traced with *mechanism*; the spread of their calls."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(outfile)
    argv = [target, "fair", str(seconds), str(threads), "0", outfile]
    if mechanism == "native":
        subprocess.run(argv, check=True, capture_output=True, timeout=seconds + 60)
    else:
        observer = QuietObserver()
        with ptprobe.run(argv, slots="seed" if mechanism == "seed" else "return", seccomp=mechanism != "int3",
                         observer=observer) as session:
            session.probe(f"uprobe:{target}:site_nop5")
            status = session.wait()
        if status != 0:
            raise BenchError(f"fairness {mechanism}/{threads}: target exited with {status}")
    with open(outfile) as fh:
        text = fh.read()
    counts = [int(c) for token in text.split() if token.startswith("counts=") for c in token[7:].split(",")]
    if len(counts) != threads:
        raise BenchError(f"fairness {mechanism}/{threads}: no counts in {text!r}")
    median = statistics.median(counts)
    return dict(mechanism=mechanism, threads=threads, seconds=seconds, min=min(counts), median=median,
                max=max(counts), min_over_median=min(counts) / median if median else 0.0, total=sum(counts))


def run_fairness(target: str, outfile: str, seconds: int, mechanisms: List[str], result: Dict) -> None:
    for threads in FAIR_THREADS:
        for mechanism in mechanisms:
            log(f"fairness {mechanism} threads={threads} {seconds} s ...")
            try:
                result["fairness"].append(fairness_once(target, outfile, mechanism, threads, seconds))
            except (BenchError, ptprobe.PtprobeError, OSError, subprocess.SubprocessError) as exc:
                result["errors"].append(f"fairness {mechanism}/{threads}: {exc}")


def placement_once(target: str, outfile: str, policy: str, hitters: int, busy: int, n: int,
                   warmup: int) -> Dict[str, int]:
    """One run of the placement section: *hitters* threads hit a nop5 site (a stop
    each: in_program=False, no handler), *busy* more threads never do; ptprobe's
    placement is *policy*, nothing else is imposed."""
    observer = QuietObserver()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(outfile)
    argv = [target, "nop5", str(n), str(hitters), str(warmup), outfile] + ([str(busy)] if busy else [])
    session = ptprobe.run(argv, observer=observer, colocate=policy, in_program=False)
    with session:
        probe = session.probe(f"uprobe:{target}:site_nop5")
        status = session.wait()
    if status != 0:
        raise BenchError(f"placement {policy} {hitters}+{busy}: target exited with {status}")
    expected = (n + warmup) * max(hitters, 1)
    if probe.hits != expected:
        raise BenchError(f"placement {policy} {hitters}+{busy}: {probe.hits} hits, expected {expected}")
    with open(outfile) as fh:
        return parse_line(fh.read())


def busy_untraced(target: str, busy: int, runs: int) -> float:
    """Rounds per second of *busy* threads beside one untraced thread calling the
    site (for about half a second): what they get done with no tracer at all."""
    rates = []
    for _ in range(runs):
        values = parse_line(subprocess.run([target, "nop5", "200000000", "1", "0", "-", str(busy)], check=True,
                                           capture_output=True, text=True, timeout=600).stdout)
        rates.append(values["busy_ops"] / values["busy_ns"] * 1e9)
    return statistics.median(rates)


def run_placement(target: str, outfile: str, runs: int, hits: int, own_warmup: int = OWN_WARMUP) -> Dict:
    """us per hit of every placement policy on PLACEMENT_CASES, and what the threads
    that hit nothing get done (rounds per second). The policies take turns run by
    run, so that each sees the same machine (other work on it comes and goes)."""
    rows = []
    for hitters, busy in PLACEMENT_CASES:
        threads = max(hitters, 1)
        n = hits if threads <= 4 else max(1000, hits // 4)
        warmup = own_warmup if threads <= 4 else own_warmup // 4
        log(f"placement: {hitters} hitting thread(s), {busy} busy, policies {', '.join(PLACEMENT_POLICIES)} ...")
        samples: Dict[str, List[Dict[str, int]]] = {policy: [] for policy in PLACEMENT_POLICIES}
        errors: Dict[str, str] = {}
        for run in range(runs):
            order = PLACEMENT_POLICIES if run % 2 == 0 else PLACEMENT_POLICIES[::-1]
            for policy in order:
                if policy in errors:
                    continue
                try:
                    samples[policy].append(placement_once(target, outfile, policy, hitters, busy, n, warmup))
                except (BenchError, ptprobe.PtprobeError, OSError) as exc:
                    errors[policy] = str(exc)
        for policy in PLACEMENT_POLICIES:
            if policy in errors:
                rows.append(dict(hitters=hitters, busy=busy, policy=policy, error=errors[policy]))
                continue
            row = dict(hitters=hitters, busy=busy, policy=policy, **summarize(samples[policy]))
            if busy:
                row["busy_ops_per_s"] = statistics.median(s["busy_ops"] / s["busy_ns"] * 1e9
                                                          for s in samples[policy])
            rows.append(row)
    untraced = {busy: busy_untraced(target, busy, runs) for _, busy in PLACEMENT_CASES if busy}
    return {"rows": rows, "busy_untraced_ops_per_s": untraced, "policies": PLACEMENT_POLICIES}


def format_placement(data: Dict) -> str:
    lines = ["CPU placement policies (no handler, in_program=False: every hit stops; nothing else pinned), "
             "us per hit, median:"]
    policies = data["policies"]
    lines.append(f"  {'hitting threads':<26}" + "".join(f"{p:>10}" for p in policies) + f"{'hitting/all':>13}")
    table: Dict[Tuple[int, int], Dict[str, Dict]] = {}
    for row in data["rows"]:
        table.setdefault((row["hitters"], row["busy"]), {})[row["policy"]] = row
    for (hitters, busy), cells in table.items():
        label = ("1 (single-threaded program)" if hitters == 0 else
                 f"{hitters}" + (f" + {busy} that hit nothing" if busy else ""))
        values = [cells.get(p, {}).get("us_per_hit") for p in policies]
        line = f"  {label:<26}" + "".join(f"{v:10.2f}" if v else f"{'-':>10}" for v in values)
        hit, al = cells.get("hitting", {}).get("us_per_hit"), cells.get("all", {}).get("us_per_hit")
        lines.append(line + (f"{hit / al:13.2f}" if hit and al else ""))
    for busy, rate in data["busy_untraced_ops_per_s"].items():
        cells = {row["policy"]: row.get("busy_ops_per_s") for row in data["rows"] if row["busy"] == int(busy)}
        lines.append(f"  the {busy} threads that hit nothing, M rounds/s: untraced {rate / 1e6:.0f}, "
                     + ", ".join(f"{p} {cells[p] / 1e6:.0f}" for p in policies if cells.get(p) is not None))
    errors = [f"  {row['policy']} {row['hitters']}+{row['busy']}: {row['error']}" for row in data["rows"]
              if "error" in row]
    return "\n".join(lines + errors)


# --------------------------------------------------------------------------- kernel uprobes
def file_offset(path: str, symbol: str) -> int:
    """The file offset of *symbol*'s address (what uprobe_events wants)."""
    from elftools.elf.elffile import ELFFile
    with open(path, "rb") as fh:
        elf = ELFFile(fh)
        symtab = elf.get_section_by_name(".symtab")
        syms = symtab.get_symbol_by_name(symbol) if symtab is not None else None
        if not syms:
            raise BenchError(f"no symbol {symbol} in {path}")
        address = syms[0]["st_value"]
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= address < seg["p_vaddr"] + seg["p_filesz"]:
                return address - seg["p_vaddr"] + seg["p_offset"]
    raise BenchError(f"{symbol} is in no loadable segment of {path}")


class KernelUprobes:
    """Kernel uprobes through tracefs: created, counted and removed by this benchmark."""

    def __init__(self) -> None:
        self.mounted_here = False
        self.events: List[str] = []
        self.perf = shutil.which("perf")

    def setup(self) -> Optional[str]:
        """Return None when usable, else why not."""
        if os.geteuid() != 0:
            return "not root"
        if not os.path.exists(os.path.join(TRACEFS, "uprobe_events")):
            if not os.path.isdir(TRACEFS):
                return f"{TRACEFS} does not exist"
            res = subprocess.run(["mount", "-t", "tracefs", "nodev", TRACEFS], capture_output=True, text=True)
            if res.returncode != 0 or not os.path.exists(os.path.join(TRACEFS, "uprobe_events")):
                return f"cannot mount tracefs: {res.stderr.strip() or 'no uprobe_events'}"
            self.mounted_here = True
        return None

    def _write(self, name: str, text: str, append: bool = True) -> None:
        # O_APPEND without O_TRUNC: truncating uprobe_events would delete every uprobe event,
        # and Python's "a" mode seeks, which tracefs refuses
        fd = os.open(os.path.join(TRACEFS, name), os.O_WRONLY | (os.O_APPEND if append else 0))
        try:
            os.write(fd, (text + "\n").encode())
        finally:
            os.close(fd)

    def add(self, name: str, path: str, offset: int) -> None:
        with contextlib.suppress(OSError):
            self._write("uprobe_events", f"-:{EVENT_GROUP}/{name}")
        self._write("uprobe_events", f"p:{EVENT_GROUP}/{name} {path}:{offset:#x}")
        self.events.append(name)

    def remove(self, name: str) -> None:
        with contextlib.suppress(OSError):
            self._write(f"events/{EVENT_GROUP}/{name}/enable", "0", append=False)
        with contextlib.suppress(OSError):
            self._write("uprobe_events", f"-:{EVENT_GROUP}/{name}")
        if name in self.events:
            self.events.remove(name)

    def _profile_count(self, name: str) -> int:
        with open(os.path.join(TRACEFS, "uprobe_profile")) as fh:
            for line in fh:
                parts = line.split()
                # "PATH EVENT HITS"; the event without its group on recent kernels
                if len(parts) >= 3 and parts[1] in (f"{EVENT_GROUP}/{name}", name):
                    return int(parts[2])
        raise BenchError(f"{EVENT_GROUP}/{name} not in uprobe_profile")

    def run(self, name: str, argv: List[str]) -> Tuple[str, int]:
        """Run *argv* with the event counting; return (its stdout, the event's hits)."""
        if self.perf:
            res = subprocess.run([self.perf, "stat", "-x", ",", "-e", f"{EVENT_GROUP}:{name}", "--"] + argv,
                                 capture_output=True, text=True, timeout=600)
            if res.returncode == 0:
                for line in res.stderr.splitlines():
                    fields = line.split(",")
                    if len(fields) > 2 and fields[2] == f"{EVENT_GROUP}:{name}" and fields[0].isdigit():
                        return res.stdout, int(fields[0])
            self.perf = None           # perf cannot count it here: use the event's own count
        before = self._profile_count(name)
        self._write(f"events/{EVENT_GROUP}/{name}/enable", "1", append=False)
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=True)
        finally:
            self._write(f"events/{EVENT_GROUP}/{name}/enable", "0", append=False)
        return res.stdout, self._profile_count(name) - before

    def cleanup(self) -> None:
        for name in list(self.events):
            self.remove(name)
        if self.mounted_here:
            subprocess.run(["umount", TRACEFS], capture_output=True)
            self.mounted_here = False


# --------------------------------------------------------------------------- arming 1,000 sites
ARMING_CASES = [
    # name, what, spec pattern, session options
    ("nop5_jmp", "1000 probe() calls, nop5 sites, jmp (self-returning slots)",
     "uprobe:{t}:many_nop5_{i}", {"slots": "return"}),
    ("nop5_int3", "1000 probe() calls, nop5 sites, int3 (no seccomp)",
     "uprobe:{t}:many_nop5_{i}", {"seccomp": False}),
    ("insn_int3", "1000 probe() calls, mov sites, int3 + out-of-line copy",
     "uprobe:{t}:many_insn_{i}", {}),
    ("usdt_batch_jmp", "one USDT probe with 1000 nop5 sites, jmp",
     "usdt:{t}:benchmany:site", {"slots": "return"}),
    ("usdt_batch_int3", "one USDT probe with 1000 nop5 sites, int3 (no seccomp)",
     "usdt:{t}:benchmany:site", {"seccomp": False}),
]


def arming_once(target: str, spec: str, options: Dict) -> Dict[str, float]:
    observer = QuietObserver()
    session = ptprobe.run([target, "many", "1"], observer=observer, **options)
    with session:
        specs = [spec.format(t=target, i=i) for i in range(1000)] if "{i}" in spec else [spec.format(t=target)]
        t0 = time.perf_counter()
        probes = [session.probe(s) for s in specs]
        t1 = time.perf_counter()
        sites = [site for p in probes for site in p.sites]
        mechanisms = sorted({site.mechanism for site in sites})
        session.detach()
        t2 = time.perf_counter()
    if len(sites) != 1000:
        raise BenchError(f"{spec}: {len(sites)} sites armed, expected 1000")
    return {"arm_s": t1 - t0, "disarm_s": t2 - t1, "sites": len(sites), "mechanisms": mechanisms,
            "status": session.returncode}


# --------------------------------------------------------------------------- statistics
def summarize(runs: List[Dict[str, int]]) -> Dict:
    us = [r["ns"] / r["iterations"] / 1000.0 for r in runs]
    med = statistics.median(us)
    return {
        "us_per_hit": med,
        "hits_per_s": 1e6 / med if med > 0 else 0.0,
        "runs_us_per_hit": us,
        "min_us_per_hit": min(us),
        "max_us_per_hit": max(us),
    }


def repeat(fn: Callable[[], Dict[str, int]], runs: int) -> Dict:
    return summarize([fn() for _ in range(runs)])


# --------------------------------------------------------------------------- the benchmark
def run_benchmark(args) -> Dict:
    runs = args.runs
    hits = args.hits
    warmup = max(10, hits // 20)
    kernel_hits = hits * 20
    baseline_iters = 20000 if args.quick else 2_000_000
    thread_counts = [1, 2]
    placement = Placement()
    placements = [p for p in PLACEMENTS if placement.available(p)]

    result: Dict = {
        "meta": {
            "kernel": platform.release(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "allowed_cpus": sorted(placement.original),
            "runs": runs,
            "hits_per_thread": hits,
            "warmup_per_thread": warmup,
            "kernel_hits_per_thread": kernel_hits,
            "threads": thread_counts,
            "placements": placements,
            "ptprobe_placements": list(OWN_PLACEMENTS) + placements,
            "quick": bool(args.quick),
            "slot_syscall_nr": arch.SLOT_SYSCALL_NR,
            "ratio_note": "throughput ratios (hits/s over hits/s); jmp/int3 > 1: jmp faster; "
                          "ptprobe/C = fraction of the C tracer's rate for the same stop type",
        },
        "baseline": {},
        "c_limit": [],
        "python_limit": [],
        "ptprobe": [],
        "kernel": {"available": False, "reason": None, "method": None, "results": []},
        "ratios": {"jmp_over_int3": [], "ptprobe_over_c": [], "placement_same_over_default": [],
                   "placement_auto_over_default": [], "placement_all_over_default": [],
                   "python_over_c": [], "ptprobe_over_python": []},
        "arming": [],
        "fairness": [],
        "errors": [],
    }
    fair_mechanisms = FAIR_MECHANISMS[:2] if args.quick else FAIR_MECHANISMS

    workdir = Path(tempfile.mkdtemp(prefix="ptprobe-bench-"))
    kernel = KernelUprobes()
    own_warmup = OWN_WARMUP // 10 if args.quick else OWN_WARMUP
    if args.placement_only:
        result["kernel"]["reason"] = "not measured (--placement-only)"
        try:
            target, _ = build(workdir)
            result["placement"] = run_placement(target, str(workdir / "out.txt"), runs, hits, own_warmup)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return result
    try:
        target, tracer = build(workdir)
        outfile = str(workdir / "out.txt")
        if args.fairness_only:
            run_fairness(target, outfile, args.fair_seconds, fair_mechanisms, result)
            return result

        # -- baselines
        log("baselines ...")
        loop = {}
        for site in SITES:
            loop[site] = repeat(lambda: native_once(target, site, baseline_iters), runs)["us_per_hit"] * 1000
        result["baseline"]["loop_ns_per_iter"] = loop
        sys_iters = max(1000, baseline_iters // 10)
        result["baseline"]["syscall_getpgid_ns"] = \
            repeat(lambda: native_once(target, "syscall", sys_iters), runs)["us_per_hit"] * 1000

        # -- C limit
        for mode in C_MODES:
            for threads in thread_counts:
                for where in placements:
                    log(f"C limit {mode} threads={threads} {where} ...")
                    try:
                        stats = repeat(lambda: ctracer_once(tracer, mode, hits, threads, warmup, placement, where),
                                       runs)
                    except (BenchError, subprocess.SubprocessError, OSError) as exc:
                        result["errors"].append(f"C limit {mode}/{threads}/{where}: {exc}")
                        continue
                    result["c_limit"].append(dict(stop=mode, threads=threads, placement=where, **stats))

        # -- Python limit
        for mode in C_MODES:
            for threads in thread_counts:
                for where in placements:
                    log(f"Python limit {mode} threads={threads} {where} ...")
                    try:
                        stats = repeat(lambda: ctracer_once(tracer, mode, hits, threads, warmup, placement, where,
                                                            python=True), runs)
                    except (BenchError, subprocess.SubprocessError, OSError) as exc:
                        result["errors"].append(f"Python limit {mode}/{threads}/{where}: {exc}")
                        continue
                    result["python_limit"].append(dict(stop=mode, threads=threads, placement=where, **stats))

        # -- ptprobe
        for site, mechanism, handler in PTPROBE_CASES:
            for threads in thread_counts:
                for where in list(OWN_PLACEMENTS) + placements:
                    log(f"ptprobe {site} {mechanism}{' +handler' if handler else ''} threads={threads} {where} ...")
                    try:
                        stats = repeat(lambda: ptprobe_once(target, outfile, site, mechanism, handler, hits,
                                                            threads, warmup, placement, where, own_warmup), runs)
                    except (BenchError, ptprobe.PtprobeError, OSError) as exc:
                        result["errors"].append(f"ptprobe {site}/{mechanism}/{threads}/{where}: {exc}")
                        continue
                    result["ptprobe"].append(dict(site=site, mechanism="int3" if mechanism == "int3" else "jmp",
                                                  slots=None if mechanism == "int3" else mechanism,
                                                  stop=mechanism, handler=handler, threads=threads,
                                                  placement=where, **stats))

        # -- kernel uprobes
        reason = kernel.setup()
        if reason is not None:
            result["kernel"]["reason"] = reason
            log(f"kernel uprobes skipped: {reason}")
        else:
            result["kernel"]["available"] = True
            for site in SITES:
                try:
                    kernel.add(site, target, file_offset(target, f"site_{site}"))
                except (OSError, BenchError) as exc:
                    result["errors"].append(f"kernel uprobe {site}: {exc}")
                    continue
                try:
                    for threads in thread_counts:
                        log(f"kernel uprobe {site} threads={threads} ...")

                        def once() -> Dict[str, int]:
                            out, count = kernel.run(site, [target, site, str(kernel_hits), str(threads),
                                                           str(warmup)])
                            expected = (kernel_hits + warmup) * threads
                            if count != expected:
                                raise BenchError(f"kernel uprobe {site}: {count} hits, expected {expected}")
                            return parse_line(out)

                        try:
                            stats = repeat(once, runs)
                        except (BenchError, OSError, subprocess.SubprocessError) as exc:
                            result["errors"].append(f"kernel {site}/{threads}: {exc}")
                            continue
                        result["kernel"]["results"].append(dict(site=site, threads=threads, **stats))
                finally:
                    kernel.remove(site)
            result["kernel"]["method"] = "perf stat" if kernel.perf else "uprobe_profile"

        # -- arming 1,000 sites
        for name, what, spec, options in ARMING_CASES:
            log(f"arming {name} ...")
            try:
                samples = [arming_once(target, spec, options) for _ in range(max(1, min(runs, 3)))]
            except (BenchError, ptprobe.PtprobeError, OSError) as exc:
                result["errors"].append(f"arming {name}: {exc}")
                continue
            result["arming"].append({
                "case": name, "what": what, "sites": samples[0]["sites"],
                "mechanisms": samples[0]["mechanisms"],
                "arm_s": statistics.median(s["arm_s"] for s in samples),
                "disarm_s": statistics.median(s["disarm_s"] for s in samples),
            })

        # -- fairness
        run_fairness(target, outfile, args.fair_seconds, fair_mechanisms, result)
        # -- placement policies on multi-threaded programs
        try:
            result["placement"] = run_placement(target, outfile, runs, hits, own_warmup)
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            result["errors"].append(f"placement: {exc}")
    finally:
        kernel.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)

    # -- actions inside the program (tools/bench_inprogram.py)
    log("in the program: counting and recording ...")
    try:
        import bench_inprogram
        result["in_program"] = bench_inprogram.run(runs, bool(args.quick))
    except (SystemExit, OSError, subprocess.SubprocessError, ptprobe.PtprobeError) as exc:
        result["errors"].append(f"in the program: {exc}")

    # -- call graphs (tools/bench_calls.py; the whole-program case needs Lua's sources)
    log("call graphs ...")
    try:
        import bench_calls
        result["calls"] = bench_calls.run(runs, bool(args.quick), lua=not args.no_lua)
    except (SystemExit, OSError, subprocess.SubprocessError, ptprobe.PtprobeError) as exc:
        result["errors"].append(f"call graphs: {exc}")

    compute_ratios(result)
    return result


def compute_ratios(result: Dict) -> None:
    c = {(r["stop"], r["threads"], r["placement"]): r for r in result["c_limit"]}
    py = {(r["stop"], r["threads"], r["placement"]): r for r in result.get("python_limit", [])}
    pt = {(r["site"], r["stop"], r["handler"], r["threads"], r["placement"]): r for r in result["ptprobe"]}
    ratios = result["ratios"]
    ratios["python_over_c"] = [dict(stop=k[0], threads=k[1], placement=k[2],
                                    ratio=r["hits_per_s"] / c[k]["hits_per_s"]) for k, r in py.items() if k in c]
    ratios["ptprobe_over_python"] = []
    for (site, stop, handler, threads, where), r in pt.items():
        limit = c.get((stop, threads, where))
        if limit is not None:
            ratios["ptprobe_over_c"].append(dict(site=site, stop=stop, handler=handler, threads=threads,
                                                 placement=where,
                                                 ratio=r["hits_per_s"] / limit["hits_per_s"]))
        limit = py.get((stop, threads, where))
        if limit is not None:
            ratios["ptprobe_over_python"].append(dict(site=site, stop=stop, handler=handler, threads=threads,
                                                      placement=where,
                                                      ratio=r["hits_per_s"] / limit["hits_per_s"]))
        if stop != "int3":
            int3 = pt.get((site, "int3", handler, threads, where))
            if int3 is not None:
                ratios["jmp_over_int3"].append(dict(site=site, slots=stop, handler=handler, threads=threads,
                                                    placement=where,
                                                    ratio=r["hits_per_s"] / int3["hits_per_s"]))
        if where in ("same", AUTO, ALL):
            default = pt.get((site, stop, handler, threads, "default"))
            if default is not None:
                ratios[f"placement_{where}_over_default"].append(dict(
                    site=site, stop=stop, handler=handler, threads=threads,
                    ratio=r["hits_per_s"] / default["hits_per_s"]))


# --------------------------------------------------------------------------- output
def format_table(result: Dict) -> str:
    lines: List[str] = []
    meta = result["meta"]
    add = lines.append
    add(f"ptprobe benchmark: kernel {meta['kernel']}, {meta['cpus']} CPUs, Python {meta['python']}; "
        f"median of {meta['runs']} run(s), {meta['hits_per_thread']} hits/thread "
        f"(+{meta['warmup_per_thread']} warm-up)")
    add(f"us/hit = wall time of the measured phase / all threads' hits; "
        f"~ = runs spread more than {NOISY}x (min to max)")
    add("placements: default = left to the scheduler, same = tracer and tracee pinned to one CPU, "
        "split = pinned to two; ptprobe's own placement is off in these")
    add("  and on in auto (ptprobe's default: it pins itself and a single-threaded program to one CPU; "
        "with 1 hitting thread the target is single-threaded)")
    add("  and in all (colocate='all': ptprobe pins itself and every thread of the program to one CPU)")
    add("")
    base = result["baseline"]
    if base:
        add("Baselines (no tracer):")
        add("  loop, no probe:    " + ", ".join(f"{k} {v:.2f} ns" for k, v in base["loop_ns_per_iter"].items()))
        add(f"  syscall getpgid:   {base['syscall_getpgid_ns']:.0f} ns")
        add("")
    placements = meta["placements"]
    columns = meta.get("ptprobe_placements", placements)
    c = {(r["stop"], r["threads"], r["placement"]): r for r in result["c_limit"]}
    py = {(r["stop"], r["threads"], r["placement"]): r for r in result.get("python_limit", [])}
    pt = {(r["site"], r["stop"], r["handler"], r["threads"], r["placement"]): r for r in result["ptprobe"]}
    cases = []
    for r in result["ptprobe"]:
        key = (r["site"], r["stop"], r["handler"])
        if key not in cases:
            cases.append(key)

    def cell(r: Optional[Dict]) -> str:
        if r is None:
            return f"{'-':>19} "
        noisy = r["max_us_per_hit"] > NOISY * r["min_us_per_hit"]
        return f"{r['us_per_hit']:9.2f} {r['hits_per_s'] / 1000:8.1f}k" + ("~" if noisy else " ")

    def label(site: str, stop: str, handler: bool) -> str:
        return f"{site} {'int3' if stop == 'int3' else 'jmp/' + stop}{' +handler' if handler else ''}"

    head1 = "".join(f"{p:>20}" for p in columns)
    head2 = "".join(f"{'us/hit':>9} {'hits/s':>9} " for _ in columns)
    for threads in meta["threads"]:
        add(f"== {threads} hitting thread{'s' if threads > 1 else ''} " + "=" * 70)
        add(f"  {'':<32}{head1}   ptprobe/C")
        add(f"  {'C limit (tools/ctracer.c)':<32}{head2}   {' '.join(f'{p:>7}' for p in placements)}")
        for stop in C_MODES:
            add(f"  {stop:<32}" + "".join(cell(c.get((stop, threads, p))) for p in columns))
        if py:
            add("  Python limit (tools/pylimit.py)                                                  "
                "               Python/C")
            for stop in C_MODES:
                ratio = [f"{py[k]['hits_per_s'] / c[k]['hits_per_s']:7.2f}" if k in py and k in c else f"{'-':>7}"
                         for k in ((stop, threads, p) for p in placements)]
                add(f"  {stop:<32}" + "".join(cell(py.get((stop, threads, p))) for p in columns)
                    + "   " + " ".join(ratio))
        add("  ptprobe")
        for site, stop, handler in cases:
            ratio = []
            for p in placements:
                lim = c.get((stop, threads, p))
                x = pt.get((site, stop, handler, threads, p))
                ratio.append(f"{x['hits_per_s'] / lim['hits_per_s']:7.2f}" if lim and x else f"{'-':>7}")
            add(f"  {label(site, stop, handler):<32}"
                + "".join(cell(pt.get((site, stop, handler, threads, p))) for p in columns)
                + "   " + " ".join(ratio))
        kern = [k for k in result["kernel"]["results"] if k["threads"] == threads]
        if kern:
            add("  kernel uprobes (no tracer)")
            for k in kern:
                add(f"  {k['site']:<32}" + cell(k))
        add("")

    jmp = result["ratios"]["jmp_over_int3"]
    if jmp:
        cols = [(t, p) for t in meta["threads"] for p in placements]
        add("jmp/int3, hits/s ratio on the same site (>1: the jmp is faster)")
        add(f"  {'':<28}" + "".join(f"{f't{t} {p}':>11}" for t, p in cols))
        rows: Dict[Tuple[str, str, bool], Dict[Tuple[int, str], float]] = {}
        for r in jmp:
            rows.setdefault((r["site"], r["slots"], r["handler"]), {})[(r["threads"], r["placement"])] = r["ratio"]
        for (site, slots, handler), vals in rows.items():
            add(f"  {label(site, slots, handler):<28}"
                + "".join(f"{vals[k]:11.2f}" if k in vals else f"{'-':>11}" for k in cols))
        add("")
    for key, what in (("placement_same_over_default", "pinned to one CPU"),
                      ("placement_auto_over_default", "ptprobe's own placement (auto)"),
                      ("placement_all_over_default", "colocate='all'")):
        group = result["ratios"].get(key, [])
        for threads in meta["threads"]:
            vals = [r["ratio"] for r in group if r["threads"] == threads]
            if vals:
                add(f"placement, {threads} thread(s): {what} vs default scheduling, ptprobe hits/s ratio "
                    f"median {statistics.median(vals):.2f} (min {min(vals):.2f}, max {max(vals):.2f})")
    add("")
    if not result["kernel"]["available"]:
        add(f"kernel uprobes: skipped ({result['kernel']['reason']})")
    else:
        add(f"kernel uprobes: counted with {result['kernel']['method']}, "
            f"{meta['kernel_hits_per_thread']} hits/thread, default placement")
    add("")
    if result["arming"]:
        add("Arming / disarming 1000 sites (median seconds, target stopped before main):")
        for a in result["arming"]:
            add(f"  {a['what']:<58} arm {a['arm_s']:6.3f} s  detach {a['disarm_s']:6.3f} s  "
                f"({'/'.join(a['mechanisms'])})")
        add("")
    lines.extend(format_fairness(result))
    if result.get("placement"):
        add(format_placement(result["placement"]))
        add("")
    if result.get("in_program"):
        import bench_inprogram
        add(bench_inprogram.format_report(result["in_program"]))
        add("")
    if result.get("calls"):
        import bench_calls
        add(bench_calls.format_report(result["calls"]))
        add("")
    if result["errors"]:
        add("Errors:")
        for e in result["errors"]:
            add("  " + e)
    add(f"wall time {meta.get('wall_s', 0):.0f} s")
    return "\n".join(lines)


def format_fairness(result: Dict) -> List[str]:
    """The fairness block of the table (nothing when it was not measured)."""
    if not result.get("fairness"):
        return []
    lines = ["Fairness: calls per thread, threads calling one probed nop5 (ptprobe's default placement)",
             f"  {'':<22}{'threads':>8}{'seconds':>8}{'min':>12}{'median':>12}{'max':>12}{'min/median':>12}"]
    for f in result["fairness"]:
        what = "untraced" if f["mechanism"] == "native" else (
            "int3" if f["mechanism"] == "int3" else f"jmp/{f['mechanism']}")
        lines.append(f"  {what:<22}{f['threads']:>8}{f['seconds']:>8}{f['min']:>12}{f['median']:>12.0f}"
                     f"{f['max']:>12}{f['min_over_median']:>12.3f}")
    return lines + [""]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    parser.add_argument("--runs", type=int, default=None, help="runs per case, median reported (default 5)")
    parser.add_argument("--hits", type=int, default=None, help="measured hits per thread (default 10000)")
    parser.add_argument("--quick", action="store_true", help="tiny counts and one run (for CI)")
    parser.add_argument("--fair-seconds", type=int, default=None,
                        help="seconds of each fairness run (default 10, --quick 1)")
    parser.add_argument("--fairness-only", action="store_true", help="measure only the per-thread fairness")
    parser.add_argument("--no-lua", action="store_true",
                        help="call graphs: skip the whole-program case (it downloads Lua's sources once)")
    parser.add_argument("--placement-only", action="store_true",
                        help="only the section on CPU placement policies (multi-threaded programs)")
    args = parser.parse_args(argv)
    if args.fair_seconds is None:
        args.fair_seconds = 1 if args.quick else 10
    if args.runs is None:
        args.runs = 1 if args.quick else 5
    if args.hits is None:
        args.hits = 200 if args.quick else 10000
    if args.runs < 1 or args.hits < 1:
        parser.error("--runs and --hits must be positive")
    t0 = time.monotonic()
    try:
        result = run_benchmark(args)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    result["meta"]["wall_s"] = time.monotonic() - t0
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    elif args.fairness_only:
        print("\n".join(format_fairness(result) + [f"  {e}" for e in result["errors"]]))
    else:
        print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
