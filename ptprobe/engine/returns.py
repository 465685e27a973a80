"""Return probes in the engine: taking over return addresses at entry stops, and
the return trampoline's stop.

:class:`Returns` is called by :class:`~.hits.Hits`: at the entry stop of a site
that return probes watch (:meth:`Returns.entered`, and on the hot path
:meth:`Returns.entered_fast`) it reads the return address at the program's
rsp, remembers the call in the address space's
:class:`~ptprobe.retstack.ShadowStacks` and writes the return trampoline's
address in its place; at the trampoline's stop (:meth:`Returns.returned`,
:meth:`Returns.returned_fast`) it finds the call by its slot, runs the return
probes' handlers with a :class:`~ptprobe.hit.ReturnHit`, counts the duration
and writes the original return address into the slot, where the trampoline's
``ret`` takes it. :meth:`Returns.restore` writes every return address still
replaced back (detach, a child let go). See ``docs/design.md``, "Return probes".
"""

from __future__ import annotations

import signal
import time
from typing import Callable, Dict, List, Optional, Protocol, Set, Tuple

from .. import arch, linux
from ..errors import FaultError, NoSuchProcessError, PtprobeError, TracerError
from ..hit import ArgumentSource, Hit, Regs, ReturnHit
from ..latency import Histogram
from ..patching import Site
from ..retstack import PendingReturn, ShadowStacks
from ..tracee import AddressSpace, Thread
from .loop import EventLoop

ErrorReport = Callable[[object, Hit, BaseException], None]
_READ_SPAN = 1 << 16            # bytes of stack read at once when checking slots


class ReturnProbe(ArgumentSource, Protocol):
    """What the engine needs of a return probe (:class:`ptprobe.Probe` is one)."""

    hits: int
    errors: int
    #: durations (ns) per function name
    latency: Dict[str, Histogram]

    @property
    def handler(self) -> Optional[Callable[[Hit], None]]: ...


def shadow_stack_enabled(status: Dict[str, str]) -> bool:
    """Whether a thread whose ``/proc/.../status`` is *status* runs with a CET
    shadow stack (``x86_Thread_features: shstk``): a replaced return address
    would be fatal to it."""
    return "shstk" in status.get("x86_Thread_features", "").split()


def check_shadow_stack(pid: int, status: Dict[str, str]) -> None:
    """Refuse return probes in process *pid* if it has a shadow stack."""
    if shadow_stack_enabled(status):
        raise TracerError(f"process {pid} runs with a CET shadow stack (x86_Thread_features: shstk): "
                          "a return probe would make it crash at the probed function's return; refused")


