"""Tests for ptprobe.spec.parse_spec: every documented form, and bad input only ever as ProbeSpecError."""

from __future__ import annotations

import time
from typing import Any, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptprobe.errors import ProbeSpecError
from ptprobe.spec import ProbeSpec, parse_spec

_U64 = (1 << 64) - 1

# ---------------------------------------------------------------------------
# the forms of the README's "Probe specs" table


@pytest.mark.parametrize("text,path,symbol,offset", [
    ("uprobe:./prog:compute", "./prog", "compute", 0),
    ("uprobe:/usr/lib/x86_64-linux-gnu/libc.so.6:malloc", "/usr/lib/x86_64-linux-gnu/libc.so.6", "malloc", 0),
    ("uprobe:libc.so.6:malloc", "libc.so.6", "malloc", 0),
    ("uprobe:libc:free", "libc", "free", 0),
    ("uprobe:./prog:compute+4", "./prog", "compute", 4),
    ("uprobe:./prog:compute+0", "./prog", "compute", 0),
    ("uprobe:./prog:compute+10", "./prog", "compute", 10),
    ("uprobe:./prog:compute+0x10", "./prog", "compute", 16),
    ("uprobe:./prog:compute+0X1f", "./prog", "compute", 31),
    ("uprobe:./prog:compute+18446744073709551615", "./prog", "compute", _U64),
    ("uprobe:./prog:compute+0xffffffffffffffff", "./prog", "compute", _U64),
    ("uprobe:./prog:compute+0x0000000000000000010", "./prog", "compute", 16),   # hex: leading zeros are fine
    ("uprobe:./prog:_ZN3foo3barEv", "./prog", "_ZN3foo3barEv", 0),
    ("uprobe:./prog:foo.cold", "./prog", "foo.cold", 0),
    ("uprobe:./prog:memcpy@GLIBC_2.2.5", "./prog", "memcpy@GLIBC_2.2.5", 0),
    ("uprobe:/a:b:c/prog:main", "/a:b:c/prog", "main", 0),         # a path may hold ':'
    ("u:./prog:main", "./prog", "main", 0),
    ("p:./prog:main", "./prog", "main", 0),
    ("  uprobe:./prog:main\n", "./prog", "main", 0),              # surrounding blanks are dropped
])
def test_uprobe_symbol(text: str, path: str, symbol: str, offset: int) -> None:
    spec = parse_spec(text)
    assert spec == ProbeSpec(text.strip(), "uprobe", path, symbol=symbol, offset=offset)
    assert spec.address is None and spec.provider is None
    assert str(spec) == text.strip()


@pytest.mark.parametrize("text,path,address", [
    ("uprobe:./prog:0x401126", "./prog", 0x401126),
    ("uprobe:./prog:0X401126", "./prog", 0x401126),
    ("uprobe:libc.so.6:0x28000", "libc.so.6", 0x28000),
    ("uprobe:./prog:0x0", "./prog", 0),
    ("uprobe:./prog:0xffffffffffffffff", "./prog", _U64),
    ("uprobe:./prog:0x00000000000000000401126", "./prog", 0x401126),
])
def test_uprobe_address(text: str, path: str, address: int) -> None:
    spec = parse_spec(text)
    assert spec == ProbeSpec(text, "uprobe", path, address=address)
    assert spec.symbol is None


@pytest.mark.parametrize("text,path,provider,name", [
    ("usdt:./prog:myprov:start", "./prog", "myprov", "start"),
    ("usdt:/usr/lib/x86_64-linux-gnu/libc.so.6:libc:setjmp", "/usr/lib/x86_64-linux-gnu/libc.so.6",
     "libc", "setjmp"),
    ("usdt:libc:libc:memory_*", "libc", "libc", "memory_*"),
    ("usdt:./prog:*:*", "./prog", "*", "*"),
    ("usdt:./prog:pro?:na-me.2", "./prog", "pro?", "na-me.2"),
    ("usdt:/a:b/prog:p:n", "/a:b/prog", "p", "n"),
])
def test_usdt(text: str, path: str, provider: str, name: str) -> None:
    assert parse_spec(text) == ProbeSpec(text, "usdt", path, provider=provider, name=name)


