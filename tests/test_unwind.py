"""Tests of ptprobe.unwind: real processes stopped at known places, unwound, and
compared frame by frame with gdb's backtrace of the same stopped state.

The targets (tests/c/unwind_target.c, unwind_lib.c) are built with gcc at test
time in several shapes: CFI only (-O2 -fomit-frame-pointer), frame pointers
(-O0), no unwind tables at all (-O0, the frame-pointer fallback), .debug_frame
only, through a shared library, through libc's qsort, through a signal handler,
in a second thread, and a 50-deep recursion. A target either stops itself (a
SIGSTOP to its own thread) or waits on stdin for the test to place a breakpoint
(function entry, PLT stub).

gdb sees the state first when the target stopped itself (gdb attaches to a
stopped process and leaves it stopped), last when the test stopped it at a
breakpoint (detached with SIGSTOP). Without gdb, or if it cannot attach, the
comparison is skipped with a warning and the test's own expectations still run.
Every wait is bounded: a watchdog kills the target, subprocesses have timeouts.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import capstone
import pytest
from elftools.elf.elffile import ELFFile

from conftest import build

from ptprobe import linux
from ptprobe import unwind as unwind_module
from ptprobe.elf import ElfFile
from ptprobe.errors import FaultError
from ptprobe.objects import LoadedObject, scan_objects
from ptprobe import procfs
from ptprobe.unwind import (END, FAULT, MAX_FRAMES, NO_UNWIND_INFO, Frame, ObjectInfo, Stack,
                            UnwindError, Unwinder, object_finder)

TIMEOUT = 30.0
GDB = shutil.which("gdb")

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")

CHAIN = ["stop_here", "chain5", "chain4", "chain3", "chain2", "chain1", "main"]


# ---------------------------------------------------------------------------- targets

def _o2() -> str:
    return build("unwind_target.c", "-O2", "-fomit-frame-pointer", "-pthread")


def _o0() -> str:
    return build("unwind_target.c", "-O0", "-pthread")


def _no_cfi() -> str:
    return build("unwind_target.c", "-O0", "-g0", "-fno-asynchronous-unwind-tables",
                 "-fno-unwind-tables", "-pthread")


def _debug_frame_only() -> str:
    return build("unwind_target.c", "-O2", "-fomit-frame-pointer", "-fno-asynchronous-unwind-tables",
                 "-pthread")


def _with_lib() -> Sequence[str]:
    lib = build("unwind_lib.c", "-O2", "-fomit-frame-pointer", shared=True)
    exe = build("unwind_target.c", "-O2", "-fomit-frame-pointer", "-pthread", "-DWITH_LIB", lib,
                f"-Wl,-rpath,{os.path.dirname(lib)}", "-Wl,-z,lazy", output="unwind_target_lib")
    return exe, lib


# ---------------------------------------------------------------------------- gdb

@dataclass
class GdbFrame:
    """One physical frame of gdb's backtrace."""

    pc: int
    function: Optional[str]       # gdb's name for the function (from DWARF if any)
    msym: Optional[str]           # the symbol `p $pc` names pc with
    msym_start: Optional[int]


# gdb's Python API tells inline frames (gdb.INLINE_FRAME) and the frames it infers
# for tail calls from DWARF call sites (gdb.TAILCALL_FRAME) from physical frames: only
# the physical ones have a place on the stack, and only those are compared.
_GDB_SCRIPT = """
for thread in gdb.selected_inferior().threads():
    if thread.ptid[1] == TID:
        thread.switch()
f = gdb.newest_frame()
while f is not None:
    f.select()
    physical = f.type() not in (gdb.INLINE_FRAME, gdb.TAILCALL_FRAME)
    where = gdb.execute("p $pc", to_string=True).strip()
    print("FRAME|%d|%#x|%s|%s" % (physical, f.pc(), f.name(), where))
    f = f.older()
"""
_FRAME = re.compile(r"^FRAME\|([01])\|(0x[0-9a-f]+)\|(.*?)\|\$\d+ = \(.*?\) 0x[0-9a-f]+"
                    r"(?: <(.+?)(?:\+(\d+))?>)?\s*$")


