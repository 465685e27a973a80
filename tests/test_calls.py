"""Call graphs recorded inside the program (issue 15): every entry and exit, no stop
per call, return addresses taken over in the program and given back at detach.

On tests/c/graph_target.c: recursion, 8 threads, longjmp, signal handlers, fork,
exec, a function that calls exit, and detach in the middle of the run. Every
count is exact; nesting and how each call ended are checked call by call.
"""

from __future__ import annotations

import io
import os
import struct
from collections import Counter, defaultdict
from typing import Dict, List, Tuple

import capstone
import pytest

from conftest import build
from helpers import GUARD, RecordingObserver, Target, captured_stdout, code_in_memory, tracer_pid, watchdog

import ptprobe
from ptprobe import calltrace, codegen
from ptprobe.calltrace import LOST, RETURNED, UNFINISHED, Call
from ptprobe.elf import ElfFile

MCOUNT = ("-O1", "-pg", "-mfentry", "-mnop-mcount", "-fno-pie", "-no-pie", "-pthread")
PATCHABLE = ("-O1", "-fpatchable-function-entry=5", "-pthread")


def target(flags=MCOUNT) -> str:
    return build("graph_target.c", *flags)


def record(argv: List[str], **options) -> Tuple[int, str, ptprobe.Probe]:
    pids: List[int] = []
    with captured_stdout() as out, watchdog(GUARD, pids):
        with ptprobe.run(argv, **options) as session:
            pids.append(session.main_pid)
            probe = session.trace_calls(argv[0])
            status = session.wait()
    return status, out.text, probe


def fib_calls(n: int) -> int:
    return 1 if n < 2 else 1 + fib_calls(n - 1) + fib_calls(n - 2)


def check_fib_tree(call: Call, n: int) -> None:
    assert (call.name, call.status) == ("fib", RETURNED)
    assert call.end_ns >= call.start_ns
    kids = [c for c in call.children if c.name == "fib"]
    if n < 2:
        assert kids == []
    else:
        assert len(kids) == 2
        check_fib_tree(kids[0], n - 1)
        check_fib_tree(kids[1], n - 2)


@pytest.mark.parametrize("flags", [MCOUNT, PATCHABLE], ids=["mnop-mcount", "patchable-entry"])
def test_recursion_exact(flags):
    n = 16
    status, out, probe = record([target(flags), "fib", str(n)])
    assert status == 0 and "fib 987" in out
    calls = probe.calls
    names = Counter(c.name for c in calls.calls)
    assert names["fib"] == fib_calls(n)
    assert names["main"] == 1
    assert all(c.status == RETURNED for c in calls.calls)
    (main,) = [c for c in calls.roots if c.name == "main"]
    (top,) = [c for c in main.children if c.name == "fib"]
    check_fib_tree(top, n)
    assert {s.action for s in probe.sites} == {"graph"}
    assert "_start" in probe.unpatchable                  # (an assembly entry: no NOP)


def test_eight_threads():
    n = 2000
    status, out, probe = record([target(), "threads", "8", str(n)])
    assert status == 0 and "threads done" in out
    by_tid: Dict[int, List[Call]] = defaultdict(list)
    for call in probe.calls.calls:
        by_tid[call.tid].append(call)
    workers = {tid: calls for tid, calls in by_tid.items() if any(c.name == "outer" for c in calls)}
    assert len(workers) == 8 and 0 not in workers
    for calls in workers.values():
        assert Counter(c.name for c in calls) == {"worker": 1, "outer": n, "middle": n, "inner": 2 * n}
        assert all(c.status == RETURNED for c in calls)
        for outer in (c for c in calls if c.name == "outer"):
            (middle,) = outer.children
            assert middle.name == "middle" and [c.name for c in middle.children] == ["inner", "inner"]


def test_longjmp_out_of_three_frames():
    n = 50
    status, out, probe = record([target(), "longjmp", str(n)])
    assert status == 0 and "longjmp done" in out
    jumpers = [c for c in probe.calls.calls if c.name == "jumper"]
    assert len(jumpers) == n
    for jumper in jumpers:
        assert jumper.status == RETURNED
        deep1, inner = jumper.children
        assert (deep1.name, deep1.status, inner.name, inner.status) == ("deep1", LOST, "inner", RETURNED)
        (deep2,) = deep1.children
        (deep3,) = deep2.children
        assert (deep2.status, deep3.status) == (LOST, LOST)
        assert deep1.end_ns is None                        # a lost exit is marked, never invented


