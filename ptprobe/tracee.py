"""The traced world: threads, processes and address spaces.

* :class:`Thread` -- one traced thread and what the tracer knows of its stop.
* :class:`Process` -- a thread group: its threads and the address space it runs in.
* :class:`AddressSpace` -- everything ptprobe knows and has done in one address
  space: its memory, mapped objects, the :class:`~ptprobe.patching.Patcher`
  with its pages and armed sites, the probes armed in each object, USDT
  semaphore increments, the seccomp filter state, and the way to run system
  calls inside it. A process made by ``fork`` gets a new one
  (:meth:`AddressSpace.fork`); a ``vfork`` child, or any clone sharing memory,
  runs in its parent's; ``exec`` replaces it (:meth:`AddressSpace.after_exec`).

Nothing here waits for events: remote syscalls single-step one stopped thread
and wait for that thread only (see ``docs/design.md``, "Working inside the
tracee").
"""

from __future__ import annotations

import os
import signal
from typing import Callable, Dict, List, Optional, Set, Tuple

from . import arch, linux, procfs
from .errors import NoSuchProcessError, PtprobeError, SyscallRefusedError, TracePermissionError, TracerError
from .objects import Identity, LoadedObject, scan_objects
from .arch import XOL_ENTRY_SIZE
from .patching import Patcher
from .retstack import ShadowStacks
from .unwind import RegisterSource, Stack, Unwinder
from .seccomp import MODE_FILTER, MODE_NONE, MODE_STRICT, FilterError, FilterStack, Program

_FAULTS = (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE)
_COMPLETING_EVENTS = (linux.PTRACE_EVENT_CLONE, linux.PTRACE_EVENT_FORK, linux.PTRACE_EVENT_VFORK,
                      linux.PTRACE_EVENT_EXEC)
#: One unwinder for every space: its caches are per object file (docs/design.md, "Return probes").
_UNWINDER = Unwinder()
#: Registers that carry a syscall's arguments, in order.
_SYSCALL_ARGS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")


class Thread:
    """One traced thread and what the tracer knows of its current stop."""

    __slots__ = ("tid", "process", "stopped", "pending_signal", "group_stop", "interrupted",
                 "stepping", "deferred_signals", "exited", "in_hit", "fresh", "stops")

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
        self.in_hit: Optional[object] = None   # the site whose hit is being handled
        self.fresh = True             # its first stop has not been handled yet
        self.stops = 0                # probe stops so far (read by the CPU placement)

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

    def signal_to_deliver(self) -> int:
        """The signal this thread would get if it were let go now."""
        return self.pending_signal or (self.deferred_signals[0] if self.deferred_signals else 0)

    def __repr__(self) -> str:
        return f"<Thread {self.tid} of {self.process.pid}{' stopped' if self.stopped else ''}>"


class Process:
    """One traced thread group."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.threads: Dict[int, Thread] = {}
        self.exited = False
        self.exit_status: Optional[int] = None
        self.release_on_stop = False         # detach at the next stop (--no-follow)
        self.exec_seen = False               # an exec event has been seen
        #: a fork's child not stopped yet since: the space it was copied from
        self.forked_from: Optional[AddressSpace] = None
        # the space it runs in: set by whoever creates the process, right after
        # (a new AddressSpace, a fork's copy, or, for a vfork child, the parent's)
        self.space: AddressSpace

    @property
    def mem(self) -> linux.Memory:
        return self.space.mem

    @property
    def shares_memory(self) -> bool:
        """True for a vfork/CLONE_VM child running in another process's address space."""
        return self.space.owner is not self

    def add_thread(self, tid: int) -> Thread:
        thread = self.threads.get(tid)
        if thread is None:
            thread = Thread(tid, self)
            self.threads[tid] = thread
        return thread

    def stopped_thread(self) -> Thread:
        """A thread stopped by the tracer (not in a group-stop if possible)."""
        fallback = None
        for thread in self.threads.values():
            if thread.stopped and not thread.exited:
                if not thread.group_stop:
                    return thread
                fallback = fallback or thread
        if fallback is None:
            raise TracerError(f"no stopped thread in process {self.pid}")
        return fallback

    def __repr__(self) -> str:
        return f"<Process {self.pid}>"