def gdb_backtrace(pid: int, tid: Optional[int] = None) -> Optional[List[GdbFrame]]:
    """gdb's physical frames of thread *tid* (default: the main thread) of stopped
    *pid*, innermost first (gdb stops at main), or None when there is no gdb or it
    cannot attach."""
    if GDB is None:
        warnings.warn("gdb is not installed: comparison with gdb skipped")
        return None
    cmd = [GDB, "-nx", "-batch", "-p", str(pid), "-ex", "set debuginfod enabled off",
           "-ex", f"python exec({_GDB_SCRIPT.replace('TID', str(tid or pid))!r})"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                             stdin=subprocess.DEVNULL).stdout
    except subprocess.TimeoutExpired:
        warnings.warn("gdb timed out: comparison with gdb skipped")
        return None
    frames: List[GdbFrame] = []
    for match in map(_FRAME.match, out.splitlines()):
        if match is None or match.group(1) == "0":
            continue
        pc = int(match.group(2), 16)
        function = None if match.group(3) == "None" else match.group(3)
        msym = match.group(4)
        start = pc - int(match.group(5) or 0) if msym else None
        frames.append(GdbFrame(pc, function, msym, start))
    if not frames:
        warnings.warn(f"gdb could not unwind process {pid}: comparison with gdb skipped\n{out}")
        return None
    return frames


def _describe(stack: Sequence[Frame], gdb: Sequence[GdbFrame]) -> str:
    ours = "\n".join(f"  {f.address:#x} {f} [{f.how}]" for f in stack)
    theirs = "\n".join(f"  {g.pc:#x} {g.function} <{g.msym}+{g.pc - (g.msym_start or g.pc):#x}>"
                       for g in gdb)
    return f"ours:\n{ours}\ngdb:\n{theirs}"


def compare_with_gdb(stack: Sequence[Frame], gdb: Optional[Sequence[GdbFrame]],
                     own_objects: Sequence[str], in_main_thread: bool = True) -> None:
    """Frame by frame up to gdb's last frame (main, where gdb stops; in another
    thread, the outermost frame, as ptprobe's): the same pc, and the same
    function (for frames of *own_objects* the same name; elsewhere the same
    function start, since gdb and ptprobe may pick different aliases)."""
    if gdb is None:
        return
    what = _describe(stack, gdb)
    if in_main_thread:
        assert gdb[-1].function == "main", what
        assert len(stack) >= len(gdb), what
    else:
        assert len(stack) == len(gdb), what
    own = {os.path.realpath(p) for p in own_objects}
    for ours, theirs in zip(stack, gdb):
        assert ours.address == theirs.pc, what
        if theirs.msym is None:
            continue
        if ours.symbol is None:
            # gdb names PLT stubs (name@plt) from the relocations, and an address no
            # symbol covers by the nearest symbol below it; ptprobe does neither
            continue
        assert ours.address - ours.offset == theirs.msym_start, what
        if ours.object is not None and os.path.realpath(ours.object) in own:
            assert ours.symbol == theirs.msym == theirs.function, what


# ---------------------------------------------------------------------------- processes

@contextlib.contextmanager
def watchdog(pid: int, seconds: float = TIMEOUT) -> Iterator[None]:
    """Kill *pid* if the block takes longer than *seconds* (so that no wait blocks for ever)."""
    def fire() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0]


def wait_for_state(pid: int, states: str, seconds: float = TIMEOUT) -> None:
    deadline = time.monotonic() + seconds
    while proc_state(pid) not in states:
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} not in state {states} after {seconds} s")
        time.sleep(0.002)


@dataclass
class Stopped:
    """A target stopped under ptrace: its registers, objects and memory."""

    pid: int
    process: Process
    regs: linux.Registers
    gdb: Optional[List[GdbFrame]]

    def unwind(self, unwinder: Optional[Unwinder] = None, **kwargs: object) -> Stack:
        unwinder = unwinder or Unwinder()
        return unwinder.unwind(self.regs, self.process.mem.read, self.process.object_at, **kwargs)


def _seize_stopped(pid: int) -> None:
    linux.seize(pid, 0)
    linux.interrupt(pid)
    status = linux.wait_tid(pid)
    assert os.WIFSTOPPED(status), f"process {pid} did not stop: status {status:#x}"


