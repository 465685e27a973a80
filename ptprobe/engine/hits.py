"""Probe hits: int3 and slot stops, the counting hot path, finishing slots,
stepping over displaced instructions.

:class:`Hits` subscribes to the loop's :class:`~.events.SlotStop` and
:class:`~.events.Trap` events. A hit runs the handlers of every probe on the
site with a :class:`~ptprobe.hit.Hit` whose registers show the program at the
site, then resumes the thread as if nothing had happened: after the NOP, through
the displaced instruction's out-of-line copy, or by single-stepping the original
instruction with the other threads stopped. While some site's probes only count,
:meth:`Hits.counted` is the loop's hot path. See ``docs/design.md``, "How a
probe is hit".
"""

from __future__ import annotations

import errno
import os
import signal
import time
from typing import AbstractSet, Callable, Optional, Tuple

from .. import arch, linux, procfs
from ..errors import FaultError, NoSuchProcessError, PtprobeError
from ..hit import Hit, Record, Regs
from ..patching import Patcher, Site
from ..tracee import Thread
from .events import SLOT_STOP, TRAP_STOP, SlotStop, Trap
from .loop import EventLoop
from .returns import Returns

ErrorReport = Callable[[object, object, BaseException], None]
#: Hits._int3_hit or Hits._slot_hit: (thread, site, its registers if they were read)
HitHandler = Callable[[Thread, Site, Optional[linux.Registers]], None]
_EPROTO = (-errno.EPROTO) & linux.U64


def continuation(site: Site) -> Optional[int]:
    """Where a thread stopped at int3 *site* goes on when no handler moved it:
    after an emulated NOP, into the displaced instruction's copy, or None
    (the instruction must be stepped over in place)."""
    if site.emulate:
        return site.resume
    return site.xol


def finish_seed_slot(raw: linux.Registers, mem: linux.Memory, offset: int, resume: int) -> None:
    """Do to *raw* what the rest of a seed slot's way back would have done, for a
    thread at *offset* in the slot: the saved registers back from the stack, the
    red zone skipped back, rip at *resume* (and the slot's syscall skipped when
    stopped at it). The caller writes *raw*."""
    progress = arch.seed_slot_frame(offset)
    if progress.clobbered:
        data = mem.read(raw.rsp, 8 * len(progress.pushed))
        for name, at in progress.stack_offsets().items():
            if name in progress.clobbered:
                setattr(raw, name, int.from_bytes(data[at:at + 8], "little"))
    raw.rsp = progress.program_rsp(raw.rsp)
    raw.rip = resume
    if offset == arch.SEED_SLOT_SIZE:
        raw.orig_rax = linux.U64


def write_back(tid: int, regs: Regs, names: AbstractSet[str], rip: Optional[int] = None) -> None:
    """Write the view's registers *names* (and *rip*, if given) into the thread:
    up to two by ``PTRACE_POKEUSER`` each, more as the whole set."""
    if len(names) + (rip is not None) <= 2:
        for name in names:
            linux.poke_register(tid, name, regs.get(name))
        if rip is not None:
            linux.set_rip(tid, rip)     # PTRACE_POKEUSER costs the kernel a third of SETREGS
        return
    raw = regs.raw
    for name in names:
        setattr(raw, name, regs.get(name))
    if rip is not None:
        raw.rip = rip
    linux.set_regs(tid, raw)


