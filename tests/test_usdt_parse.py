"""Tests for ptprobe.usdt: note descriptors, argument spec grammar, evaluation."""

from __future__ import annotations

import os
import stat
import struct
import time
from typing import Callable, Dict, Iterator, List, Optional, Set, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptprobe.elf import ElfFile
from ptprobe.errors import FaultError, ProbeSpecError, PtprobeError, SymbolNotFoundError
from ptprobe.usdt import (UsdtArg, UsdtError, evaluate, get_register_info, parse_arg, parse_args,
                          parse_note_descriptor)

# ---------------------------------------------------------------------------
# note descriptors


def _desc(location: int, base: int, sem: int, *strings: bytes, size: int = 8) -> bytes:
    fmt = "<3Q" if size == 8 else "<3I"
    return struct.pack(fmt, location, base, sem) + b"".join(strings)


def test_descriptor_roundtrip() -> None:
    d = _desc(0x1130, 0x2004, 0x4010, b"prov\0", b"name\0", b"-4@%edi 8@%rsi\0")
    assert parse_note_descriptor(d) == (0x1130, 0x2004, 0x4010, "prov", "name", "-4@%edi 8@%rsi")


def test_descriptor_padding_and_empty_args() -> None:
    d = _desc(1, 2, 0, b"p\0", b"n\0", b"\0", b"\0\0\0")
    assert parse_note_descriptor(d) == (1, 2, 0, "p", "n", "")


def test_descriptor_32bit_words() -> None:
    d = _desc(0x8048000, 0x8049000, 0, b"p\0", b"n\0", b"4@%eax\0", size=4)
    assert parse_note_descriptor(d, address_size=4) == (0x8048000, 0x8049000, 0, "p", "n", "4@%eax")


def test_descriptor_utf8_names() -> None:
    d = _desc(1, 2, 3, "pr\u00f6v\0".encode(), b"n\0", b"\0")
    assert parse_note_descriptor(d)[3] == "pr\u00f6v"


@pytest.mark.parametrize("desc", [
    b"",
    b"\0" * 23,                                                  # truncated words
    _desc(1, 2, 3),                                              # no strings at all
    _desc(1, 2, 3, b"prov"),                                     # provider without NUL
    _desc(1, 2, 3, b"prov\0name"),                               # name without NUL
    _desc(1, 2, 3, b"prov\0name\0-4@%edi"),                      # args without NUL
    _desc(1, 2, 3, b"\xff\xfe\0name\0\0"),                        # provider not UTF-8
    _desc(1, 2, 3, b"prov\0na\xc3\0\0"),                           # name: cut UTF-8 sequence
    _desc(1, 2, 3, b"prov\0name\0\x80\0"),                       # args not UTF-8
    _desc(1, 2, 3, b"\0name\0\0"),                               # empty provider
    _desc(1, 2, 3, b"prov\0\0\0"),                               # empty name
])
def test_descriptor_corrupted(desc: bytes) -> None:
    with pytest.raises(UsdtError) as ei:
        parse_note_descriptor(desc)
    assert "\n" not in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_descriptor_bad_address_size() -> None:
    with pytest.raises(UsdtError):
        parse_note_descriptor(_desc(1, 2, 3, b"p\0n\0\0"), address_size=2)


@given(st.binary(max_size=80), st.sampled_from([4, 8]))
@settings(max_examples=300, deadline=None)
def test_descriptor_fuzz_only_usdt_error(data: bytes, size: int) -> None:
    try:
        result = parse_note_descriptor(data, size)
    except UsdtError as exc:
        assert "\n" not in str(exc)
    else:
        assert len(result) == 6 and result[3] and result[4]


# ---------------------------------------------------------------------------
# grammar

A = UsdtArg

