"""Actions inside the program (issue 11): counting slots and recording stubs, with
no stop, on real programs.

Counts are checked against the loop counts; records one by one (every hit once,
arguments right, per thread in order); register, flag and red-zone fidelity by
the targets themselves (they exit non-zero on a mismatch); the ring-full modes;
fork; a tracer that dies; detach and attach again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from typing import Dict, List, Sequence, Tuple

import pytest

from conftest import build
from helpers import (GUARD, REPO, SUMMARY, RecordingObserver, Target, captured_stdout, fast_build, ptprobe_cli,
                     repo_env, tracer_pid, untraced, watchdog)

import ptprobe

U64 = (1 << 64) - 1
NOP5_FLAGS = ("-O1", "-pg", "-mfentry", "-mnop-mcount", "-fno-pie", "-no-pie", "-pthread")


def act_threads() -> str:
    return build("act_threads.c", *NOP5_FLAGS)


def traced(argv: Sequence[str], probes: Sequence[Tuple[str, str, object]], **options
           ) -> Tuple[int, str, List[ptprobe.Probe], ptprobe.Session]:
    """Run *argv* with *probes* ((mode, spec, handler): mode "probe" or "record")
    armed, under a watchdog; (status, stdout, probes, session)."""
    observer = options.pop("observer", None) or RecordingObserver()
    pids: List[int] = []
    with captured_stdout() as out:
        with watchdog(GUARD, pids):
            with ptprobe.run(list(argv), observer=observer, **options) as session:
                pids.append(session.main_pid)
                armed = [getattr(session, mode)(spec, handler) for mode, spec, handler in probes]
                status = session.wait()
    assert not observer.handler_errors, observer.handler_errors
    return status, out.text, armed, session


def expected_work6(t: int, i: int) -> Tuple[int, ...]:
    return (t, i, 2 * i, -i & U64, i * i, ~i & U64)


# --------------------------------------------------------------------------- counting
@pytest.mark.parametrize("threads", [0, 4, 16, 64])
def test_counts_exact_with_no_stop(threads):
    """A probe without a handler on a nop5 site counts inside the program: exact
    counts on 1, 4 and 16 threads, no stop, and the flags at a mid-function site
    survive (the target checks them)."""
    prog = act_threads()
    n = 20000 if threads < 64 else 2000
    status, out, (work, flags), _ = traced([prog, str(threads), str(n)],
                                            [("probe", f"uprobe:{prog}:work6", None),
                                             ("probe", f"uprobe:{prog}:flags_site", None)])
    assert status == 0, out
    assert "mismatches 0" in out
    calls = max(threads, 1) * n
    assert [s.action for s in work.sites + flags.sites] == ["count", "count"]
    assert (work.hits, flags.hits) == (calls, 2 * calls)
    assert (work.stop_hits, flags.stop_hits) == (0, 0)


def test_counting_slot_registers_and_red_zone():
    """The register and red-zone checks of the fast-path targets, through counting slots."""
    regs = fast_build("fast_regs.c")
    status, out, (probe,), _ = traced([regs, "check", "7", "500"], [("probe", f"uprobe:{regs}:regs_site", None)])
    assert status == 0 and "check ok 500" in out, out
    assert probe.sites[0].action == "count" and probe.hits == 500
    redzone = fast_build("fast_redzone.c")
    status, out, (probe,), _ = traced([redzone, "300"], [("probe", f"uprobe:{redzone}:rz_site", None)])
    assert status == 0 and "redzone bad=0" in out, out
    assert probe.sites[0].action == "count" and probe.hits == 300


def test_handler_set_and_removed_while_armed():
    """A counting site that gets a handler stops from then on (and counts there); the
    handler removed, it counts in the program again: no hit lost or counted twice.
    (The jmp is re-aimed in place: the site is armed when the handler changes.)"""
    prog = act_threads()
    n = 3000
    seen: List[int] = []
    pids: List[int] = []
    with captured_stdout() as out, watchdog(GUARD, pids):
        with ptprobe.run([prog, "0", str(n)]) as session:
            pids.append(session.main_pid)
            probe = session.probe(f"uprobe:{prog}:work6")
            site = probe.sites[0]
            assert site.action == "count" and site.armed
            probe.handler = lambda hit: seen.append(hit.args[1])
            assert site.action == "stop"
            probe.handler = None
            assert site.action == "count"
            probe.handler = lambda hit: seen.append(hit.args[1])
            assert session.wait() == 0
    assert probe.hits == n
    assert seen == list(range(n))
    assert "mismatches 0" in out.text


def test_handler_changes_while_the_program_runs():
    """Handlers switched on and off while the program runs (the jmp re-aimed with
    the world stopped): every call counted exactly once."""
    prog = act_threads()
    n = 400_000
    pids: List[int] = []
    with captured_stdout() as out, watchdog(GUARD, pids):
        with ptprobe.run([prog, "2", str(n)]) as session:
            pids.append(session.main_pid)
            probe = session.probe(f"uprobe:{prog}:work6", lambda hit: None)
            rounds = 0
            while session.wait(timeout=0.02) is None:
                probe.handler = None if probe.handler else (lambda hit: None)
                rounds += 1
            assert session.returncode == 0
    assert rounds >= 1                   # (counting, the rest runs in a flash)
    assert probe.hits == 2 * n
    assert "mismatches 0" in out.text


# --------------------------------------------------------------------------- recording
@pytest.mark.parametrize("threads", [0, 4])
def test_records_exact_per_thread_in_order(threads):
    """Every hit recorded once, with its six argument registers, its thread and a
    monotonic time, and each thread's records in the order of its calls."""
    prog = act_threads()
    n = 5000
    got: List[ptprobe.Record] = []
    start = time.monotonic_ns()
    status, out, (probe,), session = traced([prog, str(threads), str(n)],
                                            [("record", f"uprobe:{prog}:work6", got.append)])
    end = time.monotonic_ns()
    assert status == 0 and "mismatches 0" in out, out
    assert probe.sites[0].action == "record"
    assert probe.stop_hits == 0
    calls = max(threads, 1) * n
    assert probe.hits == calls == len(got)
    by_tid: Dict[int, List[ptprobe.Record]] = defaultdict(list)
    for record in got:
        by_tid[record.tid].append(record)
    assert 0 not in by_tid, "a record whose thread was not told"
    assert len(by_tid) == max(threads, 1)
    for records in by_tid.values():
        t = records[0].args[0]
        assert [r.args for r in records] == [expected_work6(t, i) for i in range(n)]
        times = [r.time_ns for r in records]
        assert times == sorted(times)
        assert start <= times[0] and times[-1] <= end
        assert {r.pid for r in records} == {session.main_pid}
        assert {r.name for r in records} == {"work6"}


