"""ELF objects mapped in a process: which file, where, with which load bias.

Pure bookkeeping over :mod:`ptprobe.procfs` mappings and :mod:`ptprobe.elf`
files: :func:`scan_objects` groups the mappings of ``/proc/PID/maps`` into
:class:`LoadedObject` values. Used by the engine (arming probes, symbolising)
and by :mod:`ptprobe.discover` (``ptprobe list --pid``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from .elf import ElfFile
from .errors import ObjectFileError, PtprobeError
from .procfs import Mapping

Identity = Tuple[int, int]          # (device, inode)
MemoryReader = Callable[[int, int], bytes]
#: the largest object rebuilt from a process's memory
_MAX_IMAGE = 1 << 30


@dataclass
class LoadedObject:
    """An ELF object mapped in a process."""

    path: str
    identity: Identity
    elf: ElfFile
    bias: int                       # run-time address = link-time address + bias
    start: int
    end: int
    #: the file was removed or replaced since it was mapped; then ``source`` says
    #: where the ELF data came from: "map_files" (the deleted file itself, through
    #: /proc/PID/map_files/) or "memory" (the mapped bytes)
    deleted: bool = False
    source: str = "file"

    def runtime(self, vaddr: int) -> int:
        return vaddr + self.bias

    def link_time(self, address: int) -> int:
        return address - self.bias

    def contains(self, address: int) -> bool:
        return self.start <= address < self.end

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


_elf_cache: Dict[Tuple[int, int, int], ElfFile] = {}


def open_elf(path: str) -> ElfFile:
    """Open (and cache by device, inode and mtime) an ELF file."""
    try:
        st = os.stat(path)
    except (OSError, ValueError) as exc:
        raise ObjectFileError(f"{path}: {getattr(exc, 'strerror', None) or exc}", path) from None
    key = (st.st_dev, st.st_ino, st.st_mtime_ns)
    elf = _elf_cache.get(key)
    if elf is None:
        elf = ElfFile(path)
        _elf_cache[key] = elf
    return elf


def load_bias(elf: ElfFile, mappings: Iterable[Mapping]) -> Optional[int]:
    """The load bias of *elf* given its file mappings (the one whose offset
    matches a PT_LOAD segment's page decides), None if none matches."""
    for m in sorted(mappings, key=lambda m: m.offset):
        for seg in elf.segments:
            if seg.offset & ~0xFFF == m.offset:
                return m.start - (seg.vaddr & ~0xFFF)
    return None


def scan_objects(maps: Iterable[Mapping], known: Optional[Dict[Identity, LoadedObject]] = None,
                 pid: Optional[int] = None, read_memory: Optional[MemoryReader] = None
                 ) -> Dict[Identity, LoadedObject]:
    """The ELF objects with executable code among *maps*, by identity. Objects
    in *known* are kept as they are (not reopened); files that are not ELF are
    skipped. With *pid* (and *read_memory*, to read the process), objects whose
    file was removed or replaced since ("(deleted)") are included: opened through
    /proc/PID/map_files/ where permitted, else rebuilt from their mapped bytes."""
    known = known or {}
    by_identity: Dict[Identity, List[Mapping]] = {}
    for m in maps:
        if m.is_file or (m.deleted and pid is not None):
            by_identity.setdefault(m.identity, []).append(m)
    out: Dict[Identity, LoadedObject] = {}
    for identity, mappings in by_identity.items():
        if not any(m.is_exec for m in mappings):
            continue
        obj = known.get(identity)
        if obj is None:
            first = mappings[0]
            source = "file"
            try:
                if first.deleted:
                    assert pid is not None
                    elf, source = _open_deleted(pid, mappings, read_memory)
                else:
                    elf = open_elf(first.path)
            except ObjectFileError:
                continue
            bias = load_bias(elf, mappings)
            if bias is None:
                continue
            if source == "memory":
                elf.image_bias = bias
            obj = LoadedObject(first.file_path, identity, elf, bias, min(m.start for m in mappings),
                               max(m.end for m in mappings), first.deleted, source)
        out[identity] = obj
    return out


def _open_deleted(pid: int, mappings: List[Mapping], read_memory: Optional[MemoryReader]
                  ) -> Tuple[ElfFile, str]:
    """The ELF data of a mapped file that is gone from its path: the file itself
    through /proc/PID/map_files/, or, where that is refused (it needs
    CAP_SYS_ADMIN), an image rebuilt from the process's memory: each mapping's
    bytes at its file offset (the headers, code, dynamic section and dynamic
    symbols of an object are all mapped)."""
    by_offset = sorted(mappings, key=lambda m: m.offset)
    try:
        return open_elf(f"/proc/{pid}/{by_offset[0].map_file}"), "map_files"
    except ObjectFileError:
        if read_memory is None:
            raise
    size = max(m.offset + m.end - m.start for m in by_offset)
    if size > _MAX_IMAGE or by_offset[0].offset != 0:
        raise ObjectFileError(f"{by_offset[0].file_path}: cannot rebuild it from memory", by_offset[0].path)
    image = bytearray(size)
    for m in by_offset:
        try:
            data = read_memory(m.start, m.end - m.start)
        except PtprobeError:
            continue
        image[m.offset:m.offset + len(data)] = data
    return ElfFile(by_offset[0].path, image=bytes(image)), "memory"
