"""Where the command line's output goes, and what a hit looks like in it.

:class:`Output` is the stream hit lines and aggregations are written to: a
write error ends it (a reader that went away quietly, a full disk with an
error) and tells its owner once, so that tracing can end instead of failing
on every hit.

The formatting functions take a *hit-like* object: anything with ``probe``
(with a ``name``), ``name``, ``pid``, ``tid``, ``address`` and ``args``, and
for strings ``read_str``. A :class:`ptprobe.Hit` is one; so can be a record
of a hit that did not stop the program. Nothing here touches a process.
"""

from __future__ import annotations

import errno
import os
import re
import struct
import time
from dataclasses import dataclass
from typing import IO, Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union

from . import render
from .errors import UsageError
from .filter import Context, EvalError, escape, read_string

#: Seconds a written line may wait in the buffer of an output that is not a terminal.
FLUSH_AFTER = 0.2


class Output:
    """A text stream for hit lines that ends, once, at its first write error.

    ``error`` is None after a reader went away (EPIPE: the usual end of
    ``ptprobe ... | head``), or the :class:`OSError` that ended it. Lines go out
    at once to a terminal, otherwise at most :data:`FLUSH_AFTER` seconds late
    (on a later write or :meth:`flush`)."""

    def __init__(self, stream: IO[str], name: str, on_close: Callable[[], None] = lambda: None,
                 line_buffered: Optional[bool] = None) -> None:
        self.stream = stream
        self.name = name
        self.on_close = on_close
        if line_buffered is None:
            try:
                line_buffered = stream.isatty()
            except (OSError, ValueError):
                line_buffered = False
        self.line_buffered = line_buffered
        self.closed = False
        self.error: Optional[OSError] = None
        self._flushed = time.monotonic()

    def write(self, text: str) -> None:
        if self.closed:
            return
        try:
            self.stream.write(text)
            if self.line_buffered:
                self.stream.flush()
            else:
                now = time.monotonic()
                if now - self._flushed >= FLUSH_AFTER:
                    self._flushed = now
                    self.stream.flush()
        except OSError as exc:
            self._fail(exc)

    def flush(self) -> None:
        if self.closed:
            return
        try:
            self.stream.flush()
        except OSError as exc:
            self._fail(exc)
        self._flushed = time.monotonic()

    def _fail(self, exc: OSError) -> None:
        self.closed = True
        self.error = None if exc.errno == errno.EPIPE else exc
        self._discard()
        self.on_close()

    def _discard(self) -> None:
        """Let what is still buffered go nowhere: the descriptor now writes to
        /dev/null, so that closing the stream (or the interpreter's last flush of
        stdout) does not fail again."""
        try:
            fd = self.stream.fileno()
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, fd)
            finally:
                os.close(null)
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        """Flush, then close the stream unless it is stdout or stderr."""
        self.flush()
        try:
            if self.stream.fileno() > 2:
                self.stream.close()
        except (OSError, ValueError):
            pass

    @property
    def problem(self) -> Optional[str]:
        """The write error as one line, None if there was none."""
        if self.error is None:
            return None
        return f"cannot write to {self.name}: {self.error.strerror or self.error}"


# --------------------------------------------------------------------------- strings

#: what follows a string cut at the size limit
TRUNCATED = "..."


def show_value(value: object) -> str:
    """An argument in the default line: small integers in decimal, large ones
    (addresses, masks) in hex, floats as floats."""
    if isinstance(value, int):
        return str(value) if -0x10000 < value < 0x10000 else f"{value:#x}"
    return repr(value)


# --------------------------------------------------------------------------- -f formats

_CONVERSION = re.compile(r"""
    (?:(?P<position>[1-9][0-9]{0,2})\$)?
    (?P<flags>[-+ #0]*)
    (?P<width>[0-9]{1,4})?
    (?:\.(?P<precision>[0-9]{0,5}))?
    (?P<length>hh|h|ll|l|q|L|j|z|t)?
    (?P<conv>[diouxXcspfFeEgGS%]|\{(?P<field>[A-Za-z_]+)\})
""", re.VERBOSE | re.ASCII)

