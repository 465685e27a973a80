"""End-to-end tests of the engine through the Python API.

Real C targets built with gcc at test time, real processes, real ptrace. The
targets print what they compute, so a traced run is compared with an untraced
one. Synchronisation with running targets goes through pipes and /proc, never
through sleeps.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import threading
import time
from collections import Counter
from typing import Dict, List, Tuple

import capstone
import pytest
from capstone import x86_const

from conftest import NOBODY, build
from helpers import (RecordingObserver, captured_stdout, code_in_memory, decode, file_bytes, mechanisms,
                     read_mem, reaped_pid, run_traced, runtime_address, symbol, unprivileged, untraced,
                     watchdog, write_mem)

import ptprobe
from ptprobe import errors


# ---------------------------------------------------------------------------- ELF helpers

def is_rip_relative(insn: capstone.CsInsn) -> bool:
    return any(op.type == x86_const.X86_OP_MEM and op.mem.base == x86_const.X86_REG_RIP
               for op in insn.operands)


def mapping_of(pid: int, address: int) -> str:
    """The pathname of the mapping that holds *address* in *pid* ('' if anonymous)."""
    with open(f"/proc/{pid}/maps") as fh:
        for line in fh:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return fields[5].strip() if len(fields) > 5 else ""
    raise LookupError(f"{address:#x} is not mapped in {pid}")


def program_lines(text: str) -> List[str]:
    """Program output without the line that shows its pid."""
    return [line for line in text.splitlines() if not line.startswith("pid ")]


# ---------------------------------------------------------------------------- threads

ITERATIONS = 1000


def first_body_instruction(path: str, name: str) -> capstone.CsInsn:
    """The first instruction after the entry that is a real computation (not a NOP),
    before any branch: it runs exactly once per call."""
    for insn in decode(path, name)[1:]:
        if insn.group(capstone.CS_GRP_JUMP) or insn.group(capstone.CS_GRP_RET) \
                or insn.group(capstone.CS_GRP_CALL):
            break
        if insn.mnemonic in ("mov", "movabs", "imul", "add", "lea", "xor", "shl", "sub"):
            return insn
    raise AssertionError(f"no suitable instruction in {name}")


@pytest.mark.parametrize("where", ["offset", "nop5"])
def test_threads_each_hit_exactly(where):
    path = build("core_threads.c", "-O1", "-pthread")
    expected = untraced([path, str(ITERATIONS)])
    assert expected.returncode == 0
    compute, _ = symbol(path, "compute")
    if where == "offset":
        insn = first_body_instruction(path, "compute")
        assert insn.mnemonic != "nop"
        spec = f"uprobe:{path}:compute+{insn.address - compute}"
        mechanism = "int3"
    else:
        spec = f"uprobe:{path}:compute_nop5"
        mechanism = "jmp"
    per_tid: Counter = Counter()

    def handler(hit):
        per_tid[hit.tid] += 1

    status, out, (probe,), _ = run_traced([path, str(ITERATIONS)], [(spec, handler)])
    assert status == 0
    assert out == expected.stdout
    assert len(per_tid) == 4, per_tid
    assert sorted(per_tid.values()) == [ITERATIONS] * 4
    assert probe.hits == 4 * ITERATIONS
    assert mechanisms(probe) == [mechanism]


TWO_CPUS = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")


@TWO_CPUS
@pytest.mark.parametrize("colocate", [True, "single", "all", False],
                         ids=["colocate", "colocate-single", "colocate-all", "no-colocate"])
@pytest.mark.parametrize("program", ["single-threaded", "multi-threaded"])
def test_placement(program, colocate):
    """A single-threaded program and ptprobe share one CPU while ptprobe waits, by
    default and with "single"; with "single" a program that starts threads keeps
    its own affinity, threads too (by default, see the next test, threads that hit
    often are pinned with ptprobe, and only they); "all" pins every thread with
    ptprobe; False pins nothing. The tracer gets its own affinity back afterwards."""
    if program == "single-threaded":
        path = build("core_simple.c", "-O1")
        argv, spec, hits = [path], f"uprobe:{path}:compute", 11
    else:
        path = build("core_threads.c", "-O1", "-pthread")
        argv, spec, hits = [path, "50"], f"uprobe:{path}:compute_nop5", 4 * 50
    own = frozenset(os.sched_getaffinity(0))
    seen = set()

    def handler(hit):
        seen.add((frozenset(os.sched_getaffinity(0)), frozenset(os.sched_getaffinity(hit.tid))))

    status, _, (probe,), _ = run_traced(argv, [(spec, handler)], colocate=colocate)
    assert status == 0 and probe.hits == hits
    if colocate == "all" or (colocate and program == "single-threaded"):
        ((tracer, tracee),) = seen
        assert tracer == tracee and len(tracer) == 1 and tracer <= own
    elif colocate is True:
        # whether these 200 hits were enough to be pinned depends on the machine's speed:
        # a thread runs on ptprobe's CPU or where it was allowed to
        for tracer, tracee in seen:
            assert tracee in (own, tracer) and tracer <= own
    else:
        assert seen == {(own, own)}
    assert frozenset(os.sched_getaffinity(0)) == own


def _task_affinities(pid: int) -> Dict[int, frozenset]:
    masks = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            masks[int(task)] = frozenset(os.sched_getaffinity(int(task)))
        except OSError:
            continue        # gone meanwhile
    return masks


@TWO_CPUS
def test_placement_hitting_pins_the_threads_that_hit():
    """The default placement pins the threads that hit probes often to one CPU, with
    ptprobe; the threads that do not hit (busy ones and the main thread) keep their
    own affinity; threads that stop hitting get theirs back, and so does ptprobe;
    nothing stays pinned after the run. Affinities are sampled from another thread
    while ptprobe waits."""
    path = build("place_hitters.c", "-O1", "-pthread")
    own = frozenset(os.sched_getaffinity(0))
    tracer_tid = threading.get_native_id()
    hitters: set = set()
    last_hit = [0.0, 0.0]           # first and last hit (time.monotonic)
    samples: List[Tuple[float, frozenset, Dict[int, frozenset]]] = []
    done = threading.Event()

    def handler(hit):
        hitters.add(hit.tid)
        last_hit[1] = time.monotonic()
        last_hit[0] = last_hit[0] or last_hit[1]

    def sample(pid: int) -> None:
        while not done.wait(0.02):
            try:
                samples.append((time.monotonic(), frozenset(os.sched_getaffinity(tracer_tid)),
                                _task_affinities(pid)))
            except OSError:
                return      # the program is gone

    sampler: List[threading.Thread] = []

    def start(session):
        sampler.append(threading.Thread(target=sample, args=(session.main_pid,)))
        sampler[0].start()

    try:
        # two threads hit for 1.5 s then spin 1.5 s more; three others spin for 3 s
        status, out, (probe,), _ = run_traced([path, "2", "3", "1500", "1500"],
                                              [(f"uprobe:{path}:hit_nop5", handler)], on_armed=start)
    finally:
        done.set()
        for thread in sampler:
            thread.join()
    assert status == 0
    assert f"hits {probe.hits}" in out.splitlines()
    assert len(hitters) == 2
    first, last = last_hit
    assert last - first > 1.0
    # while they hit: both pinned, to ptprobe's one CPU
    hitting = [(tracer, masks) for at, tracer, masks in samples if first + 0.3 < at < last]
    assert any(len(tracer) == 1 and all(masks.get(tid) == tracer for tid in hitters) for tracer, masks in hitting)
    # the others never (once their creation has been seen), the hitters only there
    settled = [(tracer, masks) for at, tracer, masks in samples if at > first + 0.3]
    assert len(settled) > 20
    for tracer, masks in settled:
        assert all(mask == own for tid, mask in masks.items() if tid not in hitters), masks
        assert all(masks[tid] in (own, tracer) for tid in hitters if tid in masks)
    # 0.3 s after the last hit: everything is back
    quiet = [(tracer, masks) for at, tracer, masks in samples if at > last + 0.3]
    assert quiet
    for tracer, masks in quiet:
        assert tracer == own and all(mask == own for mask in masks.values()), (tracer, masks)
    assert frozenset(os.sched_getaffinity(0)) == own


@TWO_CPUS
def test_placement_hitting_across_waits_and_detach():
    """Threads found hitting during one wait() are pinned from the start of the next;
    between waits, and after the detach, every thread and ptprobe have their own
    affinity."""
    path = build("place_hitters.c", "-O1", "-pthread")
    own = frozenset(os.sched_getaffinity(0))
    seen: List[Tuple[int, frozenset, frozenset]] = []      # (wait, tracer, hitting thread)
    rounds = [0]

    def handler(hit):
        seen.append((rounds[0], frozenset(os.sched_getaffinity(0)), frozenset(os.sched_getaffinity(hit.tid))))

    pids: List[int] = []
    with captured_stdout(), watchdog(60, pids), ptprobe.run([path, "1", "1", "5000", "0"]) as session:
        pids.append(session.main_pid)
        session.probe(f"uprobe:{path}:hit_nop5", handler)
        for rounds[0] in range(3):
            assert session.wait(timeout=0.4) is None
            assert frozenset(os.sched_getaffinity(0)) == own
            assert set(_task_affinities(session.main_pid).values()) == {own}
        session.detach()
        assert set(_task_affinities(session.main_pid).values()) == {own}
        os.kill(session.main_pid, signal.SIGKILL)
    assert frozenset(os.sched_getaffinity(0)) == own
    pinned = [(tracer, tracee) for _, tracer, tracee in seen if len(tracer) == 1]
    assert pinned and all(tracee == tracer for tracer, tracee in pinned)
    # the second and third waits start with the hitting thread pinned: their first hit shows it
    for wait in (1, 2):
        first = next(entry for entry in seen if entry[0] == wait)
        assert len(first[1]) == 1 and first[2] == first[1], first


@TWO_CPUS
@pytest.mark.parametrize("colocate", [True, "all"], ids=["colocate", "colocate-all"])
def test_placement_undone_on_detach(loop_target, colocate):
    target = loop_target
    own = frozenset(os.sched_getaffinity(target.pid))
    assert len(own) > 1
    pinned = []
    waiting = [True]
    with watchdog(60, [target.pid]), ptprobe.attach(target.pid, colocate=colocate) as session:
        session.probe(f"uprobe:{target.path}:work",
                      lambda hit: waiting[0] and pinned.append(frozenset(os.sched_getaffinity(target.pid))))
        assert session.wait(timeout=0.3) is None
        waiting[0] = False          # a hit handled while detaching comes after the pinning ended
        session.detach()
    assert pinned and all(len(mask) == 1 for mask in pinned)
    assert frozenset(os.sched_getaffinity(target.pid)) == own
    target.assert_alive_untraced_and_original()


@TWO_CPUS
@pytest.mark.parametrize("follow", [True, False], ids=["follow", "no-follow"])
def test_placement_all_and_children(follow):
    """colocate="all": the program runs on ptprobe's CPU, and so does a child that stays
    traced; a child let go (--no-follow) gets its own affinity back first."""
    path = build("life_affinity.c", "-O1")
    own = len(os.sched_getaffinity(0))
    status, out, _, _ = run_traced([path], [], colocate="all", follow=follow)
    assert status == 0
    assert out.splitlines() == ["parent cpus=1", f"child cpus={1 if follow else own}"]


@TWO_CPUS
def test_placement_thread_created_while_pinned_seen_after(tmp_path):
    """colocate="all": a thread created while the program is pinned, whose creation
    ptprobe handles only after wait() has given the affinities back (here: while
    detaching), gets its own affinity too."""
    path = build("life_late_clone.c", "-O1", "-pthread")
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    proc = subprocess.Popen([path, str(fifo)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        ready = proc.stdout.readline().split()
        assert ready[0] == "ready"
        pid = int(ready[1])
        own = os.sched_getaffinity(pid)
        with watchdog(60, [pid]), ptprobe.attach(pid, colocate="all") as session:

            def tick(hit):
                if session.probes[0].hits == 1:
                    with open(fifo, "wb") as go:        # the spawner creates a thread now,
                        go.write(b"x")
                    while len(os.listdir(f"/proc/{pid}/task")) < 3:
                        pass                            # (its creation waits in ptrace's queue)
                    session.request_stop()              # and wait() returns before seeing it

            session.probe(f"uprobe:{path}:tick", tick)
            assert session.wait() is None
            session.detach()
        tasks = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
        assert len(tasks) == 3
        assert {t: os.sched_getaffinity(t) for t in tasks} == {t: own for t in tasks}
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------- attach / detach

def test_a_stop_requested_before_wait_is_kept(loop_target):
    """request_stop() before wait() (a signal between arming and waiting): that
    wait() returns at once with the program running, and only that one."""
    target = loop_target
    with watchdog(60, [target.pid]), ptprobe.attach(target.pid, observer=RecordingObserver()) as session:
        probe = session.probe(f"uprobe:{target.path}:work")
        session.request_stop()
        assert session.wait() is None
        assert session.attached and probe.hits == 0
        assert session.wait(timeout=0.3) is None       # the request was used up: this one runs
        assert probe.hits > 0
        session.detach()


@pytest.mark.parametrize("name, mechanism", [("work", "int3"), ("work_nop5", "jmp")])
def test_attach_probe_detach(loop_target, name, mechanism):
    target = loop_target
    seen = []
    with watchdog(60, [target.pid]), ptprobe.attach(target.pid, observer=RecordingObserver()) as session:
        probe = session.probe(f"uprobe:{target.path}:{name}", lambda hit: seen.append(hit.args[0]))
        assert mechanisms(probe) == [mechanism]
        # the site is armed in memory while attached
        memory, original = code_in_memory(target.pid, target.path, "work")
        assert memory != original
        assert session.wait(timeout=0.5) is None
        session.detach()
    assert probe.hits > 0
    assert len(seen) == probe.hits
    # work(i) is called with i = 1, 2, 3, ...: consecutive while probed
    assert seen == list(range(seen[0], seen[0] + len(seen)))
    target.assert_alive_untraced_and_original(("work", "spare"))


def test_attach_twice(loop_target):
    """A second attach after a detach works and finds the process as the first left it."""
    target = loop_target
    for _ in range(2):
        with watchdog(60, [target.pid]), ptprobe.attach(target.pid, observer=RecordingObserver()) as session:
            probe = session.probe(f"uprobe:{target.path}:work_nop5")
            assert session.wait(timeout=0.3) is None
            session.detach()
        assert probe.hits > 0
        target.assert_alive_untraced_and_original(("work",))


# ---------------------------------------------------------------------------- executables, libraries

@pytest.mark.parametrize("flags", [("-fpie", "-pie"), ("-fno-pie", "-no-pie")], ids=["pie", "no-pie"])
def test_pie_and_non_pie(flags):
    path = build("core_simple.c", "-O1", *flags)
    expected = untraced([path])
    link_address, _ = symbol(path, "compute")
    addresses = set()
    args = []

    def handler(hit):
        addresses.add((hit.address, runtime_address(hit.pid, path, link_address)))
        args.append(hit.args[0])

    status, out, (probe,), _ = run_traced([path], [(f"uprobe:{path}:compute", handler)])
    assert status == 0
    assert program_lines(out) == program_lines(expected.stdout)
    assert probe.hits == 11
    assert args == list(range(10)) + [5]
    ((seen, actual),) = addresses
    assert seen == actual
    if "-no-pie" in flags:
        assert seen == link_address


def test_probe_by_file_address():
    path = build("core_sites.c", "-O0", "-fno-omit-frame-pointer")
    insn = next(i for i in decode(path, "read_global") if is_rip_relative(i))
    expected = untraced([path])
    status, out, (probe,), _ = run_traced([path], [(f"uprobe:{path}:{insn.address:#x}", None)])
    assert status == 0
    assert out == expected.stdout
    assert probe.hits == 5


def build_libuser() -> Tuple[str, str]:
    lib = build("core_lib.c", output="libcorelib.so", shared=True)
    libdir = os.path.dirname(lib)
    exe = build("core_libuser.c", f"-L{libdir}", "-lcorelib", f"-Wl,-rpath,{libdir}")
    return exe, lib


@pytest.mark.parametrize("spec, soname, calls", [
    ("uprobe:libcorelib.so:lib_compute", "libcorelib.so", 6),
    ("uprobe:libc.so.6:getpid", "libc.so.6", 3),
])
def test_library_probe_by_mapped_name(spec, soname, calls):
    exe, _ = build_libuser()
    expected = untraced([exe])
    where = []

    def handler(hit):
        where.append(mapping_of(hit.pid, hit.address))

    status, out, (probe,), _ = run_traced([exe], [(spec, handler)])
    assert status == 0
    assert out == expected.stdout
    if soname == "libcorelib.so":
        assert probe.hits == calls
    else:
        assert probe.hits >= calls
    assert where and all(os.path.basename(p) == soname for p in where), where


def test_library_probe_by_path():
    exe, lib = build_libuser()
    expected = untraced([exe])
    status, out, (probe,), _ = run_traced([exe], [(f"uprobe:{lib}:lib_compute", None)])
    assert status == 0
    assert out == expected.stdout
    assert probe.hits == 6


# ---------------------------------------------------------------------------- exit status

@pytest.mark.parametrize("mode, status", [("", 0), ("exit7", 7), ("segv", -signal.SIGSEGV),
                                          ("abort", -signal.SIGABRT)])
def test_exit_status(mode, status):
    path = build("core_simple.c", "-O1")
    argv = [path, mode] if mode else [path]
    assert untraced(argv).returncode == status
    got, out, (probe,), _ = run_traced(argv, [(f"uprobe:{path}:compute", None)])
    assert got == status
    assert probe.hits == 11
    assert "total 298" in out


def test_wait_timeout_in_run_mode():
    """wait(timeout) returns None while the program runs; a later wait() gets the status."""
    path = build("core_loop.c", "-O1")
    pids: List[int] = []
    with captured_stdout():
        with watchdog(60, pids):
            with ptprobe.run([path], observer=RecordingObserver()) as session:
                pids.append(session.main_pid)
                probe = session.probe(f"uprobe:{path}:work")
                assert session.wait(timeout=0.3) is None
                assert probe.hits > 0
                os.kill(session.main_pid, signal.SIGTERM)
                assert session.wait() == -signal.SIGTERM


# ---------------------------------------------------------------------------- kinds of sites

SITES_FLAGS = ("-O0", "-fno-omit-frame-pointer")


def site_offset(path: str, kind: str) -> Tuple[str, int, str]:
    """(function, offset, mnemonic) of the instruction of *kind* in core_sites."""
    if kind == "push":
        insns = decode(path, "add")
        assert (insns[0].mnemonic, insns[0].op_str) == ("push", "rbp")
        return "add", 0, "push"
    if kind == "ret":
        insns = decode(path, "with_ret")
        ret = [i for i in insns if i.mnemonic == "ret"][-1]
        return "with_ret", ret.address - insns[0].address, "ret"
    if kind == "rip-load":
        insns = decode(path, "read_global")
        insn = next(i for i in insns if is_rip_relative(i))
        assert insn.operands[1].type == x86_const.X86_OP_MEM
        return "read_global", insn.address - insns[0].address, insn.mnemonic
    if kind == "rip-store":
        insns = decode(path, "bump")
        insn = [i for i in insns if is_rip_relative(i)][-1]
        assert insn.operands[0].type == x86_const.X86_OP_MEM
        return "bump", insn.address - insns[0].address, insn.mnemonic
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["push", "ret", "rip-load", "rip-store", "nop"])
@pytest.mark.parametrize("seccomp", [True, False], ids=["seccomp", "no-seccomp"])
def test_site_kinds(kind, seccomp):
    path = build("core_sites.c", *SITES_FLAGS)
    expected = untraced([path])
    if kind == "nop":
        address, _ = symbol(path, "nop_site")
        assert file_bytes(path, address, 1) == b"\x90"
        spec = f"uprobe:{path}:nop_site"
    else:
        function, offset, _ = site_offset(path, kind)
        address = symbol(path, function)[0] + offset
        spec = f"uprobe:{path}:{function}+{offset}" if offset else f"uprobe:{path}:{function}"
    rips = set()

    def handler(hit):
        rips.add((hit.address, hit.regs.rip, runtime_address(hit.pid, path, address)))

    status, out, (probe,), _ = run_traced([path], [(spec, handler)], seccomp=seccomp)
    assert status == 0
    assert out == expected.stdout
    assert probe.hits == 5
    assert mechanisms(probe) == ["int3"]
    ((hit_address, rip, actual),) = rips
    assert hit_address == rip == actual


def test_all_site_kinds_at_once():
    path = build("core_sites.c", *SITES_FLAGS)
    expected = untraced([path])
    specs = [f"uprobe:{path}:nop_site"]
    for kind in ("push", "ret", "rip-load", "rip-store"):
        function, offset, _ = site_offset(path, kind)
        specs.append(f"uprobe:{path}:{function}+{offset}")
    status, out, probes, _ = run_traced([path], [(s, None) for s in specs])
    assert status == 0
    assert out == expected.stdout
    assert [p.hits for p in probes] == [5] * len(specs)


# ---------------------------------------------------------------------------- registers

GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
        "r14", "r15")
REG_VALUES = {name: (k + 1) * 0x1111111111111111 for k, name in enumerate(GPRS)}
REDZONE = b"".join(struct.pack("<Q", 0x5245445A4F4E4500 + i) for i in range(16))
ROUNDS = 4


def register_checker(path: str, site: str) -> Tuple[object, List[str]]:
    """A handler that checks what it sees at a core_regs site; problems go to the list."""
    problems: List[str] = []
    count = [0]
    link_address, _ = symbol(path, site)

    def handler(hit):
        mode = count[0] & 1
        count[0] += 1
        regs = hit.regs
        for name, want in REG_VALUES.items():
            got = getattr(regs, name)
            if got != want:
                problems.append(f"hit {count[0]}: {name} = {got:#x}, want {want:#x}")
        if regs.rip != hit.address or hit.address != runtime_address(hit.pid, path, link_address):
            problems.append(f"rip {regs.rip:#x}, address {hit.address:#x}")
        want_flags = 0x44 if mode else 0x85
        if regs.eflags & 0x8C5 != want_flags or regs.rflags != regs.eflags:
            problems.append(f"hit {count[0]}: eflags {regs.eflags:#x}, want {want_flags:#x} in 0x8c5")
        if regs.eflags & 0x500:
            problems.append(f"hit {count[0]}: TF or DF set in {regs.eflags:#x}")
        if list(hit.args) != [REG_VALUES[r] for r in ("rdi", "rsi", "rdx", "rcx", "r8", "r9")]:
            problems.append(f"args {[hex(a) for a in hit.args]}")
        zone = hit.read(regs.rsp - 128, 128)
        if zone != REDZONE:
            problems.append(f"red zone below rsp {regs.rsp:#x}: {zone.hex()}")

    return handler, problems


@pytest.mark.parametrize("site, options, mechanism", [
    ("regs_site_mov", {}, "int3"),
    ("regs_site_nop", {}, "int3"),
    ("regs_site_nop5", {}, "jmp"),
    ("regs_site_nop5", {"slots": "seed"}, "jmp"),
    ("regs_site_nop5", {"seccomp": False}, "int3"),
    ("regs_site_pair", {}, None),
    ("regs_site_pair", {"slots": "seed"}, None),
], ids=["mov-int3", "nop1-int3", "nop5-return-slot", "nop5-seed-slot", "nop5-int3",
        "nop1+nop5-return", "nop1+nop5-seed"])
def test_registers_and_flags_preserved(site, options, mechanism):
    path = build("core_regs.c", "-O1")
    expected = untraced([path, str(ROUNDS)])
    assert expected.returncode == 0, expected.stdout
    handler, problems = register_checker(path, site)
    status, out, (probe,), _ = run_traced([path, str(ROUNDS)], [(f"uprobe:{path}:{site}", handler)],
                                          **options)
    assert out == expected.stdout
    assert status == 0
    assert probe.hits == ROUNDS
    assert not problems, problems
    if mechanism is not None:
        assert mechanisms(probe) == [mechanism]


ALL_REG_SITES = ("regs_site_nop", "regs_site_mov", "regs_site_nop5", "regs_site_pair", "regs_site_pair5")


@pytest.mark.parametrize("seccomp", [True, False], ids=["seccomp", "no-seccomp"])
@pytest.mark.parametrize("sites", [ALL_REG_SITES[:3], ALL_REG_SITES[3:], ALL_REG_SITES[4:2:-1],
                                   ALL_REG_SITES],
                         ids=["nop-mov-nop5", "nop1+nop5-pair-both", "nop5+nop1-pair-both", "all"])
def test_registers_adjacent_sites(sites, seccomp):
    """Adjacent probed instructions (emulated, out of line, slot), each hit on every pass;
    including a 1-byte NOP and the 5-byte NOP right after it probed separately."""
    path = build("core_regs.c", "-O1")
    expected = untraced([path, str(ROUNDS)])
    checks = [register_checker(path, s) for s in sites]
    status, out, probes, _ = run_traced(
        [path, str(ROUNDS)], [(f"uprobe:{path}:{s}", h) for s, (h, _) in zip(sites, checks)],
        seccomp=seccomp)
    assert out == expected.stdout
    assert status == 0
    assert {s: p.hits for s, p in zip(sites, probes)} == {s: ROUNDS for s in sites}
    assert {s: pr for s, (_, pr) in zip(sites, checks)} == {s: [] for s in sites}


@pytest.mark.parametrize("site", ["compute", "compute_nop5"])
def test_two_probes_on_one_site(site):
    """Two probes on the same instruction (by symbol and by file address): both run, both count."""
    path = build("core_threads.c", "-O1", "-pthread")
    expected = untraced([path, "50"])
    address, _ = symbol(path, site)
    seen: Dict[str, int] = Counter()
    specs = [f"uprobe:{path}:{site}", f"uprobe:{path}:{address:#x}"]

    def handler(hit):
        seen[hit.probe.name] += 1

    status, out, probes, _ = run_traced([path, "50"], [(s, handler) for s in specs])
    assert status == 0
    assert out == expected.stdout
    assert [p.hits for p in probes] == [200, 200]
    assert seen == {specs[0]: 200, specs[1]: 200}


# ---------------------------------------------------------------------------- handlers that change things

@pytest.mark.parametrize("seccomp", [True, False], ids=["jmp", "int3"])
def test_handler_set_after_arming(seccomp):
    """A probe armed without a handler (counting only) and given one before the hits:
    every hit calls it; taken away again, the hits are counted only."""
    path = build("core_threads.c", "-O1", "-pthread")
    seen = []
    with captured_stdout(), watchdog(60, []), ptprobe.run([path, "50"], seccomp=seccomp) as session:
        probe = session.probe(f"uprobe:{path}:compute_nop5")
        assert mechanisms(probe) == ["jmp" if seccomp else "int3"]

        def handler(hit):
            seen.append(hit.tid)
            if len(seen) == 100:
                probe.handler = None

        probe.handler = handler
        assert session.wait() == 0
    assert probe.hits == 200 and len(seen) == 100


def test_handler_writes_argument_register():
    path = build("core_simple.c", "-O1")
    after = []

    def handler(hit):
        if hit.args[0] == 5:
            hit.regs.rdi = 7
            after.append(hit.regs.rdi)

    status, out, (probe,), _ = run_traced([path], [(f"uprobe:{path}:compute", handler)])
    assert status == 0
    assert "compute(5) = 50" in out.splitlines()
    # compute(5) inside the sum of compute(0..9) became compute(7) too: 298 - 26 + 50
    assert "total 322" in out.splitlines()
    assert after == [7, 7]


def test_handler_writes_memory():
    path = build("core_simple.c", "-O1")
    before = []

    def handler(hit):
        address = hit.args[0]
        before.append(hit.read(address, 4))
        hit.write(address, struct.pack("<i", 1234))

    status, out, (probe,), _ = run_traced([path], [(f"uprobe:{path}:touch", handler)])
    assert status == 0
    assert "secret 1234" in out.splitlines()
    assert before == [struct.pack("<i", 1)]


@pytest.mark.parametrize("options", [{}, {"slots": "seed"}, {"seccomp": False}],
                         ids=["return-slot", "seed-slot", "int3"])
def test_handler_writes_registers_at_nop5(options):
    """rax (kept on the slot's stack) and r12 (a plain register) written by the handler
    reach the program, which reports them as mismatches."""
    path = build("core_regs.c", "-O1")

    def handler(hit):
        hit.regs.rax = 0x0123456789ABCDEF
        hit.regs.r12 = 0x42

    status, out, (probe,), _ = run_traced([path, "2"], [(f"uprobe:{path}:regs_site_nop5", handler)],
                                          **options)
    assert status == 1
    lines = out.splitlines()
    for r in range(2):
        assert f"round {r}: rax = 0123456789abcdef, want 1111111111111111" in lines
        assert f"round {r}: r12 = 0000000000000042, want cccccccccccccccc" in lines
    # nothing else changed
    assert len(lines) == 5, lines


def test_handler_moves_rip():
    """Writing rip resumes elsewhere: skipping touch()'s body by resuming at its ret."""
    path = build("core_simple.c", "-O1")
    insns = decode(path, "touch")
    ret = [i for i in insns if i.mnemonic == "ret"][-1]
    base, _ = symbol(path, "touch")

    def handler(hit):
        hit.regs.rip = hit.address + (ret.address - base)

    status, out, (probe,), _ = run_traced([path], [(f"uprobe:{path}:touch", handler)])
    assert status == 0
    assert probe.hits == 1
    assert "secret 1" in out.splitlines()


# ---------------------------------------------------------------------------- the program's own SIGTRAP

@pytest.mark.parametrize("how", ["raise", "int3"])
def test_program_sigtrap_reaches_its_handler(how):
    path = build("core_trap.c", "-O1")
    expected = untraced([path, how])
    assert expected.returncode == 0 and "trap handled" in expected.stdout
    status, out, (probe,), _ = run_traced([path, how], [(f"uprobe:{path}:compute", None)])
    assert "trap handled" in out.splitlines()
    assert out == expected.stdout
    assert status == 0
    assert probe.hits == 2


# ---------------------------------------------------------------------------- errors (Python API)

def test_api_no_such_process():
    with pytest.raises(errors.NoSuchProcessError) as info:
        ptprobe.attach(reaped_pid())
    assert info.value.exit_code == 3


def test_api_program_start_error(tmp_path):
    with pytest.raises(errors.ProgramStartError) as info:
        ptprobe.run([str(tmp_path / "no-such-program")])
    assert info.value.exit_code == 9


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to set up a process it may not trace")
def test_api_permission_denied(loop_binary):
    python, env, target = unprivileged(loop_binary)
    try:
        script = ("import sys, ptprobe\n"
                  "try:\n"
                  "    ptprobe.attach(int(sys.argv[1]))\n"
                  "except ptprobe.PtprobeError as exc:\n"
                  "    print(type(exc).__name__, exc.exit_code)\n")
        result = subprocess.run([*NOBODY, python, "-c", script, str(target.pid)],
                                capture_output=True, text=True, env=env, cwd="/", timeout=60)
        assert result.stdout.strip() == "TracePermissionError 4", (result.stdout, result.stderr)
        target.assert_alive_untraced_and_original(("work",))
    finally:
        target.kill()


@pytest.fixture
def text_file(tmp_path) -> str:
    path = tmp_path / "notes.txt"
    path.write_text("this is not an ELF file\n")
    return str(path)


def bad_specs(path: str, function: str, text_file: str) -> List[Tuple[str, str, type]]:
    """(id, spec, exception class) for every kind of bad probe; *function* in *path*
    starts with an instruction longer than one byte."""
    first = decode(path, function)[0]
    assert first.size > 1
    return [
        ("bad-spec-kind", "kprobe:do_sys_open", errors.ProbeSpecError),
        ("bad-spec-empty", "uprobe:", errors.ProbeSpecError),
        ("bad-spec-offset", f"uprobe:{path}:{function}+zz", errors.ProbeSpecError),
        ("not-elf", f"uprobe:{text_file}:main", errors.ObjectFileError),
        ("missing-file", f"uprobe:{path}.missing:main", errors.ObjectFileError),
        ("missing-symbol", f"uprobe:{path}:no_such_function", errors.SymbolNotFoundError),
        ("lib-missing-symbol", "uprobe:libc.so.6:no_such_function_in_libc", errors.SymbolNotFoundError),
        ("boundary", f"uprobe:{path}:{function}+1", errors.InstructionBoundaryError),
    ]


BAD_IDS = ["bad-spec-kind", "bad-spec-empty", "bad-spec-offset", "not-elf", "missing-file",
           "missing-symbol", "lib-missing-symbol", "boundary"]


@pytest.mark.parametrize("case", BAD_IDS)
def test_api_bad_probe_in_attach_mode(loop_target, text_file, case):
    target = loop_target
    spec, exc_class = {c[0]: c[1:] for c in bad_specs(target.path, "work", text_file)}[case]
    with watchdog(60, [target.pid]), ptprobe.attach(target.pid, observer=RecordingObserver()) as session:
        with pytest.raises(exc_class) as info:
            session.probe(spec)
        assert info.value.exit_code == {errors.ProbeSpecError: 2, errors.ObjectFileError: 5,
                                        errors.SymbolNotFoundError: 6,
                                        errors.InstructionBoundaryError: 7}[exc_class]
        # the session is still usable after the error
        good = session.probe(f"uprobe:{target.path}:work")
        assert session.wait(timeout=0.2) is None
    assert good.hits > 0
    target.assert_alive_untraced_and_original(("work", "spare"))


def test_api_site_already_patched(loop_target):
    target = loop_target
    address, _ = symbol(target.path, "spare")
    runtime = runtime_address(target.pid, target.path, address)
    original = read_mem(target.pid, runtime, 1)
    assert original != b"\xcc"
    write_mem(target.pid, runtime, b"\xcc")
    patched_code, _ = code_in_memory(target.pid, target.path, "spare")
    with watchdog(60, [target.pid]), ptprobe.attach(target.pid, observer=RecordingObserver()) as session:
        with pytest.raises(errors.SitePatchedError) as info:
            session.probe(f"uprobe:{target.path}:spare")
        assert info.value.exit_code == 8
    # ptprobe neither "repaired" nor otherwise touched the foreign patch
    target.assert_alive_untraced_and_original(("work", "spare"), patched={"spare": patched_code})


def test_api_bad_probe_in_run_mode(text_file):
    path = build("core_simple.c", "-O1")
    for case, spec, exc_class in bad_specs(path, "compute", text_file):
        with captured_stdout() as out:
            with ptprobe.run([path], observer=RecordingObserver()) as session:
                with pytest.raises(exc_class):
                    session.probe(spec)
                status = session.wait()
        assert status == 0, case
        assert "total 298" in out.text, case
