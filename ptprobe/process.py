"""Traced processes and threads: state, memory, mapped objects, remote syscalls.

A :class:`Process` is one address space with the threads ptprobe traces in it.
It knows nothing about probes; :mod:`ptprobe.patching` arms them and
:mod:`ptprobe.session` runs the event loop.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from . import linux
from .elf import ElfFile
from .errors import NoSuchProcessError, ObjectFileError, TracerError

_FAULTS = (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE)
_COMPLETING_EVENTS = (linux.PTRACE_EVENT_CLONE, linux.PTRACE_EVENT_FORK, linux.PTRACE_EVENT_VFORK,
                      linux.PTRACE_EVENT_EXEC)
_U64 = (1 << 64) - 1


def signed64(value: int) -> int:
    value &= _U64
    return value - (1 << 64) if value >> 63 else value


class Thread:
    """One traced thread and what the tracer knows of its current stop."""

    __slots__ = ("tid", "process", "stopped", "pending_signal", "group_stop", "interrupted",
                 "stepping", "deferred_signals", "exited", "in_hit")

    def __init__(self, tid: int, process: "Process") -> None:
        self.tid = tid
        self.process = process
        self.stopped = False          # in a ptrace-stop the tracer has seen and not resumed
        self.pending_signal = 0       # signal to inject when resumed
        self.group_stop = False       # stopped in a group-stop: resume with PTRACE_LISTEN
        self.interrupted = False      # PTRACE_INTERRUPT sent, its stop not seen yet
        self.stepping = False         # single-stepping (remote syscall, step-over)
        self.deferred_signals: List[int] = []
        self.exited = False
        self.in_hit = None            # the site whose hit is being handled

    def resume(self) -> None:
        """Resume from the current stop, delivering the pending signal."""
        if not self.stopped or self.exited:
            return
        self.stopped = False
        try:
            if self.group_stop:
                linux.listen(self.tid)
            else:
                sig = self.pending_signal
                if not sig and self.deferred_signals:
                    sig = self.deferred_signals.pop(0)
                self.pending_signal = 0
                linux.cont(self.tid, sig)
        except NoSuchProcessError:
            self.exited = True

    def __repr__(self) -> str:
        return f"<Thread {self.tid} of {self.process.pid}{' stopped' if self.stopped else ''}>"


@dataclass
class LoadedObject:
    """An ELF object mapped in a process."""

    path: str
    identity: Tuple[int, int]
    elf: ElfFile
    bias: int
    start: int
    end: int

    def runtime(self, vaddr: int) -> int:
        return vaddr + self.bias

    def link_time(self, address: int) -> int:
        return address - self.bias

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


_elf_cache: Dict[Tuple[int, int, int], ElfFile] = {}


def open_elf(path: str) -> ElfFile:
    """Open (and cache by device, inode and mtime) an ELF file."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ObjectFileError(f"{path}: {exc.strerror}", path) from None
    key = (st.st_dev, st.st_ino, st.st_mtime_ns)
    elf = _elf_cache.get(key)
    if elf is None:
        elf = ElfFile(path)
        _elf_cache[key] = elf
    return elf


