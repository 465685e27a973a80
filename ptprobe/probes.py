"""Probes: from a spec to armed sites, in every traced address space.

* :class:`Probe` -- one probe (public): its spec, handler, hit count and sites,
  and its arguments at a hit (it is the :class:`~ptprobe.hit.ArgumentSource`
  of its hits).
* :class:`Probes` -- the session's probes: resolving a spec into link-time
  locations of an ELF file (checked by decoding), arming them in each address
  space through its :class:`~ptprobe.patching.Patcher`, USDT arguments and
  semaphores, watching the dynamic loader so that libraries mapped later get
  their probes, and following copies (fork) and new images (exec).

Every arming call expects the world stopped; :class:`Probes` asks the loop for
it where it is not.
"""

from __future__ import annotations

import fnmatch
import os
from typing import Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Set, Tuple, Union

from . import arch, linux, procfs, search, usdt
from .elf import R_X86_64_64, R_X86_64_GLOB_DAT, R_X86_64_IRELATIVE, R_X86_64_JUMP_SLOT, ElfFile, Symbol, UsdtNote
from .engine.loop import EventLoop
from .errors import (InstructionBoundaryError, ObjectFileError, ProbeSpecError, PtprobeError, SymbolNotFoundError,
                     TracerError)
from .engine.returns import check_shadow_stack
from .hit import Hit, ReturnHit, Value
from .latency import Histogram
from .objects import LoadedObject, open_elf
from .patching import Site
from .spec import ProbeSpec, parse_spec
from .tracee import AddressSpace, Process

Handler = Callable[[Hit], None]
#: SysV integer argument registers, the arguments of a uprobe.
ARG_REGISTERS = arch.ARGUMENT_REGISTERS


