"""Actions inside the program: counting slots, recording stubs, the data pages
and the consumer of their records.

:class:`Actions` decides, for each jmp site, what a hit does (``stop``,
``count`` or ``record``; see ``docs/design.md``, "Actions inside the
program"), gives each address space its :class:`~ptprobe.datapages.DataRegion`
when a site first needs one, writes the counting slot or recording stub and
aims the site's jmp at it. It also consumes the records: it reads every
region's ring, turns each record into a :class:`~ptprobe.hit.Record` and calls
the probes' handlers, in the order the hits happened per thread (one ring per
address space: the order of reservation). The loop calls :meth:`Actions.drain`
when it has nothing else to do, and the hits part calls it before a recording
probe's hit that had to stop (so that a thread's records stay in order), and
when a stub stops because the ring is full.
"""

from __future__ import annotations

import struct
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from .. import arch, codegen, linux, usdt
from ..calltrace import CallTrace
from ..datapages import CPU_SHIFT, DataRegion
from ..errors import PtprobeError
from ..hit import UNREADABLE, Record
from ..patching import Site
from ..tracee import AddressSpace, Process, Thread
from .calls import SpaceGraph, entry_routine, exit_trampoline

ErrorReport = Callable[[object, object, BaseException], None]
ARG_REGISTERS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
_U64 = struct.Struct("<Q")
#: a call record: header, time (TSC), thread key, depth (entry) or frames lost (exit)
_CALL_RECORD = struct.Struct("<4Q")
assert codegen.ENTRY_RECORD == codegen.EXIT_RECORD == _CALL_RECORD.size
_THREAD_MASK = (1 << codegen.FAULT_SHIFT) - 1
_AT_HWCAP2 = 26
_HWCAP2_FSGSBASE = 2
#: A thread whose ring-full stops find nothing to drain this many times in a row
#: drops its record (its own unfinished record may be what blocks the ring).
_FULL_STOPS_WITHOUT_PROGRESS = 64
#: At most this much of a ring is read per idle call of the loop, and a quarter of
#: the ring at a ring-full stop: the writer goes on while the rest is read.
_IDLE_DRAIN_BYTES = 64 << 10
# A committed call record's header, byte by byte (little-endian): the stub id in
# bits 0-19, the size in words from bit 20 (4: byte 2's high nibble), the pending
# bit 28 (byte 3) clear. Where every stub of a space writes call records, a header
# is a call record's exactly when bytes 2 and 3 say so (0 and pending fail).
assert codegen.ENTRY_RECORD == codegen.EXIT_RECORD == _CALL_RECORD.size
assert codegen.HEADER_SIZE_SHIFT == 20 and codegen.HEADER_PENDING == 1 << 28
_SIZE_BYTE = bytes(0 if b >> 4 == _CALL_RECORD.size // 8 else 1 for b in range(256))   # byte 2 -> 0 if right

Decoder = Callable[[int], object]


def _fsgsbase(pid: int) -> bool:
    """Can the program's threads use rdfsbase (AT_HWCAP2 has FSGSBASE)?"""
    try:
        with open(f"/proc/{pid}/auxv", "rb") as fh:
            data = fh.read()
    except OSError:
        return False
    for i in range(0, len(data) - 15, 16):
        key, value = struct.unpack_from("<QQ", data, i)
        if key == _AT_HWCAP2:
            return bool(value & _HWCAP2_FSGSBASE)
    return False


def _flags_dead(site: Site) -> bool:
    """Can the site's code clobber the flags? At a USDT site (the compiler treats
    every asm statement as clobbering them) and at a function's entry (or right
    after its endbr64), they are dead."""
    if any(getattr(p, "spec").kind == "usdt" for p in site.probes):
        return True
    obj = site.obj
    if obj is None:
        return False
    vaddr = obj.link_time(site.address)
    sym = obj.elf.symbol_at(vaddr)
    if sym is None:
        return False
    if vaddr == sym.address:
        return True
    return vaddr == sym.address + 4 and obj.elf.read(sym.address, 4, partial=True) == b"\xf3\x0f\x1e\xfa"


class _Stub:
    """What the consumer knows of one recording stub: a site's records ("record"),
    or a function's entries or exits ("entry", "exit": call graphs)."""

    __slots__ = ("site", "decoders", "size", "unpack", "plain", "kind", "name")

    def __init__(self, site: Site, decoders: List[Decoder], size: int, kind: str = "record") -> None:
        self.site = site
        self.decoders = decoders
        self.size = size
        self.kind = kind
        self.name = site.label.partition("+")[0]          # a function's name (after its endbr64: +0x4)
        # time, thread, then the values (after the header)
        self.unpack = struct.Struct(f"<{size // 8 - 1}Q").unpack_from
        self.plain = all(d is int for d in decoders)        # raw 64-bit values: no decoding


class _SpaceData:
    """One address space's region, stubs and thread keys."""

    def __init__(self, space: AddressSpace, region: DataRegion, thread_key: str) -> None:
        self.space = space
        self.region = region
        self.thread_key = thread_key
        self.pid = space.pid
        self.stubs: List[Optional[_Stub]] = []
        self.keys: Dict[int, int] = {}          # thread key (fs_base) -> tid
        self.graph: Optional[SpaceGraph] = None
        #: the committed headers of call records: header -> (0 entry / 1 exit, function)
        self.call_headers: Dict[int, Tuple[int, str]] = {}
        #: functions whose entry stub found no room (said once)
        self.no_room = 0


class Actions:
    """The in-program actions of every address space of a session."""

    def __init__(self, *, ring_size: int, lossless: bool, notice: Callable[[str], None],
                 on_handler_error: ErrorReport) -> None:
        self.ring_size = ring_size
        self.lossless = lossless
        self.notice = notice
        self.on_handler_error = on_handler_error
        self._data: Dict[int, _SpaceData] = {}             # id(space) -> its data
        self._spaces: Dict[int, AddressSpace] = {}
        self._unavailable: Dict[int, str] = {}              # id(space) -> why it has no region
        self._tsc0 = linux.rdtsc()
        self._ns0 = time.monotonic_ns()
        self._ns_per_tick = 0.0
        self._calibrate_at = self._ns0 + 20_000_000
        self._full_stops: Dict[int, int] = {}               # tid -> ring-full stops without progress
        self._frozen: Dict[int, int] = {}                   # id(site) -> its final count
        self._stops: Dict[int, Tuple[str, _SpaceData]] = {} # exit trampolines' stops: rip -> (kind, data)
        #: the calls of call-graph probes (mode "graph"), once one is armed
        self.calls: Optional[CallTrace] = None
        self.records = 0
        #: set while a region with recording stubs exists: the loop must call drain()
        self.recording = False

    # --- choosing and applying actions ----------------------------------------------------
    def desired(self, site: Site) -> str:
        """What a hit of *site* should do now."""
        if site.mechanism != "jmp" or site.chained or site.covered_by is not None or site.internal \
                or site.returns:
            return "stop"           # (a return probe's entry replaces the return address: a stop)
        modes = [(getattr(p, "mode", "stop"), p.handler) for p in site.probes]
        if any(mode == "stop" and handler is not None for mode, handler in modes):
            return "stop"
        if any(mode == "graph" for mode, _ in modes):
            return "graph" if all(mode != "record" for mode, _ in modes) else "stop"
        if any(mode == "record" for mode, _ in modes):
            return "record" if all(getattr(p, "recordable", True) for p in site.probes) else "stop"
        return "count"

    def update(self, site: Site) -> None:
        """Give *site* the action its probes need (every thread stopped, or the site
        not armed yet). A site that cannot have it keeps stopping, and says why."""
        want = self.desired(site)
        if want == site.action and (want == "stop" or site.target not in (None, site.slot)):
            return
        space = site.space
        patcher = space.patcher                        # type: ignore[attr-defined]
        if want == "stop":
            site.action = "stop"
            if site.slot is not None:
                patcher.aim(site, site.slot)
            return
        try:
            data = self._data_of(space)                # type: ignore[arg-type]
        except PtprobeError as exc:
            self.notice(f"{site.label or hex(site.address)}: no data pages in process {space.pid} ({exc}): "
                        "its hits stop the program")
            data = None
        if data is None:
            return
        region = data.region
        if site.counter is None:
            site.counter = region.new_counter()
        if want == "count":
            slot = patcher.count_slot(site)
            if slot is None:
                return
            patcher.space.mem.write(slot, codegen.count_slot_code(
                slot, site.resume, site.counter, cpu_shift=CPU_SHIFT,
                save_flags=not _flags_dead(site), per_cpu=region.per_cpu))
            site.action = "count"
            patcher.aim(site, slot)
            return
        if want == "graph":
            self._graph_site(data, site)
            return
        plan = self._plan(site)
        if plan is None:
            return
        loads, decoders = plan
        stub = codegen.RecordStub(stub_id=len(data.stubs), site=site.address, resume=site.resume,
                                  counter=site.counter, loads=loads, save_flags=not _flags_dead(site),
                                  thread=data.thread_key, lossless=self.lossless)
        body = codegen.record_stub_body(stub, region.ring_layout())
        at = patcher.stub_room(site, len(body) + arch.JMP_REL32_SIZE)
        if at is None:
            return
        code = codegen.place_stub(body, at, site.resume)
        data.stubs.append(_Stub(site, decoders, stub.record_size))
        patcher.set_stub(site, at, code, codegen.syscall_return_offset(code, at))
        site.action = "record"
        self.recording = True
        patcher.aim(site, at)

    # --- call graphs ---------------------------------------------------------------------
    def _graph_site(self, data: _SpaceData, site: Site) -> None:
        """Give function-entry *site* its entry stub (and its space the exit trampoline)."""
        if data.thread_key != codegen.THREAD_FSBASE:
            self.notice(f"{site.label}: call graphs need rdfsbase (FSGSBASE), which process {data.pid} "
                        "cannot use: not recorded")
            return
        graph = data.graph or self._graph_of(data, site)
        if graph is None:
            self._no_room(data, site)
            return
        if self.calls is None:
            self.calls = CallTrace()
        patcher = data.space.patcher
        entry_id = len(data.stubs)
        data.stubs.append(_Stub(site, [int], codegen.ENTRY_RECORD, kind="entry"))
        exit_id = len(data.stubs)
        data.stubs.append(_Stub(site, [int], codegen.EXIT_RECORD, kind="exit"))
        entry_header = codegen.make_header(entry_id, codegen.ENTRY_RECORD)
        exit_header = codegen.make_header(exit_id, codegen.EXIT_RECORD)
        assert exit_header - entry_header == codegen.GRAPH_EXIT_HEADER_DELTA
        at = patcher.stub_room(site, codegen.GRAPH_STUB_SIZE)
        if at is None:
            self._no_room(data, site)
            return
        name = data.stubs[entry_id].name
        data.call_headers[entry_header] = (0, name)
        data.call_headers[exit_header] = (1, name)
        patcher.set_stub(site, at, codegen.graph_entry_stub(entry_header, graph.entry, at, site.resume), None)
        site.action = "graph"
        self.recording = True
        patcher.aim(site, at)

    def _no_room(self, data: _SpaceData, site: Site) -> None:
        if not data.no_room:
            self.notice(f"process {data.pid}: no room for more call-graph code (the trampoline pages are at "
                        f"their maximum): calls of {site.label} and of the functions armed after it are not "
                        "recorded, and stop the program")
        data.no_room += 1

    def _graph_of(self, data: _SpaceData, site: Site) -> Optional[SpaceGraph]:
        """The space's call graph: its exit trampoline and entry routine written, its
        threads entered."""
        patcher = data.space.patcher
        layout = data.region.ring_layout()
        code, full, broken = exit_trampoline(layout, data.region.graph_layout(0), self.lossless)
        at = patcher.code_room(len(code), [site.address], site.obj)
        entry_code, entry_stops = entry_routine(layout, data.region.graph_layout(at or 0), self.lossless)
        entry = patcher.code_room(len(entry_code), [site.address], site.obj) if at is not None else None
        if at is None or entry is None:
            return None
        data.space.mem.write(at, code)
        data.space.mem.write(entry, entry_code)
        graph = SpaceGraph(data.space, data.region, at, (at + full if full >= 0 else -1, at + broken), entry)
        data.graph = graph
        if full >= 0:
            self._stops[at + full] = ("full", data)
        self._stops[at + broken] = ("broken", data)
        self._stops[entry + entry_stops[0]] = ("enter", data)
        if len(entry_stops) > 1:
            self._stops[entry + entry_stops[1]] = ("full", data)
        for thread in data.space.owner.threads.values():
            if thread.stopped and not thread.exited:
                self._note(data, thread)
        return graph

    def thread_gone(self, thread: Thread) -> None:
        """*thread* exited: its pending calls stay unfinished; its shadow stack is free."""
        data = self._data.get(id(thread.process.space))
        if data is None:
            return
        if data.graph is not None:
            self._drain_space(data)
            data.graph.thread_gone(thread.tid)
            if self.calls is not None:
                self.calls.thread_gone(data.pid, thread.tid)

    def restore(self, space: AddressSpace) -> List[str]:
        """Every return address the call graphs replaced in *space* back (the world
        stopped, before detaching)."""
        data = self._data.get(id(space))
        if data is None or data.graph is None:
            return []
        return data.graph.restore()

    def release(self, child: AddressSpace) -> List[str]:
        """A fork's child is let go before it ran: its copied return addresses back
        (it must never return through the exit trampoline: its shadow stacks are
        its parent's)."""
        parent = child.owner.forked_from
        data = self._data.get(id(parent)) if parent is not None else None
        if data is None or data.graph is None:
            return []
        return data.graph.restore(child.mem)

    def on_stop(self, thread: Thread, raw: linux.Registers) -> bool:
        """A slot-syscall stop in a stub or an exit trampoline: handle it (True), or
        leave it to the hits part (False)."""
        rip = raw.rip
        patcher = thread.process.space.patcher
        kind = None
        if rip in patcher.stub_sites or rip in patcher.retired_stubs:
            kind = "full"
        else:
            known = self._stops.get(rip)
            if known is not None:
                kind = known[0]
        if kind is None:
            return False
        if kind == "enter":
            # a thread not in the call graph's table yet: enter it, let it look again
            data = self._data.get(id(thread.process.space))
            entered = data is not None and data.graph is not None and self._note(data, thread, force=True)
            raw.orig_rax = linux.U64
            raw.rax = 0 if entered else linux.U64
            linux.set_regs(thread.tid, raw)
            return True
        if kind == "broken":
            data = self._data.get(id(thread.process.space))
            if data is None or data.graph is None or not data.graph.resolve(thread, raw):
                self.notice(f"thread {thread.tid}: a return the call graph could not follow "
                            f"(at {rip:#x}): the program gets SIGILL")
                raw.orig_rax = linux.U64
                linux.set_regs(thread.tid, raw)
            return True
        # a stub or trampoline found the ring full: drain it, then let it try again
        # (0) or drop its record (-1); the syscall itself is skipped
        retry = self.ring_full(thread)
        raw.orig_rax = linux.U64
        raw.rax = 0 if retry else linux.U64
        linux.set_regs(thread.tid, raw)
        return True

    def _data_of(self, space: AddressSpace) -> Optional[_SpaceData]:
        key = id(space)
        data = self._data.get(key)
        if data is None:
            if key in self._unavailable:
                return None
            region = DataRegion.create(space, self.ring_size)
            data = _SpaceData(space, region,
                              codegen.THREAD_FSBASE if _fsgsbase(space.pid) else codegen.THREAD_RSP)
            self._data[key] = data
            self._spaces[key] = space
            for thread in space.owner.threads.values():
                if thread.stopped:
                    self._note(data, thread)
        return data

    def _plan(self, site: Site) -> Optional[Tuple[List[codegen.Load], List[Decoder]]]:
        """How the stub of *site* gets its arguments, and how they are read back."""
        kinds = {getattr(p, "spec").kind for p in site.probes}
        if kinds == {"uprobe"}:
            return ([codegen.Load("reg", reg=r) for r in ARG_REGISTERS],
                    [int for _ in ARG_REGISTERS])
        if kinds != {"usdt"}:
            return None
        args = None
        for probe in site.probes:
            args = getattr(probe, "usdt_args", {}).get(site.address, args)
        if args is None:
            return None
        obj = site.obj
        loads: List[codegen.Load] = []
        decoders: List[Decoder] = []
        for arg in args:
            plan = _usdt_load(arg, site, obj)
            if plan is None:
                return None
            loads.append(plan[0])
            decoders.append(plan[1])
        return loads, decoders

    # --- counts --------------------------------------------------------------------------
    def count(self, site: Site) -> int:
        """Hits of *site* counted inside the program (0 when it has no counter)."""
        if site.counter is None:
            return 0
        frozen = self._frozen.get(id(site))
        if frozen is not None:
            return frozen
        data = self._data.get(id(site.space))
        return data.region.count(site.counter) if data is not None else 0

    def freeze(self, threads: List[Thread]) -> None:
        """The session ends (every thread stopped): fix every site's count for good,
        adding the hits of threads stopped in a counting slot before its increment
        (they passed the site while it was armed, and count after we are gone)."""
        inflight: Dict[int, int] = {}
        for thread in threads:
            if not thread.stopped or thread.exited:
                continue
            patcher = thread.process.space.patcher
            try:
                rip = linux.get_rip(thread.tid)
            except PtprobeError:
                continue
            page = patcher.pages.get(rip & ~0xFFF)
            if page is None or page.kind != "count":
                continue
            slot = rip - (rip - page.address) % page.stride
            resume = page.owners.get((slot - page.address) // page.stride)
            site = next((s for s in patcher.sites.values() if s.resume == resume and s.counter is not None), None)
            if site is None:
                continue
            inc = codegen.count_slot_inc_offset(cpu_shift=CPU_SHIFT, save_flags=not _flags_dead(site),
                                                per_cpu=self._data[id(site.space)].region.per_cpu)
            if rip - slot <= inc:
                inflight[id(site)] = inflight.get(id(site), 0) + 1
        for data in self._data.values():
            for site in data.space.patcher.sites.values():
                if site.counter is not None and id(site) not in self._frozen:
                    self._frozen[id(site)] = data.region.count(site.counter) + inflight.get(id(site), 0)

    @property
    def drops(self) -> int:
        return sum(data.region.drops for data in self._data.values())

    # --- threads, forks, execs ------------------------------------------------------------
    def thread_seen(self, thread: Thread) -> None:
        """*thread* is stopped (and was not seen stopped before): learn its key."""
        data = self._data.get(id(thread.process.space))
        if data is not None:
            self._note(data, thread)

    def _note(self, data: _SpaceData, thread: Thread, force: bool = False) -> bool:
        """Learn *thread*'s key (and enter it in the call graph's table); True if it
        is in the table now."""
        try:
            regs = linux.get_regs(thread.tid)
        except PtprobeError:
            return False
        if data.thread_key == codegen.THREAD_FSBASE:
            key = regs.fs_base
        else:
            key = _stack_key(data.space, regs.rsp)
        if key and data.keys.get(key) != thread.tid:
            self._drain_space(data)              # records by the key's former owner first
            data.keys[key] = thread.tid
        if data.graph is not None and data.thread_key == codegen.THREAD_FSBASE and regs.fs_base:
            if data.graph.enter(thread.tid, regs.fs_base):
                return True
            self.notice(f"thread {thread.tid}: no shadow stack left: its calls get no exit")
        return False

    def fork(self, parent: AddressSpace, child: Process) -> None:
        """*child* (stopped, not run yet) is a fork's copy of *parent*: give it its
        own region at the same addresses, so that counts and records stay apart."""
        data = self._data.get(id(parent))
        if data is None:
            return
        space = child.space
        try:
            region = data.region.fork(space)
        except PtprobeError as exc:
            self.notice(f"child {child.pid}: cannot give it data pages of its own ({exc}); "
                        "its counts and records go to its parent's")
            return
        copy = _SpaceData(space, region, data.thread_key)
        copy.stubs = [None if s is None else _Stub(space.patcher.sites.get(s.site.address, s.site),
                                                   s.decoders, s.size, s.kind) for s in data.stubs]
        if data.graph is not None:
            copy.graph = data.graph.fork(space, region)
            copy.call_headers = dict(data.call_headers)
        self._data[id(space)] = copy
        self._spaces[id(space)] = space
        for thread in child.threads.values():
            if thread.stopped:
                self._note(copy, thread)

    # --- consuming records -------------------------------------------------------------------
    def drain(self, limit: Optional[int] = None) -> int:
        """Deliver the committed records of every region (at most about *limit*
        bytes of each); return how many."""
        if not self._data:
            return 0
        return sum(self._drain_space(data, limit) for data in list(self._data.values()))

    def drain_some(self) -> int:
        """Deliver a bounded share of the records (the loop's idle work: the loop
        stays quick to answer stops while the program writes more)."""
        return self.drain(_IDLE_DRAIN_BYTES)

    def _clock(self) -> Tuple[int, int, float]:
        """(tsc0, ns0, ns per tick) to turn a record's TSC into CLOCK_MONOTONIC ns,
        recalibrated against the clock at most every 200 ms."""
        now = time.monotonic_ns()
        if now >= self._calibrate_at or not self._ns_per_tick:
            ticks = linux.rdtsc() - self._tsc0
            if ticks > 0:
                self._ns_per_tick = (time.monotonic_ns() - self._ns0) / ticks
            self._calibrate_at = now + 200_000_000
        return self._tsc0, self._ns0, self._ns_per_tick or 1.0

    def _drain_space(self, data: _SpaceData, limit: Optional[int] = None) -> int:
        region = data.region
        tail = region.tail
        head = region.head
        if tail >= head:
            return 0
        whole = limit is None or head - tail <= limit
        chunk = region.ring_bytes(tail, head - tail if whole else limit)
        end = len(chunk)
        tsc0, ns0, scale = self._clock()
        keys = data.keys
        keys_get = keys.get
        pid = data.pid
        unpack_header = _U64.unpack_from
        kinds: Dict[int, Optional[Tuple]] = {}         # header -> what to do with such records
        calls = self.calls
        call_headers = data.call_headers
        delivered = 0
        at = 0
        while at < end:
            header = unpack_header(chunk, at)[0]
            if header in call_headers:
                # a run of call entries and exits: handed over as they are, decoded
                # when the calls are read (the program is not kept waiting for that)
                count = _call_run(chunk, at, end, call_headers, len(call_headers) == len(data.stubs))
                if calls is not None:
                    run = chunk if at == 0 and count * _CALL_RECORD.size == end else \
                        bytes(chunk[at:at + count * _CALL_RECORD.size])
                    calls.add_events(_call_events(run, pid, dict(keys), (tsc0, ns0, scale), call_headers))
                at += count * _CALL_RECORD.size
                delivered += count
                continue
            kind = kinds.get(header)
            if kind is None:
                if header == 0 or header & codegen.HEADER_PENDING:
                    if not self._abandoned(data, tail + at, header):
                        break
                    at += codegen.parse_header(header)[1] if header else 8
                    continue
                kind = kinds[header] = self._kind(data, header)
            size, stub, unpack, handlers = kind
            if at + size > end:
                if not whole:
                    break                             # the rest of it is past the limit
                at += size
                continue
            if stub is None:
                at += size
                continue
            values = unpack(chunk, at + 8)
            at += size
            delivered += 1
            if not handlers:
                continue
            site = stub.site
            time_ns = ns0 + int((values[0] - tsc0) * scale)
            thread = values[1]
            if thread >> codegen.FAULT_SHIFT:                 # some argument could not be read
                tid = keys_get(thread & _THREAD_MASK, 0)
                faults = thread >> codegen.FAULT_SHIFT
                args = tuple(UNREADABLE if faults >> i & 1 else decode(v)
                             for i, (decode, v) in enumerate(zip(stub.decoders, values[2:])))
            else:
                tid = keys_get(thread, 0)
                args = values[2:] if stub.plain else tuple(decode(v) for decode, v in zip(stub.decoders, values[2:]))
            for probe, handler in handlers:
                record = Record(probe, site, pid, tid, time_ns, args)
                try:
                    handler(record)
                except Exception as exc:  # noqa: BLE001 - reported, tracing goes on
                    probe.errors += 1
                    self.on_handler_error(probe, record, exc)
        if at:
            region.consume(tail + at)
        self.records += delivered
        return delivered

    @staticmethod
    def _kind(data: _SpaceData, header: int) -> Tuple:
        """(size, stub, unpack, [(probe, handler)]) for the records with *header*."""
        stub_id, size = codegen.parse_header(header)
        stub = data.stubs[stub_id] if 0 <= stub_id < len(data.stubs) else None
        if stub is None:
            return (size, None, None, [])
        if stub.kind != "record":              # a call record whose stub was not placed
            return (size, stub, stub.unpack, [])
        handlers = [(p, p.handler) for p in stub.site.probes if p.mode == "record" and p.handler is not None]
        return (size, stub, stub.unpack, handlers)

    def _abandoned(self, data: _SpaceData, position: int, header: int) -> bool:
        """Is the unfinished record at *position* abandoned for good? Yes once no
        thread of its address space is left (a process killed while a thread was
        writing it); while threads live it may just be slow (preempted, or under
        a signal handler), and it is waited for."""
        return _writers_gone(data.space)

    def ring_full(self, thread: Thread) -> bool:
        """A stub of *thread* found the ring full: drain it. True: let the stub try
        again; False: make it drop its record (no progress for too long)."""
        delivered = self.drain(self.ring_size // 4)
        tid = thread.tid
        if delivered:
            self._full_stops.pop(tid, None)
            return True
        misses = self._full_stops.get(tid, 0) + 1
        self._full_stops[tid] = misses
        if misses >= _FULL_STOPS_WITHOUT_PROGRESS:
            self._full_stops.pop(tid, None)
            return False
        return True

    def forget(self, space: AddressSpace) -> None:
        """*space* is gone (exit, exec): deliver what it recorded, keep its counts."""
        data = self._data.get(id(space))
        if data is not None:
            self._drain_space(data)
        if self.calls is not None:
            self.calls.process_gone(space.pid)


def _call_run(chunk: bytes, at: int, end: int, headers: Dict[int, Tuple[int, str]], only_calls: bool) -> int:
    """How many call records follow one another in *chunk* from *at* (one at least:
    the caller saw the first header), whole before *end*. *only_calls*: every
    stub of the space writes call records."""
    size = _CALL_RECORD.size
    count = (end - at) // size
    found = memoryview(chunk)[at:at + count * size].cast("Q")[::size // 8]
    if only_calls:
        column = found.tobytes()                # the headers (a program writes them fast: no Python loop)
        if column[3::8].count(0) == count and column[2::8].translate(_SIZE_BYTE).count(0) == count:
            return count
    elif headers.keys() >= set(found):
        return count
    for i, header in enumerate(found):
        if header not in headers:
            return i
    return count


def _call_events(raw: bytes, pid: int, keys: Dict[int, int], clock: Tuple[int, int, float],
                 headers: Dict[int, Tuple[int, str]]) -> Iterator[tuple]:
    """The events of a run of call records, as :meth:`CallTrace.add_events` takes
    them: decoded when the calls are read."""
    tsc0, ns0, scale = clock
    keys_get = keys.get
    no_depth = linux.U64
    yield from [(kind, pid, keys_get(thread, 0), name, ns0 + int((tsc - tsc0) * scale),
                 None if value == no_depth and kind == 0 else value)
                for header, tsc, thread, value in _CALL_RECORD.iter_unpack(raw)
                for kind, name in (headers[header],)]


def _stack_key(space: AddressSpace, rsp: int) -> int:
    """The start of the mapping holding *rsp*: a thread's stack tells the thread."""
    for m in space.maps(refresh=True):
        if m.start <= rsp < m.end:
            return m.start
    return 0


def _mapped(space: AddressSpace, address: int, size: int) -> bool:
    """Is [address, address + size) in one readable mapping of *space* (a global)?"""
    try:
        maps = space.maps()
    except PtprobeError:
        return False
    return any(m.start <= address and address + size <= m.end and m.perms.startswith("r") for m in maps)


def _writers_gone(space: AddressSpace) -> bool:
    """No thread can write into *space*'s ring any more: its process is gone."""
    return space.owner.exited or not space.owner.threads


def _usdt_load(arg: usdt.UsdtArg, site: Site, obj) -> Optional[Tuple[codegen.Load, Decoder]]:
    """How a stub loads one USDT argument, and how its 8 bytes are read back."""
    def resolve(sym: str) -> int:
        if obj is None:
            raise PtprobeError(f"no object for symbol {sym}")
        return obj.runtime(obj.elf.get_symbol(sym).address)

    if arg.kind == "imm":
        value = usdt.evaluate(arg, lambda name: 0, lambda a, n: b"", resolve_symbol=resolve)
        return codegen.Load("none"), lambda raw, v=value: v
    if arg.kind == "reg":
        assert arg.reg is not None
        if arg.reg.startswith("xmm"):
            return (codegen.Load("reg", reg=arg.reg),
                    lambda raw, a=arg: usdt.evaluate(a, lambda n: 0, lambda x, n: b"",
                                                     get_xmm=lambda i, r=raw: r.to_bytes(8, "little") + bytes(8)))
        info = usdt.get_register_info(arg.reg)
        if info is None:
            return None
        return (codegen.Load("reg", reg=info[0]),
                lambda raw, a=arg: usdt.evaluate(a, lambda n, r=raw: r, lambda x, n: b""))
    if arg.kind == "rip":
        address = (resolve(arg.symbol) if arg.symbol is not None else site.address) + arg.disp
        return (codegen.Load("abs", disp=address, size=arg.size, safe=_mapped(site.space, address, arg.size)),
                lambda raw, a=arg: usdt.value_from_bytes(a, raw.to_bytes(8, "little")))
    if arg.kind == "mem":
        base = index = None
        bits = 64
        if arg.base is not None:
            info = usdt.get_register_info(arg.base)
            if info is None:
                return None
            base, bits = info[0], info[2]
        if arg.index is not None:
            info = usdt.get_register_info(arg.index)
            if info is None:
                return None
            index = info[0]
            if arg.base is None:
                bits = info[2]
        disp = arg.disp + (resolve(arg.symbol) if arg.symbol is not None else 0)
        # only the stack is surely readable: any other register may hold a bad pointer
        # the program never reads through (a USDT operand is not evaluated by it)
        safe = base == "rsp" and index is None and bits == 64 and abs(disp) < 0x10000
        return (codegen.Load("mem", base=base, index=index, scale=arg.scale, disp=disp, size=arg.size,
                             address_bits=bits, safe=safe),
                lambda raw, a=arg: usdt.value_from_bytes(a, raw.to_bytes(8, "little")))
    return None

