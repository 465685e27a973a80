"""A small expression language over hits: ``--filter``, and the values and keys
of ``--agg``.

Expressions are parsed here, by a recursive-descent parser, into Python
closures; user text is never given to :func:`eval`. They are typed when parsed
(numbers, strings, stack traces), so that ``comm > 3`` or ``str(arg0) + 1`` is
refused before anything runs.

Values::

    arg0 .. argN        the hit's arguments (uprobe: rdi, rsi, rdx, rcx, r8, r9;
                        USDT: the probe's own, signed or not as it declares them)
    pid  tid  address   numbers
    retval              a return probe's value (where hits carry one)
    comm                the process name (a string)
    name  probe         what was hit (symbol, provider:name) and the probe's spec (strings)
    stack               the user stack (a key only; where hits carry stack traces)
    123  0x7b  1.5      numbers;  "text"  a string (\\" \\\\ \\n \\t escapes)

Functions: ``str(x)`` (the NUL-terminated string at address x; ``str(x, n)`` at
most n bytes), ``reg("rax")`` (a register at the probe site), ``s8 s16 s32 s64
u8 u16 u32 u64`` (truncate to that size, signed or not: ``s32(arg0) < 0``),
``contains(s, t)``, ``startswith(s, t)``.

Operators, loosest first, as in C: ``||``, ``&&``, ``|``, ``^``, ``&``,
``== !=``, ``< <= > >=``, ``<< >>``, ``+ -``, ``* / %``, and unary ``! - ~``.
Strings compare with ``==`` and ``!=``. Division truncates towards zero.

A hit-like value is anything with ``probe`` (whose ``name`` is the spec),
``name``, ``pid``, ``tid``, ``address``, ``args`` and, for ``str()``,
``read_str``: a :class:`ptprobe.Hit`, or a record of a hit.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .errors import PtprobeError, UsageError

__all__ = ["Context", "Expression", "Filter", "EvalError", "parse_expression", "parse_list",
           "STRING_SIZE"]

#: Bytes read for a string (``str()``, ``%s``) unless told otherwise.
STRING_SIZE = 64
_MAX_TEXT = 4096
_MAX_DEPTH = 64

Evaluator = Callable[[Any], Any]


class EvalError(PtprobeError, ValueError):
    """An expression that cannot be evaluated for one hit (an argument the probe
    does not have, an unreadable string, a division by zero)."""

    exit_code = 2

    def __init__(self, message: str, text: str = "") -> None:
        super().__init__(message)
        self.text = text


# --------------------------------------------------------------------------- context

class Context:
    """What expressions and formats need besides the hit: the process names
    (*comm*, a function of the pid, read again after a second), when tracing
    began, and the size of strings."""

    def __init__(self, comm: Callable[[int], str] = lambda pid: "", string_size: int = STRING_SIZE) -> None:
        self._comm = comm
        self._names: Dict[int, Tuple[str, float]] = {}
        self.string_size = string_size
        self.start_ns = time.monotonic_ns()

    def comm(self, pid: int) -> str:
        now = time.monotonic()
        known = self._names.get(pid)
        if known is None or now - known[1] > 1.0:
            known = (self._comm(pid), now)
            self._names[pid] = known
        return known[0]

    @staticmethod
    def time_ns(hit: Any) -> int:
        """The hit's time (CLOCK_MONOTONIC ns): its own, or now (a handler runs
        while the thread is stopped at the site)."""
        value = getattr(hit, "time_ns", None)
        return value if isinstance(value, int) else time.monotonic_ns()


def read_string(hit: Any, value: Any, limit: int) -> Tuple[bytes, bool]:
    """The bytes of the string argument *value* (an address, or a string a record
    already holds), at most *limit* of them, and whether it was cut there.
    Raises :class:`EvalError` for NULL or an unreadable address."""
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value[:limit]), len(value) > limit
    if isinstance(value, float):
        raise EvalError(f"{value} is not an address", "")
    address = int(value) & 0xFFFFFFFFFFFFFFFF
    if address == 0:
        raise EvalError("NULL", "")
    if address >= 1 << 63:          # never a user-space address
        raise EvalError(f"bad address {address:#x}", "")
    read_str = getattr(hit, "read_str", None)
    if read_str is None:            # a record of a hit: no memory to read from
        raise EvalError("no string in a record", "")
    try:
        text = read_str(address, limit + 1, "latin-1")
    except (PtprobeError, OverflowError, OSError):
        raise EvalError(f"bad address {address:#x}", "") from None
    data = text.encode("latin-1")
    return data[:limit], len(data) > limit


def escape(data: bytes) -> str:
    """*data* as text for one line: UTF-8 kept, control characters and bytes that
    are not UTF-8 escaped (``\\n``, ``\\t``, ``\\r``, ``\\\\``, ``\\xNN``)."""
    text = data.decode("utf-8", "surrogateescape")
    out = []
    for ch in text:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif ch in _NAMED_ESCAPES:
            out.append(_NAMED_ESCAPES[ch])
        elif 0xDC80 <= code <= 0xDCFF:             # a byte that is not UTF-8
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x20 or 0x7F <= code < 0xA0:
            out.append(f"\\x{code:02x}")
        else:
            out.append(ch)
    return "".join(out)


_NAMED_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


# --------------------------------------------------------------------------- tokens

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<number>0[xX][0-9a-fA-F]+|[0-9]+\.[0-9]*(?:[eE][-+]?[0-9]+)?|[0-9]+(?:[eE][-+]?[0-9]+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<op>\|\||&&|==|!=|<=|>=|<<|>>|[-+*/%<>!~&|^(),=])
""", re.VERBOSE | re.ASCII)

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "0": "\0"}


