"""CPU placement: where the tracer runs relative to the tracee.

A ptrace stop costs about ten times more when the tracer and the tracee sit
on different CPUs: every stop is a cross-CPU wake-up both ways, and on a VM a
wake-up of an idle vCPU is slow. Pinning the tracer thread alone to one CPU is
enough to fix it: the scheduler then wakes each stopped thread where its
waker, the tracer, runs, so the hitting threads come to the tracer's CPU by
themselves, one or many. The program's own affinity is never changed.

:class:`Placement` pins the tracer thread to the CPU the program's main thread
last ran on (if the program may run there at all) and gives the tracer its
own affinity back on :meth:`release`.
"""

from __future__ import annotations

import os
from typing import Optional, Set


def current_cpu(tid: int) -> Optional[int]:
    """The CPU *tid* last ran on (field 39 of /proc/TID/stat)."""
    try:
        with open(f"/proc/{tid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(fields[36])
    except (OSError, IndexError, ValueError):
        return None


class Placement:
    """Pins the tracer thread next to the tracee; undoes it on demand."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.cpu: Optional[int] = None
        self._tracer_mask: Optional[Set[int]] = None

    @property
    def active(self) -> bool:
        return self.cpu is not None

    def engage(self, tid: int) -> None:
        """Pin the calling (tracer) thread to the CPU *tid* is on, if both may run there."""
        if not self.enabled or self.active:
            return
        cpu = current_cpu(tid)
        try:
            tracer_mask = os.sched_getaffinity(0)
            tracee_mask = os.sched_getaffinity(tid)
            if cpu is None or cpu not in tracer_mask or cpu not in tracee_mask or len(tracer_mask) == 1:
                return
            os.sched_setaffinity(0, {cpu})
        except OSError:
            return
        self._tracer_mask = tracer_mask
        self.cpu = cpu

    def release(self) -> None:
        """Give the tracer thread its own affinity back."""
        if self._tracer_mask is not None:
            try:
                os.sched_setaffinity(0, self._tracer_mask)
            except OSError:
                pass
        self._tracer_mask = None
        self.cpu = None