class AddressSpace:
    """One address space and everything ptprobe keeps about it.

    *owner* is the process whose threads run the remote system calls; a
    ``vfork`` child shares its parent's space and owns none.
    """

    def __init__(self, owner: Process, patcher_options: Dict[str, object],
                 wait_thread: Callable[[int], int]) -> None:
        self.owner = owner
        self.mem = linux.Memory(owner.pid)
        self.wait_thread = wait_thread             # the event loop's wait for one thread
        self.objects: Dict[Identity, LoadedObject] = {}
        self.unmapped: List[LoadedObject] = []      # objects seen unmapped, not yet handled
        self.syscall_gadget: Optional[int] = None   # `syscall; int3` in a ptprobe page
        self.filter_state = "none"                   # ptprobe's seccomp filter: none|installed|failed
        # the seccomp filters of the owner's threads (read when first needed), whether
        # every filter installed since was seen by ptprobe's watch, and ptprobe's own
        # filter program once installed (also found in the record of an earlier attach)
        self.filters: Optional[FilterStack] = None
        self.filters_watched = False
        self.own_filter: Optional[bytes] = None
        # what the probe layer armed here: (probe key, object identity), and
        # semaphore address -> our increments
        self.armed: Set[Tuple[int, Identity]] = set()
        self.semaphores: Dict[int, int] = {}
        #: calls whose return address a return probe replaced, per thread
        self.returns = ShadowStacks()
        self._patcher_options = patcher_options
        self._maps: Optional[List[procfs.Mapping]] = None
        self.patcher = Patcher(self, **patcher_options)   # type: ignore[arg-type]

    @property
    def pid(self) -> int:
        return self.owner.pid

    # --- derived spaces ----------------------------------------------------------
    def fork(self, child: Process) -> "AddressSpace":
        """The space of *child*, a copy of this one made by fork (same code, pages,
        sites, semaphores and filter; its own memory file)."""
        space = AddressSpace.__new__(AddressSpace)
        space.owner = child
        space.mem = linux.Memory(child.pid)
        space.objects = dict(self.objects)
        space.unmapped = []
        space.syscall_gadget = self.syscall_gadget
        space.filter_state = self.filter_state
        space.filters = self.filters.copy() if self.filters is not None else None
        space.filters_watched = self.filters_watched
        space.own_filter = self.own_filter
        space.armed = set(self.armed)
        space.semaphores = dict(self.semaphores)
        space.returns = self.returns.fork()
        space._patcher_options = self._patcher_options
        space.wait_thread = self.wait_thread
        space._maps = None
        space.patcher = self.patcher.fork(space)
        return space

    def after_exec(self, process: Process) -> "AddressSpace":
        """The space *process* runs in after exec: new memory, nothing armed; the
        seccomp filter (a property of the threads, not of the memory) stays."""
        if self.owner is process:
            self.mem.close()
        space = AddressSpace(process, self._patcher_options, self.wait_thread)
        space.filter_state = self.filter_state
        space.filters, space.filters_watched, space.own_filter = self.filters, self.filters_watched, self.own_filter
        return space

    def close(self) -> None:
        self.mem.close()

    # --- memory map ----------------------------------------------------------------
    def maps(self, refresh: bool = False) -> List[procfs.Mapping]:
        if self._maps is None or refresh:
            self._maps = procfs.read_maps(self.pid)
        return self._maps

    def invalidate_maps(self) -> None:
        self._maps = None

    def refresh_objects(self) -> List[LoadedObject]:
        """Re-read the maps; return the objects newly mapped (those no longer
        mapped go to :attr:`unmapped`)."""
        now = scan_objects(self.maps(refresh=True), self.objects, pid=self.pid, read_memory=self.mem.read)
        new = [obj for identity, obj in now.items() if identity not in self.objects]
        self.unmapped.extend(obj for identity, obj in self.objects.items() if identity not in now)
        self.objects = now
        return new

    def object_at(self, address: int) -> Optional[LoadedObject]:
        for obj in self.objects.values():
            if obj.contains(address):
                return obj
        return None

    def executable(self) -> str:
        return procfs.executable(self.pid)

    def user_stack(self, tid: int, regs: RegisterSource, max_frames: int = 64) -> Stack:
        """The call chain of stopped thread *tid* whose registers are *regs*
        (innermost first), return addresses replaced by return probes shown as
        the original ones."""
        patcher = self.patcher
        returned = None
        if patcher.trampoline is not None:
            returned = self.returns.translator(tid, patcher.trampoline[0])
        copies = {copy: address for address, copy in patcher.xol_owner.items()}

        def translate(address: int, cfa: int) -> int:
            if returned is not None:
                address = returned(address, cfa)
            # a call run out of line returns into its copy, just after the copy's
            # `call rel32` (5 bytes): the program's return address is after the original
            start = address - address % XOL_ENTRY_SIZE
            original = copies.get(start)
            if original is not None and address == start + 5:
                site = patcher.sites.get(original)
                if site is not None and site.insn is not None:
                    return original + site.insn.size
            return address

        return _UNWINDER.unwind(regs, self.mem.read, self.object_at, max_frames, translate_return=translate)

    # --- remote syscalls -----------------------------------------------------------
    def stopped_thread(self) -> Thread:
        return self.owner.stopped_thread()

    def move_threads(self, start: int, end: int, to: int) -> None:
        """Every stopped thread of the owner whose rip is in [start, end) goes on at
        *to* (the NOPs it would have run are skipped)."""
        for thread in self.owner.threads.values():
            if thread.stopped and not thread.exited:
                rip = linux.get_rip(thread.tid)
                if start <= rip < end:
                    linux.set_rip(thread.tid, to)

    def scratch_address(self, thread: Thread, size: int) -> int:
        """An address below the red zone of *thread*'s stack, for short-lived data."""
        rsp = linux.get_regs(thread.tid).rsp
        return (rsp - 128 - 256 - size) & ~0xF

    # --- seccomp filters of the process ------------------------------------------
    def seccomp_filters(self) -> FilterStack:
        """What is known of the seccomp filters of the owner's threads: read when first
        needed (every thread stopped), and again when /proc shows a change ptprobe's
        watch did not see (see :mod:`ptprobe.seccomp`)."""
        counts = self._filter_counts()
        stack = self.filters
        if stack is not None and (self.filters_watched or stack.counts == counts):
            return stack
        self.filters = stack = self._read_filters(counts)
        return stack

    def _filter_counts(self) -> Tuple[Tuple[int, int], ...]:
        """The distinct (mode, number of filters) of the owner's threads."""
        seen = set()
        for thread in list(self.owner.threads.values()):
            if thread.exited:
                continue
            try:
                mode, count = procfs.seccomp_status(self.pid, thread.tid)
            except PtprobeError:
                continue
            seen.add((mode, -1 if count is None else count))
        return tuple(sorted(seen))

    def _read_filters(self, counts: Tuple[Tuple[int, int], ...]) -> FilterStack:
        stack = FilterStack(counts=counts)
        modes = {mode for mode, _ in counts}
        if modes <= {MODE_NONE}:
            return stack
        if MODE_STRICT in modes:
            stack.strict()
            return stack
        stack.mode = MODE_FILTER
        programs: List[Program] = []
        try:
            for thread in list(self.owner.threads.values()):
                if thread.exited:
                    continue
                mode, count = procfs.seccomp_status(self.pid, thread.tid)
                if mode != MODE_FILTER:
                    continue
                if count is None:
                    raise FilterError("the kernel does not say how many seccomp filters it has")
                if not thread.stopped:
                    raise FilterError(f"thread {thread.tid} is not stopped")
                for index in range(count):
                    program = Program.from_bytes(linux.get_seccomp_filter(thread.tid, index))
                    if program not in programs:
                        programs.append(program)
        except TracePermissionError:
            if self.own_filter is not None and counts == ((MODE_FILTER, 1),):
                programs = [Program.from_bytes(self.own_filter)]     # its one filter is ptprobe's
            else:
                stack.programs = None
                stack.why = ("it has seccomp filters ptprobe may not read "
                             "(PTRACE_SECCOMP_GET_FILTER needs CAP_SYS_ADMIN)")
                return stack
        except (FilterError, TracerError, NoSuchProcessError) as exc:
            stack.programs = None
            stack.why = f"its seccomp filters cannot be read ({exc})"
            return stack
        stack.programs = programs
        return stack

    def slot_verdict(self, extra: Optional[bytes] = None) -> Tuple[bool, str]:
        """(would the slots' system call stop for ptprobe here, why not), with the
        filter program *extra* (ptprobe's own, not installed yet) added."""
        stack = self.seccomp_filters()
        if extra is not None:
            stack = stack.copy()
            stack.add(Program.from_bytes(extra))
        return stack.slot_verdict(arch.SLOT_SYSCALL_NR)

    def filter_installed(self, program: bytes, watched: bool) -> None:
        """ptprobe's filter *program* is installed (in every thread); with *watched* it
        stops every later filter install of the process for ptprobe to see."""
        self.own_filter = program
        stack = self.filters if self.filters is not None else self.seccomp_filters()
        stack.add(Program.from_bytes(program))
        stack.counts = self._filter_counts()
        self.filters = stack
        self.filters_watched = watched

    def seccomp_refusal(self, nr: int, *args: int, thread: Optional[Thread] = None) -> Optional[str]:
        """Why system call *nr* with *args* must not be made in this process (None: it
        may), from the thread that :meth:`syscall` would use."""
        return self._refusals(thread or self.stopped_thread(), (nr, *args))[0]

    def _refusals(self, thread: Thread, *calls: Tuple[int, ...]) -> List[Optional[str]]:
        """:meth:`seccomp_refusal` of each (nr, *args) of *calls*, the filters read once."""
        at = self.syscall_gadget if self.syscall_gadget is not None else linux.get_rip(thread.tid)
        stack = self.seccomp_filters()
        return [stack.refusal(call[0], call[1:], at + 2) for call in calls]

    def syscall(self, nr: int, *args: int, thread: Optional[Thread] = None) -> Tuple[int, bool]:
        """Make the tracee run syscall *nr*; returns (result, saw_seccomp_stop).

        Every thread of the space must be stopped. The thread's registers are
        restored afterwards, with an interrupted syscall set up to restart;
        signals that arrive meanwhile are kept and delivered later. A system call
        that a seccomp filter of the process would kill it for (or that cannot be
        judged) is not made: :class:`SyscallRefusedError`.
        """
        thread = thread or self.stopped_thread()
        # (the getpid of _unstep judged now: filters this syscall may install are
        # judged by their installer)
        why, getpid_refused = self._refusals(thread, (nr, *args), (linux.SYS_getpid,))
        if why is not None:
            name = linux.SYSCALL_NAMES.get(nr, f"system call {nr:#x}")
            raise SyscallRefusedError(f"{name} not made in process {self.pid}: {why}", self.pid, nr, why)
        unstep = not thread.group_stop and getpid_refused is None
        tid = thread.tid
        in_group_stop = thread.group_stop
        saved = linux.get_regs(tid)
        restored = _prepare_restart(saved)
        # stopped at a clone/fork/vfork/exec event, the thread is still inside that
        # syscall: its result is written into rax only when it is resumed
        completing = linux.stop_event(tid) in _COMPLETING_EVENTS
        unstep = unstep and not completing
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
            regs.orig_rax = linux.U64
            for name, value in zip(_SYSCALL_ARGS, args):
                setattr(regs, name, value & linux.U64)
            regs.rip = at
            linux.set_regs(tid, regs)
            saw_seccomp, finished = _step_syscall(thread, at, regs, self.wait_thread)
            result = linux.signed64(linux.get_regs(tid).rax)
            if unstep:
                saw_seccomp |= _unstep(thread, at, regs, self.wait_thread)
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
            if in_group_stop and not thread.exited:
                # stepping took the thread out of its process's stop (SIGSTOP, Ctrl-Z):
                # it sits in the step's signal-delivery stop now, where a stop signal
                # can be injected, and resumed with SIGSTOP it stops with its process
                # again (the process stays stopped until someone continues it)
                thread.group_stop = False
                thread.pending_signal = signal.SIGSTOP
        return result, saw_seccomp

    def __repr__(self) -> str:
        return f"<AddressSpace of {self.pid}>"