GRAMMAR = [
    # registers, every width
    ("8@%rax", A("8@%rax", 8, False, False, "reg", reg="rax")),
    ("-4@%eax", A("-4@%eax", 4, True, False, "reg", reg="eax")),
    ("2@%ax", A("2@%ax", 2, False, False, "reg", reg="ax")),
    ("1@%al", A("1@%al", 1, False, False, "reg", reg="al")),
    ("-1@%ah", A("-1@%ah", 1, True, False, "reg", reg="ah")),
    ("8@%rsi", A("8@%rsi", 8, False, False, "reg", reg="rsi")),
    ("4@%esi", A("4@%esi", 4, False, False, "reg", reg="esi")),
    ("2@%si", A("2@%si", 2, False, False, "reg", reg="si")),
    ("1@%sil", A("1@%sil", 1, False, False, "reg", reg="sil")),
    ("1@%dil", A("1@%dil", 1, False, False, "reg", reg="dil")),
    ("1@%bpl", A("1@%bpl", 1, False, False, "reg", reg="bpl")),
    ("1@%spl", A("1@%spl", 1, False, False, "reg", reg="spl")),
    ("8@%r8", A("8@%r8", 8, False, False, "reg", reg="r8")),
    ("-4@%r9d", A("-4@%r9d", 4, True, False, "reg", reg="r9d")),
    ("2@%r10w", A("2@%r10w", 2, False, False, "reg", reg="r10w")),
    ("1@%r15b", A("1@%r15b", 1, False, False, "reg", reg="r15b")),
    ("8@%rip", A("8@%rip", 8, False, False, "reg", reg="rip")),
    ("8@%RAX", A("8@%RAX", 8, False, False, "reg", reg="rax")),
    ("8f@%xmm0", A("8f@%xmm0", 8, False, True, "reg", reg="xmm0")),
    ("4f@%xmm15", A("4f@%xmm15", 4, False, True, "reg", reg="xmm15")),
    ("8f@%rax", A("8f@%rax", 8, False, True, "reg", reg="rax")),
    # immediates
    ("4@$5", A("4@$5", 4, False, False, "imm", imm=5)),
    ("-4@$-7", A("-4@$-7", 4, True, False, "imm", imm=-7)),
    ("8@$0x10", A("8@$0x10", 8, False, False, "imm", imm=16)),
    ("8@$-0x10", A("8@$-0x10", 8, False, False, "imm", imm=-16)),
    ("4@$010", A("4@$010", 4, False, False, "imm", imm=8)),
    ("8@$0", A("8@$0", 8, False, False, "imm", imm=0)),
    ("8@$18446744073709551615", A("8@$18446744073709551615", 8, False, False, "imm", imm=(1 << 64) - 1)),
    ("8@$buf", A("8@$buf", 8, False, False, "imm", symbol="buf")),
    ("8@$buf+8", A("8@$buf+8", 8, False, False, "imm", imm=8, symbol="buf")),
    # memory
    ("-4@-20(%rbp)", A("-4@-20(%rbp)", 4, True, False, "mem", disp=-20, base="rbp")),
    ("8@(%rdi)", A("8@(%rdi)", 8, False, False, "mem", base="rdi")),
    ("8@0x18(%rsp)", A("8@0x18(%rsp)", 8, False, False, "mem", disp=0x18, base="rsp")),
    ("4@8(%rax,%rbx,4)", A("4@8(%rax,%rbx,4)", 4, False, False, "mem", disp=8, base="rax", index="rbx",
                           scale=4)),
    ("4@(%rax,%rcx)", A("4@(%rax,%rcx)", 4, False, False, "mem", base="rax", index="rcx")),
    ("4@(%rax,%rcx,1)", A("4@(%rax,%rcx,1)", 4, False, False, "mem", base="rax", index="rcx")),
    ("2@(,%rdx,2)", A("2@(,%rdx,2)", 2, False, False, "mem", index="rdx", scale=2)),
    ("8@-8(,%r12,8)", A("8@-8(,%r12,8)", 8, False, False, "mem", disp=-8, index="r12", scale=8)),
    ("4@(,%rax)", A("4@(,%rax)", 4, False, False, "mem", index="rax")),
    ("4@(%eax)", A("4@(%eax)", 4, False, False, "mem", base="eax")),
    ("4@arr(,%rax,4)", A("4@arr(,%rax,4)", 4, False, False, "mem", index="rax", scale=4, symbol="arr")),
    ("8@0x601040", A("8@0x601040", 8, False, False, "mem", disp=0x601040)),
    ("8@counter", A("8@counter", 8, False, False, "mem", symbol="counter")),
    # rip-relative
    ("-4@counter(%rip)", A("-4@counter(%rip)", 4, True, False, "rip", base="rip", symbol="counter")),
    ("8@table+16(%rip)", A("8@table+16(%rip)", 8, False, False, "rip", base="rip", disp=16,
                           symbol="table")),
    ("8@table-0x8(%rip)", A("8@table-0x8(%rip)", 8, False, False, "rip", base="rip", disp=-8,
                            symbol="table")),
    ("8@0x10(%rip)", A("8@0x10(%rip)", 8, False, False, "rip", base="rip", disp=16)),
    ("8f@g_double(%rip)", A("8f@g_double(%rip)", 8, False, True, "rip", base="rip", symbol="g_double")),
    ("4@_ZN3foo3barE.lto_priv.0(%rip)", A("4@_ZN3foo3barE.lto_priv.0(%rip)", 4, False, False, "rip",
                                          base="rip", symbol="_ZN3foo3barE.lto_priv.0")),
    ("-8f@8(%rsp)", A("-8f@8(%rsp)", 8, True, True, "mem", disp=8, base="rsp")),
    # every displacement form gcc prints: SYM, SYM+NUM, SYM-NUM, NUM+SYM (gcc 12), -NUM+SYM, NUM
    ("-4@40+CheckpointStats(%rip)", A("-4@40+CheckpointStats(%rip)", 4, True, False, "rip", base="rip",
                                      disp=40, symbol="CheckpointStats")),
    ("-2@4+t1(%rip)", A("-2@4+t1(%rip)", 2, True, False, "rip", base="rip", disp=4, symbol="t1")),
    ("8@0x10+table(%rip)", A("8@0x10+table(%rip)", 8, False, False, "rip", base="rip", disp=16,
                             symbol="table")),
    ("8@-8+table(%rip)", A("8@-8+table(%rip)", 8, False, False, "rip", base="rip", disp=-8,
                           symbol="table")),
    ("8@-0x8+table(%rip)", A("8@-0x8+table(%rip)", 8, False, False, "rip", base="rip", disp=-8,
                             symbol="table")),
    ("8@table+8+8(%rip)", A("8@table+8+8(%rip)", 8, False, False, "rip", base="rip", disp=16,
                            symbol="table")),
    ("8@8+table-4(%rip)", A("8@8+table-4(%rip)", 8, False, False, "rip", base="rip", disp=4,
                            symbol="table")),
    ("8@-20(%rip)", A("8@-20(%rip)", 8, False, False, "rip", base="rip", disp=-20)),
    ("8@8+8(%rip)", A("8@8+8(%rip)", 8, False, False, "rip", base="rip", disp=16)),
    ("8@(%rip)", A("8@(%rip)", 8, False, False, "rip", base="rip")),
    ("4@8+arr(,%rax,4)", A("4@8+arr(,%rax,4)", 4, False, False, "mem", disp=8, index="rax", scale=4,
                           symbol="arr")),
    ("4@-4+arr(%rbx)", A("4@-4+arr(%rbx)", 4, False, False, "mem", disp=-4, base="rbx", symbol="arr")),
    ("8@16+counter", A("8@16+counter", 8, False, False, "mem", disp=16, symbol="counter")),
    ("8@counter-16", A("8@counter-16", 8, False, False, "mem", disp=-16, symbol="counter")),
    ("8@$16+buf", A("8@$16+buf", 8, False, False, "imm", imm=16, symbol="buf")),
    ("8@$buf-1", A("8@$buf-1", 8, False, False, "imm", imm=-1, symbol="buf")),
    ("8@$-1+buf", A("8@$-1+buf", 8, False, False, "imm", imm=-1, symbol="buf")),
]