_INTEGER = "diouxXc"
_FLOATING = "fFeEgG"
#: %{NAME} fields
FIELDS = ("probe", "name", "pid", "tid", "comm", "time", "time_ns", "address", "args", "retval", "stack")
_LENGTH_BYTES = {"hh": 1, "h": 2, "l": 8, "ll": 8, "q": 8, "L": 8, "j": 8, "z": 8, "t": 8}
#: integer argument registers and SSE argument registers of a uprobe (SysV ABI)
UPROBE_INTEGER_ARGS = 6
UPROBE_FLOAT_ARGS = 8
_TEXT_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "e": "\x1b", '"': '"'}


@dataclass(frozen=True)
class Conversion:
    """One ``%`` conversion of a format (or a ``%{field}``)."""

    text: str
    conv: str                       # d i o u x X c s p f F e E g G, or "{" for a field
    flags: str = ""
    width: Optional[int] = None
    precision: Optional[int] = None
    length: str = ""
    field: Optional[str] = None
    position: Optional[int] = None  # %N$: argument N-1
    order: int = 0                  # which argument, counting every conversion
    order_in_class: int = 0         # counting integer and floating conversions apart

    @property
    def floating(self) -> bool:
        return self.conv in _FLOATING


class Format:
    """A ``-f`` format, printf-style, checked when parsed.

    Conversions ``%d %i %u %x %X %o %c %p %s %f %F %e %E %g %G`` and ``%%``, with
    flags ``- + space # 0``, a width, a precision and a length (``hh h l ll z j t``):
    ``%5d %-8s %08lx %.20s``. ``%s`` prints the NUL-terminated string at the address,
    control characters escaped, ``...`` after a string cut at the size limit (a
    precision sets it). ``%N$d`` picks argument N (from 1). ``%{probe}``, ``%{name}``,
    ``%{pid}``, ``%{tid}``, ``%{comm}``, ``%{time}`` (seconds since tracing began),
    ``%{time_ns}``, ``%{address}``, ``%{args}`` print what they name. ``\\n \\t \\e``
    are escapes in the text.

    Arguments: a USDT probe's in order, each with its declared size and sign
    (``%d`` of a ``-4@`` argument holding -7 prints -7). For a uprobe the integer
    conversions take the integer argument registers in order (rdi, rsi, rdx, rcx,
    r8, r9) and the floating ones the SSE registers (xmm0..xmm7), as the C calling
    convention gives them to a function: ``%d %f %d`` suits ``f(int, double, int)``.
    A register holds no type: with no length, an integer conversion reads an
    ``int`` (32 bits) as C's printf does; ``%ld`` reads 64 bits, ``%hf`` a float.
    """

    def __init__(self, text: str) -> None:
        if not isinstance(text, str):
            raise UsageError(f"-f: not a string but {type(text).__name__}", repr(text)[:80])
        self.text = text
        self.pieces: List[Union[str, Conversion]] = []
        literal: List[str] = []
        order = integer = floating = 0
        positional: Optional[bool] = None
        i = 0
        while i < len(text):
            ch = text[i]
            if ch == "\\" and i + 1 < len(text):
                literal.append(_TEXT_ESCAPES.get(text[i + 1], "\\" + text[i + 1]))
                i += 2
                continue
            if ch != "%":
                literal.append(ch)
                i += 1
                continue
            m = _CONVERSION.match(text, i + 1)
            if m is None:
                shown = text[i:i + 2] if i + 1 < len(text) else "%"
                reason = ("a lone % at the end (write %% for a percent sign)" if i + 1 == len(text)
                          else f"unknown conversion {shown!r}")
                raise UsageError(f"-f: {reason} at column {i + 1} of {text!r}; conversions: "
                                 "%d %i %u %x %X %o %c %p %s %f %e %g, %{field}, %%", text)
            i = m.end()
            conv = m.group("conv")
            if conv == "%":
                if m.group(0) != "%":
                    raise UsageError(f"-f: {'%' + m.group(0)!r} (write %% for a percent sign)", text)
                literal.append("%")
                continue
            if literal:
                self.pieces.append("".join(literal))
                literal = []
            field = m.group("field")
            if conv == "S":
                field = "stack"         # %S: the user stack, a line per frame after the text
            if field is not None and field not in FIELDS:
                raise UsageError(f"-f: unknown field %{{{field}}} (fields: "
                                 f"{', '.join('%{' + f + '}' for f in FIELDS)})", text)
            position = int(m.group("position")) - 1 if m.group("position") else None
            if field is None:
                if positional is None:
                    positional = position is not None
                elif positional != (position is not None):
                    raise UsageError(f"-f: {text!r} mixes %N$ conversions with plain ones", text)
            elif position is not None:
                raise UsageError(f"-f: %N$ does not apply to %{{{field}}}", text)
            item = Conversion(
                text="%" + m.group(0), conv="{" if field is not None else conv, flags=m.group("flags"),
                width=int(m.group("width")) if m.group("width") else None,
                precision=int(m.group("precision") or 0) if m.group("precision") is not None else None,
                length=m.group("length") or "", field=field, position=position,
                order=order, order_in_class=floating if conv in _FLOATING else integer)
            if field is None:
                order += 1
                if conv in _FLOATING:
                    floating += 1
                else:
                    integer += 1
            self.pieces.append(item)
        if literal:
            self.pieces.append("".join(literal))
        self.conversions = [p for p in self.pieces if isinstance(p, Conversion) and p.field is None]
        self.uses_strings = any(c.conv == "s" for c in self.conversions)
        self.uses_stack = any(isinstance(p, Conversion) and p.field == "stack" for p in self.pieces)
        self.uses_floats = any(c.conv in _FLOATING for c in self.conversions)

    def needs_stop(self, uprobe: bool) -> bool:
        """Does a line need the thread stopped (a string read at the hit, the stack,
        a uprobe's SSE registers), or can a record of the hit made by the program
        serve (its integer arguments, USDT values, time, thread)?"""
        return self.uses_strings or self.uses_stack or (uprobe and self.uses_floats)

    # --- which arguments ---------------------------------------------------------------
    def _uprobe_index(self, c: Conversion) -> int:
        return c.position if c.position is not None else c.order_in_class

    def check_uprobe(self) -> Optional[str]:
        """Why this format cannot print a uprobe's arguments (None if it can)."""
        for c in self.conversions:
            index = self._uprobe_index(c)
            if c.floating and index >= UPROBE_FLOAT_ARGS:
                return (f"{c.text} would be floating argument {index + 1}, but a uprobe has "
                        f"{UPROBE_FLOAT_ARGS} (xmm0..xmm7)")
            if not c.floating and index >= UPROBE_INTEGER_ARGS:
                return (f"{c.text} would be integer argument {index + 1}, but a uprobe has "
                        f"{UPROBE_INTEGER_ARGS} (rdi, rsi, rdx, rcx, r8, r9)")
        return None

    def arguments_needed(self) -> int:
        """How many arguments a USDT probe needs for this format."""
        return max((c.position if c.position is not None else c.order) + 1 for c in self.conversions) \
            if self.conversions else 0

    # --- rendering -------------------------------------------------------------------------
    def render(self, hit: Any, context: Context) -> str:
        return self.render_all(hit, context)[0]

    def render_all(self, hit: Any, context: Context) -> Tuple[str, Dict[str, str], List[str]]:
        """(the line, the strings its %s conversions read by argument ("arg3"),
        the names of those that were cut at the size limit)."""
        types = argument_types(hit)
        out: List[str] = []
        strings: Dict[str, str] = {}
        cut: List[str] = []
        for piece in self.pieces:
            if isinstance(piece, str):
                out.append(piece)
                continue
            if piece.field is not None:
                out.append(_pad("", _field(piece.field, hit, context), piece.flags, piece.width, False))
                continue
            try:
                value, size, index = self._argument(piece, hit, types)
            except EvalError as exc:
                out.append(f"<{exc.message}>")
                continue
            except AttributeError:          # a record of a hit: no registers to read
                out.append("<not recorded>")
                continue
            if piece.conv == "s":
                out.append(self._string(piece, hit, context, value, index, strings, cut))
            elif piece.floating:
                out.append(_float_text(piece, value))
            else:
                out.append(_integer_text(piece, value, size))
        return "".join(out), strings, cut

    def _argument(self, c: Conversion, hit: Any, types: Optional[List[ArgType]]
                  ) -> Tuple[Any, Optional[int], int]:
        """(value, its declared size or None, argument index). A return hit's values
        are its return value, then the arguments its function was entered with."""
        args = [hit.retval, *hit.args] if getattr(hit, "is_return", False) else hit.args
        if types is not None:                     # USDT: the probe's own arguments
            index = c.position if c.position is not None else c.order
            if index >= len(args):
                raise EvalError(f"no arg{index}: the probe has {len(args)}")
            return args[index], types[index].size if index < len(types) else None, index
        index = self._uprobe_index(c)
        if c.floating:
            raw = hit.xmm(index)
            if c.length == "h":
                return struct.unpack_from("<f", raw)[0], 4, index
            return struct.unpack_from("<d", raw)[0], 8, index
        if index >= len(args):
            raise EvalError(f"no arg{index}: the probe has {len(args)}")
        return args[index], None, index

    def _string(self, c: Conversion, hit: Any, context: Context, value: Any, index: int,
                strings: Dict[str, str], cut: List[str]) -> str:
        limit = c.precision if c.precision is not None else context.string_size
        try:
            data, truncated = read_string(hit, value, limit)
        except EvalError as exc:
            text = "(null)" if exc.message == "NULL" else f"<{exc.message}>"
        else:
            strings[f"arg{index}"] = data.decode("utf-8", "backslashreplace")
            if truncated:
                cut.append(f"arg{index}")
            text = escape(data) + (TRUNCATED if truncated else "")
        return _pad("", text, c.flags, c.width, False)


