"""Pending returns: the frames whose return address a return probe replaced.

The tracer's side of return probes (docs/design.md, "Return probes"): for each
thread of one address space, the calls it entered through a return probe and
has not returned from. A :class:`PendingReturn` is keyed by its *slot*, the
stack word that held the return address (the rsp at the function's entry). Two
live calls of one thread cannot share a slot, so a return is matched to its call
by the exact slot, whatever stack the thread runs on (signal stacks,
coroutines); a call entered at a slot that already has a pending call replaces
it (that call was abandoned: longjmp, an exception), unless the slot still
holds the trampoline's address, which makes the new call a tail call of the
old one: both return at once (:attr:`PendingReturn.outer`).

Calls abandoned without a return stay here until their slot is reused or
:meth:`ShadowStacks.prune` drops them. Pure bookkeeping: no I/O, no tracee.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

__all__ = ["PendingReturn", "ShadowStacks"]


class PendingReturn:
    """One call whose return address was replaced.

    ``tid``: the thread; ``slot``: where the return address was (the entry
    rsp); ``return_address``: the original one (the trampoline's own address for
    a tail call, whose ``outer`` call holds the real one); ``entry_ns``: the
    entry's CLOCK_MONOTONIC time; ``site``: the entry site; ``probes``: the
    return probes at the entry; ``entry_args``: the entry's arguments, or None
    when no return probe had a handler then.
    """

    __slots__ = ("tid", "slot", "return_address", "entry_ns", "site", "probes", "entry_args", "outer")

    def __init__(self, tid: int, slot: int, return_address: int, entry_ns: int, site: Any,
                 probes: Tuple[Any, ...], entry_args: Optional[Tuple[int, ...]] = None,
                 outer: Optional["PendingReturn"] = None) -> None:
        self.tid = tid
        self.slot = slot
        self.return_address = return_address
        self.entry_ns = entry_ns
        self.site = site
        self.probes = probes
        self.entry_args = entry_args
        self.outer = outer

    def chain(self) -> List["PendingReturn"]:
        """This call and the calls it is a tail call of, innermost first."""
        out = [self]
        outer = self.outer
        while outer is not None:
            out.append(outer)
            outer = outer.outer
        return out

    @property
    def original(self) -> int:
        """The address the thread really returns to (the outermost call's)."""
        return self.chain()[-1].return_address

    def __repr__(self) -> str:
        return (f"<PendingReturn tid={self.tid} slot={self.slot:#x} -> {self.return_address:#x}"
                f"{' (tail call)' if self.outer else ''}>")


class ShadowStacks:
    """The pending returns of one address space, per thread.

    A fork's copy (:meth:`fork`) keeps every frame of the original, under no
    thread: the child's thread runs on a copy of the forking thread's stack, so
    its returns find their frames by slot there (:attr:`inherited`).
    """

    def __init__(self) -> None:
        self._threads: Dict[int, Dict[int, PendingReturn]] = {}
        #: frames copied by fork, by slot (any thread of the child may return through them)
        self.inherited: Dict[int, PendingReturn] = {}
        self.count = 0
        #: prune when :attr:`count` passes this (the engine doubles it after each prune)
        self.prune_at = 64

    def push(self, frame: PendingReturn) -> Optional[PendingReturn]:
        """Remember *frame*; return the frame it replaces at its slot (an abandoned
        call, or, when the caller made *frame* its ``outer``, the call it tail-calls)."""
        frames = self._threads.get(frame.tid)
        if frames is None:
            frames = self._threads[frame.tid] = {}
        old = frames.get(frame.slot)
        if old is None:
            old = self.inherited.pop(frame.slot, None)     # moved under the thread: same count
            if old is None:
                self.count += 1
        frames[frame.slot] = frame
        return old

    def find(self, tid: int, slot: int) -> Optional[PendingReturn]:
        """The pending call of *tid* at *slot* (its own, else one inherited by fork)."""
        frames = self._threads.get(tid)
        frame = frames.get(slot) if frames is not None else None
        return frame if frame is not None else self.inherited.get(slot)

    def pop(self, tid: int, slot: int) -> Optional[PendingReturn]:
        """Remove and return what :meth:`find` would return."""
        frames = self._threads.get(tid)
        frame = frames.pop(slot, None) if frames is not None else None
        if frame is None:
            frame = self.inherited.pop(slot, None)
        if frame is not None:
            self.count -= 1
        return frame

    def __iter__(self) -> Iterator[PendingReturn]:
        """Every pending frame (the newest of each slot; older ones through ``outer``)."""
        for frames in list(self._threads.values()):
            yield from list(frames.values())
        yield from list(self.inherited.values())

    def __len__(self) -> int:
        return self.count

    def threads(self) -> List[int]:
        return list(self._threads)

    def drop_thread(self, tid: int) -> List[PendingReturn]:
        """Forget every frame of *tid* (a thread that is gone); returns them."""
        frames = self._threads.pop(tid, {})
        self.count -= len(frames)
        return list(frames.values())

    def discard(self, frames: Iterable[PendingReturn]) -> None:
        """Forget *frames* (abandoned calls)."""
        for frame in frames:
            own = self._threads.get(frame.tid)
            if own is not None and own.get(frame.slot) is frame:
                del own[frame.slot]
                self.count -= 1
            elif self.inherited.get(frame.slot) is frame:
                del self.inherited[frame.slot]
                self.count -= 1

    def clear(self) -> None:
        self._threads.clear()
        self.inherited.clear()
        self.count = 0

    def fork(self) -> "ShadowStacks":
        """The frames of a fork's copy: every frame here, inherited by slot."""
        new = ShadowStacks()
        for frame in self:
            new.inherited[frame.slot] = frame
        new.count = len(new.inherited)
        return new

    def translator(self, tid: int, trampoline: int) -> Callable[[int, int], int]:
        """A ``translate_return`` for :meth:`ptprobe.unwind.Unwinder.unwind` of
        thread *tid*: a return address equal to *trampoline*, read at ``cfa - 8``,
        is the original address of the call pending there."""
        def translate(address: int, cfa: int) -> int:
            if address != trampoline:
                return address
            frame = self.find(tid, cfa - 8)
            return address if frame is None else frame.original
        return translate
