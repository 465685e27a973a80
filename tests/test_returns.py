"""Return probes, latency histograms, timestamps and user stack traces.

Real programs (tests/c/ret_*.c, built with gcc at test time) run under real
ptrace: return values and durations against what the programs print and sleep,
every register after a return, recursion, threads, longjmp and siglongjmp out of
probed frames, a probed function called from a signal handler (on the same
stack and on a sigaltstack), fork, exit and exec with calls pending, tail calls,
detach with 100 threads inside a probed function, stacks compared with gdb's,
and the command line. Every run is bounded by a watchdog or a subprocess timeout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import pytest

import ptprobe
from conftest import build
from helpers import ptprobe_cli, run_traced, summaries, watchdog
from ptprobe import arch, render
from ptprobe.engine.returns import shadow_stack_enabled
from ptprobe.latency import Histogram
from ptprobe.retstack import PendingReturn, ShadowStacks
from ptprobe.spec import parse_spec, return_spec

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")

MS = 1_000_000
#: what ptprobe's stops may add to a call's duration here (a loaded 2-CPU machine); only
#: guards the upper side: every duration must be at least the sleep itself
SLACK_NS = 150 * MS


def modes() -> str:
    return build("ret_modes.c", "-O2", "-pthread")


def values_build(variant: str) -> str:
    if variant == "jmp":
        return build("ret_values.c", "-O2", "-pg", "-mfentry", "-mnop-mcount", "-fno-pie", "-no-pie",
                     output="ret_values_nop5")
    if variant == "endbr-jmp":
        return build("ret_values.c", "-O2", "-fcf-protection", "-pg", "-mfentry", "-mnop-mcount",
                     "-fno-pie", "-no-pie", output="ret_values_endbr")
    return build("ret_values.c", "-O2")


def trampoline_form(session: ptprobe.Session) -> str:
    trampoline = session.processes[session.main_pid].space.patcher.trampoline
    assert trampoline is not None
    return trampoline[1].form


# ---------------------------------------------------------------------------- pure parts

def test_trampoline_forms() -> None:
    """Each form decodes to what its declaration says: back onto the slot, the stop
    at stop_offset (the slot syscall or int3 just before), ret last."""
    for name, form in arch.RETURN_TRAMPOLINES.items():
        code = arch.return_trampoline_code(name)
        assert len(code) == arch.XOL_ENTRY_SIZE
        insns = []
        for insn in arch.iter_instructions(code, 0x1000):
            insns.append(insn)
            if insn.mnemonic == "ret":
                break
        assert arch.describe(insns[0]) == "lea rsp, [rsp - 8]"
        stop = [i for i in insns if i.end == 0x1000 + form.stop_offset]
        assert len(stop) == 1
        assert stop[0].mnemonic == ("syscall" if name == "syscall" else "int3")
        assert insns[-1].mnemonic == "ret"
        pushed = [i.op_str for i in insns if i.mnemonic == "push"]
        assert tuple(reversed(pushed)) == form.saved
        assert form.slot_offset == 8 * len(form.saved)
        if form.idle is not None:
            offset, patch = form.idle
            idle = code[:offset] + patch + code[offset + len(patch):]
            assert [i.mnemonic for i in arch.iter_instructions(idle[:form.stop_offset + 1], 0)] == \
                ["lea", "nop", "ret"]
    syscall = arch.return_trampoline_code("syscall")
    assert syscall[arch.RETURN_TRAMPOLINES["syscall"].stop_offset - 7:][:5] == \
        b"\xb8" + arch.SLOT_SYSCALL_NR.to_bytes(4, "little")


def test_histogram() -> None:
    h = Histogram([0, 1, 2, 3, 4, 1000, 1023, 1024])
    assert h.count == 8 and h.total == 3057 and h.min == 0 and h.max == 1024
    assert h.counts[0] == 1 and h.counts[1] == 1 and h.counts[2] == 2 and h.counts[3] == 1
    assert h.counts[10] == 2 and h.counts[11] == 1
    assert Histogram.bounds(10) == (512, 1023)
    rows = h.buckets()
    assert rows[0] == (0, 0, 1) and rows[-1] == (1024, 2047, 1) and len(rows) == 12
    other = Histogram([5])
    other.update(h)
    assert other.count == 9 and other.min == 0 and other.counts[3] == 2
    assert Histogram().buckets() == [] and Histogram().mean == 0.0
    text = render.histogram_lines(h)
    assert text[0].split() == ["nsecs", ":", "count", "distribution"]
    assert re.match(r"^\s+512 -> 1023\s+: 2\s+\|\*{40}\|$", text[11]), text
    assert text[-1] == "avg = 382 nsecs, total: 3057 nsecs, count: 8"


def test_specs() -> None:
    for text in ("uretprobe:./p:f", "ur:./p:f", "r:libc:malloc", "uprobe:./p:f%return", "p:./p:f%return"):
        spec = parse_spec(text)
        assert spec.kind == "uretprobe" and spec.symbol in ("f", "malloc") and spec.offset == 0, text
    assert parse_spec("uretprobe:./p:0x1130").address == 0x1130
    for text in ("uretprobe:./p:f+4", "uprobe:./p:f+0x4%return", "uretprobe:./p", "uretprobe:./p:1x"):
        with pytest.raises(ptprobe.ProbeSpecError):
            parse_spec(text)
    assert return_spec("./p:f") == parse_spec("uretprobe:./p:f")
    assert return_spec("uprobe:./p:f").kind == "uretprobe"
    assert return_spec("uretprobe:libc:malloc").path == "libc"
    for text in ("uprobe:./p:f+3", "usdt:./p:a:b"):
        with pytest.raises(ptprobe.ProbeSpecError):
            return_spec(text)


def test_shadow_stack_status() -> None:
    assert shadow_stack_enabled({"x86_Thread_features": "shstk wrss", "Name": "x"})
    assert shadow_stack_enabled({"x86_Thread_features": "shstk"})
    assert not shadow_stack_enabled({"x86_Thread_features": "", "x86_Thread_features_locked": "shstk"})
    assert not shadow_stack_enabled({"Name": "x"})


def test_shadow_stacks_bookkeeping() -> None:
    stacks = ShadowStacks()
    a = PendingReturn(1, 0x7000, 0x401000, 10, "site", ())
    assert stacks.push(a) is None and len(stacks) == 1
    b = PendingReturn(1, 0x6f00, 0x402000, 20, "site", ())
    stacks.push(b)
    other = PendingReturn(2, 0x9000, 0x403000, 30, "site", ())
    stacks.push(other)
    assert stacks.find(1, 0x6f00) is b and stacks.find(2, 0x7000) is None
    # a call entered again at a slot: the old one was abandoned
    again = PendingReturn(1, 0x6f00, 0x404000, 40, "site", ())
    assert stacks.push(again) is b and len(stacks) == 3
    # a tail call: both return at once, to the outer call's address
    tail = PendingReturn(1, 0x7000, 0xdead, 50, "site", (), outer=a)
    assert stacks.push(tail) is a
    assert tail.chain() == [tail, a] and tail.original == 0x401000
    translate = stacks.translator(1, 0xdead)
    assert translate(0xdead, 0x7008) == 0x401000 and translate(0x1234, 0x7008) == 0x1234
    assert translate(0xdead, 0x5008) == 0xdead
    # a fork's copy: every frame, found by slot from any thread
    child = stacks.fork()
    assert len(child) == 3 and child.find(99, 0x9000) is other
    assert child.pop(99, 0x7000) is tail and len(child) == 2
    child.push(PendingReturn(99, 0x9000, 0x405000, 60, "site", ()))
    assert len(child) == 2 and child.find(99, 0x9000).return_address == 0x405000
    assert stacks.pop(1, 0x7000) is tail and stacks.pop(1, 0x7000) is None
    stacks.discard([again])
    assert stacks.drop_thread(2) == [other] and len(stacks) == 0


# ---------------------------------------------------------------------------- values and registers

@pytest.mark.parametrize("variant,seccomp,entry,form", [
    ("plain", True, "int3", "syscall"),
    ("plain", False, "int3", "int3"),
    ("jmp", True, "jmp", "syscall"),
    ("endbr-jmp", True, "jmp", "syscall"),
])
def test_return_values_and_durations(variant: str, seccomp: bool, entry: str, form: str) -> None:
    exe = values_build(variant)
    rows: List[tuple] = []

    def handler(hit: ptprobe.Hit) -> None:
        assert isinstance(hit, ptprobe.ReturnHit) and hit.is_return
        rows.append((hit.name, hit.retval, hit.regs.rdx, hit.entry_args, hit.duration_ns, hit.time_ns,
                     hit.entry_time_ns, hit.retval_double if hit.name == "scale" else None,
                     hit.return_address, list(hit.args)))

    functions = ("sleep_int", "get_ptr", "scale", "make_pair", "negative")
    forms: List[str] = []
    status, out, probes, _ = run_traced([exe], [(f"uretprobe:{exe}:{f}", handler) for f in functions],
                                        seccomp=seccomp,
                                        on_armed=lambda s: forms.append(trampoline_form(s)))
    assert status == 0
    assert forms == [form]
    assert all(p.sites and [s.mechanism for s in p.sites] == [entry] for p in probes), \
        [(p.name, [s.mechanism for s in p.sites]) for p in probes]
    printed = dict(line.split(" ", 1) for line in out.splitlines())
    assert printed["sleep_int"] == "20001 60002"
    assert [r[0] for r in rows] == ["sleep_int", "sleep_int", "get_ptr", "scale", "make_pair", "negative"]
    (s1, s2, ptr, scale, pair, neg) = rows
    assert s1[1] == 20001 and s1[3][:2] == (20, 1) and s1[9][:2] == [20, 1]
    assert s2[1] == 60002 and s2[3][:2] == (60, 2)
    assert 20 * MS <= s1[4] < 20 * MS + SLACK_NS, s1[4]
    assert 60 * MS <= s2[4] < 60 * MS + SLACK_NS, s2[4]
    for row in rows:
        assert row[4] == row[5] - row[6] > 0
    times = [r[5] for r in rows]
    assert times == sorted(times) and s2[6] - s1[5] >= 0      # the second call began after the first ended
    assert hex(ptr[1]) == printed["get_ptr"] and ptr[3][0] == 3
    assert scale[7] == 3.75 and printed["scale"] == "3.750"
    assert (pair[1], pair[2]) == (42, 0x2468ACF12) and pair[3][:2] == (41, 0x123456789)
    assert neg[1] & 0xFFFFFFFF == (-7) & 0xFFFFFFFF
    assert [p.hits for p in probes] == [2, 1, 1, 1, 1]
    assert all(p.hits == sum(h.count for h in p.latency.values()) for p in probes)
    latency = probes[0].latency["sleep_int"]
    assert latency.count == 2 and latency.min == s1[4] and latency.max == s2[4]


@pytest.mark.parametrize("nop5", [False, True], ids=["int3-entry", "jmp-entry"])
@pytest.mark.parametrize("seccomp", [True, False], ids=["syscall-trampoline", "int3-trampoline"])
@pytest.mark.parametrize("mode", ["count", "handler", "set"])
def test_every_register_as_the_function_left_it(nop5: bool, seccomp: bool, mode: str) -> None:
    """The program checks rax..r15, rsp and rflags right after each return; a
    handler sees them too, and its write to rax reaches the program."""
    exe = build("ret_regs.c", "-O1", *(["-DNOP5_ENTRY"] if nop5 else []),
                output="ret_regs_nop5" if nop5 else "ret_regs")
    seen: List[Tuple[int, int, int, int]] = []

    def handler(hit: ptprobe.Hit) -> None:
        assert isinstance(hit, ptprobe.ReturnHit)
        regs = hit.regs
        seen.append((hit.retval, regs.rcx, regs.r11, regs.rdx))
        if mode == "set":
            regs.rax = 0x5A5A

    status, out, (probe,), _ = run_traced([exe, "3", mode], [(f"uretprobe:{exe}:regs_fn",
                                                             None if mode == "count" else handler)],
                                          seccomp=seccomp)
    assert out.strip() == "regs ok 3" and status == 0, out
    assert probe.hits == 3 and [s.mechanism for s in probe.sites] == ["jmp" if nop5 and seccomp else "int3"]
    if mode != "count":
        assert seen == [(0x1111111111111101, 0x3333333333333303, 0x0B0B0B0B0B0B0B0B, 0x4444444444444404)] * 3


# ---------------------------------------------------------------------------- shapes of calls

def _fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def test_recursive_fib_entries_equal_returns() -> None:
    exe = modes()
    bad: List[tuple] = []

    def check(hit: ptprobe.Hit) -> None:
        assert isinstance(hit, ptprobe.ReturnHit)
        if hit.retval != _fib(hit.entry_args[0]):
            bad.append((hit.entry_args[0], hit.retval))

    status, out, (entries, returns), _ = run_traced(
        [exe, "fib", "20"], [(f"uprobe:{exe}:fib", None), (f"uretprobe:{exe}:fib", check)])
    assert status == 0 and out.strip() == "fib 20 = 6765"
    assert entries.hits == returns.hits == 21891
    assert not bad, bad[:5]
    assert returns.latency["fib"].count == 21891


def test_recursive_fib_without_handlers() -> None:
    exe = modes()
    status, out, (returns,), _ = run_traced([exe, "fib", "16"], [(f"uretprobe:{exe}:fib", None)])
    assert status == 0 and out.strip() == "fib 16 = 987"
    assert returns.hits == returns.latency["fib"].count == 3193


def test_four_threads() -> None:
    exe = modes()
    per_tid: Dict[int, List[Tuple[int, int]]] = {}

    def record(hit: ptprobe.Hit) -> None:
        assert isinstance(hit, ptprobe.ReturnHit)
        per_tid.setdefault(hit.tid, []).append((hit.entry_args[0], hit.retval - 1000 * hit.entry_args[0]))

    status, out, (probe,), _ = run_traced([exe, "threads", "4", "200"], [(f"uretprobe:{exe}:work", record)])
    assert status == 0
    assert sorted(out.splitlines()) == [f"thread {k} sum {k * 1000 * 200 + 199 * 200 // 2}" for k in range(1, 5)]
    assert probe.hits == 800 and len(per_tid) == 4
    for calls in per_tid.values():
        k = calls[0][0]
        assert calls == [(k, i) for i in range(200)]


@pytest.mark.parametrize("mode", ["longjmp", "siglongjmp"])
def test_jumping_out_of_three_probed_frames(mode: str) -> None:
    exe = modes()
    returns: List[Tuple[int, int]] = []
    status, out, (entries, probe), _ = run_traced(
        [exe, mode], [(f"uprobe:{exe}:deep", None),
                      (f"uretprobe:{exe}:deep", lambda h: returns.append((h.entry_args[0], h.retval)))])
    assert status == 0 and out.splitlines() == ["jumped 1", "deep 3"]
    assert entries.hits == 7          # deep(2), deep(1), deep(0) jumped out of; deep(3..0) returned
    assert returns == [(0, 0), (1, 1), (2, 2), (3, 3)] and probe.hits == 4


@pytest.mark.parametrize("stack", ["same-stack", "sigaltstack"])
def test_probed_function_called_from_a_signal_handler(stack: str) -> None:
    exe = modes()
    returns: List[Tuple[int, int]] = []
    status, out, _, _ = run_traced(
        [exe, "signal"] + (["alt"] if stack == "sigaltstack" else []),
        [(f"uretprobe:{exe}:leaf", lambda h: returns.append((h.entry_args[0], h.retval)))])
    assert status == 0 and out.strip() == "leaf 10 20"
    assert returns == [(2, 20), (1, 10)]


@pytest.mark.parametrize("follow", [True, False], ids=["follow", "no-follow"])
def test_fork_with_a_pending_return(follow: bool) -> None:
    exe = modes()
    returns: List[Tuple[int, int]] = []
    status, out, (probe,), _ = run_traced([exe, "fork"], [(f"uretprobe:{exe}:forker",
                                                           lambda h: returns.append((h.pid, h.retval)))],
                                          follow=follow)
    assert status == 0
    assert sorted(out.splitlines()) == ["child 105", "parent 5 child status 0"]
    pids = {pid for pid, _ in returns}
    if follow:
        assert sorted(r for _, r in returns) == [5, 105] and len(pids) == 2
    else:
        assert [r for _, r in returns] == [5]


def test_exit_with_calls_pending() -> None:
    exe = modes()
    status, out, (probe,), _ = run_traced([exe, "exit"], [(f"uretprobe:{exe}:quitter", None)])
    assert status == 7 and out.strip() == "quitting" and probe.hits == 0


def test_exec_with_calls_pending() -> None:
    exe = modes()
    status, out, (execer, fib), _ = run_traced([exe, "exec", exe], [(f"uretprobe:{exe}:execer", None),
                                                                     (f"uretprobe:{exe}:fib", None)])
    assert status == 0 and out.strip() == "fib 5 = 5"
    assert execer.hits == 0 and fib.hits == 15


def test_tail_call_returns_both() -> None:
    exe = modes()
    returns: List[Tuple[str, int, int]] = []
    status, out, _, _ = run_traced([exe, "tail"], [
        (f"uretprobe:{exe}:{name}", lambda h: returns.append((h.name, h.retval, h.entry_args[0])))
        for name in ("tail_a", "tail_b")])
    assert status == 0 and out.strip() == "tail 41"
    assert returns == [("tail_b", 41, 40), ("tail_a", 41, 20)]


@pytest.mark.parametrize("seccomp", [True, False], ids=["syscall-trampoline", "int3-trampoline"])
def test_detach_with_100_threads_inside(seccomp: bool, tmp_path) -> None:
    """100 threads wait inside a probed function at detach: each gets its own
    return address back (it checks), and the program ends well."""
    exe = build("ret_detach.c", "-O2", "-pthread")
    note = tmp_path / "inside"
    pids: List[int] = []
    with watchdog(60, pids):
        with ptprobe.run([exe, "100", str(note)], seccomp=seccomp, observer=_Quiet()) as session:
            pids.append(session.main_pid)
            probe = session.probe(f"uretprobe:{exe}:inside")
            while not (note.exists() and note.read_text().strip() == "inside 100"):
                assert session.wait(timeout=0.05) is None
            space = session.processes[session.main_pid].space
            assert len(space.returns) == 100
            slots = [frame.slot for frame in space.returns]
            trampoline = space.patcher.trampoline[0]
            assert all(space.mem.read_u64(slot) == trampoline for slot in slots)
            session.detach()
            assert probe.hits == 0
            os.kill(session.main_pid, signal.SIGUSR1)
        assert session.returncode == 0


class _Quiet(ptprobe.Observer):
    def notice(self, text: str) -> None:
        pass


# ---------------------------------------------------------------------------- stacks against gdb

_GDB_SCRIPT = """
f = gdb.newest_frame()
while f is not None:
    f.select()
    physical = f.type() not in (gdb.INLINE_FRAME, gdb.TAILCALL_FRAME)
    where = gdb.execute("p $pc", to_string=True).strip()
    print("FRAME|%d|%s|%s" % (physical, f.name(), where))
    if f.name() == "main":
        break
    f = f.older()
