"""The program's own seccomp filters, met while it is traced.

In run mode ptprobe's filter also stops the program's calls that install a seccomp
filter or enter strict mode (``seccomp(SECCOMP_SET_MODE_FILTER or STRICT, ...)``,
``prctl(PR_SET_SECCOMP, ...)``, in every ABI; see :func:`ptprobe.linux.seccomp_trace_filter`).
Such a stop reaches :meth:`FilterWatch.on_call` through the hits' slot-stop handler
before the new filter takes effect. The new filter is read from the program's memory
and added to what is known of the process's filters; if the slots' system call would
then no longer stop for ptprobe (a filter that kills, traps or fails unknown numbers
outranks ptprobe's trace), every jmp site of the address space moves to int3 while the
world is stopped (a thread inside a slot goes back to its site, one stopped at a slot's
syscall has it cancelled), and the user is told. Then the program's call goes on.

A seccomp stop for any other system call comes from a filter of the program's that
traces it: without a tracer it would fail with ENOSYS, and so it does here.

Where nothing watches (attach mode), :meth:`FilterWatch.check` compares the
process's filters before a detach with what was known: a filter that came since and
overrules the slots has cost the hits of its jmp sites since then, which is said.

See ``docs/design.md``, "Foreign seccomp filters".
"""

from __future__ import annotations

import ctypes
import errno
from typing import Callable, Iterable, Optional, Tuple

from .. import arch, linux
from ..errors import FaultError, NoSuchProcessError, PtprobeError
from ..seccomp import FilterError, Program
from ..tracee import AddressSpace, Process, Thread
from .hits import finish_seed_slot
from .loop import EventLoop

_ENOSYS = (-errno.ENOSYS) & linux.U64
_U32 = 0xFFFFFFFF
_INT80 = b"\xcd\x80"
#: a seccomp stop ptprobe's filter did not ask for (see :meth:`FilterWatch._decode`)
_FOREIGN: Tuple[bool, Optional[Program], str] = (False, None, "foreign")


