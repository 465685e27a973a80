"""USDT (SystemTap SDT) notes and argument specifications.

Two pure parsers and one evaluator:

* :func:`parse_note_descriptor` splits the descriptor of a ``.note.stapsdt``
  note (owner ``stapsdt``, type 3) into location, base, semaphore, provider,
  name and argument string.
* :func:`parse_arg` / :func:`parse_args` turn argument specs such as
  ``-4@%edi``, ``8@-16(%rbp)``, ``8f@%xmm0`` or ``-4@counter+8(%rip)`` into
  :class:`UsdtArg` records.
* :func:`evaluate` computes the value of one argument from a register file and a
  memory reader supplied by the caller (the probe-site state).

Grammar of one argument (AT&T operand syntax, as gcc prints asm operands)::

    ARG   := ['-'] SIZE ['f'] '@' LOC           SIZE in 1 2 4 8; '-' signed; 'f' float (4 or 8)
    LOC   := '%' REG                            register (any width: rax eax ax al ah ... r15b, rip)
           | '%xmm' N                           N in 0..15
           | '$' DISP                           immediate (with a SYM: its run-time address)
           | [DISP] '(' [%BASE] [',' %INDEX [',' SCALE]] ')'
           | DISP                               absolute memory operand (no parentheses)
    DISP  := ['-'] TERM (('+'|'-') TERM)*      at most one SYM, never subtracted
    TERM  := NUM | SYM
    NUM   := decimal | 0x hex | 0-prefixed octal
    SCALE := 1 | 2 | 4 | 8

A DISP is what gcc prints for an operand's constant part: ``-20``, ``counter``,
``table+16``, ``table-8`` and, for a field of a global (gcc 12, PostgreSQL 15),
``40+CheckpointStats``; its value is the run-time address of SYM (if any) plus
the sum of the numbers.

Malformed specs raise :class:`~ptprobe.errors.ProbeSpecError` (a ``ValueError``)
with a one-line message; no other exception escapes :func:`parse_arg`.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

from .errors import FaultError, ProbeSpecError, PtprobeError, SymbolNotFoundError

__all__ = [
    "UsdtError", "UsdtArg", "parse_note_descriptor", "parse_arg", "parse_args", "evaluate",
    "get_register_info",
]

_U64 = (1 << 64) - 1


class UsdtError(PtprobeError, ValueError):
    """A corrupted ``.note.stapsdt`` descriptor (truncated, unterminated, not UTF-8)."""

    exit_code = 5


# ---------------------------------------------------------------------------
# note descriptors


def parse_note_descriptor(desc: bytes, address_size: int = 8) -> Tuple[int, int, int, str, str, str]:
    """Split a stapsdt note descriptor into ``(location, base, semaphore, provider, name, args)``.

    The descriptor is three little-endian address-size words followed by three
    NUL-terminated UTF-8 strings; bytes after the third NUL (alignment padding)
    are ignored. Raises :class:`UsdtError` when the descriptor is truncated, a
    string lacks its NUL, is not UTF-8, or the provider or name is empty.
    """
    if address_size not in (4, 8):
        raise UsdtError(f"unsupported USDT note address size {address_size}")
    data = bytes(desc)
    head = 3 * address_size
    if len(data) < head:
        raise UsdtError(f"truncated USDT note descriptor: {len(data)} bytes, need at least {head}")
    fmt = "<3Q" if address_size == 8 else "<3I"
    location, base, semaphore = struct.unpack_from(fmt, data, 0)
    strings: List[str] = []
    pos = head
    for what in ("provider", "name", "arguments"):
        end = data.find(b"\0", pos)
        if end < 0:
            raise UsdtError(f"USDT note descriptor: {what} string is not NUL-terminated")
        try:
            strings.append(data[pos:end].decode("utf-8"))
        except UnicodeDecodeError:
            raise UsdtError(f"USDT note descriptor: {what} string is not valid UTF-8") from None
        pos = end + 1
    provider, name, args = strings
    if not provider:
        raise UsdtError("USDT note descriptor: empty provider name")
    if not name:
        raise UsdtError("USDT note descriptor: empty probe name")
    return location, base, semaphore, provider, name, args


# ---------------------------------------------------------------------------
# registers

#: register name -> (64-bit register, bit shift, width in bits)
_REGISTERS: Dict[str, Tuple[str, int, int]] = {}


def _init_registers() -> None:
    for letter in "abcd":
        full = f"r{letter}x"
        _REGISTERS[full] = (full, 0, 64)
        _REGISTERS[f"e{letter}x"] = (full, 0, 32)
        _REGISTERS[f"{letter}x"] = (full, 0, 16)
        _REGISTERS[f"{letter}l"] = (full, 0, 8)
        _REGISTERS[f"{letter}h"] = (full, 8, 8)
    for two in ("si", "di", "bp", "sp"):
        full = f"r{two}"
        _REGISTERS[full] = (full, 0, 64)
        _REGISTERS[f"e{two}"] = (full, 0, 32)
        _REGISTERS[two] = (full, 0, 16)
        _REGISTERS[f"{two}l"] = (full, 0, 8)
    for n in range(8, 16):
        full = f"r{n}"
        _REGISTERS[full] = (full, 0, 64)
        _REGISTERS[f"r{n}d"] = (full, 0, 32)
        _REGISTERS[f"r{n}w"] = (full, 0, 16)
        _REGISTERS[f"r{n}b"] = (full, 0, 8)
        _REGISTERS[f"r{n}l"] = (full, 0, 8)      # Intel's spelling of r{n}b
    _REGISTERS["rip"] = ("rip", 0, 64)
    _REGISTERS["eip"] = ("rip", 0, 32)


_init_registers()

_XMM_RE = re.compile(r"xmm([0-9]|1[0-5])\Z", re.ASCII)


def get_register_info(name: str) -> Optional[Tuple[str, int, int]]:
    """Return ``(64-bit register, bit shift, width)`` for a general register name, else None.

    ``get_register_info("ah") == ("rax", 8, 8)``; ``"r9w"`` gives ``("r9", 0, 16)``.
    """
    return _REGISTERS.get(name.lower())


# ---------------------------------------------------------------------------
# argument specs


@dataclass(frozen=True)
class UsdtArg:
    """One parsed argument spec.

    ``kind`` is ``"reg"`` (value of register ``reg``; ``xmm0``..``xmm15`` included),
    ``"imm"`` (the constant ``imm``, or the run-time address of ``symbol`` + ``imm``
    for ``$sym+off``), ``"mem"`` (SIZE bytes at ``disp`` [+ address of ``symbol``]
    + ``base`` + ``index`` * ``scale``) or ``"rip"`` (a ``%rip``-based memory
    operand: SIZE bytes at address of ``symbol`` + ``disp``, or at rip + ``disp``
    without a symbol). Register names are kept as written, lowercased, without
    ``%``. ``scale`` is 1 when there is no index.
    """

    text: str
    size: int
    signed: bool
    is_float: bool
    kind: str
    reg: Optional[str] = None
    imm: int = 0
    disp: int = 0
    base: Optional[str] = None
    index: Optional[str] = None
    scale: int = 1
    symbol: Optional[str] = None


_HEAD_RE = re.compile(r"(-?)([0-9]+)([fF]?)@(.*)\Z", re.ASCII | re.DOTALL)
_NUM_RE = re.compile(r"-?(?:0[xX][0-9a-fA-F]+|[0-9]+)\Z", re.ASCII)
_SYM_RE = re.compile(r"[A-Za-z_.][A-Za-z0-9_.$]*\Z", re.ASCII)
_TERMS_RE = re.compile(r"([+-])")
_MEM_RE = re.compile(r"([^()]*)\(([^()]*)\)\Z", re.DOTALL)
_MAX_NUM_CHARS = 40


def _fail(text: str, reason: str) -> ProbeSpecError:
    return ProbeSpecError(f"bad USDT argument {text!r}: {reason}", text)


def _number(text: str, token: str) -> int:
    if len(token) > _MAX_NUM_CHARS or not _NUM_RE.match(token):
        raise _fail(text, f"{token!r} is not a number")
    negative = token.startswith("-")
    digits = token[1:] if negative else token
    if digits[:2] in ("0x", "0X"):
        value = int(digits[2:], 16)
    elif len(digits) > 1 and digits[0] == "0":
        if not all(c in "01234567" for c in digits):
            raise _fail(text, f"{token!r} is not an octal number")
        value = int(digits, 8)
    else:
        value = int(digits, 10)
    value = -value if negative else value
    if not -(1 << 63) <= value <= _U64:
        raise _fail(text, f"{token!r} does not fit in 64 bits")
    return value


def _sym_or_number(text: str, token: str) -> Tuple[Optional[str], int]:
    """Parse a displacement: NUM, SYM, SYM+NUM, SYM-NUM, NUM+SYM, -NUM+SYM, ... (see DISP).

    Returns the symbol (or None) and the sum of the numbers.
    """
    if token == "":
        return None, 0
    parts = _TERMS_RE.split(token)      # [term, sign, term, sign, term ...]
    signs = ["+"] + parts[1::2]
    terms = parts[0::2]
    if terms[0] == "" and len(terms) > 1 and signs[1] == "-":
        terms, signs = terms[1:], ["-"] + signs[2:]      # a leading minus: "-8+sym"
    symbol: Optional[str] = None
    value = 0
    for sign, term in zip(signs, terms):
        if term == "":
            raise _fail(text, f"bad displacement {token!r}: a sign without a term")
        if term[0] in "0123456789":
            number = _number(text, term)
            value += -number if sign == "-" else number
        elif _SYM_RE.match(term):
            if symbol is not None:
                raise _fail(text, f"bad displacement {token!r}: more than one symbol")
            if sign == "-":
                raise _fail(text, f"bad displacement {token!r}: a symbol cannot be subtracted")
            symbol = term
        else:
            raise _fail(text, f"{term!r} in {token!r} is neither a number nor a symbol")
    if not -(1 << 63) <= value <= _U64:
        raise _fail(text, f"displacement {token!r} does not fit in 64 bits")
    return symbol, value


def _register(text: str, token: str, *, what: str) -> str:
    if not token.startswith("%"):
        raise _fail(text, f"{what} {token!r} must be a %register")
    name = token[1:].lower()
    if name not in _REGISTERS:
        raise _fail(text, f"unknown register {token!r}")
    return name


def _address_register(text: str, token: str, *, what: str) -> str:
    name = _register(text, token, what=what)
    width = _REGISTERS[name][2]
    if width not in (32, 64) or (name in ("ah", "bh", "ch", "dh")):
        raise _fail(text, f"{token!r} cannot be used as an address {what}")
    return name


def parse_arg(text: str) -> UsdtArg:
    """Parse one ``[-]SIZE[f]@LOC`` argument spec (see the module docstring).

    Raises :class:`~ptprobe.errors.ProbeSpecError` with a one-line message for
    anything malformed: a SIZE other than 1, 2, 4 or 8, a float of size 1 or 2,
    an unknown register, a bad scale, a number wider than 64 bits, and so on.
    """
    if not isinstance(text, str):
        raise ProbeSpecError(f"bad USDT argument {text!r}: not a string", repr(text))
    m = _HEAD_RE.match(text)
    if not m:
        raise _fail(text, "expected [-]SIZE[f]@LOCATION")
    minus, size_text, fchar, loc = m.groups()
    if size_text not in ("1", "2", "4", "8"):
        raise _fail(text, f"size {size_text} is not 1, 2, 4 or 8")
    size = int(size_text)
    signed = minus == "-"
    is_float = fchar != ""
    if is_float and size not in (4, 8):
        raise _fail(text, f"a floating point argument must be 4 or 8 bytes, not {size}")
    if not loc:
        raise _fail(text, "missing location after '@'")
    if any(c.isspace() for c in loc):
        raise _fail(text, "whitespace inside the location")
    common = dict(text=text, size=size, signed=signed, is_float=is_float)

    if loc.startswith("%"):
        if ":" in loc:
            raise _fail(text, "segment-prefixed operands (%fs:, %gs:, thread-local variables) "
                        "are not supported")
        name = loc[1:].lower()
        if _XMM_RE.match(name):
            return UsdtArg(kind="reg", reg=name, **common)  # type: ignore[arg-type]
        return UsdtArg(kind="reg", reg=_register(text, loc, what="register"), **common)  # type: ignore[arg-type]

    if loc.startswith("$"):
        sym, value = _sym_or_number(text, loc[1:])
        if sym is None and loc == "$":
            raise _fail(text, "missing immediate value after '$'")
        return UsdtArg(kind="imm", imm=value, symbol=sym, **common)  # type: ignore[arg-type]

    mm = _MEM_RE.match(loc)
    if mm is None:
        if "(" in loc or ")" in loc:
            raise _fail(text, "unbalanced or nested parentheses")
        sym, disp = _sym_or_number(text, loc)
        return UsdtArg(kind="mem", disp=disp, symbol=sym, **common)  # type: ignore[arg-type]

    sym, disp = _sym_or_number(text, mm.group(1))
    parts = mm.group(2).split(",")
    if len(parts) > 3:
        raise _fail(text, "too many ',' in the memory operand")
    base: Optional[str] = None
    index: Optional[str] = None
    scale = 1
    if parts[0]:
        base = _address_register(text, parts[0], what="base")
    if len(parts) >= 2:
        if not parts[1]:
            raise _fail(text, "missing index register after ','")
        index = _address_register(text, parts[1], what="index")
        if _REGISTERS[index][0] in ("rsp", "rip"):
            raise _fail(text, f"%{index} cannot be an index register")
    if len(parts) == 3:
        if parts[2] not in ("1", "2", "4", "8"):
            raise _fail(text, f"scale {parts[2]!r} is not 1, 2, 4 or 8")
        scale = int(parts[2])
    if base is None and index is None:
        raise _fail(text, "a memory operand needs a base or an index register")
    if base is not None and _REGISTERS[base][0] == "rip":
        if index is not None:
            raise _fail(text, "%rip cannot be combined with an index register")
        return UsdtArg(kind="rip", base=base, disp=disp, symbol=sym, **common)  # type: ignore[arg-type]
    if index is not None and base is not None and _REGISTERS[base][2] != _REGISTERS[index][2]:
        raise _fail(text, "base and index registers have different widths")
    return UsdtArg(kind="mem", disp=disp, base=base, index=index, scale=scale, symbol=sym,
                   **common)  # type: ignore[arg-type]


def parse_args(args: str) -> List[UsdtArg]:
    """Parse a whitespace-separated argument string; ``""`` gives ``[]``."""
    if not isinstance(args, str):
        raise ProbeSpecError(f"bad USDT argument string {args!r}: not a string", repr(args))
    return [parse_arg(item) for item in args.split()]


# ---------------------------------------------------------------------------
# evaluation


def _register_value(name: str, get_reg: Callable[[str], int]) -> Tuple[int, int]:
    """Return (value, width in bits) of a general register name such as ``ah`` or ``r9w``."""
    full, shift, width = _REGISTERS[name]
    return (int(get_reg(full)) >> shift) & ((1 << width) - 1), width


def _extend(value: int, bits: int, signed: bool) -> int:
    value &= (1 << bits) - 1
    if signed and value >> (bits - 1):
        value -= 1 << bits
    return value


def value_from_bytes(arg: UsdtArg, data: bytes) -> Union[int, float]:
    """The value of a memory operand *arg* from the bytes it names (at least SIZE):
    sign- or zero-extended, or a float/double with ``f``."""
    return _from_bytes(arg, data)


def _from_bytes(arg: UsdtArg, data: bytes) -> Union[int, float]:
    if arg.is_float:
        return struct.unpack("<f" if arg.size == 4 else "<d", data[:arg.size])[0]
    return int.from_bytes(data[:arg.size], "little", signed=arg.signed)


def _resolve(arg: UsdtArg, resolve_symbol: Optional[Callable[[str], int]]) -> int:
    assert arg.symbol is not None
    if resolve_symbol is None:
        raise SymbolNotFoundError(
            f"USDT argument {arg.text!r} needs the address of {arg.symbol} but no resolver was given",
            arg.symbol)
    return int(resolve_symbol(arg.symbol))


def _read(arg: UsdtArg, address: int, read_memory: Callable[[int, int], bytes]) -> bytes:
    data = read_memory(address, arg.size)
    if len(data) < arg.size:
        raise FaultError(f"USDT argument {arg.text!r}: short read of {arg.size} bytes at {address:#x}",
                         address)
    return bytes(data)


def _xmm_index(name: str) -> Optional[int]:
    m = _XMM_RE.match(name)
    return int(m.group(1)) if m else None


def evaluate(arg: UsdtArg, get_reg: Callable[[str], int], read_memory: Callable[[int, int], bytes], *,
             get_xmm: Optional[Callable[[int], bytes]] = None,
             resolve_symbol: Optional[Callable[[str], int]] = None,
             rip: int = 0) -> Union[int, float]:
    """Compute the value of *arg* at a probe site.

    * ``get_reg(name)`` is called only with 64-bit names (``"rax"`` .. ``"r15"``,
      ``"rip"``) and returns the unsigned 64-bit value; sub-registers are derived
      here (``%ah`` = ``(rax >> 8) & 0xff``, ``%r9w`` = ``r9 & 0xffff``).
    * ``read_memory(address, size)`` returns bytes; a short result raises
      :class:`~ptprobe.errors.FaultError` (its own errors propagate unchanged).
    * ``get_xmm(n)`` returns the 16 bytes of ``%xmmN``.
    * ``resolve_symbol(name)`` returns a symbol's run-time address (raises
      :class:`~ptprobe.errors.SymbolNotFoundError` if needed but not given).
    * ``rip`` is used for a numeric ``disp(%rip)`` operand (address = rip + disp).

    Semantics:

    * register: the (sub-)register's value, truncated to SIZE bytes when it is
      wider; signed specs are sign-extended from the narrower of SIZE and the
      register width. With ``f``, the low SIZE bytes are read as float/double.
      ``%xmmN`` gives the low SIZE bytes of the register (float or integer).
    * ``$imm``: the constant truncated to SIZE bytes, then sign- or zero-extended
      (gcc prints an unsigned 0xffffffff as ``$-1``: ``4@$-1`` is 4294967295).
      ``$sym+off`` is the run-time address of sym, plus off, so extended. With
      ``f`` the constant's bits are read as float/double.
    * memory (``disp(%base,%index,scale)`` and its short forms, an absolute
      ``disp``, or ``sym+off(...)``): SIZE bytes at the effective address, which
      is disp (+ run-time address of sym) + base + index*scale, modulo 2**64
      (32-bit address registers give 32-bit values); sign- or zero-extended, or
      read as float/double with ``f``.
    * ``sym+off(%rip)``, ``off+sym(%rip)``, ``sym-off(%rip)``: SIZE bytes at the
      run-time address of sym plus off (the operand gcc prints for a global or
      a field of one); ``disp(%rip)`` without a symbol: SIZE bytes at
      ``rip + disp``.

    Returns an ``int`` (or a ``float`` for ``f`` specs).
    """
    bits = arg.size * 8
    if arg.kind == "reg":
        assert arg.reg is not None
        xmm = _xmm_index(arg.reg)
        if xmm is not None:
            if get_xmm is None:
                raise ProbeSpecError(f"USDT argument {arg.text!r} needs xmm registers but none were given",
                                     arg.text)
            data = bytes(get_xmm(xmm))
            if len(data) < arg.size:
                raise FaultError(f"USDT argument {arg.text!r}: short xmm{xmm} value", 0)
            return _from_bytes(arg, data)
        value, width = _register_value(arg.reg, get_reg)
        if arg.is_float:
            return _from_bytes(arg, value.to_bytes(8, "little"))
        return _extend(value, min(bits, width), arg.signed)

    if arg.kind == "imm":
        value = arg.imm
        if arg.symbol is not None:
            value += _resolve(arg, resolve_symbol)
        if arg.is_float:
            return _from_bytes(arg, (value & _U64).to_bytes(8, "little"))
        return _extend(value, bits, arg.signed)

    if arg.kind == "rip":
        if arg.symbol is not None:
            address = _resolve(arg, resolve_symbol) + arg.disp
        else:
            address = int(rip) + arg.disp
        return _from_bytes(arg, _read(arg, address & _U64, read_memory))

    if arg.kind == "mem":
        address = arg.disp
        if arg.symbol is not None:
            address += _resolve(arg, resolve_symbol)
        if arg.base is not None:
            address += _register_value(arg.base, get_reg)[0]
        if arg.index is not None:
            address += _register_value(arg.index, get_reg)[0] * arg.scale
        width = 64
        if arg.base is not None:
            width = _REGISTERS[arg.base][2]
        elif arg.index is not None:
            width = _REGISTERS[arg.index][2]
        address &= (1 << width) - 1
        return _from_bytes(arg, _read(arg, address, read_memory))

    raise ProbeSpecError(f"USDT argument {arg.text!r} has unknown kind {arg.kind!r}", arg.text)