"""
_FRAME = re.compile(r"^FRAME\|([01])\|(.*?)\|\$\d+ = \(.*?\) 0x[0-9a-f]+(?: <(.+?)(?:\+(\d+))?>)?\s*$")


def gdb_frames(argv: Sequence[str], breakpoint: str, finish: bool) -> Optional[List[Tuple[str, int]]]:
    """(symbol, offset) of gdb's physical frames up to main at the first stop at
    *breakpoint* (after ``finish`` with *finish*); None without a usable gdb."""
    gdb = shutil.which("gdb")
    if gdb is None:
        warnings.warn("gdb is not installed: comparison with gdb skipped")
        return None
    cmd = [gdb, "-nx", "-batch", "-ex", "set debuginfod enabled off", "-ex", "set pagination off",
           "-ex", f"break *{breakpoint}", "-ex", "run", *(["-ex", "finish"] if finish else []),
           "-ex", f"python exec({_GDB_SCRIPT!r})", "--args", *argv]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL).stdout
    except subprocess.TimeoutExpired:
        warnings.warn("gdb timed out: comparison with gdb skipped")
        return None
    frames = []
    for match in map(_FRAME.match, out.splitlines()):
        if match is not None and match.group(1) == "1" and match.group(3):
            frames.append((match.group(3), int(match.group(4) or 0)))
    if not frames:
        warnings.warn(f"gdb gave no frames: comparison with gdb skipped\n{out[-2000:]}")
        return None
    return frames


_OWN = ("leaf", "c1", "c2", "c3", "c4", "c5", "compare", "exe_callback", "outer_exe", "lib_enter",
        "lib_middle", "main")


def stack_build(shape: str) -> Tuple[str, List[str]]:
    lib = build("ret_stacklib.c", "-O2", "-fomit-frame-pointer", shared=True, output="libretstack.so")
    flags = ["-O0"] if shape == "O0" else ["-O2", "-fomit-frame-pointer"]
    exe = build("ret_stack.c", *flags, "-no-pie", "-DWITH_LIB", lib, f"-Wl,-rpath,{os.path.dirname(lib)}",
                output=f"ret_stack_{shape}")
    return exe, [exe, lib]


def _ours(stack) -> List[Tuple[str, int]]:
    out = []
    for frame in stack:
        out.append((frame.symbol, frame.offset))
        if frame.symbol == "main":
            break
    return out


def assert_same_frames(ours: List[Tuple[str, int]], theirs: List[Tuple[str, int]], own: Sequence[str]) -> None:
    """Frame by frame: the same offset in the function, and for the functions of
    the test's own objects the same name (gdb names libc's static functions from
    their DWARF, ptprobe from the symbol table: ``msort_with_tmp.part.0``)."""
    assert len(ours) == len(theirs), (ours, theirs)
    for (symbol, offset), (gdb_symbol, gdb_offset) in zip(ours, theirs):
        assert offset == gdb_offset, (ours, theirs)
        if symbol in own or gdb_symbol in own:
            assert symbol == gdb_symbol, (ours, theirs)


@pytest.mark.parametrize("shape,mode,where,returns", [
    ("O2", "chain", "leaf", ["c1", "c2", "c3", "c4", "c5"]),
    ("O0", "chain", "leaf", ["c1", "c2", "c3", "c4", "c5"]),
    ("O2", "lib", "leaf", ["outer_exe", "exe_callback"]),
    ("O2", "qsort", "compare", ["compare"]),
])
def test_entry_stacks_match_gdb(shape: str, mode: str, where: str, returns: List[str]) -> None:
    """The stack at a function's entry, through callers whose return addresses return
    probes replaced, is gdb's backtrace at a breakpoint there (without ptprobe)."""
    exe, _ = stack_build(shape)
    stacks: List[List[Tuple[str, int]]] = []

    def take(hit: ptprobe.Hit) -> None:
        if not stacks:
            stacks.append(_ours(hit.stack()))

    probes = [(f"uretprobe:{exe}:{name}", None) for name in returns] + [(f"uprobe:{exe}:{where}", take)]
    status, _, armed, _ = run_traced([exe, mode], probes)
    assert status == 0 and all(p.hits for p in armed)
    (ours,) = stacks
    assert ours[0] == (where, 0) and ours[-1][0] == "main", ours
    if mode == "chain":
        assert [s for s, _ in ours] == ["leaf", "c5", "c4", "c3", "c2", "c1", "main"]
    if mode == "lib":
        assert [s for s, _ in ours] == ["leaf", "exe_callback", "lib_middle", "lib_enter", "outer_exe", "main"]
    if mode == "qsort":
        assert len(ours) > 3 and ours[-2][0].startswith(("qsort", "__qsort", "msort")), ours
    theirs = gdb_frames([exe, mode], where, finish=False)
    if theirs is not None:
        assert_same_frames(ours, theirs, _OWN)