@dataclass(frozen=True)
class _Token:
    kind: str            # number, name, string, op, end
    text: str
    at: int              # column, from 0


def _tokens(text: str, what: str) -> List[_Token]:
    out: List[_Token] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise _error(what, text, pos, f"unexpected {text[pos]!r}")
        if m.lastgroup != "space":
            out.append(_Token(m.lastgroup or "", m.group(), pos))
        pos = m.end()
    out.append(_Token("end", "", len(text)))
    return out


def _error(what: str, text: str, at: int, reason: str) -> UsageError:
    return UsageError(f"{what}: {reason} at column {at + 1} of {text!r}", text)


# --------------------------------------------------------------------------- nodes

@dataclass(frozen=True)
class Expression:
    """A parsed expression: ``evaluate(hit, context)``; ``type`` is "num", "str"
    or "stack"; ``text`` as written; ``arguments`` the argument indexes it reads."""

    text: str
    type: str
    fn: Callable[[Any, Context], Any]
    arguments: Tuple[int, ...] = ()

    def evaluate(self, hit: Any, context: Context) -> Any:
        try:
            return self.fn(hit, context)
        except EvalError:
            raise
        except (IndexError, KeyError, AttributeError, TypeError, ValueError, OverflowError,
                ZeroDivisionError, PtprobeError) as exc:
            raise EvalError(_why(exc), self.text) from None


def _why(exc: BaseException) -> str:
    if isinstance(exc, ZeroDivisionError):
        return "division by zero"
    return str(exc) or type(exc).__name__


def _c_div(a: Any, b: Any) -> Any:
    if isinstance(a, float) or isinstance(b, float):
        return a / b
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def _c_mod(a: Any, b: Any) -> Any:
    if isinstance(a, float) or isinstance(b, float):
        raise TypeError("% needs integers")
    return a - b * _c_div(a, b)


def _int_only(op: str, fn: Callable[[int, int], int]) -> Callable[[Any, Any], int]:
    def apply(a: Any, b: Any) -> int:
        if isinstance(a, float) or isinstance(b, float):
            raise TypeError(f"{op} needs integers")
        return fn(a, b)
    return apply