class Process:
    """What the unwinder needs of a stopped process: its memory and mapped objects."""

    def __init__(self, pid: int) -> None:
        self.mem = linux.Memory(pid)
        self.objects: Dict[Tuple[int, int], LoadedObject] = scan_objects(procfs.read_maps(pid))
        self.object_at = object_finder(self.objects.values())

    def close(self) -> None:
        self.mem.close()


def _objects(pid: int) -> Process:
    return Process(pid)


@contextlib.contextmanager
def self_stopped(argv: Sequence[str], other_thread: bool = False) -> Iterator[Stopped]:
    """Run *argv* until it stops itself; gdb sees it, then ptrace holds it (its main
    thread, or with *other_thread* its one other thread)."""
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL)
    process: Optional[Process] = None
    tid = proc.pid
    try:
        with watchdog(proc.pid):
            wait_for_state(proc.pid, "T")
            if other_thread:
                (tid,) = [t for t in map(int, os.listdir(f"/proc/{proc.pid}/task")) if t != proc.pid]
                wait_for_state(tid, "T")
            gdb = gdb_backtrace(proc.pid, tid)
            _seize_stopped(tid)
            process = _objects(proc.pid)
            yield Stopped(tid, process, linux.get_regs(tid), gdb)
    finally:
        proc.kill()
        if tid != proc.pid:
            # a traced thread that is not the leader is reaped by its tracer (us)
            # before the leader's exit can be
            with contextlib.suppress(ChildProcessError):
                while not os.WIFSIGNALED(status := linux.wait_tid(tid)) and not os.WIFEXITED(status):
                    pass
        proc.wait(timeout=TIMEOUT)
        if process is not None:
            process.close()


class Breakpoints:
    """A target started with UNWIND_WAIT (it says "ready" on stdout, then reads a
    byte from stdin), seized there, and run to int3 breakpoints the test places."""

    def __init__(self, argv: Sequence[str]) -> None:
        env = dict(os.environ, UNWIND_WAIT="1")
        env.pop("LD_BIND_NOW", None)
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env)
        self.pid = self.proc.pid
        self.process: Optional[Process] = None
        self.started = False

    def __enter__(self) -> "Breakpoints":
        self._dog = watchdog(self.pid)
        self._dog.__enter__()
        try:
            assert self.proc.stdout is not None
            assert self.proc.stdout.readline() == b"ready\n"  # in main: every library is mapped
            linux.seize(self.pid, 0)
            linux.interrupt(self.pid)
            status = linux.wait_tid(self.pid)
            assert os.WIFSTOPPED(status)
            self.process = _objects(self.pid)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=TIMEOUT)
        finally:
            for pipe in (self.proc.stdin, self.proc.stdout):
                if pipe is not None:
                    pipe.close()
            self._dog.__exit__(None, None, None)
            if self.process is not None:
                self.process.close()

    def runtime(self, path: str, link_address: int) -> int:
        assert self.process is not None
        for obj in self.process.objects.values():
            if os.path.realpath(obj.path) == os.path.realpath(path):
                return obj.runtime(link_address)
        raise LookupError(path)

    def run_to(self, addresses: Sequence[int]) -> Optional[int]:
        """Continue until one of the int3s at *addresses* is hit; rip is put back
        on it and every original byte restored. None if the target stopped
        itself (SIGSTOP) first."""
        assert self.process is not None
        mem = self.process.mem
        saved = {a: mem.read(a, 1) for a in addresses}
        for a in addresses:
            mem.write(a, b"\xcc")
        linux.cont(self.pid, 0)
        if not self.started:
            self.started = True
            assert self.proc.stdin is not None
            self.proc.stdin.write(b"x")
            self.proc.stdin.flush()
        try:
            while True:
                status = linux.wait_tid(self.pid)
                assert os.WIFSTOPPED(status), f"target ended: status {status:#x}"
                sig = os.WSTOPSIG(status)
                if status >> 16:
                    linux.cont(self.pid, 0)
                elif sig == signal.SIGTRAP:
                    regs = linux.get_regs(self.pid)
                    hit = regs.rip - 1
                    assert hit in saved, f"SIGTRAP at {regs.rip:#x}"
                    regs.rip = hit
                    linux.set_regs(self.pid, regs)
                    return hit
                elif sig == signal.SIGSTOP:
                    return None
                else:
                    linux.cont(self.pid, sig)
        finally:
            for a, byte in saved.items():
                mem.write(a, byte)

    def stopped(self) -> Stopped:
        assert self.process is not None
        return Stopped(self.pid, self.process, linux.get_regs(self.pid), None)

    def gdb_after_detach(self) -> Optional[List[GdbFrame]]:
        """Detach leaving the target stopped where it is (SIGSTOP replaces the
        SIGTRAP of the stop), and ask gdb."""
        linux.detach(self.pid, signal.SIGSTOP)
        wait_for_state(self.pid, "T")
        return gdb_backtrace(self.pid)


