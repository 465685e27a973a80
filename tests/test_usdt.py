"""End-to-end tests of USDT probes: real C targets, real processes, real ptrace.

Targets are built at test time from tests/c/usdt_*.c, with Debian's <sys/sdt.h>
(systemtap-sdt-dev) and with our own tests/c/ptprobe_sdt.h. Expected argument
values are computed here from what the C code passes; the notes themselves are
read with ptprobe.elf.ElfFile (and checked against what the test needs, so a
compiler that picks other operand forms makes the test fail, not pass
vacuously). Synchronisation with running targets goes through pipes and
/proc, never through sleeps.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import threading
from collections import Counter
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import pytest

from conftest import build
from helpers import (RecordingObserver, captured_stdout, load_bias, mechanisms, ptprobe_cli, read_mem, reaped_pid,
                     recorder, run_traced, tracer_pid, untraced, watchdog)

import ptprobe
from ptprobe.elf import ElfFile

SDT_H = [Path("/usr/include/sys/sdt.h"), Path("/usr/include/x86_64-linux-gnu/sys/sdt.h")]

needs_sdt_h = pytest.mark.skipif(not any(p.exists() for p in SDT_H),
                                 reason="Debian's sys/sdt.h (systemtap-sdt-dev) is not installed")


# ---------------------------------------------------------------------------- helpers

def notes(path: str, name: Optional[str] = None):
    """The USDT notes of *path* (only those called *name* if given)."""
    with ElfFile(path) as elf:
        found = list(elf.iter_usdt_notes())
    return [n for n in found if name is None or n.name == name]


def f32(value: float) -> float:
    """*value* rounded to single precision, as C's float holds it."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


def read_u16(pid: int, address: int) -> int:
    return int.from_bytes(read_mem(pid, address, 2), "little")


Record = Tuple[int, List]           # (hit address, hit args)


def address_and_args(hit: ptprobe.Hit) -> Record:
    """What recorder() keeps of a hit here."""
    return hit.address, list(hit.args)


def run_recorded(argv: Sequence[str], specs: Sequence[str], **options):
    """Run *argv* (helpers.run_traced) with one probe per spec, each recording its hits.

    Returns (status, stdout, probes, records per probe, load bias of argv[0])."""
    records: List[List[Record]] = [[] for _ in specs]
    bias: List[int] = []
    status, out, probes, _ = run_traced(
        argv, [(spec, recorder(rec, address_and_args)) for spec, rec in zip(specs, records)],
        on_armed=lambda session: bias.append(load_bias(session.main_pid, argv[0])), **options)
    return status, out, probes, records, bias[0]


def check_site_addresses(probe: ptprobe.Probe, path: str, bias: int, name: str) -> None:
    """The probe's sites are exactly the notes' addresses plus the load bias."""
    expected = sorted(n.address + bias for n in notes(path, name))
    assert sorted(s.address for s in probe.sites) == expected


# ---------------------------------------------------------------------------- targets

@pytest.fixture(scope="module")
def sdt_prog() -> str:
    if not any(p.exists() for p in SDT_H):
        pytest.skip("Debian's sys/sdt.h (systemtap-sdt-dev) is not installed")
    return build("usdt_sdt.c", "-O2")


def semlib_paths() -> Tuple[str, str]:
    """(program, library): usdt_semloop linked against libusdtsem.so (usdt_semlib.c)."""
    lib = build("usdt_semlib.c", "-O2", "-Wl,-soname,libusdtsem.so", shared=True,
                output="libusdtsem.so")
    libdir = os.path.dirname(lib)
    prog = build("usdt_semloop.c", "-O2", f"-L{libdir}", "-lusdtsem", f"-Wl,-rpath,{libdir}")
    return prog, lib


# ---------------------------------------------------------------------------- Debian sys/sdt.h

def sdt_expected(n: int) -> Dict[str, List[List]]:
    step = [[i, i % 3, i * 7 - i % 3] for i in range(n)]
    neg = [[-i, (i * 37) & 0xFF] for i in range(n)]
    real = [[i * 0.25 - 1e10, f32(i * -0.125)] for i in range(n)]
    return {"step": step, "neg": neg, "real": real, "done": [[]]}


