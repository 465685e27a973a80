"""Discovering what can be probed: USDT probes and functions of a file or a process."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

from . import procfs
from .elf import ElfFile
from .objects import open_elf, scan_objects


@dataclass(frozen=True)
class UsdtProbe:
    """One USDT probe (all its sites) in one object.

    Addresses are link-time for a file and run-time for a process.
    """

    path: str
    provider: str
    name: str
    addresses: Tuple[int, ...]
    semaphore: Optional[int]
    args: str

    @property
    def spec(self) -> str:
        return f"usdt:{self.path}:{self.provider}:{self.name}"


@dataclass(frozen=True)
class Function:
    path: str
    name: str
    address: int
    size: int


def _group(elf: ElfFile, path: str, bias: int) -> List[UsdtProbe]:
    groups: Dict[Tuple[str, str], List] = {}
    for note in elf.iter_usdt_notes():
        groups.setdefault((note.provider, note.name), []).append(note)
    out = []
    for (provider, name), notes in groups.items():
        sem = notes[0].semaphore
        args = notes[0].args
        out.append(UsdtProbe(path, provider, name, tuple(sorted(n.address + bias for n in notes)),
                             sem + bias if sem else None, args))
    return out


def iter_usdt_probes(path: str) -> Iterator[UsdtProbe]:
    """The USDT probes of the ELF file *path* (link-time addresses)."""
    yield from _group(open_elf(path), path, 0)


def iter_functions(path: str) -> Iterator[Function]:
    """The function symbols of the ELF file *path*, by address."""
    elf = open_elf(path)
    for sym in sorted(elf.iter_symbols(), key=lambda s: (s.address, s.name)):
        if sym.kind == "func":
            yield Function(path, sym.name, sym.address, sym.size)


def iter_mapped_objects(pid: int) -> Iterator[Tuple[str, int]]:
    """(path, load bias) of each ELF object with executable code mapped in process *pid*."""
    for obj in scan_objects(procfs.read_maps(pid)).values():
        yield obj.path, obj.bias


def iter_process_usdt_probes(pid: int) -> Iterator[UsdtProbe]:
    """The USDT probes of every object mapped in process *pid* (run-time addresses)."""
    for path, bias in iter_mapped_objects(pid):
        yield from _group(open_elf(path), path, bias)


def iter_process_functions(pid: int) -> Iterator[Function]:
    for path, bias in iter_mapped_objects(pid):
        for fn in iter_functions(path):
            yield Function(path, fn.name, fn.address + bias, fn.size)


def display_path(path: str) -> str:
    return os.path.relpath(path) if not path.startswith("/") else path