class Probe:
    """A probe armed at one or more sites; returned by :meth:`ptprobe.Session.probe`."""

    def __init__(self, spec: ProbeSpec, handler: Optional[Callable[..., None]], internal: bool = False,
                 mode: str = "stop") -> None:
        if mode not in ("stop", "record", "graph"):
            raise ValueError("mode must be 'stop', 'record' or 'graph'")
        self.spec = spec
        self.name = spec.text
        self._handler = handler
        self.internal = internal
        #: "stop": the handler gets a Hit while the thread is stopped; "record": the
        #: program records the hit itself and the handler gets a Record afterwards;
        #: "graph": the program records each call's entry and exit (see calls)
        self.mode = mode
        #: graph: the matching functions without a patchable entry (not recorded)
        self.unpatchable: List[str] = []
        #: graph: the calls recorded (a CallTrace, set by the session)
        self.calls: Optional[object] = None
        #: False when a hit needs what a record cannot hold (the stub path is off)
        self.recordable = True
        self.stop_hits = 0           # hits counted by ptprobe at a stop
        self.errors = 0
        #: hits counted inside the program, by site (set by the session)
        self.in_program: Callable[[Site], int] = lambda site: 0
        self._baseline: Dict[int, int] = {}         # id(site) -> its in-program count when joined
        self.sites: List[Site] = []
        #: (device, inode) of the file a spec with a path names; None for object names
        self.identity: Optional[Tuple[int, int]] = None
        #: the real path a spec's PATH names (a deleted object mapped from there matches)
        self.realpath = ""
        #: the file a spec's PATH names is missing: why (raised if nothing mapped matches)
        self.missing: Optional[PtprobeError] = None
        #: identities of the files an object name means (python3 -> python3.11, libssl
        #: in the loader's directories), so that it matches them before they are mapped
        self.aliases: Set[Tuple[int, int]] = set()
        self.usdt_args: Dict[int, List[usdt.UsdtArg]] = {}     # site address -> parsed USDT args
        self.semaphores: Dict[int, int] = {}                   # site address -> run-time semaphore
        #: a return probe: the durations of the calls it saw, per function name (nanoseconds)
        self.latency: Dict[str, Histogram] = {}
        self.on_change: Callable[[Site], None] = lambda site: None

    @property
    def hits(self) -> int:
        """Every hit of the probe: counted at stops, and inside the program (summed
        over its sites in every process)."""
        inside = self.in_program
        baseline = self._baseline
        return self.stop_hits + sum(inside(site) - baseline.get(id(site), 0) for site in self.sites)

    def joined(self, site: Site) -> None:
        """The probe is on *site* from now on: its earlier in-program hits are not ours."""
        self._baseline[id(site)] = self.in_program(site)

    @property
    def handler(self) -> Optional[Handler]:
        """Called with each :class:`Hit`; None: the probe only counts. May be changed
        while armed (a site keeps the counting-only hot path only while none of its
        probes has a handler)."""
        return self._handler

    @handler.setter
    def handler(self, handler: Optional[Handler]) -> None:
        self._handler = handler
        for site in self.sites:
            self.on_change(site)

    # --- arguments (ArgumentSource) ----------------------------------------------------
    @property
    def is_return(self) -> bool:
        """True for a return probe (``uretprobe:``): its hits are :class:`ReturnHit`\\ s."""
        return self.spec.kind == "uretprobe"

    def argument_count(self, hit: Hit) -> int:
        if self.spec.kind == "usdt":
            return len(self.usdt_args.get(hit.address, ()))
        if isinstance(hit, ReturnHit):
            return len(hit.entry_args or ())
        return len(ARG_REGISTERS)

    def arguments(self, hit: Hit) -> List[Value]:
        if isinstance(hit, ReturnHit):
            return list(hit.entry_args or ())
        if self.spec.kind != "usdt":
            get = hit.regs.get
            return [get(name) for name in ARG_REGISTERS]
        return [self.argument(hit, index) for index in range(self.argument_count(hit))]

    def argument(self, hit: Hit, index: int) -> Value:
        if isinstance(hit, ReturnHit):
            return (hit.entry_args or ())[index]
        if self.spec.kind != "usdt":
            return hit.regs.get(ARG_REGISTERS[index])
        spec = self.usdt_args[hit.address][index]
        obj = hit.site.obj

        def resolve(sym: str) -> int:
            if obj is None:
                raise SymbolNotFoundError(f"no object for symbol {sym}", sym)
            return obj.runtime(obj.elf.get_symbol(sym).address)

        return usdt.evaluate(spec, hit.regs.get, hit.read, get_xmm=hit.xmm, resolve_symbol=resolve,
                             rip=hit.address)

    def argument_types(self, address: int) -> Optional[List[Tuple[int, bool, bool]]]:
        """(size in bytes, signed, floating) of each argument the USDT probe declares
        at site *address*; None for a uprobe, whose arguments are registers."""
        if self.spec.kind != "usdt":
            return None
        return [(arg.size, arg.signed, arg.is_float) for arg in self.usdt_args.get(address, ())]

    def hits_by_process(self) -> Dict[int, int]:
        """Hits per process id (of the processes it was armed in): the stops of its
        sites there (for a return probe, the entries) and the hits counted inside
        the program."""
        out: Dict[int, int] = {}
        inside, baseline = self.in_program, self._baseline
        for site in self.sites:
            hits = site.hits + inside(site) - baseline.get(id(site), 0)
            out[site.pid] = out.get(site.pid, 0) + hits
        return out

    def __repr__(self) -> str:
        return f"<Probe {self.name} hits={self.hits} sites={len(self.sites)}>"


# --------------------------------------------------------------------------- locations

_ENDBR64 = b"\xf3\x0f\x1e\xfa"
_PATCHABLE = (arch.NOP5, b"\x90" * 5)


def call_sites(elf: ElfFile, include: str = "*", exclude: Iterable[str] = ()) -> Tuple[List[int], List[str]]:
    """The patchable entries (link-time addresses) of the functions of *elf* whose
    names match *include* (patterns separated by commas: any of them) and none of
    *exclude*: the 5-byte NOP of ``-pg -mfentry -mnop-mcount`` or the five 1-byte
    NOPs of ``-fpatchable-function-entry=5``, at the function's start or after its
    ``endbr64``; and the names of the matching functions that have none."""
    excluded = list(exclude)
    included = [pattern for pattern in include.split(",") if pattern] or ["*"]
    sites: Dict[int, None] = {}
    skipped: List[str] = []
    for sym in elf.iter_symbols():
        if sym.kind != "func" or sym.ifunc or not sym.size or not any(fnmatch.fnmatchcase(sym.name, pattern) for pattern in included) \
                or any(fnmatch.fnmatchcase(sym.name, pattern) for pattern in excluded):
            continue
        code = elf.read(sym.address, 9, partial=True)
        if code[:5] in _PATCHABLE:
            sites.setdefault(sym.address)
        elif code[:4] == _ENDBR64 and code[4:9] in _PATCHABLE:
            sites.setdefault(sym.address + 4)
        else:
            skipped.append(sym.name)
    return sorted(sites), sorted(set(skipped))


