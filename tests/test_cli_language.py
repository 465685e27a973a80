"""The command line's small languages, without a tracee: --filter expressions,
--agg aggregations (drawn as bpftrace draws them) and -f formats, over hit-like
values (what a record of a hit also is)."""

from __future__ import annotations

import struct
from typing import Any, List

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptprobe import Aggregation, Filter
from ptprobe.aggregate import Stats
from ptprobe.errors import UsageError
from ptprobe.filter import Context, EvalError, parse_expression
from ptprobe.output import Format, escape, json_record


class FakeProbe:
    def __init__(self, name: str = "uprobe:./prog:f", types: Any = None) -> None:
        self.name = name
        self._types = types

    def argument_types(self, address: int) -> Any:
        return self._types


class FakeHit:
    """A hit-like value: what the formatting, filter and aggregation code reads."""

    def __init__(self, args: List[Any], tid: int = 11, strings: Any = None, probe: Any = None,
                 xmm: List[float] = ()) -> None:
        self.probe = probe or FakeProbe()
        self.name = "f"
        self.pid = 10
        self.tid = tid
        self.address = 0x401000
        self.args = args
        self.time_ns = 5_000_000_000
        self._strings = strings or {}
        self._xmm = list(xmm)

    def read_str(self, address: int, limit: int, encoding: str) -> str:
        from ptprobe.errors import FaultError
        if address not in self._strings:
            raise FaultError("unmapped", address)
        return self._strings[address][:limit].decode(encoding)

    def xmm(self, index: int) -> bytes:
        return struct.pack("<d", self._xmm[index]) + bytes(8)


CONTEXT = Context(comm=lambda pid: "prog")


def evaluate(text: str, hit: FakeHit) -> Any:
    return parse_expression(text).evaluate(hit, CONTEXT)


# ---------------------------------------------------------------------------- expressions

@pytest.mark.parametrize("text, value", [
    ("arg0 > 100 && tid == 11", 1), ("arg0 > 100 && tid == 12", 0), ("arg1 & 0xff == 255", 0),
("-7 / 2", -3), ("-7 % 2", -1), ("1 + 2 * 3 - 4", 3), ("!arg0", 0),
    ("(arg1 & 0xff) == 254", 1), ("~0", -1), ("1 << 4 | 1", 17), ("s32(arg1)", -2), ("u8(-1)", 255),
    ("s8(0x80)", -128),
    ('str(arg2) == "GET"', 1), ('str(arg2, 2) == "GE"', 1), ('comm == "prog"', 1),
    ('contains(str(arg2), "ET")', 1), ('startswith(name, "f")', 1), ('probe != ""', 1),
    ("arg0 >= 101 || arg9 == 1", 1), ("pid * 2 + tid", 31), ("1.5 < 2", 1),
])
def test_expressions(text: str, value: Any) -> None:
    hit = FakeHit([101, 0xFFFFFFFE, 0x1000], strings={0x1000: b"GET"})
    assert evaluate(text, hit) == value