# ---------------------------------------------------------------------------- helpers

def names(stack: Sequence[Frame]) -> List[Optional[str]]:
    return [f.symbol for f in stack]


def up_to_main(stack: Sequence[Frame]) -> List[Optional[str]]:
    symbols = names(stack)
    assert "main" in symbols, stack
    return symbols[:symbols.index("main") + 1]


def assert_outermost(stack: Stack) -> None:
    """The unwind went past main to _start and ended there."""
    assert stack.reason == END, stack
    assert stack[-1].symbol == "_start", stack


def assert_stopped_in_syscall(stack: Stack) -> None:
    """The first frame is libc's syscall(), which stop_here calls."""
    first = stack[0]
    assert first.how == "regs"
    assert first.symbol == "syscall", stack
    assert first.object is not None and "libc" in os.path.basename(first.object)


def link_address(path: str, symbol: str) -> int:
    with ElfFile(path) as elf:
        return elf.get_symbol(symbol).address


def fde_covers(path: str, section: str, address: int) -> bool:
    """Whether *section* (.eh_frame or .debug_frame) of *path* has an FDE for *address*."""
    with open(path, "rb") as fh:
        elf = ELFFile(fh)
        dwarf = elf.get_dwarf_info()
        if section == ".eh_frame":
            entries = dwarf.EH_CFI_entries() if dwarf.has_EH_CFI() else []
        else:
            entries = dwarf.CFI_entries() if dwarf.has_CFI() else []
        for entry in entries:
            if type(entry).__name__ != "FDE":
                continue
            start = entry["initial_location"]
            if start <= address < start + entry["address_range"]:
                return True
    return False


# ---------------------------------------------------------------------------- chains

def test_chain_with_cfi_only() -> None:
    exe = _o2()
    with self_stopped([exe, "chain"]) as t:
        stack = t.unwind()
    assert_stopped_in_syscall(stack)
    assert up_to_main(stack)[1:] == CHAIN
    assert all(f.how == "cfi" for f in stack[1:]), stack
    assert_outermost(stack)
    compare_with_gdb(stack, t.gdb, [exe])


def test_chain_with_frame_pointers() -> None:
    exe = _o0()
    with self_stopped([exe, "chain"]) as t:
        stack = t.unwind()
    assert up_to_main(stack)[1:] == CHAIN
    assert_outermost(stack)
    compare_with_gdb(stack, t.gdb, [exe])


def test_chain_without_unwind_tables_follows_frame_pointers() -> None:
    exe = _no_cfi()
    chain3 = link_address(exe, "chain3")
    assert not fde_covers(exe, ".eh_frame", chain3)
    assert not fde_covers(exe, ".debug_frame", chain3)
    with self_stopped([exe, "chain"]) as t:
        stack = t.unwind()
    assert up_to_main(stack)[1:] == CHAIN
    # stop_here's caller comes from libc's CFI for syscall(); the rest from the rbp chain
    assert [f.how for f in stack[2:7]] == ["fp"] * 5, stack
    assert_outermost(stack)
    compare_with_gdb(stack, t.gdb, [exe])


def test_chain_with_debug_frame_only() -> None:
    exe = _debug_frame_only()
    chain3 = link_address(exe, "chain3")
    assert not fde_covers(exe, ".eh_frame", chain3)
    assert fde_covers(exe, ".debug_frame", chain3)
    with self_stopped([exe, "chain"]) as t:
        stack = t.unwind()
    assert up_to_main(stack)[1:] == CHAIN
    assert all(f.how == "cfi" for f in stack[1:]), stack
    assert_outermost(stack)
    compare_with_gdb(stack, t.gdb, [exe])


