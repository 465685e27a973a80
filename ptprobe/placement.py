"""CPU placement: where the tracer runs relative to the tracee.

A ptrace stop costs several times more when the tracer and the tracee sit on
different CPUs (each stop is a cross-CPU wake-up both ways). While the traced
program has a single thread, it cannot use more than one CPU anyway, so
:class:`Placement` pins the tracer thread and the tracee to the CPU the tracee
is on. As soon as a second thread or process appears, everything goes back to
the affinity it had; on detach too.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Set


def current_cpu(tid: int) -> Optional[int]:
    """The CPU *tid* last ran on (field 39 of /proc/TID/stat)."""
    try:
        with open(f"/proc/{tid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(fields[36])
    except (OSError, IndexError, ValueError):
        return None


class Placement:
    """Co-locates the tracer with a single-threaded tracee; undoes it on demand."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.cpu: Optional[int] = None
        self._tracer_mask: Optional[Set[int]] = None
        self._pinned: Dict[int, Set[int]] = {}       # tracee tid -> its own affinity

    @property
    def active(self) -> bool:
        return self.cpu is not None

    def engage(self, tid: int) -> None:
        """Pin the tracer and *tid* (the only traced thread) to *tid*'s CPU."""
        if not self.enabled or self.active:
            return
        cpu = current_cpu(tid)
        try:
            tracer_mask = os.sched_getaffinity(0)
            tracee_mask = os.sched_getaffinity(tid)
            if cpu is None or cpu not in tracer_mask or cpu not in tracee_mask or len(tracee_mask) == 1:
                return
            os.sched_setaffinity(tid, {cpu})
            self._pinned[tid] = tracee_mask
            os.sched_setaffinity(0, {cpu})
        except OSError:
            self.release()
            return
        self._tracer_mask = tracer_mask
        self.cpu = cpu

    def adopt(self, tid: int, parent: int) -> None:
        """A new thread or process of the tracee appeared: undo the pinning
        (the newcomer inherited it from *parent*, so give it the parent's own)."""
        if not self.active:
            return
        mask = self._pinned.get(parent)
        if mask is not None:
            self._pinned[tid] = mask
        self.release()

    def release(self) -> None:
        """Give every pinned thread, and the tracer, its own affinity back."""
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
