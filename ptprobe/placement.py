"""CPU placement: where the tracer runs relative to the tracee.

A ptrace stop costs several times more when the tracer and the tracee sit on
different CPUs (each stop is a cross-CPU wake-up both ways; on a VM, waking an
idle vCPU is slow). Pinning the tracer alone does not help: the tracee must
be pinned with it. So :class:`Placement` pins the tracer thread and some of
the program's threads to one CPU, in one of these modes:

``hitting`` (the default)
    the threads that hit probes often: every :data:`REVIEW_PERIOD` seconds a
    helper thread looks at each thread's count of probe stops
    (:attr:`Placement.counts`); a thread that stopped at least
    :data:`PIN_RATE` times a second is pinned to the tracer's CPU (the first
    one chooses it: the CPU it is on), and a pinned thread that stops fewer
    than :data:`UNPIN_RATE` times a second gets its own affinity back, as does
    the tracer once no thread is pinned. Threads that do not hit probes keep
    their parallelism; a thread created by a pinned one gets its own affinity
    back at once. A program with a single thread is pinned with the tracer
    from the start, as in ``single``, until it starts another (then only if
    it hits often). Threads found hitting at one wait are pinned at once at
    the next.
``single``
    only while the traced program has a single thread, which cannot use more
    than one CPU anyway. As soon as a second thread or process appears,
    everything goes back to the affinity it had.
``all`` (opt-in)
    every traced thread, new ones included. A multi-threaded program then runs
    on one CPU while it is traced: hits are several times cheaper, and the
    program loses its parallelism. Threads the program pinned itself to a CPU
    set without that CPU are left alone.

Every affinity changed is restored on :meth:`release` (on detach, at the end
of each wait).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable, Dict, List, Optional, Set, Tuple

from .procfs import current_cpu

MODES = ("hitting", "single", "all", "off")
#: seconds between two looks at the threads' stop counts (``hitting``)
REVIEW_PERIOD = 0.05
#: probe stops per second from which a thread is pinned with the tracer: a thread
#: that stops this often spends a twentieth of its time or more in cross-CPU stops
#: (about 25 us each, against 3-5 us on one CPU)
PIN_RATE = 2000
#: below this many stops per second a pinned thread gets its own affinity back
UNPIN_RATE = 500


class Placement:
    """Co-locates the tracer with the tracee's threads; undoes it on demand.

    In ``hitting`` mode a helper thread (started by :meth:`engage`, stopped by
    :meth:`release`) reviews the stop counts; every change of the pinning goes
    through one lock. The helper makes no ptrace request: affinities can be set
    from any thread."""

    def __init__(self, mode: str = "hitting") -> None:
        if mode not in MODES:
            raise ValueError(f"placement mode must be one of {', '.join(MODES)}")
        self.mode = mode
        self.cpu: Optional[int] = None
        #: (tid, probe stops so far) of every traced thread (``hitting``; set by the session)
        self.counts: Callable[[], List[Tuple[int, int]]] = list
        self._tracer = 0                             # the tracer thread's tid (the session's)
        self._tracer_mask: Optional[Set[int]] = None
        self._pinned: Dict[int, Set[int]] = {}       # tracee tid -> its own affinity
        # after a release: what was pinned then, for a thread or process created while
        # it was, whose creation is seen only now (it inherited the pinning)
        self._former: Dict[int, Set[int]] = {}
        self._former_cpu: Optional[int] = None
        self._lock = threading.Lock()
        self._hot: Set[int] = set()                 # hitting at the last review: pinned at the next engage
        self._left: Set[int] = set()                # let go or gone: never pinned again (a review may lag)
        self._reviewer: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._failure: Optional[BaseException] = None

    @property
    def active(self) -> bool:
        return self.cpu is not None

    @property
    def pinned(self) -> Set[int]:
        """The traced threads whose affinity is changed now."""
        with self._lock:
            return set(self._pinned)

    def engage(self, tids: "list[int]") -> None:
        """Pin the tracer and the traced threads *tids* (the first one's CPU is
        chosen) as the mode allows; in ``hitting`` mode, start reviewing."""
        if self.mode == "off" or not tids:
            return
        self._tracer = threading.get_native_id()
        self._left.clear()
        if self.mode == "hitting":
            self._start_reviewer()          # (before the tracer is pinned: it keeps its affinity)
            first = tids if len(tids) == 1 else [tid for tid in tids if tid in self._hot]
        elif self.mode == "single" and len(tids) != 1:
            return
        else:
            first = tids
        with self._lock:
            if self.active or not first:
                return
            self._former.clear()
            self._former_cpu = None
            self._confine(first)

    def _confine(self, tids: List[int]) -> None:
        """Pin the tracer and *tids* to the CPU the first one is on (lock held)."""
        cpu = current_cpu(tids[0])
        try:
            tracer_mask = os.sched_getaffinity(self._tracer)
            if cpu is None or cpu not in tracer_mask:
                return
            confined = [self._pin(tid, cpu) for tid in tids]
            if not any(confined):
                return
            os.sched_setaffinity(self._tracer, {cpu})
        except OSError:
            self._restore()
            return
        self._tracer_mask = tracer_mask
        self.cpu = cpu

    def _pin(self, tid: int, cpu: int) -> bool:
        """Confine *tid* to *cpu* if it may run there; True if it now runs only there."""
        try:
            mask = os.sched_getaffinity(tid)
            if cpu not in mask:
                return False
            if len(mask) > 1:
                os.sched_setaffinity(tid, {cpu})
                self._pinned[tid] = mask
            return True     # (a thread pinned there by the program itself stays untouched)
        except OSError:
            return False    # gone meanwhile: nothing to restore

    # --- hitting: the review -------------------------------------------------------------
    def _start_reviewer(self) -> None:
        if self._reviewer is not None:
            return
        self._stop.clear()
        self._reviewer = threading.Thread(target=self._review_loop, name="ptprobe-placement", daemon=True)
        self._reviewer.start()

    def _review_loop(self) -> None:
        try:
            seen = dict(self.counts())
            since = time.monotonic()
            while not self._stop.wait(REVIEW_PERIOD):
                now = time.monotonic()
                counts = self.counts()
                self.review({tid: (n - seen.get(tid, n)) / (now - since) for tid, n in counts})
                seen = dict(counts)
                since = now
        except BaseException as exc:  # noqa: BLE001 - handed to the session's thread (check())
            self._failure = exc

    def review(self, rates: Dict[int, float]) -> None:
        """Pin the threads that stop at least :data:`PIN_RATE` times a second
        (*rates*: stops per second of every traced thread), give the pinned ones
        that stop fewer than :data:`UNPIN_RATE` times their own affinity back.
        The only thread of a program stays pinned."""
        with self._lock:
            if self._stop.is_set():
                return
            wanted = {tid for tid, rate in rates.items() if tid not in self._left and
                      (rate >= PIN_RATE or (tid in self._pinned and rate >= UNPIN_RATE))}
            if len(rates) == 1:
                wanted |= set(self._pinned) & set(rates)
            self._hot = wanted
            for tid in [tid for tid in self._pinned if tid not in wanted]:
                self._unpin(tid)
            new = sorted((tid for tid in wanted if tid not in self._pinned), key=lambda tid: -rates[tid])
            if new and self.cpu is None:
                self._confine(new)
            elif new and self.cpu is not None:
                for tid in new:
                    self._pin(tid, self.cpu)
            if not self._pinned and self.cpu is not None:
                self._restore()           # nothing pinned: the tracer gets its own affinity back

    def check(self) -> None:
        """Raise what went wrong in the helper thread, if anything did."""
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    # --- the program's threads come and go ----------------------------------------------------
    def adopt(self, tid: int, parent: int) -> None:
        """A new thread or process of the tracee appeared; it inherited the
        pinning from *parent*, so its own affinity is the parent's own. In
        ``single`` mode this ends the pinning; in ``hitting`` mode the new one
        gets its own affinity back (until it is found hitting)."""
        with self._lock:
            if not self.active:
                self._adopt_late(tid, parent)
                return
            mask = self._pinned.get(parent)
            if self.mode == "hitting":
                if mask is not None:
                    self._give_back(tid, mask, self.cpu)
                    if parent not in self._hot:
                        # pinned as the program's only thread, not for its hits
                        self._unpin(parent)
                        if not self._pinned:
                            self._restore()
                return
            if mask is not None:
                self._pinned[tid] = mask
            if self.mode == "single":
                self._restore()

    def _adopt_late(self, tid: int, parent: int) -> None:
        """A child made while *parent* was pinned, seen after the release: it still
        has the pinning it inherited; give it the parent's own affinity."""
        mask = self._former.get(parent)
        if mask is None or self._former_cpu is None:
            return
        self._former[tid] = mask
        self._give_back(tid, mask, self._former_cpu)

    @staticmethod
    def _give_back(tid: int, mask: Set[int], cpu: Optional[int]) -> None:
        """*tid* inherited the pinning to *cpu*: give it *mask* (unless it changed
        its affinity itself)."""
        try:
            if os.sched_getaffinity(tid) == {cpu}:
                os.sched_setaffinity(tid, mask)
        except OSError:
            pass

    def unpin(self, tid: int) -> None:
        """Give *tid* its own affinity back now (it is about to be let go)."""
        with self._lock:
            self._left.add(tid)
            self._hot.discard(tid)
            self._unpin(tid)

    def _unpin(self, tid: int) -> None:
        mask = self._pinned.pop(tid, None)
        if mask is not None:
            try:
                os.sched_setaffinity(tid, mask)
            except OSError:
                pass

    def moved(self, old: int, new: int) -> None:
        """The thread *old* goes on as *new* (exec by a non-leader thread)."""
        with self._lock:
            for table in (self._pinned, self._former):
                table.pop(new, None)
                if old in table:
                    table[new] = table.pop(old)

    def forget(self, tid: int) -> None:
        """*tid* is gone: nothing to restore for it."""
        with self._lock:
            self._pinned.pop(tid, None)
            self._former.pop(tid, None)
            self._hot.discard(tid)
            self._left.add(tid)

    def release(self) -> None:
        """Stop reviewing; give every pinned thread, and the tracer, its own affinity back."""
        reviewer = self._reviewer
        if reviewer is not None:
            self._stop.set()
            if reviewer is not threading.current_thread():
                reviewer.join()
            self._reviewer = None
        with self._lock:
            self._restore()

    def _restore(self) -> None:
        """Every affinity changed back (lock held)."""
        if self._pinned:
            self._former = dict(self._pinned)
            self._former_cpu = self.cpu
        for tid, mask in self._pinned.items():
            try:
                os.sched_setaffinity(tid, mask)
            except OSError:
                pass
        self._pinned.clear()
        if self._tracer_mask is not None:
            try:
                os.sched_setaffinity(self._tracer, self._tracer_mask)
            except OSError:
                pass
        self._tracer_mask = None
        self.cpu = None
