"""Sessions, ptprobe's public face: start or attach, arm probes, wait, detach.

A :class:`Session` puts the engine together (``docs/design.md``, "Layers"):
the event loop and its two subscribers, process lifecycle and hits
(:mod:`ptprobe.engine`), the probes (:mod:`ptprobe.probes`), and CPU
placement (:mod:`ptprobe.placement`). It never prints: what it has to say (a
site that fell back to int3, a library that is not loaded yet, a handler that
raised) goes to an :class:`Observer`; the default one logs through
:mod:`logging`.

Threading: every ptrace request for a thread must come from the OS thread
that attached it, so use a session from one Python thread. The event loop
waits with ``waitpid(-1, __WALL | __WNOTHREAD)``: it reaps only children of the
calling OS thread. Children that this thread started itself (with
:mod:`subprocess`, say) while a session waits can be reaped by it; their exit
statuses are kept in :attr:`Session.foreign_exits`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Set, Union

from . import linux, procfs
from .engine.filters import FilterWatch
from .engine.hits import Hits
from .engine.lifecycle import Lifecycle
from .engine.loop import EventLoop
from .errors import NoSuchProcessError, PtprobeError, TracePermissionError, TracerError
from .calltrace import CallTrace
from .datapages import DEFAULT_RING
from .engine.records import Actions
from .hit import Hit, Record
from .patching import Site
from .placement import Placement
from .probes import Handler, Probe, Probes
from .spec import ProbeSpec
from .tracee import AddressSpace, Process, Thread

log = logging.getLogger("ptprobe")


class Observer:
    """Receives what the engine has to report. Subclass and override."""

    def notice(self, text: str) -> None:
        """Something the user should know (a fallback, a pending library)."""
        log.warning("%s", text)

    def handler_error(self, probe: Probe, hit: Hit, error: BaseException) -> None:
        """A handler raised; the hit is counted and the thread resumes unchanged."""
        log.error("handler of probe %s raised %s: %s", probe.name, type(error).__name__, error)


class Session:
    """A traced program. Create with :func:`run` or :func:`attach`."""

    def __init__(self, *, mode: str, slots: str = "return", seccomp: bool = True,
                 allow_no_new_privs: Optional[bool] = None, max_trampoline_pages: int = 64,
                 follow: bool = True, observer: Optional[Observer] = None,
                 colocate: Union[bool, str] = True, ring_size: int = DEFAULT_RING,
                 drop: bool = False, in_program: bool = True) -> None:
        if slots not in ("return", "seed"):
            raise ValueError("slots must be 'return' or 'seed'")
        self.mode = mode
        self.slots = slots
        self.seccomp = seccomp
        self.allow_no_new_privs = (mode == "run") if allow_no_new_privs is None else allow_no_new_privs
        self.max_trampoline_pages = max_trampoline_pages
        self.follow = follow
        self.observer = observer or Observer()
        self.placement = Placement({True: "hitting", False: "off"}.get(colocate, colocate))  # type: ignore[arg-type]
        self._owner = threading.get_ident()
        # in run mode ptprobe's filter also stops the program's own filter installs
        patcher_options = dict(slots=slots, seccomp=seccomp, allow_no_new_privs=self.allow_no_new_privs,
                               max_pages=max_trampoline_pages, notice=self.observer.notice,
                               watch=mode == "run")
        self.in_program = in_program
        self.loop = EventLoop()
        self.placement.counts = lambda: [(t.tid, t.stops) for t in list(self.loop.threads.values())]
        self.hits = Hits(self.loop, slot_kind=slots, on_handler_error=self._handler_error)
        self.filter_watch = FilterWatch(self.loop, self.observer.notice)
        self.hits.other_syscall = self.filter_watch.on_call
        self.actions = Actions(ring_size=ring_size, lossless=not drop, notice=self.observer.notice,
                               on_handler_error=self._handler_error)
        self.hits.drain = self.actions.drain
        self.hits.action_stop = self.actions.on_stop
        self.hits.returns.notice = self.observer.notice
        self.loop.first_stop = self._first_stop
        self._probes = Probes(self.loop, notice=self.observer.notice, site_changed=self._site_changed,
                              in_program=self.actions.count)
        self.lifecycle = Lifecycle(self.loop, mode=mode, follow=follow, placement=self.placement,
                                   notice=self.observer.notice,
                                   new_space=lambda proc: AddressSpace(proc, patcher_options,
                                                                       self.loop.wait_thread))
        self.lifecycle.on_fork = self._probes.adopt_fork
        self.lifecycle.on_exec = self._after_exec
        self.lifecycle.on_release = self._release
        self.lifecycle.on_thread_gone = self.actions.thread_gone

    def _release(self, space: AddressSpace) -> None:
        """A forked child is let go: its sites and its return addresses back."""
        problems = self.hits.returns.restore(space) + self.actions.release(space)
        self._probes.release(space)
        if problems:
            raise TracerError("; ".join(problems))

    def _handler_error(self, probe: object, hit: object, error: BaseException) -> None:
        self.observer.handler_error(probe, hit, error)  # type: ignore[arg-type]

    def _site_changed(self, site: Site) -> None:
        """A site's probes or handlers changed: the hot path, and what a hit does."""
        self.hits.site_changed(site)
        if not self.in_program or site.mechanism != "jmp":
            return
        if site.armed and self.loop.holding == 0:
            with self.loop.world_stopped():
                self.actions.update(site)
        else:
            self.actions.update(site)
        if self.actions.recording:
            self.loop.idle = self.actions.drain_some

    def _after_exec(self, process: Process, former: AddressSpace) -> None:
        if former.owner is process:
            self.actions.forget(former)
        self._probes.after_exec(process, former)

    def _first_stop(self, thread: Thread) -> None:
        proc = thread.process
        if proc.forked_from is not None:
            parent, proc.forked_from = proc.forked_from, None
            self.actions.fork(parent, proc)
        self.actions.thread_seen(thread)

    # --- state ---------------------------------------------------------------------
    @property
    def probes(self) -> List[Probe]:
        """The probes armed by :meth:`probe`, in order."""
        return self._probes.probes

    @property
    def processes(self) -> Dict[int, Process]:
        return self.loop.processes

    @property
    def threads(self) -> Dict[int, Thread]:
        return self.loop.threads

    @property
    def foreign_exits(self) -> Dict[int, int]:
        """Exit statuses of children of the session's thread that ptprobe does not
        trace but reaped while it waited."""
        return self.loop.foreign_exits

    @property
    def main_pid(self) -> int:
        return self.lifecycle.main_pid

    @property
    def returncode(self) -> Optional[int]:
        """The program's exit status once it exited (minus the signal that killed it)."""
        return self.lifecycle.returncode

    @property
    def drops(self) -> int:
        """Records the program dropped because its ring was full (drop mode, or no
        tracer to drain it)."""
        return self.actions.drops

    @property
    def attached(self) -> bool:
        return self.lifecycle.attached

    # --- starting ----------------------------------------------------------------------
    def _start(self, argv: Sequence[str], env: Optional[Dict[str, str]]) -> None:
        proc = self.lifecycle.start(argv, env)
        # run the new image until the dynamic loader has mapped its libraries
        if not self._probes.watch_loader(proc.space):
            return
        self._probes.startup_pid = proc.pid
        self.loop.resume_world()
        try:
            while not self._probes.startup_reached and proc.pid in self.loop.processes:
                self.loop.step()
        finally:
            self._probes.startup_pid = 0
        if proc.pid in self.loop.processes:
            self.loop.stop_all()          # the loader's stop holds the world: stop the rest

    def _attach(self, pids: Sequence[int], tree: bool, strict: bool) -> None:
        for pid in pids:
            self._seize(pid, strict)
            if tree:
                self._seize_descendants(pid)
        if not self.lifecycle.roots:
            raise NoSuchProcessError(f"no process to attach to among {', '.join(map(str, pids))}",
                                     pids[0] if pids else 0)
        self.loop.stop_world()
        for proc in list(self.loop.processes.values()):
            proc.space.refresh_objects()        # (the loader is watched once a probe needs it)

    def _seize(self, pid: int, strict: bool) -> bool:
        """Seize process *pid*; True if it is traced now. Not *strict*: a process that
        is gone, or that ptprobe may not trace, is left out (the latter reported)."""
        if pid in self.loop.processes or (pid != os.getpid() and procfs.tracer_of(pid) == os.getpid()):
            return True            # already ours (a child forked since its parent was seized)
        try:
            self.lifecycle.seize(pid)
        except (NoSuchProcessError, TracePermissionError) as exc:
            if strict:
                raise
            if isinstance(exc, TracePermissionError):
                self.observer.notice(f"process {pid} left alone: {exc}")
            return False
        return True

    def _seize_descendants(self, pid: int) -> None:
        """Seize every process descending from *pid* now. Children forked by a traced
        process are traced from their start; listing again until nothing new shows
        catches those forked by a descendant before it was seized."""
        tried: Set[int] = {pid}
        while True:
            new = [p for p in procfs.process_tree(pid) if p not in tried]
            if not new:
                return
            for child in new:
                tried.add(child)
                self._seize(child, strict=False)

    @property
    def roots(self) -> List[int]:
        """The processes started or attached to (children they fork are traced too)."""
        return list(self.lifecycle.roots)

    @property
    def exit_statuses(self) -> Dict[int, int]:
        """pid -> exit status (minus the signal) of each traced process seen to exit."""
        return dict(self.lifecycle.exits)

    # --- probes ----------------------------------------------------------------------------
    def probe(self, spec: Union[str, ProbeSpec], handler: Optional[Handler] = None) -> Probe:
        """Arm a probe in every traced process; *handler(hit)* runs on each hit."""
        self._check_thread()
        return self._arm(self._probes.add(spec, handler))

    def _arm(self, probe: Probe) -> Probe:
        if not self.loop.processes:
            raise TracerError("the session has ended: nothing to probe")
        stopped = self.loop.world_stopped() if self.loop.holding == 0 else contextlib.nullcontext()
        with self.loop.interrupts_deferred(), stopped:
            armed = self._probes.arm_everywhere(probe, list(self.loop.processes.values()))
        if not armed:
            self._not_armed(probe)
        return probe

    def record(self, spec: Union[str, ProbeSpec], handler: Optional[Callable[[Record], None]] = None) -> Probe:
        """Arm a recording probe: the program records each hit itself (time,
        thread, arguments) with no stop, and *handler(record)* runs afterwards,
        from :meth:`wait`, with a read-only :class:`Record`, in the order the
        hits happened per thread. Sites that cannot record in the program (int3
        sites) stop, and their records are made at the stop, in the same order.
        A handler cannot change the program; use :meth:`probe` for that."""
        self._check_thread()
        probe = self._probes.add(spec, handler, mode="record")
        return self._arm(probe)

    def trace_calls(self, path: str, functions: Union[str, Sequence[str]] = "*",
                    exclude: Sequence[str] = ()) -> Probe:
        """Record every call of the functions of *path* (a file, or a mapped
        object's name) whose names match *functions* (a pattern, or several: any of
        them) and none of the patterns of *exclude*: each
        entry and exit, with its time and thread, written by the program itself
        (no stop), return addresses taken over in the program. The calls arrive
        in ``probe.calls`` (a :class:`~ptprobe.calltrace.CallTrace`) as
        :meth:`wait` runs; ``probe.unpatchable`` lists the matching functions
        without a patchable entry (5-byte NOP, or five 1-byte NOPs), which are not
        recorded. Every return address is given back at detach."""
        self._check_thread()
        if self.actions.calls is None:
            self.actions.calls = CallTrace()
        patterns = functions if isinstance(functions, str) else ",".join(functions)
        spec = ProbeSpec(f"calls:{path}:{patterns}", "calls", path, symbol=patterns, exclude=tuple(exclude))
        probe = self._probes.add(spec, None, mode="graph")
        probe.calls = self.actions.calls
        return self._arm(probe)

    def _not_armed(self, probe: Probe) -> None:
        """*probe* matched no mapped object: an error when its file is missing (and
        no process maps it deleted), else a notice that says what is mapped (it is
        armed when a matching object is loaded)."""
        spec = probe.spec
        if probe.missing is not None:
            self._probes.probes.remove(probe)
            raise probe.missing
        if spec.is_path:
            self.observer.notice(f"{probe.name}: {spec.path} is not loaded yet; the probe is armed when it is")
            return
        mapped = self.mapped_names()
        where = f"process {self.main_pid}" if len(self.loop.processes) == 1 else "the traced processes"
        on_disk = "" if probe.aliases else ", nor found on disk"
        self.observer.notice(f"{probe.name}: no object named {spec.path!r} is mapped in {where}{on_disk} "
                             f"(mapped: {', '.join(mapped[:12])}{', ...' if len(mapped) > 12 else ''}); "
                             "the probe is armed if one is loaded")

    def mapped_names(self) -> List[str]:
        """The names of the ELF objects mapped in the traced processes."""
        return sorted({os.path.basename(obj.path) for proc in self.loop.processes.values()
                       for obj in proc.space.objects.values()})

    # --- waiting -------------------------------------------------------------------------------
    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Run until the traced program exits; return its status like
        :attr:`subprocess.Popen.returncode` (exit code, or minus the signal).
        With *timeout* (seconds; main thread only), return None if it is
        still running then; the probes stay armed. Ctrl-C (KeyboardInterrupt)
        is raised once the loop is in a consistent state. In run mode after
        :meth:`detach`, it waits for the program, which runs on untraced."""
        self._check_thread()
        if self.returncode is None and self.attached:
            self._wait(timeout)
        elif self.returncode is None and self.mode == "run" and self.main_pid and not self.lifecycle.status_lost:
            self._wait_untraced(timeout)
        if self.returncode is None and self.lifecycle.status_lost:
            raise TracerError(f"the exit status of process {self.main_pid} was collected by another "
                              "waitpid() of this program")
        return self.returncode

    def _wait(self, timeout: Optional[float]) -> None:
        old = None
        if timeout is not None:
            if threading.current_thread() is not threading.main_thread():
                raise ValueError("wait(timeout=...) works only in the main thread")
            old = signal.signal(signal.SIGALRM, lambda *_: self.request_stop())
            signal.setitimer(signal.ITIMER_REAL, max(timeout, 0.001), 0.05)
        try:
            with self.loop.interrupts_deferred(stop=True):
                try:
                    tids = sorted(self.loop.threads, key=lambda tid: tid != self.main_pid)  # main thread first
                    if not self.actions.recording:
                        # (a session that reads records works while the program runs:
                        # sharing its CPU would slow both)
                        self.placement.engage(tids)
                    self.loop.resume_world()
                    self.loop.run(until=self._ended)
                finally:
                    self.placement.release()
                    self.placement.check()
                    self.actions.drain()
                    if not self.attached:
                        self.loop.close()
        finally:
            if timeout is not None:
                signal.setitimer(signal.ITIMER_REAL, 0, 0)
                signal.signal(signal.SIGALRM, old)
                self.loop.stop_requested = False      # (an alarm after the loop returned)

    def _ended(self) -> bool:
        """run: the program exited; attach: every process attached to exited."""
        if self.mode == "run":
            return self.returncode is not None
        exits = self.lifecycle.exits
        return all(pid in exits for pid in self.lifecycle.roots)

    def _wait_untraced(self, timeout: Optional[float]) -> None:
        """Run mode after a detach: the program runs on untraced; wait for its exit as
        :meth:`subprocess.Popen.wait` does (a signal handler that raises ends it)."""
        pid = self.main_pid
        if timeout is not None and not _exited(pid):
            _wait_for_exit(pid, timeout)
            if not _exited(pid):
                return
        status = self.loop.reap(pid)
        if status is None:
            self.lifecycle.status_lost = True
        elif self.returncode is None:
            self.lifecycle.returncode = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)

    def request_stop(self) -> None:
        """Make :meth:`wait` return soon; made while no wait() runs, it makes the
        next one return at once (the probes stay armed). Call it from the
        session's thread, or from a signal handler when the session runs in the
        main thread."""
        self.loop.request_stop()

    # --- detaching -------------------------------------------------------------------------------
    def detach(self) -> None:
        """Restore every site, then let every traced process go, running.

        What cannot be done (a site that cannot be restored, a thread that cannot
        be stopped) is reported to the observer; a thread left traced raises
        :class:`TracerError` once everything else is done."""
        self._check_thread()
        if not self.attached:
            return
        problems: List[str] = []
        left: List[str] = []
        with self.loop.interrupts_deferred():
            self.loop.hold()
            try:
                self.loop.stop_all()
                self.hits.drain_traps()
                self.actions.drain()
                self.actions.freeze(list(self.loop.threads.values()))
            except PtprobeError as exc:
                problems.append(f"cannot stop every thread: {exc}")
            self.filter_watch.check(list(self.loop.processes.values()))
            for proc in list(self.loop.processes.values()):
                if proc.exited:
                    continue
                if not proc.shares_memory:
                    try:
                        proc.space.refresh_objects()
                        self._probes.forget_unmapped(proc.space)
                    except PtprobeError:
                        pass
                    problems.extend(self._probes.restore(proc.space))
                    problems.extend(self.actions.restore(proc.space))
                    problems.extend(self.hits.returns.restore(proc.space))
                for thread in list(proc.threads.values()):
                    self._stop_straggler(thread)
                    self.hits.settle(thread)
                    problem = self.lifecycle.detach_thread(thread)
                    if problem:
                        left.append(problem)
            self.loop.threads.clear()
            self.lifecycle.attached = False
            self.loop.holding = 0
            self.loop.idle = None
            self.loop.close()
            self.placement.release()
        for text in problems + left:
            self.observer.notice(text)
        if left:
            raise TracerError(f"detach: {left[0]}" + (f" (and {len(left) - 1} more)" if len(left) > 1 else ""))

    def _stop_straggler(self, thread: Thread) -> None:
        """A thread the world stop missed: stop it alone before it is let go."""
        if thread.stopped or thread.exited:
            return
        try:
            linux.interrupt(thread.tid)
            status = self.loop.wait_thread(thread.tid)
        except (PtprobeError, ChildProcessError):
            return
        self.loop.dispatch(thread.tid, status)

    def close(self) -> None:
        """Detach (attach mode) or detach and wait for the program (run mode)."""
        if self.attached:
            self.detach()
        if self.mode == "run" and self.returncode is None and self.main_pid:
            self._wait_untraced(None)

    def kill(self) -> None:
        """Kill the traced program (run mode) and reap it."""
        self.lifecycle.kill()

    def _check_thread(self) -> None:
        if threading.get_ident() != self._owner:
            raise TracerError("a session must be used from the thread that created it")

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.mode == "run" and self.returncode is None:
            if self.attached:
                # the program must not run on after a failure: kill it while it is still held
                self._kill_program()
            # once detached, the program was let go on purpose: neither killed nor waited for
            return
        self.close()

    def _kill_program(self) -> None:
        try:
            self.kill()
        except PtprobeError:
            pass
        finally:
            try:
                self.detach()       # children still traced, if any
            except PtprobeError:
                pass
            if self.main_pid and self.returncode is None:
                self._kill_and_reap()

    def _kill_and_reap(self) -> None:
        """SIGKILL the program (run mode) and reap it, whatever is still traced of it."""
        try:
            os.kill(self.main_pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        self.loop.reap(self.main_pid)

def _wait_for_exit(pid: int, timeout: float) -> None:
    """Block until child *pid* has exited (not reaped) or *timeout* seconds passed."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not _exited(pid):
            time.sleep(0.01)
        return
    try:
        select.select([fd], [], [], max(timeout, 0))
    finally:
        os.close(fd)