def test_tail_calls_share_a_return_address():
    """At -O2, tail_a jmps to tail_b and tail_b to tail_c: three calls, one return
    address. Each is recorded under the one that tail-called it, and all three
    return (the innermost first) when tail_c does; the program gets its values."""
    n = 200
    path = target(("-O2",) + MCOUNT[1:])
    elf = ElfFile(path)
    for caller, callee in (("tail_a", "tail_b"), ("tail_b", "tail_c")):
        sym, dest = elf.get_symbol(caller), elf.get_symbol(callee).address
        code = elf.read(sym.address, sym.size)
        jumps = [i for i in capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64).disasm(code, sym.address)
                 if i.mnemonic == "jmp" and i.op_str == hex(dest)]
        assert jumps, f"{caller} does not tail-call {callee}: the test needs gcc's sibling calls"
    status, out, probe = record([path, "tail", str(n)])
    expected = sum(2 * (i + 1) + 3 for i in range(n))
    assert status == 0 and f"tail {expected}" in out
    calls = probe.calls.calls
    assert Counter(c.name for c in calls if c.name.startswith("tail_")) == {"tail_a": n, "tail_b": n, "tail_c": n}
    assert all(c.status == RETURNED for c in calls)
    (main,) = [c for c in probe.calls.roots if c.name == "main"]
    assert [c.name for c in main.children] == ["tail_a"] * n
    for a in main.children:
        (b,) = a.children
        (c,) = b.children
        assert (b.name, c.name, c.children) == ("tail_b", "tail_c", [])
        assert a.start_ns <= b.start_ns <= c.start_ns <= c.end_ns <= b.end_ns <= a.end_ns


def test_signal_handler_calls_a_recorded_function():
    n = 30
    status, out, probe = record([target(), "signal", str(n)])
    assert status == 0 and "signal done" in out
    raisers = [c for c in probe.calls.calls if c.name == "raiser"]
    assert len(raisers) == n
    for raiser in raisers:
        assert raiser.status == RETURNED
        (handler,) = raiser.children                       # the handler ran on top of it
        assert handler.name == "on_usr1" and [c.name for c in handler.children] == ["inner", "inner"]
    assert Counter(c.name for c in probe.calls.calls)["inner"] == 2 * n
    assert all(c.status == RETURNED for c in probe.calls.calls if c.name in ("signalled", "raiser", "inner"))


def test_fork_with_pending_returns():
    status, out, probe = record([target(), "fork"])
    assert status == 0
    pids = sorted(int(line.split()[1]) for line in out.splitlines() if line.endswith("forked"))
    assert len(pids) == 2
    by_pid: Dict[int, List[Call]] = defaultdict(list)
    for call in probe.calls.calls:
        by_pid[call.pid].append(call)
    assert sorted(by_pid) == pids
    parent, child = (by_pid[p] for p in pids)
    assert Counter(c.name for c in child) == {"middle": 1, "inner": 2}
    assert all(c.status == RETURNED for c in child)          # returned through the copied frames
    forker = [c for c in parent if c.name == "forker"]
    assert len(forker) == 1 and forker[0].status == RETURNED


def test_exec_with_frames_pending():
    status, out, probe = record([target(), "exec"])
    assert status == 0 and "fib 5" in out
    calls = probe.calls.calls
    (execer,) = [c for c in calls if c.name == "execer"]
    assert execer.status == UNFINISHED and execer.end_ns is None
    assert Counter(c.name for c in calls)["fib"] == fib_calls(5)        # armed again in the new image
    assert all(c.status == RETURNED for c in calls if c.name == "fib")


def test_function_that_exits():
    status, _, probe = record([target(), "exit"])
    assert status == 3
    calls = probe.calls.calls
    (quitter,) = [c for c in calls if c.name == "quitter"]
    assert quitter.status == UNFINISHED
    assert [(c.name, c.status) for c in quitter.children] == [("inner", RETURNED)]