class Returns:
    """Return addresses taken over at entries and given back at returns."""

    def __init__(self, loop: EventLoop, *, on_handler_error: ErrorReport) -> None:
        self.loop = loop
        self.on_handler_error = on_handler_error
        #: what the user should know (set by the session to its observer's notice)
        self.notice: Callable[[str], None] = lambda text: None

    # --- entries ------------------------------------------------------------------
    def entered_fast(self, thread: Thread, site: Site, rsp: int) -> None:
        """An entry stop on the hot path (no return probe of *site* has a handler):
        *rsp* is the program's."""
        self._enter(thread, site, rsp, time.monotonic_ns(), None)

    def entered(self, thread: Thread, site: Site, regs: Regs, now: int) -> None:
        """An entry stop after the site's handlers ran, the program as *regs* shows
        it; the entry's arguments are kept when a return probe has a handler."""
        args: Optional[Tuple[int, ...]] = None
        if any(probe.handler is not None for probe in site.returns):
            args = tuple(regs.get(name) for name in arch.ARGUMENT_REGISTERS)
        self._enter(thread, site, regs.get("rsp"), now, args)

    def _enter(self, thread: Thread, site: Site, rsp: int, now: int, args: Optional[Tuple[int, ...]]) -> None:
        space = thread.process.space
        trampoline = space.patcher.trampoline
        if trampoline is None:
            return
        address = trampoline[0]
        stacks = space.returns
        mem = space.mem
        try:
            original = mem.read_u64(rsp)
            outer: Optional[PendingReturn] = None
            if original == address:
                # entered by a jump from a call whose return address is ours: a
                # tail call, which returns with it
                outer = stacks.find(thread.tid, rsp)
                if outer is None:
                    return
            else:
                mem.write(rsp, address.to_bytes(8, "little"))
        except FaultError:
            return              # no stack at rsp: nothing to take over
        stacks.push(PendingReturn(thread.tid, rsp, original, now, site, tuple(site.returns), args, outer))
        if stacks.count > stacks.prune_at:
            self.prune(space)

    # --- returns --------------------------------------------------------------------
    def returned_fast(self, thread: Thread) -> bool:
        """The trampoline's stop on the hot path: if no probe of the call has a
        handler, give the return address back, count, and continue the thread.
        False leaves the stop to :meth:`returned` (nothing changed)."""
        tid = thread.tid
        space = thread.process.space
        trampoline = space.patcher.trampoline
        if trampoline is None:
            return False
        slot = linux.get_rsp(tid) + trampoline[1].slot_offset
        stacks = space.returns
        frame = stacks.find(tid, slot)
        if frame is None:
            return False
        chain = frame.chain()
        for call in chain:
            for probe in call.probes:
                if probe.handler is not None:
                    return False
        now = time.monotonic_ns()
        space.mem.write(slot, chain[-1].return_address.to_bytes(8, "little"))
        stacks.pop(tid, slot)
        for call in chain:
            for probe in call.probes:
                _account(probe, call, now)
        try:
            linux.cont(tid)
        except NoSuchProcessError:
            thread.exited = True
        return True

    def returned(self, thread: Thread, raw: linux.Registers) -> None:
        """The trampoline's stop: run the handlers of the call's return probes,
        then let the thread return where the call came from (or where a handler
        moved it)."""
        tid = thread.tid
        space = thread.process.space
        patcher = space.patcher
        if patcher.trampoline is None:          # pragma: no cover - the stop matched it
            self.loop.done(thread)
            return
        now = time.monotonic_ns()
        form = patcher.trampoline[1]
        slot = raw.rsp + form.slot_offset
        frame = space.returns.pop(tid, slot)
        if frame is None:
            self.notice(f"thread {tid} of process {thread.process.pid} came back through the return trampoline "
                        f"from a call ptprobe does not know (return address slot {slot:#x}): it cannot go on, "
                        "SIGSEGV delivered")
            thread.pending_signal = signal.SIGSEGV
            self.loop.done(thread)
            return
        chain = frame.chain()
        mem = space.mem
        regs = Regs(raw, {"rip": chain[-1].return_address, "rsp": slot + 8}, tid, (form.saved, 0, mem))
        thread.in_hit = frame
        pid = thread.process.pid
        for call in chain:
            for probe in call.probes:
                _account(probe, call, now)
                handler = probe.handler
                if handler is None:
                    continue
                site: Site = call.site
                hit = ReturnHit(probe, site, pid, tid, regs, now, call.entry_ns,
                                call.entry_args)
                try:
                    handler(hit)
                except Exception as exc:  # noqa: BLE001 - reported, tracing goes on
                    probe.errors += 1
                    self.on_handler_error(probe, hit, exc)
                hit.expire()
        try:
            _finish(tid, raw, regs, form, slot, mem)
        except FaultError as exc:
            self.notice(f"thread {tid}: cannot give its return address back: {exc}")
        thread.in_hit = None
        self.loop.done(thread)

    # --- pending calls ------------------------------------------------------------------
    def prune(self, space: AddressSpace) -> None:
        """Forget the calls of threads that are gone and the calls whose slot no
        longer holds the trampoline's address (abandoned by longjmp or an
        exception, their stack reused since)."""
        stacks = space.returns
        self._forget_gone_threads(space)
        trampoline = space.patcher.trampoline
        if trampoline is not None:
            holding = _slots_holding(space, [frame.slot for frame in stacks], trampoline[0])
            stacks.discard([frame for frame in stacks if frame.slot not in holding])
        stacks.prune_at = max(64, 2 * stacks.count)

    def _forget_gone_threads(self, space: AddressSpace) -> None:
        live = {tid for tid, thread in self.loop.threads.items()
                if thread.process.space is space and not thread.exited}
        for tid in space.returns.threads():
            if tid not in live:
                space.returns.drop_thread(tid)

    def restore(self, space: AddressSpace) -> List[str]:
        """Give every replaced return address of *space* back (the threads are
        stopped) and make the trampoline idle; returns what could not be done."""
        problems: List[str] = []
        stacks: ShadowStacks = space.returns
        trampoline = space.patcher.trampoline
        if trampoline is None:
            stacks.clear()
            return problems
        self._forget_gone_threads(space)
        address = trampoline[0]
        holding = _slots_holding(space, [frame.slot for frame in stacks], address)
        for frame in stacks:
            if frame.slot in holding:
                try:
                    space.mem.write(frame.slot, frame.original.to_bytes(8, "little"))
                except FaultError as exc:
                    problems.append(f"process {space.pid}: cannot give a return address back: {exc}")
        stacks.clear()
        try:
            space.patcher.idle_trampoline()
        except PtprobeError as exc:
            problems.append(f"process {space.pid}: cannot make the return trampoline idle: {exc}")
        return problems