def _exited(pid: int) -> bool:
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True




def run(argv: Sequence[str], *, env: Optional[Dict[str, str]] = None, **options) -> Session:
    """Start *argv* under tracing; returns a session whose program is stopped
    after the dynamic loader has mapped its libraries, before any of the
    program's own code (constructors included) has run.

    Options: ``slots`` ("return" or "seed"), ``seccomp`` (False: int3 only),
    ``max_trampoline_pages``, ``follow``, ``observer``, ``colocate`` (True or
    "hitting": share one CPU with the threads that hit probes often, and with a
    single-threaded program; "single": only with a single-threaded program;
    "all": with every thread; False: never; see :mod:`ptprobe.placement`).
    """
    session = Session(mode="run", **options)
    try:
        session._start(list(argv), env)
    except BaseException:
        if session.main_pid and session.returncode is None:
            session._kill_and_reap()
        raise
    return session


def attach(pid: Union[int, Sequence[int]], *, tree: bool = False, strict: bool = True, **options) -> Session:
    """Attach to the running process *pid* (all its threads), or to each of a
    list of processes; they stay stopped until :meth:`Session.wait`, which
    returns when all of them have exited (with the first one's status).

    ``tree=True`` attaches to every process descending from each of them too
    (a server's existing workers). ``strict=False`` leaves out a process that
    is gone or that ptprobe may not trace (the observer is told) instead of
    failing, unless none is left; descendants are always taken that way.

    Options: as :func:`run`, plus ``allow_no_new_privs`` (needed for jmp slots
    when the process lacks CAP_SYS_ADMIN).
    """
    pids = [pid] if isinstance(pid, int) else list(pid)
    session = Session(mode="attach", **options)
    try:
        session._attach(pids, tree, strict)
    except BaseException:
        session.detach() if session.attached else None
        raise
    return session