@pytest.mark.parametrize("text,expected", GRAMMAR, ids=[g[0] for g in GRAMMAR])
def test_grammar(text: str, expected: UsdtArg) -> None:
    assert parse_arg(text) == expected


def test_parse_args() -> None:
    assert parse_args("") == []
    assert parse_args("   ") == []
    got = parse_args("-4@%edi  8@-16(%rbp)\t8f@%xmm1 ")
    assert [a.text for a in got] == ["-4@%edi", "8@-16(%rbp)", "8f@%xmm1"]
    assert [a.kind for a in got] == ["reg", "mem", "reg"]
    with pytest.raises(ProbeSpecError):
        parse_args("-4@%edi 3@%esi")


def test_all_register_names() -> None:
    names = []
    for x in "abcd":
        names += [f"r{x}x", f"e{x}x", f"{x}x", f"{x}l", f"{x}h"]
    for x in ("si", "di", "bp", "sp"):
        names += [f"r{x}", f"e{x}", x, f"{x}l"]
    for n in range(8, 16):
        names += [f"r{n}", f"r{n}d", f"r{n}w", f"r{n}b"]
    for name in names:
        assert parse_arg(f"8@%{name}").reg == name
        assert get_register_info(name) is not None
    assert get_register_info("ah") == ("rax", 8, 8)
    assert get_register_info("r9w") == ("r9", 0, 16)
    assert get_register_info("xmm0") is None


