"""Patching an address space: trampoline pages, slots, the seccomp filter, sites.

One :class:`Patcher` per traced address space. It maps trampoline pages with
remote syscalls, writes code only through ``/proc/PID/mem`` (so the tracee
never has a writable and executable mapping), and turns probe addresses into
armed :class:`Site` objects: a ``jmp`` into a slot for 5-byte NOP sites, an
``int3`` otherwise. Every call here expects all threads of the address space
to be stopped. See ``docs/design.md``, "Slots and pages".

Pages are private mappings of a memfd named ``ptprobe`` (``/memfd:ptprobe``
in ``/proc/PID/maps``). A read-only 1 MiB mapping of the same kind, the
*record*, holds the seccomp filter, the list of pages and which slot belongs to
which site, so that a later attach finds all of it again.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Iterable, List, Optional, Protocol, Tuple

from . import arch, codegen, linux, procfs
from .arch import PAGE_SIZE
from .errors import FaultError, SitePatchedError, SyscallRefusedError, TracerError
from .objects import LoadedObject

MEMFD_NAME = b"ptprobe\0"
# The record's layout (ptprobe's own, read back by a later ptprobe: change the magic
# with it): a header, the sock_fprog and BPF program of the filter, a table of
# pages (address, kind) and a table of slots (slot or copy address, resume or
# instruction address; 0 marks the syscall gadget, 1 a return trampoline).
RECORD_SIZE = 1 << 20
RECORD_MAGIC = b"PTPROBE\x01"
_HDR = struct.Struct("<8sQQQQ")        # magic, flags, nr, n_pages, n_slots
_ENTRY = struct.Struct("<QQ")          # one row of the page and slot tables
_FPROG_AT = 64
_FILTER_AT = 80
_PAGES_AT = 1024
_PAGES_MAX = (8192 - 1024) // _ENTRY.size
_SLOTS_AT = 8192
_SLOTS_MAX = (RECORD_SIZE - 8192) // _ENTRY.size
FLAG_FILTER = 1
FLAG_FILTER_FAILED = 2
FLAG_FILTER_WATCH = 4      # the filter also stops the program's seccomp()/prctl(PR_SET_SECCOMP)
# page kinds; 1 was the seed page of 16-byte slots with no way back (not reused: its
# sites read as patched by someone else)
_KINDS = {"seed": 6, "return": 2, "xol": 3, "count": 4, "stub": 5}
_KIND_NAMES = {v: k for k, v in _KINDS.items()}
_STRIDE = {"seed": arch.SEED_SLOT_STRIDE, "return": arch.RETURN_SLOT_SIZE, "xol": arch.XOL_ENTRY_SIZE,
           "count": codegen.COUNT_SLOT_SIZE, "stub": 64}
#: pages whose slots stop the thread (a stop in them is a hit); the others hold
#: out-of-line copies (xol), counting slots (count) or recording stubs (stub)
STOP_KINDS = ("seed", "return")
_MMAP_MIN = 0x10000
_TRAMPOLINE_MARK = 1                   # "instruction address" of a return trampoline in the record
_REACH = 0x7FFF0000


class Target(Protocol):
    """What a :class:`Patcher` needs of the address space it patches
    (:class:`ptprobe.tracee.AddressSpace` is one)."""

    mem: linux.Memory
    filter_state: str
    syscall_gadget: Optional[int]
    own_filter: Optional[bytes]

    @property
    def pid(self) -> int: ...

    def maps(self, refresh: bool = False) -> List[procfs.Mapping]: ...

    def invalidate_maps(self) -> None: ...

    def executable(self) -> str: ...

    def stopped_thread(self) -> Any: ...

    def move_threads(self, start: int, end: int, to: int) -> None: ...

    def scratch_address(self, thread: Any, size: int) -> int: ...

    def syscall(self, nr: int, *args: int, thread: Any = None) -> Tuple[int, bool]: ...

    def slot_verdict(self, extra: Optional[bytes] = None) -> Tuple[bool, str]: ...

    def filter_installed(self, program: bytes, watched: bool) -> None: ...


@dataclass
class Page:
    """One trampoline page: slots of one kind, or out-of-line copies (``xol``)."""

    address: int
    kind: str
    owners: Dict[int, int] = field(default_factory=dict)   # slot index -> resume address
    used: int = 0                                          # xol: bytes used

    @property
    def stride(self) -> int:
        return _STRIDE[self.kind]

    @property
    def capacity(self) -> int:
        return arch.SEED_PAGE_SLOTS if self.kind == "seed" else PAGE_SIZE // self.stride


@dataclass(eq=False)
class Site:
    """One armed probe address in one address space."""

    address: int                  # the probe address (what handlers see as rip)
    space: Target
    obj: Optional[LoadedObject]
    mechanism: str                # "int3" or "jmp"
    patch_at: int                 # where the patch bytes go
    original: bytes               # the bytes the patch replaces (as in the file)
    patched: bytes
    resume: int                   # where the program continues after an emulated/slot hit
    insn: Optional[arch.Instruction] = None
    xol: Optional[int] = None     # out-of-line copy of the displaced instruction
    emulate: bool = False         # int3 on a NOP: rip = resume
    slot: Optional[int] = None
    slot_kind: Optional[str] = None
    fallback_reason: Optional[str] = None
    probes: list = field(default_factory=list)
    armed: bool = False
    internal: bool = False
    label: str = ""               # what is probed: "symbol+0x4", "provider:name"
    chained: list = field(default_factory=list)   # sites inside this site's patch (hit after it)
    covered_by: Optional["Site"] = None           # the site whose patch covers this one
    counting_only: bool = False                   # no handler on it: the hit is only counted
    # what a hit does (jmp sites): "stop" (the slot stops the thread), "count" (a
    # counting slot, no stop) or "record" (a recording stub, no stop); and where
    # the jmp goes now (the slot, the counting slot or the stub)
    action: str = "stop"
    target: Optional[int] = None
    counter: Optional[int] = None                 # its counter in the data pages (count, record)
    stub: Optional[int] = None                    # its recording stub (this session's)
    stub_stop: Optional[int] = None               # rip after the stub's syscall (ring full)
    returns: list = field(default_factory=list)   # return probes entered here (docs/design.md, "Return probes")
    hits: int = 0                                 # hits of this site (in this address space)

    @property
    def pid(self) -> int:
        return self.space.pid

    def refresh_counting(self) -> bool:
        """Recompute whether the patch this site is in only counts (no probe on it
        has a handler, no site chained to it); True if it does."""
        host = self.covered_by or self
        host.counting_only = (not host.chained and all(p.handler is None for p in host.probes)
                              and all(p.handler is None for p in host.returns))
        return host.counting_only

    def __repr__(self) -> str:
        return f"<Site {self.address:#x} {self.mechanism} pid={self.space.pid}>"


class Patcher:
    """Arms and disarms sites in one address space."""

    def __init__(self, space: Target, *, slots: str = "return", seccomp: bool = True,
                 allow_no_new_privs: bool = True, max_pages: int = 64,
                 notice: Callable[[str], None] = lambda text: None, find_record: bool = True,
                 watch: bool = False) -> None:
        if slots not in ("return", "seed"):
            raise ValueError("slots must be 'return' or 'seed'")
        self.options: Dict[str, Any] = dict(slots=slots, seccomp=seccomp, allow_no_new_privs=allow_no_new_privs,
                                            max_pages=max_pages, notice=notice, watch=watch)
        self.watch = watch                        # our filter also stops the program's own filter installs
        self.space = space
        self.slot_kind = slots
        self.use_seccomp = seccomp
        self.allow_no_new_privs = allow_no_new_privs
        self.max_pages = max_pages
        self.notice = notice
        self.sites: Dict[int, Site] = {}          # probe address -> site
        self.int3_sites: Dict[int, Site] = {}     # int3 address + 1 -> site (hot lookup)
        self.retired: Dict[int, Site] = {}        # int3 address + 1 -> disarmed site (late traps)
        self.pages: Dict[int, Page] = {}
        self.slot_owner: Dict[Tuple[str, int], int] = {}   # (page kind, resume address) -> slot address
        self.slot_sites: Dict[int, Site] = {}     # slot address + 16 -> site (the stop's rip)
        self.stub_sites: Dict[int, Site] = {}     # rip after a stub's syscall -> site
        self.retired_stubs: Dict[int, Site] = {}  # the same, of disarmed sites (late stops)
        self.xol_owner: Dict[int, int] = {}       # instruction address -> its out-of-line copy
        self.record: Optional[int] = None
        #: the return trampoline (address, form), made by return_trampoline(); its stop's rip
        self.trampoline: Optional[Tuple[int, arch.ReturnTrampoline]] = None
        self.return_stop: Optional[int] = None
        self._record_flags = 0
        self._slot_records = 0                    # entries in the record's slot table
        self._nnp_hint_given = False
        self._refusals_told: set = set()          # refusals already reported
        self._last_refusal: Optional[str] = None   # the last system call not made, and why
        self.slot_refusal = ""                    # why slots cannot be used in this process
        self._filter_checked = False              # an installed filter (an earlier attach's) re-judged
        if find_record:
            self._load_record()

    # --- the record -------------------------------------------------------------
    def _load_record(self) -> None:
        """Find the record and pages an earlier ptprobe left in this process."""
        for m in self.space.maps(refresh=True):
            if m.path.startswith("/memfd:ptprobe") and m.end - m.start == RECORD_SIZE and m.perms.startswith("r--"):
                try:
                    header = self.space.mem.read(m.start, _HDR.size)
                except Exception:
                    continue
                magic, flags, nr, n_pages, n_slots = _HDR.unpack(header)
                if magic != RECORD_MAGIC:
                    continue
                self.record = m.start
                self._record_flags = flags
                self._slot_records = min(n_slots, _SLOTS_MAX)
                if flags & FLAG_FILTER and nr == arch.SLOT_SYSCALL_NR:
                    self.space.filter_state = "installed"
                    self.space.own_filter = self._recorded_filter(m.start)
                elif flags & FLAG_FILTER_FAILED:
                    self.space.filter_state = "failed"
                table = self.space.mem.read(m.start + _PAGES_AT, _ENTRY.size * min(n_pages, _PAGES_MAX))
                for i in range(0, len(table), _ENTRY.size):
                    addr, kind = _ENTRY.unpack_from(table, i)
                    if kind in _KIND_NAMES:
                        self.pages[addr] = Page(addr, _KIND_NAMES[kind])
                slots = self.space.mem.read(m.start + _SLOTS_AT, _ENTRY.size * min(n_slots, _SLOTS_MAX))
                for i in range(0, len(slots), _ENTRY.size):
                    slot, resume = _ENTRY.unpack_from(slots, i)
                    page = self.pages.get(slot & ~0xFFF)
                    if page is None:
                        continue
                    if page.kind == "xol":
                        page.used = max(page.used, slot - page.address + arch.XOL_ENTRY_SIZE)
                        if resume == 0:
                            self.space.syscall_gadget = slot
                        elif resume == _TRAMPOLINE_MARK:
                            pass        # an earlier session's return trampoline: never reused
                        else:
                            self.xol_owner[resume] = slot
                    elif page.kind == "stub":
                        page.used = PAGE_SIZE        # an earlier session's stubs: never reused
                    else:
                        page.owners[(slot - page.address) // page.stride] = resume
                        self.slot_owner[(page.kind, resume)] = slot
                return

    def _recorded_filter(self, record: int) -> Optional[bytes]:
        """The program of ptprobe's filter as the record holds it (None if unreadable)."""
        try:
            fprog = linux.SockFprog.from_buffer_copy(self.space.mem.read(record + _FPROG_AT,
                                                                        ctypes.sizeof(linux.SockFprog)))
            size = fprog.len * ctypes.sizeof(linux.SockFilter)
            if fprog.filter != record + _FILTER_AT or not 0 < size <= _PAGES_AT - _FILTER_AT:
                return None
            return self.space.mem.read(record + _FILTER_AT, size)
        except FaultError:
            return None

    def _write_header(self) -> None:
        assert self.record is not None
        n_pages = len(self.pages)
        n_slots = self._slot_records
        self.space.mem.write(self.record, _HDR.pack(RECORD_MAGIC, self._record_flags,
                                                      arch.SLOT_SYSCALL_NR, n_pages, n_slots))

    def _remember_slot(self, slot: int, resume: int) -> None:
        if self.record is None:
            return
        n = self._slot_records
        if n >= _SLOTS_MAX:
            return
        self.space.mem.write(self.record + _SLOTS_AT + _ENTRY.size * n, _ENTRY.pack(slot, resume))
        self._slot_records = n + 1
        self._write_header()

    # --- mapping pages ----------------------------------------------------------
    def _memfd_map(self, address: int, size: int, prot: int, fixed: bool) -> Optional[int]:
        """Map *size* bytes of a new ``ptprobe`` memfd (or, without one, anonymous
        memory); None when it cannot be placed, or a seccomp filter of the process
        forbids the system calls (see :meth:`_refused`)."""
        space = self.space
        thread = space.stopped_thread()
        name_at = space.scratch_address(thread, len(MEMFD_NAME))
        space.mem.write(name_at, MEMFD_NAME)
        flags = linux.MAP_PRIVATE | (linux.MAP_FIXED_NOREPLACE if fixed else 0)
        fd = self._call(linux.SYS_memfd_create, name_at, linux.MFD_CLOEXEC, thread=thread)
        if fd is None or fd < 0:
            result = self._call(linux.SYS_mmap, address, size, prot, flags | linux.MAP_ANONYMOUS,
                                (1 << 64) - 1, 0, thread=thread)
        else:
            try:
                res = self._call(linux.SYS_ftruncate, fd, size, thread=thread)
                result = res if res is None or res < 0 else self._call(linux.SYS_mmap, address, size, prot, flags,
                                                                       fd, 0, thread=thread)
            finally:
                self._call(linux.SYS_close, fd, thread=thread)
        space.invalidate_maps()
        if result is None:
            self._refused("ptprobe maps no page there: sites use int3, and instructions it would run "
                          "out of line are stepped in place")
            return None
        if -4096 < result < 0:
            return None
        if fixed and result != address:
            self._call(linux.SYS_munmap, result, size, thread=thread)
            return None
        return result

    def _call(self, nr: int, *args: int, thread: Any) -> Optional[int]:
        """A remote system call's result; None when it was not made because a seccomp
        filter of the process forbids it (kept in :attr:`_last_refusal`)."""
        try:
            return self.space.syscall(nr, *args, thread=thread)[0]
        except SyscallRefusedError as exc:
            self._last_refusal = f"{linux.SYSCALL_NAMES.get(exc.nr, hex(exc.nr))}: {exc.reason}"
            return None

    def _refused(self, what: str) -> None:
        """Say once that *what* was not done for the last refused system call."""
        refusal = self._last_refusal
        if refusal is None or (what, refusal) in self._refusals_told:
            return
        self._refusals_told.add((what, refusal))
        self.notice(f"process {self.space.pid}: {what} ({refusal})")

    def _ensure_record(self) -> bool:
        """Map the record if there is none yet; False when it cannot be."""
        if self.record is not None:
            return True
        address = self._memfd_map(0, RECORD_SIZE, linux.PROT_READ, fixed=False)
        if address is None:
            return False
        self.record = address
        self._record_flags = 0
        self._slot_records = 0
        self._write_header()
        return True

    def _candidates(self, near: Tuple[int, int], below_only: bool) -> Iterable[int]:
        """Free page addresses near the range *near*, nearest first."""
        lo, hi = near
        maps = sorted(self.space.maps(refresh=True), key=lambda m: m.start)
        gaps: List[Tuple[int, int]] = []
        prev_end = _MMAP_MIN
        for m in maps:
            if m.start > prev_end:
                gaps.append((prev_end, m.start))
            prev_end = max(prev_end, m.end)
        gaps.append((prev_end, 0x7FFFFFFFF000))
        below = []
        above = []
        for start, end in gaps:
            start = (start + 0xFFF) & ~0xFFF
            end &= ~0xFFF
            # keep one free page on each side, so as not to glue onto other mappings
            start += PAGE_SIZE
            end -= PAGE_SIZE
            if end - start < PAGE_SIZE:
                continue
            if end <= lo:
                below.append(end - PAGE_SIZE)
            elif start >= hi and not below_only:
                above.append(start)
        below.sort(key=lambda a: lo - a)
        above.sort(key=lambda a: a - hi)
        out = []
        for a in below + above:
            if a + PAGE_SIZE - lo <= _REACH and hi - a <= _REACH:
                out.append(a)
        return out[:16]

    def _new_page(self, kind: str, near_obj: Optional[LoadedObject], addresses: List[int]) -> Optional[Page]:
        if kind != "xol" and sum(1 for p in self.pages.values() if p.kind != "xol") >= self.max_pages:
            return None
        if len(self.pages) >= _PAGES_MAX or not self._ensure_record():
            return None
        assert self.record is not None
        if near_obj is not None:
            near = (near_obj.start, near_obj.end)
            # the main executable: never above it, where brk grows
            below_only = not near_obj.elf.is_pie or near_obj.path == self.space.executable()
        else:
            near = (min(addresses), max(addresses) + 16)
            below_only = False
        for candidate in self._candidates(near, below_only):
            if not arch.page_in_reach(candidate, addresses):
                continue
            address = self._memfd_map(candidate, PAGE_SIZE, linux.PROT_READ | linux.PROT_EXEC, fixed=True)
            if address is None:
                continue
            page = Page(address, kind)
            self.space.mem.write(address, b"\xcc" * PAGE_SIZE)
            if kind == "seed":
                self.space.mem.write(address + arch.SEED_RESTORE_OFFSET, arch.seed_restore_code())
            self.pages[address] = page
            index = len(self.pages) - 1
            self.space.mem.write(self.record + _PAGES_AT + _ENTRY.size * index, _ENTRY.pack(address, _KINDS[kind]))
            self._write_header()
            if kind == "xol" and self.space.syscall_gadget is None:
                # `syscall; int3` for later remote syscalls (recorded with owner 0)
                self.space.mem.write(address, b"\x0f\x05\xcc\xcc")
                page.used = arch.XOL_ENTRY_SIZE
                self.space.syscall_gadget = address
                self._remember_slot(address, 0)
            return page
        return None


    # --- slots -------------------------------------------------------------------
    def _get_slot(self, site_jmp: int, resume: int, obj: Optional[LoadedObject],
                  kind: Optional[str] = None) -> Optional[int]:
        """The slot of *kind* (default: the session's stop slots) that belongs to
        the site resuming at *resume*, taken now if it has none."""
        kind = kind or self.slot_kind
        slot = self.slot_owner.get((kind, resume))
        if slot is not None:
            return slot
        if kind in STOP_KINDS and any((other, resume) in self.slot_owner for other in STOP_KINDS):
            return None      # owned by a slot of the other kind: keep that slot's site on int3
        reach = [site_jmp, site_jmp + 5, resume]
        for page in self.pages.values():
            if page.kind == kind and len(page.owners) < page.capacity and arch.page_in_reach(page.address, reach):
                return self._take_slot(page, resume)
        page = self._new_page(kind, obj, reach)
        if page is None:
            return None
        return self._take_slot(page, resume)

    def _take_slot(self, page: Page, resume: int) -> int:
        index = next(i for i in range(page.capacity) if i not in page.owners)
        page.owners[index] = resume
        slot = page.address + index * page.stride
        if page.kind == "return":
            self.space.mem.write(slot, arch.return_slot_code(slot, resume))
        else:
            self.space.mem.write(slot, arch.seed_slot_code_at(slot, resume))
        self.slot_owner[(page.kind, resume)] = slot
        self._remember_slot(slot, resume)
        return slot

    # --- actions inside the program (counting slots, recording stubs) -------------------
    def count_slot(self, site: Site) -> Optional[int]:
        """The counting slot of jmp *site* (its own for the life of the process), or
        None when no page within reach can have one. Its code is written by
        :meth:`write_count_slot`."""
        return self._get_slot(site.patch_at, site.resume, site.obj, kind="count")

    def stub_room(self, site: Site, size: int) -> Optional[int]:
        """Room for a recording stub of *size* bytes for *site* (this session's),
        within reach of it; None if there is none."""
        at = self.code_room(size, [site.patch_at, site.patch_at + 5, site.resume], site.obj)
        if at is not None:
            self._remember_slot(at, site.resume)
        return at

    def code_room(self, size: int, near: List[int], obj: Optional[LoadedObject] = None) -> Optional[int]:
        """Room for *size* bytes of code of this session's (a stub page within reach
        of *near*); None if there is none."""
        size = (size + 63) & ~63
        page = next((p for p in self.pages.values() if p.kind == "stub" and p.used + size <= PAGE_SIZE
                     and arch.page_in_reach(p.address, near)), None)
        if page is None:
            page = self._new_page("stub", obj, near)
            if page is None:
                return None
        at = page.address + page.used
        page.used += size
        return at

    def set_stub(self, site: Site, at: int, code: bytes, stop_offset: Optional[int]) -> None:
        """Write *site*'s recording stub *code* at *at* (from :meth:`stub_room`)."""
        self.space.mem.write(at, code)
        if site.stub_stop is not None:
            self.stub_sites.pop(site.stub_stop, None)
        site.stub = at
        site.stub_stop = None if stop_offset is None else at + stop_offset
        if site.stub_stop is not None:
            self.stub_sites[site.stub_stop] = site

    def aim(self, site: Site, target: int) -> None:
        """Make jmp *site* go to *target* (its slot, counting slot or stub): one
        write of the 5 bytes when armed. Every thread must be stopped."""
        site.target = target
        site.patched = arch.jmp_rel32(site.patch_at, target)
        if site.armed:
            self.space.mem.write(site.patch_at, site.patched)

    def _get_xol(self, insn: arch.Instruction, obj: Optional[LoadedObject]) -> Optional[int]:
        """The address of an out-of-line copy of *insn*; None when it cannot run out of line."""
        known = self.xol_owner.get(insn.address)
        if known is not None and self._holds_copy(known, insn):
            return known                # armed before, also by an earlier attach: the same copy
        for page in self.pages.values():
            if page.kind == "xol" and page.used + arch.XOL_ENTRY_SIZE <= PAGE_SIZE:
                code = arch.displaced_code(insn, page.address + page.used)
                if code is not None:
                    return self._place_xol(page, insn, code)
        if arch.displaced_code(insn, insn.address) is None:
            return None                 # not relocatable anywhere: no page for nothing
        page = self._new_page("xol", obj, [insn.address, insn.address + insn.size])
        if page is None:
            return None
        code = arch.displaced_code(insn, page.address + page.used)
        return None if code is None else self._place_xol(page, insn, code)

    def _holds_copy(self, at: int, insn: arch.Instruction) -> bool:
        """True if the copy at *at* is the one *insn* needs (the code at an address
        can change: a library unmapped and another mapped in its place)."""
        code = arch.displaced_code(insn, at)
        try:
            return code is not None and self.space.mem.read(at, len(code)) == code
        except FaultError:
            return False

    def _place_xol(self, page: Page, insn: arch.Instruction, code: bytes) -> int:
        at = page.address + page.used
        self.space.mem.write(at, code)
        page.used += arch.XOL_ENTRY_SIZE
        self.xol_owner[insn.address] = at
        self._remember_slot(at, insn.address)
        return at

    # --- the return trampoline ------------------------------------------------------
    def return_trampoline(self, near: int) -> Tuple[int, arch.ReturnTrampoline]:
        """The return trampoline of this address space, made on first use in an
        out-of-line page near *near*: the ``syscall`` form when ptprobe's seccomp
        filter is (or can be) installed, else the ``int3`` form. A trampoline an
        earlier session left is never reused (its ``int3`` may be idle now, and a
        thread may still be inside it)."""
        if self.trampoline is not None:
            return self.trampoline
        form = arch.RETURN_TRAMPOLINES["syscall" if self._ensure_filter() else "int3"]
        code = arch.return_trampoline_code(form.form)
        page = next((p for p in self.pages.values()
                     if p.kind == "xol" and p.used + arch.XOL_ENTRY_SIZE <= PAGE_SIZE), None)
        if page is None:
            page = self._new_page("xol", None, [near, near + 16])
        if page is None:
            raise TracerError(f"cannot map a page for the return trampoline in process {self.space.pid}")
        at = page.address + page.used
        self.space.mem.write(at, code)
        page.used += arch.XOL_ENTRY_SIZE
        self._remember_slot(at, _TRAMPOLINE_MARK)
        self.trampoline = (at, form)
        self.return_stop = at + form.stop_offset
        return self.trampoline

    def idle_trampoline(self) -> None:
        """Make the return trampoline stop no more (at detach; see
        :class:`arch.ReturnTrampoline`) and forget it."""
        if self.trampoline is None:
            return
        at, form = self.trampoline
        self.trampoline = None
        self.return_stop = None
        if form.idle is not None:
            offset, code = form.idle
            self.space.mem.write(at + offset, code)

    # --- the seccomp filter -------------------------------------------------------
    def why_no_slots(self) -> Optional[str]:
        """None if jmp slots can serve this process's sites (its filter installed
        now if need be); else why not."""
        if self._ensure_filter():
            return None
        if not self.use_seccomp:
            return "no seccomp filter (--no-seccomp)"
        if self.slot_refusal:
            return self.slot_refusal
        if self.space.filter_state == "none" and not self.allow_no_new_privs:
            return ("it lacks CAP_SYS_ADMIN (--allow-no-new-privs lets ptprobe set its irrevocable "
                    "no_new_privs flag instead)")
        return "no seccomp filter of ptprobe's"

    def _ensure_filter(self) -> bool:
        space = self.space
        if not self.use_seccomp:
            return False
        if space.filter_state == "installed" and not self._filter_checked:
            # an earlier attach's filter: the process may have installed filters of its own since
            self._filter_checked = True
            served, why = space.slot_verdict()
            if not served:
                return self._slots_refused(why)
        if space.filter_state != "none":
            return space.filter_state == "installed"
        status = procfs.read_status(space.pid)
        nnp = status.get("NoNewPrivs", "0") == "1"
        if not nnp and not procfs.has_cap_sys_admin(space.pid):
            if not self.allow_no_new_privs:
                if not self._nnp_hint_given:
                    self._nnp_hint_given = True
                    self.notice("process %d lacks CAP_SYS_ADMIN: using int3; --allow-no-new-privs enables "
                                "the faster jmp slots (sets the irrevocable no_new_privs flag)" % space.pid)
                return False
        # judge the process's own filters first: nothing is made that they would kill it for,
        # and no filter is installed that they would overrule
        program = linux.seccomp_trace_filter(arch.SLOT_SYSCALL_NR, watch=self.watch)
        served, why = space.slot_verdict(program)
        if not served:
            return self._slots_refused(why)
        self._filter_checked = True
        if not self._ensure_record():
            return self._filter_failed()
        assert self.record is not None
        thread = space.stopped_thread()
        if not nnp and not procfs.has_cap_sys_admin(space.pid):
            res = self._call(linux.SYS_prctl, linux.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0, thread=thread)
            if res is None:
                self._refused("no seccomp filter of ptprobe's: jmp sites use int3")
                return self._filter_failed()
            if res != 0:
                self.notice(f"cannot set no_new_privs in process {space.pid}: using int3")
                return self._filter_failed()
        space.mem.write(self.record + _FILTER_AT, program)
        fprog = linux.SockFprog(len(program) // ctypes.sizeof(linux.SockFilter), self.record + _FILTER_AT)
        space.mem.write(self.record + _FPROG_AT, bytes(fprog))
        res = self._call(linux.SYS_seccomp, linux.SECCOMP_SET_MODE_FILTER,
                         linux.SECCOMP_FILTER_FLAG_TSYNC, self.record + _FPROG_AT, thread=thread)
        if res is None:
            self._refused("no seccomp filter of ptprobe's: jmp sites use int3")
            return self._filter_failed()
        if res != 0:
            why = f"thread {res} could not be synchronised" if res > 0 else f"error {-res}"
            self.notice(f"cannot install the seccomp filter in process {space.pid} ({why}): using int3")
            return self._filter_failed()
        self._record_flags |= FLAG_FILTER | (FLAG_FILTER_WATCH if self.watch else 0)
        self._write_header()
        space.filter_installed(program, self.watch)
        try:
            _, stopped = space.syscall(arch.SLOT_SYSCALL_NR, thread=thread)
        except SyscallRefusedError:
            stopped = False
        if not stopped:
            self.notice(f"another seccomp filter in process {space.pid} overrules ptprobe's: using int3")
            self._record_flags |= FLAG_FILTER_FAILED
            self._write_header()
            space.filter_state = "failed"
            return False
        space.filter_state = "installed"
        return True

    def _slots_refused(self, why: str) -> bool:
        """Slots cannot be used in this process (a filter of its own stands in the way)."""
        if not self.slot_refusal:
            self.notice(f"process {self.space.pid}: {why}: jmp sites use int3")
        self.slot_refusal = why
        return self._filter_failed()

    def _filter_failed(self) -> bool:
        self.space.filter_state = "failed"
        return False

    # --- sites --------------------------------------------------------------------------
    def prepare(self, address: int, obj: Optional[LoadedObject], file_code: bytes,
                insn: arch.Instruction, entry_nops: bool = False) -> Site:
        """Decide how to arm *address* (not yet written). *file_code* holds the file's bytes there."""
        space = self.space
        site = self.sites.get(address)
        if site is not None:
            return site
        host = self.sites.get(address - 1)
        if host is not None and host.patch_at <= address < host.resume:
            # the long NOP of a nop1+nop5/nop10 site probed on its own: the same patch
            # serves both, and each pass runs this site's probes right after the host's
            site = Site(address, space, obj, host.mechanism, host.patch_at, b"", b"", host.resume,
                        insn=insn, slot=host.slot, slot_kind=host.slot_kind, covered_by=host, armed=True)
            host.chained.append(site)
            host.counting_only = False
            self.sites[address] = site
            return site
        jmp = arch.classify_site(file_code, entry_nops)
        if jmp is not None and jmp.jmp_offset and address + 1 in self.sites:
            jmp = None      # its long NOP is a site of its own already: arm only the nop1
        if jmp is not None:
            patch_at = address + jmp.jmp_offset
            original = file_code[jmp.jmp_offset:jmp.jmp_offset + 5]
            resume = address + jmp.resume_offset
        else:
            patch_at = address
            original = file_code[:1]
            resume = address + insn.size
        current = space.mem.read(patch_at, len(original))
        ours = False
        if current != original:
            ours = self._recognise_jmp(patch_at, current, resume)
            if not ours:
                raise SitePatchedError(
                    f"the code at {address:#x} in process {space.pid} differs from the file "
                    f"({current.hex()} instead of {original.hex()}): already patched by someone else", address)
        if jmp is not None and self.use_seccomp and self._ensure_filter():
            slot = self._get_slot(patch_at, resume, obj)
            if slot is not None:
                site = Site(address, space, obj, "jmp", patch_at, original, arch.jmp_rel32(patch_at, slot),
                            resume, insn=insn, slot=slot, slot_kind=self.pages[slot & ~0xFFF].kind, target=slot)
                site.armed = ours       # an earlier ptprobe's jmp is there: aim() retargets it
                self.sites[address] = site
                self.slot_sites[slot + arch.SEED_SLOT_SIZE] = site
                return site
        if ours:
            # an earlier ptprobe's jmp, now to be served by int3: repair it first
            space.mem.write(patch_at, original)
        # int3 goes on the first byte of the site (the 90 of a combo), so that
        # the trap is reported at address + 1 whatever the site's form
        site = Site(address, space, obj, "int3", address, file_code[:1], b"\xcc", resume, insn=insn)
        if jmp is not None:
            site.emulate = True          # the whole NOP (or combo) is skipped
            if not self.use_seccomp:
                pass
            elif space.filter_state != "installed":
                site.fallback_reason = self.slot_refusal or "no seccomp filter"
            elif any((kind, resume) in self.slot_owner for kind in STOP_KINDS):
                site.fallback_reason = "its slot, from an earlier attach, is of the other kind"
            else:
                site.fallback_reason = "no free slot within reach"
        elif arch.is_nop(insn):
            site.emulate = True
        else:
            site.xol = self._get_xol(insn, obj)
        self.sites[address] = site
        return site

    def _recognise_jmp(self, patch_at: int, current: bytes, resume: int) -> bool:
        """Is *current* a jmp an earlier ptprobe left at *patch_at*: into a slot
        of this site's, or into a recording stub?"""
        if len(current) != 5 or current[0] != 0xE9:
            return False
        target = (patch_at + 5 + int.from_bytes(current[1:], "little", signed=True)) & ((1 << 64) - 1)
        page = self.pages.get(target & ~0xFFF)
        if page is None or page.kind == "xol":
            return False
        if page.kind == "stub":
            return True
        return self.slot_owner.get((page.kind, resume)) == target

    def write(self, sites: Iterable[Site]) -> None:
        """Write the patches of *sites* (one write per site)."""
        for site in sites:
            if site.armed:
                continue
            if site.mechanism == "jmp" and len(site.original) == 5 and site.original != arch.NOP5:
                # five one-byte NOPs: a thread stopped between them moves past them first
                self.space.move_threads(site.patch_at + 1, site.patch_at + 5, site.patch_at + 5)
            self.space.mem.write(site.patch_at, site.patched)
            site.armed = True
            if site.mechanism == "int3":
                self.int3_sites[site.address + 1] = site
                self.retired.pop(site.address + 1, None)

    def disarm(self, site: Site) -> None:
        """Put the original bytes back at *site*."""
        if site.covered_by is not None:
            if site in site.covered_by.chained:
                site.covered_by.chained.remove(site)
            site.armed = False
            self.sites.pop(site.address, None)
            return
        if site.armed:
            try:
                self.space.mem.write(site.patch_at, site.original)
            finally:
                site.armed = False
        self.sites.pop(site.address, None)
        if site.mechanism == "int3":
            self.int3_sites.pop(site.address + 1, None)
            self.retired[site.address + 1] = site
        if site.slot is not None and self.slot_sites.get(site.slot + arch.SEED_SLOT_SIZE) is site:
            self.slot_sites.pop(site.slot + arch.SEED_SLOT_SIZE, None)
        if site.stub_stop is not None:
            # a thread stopped at the stub's syscall after this must still be recognised
            self.retired_stubs[site.stub_stop] = site

    def demote_slots(self, reason: str) -> List[Site]:
        """Serve every jmp site by int3 from now on, because the slots' system call
        would no longer stop for ptprobe (*reason*); returns the sites moved. Each
        gets its NOP back, then an int3 on its first byte (emulated: the thread goes
        on after the NOP). A site keeps its slot: a thread that stops in it still
        counts as a hit there, finished by hand. Every thread must be stopped."""
        moved = []
        mem = self.space.mem
        for site in list(self.sites.values()):
            if site.mechanism != "jmp" or site.covered_by is not None:
                continue
            if site.armed:
                mem.write(site.patch_at, site.original)
            first = mem.read(site.address, 1)
            if site.armed:
                mem.write(site.address, b"\xcc")
                self.int3_sites[site.address + 1] = site
                self.retired.pop(site.address + 1, None)
            site.mechanism, site.patch_at, site.original, site.patched = "int3", site.address, first, b"\xcc"
            site.emulate, site.slot_kind, site.fallback_reason = True, None, reason
            site.action = "stop"                 # (a counting slot or stub is no longer reached)
            for extra in site.chained:
                extra.mechanism = "int3"
            moved.append(site)
        self.slot_refusal = reason
        self.space.filter_state = "failed"
        return moved

    def disarm_all(self) -> List[Site]:
        """Disarm every site; return those whose bytes could not be written back."""
        failed = []
        for site in list(self.sites.values()):
            try:
                self.disarm(site)
            except FaultError:
                failed.append(site)
        return failed

    def forget_object(self, obj: LoadedObject) -> None:
        """Drop the sites of an object that is no longer mapped (dlclose): nothing to restore."""
        for site in list(self.sites.values()):
            if site.obj is not None and site.obj.identity == obj.identity:
                site.armed = False
                self.disarm(site)

    def slot_frame_at(self, rip: int, after_syscall: bool = False) -> Optional[Tuple[int, int, int]]:
        """(slot address, offset, resume address) when *rip* lies inside an owned slot.

        At a syscall stop rip is just past the syscall (offset 16), which for
        seed slots is also where the next slot starts: *after_syscall* tells.
        """
        page = self.pages.get((rip - 1) & ~0xFFF if after_syscall else rip & ~0xFFF)
        if page is None or page.kind not in STOP_KINDS:
            return None
        if after_syscall:
            offset = arch.SEED_SLOT_SIZE
            slot = rip - offset
            if (slot - page.address) % page.stride:
                return None
        else:
            offset = (rip - page.address) % page.stride
            slot = rip - offset
            if offset > arch.SEED_SLOT_SIZE:
                return None   # in a slot's way back (or a seed page's restore routine): it finishes by itself
        resume = page.owners.get((slot - page.address) // page.stride)
        if resume is None:
            return None
        return slot, offset, resume

    def fork(self, space: Target) -> "Patcher":
        """The patcher of *space*, a copy of this address space made by fork: the
        same record, pages, slots, copies and sites (new :class:`Site` objects for
        the child, on the same probes)."""
        new = Patcher(space, find_record=False, **self.options)
        new.record = self.record
        new._record_flags = self._record_flags
        new._slot_records = self._slot_records
        new._nnp_hint_given = self._nnp_hint_given
        new.pages = {a: Page(p.address, p.kind, dict(p.owners), p.used) for a, p in self.pages.items()}
        new.slot_owner = dict(self.slot_owner)
        new.xol_owner = dict(self.xol_owner)
        new.sites = {address: replace(site, space=space, probes=list(site.probes),
                             returns=list(site.returns), hits=0)
                     for address, site in self.sites.items()}
        for copy in new.sites.values():
            copy.chained = [new.sites[c.address] for c in copy.chained if c.address in new.sites]
            if copy.covered_by is not None:
                copy.covered_by = new.sites.get(copy.covered_by.address)
        new.int3_sites = {a + 1: s for a, s in new.sites.items() if s.mechanism == "int3" and s.armed}
        new.slot_sites = {s.slot + arch.SEED_SLOT_SIZE: s for s in new.sites.values()
                          if s.slot is not None and s.armed and s.covered_by is None}
        new.stub_sites = {s.stub_stop: s for s in new.sites.values() if s.stub_stop is not None and s.armed}
        new.retired_stubs = dict(self.retired_stubs)
        new.retired = dict(self.retired)
        new.trampoline = self.trampoline
        new.return_stop = self.return_stop
        return new