ArgType = NamedTuple("ArgType", [("size", int), ("signed", bool), ("floating", bool)])


def argument_types(hit: Any) -> Optional[List[ArgType]]:
    """The declared types of the hit's arguments (USDT), None when they are
    registers (uprobes)."""
    method = getattr(hit.probe, "argument_types", None)
    if method is None:
        return None
    types = method(hit.address)
    return None if types is None else [ArgType(*t) for t in types]


def _pad(head: str, body: str, flags: str, width: Optional[int], zero_ok: bool) -> str:
    size = len(head) + len(body)
    if width is None or width <= size:
        return head + body
    fill = width - size
    if "-" in flags:
        return head + body + " " * fill
    if "0" in flags and zero_ok:
        return head + "0" * fill + body
    return " " * fill + head + body


def _integer_text(c: Conversion, value: Any, declared: Optional[int]) -> str:
    if isinstance(value, float):
        value = int(value) if value == value and abs(value) != float("inf") else 0
    if c.conv == "p":
        size = 8
    elif c.conv == "c":
        size = 1
    elif c.length:
        size = _LENGTH_BYTES[c.length]
    else:
        size = max(declared or 4, 4)        # promoted to int at least, as C passes it
    bits = size * 8
    number = int(value) & ((1 << bits) - 1)
    if c.conv in "di" and number >> (bits - 1):
        number -= 1 << bits
    if c.conv == "c":
        return _pad("", escape(bytes([number])), c.flags, c.width, False)
    if c.conv == "p":
        if number == 0:
            return _pad("", "(nil)", c.flags, c.width, False)
        return _pad("0x", f"{number:x}", c.flags, c.width, c.precision is None)
    negative = number < 0
    magnitude = -number if negative else number
    digits = {"x": f"{magnitude:x}", "X": f"{magnitude:X}", "o": f"{magnitude:o}"}.get(c.conv, str(magnitude))
    if c.precision is not None:
        digits = "" if c.precision == 0 and magnitude == 0 else digits.rjust(c.precision, "0")
    head = "-" if negative else ("+" if "+" in c.flags and c.conv in "di" else
                                 (" " if " " in c.flags and c.conv in "di" else ""))
    if "#" in c.flags and magnitude:
        if c.conv in "xX":
            head += "0" + c.conv
        elif c.conv == "o" and not digits.startswith("0"):
            digits = "0" + digits
    return _pad(head, digits, c.flags, c.width, c.precision is None)