BAD = [
    "", "@", "4", "4@", "3@%eax", "16@%rax", "0@%eax", "04@%eax", "+4@%eax", "--4@%eax",
    "4@%eaz", "4@%", "4@%xmm16", "4@eax(", "4@(%rax", "4@%rax)", "4@((%rax))",
    "2f@%xmm0", "1f@%xmm0", "4@(%rax,%rbx,3)", "4@(%rax,%rbx,16)", "4@(%rax,%rsp)", "4@(%rax,,4)",
    "4@(%rax,%rbx,4,1)", "4@()", "4@(,)", "4@(%ah)", "4@(%ax)", "4@(%rip,%rax)", "4@(%rax,%ebx)",
    "4@$", "4@$+1", "4@$0xg", "4@$12a", "4@$099", "4@sym@GOTPCREL(%rip)", "4@sym+(%rip)",
    "4@sym+-4(%rip)", "4@$" + "9" * 30, "4@$" + "1" * 5000, "8@$-18446744073709551615",
    "4@%eax %ebx", "4@ %eax", "4 @%eax", "x@%eax", "4x@%eax", "4@(rax)", "4@-4(rbp)",
    "4@\u0663(%rax)", "\u0664@%eax", "4@%e\u0430x", "4@$\u0661", "4@sym\n(%rip)",
    # displacements: a symbol subtracted or twice, signs without terms, a sum past 64 bits
    "4@8-sym(%rip)", "4@-sym(%rip)", "4@a+b(%rip)", "4@8+a+b(%rip)", "4@+8+sym(%rip)", "4@8++sym(%rip)",
    "4@8+sym+(%rip)", "4@sym-(%rip)", "4@-(%rip)", "4@--8(%rip)", "4@8+-sym(%rip)", "4@$-sym",
    "4@$8-sym", "4@8+1sym(%rip)", "4@8+sym@PLT(%rip)", "4@8+(%rip)", "4@+(%rip)",
    "8@$18446744073709551615+1", "8@-9223372036854775808-1(%rip)",
    "8@" + "1+" * 3000 + "(%rip)",
    # thread-local variables (gcc: %fs:var@tpoff) would need the TLS layout: refused
    "-4@%fs:tls_counter@tpoff", "8@%fs:40", "8@%gs:0x28",
]


@pytest.mark.parametrize("text", BAD)
def test_malformed(text: str) -> None:
    with pytest.raises(ProbeSpecError) as ei:
        parse_arg(text)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith("bad USDT argument")
    assert isinstance(ei.value, ValueError)


def test_not_a_string() -> None:
    with pytest.raises(ProbeSpecError):
        parse_arg(None)  # type: ignore[arg-type]
    with pytest.raises(ProbeSpecError):
        parse_args(b"4@%eax")  # type: ignore[arg-type]


_ALPHABET = st.sampled_from(list("-0123456789fxX@%$(),+ \trabcdeilpsxmwqhBDQ._\u0663\u00e9\n"))


@given(st.text(max_size=40))
@settings(max_examples=400, deadline=None)
def test_fuzz_random_text(text: str) -> None:
    _check_only_spec_error(text)