@needs_sdt_h
def test_sdt_h_probes_int3_exact_hits_and_args(sdt_prog: str) -> None:
    """DTRACE_PROBEn / STAP_PROBEn sites (plain nop): int3, every hit, every argument."""
    n = 23
    argv = [sdt_prog, str(n)]
    by_note = {name: notes(sdt_prog, name) for name in ("step", "neg", "real", "done")}
    assert all(len(v) == 1 for v in by_note.values()), by_note
    # what sdt.h made of the arguments: signed 8/4-byte ints, an unsigned byte, 8f and 4f floats
    assert [a.split("@")[0] for a in by_note["step"][0].args.split()] == ["-8", "-4", "-8"]
    assert [a.split("@")[0] for a in by_note["neg"][0].args.split()] == ["-8", "1"]
    assert [a.split("@")[0] for a in by_note["real"][0].args.split()] == ["8f", "4f"]

    specs = [f"usdt:{sdt_prog}:sdtprov:{name}" for name in by_note]
    status, out, probes, records, bias = run_recorded(argv, specs)
    assert status == 0
    assert out == untraced(argv, check=True).stdout
    expected = sdt_expected(n)
    for name, probe, rec in zip(by_note, probes, records):
        assert mechanisms(probe) == ["int3"], name
        check_site_addresses(probe, sdt_prog, bias, name)
        assert probe.hits == len(expected[name]), name
        assert [args for _, args in rec] == expected[name], name
        assert {address for address, _ in rec} == {probe.sites[0].address}
    for i, (d, f) in enumerate(a for _, a in records[2]):
        assert isinstance(d, float) and isinstance(f, float), (i, d, f)


@needs_sdt_h
@pytest.mark.parametrize("spec, names", [
    ("sdt*:*", {"step", "neg", "real", "done"}),
    ("sdtprov:ne?", {"neg"}),
    ("*:st??", {"step"}),
    ("?dtpro?:*e*", {"step", "neg", "real", "done"}),
    ("sdtprov:????", {"step", "real", "done"}),
])
def test_wildcard_spec(sdt_prog: str, spec: str, names: set) -> None:
    """* and ? in provider and name: every matching probe's sites, hits summed."""
    n = 9
    status, out, (probe,), (rec,), bias = run_recorded([sdt_prog, str(n)], [f"usdt:{sdt_prog}:{spec}"])
    assert status == 0
    matching = [note for note in notes(sdt_prog) if note.name in names]
    assert sorted(s.address for s in probe.sites) == sorted(note.address + bias for note in matching)
    expected = sdt_expected(n)
    assert probe.hits == sum(len(expected[name]) for name in names)
    by_address = {note.address + bias: note.name for note in matching}
    got: Dict[str, List] = {}
    for address, args in rec:
        got.setdefault(by_address[address], []).append(args)
    assert got == {name: expected[name] for name in names}


@needs_sdt_h
def test_wildcard_matching_nothing_is_refused(sdt_prog: str) -> None:
    with captured_stdout(), ptprobe.run([sdt_prog, "1"], observer=RecordingObserver()) as session:
        with pytest.raises(LookupError):
            session.probe(f"usdt:{sdt_prog}:sdtprov:nothing*")
        probe = session.probe(f"usdt:{sdt_prog}:sdtprov:done")
        assert session.wait() == 0
    assert probe.hits == 1


# ---------------------------------------------------------------------------- ptprobe_sdt.h site forms

NOP_FORMS = [
    ("PTPROBE_SDT_NOP_1", "int3", "return"),
    ("PTPROBE_SDT_NOP_5", "jmp", "return"),
    ("PTPROBE_SDT_NOP_1_5", "jmp", "return"),
    ("PTPROBE_SDT_NOP_1_10", "jmp", "return"),
    ("PTPROBE_SDT_NOP_5", "jmp", "seed"),
    ("PTPROBE_SDT_NOP_1_10", "jmp", "seed"),
]

FORM_BYTES = {
    "PTPROBE_SDT_NOP_1": "90",
    "PTPROBE_SDT_NOP_5": "0f1f440000",
    "PTPROBE_SDT_NOP_1_5": "900f1f440000",
    "PTPROBE_SDT_NOP_1_10": "90662e0f1f840000000000",
}