class Hits:
    """Handles the stops of armed sites."""

    def __init__(self, loop: EventLoop, *, slot_kind: str, on_handler_error: ErrorReport) -> None:
        self.loop = loop
        self.slot_kind = slot_kind
        self.on_handler_error = on_handler_error
        #: hooks to the in-program actions: deliver the records written so far; a
        #: stub found the ring full (True: try again, False: drop)
        self.drain: Callable[[], int] = lambda: 0
        self.action_stop: Callable[[Thread, linux.Registers], bool] = lambda thread, raw: False
        #: return probes: entries of sites they watch, the return trampoline's stops
        self.returns = Returns(loop, on_handler_error=on_handler_error)
        #: a seccomp stop for a system call that is not the slots' (the session wires
        #: the program's own filter installs here: see engine/filters.py)
        self.other_syscall: Optional[Callable[[Thread, linux.Registers], None]] = None
        #: read a stop's whole register set at once instead of rip alone: the last
        #: handler that ran asked for registers, so the next one likely will too
        self.read_ahead = False
        loop.subscribe(SlotStop, self._on_slot_stop)
        loop.subscribe(Trap, self._on_trap)

    def site_changed(self, site: Site) -> None:
        """Recompute whether *site* only counts. The hot path is on once a site is
        armed: it takes the hits of sites that only count, and hands those with
        handlers to their handlers without decoding the stop into an event."""
        site.refresh_counting()
        self.loop.fast = self.counted

    # --- the hot path --------------------------------------------------------------------
    def counted(self, tid: int, status: int) -> bool:
        """A hit on a site whose probes only count, resumed at once with the fewest
        system calls (self-returning slot: read rip and continue; int3: read rip,
        write it, continue; seed slot: read the registers and the saved ones,
        write them, continue). A hit of a site whose probes have handlers goes
        straight to them (:meth:`_direct`). False leaves the stop to the loop's
        dispatch: not such a hit, or a thread or loop state (held, signals to
        deliver, its first stop) that needs the general path."""
        thread = self.loop.threads.get(tid)
        if thread is None or thread.deferred_signals or thread.group_stop or self.loop.holding:
            return False
        proc = thread.process
        if proc.release_on_stop:
            return False
        patcher = proc.space.patcher
        raw: Optional[linux.Registers] = None           # a seed slot's registers
        ahead: Optional[linux.Registers] = None         # the whole set, read at once (read_ahead)
        direct: Optional[HitHandler] = None
        try:
            if status == TRAP_STOP:
                if self.read_ahead:
                    ahead = linux.get_regs(tid)
                    rip = ahead.rip
                else:
                    rip = linux.get_rip(tid)
                site = patcher.int3_sites.get(rip)
                if site is None and rip == patcher.return_stop and linux.is_int3_trap(tid):
                    return self.returns.returned_fast(thread)
                if site is None or not linux.is_int3_trap(tid):
                    return False
                if not site.counting_only:
                    direct = self._int3_hit
                else:
                    to = continuation(site)
                    if to is None:
                        return False
                    linux.set_rip(tid, to)
            elif status != SLOT_STOP:
                return False
            elif self.slot_kind == "return":
                if self.read_ahead:
                    ahead = linux.get_regs(tid)
                    rip = ahead.rip
                else:
                    rip = linux.get_rip(tid)
                site = patcher.slot_sites.get(rip)
                if site is None and rip == patcher.return_stop:
                    return self.returns.returned_fast(thread)
                if site is None or site.slot_kind != "return":
                    return False
                if not site.counting_only:
                    direct = self._slot_hit
            else:
                raw = linux.get_regs(tid)
                site = patcher.slot_sites.get(raw.rip)
                if site is None and raw.rip == patcher.return_stop:
                    return self.returns.returned_fast(thread)
                if site is None or site.slot_kind != "seed":
                    return False
                if not site.counting_only:
                    direct = self._slot_hit         # (with the registers read here)
                else:
                    finish_seed_slot(raw, proc.space.mem, arch.SEED_SLOT_SIZE, site.resume)
                    linux.set_regs(tid, raw)
            if direct is None and site.returns:
                if raw is not None:
                    rsp = raw.rsp
                else:
                    rsp = (ahead.rsp if ahead is not None else linux.get_rsp(tid)) + (
                        arch.SLOT_FRAME_SIZE if status == SLOT_STOP else 0)
                self.returns.entered_fast(thread, site, rsp)
        except (NoSuchProcessError, FaultError):
            return False            # killed meanwhile: the general path sees its end
        if direct is not None:
            return self._direct(thread, site, direct, raw if raw is not None else ahead)
        site.hits += 1
        for probe in site.probes:
            probe.stop_hits += 1
        thread.stops += 1
        try:
            linux.cont(tid)
        except NoSuchProcessError:
            thread.exited = True
        return True

    def _direct(self, thread: Thread, site: Site, hit: "HitHandler", raw: Optional[linux.Registers]) -> bool:
        """Handle a hit of *site* with handlers from the hot path: what the loop's
        dispatch would do for it, without decoding the stop (*hit* is
        :meth:`_int3_hit` or :meth:`_slot_hit`; *raw*: the registers, if they were
        read)."""
        if thread.fresh:
            return False            # its first stop: the loop has bookkeeping to do
        thread.stopped = True
        try:
            hit(thread, site, raw)
        except NoSuchProcessError as exc:
            thread.in_hit = None
            if exc.pid == thread.tid:
                thread.stopped = False      # killed while its stop was handled: its exit comes next
            else:
                self.loop.done(thread)      # another process vanished meanwhile: this thread goes on
        return True

    # --- handlers ---------------------------------------------------------------------------
    def _run_handlers(self, site: Site, regs: Regs, thread: Thread) -> None:
        thread.stops += 1
        self._call_probes(site, regs, thread)
        for extra in site.chained:
            # the next instruction, inside this site's patch: as if the thread had gone on
            if regs.get("rip") != site.address:
                break                       # a handler moved the thread elsewhere
            regs.move_to(extra.address)
            self._call_probes(extra, regs, thread)
            if regs.get("rip") == extra.address:
                regs.move_to(site.address)

    def _call_probes(self, site: Site, regs: Regs, thread: Thread) -> None:
        drained = False
        now = time.monotonic_ns()
        site.hits += 1
        for probe in site.probes:
            probe.stop_hits += 1
            handler = probe.handler
            if handler is None:
                continue
            hit = Hit(probe, site, thread.process.pid, thread.tid, regs, now)
            target: object = hit
            if probe.mode == "record":
                # a recording probe whose hit had to stop: its record comes after
                # those the program wrote before it, and is read-only
                if not drained:
                    self.drain()
                    drained = True
                target = Record(probe, site, hit.pid, hit.tid, now, tuple(hit.args))
            try:
                handler(target)
            except Exception as exc:  # noqa: BLE001 - reported, tracing goes on
                probe.errors += 1
                self.on_handler_error(probe, target, exc)
            hit.expire()
        if site.returns and regs.get("rip") == site.address:
            self.returns.entered(thread, site, regs, now)

    # --- int3 ---------------------------------------------------------------------------------
    def _on_trap(self, event: Trap) -> None:
        thread = event.thread
        tid = thread.tid
        rip = linux.get_rip(tid)
        patcher = thread.process.space.patcher
        site = patcher.int3_sites.get(rip)
        if site is None and rip == patcher.return_stop and linux.is_int3_trap(tid):
            self.returns.returned(thread, linux.get_regs(tid))
            return
        if site is not None or rip in patcher.retired:
            if linux.is_int3_trap(tid):
                if site is not None:
                    self._int3_hit(thread, site)
                else:
                    # a trap from a site disarmed since: run the restored instruction
                    linux.set_rip(tid, rip - 1)
                    self.loop.done(thread)
                return
        thread.pending_signal = signal.SIGTRAP      # the program's own trap
        self.loop.done(thread)

    def _int3_hit(self, thread: Thread, site: Site, raw: Optional[linux.Registers] = None) -> None:
        tid = thread.tid
        regs = Regs(raw, {"rip": site.address}, tid)
        thread.in_hit = site
        self._run_handlers(site, regs, thread)
        self.read_ahead = regs.asked
        changed = regs.changed
        rip = regs.get("rip")
        if rip == site.address:
            to = continuation(site)
            if to is None:
                raw = regs.raw
                for name in changed:
                    setattr(raw, name, regs.get(name))
                self._step_over(thread, site, raw)
                thread.in_hit = None
                self.loop.done(thread)
                return
            rip = to
        write_back(tid, regs, changed - {"rip"}, rip)
        thread.in_hit = None
        self.loop.done(thread)

    def _step_over(self, thread: Thread, site: Site, raw: linux.Registers) -> None:
        """Execute the original instruction in place, the other threads stopped.
        Events of the stepping thread (a new child, exec) are dispatched as they
        come; signals are kept for later."""
        space = site.space
        tid = thread.tid
        with self.loop.world_stopped():
            raw.rip = site.address
            linux.set_regs(tid, raw)
            space.mem.write(site.patch_at, site.original)
            try:
                self._single_step(thread)
            finally:
                if (thread.process.space is space and site.armed
                        and space.patcher.sites.get(site.address) is site):
                    space.mem.write(site.patch_at, site.patched)

    def _single_step(self, thread: Thread) -> None:
        tid = thread.tid
        thread.stepping = True
        try:
            linux.singlestep(tid)
            while True:
                status = self.loop.wait_thread(tid)
                if not os.WIFSTOPPED(status):
                    thread.stepping = False
                    self.loop.dispatch(tid, status)
                    return
                sig = os.WSTOPSIG(status)
                if status >> 16:
                    self.loop.dispatch(tid, status)     # held: the thread stays stopped
                    if thread.exited:
                        return
                elif sig == signal.SIGTRAP:
                    return
                else:
                    thread.deferred_signals.append(sig)
                linux.singlestep(tid)
        finally:
            thread.stepping = False
            thread.stopped = not thread.exited

    # --- slots --------------------------------------------------------------------------------
    def _on_slot_stop(self, event: SlotStop) -> None:
        thread = event.thread
        tid = thread.tid
        space = thread.process.space
        patcher = space.patcher
        site = patcher.slot_sites.get(linux.get_rip(tid))
        if site is None:
            self._other_slot_stop(thread)
            return
        self._slot_hit(thread, site)

    def _slot_hit(self, thread: Thread, site: Site, raw: Optional[linux.Registers] = None) -> None:
        tid = thread.tid
        mem = thread.process.space.mem
        regs = Regs(raw, {"rip": site.address}, tid, (arch.SLOT_SAVED_REGISTERS, arch.SLOT_FRAME_SIZE, mem))
        thread.in_hit = site
        self._run_handlers(site, regs, thread)
        self.read_ahead = regs.asked
        changed = regs.changed
        if site.slot_kind == "return" and "rip" not in changed and "rsp" not in changed:
            # the slot's own tail restores rax, r11 and rcx from the stack and jumps back
            if changed:
                saved = changed & set(arch.SLOT_SAVED_REGISTERS)
                if saved:
                    mem.write(regs.thread_value("rsp"),
                              arch.SLOT_SAVED.pack(*(regs.get(n) for n in arch.SLOT_SAVED_REGISTERS)))
                others = changed - saved
                if others:
                    write_back(tid, regs, others)
            thread.in_hit = None
            self.loop.done(thread)
            return
        # finish the slot here, as the program state in the view says
        regs.load_stacked()
        raw = regs.raw
        for name in arch.SLOT_SAVED_REGISTERS + ("rsp",):
            setattr(raw, name, regs.get(name))
        for name in changed:
            setattr(raw, name, regs.get(name))
        raw.rip = regs.get("rip") if regs.get("rip") != site.address else site.resume
        raw.orig_rax = linux.U64
        linux.set_regs(tid, raw)
        thread.in_hit = None
        self.loop.done(thread)

    def _other_slot_stop(self, thread: Thread) -> None:
        """A slot syscall stop that is not a site's hit: the return trampoline, a
        recording stub with a full ring, a slot whose site was disarmed, or the
        slot syscall number made by someone else."""
        tid = thread.tid
        patcher = thread.process.space.patcher
        raw = linux.get_regs(tid)
        if raw.orig_rax != arch.SLOT_SYSCALL_NR and self.other_syscall is not None:
            self.other_syscall(thread, raw)
            return
        if raw.rip == patcher.return_stop:
            self.returns.returned(thread, raw)
            return
        if self.action_stop(thread, raw):
            # a stub or an exit trampoline of the in-program actions (ring full, ...)
            self.loop.done(thread)
            return
        frame = patcher.slot_frame_at(raw.rip, after_syscall=True)
        if frame is not None:
            # a slot whose site was disarmed: finish the slot, no handlers
            self._finish_slot(thread, raw, patcher, frame)
        else:
            # the slot's syscall number, made by someone else: it fails
            raw.orig_rax = linux.U64
            raw.rax = _EPROTO
            linux.set_regs(tid, raw)
        self.loop.done(thread)

    def _finish_slot(self, thread: Thread, raw: linux.Registers, patcher: Patcher,
                     frame: Tuple[int, int, int]) -> None:
        """Complete by hand the slot *thread* is in, at *frame* (slot, offset,
        resume) from :meth:`Patcher.slot_frame_at`. Self-returning slots finish
        by themselves."""
        slot, offset, resume = frame
        if patcher.pages[slot & ~0xFFF].kind == "return":
            return
        finish_seed_slot(raw, thread.process.space.mem, offset, resume)
        linux.set_regs(thread.tid, raw)

    # --- detaching ---------------------------------------------------------------------------
    def drain_traps(self) -> None:
        """Let stopped threads with a SIGTRAP still queued take it while the sites
        are armed (the world is held: each comes back stopped)."""
        for _ in range(100):
            pending = [t for t in list(self.loop.threads.values())
                       if t.stopped and not t.exited and not t.group_stop
                       and procfs.sigtrap_pending(t.process.pid, t.tid)]
            if not pending:
                return
            for thread in pending:
                thread.stopped = False
                sig, thread.pending_signal = thread.pending_signal, 0
                linux.cont(thread.tid, sig)
            self.loop.wait_all_stopped()

    def settle(self, thread: Thread) -> None:
        """Before *thread* (stopped) is let go: a hit being handled goes back to its
        site; a thread inside a seed slot is finished by hand."""
        if thread.exited or not thread.stopped:
            return
        try:
            raw = linux.get_regs(thread.tid)
        except NoSuchProcessError:
            return
        patcher = thread.process.space.patcher
        site = thread.in_hit
        thread.in_hit = None
        if isinstance(site, Site):
            if site.mechanism == "int3":
                if raw.rip == site.address + 1:
                    linux.set_rip(thread.tid, site.address)
                return
            frame = patcher.slot_frame_at(raw.rip, after_syscall=True)
        else:
            frame = patcher.slot_frame_at(raw.rip)
        if frame is not None:
            try:
                self._finish_slot(thread, raw, patcher, frame)
            except PtprobeError:
                pass
