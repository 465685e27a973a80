"""Process lifecycle: starting, seizing, new threads and processes, exec, exit,
letting children go and detaching threads.

:class:`Lifecycle` subscribes to the loop's :class:`~.events.NewChild`,
:class:`~.events.Exec` and :class:`~.events.Exited` events and answers its
hooks for unknown tids and for children to let go. Address spaces are made by a
factory the session gives (with the patcher's options); what the probe layer
must do when a space is copied, replaced or let go arrives through three hooks
(:attr:`on_fork`, :attr:`on_exec`, :attr:`on_release`). See ``docs/design.md``,
"Lifetime".
"""

from __future__ import annotations

import os
import shutil
import signal
from typing import Callable, Dict, List, Optional, Sequence, Set

from .. import linux, procfs
from ..errors import NoSuchProcessError, ProgramStartError, PtprobeError, TracePermissionError, TracerError
from ..placement import Placement
from ..tracee import AddressSpace, Process, Thread
from .events import Exec, Exited, NewChild
from .loop import EventLoop

_BASE_OPTIONS = (linux.PTRACE_O_TRACECLONE | linux.PTRACE_O_TRACEFORK | linux.PTRACE_O_TRACEVFORK
                 | linux.PTRACE_O_TRACEEXEC | linux.PTRACE_O_TRACESECCOMP)

SpaceFactory = Callable[[Process], AddressSpace]


