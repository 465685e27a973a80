"""ELF objects mapped in a process: which file, where, with which load bias.

Pure bookkeeping over :mod:`ptprobe.procfs` mappings and :mod:`ptprobe.elf`
files: :func:`scan_objects` groups the mappings of ``/proc/PID/maps`` into
:class:`LoadedObject` values. Used by the engine (arming probes, symbolising)
and by :mod:`ptprobe.discover` (``ptprobe list --pid``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

from .elf import ElfFile
from .errors import ObjectFileError
from .procfs import Mapping

Identity = Tuple[int, int]          # (device, inode)


@dataclass
class LoadedObject:
    """An ELF object mapped in a process."""

    path: str
    identity: Identity
    elf: ElfFile
    bias: int                       # run-time address = link-time address + bias
    start: int
    end: int

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


def scan_objects(maps: Iterable[Mapping], known: Optional[Dict[Identity, LoadedObject]] = None
                 ) -> Dict[Identity, LoadedObject]:
    """The ELF objects with executable code among *maps*, by identity. Objects
    in *known* are kept as they are (not reopened); files that are not ELF are
    skipped."""
    known = known or {}
    by_identity: Dict[Identity, List[Mapping]] = {}
    for m in maps:
        if m.is_file:
            by_identity.setdefault(m.identity, []).append(m)
    out: Dict[Identity, LoadedObject] = {}
    for identity, mappings in by_identity.items():
        if not any(m.is_exec for m in mappings):
            continue
        obj = known.get(identity)
        if obj is None:
            path = mappings[0].path
            try:
                elf = open_elf(path)
            except ObjectFileError:
                continue
            bias = load_bias(elf, mappings)
            if bias is None:
                continue
            obj = LoadedObject(path, identity, elf, bias, min(m.start for m in mappings),
                               max(m.end for m in mappings))
        out[identity] = obj
    return out