def _account(probe: ReturnProbe, call: PendingReturn, now: int) -> None:
    """Count a return of *call* for *probe* and its duration."""
    probe.stop_hits += 1
    name = (getattr(call.site, "label", "") or "?").partition("+")[0]
    histogram = probe.latency.get(name)
    if histogram is None:
        histogram = probe.latency[name] = Histogram()
    histogram.add(now - call.entry_ns)


def _finish(tid: int, raw: linux.Registers, regs: Regs, form: arch.ReturnTrampoline, slot: int,
            mem: linux.Memory) -> None:
    """After the handlers of a return: the program state *regs* shows, reached by
    the trampoline's own way back (the slot gets where to return), or, when a
    handler moved the stack, set here by hand."""
    changed = regs.changed
    if "rsp" in changed:
        regs.load_stacked()
        for name in form.saved + tuple(changed):
            setattr(raw, name, regs.get(name))
        raw.rip = regs.get("rip")
        raw.rsp = regs.get("rsp")
        if form.saved:
            raw.orig_rax = linux.U64            # at the syscall: skip it
        linux.set_regs(tid, raw)
        return
    mem.write(slot, regs.get("rip").to_bytes(8, "little"))
    saved = changed & set(form.saved)
    if saved:
        mem.write(raw.rsp, arch.SLOT_SAVED.pack(*(regs.get(name) for name in form.saved)))
    others = changed - saved - {"rip"}
    if others:
        for name in others:
            setattr(raw, name, regs.get(name))
        linux.set_regs(tid, raw)


def _slots_holding(space: AddressSpace, slots: List[int], value: int) -> Set[int]:
    """The slots among *slots* whose 8 bytes hold *value* (stack read in spans)."""
    found: Set[int] = set()
    ordered = sorted(set(slots))
    i = 0
    while i < len(ordered):
        start = ordered[i]
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] + 8 - start <= _READ_SPAN:
            j += 1
        try:
            data = space.mem.read(start, ordered[j] + 8 - start)
            for slot in ordered[i:j + 1]:
                if int.from_bytes(data[slot - start:slot - start + 8], "little") == value:
                    found.add(slot)
        except FaultError:
            for slot in ordered[i:j + 1]:
                try:
                    if space.mem.read_u64(slot) == value:
                        found.add(slot)
                except FaultError:
                    continue
        i = j + 1
    return found
