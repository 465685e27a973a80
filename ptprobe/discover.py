"""Discovering what can be probed: USDT probes and functions of a file or a
process, the files object names mean, and processes by name or by tree."""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple, Union

from . import linux, procfs, search
from .elf import ElfFile
from .errors import ObjectFileError, SymbolNotFoundError
from .objects import open_elf, scan_objects
from .spec import ProbeSpec, parse_spec


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
    """A function symbol; ``ifunc``: a GNU indirect function (its address is the
    resolver's; a probe on it goes where the resolver chose, in each process)."""

    path: str
    name: str
    address: int
    size: int
    ifunc: bool = False


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


def _functions(elf: ElfFile, path: str, bias: int) -> List[Function]:
    return [Function(path, sym.name, sym.address + bias, sym.size, sym.ifunc)
            for sym in sorted(elf.iter_symbols(), key=lambda s: (s.address, s.name)) if sym.kind == "func"]


@dataclass(frozen=True)
class ObjectInfo:
    """An ELF object: a file (``bias`` 0, link-time addresses) or an object mapped
    in a process (run-time addresses). ``path`` is as given or as the process's
    maps show it; ``deleted`` when that file was replaced or removed since."""

    path: str
    bias: int
    elf: ElfFile = field(repr=False, compare=False)
    deleted: bool = False

    def usdt_probes(self) -> List[UsdtProbe]:
        return _group(self.elf, self.path, self.bias)

    def functions(self) -> List[Function]:
        return _functions(self.elf, self.path, self.bias)


def find_object(name: str) -> str:
    """The file *name* means: a path as it is; otherwise a program in PATH
    (``python3``) or a library in the dynamic loader's directories (``libc``,
    ``libssl.so.3``). Raises :class:`~ptprobe.errors.ObjectFileError` when there
    is none."""
    path = search.find_object(name)
    if path is None:
        raise ObjectFileError(f"{name}: no such file, program (in PATH) or library (in "
                              f"{', '.join(search.library_dirs()[:3])} ...)", name)
    return path


def name_matches(basename: str, name: str) -> bool:
    """Whether an object whose file is called *basename* answers to the name *name*
    of a spec (``libc.so.6`` to ``libc``, ``libc.so`` and ``libc.so.6``)."""
    return search.name_matches(basename, name)


def names_a_file(name: str) -> bool:
    """Whether the object name *name* means a file on disk: a program in PATH or a
    library in the dynamic loader's directories (as a spec's name may)."""
    return search.find_program(name) is not None or bool(search.find_libraries(name))


def looks_like_object(text: str) -> bool:
    """Whether *text* names a file or an object rather than being a pattern."""
    return not any(ch in text for ch in "*?[") and search.find_object(text) is not None


def open_object(path: str) -> ObjectInfo:
    """The ELF file *path* (or the object a name means, see :func:`find_object`)."""
    real = find_object(path)
    return ObjectInfo(real, 0, open_elf(real))


def process_objects(pid: int) -> List[ObjectInfo]:
    """The ELF objects with code mapped in process *pid* (deleted ones included:
    read through /proc/PID/map_files/ or from their mapped bytes)."""
    memory = linux.Memory(pid)
    try:
        objects = scan_objects(procfs.read_maps(pid), pid=pid, read_memory=memory.read)
        return [ObjectInfo(obj.path, obj.bias, obj.elf, obj.deleted) for obj in objects.values()]
    finally:
        memory.close()


def iter_usdt_probes(path: str) -> Iterator[UsdtProbe]:
    """The USDT probes of the ELF file *path* (link-time addresses)."""
    yield from _group(open_elf(path), path, 0)


def iter_functions(path: str) -> Iterator[Function]:
    """The function symbols of the ELF file *path*, by address."""
    yield from _functions(open_elf(path), path, 0)


def iter_mapped_objects(pid: int) -> Iterator[Tuple[str, int]]:
    """(path, load bias) of each ELF object with executable code mapped in process *pid*."""
    for obj in process_objects(pid):
        yield obj.path, obj.bias


def iter_process_usdt_probes(pid: int) -> Iterator[UsdtProbe]:
    """The USDT probes of every object mapped in process *pid* (run-time addresses)."""
    for obj in process_objects(pid):
        yield from obj.usdt_probes()


def iter_process_functions(pid: int) -> Iterator[Function]:
    for obj in process_objects(pid):
        yield from obj.functions()


def display_path(path: str) -> str:
    return os.path.relpath(path) if not path.startswith("/") else path


def expand_spec(spec: Union[str, ProbeSpec], pid: Optional[int] = None) -> List[str]:
    """The specs of every function or USDT probe *spec* would arm (one per match,
    with the object's full path), in a file or in process *pid*'s objects: what
    ``bpftrace -l`` shows."""
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    if pid is not None:
        objects = [o for o in process_objects(pid)
                   if (o.path == os.path.realpath(parsed.path) if parsed.is_path
                       else search.name_matches(os.path.basename(o.path), parsed.path))]
        if not objects:
            raise SymbolNotFoundError(f"no object {parsed.path!r} is mapped in process {pid}", parsed.path)
    else:
        objects = [open_object(parsed.path)]
    out: List[str] = []
    for obj in objects:
        if parsed.kind == "usdt":
            for probe in obj.usdt_probes():
                if fnmatch.fnmatchcase(probe.provider, parsed.provider or "*") and \
                        fnmatch.fnmatchcase(probe.name, parsed.name or "*"):
                    out.append(f"usdt:{obj.path}:{probe.provider}:{probe.name}")
        elif parsed.symbol is not None:
            pattern = parsed.symbol
            names = sorted({f.name for f in obj.functions() if fnmatch.fnmatchcase(f.name, pattern)})
            suffix = f"+{parsed.offset:#x}" if parsed.offset else ""
            out.extend(f"uprobe:{obj.path}:{name}{suffix}" for name in names)
        else:
            out.append(f"uprobe:{obj.path}:{parsed.address:#x}")
    if not out:
        raise SymbolNotFoundError(f"nothing matches {parsed.text!r}", parsed.text)
    return out


# --------------------------------------------------------------------------- processes

def process_name(pid: int) -> str:
    """The name of process *pid* (as ``ps -o comm`` shows it); "" when it is gone."""
    return procfs.comm(pid)


def executable(pid: int) -> str:
    """The program process *pid* runs, as a spec's PATH names it: its file, or its
    name when that file was replaced or removed since (the mapped object answers
    to it); "" when unknown."""
    path = procfs.executable(pid)
    if path.endswith(" (deleted)"):
        return os.path.basename(path[:-len(" (deleted)")])
    return path


def find_processes(name: str) -> List[int]:
    """The processes called *name*, as ``pgrep -x`` and ``pidof`` find them: by
    their name (``comm``, cut at 15 characters by the kernel), the file they run
    or their first argument; ptprobe itself excluded. Zombies and kernel threads
    are left out."""
    me = os.getpid()
    found = []
    for pid in procfs.iter_pids():
        if pid == me:
            continue
        comm = procfs.comm(pid)
        if not comm:
            continue
        args = procfs.cmdline(pid)
        if not args:                    # a kernel thread, or a zombie
            continue
        exe = procfs.executable(pid)
        if name in (comm, os.path.basename(exe), os.path.basename(args[0])) or \
                (len(name) > 15 and comm == name[:15]):
            found.append(pid)
    return sorted(found)


def process_tree(pid: int) -> List[int]:
    """*pid* and every process descending from it now, parents before children."""
    return procfs.process_tree(pid)
