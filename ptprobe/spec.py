"""Probe specifications: parsing text into :class:`ProbeSpec` values.

Forms::

    uprobe:PATH:SYMBOL            function entry
    uprobe:PATH:SYMBOL+OFFSET     an instruction inside a function (decimal or 0x hex, below 2**64;
                                  a decimal with a leading zero, octal-looking, is refused)
    uprobe:PATH:0xADDRESS         an instruction by its address in the file (link-time)
    uretprobe:PATH:SYMBOL         the function's returns (also uprobe:PATH:SYMBOL%return, as perf
                                  writes it); uretprobe:PATH:0xADDRESS for a function by its address
    uprobe:PATH:PATTERN           every function whose name matches (fnmatch: * ? [...])
    usdt:PATH:PROVIDER:NAME       a USDT probe; PROVIDER and NAME may use * and ? wildcards

PATH is a file path (``./prog``, ``/usr/lib/x86_64-linux-gnu/libc.so.6``) or
the name of a mapped object as ``/proc/PID/maps`` shows it (``libc.so.6``, or
``libc`` for any ``libc.so*``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Tuple

from .errors import ProbeSpecError

_SYMBOL = re.compile(r"[A-Za-z_.$@][A-Za-z0-9_.$@:]*", re.ASCII)
# a symbol pattern: fnmatch wildcards (* ? [...]) among symbol characters
_SYMBOL_PATTERN = re.compile(r"(?:[A-Za-z0-9_.$@:*?]|\[!?[A-Za-z0-9_.$@:-]+\])+", re.ASCII)
_WILDCARDS = "*?["
_HEX = re.compile(r"0[xX]([0-9a-fA-F]+)", re.ASCII)
_DECIMAL = re.compile(r"0|[1-9][0-9]*", re.ASCII)
_USDT_PART = re.compile(r"[A-Za-z0-9_.*?\-]+", re.ASCII)
_U64 = (1 << 64) - 1
_MAX_SHOWN = 80     # characters of a spec quoted in a message


@dataclass(frozen=True)
class ProbeSpec:
    """A parsed probe specification."""

    text: str
    kind: str                     # "uprobe", "uretprobe", "usdt" or "calls"
    path: str
    symbol: Optional[str] = None  # uprobe by symbol; calls: a pattern of function names
    offset: int = 0               # uprobe: offset from symbol
    address: Optional[int] = None  # uprobe by file address
    provider: Optional[str] = None  # usdt
    name: Optional[str] = None      # usdt
    exclude: Tuple[str, ...] = ()   # calls: patterns of function names left out

    @property
    def is_pattern(self) -> bool:
        """True for a uprobe whose symbol is a pattern (``str*``): every function
        that matches."""
        return self.kind == "uprobe" and self.symbol is not None and any(ch in self.symbol for ch in _WILDCARDS)

    @property
    def is_path(self) -> bool:
        """True when PATH names a file, False when it is a mapped object's name."""
        return "/" in self.path

    def __str__(self) -> str:
        return self.text


def _show(text: str) -> str:
    """*text* quoted for a one-line message, cut when it is long."""
    if len(text) <= _MAX_SHOWN:
        return repr(text)
    return f"{text[:_MAX_SHOWN - 20]!r}...({len(text)} characters)"


def _bad(spec: str, reason: str) -> ProbeSpecError:
    return ProbeSpecError(f"bad probe spec {_show(spec)}: {reason}", spec)


def _number(text: str, spec: str, what: str) -> int:
    """A decimal or ``0x`` hex number below 2**64.

    A decimal with a leading zero is refused: ``strtoul(..., 0)`` (and perf)
    read ``010`` as octal 8, a person reads 10; neither guess is safe. Lengths
    are checked before converting, so a huge number costs nothing and never
    meets Python's int-string conversion limit.
    """
    hex_match = _HEX.fullmatch(text)
    if hex_match is not None:
        digits = hex_match.group(1).lstrip("0") or "0"
        if len(digits) > 16:
            raise _bad(spec, f"{what} {_show(text)} does not fit in 64 bits")
        return int(digits, 16)
    if _DECIMAL.fullmatch(text) is None:
        if text[:1] == "0" and text[1:].isdigit() and text.isascii():
            raise _bad(spec, f"{what} {_show(text)} has a leading zero (octal is not accepted): "
                       "write it in decimal without the zero, or in hex with 0x")
        raise _bad(spec, f"{what} {_show(text)} is not a number (decimal or 0x hex)")
    if len(text) > 20 or int(text) > _U64:
        raise _bad(spec, f"{what} {_show(text)} does not fit in 64 bits")
    return int(text)