class Location(NamedTuple):
    """A site of a spec in an ELF file: its link-time address, and the USDT note
    or the function symbol it comes from (an IFUNC symbol's address is its
    resolver's: the implementation is found in each process)."""

    address: int
    note: Optional[UsdtNote] = None
    symbol: Optional[Symbol] = None


def iter_locations(spec: ProbeSpec, elf: ElfFile) -> Iterator[Location]:
    """Each site of *spec* in *elf*; raises on a missing symbol or an address that
    is not an instruction start. A symbol pattern gives every function that
    matches and can be probed, each address once."""
    if spec.kind == "calls":
        for address in call_sites(elf, spec.symbol or "*", spec.exclude)[0]:
            yield Location(address)
        return
    if spec.kind == "usdt":
        found = False
        for note in elf.iter_usdt_notes():
            if fnmatch.fnmatchcase(note.provider, spec.provider or "*") and \
                    fnmatch.fnmatchcase(note.name, spec.name or "*"):
                found = True
                yield Location(note.address, note)
        if not found:
            raise SymbolNotFoundError(f"no USDT probe {spec.provider}:{spec.name} in {elf.path}",
                                      f"{spec.provider}:{spec.name}")
        return
    if spec.kind == "uretprobe":
        entry = _function_entry(spec, elf)
        sym = elf.find_symbol(spec.symbol) if spec.symbol is not None else None
        yield Location(entry, None, sym if sym is not None and sym.ifunc and sym.address == entry else None)
        return
    if spec.is_pattern:
        yield from _pattern_locations(spec, elf)
        return
    if spec.symbol is not None:
        sym = elf.get_symbol(spec.symbol)
        address = sym.address + spec.offset
        if spec.offset and sym.size and spec.offset >= sym.size:
            raise InstructionBoundaryError(
                f"{spec.symbol}+{spec.offset:#x} is past the end of {spec.symbol} (size {sym.size:#x})", address)
        start, size = sym.address, sym.size
    else:
        address = spec.address or 0
        covering = elf.symbol_at(address)
        if covering is not None:
            start, size = covering.address, covering.size
        else:
            start, size = _sweep_start(elf, address)
    if not elf.is_executable_address(address):
        raise InstructionBoundaryError(f"{address:#x} is not in executable code of {elf.path}", address)
    if address != start:
        code = elf.read(start, max(size, address - start + 16), partial=True)
        if not arch.is_instruction_start(code, start, address):
            raise InstructionBoundaryError(f"{address:#x} is not on an instruction boundary in {elf.path}", address)
    if arch.decode(elf.read(address, 16, partial=True), address) is None:
        raise InstructionBoundaryError(f"no valid instruction at {address:#x} in {elf.path}", address)
    yield Location(address, None, sym if spec.symbol is not None and not spec.offset else None)


def _pattern_locations(spec: ProbeSpec, elf: ElfFile) -> Iterator[Location]:
    """The functions of *elf* whose names match *spec*'s pattern, by address, each
    address once; those outside executable code are left out (and those without
    a valid instruction, when they are armed)."""
    pattern = spec.symbol or "*"
    by_address: Dict[int, Symbol] = {}
    matched = 0
    for sym in elf.iter_symbols():
        if sym.kind != "func" or not fnmatch.fnmatchcase(sym.name, pattern):
            continue
        matched += 1
        best = elf.symbol_at(sym.address)
        by_address.setdefault(sym.address, best if best is not None and best.address == sym.address else sym)
    if not matched:
        raise SymbolNotFoundError(f"no function matches {pattern!r} in {elf.path}", pattern)
    for address in sorted(by_address):
        if elf.is_executable_address(address):
            yield Location(address, None, by_address[address])