def test_is_path() -> None:
    assert parse_spec("uprobe:./prog:main").is_path
    assert parse_spec("uprobe:/bin/true:main").is_path
    assert not parse_spec("uprobe:libc.so.6:malloc").is_path
    assert not parse_spec("usdt:libc:libc:setjmp").is_path


# ---------------------------------------------------------------------------
# errors


def _refused(text: Any, *words: str) -> ProbeSpecError:
    with pytest.raises(ProbeSpecError) as ei:
        parse_spec(text)
    err = ei.value
    msg = str(err)
    assert msg.startswith("bad probe spec"), msg
    assert "\n" not in msg and len(msg) < 300, msg
    assert isinstance(err, ValueError) and err.exit_code == 2
    assert isinstance(err.spec, str)
    for word in words:
        assert word in msg, msg
    return err


@pytest.mark.parametrize("text", [
    "", "   ", "uprobe", "uprobe:", "uprobe::", "uprobe:./prog", "uprobe:./prog:", "uprobe::main",
    "kprobe:do_sys_open", "UPROBE:./prog:main", "usdt:", "usdt:./prog", "usdt:./prog:p", "usdt:./prog:p:",
    "usdt::p:n", "usdt:./prog::n", "usdt:./prog:p:n/x", "usdt:./prog:p q:n",
    "uprobe:./prog:1main", "uprobe:./prog:main-4", "uprobe:./prog:main+", "uprobe:./prog:main+-4",
    "uprobe:./prog:main++4", "uprobe:./prog:main+4+4", "uprobe:./prog:main+0x", "uprobe:./prog:main+0xg",
    "uprobe:./prog:main+4a", "uprobe:./prog:main+ 4", "uprobe:./prog:0x", "uprobe:./prog:0xg1",
    "uprobe:./prog:0x10+4", "uprobe:./prog:4096", "uprobe:./prog:m\u0430in", "uprobe:./prog:main+\u0664",
    "uprobe:./prog:main+\uff11", "uprobe:./prog:0x\u0661",
])
def test_malformed(text: str) -> None:
    _refused(text)


@pytest.mark.parametrize("text", [
    "uprobe:/bin/true:main+010", "uprobe:/bin/true:main+00", "uprobe:/bin/true:main+0777",
    "uprobe:/bin/true:main+09",
])
def test_leading_zero_offset_refused(text: str) -> None:
    # 010 is 8 to strtoul(..., 0) and 10 to a human: neither guess is safe
    _refused(text, "leading zero")


@pytest.mark.parametrize("text", [
    "uprobe:/bin/true:main+18446744073709551616",           # 2**64
    "uprobe:/bin/true:main+99999999999999999999",
    "uprobe:/bin/true:main+0x10000000000000000",
    "uprobe:/bin/true:0x10000000000000000",
    "uprobe:/bin/true:0x1" + "0" * 40,
    "uprobe:/bin/true:main+" + "1" * 5000,                  # past Python's int-string limit
    "uprobe:/bin/true:main+" + "9" * 100_000,
    "uprobe:/bin/true:0x" + "f" * 5000,
    "uprobe:/bin/true:0x" + "1" * 100_000,
])
def test_number_beyond_64_bits(text: str) -> None:
    start = time.monotonic()
    _refused(text, "64 bits")
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize("value", [None, b"uprobe:/bin/true:main", bytearray(b"uprobe:/bin/true:main"),
                                   memoryview(b"usdt:/bin/true:p:n"), 42, 4.5, ["uprobe:/bin/true:main"],
                                   object()])
def test_not_a_string(value: Any) -> None:
    err = _refused(value, "not a string")
    assert type(value).__name__ in str(err)


@pytest.mark.parametrize("text", [
    "uprobe:/bin/tr\0ue:main", "uprobe:\0:main", "usdt:/bin/\0true:p:n", "uprobe:libc\0:malloc",
])
def test_nul_in_path(text: str) -> None:
    _refused(text, "NUL")


