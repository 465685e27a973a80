"""Data pages shared between ptprobe and a tracee: counters and the record ring.

One :class:`DataRegion` per address space: a memfd (``/memfd:ptprobe-data``)
mapped shared, read-write and never executable in the program, and mapped
again in ptprobe through a duplicate of its descriptor (``pidfd_getfd``), so
that ptprobe reads counters and records with no system call. Its layout is
declared once here (:class:`Layout`) and handed to the code generator
(:mod:`ptprobe.codegen`) as absolute addresses. See ``docs/design.md``,
"Actions inside the program".

Layout of the file (sparse: only what is written takes memory)::

    0x0000  header page: magic, then head, tail and drops, each on a cache line
    0x1000  counters: one block of COUNTERS_PER_CPU 64-bit counters per CPU
    ...     call graphs: a table of threads (thread pointer, its shadow stack),
            then the shadow stacks (see codegen.GraphLayout)
    ...     the ring: a power-of-two number of bytes; in the program it is
            mapped twice in a row, so that a record that wraps is contiguous

Every call that changes the program's mappings expects the world stopped.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Tuple

from . import codegen, linux
from .errors import TracerError

MAGIC = b"PTPDATA1"
HEAD_AT = 0x40
TAIL_AT = 0x80
DROPS_AT = 0xC0
PID_AT = 0x100                          # the process's pid, for the stubs' careful reads
COUNTERS_AT = 0x1000
COUNTERS_PER_CPU = 8192                 # counters (sites) per region
CPU_SHIFT = 16                          # 8192 * 8 bytes between two CPUs' blocks
DEFAULT_RING = 4 << 20
#: call graphs: the table of threads (key, shadow stack), the shadow stacks
GRAPH_ENTRIES = 4096                    # table entries (a power of two): threads at once, with room
GRAPH_THREADS = 512                     # shadow stacks
SHADOW_BYTES = 0x10000                  # one shadow stack: depth, then frames
GRAPH_FRAMES = (SHADOW_BYTES - codegen.SHADOW_HEADER) // codegen.FRAME_BYTES
MEMFD_NAME = b"ptprobe-data\0"
_U64 = struct.Struct("<Q")


def possible_cpus() -> int:
    """How many CPU numbers the kernel may hand out (``/sys/devices/system/cpu/possible``)."""
    try:
        with open("/sys/devices/system/cpu/possible") as fh:
            text = fh.read().strip()
        return max(int(part.split("-")[-1]) for part in text.split(",")) + 1
    except (OSError, ValueError):
        return os.cpu_count() or 1


def has_rdpid() -> bool:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return " rdpid" in line
    except OSError:
        pass
    return False


@dataclass(frozen=True)
class Layout:
    """Offsets and sizes of a region (file offsets; add the base for addresses)."""

    cpus: int
    ring_size: int

    @property
    def table_at(self) -> int:
        end = COUNTERS_AT + (self.cpus << CPU_SHIFT)
        return (end + 0xFFF) & ~0xFFF

    @property
    def shadows_at(self) -> int:
        return self.table_at + 16 * GRAPH_ENTRIES

    @property
    def ring_at(self) -> int:
        return self.shadows_at + GRAPH_THREADS * SHADOW_BYTES

    @property
    def file_size(self) -> int:
        return self.ring_at + self.ring_size

    @property
    def mapping_size(self) -> int:
        return self.file_size + self.ring_size          # the ring's mirror after it


class Space(Protocol):
    """What a region needs of its address space (:class:`ptprobe.tracee.AddressSpace`)."""

    mem: linux.Memory

    @property
    def pid(self) -> int: ...

    def stopped_thread(self) -> Any: ...

    def scratch_address(self, thread: Any, size: int) -> int: ...

    def syscall(self, nr: int, *args: int, thread: Any = None) -> Tuple[int, bool]: ...

    def invalidate_maps(self) -> None: ...


class DataRegion:
    """The shared data pages of one address space."""

    def __init__(self, base: int, layout: Layout, view: mmap.mmap, per_cpu: bool) -> None:
        self.base = base
        self.layout = layout
        self.view = view                 # ptprobe's own mapping of the same file
        self.per_cpu = per_cpu
        self._next_counter = 0
        self.tail = 0

    # --- creation ---------------------------------------------------------------------
    @classmethod
    def create(cls, space: Space, ring_size: int = DEFAULT_RING, at: Optional[int] = None) -> "DataRegion":
        """Map a new region in *space* (at *at* exactly, replacing what is there, or
        where the kernel likes) and in ptprobe."""
        if ring_size < 0x10000 or ring_size & (ring_size - 1) or ring_size >= 1 << 31:
            raise ValueError("the ring size must be a power of two from 64 KiB to 1 GiB")
        layout = Layout(possible_cpus(), ring_size)
        thread = space.stopped_thread()
        name_at = space.scratch_address(thread, len(MEMFD_NAME))
        space.mem.write(name_at, MEMFD_NAME)
        fd, _ = space.syscall(linux.SYS_memfd_create, name_at, linux.MFD_CLOEXEC, thread=thread)
        if fd < 0:
            raise TracerError(f"memfd_create in process {space.pid} failed: {os.strerror(-fd)}")
        try:
            res, _ = space.syscall(linux.SYS_ftruncate, fd, layout.file_size, thread=thread)
            if res < 0:
                raise TracerError(f"ftruncate in process {space.pid} failed: {os.strerror(-res)}")
            rw = linux.PROT_READ | linux.PROT_WRITE
            flags = linux.MAP_SHARED | (linux.MAP_FIXED if at is not None else 0)
            base, _ = space.syscall(linux.SYS_mmap, at or 0, layout.mapping_size, rw, flags, fd, 0, thread=thread)
            if -4096 < base < 0:
                raise TracerError(f"mmap in process {space.pid} failed: {os.strerror(-base)}")
            mirror = base + layout.file_size
            res, _ = space.syscall(linux.SYS_mmap, mirror, layout.ring_size, rw,
                                   linux.MAP_SHARED | linux.MAP_FIXED, fd, layout.ring_at, thread=thread)
            if res != mirror:
                raise TracerError(f"cannot map the ring's mirror in process {space.pid}")
            local = linux.take_fd(space.pid, fd)
        finally:
            space.syscall(linux.SYS_close, fd, thread=thread)
            space.invalidate_maps()
        try:
            view = mmap.mmap(local, layout.file_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(local)
        view[0:len(MAGIC)] = MAGIC
        _U64.pack_into(view, PID_AT, space.pid)
        return cls(base, layout, view, has_rdpid())

    def fork(self, child: Space) -> "DataRegion":
        """The region of a fork's child: a new file at the same addresses (its
        copied code points there), so that parent and child count and record apart."""
        region = DataRegion.create(child, self.layout.ring_size, at=self.base)
        region._next_counter = self._next_counter
        return region

    def close(self) -> None:
        try:
            self.view.close()
        except (BufferError, ValueError):
            pass

    # --- what the code generator needs ---------------------------------------------------
    def ring_layout(self) -> codegen.RingLayout:
        return codegen.RingLayout(head=self.base + HEAD_AT, tail=self.base + TAIL_AT, drops=self.base + DROPS_AT,
                                  ring=self.base + self.layout.ring_at, capacity=self.layout.ring_size,
                                  counters=self.base + COUNTERS_AT, cpu_shift=CPU_SHIFT, per_cpu=self.per_cpu,
                                  pid=self.base + PID_AT)

    def graph_layout(self, trampoline: int) -> codegen.GraphLayout:
        return codegen.GraphLayout(table=self.base + self.layout.table_at, entries=GRAPH_ENTRIES,
                                   trampoline=trampoline, frames=GRAPH_FRAMES)

    def copy_from(self, other: "DataRegion") -> None:
        """Take *other*'s thread table and shadow stacks (a fork's child continues
        its parent's pending returns)."""
        start, end = self.layout.table_at, self.layout.ring_at
        self.view[start:end] = other.view[start:end]

    def new_counter(self) -> int:
        """A counter of its own (its address in CPU 0's block), zero."""
        if self._next_counter >= COUNTERS_PER_CPU:
            raise TracerError("no counter left in the data pages")
        index = self._next_counter
        self._next_counter += 1
        return self.base + COUNTERS_AT + 8 * index

    def count(self, counter: int) -> int:
        """The sum over every CPU of *counter* (an address from :meth:`new_counter`)."""
        offset = counter - self.base
        if not self.per_cpu:
            return _U64.unpack_from(self.view, offset)[0]
        return sum(_U64.unpack_from(self.view, offset + (cpu << CPU_SHIFT))[0] for cpu in range(self.layout.cpus))

    @property
    def drops(self) -> int:
        return _U64.unpack_from(self.view, DROPS_AT)[0]

    # --- the ring ----------------------------------------------------------------------------
    @property
    def head(self) -> int:
        return _U64.unpack_from(self.view, HEAD_AT)[0]

    def ring_bytes(self, position: int, size: int) -> bytes:
        """*size* bytes of the ring at *position* (a count of bytes ever reserved)."""
        cap = self.layout.ring_size
        at = position & (cap - 1)
        start = self.layout.ring_at
        if at + size <= cap:
            return self.view[start + at:start + at + size]
        first = cap - at
        return self.view[start + at:start + cap] + self.view[start:start + size - first]

    def peek_header(self, position: int) -> int:
        at = position & (self.layout.ring_size - 1)
        return _U64.unpack_from(self.view, self.layout.ring_at + at)[0]

    def consume(self, position: int) -> None:
        """Zero the ring from :attr:`tail` up to *position*, then publish *position*
        as the tail (producers may then reuse that space)."""
        cap = self.layout.ring_size
        start = self.layout.ring_at
        size = position - self.tail
        at = self.tail & (cap - 1)
        if at + size <= cap:
            self.view[start + at:start + at + size] = bytes(size)
        else:
            first = cap - at
            self.view[start + at:start + cap] = bytes(first)
            self.view[start:start + size - first] = bytes(size - first)
        self.tail = position
        _U64.pack_into(self.view, TAIL_AT, position)