def _function_entry(spec: ProbeSpec, elf: ElfFile) -> int:
    """Where a return probe of *spec* goes in *elf*: the function's first
    instruction, or the one after its ``endbr64`` when that is a 5-byte NOP (a
    jmp site; the return address is at [rsp] there too). An address must be one
    of these for a function symbol (else ProbeSpecError: exit 2)."""
    if spec.symbol is not None:
        sym = elf.get_symbol(spec.symbol)
        start = sym.address
    else:
        address = spec.address or 0
        sym = elf.symbol_at(address)
        start = sym.address if sym is not None else address
        after_endbr = start + len(arch.ENDBR64)
        if sym is None or sym.kind != "func" or address not in (start, after_endbr) or (
                address == after_endbr and elf.read(start, 4, partial=True) != arch.ENDBR64):
            raise ProbeSpecError(f"{spec.text}: {address:#x} is not the start of a function in {elf.path} "
                                 "(a return probe goes on a function's entry)", spec.text)
    if sym.kind != "func" or not elf.is_executable_address(start):
        raise ProbeSpecError(f"{spec.text}: {sym.name} is not a function in {elf.path}", spec.text)
    code = elf.read(start, 16, partial=True)
    if code[:4] == arch.ENDBR64 and arch.classify_site(code[4:]) is not None:
        return start + 4
    if spec.address is not None and spec.address != start:
        return spec.address
    if arch.decode(code, start) is None:
        raise InstructionBoundaryError(f"no valid instruction at {start:#x} in {elf.path}", start)
    return start


def _sweep_start(elf: ElfFile, address: int) -> Tuple[int, int]:
    """Where to start decoding towards an *address* no symbol covers: the nearest
    function symbol below it, or its segment's start."""
    best = None
    for sym in elf.iter_symbols():
        if sym.kind == "func" and sym.address <= address and (best is None or sym.address > best.address):
            best = sym
    if best is None:
        for seg in elf.segments:
            if seg.vaddr <= address < seg.vaddr + seg.memsz:
                return seg.vaddr, address - seg.vaddr + 16
        return address, 16
    return best.address, address - best.address + 16


def resolve_ifunc(space: AddressSpace, obj: LoadedObject, sym: Symbol) -> Optional[int]:
    """The run-time address of the implementation the resolver of the IFUNC *sym*
    (of *obj*) chose in *space*, read from a GOT entry the dynamic loader filled:
    an IRELATIVE relocation of *obj* itself whose addend is the resolver, or an
    entry of any mapped object that imports *sym* by name. None while no entry
    shows it (relocations not done yet, or only lazy PLT entries)."""
    resolver = obj.runtime(sym.address)
    slots: List[int] = [obj.runtime(rel.offset) for rel in obj.elf.iter_relocations()
                        if rel.type == R_X86_64_IRELATIVE and rel.addend == sym.address]
    for other in space.objects.values():
        try:
            slots.extend(other.runtime(rel.offset) for rel in other.elf.relocations_of(sym.name)
                         if rel.type in (R_X86_64_GLOB_DAT, R_X86_64_JUMP_SLOT, R_X86_64_64))
        except PtprobeError:
            continue
    for slot in slots:
        try:
            value = int.from_bytes(space.mem.read(slot, 8), "little")
        except PtprobeError:
            continue
        # a resolved entry points into executable code of the defining object, not at
        # the resolver (and not at a lazy PLT stub of the importing object)
        if value != resolver and obj.contains(value) and obj.elf.is_executable_address(obj.link_time(value)):
            return value
    return None


def _label(obj: LoadedObject, vaddr: int, note: Optional[UsdtNote]) -> str:
    """What a site shows as its name: ``provider:name``, ``symbol``, ``symbol+0x4``."""
    if note is not None:
        return f"{note.provider}:{note.name}"
    sym = obj.elf.symbol_at(vaddr)
    if sym is None:
        return f"{obj.name}:{vaddr:#x}"
    return sym.name if vaddr == sym.address else f"{sym.name}+{vaddr - sym.address:#x}"