def _float_text(c: Conversion, value: Any) -> str:
    number = float(value)
    spec = ("<" if "-" in c.flags else "") + ("+" if "+" in c.flags else (" " if " " in c.flags else "")) + \
        ("#" if "#" in c.flags else "") + ("0" if "0" in c.flags and "-" not in c.flags else "") + \
        (str(c.width) if c.width is not None else "") + \
        f".{c.precision if c.precision is not None else 6}{c.conv}"
    return format(number, spec)


def _field(name: str, hit: Any, context: Context) -> str:
    if name == "probe":
        return str(getattr(hit.probe, "name", hit.probe))
    if name == "name":
        return str(hit.name)
    if name in ("pid", "tid"):
        return str(getattr(hit, name))
    if name == "comm":
        return escape(context.comm(hit.pid).encode("utf-8", "surrogateescape"))
    if name == "time":
        return f"{(context.time_ns(hit) - context.start_ns) / 1e9:.6f}"
    if name == "time_ns":
        return str(context.time_ns(hit))
    if name == "address":
        return f"{hit.address:#x}"
    if name == "retval":
        value = getattr(hit, "retval", None)
        return "?" if value is None else show_value(value)
    if name == "stack":
        return render.stack_text(hit)
    return " ".join(show_value(a) for a in hit.args)       # args