def test_nul_elsewhere() -> None:
    _refused("uprobe:/bin/true:ma\0in")
    _refused("uprobe:/bin/true:main+1\0")
    _refused("usdt:/bin/true:p\0:n")
    _refused("\0uprobe:/bin/true:main")


def test_long_input_gives_short_message() -> None:
    err = _refused("uprobe:/bin/true:" + "x-" * 50_000)
    assert len(err.spec) == len("uprobe:/bin/true:") + 100_000     # the data keeps the whole spec


# ---------------------------------------------------------------------------
# fuzz: nothing but ProbeSpecError (or a ProbeSpec) ever comes out
#
# Hypothesis costs 0.5 to 0.8 ms per example here whatever it draws (a one_of of
# strategies costs more), more than parse_spec spends on a dozen inputs. So each
# example is one drawn string, and parse_spec gets a dozen inputs made from it:
# the string behind a few prefixes, a copy mapped onto the characters that
# matter in a spec behind more, and the string as bytes, bytearray and memoryview.

_RAW_PREFIXES = ["", "uprobe:/bin/true:", "usdt:./prog:"]
_SPEC_PREFIXES = ["", "uprobe:", "usdt:", "uprobe:/bin/true:", "uprobe:/bin/true:main+", "usdt:./prog:prov:",
                  "uprobe:/bin/true:main+" + "9" * 4400]
_SPEC_CHARS = "uprobesdtmain:/+-0123456789xXabcdefgG*?@.$_ \t\n\0\u0663\uff11\udcff\u0430"


class _ToSpecChars(dict):
    """A str.translate table sending every character to one of _SPEC_CHARS."""

    def __missing__(self, codepoint: int) -> str:
        return _SPEC_CHARS[codepoint % len(_SPEC_CHARS)]


_TO_SPEC_CHARS = _ToSpecChars()


def _check(value: Any) -> Optional[ProbeSpec]:
    try:
        spec = parse_spec(value)
    except ProbeSpecError as exc:
        assert "\n" not in str(exc) and isinstance(exc.spec, str)
        return None
    assert isinstance(value, str)
    assert spec.kind in ("uprobe", "uretprobe", "usdt") and spec.path and "\0" not in spec.path
    assert 0 <= spec.offset <= _U64
    assert spec.address is None or 0 <= spec.address <= _U64
    assert spec == parse_spec(spec.text)
    return spec


@given(st.text(max_size=40))
@settings(max_examples=10_000, deadline=None, database=None)
def test_fuzz_only_spec_errors(text: str) -> None:
    for prefix in _RAW_PREFIXES:
        _check(prefix + text)
    speclike = text.translate(_TO_SPEC_CHARS)
    for prefix in _SPEC_PREFIXES:
        _check(prefix + speclike)
    raw = text.encode("utf-8", "surrogatepass")
    for junk in (raw, bytearray(raw), memoryview(raw)):
        _check(junk)


@given(st.one_of(st.none(), st.integers(), st.floats(), st.lists(st.text(max_size=5), max_size=3),
                 st.binary(max_size=30)))
@settings(max_examples=300, deadline=None, database=None)
def test_fuzz_not_strings(value: Any) -> None:
    assert _check(value) is None


@given(st.sampled_from(["uprobe:/bin/true:main+", "uprobe:/bin/true:", "uprobe:libc:f+"]),
       st.text(alphabet="0123456789abcdefxX+-", max_size=30))
@settings(max_examples=500, deadline=None, database=None)
def test_fuzz_numbers(prefix: str, number: str) -> None:
    spec = _check(prefix + number)
    target = (prefix + number).rsplit(":", 1)[1]
    if spec is not None and spec.symbol is not None and "+" in target:
        offset = target.split("+", 1)[1]          # never octal-looking
        assert offset.startswith(("0x", "0X")) or offset == "0" or offset[:1] in "123456789"
