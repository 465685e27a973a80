"""Reading x86-64 ELF executables and shared objects.

:class:`ElfFile` answers the questions ptprobe asks of an object file: its
symbols (``.symtab`` and ``.dynsym``), its ``PT_LOAD`` segments, the bytes at a
link-time address, and its USDT (``.note.stapsdt``) probes. Addresses are
link-time virtual addresses throughout (for a PIE or a shared library, add the
load bias to get run-time addresses).

Headers, symbol tables and notes are decoded here with :mod:`struct` (much
faster than a general ELF library on large tables such as libc's). Files are
untrusted input: every offset and size is checked against the file's size
before anything is read, and every parsing failure surfaces as
:class:`~ptprobe.errors.ObjectFileError` (or :class:`~ptprobe.usdt.UsdtError`,
also exit code 5, for a corrupted stapsdt note). Only regular files are opened,
without blocking (a FIFO or a device is refused, not read).
"""

from __future__ import annotations

import bisect
import errno
import io
import os
import stat
import struct
from dataclasses import dataclass
from typing import BinaryIO, Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

from .errors import ObjectFileError, SymbolNotFoundError
from .usdt import UsdtError, parse_note_descriptor

__all__ = ["Symbol", "Segment", "UsdtNote", "Relocation", "ElfFile"]

PT_LOAD = 1
PT_DYNAMIC = 2
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

_SHT_SYMTAB = 2
_SHT_NOTE = 7
_SHT_NOBITS = 8
_SHT_DYNSYM = 11
_SHT_GNU_VERSYM = 0x6FFFFFFF

_PN_XNUM = 0xFFFF               # e_phnum: the count is in section 0's sh_info

# dynamic section tags
_DT_NULL = 0
_DT_PLTRELSZ = 2
_DT_HASH = 4
_DT_STRTAB = 5
_DT_SYMTAB = 6
_DT_RELA = 7
_DT_RELASZ = 8
_DT_STRSZ = 10
_DT_JMPREL = 23
_DT_GNU_HASH = 0x6FFFFEF5
_DT_VERSYM = 0x6FFFFFF0
_MAX_DYNAMIC_SYMBOLS = 1 << 20

#: relocation types of x86-64 that ptprobe reads (to find where an IFUNC resolved to)
R_X86_64_64 = 1
R_X86_64_GLOB_DAT = 6
R_X86_64_JUMP_SLOT = 7
R_X86_64_IRELATIVE = 37

_ELF64_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_ELF64_PHDR = struct.Struct("<IIQQQQQQ")
_ELF64_SHDR = struct.Struct("<IIQQQQIIQQ")
_ELF64_SYM = struct.Struct("<IBBHQQ")
_ELF64_DYN = struct.Struct("<qQ")
_ELF64_RELA = struct.Struct("<QQq")
# a safety net for decoding mistakes of ours; sizes and offsets are checked first
_PARSE_ERRORS = (struct.error, ValueError, IndexError, KeyError, UnicodeDecodeError, OverflowError)


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
class Relocation:
    """A dynamic relocation (``.rela.dyn``, ``.rela.plt``): the link-time address of
    the word it writes (``offset``), its type (``R_X86_64_*``), the name of the
    dynamic symbol it refers to ("" for none) and its addend."""

    offset: int
    type: int
    symbol: str
    addend: int


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