def matches(probe: Probe, obj: LoadedObject) -> bool:
    """Does *probe*'s PATH name *obj*? A path: the same file (device and inode), or
    a deleted object mapped from that path (the file was replaced or removed
    since). A name: the mapped object's name, or a file the name means."""
    spec = probe.spec
    if spec.is_path:
        if probe.identity is not None and obj.identity == probe.identity:
            return True
        return obj.deleted and obj.path == probe.realpath
    return search.name_matches(os.path.basename(obj.path), spec.path) or obj.identity in probe.aliases


# --------------------------------------------------------------------------- the table

class Probes:
    """The probes of a session, and the loader watch that arms them in libraries
    mapped later."""

    def __init__(self, loop: EventLoop, *, notice: Callable[[str], None],
                 site_changed: Callable[[Site], None], in_program: Callable[[Site], int]) -> None:
        self.loop = loop
        self.notice = notice
        self.site_changed = site_changed
        self.in_program = in_program
        self.probes: List[Probe] = []
        self.loader = Probe(parse_spec("uprobe:ld.so:_dl_debug_state"), self._on_loader, internal=True)
        self.loader.on_change = site_changed
        #: run mode's start: hold the world at the loader's first consistent state
        self.startup_pid = 0
        self.startup_reached = False

    def add(self, spec: Union[str, ProbeSpec], handler: Optional[Callable[..., None]],
            mode: str = "stop") -> Probe:
        """A new probe for *spec*, checked against its file when the spec names
        one (not armed yet)."""
        parsed = parse_spec(spec) if isinstance(spec, str) else spec
        probe = Probe(parsed, handler, mode=mode)
        probe.on_change = self.site_changed
        probe.in_program = self.in_program
        if parsed.is_path:
            probe.realpath = os.path.realpath(parsed.path)
            try:
                elf = open_elf(parsed.path)
            except ObjectFileError as exc:
                if os.path.lexists(parsed.path):
                    raise
                probe.missing = exc         # a deleted object mapped from there may still match
                return probe
            try:
                probe.identity = procfs.file_identity(parsed.path)
            except OSError as exc:
                raise TracerError(f"{parsed.path}: {exc.strerror}") from None
            if parsed.kind == "calls":
                sites, probe.unpatchable = call_sites(elf, parsed.symbol or "*", parsed.exclude)
                if not sites and not probe.unpatchable:
                    raise SymbolNotFoundError(
                        f"no function of {parsed.path} matches {parsed.symbol or '*'!r}"
                        + (f" (leaving out {', '.join(map(repr, parsed.exclude))})" if parsed.exclude else "")
                        + ("" if any(True for _ in elf.iter_symbols()) else " (it has no symbols: stripped?)"),
                        parsed.symbol or "*")
                if not sites:
                    raise SymbolNotFoundError(
                        f"no function of {parsed.path} matching {parsed.symbol or '*'!r} has a patchable entry "
                        f"(build with -pg -mfentry -mnop-mcount, or -fpatchable-function-entry=5); "
                        f"{len(probe.unpatchable)} matching function(s) have none", parsed.symbol or "*")
            for _ in iter_locations(parsed, elf):
                if parsed.is_pattern:
                    break       # one match is enough here: arming finds them all
        else:
            for path in filter(None, [search.find_program(parsed.path), *search.find_libraries(parsed.path)]):
                try:
                    probe.aliases.add(procfs.file_identity(path))
                except OSError:
                    continue
        return probe

    def all(self) -> List[Probe]:
        return self.probes + [self.loader]

    # --- arming ------------------------------------------------------------------------
    def arm(self, space: AddressSpace, probe: Probe, raise_errors: bool) -> bool:
        """Arm *probe* in every object of *space* it names; True if armed anywhere."""
        armed = False
        for obj in list(space.objects.values()):
            if not matches(probe, obj):
                continue
            if (id(probe), obj.identity) in space.armed:
                armed = True
                continue
            try:
                self._arm_in_object(space, probe, obj)
                armed = True
                if obj.deleted and not probe.internal:
                    how = "its mapped bytes" if obj.source == "memory" else "/proc/PID/map_files"
                    self.notice(f"{probe.name}: {obj.path} was replaced or removed since process {space.pid} "
                                f"mapped it: probing the mapped one (read from {how})")
            except PtprobeError as exc:
                if raise_errors:
                    raise
                self.notice(f"{probe.name}: not armed in process {space.pid}: {exc}")
        return armed

    def _arm_in_object(self, space: AddressSpace, probe: Probe, obj: LoadedObject) -> None:
        patcher = space.patcher
        if probe.is_return:
            check_shadow_stack(space.pid, procfs.read_status(space.pid))
        if probe.spec.kind == "calls":
            why = patcher.why_no_slots()
            if why is not None:            # (an int3 at every function entry would only slow it)
                raise TracerError(f"calls are recorded through jmp slots only, which process {space.pid} "
                                  f"cannot use: {why}")
        sites: List[Site] = []
        notes: List[Optional[UsdtNote]] = []
        labels: List[Optional[str]] = []
        seen: Set[int] = set()
        ifuncs: List[str] = []
        for location in iter_locations(probe.spec, obj.elf):
            vaddr, note, sym = location
            owner, label = obj, None
            if sym is not None and sym.ifunc and vaddr == sym.address:
                chosen = resolve_ifunc(space, obj, sym)
                if chosen is None:
                    ifuncs.append(f"{sym.name} (not resolved yet in process {space.pid}: its resolver, "
                                  "which runs once)")
                else:
                    owner = space.object_at(chosen) or obj
                    vaddr, label = owner.link_time(chosen), sym.name
                    impl = owner.elf.symbol_at(vaddr)
                    shown = impl.name if impl is not None and impl.address == vaddr else \
                        f"{owner.name}+{vaddr:#x}"
                    ifuncs.append(f"{sym.name} -> {shown} at {chosen:#x}")
            address = owner.runtime(vaddr)
            if address in seen:
                continue            # two IFUNCs resolved to one implementation (memcpy, memmove)
            seen.add(address)
            code = owner.elf.read(vaddr, 16, partial=True)
            insn = arch.decode(code, address)
            if insn is None:
                if probe.spec.is_pattern:
                    continue        # a function symbol on something that is not code
                raise InstructionBoundaryError(f"no valid instruction at {address:#x}", address)
            sites.append(patcher.prepare(address, owner, code, insn, entry_nops=probe.spec.kind == "calls"))
            notes.append(note)
            labels.append(label)
        if probe.is_return and sites:
            patcher.return_trampoline(sites[0].address)
        patcher.write(sites)
        space.armed.add((id(probe), obj.identity))
        if ifuncs and not probe.internal:
            if len(ifuncs) == 1:
                self.notice(f"{probe.name}: IFUNC {ifuncs[0]}")
            else:
                self.notice(f"{probe.name}: {len(ifuncs)} IFUNC symbols probed where process {space.pid} "
                            f"resolved them: {', '.join(ifuncs[:3])}{', ...' if len(ifuncs) > 3 else ''}")
        for site, note, label in zip(sites, notes, labels):
            if label and not site.label:
                site.label = label
            site.internal = site.internal or probe.internal
            if not site.label:
                site.label = _label(obj, obj.link_time(site.address), note)
            if note is not None:
                probe.usdt_args[site.address] = usdt.parse_args(note.args)
                if note.semaphore:
                    sem = obj.runtime(note.semaphore) if obj.elf.is_pie else note.semaphore
                    probe.semaphores[site.address] = sem
                    adjust_semaphore(space, sem, +1)
            watching = site.returns if probe.is_return else site.probes
            if probe not in watching:
                watching.append(probe)
                probe.joined(site)
                self.site_changed(site)
            if site not in probe.sites:
                probe.sites.append(site)
                if site.fallback_reason and not probe.internal:
                    self.notice(f"{probe.name}: site {site.address:#x} uses int3 ({site.fallback_reason})")

    def arm_everywhere(self, probe: Probe, processes: List[Process]) -> bool:
        """Arm a new *probe* in every process (the world is stopped); errors raise."""
        armed_any = False
        for proc in processes:
            if proc.exited:
                continue
            proc.space.refresh_objects()
            armed = self.arm(proc.space, probe, raise_errors=True)
            if not armed:
                # its object may be loaded later: watch the loader (only then: a
                # breakpoint there would outlive a ptprobe that is killed)
                self.watch_loader(proc.space)
            armed_any |= armed
        self.probes.append(probe)
        return armed_any

    # --- copies, new images, unmapped objects ------------------------------------------------
    def adopt_fork(self, space: AddressSpace) -> None:
        """*space* is a fork's copy: its sites (new objects) join their probes."""
        for site in space.patcher.sites.values():
            for probe in site.probes + site.returns:
                probe.sites.append(site)

    def after_exec(self, process: Process, former: AddressSpace) -> None:
        """*process* runs a new image: forget the old one's sites; arm the probes
        given by path again when the path is the new image's (or one of its
        libraries), and watch its loader."""
        if former.owner is process:         # (a vfork child leaves its parent's space intact)
            for probe in self.all():
                probe.sites = [s for s in probe.sites if s.space is not former]
        if self.loop.holding or not self.probes:
            return
        with self.loop.held():
            process.space.refresh_objects()
            for probe in self.probes:
                if probe.identity is not None:
                    self.arm(process.space, probe, raise_errors=False)
            self.watch_loader(process.space)

    def forget_unmapped(self, space: AddressSpace) -> None:
        """Sites and semaphores of objects the program unmapped (dlclose) are gone with them."""
        for obj in space.unmapped:
            space.patcher.forget_object(obj)
            space.armed = {k for k in space.armed if k[1] != obj.identity}
            for address in list(space.semaphores):
                if obj.contains(address):
                    del space.semaphores[address]
        space.unmapped.clear()

    def restore(self, space: AddressSpace) -> List[str]:
        """Put back every site's original bytes and undo our semaphore increments
        in *space*; returns what could not be restored."""
        problems = [f"process {space.pid}: cannot restore the site at {site.address:#x}"
                    for site in space.patcher.disarm_all()]
        for address, count in space.semaphores.items():
            if count > 0:
                try:
                    adjust_semaphore(space, address, -count)
                except PtprobeError as exc:
                    problems.append(f"process {space.pid}: cannot restore a semaphore: {exc}")
        return problems

    def release(self, space: AddressSpace) -> None:
        """A forked child is let go: restore its copy (errors raise)."""
        problems = self.restore(space)
        if problems:
            raise TracerError("; ".join(problems))

    # --- the dynamic loader -----------------------------------------------------------------
    def watch_loader(self, space: AddressSpace) -> bool:
        """Arm the loader probe (``_dl_debug_state``) in *space*; True if armed
        (also before)."""
        space.refresh_objects()
        for obj in space.objects.values():
            if os.path.basename(obj.path).startswith("ld-linux") and obj.elf.find_symbol("_dl_debug_state"):
                if (id(self.loader), obj.identity) in space.armed:
                    return True
                try:
                    self._arm_in_object(space, self.loader, obj)
                except PtprobeError as exc:
                    self.notice(f"cannot watch the dynamic loader in process {space.pid}: {exc}")
                    return False
                return True
        return False

    def _on_loader(self, hit: Hit) -> None:
        space = hit.site.space
        obj = hit.site.obj
        r_debug = obj.elf.find_symbol("_r_debug") if obj is not None else None
        if r_debug is not None and obj is not None:
            at = obj.runtime(r_debug.address) + linux.R_STATE_OFFSET
            if int.from_bytes(space.mem.read(at, 4), "little") != linux.RT_CONSISTENT:
                return          # RT_ADD / RT_DELETE: not consistent yet
        new = space.refresh_objects()
        self.forget_unmapped(space)
        if hit.pid == self.startup_pid and not self.startup_reached:
            self.startup_reached = True
            self.loop.hold()        # run mode: the libraries are mapped; stop here
            return
        if not new:
            return
        with self.loop.world_stopped():
            for probe in self.probes:
                self.arm(space, probe, raise_errors=False)


def adjust_semaphore(space: AddressSpace, address: int, delta: int) -> None:
    """Add *delta* to the 16-bit USDT semaphore at *address* (kept in 0..0xFFFF)
    and remember our part of it."""
    value = int.from_bytes(space.mem.read(address, 2), "little")
    value = max(0, min(0xFFFF, value + delta))
    space.mem.write(address, value.to_bytes(2, "little"))
    space.semaphores[address] = space.semaphores.get(address, 0) + delta