class Lifecycle:
    """Keeps the loop's registry of threads and processes in step with the kernel's."""

    def __init__(self, loop: EventLoop, *, mode: str, follow: bool, new_space: SpaceFactory,
                 placement: Placement, notice: Callable[[str], None]) -> None:
        self.loop = loop
        self.mode = mode
        self.follow = follow
        self.new_space = new_space
        self.placement = placement
        self.notice = notice
        self.main_pid = 0
        #: the processes started or attached to (the first is main_pid)
        self.roots: List[int] = []
        #: exit statuses (as returncode: minus the signal) of traced processes seen to exit
        self.exits: Dict[int, int] = {}
        self.returncode: Optional[int] = None
        self.attached = False
        #: set when waitpid had nothing left to report while the main process had not
        #: been seen to exit (someone else collected its status)
        self.status_lost = False
        #: hooks for the probe layer: a child's copied space, a new image, a child let go
        self.on_fork: Callable[[AddressSpace], None] = lambda space: None
        self.on_exec: Callable[[Process, AddressSpace], None] = lambda process, former: None
        self.on_release: Callable[[AddressSpace], None] = lambda space: None
        self.on_thread_gone: Callable[[Thread], None] = lambda thread: None
        self._unclaimed: Dict[int, int] = {}        # stops of children whose parent's event is due
        loop.subscribe(NewChild, self._on_new_child)
        loop.subscribe(Exec, self._on_exec)
        loop.subscribe(Exited, self._on_exited)
        loop.claim = self._claim
        loop.release = self.release_child
        loop.all_gone = self._all_gone

    @property
    def options(self) -> int:
        """The ptrace options of every thread (EXITKILL too in run mode)."""
        return _BASE_OPTIONS | (linux.PTRACE_O_EXITKILL if self.mode == "run" else 0)

    def _add_process(self, pid: int) -> Process:
        proc = Process(pid)
        proc.space = self.new_space(proc)
        self.loop.processes[pid] = proc
        return proc

    def _add_thread(self, proc: Process, tid: int) -> Thread:
        thread = proc.add_thread(tid)
        self.loop.threads[tid] = thread
        return thread

    # --- run ----------------------------------------------------------------------------
    def start(self, argv: Sequence[str], env: Optional[Dict[str, str]]) -> Process:
        """Start *argv* under tracing and run it to its exec stop, where it stays
        (the loop is left holding)."""
        if not argv:
            raise ProgramStartError("no program given", "")
        program = argv[0]
        path = program if "/" in program else shutil.which(program)
        if path is None or not os.path.exists(path):
            raise ProgramStartError(f"{program}: no such file or directory", program)
        if os.path.isdir(path) or not os.access(path, os.X_OK):
            raise ProgramStartError(f"{program}: permission denied (not an executable file)", program)
        go_r, go_w = os.pipe()
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                # Python ignores SIGPIPE and SIGXFSZ, and an ignored signal stays
                # ignored across exec: give the program the defaults it would have
                for sig in (signal.SIGPIPE, signal.SIGXFSZ):
                    signal.signal(sig, signal.SIG_DFL)
                os.close(go_w)
                os.close(err_r)
                os.read(go_r, 1)
                os.close(go_r)
                if env is None:
                    os.execv(path, list(argv))
                os.execve(path, list(argv), env)
            except OSError as exc:
                os.write(err_w, f"{exc.errno}".encode())
            finally:
                os._exit(127)
        os.close(go_r)
        os.close(err_w)
        try:
            linux.seize(pid, self.options)
        except PtprobeError:
            os.kill(pid, signal.SIGKILL)
            self.loop.reap(pid)
            raise
        finally:
            os.write(go_w, b"g")
            os.close(go_w)
        self.main_pid = pid
        self.roots.append(pid)
        self.attached = True
        proc = self._add_process(pid)
        self._add_thread(proc, pid)
        self.loop.hold()
        # run until the exec stop
        while proc.pid in self.loop.processes and not proc.exec_seen:
            self.loop.step()
        err = os.read(err_r, 64)
        os.close(err_r)
        if pid not in self.loop.processes or self.returncode is not None:
            code = int(err) if err.strip().isdigit() else 0
            self.attached = False
            raise ProgramStartError(f"{program}: cannot execute: {os.strerror(code) if code else 'exited'}",
                                    program)
        return proc

    # --- attach ---------------------------------------------------------------------------
    def seize(self, pid: int) -> Process:
        """Seize every thread of process *pid* (they keep running); it becomes one of
        the :attr:`roots` (the first one is :attr:`main_pid`). On failure, what was
        seized of it is let go (other processes stay traced)."""
        if pid <= 0:
            raise NoSuchProcessError(f"no such process: {pid}", pid)
        if pid == os.getpid():
            raise TracePermissionError("ptprobe cannot trace itself", pid)
        status = procfs.read_status(pid)
        tgid = int(status.get("Tgid", pid))
        if tgid != pid:
            raise NoSuchProcessError(f"{pid} is a thread of process {tgid}: give the process id", pid)
        if status.get("State", "").startswith("Z"):
            raise NoSuchProcessError(f"process {pid} is a zombie", pid)
        if status.get("Kthread") == "1" or "VmSize" not in status:
            raise TracePermissionError(f"process {pid} is a kernel thread: there is no user code to probe", pid)
        tracer = int(status.get("TracerPid", "0"))
        if tracer:
            raise TracePermissionError(f"process {pid} is already traced by process {tracer}", pid)
        try:
            os.stat(f"/proc/{pid}/exe")
        except PermissionError:
            raise TracePermissionError(f"no permission to trace process {pid}", pid) from None
        except OSError:
            pass
        exe = procfs.executable(pid)
        proc = self._add_process(pid)
        me = os.getpid()
        try:
            seen: Set[int] = set()
            while True:
                tids = set(procfs.iter_threads(pid)) - seen
                if not tids:
                    break
                for tid in sorted(tids):
                    seen.add(tid)
                    try:
                        linux.seize(tid, self.options)
                    except NoSuchProcessError:
                        continue
                    except TracePermissionError:
                        if tid != pid and procfs.tracer_of(pid, tid) == me:
                            pass   # created by a seized thread: already auto-attached
                        elif tid != pid and procfs.is_exiting(pid, tid):
                            continue
                        else:
                            raise TracePermissionError(f"no permission to trace process {pid}"
                                                       f"{' (' + exe + ')' if exe else ''}", pid) from None
                    self._add_thread(proc, tid)
                    self.attached = True
        except PtprobeError:
            self._abandon_process(proc)
            raise
        if not self.main_pid:
            self.main_pid = pid
        self.roots.append(pid)
        return proc

    def _abandon_process(self, proc: Process) -> None:
        """Let go of the threads of *proc* seized so far (nothing armed yet)."""
        for tid in list(proc.threads):
            try:
                linux.detach(tid, 0)
            except PtprobeError:
                pass
            self.loop.threads.pop(tid, None)
        proc.threads.clear()
        self._forget_process(proc)
        self.attached = bool(self.loop.threads)

    def abandon(self) -> None:
        """Let go of every thread seized so far (a failed attach: nothing armed yet)."""
        for tid in list(self.loop.threads):
            try:
                linux.detach(tid, 0)
            except PtprobeError:
                pass
        self.loop.threads.clear()
        self.attached = False

    # --- new threads and processes ---------------------------------------------------------
    def _claim(self, tid: int, status: int) -> Optional[Thread]:
        """A stop from a tid we do not know yet: a new thread or child."""
        if not os.WIFSTOPPED(status):
            if tid not in self.loop.processes:
                self.loop.foreign_exits[tid] = status
            return None
        tgid = procfs.thread_group(tid)
        if tgid is None:
            return None
        proc = self.loop.processes.get(tgid)
        if proc is None:
            parent = self.loop.processes.get(procfs.parent_of(tid))
            if parent is None:
                # keep it stopped until its parent's event tells us about it
                self._unclaimed[tid] = status
                return None
            proc = self._fork_process(parent, tid)
        return self._add_thread(proc, tid)

    def _on_new_child(self, event: NewChild) -> None:
        parent = event.thread
        child = linux.get_event_msg(parent.tid)
        self.placement.adopt(child, parent.tid)
        if child not in self.loop.threads:
            self._adopt_child(parent, event.kind, child)
        self.loop.done(parent)

    def _adopt_child(self, parent: Thread, kind: int, child: int) -> None:
        pproc = parent.process
        group = procfs.thread_group(child)
        if group is None:
            return      # its first stop came first, and it has run and exited since
        if kind == linux.PTRACE_EVENT_CLONE and group == pproc.pid:
            self._add_thread(pproc, child)
        else:
            try:
                proc = self._fork_process(pproc, child)
            except NoSuchProcessError:
                return
            self._add_thread(proc, child)
        status = self._unclaimed.pop(child, None)
        if status is not None:
            self.loop.dispatch(child, status)

    def _fork_process(self, parent: Process, pid: int) -> Process:
        """The Process of a new child of *parent*: in the parent's address space
        if they share memory (vfork, CLONE_VM: decided by kcmp, never cleaned),
        else in a copy of it."""
        proc = Process(pid)
        try:
            shared = linux.share_memory(parent.pid, pid)
        except PtprobeError:
            shared = False
        if shared:
            proc.space = parent.space
        else:
            proc.space = parent.space.fork(proc)
            proc.forked_from = parent.space
            # --no-follow: a copy of the memory is cleaned and let go at its first stop
            proc.release_on_stop = not self.follow
            self.on_fork(proc.space)
        self.loop.processes[pid] = proc
        return proc

    def release_child(self, proc: Process) -> None:
        """Restore the sites and semaphores of a forked child, then detach it (--no-follow)."""
        try:
            self.on_release(proc.space)
        except PtprobeError as exc:
            self.notice(f"child {proc.pid}: cannot restore every site: {exc}")
        for thread in list(proc.threads.values()):
            self.placement.unpin(thread.tid)
            try:
                if thread.stopped:
                    linux.detach(thread.tid, thread.pending_signal)
            except PtprobeError:
                pass
            thread.exited = True
            self.loop.threads.pop(thread.tid, None)
        proc.threads.clear()
        self._forget_process(proc)

    # --- exec and exit ------------------------------------------------------------------------
    def _on_exec(self, event: Exec) -> None:
        thread = event.thread
        proc = thread.process
        former = linux.get_event_msg(thread.tid)
        for tid in list(proc.threads):
            if tid != thread.tid:
                proc.threads.pop(tid, None)
                self.loop.threads.pop(tid, None)
                if tid != former:
                    self.placement.forget(tid)
        if former != thread.tid:
            self.loop.threads.pop(former, None)
            self.placement.moved(former, thread.tid)     # the exec'ing thread took the leader's tid
        former_space = proc.space
        proc.space = former_space.after_exec(proc)
        proc.exec_seen = True
        if not self.follow and proc.pid not in self.roots:
            proc.release_on_stop = True     # a vfork-style child has left our memory: let it go
            self.release_child(proc)
            return
        self.on_exec(proc, former_space)
        self.loop.done(self.loop.threads.get(thread.tid, thread))

    def _on_exited(self, event: Exited) -> None:
        self.thread_gone(event.thread, event.status)

    def thread_gone(self, thread: Thread, status: int) -> None:
        """*thread* exited (or its process died) with wait status *status*."""
        self.on_thread_gone(thread)
        self.placement.forget(thread.tid)
        thread.exited = True
        thread.stopped = False
        self.loop.threads.pop(thread.tid, None)
        proc = thread.process
        proc.threads.pop(thread.tid, None)
        if thread.tid == proc.pid:
            proc.exited = True
            proc.exit_status = status
            for tid in list(proc.threads):
                self.loop.threads.pop(tid, None)
                self.placement.forget(tid)
            proc.threads.clear()
            self._forget_process(proc)
            code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
            self.exits[proc.pid] = code
            if proc.pid == self.main_pid:
                self.returncode = code
        if not self.loop.threads:
            self.attached = False
            self.placement.release()

    def _forget_process(self, proc: Process) -> None:
        self.loop.processes.pop(proc.pid, None)
        if not proc.shares_memory:
            proc.space.close()

    def _all_gone(self) -> None:
        """waitpid has no child left: every traced thread is gone, and the statuses
        that were not reported to us were collected by someone else."""
        for thread in list(self.loop.threads.values()):
            thread.exited = True
        self.loop.threads.clear()
        if self.returncode is None:
            self.status_lost = True
        self.attached = False
        self.placement.release()

    # --- detaching ---------------------------------------------------------------------------------
    def detach_thread(self, thread: Thread) -> Optional[str]:
        """PTRACE_DETACH one stopped thread, delivering the signal it was due;
        returns what went wrong (None if all is well)."""
        if thread.exited:
            return None
        if not thread.stopped:
            return f"thread {thread.tid} is not stopped: left traced"
        try:
            linux.detach(thread.tid, thread.signal_to_deliver())
        except NoSuchProcessError:
            # only SIGKILL (its group exiting) takes a thread out of a ptrace-stop: its
            # exit is on the way; one still in the stop was not let go
            if (procfs.thread_state(thread.process.pid, thread.tid) == "t"
                    and procfs.tracer_of(thread.process.pid, thread.tid) == os.getpid()):
                return f"thread {thread.tid} could not be detached"
        except TracerError as exc:
            return f"thread {thread.tid}: {exc}"
        return None

    def kill(self) -> None:
        """SIGKILL the program (run mode) and reap what is traced of it."""
        if self.main_pid and self.returncode is None:
            try:
                os.kill(self.main_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            while self.returncode is None and self.loop.threads:
                self.loop.step()
            self.attached = False