@pytest.mark.parametrize("shape", ["O2", "O0"])
def test_return_stack_matches_gdb_finish(shape: str) -> None:
    """The stack of a return hit starts at the caller, where gdb's ``finish`` stops."""
    exe, _ = stack_build(shape)
    stacks: List[List[Tuple[str, int]]] = []
    run_traced([exe, "chain"], [(f"uretprobe:{exe}:c3", lambda h: stacks.append(_ours(h.stack()))),
                                (f"uretprobe:{exe}:c1", None)])
    (ours,) = stacks
    assert [s for s, _ in ours] == ["c2", "c1", "main"]
    theirs = gdb_frames([exe, "chain"], "c3", finish=True)
    if theirs is not None:
        assert_same_frames(ours, theirs, _OWN)


# ---------------------------------------------------------------------------- the command line

def test_cli_return_lines_json_timestamps_and_stacks() -> None:
    exe = values_build("plain")
    text = ptprobe_cli("run", "-o", "-", "-p", f"uretprobe:{exe}:sleep_int", "-p", f"uprobe:{exe}:negative%return",
                       "-t", "--", exe)
    assert text.returncode == 0, text.stderr
    lines = [line for line in text.stdout.splitlines() if "%return" in line]
    assert len(lines) == 3, text.stdout
    stamp, first = lines[0].split(" ", 1)
    assert re.fullmatch(r"\d+\.\d{6}", stamp)
    assert re.match(r"sleep_int%return pid=\d+ tid=\d+ retval=20001 duration=\d+\.\d{3}us args: 20 1 ", first)
    # an int in eax: rax's upper half is zero, the line shows rax
    assert "retval=0xfffffff9 " in lines[2] and lines[2].split(" ", 1)[1].startswith("negative%return")
    assert summaries(text.stderr)[f"uretprobe:{exe}:sleep_int"][0] == 2

    js = ptprobe_cli("run", "-o", "-", "-p", f"uretprobe:{exe}:make_pair", "--json", "--stack", "--", exe)
    assert js.returncode == 0, js.stderr
    (record,) = [json.loads(line) for line in js.stdout.splitlines() if line.startswith("{")]
    assert record["return"] is True and record["retval"] == 42 and record["args"][:2] == [41, 0x123456789]
    assert record["duration_ns"] == record["time_ns"] - record["entry_time_ns"] > 0
    assert record["stack"][0]["symbol"] == "main" and record["stack"][0]["address"] == record["return_address"]

    fmt = ptprobe_cli("run", "-o", "-", "-p", f"uretprobe:{exe}:sleep_int", "-f", "r=%d a=%d%S", "--", exe)
    assert fmt.returncode == 0, fmt.stderr
    out = fmt.stdout.splitlines()
    assert out[0] == "r=20001 a=20" and re.match(r"^ {8}0x[0-9a-f]+ main\+0x[0-9a-f]+ \(ret_values\)$", out[1])


