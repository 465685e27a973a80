"""CPU placement: where the tracer runs relative to the tracee.

A ptrace stop costs several times more when the tracer and the tracee sit on
different CPUs (each stop is a cross-CPU wake-up both ways; on a VM, waking an
idle vCPU is slow). Pinning the tracer alone does not help: the tracee must
be pinned with it. So :class:`Placement` pins the tracer thread and the
program's threads to one CPU, the one the program is on, in one of two modes:

``single`` (the default)
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
from typing import Dict, Optional, Set

from .procfs import current_cpu

MODES = ("single", "all", "off")


class Placement:
    """Co-locates the tracer with the tracee's threads; undoes it on demand."""

    def __init__(self, mode: str = "single") -> None:
        if mode not in MODES:
            raise ValueError(f"placement mode must be one of {', '.join(MODES)}")
        self.mode = mode
        self.cpu: Optional[int] = None
        self._tracer_mask: Optional[Set[int]] = None
        self._pinned: Dict[int, Set[int]] = {}       # tracee tid -> its own affinity
        # after a release: what was pinned then, for a thread or process created while
        # it was, whose creation is seen only now (it inherited the pinning)
        self._former: Dict[int, Set[int]] = {}
        self._former_cpu: Optional[int] = None

    @property
    def active(self) -> bool:
        return self.cpu is not None

    def engage(self, tids: "list[int]") -> None:
        """Pin the tracer and the traced threads *tids* (the first one's CPU is
        chosen) as the mode allows."""
        if self.mode == "off" or self.active or not tids:
            return
        if self.mode == "single" and len(tids) != 1:
            return
        self._former.clear()
        self._former_cpu = None
        cpu = current_cpu(tids[0])
        try:
            tracer_mask = os.sched_getaffinity(0)
            if cpu is None or cpu not in tracer_mask:
                return
            confined = [self._pin(tid, cpu) for tid in tids]
            if not any(confined):
                return
            os.sched_setaffinity(0, {cpu})
        except OSError:
            self.release()
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

    def adopt(self, tid: int, parent: int) -> None:
        """A new thread or process of the tracee appeared; it inherited the
        pinning from *parent*, so its own affinity is the parent's own. In
        ``single`` mode this ends the pinning."""
        if not self.active:
            self._adopt_late(tid, parent)
            return
        mask = self._pinned.get(parent)
        if mask is not None:
            self._pinned[tid] = mask
        if self.mode == "single":
            self.release()

    def _adopt_late(self, tid: int, parent: int) -> None:
        """A child made while *parent* was pinned, seen after the release: it still
        has the pinning it inherited; give it the parent's own affinity."""
        mask = self._former.get(parent)
        if mask is None or self._former_cpu is None:
            return
        self._former[tid] = mask
        try:
            if os.sched_getaffinity(tid) == {self._former_cpu}:
                os.sched_setaffinity(tid, mask)
        except OSError:
            pass

    def unpin(self, tid: int) -> None:
        """Give *tid* its own affinity back now (it is about to be let go)."""
        mask = self._pinned.pop(tid, None)
        if mask is not None:
            try:
                os.sched_setaffinity(tid, mask)
            except OSError:
                pass

    def moved(self, old: int, new: int) -> None:
        """The thread *old* goes on as *new* (exec by a non-leader thread)."""
        for table in (self._pinned, self._former):
            table.pop(new, None)
            if old in table:
                table[new] = table.pop(old)

    def forget(self, tid: int) -> None:
        """*tid* is gone: nothing to restore for it."""
        self._pinned.pop(tid, None)
        self._former.pop(tid, None)

    def release(self) -> None:
        """Give every pinned thread, and the tracer, its own affinity back."""
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
                os.sched_setaffinity(0, self._tracer_mask)
            except OSError:
                pass
        self._tracer_mask = None
        self.cpu = None