@given(st.lists(_ALPHABET, max_size=30).map("".join))
@settings(max_examples=600, deadline=None)
def test_fuzz_grammar_alphabet(text: str) -> None:
    _check_only_spec_error(text)


@given(st.sampled_from([g[0] for g in GRAMMAR]), st.integers(0, 20), st.text(max_size=3))
@settings(max_examples=400, deadline=None)
def test_fuzz_mutated_valid_specs(text: str, pos: int, insert: str) -> None:
    pos = min(pos, len(text))
    _check_only_spec_error(text[:pos] + insert + text[pos:])
    _check_only_spec_error(text[:pos] + text[pos + 1:])


def _check_only_spec_error(text: str) -> None:
    try:
        args = parse_args(text)
    except ProbeSpecError as exc:
        assert "\n" not in str(exc)
        return
    for arg in args:
        assert arg.size in (1, 2, 4, 8)
        assert arg.kind in ("reg", "imm", "mem", "rip")
        assert parse_arg(arg.text) == arg
        # a parsed spec evaluates without surprises against a permissive machine
        value = evaluate(arg, lambda r: 0x1122334455667788, lambda a, n: b"\xab" * n,
                         get_xmm=lambda n: bytes(range(16)), resolve_symbol=lambda s: 0x1000, rip=0x400000)
        assert isinstance(value, (int, float))


# ---------------------------------------------------------------------------
# evaluation


class Machine:
    """A fake register file and a sparse little-endian memory."""

    def __init__(self) -> None:
        self.regs: Dict[str, int] = {
            "rax": 0x1122334455667788, "rbx": 0xFFFFFFFFFFFFFF80, "rcx": 0x10, "rdx": 0x8000,
            "rsi": 0xFEDCBA9876543210, "rdi": 0xFFFFFFFF, "rbp": 0x7FFF0100, "rsp": 0x7FFF0000,
            "r8": 3, "r9": 0xABCD_FFFE, "r10": 0, "r11": 0, "r12": 2, "r13": 0, "r14": 0, "r15": 0x80,
            "rip": 0x401000,
        }
        self.mem: Dict[int, int] = {}
        self.calls: List[str] = []
        self.xmm: Dict[int, bytes] = {0: struct.pack("<d", 3.25) + bytes(8),
                                      1: struct.pack("<f", -0.5) + bytes(12)}

    def get_reg(self, name: str) -> int:
        assert name in self.regs, f"asked for {name!r}: only 64-bit names allowed"
        self.calls.append(name)
        return self.regs[name]

    def poke(self, address: int, data: bytes) -> None:
        for i, b in enumerate(data):
            self.mem[address + i] = b

    def read(self, address: int, size: int) -> bytes:
        try:
            return bytes(self.mem[address + i] for i in range(size))
        except KeyError:
            raise FaultError(f"cannot read {size} bytes at {address:#x}", address) from None

    def get_xmm(self, n: int) -> bytes:
        return self.xmm[n]

    def eval(self, text: str, symbols: Optional[Dict[str, int]] = None, rip: int = 0) -> object:
        resolve = (lambda s: symbols[s]) if symbols is not None else None
        return evaluate(parse_arg(text), self.get_reg, self.read, get_xmm=self.get_xmm,
                        resolve_symbol=resolve, rip=rip)


@pytest.fixture
def m() -> Machine:
    return Machine()


@pytest.mark.parametrize("text,value", [
    ("8@%rax", 0x1122334455667788),
    ("-8@%rax", 0x1122334455667788),
    ("4@%eax", 0x55667788),
    ("2@%ax", 0x7788),
    ("1@%al", 0x88),
    ("-1@%al", 0x88 - 0x100),
    ("1@%ah", 0x77),
    ("-1@%ah", 0x77),
    ("8@%rbx", 0xFFFFFFFFFFFFFF80),
    ("-8@%rbx", -128),
    ("-4@%ebx", -128),
    ("4@%ebx", 0xFFFFFF80),
    ("-1@%bl", -128),
    ("1@%bh", 0xFF),
    ("-1@%bh", -1),
    ("-2@%dx", -0x8000),
    ("2@%dx", 0x8000),
    ("1@%dh", 0x80),
    ("4@%rdi", 0xFFFFFFFF),          # narrower SIZE than register: truncated
    ("-4@%rdi", -1),
    ("-8@%edi", -1),                 # wider SIZE than register: sign from the register width
    ("8@%edi", 0xFFFFFFFF),
    ("2@%r9w", 0xFFFE),
    ("-2@%r9w", -2),
    ("4@%r9d", 0xABCDFFFE),
    ("-1@%r15b", -128),
    ("1@%r15l", 0x80),
    ("1@%sil", 0x10),
    ("2@%si", 0x3210),
    ("8@%rip", 0x401000),
])
def test_eval_registers(m: Machine, text: str, value: int) -> None:
    assert m.eval(text) == value
    assert all(c in m.regs for c in m.calls)


