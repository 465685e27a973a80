"""Wait statuses of traced threads, decoded into typed event values.

:func:`decode` turns what ``waitpid`` returned for a known thread into one of
the event classes below; the loop dispatches on the class. The two hit stops
also have their raw status values (:data:`SLOT_STOP`, :data:`TRAP_STOP`), which
the hot path compares with before decoding anything.
"""

from __future__ import annotations

import os
import signal
from typing import NamedTuple, Union

from .. import linux
from ..tracee import Thread

#: A seccomp trace stop (a slot's syscall) and a SIGTRAP signal stop, as raw statuses.
SLOT_STOP = (linux.PTRACE_EVENT_SECCOMP << 16) | (signal.SIGTRAP << 8) | 0x7F
TRAP_STOP = (signal.SIGTRAP << 8) | 0x7F

STOP_SIGNALS = (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)


class Exited(NamedTuple):
    """The thread is gone: it exited, or its process was killed (raw *status*)."""

    thread: Thread
    status: int


class SlotStop(NamedTuple):
    """A seccomp trace stop: a slot's syscall (or someone else's use of its number)."""

    thread: Thread


class Trap(NamedTuple):
    """A SIGTRAP signal stop: an int3 of ours, or a trap that belongs to the program."""

    thread: Thread


class SignalStop(NamedTuple):
    """A signal on its way to the thread (delivered when it is resumed)."""

    thread: Thread
    signal: int


class GroupStop(NamedTuple):
    """A group-stop (SIGSTOP and friends), or an interrupt's stop when *signal*
    is not a stop signal."""

    thread: Thread
    signal: int


class NewChild(NamedTuple):
    """A clone, fork or vfork event; *kind* is the PTRACE_EVENT_* number."""

    thread: Thread
    kind: int


class Exec(NamedTuple):
    """An exec event: the process runs a new image."""

    thread: Thread


class OtherStop(NamedTuple):
    """Any other ptrace event stop (nothing to do but resume)."""

    thread: Thread
    event: int


Event = Union[Exited, SlotStop, Trap, SignalStop, GroupStop, NewChild, Exec, OtherStop]
_CHILD_EVENTS = (linux.PTRACE_EVENT_CLONE, linux.PTRACE_EVENT_FORK, linux.PTRACE_EVENT_VFORK)


def decode(thread: Thread, status: int) -> Event:
    """The event that *status* (from ``waitpid``) reports for *thread*."""
    if status == SLOT_STOP:
        return SlotStop(thread)
    if status == TRAP_STOP:
        return Trap(thread)
    if not os.WIFSTOPPED(status):
        return Exited(thread, status)
    sig = os.WSTOPSIG(status)
    event = status >> 16
    if event == 0:
        return SignalStop(thread, sig)
    if event == linux.PTRACE_EVENT_SECCOMP:
        return SlotStop(thread)
    if event == linux.PTRACE_EVENT_STOP:
        return GroupStop(thread, sig)
    if event in _CHILD_EVENTS:
        return NewChild(thread, event)
    if event == linux.PTRACE_EVENT_EXEC:
        return Exec(thread)
    return OtherStop(thread, event)
