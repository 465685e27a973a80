"""Mutated ELF files: whatever is wrong with a file, ElfFile raises ptprobe errors only.

A seeded generator damages real objects (a gcc-built USDT test program, /bin/true,
libc when present) where their parsers look: ELF header fields, program and
section headers, symbol tables, string tables and notes get byte flips and
extreme values (huge sizes and offsets, the file size, 2**64-1); files get cut
short. Every public ElfFile method then runs on each mutant, and anything raised
that is not a :class:`~ptprobe.errors.PtprobeError` fails the test.

PTPROBE_FUZZ_ELF=N sets the number of mutants (default 500; a stress run uses
10000), PTPROBE_FUZZ_SEED the seed (default 14).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import struct
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from ptprobe.elf import ElfFile
from ptprobe.errors import PtprobeError
from ptprobe.usdt import UsdtError, parse_args

from conftest import build

COUNT = int(os.environ.get("PTPROBE_FUZZ_ELF", "500"))
SEED = int(os.environ.get("PTPROBE_FUZZ_SEED", "14"))
LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
MUTANT_SECONDS = 5.0           # one mutant taking longer is a failure (a loop on bad sizes)

_SHT_SYMTAB, _SHT_STRTAB, _SHT_NOTE, _SHT_DYNSYM, _SHT_VERSYM = 2, 3, 7, 11, 0x6FFFFFFF


def test_usdt_error_is_a_ptprobe_error() -> None:
    # the fuzz below accepts UsdtError because of this, and only because of this
    assert issubclass(UsdtError, PtprobeError) and UsdtError.exit_code == 5


# ---------------------------------------------------------------------------
# where the structures of a (valid) seed file are


@dataclass
class Layout:
    """Offsets of the fields a parser reads, found in an intact seed file."""

    data: bytes
    # (offset, width in bytes) of every header field worth an extreme value
    fields: List[Tuple[int, int]] = field(default_factory=list)
    # byte ranges worth random flips, with a name for the report
    regions: List[Tuple[str, int, int]] = field(default_factory=list)
    # offsets worth cutting the file at
    cuts: List[int] = field(default_factory=list)


_EHDR_FIELDS = [(16, 2), (24, 8), (32, 8), (40, 8), (52, 2), (54, 2), (56, 2), (58, 2), (60, 2), (62, 2)]
_PHDR_FIELDS = [(0, 4), (4, 4), (8, 8), (16, 8), (32, 8), (40, 8), (48, 8)]
_SHDR_FIELDS = [(0, 4), (4, 4), (16, 8), (24, 8), (32, 8), (40, 4), (44, 4), (48, 8), (56, 8)]
_SYM_FIELDS = [(0, 4), (4, 1), (6, 2), (8, 8), (16, 8)]


def layout(data: bytes) -> Layout:
    lay = Layout(data)
    lay.fields += _EHDR_FIELDS
    lay.regions.append(("ehdr", 0, 64))
    phoff, shoff = struct.unpack_from("<QQ", data, 32)
    phnum, _shentsize, shnum, _shstrndx = struct.unpack_from("<HHHH", data, 56)
    lay.regions.append(("phdrs", phoff, phoff + 56 * phnum))
    lay.regions.append(("shdrs", shoff, shoff + 64 * shnum))
    lay.cuts += [64, phoff + 56 * phnum // 2, shoff, shoff + 64 * shnum // 2, shoff + 64 * shnum - 1]
    for i in range(phnum):
        lay.fields += [(phoff + 56 * i + o, w) for o, w in _PHDR_FIELDS]
        p_type, _f, p_offset, _v, _p, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + 56 * i)
        if p_type == 4:                                     # PT_NOTE
            lay.regions.append(("pt_note", p_offset, p_offset + p_filesz))
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + 64 * i) for i in range(shnum)]
    for i, (_n, sh_type, _fl, _a, off, size, _l, _i, align, _e) in enumerate(sections):
        base = shoff + 64 * i
        interesting = sh_type in (_SHT_SYMTAB, _SHT_STRTAB, _SHT_NOTE, _SHT_DYNSYM, _SHT_VERSYM)
        # every section header is a target, the ones the parser reads more often
        for _ in range(3 if interesting else 1):
            lay.fields += [(base + o, w) for o, w in _SHDR_FIELDS]
        if sh_type in (_SHT_SYMTAB, _SHT_DYNSYM):
            lay.regions.append(("symtab", off, off + size))
            lay.cuts.append(off + size // 2)
            symbols = range(1, size // 24)
            for s in random.Random(i).sample(symbols, min(40, len(symbols))):
                lay.fields += [(off + 24 * s + o, w) for o, w in _SYM_FIELDS]
        elif sh_type == _SHT_STRTAB:
            lay.regions.append(("strtab", off, off + size))
        elif sh_type == _SHT_VERSYM:
            lay.regions.append(("versym", off, off + size))
        elif sh_type == _SHT_NOTE:
            lay.regions.append(("notes", off, off + size))
            lay.cuts.append(off + size // 2)
            lay.fields += list(_note_fields(data, off, size, 8 if align == 8 else 4))
    lay.regions = [r for r in lay.regions if r[1] < r[2] <= len(data)]
    lay.cuts = [c for c in lay.cuts if 0 < c < len(data)]
    return lay


def _note_fields(data: bytes, off: int, size: int, align: int) -> Iterator[Tuple[int, int]]:
    pos, end = off, off + size
    while pos + 12 <= end:
        namesz, descsz, _type = struct.unpack_from("<III", data, pos)
        yield from [(pos, 4), (pos + 4, 4), (pos + 8, 4)]
        desc = pos + 12 + namesz + (-namesz % align)
        if data[pos + 12:pos + 12 + namesz].rstrip(b"\0") == b"stapsdt":
            yield from [(desc, 8), (desc + 8, 8), (desc + 16, 8)]
        pos = desc + descsz + (-descsz % align)


# ---------------------------------------------------------------------------
# mutations


def _extreme(rng: random.Random, width: int, size: int, old: int) -> int:
    top = (1 << (8 * width)) - 1
    choices = [0, 1, top, top >> 1, (top >> 1) + 1, size, size - 1, size + 1, old + 1, old - 1, old * 2,
               old + size, rng.getrandbits(8 * width), rng.randrange(0, max(2, size * 2))]
    if width == 8:
        choices += [1 << 32, (1 << 32) - 1, 1 << 40, 1 << 62, size << 20, -size & top, top - old]
    if width == 2:
        choices += [0xFF00, 0xFFF1, 0xFFF2, 0xFFFF, 0xFFFE]
    return rng.choice(choices) & top


def mutate(rng: random.Random, lay: Layout) -> Tuple[bytes, str]:
    """One mutant of the seed and a description of what was done."""
    data = bytearray(lay.data)
    done: List[str] = []
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        what = rng.random()
        if what < 0.5 and lay.fields:
            pos, width = rng.choice(lay.fields)
            if pos + width > len(data):
                continue
            old = int.from_bytes(data[pos:pos + width], "little")
            new = _extreme(rng, width, len(lay.data), old)
            data[pos:pos + width] = new.to_bytes(width, "little")
            done.append(f"field@{pos:#x}/{width}: {old:#x}->{new:#x}")
        elif what < 0.85 and lay.regions:
            name, start, end = rng.choice(lay.regions)
            if start >= len(data):
                continue
            for _ in range(rng.choice((1, 1, 2, 4, 16))):
                pos = rng.randrange(start, min(end, len(data)))
                if rng.random() < 0.5:
                    data[pos] ^= 1 << rng.randrange(8)
                else:
                    data[pos] = rng.choice((0, 0xFF, 0x80, 0x7F, rng.randrange(256)))
            done.append(f"flips in {name} {start:#x}..{end:#x}")
        elif data:
            cut = rng.choice(lay.cuts) if lay.cuts and rng.random() < 0.5 else rng.randrange(len(data))
            del data[cut:]
            done.append(f"cut at {cut:#x}")
    return bytes(data), "; ".join(done) or "no change"


# ---------------------------------------------------------------------------
# using every public method of ElfFile


def _quietly(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run *call*; a ptprobe error is a fine answer (None), anything else goes up."""
    try:
        return call(*args, **kwargs)
    except PtprobeError as exc:
        assert "\n" not in str(exc), str(exc)
        return None