@pytest.mark.parametrize("text,value", [
    ("4@$5", 5), ("-4@$-7", -7), ("4@$-1", 0xFFFFFFFF), ("1@$-56", 200), ("-1@$-56", -56),
    ("-8@$-1", -1), ("8@$-1", (1 << 64) - 1), ("2@$0x12345", 0x2345), ("-2@$0xffff", -1),
    ("8@$18446744073709551615", (1 << 64) - 1), ("-8@$18446744073709551615", -1),
    ("8@$-9223372036854775808", 1 << 63),
])
def test_eval_immediates(m: Machine, text: str, value: int) -> None:
    assert m.eval(text) == value


def test_eval_symbol_immediate(m: Machine) -> None:
    assert m.eval("8@$buf", {"buf": 0x555555558000}) == 0x555555558000
    assert m.eval("8@$buf+8", {"buf": 0x555555558000}) == 0x555555558008


def test_eval_memory(m: Machine) -> None:
    m.poke(0x7FFF0100 - 20, struct.pack("<i", -42))
    assert m.eval("-4@-20(%rbp)") == -42
    assert m.eval("4@-20(%rbp)") == (1 << 32) - 42
    assert m.eval("-2@-20(%rbp)") == -42
    assert m.eval("1@-20(%rbp)") == 256 - 42
    m.poke(0x7FFF0000, struct.pack("<Q", 0x8877665544332211))
    assert m.eval("8@(%rsp)") == 0x8877665544332211
    assert m.eval("-8@(%rsp)") == 0x8877665544332211 - (1 << 64)
    # base + index*scale + disp: rcx=0x10, r12=2, r8=3
    m.poke(0x7FFF0000 + 8 + 0x10 * 4, struct.pack("<H", 0xBEEF))
    assert m.eval("2@8(%rsp,%rcx,4)") == 0xBEEF
    m.poke(0x7FFF0000 + 2 * 8, struct.pack("<I", 77))
    assert m.eval("4@(%rsp,%r12,8)") == 77
    m.poke(0x7FFF0000 + 2, struct.pack("<B", 0xF0))
    assert m.eval("-1@(%rsp,%r12)") == -16
    m.poke(3 * 2 - 4, b"\x05")
    assert m.eval("1@-4(,%r8,2)") == 5
    m.poke(0x1000 + 0x10 * 4, struct.pack("<i", -9))
    assert m.eval("-4@arr(,%rcx,4)", {"arr": 0x1000}) == -9
    m.poke(0x601040, struct.pack("<q", 12345))
    assert m.eval("8@0x601040") == 12345
    m.poke(0x2000 + 4, struct.pack("<I", 6))
    assert m.eval("4@counter+4", {"counter": 0x2000}) == 6


def test_eval_memory_32bit_address_wraps(m: Machine) -> None:
    m.regs["rax"] = 0xFFFFFFFF_FFFFFFF0
    m.poke(0xFFFFFFF0 + 0x20 - (1 << 32), b"\x07")      # (eax + 0x20) mod 2**32 = 0x10
    assert m.eval("1@0x20(%eax)") == 7