def test_through_a_shared_library() -> None:
    exe, lib = _with_lib()
    with self_stopped([exe, "lib"]) as t:
        stack = t.unwind()
    assert up_to_main(stack)[1:] == ["stop_here", "exe_callback", "lib_middle", "lib_enter",
                                     "outer_exe", "main"]
    objects = [os.path.realpath(f.object or "") for f in stack[1:7]]
    assert objects == [os.path.realpath(p) for p in (exe, exe, lib, lib, exe, exe)]
    assert_outermost(stack)
    compare_with_gdb(stack, t.gdb, [exe, lib])


def test_through_libc_qsort() -> None:
    exe = _o2()
    with self_stopped([exe, "qsort"]) as t:
        stack = t.unwind()
    symbols = up_to_main(stack)
    assert symbols[1:3] == ["stop_here", "compare_stop"]
    inside = stack[3:len(symbols) - 1]
    assert inside, "no libc frame between the comparator and main"
    assert all(f.object is not None and "libc" in os.path.basename(f.object) for f in inside), stack
    assert_outermost(stack)
    compare_with_gdb(stack, t.gdb, [exe])


def test_second_thread() -> None:
    """A thread's stack ends in libc's clone, whose CFI marks the return address undefined."""
    exe = _o2()
    with self_stopped([exe, "thread"], other_thread=True) as t:
        stack = t.unwind()
    assert_stopped_in_syscall(stack)
    symbols = names(stack)
    assert symbols[1:8] == CHAIN[:-1] + ["thread_main"]
    assert stack.reason == END and "main" not in symbols, stack
    assert all(f.object is not None and "libc" in os.path.basename(f.object) for f in stack[8:]), stack
    compare_with_gdb(stack, t.gdb, [exe], in_main_thread=False)


def test_through_a_signal_handler() -> None:
    exe = _o2()
    with self_stopped([exe, "signal"]) as t:
        stack = t.unwind()
    symbols = up_to_main(stack)
    assert symbols[1:3] == ["stop_here", "on_signal"]
    trampoline, interrupted = stack[3], stack[4]
    assert trampoline.object is not None and "libc" in os.path.basename(trampoline.object)
    assert interrupted.how == "signal" and interrupted.symbol == "spin_until_signal", stack
    assert symbols[5] == "main"
    assert_outermost(stack)
    compare_with_gdb(stack, t.gdb, [exe])


def test_recursion_fifty_frames_deep() -> None:
    exe = _o2()
    with self_stopped([exe, "recurse", "50"]) as t:
        stack = t.unwind()
        short = t.unwind(max_frames=10)
        objects = list(t.process.objects.values())
        again = Unwinder().unwind(
            {name: getattr(t.regs, name) for name in ("rip", "rsp", "rbp", "rbx", "r12", "r13",
                                                       "r14", "r15")},
            t.process.mem.read, object_finder(objects))
    symbols = up_to_main(stack)
    assert symbols[1] == "stop_here"
    assert symbols[2:-1] == ["recurse"] * 50
    assert_outermost(stack)
    assert len(short) == 10 and short.reason == MAX_FRAMES
    assert list(short) == list(stack[:10])
    assert list(again) == list(stack)           # dict registers, object_finder
    compare_with_gdb(stack, t.gdb, [exe])


# ---------------------------------------------------------------------------- first frame

@pytest.mark.parametrize("variant", ["cfi", "no-cfi"])
def test_first_frame_at_function_entry(variant: str) -> None:
    """Stopped on the first instruction of entry_target (-O0: push rbp not done yet)."""
    exe = _o0() if variant == "cfi" else _no_cfi()
    with Breakpoints([exe, "entry"]) as b:
        entry = b.runtime(exe, link_address(exe, "entry_target"))
        assert b.run_to([entry]) == entry
        stack = b.stopped().unwind()
        gdb = b.gdb_after_detach()
    assert stack[0].address == entry and stack[0].offset == 0
    assert up_to_main(stack) == ["entry_target"] + CHAIN[1:]
    assert stack[1].how == ("cfi" if variant == "cfi" else "entry"), stack
    assert_outermost(stack)
    compare_with_gdb(stack, gdb, [exe])


