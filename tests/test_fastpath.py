"""The jmp fast path (docs/design.md: "Probe sites" to "Lifetime"), end to end on real C targets.

Every target lives in tests/c/fast_*.c (plus fastlib_sites.c); the register checks are
done by the targets themselves (fast_regcheck.c) and reported by their exit status, so
a broken engine shows up as a failing program, not just as a wrong count.

Engine internals used (no public API exists for them): ``Session.threads``,
``Session.processes[pid].mem``, ``Site.slot``, ``ptprobe.linux.cont/get_regs/set_regs/
singlestep/wait_tid`` (stopping a thread inside a seed slot at each instruction boundary
before detaching, in test_seed_detach_inside_slot).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Dict, List

import pytest
from elftools.elf.elffile import ELFFile

from conftest import NOBODY, build, unprivileged_python
from helpers import (LINE_TIMEOUT, NOP5, REPO, Hammer, Lines, fast_build, load_bias, mechanisms,
                     proc_status, read_mem, repo_env)

import ptprobe
from ptprobe import arch, linux

SLOTS = pytest.mark.parametrize("slots", ["seed", "return"])
EPROTO = 71


# --------------------------------------------------------------------------- helpers

def _symbols(path: str) -> Dict[str, int]:
    with open(path, "rb") as fh:
        elf = ELFFile(fh)
        table = elf.get_section_by_name(".symtab")
        return {sym.name: sym["st_value"] for sym in table.iter_symbols() if sym.name}


def _probe_k(path: str) -> List[int]:
    """The 16 constants of fast_regcheck.c, read from the binary."""
    with open(path, "rb") as fh:
        elf = ELFFile(fh)
        sym = elf.get_section_by_name(".symtab").get_symbol_by_name("probe_k")[0]
        addr = sym["st_value"]
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= addr < seg["p_vaddr"] + seg["p_filesz"]:
                fh.seek(seg["p_offset"] + addr - seg["p_vaddr"])
                data = fh.read(128)
                return [int.from_bytes(data[i:i + 8], "little") for i in range(0, 128, 8)]
    raise AssertionError("probe_k not found")


def _runtime(pid: int, path: str, symbol: str) -> int:
    value = _symbols(path)[symbol]
    with open(path, "rb") as fh:
        if ELFFile(fh).header["e_type"] == "ET_EXEC":
            return value
    return load_bias(pid, path) + value


def _wait_for_hits(session, probe, at_least: int = 1, rounds: int = 500) -> None:
    """Run the event loop in short slices until *probe* has *at_least* hits."""
    for _ in range(rounds):
        status = session.wait(timeout=0.02)
        assert status is None, f"the program ended (status {status}) while traced"
        if probe.hits >= at_least:
            return
    raise AssertionError(f"only {probe.hits} hits, wanted {at_least}")


def _run(argv, spec_handlers, **options):
    """ptprobe.run *argv* with probes (spec, handler); return (status, probes)."""
    with ptprobe.run(argv, **options) as session:
        probes = [session.probe(spec, handler) for spec, handler in spec_handlers]
        status = session.wait()
    return status, probes


# --------------------------------------------------------------------------- red zone


@SLOTS
def test_red_zone_survives_1000_hits(slots, capfd):
    binary = fast_build("fast_redzone.c")
    status, (probe,) = _run([binary, "1000"], [(f"uprobe:{binary}:rz_site", None)], slots=slots)
    out = capfd.readouterr().out
    assert "redzone bad=0" in out, out
    assert status == 0
    assert mechanisms(probe) == ["jmp"]
    assert probe.sites[0].slot_kind == slots
    assert probe.hits == 1000


# --------------------------------------------------------------------------- registers


@SLOTS
def test_registers_survive_site_and_handler_sees_program_values(slots, capfd):
    binary = fast_build("fast_regs.c")
    k = _probe_k(binary)
    seed, passes = 0x0123456789ABCDEF, 64
    problems: List[str] = []
    seen: List[int] = []

    def handler(hit):
        r = hit.regs
        s = r.rdi ^ k[5]                      # rdi = seed ^ k[5]
        seen.append(s)
        for name, index in (("rax", 0), ("rcx", 2), ("r11", 11), ("rbx", 1), ("rdx", 3),
                            ("rsi", 4), ("rbp", 6), ("r8", 8), ("r9", 9), ("r10", 10),
                            ("r12", 12), ("r13", 13), ("r14", 14), ("r15", 15)):
            if r[name] != s ^ k[index]:
                problems.append(f"pass {s - seed}: {name}={r[name]:#x}, program had {s ^ k[index]:#x}")
        flags = ((s >> 8) & 0xCD5) | 0x202
        if r.eflags & 0xFD7 != flags:
            problems.append(f"pass {s - seed}: rflags={r.eflags:#x}, program had {flags:#x}")
        if r.rip != hit.address:
            problems.append(f"rip={r.rip:#x}, site {hit.address:#x}")
        xmm = hit.xmm(0)
        if xmm != s.to_bytes(8, "little") + (s ^ (1 << 64) - 1).to_bytes(8, "little"):
            problems.append(f"pass {s - seed}: xmm0={xmm.hex()}")
        # probe_regs keeps the seed at [rsp] and out at [rsp+8], and stored rsp in out[19]
        frame = hit.read(r.rsp, 16)
        out_at = int.from_bytes(frame[8:], "little")
        if int.from_bytes(frame[:8], "little") != s or \
                int.from_bytes(hit.read(out_at + 19 * 8, 8), "little") != r.rsp:
            problems.append(f"pass {s - seed}: rsp={r.rsp:#x} is not the program's rsp")

    status, (probe,) = _run([binary, "check", hex(seed), str(passes)],
                            [(f"uprobe:{binary}:regs_site", handler)], slots=slots)
    out = capfd.readouterr().out
    assert f"check ok {passes}" in out, out
    assert status == 0
    assert mechanisms(probe) == ["jmp"]
    assert probe.hits == passes
    assert probe.errors == 0
    assert problems == []
    assert seen == [seed + i for i in range(passes)]


@SLOTS
def test_handler_writes_rax_rcx_r11_rbx(slots, capfd):
    binary = fast_build("fast_regs.c")
    new = {"rax": 0xAAAA00000000AAAA, "rcx": 0xCCCC0000CCCC0001, "r11": 0x1111000011110011,
           "rbx": 0xBBBB0000BBBB000B}

    def handler(hit):
        for name, value in new.items():
            setattr(hit.regs, name, value)

    status, (probe,) = _run([binary, "modify", "0x77"], [(f"uprobe:{binary}:regs_site", handler)],
                            slots=slots)
    out = capfd.readouterr().out
    assert status == 0, out                   # every other register came through unchanged
    assert mechanisms(probe) == ["jmp"]
    assert probe.hits == 1 and probe.errors == 0
    want = " ".join(f"{name}={value:#x}" for name, value in new.items())
    assert want in out, out


MECHANISMS = pytest.mark.parametrize("options", [{"slots": "seed"}, {"slots": "return"}, {"seccomp": False}],
                                     ids=["seed", "return", "int3"])


@MECHANISMS
@pytest.mark.parametrize("name", ["rbx", "rdi", "rcx"])
def test_handler_reading_one_register(options, name, capfd):
    """A handler that reads one register gets the program's value (read alone, by
    PTRACE_PEEKUSER, or from the slot's stack for rcx), also when that value is -1,
    which PEEKUSER cannot tell from an error."""
    binary = fast_build("fast_regs.c")
    k = _probe_k(binary)
    index = {"rbx": 1, "rdi": 5, "rcx": 2}[name]
    seen: List[int] = []

    def handler(hit):
        seen.append(getattr(hit.regs, name))

    for seed in (0x0123456789ABCDEF, k[index] ^ linux.U64):       # the second makes it -1
        status, (probe,) = _run([binary, "modify", hex(seed)], [(f"uprobe:{binary}:regs_site", handler)],
                                **options)
        out = capfd.readouterr().out
        assert status == 0, out
        assert probe.hits == 1 and probe.errors == 0
        assert seen.pop() == seed ^ k[index]
    assert not seen


@MECHANISMS
def test_uprobe_args_are_the_argument_registers(options, capfd):
    """hit.args of a uprobe: the six argument registers as a sequence (index, negative
    index, slice, iteration, len, comparison with a list, IndexError past the end)."""
    binary = fast_build("fast_regs.c")
    k = _probe_k(binary)
    seed = 0x0123456789ABCDEF
    want = [seed ^ k[i] for i in (5, 4, 3, 2, 8, 9)]     # rdi, rsi, rdx, rcx, r8, r9
    seen: list = []

    def handler(hit):
        args = hit.args
        errors = []
        try:
            args[6]
        except IndexError:
            errors.append("6")
        try:
            args[-7]
        except IndexError:
            errors.append("-7")
        seen.append((args[0], args[-1], args[3], args[1:3], len(args), list(args), args == want, errors))

    status, (probe,) = _run([binary, "modify", hex(seed)], [(f"uprobe:{binary}:regs_site", handler)], **options)
    out = capfd.readouterr().out
    assert status == 0, out
    assert probe.errors == 0
    assert seen == [(want[0], want[5], want[3], want[1:3], 6, want, True, ["6", "-7"])]


@MECHANISMS
def test_handler_reading_registers_at_some_hits(options, capfd):
    """Hits whose handler reads registers and hits whose handler reads none, in turn
    (after a handler that read, ptprobe reads the next stop's registers whole at
    once): the values are the program's at every hit, and the program's registers
    come through every one of them unchanged."""
    binary = fast_build("fast_regs.c")
    k = _probe_k(binary)
    seed, passes = 0x0123456789ABCDEF, 60
    problems: List[str] = []
    count = [0]

    def handler(hit):
        n = count[0]
        count[0] += 1
        if n % 3 == 0:
            return                              # reads nothing
        r = hit.regs
        for name, index in (("rdi", 5), ("rbx", 1), ("rcx", 2))[:1 + n % 3]:
            if r[name] != (seed + n) ^ k[index]:
                problems.append(f"hit {n}: {name}={r[name]:#x}, program had {(seed + n) ^ k[index]:#x}")
        if r.rip != hit.address:
            problems.append(f"hit {n}: rip={r.rip:#x}")

    status, (probe,) = _run([binary, "check", hex(seed), str(passes)], [(f"uprobe:{binary}:regs_site", handler)],
                            **options)
    out = capfd.readouterr().out
    assert f"check ok {passes}" in out, out
    assert status == 0
    assert probe.hits == passes and probe.errors == 0
    assert problems == []


@MECHANISMS
@pytest.mark.parametrize("names", [("rbx",), ("rbx", "rax"), ("rbx", "rax", "rcx", "r11")],
                         ids=["rbx", "rbx-rax", "rbx-rax-rcx-r11"])
def test_handler_writes_some_registers(options, names, capfd):
    """The registers a handler writes, one, two or more (written alone by
    PTRACE_POKEUSER, into the slot's stack, or as the whole set), reach the
    program; every other register comes through unchanged (the program checks)."""
    binary = fast_build("fast_regs.c")
    k = _probe_k(binary)
    seed = 0x77
    new = {"rax": 0xAAAA00000000AAAA, "rcx": 0xCCCC0000CCCC0001, "r11": 0x1111000011110011,
           "rbx": 0xBBBB0000BBBB000B}

    def handler(hit):
        for name in names:
            setattr(hit.regs, name, new[name])

    status, (probe,) = _run([binary, "modify", hex(seed)], [(f"uprobe:{binary}:regs_site", handler)], **options)
    out = capfd.readouterr().out
    assert status == 0, out
    assert probe.hits == 1 and probe.errors == 0
    index = {"rax": 0, "rcx": 2, "r11": 11, "rbx": 1}
    want = " ".join(f"{name}={new[name] if name in names else seed ^ k[index[name]]:#x}"
                    for name in ("rax", "rcx", "r11", "rbx"))
    assert want in out, out


@SLOTS
def test_handler_moves_rip(slots, capfd):
    binary = fast_build("fast_regs.c")
    syms = _symbols(binary)
    delta = syms["jump_target"] - syms["jump_site"]

    def handler(hit):
        hit.regs.rip = hit.address + delta

    status, (probe,) = _run([binary, "jump"], [(f"uprobe:{binary}:jump_site", handler)], slots=slots)
    out = capfd.readouterr().out
    assert status == 0
    assert "jump 2" in out, out
    assert mechanisms(probe) == ["jmp"]
    assert probe.hits == 1 and probe.errors == 0

    status, (probe,) = _run([binary, "jump"], [(f"uprobe:{binary}:jump_site", None)], slots=slots)
    out = capfd.readouterr().out
    assert status == 0 and "jump 1" in out, out
    assert probe.hits == 1


# --------------------------------------------------------------------------- the slot syscall


@SLOTS
def test_program_making_the_slot_syscall_gets_eproto(slots, capfd):
    binary = fast_build("fast_nrcall.c")
    nr = arch.SLOT_SYSCALL_NR
    status, (probe,) = _run([binary, str(nr)], [(f"uprobe:{binary}:regs_site", None)], slots=slots)
    out = capfd.readouterr().out
    assert f"libc ret=-1 errno={EPROTO}" in out, out
    assert f"raw ret=-{EPROTO}" in out, out
    assert status == 0, out                   # registers intact, both site passes intact
    assert mechanisms(probe) == ["jmp"]
    assert probe.hits == 2


# --------------------------------------------------------------------------- slot exhaustion


@SLOTS
def test_300_sites_with_one_trampoline_page(slots, capfd):
    binary = fast_build("fast_many.c")
    with ptprobe.run([binary, "3"], slots=slots, max_trampoline_pages=1) as session:
        probes = [session.probe(f"uprobe:{binary}:site_{i}") for i in range(300)]
        status = session.wait()
    out = capfd.readouterr().out
    assert status == 0 and "many 3" in out, out
    mechanisms = [p.sites[0].mechanism for p in probes]
    per_page = arch.SEED_PAGE_SLOTS if slots == "seed" else arch.PAGE_SIZE // arch.RETURN_SLOT_SIZE
    assert per_page == (127 if slots == "seed" else 64)
    assert mechanisms.count("jmp") == per_page
    assert mechanisms.count("int3") == 300 - per_page
    jmp_sites = [p.sites[0] for p in probes if p.sites[0].mechanism == "jmp"]
    assert {s.slot_kind for s in jmp_sites} == {slots}
    assert len({s.slot for s in jmp_sites}) == per_page          # one slot per site
    assert len({s.slot & ~0xFFF for s in jmp_sites}) == 1         # all in the one page
    assert [p.hits for p in probes] == [3] * 300


# --------------------------------------------------------------------------- detach


@SLOTS
def test_attach_detach_50_times_while_two_threads_hammer(slots):
    binary = fast_build("fast_hammer.c")
    spec = f"uprobe:{binary}:regs_site"
    hammer = Hammer(binary, 2, 20000)
    try:
        site_address = _runtime(hammer.pid, binary, "regs_site")
        mechanisms = set()
        for cycle in range(50):
            session = ptprobe.attach(hammer.pid, slots=slots)
            try:
                probe = session.probe(spec)
                mechanisms.update((s.mechanism, s.slot_kind) for s in probe.sites)
                _wait_for_hits(session, probe, at_least=5)
            finally:
                session.detach()
            assert hammer.proc.poll() is None, f"cycle {cycle}: the program died: {hammer.out.lines[-5:]}"
            assert hammer.failures() == [], f"cycle {cycle}"
            assert read_mem(hammer.pid, site_address, 5) == NOP5, f"cycle {cycle}"
            assert proc_status(hammer.pid)["TracerPid"] == "0"
        assert mechanisms == {("jmp", slots)}
        # it runs on untraced: both threads still report progress
        hammer.wait_for_progress(2, "progress after the last detach")
        assert hammer.finish() == 0
        assert hammer.failures() == []
        assert any(line.startswith("done ") for line in hammer.out.lines)
    finally:
        hammer.kill()


SEED_OFFSETS = (0, 5, 6, 8, 9, 14)


def test_seed_detach_inside_slot():
    """Single-step a thread to each instruction boundary of a seed slot, then detach.

    Internals: Session.threads, Session.processes[pid].mem, Site.slot,
    ptprobe.linux.cont/get_regs/set_regs/singlestep/wait_tid.
    """
    binary = fast_build("fast_hammer.c")
    spec = f"uprobe:{binary}:regs_site"
    hammer = Hammer(binary, 0, 1000)            # only the main thread, passing the site on "g"
    try:
        site_address = _runtime(hammer.pid, binary, "regs_site")
        slots_seen = set()
        for n, offset in enumerate(SEED_OFFSETS, start=1):
            session = ptprobe.attach(hammer.pid, slots="seed", in_program=False)   # the seed slot itself
            try:
                probe = session.probe(spec)
                site = probe.sites[0]
                assert (site.mechanism, site.slot_kind) == ("jmp", "seed")
                slots_seen.add(site.slot)
                tid = hammer.pid
                assert tid in session.threads and session.threads[tid].stopped
                # Run the thread into the slot, stopping it there with an int3 of our own in
                # the slot's first byte (single-stepping to the site would step over
                # probe_regs' popfq, after which the kernel takes the trap flag for the
                # program's own).
                mem = session.processes[hammer.pid].mem
                first = mem.read(site.slot, 1)
                mem.write(site.slot, b"\xcc")
                hammer.send(b"g")               # it sits in read(0): let it pass the site
                linux.cont(tid)
                status = linux.wait_tid(tid)
                mem.write(site.slot, first)
                assert os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGTRAP, hex(status)
                regs = linux.get_regs(tid)
                assert regs.rip == site.slot + 1
                regs.rip = site.slot
                linux.set_regs(tid, regs)
                assert linux.get_regs(tid).rip == site.slot
                for boundary in SEED_OFFSETS[1:SEED_OFFSETS.index(offset) + 1]:
                    _step(tid)
                    assert linux.get_regs(tid).rip == site.slot + boundary
                assert linux.get_regs(tid).rip == site.slot + offset
            finally:
                session.detach()
            hammer.out.wait_for(lambda ls, n=n: f"ok {n}" in ls or hammer.failures(), f"ok {n}")
            assert hammer.failures() == [], f"offset {offset}"
            assert hammer.proc.poll() is None, f"offset {offset}: the program died"
            assert read_mem(hammer.pid, site_address, 5) == NOP5
        assert len(slots_seen) == 1
        assert hammer.finish() == 0
        assert hammer.failures() == []
    finally:
        hammer.kill()


def _step(tid: int) -> None:
    linux.singlestep(tid)
    status = linux.wait_tid(tid)
    assert os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGTRAP and status >> 16 == 0, \
        f"unexpected stop {status:#x} while single-stepping"


def test_cli_sigkilled_self_returning_slots_keep_program_alive():
    binary = fast_build("fast_hammer.c")
    hammer = Hammer(binary, 2, 5000)
    cli = None
    try:
        site_address = _runtime(hammer.pid, binary, "regs_site")
        cli = subprocess.Popen([sys.executable, "-m", "ptprobe", "attach", str(hammer.pid), "--slots",
                                "return", "-p", f"uprobe:{binary}:regs_site"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=repo_env(), cwd=str(REPO))
        hits = Lines(cli.stdout)
        hits.wait_for(lambda ls: len(ls) >= 200, "200 hit lines from the CLI")     # one per hit
        assert read_mem(hammer.pid, site_address, 1) == b"\xe9"     # the jmp is in place
        cli.send_signal(signal.SIGKILL)
        assert cli.wait(timeout=LINE_TIMEOUT) == -signal.SIGKILL
        # the tracer is gone and the site still jumps into the slots: the program runs on
        assert read_mem(hammer.pid, site_address, 1) == b"\xe9"
        for task in os.listdir(f"/proc/{hammer.pid}/task"):
            assert proc_status(int(task))["TracerPid"] == "0"
        hammer.wait_for_progress(2, "progress after the tracer died", lines=3)
        assert hammer.proc.poll() is None
        assert hammer.finish() == 0
        assert hammer.failures() == []
    finally:
        if cli is not None and cli.poll() is None:
            cli.kill()
            cli.wait()
        hammer.kill()


# --------------------------------------------------------------------------- re-attach


@SLOTS
def test_reattach_reuses_slot_and_filter(slots):
    binary = fast_build("fast_hammer.c")
    spec = f"uprobe:{binary}:regs_site"
    hammer = Hammer(binary, 0, 1000)
    try:
        assert proc_status(hammer.pid)["Seccomp_filters"] == "0"
        slot_addresses = []
        filters = []
        for n in (1, 2):
            session = ptprobe.attach(hammer.pid, slots=slots)
            try:
                probe = session.probe(spec)
                assert mechanisms(probe) == ["jmp"]
                assert probe.sites[0].slot_kind == slots
                slot_addresses.append(probe.sites[0].slot)
                filters.append(proc_status(hammer.pid)["Seccomp_filters"])
                hammer.send(b"g")
                _wait_for_hits(session, probe, at_least=1)
                assert probe.hits == 1
            finally:
                session.detach()
            hammer.out.wait_for(lambda ls, n=n: f"ok {n}" in ls or hammer.failures(), f"ok {n}")
        assert filters == ["1", "1"]
        assert proc_status(hammer.pid)["Seccomp_filters"] == "1"
        assert slot_addresses[0] == slot_addresses[1]
        assert hammer.finish() == 0
        assert hammer.failures() == []
    finally:
        hammer.kill()


# --------------------------------------------------------------------------- site forms


def _forms_build():
    lib = build("fastlib_sites.c", "-Wl,-soname,libfastsites.so", shared=True, output="libfastsites.so")
    libdir = os.path.dirname(lib)
    exe = build("fast_forms.c", "-DWITH_LIB", "-pg", "-mfentry", "-mnop-mcount", "-fno-pie", "-no-pie",
                f"-L{libdir}", "-lfastsites", f"-Wl,-rpath,{libdir}")
    return exe, lib


@SLOTS
def test_nop_combos_fentry_and_shared_library(slots, capfd):
    exe, lib = _forms_build()
    syms = _symbols(exe)
    fentry = syms["fentry_func"]
    with open(exe, "rb") as fh:
        elf = ELFFile(fh)
        text = elf.get_section_by_name(".text")
        code = text.data()[fentry - text["sh_addr"]:][:9]
    if code[:4] == bytes.fromhex("f30f1efa"):                # endbr64 first (-fcf-protection)
        fentry += 4
        code = code[4:]
    assert code[:5] == NOP5, code.hex()
    expected = {"form_a": syms["form_a"], "form_b": syms["form_b"], "fentry": fentry}
    rips: Dict[str, List[int]] = {name: [] for name in ("form_a", "form_b", "fentry", "lib")}

    def recorder(name):
        def handler(hit):
            rips[name].append(hit.regs.rip)
            if name == "lib":
                expected.setdefault("lib", load_bias(hit.pid, lib) + _symbols(lib)["lib_site"])
        return handler

    n = 7
    status, probes = _run([exe, str(n)], [
        (f"uprobe:{exe}:form_a", recorder("form_a")),
        (f"uprobe:{exe}:form_b", recorder("form_b")),
        (f"uprobe:{exe}:{fentry:#x}", recorder("fentry")),
        (f"uprobe:{lib}:lib_site", recorder("lib")),
    ], slots=slots)
    out = capfd.readouterr().out
    assert status == 0, out
    assert f"forms {n} {11 * n}" in out and f"fentry {n} {100 * n}" in out and f"lib {n} {3 * n}" in out, out
    for probe in probes:
        assert mechanisms(probe) == ["jmp"], probe.name
        site = probe.sites[0]
        assert site.slot_kind == slots
        assert abs(site.slot - site.address) < 1 << 31, f"{probe.name}: slot {site.slot:#x} is not near"
        assert probe.hits == n and probe.errors == 0, probe.name
    for name, seen in rips.items():
        assert seen == [expected[name]] * n, name
    # the library (far above the non-PIE executable) is served by a page of its own near it
    lib_page = probes[3].sites[0].slot & ~0xFFF
    exe_page = probes[0].sites[0].slot & ~0xFFF
    assert abs(expected["lib"] - expected["form_a"]) >= 1 << 31
    assert lib_page != exe_page
    assert arch.page_in_reach(lib_page, [expected["lib"], expected["lib"] + 5])
    assert arch.page_in_reach(exe_page, [expected["form_a"], expected["form_b"] + 11])


# --------------------------------------------------------------------------- without seccomp


def _programs():
    return {
        "redzone": (lambda: (fast_build("fast_redzone.c"), ["300"], "rz_site")),
        "regs": (lambda: (fast_build("fast_regs.c"), ["check", "0x42", "40"], "regs_site")),
        "forms": (lambda: (_forms_build()[0], ["4"], "form_b")),
    }


@pytest.mark.parametrize("program", ["redzone", "regs", "forms"])
def test_no_seccomp_same_results_through_int3(program, capfd):
    binary, args, symbol = _programs()[program]()
    results = {}
    for seccomp in (True, False):
        rips: List[int] = []            # rip seen by the handler, relative to the probe address
        status, (probe,) = _run([binary] + args, [(f"uprobe:{binary}:{symbol}",
                                                   lambda hit: rips.append(hit.regs.rip - hit.address))],
                                seccomp=seccomp)
        out = capfd.readouterr().out
        results[seccomp] = (status, out, probe.hits, rips, mechanisms(probe))
    assert results[True][4] == ["jmp"]
    assert results[False][4] == ["int3"]
    assert results[True][0] == results[False][0] == 0
    assert results[True][1] == results[False][1]
    assert results[True][2] == results[False][2] > 0
    assert results[True][3] == results[False][3] == [0] * results[True][2]


@pytest.mark.parametrize("flags,mechanism", [((), "jmp"), (("--slots", "seed"), "jmp"),
                                             (("--no-seccomp",), "int3"),
                                             (("--max-trampoline-pages", "0"), "int3")])
def test_cli_run_summary(flags, mechanism):
    binary = fast_build("fast_redzone.c")
    spec = f"uprobe:{binary}:rz_site"
    res = subprocess.run([sys.executable, "-m", "ptprobe", "run", "-q", *flags, "-p", spec, "--", binary, "250"],
                         capture_output=True, text=True, env=repo_env(), cwd=str(REPO), timeout=60)
    assert res.returncode == 0, res.stderr
    assert "redzone bad=0" in res.stdout
    assert f"ptprobe: {spec}: 250 hits (1 {mechanism})" in res.stderr, res.stderr


# --------------------------------------------------------------------------- not root

@pytest.fixture(scope="module")
def nobody_dir():
    """A directory nobody can read, holding the target binary."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv")
    top = tempfile.mkdtemp(prefix="ptprobe-nobody-", dir="/tmp")
    try:
        os.chmod(top, 0o755)
        shutil.copy(fast_build("fast_hammer.c"), os.path.join(top, "fast_hammer"))
        os.chmod(os.path.join(top, "fast_hammer"), 0o755)
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_non_root_attach_needs_consent_for_slots(nobody_dir):
    binary = os.path.join(nobody_dir, "fast_hammer")
    python, env = unprivileged_python()
    env["HOME"] = nobody_dir
    env.pop("PYTHONHOME", None)
    hammer = Hammer(binary, 2, 20000, prefix=NOBODY)
    try:
        status = proc_status(hammer.pid)
        assert status["Uid"].split()[0] == "65534" and int(status["CapEff"], 16) == 0
        assert status["NoNewPrivs"] == "0"
        spec = f"uprobe:{binary}:regs_site"

        def cli(*extra: str) -> subprocess.CompletedProcess:
            return subprocess.run(NOBODY + [python, "-m", "ptprobe", "attach", str(hammer.pid), "-q",
                                            "-p", spec, "--duration", "0.5", *extra],
                                  capture_output=True, text=True, env=env, cwd=nobody_dir, timeout=60)

        res = cli()
        assert res.returncode == 0, res.stderr
        assert "--allow-no-new-privs" in res.stderr, res.stderr
        m = re.search(re.escape(f"ptprobe: {spec}: ") + r"(\d+) hits \(1 int3\)", res.stderr)
        assert m and int(m.group(1)) > 0, res.stderr
        assert proc_status(hammer.pid)["NoNewPrivs"] == "0"          # not set without consent
        assert proc_status(hammer.pid)["Seccomp_filters"] == "0"

        res = cli("--allow-no-new-privs")
        assert res.returncode == 0, res.stderr
        m = re.search(re.escape(f"ptprobe: {spec}: ") + r"(\d+) hits \(1 jmp\)", res.stderr)
        assert m and int(m.group(1)) > 0, res.stderr
        assert proc_status(hammer.pid)["NoNewPrivs"] == "1"
        assert proc_status(hammer.pid)["Seccomp_filters"] == "1"

        assert hammer.proc.poll() is None
        assert read_mem(hammer.pid, _runtime(hammer.pid, binary, "regs_site"), 5) == NOP5
        assert hammer.finish() == 0
        assert hammer.failures() == []
    finally:
        hammer.kill()
