"""Reading x86-64 ELF executables and shared objects.

:class:`ElfFile` answers the questions ptprobe asks of an object file: its
symbols (``.symtab`` and ``.dynsym``), its ``PT_LOAD`` segments, the bytes at a
link-time address, and its USDT (``.note.stapsdt``) probes. Addresses are
link-time virtual addresses throughout (for a PIE or a shared library, add the
load bias to get run-time addresses).

pyelftools parses the headers; the symbol tables and notes are decoded here
with :mod:`struct` (much faster on large tables such as libc's). Every parsing
failure surfaces as :class:`~ptprobe.errors.ObjectFileError` (or
:class:`~ptprobe.usdt.UsdtError` for a corrupted stapsdt note).
"""

from __future__ import annotations

import bisect
import errno
import os
import stat
import struct
from dataclasses import dataclass
from typing import BinaryIO, Dict, Iterator, List, Optional, Tuple

from elftools.common.exceptions import ELFError, ELFParseError, ELFRelocationError
from elftools.elf.elffile import ELFFile

from .errors import ObjectFileError, SymbolNotFoundError
from .usdt import UsdtError, parse_note_descriptor

__all__ = ["Symbol", "Segment", "UsdtNote", "ElfFile"]

PT_LOAD = 1
PT_INTERP = 3
PT_NOTE = 4
PF_X = 1
PF_W = 2
PF_R = 4

_SHN_UNDEF = 0
_SHN_LORESERVE = 0xFF00
_SHN_ABS = 0xFFF1
_SHN_COMMON = 0xFFF2
_SHN_XINDEX = 0xFFFF

_STT_NOTYPE = 0
_STT_OBJECT = 1
_STT_FUNC = 2
_STT_SECTION = 3
_STT_FILE = 4
_STT_COMMON = 5
_STT_TLS = 6
_STT_GNU_IFUNC = 10

_STB_LOCAL = 0
_STB_GLOBAL = 1
_STB_WEAK = 2

_NT_GNU_BUILD_ID = 3
_NT_STAPSDT = 3

_ELF64_SYM = struct.Struct("<IBBHQQ")
_PARSE_ERRORS = (ELFError, ELFParseError, ELFRelocationError, struct.error, ValueError, KeyError,
                 IndexError, AttributeError, TypeError, UnicodeDecodeError, OverflowError)


@dataclass(frozen=True)
class Symbol:
    """A defined symbol. ``kind`` is ``"func"`` (STT_FUNC and STT_GNU_IFUNC),
    ``"object"`` (STT_OBJECT, STT_COMMON) or ``"other"`` (STT_NOTYPE).

    ``ifunc`` is True for a GNU indirect function: its address is the
    resolver's, which runs once at relocation time, not the implementation.
    """

    name: str
    address: int
    size: int
    kind: str
    ifunc: bool = False


@dataclass(frozen=True)
class Segment:
    """A ``PT_LOAD`` program header. ``flags`` holds PF_X (1), PF_W (2), PF_R (4)."""

    vaddr: int
    memsz: int
    offset: int
    filesz: int
    flags: int


@dataclass(frozen=True)
class UsdtNote:
    """One ``.note.stapsdt`` probe.

    ``address`` is the probe location adjusted by the difference between the
    actual ``.stapsdt.base`` section address and the base recorded in the note
    (``location`` is the raw value). ``semaphore`` is the raw link-time address
    of the 16-bit semaphore (0 if none), *not* adjusted by that difference: add
    the load bias. ``args`` is the raw argument string (see :mod:`ptprobe.usdt`).
    """

    provider: str
    name: str
    address: int
    semaphore: int
    args: str
    note_base: int
    location: int


@dataclass(frozen=True)
class _Entry:
    """A symbol with the attributes used to rank duplicates."""

    symbol: Symbol
    binding: int
    default_version: bool


def _rank(entry: _Entry) -> Tuple[int, int, int]:
    """Sort key for symbols of one name: lower is preferred."""
    kind = {"func": 0, "object": 1}.get(entry.symbol.kind, 2)
    binding = {_STB_GLOBAL: 0, _STB_WEAK: 1}.get(entry.binding, 2)
    return (kind, 0 if entry.default_version else 1, binding)