def _next_stop(thread: Thread, wait_thread: Callable[[int], int]) -> Tuple[int, int]:
    """(signal, ptrace event) of *thread*'s next stop in a remote syscall; its
    exit raises, and a PTRACE_INTERRUPT used up here is forgotten."""
    status = wait_thread(thread.tid)
    if os.WIFEXITED(status) or os.WIFSIGNALED(status):
        thread.exited = True
        raise NoSuchProcessError(f"thread {thread.tid} exited during a remote syscall", thread.tid)
    event = status >> 16
    if event == linux.PTRACE_EVENT_STOP:
        thread.interrupted = False
    return os.WSTOPSIG(status), event


def _step_syscall(thread: Thread, at: int, regs: linux.Registers,
                  wait_thread: Callable[[int], int]) -> Tuple[bool, Optional[int]]:
    """Step *thread* through the syscall at *at*; returns (saw_seccomp_stop, the
    result of the syscall the thread was stopped in, if resuming ran it)."""
    saw_seccomp = False
    finished: Optional[int] = None
    thread.stepping = True
    try:
        linux.singlestep(thread.tid)
        while True:
            sig, event = _next_stop(thread, wait_thread)
            if event == linux.PTRACE_EVENT_SECCOMP:
                saw_seccomp = True
            elif event == linux.PTRACE_EVENT_STOP:
                pass
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
                raise TracerError(f"remote syscall {regs.rax} faulted with signal {sig} in thread {thread.tid}")
            elif event == 0:
                thread.deferred_signals.append(sig)
            linux.singlestep(thread.tid)
    finally:
        thread.stepping = False