def test_recording_keeps_flags_registers_and_red_zone():
    prog = act_threads()
    got: List[ptprobe.Record] = []
    status, out, (probe,), _ = traced([prog, "2", "2000"], [("record", f"uprobe:{prog}:flags_site", got.append)])
    assert status == 0 and "mismatches 0" in out, out
    assert probe.sites[0].action == "record" and len(got) == 8000
    regs = fast_build("fast_regs.c")
    status, out, (probe,), _ = traced([regs, "check", "7", "500"],
                                      [("record", f"uprobe:{regs}:regs_site", lambda r: None)])
    assert status == 0 and "check ok 500" in out, out
    assert probe.sites[0].action == "record"
    redzone = fast_build("fast_redzone.c")
    status, out, (probe,), _ = traced([redzone, "300"], [("record", f"uprobe:{redzone}:rz_site", lambda r: None)])
    assert status == 0 and "redzone bad=0" in out, out


def twelve_expected(i: int) -> List[int]:
    table = [11, -22, 33, -44, 55, -66]
    local = [100 + i, -200 - i, 300 + i, -400 - i]
    u8 = (-7 - i) & 0xFF
    return [-17, 0xDEADBEEFCAFEF00D ^ i, -5 - i, -300 - i, -99999999999 - i, 4000000000 + i, table[i % 5],
            local[i % 3 + 1], -1234567890123 - i, -66, 0xFEDC - i, u8 - 256 if u8 >= 128 else u8]


@pytest.mark.parametrize("opt", ["-O0", "-O2"])
def test_usdt_records_every_operand_form(opt):
    """USDT operands compiled into loads: constants, registers (rax, rcx and r11
    included), stack slots, SIB, rip-relative globals, 8-bit registers."""
    prog = build("usdt_args.c", opt, "-DARGS_NOP5")
    n = 9
    got: List[ptprobe.Record] = []
    status, out, (probe,), _ = traced([prog, str(n)], [("record", f"usdt:{prog}:ptargs:twelve", got.append)])
    assert status == 0
    assert probe.sites[0].action == "record"
    assert [list(r.args) for r in got] == [twelve_expected(i) for i in range(n)]