def test_detach_in_the_middle_restores_every_return_address():
    """Detach while eight threads are deep in recorded functions: every hijacked
    return address goes back, and the program finishes right."""
    prog = target()
    pids: List[int] = []
    with captured_stdout() as out, watchdog(GUARD, pids):
        session = ptprobe.run([prog, "threads", "8", "300000"])
        pids.append(session.main_pid)
        probe = session.trace_calls(prog)
        while len(probe.calls.calls) < 50000:
            assert session.wait(timeout=0.02) is None
        session.detach()
        _, status = os.waitpid(session.main_pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    assert "threads done" in out.text
    unfinished = [c for c in probe.calls.calls if c.status == UNFINISHED]
    assert unfinished                                     # threads were inside calls at the detach


def test_attach_record_detach_program_right():
    prog = target()
    t = Target([prog, "wait"], ready="ready")
    try:
        with ptprobe.attach(t.pid) as session:
            probe = session.trace_calls(prog)
            while len(probe.calls.calls) < 20000:
                assert session.wait(timeout=0.02) is None
        assert tracer_pid(t.pid) == 0
        for name in ("outer", "middle", "inner"):
            memory, original = code_in_memory(t.pid, prog, name)
            assert memory == original
        assert Counter(c.name for c in probe.calls.calls if c.status == RETURNED)["outer"] > 1000
        t.send(b"q")
        assert t.proc.wait(timeout=GUARD) == 0
        lines = t.out.wait_for(lambda ls: any(line.startswith("sum ") for line in ls), "sum")
        total, calls = (int(w) for w in [l for l in lines if l.startswith("sum ")][0].split()[1::2])
        assert total == 2 * calls * (calls - 1) + 6 * calls
    finally:
        t.kill()


def test_entry_stubs_are_small_and_a_full_budget_is_said():
    """A function's entry stub is a few bytes calling one routine per process, so
    the default 64 trampoline pages hold thousands; with a single page (taken by
    the slots) nothing fits: one notice says so, nothing is recorded, and the
    program runs right."""
    assert codegen.GRAPH_STUB_SIZE <= 64
    observer = RecordingObserver()
    status, out, probe = record([target(), "fib", "10"], max_trampoline_pages=1, observer=observer)
    assert status == 0 and "fib 55" in out
    assert probe.calls is None or probe.calls.calls == []
    (notice,) = [n for n in observer.notices if "no room" in n]
    assert "not recorded" in notice


def test_trace_file_round_trip(tmp_path):
    status, _, probe = record([target(), "longjmp", "5"])
    assert status == 0
    buf = io.StringIO()
    calltrace.write_trace(probe.calls, buf, command=["graph_target", "longjmp", "5"])
    import json
    calltrace.validate(json.loads(buf.getvalue()))
    buf.seek(0)
    back = calltrace.read_trace(buf)
    assert [(c.name, c.tid, c.depth, c.status) for c in back.calls] == \
        [(c.name, c.tid, c.depth, c.status) for c in probe.calls.calls]
    assert calltrace.report(back) == calltrace.report(probe.calls)
    assert calltrace.graph(back) == calltrace.graph(probe.calls)
    with pytest.raises(calltrace.TraceFormatError):
        calltrace.validate({"traceEvents": [], "otherData": {"format": "ptprobe-calls",
                                                             "ptprobe_trace_version": 99}})
    with pytest.raises(calltrace.TraceFormatError):
        calltrace.read_trace(io.StringIO("not json"))


@pytest.mark.parametrize("only_calls", [True, False])
def test_a_run_of_call_records_ends_at_the_first_record_not_committed(only_calls):
    """The ring reader hands over runs of committed call records unread: a run ends
    at a header still pending, at a zeroed one, or (in a space with other stubs) at
    another stub's record; the fast check (every stub writes calls) agrees."""
    from ptprobe.engine import records
    headers = {codegen.make_header(i, codegen.ENTRY_RECORD): (i % 2, f"f{i // 2}") for i in range(3000)}
    keys = list(headers)
    other = codegen.make_header(3000, 64)

    def ring(*words: int) -> bytes:
        return b"".join(struct.pack("<4Q", w, 1, 2, 3) for w in words)

    full = ring(*keys[:50])
    assert records._call_run(full, 0, len(full), headers, only_calls) == 50
    assert records._call_run(full, 32 * 10, len(full), headers, only_calls) == 40
    assert records._call_run(full, 0, len(full) - 5, headers, only_calls) == 49        # the last one not whole
    for stop in (keys[7] | codegen.HEADER_PENDING, 0, keys[2999] | codegen.HEADER_PENDING):
        chunk = ring(*keys[:7], stop, *keys[8:20])
        assert records._call_run(chunk, 0, len(chunk), headers, only_calls) == 7
    if not only_calls:
        chunk = ring(*keys[:3], other, *keys[4:9])
        assert records._call_run(chunk, 0, len(chunk), headers, only_calls) == 3


def test_a_thread_gone_before_its_last_records_are_read():
    """The ring is read in order, and a record of another thread not committed yet
    holds back those behind it: a thread's end can be known before its last exit
    record is read. That exit still ends its call; a later entry of the same
    thread id (a new thread) starts on its own."""
    trace = calltrace.CallTrace()
    trace.add_events([(0, 1, 7, "worker", 100, 0)])
    trace.thread_gone(1, 7)
    trace.add_events([(0, 1, 7, "leaf", 200, 1), (1, 1, 7, "leaf", 300, 0), (1, 1, 7, "worker", 400, 0)])
    trace.thread_gone(1, 7)
    trace.add_events([(0, 1, 7, "reborn", 500, 0), (0, 1, 8, "other", 510, 0)])   # the id again: a new thread
    trace.process_gone(1)                                     # and the process's end, known first
    trace.add_events([(1, 1, 8, "other", 520, 0)])
    trace.finish()
    worker, leaf, reborn, other = trace.calls
    assert (worker.status, worker.end_ns, leaf.status, leaf.end_ns) == (RETURNED, 400, RETURNED, 300)
    assert leaf in worker.children and (reborn.status, reborn.depth) == (UNFINISHED, 0)
    assert (other.status, other.end_ns) == (RETURNED, 520)
    assert [c.name for c in trace.roots] == ["worker", "reborn", "other"]