def exercise(path: str, rng: random.Random, reached: Counter) -> None:
    elf = _quietly(ElfFile, path)
    if elf is None:
        return
    reached["opened"] += 1
    with elf:
        repr(elf)
        assert isinstance(elf.is_pie, bool) and isinstance(elf.entry, int)
        assert elf.interpreter is None or isinstance(elf.interpreter, str)
        assert elf.build_id is None or isinstance(elf.build_id, str)
        segments = list(elf.segments)
        symbols = _quietly(lambda: list(elf.iter_symbols())) or []
        for name in ("main", "forms", "malloc", "memcpy", "memcpy@GLIBC_2.14", "_start", "nope", ""):
            _quietly(elf.find_symbol, name)
            _quietly(elf.get_symbol, name)
        notes = _quietly(lambda: list(elf.iter_usdt_notes())) or []
        reached["with symbols"] += bool(symbols)
        reached["with USDT notes"] += bool(notes)
        for note in notes[:20]:
            _quietly(parse_args, note.args)
        addresses = {elf.entry, 0, (1 << 64) - 1, rng.getrandbits(64), rng.getrandbits(24)}
        for seg in segments:
            addresses.update({seg.vaddr, seg.vaddr + seg.filesz - 1, seg.vaddr + seg.filesz,
                              seg.vaddr + seg.memsz - 1, seg.vaddr + max(seg.memsz, 1) // 2})
        addresses.update(s.address for s in rng.sample(symbols, min(15, len(symbols))))
        addresses.update(n.address for n in notes[:10])
        addresses.update(n.semaphore for n in notes[:10])
        for address in sorted(a for a in addresses if a >= 0):
            _quietly(elf.symbol_at, address)
            _quietly(elf.symbol_at, address + 1)
            _quietly(elf.is_executable_address, address)
            _quietly(elf.vaddr_to_offset, address)
            _quietly(elf.offset_to_vaddr, address)
            _quietly(elf.read, address, 16)
            _quietly(elf.read, address, 1 << 20, partial=True)
        for seg in segments[:6]:
            _quietly(elf.read, seg.vaddr, min(seg.memsz, 4096))
    _quietly(elf.read, elf.entry, 1)            # closed: an ObjectFileError
    elf.close()


class _Slow(BaseException):
    """Raised in the main thread when one mutant takes too long."""


def _on_alarm(signum: int, frame: Optional[FrameType]) -> None:
    raise _Slow()


def seeds() -> Dict[str, bytes]:
    found = {}
    if shutil.which("gcc") is not None:
        found["usdt_forms"] = Path(build("usdt_forms.c", "-O2", "-fPIE", "-pie")).read_bytes()
    for path in ("/bin/true", LIBC):
        if os.path.exists(path):
            found[os.path.basename(path)] = Path(path).read_bytes()
    return found


def test_mutated_elf_files_raise_only_ptprobe_errors(tmp_path: Path) -> None:
    objects = seeds()
    if not objects:
        pytest.skip("no seed ELF file (no gcc, no /bin/true)")
    for name, data in objects.items():
        exercise_ok = _quietly(ElfFile, _write(tmp_path / name, data))
        assert exercise_ok is not None, f"seed {name} does not open"
    layouts = {name: layout(data) for name, data in objects.items()}
    names = sorted(layouts)
    # libc is large and slow to re-read: it gets a smaller share of the mutants
    weights = [1 if name == "libc.so.6" else 3 for name in names]
    rng = random.Random(SEED)
    escapes: Counter = Counter()
    reached: Counter = Counter()
    examples: Dict[str, str] = {}
    old = signal.signal(signal.SIGALRM, _on_alarm)
    start = time.monotonic()
    try:
        for i in range(COUNT):
            name = rng.choices(names, weights)[0]
            data, how = mutate(rng, layouts[name])
            path = _write(tmp_path / "mutant", data)
            signal.setitimer(signal.ITIMER_REAL, MUTANT_SECONDS)
            try:
                exercise(path, random.Random(i), reached)
            except _Slow:
                key = "took more than %gs" % MUTANT_SECONDS
                escapes[key] += 1
                examples.setdefault(key, f"mutant {i} of {name} ({how})")
            except Exception as exc:        # noqa: BLE001 - this is what the test looks for
                where = traceback.extract_tb(exc.__traceback__)[-1]
                key = f"{type(exc).__name__} at {Path(where.filename).name}:{where.lineno}"
                escapes[key] += 1
                examples.setdefault(key, f"mutant {i} of {name} ({how}): {str(exc)[:200]}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, old)
    elapsed = time.monotonic() - start
    report = "\n".join(f"{n:6d} {key}\n       e.g. {examples[key]}" for key, n in escapes.most_common())
    print(f"{COUNT} mutants in {elapsed:.1f}s ({', '.join(f'{n} {k}' for k, n in reached.items())}): "
          f"{sum(escapes.values())} non-ptprobe exceptions")
    assert not escapes, (f"{sum(escapes.values())} of {COUNT} mutants raised non-ptprobe exceptions "
                         f"(seed {SEED}):\n{report}")


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)