def test_eval_rip_relative(m: Machine) -> None:
    m.poke(0x555555558010, struct.pack("<i", -3))
    syms = {"counter": 0x555555558010, "table": 0x555555558000}
    assert m.eval("-4@counter(%rip)", syms) == -3
    assert m.eval("-4@table+16(%rip)", syms) == -3
    assert m.eval("-4@table+0x10(%rip)", syms) == -3
    m.poke(0x555555558008, b"\x09")
    assert m.eval("1@counter-8(%rip)", syms) == 9
    # numeric displacement: relative to the rip argument, not to get_reg("rip")
    m.poke(0x400000 + 0x10, struct.pack("<H", 0x1234))
    assert m.eval("2@0x10(%rip)", rip=0x400000) == 0x1234
    assert "rip" not in m.calls


def test_eval_rip_relative_number_first(m: Machine) -> None:
    """gcc 12 prints a field of a global as NUM+SYM: the address is SYM's plus NUM."""
    stats = 0x555555560000
    syms = {"CheckpointStats": stats, "t1": 0x555555570000, "table": 0x555555558000}
    m.poke(stats + 40, struct.pack("<i", -123))
    m.poke(stats + 44, struct.pack("<i", 456))
    assert m.eval("-4@40+CheckpointStats(%rip)", syms) == -123
    assert m.eval("-4@44+CheckpointStats(%rip)", syms) == 456
    assert m.eval("-4@CheckpointStats+44(%rip)", syms) == 456
    assert m.eval("-4@48+CheckpointStats-4(%rip)", syms) == 456
    m.poke(0x555555570000 + 4, struct.pack("<h", -2))
    assert m.eval("-2@4+t1(%rip)", syms) == -2
    assert m.eval("2@4+t1(%rip)", syms) == 0xFFFE
    m.poke(0x555555558000 - 8, struct.pack("<Q", 77))
    assert m.eval("8@-8+table(%rip)", syms) == 77
    assert m.eval("8@table-8(%rip)", syms) == 77
    # plain NUM(%rip), no symbol: relative to the rip given
    m.poke(0x400000 + 16, b"\x2a")
    assert m.eval("1@8+8(%rip)", rip=0x400000) == 42
    # the same forms outside %rip
    m.poke(0x555555558000 + 24, struct.pack("<I", 5))
    assert m.eval("4@24+table", syms) == 5
    assert m.eval("4@8+table(%rcx)", syms) == 5                    # rcx = 0x10
    assert m.eval("8@$16+table", syms) == 0x555555558010
    assert m.eval("8@$-1+table", syms) == 0x555555557FFF


@pytest.mark.parametrize("flags,first", [(("-fPIE", "-pie"), "-4@40+CheckpointStats(%rip)"),
                                         (("-fno-pie", "-no-pie"), "-4@CheckpointStats+40(%rip)")])
def test_eval_gcc_field_operands_from_file(cbuild: Callable[..., str], flags: Tuple[str, str],
                                           first: str) -> None:
    """gcc's own NUM+SYM / SYM+NUM operands, evaluated against the data in the file."""
    path = cbuild("parse_fields.c", "-O2", *flags)
    with ElfFile(path) as elf:
        (note,) = [n for n in elf.iter_usdt_notes() if n.name == "checkpoint_done"]
        assert note.args.split()[0] == first                     # the form this gcc prints
        args = parse_args(note.args)
        assert {a.kind for a in args} == {"rip"}
        values = [evaluate(a, lambda r: 0, elf.read, resolve_symbol=lambda s: elf.get_symbol(s).address)
                  for a in args]
    assert values == [-123, -2, 456, 1, -9, 13]


def test_eval_floats(m: Machine) -> None:
    assert m.eval("8f@%xmm0") == 3.25
    assert m.eval("4f@%xmm1") == -0.5
    assert m.eval("8@%xmm1") == struct.unpack("<Q", struct.pack("<f", -0.5) + bytes(4))[0]
    m.regs["rdi"] = struct.unpack("<Q", struct.pack("<d", 2.5))[0]
    assert m.eval("8f@%rdi") == 2.5
    m.regs["r8"] = struct.unpack("<I", struct.pack("<f", -1.25))[0] | 0xDEAD_0000_0000_0000
    assert m.eval("4f@%r8d") == -1.25
    assert m.eval("4f@%r8") == -1.25                    # low 4 bytes of the register
    m.poke(0x7FFF0000, struct.pack("<d", -6.5))
    assert m.eval("8f@(%rsp)") == -6.5
    m.poke(0x3000, struct.pack("<f", 1.5))
    got = m.eval("4f@g_float(%rip)", {"g_float": 0x3000})
    assert got == 1.5 and isinstance(got, float)
    assert m.eval("4f@$0x3fc00000") == 1.5