def _unstep(thread: Thread, at: int, regs: linux.Registers, wait_thread: Callable[[int], int]) -> bool:
    """Clear the single-step flag the steps of a remote syscall left on *thread*
    (stopped at *at* + 2): were ptprobe killed before resuming it, the thread would
    trap (SIGTRAP) at its next instruction, or at the end of the system call it
    was restarting. Any resume but a step clears it: the thread makes a getpid at
    *at* under PTRACE_SYSCALL, stopping at its entry and its exit, and runs
    nothing else. Returns whether a seccomp stop was seen."""
    call = linux.copy_regs(regs)
    call.rip = at
    call.rax = linux.SYS_getpid
    call.orig_rax = linux.U64
    linux.set_regs(thread.tid, call)
    saw_seccomp = False
    syscall_stops = 0
    thread.stepping = True
    try:
        linux.syscall_resume(thread.tid)
        while True:
            sig, event = _next_stop(thread, wait_thread)
            if event == linux.PTRACE_EVENT_SECCOMP:
                saw_seccomp = True
            elif event == linux.PTRACE_EVENT_STOP:
                pass
            elif event == 0 and sig == signal.SIGTRAP and linux.get_rip(thread.tid) == at + 2:
                syscall_stops += 1
                if syscall_stops == 2:          # the exit's: done
                    return saw_seccomp
            elif event == 0:
                thread.deferred_signals.append(sig)
            linux.syscall_resume(thread.tid)
    finally:
        thread.stepping = False


def _prepare_restart(saved: linux.Registers) -> linux.Registers:
    """A copy of *saved* in which an interrupted syscall is set up to restart."""
    regs = linux.copy_regs(saved)
    orig = linux.signed64(regs.orig_rax)
    rax = linux.signed64(regs.rax)
    if orig >= 0:
        if rax in (-linux.ERESTARTSYS, -linux.ERESTARTNOINTR, -linux.ERESTARTNOHAND):
            regs.rax = orig
            regs.rip -= 2
            regs.orig_rax = linux.U64
        elif rax == -linux.ERESTART_RESTARTBLOCK:
            regs.rax = linux.SYS_restart_syscall
            regs.rip -= 2
            regs.orig_rax = linux.U64
    return regs