_BINARY: Dict[str, Callable[[Any, Any], Any]] = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
    "/": _c_div, "%": _c_mod,
    "<<": _int_only("<<", lambda a, b: a << b if 0 <= b < 4096 else 0),
    ">>": _int_only(">>", lambda a, b: a >> b if b >= 0 else 0),
    "&": _int_only("&", lambda a, b: a & b), "|": _int_only("|", lambda a, b: a | b),
    "^": _int_only("^", lambda a, b: a ^ b),
    "<": lambda a, b: int(a < b), "<=": lambda a, b: int(a <= b),
    ">": lambda a, b: int(a > b), ">=": lambda a, b: int(a >= b),
    "==": lambda a, b: int(a == b), "!=": lambda a, b: int(a != b),
}

#: binary operators by precedence level, loosest first (C's order)
_LEVELS: Tuple[Tuple[str, ...], ...] = (("|",), ("^",), ("&",), ("==", "!="), ("<", "<=", ">", ">="),
                                        ("<<", ">>"), ("+", "-"), ("*", "/", "%"))

_CASTS = {f"{s}{b}": (b, s == "s") for s in "su" for b in (8, 16, 32, 64)}


def _cast(bits: int, signed: bool) -> Callable[[Any], int]:
    mask = (1 << bits) - 1
    top = 1 << (bits - 1)

    def apply(value: Any) -> int:
        v = int(value) & mask
        return v - (1 << bits) if signed and v & top else v
    return apply