def _plt_stub(exe: str, caller: str) -> int:
    """The link-time address of the PLT stub *caller* calls (its only direct call into .plt)."""
    with ElfFile(exe) as elf:
        sym = elf.get_symbol(caller)
        code = elf.read(sym.address, sym.size)
    with open(exe, "rb") as fh:
        plt = [(s["sh_addr"], s["sh_addr"] + s["sh_size"]) for s in ELFFile(fh).iter_sections()
               if s.name in (".plt", ".plt.sec")]
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    for insn in md.disasm(code, sym.address):
        if insn.mnemonic == "call" and insn.op_str.startswith("0x"):
            target = int(insn.op_str, 16)
            if any(lo <= target < hi for lo, hi in plt):
                return target
    raise LookupError(f"{caller} calls no PLT stub")


@pytest.mark.parametrize("offset", [0, 11])
def test_first_frame_in_a_plt_stub(offset: int) -> None:
    """In lib_enter@plt: at its jmp (offset 0: CFA = rsp+8) and, with lazy binding, at
    its final jmp after the push (offset 11: CFA = rsp+16); the PLT's CFA is the
    DW_CFA_def_cfa_expression that ld emits for .plt."""
    exe, _lib = _with_lib()
    stub = _plt_stub(exe, "outer_exe")
    with Breakpoints([exe, "lib"]) as b:
        at = b.runtime(exe, stub + offset)
        hit = b.run_to([at])
        if hit is None:
            pytest.skip("lib_enter@plt was not entered lazily (binding resolved at load time)")
        stack = b.stopped().unwind()
        gdb = b.gdb_after_detach()
    assert stack[0].address == at and stack[0].symbol is None
    assert up_to_main(stack)[1:] == ["outer_exe", "main"]
    assert stack[1].how == "cfi"
    assert_outermost(stack)
    compare_with_gdb(stack, gdb, [exe])


# ---------------------------------------------------------------------------- bad stacks

def test_bad_stack_pointer_ends_the_unwind_quietly() -> None:
    exe = _o2()
    with self_stopped([exe, "chain"]) as t:
        good = t.unwind()
        regs: Dict[str, int] = {name: getattr(t.regs, name) for name in
                                ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9",
                                 "r10", "r11", "r12", "r13", "r14", "r15", "rip")}
        unwinder = Unwinder()
        find = t.process.object_at
        read = t.process.mem.read
        for bad in (0, 0x10, 0xFFFF_FFFF_FFFF_FFF8, 0x7FFF_FFFF_F000):
            stack = unwinder.unwind(dict(regs, rsp=bad), read, find)
            assert stack[0] == Frame(good[0].address, good[0].symbol, good[0].offset,
                                     good[0].object, good[0].link_address, bad, "regs")
            assert len(stack) == 1 and stack.reason == FAULT, (hex(bad), stack)
        # an rsp into the program's code: garbage that must not raise
        code = t.process.object_at(regs["rip"])
        assert code is not None
        stack = unwinder.unwind(dict(regs, rsp=code.start + 0x100), read, find)
        assert stack.reason in (FAULT, END, NO_UNWIND_INFO, "not_monotonic", MAX_FRAMES)
        # a pc nowhere, with a bad rbp: one frame, no object
        stack = unwinder.unwind(dict(regs, rip=0x1234, rbp=0x10), read, find)
        assert len(stack) == 1 and stack[0].object is None and stack[0].symbol is None
        assert stack.reason == NO_UNWIND_INFO

        def unreadable(address: int, size: int) -> bytes:
            raise FaultError(f"no memory at {address:#x}", address)

        stack = unwinder.unwind(regs, unreadable, find)
        assert len(stack) == 1 and stack.reason == FAULT
        with pytest.raises(UnwindError):
            unwinder.unwind({"rip": regs["rip"]}, read, find)