class Process:
    """One traced address space (a thread group)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.threads: Dict[int, Thread] = {}
        self.mem = linux.Memory(pid)
        self.exited = False
        self.exit_status: Optional[int] = None
        self._maps: Optional[List[linux.Mapping]] = None
        self.objects: Dict[Tuple[int, int], LoadedObject] = {}
        self.unmapped: List[LoadedObject] = []      # objects seen unmapped, not yet handled
        self.syscall_gadget: Optional[int] = None   # address of `syscall; int3` in a ptprobe page
        self.filter_state = "none"                   # "none" | "installed" | "failed"
        self.release_on_stop = False                 # detach at the next stop (--no-follow)
        self.exec_seen = False                       # an exec event has been seen
        self.shared_with: Optional[int] = None       # pid whose memory this process shares (vfork)

    # --- threads ------------------------------------------------------------------
    def add_thread(self, tid: int) -> Thread:
        thread = self.threads.get(tid)
        if thread is None:
            thread = Thread(tid, self)
            self.threads[tid] = thread
        return thread

    def any_stopped_thread(self) -> Thread:
        for thread in self.threads.values():
            if thread.stopped and not thread.exited and not thread.group_stop:
                return thread
        for thread in self.threads.values():
            if thread.stopped and not thread.exited:
                return thread
        raise TracerError(f"no stopped thread in process {self.pid}")

    # --- memory map -------------------------------------------------------------------
    def maps(self, refresh: bool = False) -> List[linux.Mapping]:
        if self._maps is None or refresh:
            self._maps = linux.read_maps(self.pid)
        return self._maps

    def invalidate_maps(self) -> None:
        self._maps = None

    def refresh_objects(self) -> List[LoadedObject]:
        """Re-read the maps; return the objects that are newly mapped (those no
        longer mapped go to :attr:`unmapped`)."""
        maps = self.maps(refresh=True)
        by_identity: Dict[Tuple[int, int], List[linux.Mapping]] = {}
        for m in maps:
            if not m.path.startswith("/") or m.inode == 0 or m.path.endswith(" (deleted)"):
                continue
            by_identity.setdefault(linux.mapping_identity(m), []).append(m)
        new: List[LoadedObject] = []
        present = set()
        for identity, mappings in by_identity.items():
            if not any(m.is_exec for m in mappings):
                continue
            present.add(identity)
            if identity in self.objects:
                continue
            path = mappings[0].path
            try:
                elf = open_elf(path)
            except ObjectFileError:
                continue
            bias = _load_bias(elf, mappings)
            if bias is None:
                continue
            obj = LoadedObject(path, identity, elf, bias,
                               min(m.start for m in mappings), max(m.end for m in mappings))
            self.objects[identity] = obj
            new.append(obj)
        for identity in list(self.objects):
            if identity not in present:
                self.unmapped.append(self.objects.pop(identity))
        return new

    def object_at(self, address: int) -> Optional[LoadedObject]:
        for obj in self.objects.values():
            if obj.start <= address < obj.end:
                return obj
        return None

    # --- remote syscalls -------------------------------------------------------------
    def syscall(self, nr: int, *args: int, thread: Optional[Thread] = None) -> Tuple[int, bool]:
        """Make the tracee run syscall *nr*; returns (result, saw_seccomp_stop).

        Every thread of the process must be stopped. The thread's registers
        are restored afterwards, with an interrupted syscall set up to restart;
        signals that arrive meanwhile are kept and delivered later.
        """
        thread = thread or self.any_stopped_thread()
        tid = thread.tid
        saved = linux.get_regs(tid)
        restored = _prepare_restart(saved)
        # stopped at a clone/fork/vfork/exec event, the thread is still inside that
        # syscall: its result is written into rax only when it is resumed
        completing = linux.stop_event(tid) in _COMPLETING_EVENTS
        patched: Optional[Tuple[int, bytes]] = None
        if self.syscall_gadget is not None:
            at = self.syscall_gadget
        else:
            at = saved.rip
            patched = (at, self.mem.read(at, 2))
            self.mem.write(at, b"\x0f\x05")
        try:
            regs = linux.copy_regs(saved)
            regs.rax = nr
            regs.orig_rax = _U64
            for name, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args):
                setattr(regs, name, value & _U64)
            regs.rip = at
            linux.set_regs(tid, regs)
            saw_seccomp, finished = self._step_syscall(thread, at, regs)
            result = signed64(linux.get_regs(tid).rax)
            if completing and finished is not None:
                # keep that syscall's result (a new thread's tid, say), not the
                # -ENOSYS placeholder rax held at the event stop
                done = linux.copy_regs(saved)
                done.rax = finished
                restored = _prepare_restart(done)
        finally:
            if patched is not None:
                self.mem.write(patched[0], patched[1])
            if not thread.exited:
                linux.set_regs(tid, restored)
        return result, saw_seccomp

    def _step_syscall(self, thread: Thread, at: int, regs: linux.Registers) -> Tuple[bool, Optional[int]]:
        """Step *thread* through the syscall at *at*; returns (saw_seccomp_stop,
        the result of the syscall the thread was stopped in, if resuming ran it)."""
        saw_seccomp = False
        finished: Optional[int] = None
        thread.stepping = True
        try:
            linux.singlestep(thread.tid)
            while True:
                status = linux.wait_tid(thread.tid)
                if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                    thread.exited = True
                    raise NoSuchProcessError(f"thread {thread.tid} exited during a remote syscall", thread.tid)
                sig = os.WSTOPSIG(status)
                event = status >> 16
                if event == linux.PTRACE_EVENT_SECCOMP:
                    saw_seccomp = True
                elif event == linux.PTRACE_EVENT_STOP:
                    thread.interrupted = False      # a PTRACE_INTERRUPT consumed here
                elif event == 0 and sig == signal.SIGTRAP:
                    now = linux.get_regs(thread.tid)
                    if now.rip == at + 2:
                        return saw_seccomp, finished
                    if now.rip != at:
                        # not our step: a SIGTRAP for the program; keep it
                        thread.deferred_signals.append(sig)
                    else:
                        # a step trap reported before the syscall ran: resuming from a
                        # syscall-exit stop (the exec event) also wrote that syscall's
                        # result into rax. Set the registers again and step again.
                        if finished is None:
                            finished = now.rax
                        linux.set_regs(thread.tid, regs)
                elif event == 0 and sig in _FAULTS:
                    raise TracerError(f"remote syscall {regs.rax} faulted with signal {sig} "
                                      f"in thread {thread.tid}")
                elif event == 0:
                    thread.deferred_signals.append(sig)
                linux.singlestep(thread.tid)
        finally:
            thread.stepping = False

    def scratch_address(self, thread: Thread, size: int) -> int:
        """An address below the red zone of *thread*'s stack, for short-lived data."""
        rsp = linux.get_regs(thread.tid).rsp
        return (rsp - 128 - 256 - size) & ~0xF

    def close(self) -> None:
        self.mem.close()

    def __repr__(self) -> str:
        return f"<Process {self.pid}>"


def _prepare_restart(saved: linux.Registers) -> linux.Registers:
    """A copy of *saved* in which an interrupted syscall is set up to restart."""
    regs = linux.copy_regs(saved)
    orig = signed64(regs.orig_rax)
    rax = signed64(regs.rax)
    if orig >= 0:
        if rax in (-linux.ERESTARTSYS, -linux.ERESTARTNOINTR, -linux.ERESTARTNOHAND):
            regs.rax = orig
            regs.rip -= 2
            regs.orig_rax = _U64
        elif rax == -linux.ERESTART_RESTARTBLOCK:
            regs.rax = linux.SYS_restart_syscall
            regs.rip -= 2
            regs.orig_rax = _U64
    return regs


def _load_bias(elf: ElfFile, mappings: List[linux.Mapping]) -> Optional[int]:
    for m in sorted(mappings, key=lambda m: m.offset):
        for seg in elf.segments:
            if seg.offset & ~0xFFF == m.offset:
                return m.start - (seg.vaddr & ~0xFFF)
    return None

