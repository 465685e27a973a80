"""Probe specifications: parsing text into :class:`ProbeSpec` values.

Forms::

    uprobe:PATH:SYMBOL            function entry
    uprobe:PATH:SYMBOL+OFFSET     an instruction inside a function (decimal or 0x hex)
    uprobe:PATH:0xADDRESS         an instruction by its address in the file (link-time)
    usdt:PATH:PROVIDER:NAME       a USDT probe; PROVIDER and NAME may use * and ? wildcards

PATH is a file path (``./prog``, ``/usr/lib/x86_64-linux-gnu/libc.so.6``) or
the name of a mapped object as ``/proc/PID/maps`` shows it (``libc.so.6``, or
``libc`` for any ``libc.so*``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from .errors import ProbeSpecError

_SYMBOL = re.compile(r"^[A-Za-z_.$@][A-Za-z0-9_.$@:]*$")
_NUMBER = re.compile(r"^(0[xX][0-9a-fA-F]+|[0-9]+)$")
_USDT_PART = re.compile(r"^[A-Za-z0-9_.*?\-]+$")


@dataclass(frozen=True)
class ProbeSpec:
    """A parsed probe specification."""

    text: str
    kind: str                     # "uprobe" or "usdt"
    path: str
    symbol: Optional[str] = None  # uprobe by symbol
    offset: int = 0               # uprobe: offset from symbol
    address: Optional[int] = None  # uprobe by file address
    provider: Optional[str] = None  # usdt
    name: Optional[str] = None      # usdt

    @property
    def is_path(self) -> bool:
        """True when PATH names a file, False when it is a mapped object's name."""
        return "/" in self.path

    def __str__(self) -> str:
        return self.text


def _number(text: str, spec: str, what: str) -> int:
    if not _NUMBER.match(text):
        raise ProbeSpecError(f"bad probe spec {spec!r}: {what} {text!r} is not a number", spec)
    return int(text, 0)


def parse_spec(text: str) -> ProbeSpec:
    """Parse one probe specification; raises :class:`ProbeSpecError`."""
    spec = text.strip()
    kind, sep, rest = spec.partition(":")
    if not sep:
        raise ProbeSpecError(
            f"bad probe spec {text!r}: expected uprobe:PATH:SYMBOL[+OFFSET], uprobe:PATH:0xADDRESS "
            "or usdt:PATH:PROVIDER:NAME", text)
    if kind in ("uprobe", "u", "p"):
        path, sep, target = rest.rpartition(":")
        if not sep or not path or not target:
            raise ProbeSpecError(f"bad probe spec {text!r}: expected uprobe:PATH:SYMBOL[+OFFSET] "
                                 "or uprobe:PATH:0xADDRESS", text)
        if target.lower().startswith("0x"):
            return ProbeSpec(spec, "uprobe", path, address=_number(target, text, "address"))
        symbol, plus, offset_text = target.partition("+")
        if not _SYMBOL.match(symbol):
            raise ProbeSpecError(f"bad probe spec {text!r}: {symbol!r} is not a symbol name", text)
        offset = _number(offset_text, text, "offset") if plus else 0
        return ProbeSpec(spec, "uprobe", path, symbol=symbol, offset=offset)
    if kind == "usdt":
        parts = rest.rsplit(":", 2)
        if len(parts) != 3 or not all(parts):
            raise ProbeSpecError(f"bad probe spec {text!r}: expected usdt:PATH:PROVIDER:NAME", text)
        path, provider, name = parts
        for part in (provider, name):
            if not _USDT_PART.match(part):
                raise ProbeSpecError(f"bad probe spec {text!r}: {part!r} is not a USDT provider or name", text)
        return ProbeSpec(spec, "usdt", path, provider=provider, name=name)
    raise ProbeSpecError(f"bad probe spec {text!r}: unknown probe type {kind!r} (use uprobe or usdt)", text)