def test_bad_frame_pointer_without_cfi() -> None:
    exe = _no_cfi()
    with self_stopped([exe, "chain"]) as t:
        good = t.unwind()
        # from chain5 (no CFI) with a bad rbp: only chain5 itself
        chain5 = next(f for f in good if f.symbol == "chain5")
        for rbp in (0, 0x10, 0x1001, chain5.sp - 64):
            stack = Unwinder().unwind({"rip": chain5.address, "rsp": chain5.sp, "rbp": rbp},
                                      t.process.mem.read, t.process.object_at)
            assert len(stack) == 1 and stack.reason == NO_UNWIND_INFO, (hex(rbp), stack)


def test_hijacked_return_address_is_translated() -> None:
    """A return address replaced on the stack (as a return probe does) breaks the
    chain; translate_return puts the original back."""
    exe = _o2()
    with self_stopped([exe, "chain"]) as t:
        good = t.unwind()
        chain5 = good[2]
        assert chain5.symbol == "chain5" and chain5.sp is not None
        slot = chain5.sp - 8                        # where stop_here's return address is
        assert t.process.mem.read_u64(slot) == chain5.address
        fake = 0x1000
        t.process.mem.write(slot, fake.to_bytes(8, "little"))
        broken = t.unwind()
        calls: List[tuple] = []

        def translate(address: int, cfa: int) -> int:
            calls.append((address, cfa))
            return chain5.address if (address, cfa) == (fake, chain5.sp) else address

        fixed = t.unwind(translate_return=translate)
    assert broken[2].address == fake and broken[2].object is None
    assert list(fixed) == list(good)
    assert (fake, chain5.sp) in calls


# ---------------------------------------------------------------------------- CFI decoding

def _readelf(args: Sequence[str]) -> str:
    # (its status is 1 for warnings about other parts of some files: not checked)
    return subprocess.run(["readelf", *args], capture_output=True, text=True, timeout=120).stdout


def _readelf_tables(path: str) -> Dict[tuple, list]:
    """binutils' interpretation of every FDE (``readelf -wF``):
    {(section, FDE start): [(pc, CFA text, {column: rule text})]}."""
    tables: Dict[tuple, list] = {}
    section = ""
    rows: Optional[list] = None
    columns: List[str] = []
    for line in _readelf(["-wF", path]).splitlines():
        m = re.match(r"Contents of the (\S+) section", line)
        if m:
            section = m.group(1)
            continue
        m = re.match(r"^[0-9a-f]+ [0-9a-f]+ [0-9a-f]+ FDE cie=[0-9a-f]+ pc=([0-9a-f]+)\.\.", line)
        if m:
            rows = tables.setdefault((section, int(m.group(1), 16)), [])
            columns = []
            continue
        if re.match(r"^[0-9a-f]+ [0-9a-f]+ [0-9a-f]+ CIE", line):
            rows = None
            continue
        parts = line.split()
        if not parts:
            rows = None                 # an FDE's table ends at a blank line
            continue
        if rows is None:
            continue
        if parts[0] == "LOC":
            columns = parts[2:]
        elif columns and len(parts) == len(columns) + 2:
            rows.append((int(parts[0], 16), parts[1], dict(zip(columns, parts[2:]))))
    return tables


def _unusual_fdes(path: str) -> set:
    """(section, start) of the FDEs whose instructions are rare ones (``readelf -wf``)."""
    unusual = set()
    section = ""
    current: Optional[tuple] = None
    rare = ("GNU_args_size", "expression", "_sf", "DW_CFA_register", "val_", "undefined",
            "same_value")
    for line in _readelf(["-wf", path]).splitlines():
        m = re.match(r"Contents of the (\S+) section", line)
        if m:
            section = m.group(1)
            continue
        m = re.match(r"^[0-9a-f]+ [0-9a-f]+ [0-9a-f]+ FDE cie=[0-9a-f]+ pc=([0-9a-f]+)\.\.", line)
        if m:
            current = (section, int(m.group(1), 16))
        elif current is not None and any(word in line for word in rare):
            unusual.add(current)
    return unusual


def _rule_text(kind: int, arg: int) -> str:
    """A compiled register rule as readelf -wF prints it."""
    if kind == unwind_module._OFFSET:
        return f"c{arg:+d}"
    if kind == unwind_module._VAL_OFFSET:
        return f"v{arg:+d}"
    if kind == unwind_module._REGISTER:
        return unwind_module._DWARF_NAMES[arg]
    return {unwind_module._UNDEFINED: "u", unwind_module._SAME: "s",
            unwind_module._EXPRESSION: "exp", unwind_module._VAL_EXPRESSION: "vexp"}[kind]