class _Parser:
    def __init__(self, text: str, what: str, names: Dict[str, "Expression"]) -> None:
        if len(text) > _MAX_TEXT:
            raise UsageError(f"{what}: longer than {_MAX_TEXT} characters", text[:80])
        self.text = text
        self.what = what
        self.tokens = _tokens(text, what)
        self.pos = 0
        self.depth = 0
        self.extra_names = names

    # --- tokens ---
    @property
    def token(self) -> _Token:
        return self.tokens[self.pos]

    def take(self) -> _Token:
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def accept(self, text: str) -> bool:
        if self.token.kind in ("op", "name") and self.token.text == text:
            self.pos += 1
            return True
        return False

    def expect(self, text: str) -> None:
        if not self.accept(text):
            raise self.fail(f"expected {text!r}")

    def fail(self, reason: str, token: Optional[_Token] = None) -> UsageError:
        token = token or self.token
        found = "the end" if token.kind == "end" else repr(token.text)
        return _error(self.what, self.text, token.at, f"{reason}, found {found}")

    def type_error(self, token: _Token, reason: str) -> UsageError:
        return _error(self.what, self.text, token.at, reason)

    # --- grammar ---
    def expression(self) -> Expression:
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise self.fail("nested too deeply")
        try:
            return self.logical_or()
        finally:
            self.depth -= 1

    def logical_or(self) -> Expression:
        left = self.logical_and()
        while self.token.text == "||" and self.token.kind == "op":
            token = self.take()
            right = self.logical_and()
            left = self._logic(token, "||", left, right)
        return left

    def logical_and(self) -> Expression:
        left = self.binary(0)
        while self.token.text == "&&" and self.token.kind == "op":
            token = self.take()
            right = self.binary(0)
            left = self._logic(token, "&&", left, right)
        return left

    def _logic(self, token: _Token, op: str, left: Expression, right: Expression) -> Expression:
        for side in (left, right):
            if side.type != "num":
                raise self.type_error(token, f"{op} needs numbers (comparisons), not a {_TYPE_NAMES[side.type]}")
        lf, rf = left.fn, right.fn
        if op == "&&":
            def fn(h: Any, c: Context) -> int:
                return int(bool(lf(h, c)) and bool(rf(h, c)))
        else:
            def fn(h: Any, c: Context) -> int:
                return int(bool(lf(h, c)) or bool(rf(h, c)))
        return Expression(self.text, "num", fn, left.arguments + right.arguments)

    def binary(self, level: int) -> Expression:
        if level == len(_LEVELS):
            return self.unary()
        left = self.binary(level + 1)
        while self.token.kind == "op" and self.token.text in _LEVELS[level]:
            token = self.take()
            right = self.binary(level + 1)
            left = self._binary(token, left, right)
        return left

    def _binary(self, token: _Token, left: Expression, right: Expression) -> Expression:
        op = token.text
        if op in ("==", "!="):
            if left.type != right.type or left.type == "stack":
                raise self.type_error(token, f"{op} compares a {_TYPE_NAMES[left.type]} with a "
                                      f"{_TYPE_NAMES[right.type]}")
        elif left.type != "num" or right.type != "num":
            bad = left if left.type != "num" else right
            raise self.type_error(token, f"{op} needs numbers, not a {_TYPE_NAMES[bad.type]}")
        apply = _BINARY[op]
        lf, rf = left.fn, right.fn

        def fn(h: Any, c: Context) -> Any:
            return apply(lf(h, c), rf(h, c))
        return Expression(self.text, "num", fn, left.arguments + right.arguments)

    def unary(self) -> Expression:
        token = self.token
        if token.kind == "op" and token.text in ("!", "-", "~", "+"):
            self.take()
            self.depth += 1
            if self.depth > _MAX_DEPTH:
                raise self.fail("nested too deeply")
            try:
                operand = self.unary()
            finally:
                self.depth -= 1
            if operand.type != "num":
                raise self.type_error(token, f"unary {token.text} needs a number")
            f = operand.fn
            if token.text == "!":
                def fn(h: Any, c: Context) -> Any:
                    return int(not f(h, c))
            elif token.text == "-":
                def fn(h: Any, c: Context) -> Any:
                    return -f(h, c)
            elif token.text == "~":
                def fn(h: Any, c: Context) -> Any:
                    value = f(h, c)
                    if isinstance(value, float):
                        raise TypeError("~ needs an integer")
                    return ~value
            else:
                def fn(h: Any, c: Context) -> Any:
                    return f(h, c)
            return Expression(self.text, "num", fn, operand.arguments)
        return self.primary()

    def primary(self) -> Expression:
        token = self.take()
        if token.kind == "number":
            text = token.text
            value: Any = int(text, 16) if text[:2] in ("0x", "0X") else \
                (float(text) if any(ch in text for ch in ".eE") else int(text))
            return Expression(self.text, "num", lambda h, c: value)
        if token.kind == "string":
            literal = _unescape(token.text[1:-1])
            return Expression(self.text, "str", lambda h, c: literal)
        if token.kind == "op" and token.text == "(":
            inner = self.expression()
            self.expect(")")
            return inner
        if token.kind == "name":
            if self.token.kind == "op" and self.token.text == "(":
                self.take()
                args: List[Expression] = []
                if not self.accept(")"):
                    args.append(self.expression())
                    while self.accept(","):
                        args.append(self.expression())
                    self.expect(")")
                return self.call(token, args)
            return self.name(token)
        self.pos -= 1
        raise self.fail("expected a value")

    def name(self, token: _Token) -> Expression:
        name = token.text
        m = re.fullmatch(r"arg([0-9]{1,3})", name)
        if m:
            index = int(m.group(1))

            def arg(h: Any, c: Context) -> Any:
                args = h.args
                if index >= len(args):
                    raise EvalError(f"the probe has no arg{index} (it has {len(args)})", "")
                return args[index]
            return Expression(self.text, "num", arg, (index,))
        simple: Dict[str, Tuple[str, Callable[[Any, Context], Any]]] = {
            "pid": ("num", lambda h, c: h.pid),
            "tid": ("num", lambda h, c: h.tid),
            "address": ("num", lambda h, c: h.address),
            "retval": ("num", lambda h, c: h.retval),
            "comm": ("str", lambda h, c: c.comm(h.pid)),
            "name": ("str", lambda h, c: h.name),
            "probe": ("str", lambda h, c: getattr(h.probe, "name", h.probe)),
            # a stack as a key: (address, "symbol+off (object)") per frame, so that the
            # same call chain is the same key (frames also hold a stack pointer)
            "stack": ("stack", lambda h, c: tuple((f.address, str(f)) for f in h.stack())),
        }
        if name in simple:
            kind, fn = simple[name]
            return Expression(self.text, kind, fn)
        if name in self.extra_names:
            return self.extra_names[name]
        raise self.type_error(token, f"unknown name {name!r} (arg0..argN, pid, tid, comm, name, probe, "
                              "address, retval, stack)")

    def call(self, token: _Token, args: List[Expression]) -> Expression:
        name = token.text

        def want(count: Sequence[int], types: Sequence[str]) -> None:
            if len(args) not in count:
                raise self.type_error(token, f"{name}() takes {' or '.join(map(str, count))} argument"
                                      f"{'' if count == (1,) else 's'}, not {len(args)}")
            for arg, kind in zip(args, types):
                if arg.type != kind:
                    raise self.type_error(token, f"{name}() wants a {_TYPE_NAMES[kind]}, not a "
                                          f"{_TYPE_NAMES[arg.type]}")

        used = tuple(i for a in args for i in a.arguments)
        if name == "str":
            want((1, 2), ("num", "num"))
            address = args[0].fn
            size = args[1].fn if len(args) == 2 else None

            def string(h: Any, c: Context) -> str:
                limit = max(0, min(int(size(h, c)), 1 << 20)) if size is not None else c.string_size
                data, _ = read_string(h, address(h, c), limit)
                return data.decode("utf-8", "backslashreplace")
            return Expression(self.text, "str", string, used)
        if name in _CASTS:
            want((1,), ("num",))
            cast = _cast(*_CASTS[name])
            f = args[0].fn
            return Expression(self.text, "num", lambda h, c: cast(f(h, c)), used)
        if name == "reg":
            want((1,), ("str",))
            register = args[0].fn
            return Expression(self.text, "num", lambda h, c: h.regs[register(h, c)], used)
        if name in ("contains", "startswith"):
            want((2,), ("str", "str"))
            a, b = args[0].fn, args[1].fn
            if name == "contains":
                return Expression(self.text, "num", lambda h, c: int(b(h, c) in a(h, c)), used)
            return Expression(self.text, "num", lambda h, c: int(a(h, c).startswith(b(h, c))), used)
        raise self.type_error(token, f"unknown function {name}() (str, reg, s8..s64, u8..u64, contains, "
                              "startswith)")

    def finish(self) -> None:
        if self.token.kind != "end":
            raise self.fail("expected the end")