class _Section(NamedTuple):
    """A section header, with its name resolved."""

    name: str
    type: int
    addr: int
    offset: int
    size: int
    link: int
    info: int
    addralign: int


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

    def __init__(self, path: Union[str, bytes, "os.PathLike[str]"], *, image: Optional[bytes] = None) -> None:
        """Open the file *path*; or, with *image*, read the ELF object from those
        bytes (named *path*): an object rebuilt from a process's memory, whose
        section headers may be missing (symbols then come from PT_DYNAMIC)."""
        try:
            self.path = os.fsdecode(path)
        except TypeError:
            raise ObjectFileError(f"{path!r}: not a file path", repr(path)) from None
        self._file: Optional[BinaryIO] = None
        self._size = 0
        self._image = image
        #: for an image: the load bias it was mapped with (dynamic entries the
        #: dynamic loader relocated are taken back by it)
        self.image_bias = 0
        self._symbols: Optional[List[_Entry]] = None
        self._by_name: Optional[Dict[str, _Entry]] = None
        self._funcs: Optional[List[_Entry]] = None
        self._func_starts: List[int] = []
        self._max_func_size = 0
        self._notes: Optional[List[UsdtNote]] = None
        self._sections: List[_Section] = []
        self._note_segments: List[Tuple[int, int, int]] = []
        self._dynamic_segment: Optional[Tuple[int, int]] = None       # (offset, size) of PT_DYNAMIC
        self._dynamic: Optional[Dict[int, int]] = None
        self._relocations: Optional[List[Relocation]] = None
        self._relocations_by_name: Optional[Dict[str, List[Relocation]]] = None
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

    def _os_error(self, exc: OSError, doing: str) -> ObjectFileError:
        if isinstance(exc, FileNotFoundError):
            return self._error("no such file")
        if isinstance(exc, IsADirectoryError):
            return self._error("is a directory, not an ELF file")
        if isinstance(exc, PermissionError):
            return self._error("permission denied")
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, "error")
        return self._error(f"{doing}: {reason}")

    def _check_regular(self, mode: int) -> None:
        if not stat.S_ISREG(mode):
            raise self._error(f"is {_file_kind(mode)}, not an ELF file")

    def _open(self) -> BinaryIO:
        if self._image is not None:
            self._size = len(self._image)
            self._check_ident(self._image[:_ELF64_EHDR.size])
            return io.BytesIO(self._image)
        # stat first: a FIFO or a device is refused without opening it (opening a
        # FIFO for reading waits for a writer; opening a device can act on it)
        if "\0" in self.path:
            raise self._error("the path contains a NUL byte")
        try:
            self._check_regular(os.stat(self.path).st_mode)
            f = open(self.path, "rb", opener=_open_nonblocking)
        except OSError as exc:
            raise self._os_error(exc, "cannot open") from None
        try:
            st = os.fstat(f.fileno())
            self._check_regular(st.st_mode)       # replaced between stat and open
            self._size = st.st_size
            ident = f.read(_ELF64_EHDR.size)
        except OSError as exc:
            f.close()
            raise self._os_error(exc, "cannot read") from None
        except ObjectFileError:
            f.close()
            raise
        try:
            self._check_ident(ident)
        except ObjectFileError:
            f.close()
            raise
        return f

    def _check_ident(self, ident: bytes) -> None:
        if len(ident) < 20 or ident[:4] != b"\x7fELF":
            raise self._error("not an ELF file")
        if ident[4] != 2:
            raise self._error("not a 64-bit ELF file (only x86-64 is supported)")
        if ident[5] != 1:
            raise self._error("not a little-endian ELF file (only x86-64 is supported)")
        e_type, e_machine = struct.unpack_from("<HH", ident, 16)
        if e_machine != 62:
            raise self._error(f"not an x86-64 ELF file (e_machine {e_machine})")
        if e_type not in (2, 3):
            kind = {0: "ET_NONE", 1: "a relocatable object (ET_REL)", 4: "a core file (ET_CORE)"}
            raise self._error(f"not an executable or shared object: {kind.get(e_type, f'e_type {e_type}')}")
        if len(ident) < _ELF64_EHDR.size:
            raise self._error(f"truncated ELF header ({len(ident)} of {_ELF64_EHDR.size} bytes)")

    def _table(self, what: str, offset: int, count: int, entsize: int, expected: int) -> bytes:
        """The bytes of a header table, every bound checked before reading."""
        if count == 0:
            return b""
        if entsize != expected:
            raise self._error(f"{what} entry size is {entsize}, expected {expected}")
        if offset == 0 or offset > self._size or count > (self._size - offset) // entsize:
            raise self._error(f"{what} ({count} entries at offset {offset:#x}) is past the end "
                              f"of the file ({self._size} bytes)")
        return self._read_file(offset, count * entsize, what)

    def _load_headers(self) -> None:
        assert self._file is not None
        ehdr = _ELF64_EHDR.unpack(self._read_file(0, _ELF64_EHDR.size, "ELF header"))
        (_ident, e_type, _machine, _version, e_entry, e_phoff, e_shoff, _flags, _ehsize,
         e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx) = ehdr
        self.is_pie = e_type == 3
        self.entry = e_entry
        self.interpreter = None
        self.segments = []

        # section 0 holds the real counts when they do not fit in the header
        # (extended numbering: e_shnum 0, e_phnum PN_XNUM, e_shstrndx SHN_XINDEX)
        shnum = 0
        if self._image is not None:
            # an image of a mapped object: the section headers and the sections they
            # describe beyond the loadable segments (.symtab, notes) are not mapped
            e_shoff = 0
            e_shstrndx = 0
        if e_shoff != 0:
            first = _ELF64_SHDR.unpack(self._table("section header table", e_shoff, 1, e_shentsize,
                                                   _ELF64_SHDR.size))
            shnum = e_shnum if e_shnum != 0 else first[5]
            if e_phnum == _PN_XNUM:
                e_phnum = first[7]
            if e_shstrndx == _SHN_XINDEX:
                e_shstrndx = first[6]
        elif e_phnum == _PN_XNUM:
            raise self._error("e_phnum is PN_XNUM but there is no section header table")

        phdrs = self._table("program header table", e_phoff, e_phnum, e_phentsize, _ELF64_PHDR.size)
        for p_type, p_flags, p_offset, p_vaddr, _paddr, p_filesz, p_memsz, p_align in \
                _ELF64_PHDR.iter_unpack(phdrs):
            if p_type == PT_LOAD:
                self.segments.append(Segment(p_vaddr, p_memsz, p_offset, p_filesz, p_flags))
            elif p_type == PT_INTERP and p_filesz:      # 0 in a separate debug file
                if p_filesz > 4096:                     # the kernel's ELF loader refuses it too
                    raise self._error(f"PT_INTERP of {p_filesz} bytes is too long for a path")
                raw = self._read_file(p_offset, p_filesz, "PT_INTERP")
                self.interpreter = raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif p_type == PT_NOTE:
                self._note_segments.append((p_offset, p_filesz, p_align))
            elif p_type == PT_DYNAMIC and p_filesz:
                self._dynamic_segment = (p_offset, p_filesz)
        self.segments.sort(key=lambda s: s.vaddr)

        shdrs = self._table("section header table", e_shoff, shnum, e_shentsize, _ELF64_SHDR.size)
        raw_sections = list(_ELF64_SHDR.iter_unpack(shdrs))
        names = b""
        if raw_sections and e_shstrndx != 0:
            if e_shstrndx >= len(raw_sections):
                raise self._error(f"section name table index {e_shstrndx} is out of range "
                                  f"({len(raw_sections)} sections)")
            names_header = raw_sections[e_shstrndx]
            if names_header[1] != _SHT_NOBITS:
                names = self._read_file(names_header[4], names_header[5], "section name table")
        for (sh_name, sh_type, _flags, sh_addr, sh_offset, sh_size, sh_link, sh_info, sh_addralign,
             _entsize) in raw_sections:
            # a name offset outside the table gives an empty name, as for SHN_UNDEF
            end = names.find(b"\0", sh_name) if sh_name < len(names) else -1
            name = names[sh_name:end].decode("utf-8", "surrogateescape") if end >= 0 else ""
            self._sections.append(_Section(name, sh_type, sh_addr, sh_offset, sh_size, sh_link, sh_info,
                                           sh_addralign))
        self.build_id = self._find_build_id()

    def _read_file(self, offset: int, size: int, what: str = "data") -> bytes:
        """*size* bytes at file *offset*; *what* names them in the error when they are not all there."""
        if self._file is None:
            raise self._error("file is closed")
        if offset < 0 or size < 0 or offset + size > self._size:
            raise self._error(f"{what} ({size} bytes at offset {offset:#x}) is past the end of the file "
                              f"({self._size} bytes)")
        try:
            self._file.seek(offset)
            data = self._file.read(size)
        except (OSError, ValueError, OverflowError) as exc:
            raise self._error(f"cannot read {what} ({size} bytes at offset {offset:#x}): "
                              f"{_one_line(exc)}") from None
        if len(data) != size:
            raise self._error(f"{what}: read {len(data)} of {size} bytes at offset {offset:#x} "
                              "(the file shrank while open)")
        return data

    def _section(self, name: str) -> Optional[_Section]:
        for sec in self._sections:
            if sec.name == name:
                return sec
        return None

    def _section_data(self, index: int) -> bytes:
        sec = self._sections[index]
        if sec.type == _SHT_NOBITS:
            return b""
        return self._read_file(sec.offset, sec.size, f"section {_printable(sec.name) or f'[{index}]'}")

    # -- notes -----------------------------------------------------------

    def _iter_raw_notes(self, data: bytes, align: int, where: str) -> Iterator[Tuple[bytes, int, bytes]]:
        """Yield (owner without NUL, type, descriptor) for each note in *data*, from *where*."""
        align = 8 if align == 8 else 4
        pos = 0
        while pos + 12 <= len(data):
            namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
            pos += 12
            name_end = pos + namesz
            desc_start = name_end + (-namesz % align)
            desc_end = desc_start + descsz
            if desc_end > len(data):
                raise UsdtError(f"{self.path}: {where}: a note runs past the end of its section")
            yield data[pos:name_end].rstrip(b"\0"), ntype, data[desc_start:desc_end]
            pos = desc_end + (-descsz % align)

    def _find_build_id(self) -> Optional[str]:
        sources: List[Tuple[bytes, int, str]] = []
        for sec in self._sections:
            if sec.type == _SHT_NOTE and sec.name != ".note.stapsdt":
                where = f"note section {_printable(sec.name)}"
                sources.append((self._read_file(sec.offset, sec.size, where), sec.addralign, where))
        if not sources:
            for offset, size, align in self._note_segments:
                sources.append((self._read_file(offset, size, "PT_NOTE segment"), align, "PT_NOTE segment"))
        for data, align, where in sources:
            try:
                for owner, ntype, desc in self._iter_raw_notes(data, align, where):
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
        actual_base = base_sec.addr if base_sec is not None else None
        notes: List[UsdtNote] = []
        for index, sec in enumerate(self._sections):
            if sec.name != ".note.stapsdt" or sec.type != _SHT_NOTE:
                continue
            for owner, ntype, desc in self._iter_raw_notes(self._section_data(index), sec.addralign,
                                                           "section .note.stapsdt"):
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
        tables = 0
        for wanted in (_SHT_SYMTAB, _SHT_DYNSYM):
            for index, sec in enumerate(self._sections):
                if sec.type != wanted:
                    continue
                tables += 1
                for entry in self._parse_symbol_table(index, dynamic=wanted == _SHT_DYNSYM):
                    s = entry.symbol
                    key = (s.name, s.address, s.kind, entry.default_version)
                    if key in seen:
                        continue
                    seen.add(key)
                    entries.append(entry)
        if not tables:
            # no section headers (an image of a mapped object): the dynamic symbols,
            # through PT_DYNAMIC, as the dynamic loader finds them
            data, strtab, versym = self._dynamic_symbol_table()
            entries.extend(self._parse_symbol_bytes(data, strtab, versym))
        return entries

    # -- the dynamic section and relocations -----------------------------

    def _load_dynamic(self) -> Dict[int, int]:
        """Tag -> value of the PT_DYNAMIC entries (the first of each tag)."""
        if self._dynamic is None:
            out: Dict[int, int] = {}
            if self._dynamic_segment is not None:
                offset, size = self._dynamic_segment
                size = min(size, max(self._size - offset, 0)) // _ELF64_DYN.size * _ELF64_DYN.size
                data = self._read_file(offset, size, "PT_DYNAMIC") if size > 0 else b""
                for tag, value in _ELF64_DYN.iter_unpack(data):
                    if tag == _DT_NULL:
                        break
                    out.setdefault(tag, value)
            self._dynamic = out
        return self._dynamic

    def _dynamic_address(self, value: int) -> Optional[int]:
        """The link-time address a dynamic entry points at. In a mapped object the
        dynamic loader may have relocated the entry (added the load bias): then
        ``image_bias`` takes it back."""
        if self.vaddr_to_offset(value) is not None:
            return value
        bias = getattr(self, "image_bias", 0)
        if bias and self.vaddr_to_offset(value - bias) is not None:
            return value - bias
        return None

    def _dynamic_bytes(self, tag: int, size: int, what: str) -> bytes:
        value = self._load_dynamic().get(tag)
        address = self._dynamic_address(value) if value is not None else None
        if address is None or size <= 0:
            return b""
        return self.read(address, size, partial=True)

    def _dynamic_symbol_count(self) -> int:
        dyn = self._load_dynamic()
        if _DT_HASH in dyn:
            header = self._dynamic_bytes(_DT_HASH, 8, "DT_HASH")
            if len(header) == 8:
                return min(struct.unpack("<II", header)[1], _MAX_DYNAMIC_SYMBOLS)
        if _DT_GNU_HASH in dyn:
            head = self._dynamic_bytes(_DT_GNU_HASH, 16, "DT_GNU_HASH")
            if len(head) < 16:
                return 0
            nbuckets, symoffset, bloom_size, _shift = struct.unpack("<IIII", head)
            if nbuckets > _MAX_DYNAMIC_SYMBOLS or bloom_size > _MAX_DYNAMIC_SYMBOLS:
                return 0
            start = 16 + 8 * bloom_size
            table = self._dynamic_bytes(_DT_GNU_HASH, start + 4 * nbuckets + 4 * _MAX_DYNAMIC_SYMBOLS // 64,
                                        "DT_GNU_HASH")
            if len(table) < start + 4 * nbuckets:
                return 0
            buckets = struct.unpack_from(f"<{nbuckets}I", table, start)
            last = max(buckets, default=0)
            if last < symoffset:
                return symoffset
            chains = start + 4 * nbuckets
            index = last
            while True:
                at = chains + 4 * (index - symoffset)
                if at + 4 > len(table) or index >= _MAX_DYNAMIC_SYMBOLS:
                    return index
                if struct.unpack_from("<I", table, at)[0] & 1:
                    return index + 1
                index += 1
        return 0

    def _dynamic_symbol_table(self) -> Tuple[bytes, bytes, Optional[bytes]]:
        """(symbols, strings, versions) of the dynamic symbol table through PT_DYNAMIC."""
        dyn = self._load_dynamic()
        count = self._dynamic_symbol_count()
        symbols = self._dynamic_bytes(_DT_SYMTAB, count * _ELF64_SYM.size, "DT_SYMTAB")
        strings = self._dynamic_bytes(_DT_STRTAB, min(dyn.get(_DT_STRSZ, 0), self._size), "DT_STRTAB")
        versym = self._dynamic_bytes(_DT_VERSYM, 2 * count, "DT_VERSYM") if _DT_VERSYM in dyn else None
        return symbols, strings, versym

    def _dynamic_symbol_names(self) -> List[str]:
        """Names of the dynamic symbols by index (as relocations refer to them)."""
        data: bytes = b""
        strtab: bytes = b""
        for index, sec in enumerate(self._sections):
            if sec.type == _SHT_DYNSYM and 0 < sec.link < len(self._sections):
                data, strtab = self._section_data(index), self._section_data(sec.link)
                break
        else:
            data, strtab, _ = self._dynamic_symbol_table()
        names = []
        for st_name, *_rest in _ELF64_SYM.iter_unpack(data[:len(data) // _ELF64_SYM.size * _ELF64_SYM.size]):
            end = strtab.find(b"\0", st_name) if st_name < len(strtab) else -1
            name = strtab[st_name:end].decode("utf-8", "surrogateescape") if end >= 0 else ""
            names.append(name.split("@", 1)[0])
        return names

    def iter_relocations(self) -> Iterator[Relocation]:
        """The dynamic relocations (``DT_RELA`` and ``DT_JMPREL`` tables)."""
        if self._relocations is None:
            try:
                self._relocations = self._parse_relocations()
            except ObjectFileError:
                raise
            except _PARSE_ERRORS as exc:
                raise self._error(f"corrupt relocations ({_one_line(exc)})") from None
        return iter(self._relocations)

    def relocations_of(self, symbol: str) -> List[Relocation]:
        """The relocations that refer to the dynamic symbol *symbol* by name."""
        if self._relocations_by_name is None:
            index: Dict[str, List[Relocation]] = {}
            for rel in self.iter_relocations():
                if rel.symbol:
                    index.setdefault(rel.symbol, []).append(rel)
            self._relocations_by_name = index
        return self._relocations_by_name.get(symbol, [])

    def _parse_relocations(self) -> List[Relocation]:
        dyn = self._load_dynamic()
        names: Optional[List[str]] = None
        out: List[Relocation] = []
        for table, size_tag in ((_DT_RELA, _DT_RELASZ), (_DT_JMPREL, _DT_PLTRELSZ)):
            size = min(dyn.get(size_tag, 0), self._size)
            data = self._dynamic_bytes(table, size, "relocations") if table in dyn else b""
            for r_offset, r_info, r_addend in _ELF64_RELA.iter_unpack(
                    data[:len(data) // _ELF64_RELA.size * _ELF64_RELA.size]):
                index = r_info >> 32
                name = ""
                if index:
                    if names is None:
                        names = self._dynamic_symbol_names()
                    name = names[index] if index < len(names) else ""
                out.append(Relocation(r_offset, r_info & 0xFFFFFFFF, name, r_addend))
        return out

    def _parse_symbol_table(self, index: int, dynamic: bool) -> Iterator[_Entry]:  # type: ignore[return]
        sec = self._sections[index]
        link = sec.link
        if not 0 < link < len(self._sections):
            raise self._error(f"symbol table {_printable(sec.name) or f'[{index}]'} has no string table")
        data = self._section_data(index)
        strtab = self._section_data(link)
        versym: Optional[bytes] = None
        if dynamic:
            for vindex, vsec in enumerate(self._sections):
                if vsec.type == _SHT_GNU_VERSYM and vsec.link == index:
                    versym = self._section_data(vindex)
                    break
        return self._parse_symbol_bytes(data, strtab, versym)

    def _parse_symbol_bytes(self, data: bytes, strtab: bytes, versym: Optional[bytes]) -> Iterator[_Entry]:
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
                out += self._read_file(seg.offset + (pos - seg.vaddr), upto - pos,
                                       f"segment at {seg.vaddr:#x}")
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


def _open_nonblocking(path: str, flags: int) -> int:
    """``open()``'s opener: never wait (a FIFO without a writer) nor take a terminal."""
    return os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY)


def _printable(name: str) -> str:
    """A section name for a message: as it is when printable, else escaped."""
    return name if name.isprintable() else ascii(name)


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a special file"


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())