def f32(value: float) -> float:
    import struct
    return struct.unpack("<f", struct.pack("<f", value))[0]


def test_usdt_float_records():
    """8f and 4f arguments in general registers and in memory (recorded in the
    program), and in xmm registers (an int3 site: recorded at the stop)."""
    prog = build("usdt_float.c", "-O2")
    n = 6
    names = ("gpr", "xmm", "mem")
    records: Dict[str, List[ptprobe.Record]] = {k: [] for k in names}
    status, out, probes, _ = traced([prog, str(n)], [("record", f"usdt:{prog}:ptfloat:{k}", records[k].append)
                                                     for k in names])
    assert status == 0
    assert [p.sites[0].action for p in probes] == ["record", "stop", "record"]
    for name in names:
        for i, record in enumerate(records[name]):
            want = [i * 0.75 - 1e10, f32(i * -0.375 + 2.0)] + ([-3] if name == "xmm" else [])
            assert list(record.args) == want, (name, i)
        assert len(records[name]) == n


def test_records_of_stopping_and_recording_sites_stay_in_order():
    """A thread's records come in the order of its hits, also when some of its sites
    record at a stop (int3) and others in the program."""
    prog = build("usdt_float.c", "-O2")
    n = 50
    order: List[str] = []
    status, _, _, _ = traced([prog, str(n)], [("record", f"usdt:{prog}:ptfloat:{k}",
                                                 lambda r, k=k: order.append(k)) for k in ("gpr", "xmm", "mem")])
    assert status == 0
    assert order == ["gpr", "xmm", "mem"] * n


# --------------------------------------------------------------------------- ring full
def test_ring_full_loses_nothing_by_default():
    """A small ring and a slow consumer: the program waits (its stub stops) while
    ptprobe drains; every record arrives, in order."""
    prog = act_threads()
    n = 100_000
    got: List[int] = []

    def slow(record: ptprobe.Record) -> None:
        got.append(record.args[1])
        if record.args[1] % 1000 == 0:
            time.sleep(0.0005)

    status, out, (probe,), session = traced([prog, "0", str(n)], [("record", f"uprobe:{prog}:work6", slow)],
                                            ring_size=0x10000)
    assert status == 0, out
    assert got == list(range(n))
    assert session.actions.drops == 0


def test_ring_full_drops_and_counts_in_drop_mode():
    prog = act_threads()
    n = 100_000
    got: List[int] = []

    def slow(record: ptprobe.Record) -> None:
        got.append(record.args[1])
        if len(got) % 200 == 0:
            time.sleep(0.002)

    status, out, (probe,), session = traced([prog, "0", str(n)], [("record", f"uprobe:{prog}:work6", slow)],
                                            ring_size=0x10000, drop=True)
    assert status == 0, out
    drops = session.actions.drops
    assert drops > 0
    assert len(got) + drops == n == probe.hits
    assert got == sorted(got)


def test_program_killed_while_recording():
    """The program killed (SIGKILL) while four threads record: a record left half
    written cannot stall the reading of the others; every record that arrives is
    whole (each thread's calls in order, from its first on)."""
    prog = act_threads()
    got: List[ptprobe.Record] = []
    pids: List[int] = []
    with watchdog(GUARD, pids):
        with ptprobe.run([prog, "4", "100000000"]) as session:
            pids.append(session.main_pid)
            session.record(f"uprobe:{prog}:work6", got.append)
            while len(got) < 20000:
                assert session.wait(timeout=0.05) is None
            os.kill(session.main_pid, signal.SIGKILL)
            assert session.wait() == -signal.SIGKILL
    by_tid: Dict[int, List[int]] = defaultdict(list)
    for record in got:
        by_tid[record.tid].append(record.args[1])
        assert record.args == expected_work6(record.args[0], record.args[1])
    assert 0 not in by_tid and 1 <= len(by_tid) <= 4
    for calls in by_tid.values():
        assert calls == list(range(len(calls)))