def _alias_rank(entry: _Entry) -> Tuple[int, int, int, str]:
    """Sort key among function symbols covering the same address."""
    binding = {_STB_GLOBAL: 0, _STB_WEAK: 1}.get(entry.binding, 2)
    name = entry.symbol.name
    return (binding, len(name) - len(name.lstrip("_")), 0 if entry.default_version else 1, name)


class ElfFile:
    """An x86-64 ELF64 executable (ET_EXEC) or shared object / PIE (ET_DYN).

    Opening validates the file; symbol tables and notes are parsed once, on first
    use, and cached. Use as a context manager or call :meth:`close`.
    """

    path: str
    is_pie: bool
    entry: int
    interpreter: Optional[str]
    build_id: Optional[str]
    segments: List[Segment]

    def __init__(self, path: str) -> None:
        self.path = os.fspath(path)
        self._file: Optional[BinaryIO] = None
        self._symbols: Optional[List[_Entry]] = None
        self._by_name: Optional[Dict[str, _Entry]] = None
        self._funcs: Optional[List[_Entry]] = None
        self._func_starts: List[int] = []
        self._max_func_size = 0
        self._notes: Optional[List[UsdtNote]] = None
        self._file = self._open()
        try:
            self._load_headers()
        except ObjectFileError:
            self.close()
            raise
        except _PARSE_ERRORS as exc:
            self.close()
            raise self._error(f"corrupt ELF file ({_one_line(exc)})") from None

    # -- opening ---------------------------------------------------------

    def _error(self, what: str) -> ObjectFileError:
        return ObjectFileError(f"{self.path}: {what}", self.path)

    def _open(self) -> BinaryIO:
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            raise self._error("no such file") from None
        except IsADirectoryError:
            raise self._error("is a directory, not an ELF file") from None
        except PermissionError:
            raise self._error("permission denied") from None
        except OSError as exc:
            reason = exc.strerror or errno.errorcode.get(exc.errno or 0, "error")
            raise self._error(f"cannot open: {reason}") from None
        try:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise self._error("not a regular file")
            ident = f.read(20)
        except OSError as exc:
            f.close()
            raise self._error(f"cannot read: {exc.strerror or exc}") from None
        except ObjectFileError:
            f.close()
            raise
        if len(ident) < 20 or ident[:4] != b"\x7fELF":
            f.close()
            raise self._error("not an ELF file")
        if ident[4] != 2:
            f.close()
            raise self._error("not a 64-bit ELF file (only x86-64 is supported)")
        if ident[5] != 1:
            f.close()
            raise self._error("not a little-endian ELF file (only x86-64 is supported)")
        e_type, e_machine = struct.unpack_from("<HH", ident, 16)
        if e_machine != 62:
            f.close()
            raise self._error(f"not an x86-64 ELF file (e_machine {e_machine})")
        if e_type not in (2, 3):
            f.close()
            kind = {0: "ET_NONE", 1: "a relocatable object (ET_REL)", 4: "a core file (ET_CORE)"}
            raise self._error(f"not an executable or shared object: {kind.get(e_type, f'e_type {e_type}')}")
        return f

    def _load_headers(self) -> None:
        assert self._file is not None
        self._elf = ELFFile(self._file)
        header = self._elf.header
        self.is_pie = header["e_type"] == "ET_DYN"
        self.entry = int(header["e_entry"])
        self.interpreter = None
        self.segments = []
        self._note_segments: List[Tuple[int, int, int]] = []
        for ph in self._elf.iter_segments():
            ptype = ph["p_type"]
            if ptype == "PT_LOAD":
                self.segments.append(Segment(int(ph["p_vaddr"]), int(ph["p_memsz"]), int(ph["p_offset"]),
                                             int(ph["p_filesz"]), int(ph["p_flags"])))
            elif ptype == "PT_INTERP":
                raw = self._read_file(int(ph["p_offset"]), int(ph["p_filesz"]))
                self.interpreter = raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif ptype == "PT_NOTE":
                self._note_segments.append((int(ph["p_offset"]), int(ph["p_filesz"]), int(ph["p_align"])))
        self.segments.sort(key=lambda s: s.vaddr)
        # name -> (sh_type, sh_addr, sh_offset, sh_size, sh_link, sh_addralign, sh_entsize)
        self._sections: List[Tuple[str, str, int, int, int, int, int, int]] = []
        for sec in self._elf.iter_sections():
            h = sec.header
            self._sections.append((sec.name, h["sh_type"], int(h["sh_addr"]), int(h["sh_offset"]),
                                   int(h["sh_size"]), int(h["sh_link"]), int(h["sh_addralign"]),
                                   int(h["sh_entsize"])))
        self.build_id = self._find_build_id()

    def _read_file(self, offset: int, size: int) -> bytes:
        if self._file is None:
            raise self._error("file is closed")
        try:
            self._file.seek(offset)
            data = self._file.read(size)
        except (OSError, ValueError, OverflowError) as exc:
            raise self._error(f"cannot read {size} bytes at offset {offset:#x}: {_one_line(exc)}") from None
        if len(data) != size:
            raise self._error(f"truncated: {size} bytes at offset {offset:#x} are past the end of the file")
        return data

    def _section(self, name: str) -> Optional[Tuple[str, str, int, int, int, int, int, int]]:
        for sec in self._sections:
            if sec[0] == name:
                return sec
        return None

    def _section_data(self, index: int) -> bytes:
        sec = self._sections[index]
        if sec[1] == "SHT_NOBITS":
            return b""
        return self._read_file(sec[3], sec[4])

    # -- notes -----------------------------------------------------------

    def _iter_raw_notes(self, data: bytes, align: int) -> Iterator[Tuple[bytes, int, bytes]]:
        """Yield (owner without NUL, type, descriptor) for each note in *data*."""
        align = 8 if align == 8 else 4
        pos = 0
        while pos + 12 <= len(data):
            namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
            pos += 12
            name_end = pos + namesz
            desc_start = name_end + (-namesz % align)
            desc_end = desc_start + descsz
            if desc_end > len(data):
                raise UsdtError(f"{self.path}: truncated ELF note")
            yield data[pos:name_end].rstrip(b"\0"), ntype, data[desc_start:desc_end]
            pos = desc_end + (-descsz % align)

    def _find_build_id(self) -> Optional[str]:
        sources: List[Tuple[bytes, int]] = []
        for sec in self._sections:
            if sec[1] == "SHT_NOTE" and sec[0] != ".note.stapsdt":
                sources.append((self._read_file(sec[3], sec[4]), sec[6]))
        if not sources:
            for offset, size, align in self._note_segments:
                sources.append((self._read_file(offset, size), align))
        for data, align in sources:
            try:
                for owner, ntype, desc in self._iter_raw_notes(data, align):
                    if owner == b"GNU" and ntype == _NT_GNU_BUILD_ID and desc:
                        return desc.hex()
            except UsdtError:
                continue
        return None

    def iter_usdt_notes(self) -> Iterator[UsdtNote]:
        """Yield the USDT probes of ``.note.stapsdt`` sections, in file order.

        Raises :class:`~ptprobe.usdt.UsdtError` for a corrupted note.
        """
        if self._notes is None:
            self._notes = self._parse_usdt_notes()
        return iter(self._notes)

    def _parse_usdt_notes(self) -> List[UsdtNote]:
        base_sec = self._section(".stapsdt.base")
        actual_base = base_sec[2] if base_sec is not None else None
        notes: List[UsdtNote] = []
        for index, sec in enumerate(self._sections):
            if sec[0] != ".note.stapsdt" or sec[1] != "SHT_NOTE":
                continue
            for owner, ntype, desc in self._iter_raw_notes(self._section_data(index), sec[6]):
                if owner != b"stapsdt" or ntype != _NT_STAPSDT:
                    continue
                try:
                    location, base, semaphore, provider, name, args = parse_note_descriptor(desc, 8)
                except UsdtError as exc:
                    raise UsdtError(f"{self.path}: {exc.message}") from None
                address = location
                if actual_base is not None and base:
                    address = (location + actual_base - base) & ((1 << 64) - 1)
                notes.append(UsdtNote(provider, name, address, semaphore, args, base, location))
        return notes

    # -- symbols ---------------------------------------------------------

    def _load_symbols(self) -> None:
        if self._symbols is not None:
            return
        try:
            entries = self._parse_symbols()
        except (ObjectFileError, UsdtError):
            raise
        except _PARSE_ERRORS as exc:
            raise self._error(f"corrupt symbol table ({_one_line(exc)})") from None
        by_name: Dict[str, _Entry] = {}
        for e in entries:
            old = by_name.get(e.symbol.name)
            if old is None or _rank(e) < _rank(old):
                by_name[e.symbol.name] = e
        funcs = sorted((e for e in entries if e.symbol.kind == "func"),
                       key=lambda e: (e.symbol.address, _alias_rank(e)))
        self._symbols = entries
        self._by_name = by_name
        self._funcs = funcs
        self._func_starts = [e.symbol.address for e in funcs]
        self._max_func_size = max((e.symbol.size for e in funcs), default=0)

    def _parse_symbols(self) -> List[_Entry]:
        entries: List[_Entry] = []
        seen: set = set()
        for wanted in ("SHT_SYMTAB", "SHT_DYNSYM"):
            for index, sec in enumerate(self._sections):
                if sec[1] != wanted:
                    continue
                for entry in self._parse_symbol_table(index, dynamic=wanted == "SHT_DYNSYM"):
                    s = entry.symbol
                    key = (s.name, s.address, s.kind, entry.default_version)
                    if key in seen:
                        continue
                    seen.add(key)
                    entries.append(entry)
        return entries

    def _parse_symbol_table(self, index: int, dynamic: bool) -> Iterator[_Entry]:
        sec = self._sections[index]
        link = sec[5]
        if not 0 < link < len(self._sections):
            raise self._error(f"symbol table {sec[0]} has no string table")
        data = self._section_data(index)
        strtab = self._section_data(link)
        versym: Optional[bytes] = None
        if dynamic:
            for vindex, vsec in enumerate(self._sections):
                if vsec[1] == "SHT_GNU_versym" and vsec[5] == index:
                    versym = self._section_data(vindex)
                    break
        count = len(data) // _ELF64_SYM.size
        for i, (st_name, st_info, _st_other, st_shndx, st_value, st_size) in enumerate(
                _ELF64_SYM.iter_unpack(data[:count * _ELF64_SYM.size])):
            if i == 0 or st_value == 0 or st_name == 0:
                continue
            if st_shndx == _SHN_UNDEF or st_shndx == _SHN_ABS or st_shndx == _SHN_COMMON:
                continue
            stype = st_info & 0xF
            if stype in (_STT_FUNC, _STT_GNU_IFUNC):
                kind = "func"
            elif stype in (_STT_OBJECT, _STT_COMMON):
                kind = "object"
            elif stype == _STT_NOTYPE:
                kind = "other"
            else:           # section, file, TLS (an offset, not an address), processor-specific
                continue
            if st_name >= len(strtab):
                continue
            end = strtab.find(b"\0", st_name)
            raw = strtab[st_name:end if end >= 0 else len(strtab)]
            name = raw.decode("utf-8", "surrogateescape")
            default_version = True
            at = name.find("@")
            if at > 0:
                default_version = name[at:at + 2] == "@@"
                name = name[:at]
            elif at == 0:
                continue
            if versym is not None and 2 * i + 2 <= len(versym):
                (ver,) = struct.unpack_from("<H", versym, 2 * i)
                if ver & 0x8000:
                    default_version = False
            yield _Entry(Symbol(name, st_value, st_size, kind, stype == _STT_GNU_IFUNC),
                         st_info >> 4, default_version)

    def iter_symbols(self) -> Iterator[Symbol]:
        """Yield the defined symbols of ``.symtab`` then ``.dynsym``, deduplicated.

        Undefined, absolute, zero-address, section, file and TLS symbols are
        skipped; a version suffix (``@VER``, ``@@VER``) is stripped from names.
        """
        self._load_symbols()
        assert self._symbols is not None
        return (e.symbol for e in self._symbols)

    def find_symbol(self, name: str) -> Optional[Symbol]:
        """The symbol called *name* (as ``nm`` prints it, without version), or None.

        Among several: a function before an object before anything else, the
        default version before hidden ones, global before weak before local.
        """
        self._load_symbols()
        assert self._by_name is not None
        entry = self._by_name.get(name)
        if entry is None and "@" in name:
            entry = self._by_name.get(name.split("@", 1)[0])
        return entry.symbol if entry is not None else None

    def get_symbol(self, name: str) -> Symbol:
        """Like :meth:`find_symbol` but raise :class:`SymbolNotFoundError`."""
        sym = self.find_symbol(name)
        if sym is None:
            raise SymbolNotFoundError(f"no symbol {name} in {self.path}", name)
        return sym

    def symbol_at(self, address: int) -> Optional[Symbol]:
        """The function symbol whose ``[address, address+size)`` contains *address*.

        A size-0 symbol matches only its own address. Among aliases the global,
        least-underscored name wins.
        """
        self._load_symbols()
        assert self._funcs is not None
        starts = self._func_starts
        i = bisect.bisect_right(starts, address)
        j = bisect.bisect_left(starts, address)
        if j < i:       # symbols starting exactly here, best alias first
            return self._funcs[j].symbol
        k = j - 1
        while k >= 0:
            e = self._funcs[k]
            start = e.symbol.address
            if start + self._max_func_size <= address:
                break
            if start <= address < start + e.symbol.size:
                # prefer the best-ranked alias with the same start that contains address
                best = e
                m = k - 1
                while m >= 0 and self._funcs[m].symbol.address == start:
                    cand = self._funcs[m]
                    if address < start + cand.symbol.size:
                        best = cand
                    m -= 1
                return best.symbol
            k -= 1
        return None

    # -- addresses -------------------------------------------------------

    def vaddr_to_offset(self, address: int) -> Optional[int]:
        """The file offset of link-time *address*, or None outside the file-backed part of a PT_LOAD."""
        for seg in self.segments:
            if seg.vaddr <= address < seg.vaddr + seg.filesz:
                return seg.offset + (address - seg.vaddr)
        return None

    def offset_to_vaddr(self, offset: int) -> Optional[int]:
        """The link-time address of file *offset*, or None if no PT_LOAD maps it."""
        for seg in self.segments:
            if seg.offset <= offset < seg.offset + seg.filesz:
                return seg.vaddr + (offset - seg.offset)
        return None

    def is_executable_address(self, address: int) -> bool:
        """Whether link-time *address* is inside an executable PT_LOAD."""
        return any(seg.flags & PF_X and seg.vaddr <= address < seg.vaddr + seg.memsz
                   for seg in self.segments)

    def read(self, address: int, size: int, *, partial: bool = False) -> bytes:
        """The *size* bytes at link-time *address*, as the loader maps them.

        File-backed parts come from the file, the rest of a segment (``.bss``) is
        zeros; a range may span adjacent segments. Raises
        :class:`~ptprobe.errors.ObjectFileError` (a ``ValueError``) if any byte is
        not in a PT_LOAD, unless *partial* is true: then the mapped prefix is
        returned (possibly empty).
        """
        if size < 0:
            raise ValueError(f"negative size {size}")
        out = bytearray()
        pos = address
        end = address + size
        while pos < end:
            seg = next((s for s in self.segments if s.vaddr <= pos < s.vaddr + s.memsz), None)
            if seg is None:
                if partial:
                    break
                raise self._error(f"address {pos:#x} is not in a loadable segment")
            chunk_end = min(end, seg.vaddr + seg.memsz)
            file_end = seg.vaddr + seg.filesz
            if pos < file_end:
                upto = min(chunk_end, file_end)
                out += self._read_file(seg.offset + (pos - seg.vaddr), upto - pos)
                pos = upto
            if pos < chunk_end:
                out += bytes(chunk_end - pos)
                pos = chunk_end
        return bytes(out)

    # -- lifetime --------------------------------------------------------

    def close(self) -> None:
        """Close the file; cached symbols and notes stay usable, :meth:`read` does not."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "ElfFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ElfFile {self.path} {'ET_DYN' if self.is_pie else 'ET_EXEC'}>"


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())