class FilterWatch:
    """Sees the program's seccomp filters come, and keeps the slots out of their way."""

    def __init__(self, loop: EventLoop, notice: Callable[[str], None]) -> None:
        self.loop = loop
        self.notice = notice

    # --- a watched call -----------------------------------------------------------------
    def on_call(self, thread: Thread, raw: linux.Registers) -> None:
        """A seccomp stop of *thread* for a system call that is not the slots'."""
        call = self._decode(thread, raw)
        if call is _FOREIGN:
            # traced by a filter of the program's: answer as if there were no tracer
            raw.orig_rax = linux.U64
            raw.rax = _ENOSYS
            linux.set_regs(thread.tid, raw)
        elif call is not None:
            strict, program, why = call
            with self.loop.world_stopped():
                self._installing(thread.process, thread.process.space, strict, program, why)
        self.loop.done(thread)

    def _decode(self, thread: Thread, raw: linux.Registers) -> Optional[Tuple[bool, Optional[Program], str]]:
        """(strict mode, the new filter or None if it cannot be read, why not) for a
        call that installs a filter or strict mode; None for a watched call that does
        neither (it goes on); _FOREIGN for a call ptprobe's filter does not stop."""
        nr = raw.orig_rax & _U32
        mem = thread.process.space.mem
        try:
            i386 = mem.read(raw.rip - 2, 2) == _INT80
        except FaultError:
            i386 = False
        if i386:
            if nr == linux.SYS_I386_seccomp:
                op = raw.rbx & _U32
                if op not in (linux.SECCOMP_SET_MODE_STRICT, linux.SECCOMP_SET_MODE_FILTER):
                    return None
                strict = op == linux.SECCOMP_SET_MODE_STRICT
            elif nr == linux.SYS_I386_prctl and raw.rbx & _U32 == linux.PR_SET_SECCOMP:
                if raw.rcx & _U32 not in (1, 2):
                    return None
                strict = raw.rcx & _U32 == 1
            else:
                return _FOREIGN
            return strict, None, "a seccomp filter installed through the 32-bit system calls"
        nr &= ~linux.X32_SYSCALL_BIT
        if nr == linux.SYS_seccomp:
            op = raw.rdi & _U32
            if op not in (linux.SECCOMP_SET_MODE_STRICT, linux.SECCOMP_SET_MODE_FILTER):
                return None
            strict, fprog_at = op == linux.SECCOMP_SET_MODE_STRICT, raw.rdx
        elif nr == linux.SYS_prctl and raw.rdi & _U32 == linux.PR_SET_SECCOMP:
            if raw.rsi & _U32 not in (1, 2):
                return None
            strict, fprog_at = raw.rsi & _U32 == 1, raw.rdx
        else:
            return _FOREIGN
        if strict:
            return True, None, ""
        program, why = self._read_program(thread.process.space, fprog_at)
        return False, program, why

    @staticmethod
    def _read_program(space: AddressSpace, at: int) -> Tuple[Optional[Program], str]:
        try:
            fprog = linux.SockFprog.from_buffer_copy(space.mem.read(at, ctypes.sizeof(linux.SockFprog)))
            size = fprog.len * ctypes.sizeof(linux.SockFilter)
            return Program.from_bytes(space.mem.read(fprog.filter, size)), ""
        except (FaultError, FilterError) as exc:
            return None, f"a seccomp filter ptprobe cannot read ({exc})"

    def _installing(self, process: Process, space: AddressSpace, strict: bool, program: Optional[Program],
                    why: str) -> None:
        """The world stopped: *process* is about to install a filter (or strict mode)."""
        stack = space.seccomp_filters().copy()
        if strict:
            stack.strict()
        else:
            stack.add(program, why)
        space.filters = stack           # ptprobe's own later system calls meet it too
        served, reason = stack.slot_verdict(arch.SLOT_SYSCALL_NR)
        if served:
            return
        moved = self.move_to_int3(space, reason)
        what = "enters seccomp strict mode" if strict else "installs a seccomp filter"
        if moved:
            self.notice(f"process {process.pid} {what} ({reason}): its {moved} jmp site"
                        f"{'s use' if moved > 1 else ' uses'} int3 from now on")

    # --- moving sites -----------------------------------------------------------------------
    def move_to_int3(self, space: AddressSpace, reason: str) -> int:
        """Serve every jmp site of *space* by int3 (the world stopped); returns how many
        moved. A thread inside a slot, before its syscall, goes back to its site (it
        takes the int3 there), and so does one between a combo's nop1 and its jmp; one
        stopped at a self-returning slot's syscall has the syscall cancelled (its
        resumption would run the new filter)."""
        patcher = space.patcher
        # a thread between the nop1 of a combo site and its jmp would skip the new int3
        inside = {site.patch_at: site.address for site in patcher.sites.values()
                  if site.mechanism == "jmp" and site.patch_at != site.address}
        moved = patcher.demote_slots(reason)
        for thread in self._threads_of(space):
            try:
                raw = linux.get_regs(thread.tid)
                if raw.rip in inside:
                    linux.set_rip(thread.tid, inside[raw.rip])
                    continue
                frame = patcher.slot_frame_at(raw.rip)
                if frame is None:
                    continue
                slot, offset, _ = frame
                site = patcher.slot_sites.get(slot + arch.SEED_SLOT_SIZE)
                if offset < arch.SEED_SLOT_SIZE and site is not None:
                    finish_seed_slot(raw, space.mem, offset, site.address)
                else:
                    raw.orig_rax = linux.U64
                linux.set_regs(thread.tid, raw)
            except (NoSuchProcessError, FaultError):
                continue
        return len(moved)

    def _threads_of(self, space: AddressSpace) -> Iterable[Thread]:
        return [t for t in list(self.loop.threads.values())
                if t.process.space is space and t.stopped and not t.exited]

    # --- where nothing watched ------------------------------------------------------------
    def check(self, processes: Iterable[Process]) -> None:
        """Before a detach (the world stopped): a filter installed since ptprobe last
        looked, in a process whose installs it did not watch, that overrules its
        slots has cost their hits since; say so, and move the sites to int3."""
        for process in processes:
            space = process.space
            if process.exited or process.shares_memory or space.filters_watched or space.filters is None:
                continue
            if not any(site.mechanism == "jmp" for site in space.patcher.sites.values()):
                continue
            try:
                served, reason = space.slot_verdict()
            except PtprobeError:
                continue
            if not served:
                known = space.seccomp_filters().known
                moved = self.move_to_int3(space, reason)
                self.notice(f"process {process.pid} installed a seccomp filter while traced: {reason}: "
                            f"the hits of its {moved} jmp site{'s' if moved != 1 else ''} since then "
                            f"{'were' if known else 'may have been'} lost")
