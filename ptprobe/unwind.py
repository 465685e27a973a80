"""Unwinding the user stack of a stopped x86-64 thread, and naming its frames.

This module's one job: from a stopped thread's registers, a way to read its
memory and a way to find the object mapped at an address, return the call chain
as :class:`Frame` objects (address, ``symbol+0xoff``, object path). It makes no
system call of its own and knows nothing of ptrace: the caller supplies
``read_memory`` (``Process.mem.read``) and ``find_object``
(``Process.object_at``, or :func:`object_finder` over ``LoadedObject``\\ s).

Method, frame by frame:

* **CFI.** The frame's pc is looked up in the object's ``.eh_frame`` (then its
  ``.debug_frame``, then the ``.debug_frame`` of its separate debug file found
  by build ID). The row of the FDE that covers the pc gives the CFA
  (``reg+offset``, or a DWARF expression: the PLT stubs' and glibc's signal
  frame's are evaluated) and the rule of each register (undefined, same value,
  offset(N), val_offset(N), register, expression, val_expression). The caller's
  rsp is the CFA; its rip is the return address (column 16). For every frame but
  the first, and for none after a signal frame, the lookup uses
  ``return address - 1``: a call can be the last instruction of a function.
* **Frame pointers** where an address has no usable CFI: ``[rbp]`` is the
  caller's rbp, ``[rbp+8]`` the return address, the caller's rsp is ``rbp+16``;
  accepted only if rbp is aligned and above rsp and the return address lies in
  an executable segment of a mapped object. One exception: a first frame
  without CFI at its function's first instruction (or just after its
  ``endbr64``), where a probe on a function entry stops, has not pushed rbp
  yet: its return address is at [rsp].
* **Stops**: return address undefined in the CFI (``_start``, a thread's
  first frame), a return address of 0, a frame named ``_start``, unreadable
  stack memory, a stack pointer that does not grow, no usable unwind
  information, or *max_frames*. The reason is :attr:`Stack.reason`; nothing
  about a bad stack raises.

Indexes are built once per object file and kept in the :class:`Unwinder`:
the FDEs' starts sorted by pc come from ``.eh_frame_hdr``'s binary search table
(or, without one and for ``.debug_frame``, from a scan of the entry headers:
no parse); an FDE is parsed with pyelftools (one entry, not the section: all
of libc's takes 0.8 s) and compiled into compact rows the first time a pc
needs it; each pc met is remembered with its row and its symbol, so a stack
unwound again costs a few microseconds per frame. The caches are keyed by the
:class:`~ptprobe.elf.ElfFile` object (weakly), so the engine's one ``ElfFile``
per file shares them across processes. The section headers are read here with
:mod:`struct`; errors from pyelftools on a malformed entry make that FDE count
as absent (the unwind falls back to frame pointers there).
"""

from __future__ import annotations

import bisect
import io
import os
import struct
import weakref
import zlib
from dataclasses import dataclass
from typing import (BinaryIO, Callable, Dict, Iterable, List, Mapping, Optional, Protocol, Sequence, Set,
                    Tuple, Union)

from elftools.common.exceptions import DWARFError, ELFError
from elftools.dwarf.callframe import CIE, FDE, CallFrameInfo, CallFrameInstruction
from elftools.dwarf.structs import DWARFStructs

from .elf import ElfFile
from .errors import FaultError, ObjectFileError, PtprobeError

__all__ = ["Frame", "Stack", "MappedObject", "ObjectInfo", "RegisterSource", "Unwinder",
           "UnwindError", "object_finder",
           "END", "MAX_FRAMES", "FAULT", "NO_UNWIND_INFO", "NOT_MONOTONIC"]

# --- why an unwind stopped (Stack.reason) ------------------------------------------
#: The outermost frame was reached: the CFI marks the return address undefined
#: (glibc's ``_start``, a thread's start), the return address is 0, or the frame
#: is ``_start``.
END = "end"
#: *max_frames* frames were produced.
MAX_FRAMES = "max_frames"
#: The stack memory the next step needs could not be read (a bad rsp or rbp).
FAULT = "fault"
#: The pc has no usable CFI and the frame-pointer chain does not look like one.
NO_UNWIND_INFO = "no_unwind_info"
#: The next frame's stack pointer is not above this frame's (a corrupt stack).
NOT_MONOTONIC = "not_monotonic"

_M64 = (1 << 64) - 1
#: DWARF register numbers of x86-64 (psABI figure 3.36), 0..16; 16 is the return address.
_DWARF_NAMES = ("rax", "rdx", "rcx", "rbx", "rsi", "rdi", "rbp", "rsp",
                "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip")
_NREGS = 17
_RBP, _RSP, _RIP = 6, 7, 16
#: Callee-saved registers (rbx, rbp, r12-r15): unmentioned in a CFI row, a caller has the same value.
_CALLEE_SAVED = (3, 6, 12, 13, 14, 15)

# register rule kinds, as compiled from pyelftools' RegisterRule.type
_UNDEFINED, _SAME, _OFFSET, _VAL_OFFSET, _REGISTER, _EXPRESSION, _VAL_EXPRESSION = range(7)
_RULE_KINDS = {"UNDEFINED": _UNDEFINED, "SAME_VALUE": _SAME, "OFFSET": _OFFSET,
               "VAL_OFFSET": _VAL_OFFSET, "REGISTER": _REGISTER, "EXPRESSION": _EXPRESSION,
               "VAL_EXPRESSION": _VAL_EXPRESSION}

# CFA instruction opcodes that need care before pyelftools decodes a table
_CFA_DEF_CFA = 0x0C
_CFA_DEF_CFA_SF = 0x12
_CFA_GNU_ARGS_SIZE = 0x2E

#: pyelftools (and the construct library inside it) signal a malformed entry with
#: these; they are caught where an FDE is parsed and the FDE counts as absent.
_PYELFTOOLS_ERRORS = (ELFError, DWARFError, AssertionError, KeyError, IndexError, ValueError,
                      TypeError, AttributeError, struct.error, OverflowError, EOFError)

_U16 = struct.Struct("<H")
_S16 = struct.Struct("<h")
_U32 = struct.Struct("<I")
_S32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")
_S64 = struct.Struct("<q")

