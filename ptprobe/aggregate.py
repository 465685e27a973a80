"""Aggregations over hits: counts, sums, extremes, averages and histograms by key,
drawn as bpftrace draws its maps, and returned as data by :meth:`Aggregation.data`.

An aggregation is written ``[NAME =] FUNCTION(ARGUMENTS) [by KEY[, KEY...]]``::

    count()                         hits
    count() by tid                  hits per thread
    bytes = sum(arg2) by comm       a sum per process name
    min(arg0)  max(arg0)  avg(arg0)  stats(arg0)
    hist(arg1) by str(arg0)         a power-of-two histogram per string
    lhist(arg1, 0, 1000, 100)       a linear one: from 0 to 1000, steps of 100

Values and keys are expressions of :mod:`ptprobe.filter` (``arg0``, ``tid``,
``str(arg1)``, ``comm``, ``name``, ``probe``, ``stack`` ...). Feed it hits with
:meth:`Aggregation.add` (it is a handler: ``session.probe(spec, agg.add)``), or
anything hit-like, such as records of hits that did not stop the program.

>>> agg = Aggregation("hist(arg0) by tid")
>>> probe = session.probe("uprobe:./prog:compute", agg.add)     # doctest: +SKIP
>>> session.wait()                                               # doctest: +SKIP
>>> agg.data()         # {(tid,): Histogram(...)}                # doctest: +SKIP
>>> print(agg.render())                                          # doctest: +SKIP
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from .errors import UsageError
from .filter import Context, EvalError, Expression, _Parser, escape, parse_list

__all__ = ["Aggregation", "Histogram", "Stats", "FUNCTIONS"]

FUNCTIONS = ("count", "sum", "min", "max", "avg", "stats", "hist", "lhist")
#: the width of a histogram's bar, between its two | (as bpftrace draws them)
BAR_WIDTH = 52
_MAX_LHIST_BUCKETS = 1000
Key = Tuple[Any, ...]


@dataclass(frozen=True)
class Stats:
    """What ``stats()`` keeps for one key."""

    count: int
    total: Any
    average: Any
    min: Any
    max: Any


@dataclass
class Histogram:
    """A histogram for one key. ``buckets()`` gives ``(low, high, count)`` for each
    bucket from the first non-empty one to the last (``low`` None: below the
    first bucket, ``high`` None: at or above the last). ``kind`` is "log2"
    (buckets of powers of two: [0], [1], [2, 4), [4, 8) ...; negative values
    together) or "linear" (*low*, *high*, *step*; values below and above it in
    a bucket each)."""

    kind: str
    low: int = 0
    high: int = 0
    step: int = 1
    counts: Dict[int, int] = field(default_factory=dict)

    def add(self, value: Any) -> None:
        index = self._index(value)
        self.counts[index] = self.counts.get(index, 0) + 1

    def _index(self, value: Any) -> int:
        v = int(value)
        if self.kind == "log2":
            if v < 0:
                return -1
            return v.bit_length()          # 0 -> 0, 1 -> 1, [2, 4) -> 2, [4, 8) -> 3 ...
        if v < self.low:
            return -1
        if v >= self.high:
            return (self.high - self.low + self.step - 1) // self.step
        return (v - self.low) // self.step

    def _range(self, index: int) -> Tuple[Optional[int], Optional[int]]:
        if self.kind == "log2":
            if index < 0:
                return None, 0
            if index == 0:
                return 0, 1
            return 1 << (index - 1), 1 << index
        last = (self.high - self.low + self.step - 1) // self.step
        if index < 0:
            return None, self.low
        if index >= last:
            return self.high, None
        return self.low + index * self.step, min(self.low + (index + 1) * self.step, self.high)

    def buckets(self) -> List[Tuple[Optional[int], Optional[int], int]]:
        if not self.counts:
            return []
        first, last = min(self.counts), max(self.counts)
        return [(*self._range(i), self.counts.get(i, 0)) for i in range(first, last + 1)]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def _label(self, low: Optional[int], high: Optional[int]) -> str:
        if self.kind == "log2":
            if low is None:
                return "(..., 0)"
            if high == low + 1:
                return f"[{low}]"
            return f"[{_power_label(low)}, {_power_label(high)})"
        if low is None:
            return f"(..., {_number_label(high)})"
        if high is None:
            return f"[{_number_label(low)}, ...)"
        return f"[{_number_label(low)}, {_number_label(high)})"

    def render(self) -> str:
        """The rows as bpftrace prints them: the bucket, its count, a bar of @."""
        rows = self.buckets()
        top = max((count for _, _, count in rows), default=0)
        lines = []
        for low, high, count in rows:
            bar = "@" * (count * BAR_WIDTH // top if top else 0)
            lines.append(f"{self._label(low, high):<16}{count:>8} |{bar:<{BAR_WIDTH}}|")
        return "\n".join(lines)


def _power_label(value: Optional[int]) -> str:
    """2**n with a K, M, G, T, P or E suffix for multiples of 1024."""
    assert value is not None
    for suffix in ("", "K", "M", "G", "T", "P", "E"):
        if value < 1024 or value % 1024:
            return f"{value}{suffix}"
        value //= 1024
    return f"{value}Z"


def _number_label(value: Optional[int]) -> str:
    assert value is not None
    if value and value % (1 << 20) == 0:
        return f"{value >> 20}M"
    if value and value % 1024 == 0:
        return f"{value >> 10}K"
    return str(value)


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class Aggregation:
    """One aggregation, parsed from its text (see the module's documentation)."""

    def __init__(self, text: str, context: Optional[Context] = None, name: Optional[str] = None) -> None:
        if not isinstance(text, str):
            raise UsageError(f"--agg: not a string but {type(text).__name__}", repr(text)[:80])
        self.text = text
        self.context = context or Context()
        parser = _Parser(text, "--agg", {})
        explicit: Optional[str] = None
        if parser.token.kind == "name" and parser.tokens[1].kind == "op" and parser.tokens[1].text == "=":
            explicit = parser.take().text
            parser.take()
        token = parser.token
        if token.kind != "name" or token.text not in FUNCTIONS:
            raise parser.fail(f"expected a function ({', '.join(FUNCTIONS)})")
        parser.take()
        self.function = token.text
        parser.expect("(")
        args: List[Expression] = []
        if not parser.accept(")"):
            args = parse_list(parser)
            parser.expect(")")
        self.keys: List[Expression] = []
        if parser.accept("by"):
            self.keys = parse_list(parser)
        parser.finish()
        wanted = {"count": 0, "lhist": 4}.get(self.function, 1)
        if len(args) != wanted:
            raise UsageError(f"--agg: {self.function}() takes {wanted} argument{'' if wanted == 1 else 's'}"
                             f"{' (value, min, max, step)' if self.function == 'lhist' else ''}, not "
                             f"{len(args)}: {text!r}", text)
        self.value: Optional[Expression] = args[0] if args else None
        if self.value is not None and self.value.type != "num":
            raise UsageError(f"--agg: {self.function}() needs a number, not {self.value.type} "
                             f"({self.value.text!r})", text)
        self.lhist: Tuple[int, int, int] = (0, 0, 1)
        if self.function == "lhist":
            bounds = []
            for arg in args[1:]:
                try:
                    bounds.append(int(arg.evaluate(None, self.context)))
                except (EvalError, TypeError, ValueError):
                    raise UsageError(f"--agg: lhist()'s min, max and step must be numbers: {text!r}",
                                     text) from None
            low, high, step = bounds
            if step <= 0 or high <= low or (high - low) // step > _MAX_LHIST_BUCKETS:
                raise UsageError(f"--agg: lhist() needs min < max and 0 < step, with at most "
                                 f"{_MAX_LHIST_BUCKETS} buckets: {text!r}", text)
            self.lhist = (low, high, step)
        self.name = name or explicit or self.function
        if not _NAME.match(self.name):
            raise UsageError(f"--agg: {self.name!r} is not a name", text)
        self._data: Dict[Key, Any] = {}
        self.errors = 0
        self.last_error: Optional[str] = None

    @property
    def arguments(self) -> Tuple[int, ...]:
        """The argument indexes its value and keys read."""
        exprs = ([self.value] if self.value is not None else []) + self.keys
        return tuple(i for e in exprs for i in e.arguments)

    @property
    def uses_stack(self) -> bool:
        return any(k.type == "stack" for k in self.keys)

    # --- feeding --------------------------------------------------------------------------
    def add(self, hit: Any) -> None:
        """Account for one hit (a handler: ``session.probe(spec, agg.add)``). A hit for
        which a key or the value cannot be evaluated is left out (``errors``)."""
        context = self.context
        try:
            key = tuple(k.evaluate(hit, context) for k in self.keys)
            value = self.value.evaluate(hit, context) if self.value is not None else None
        except EvalError as exc:
            self.errors += 1
            self.last_error = exc.message
            return
        data = self._data
        function = self.function
        if function == "count":
            data[key] = data.get(key, 0) + 1
        elif function == "sum":
            data[key] = data.get(key, 0) + value
        elif function == "min":
            old = data.get(key)
            data[key] = value if old is None or value < old else old
        elif function == "max":
            old = data.get(key)
            data[key] = value if old is None or value > old else old
        elif function in ("avg", "stats"):
            old = data.get(key)
            if old is None:
                data[key] = [1, value, value, value]
            else:
                old[0] += 1
                old[1] += value
                old[2] = min(old[2], value)
                old[3] = max(old[3], value)
        else:
            hist = data.get(key)
            if hist is None:
                low, high, step = self.lhist
                hist = data[key] = Histogram("log2") if function == "hist" else Histogram("linear", low, high, step)
            hist.add(value)

    def clear(self) -> None:
        self._data.clear()

    # --- reading -------------------------------------------------------------------------
    def data(self) -> Dict[Key, Any]:
        """By key (a tuple of the key values, ``()`` without keys): an int for count,
        the value for sum, min and max, the average for avg (an int, truncated, for
        integers), :class:`Stats` for stats, a :class:`Histogram` for hist and lhist."""
        out: Dict[Key, Any] = {}
        for key, value in self._data.items():
            if self.function in ("avg", "stats"):
                count, total, low, high = value
                average = _average(total, count)
                out[key] = average if self.function == "avg" else Stats(count, total, average, low, high)
            elif self.function in ("hist", "lhist"):
                out[key] = Histogram(value.kind, value.low, value.high, value.step, dict(value.counts))
            else:
                out[key] = value
        return out

    def render(self) -> str:
        """The aggregation as bpftrace prints a map: ``@name[key]: value`` lines by
        value, largest last; a histogram under its ``@name[key]:`` line."""
        data = self.data()
        if not data:
            return f"@{self.name}: (no hits)" if not self.keys else f"@{self.name}: (empty)"
        lines: List[str] = []
        if self.function in ("hist", "lhist"):
            for key in sorted(data, key=_sort_key):
                lines.append(f"{self._head(key)}:")
                lines.append(data[key].render())
                lines.append("")
            return "\n".join(lines).rstrip("\n")

        def order(key: Key) -> Tuple[Any, ...]:
            value = data[key]
            number = value.count if isinstance(value, Stats) else value
            return (_sort_number(number), _sort_key(key))

        for key in sorted(data, key=order):
            value = data[key]
            if isinstance(value, Stats):
                shown = f"count {value.count}, average {_show(value.average)}, total {_show(value.total)}"
            else:
                shown = _show(value)
            lines.append(f"{self._head(key)}: {shown}")
        return "\n".join(lines)

    def to_json(self) -> Dict[str, Any]:
        """The aggregation as a JSON value: its name, text, and one entry per key
        (``key`` a list; ``value`` a number, an object for stats, or ``buckets`` as
        [low, high, count] lists, low or high null for the open-ended ones)."""
        entries: List[Dict[str, Any]] = []
        for key, value in sorted(self.data().items(), key=lambda item: _sort_key(item[0])):
            shown: Dict[str, Any] = {"key": [_json_key(k) for k in key]}
            if isinstance(value, Histogram):
                shown["buckets"] = [list(b) for b in value.buckets()]
            elif isinstance(value, Stats):
                shown["value"] = {"count": value.count, "total": value.total, "average": value.average,
                                  "min": value.min, "max": value.max}
            else:
                shown["value"] = value
            entries.append(shown)
        return {"aggregation": f"@{self.name}", "text": self.text, "data": entries}

    def _head(self, key: Key) -> str:
        if not key:
            return f"@{self.name}"
        return f"@{self.name}[{', '.join(_show_key(k) for k in key)}]"

    def __repr__(self) -> str:
        return f"<Aggregation @{self.name} = {self.text}>"


def _average(total: Any, count: int) -> Any:
    if isinstance(total, float):
        return total / count
    quotient = abs(total) // count
    return quotient if total >= 0 else -quotient


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _show_key(value: Any) -> str:
    if isinstance(value, tuple):        # a stack: one frame a line, as bpftrace prints ustack
        frames = "".join(f"\n        {_frame(f)}" for f in value)
        return f"{frames}\n"
    if isinstance(value, str):          # one line: control characters escaped
        return escape(value.encode("utf-8", "surrogateescape"))
    return _show(value)


def _frame(frame: Any) -> str:
    if isinstance(frame, tuple) and len(frame) >= 2:
        return str(frame[1])
    return str(frame)


def _sort_number(value: Any) -> Any:
    return value if isinstance(value, (int, float)) else 0


def _sort_key(key: Key) -> Tuple[Any, ...]:
    return tuple((0, k, "") if isinstance(k, (int, float)) else (1, 0, str(k)) for k in key)


def _json_key(value: Any) -> Any:
    if isinstance(value, tuple):            # a stack: its frames' text
        return [_frame(f) for f in value]
    return value