_TYPE_NAMES = {"num": "number", "str": "string", "stack": "stack"}


def _unescape(body: str) -> str:
    out = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            out.append(_ESCAPES.get(body[i + 1], "\\" + body[i + 1]))
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def parse_expression(text: str, what: str = "expression") -> Expression:
    """Parse one expression; raises :class:`~ptprobe.errors.UsageError` (one line,
    with the column) for anything that is not one."""
    if not isinstance(text, str):
        raise UsageError(f"{what}: not a string but {type(text).__name__}", repr(text)[:80])
    parser = _Parser(text, what, {})
    expr = parser.expression()
    parser.finish()
    return expr


def parse_list(parser: "_Parser") -> List[Expression]:
    """Comma-separated expressions from *parser*'s position (used by ``--agg``'s keys)."""
    items = [parser.expression()]
    while parser.accept(","):
        items.append(parser.expression())
    return items


# --------------------------------------------------------------------------- filters

class Filter:
    """A hit passes when the expression is true (non-zero). A hit for which it
    cannot be evaluated (an argument its probe does not have, an unreadable
    string) does not pass; ``errors`` counts those and ``last_error`` says why.

    >>> keep = Filter("arg0 > 100 && tid == 1234")
    >>> keep.matches(hit)            # doctest: +SKIP
    """

    def __init__(self, text: str, context: Optional[Context] = None) -> None:
        self.expression = parse_expression(text, "--filter")
        if self.expression.type != "num":
            raise UsageError(f"--filter: {text!r} is a {_TYPE_NAMES[self.expression.type]}, not a condition", text)
        self.text = text
        self.context = context or Context()
        self.passed = 0
        self.rejected = 0
        self.errors = 0
        self.last_error: Optional[str] = None

    def matches(self, hit: Any) -> bool:
        try:
            ok = bool(self.expression.evaluate(hit, self.context))
        except EvalError as exc:
            self.errors += 1
            self.last_error = exc.message
            ok = False
        if ok:
            self.passed += 1
        else:
            self.rejected += 1
        return ok

    @property
    def arguments(self) -> Tuple[int, ...]:
        return self.expression.arguments