@pytest.mark.parametrize("form, mechanism, slots", NOP_FORMS)
def test_site_forms(form: str, mechanism: str, slots: str) -> None:
    """nop5 and the two combos take the jmp path; hits, args, rip and output exact."""
    prog = build("usdt_nops.c", "-O2", f"-DPTPROBE_SDT_NOP={form}")
    (tick,) = notes(prog, "tick")
    with ElfFile(prog) as elf:
        site_bytes = elf.read(tick.address, len(FORM_BYTES[form]) // 2)
    assert site_bytes.hex() == FORM_BYTES[form]          # the header emitted the form under test
    n = 37
    argv = [prog, str(n)]
    status, out, probes, records, bias = run_recorded(
        argv, [f"usdt:{prog}:ptnops:tick", f"usdt:{prog}:ptnops:end"], slots=slots)
    assert status == 0
    assert out == untraced(argv, check=True).stdout
    for probe, name in zip(probes, ("tick", "end")):
        assert mechanisms(probe) == [mechanism], name
        check_site_addresses(probe, prog, bias, name)
    assert probes[0].hits == n and probes[1].hits == 1
    assert [args for _, args in records[0]] == [[i, -i - 1, i * i - i - 1] for i in range(n)]
    assert [args for _, args in records[1]] == [[n]]
    # the handler sees rip = the note's address, whichever path the hit took
    assert {address for address, _ in records[0]} == {tick.address + bias}


# ---------------------------------------------------------------------------- 12 arguments

def twelve_expected(i: int) -> List[int]:
    table = [11, -22, 33, -44, 55, -66]
    local = [100 + i, -200 - i, 300 + i, -400 - i]
    u8 = (-7 - i) & 0xFF
    return [
        -17,
        0xDEADBEEFCAFEF00D ^ i,
        -5 - i,
        -300 - i,
        -99999999999 - i,
        4000000000 + i,
        table[i % 5],
        local[i % 3 + 1],
        -1234567890123 - i,
        -66,
        0xFEDC - i,
        u8 - 256 if u8 >= 128 else u8,
    ]


@pytest.mark.parametrize("opt, nop5", [("-O0", False), ("-O2", False), ("-O0", True), ("-O2", True)])
def test_twelve_arguments_all_operand_forms(opt: str, nop5: bool) -> None:
    flags = [opt] + (["-DARGS_NOP5"] if nop5 else [])
    prog = build("usdt_args.c", *flags)
    (note,) = notes(prog, "twelve")
    args = note.args.split()
    assert len(args) == 12, note.args
    # the forms under test are really in the note
    assert args[0] == "-4@$-17"
    assert args[1:4] == ["8@%rax", "-4@%ecx", "-2@%r11w"]
    assert re.fullmatch(r"-8@-?\d+\(%r[sb]p\)", args[4]), args[4]          # stack slots
    assert re.fullmatch(r"4@-?\d+\(%r[sb]p\)", args[5]), args[5]
    assert re.fullmatch(r"-4@-4\(%r\w+,%r\w+,4\)", args[6]), args[6]       # SIB
    assert re.fullmatch(r"-8@8\(%r\w+,%r\w+,8\)", args[7]), args[7]
    assert args[8:10] == ["-8@g_neg(%rip)", "-4@g_table+20(%rip)"]          # rip-relative
    assert args[10] == "2@g_u16(%rip)"                                      # as gcc printed it
    assert re.fullmatch(r"-1@%[a-z0-9]+[lb]", args[11]), args[11]          # 8-bit register

    n = 7
    argv = [prog, str(n)]
    status, out, (probe,), (rec,), bias = run_recorded(argv, [f"usdt:{prog}:ptargs:twelve"])
    assert status == 0
    assert out == untraced(argv, check=True).stdout
    assert mechanisms(probe) == ["jmp" if nop5 else "int3"]
    check_site_addresses(probe, prog, bias, "twelve")
    assert probe.hits == n
    for i, (_, got) in enumerate(rec):
        assert got == twelve_expected(i), f"round {i}: {note.args}"


# ---------------------------------------------------------------------------- floats

def test_float_arguments() -> None:
    """8f and 4f arguments in general registers, in memory and in xmm registers."""
    prog = build("usdt_float.c", "-O2")
    forms = {n.name: n.args for n in notes(prog)}
    assert re.fullmatch(r"8f@%r\w+ 4f@%e\w+", forms["gpr"]), forms["gpr"]
    assert forms["xmm"] == "8f@%xmm0 4f@%xmm1 -4@$-3"
    assert re.fullmatch(r"8f@-?\d*\(%r\w+\) 4f@-?\d*\(%r\w+\)", forms["mem"]), forms["mem"]
    n = 6
    argv = [prog, str(n)]
    names = ("gpr", "xmm", "mem")
    status, out, probes, records, bias = run_recorded(argv, [f"usdt:{prog}:ptfloat:{k}" for k in names])
    assert status == 0
    assert out == untraced(argv, check=True).stdout
    assert mechanisms(probes[1]) == ["int3"]
    assert mechanisms(probes[0]) == mechanisms(probes[2]) == ["jmp"]
    for name, probe, rec in zip(names, probes, records):
        assert probe.hits == n, name
        for i, (_, got) in enumerate(rec):
            want = [i * 0.75 - 1e10, f32(i * -0.375 + 2.0)] + ([-3] if name == "xmm" else [])
            assert got == want, (name, i)
            assert all(isinstance(v, float) for v in got[:2]), (name, got)


# ---------------------------------------------------------------------------- inlined probe

def test_probe_inlined_at_three_sites() -> None:
    prog = build("usdt_inline.c", "-O2")
    sites = notes(prog, "traced")
    assert len(sites) == 3, "the compiler did not inline traced() into three callers"
    assert len({s.address for s in sites}) == 3
    n = 11
    argv = [prog, str(n)]
    status, out, (probe,), (rec,), bias = run_recorded(argv, [f"usdt:{prog}:ptinline:traced"])
    assert status == 0
    assert out == untraced(argv, check=True).stdout
    check_site_addresses(probe, prog, bias, "traced")
    assert mechanisms(probe) == ["jmp"] * 3
    assert probe.hits == 6 * n
    per_site = Counter(address for address, _ in rec)
    assert sorted(per_site.values()) == [n, 2 * n, 3 * n]
    # each site is one caller's copy: its first argument is always the same
    who_at: Dict[int, set] = {}
    for address, (who, x, r) in rec:
        who_at.setdefault(address, set()).add(who)
        assert r == x * who + 1
    assert sorted(who_at.values(), key=min) == [{1}, {2}, {3}]
    assert per_site == {address: n * min(w) for address, w in who_at.items()}
    expected_x = sorted([i for i in range(n)] + [i + k for i in range(n) for k in range(2)]
                        + [i - k for i in range(n) for k in range(3)])
    assert sorted(x for _, (_, x, _) in rec) == expected_x


# ---------------------------------------------------------------------------- shared library

def test_probes_in_linked_library_by_name() -> None:
    """usdt:libusdtsem.so:... and usdt:libusdtsem:... name the library the program links."""
    prog, lib = semlib_paths()
    n = 40
    argv = [prog, str(n)]
    observer = RecordingObserver()
    call_rec: List[Record] = []
    work_rec: List[Record] = []
    with captured_stdout() as out:
        with ptprobe.run(argv, observer=observer) as session:
            call = session.probe("usdt:libusdtsem.so:semlib:call", recorder(call_rec, address_and_args))
            work = session.probe("usdt:libusdtsem:semlib:work", recorder(work_rec, address_and_args))
            bias = load_bias(session.main_pid, lib)
            (sem_note,) = notes(lib, "work")
            assert read_u16(session.main_pid, sem_note.semaphore + bias) == 1
            status = session.wait()
    assert not observer.handler_errors, observer.handler_errors
    assert status == 0
    check_site_addresses(call, lib, bias, "call")
    check_site_addresses(work, lib, bias, "work")
    assert mechanisms(call) == ["jmp"] and mechanisms(work) == ["jmp"]
    assert call.hits == n and work.hits == n
    assert [a for _, a in call_rec] == [[i] for i in range(n)]
    assert [a for _, a in work_rec] == [[i, i * 1000 + 7] for i in range(n)]
    # the library's semaphore was up from the start, the program's own never
    assert out.text == f"rounds {n} expensive 0 libexpensive {n}\n"
    assert untraced(argv, check=True).stdout == f"rounds {n} expensive 0 libexpensive 0\n"


# ---------------------------------------------------------------------------- semaphores, attach

class LoopProgram:
    """usdt_semloop running untraced; a thread collects its progress lines."""

    def __init__(self, path: str) -> None:
        self.proc = subprocess.Popen([path], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid
        self.cond = threading.Condition()
        self.progress: List[Tuple[int, int, int]] = []
        self.ready: Optional[str] = None
        self.eof = False
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        with self.cond:
            assert self.cond.wait_for(lambda: self.ready is not None or self.eof, timeout=30)
        assert self.ready == f"ready {self.pid}", self.ready

    def _read(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode().strip()
            with self.cond:
                if line.startswith("progress "):
                    self.progress.append(tuple(int(x) for x in line.split()[1:]))
                elif self.ready is None:
                    self.ready = line
                self.cond.notify_all()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def line_after(self, round_: int) -> Tuple[int, int, int]:
        """The first progress line (round, expensive, libexpensive) of a round > *round_*."""
        def find():
            return next((p for p in self.progress if p[0] > round_), None)
        with self.cond:
            assert self.cond.wait_for(lambda: find() is not None or self.eof, timeout=30), \
                f"no progress past round {round_}"
            found = find()
        assert found is not None, f"the program ended: {self.proc.poll()}"
        return found

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self.thread.join(timeout=30)
        self.proc.stdout.close()


@pytest.fixture
def loop_program() -> Iterator[LoopProgram]:
    prog, _ = semlib_paths()
    program = LoopProgram(prog)
    try:
        yield program
    finally:
        program.close()


@pytest.mark.parametrize("where", ["program", "library"])
def test_semaphore_guarded_probe_fires_only_while_traced(loop_program: LoopProgram, where: str) -> None:
    prog, lib = semlib_paths()
    path, spec, name = {
        "program": (prog, f"usdt:{prog}:semloop:tick", "tick"),
        "library": (lib, "usdt:libusdtsem.so:semlib:work", "work"),
    }[where]
    column = 1 if where == "program" else 2        # expensive() counter in the progress lines
    other = 3 - column
    pid = loop_program.pid
    (note,) = notes(path, name)
    assert note.semaphore != 0
    semaphore = note.semaphore + load_bias(pid, path)
    # untraced: the semaphore is down and expensive() never ran
    first = loop_program.line_after(0)
    assert first[1] == first[2] == 0, first
    assert read_u16(pid, semaphore) == 0

    observer = RecordingObserver()
    rec: List[Record] = []
    with watchdog(30, [pid]):
        with ptprobe.attach(pid, observer=observer) as session:
            probe = session.probe(spec, recorder(rec, address_and_args))
            assert read_u16(pid, semaphore) == 1
            while probe.hits < 5:
                assert session.wait(timeout=0.3) is None, "the loop exited"
            assert read_u16(pid, semaphore) == 1
            session.detach()
            hits = probe.hits
    assert not observer.handler_errors, observer.handler_errors
    assert read_u16(pid, semaphore) == 0
    assert tracer_pid(pid) == 0
    check_site_addresses(probe, path, load_bias(pid, path), name)
    assert len(rec) == hits >= 5
    rounds = [args[0] for _, args in rec]
    assert rounds == sorted(rounds) and len(set(rounds)) == len(rounds)
    for _, (i, e) in rec:
        assert e == (i * i - 3 if where == "program" else i * 1000 + 7)
    # every round that started after the detach ran without expensive(): the count
    # stays put, and it ran once per hit (plus at most the round cut by the detach)
    after = loop_program.line_after(max(rounds) + 1)
    later = loop_program.line_after(after[0] + 32)
    assert later[column] == after[column], (after, later)
    assert hits <= after[column] <= hits + 1, (hits, after)
    assert later[other] == 0, later          # the other probe's semaphore was never raised


# ---------------------------------------------------------------------------- ptprobe list

REQUIRED_KEYS = {"path", "provider", "name", "addresses", "semaphore", "args"}


def usdt_records(stdout: str) -> List[dict]:
    data = json.loads(stdout)
    assert isinstance(data, list)
    records = [r for r in data if "provider" in r]
    for r in records:
        assert REQUIRED_KEYS <= set(r), r
        assert isinstance(r["provider"], str) and isinstance(r["name"], str) and isinstance(r["args"], str)
        assert isinstance(r["addresses"], list) and all(type(a) is int for a in r["addresses"])
        assert r["semaphore"] is None or type(r["semaphore"]) is int
    return records


def check_records(records: List[dict], path: str, bias: int) -> None:
    """*records* are exactly the USDT probes of *path*, addresses shifted by *bias*."""
    groups: Dict[Tuple[str, str], list] = {}
    for note in notes(path):
        groups.setdefault((note.provider, note.name), []).append(note)
    assert sorted((r["provider"], r["name"]) for r in records) == sorted(groups)
    for r in records:
        group = groups[(r["provider"], r["name"])]
        assert sorted(r["addresses"]) == sorted(n.address + bias for n in group), r
        assert r["args"] in {n.args for n in group}, r
        sem = group[0].semaphore
        assert r["semaphore"] == (sem + bias if sem else None), r


def test_list_file_text_and_json() -> None:
    prog = build("usdt_inline.c", "-O2")
    text = ptprobe_cli("list", prog)
    assert text.returncode == 0, text.stderr
    assert "ptinline:traced" in text.stdout
    for note in notes(prog):
        assert f"{note.address:#x}" in text.stdout
    assert not re.search(r"\bthree\b", text.stdout)
    result = ptprobe_cli("list", "--json", prog)
    assert result.returncode == 0, result.stderr
    records = usdt_records(result.stdout)
    assert {r["path"] for r in records} == {prog}
    check_records(records, prog, 0)
    (record,) = records
    assert len(record["addresses"]) == 3
    # --symbols adds the functions
    symbols = ptprobe_cli("list", "--symbols", prog)
    assert symbols.returncode == 0, symbols.stderr
    assert "ptinline:traced" in symbols.stdout
    assert all(re.search(rf"\b{fn}\b", symbols.stdout) for fn in ("one", "two", "three", "main"))


def test_list_file_with_semaphores() -> None:
    prog, lib = semlib_paths()
    for path, name in ((prog, "semloop:tick"), (lib, "semlib:work")):
        text = ptprobe_cli("list", path)
        assert text.returncode == 0, text.stderr
        assert name in text.stdout
        result = ptprobe_cli("list", path, "--json")
        assert result.returncode == 0, result.stderr
        records = usdt_records(result.stdout)
        check_records(records, path, 0)
        assert any(r["semaphore"] for r in records)


def test_list_pid(loop_program: LoopProgram) -> None:
    prog, lib = semlib_paths()
    pid = loop_program.pid
    text = ptprobe_cli("list", "--pid", str(pid))
    assert text.returncode == 0, text.stderr
    assert "semloop:tick" in text.stdout and "semlib:work" in text.stdout and "semlib:call" in text.stdout
    result = ptprobe_cli("list", "--pid", str(pid), "--json")
    assert result.returncode == 0, result.stderr
    records = usdt_records(result.stdout)
    for path in (prog, lib):
        mine = [r for r in records if os.path.realpath(r["path"]) == os.path.realpath(path)]
        check_records(mine, path, load_bias(pid, path))
    assert tracer_pid(pid) == 0
    loop_program.line_after(loop_program.line_after(0)[0])      # still running


def test_list_errors() -> None:
    assert ptprobe_cli("list").returncode == 2
    assert ptprobe_cli("list", "/nonexistent/file").returncode == 5
    assert ptprobe_cli("list", "--pid", str(reaped_pid())).returncode == 3


# ---------------------------------------------------------------------------- CLI

def test_cli_string_argument_format() -> None:
    prog = build("usdt_strings.c", "-O2")
    (note,) = notes(prog, "greet")
    assert note.args.split()[0].startswith("8@")
    result = ptprobe_cli("run", "-o", "-", "-p", f"usdt:{prog}:ptstr:greet", "-f", "%s %d", "--", prog)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    assert lines.pop() == ""
    assert "greeted 5" in lines
    lines.remove("greeted 5")
    assert lines == ["alpha 3", "beta -7", "gamma delta -17", " -27", "\u00e9t\u00e9 -37"]
    assert re.search(r"ptstr:greet.*\b5 hits\b", result.stderr), result.stderr


@needs_sdt_h
def test_cli_json_hits(sdt_prog: str) -> None:
    n = 5
    result = ptprobe_cli("run", "--json", "-o", "-", "-p", f"usdt:{sdt_prog}:sdtprov:neg", "--", sdt_prog, str(n))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    program = untraced([sdt_prog, str(n)], check=True).stdout.splitlines()
    hits = [json.loads(line) for line in lines if line not in program]
    assert [line for line in lines if line in program] == program
    assert [h["args"] for h in hits] == sdt_expected(n)["neg"]
    assert len({h["address"] for h in hits}) == 1
    assert re.search(r"\b5 hits \(1 int3\)", result.stderr), result.stderr
