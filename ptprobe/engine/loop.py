"""The event loop: the only caller of ``waitpid``.

:class:`EventLoop` keeps the registry of traced threads and processes, waits
for one stop or exit at a time, decodes it (:mod:`~ptprobe.engine.events`) and
hands it to the handler subscribed for its type. A handler ends by calling
:meth:`EventLoop.done`, which resumes the thread unless the world is held.

Holding: while :attr:`EventLoop.holding` is non-zero no thread is resumed. Code
that must see every thread stopped (patching, detaching, stepping over an
instruction) uses ``with loop.world_stopped(): ...``, which gives the hold back
even when the body raises. A session that stays stopped between calls (after
``attach``, until ``wait``) uses :meth:`stop_world` and :meth:`resume_world`.

The hot path: when :attr:`fast` is set, every status goes to it first; it
handles the hits it can with the fewest system calls and returns False for
everything else, which is then decoded and dispatched.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import threading
from typing import Callable, Deque, Dict, Iterator, Optional, Tuple, Type

from .. import linux, procfs
from ..errors import NoSuchProcessError, PtprobeError
from ..tracee import Process, Thread
from .events import Event, GroupStop, OtherStop, SignalStop, STOP_SIGNALS, decode

Handler = Callable[[Event], None]
_IDLE_POLL_MS = 20          # how long the loop sleeps between idle calls at the most
#: blocking waits without a round of pending stops after a round that found none
_GATHER_SKIP = 7


class EventLoop:
    """Waits for events of the traced threads and dispatches them."""

    def __init__(self) -> None:
        self.threads: Dict[int, Thread] = {}
        self.processes: Dict[int, Process] = {}
        #: exit statuses of children of this thread that are not traced (reaped by us)
        self.foreign_exits: Dict[int, int] = {}
        self.holding = 0
        self.stop_requested = False
        #: the hot path: (tid, status) -> True if it handled the stop
        self.fast: Optional[Callable[[int, int], bool]] = None
        #: hooks: a stop of a tid not known yet (returns its Thread, or None to
        #: keep it for later); a stop of a process marked release_on_stop; no
        #: child left to wait for
        self.claim: Callable[[int, int], Optional[Thread]] = lambda tid, status: None
        self.release: Callable[[Process], None] = lambda process: None
        self.all_gone: Callable[[], None] = lambda: None
        #: the first stop of a thread (a new one, or one just seized)
        self.first_stop: Callable[[Thread], None] = lambda thread: None
        #: called when there is nothing to wait for right now; returns how much it did.
        #: While set, the loop does not block in waitpid but polls, and sleeps on
        #: SIGCHLD (a signalfd) between calls
        self.idle: Optional[Callable[[], int]] = None
        self._child_signals = -1
        # statuses taken but not handled yet: kept by wait_thread, or a round of step()
        self._backlog: Deque[Tuple[int, int]] = collections.deque()
        self._skip_gather = 0         # blocking waits left without a round (see step)
        self._handlers: Dict[Type, Handler] = {
            SignalStop: self._on_signal,
            GroupStop: self._on_group_stop,
            OtherStop: lambda event: self.done(event.thread),
        }

    def subscribe(self, kind: Type, handler: Handler) -> None:
        """Send events of class *kind* to *handler* (one handler per class)."""
        self._handlers[kind] = handler

    # --- waiting and dispatching ---------------------------------------------------
    def step(self) -> None:
        """Wait for one event and handle it.

        Fairness: ``waitpid`` reports the stops of several threads in an order of the
        kernel's (the newest tracee first), so a thread that stops again at once could
        be served over and over while others wait. When more than one thread is traced,
        a blocking wait is followed by a round that takes every stop pending then
        (WNOHANG), and these are handled, in that order, before anything is waited
        for again: every thread stopped at the start of a round is resumed in it.
        A single thread costs no extra call; when a round finds nothing pending (one
        thread hits, the others do not), the next _GATHER_SKIP blocking waits make
        none (a WNOHANG waitpid costs about a fifth of a hit), so a thread is passed
        over a few times at most."""
        if self._backlog:
            tid, status = self._backlog.popleft()
        else:
            try:
                if self.idle is None:
                    tid, status = linux.wait_any()
                else:
                    tid, status = linux.wait_any_nohang()
                    if not tid:
                        self._idle()
                        return
            except ChildProcessError:
                self.all_gone()
                return
            if len(self.threads) > 1:
                if self._skip_gather:
                    self._skip_gather -= 1
                elif not self._gather():
                    self._skip_gather = _GATHER_SKIP
        fast = self.fast
        if fast is not None and fast(tid, status):
            return
        self.dispatch(tid, status)

    def _idle(self) -> None:
        """Nothing to wait for: let the idle work run, and if it had nothing to do,
        sleep until a child's event (SIGCHLD) or a short timeout."""
        assert self.idle is not None
        if self.idle():
            return
        if self._child_signals < 0:
            self._child_signals = linux.child_signal_fd()
        found = linux.wait_child_signal(self._child_signals, _IDLE_POLL_MS)
        if found[0]:
            self._backlog.append(found)

    def close(self) -> None:
        """Give back what the idle polling took (its signalfd)."""
        if self._child_signals >= 0:
            os.close(self._child_signals)
            self._child_signals = -1

    def _gather(self) -> bool:
        """Keep, in order, every status already pending (one round, see :meth:`step`);
        True if there was any."""
        backlog = self._backlog
        nohang = linux.wait_any_nohang
        found = False
        while True:
            try:
                got, status = nohang()
            except ChildProcessError:
                return found
            if not got:
                return found
            backlog.append((got, status))
            found = True

    def dispatch(self, tid: int, status: int) -> None:
        """Handle one (tid, status) that ``waitpid`` returned."""
        thread = self.threads.get(tid)
        if thread is None:
            thread = self.claim(tid, status)
            if thread is None:
                return
        if os.WIFSTOPPED(status):
            thread.stopped = True
            if thread.process.release_on_stop:
                self.release(thread.process)
                return
            if thread.fresh:
                thread.fresh = False
                self.first_stop(thread)
        event = decode(thread, status)
        try:
            self._handlers[type(event)](event)
        except NoSuchProcessError as exc:
            if exc.pid == tid:
                # the thread was killed while its stop was handled: its exit comes next
                thread.stopped = False
                thread.in_hit = None
            else:
                # another process vanished meanwhile: this thread goes on
                thread.in_hit = None
                self.done(thread)

    def done(self, thread: Thread) -> None:
        """The thread's stop is handled: resume it, unless the world is held."""
        if self.holding == 0:
            thread.resume()

    def _on_signal(self, event: SignalStop) -> None:
        event.thread.pending_signal = event.signal
        self.done(event.thread)

    def _on_group_stop(self, event: GroupStop) -> None:
        thread = event.thread
        thread.interrupted = False
        thread.group_stop = event.signal in STOP_SIGNALS
        self.done(thread)

    def run(self, until: Callable[[], bool] = lambda: False) -> None:
        """Handle events until *until()* is true, :meth:`request_stop` is called
        (also before: a request made while the loop did not run is kept for the
        next run) or no traced thread is left. Returning uses the request up."""
        try:
            while self.threads and not self.stop_requested and not until():
                self.step()
        finally:
            self.stop_requested = False

    def request_stop(self) -> None:
        """Make :meth:`run` return soon (also from a signal handler): a running
        thread is interrupted, so that a blocking ``waitpid`` returns."""
        self.stop_requested = True
        for thread in list(self.threads.values()):
            if not thread.stopped and not thread.exited and not thread.interrupted:
                try:
                    linux.interrupt(thread.tid)
                    thread.interrupted = True
                except PtprobeError:
                    continue
                break

    # --- holding the world -------------------------------------------------------------
    def running(self) -> Iterator[Thread]:
        return (t for t in list(self.threads.values()) if not t.stopped and not t.exited)

    def wait_all_stopped(self) -> None:
        """Handle events until every traced thread is stopped (or gone).

        Before blocking, a thread that sits in a ptrace-stop whose status nobody
        reported to us (another ``waitpid`` of this program collected it) is
        recovered from its signal information, so that this never waits forever
        for a stop that already happened."""
        while any(not t.stopped and not t.exited for t in self.threads.values()):
            if self._backlog:
                tid, status = self._backlog.popleft()
            else:
                try:
                    tid, status = linux.wait_any_nohang()
                except ChildProcessError:
                    self.all_gone()
                    return
            if tid:
                self.dispatch(tid, status)
            elif not self._recover_lost_stops():
                self.step()

    def _recover_lost_stops(self) -> bool:
        """Dispatch a stop we never saw for each thread the kernel shows stopped by
        us while we believe it runs; True if there was any."""
        found = False
        for thread in self.running():
            if procfs.thread_state(thread.process.pid, thread.tid) != "t":
                continue
            tid, status = linux.wait_tid_nohang(thread.tid)
            if not tid:
                status = linux.lost_stop_status(thread.tid)
                if status is None:
                    continue
            self.dispatch(thread.tid, status)
            found = True
        return found

    def stop_all(self) -> None:
        """Stop every traced thread that runs (events that arrive meanwhile are
        handled); the caller holds the world."""
        for thread in self.running():
            # interrupted or not: an earlier PTRACE_INTERRUPT may have been used up
            # by a stop not reported as its own; a second one merges with a pending one
            try:
                linux.interrupt(thread.tid)
                thread.interrupted = True
            except NoSuchProcessError:
                thread.exited = True
        self.wait_all_stopped()

    def stop_world(self) -> None:
        """Hold, and stop every traced thread. Undo with :meth:`resume_world`;
        prefer :meth:`world_stopped`."""
        self.holding += 1
        try:
            self.stop_all()
        except BaseException:
            self.resume_world()
            raise

    def resume_world(self) -> None:
        """Give back one hold; at the last one, resume every stopped thread that is
        not in the middle of a hit."""
        self.holding = max(0, self.holding - 1)
        if self.holding:
            return
        for thread in list(self.threads.values()):
            if thread.stopped and thread.in_hit is None:
                thread.resume()

    @contextlib.contextmanager
    def world_stopped(self) -> Iterator[None]:
        """Every thread stopped for the body; the hold is given back whatever happens."""
        self.stop_world()
        try:
            yield
        finally:
            self.resume_world()

    def hold(self) -> None:
        """Hold without stopping anything: threads stop as their events come and
        stay stopped (undo with :meth:`resume_world`)."""
        self.holding += 1

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold for the body without stopping or resuming anyone: a thread whose
        stop is being handled stays stopped until its handler's :meth:`done`."""
        self.holding += 1
        try:
            yield
        finally:
            self.holding -= 1

    def wait_thread(self, tid: int) -> int:
        """The next wait status of thread *tid* alone (while it is single-stepped
        over one instruction or one remote syscall). The statuses of other
        threads that come meanwhile are kept, in order, for :meth:`step`: waiting
        on *tid* itself could wait forever for a thread-group leader whose group
        was killed, whose exit is reported only after the others are reaped."""
        while True:
            try:
                got, status = linux.wait_any()
            except ChildProcessError:
                raise NoSuchProcessError(f"thread {tid} is gone", tid) from None
            if got == tid:
                return status
            self._backlog.append((got, status))

    def reap(self, pid: int) -> Optional[int]:
        """Wait for the exit status of process *pid*, a child of this thread whose
        threads may still be traced (None if there is no such child left).

        Never waits on *pid* alone: the leader of a killed thread group is reported
        only after its other threads are reaped, and those may be traced by us. So
        this waits for any child and takes what comes: the kept statuses first, the
        exits of registered threads are dispatched, a thread still traced that stops
        is let go with its signal, and the exit of a child that is not traced goes to
        :attr:`foreign_exits`."""
        ours = {tid for proc in self.processes.values() for tid in proc.threads} | set(self.processes)
        while True:
            if self._backlog:
                got, status = self._backlog.popleft()
            else:
                try:
                    got, status = linux.wait_any()
                except ChildProcessError:
                    return None
            if got == pid and not os.WIFSTOPPED(status):
                thread = self.threads.get(got)
                if thread is not None:
                    self.dispatch(got, status)
                return status
            if got in self.threads:
                self.dispatch(got, status)
            elif os.WIFSTOPPED(status):
                ours.add(got)
                sig = os.WSTOPSIG(status) if status >> 16 == 0 else 0
                with contextlib.suppress(PtprobeError):
                    linux.detach(got, sig)
            elif got not in ours:
                self.foreign_exits[got] = status

    # --- Ctrl-C ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def interrupts_deferred(self, stop: bool = False) -> Iterator[None]:
        """Keep SIGINT from raising in the middle of a stop's bookkeeping (a lost
        stop would make a later detach wait forever): while the body runs, a
        SIGINT is noted (and, with *stop*, makes :meth:`run` return); afterwards
        the handler that was installed runs (by default it raises
        KeyboardInterrupt). Only the main thread receives SIGINT; elsewhere this
        does nothing."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = signal.getsignal(signal.SIGINT)
        if not callable(old):
            yield
            return
        caught = []

        def note(signum: int, frame: object) -> None:
            caught.append(frame)
            if stop:
                self.request_stop()

        signal.signal(signal.SIGINT, note)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, old)
        if caught:
            old(signal.SIGINT, caught[0])