def _cfi_files() -> List[str]:
    files = ["/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/libc.so.6",
             "/usr/lib/x86_64-linux-gnu/libstdc++.so.6"]
    return [f for f in files if os.path.exists(f)]


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf is not installed")
@pytest.mark.parametrize("which", ["system", "targets"])
def test_cfi_rows_match_readelf(which: str) -> None:
    """Every row of the decoded CFI (pyelftools' table, with this module's fixes for
    DW_CFA_GNU_args_size and def_cfa_sf, compiled into rows) says what binutils says:
    the CFA rule and each register's rule, at each row's pc. System libraries: every
    FDE with a rare instruction and every 8th of the others; test targets: all.
    (This test reads the module's internals: the rows are not public.)"""
    if which == "system":
        files = _cfi_files()
    else:
        files = [_o2(), _o0(), _debug_frame_only(), *_with_lib()]
    names = {name: number for number, name in enumerate(unwind_module._DWARF_NAMES)}
    names["ra"] = 16
    checked = 0
    for path in files:
        tables = _readelf_tables(path)
        unusual = _unusual_fdes(path) if which == "system" else set(tables)
        sections = {s.name: s for s in unwind_module._load_sections(path, (".eh_frame", ".debug_frame"),
                                                                     None)}
        if ".eh_frame" in sections:
            # the index read from .eh_frame_hdr is the one a scan of .eh_frame builds
            eh = sections[".eh_frame"]
            scanned = eh._entries.scan()
            assert [e[0] for e in scanned] == eh._starts and [e[2] for e in scanned] == eh._offsets
        for index, (key, rows) in enumerate(sorted(tables.items())):
            if key not in unusual and index % 8:
                continue
            for pc, cfa, columns in rows:
                fde = sections[key[0]].lookup(pc)
                assert fde is not None, (path, key, hex(pc))
                cfa_reg, cfa_offset, cfa_expr, rules = fde.row_at(pc)
                ours_cfa = "exp" if cfa_expr is not None else \
                    f"{unwind_module._DWARF_NAMES[cfa_reg]}{cfa_offset:+d}"
                ours = {("ra" if reg == 16 else unwind_module._DWARF_NAMES[reg]): _rule_text(kind, arg)
                        for reg, kind, arg, _expr in rules}
                theirs = {column: rule for column, rule in columns.items() if column in names}
                ours = {column: rule for column, rule in ours.items() if rule != "u"}
                theirs = {column: rule for column, rule in theirs.items() if rule != "u"}
                assert (ours_cfa, ours) == (cfa, theirs), (path, key, hex(pc))
                checked += 1
    assert checked > 0


# ---------------------------------------------------------------------------- interface

def test_frame_text_and_caches() -> None:
    exe = _o2()
    with self_stopped([exe, "recurse", "20"]) as t:
        unwinder = Unwinder()
        start = time.perf_counter()
        first = t.unwind(unwinder)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        second = t.unwind(unwinder)
        warm = time.perf_counter() - start
        stop_here = first[1]
        main_obj = t.process.object_at(stop_here.address)
        assert main_obj is not None
        info = ObjectInfo(main_obj.path, main_obj.elf, main_obj.bias, main_obj.start, main_obj.end)
        via_info = unwinder.unwind(t.regs, t.process.mem.read,
                                   object_finder([info] + [o for o in t.process.objects.values()
                                                           if o.path != main_obj.path]))
    assert list(first) == list(second) == list(via_info)
    assert second.reason == first.reason == END
    assert warm < cold
    assert stop_here.symbol == "stop_here"
    assert stop_here.link_address == link_address(exe, "stop_here") + stop_here.offset
    assert stop_here.name == f"stop_here+{stop_here.offset:#x}"
    assert str(stop_here) == f"stop_here+{stop_here.offset:#x} ({os.path.basename(exe)})"
    nowhere = Frame(0x1234, None, None, None)
    assert str(nowhere) == nowhere.name == "0x1234"
    at_start = Frame(0x1000, "f", 0, "/x/prog")
    assert str(at_start) == "f (prog)"