def parse_spec(text: str) -> ProbeSpec:
    """Parse one probe specification; raises :class:`ProbeSpecError` for anything else.

    Anything that is not a ``str`` (``None``, ``bytes``) is refused too, as is a
    NUL byte anywhere (no path, symbol or probe name can hold one).
    """
    if not isinstance(text, str):
        shown = repr(text)
        shown = shown if len(shown) <= _MAX_SHOWN else shown[:_MAX_SHOWN - 3] + "..."
        raise ProbeSpecError(f"bad probe spec {shown}: not a string but {type(text).__name__}", shown)
    spec = text.strip()
    kind, sep, rest = spec.partition(":")
    if not sep:
        raise _bad(text, "expected uprobe:PATH:SYMBOL[+OFFSET], uprobe:PATH:0xADDRESS "
                   "or usdt:PATH:PROVIDER:NAME")
    if kind in ("uretprobe", "ur", "r") or (kind in ("uprobe", "u", "p") and spec.endswith("%return")):
        return _return_spec(spec, rest, text)
    if kind in ("uprobe", "u", "p"):
        path, sep, target = rest.rpartition(":")
        if not sep or not path or not target:
            raise _bad(text, "expected uprobe:PATH:SYMBOL[+OFFSET] or uprobe:PATH:0xADDRESS")
        _check_path(path, text)
        if target[:2] in ("0x", "0X"):
            return ProbeSpec(spec, "uprobe", path, address=_number(target, text, "address"))
        symbol, plus, offset_text = target.partition("+")
        if any(ch in symbol for ch in _WILDCARDS):
            if _SYMBOL_PATTERN.fullmatch(symbol) is None:
                raise _bad(text, f"{_show(symbol)} is not a symbol pattern (* ? [...] among symbol characters)")
            if plus:
                raise _bad(text, "an offset cannot follow a symbol pattern")
            return ProbeSpec(spec, "uprobe", path, symbol=symbol)
        if _SYMBOL.fullmatch(symbol) is None:
            raise _bad(text, f"{_show(symbol)} is not a symbol name")
        offset = _number(offset_text, text, "offset") if plus else 0
        return ProbeSpec(spec, "uprobe", path, symbol=symbol, offset=offset)
    if kind == "usdt":
        parts = rest.rsplit(":", 2)
        if len(parts) != 3 or not all(parts):
            raise _bad(text, "expected usdt:PATH:PROVIDER:NAME")
        path, provider, name = parts
        _check_path(path, text)
        for part in (provider, name):
            if _USDT_PART.fullmatch(part) is None:
                raise _bad(text, f"{_show(part)} is not a USDT provider or name")
        return ProbeSpec(spec, "usdt", path, provider=provider, name=name)
    raise _bad(text, f"unknown probe type {_show(kind)} (use uprobe, uretprobe or usdt)")


def _return_spec(spec: str, rest: str, text: str) -> ProbeSpec:
    """``uretprobe:PATH:SYMBOL``, ``uretprobe:PATH:0xADDRESS`` or ``uprobe:PATH:SYMBOL%return``:
    a function's returns. Offsets are refused: a return probe takes over the
    return address at the function's entry, where it is at [rsp]."""
    path, sep, target = rest.rpartition(":")
    if not sep or not path or not target:
        raise _bad(text, "expected uretprobe:PATH:SYMBOL or uretprobe:PATH:0xADDRESS")
    _check_path(path, text)
    if target.endswith("%return"):
        target = target[:-len("%return")]
    if target[:2] in ("0x", "0X"):
        return ProbeSpec(spec, "uretprobe", path, address=_number(target, text, "address"))
    symbol, plus, _offset = target.partition("+")
    if plus:
        raise _bad(text, "a return probe takes a function, not an offset in it (no +OFFSET)")
    if _SYMBOL.fullmatch(symbol) is None:
        raise _bad(text, f"{_show(symbol)} is not a symbol name")
    return ProbeSpec(spec, "uretprobe", path, symbol=symbol)


def return_spec(text: str) -> ProbeSpec:
    """The return probe of the function *text* names: a ``uretprobe:`` or
    ``%return`` spec, a ``uprobe:PATH:SYMBOL`` (or ``0xADDRESS``) spec, or
    ``PATH:SYMBOL`` alone (what ``--latency`` takes)."""
    if not isinstance(text, str):
        return parse_spec(text)
    kind = text.strip().partition(":")[0]
    if kind not in ("uprobe", "u", "p", "uretprobe", "ur", "r", "usdt"):
        text = "uretprobe:" + text.strip()
    parsed = parse_spec(text)
    if parsed.kind == "uretprobe":
        return parsed
    if parsed.kind == "uprobe" and not parsed.offset:
        return ProbeSpec(text.strip(), "uretprobe", parsed.path, symbol=parsed.symbol, address=parsed.address)
    raise _bad(text, "a return probe needs a function: PATH:SYMBOL, uretprobe:PATH:SYMBOL "
               "or uprobe:PATH:SYMBOL%return")


def _check_path(path: str, spec: str) -> None:
    if "\0" in path:
        raise _bad(spec, f"the path {_show(path)} contains a NUL byte")
