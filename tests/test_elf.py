"""Tests for ptprobe.elf (and tests/c/ptprobe_sdt.h), checked against binutils.

Programs under tests/c are compiled with gcc into a temporary directory; the
answers of ElfFile are compared with nm, readelf and objdump.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

from ptprobe.elf import ElfFile, Segment, Symbol, UsdtNote
from ptprobe.errors import ObjectFileError, SymbolNotFoundError
from ptprobe.usdt import UsdtError, evaluate, parse_args

C_DIR = Path(__file__).resolve().parent / "c"
LIBC = "/lib/x86_64-linux-gnu/libc.so.6"

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("readelf") is None,
                                reason="needs gcc and binutils")

NOP_FORMS = {
    "nop1": bytes.fromhex("90"),
    "nop5": bytes.fromhex("0f1f440000"),
    "nop1_nop5": bytes.fromhex("900f1f440000"),
    "nop1_nop10": bytes.fromhex("90662e0f1f840000000000"),
}


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def _gcc(out: Path, *args: str) -> str:
    _run("gcc", "-O2", "-I", str(C_DIR), "-o", str(out), *args)
    return str(out)


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, str]:
    d = tmp_path_factory.mktemp("elf")
    _run("gcc", "-c", "-o", str(d / "target.o"), str(C_DIR / "elf_other.c"))
    target = [str(C_DIR / "elf_target.c"), str(C_DIR / "elf_other.c")]
    forms = str(C_DIR / "usdt_forms.c")
    return {
        "pie": _gcc(d / "target_pie", "-fPIE", "-pie", *target),
        "nopie": _gcc(d / "target_nopie", "-fno-pie", "-no-pie", *target),
        "lib": _gcc(d / "libptlib.so", "-shared", "-fPIC", str(C_DIR / "usdt_lib.c")),
        "forms": _gcc(d / "forms_pie", "-fPIE", "-pie", forms),
        "forms_mem": _gcc(d / "forms_mem", "-fno-pie", "-no-pie",
                          "-DPTPROBE_SDT_ARG_CONSTRAINT=\"nor\"", forms),
        "obj": str(d / "target.o"),
    }


# ---------------------------------------------------------------------------
# binutils parsers

def nm_symbols(path: str) -> Set[Tuple[str, int]]:
    """(name, address) of the defined, non-absolute symbols nm lists (symtab + dynsym)."""
    result: Set[Tuple[str, int]] = set()
    outputs = [_run("nm", "-D", "--defined-only", path)]
    symtab = subprocess.run(["nm", "--defined-only", path], capture_output=True, text=True)
    if symtab.returncode == 0:
        outputs.append(symtab.stdout)
    for out in outputs:
        for line in out.splitlines():
            parts = line.split()
            if len(parts) != 3:
                continue
            addr, kind, name = parts
            if kind in "aAUNn?-" or int(addr, 16) == 0:
                continue
            result.add((name.split("@", 1)[0], int(addr, 16)))
    return result


def nm_sizes(path: str) -> Dict[Tuple[str, int], int]:
    sizes: Dict[Tuple[str, int], int] = {}
    for line in _run("nm", "-S", "--defined-only", path).splitlines():
        parts = line.split()
        if len(parts) == 4:
            sizes[(parts[3], int(parts[0], 16))] = int(parts[1], 16)
    return sizes


def readelf_notes(path: str) -> List[Dict[str, object]]:
    notes: List[Dict[str, object]] = []
    current: Dict[str, object] = {}
    for line in _run("readelf", "-nW", path).splitlines():
        line = line.strip()
        if "Provider:" in line:
            current = {"provider": line.split("Provider:", 1)[1].strip()}
        elif line.startswith("Name:"):
            current["name"] = line.split(":", 1)[1].strip()
        elif line.startswith("Location:"):
            m = re.match(r"Location: (0x[0-9a-f]+), Base: (0x[0-9a-f]+), Semaphore: (0x[0-9a-f]+)", line)
            assert m, line
            current["location"], current["base"], current["semaphore"] = (int(g, 16) for g in m.groups())
        elif line.startswith("Arguments:"):
            current["args"] = line.split(":", 1)[1].strip()
            notes.append(current)
    return notes


def readelf_sections(path: str) -> Dict[str, Tuple[int, int, int]]:
    """name -> (address, offset, size)."""
    out: Dict[str, Tuple[int, int, int]] = {}
    for line in _run("readelf", "-SW", path).splitlines():
        m = re.match(r"\s*\[\s*\d+\]\s+(\S+)\s+\S+\s+([0-9a-f]+)\s+([0-9a-f]+)\s+([0-9a-f]+)", line)
        if m:
            out[m.group(1)] = (int(m.group(2), 16), int(m.group(3), 16), int(m.group(4), 16))
    return out


def readelf_loads(path: str) -> List[Segment]:
    segs = []
    for line in _run("readelf", "-lW", path).splitlines():
        parts = line.split()
        if parts[:1] == ["LOAD"]:
            offset, vaddr, _paddr, filesz, memsz = (int(x, 16) for x in parts[1:6])
            flag_text = " ".join(parts[6:-1])
            flags = (4 if "R" in flag_text else 0) | (2 if "W" in flag_text else 0) | \
                    (1 if "E" in flag_text else 0)
            segs.append(Segment(vaddr, memsz, offset, filesz, flags))
    return segs


def objdump_bytes(path: str, start: int, stop: int) -> bytes:
    out = _run("objdump", "-d", "-z", f"--start-address={start:#x}", f"--stop-address={stop:#x}", path)
    data = bytearray()
    for line in out.splitlines():
        m = re.match(r"\s*([0-9a-f]+):\t((?:[0-9a-f]{2} )+)", line)
        if m:
            data += bytes.fromhex(m.group(2))
    return bytes(data)


# ---------------------------------------------------------------------------
# opening

@pytest.mark.parametrize("which", ["pie", "nopie", "lib"])
def test_header_fields_match_readelf(build: Dict[str, str], which: str) -> None:
    path = build[which]
    header = _run("readelf", "-hW", path)
    with ElfFile(path) as elf:
        assert elf.path == path
        assert elf.entry == int(re.search(r"Entry point address:\s+(0x[0-9a-f]+)", header).group(1), 16)
        assert elf.is_pie == ("DYN" in re.search(r"Type:\s+(\S+)", header).group(1))
        assert elf.segments == readelf_loads(path)
        m = re.search(r"Requesting program interpreter: ([^\]]+)\]", _run("readelf", "-lW", path))
        assert elf.interpreter == (m.group(1) if m else None)
        bid = re.search(r"Build ID: ([0-9a-f]+)", _run("readelf", "-nW", path))
        assert elf.build_id == (bid.group(1) if bid else None)
    assert which != "nopie" or not elf.is_pie
    assert which != "lib" or elf.interpreter is None


def _one_line_error(excinfo: pytest.ExceptionInfo, path: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and path in msg
    assert excinfo.value.path == path
    return msg


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope")
    with pytest.raises(ObjectFileError) as ei:
        ElfFile(path)
    assert "no such file" in _one_line_error(ei, path)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ObjectFileError) as ei:
        ElfFile(str(tmp_path))
    assert "directory" in _one_line_error(ei, str(tmp_path))


@pytest.mark.parametrize("content", [b"#!/bin/sh\necho hello\n", b"", b"\x7fEL", b"\x7fELF"])
def test_not_elf(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "script.sh"
    path.write_bytes(content)
    with pytest.raises(ObjectFileError) as ei:
        ElfFile(str(path))
    assert "not an ELF file" in _one_line_error(ei, str(path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read anything")
def test_permission_denied(tmp_path: Path, build: Dict[str, str]) -> None:
    path = tmp_path / "secret"
    shutil.copy(build["pie"], path)
    path.chmod(0)
    with pytest.raises(ObjectFileError) as ei:
        ElfFile(str(path))
    assert "permission" in _one_line_error(ei, str(path))


def test_permission_denied_simulated(tmp_path: Path, build: Dict[str, str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import ptprobe.elf

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ptprobe.elf, "open", refuse, raising=False)
    with pytest.raises(ObjectFileError) as ei:
        ElfFile(build["pie"])
    assert "permission denied" in _one_line_error(ei, build["pie"])


def test_relocatable_object_refused(build: Dict[str, str]) -> None:
    with pytest.raises(ObjectFileError) as ei:
        ElfFile(build["obj"])
    assert "ET_REL" in _one_line_error(ei, build["obj"])


@pytest.mark.parametrize("offset,value,words", [
    (4, b"\x01", "64-bit"),               # EI_CLASS = ELFCLASS32
    (5, b"\x02", "little-endian"),        # EI_DATA = big endian
    (18, struct.pack("<H", 183), "x86-64"),  # e_machine = EM_AARCH64
    (16, struct.pack("<H", 4), "core"),   # e_type = ET_CORE
])
def test_wrong_kind_of_elf(tmp_path: Path, build: Dict[str, str], offset: int, value: bytes,
                           words: str) -> None:
    data = bytearray(Path(build["pie"]).read_bytes())
    data[offset:offset + len(value)] = value
    path = tmp_path / "patched"
    path.write_bytes(bytes(data))
    with pytest.raises(ObjectFileError) as ei:
        ElfFile(str(path))
    assert words in _one_line_error(ei, str(path))


def test_truncated_elf(tmp_path: Path, build: Dict[str, str]) -> None:
    path = tmp_path / "truncated"
    path.write_bytes(Path(build["pie"]).read_bytes()[:200])
    with pytest.raises(ObjectFileError) as ei:
        elf = ElfFile(str(path))
        list(elf.iter_symbols())
        list(elf.iter_usdt_notes())
    _one_line_error(ei, str(path))


def _open_in_child(path: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """ElfFile(path) in a child python: a hang fails the test instead of blocking it."""
    code = ("import sys\nfrom ptprobe.elf import ElfFile\nfrom ptprobe.errors import ObjectFileError\n"
            "try:\n    ElfFile(sys.argv[1])\nexcept ObjectFileError as exc:\n"
            "    print(exc)\n    sys.exit(5)\n")
    try:
        return subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"ElfFile({path!r}) still blocked after {timeout}s")


def test_fifo_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "link").symlink_to(fifo)
    for path in (str(fifo), str(tmp_path / "link")):
        child = _open_in_child(path)
        assert child.returncode == 5, child.stderr
        assert child.stdout.strip() == f"{path}: is a FIFO, not an ELF file"
    # what a user sees: `ptprobe list FIFO` used to wait forever for a writer
    try:
        cli = subprocess.run([sys.executable, "-m", "ptprobe", "list", str(fifo)], capture_output=True,
                             text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("ptprobe list FIFO still blocked after 60s")
    assert cli.returncode == 5 and "FIFO" in cli.stderr and cli.stderr.count("\n") == 1


@pytest.mark.parametrize("path,kind", [("/dev/null", "a character device"), ("/dev/zero", "a character device")])
def test_device_refused(path: str, kind: str) -> None:
    if not os.path.exists(path):
        pytest.skip(f"no {path}")
    with pytest.raises(ObjectFileError) as ei:
        ElfFile(path)
    assert f"is {kind}, not an ELF file" in _one_line_error(ei, path)


def test_socket_refused(tmp_path: Path) -> None:
    import socket
    path = str(tmp_path / "sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(path)
        with pytest.raises(ObjectFileError) as ei:
            ElfFile(path)
    assert "is a socket" in _one_line_error(ei, path)


def test_path_forms(tmp_path: Path, build: Dict[str, str]) -> None:
    with ElfFile(Path(build["pie"])) as elf:                      # os.PathLike
        assert elf.path == build["pie"]
    with ElfFile(os.fsencode(build["pie"])) as elf:               # bytes
        assert elf.path == build["pie"]
    with pytest.raises(ObjectFileError) as ei:
        ElfFile(build["pie"] + "\0x")
    assert "NUL" in str(ei.value) and "\n" not in str(ei.value)
    with pytest.raises(ObjectFileError):
        ElfFile(None)  # type: ignore[arg-type]


# ELF64 header, program header and section header field offsets
_E_PHOFF, _E_SHOFF, _E_PHENTSIZE, _E_PHNUM, _E_SHENTSIZE, _E_SHNUM, _E_SHSTRNDX = 32, 40, 54, 56, 58, 60, 62
_P_OFFSET, _P_FILESZ = 8, 32
_SH_LINK, _SH_OFFSET, _SH_SIZE = 40, 24, 32


def _headers(data: bytes) -> Tuple[List[Tuple[int, int]], List[Tuple[int, int, str]]]:
    """([(offset of a program header, p_type)], [(offset of a section header, sh_type, name)])."""
    phoff, shoff = struct.unpack_from("<QQ", data, _E_PHOFF)
    phnum, _, shnum, shstrndx = struct.unpack_from("<HHHH", data, _E_PHNUM)
    phdrs = [(phoff + 56 * i, struct.unpack_from("<I", data, phoff + 56 * i)[0]) for i in range(phnum)]
    str_off = struct.unpack_from("<Q", data, shoff + 64 * shstrndx + _SH_OFFSET)[0]
    shdrs = []
    for i in range(shnum):
        at = shoff + 64 * i
        name_off, sh_type = struct.unpack_from("<II", data, at)
        name = data[str_off + name_off:data.index(b"\0", str_off + name_off)].decode()
        shdrs.append((at, sh_type, name))
    return phdrs, shdrs


def _section_header(data: bytes, name: str) -> int:
    return next(at for at, _t, n in _headers(data)[1] if n == name)


def _program_header(data: bytes, p_type: int) -> int:
    return next(at for at, t in _headers(data)[0] if t == p_type)


def _damaged(build: Dict[str, str], which: str, *patches: Tuple[str, int, int, int]) -> bytes:
    """The file *which* with (where, offset, width, value) patches; where is "ehdr", "interp" (the
    PT_INTERP header) or a section name."""
    data = bytearray(Path(build[which]).read_bytes())
    for where, offset, width, value in patches:
        if where == "ehdr":
            base = 0
        elif where == "interp":
            base = _program_header(bytes(data), 3)
        else:
            base = _section_header(bytes(data), where)
        data[base + offset:base + offset + width] = value.to_bytes(width, "little")
    return bytes(data)


_HUGE = [(1 << 64) - 1, 1 << 63, (1 << 63) - 1, 1 << 40, 0xFFFFFFFF]


@pytest.mark.parametrize("where,offset,width,values", [
    ("ehdr", _E_PHOFF, 8, _HUGE),                 # was OSError(EINVAL) from seek
    ("ehdr", _E_SHOFF, 8, _HUGE),
    ("ehdr", _E_PHNUM, 2, [0xFFFE, 0x8000]),      # table past the end of the file
    ("ehdr", _E_SHNUM, 2, [0xFFFE, 0x8000]),
    ("ehdr", _E_PHENTSIZE, 2, [0, 1, 55, 57, 0xFFFF]),
    ("ehdr", _E_SHENTSIZE, 2, [0, 1, 63, 65, 0xFFFF]),
    ("ehdr", _E_SHSTRNDX, 2, [0xFFFE, 0xFF00]),
    ("interp", _P_FILESZ, 8, _HUGE),              # was MemoryError from read(p_filesz)
    ("interp", _P_OFFSET, 8, _HUGE),
    (".shstrtab", _SH_SIZE, 8, _HUGE),            # was MemoryError
    (".shstrtab", _SH_OFFSET, 8, _HUGE),
    (".note.gnu.build-id", _SH_SIZE, 8, _HUGE),
    (".note.gnu.build-id", _SH_OFFSET, 8, _HUGE),
])
def test_huge_header_fields(tmp_path: Path, build: Dict[str, str], where: str, offset: int, width: int,
                            values: List[int]) -> None:
    for value in values:
        path = tmp_path / f"damaged-{value:x}"
        path.write_bytes(_damaged(build, "pie", (where, offset, width, value)))
        with pytest.raises(ObjectFileError) as ei:
            ElfFile(str(path))
        _one_line_error(ei, str(path))


@pytest.mark.parametrize("section,offset", [(".dynsym", _SH_SIZE), (".dynsym", _SH_OFFSET),
                                            (".dynstr", _SH_SIZE), (".dynstr", _SH_OFFSET),
                                            (".symtab", _SH_SIZE), (".strtab", _SH_OFFSET),
                                            (".gnu.version", _SH_SIZE), (".dynsym", _SH_LINK)])
def test_huge_symbol_table_fields(tmp_path: Path, build: Dict[str, str], section: str, offset: int) -> None:
    width = 4 if offset == _SH_LINK else 8
    for value in (_HUGE if width == 8 else [0xFFFFFFFF, 0x10000]):
        path = tmp_path / f"damaged-{value:x}"
        path.write_bytes(_damaged(build, "pie", (section, offset, width, value)))
        with ElfFile(str(path)) as elf:                  # the headers are fine
            with pytest.raises(ObjectFileError) as ei:
                list(elf.iter_symbols())
            _one_line_error(ei, str(path))
            with pytest.raises(ObjectFileError):     # and again: nothing half-cached
                elf.find_symbol("main")


def test_huge_segment_fields_fail_on_read(tmp_path: Path, build: Dict[str, str]) -> None:
    data = bytearray(Path(build["pie"]).read_bytes())
    with ElfFile(build["pie"]) as elf:
        main = elf.get_symbol("main")
        seg = next(s for s in elf.segments if s.vaddr <= main.address < s.vaddr + s.filesz)
    index = next(i for i, (at, t) in enumerate(_headers(bytes(data))[0])
                 if t == 1 and struct.unpack_from("<Q", data, at + 16)[0] == seg.vaddr)
    at = _headers(bytes(data))[0][index][0]
    struct.pack_into("<Q", data, at + _P_OFFSET, (1 << 64) - 0x1000)
    path = tmp_path / "damaged"
    path.write_bytes(bytes(data))
    with ElfFile(str(path)) as elf:        # a PT_LOAD past the end opens (debug files have them) ...
        with pytest.raises(ObjectFileError) as ei:
            elf.read(main.address, 16)  # ... and cannot be read
    assert "past the end of the file" in _one_line_error(ei, str(path))


def test_separate_debug_file(tmp_path: Path, build: Dict[str, str]) -> None:
    """objcopy --only-keep-debug: PT_INTERP of 0 bytes, PT_LOADs with no file bytes, NOBITS code."""
    debug = str(tmp_path / "target.debug")
    _run("objcopy", "--only-keep-debug", build["pie"], debug)
    with ElfFile(build["pie"]) as elf, ElfFile(debug) as dbg:
        assert dbg.interpreter is None and dbg.build_id == elf.build_id
        assert dbg.get_symbol("compute") == elf.get_symbol("compute")
        assert list(dbg.iter_symbols()) == list(elf.iter_symbols())


def test_extended_section_numbering(tmp_path: Path, build: Dict[str, str]) -> None:
    """e_shnum 0 and e_shstrndx SHN_XINDEX: the counts are in section 0 (gABI)."""
    data = bytearray(Path(build["pie"]).read_bytes())
    shoff = struct.unpack_from("<Q", data, _E_SHOFF)[0]
    shnum, shstrndx = struct.unpack_from("<HH", data, _E_SHNUM)
    struct.pack_into("<HH", data, _E_SHNUM, 0, 0xFFFF)
    struct.pack_into("<Q", data, shoff + _SH_SIZE, shnum)
    struct.pack_into("<I", data, shoff + _SH_LINK, shstrndx)
    path = tmp_path / "xnum"
    path.write_bytes(bytes(data))
    with ElfFile(build["pie"]) as plain, ElfFile(str(path)) as extended:
        assert list(extended.iter_symbols()) == list(plain.iter_symbols())
        assert extended.build_id == plain.build_id and extended.segments == plain.segments
    struct.pack_into("<Q", data, shoff + _SH_SIZE, (1 << 64) - 1)      # a count past the end
    path.write_bytes(bytes(data))
    with pytest.raises(ObjectFileError) as ei:
        ElfFile(str(path))
    assert "section header table" in _one_line_error(ei, str(path))


def test_bad_section_name_offset(tmp_path: Path, build: Dict[str, str]) -> None:
    """A name offset outside .shstrtab gives an empty name, not an error."""
    data = bytearray(Path(build["forms"]).read_bytes())
    struct.pack_into("<I", data, _section_header(bytes(data), ".note.stapsdt"), 0xFFFFFFF0)
    path = tmp_path / "noname"
    path.write_bytes(bytes(data))
    with ElfFile(str(path)) as elf:
        assert list(elf.iter_usdt_notes()) == []
        assert elf.find_symbol("main") is not None


def test_close_and_context_manager(build: Dict[str, str]) -> None:
    with ElfFile(build["pie"]) as elf:
        main = elf.get_symbol("main")
        assert elf.read(main.address, 1)
    with pytest.raises(ObjectFileError):
        elf.read(main.address, 1)
    assert elf.get_symbol("main") == main          # cached tables stay usable
    elf.close()                                    # idempotent


# ---------------------------------------------------------------------------
# symbols

@pytest.mark.parametrize("which", ["pie", "nopie", "lib"])
def test_symbols_match_nm(build: Dict[str, str], which: str) -> None:
    path = build[which]
    with ElfFile(path) as elf:
        ours = list(elf.iter_symbols())
    assert len(ours) == len(set(ours)), "duplicates"
    assert {(s.name, s.address) for s in ours} == nm_symbols(path)
    sizes = nm_sizes(path)
    for s in ours:
        if (s.name, s.address) in sizes:
            assert s.size == sizes[(s.name, s.address)], s


def test_symbol_kinds_and_lookup(build: Dict[str, str]) -> None:
    nm = {(n, a) for n, a in nm_symbols(build["nopie"])}
    with ElfFile(build["nopie"]) as elf:
        for name in ("main", "compute", "alias_fn", "weak_fn", "other_get", "zero_size_fn"):
            sym = elf.get_symbol(name)
            assert sym.kind == "func" and (name, sym.address) in nm
        for name in ("counter", "zeroed", "message"):
            assert elf.get_symbol(name).kind == "object"
        assert elf.get_symbol("zeroed").size == 64 * 4
        assert elf.get_symbol("zero_size_fn").size == 0
        assert elf.get_symbol("compute").address == elf.get_symbol("alias_fn").address
        # a local function and a global object share the name "helper": FUNC wins
        helpers = [s for s in elf.iter_symbols() if s.name == "helper"]
        assert sorted(s.kind for s in helpers) == ["func", "object"]
        assert elf.get_symbol("helper").kind == "func"
        assert elf.find_symbol("no_such_symbol") is None
        with pytest.raises(SymbolNotFoundError) as ei:
            elf.get_symbol("no_such_symbol")
        assert ei.value.name == "no_such_symbol" and "\n" not in str(ei.value)
        with pytest.raises(LookupError):
            elf.get_symbol("")


def test_symbol_at(build: Dict[str, str]) -> None:
    with ElfFile(build["pie"]) as elf:
        compute = elf.get_symbol("compute")
        assert compute.size > 2
        for addr in (compute.address, compute.address + 1, compute.address + compute.size - 1):
            hit = elf.symbol_at(addr)
            assert hit is not None and hit.address == compute.address and hit.name in ("compute", "alias_fn")
        after = elf.symbol_at(compute.address + compute.size)
        assert after is None or after.address >= compute.address + compute.size
        zero = elf.get_symbol("zero_size_fn")
        assert elf.symbol_at(zero.address) == zero
        nxt = elf.symbol_at(zero.address + 1)
        assert nxt is None or nxt.address == zero.address + 1
        helper = elf.get_symbol("helper")
        assert elf.symbol_at(helper.address + 1) == helper
        assert elf.symbol_at(elf.get_symbol("counter").address) is None   # data: no function
        assert elf.symbol_at(0) is None
        # every function symbol is found at its own address, with that address
        for s in elf.iter_symbols():
            if s.kind == "func":
                found = elf.symbol_at(s.address)
                assert found is not None and found.address == s.address


def test_libc_symbols_fast_and_versioned() -> None:
    if not os.path.exists(LIBC):
        pytest.skip("no glibc at " + LIBC)
    start = time.perf_counter()
    elf = ElfFile(LIBC)
    malloc = elf.get_symbol("malloc")
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"opening libc and finding malloc took {elapsed:.2f}s"
    start = time.perf_counter()
    for _ in range(1000):
        elf.get_symbol("printf")
    assert time.perf_counter() - start < 0.1
    assert malloc.kind == "func" and malloc.size > 0
    assert elf.symbol_at(malloc.address + 1).address == malloc.address
    # default versions: nm -D prints name@@VERSION for them
    defaults = {}
    for line in _run("nm", "-D", "--defined-only", LIBC).splitlines():
        parts = line.split()
        if len(parts) == 3 and "@@" in parts[2]:
            defaults[parts[2].split("@", 1)[0]] = int(parts[0], 16)
    for name in ("malloc", "printf", "memcpy", "realpath", "pthread_cond_wait"):
        if name in defaults:
            assert elf.get_symbol(name).address == defaults[name], name
    if "memcpy" in defaults:
        assert elf.get_symbol("memcpy").ifunc
    elf.close()


# ---------------------------------------------------------------------------
# addresses and bytes

@pytest.mark.parametrize("which", ["pie", "nopie", "lib"])
def test_read_matches_objdump_and_file(build: Dict[str, str], which: str) -> None:
    path = build[which]
    data = Path(path).read_bytes()
    with ElfFile(path) as elf:
        names = ("compute", "main", "other_get") if which != "lib" else ("ptlib_work",)
        for name in names:
            sym = elf.get_symbol(name)
            code = elf.read(sym.address, sym.size)
            assert code == objdump_bytes(path, sym.address, sym.address + sym.size)
            off = elf.vaddr_to_offset(sym.address)
            assert off is not None and data[off:off + sym.size] == code
            assert elf.offset_to_vaddr(off) == sym.address
            assert elf.is_executable_address(sym.address)
        if which != "lib":
            msg = elf.get_symbol("message")
            assert elf.read(msg.address, msg.size) == b"ptprobe elf test\0"
            assert struct.unpack("<i", elf.read(elf.get_symbol("counter").address, 4)) == (7,)
            zeroed = elf.get_symbol("zeroed")
            assert elf.read(zeroed.address, zeroed.size) == bytes(zeroed.size)      # .bss
            assert elf.vaddr_to_offset(zeroed.address + 8) is None
            assert not elf.is_executable_address(zeroed.address)
            assert not elf.is_executable_address(msg.address)
        end = max(s.vaddr + s.memsz for s in elf.segments)
        with pytest.raises(ObjectFileError) as ei:
            elf.read(end - 2, 4)
        assert "\n" not in str(ei.value)
        assert isinstance(ei.value, ValueError)
        assert elf.read(end - 2, 4, partial=True) == elf.read(end - 2, 2)
        assert elf.read(end + 0x100000, 4, partial=True) == b""
        assert elf.read(end - 2, 0) == b""
        assert not elf.is_executable_address(end + 0x100000)
        assert elf.vaddr_to_offset(end + 0x100000) is None
        assert elf.offset_to_vaddr(len(data) + 10) is None


# ---------------------------------------------------------------------------
# USDT notes

@pytest.mark.parametrize("which", ["forms", "forms_mem", "lib"])
def test_usdt_notes_match_readelf(build: Dict[str, str], which: str) -> None:
    path = build[which]
    expected = readelf_notes(path)
    sections = readelf_sections(path)
    with ElfFile(path) as elf:
        notes = list(elf.iter_usdt_notes())
        assert list(elf.iter_usdt_notes()) == notes       # cached, re-iterable
    assert len(notes) == len(expected) > 0
    base_addr = sections[".stapsdt.base"][0]
    for note, exp in zip(notes, expected):
        assert isinstance(note, UsdtNote)
        assert (note.provider, note.name, note.location, note.note_base, note.semaphore, note.args) == \
            (exp["provider"], exp["name"], exp["location"], exp["base"], exp["semaphore"], exp["args"])
        assert note.note_base == base_addr
        assert note.address == note.location
        parse_args(note.args)             # whatever gcc printed, the parser accepts it


def test_usdt_site_forms_bytes(build: Dict[str, str]) -> None:
    path = build["forms"]
    with ElfFile(path) as elf:
        notes = {n.name: n for n in elf.iter_usdt_notes()}
        for name, code in NOP_FORMS.items():
            note = notes[name]
            assert note.provider == "ptforms"
            assert elf.read(note.address, len(code)) == code
            assert objdump_bytes(path, note.address, note.address + len(code)) == code
            assert elf.is_executable_address(note.address)
            assert elf.symbol_at(note.address) == elf.get_symbol("forms")
        assert elf.read(notes["default_form"].address, 1) == b"\x90"
        assert len(parse_args(notes["twelve"].args)) == 12
        assert notes["default_form"].args == ""
        assert notes["nop1"].args == "-8@%rdi"                 # long
        assert notes["nop1_nop10"].args == "-8@%rdi 4@%esi -2@%dx 1@%cl"
        # semaphore: the link-time address of ptforms_guarded_semaphore in .probes
        sem = elf.get_symbol("ptforms_guarded_semaphore")
        assert notes["guarded"].semaphore == sem.address and sem.size == 2
        probes = readelf_sections(path)[".probes"]
        assert probes[0] <= sem.address < probes[0] + probes[2]
        assert all(n.semaphore == 0 for n in notes.values() if n.name != "guarded")
        # constants: gcc prints unsigned 0xffffffff as $-1 and (unsigned char)200 as $-56
        values = [evaluate(a, lambda r: 0, lambda a, n: b"") for a in parse_args(notes["constants"].args)]
        assert values == [42, -7, 0xFFFFFFFF, 200, -1]


def test_usdt_memory_operands_evaluate_from_file(build: Dict[str, str]) -> None:
    """The non-PIE "nor" build prints globals as sym(%rip): evaluate them from the file."""
    with ElfFile(build["forms_mem"]) as elf:
        note = next(n for n in elf.iter_usdt_notes() if n.name == "types")
        args = parse_args(note.args)
        expected = [-5, 65535, -100000, 0xFEDCBA9876543210, 2.5, -1.25]
        checked = 0
        for arg, value in zip(args, expected):
            if arg.kind != "rip":
                continue
            got = evaluate(arg, lambda r: 0, elf.read,
                           resolve_symbol=lambda s: elf.get_symbol(s).address)
            assert got == value and type(got) is type(value), arg
            checked += 1
        assert checked >= 4, note.args


def test_shared_library_semaphore(build: Dict[str, str]) -> None:
    path = build["lib"]
    with ElfFile(path) as elf:
        assert elf.is_pie
        notes = {n.name: n for n in elf.iter_usdt_notes()}
        assert set(notes) == {"plain", "ready"}
        ready = notes["ready"]
        sem = elf.get_symbol("ptlib_ready_semaphore")
        assert ready.semaphore == sem.address and sem.kind == "object"
        assert elf.read(sem.address, 2) == b"\0\0"
        assert elf.read(ready.address, 5) == NOP_FORMS["nop5"]
        assert elf.read(notes["plain"].address, 1) == b"\x90"
        assert notes["plain"].semaphore == 0
        args = parse_args(ready.args)
        assert [(a.size, a.signed) for a in args] == [(4, True), (8, True), (8, False)]
        work = elf.get_symbol("ptlib_work")
        for n in notes.values():
            assert work.address <= n.address < work.address + work.size


def _find_note_desc(data: bytes, note: UsdtNote) -> int:
    needle = struct.pack("<QQ", note.location, note.note_base)
    offset = data.find(needle)
    assert offset > 0 and data.find(needle, offset + 1) < 0
    return offset


def test_stapsdt_base_adjustment(tmp_path: Path, build: Dict[str, str]) -> None:
    with ElfFile(build["forms"]) as elf:
        note = next(n for n in elf.iter_usdt_notes() if n.name == "nop5")
    data = bytearray(Path(build["forms"]).read_bytes())
    off = _find_note_desc(bytes(data), note)
    struct.pack_into("<Q", data, off + 8, note.note_base - 0x100)   # as if .stapsdt.base moved up
    path = tmp_path / "moved"
    path.write_bytes(bytes(data))
    with ElfFile(str(path)) as elf:
        moved = next(n for n in elf.iter_usdt_notes() if n.name == "nop5")
        others = [n for n in elf.iter_usdt_notes() if n.name != "nop5"]
    assert moved.location == note.location
    assert moved.note_base == note.note_base - 0x100
    assert moved.address == note.location + 0x100
    assert moved.semaphore == note.semaphore
    assert all(n.address == n.location for n in others)


@pytest.mark.parametrize("damage", ["descsz", "nul"])
def test_corrupted_note_in_file(tmp_path: Path, build: Dict[str, str], damage: str) -> None:
    with ElfFile(build["forms"]) as elf:
        note = next(n for n in elf.iter_usdt_notes() if n.name == "default_form")
    data = bytearray(Path(build["forms"]).read_bytes())
    desc = _find_note_desc(bytes(data), note)
    header = desc - 8 - 12                 # "stapsdt\0" then the 12-byte note header
    assert data[header + 12:header + 20] == b"stapsdt\0"
    if damage == "descsz":
        sec = readelf_sections(build["forms"])[".note.stapsdt"]
        struct.pack_into("<I", data, header + 4, sec[2] + 64)      # runs past the section
    else:
        # "ptforms\0default_form\0\0" -> no NUL after the provider, name or args
        start = desc + 24
        end = start + len("ptforms") + 1 + len("default_form") + 1 + 1
        assert data[end - 1] == 0
        data[start:end] = b"x" * (end - start)
    path = tmp_path / "corrupt"
    path.write_bytes(bytes(data))
    with ElfFile(str(path)) as elf:
        with pytest.raises(UsdtError) as ei:
            list(elf.iter_usdt_notes())
    assert "\n" not in str(ei.value) and str(path) in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_no_notes_without_section(build: Dict[str, str]) -> None:
    with ElfFile(build["pie"]) as elf:
        assert list(elf.iter_usdt_notes()) == []


def test_symbol_dataclasses_are_frozen() -> None:
    s = Symbol("f", 1, 2, "func")
    with pytest.raises(Exception):
        s.address = 3  # type: ignore[misc]
    assert Segment(0, 1, 0, 1, 5).flags == 5