_BLOCK = 512                # stack bytes fetched per read (a divisor of the page size)


class UnwindError(PtprobeError, ValueError):
    """The unwinder was given registers it cannot start from (no rip or rsp)."""

    exit_code = 11


class _CfiError(ObjectFileError):
    """A CFI section or entry that cannot be read (caught inside this module)."""


class _Stop(PtprobeError):
    """Ends an unwind with a reason (internal: never leaves this module)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Unusable(PtprobeError):
    """The CFI of a frame cannot be evaluated here (internal): try frame pointers."""


# --- the caller's view ---------------------------------------------------------------

@dataclass(frozen=True)
class Frame:
    """One frame of a call chain.

    ``address`` is the frame's pc: rip for the first frame (and for a frame a
    signal interrupted), the return address for the others. ``symbol`` and
    ``offset`` name it (``offset`` = address - symbol start; for a return
    address the symbol is the one containing ``address - 1``, so the offset may
    equal the function's size after a call that does not return). ``object`` is
    the path of the mapped object, ``link_address`` the address in that file
    (as ``objdump``/``addr2line`` want it). ``sp`` is the frame's stack pointer
    (for a caller: its rsp once the callee has returned, the callee's CFA).
    ``how`` tells how the frame was found: ``"regs"`` (the first frame),
    ``"cfi"``, ``"fp"`` (frame-pointer chain), ``"entry"`` (the first frame had
    no CFI and stood at its function's first instruction: the return address
    was at [rsp]) or ``"signal"`` (restored from a signal frame: its address is
    the interrupted instruction).
    """

    address: int
    symbol: Optional[str]
    offset: Optional[int]
    object: Optional[str]
    link_address: Optional[int] = None
    sp: Optional[int] = None
    how: str = "regs"

    @property
    def name(self) -> str:
        """``symbol``, ``symbol+0x1c``, or the address in hex when no symbol covers it."""
        if self.symbol is None:
            return f"{self.address:#x}"
        return self.symbol if not self.offset else f"{self.symbol}+{self.offset:#x}"

    def __str__(self) -> str:
        if self.object is None:
            return self.name
        return f"{self.name} ({os.path.basename(self.object)})"


class Stack(List[Frame]):
    """The frames of an unwind, innermost first, and why it stopped (:attr:`reason`:
    :data:`END`, :data:`MAX_FRAMES`, :data:`FAULT`, :data:`NO_UNWIND_INFO`,
    :data:`NOT_MONOTONIC`)."""

    reason: str = END

    def __init__(self, frames: Iterable[Frame] = (), reason: str = END) -> None:
        super().__init__(frames)
        self.reason = reason

    def __repr__(self) -> str:
        return f"Stack({list.__repr__(self)}, reason={self.reason!r})"


class MappedObject(Protocol):
    """An ELF object mapped in the process: what ``ptprobe.process.LoadedObject`` has.

    ``elf`` is the object's :class:`~ptprobe.elf.ElfFile` (the unwinder's caches
    are keyed by it), ``bias`` is added to a link-time address to get the
    run-time one, ``start`` and ``end`` bound its mappings.
    """

    @property
    def path(self) -> str: ...

    @property
    def elf(self) -> ElfFile: ...

    @property
    def bias(self) -> int: ...

    @property
    def start(self) -> int: ...

    @property
    def end(self) -> int: ...


@dataclass(frozen=True)
class ObjectInfo:
    """A plain :class:`MappedObject`, for callers without a ``LoadedObject``."""

    path: str
    elf: ElfFile
    bias: int
    start: int
    end: int


class RegisterSource(Protocol):
    """Registers by name (``regs["rip"]``): a dict, or ``ptprobe.hit.Regs``."""

    def __getitem__(self, name: str) -> int: ...


Registers = Union[Mapping[str, int], RegisterSource]
ReadMemory = Callable[[int, int], bytes]
FindObject = Callable[[int], Optional[MappedObject]]
TranslateReturn = Callable[[int, int], int]


def object_finder(objects: Iterable[MappedObject]) -> FindObject:
    """A ``find_object`` over *objects* (binary search on their start addresses)."""
    ordered = sorted(objects, key=lambda o: o.start)
    starts = [o.start for o in ordered]

    def find(address: int) -> Optional[MappedObject]:
        i = bisect.bisect_right(starts, address) - 1
        if i >= 0 and address < ordered[i].end:
            return ordered[i]
        return None

    return find


# --- reading the stack ---------------------------------------------------------------

class _StackReader:
    """8-byte reads of the tracee's memory through aligned blocks read once per unwind.

    A block lies within one page, so it is readable whenever the 8 bytes asked
    for are; if a block read fails anyway, the exact read decides.
    """

    __slots__ = ("_read", "_blocks")

    def __init__(self, read: ReadMemory) -> None:
        self._read = read
        self._blocks: Dict[int, bytes] = {}

    def bytes(self, address: int, size: int) -> bytes:
        if address < 0 or address + size > _M64:
            raise FaultError(f"cannot read {size} bytes at {address:#x}", address)
        base = address & ~(_BLOCK - 1)
        if address + size <= base + _BLOCK:
            block = self._blocks.get(base)
            if block is None:
                try:
                    block = self._read(base, _BLOCK)
                except FaultError:
                    block = b""
                if len(block) == _BLOCK:
                    self._blocks[base] = block
            if len(block) == _BLOCK:
                start = address - base
                return block[start:start + size]
        data = self._read(address, size)
        if len(data) != size:
            raise FaultError(f"short read of {size} bytes at {address:#x}", address)
        return data

    def u64(self, address: int) -> int:
        return int.from_bytes(self.bytes(address, 8), "little")


# --- DWARF expressions (DWARF 5 section 2.5), the subset CFI uses ------------------

def _leb128(data: bytes, pos: int, signed: bool) -> Tuple[int, int]:
    """(value, position after it) of the LEB128 number at *pos*."""
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            if signed and byte & 0x40:
                result -= 1 << shift
            return result, pos


def _uleb(data: bytes, pos: int) -> Tuple[int, int]:
    return _leb128(data, pos, False)


def _sleb(data: bytes, pos: int) -> Tuple[int, int]:
    return _leb128(data, pos, True)


def _signed(value: int) -> int:
    value &= _M64
    return value - (1 << 64) if value >> 63 else value


_FIXED_CONSTS = {0x08: (1, False), 0x09: (1, True), 0x0A: (2, False), 0x0B: (2, True),
                 0x0C: (4, False), 0x0D: (4, True), 0x0E: (8, False), 0x0F: (8, True),
                 0x03: (8, False)}


def _evaluate(expr: bytes, regs: List[Optional[int]], reader: _StackReader,
              initial: Optional[int] = None) -> int:
    """The value a DWARF expression leaves on top of its stack.

    *initial* (the CFA, for a register rule) is pushed first. Registers are the
    frame's (by DWARF number). Raises :class:`_Unusable` for an operation
    outside the subset, an unknown register or a malformed expression, and
    :class:`FaultError` from a dereference.
    """
    stack: List[int] = [] if initial is None else [initial & _M64]
    pos = 0
    end = len(expr)
    steps = 0
    try:
        while pos < end:
            steps += 1
            if steps > 10000:
                raise _Unusable("expression does not terminate")
            op = expr[pos]
            pos += 1
            if 0x30 <= op <= 0x4F:                      # lit0..lit31
                stack.append(op - 0x30)
            elif 0x70 <= op <= 0x8F or op == 0x92:      # breg0..breg31, bregx
                if op == 0x92:
                    regno, pos = _uleb(expr, pos)
                else:
                    regno = op - 0x70
                offset, pos = _sleb(expr, pos)
                value = regs[regno] if regno < _NREGS else None
                if value is None:
                    raise _Unusable(f"expression uses register {regno}, unknown in this frame")
                stack.append((value + offset) & _M64)
            elif op == 0x06:                            # deref
                stack.append(reader.u64(stack.pop()))
            elif op == 0x94:                            # deref_size
                size = expr[pos]
                pos += 1
                if not 1 <= size <= 8:
                    raise _Unusable(f"deref_size {size}")
                stack.append(int.from_bytes(reader.bytes(stack.pop(), size), "little"))
            elif op in _FIXED_CONSTS:                   # addr, const1u .. const8s
                size, signed = _FIXED_CONSTS[op]
                if pos + size > end:
                    raise _Unusable("truncated constant")
                value = int.from_bytes(expr[pos:pos + size], "little", signed=signed)
                pos += size
                stack.append(value & _M64)
            elif op == 0x10:                            # constu
                value, pos = _uleb(expr, pos)
                stack.append(value & _M64)
            elif op == 0x11:                            # consts
                value, pos = _sleb(expr, pos)
                stack.append(value & _M64)
            elif op == 0x12:                            # dup
                stack.append(stack[-1])
            elif op == 0x13:                            # drop
                stack.pop()
            elif op == 0x14:                            # over
                stack.append(stack[-2])
            elif op == 0x15:                            # pick
                index = expr[pos]
                pos += 1
                stack.append(stack[-1 - index])
            elif op == 0x16:                            # swap
                stack[-1], stack[-2] = stack[-2], stack[-1]
            elif op == 0x17:                            # rot
                stack[-1], stack[-2], stack[-3] = stack[-2], stack[-3], stack[-1]
            elif op == 0x19:                            # abs
                stack.append(abs(_signed(stack.pop())) & _M64)
            elif op == 0x1F:                            # neg
                stack.append(-stack.pop() & _M64)
            elif op == 0x20:                            # not
                stack.append(~stack.pop() & _M64)
            elif op == 0x23:                            # plus_uconst
                value, pos = _uleb(expr, pos)
                stack.append((stack.pop() + value) & _M64)
            elif op in _BINARY:
                b = stack.pop()
                a = stack.pop()
                stack.append(_BINARY[op](a, b) & _M64)
            elif op == 0x2F or op == 0x28:              # skip, bra
                if pos + 2 > end:
                    raise _Unusable("truncated branch")
                (delta,) = _S16.unpack_from(expr, pos)
                pos += 2
                if op == 0x2F or stack.pop() != 0:
                    pos += delta
                    if not 0 <= pos <= end:
                        raise _Unusable("branch out of the expression")
            elif op == 0x96:                            # nop
                pass
            else:
                raise _Unusable(f"unsupported DWARF operation {op:#04x}")
    except IndexError:
        raise _Unusable("malformed expression (stack underflow or truncated)") from None
    if not stack:
        raise _Unusable("expression left an empty stack")
    return stack[-1]


def _divide(a: int, b: int) -> int:
    if _signed(b) == 0:
        raise _Unusable("division by zero")
    q = abs(_signed(a)) // abs(_signed(b))
    return q if (_signed(a) < 0) == (_signed(b) < 0) else -q


def _modulo(a: int, b: int) -> int:
    if b == 0:
        raise _Unusable("modulo by zero")
    return a % b


_BINARY: Dict[int, Callable[[int, int], int]] = {
    0x1A: lambda a, b: a & b,                                  # and
    0x1B: _divide,                                             # div (signed)
    0x1C: lambda a, b: a - b,                                  # minus
    0x1D: _modulo,                                             # mod
    0x1E: lambda a, b: a * b,                                  # mul
    0x21: lambda a, b: a | b,                                  # or
    0x22: lambda a, b: a + b,                                  # plus
    0x24: lambda a, b: a << b if b < 64 else 0,                # shl
    0x25: lambda a, b: a >> b if b < 64 else 0,                # shr
    0x26: lambda a, b: _signed(a) >> min(b, 63),               # shra
    0x27: lambda a, b: a ^ b,                                  # xor
    0x29: lambda a, b: int(_signed(a) == _signed(b)),          # eq
    0x2A: lambda a, b: int(_signed(a) >= _signed(b)),          # ge
    0x2B: lambda a, b: int(_signed(a) > _signed(b)),           # gt
    0x2C: lambda a, b: int(_signed(a) <= _signed(b)),          # le
    0x2D: lambda a, b: int(_signed(a) < _signed(b)),           # lt
    0x2E: lambda a, b: int(_signed(a) != _signed(b)),          # ne
}


# --- CFI sections: the index and the FDE rows ----------------------------------------

#: a register rule: (register, kind, number (offset or register), expression or None)
_Rule = Tuple[int, int, int, Optional[bytes]]
#: one row of an FDE's table: (cfa register, cfa offset, cfa expression or None, rules);
#: the register is -1 for an expression
_Row = Tuple[int, int, Optional[bytes], Tuple[_Rule, ...]]


class _FdeRows:
    """The decoded table of one FDE, as compact rows sorted by pc."""

    __slots__ = ("starts", "rows", "signal")

    def __init__(self, starts: List[int], rows: List[_Row], signal: bool) -> None:
        self.starts = starts
        self.rows = rows
        self.signal = signal            # the CIE's augmentation has 'S': a signal frame

    def row_at(self, pc: int) -> _Row:
        i = bisect.bisect_right(self.starts, pc) - 1
        return self.rows[max(i, 0)]


def _read_encoded(data: bytes, pos: int, encoding: int, section_address: int,
                  apply: bool = True) -> Tuple[Optional[int], int]:
    """A pointer encoded with a DW_EH_PE_* *encoding* (LSB 5.0, "DWARF Extensions")
    at *pos* of a CFI section loaded at *section_address*; (None, pos) when the
    application (textrel, datarel, ...) is not one a FDE header can use here."""
    fmt = encoding & 0x0F
    if fmt == 0x00:
        value = _U64.unpack_from(data, pos)[0]
        new = pos + 8
    elif fmt == 0x01:
        value, new = _uleb(data, pos)
    elif fmt == 0x02:
        value, new = _U16.unpack_from(data, pos)[0], pos + 2
    elif fmt == 0x03:
        value, new = _U32.unpack_from(data, pos)[0], pos + 4
    elif fmt == 0x04:
        value, new = _U64.unpack_from(data, pos)[0], pos + 8
    elif fmt == 0x09:
        value, new = _sleb(data, pos)
    elif fmt == 0x0A:
        value, new = _S16.unpack_from(data, pos)[0], pos + 2
    elif fmt == 0x0B:
        value, new = _S32.unpack_from(data, pos)[0], pos + 4
    elif fmt == 0x0C:
        value, new = _S64.unpack_from(data, pos)[0], pos + 8
    else:
        raise _CfiError(f"pointer encoding {encoding:#x}", "")
    if not apply:
        return value & _M64, new
    application = encoding & 0x70
    if application == 0x00:
        return value & _M64, new
    if application == 0x10:                     # pcrel: from the field itself
        return (value + section_address + pos) & _M64, new
    return None, new


def _cie_fde_encoding(data: bytes, offset: int, eh: bool) -> Optional[int]:
    """The encoding of the addresses in the FDEs of the CIE at *offset* (from its
    'R' augmentation; DW_EH_PE_absptr without one), or None when the CIE has an
    augmentation this module does not know how to skip."""
    (length,) = _U32.unpack_from(data, offset)
    pos = offset + 4
    id_size = 4
    if length == 0xFFFFFFFF:
        pos += 8
        id_size = 8
    pos += id_size
    version = data[pos]
    pos += 1
    nul = data.index(b"\0", pos)
    augmentation = data[pos:nul]
    pos = nul + 1
    if not eh and version >= 4:
        address_size = data[pos]
        pos += 2                                # address_size, segment_selector_size
        if address_size != 8:
            return None
    _, pos = _uleb(data, pos)                   # code alignment factor
    _, pos = _sleb(data, pos)                   # data alignment factor
    if version == 1:
        pos += 1
    else:
        _, pos = _uleb(data, pos)               # return address register
    if not augmentation:
        return 0x00
    if augmentation[:1] != b"z":
        return None
    _, pos = _uleb(data, pos)                   # augmentation data length
    for char in augmentation[1:]:
        if char == ord("R"):
            return data[pos]
        if char == ord("L"):
            pos += 1
        elif char == ord("P"):
            encoding = data[pos]
            _, pos = _read_encoded(data, pos + 1, encoding, 0, apply=False)
        elif char in (ord("S"), ord("B"), ord("G")):
            pass
        else:
            return None
    return 0x00


class _Entries:
    """Reads the headers of the entries of one CFI section (their CIEs' pointer
    encodings cached)."""

    def __init__(self, data: bytes, address: int, eh: bool) -> None:
        self.data = data
        self.address = address
        self.eh = eh
        self._encodings: Dict[int, Optional[int]] = {}

    def header(self, offset: int) -> Tuple[Optional[Tuple[int, int]], int]:
        """((start, end) of the FDE at *offset*, or None for a CIE or an FDE that
        cannot be read; the offset of the next entry, or -1 at the end)."""
        data = self.data
        size = len(data)
        if offset + 4 > size:
            return None, -1
        (length,) = _U32.unpack_from(data, offset)
        pos = offset + 4
        if length == 0:                 # .eh_frame's terminator (padding in .debug_frame)
            return None, -1 if self.eh else pos
        id_size = 4
        if length == 0xFFFFFFFF:
            (length,) = _U64.unpack_from(data, pos)
            pos += 8
            id_size = 8
        end = pos + length
        if length < id_size or end > size:
            return None, -1             # truncated
        cie_id = int.from_bytes(data[pos:pos + id_size], "little")
        if self.eh:
            is_cie = cie_id == 0
            cie_offset = pos - cie_id
        else:
            is_cie = cie_id == (1 << (8 * id_size)) - 1
            cie_offset = cie_id
        if is_cie or not 0 <= cie_offset < size:
            return None, end
        if cie_offset in self._encodings:
            encoding = self._encodings[cie_offset]
        else:
            try:
                encoding = _cie_fde_encoding(data, cie_offset, self.eh)
            except (IndexError, ValueError, struct.error, _CfiError):
                encoding = None
            self._encodings[cie_offset] = encoding
        if encoding is None or encoding == 0xFF:
            return None, end
        try:
            pc, field = _read_encoded(data, pos + id_size, encoding, self.address)
            span, _ = _read_encoded(data, field, encoding, self.address, apply=False)
        except (IndexError, struct.error, _CfiError):
            return None, end
        if pc is None or not span:
            return None, end
        return (pc, (pc + span) & _M64), end

    def scan(self) -> List[Tuple[int, int, int]]:
        """(start, end, offset) of every FDE, sorted by start."""
        entries: List[Tuple[int, int, int]] = []
        offset = 0
        try:
            while offset >= 0:
                found, following = self.header(offset)
                if found is not None:
                    entries.append((found[0], found[1], offset))
                offset = following
        except (IndexError, struct.error):
            pass
        entries.sort()
        return entries


def _search_table(hdr: bytes, hdr_address: int, eh_address: int, eh_size: int
                  ) -> Optional[Tuple[List[int], List[int]]]:
    """(starts, .eh_frame offsets) from the binary search table of ``.eh_frame_hdr``
    (LSB 5.0 "Exception Frames"), or None when it is absent or of a form not read
    here; only the usual table encoding (DW_EH_PE_datarel|sdata4) is."""
    if len(hdr) < 12 or hdr[0] != 1 or hdr[3] != 0x3B:
        return None
    try:
        eh_frame, pos = _read_encoded(hdr, 4, hdr[1], hdr_address)
        count, pos = _read_encoded(hdr, pos, hdr[2], hdr_address)
    except (IndexError, struct.error, _CfiError):
        return None
    if eh_frame != eh_address or count is None or pos + 8 * count > len(hdr):
        return None
    pairs = struct.unpack_from(f"<{2 * count}i", hdr, pos)
    starts = [(hdr_address + value) & _M64 for value in pairs[0::2]]
    offsets = [hdr_address + value - eh_address for value in pairs[1::2]]
    if any(not 0 <= offset < eh_size for offset in offsets) or starts != sorted(starts):
        return None
    return starts, offsets


_STRUCTS = DWARFStructs(little_endian=True, dwarf_format=32, address_size=8)


class _CfiSection:
    """One ``.eh_frame`` or ``.debug_frame``: its FDE index, and FDEs decoded on first use."""

    def __init__(self, name: str, data: bytes, address: int, eh: bool,
                 hdr: Optional[Tuple[bytes, int]] = None) -> None:
        self.name = name
        self._data = data
        self._address = address
        self._eh = eh
        self._entries = _Entries(data, address, eh)
        table = _search_table(hdr[0], hdr[1], address, len(data)) if hdr is not None else None
        if table is not None:
            # .eh_frame_hdr sorts the FDE starts already: each FDE's end is read
            # from its header when a lookup first lands on it
            self._starts, self._offsets = table
            self._ends: List[Optional[int]] = [None] * len(self._starts)
        else:
            entries = self._entries.scan()
            self._starts = [e[0] for e in entries]
            self._ends = [e[1] for e in entries]
            self._offsets = [e[2] for e in entries]
        self._cfi: Optional[CallFrameInfo] = None
        self._all: Optional[Dict[int, FDE]] = None
        self._rows: Dict[int, Optional[_FdeRows]] = {}
        self._fixed: Set[int] = set()

    def __len__(self) -> int:
        return len(self._starts)

    def _end(self, i: int) -> int:
        end = self._ends[i]
        if end is None:
            try:
                found, _ = self._entries.header(self._offsets[i])
            except (IndexError, struct.error):
                found = None
            end = found[1] if found is not None and found[0] == self._starts[i] else 0
            self._ends[i] = end
        return end

    def lookup(self, pc: int) -> Optional[_FdeRows]:
        """The rows of the FDE covering link-time *pc*, or None."""
        i = bisect.bisect_right(self._starts, pc) - 1
        tries = 3
        while i >= 0:
            if pc < self._end(i):
                offset = self._offsets[i]
                if offset in self._rows:
                    return self._rows[offset]
                rows = self._decode(offset)
                self._rows[offset] = rows
                return rows
            # FDEs do not overlap in sane files; look at a few earlier starts anyway
            if tries == 0:
                break
            tries -= 1
            i -= 1
        return None

    def _entry(self, offset: int) -> Optional[FDE]:
        if self._cfi is None:
            self._cfi = CallFrameInfo(io.BytesIO(self._data), len(self._data), self._address,
                                      _STRUCTS, for_eh_frame=self._eh)
        parse = getattr(self._cfi, "_parse_entry_at", None)
        if parse is not None:
            # pyelftools parses one entry (and its CIE) at an offset: what its own
            # CIE lookup uses. Parsing the whole section costs 0.8 s for libc.
            entry = parse(offset)
        else:                           # pragma: no cover - another pyelftools
            if self._all is None:
                self._all = {e.offset: e for e in self._cfi.get_entries() if isinstance(e, FDE)}
            entry = self._all.get(offset)
        return entry if isinstance(entry, FDE) else None

    def _fix_instructions(self, entry: Union[FDE, CIE]) -> None:
        """Before pyelftools decodes *entry*: drop DW_CFA_GNU_args_size (no effect on
        the CFA or the registers; pyelftools 0.33 refuses it) and scale
        DW_CFA_def_cfa_sf by the data alignment factor (pyelftools uses the code
        alignment factor)."""
        if id(entry) in self._fixed:
            return
        cie = entry if isinstance(entry, CIE) else entry.cie
        fixed: List[CallFrameInstruction] = []
        for instruction in entry.instructions:
            opcode = int(instruction.opcode)
            if opcode == _CFA_GNU_ARGS_SIZE:
                continue
            if opcode == _CFA_DEF_CFA_SF and cie is not None:
                register, factored = instruction.args
                instruction = CallFrameInstruction(
                    type(instruction.opcode)(_CFA_DEF_CFA),
                    [register, factored * cie["data_alignment_factor"]])
            fixed.append(instruction)
        entry.instructions = fixed
        self._fixed.add(id(entry))

    def _decode(self, offset: int) -> Optional[_FdeRows]:
        try:
            fde = self._entry(offset)
            if fde is None or fde.cie is None:
                return None
            self._fix_instructions(fde.cie)
            self._fix_instructions(fde)
            table = fde.get_decoded().table
            augmentation = fde.cie.header.get("augmentation") or b""
            start = int(fde["initial_location"])
        except _PYELFTOOLS_ERRORS:
            return None
        starts: List[int] = []
        rows: List[_Row] = []
        for line in table:
            row = _compile_row(line)
            if row is None:
                continue
            pc = int(line.get("pc", start))
            if starts and pc == starts[-1]:
                rows[-1] = row
                continue
            starts.append(pc)
            rows.append(row)
        if not rows:
            return None
        return _FdeRows(starts, rows, b"S" in bytes(augmentation))


def _compile_row(line: Mapping[object, object]) -> Optional[_Row]:
    cfa = line.get("cfa")
    expr = getattr(cfa, "expr", None)
    if expr is not None:
        cfa_reg, cfa_offset, cfa_expr = -1, 0, bytes(expr)
    else:
        reg = getattr(cfa, "reg", None)
        if reg is None:
            return None
        cfa_reg, cfa_offset, cfa_expr = int(reg), int(getattr(cfa, "offset", 0) or 0), None
    rules: List[_Rule] = []
    for key, rule in line.items():
        if not isinstance(key, int) or key >= _NREGS:
            continue
        kind = _RULE_KINDS.get(getattr(rule, "type", ""))
        arg = getattr(rule, "arg", None)
        if kind is None:                            # architectural: nothing known
            rules.append((key, _UNDEFINED, 0, None))
        elif kind in (_EXPRESSION, _VAL_EXPRESSION):
            rules.append((key, kind, 0, bytes(arg or b"")))
        elif kind in (_OFFSET, _VAL_OFFSET, _REGISTER):
            rules.append((key, kind, int(arg or 0), None))
        else:
            rules.append((key, kind, 0, None))
    return cfa_reg, cfa_offset, cfa_expr, tuple(rules)


# --- per object file -----------------------------------------------------------------

#: what the unwinder knows of a pc of an object: (CFI row or None, signal frame,
#: symbol name or None, symbol start)
_Place = Tuple[Optional[_Row], bool, Optional[str], int]


class _ObjectData:
    """What the unwinder has learnt of one object file."""

    __slots__ = ("cfi", "debug_cfi", "symbols", "places", "debug", "debug_checked")

    def __init__(self) -> None:
        self.places: Dict[int, _Place] = {}        # key: 2 * link-time pc + after a call
        self.cfi: Optional[List[_CfiSection]] = None
        self.debug_cfi: Optional[List[_CfiSection]] = None
        self.symbols: Dict[int, Optional[Tuple[str, int]]] = {}
        self.debug: Optional[ElfFile] = None
        self.debug_checked = False


_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_SHT_NOBITS = 8
_SHF_COMPRESSED = 0x800
_ELFCOMPRESS_ZLIB = 1
_PT_LOAD = 1


def _load_sections(path: str, names: Sequence[str],
                   segments: Optional[List[Tuple[int, int, int, int, int]]]) -> List[_CfiSection]:
    """The CFI sections *names* (those present) of the ELF file at *path*; none if
    its PT_LOAD headers differ from *segments* (the file at that path is not the
    one the ElfFile read), or if the file cannot be read.

    The headers are read with :mod:`struct`: pyelftools builds an object per
    section header, 0.1 s for libc's, for the two sections needed here.
    """
    try:
        with open(path, "rb") as fh:
            return _read_sections(fh, names, segments)
    except (OSError, ValueError, struct.error, zlib.error, _CfiError):
        return []


def _read_at(fh: BinaryIO, offset: int, size: int) -> bytes:
    fh.seek(offset)
    data = fh.read(size)
    if len(data) != size:
        raise _CfiError(f"truncated at offset {offset:#x}", getattr(fh, "name", ""))
    return data


def _read_sections(fh: BinaryIO, names: Sequence[str],
                   segments: Optional[List[Tuple[int, int, int, int, int]]]) -> List[_CfiSection]:
    (ident, _type, machine, _version, _entry, phoff, shoff, _flags, _ehsize, phentsize, phnum,
     shentsize, shnum, shstrndx) = _EHDR.unpack(_read_at(fh, 0, _EHDR.size))
    if ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1 or machine != 62:
        return []
    if segments is not None:
        loads = []
        if phentsize >= _PHDR.size:
            for i in range(phnum):
                (ptype, pflags, poffset, pvaddr, _paddr, pfilesz, pmemsz,
                 _align) = _PHDR.unpack(_read_at(fh, phoff + i * phentsize, _PHDR.size))
                if ptype == _PT_LOAD:
                    loads.append((pvaddr, pmemsz, poffset, pfilesz, pflags))
        if sorted(loads) != segments:
            return []
    if shoff == 0 or shentsize < _SHDR.size:
        return []
    table = _read_at(fh, shoff, _SHDR.size)
    if shnum == 0:                              # more than 0xff00 sections: count in section 0
        shnum = _SHDR.unpack(table)[5]
    if shstrndx == 0xFFFF:
        shstrndx = _SHDR.unpack(table)[6]
    if shentsize == _SHDR.size:
        table = _read_at(fh, shoff, shnum * shentsize)
        headers = list(_SHDR.iter_unpack(table))
    else:
        headers = [_SHDR.unpack(_read_at(fh, shoff + i * shentsize, _SHDR.size)) for i in range(shnum)]
    if not 0 < shstrndx < len(headers):
        return []
    strtab_header = headers[shstrndx]
    strtab = _read_at(fh, strtab_header[4], strtab_header[5])
    def section(name: str) -> Optional[Tuple[bytes, int]]:
        wanted = name.encode() + b"\0"
        for sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, *_rest in headers:
            if sh_type == _SHT_NOBITS or strtab[sh_name:sh_name + len(wanted)] != wanted:
                continue
            data = _read_at(fh, sh_offset, sh_size)
            if sh_flags & _SHF_COMPRESSED:
                ch_type, _reserved, ch_size = struct.unpack_from("<IIQ", data)
                if ch_type != _ELFCOMPRESS_ZLIB:
                    return None                 # zstd and others: not read here
                data = zlib.decompress(data[24:])[:ch_size]
            return data, sh_addr
        return None

    found: List[_CfiSection] = []
    for name in names:
        content = section(name)
        if content is None:
            continue
        hdr = section(".eh_frame_hdr") if name == ".eh_frame" else None
        cfi = _CfiSection(name, content[0], content[1], eh=name == ".eh_frame", hdr=hdr)
        if len(cfi):
            found.append(cfi)
    return found


# --- the unwinder --------------------------------------------------------------------

class Unwinder:
    """Unwinds stacks; keeps per-object indexes between calls (reuse one instance).

    *debug_roots*: directories searched for separate debug files by build ID
    (``ROOT/.build-id/ab/cdef....debug``), whose ``.symtab`` names the static
    functions a stripped library's ``.dynsym`` lacks and whose ``.debug_frame``
    is used when the object has no CFI for a pc. Pass ``()`` to use none.
    """

    def __init__(self, *, debug_roots: Sequence[str] = ("/usr/lib/debug",)) -> None:
        self._debug_roots = tuple(debug_roots)
        self._objects: "weakref.WeakKeyDictionary[ElfFile, _ObjectData]" = weakref.WeakKeyDictionary()

    def clear(self) -> None:
        """Forget every cached index and symbol."""
        self._objects = weakref.WeakKeyDictionary()

    # -- the public operation ----------------------------------------------------

    def unwind(self, regs: Registers, read_memory: ReadMemory, find_object: FindObject,
               max_frames: int = 64, *, translate_return: Optional[TranslateReturn] = None) -> Stack:
        """The call chain of a stopped thread, innermost frame first.

        *regs* gives at least ``rip`` and ``rsp`` by name (a dict,
        ``ptprobe.hit.Regs``, or any object with those attributes, such as
        ``ptprobe.linux.Registers``); rbp, rbx and r12-r15 are used when the
        CFI needs them, the other registers only for the first frame.
        *read_memory(address, size)* returns bytes or raises
        :class:`~ptprobe.errors.FaultError`; any other exception (the process
        is gone) propagates. *find_object(address)* returns the
        :class:`MappedObject` mapped there, or None. *translate_return(address,
        cfa)*, if given, maps a return address read from the stack (at
        ``cfa - 8``) to the original one, for return addresses that a return
        probe replaced.

        Raises :class:`UnwindError` if *regs* has no rip or rsp; a bad stack
        only ends the unwind (see :attr:`Stack.reason`).
        """
        state = _initial_registers(regs)
        reader = _StackReader(read_memory)
        frames = Stack()
        how = "regs"
        after_call = False              # the pc is a return address: look up pc - 1
        seen: Set[Tuple[Optional[int], Optional[int]]] = set()
        objects: Dict[int, _ObjectData] = {}    # this unwind's view of self._objects
        while True:
            if len(frames) >= max_frames:
                frames.reason = MAX_FRAMES
                break
            pc = state[_RIP]
            assert pc is not None
            obj = find_object(pc)
            row: Optional[_Row] = None
            signal = False
            if obj is None:
                frame = Frame(pc, None, None, None, None, state[_RSP], how)
            else:
                data = objects.get(id(obj.elf))
                if data is None:
                    data = objects[id(obj.elf)] = self._data(obj.elf)
                link = pc - obj.bias
                key = 2 * link + after_call
                place = data.places.get(key)
                if place is None:
                    place = data.places[key] = self._place(obj, data, link, after_call)
                row, signal, symbol, symbol_start = place
                frame = Frame(pc, symbol, None if symbol is None else link - symbol_start, obj.path,
                              link, state[_RSP], how)
            frames.append(frame)
            if frame.symbol == "_start":
                frames.reason = END
                break
            try:
                state, how, after_call = self._step(state, row, signal, frame, reader, find_object)
            except _Stop as stop:
                frames.reason = stop.reason
                break
            except FaultError:
                frames.reason = FAULT
                break
            new_pc = state[_RIP]
            if not new_pc:
                frames.reason = END
                break
            new_sp = state[_RSP]
            if translate_return is not None and how != "signal" and new_sp is not None:
                state[_RIP] = translate_return(new_pc, new_sp) & _M64
            seen_key = (state[_RIP], state[_RSP])
            if seen_key in seen:
                frames.reason = NOT_MONOTONIC
                break
            seen.add(seen_key)
        return frames

    def _place(self, obj: MappedObject, data: _ObjectData, link: int, after_call: bool) -> _Place:
        """What is known of link-time pc *link* of *obj*: the CFI row that unwinds
        from it, whether that is a signal frame's, and the symbol that names it."""
        lookup = link - 1 if after_call else link
        rows = self._fde_rows(obj, data, lookup)
        # a signal trampoline's "return address" is its first instruction (the kernel
        # put it there; no call precedes it): name the pc itself, not pc - 1
        signal = rows is not None and rows.signal
        found = self._symbol(obj, data, link if signal else lookup)
        row = rows.row_at(lookup) if rows is not None else None
        if found is None:
            return row, signal, None, 0
        return row, signal, found[0], found[1]

    # -- one step -------------------------------------------------------------------

    def _step(self, state: List[Optional[int]], row: Optional[_Row], signal: bool, frame: Frame,
              reader: _StackReader, find_object: FindObject) -> Tuple[List[Optional[int]], str, bool]:
        """The caller's registers, how they were found, and whether its pc is a return address."""
        if row is not None:
            try:
                new = _apply_row(row, state, reader, signal)
            except _Unusable:
                pass                    # fall back to the frame pointer
            else:
                return new, "signal" if signal else "cfi", not signal
        if frame.how == "regs" and frame.symbol is not None and frame.offset in (0, 4):
            entered = _entry_step(frame, state, reader, find_object)
            if entered is not None:
                return entered, "entry", True
        return _frame_pointer_step(state, reader, find_object), "fp", True

    def _fde_rows(self, obj: MappedObject, data: _ObjectData, link_pc: int) -> Optional[_FdeRows]:
        if data.cfi is None:
            segments = sorted((s.vaddr, s.memsz, s.offset, s.filesz, s.flags) for s in obj.elf.segments)
            data.cfi = _load_sections(obj.elf.path, (".eh_frame", ".debug_frame"), segments)
        for section in data.cfi:
            rows = section.lookup(link_pc)
            if rows is not None:
                return rows
        if data.debug_cfi is None:
            # only now: most objects never need their debug file's .debug_frame
            debug = self._debug_file(obj.elf, data)
            data.debug_cfi = [] if debug is None else _load_sections(debug.path, (".debug_frame",), None)
        for section in data.debug_cfi:
            rows = section.lookup(link_pc)
            if rows is not None:
                return rows
        return None

    # -- symbols ----------------------------------------------------------------------

    def _data(self, elf: ElfFile) -> _ObjectData:
        data = self._objects.get(elf)
        if data is None:
            data = _ObjectData()
            self._objects[elf] = data
        return data

    def _debug_file(self, elf: ElfFile, data: _ObjectData) -> Optional[ElfFile]:
        if data.debug_checked:
            return data.debug
        data.debug_checked = True
        build_id = elf.build_id
        if not build_id or len(build_id) < 4:
            return None
        for root in self._debug_roots:
            path = os.path.join(root, ".build-id", build_id[:2], build_id[2:] + ".debug")
            if not os.path.isfile(path):
                continue
            try:
                with ElfFile(path) as debug:
                    if debug.build_id != build_id:
                        continue
                    debug.symbol_at(0)          # load the symbols now: they outlive the file
            except ObjectFileError:
                continue
            data.debug = debug
            return debug
        return None

    def _symbol(self, obj: MappedObject, data: _ObjectData, link_lookup: int) -> Optional[Tuple[str, int]]:
        if link_lookup in data.symbols:
            return data.symbols[link_lookup]
        result = _symbol_in(obj.elf, link_lookup)
        if result is None:
            debug = self._debug_file(obj.elf, data)
            if debug is not None:
                result = _symbol_in(debug, link_lookup)
        data.symbols[link_lookup] = result
        return result


def _symbol_in(elf: ElfFile, link_address: int) -> Optional[Tuple[str, int]]:
    try:
        symbol = elf.symbol_at(link_address)
    except ObjectFileError:
        return None
    return None if symbol is None else (symbol.name, symbol.address)


# --- register state --------------------------------------------------------------------

def _initial_registers(regs: Registers) -> List[Optional[int]]:
    state: List[Optional[int]] = [None] * _NREGS
    for number, name in enumerate(_DWARF_NAMES):
        value: object
        try:
            value = regs[name]
        except (KeyError, TypeError, IndexError):
            value = getattr(regs, name, None)
        if isinstance(value, int):
            state[number] = value & _M64
    if state[_RIP] is None or state[_RSP] is None:
        raise UnwindError("registers without rip or rsp: cannot unwind")
    return state


def _apply_row(row: _Row, state: List[Optional[int]], reader: _StackReader,
               signal: bool) -> List[Optional[int]]:
    """The caller's registers from a CFI row (raises _Stop at the outermost frame)."""
    cfa_reg, cfa_offset, cfa_expr, rules = row
    if cfa_expr is not None:
        cfa = _evaluate(cfa_expr, state, reader)
    else:
        base = state[cfa_reg] if 0 <= cfa_reg < _NREGS else None
        if base is None:
            raise _Unusable(f"CFA register {cfa_reg} unknown in this frame")
        cfa = (base + cfa_offset) & _M64
    new: List[Optional[int]] = [None] * _NREGS
    for number in _CALLEE_SAVED:
        new[number] = state[number]
    new[_RSP] = cfa
    has_return = False
    for number, kind, arg, expr in rules:
        if kind == _OFFSET:
            new[number] = reader.u64((cfa + arg) & _M64)
        elif kind == _SAME:
            new[number] = state[number]
        elif kind == _UNDEFINED:
            new[number] = None
        elif kind == _VAL_OFFSET:
            new[number] = (cfa + arg) & _M64
        elif kind == _REGISTER:
            new[number] = state[arg] if 0 <= arg < _NREGS else None
        elif kind == _EXPRESSION:
            new[number] = reader.u64(_evaluate(expr or b"", state, reader, cfa))
        else:
            new[number] = _evaluate(expr or b"", state, reader, cfa)
        if number == _RIP:
            has_return = True
    if not has_return or new[_RIP] is None:
        raise _Stop(END)                    # DW_CFA_undefined rip: the outermost frame
    old_sp = state[_RSP]
    new_sp = new[_RSP]
    if not signal and old_sp is not None and new_sp is not None and new_sp <= old_sp:
        raise _Stop(NOT_MONOTONIC)
    return new


def _entry_step(frame: Frame, state: List[Optional[int]], reader: _StackReader,
                find_object: FindObject) -> Optional[List[Optional[int]]]:
    """The caller of a first frame without CFI stopped at its function's first
    instruction (or right after its ``endbr64``): the return address is at [rsp]
    and no register has been saved yet. None if that does not hold."""
    rsp = state[_RSP]
    assert rsp is not None
    try:
        if frame.offset == 4 and reader.bytes(frame.address - 4, 4) != b"\xf3\x0f\x1e\xfa":
            return None
        ret = reader.u64(rsp)
    except FaultError:
        return None
    obj = find_object(ret)
    if obj is None or not obj.elf.is_executable_address(ret - obj.bias):
        return None
    new: List[Optional[int]] = [None] * _NREGS
    for number in _CALLEE_SAVED:
        new[number] = state[number]
    new[_RSP] = rsp + 8
    new[_RIP] = ret
    return new


def _frame_pointer_step(state: List[Optional[int]], reader: _StackReader,
                        find_object: FindObject) -> List[Optional[int]]:
    rbp = state[_RBP]
    rsp = state[_RSP]
    if rbp is None or rbp & 7 or rbp == 0 or (rsp is not None and rbp < rsp):
        raise _Stop(NO_UNWIND_INFO)
    try:
        saved_rbp = reader.u64(rbp)
        ret = reader.u64(rbp + 8)
    except FaultError:
        raise _Stop(NO_UNWIND_INFO) from None
    obj = find_object(ret)
    if obj is None or not obj.elf.is_executable_address(ret - obj.bias):
        raise _Stop(NO_UNWIND_INFO)
    new: List[Optional[int]] = [None] * _NREGS
    new[_RBP] = saved_rbp
    new[_RSP] = rbp + 16
    new[_RIP] = ret
    return new