# --------------------------------------------------------------------------- fork
def test_fork_parent_and_child_count_and_record_apart():
    prog = build("act_fork.c", *NOP5_FLAGS)
    n = 3000
    got: List[ptprobe.Record] = []
    status, out, (counted, recorded), session = traced(
        [prog, str(n)], [("probe", f"uprobe:{prog}:work6", None), ("record", f"uprobe:{prog}:work6", got.append)])
    assert status == 0
    pids = sorted(int(line.split()[1]) for line in out.splitlines() if line.startswith("pid "))
    assert len(pids) == 2
    by_pid: Dict[int, List[ptprobe.Record]] = defaultdict(list)
    for record in got:
        by_pid[record.pid].append(record)
    assert sorted(by_pid) == pids
    for pid, records in by_pid.items():
        assert [r.args[:2] for r in records] == [(pid, i) for i in range(n)]
    assert counted.hits == recorded.hits == 2 * n
    assert {s.action for s in counted.sites} == {"record"}
    assert len({s.pid for s in counted.sites}) == 2


# --------------------------------------------------------------------------- tracer gone, attach
_RECORDER = textwrap.dedent("""
    import sys, ptprobe
    pid, spec = int(sys.argv[1]), sys.argv[2]
    with ptprobe.attach(pid) as session:
        session.record(spec, lambda r: print(r.args[1], flush=True))
        session.wait()
""")


