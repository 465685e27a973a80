"""Call graphs recorded inside the program: the tracer's side of the shadow stacks.

The program does the work (each function's entry stub calls the space's entry
routine, ``codegen.graph_entry_source``, which pushes a frame on the thread's
shadow stack and makes the function return through the exit trampoline,
``codegen.graph_exit_source``, which pops it and records the exit); what
ptprobe does is here, for one address space (:class:`SpaceGraph`): write its
entry routine and exit trampoline, enter each thread in the table before it runs a recorded
function, copy the tables into a fork's child, give every hijacked return
address back at detach, and resolve the rare return whose frame the trampoline
cannot find. See ``docs/design.md``, "Call graphs".
"""

from __future__ import annotations

import struct
from typing import Dict, List, Optional, Tuple

from .. import arch, codegen, linux
from ..datapages import GRAPH_ENTRIES, GRAPH_FRAMES, GRAPH_THREADS, SHADOW_BYTES, DataRegion
from ..errors import PtprobeError
from ..tracee import AddressSpace, Thread

_U64 = struct.Struct("<Q")
_PAIR = struct.Struct("<QQ")
#: a table key that never matches a thread and does not end a probe sequence
TOMBSTONE = 1


class SpaceGraph:
    """The call-graph state of one address space."""

    def __init__(self, space: AddressSpace, region: DataRegion, trampoline: int,
                 trampoline_stops: Tuple[int, int], entry: int) -> None:
        self.space = space
        self.region = region
        self.trampoline = trampoline
        self.entry = entry                           # the entry routine the functions' stubs call
        self.full_stop, self.broken_stop = trampoline_stops
        self.layout = region.graph_layout(trampoline)
        self.shadow_of: Dict[int, int] = {}          # tid -> shadow stack index
        self.key_of: Dict[int, int] = {}             # tid -> its thread pointer
        self.free: List[int] = []
        self.next_index = 0

    # --- the table -----------------------------------------------------------------
    def _shadow_offset(self, index: int) -> int:
        return self.region.layout.shadows_at + index * SHADOW_BYTES

    def _table_offset(self, slot: int) -> int:
        return self.region.layout.table_at + 16 * slot

    def enter(self, tid: int, key: int) -> bool:
        """Thread *tid* (stopped), whose thread pointer is *key*, gets a shadow stack
        and a table entry; False when there is no room (its calls get no exit)."""
        if not key:
            return False
        old = self.key_of.get(tid)
        if old is not None and old != key:
            self._remove(old)
        index = self.shadow_of.get(tid)
        if index is None:
            if self.free:
                index = self.free.pop()
            elif self.next_index < GRAPH_THREADS:
                index = self.next_index
                self.next_index += 1
            else:
                return False
            self.shadow_of[tid] = index
        view = self.region.view
        shadow = self._shadow_offset(index)
        _U64.pack_into(view, shadow, 0)                         # depth 0
        slot = self._find(key)
        if slot is None:
            return False
        at = self._table_offset(slot)
        _U64.pack_into(view, at + 8, self.region.base + shadow)  # the stack first,
        _U64.pack_into(view, at, key)                           # then the key that finds it
        self.key_of[tid] = key
        return True

    def _find(self, key: int) -> Optional[int]:
        """The table slot holding *key*, or the first free one on its probe sequence."""
        view = self.region.view
        slot = (key >> 12) & (GRAPH_ENTRIES - 1)
        free = None
        for _ in range(GRAPH_ENTRIES):
            current = _U64.unpack_from(view, self._table_offset(slot))[0]
            if current == key:
                return slot
            if current == TOMBSTONE and free is None:
                free = slot
            if current == 0:
                return slot if free is None else free
            slot = (slot + 1) & (GRAPH_ENTRIES - 1)
        return free

    def _remove(self, key: int) -> None:
        slot = self._find(key)
        if slot is not None and _U64.unpack_from(self.region.view, self._table_offset(slot))[0] == key:
            _U64.pack_into(self.region.view, self._table_offset(slot), TOMBSTONE)

    def thread_gone(self, tid: int) -> None:
        """*tid* exited: its table entry and shadow stack are free again."""
        key = self.key_of.pop(tid, None)
        if key is not None:
            self._remove(key)
        index = self.shadow_of.pop(tid, None)
        if index is not None:
            self.free.append(index)

    # --- frames ----------------------------------------------------------------------
    def frames(self, index: int, every: bool = False) -> List[Tuple[int, int]]:
        """(original return address, its slot) of the frames of shadow stack
        *index*, outermost first (*every*: also those popped, still in memory)."""
        view = self.region.view
        shadow = self._shadow_offset(index)
        depth = _U64.unpack_from(view, shadow)[0]
        count = GRAPH_FRAMES if every else min(depth, GRAPH_FRAMES)
        out = []
        for i in range(count):
            at = shadow + codegen.SHADOW_HEADER + codegen.FRAME_BYTES * i
            ret, slot = _PAIR.unpack_from(view, at)
            if ret or slot:
                out.append((ret, slot))
        return out

    def restore(self, mem: Optional[linux.Memory] = None) -> List[str]:
        """Give every pending call its own return address back (every thread
        stopped): a slot still holding the trampoline's address gets the original.
        *mem*: the memory of a fork's child let go (its stacks are copies)."""
        problems = []
        mem = mem or self.space.mem
        for index in list(self.shadow_of.values()):
            for ret, slot in self.frames(index):
                try:
                    if mem.read_u64(slot) == self.trampoline:
                        mem.write(slot, _U64.pack(ret))
                except PtprobeError as exc:
                    problems.append(f"process {self.space.pid}: cannot restore a return address: {exc}")
        return problems

    def fork(self, child_space: AddressSpace, child_region: DataRegion) -> "SpaceGraph":
        """The child's graph: the table and the stacks in use, copied (the forking
        thread goes on in the child with its pending returns)."""
        graph = SpaceGraph(child_space, child_region, self.trampoline, (self.full_stop, self.broken_stop),
                           self.entry)
        src, dst = self.region.view, child_region.view
        table = self.region.layout.table_at
        dst[table:table + 16 * GRAPH_ENTRIES] = src[table:table + 16 * GRAPH_ENTRIES]
        for tid, index in self.shadow_of.items():
            shadow = self._shadow_offset(index)
            depth = min(_U64.unpack_from(src, shadow)[0], GRAPH_FRAMES)
            end = shadow + codegen.SHADOW_HEADER + codegen.FRAME_BYTES * depth
            dst[shadow:end] = src[shadow:end]
        graph.shadow_of = dict(self.shadow_of)
        graph.key_of = dict(self.key_of)
        graph.free = list(self.free)
        graph.next_index = self.next_index
        return graph

    # --- a return the trampoline could not follow -------------------------------------------
    def resolve(self, thread: Thread, raw: linux.Registers) -> bool:
        """The trampoline found no frame for a return (at its 'broken' stop): find
        the original address among every frame ever pushed; True if the thread
        goes on there, as if it had returned."""
        rsp = raw.rsp
        try:
            saved_rdx, saved_rax = struct.unpack("<QQ", self.space.mem.read(rsp, 16))
        except PtprobeError:
            return False
        slot = rsp + 8
        for index in self.shadow_of.values():
            for ret, frame_slot in reversed(self.frames(index, every=True)):
                # (a tail call's frame returns to the trampoline: the call it is a
                # tail call of has the address to go on at)
                if frame_slot == slot and ret != self.trampoline:
                    raw.rip = ret
                    raw.rsp = rsp + 16
                    raw.rax, raw.rdx = saved_rax, saved_rdx
                    raw.orig_rax = linux.U64
                    linux.set_regs(thread.tid, raw)
                    return True
        return False


def entry_routine(layout: codegen.RingLayout, graph: codegen.GraphLayout, lossless: bool) -> Tuple[bytes, List[int]]:
    """The entry routine's code and the offsets of the rips of its stops (a thread
    not entered; the ring full, if *lossless*)."""
    code = arch.assemble(codegen.graph_entry_source(layout, graph, lossless=lossless))
    return code, codegen.syscall_return_offsets(code)


def exit_trampoline(layout: codegen.RingLayout, graph: codegen.GraphLayout, lossless: bool
                    ) -> Tuple[bytes, int, int]:
    """The exit trampoline's code and the offsets of the rips of its two stops
    (ring full, broken)."""
    code = arch.assemble(codegen.graph_exit_source(layout, graph, lossless=lossless))
    mov = b"\xb8" + struct.pack("<I", arch.SLOT_SYSCALL_NR) + b"\x0f\x05"
    first = code.find(mov)
    last = code.rfind(mov)
    full = first + len(mov) if lossless else -1
    return code, full, last + len(mov)