# --------------------------------------------------------------------------- whole lines

def default_line(hit: Any, context: Context) -> str:
    """The line of a hit when no -f is given (a return hit: its value and duration)."""
    shown = " ".join(show_value(a) for a in hit.args)
    if getattr(hit, "is_return", False):
        return f"{hit.name}%return pid={hit.pid} tid={hit.tid} {render.return_text(hit)} args: {shown}"
    return f"{hit.name} pid={hit.pid} tid={hit.tid} address={hit.address:#x} args: {shown}"


def json_record(hit: Any, context: Context, fmt: Optional[Format] = None, stack: bool = False) -> Dict[str, Any]:
    """The --json object of a hit; a return hit's fields (retval, duration_ns ...);
    with *stack* its frames; with a -f format, also its line ("text") and the
    strings its %s conversions read ("strings", by argument; "truncated" names
    those cut at the size limit)."""
    record: Dict[str, Any] = {
        "probe": getattr(hit.probe, "name", hit.probe), "name": hit.name, "pid": hit.pid, "tid": hit.tid,
        "comm": context.comm(hit.pid), "time_ns": context.time_ns(hit), "address": hit.address,
        "args": [_json_number(a) for a in hit.args],
    }
    if getattr(hit, "is_return", False):
        record.update(render.return_json(hit))
    if stack:
        record["stack"] = render.stack_json(hit)
    if fmt is not None:
        text, strings, cut = fmt.render_all(hit, context)
        record["text"] = text
        if strings:
            record["strings"] = strings
        if cut:
            record["truncated"] = cut
    return record


def _json_number(value: Any) -> Any:
    """An argument as JSON has it: a number (a float that is not finite as text)."""
    if isinstance(value, float) and (value != value or abs(value) == float("inf")):
        return str(value)
    return value if isinstance(value, (int, float)) else str(value)