def test_sigkill_of_ptprobe_while_recording_leaves_the_program_right():
    """Recording needs no tracer: ptprobe killed in the middle, the program runs on
    (a full ring then drops) and ends with the right result."""
    prog = act_threads()
    n = 400_000
    target = Target([prog, "2", str(n), "wait"], ready="ready")
    try:
        script = subprocess.Popen([sys.executable, "-c", _RECORDER, str(target.pid), f"uprobe:{prog}:work6"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=repo_env(), cwd=str(REPO))
        try:
            deadline = time.monotonic() + GUARD
            while tracer_pid(target.pid) == 0:
                assert script.poll() is None, script.stderr.read()
                assert time.monotonic() < deadline
                time.sleep(0.01)            # (polling /proc: the only way to see the attach)
            target.send(b"g")
            assert script.stdout.readline().strip() != b""    # records flow
            script.kill()
        finally:
            script.kill()
            script.wait(timeout=GUARD)
        assert target.proc.wait(timeout=GUARD) == 0
        lines = target.out.wait_for(lambda ls: "<EOF>" in ls, "the end of the output")
        assert [line for line in lines if line.startswith(("sum", "mismatches"))] == \
            untraced([prog, "2", str(n)]).stdout.splitlines()
    finally:
        target.kill()


def test_attach_count_detach_attach_again():
    """Counting slots across attaches: each session counts its own hits, the code is
    restored byte for byte after each, and the program is unharmed."""
    prog = act_threads()
    target = Target([prog, "0", "300000000", "wait"], ready="ready")
    try:
        target.send(b"g")
        counts = []
        for _ in range(3):
            with ptprobe.attach(target.pid) as session:
                probe = session.probe(f"uprobe:{prog}:work6")
                assert probe.sites[0].action == "count"
                assert session.wait(timeout=0.2) is None
            counts.append(probe.hits)                # readable after detach, and final:
            assert tracer_pid(target.pid) == 0
            time.sleep(0.05)                         # (the program runs on: the count must not move)
            assert probe.hits == counts[-1]
        assert all(c > 0 for c in counts)
        from helpers import code_in_memory
        memory, original = code_in_memory(target.pid, prog, "work6")
        assert memory == original
        assert target.proc.poll() is None
    finally:
        target.kill()


# --------------------------------------------------------------------------- unreadable arguments
def act_fault() -> str:
    return build("act_fault.c", "-O2")


@pytest.mark.parametrize("where", ["good", "0x10"])
def test_usdt_memory_operand_read_in_the_program(where):
    """A USDT operand in memory through a register other than rsp is read by the stub
    itself (process_vm_readv): the value when the memory is there, UNREADABLE when
    it is not, and the program unharmed either way."""
    prog = act_fault()
    got: List[ptprobe.Record] = []
    status, out, (probe,), _ = traced([prog, "50", where], [("record", f"usdt:{prog}:act:pair", got.append)])
    assert status == 0 and "done 50" in out
    assert probe.sites[0].action == "record"
    second = 42 if where == "good" else ptprobe.UNREADABLE
    assert [r.args for r in got] == [(42, second, i) for i in range(50)]


# --------------------------------------------------------------------------- the command line
def _summary(stderr: str, spec: str):
    for line in stderr.splitlines():
        m = SUMMARY.match(line)
        if m and m["spec"] == spec:
            return m
    raise AssertionError(f"no summary of {spec} in {stderr!r}")


def _json_records(stdout: str) -> List[dict]:
    import json
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_cli_records_in_the_program_what_stops_would_show():
    """``ptprobe run`` without a handler that needs a stop records in the program;
    its JSON lines are those of --stop (per thread, in order), and the summary says
    where the hits were taken."""
    prog = act_threads()
    spec = f"uprobe:{prog}:work6"
    runs = {}
    for how in ((), ("--stop",)):
        result = ptprobe_cli("run", *how, "--json", "-o", "-", "-p", spec, "--", prog, "3", "500")
        assert result.returncode == 0, result.stderr
        by_thread: Dict[int, List[List[int]]] = defaultdict(list)
        for record in _json_records(result.stdout):
            assert record["name"] == "work6" and record["probe"] == spec
            by_thread[record["args"][0]].append(record["args"])
        runs[how] = (dict(by_thread), _summary(result.stderr, spec))
    (inside, inside_summary), (stopped, stopped_summary) = runs[()], runs[("--stop",)]
    assert inside == stopped
    assert inside == {t: [list(expected_work6(t, i)) for i in range(500)] for t in range(3)}
    assert inside_summary["hits"] == stopped_summary["hits"] == "1500"
    assert inside_summary["inside"] == "recorded in the program" and stopped_summary["inside"] is None


def test_cli_aggregation_counts_in_the_program():
    prog = act_threads()
    spec = f"uprobe:{prog}:work6"
    result = ptprobe_cli("run", "-o", "-", "-p", spec, "--agg", "count() by arg0", "--", prog, "2", "20000")
    assert result.returncode == 0, result.stderr
    assert "@count[0]: 20000\n@count[1]: 20000\n" in result.stdout, result.stdout
    assert _summary(result.stderr, spec)["inside"] == "recorded in the program"


def test_cli_drop_mode_reports_the_drops():
    """--drop with the smallest ring and a consumer slower than the program: records
    are lost, counted, and said; lines + drops = hits."""
    prog = act_threads()
    spec = f"uprobe:{prog}:work6"
    n = 1_000_000
    result = ptprobe_cli("run", "--drop", "--ring-size", "65536", "--json", "-o", "-", "-p", spec, "--",
                         prog, "0", str(n), timeout=GUARD)
    assert result.returncode == 0, result.stderr
    lines = _json_records(result.stdout)
    drops = [line for line in result.stderr.splitlines() if line.endswith("dropped (the ring was full: --drop)")]
    assert len(drops) == 1, result.stderr
    dropped = int(drops[0].split()[1])
    assert dropped > 0 and len(lines) + dropped == n
    assert int(_summary(result.stderr, spec)["hits"]) == n
    assert [r["args"][1] for r in lines] == sorted(r["args"][1] for r in lines)


@pytest.mark.parametrize("argv, words", [
    (["--ring-size", "1000"], "--ring-size must be a power of two"),
    (["--ring-size", "32768"], "--ring-size must be a power of two"),
])
def test_cli_ring_size_errors(argv, words):
    prog = act_threads()
    result = ptprobe_cli("run", *argv, "-p", f"uprobe:{prog}:work6", "--", prog, "0", "1")
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ptprobe: ") and words in lines[0], result.stderr


def test_cli_unreadable_argument_is_an_error_per_hit():
    """An argument the stub could not read is reported on each hit as a stop would
    report it, one line each; the program is unharmed and its status passes through."""
    prog = act_fault()
    spec = f"usdt:{prog}:act:pair"
    result = ptprobe_cli("run", "-p", spec, "--", prog, "3", "0x10")
    assert result.returncode == 0, result.stderr
    assert "done 3" in result.stdout
    errors = [line for line in result.stderr.splitlines() if "FaultError" in line]
    assert len(errors) == 3 and all("cannot read argument 1 of act:pair" in e for e in errors), result.stderr
    assert _summary(result.stderr, spec)["hits"] == "3"
    good = ptprobe_cli("run", "-o", "-", "-p", spec, "--", prog, "3", "good")
    assert good.returncode == 0 and "FaultError" not in good.stderr, good.stderr
    assert [line.split("args: ")[1] for line in good.stdout.splitlines() if line.startswith("act:pair ")] == \
        [f"42 42 {i}" for i in range(3)], good.stdout