def test_cli_latency_histogram() -> None:
    exe = values_build("plain")
    res = ptprobe_cli("run", "-o", "-", "--latency", f"{exe}:sleep_int", "-q", "--", exe)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    start = lines.index(f"latency of sleep_int (uretprobe:{exe}:sleep_int):")
    header, *rows = lines[start + 1:]
    assert header.split() == ["nsecs", ":", "count", "distribution"]
    buckets = {}
    for row in rows:
        m = re.match(r"^\s*(\d+) -> (\d+)\s+: (\d+)\s+\|\**\s*\|$", row)
        if m is None:
            break
        buckets[(int(m[1]), int(m[2]))] = int(m[3])
    assert sum(buckets.values()) == 2
    assert buckets[(1 << 24, (1 << 25) - 1)] == 1      # 20 ms
    assert buckets[(1 << 25, (1 << 26) - 1)] == 1      # 60 ms
    assert re.search(r"^avg = \d+ nsecs, total: \d+ nsecs, count: 2$", res.stdout, re.M)


@pytest.mark.parametrize("spec,why", [
    ("uretprobe:{exe}:sleep_int+4", "not an offset"),
    ("uprobe:{exe}:sleep_int+0x4%return", "not an offset"),
    ("uretprobe:{exe}:{inside}", "is not the start of a function"),
])
def test_cli_refuses_a_return_probe_inside_a_function(spec: str, why: str) -> None:
    exe = values_build("plain")
    with open(exe, "rb"):
        pass
    from helpers import symbol
    inside = hex(symbol(exe, "sleep_int")[0] + 4)
    res = ptprobe_cli("run", "-p", spec.format(exe=exe, inside=inside), "--", exe)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert why in res.stderr and len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    latency = ptprobe_cli("run", "--latency", f"uprobe:{exe}:sleep_int+4", "--", exe)
    assert latency.returncode == 2 and "needs a function" in latency.stderr


@pytest.mark.parametrize("mode", ["count", "set"])
def test_registers_with_seed_slots(mode: str) -> None:
    """The entry through a seed slot (finished by the tracer) hands the same rsp over."""
    exe = build("ret_regs.c", "-O1", "-DNOP5_ENTRY", output="ret_regs_nop5")

    def handler(hit: ptprobe.Hit) -> None:
        hit.regs.rax = 0x5A5A

    status, out, (probe,), _ = run_traced([exe, "3", mode], [(f"uretprobe:{exe}:regs_fn",
                                                             handler if mode == "set" else None)],
                                          slots="seed")
    assert out.strip() == "regs ok 3" and status == 0, out
    assert probe.hits == 3 and [s.mechanism for s in probe.sites] == ["jmp"]