@pytest.mark.parametrize("text, words", [
    ("arg0 >", "expected a value"), ("(arg0", "expected ')'"), ("arg0 arg1", "expected the end"),
    ("comm > 1", "needs numbers"), ('"a" == 1', "compares a string with a number"),
    ("nosuch", "unknown name"), ("nosuch(1)", "unknown function"), ("str()", "takes 1 or 2"),
    ("s32(comm)", "wants a number"), ("arg0 = 1", "expected the end"), ("$", "unexpected"),
    ("a" * 5000, "longer than"), ("(" * 100 + "1" + ")" * 100, "nested too deeply"), ("", "expected a value"),
])
def test_expression_errors(text: str, words: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_expression(text, "--filter")
    message = str(err.value)
    assert words in message and message.startswith("--filter: ") and "\n" not in message


def test_evaluation_errors_leave_the_hit_out() -> None:
    keep = Filter('str(arg0) == "x" || arg0 / arg1 > 1')
    assert keep.matches(FakeHit([0, 0])) is False          # NULL, then a division by zero
    assert keep.errors == 1 and keep.last_error == "NULL"
    assert keep.matches(FakeHit([0x10, 0], strings={0x10: b"x"})) is True
    assert (keep.passed, keep.rejected) == (1, 1)
    with pytest.raises(EvalError):
        parse_expression("arg5").evaluate(FakeHit([1]), CONTEXT)


_EXPR_CHARS = "arg0123 tidpcomsr()&|!=<>+-*/%~^\",x"


@given(st.text(alphabet=_EXPR_CHARS, max_size=30))
@settings(max_examples=2000, deadline=None, database=None)
def test_fuzz_only_usage_errors(text: str) -> None:
    try:
        expr = parse_expression(text)
    except UsageError as exc:
        assert "\n" not in str(exc)
        return
    try:
        expr.evaluate(FakeHit([1, 2, 3, 4, 5, 6]), CONTEXT)
    except EvalError:
        pass


# ---------------------------------------------------------------------------- aggregations

def feed(text: str, hits: List[FakeHit]) -> Aggregation:
    agg = Aggregation(text, CONTEXT)
    for hit in hits:
        agg.add(hit)
    return agg


def test_count_sum_avg_by_key() -> None:
    hits = [FakeHit([v], tid=t) for t, v in [(1, 10), (2, 3), (1, 5), (2, 4), (2, 8)]]
    assert feed("count() by tid", hits).render() == "@count[1]: 2\n@count[2]: 3"
    assert feed("count()", hits).data() == {(): 5}
    assert feed("total = sum(arg0) by tid, comm", hits).render() == "@total[1, prog]: 15\n@total[2, prog]: 15"
    assert feed("avg(arg0)", hits).data() == {(): 6}
    assert feed("min(arg0) by tid", hits).data() == {(1,): 5, (2,): 3}
    assert feed("max(arg0) by tid", hits).data() == {(1,): 10, (2,): 8}
    stats = feed("stats(arg0) by tid", hits)
    assert stats.data()[(2,)] == Stats(count=3, total=15, average=5, min=3, max=8)
    assert stats.render().splitlines()[0] == "@stats[1]: count 2, average 7, total 15"


def test_hist_as_bpftrace_draws_it() -> None:
    values = [0, 1, 1, 2, 3, 5, 7, 1024, 1500, -4]
    agg = feed("hist(arg0)", [FakeHit([v]) for v in values])
    bar = lambda n: ("@" * (n * 52 // 2)).ljust(52)      # the largest bucket (2 hits) fills the bar
    expected = ["@hist:"] + [f"{label:<16}{count:>8} |{bar(count)}|" for label, count in [
        ("(..., 0)", 1), ("[0]", 1), ("[1]", 2), ("[2, 4)", 2), ("[4, 8)", 2), ("[8, 16)", 0), ("[16, 32)", 0),
        ("[32, 64)", 0), ("[64, 128)", 0), ("[128, 256)", 0), ("[256, 512)", 0), ("[512, 1K)", 0),
        ("[1K, 2K)", 2)]]
    assert agg.render().splitlines() == expected
    histogram = agg.data()[()]
    assert histogram.buckets()[0] == (None, 0, 1) and histogram.buckets()[-1] == (1024, 2048, 2)
    assert histogram.total == len(values)


def test_lhist() -> None:
    agg = feed("lhist(arg0, 0, 100, 25) by tid", [FakeHit([v], tid=3) for v in (-1, 0, 24, 25, 99, 100, 2000)])
    bar = lambda n: ("@" * (n * 52 // 2)).ljust(52)
    assert agg.render().splitlines() == ["@lhist[3]:"] + [f"{label:<16}{count:>8} |{bar(count)}|" for label, count in [
        ("(..., 0)", 1), ("[0, 25)", 2), ("[25, 50)", 1), ("[50, 75)", 0), ("[75, 100)", 1), ("[100, ...)", 2)]]


@pytest.mark.parametrize("text, words", [
    ("count(arg0)", "takes 0 arguments"), ("hist()", "takes 1 argument"), ("lhist(arg0, 0, 10)", "takes 4"),
    ("lhist(arg0, 10, 0, 1)", "min < max"), ("lhist(arg0, 0, 10, arg1)", "must be numbers"),
    ("foo()", "expected a function"), ("count() by", "expected a value"), ("sum(comm)", "needs a number"),
    ("count() tid", "expected the end"), ("9x = count()", "expected a function"),
])
def test_aggregation_errors(text: str, words: str) -> None:
    with pytest.raises(UsageError) as err:
        Aggregation(text)
    assert words in str(err.value), str(err.value)


# ---------------------------------------------------------------------------- formats

def test_format_conversions() -> None:
    hit = FakeHit([0xFFFFFFF9, (1 << 64) - 5, 200, 0x5000, 0, 65], strings={0x5000: b"ab\x1b\n\xffz"},
                  xmm=[2.5, -0.125])

    def render(text: str) -> str:
        return Format(text).render(hit, CONTEXT)

    # a uprobe's %d reads an int (32 bits), %ld 64 bits; one argument after another
    assert render("%d %ld %u %u %x %#x") == "-7 -5 200 20480 0 0x41"
    assert render("%1$d %2$ld %1$u %2$lu %1$x %1$#x %3$o") == \
        "-7 -5 4294967289 18446744073709551611 fffffff9 0xfffffff9 310"
    assert render("%1$5d|%1$-5d|%3$05d|%3$+d|%5$ d|%6$.3d") == "   -7|-7   |00200|+200| 0|065"
    # floating conversions take xmm0, xmm1 ... apart from the integer registers
    assert render("%f %d %.2e") == "2.500000 -7 -1.25e-01"
    assert render("%1$8.3f|%2$g") == "   2.500|-0.125"
    assert render("%4$s|%4$.2s|%4$16s|%4$-16s|%5$s|%1$s") == (
        "ab\\x1b\\n\\xffz|ab...|   ab\\x1b\\n\\xffz|ab\\x1b\\n\\xffz   |(null)|<bad address 0xfffffff9>")
    assert render("%6$c %3$p %5$p %%") == "A 0xc8 (nil) %"
    assert render("%{name} %{pid} %{tid} %{comm} %-16{probe}|%{address}") == \
        "f 10 11 prog uprobe:./prog:f |0x401000"
    assert render("%{time}") == f"{(5_000_000_000 - CONTEXT.start_ns) / 1e9:.6f}"
    assert render("a\\tb\\\\") == "a\tb\\"


def test_format_usdt_sizes() -> None:
    """A USDT argument prints with its declared size and sign; a length overrides it."""
    probe = FakeProbe("usdt:./prog:p:n", types=[(4, True, False), (8, True, False), (2, False, False),
                                                (8, False, True)])
    hit = FakeHit([-7, -100000000000, 65000, 0.5], probe=probe)
    assert Format("%d %d %u %f").render(hit, CONTEXT) == "-7 -100000000000 65000 0.500000"
    assert Format("%1$x %3$d %1$lu %2$hd %9$d").render(hit, CONTEXT) == \
        f"fffffff9 65000 18446744073709551609 {struct.unpack('<h', struct.pack('<q', -100000000000)[:2])[0]} " \
        "<no arg8: the probe has 4>"


@pytest.mark.parametrize("text, words", [
    ("abc %", "lone %"), ("%q", "unknown conversion"), ("%{x}", "unknown field"), ("%1$d %d", "mixes"),
    ("%5%", "percent sign"),
])
def test_format_errors(text: str, words: str) -> None:
    with pytest.raises(UsageError) as err:
        Format(text)
    assert words in str(err.value)


def test_escape_and_json() -> None:
    assert escape(b"a\tb\nc\x00\x7f\xc3\xa9\xff\\") == "a\\tb\\nc\\x00\\x7fé\\xff\\\\"
    hit = FakeHit([0x10, 3], strings={0x10: b"hello"})
    record = json_record(hit, CONTEXT, Format("%s=%d"))
    assert record["text"] == "hello=3" and record["strings"] == {"arg0": "hello"}
    assert record["comm"] == "prog" and record["time_ns"] == 5_000_000_000 and record["args"] == [0x10, 3]