def test_eval_errors(m: Machine) -> None:
    with pytest.raises(FaultError):
        m.eval("8@0x10(%rsp)")                                   # unmapped in the fake memory
    with pytest.raises(FaultError):
        evaluate(parse_arg("8@(%rsp)"), m.get_reg, lambda a, n: b"\0\0")      # short read
    with pytest.raises(SymbolNotFoundError):
        m.eval("4@counter(%rip)")                                # no resolver
    with pytest.raises(ProbeSpecError):
        evaluate(parse_arg("8f@%xmm0"), m.get_reg, m.read)      # no xmm access
    with pytest.raises(KeyError):
        m.eval("4@counter(%rip)", {})                            # resolver errors propagate


def test_eval_calls_only_64bit_names(m: Machine) -> None:
    for text in ("1@%ah", "2@%r9w", "4@%esp", "1@%bpl", "4@(%eax,%ebx,2)", "1@%r10b"):
        try:
            m.eval(text)
        except FaultError:
            pass
    assert set(m.calls) <= set(m.regs) and {"rax", "r9", "rsp", "rbp", "rbx", "r10"} <= set(m.calls)


# ---------------------------------------------------------------------------
# every stapsdt note of the machine

_USR_ROOTS = ("/usr/lib", "/usr/bin", "/usr/sbin", "/usr/libexec")
_WALK_SECONDS = 15.0


def _mapped_libc() -> Optional[str]:
    """The libc this process runs on (Debian's has stapsdt notes), so it is read even if the walk stops early."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                path = fields[5].strip() if len(fields) == 6 else ""
                if os.path.basename(path).startswith("libc.so"):
                    return path
    except OSError:
        pass
    return None


def _x86_64_objects(deadline: float) -> Iterator[str]:
    """Executables and shared objects for x86-64 under /usr, each file once, until *deadline*."""
    seen: Set[Tuple[int, int]] = set()
    first = [p for p in (_mapped_libc(),) if p]
    walked = (os.path.join(d, f) for root in _USR_ROOTS for d, _dirs, files in os.walk(root) for f in files)
    for path in (*first, *walked):
        if time.monotonic() > deadline:
            return
        try:
            st = os.stat(path)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_size < 64 or (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            with open(path, "rb") as f:
                ident = f.read(20)
        except OSError:
            continue
        # ELF, 64-bit, little-endian, ET_EXEC or ET_DYN, EM_X86_64: what ElfFile reads
        if ident[:6] == b"\x7fELF\x02\x01" and ident[16] in (2, 3) and ident[17] == 0 and ident[18:20] == b">\0":
            yield path


def test_every_stapsdt_note_under_usr_parses() -> None:
    start = time.monotonic()
    objects = with_notes = notes = 0
    unreadable: List[str] = []
    failures: List[str] = []
    for path in _x86_64_objects(start + _WALK_SECONDS):
        objects += 1
        try:
            with ElfFile(path) as elf:
                found = list(elf.iter_usdt_notes())
        except PtprobeError as exc:          # a packaged object ElfFile cannot read is a bug too
            unreadable.append(str(exc))
            continue
        with_notes += bool(found)
        for note in found:
            notes += 1
            try:
                args = parse_args(note.args)
            except ProbeSpecError as exc:
                failures.append(f"{path}: {note.provider}:{note.name}: {exc}")
                continue
            assert [a.text for a in args] == note.args.split()
    elapsed = time.monotonic() - start
    print(f"{objects} x86-64 objects under /usr in {elapsed:.1f}s: {with_notes} with stapsdt notes, "
          f"{notes} notes")
    assert not unreadable, f"{len(unreadable)} objects unreadable, e.g. {unreadable[:5]}"
    assert not failures, f"{len(failures)} of {notes} notes do not parse:\n" + "\n".join(failures[:20])
    if with_notes == 0:
        pytest.skip(f"none of the {objects} x86-64 objects read under /usr has stapsdt notes")
    assert notes > 0
