"""Process lifetime under tracing (docs/design.md: "Working inside the tracee", "Lifetime"), end to end.

fork (prefork servers, with and without following), children that share the
parent's memory (system(), posix_spawn(), vfork()), threads that come and go while
ptprobe attaches, exec (by path, from a non-leader thread, into a copy of the binary),
libraries loaded with dlopen after the probes were given, signals (group stop,
real-time signals with values, a SIGSEGV the program handles, death by a signal),
handlers that raise, and every way of detaching (SIGINT, SIGTERM, SIGHUP,
--duration, hundreds of attach/detach cycles) or of losing the tracer (SIGKILL).

Targets: tests/c/life_*.c (sites in life_sites.c, linked into each) and
tests/c/lifelib_plug.c. The targets check their own results (sums, registers,
signal values, semaphores) and report them on stdout, so a broken engine shows up
as a failing program. Synchronisation goes through pipes, stdin commands and /proc,
never through sleeps; timeouts only guard against hangs.

Engine internals used: none (``Probe.sites``/``Site.address``/``Site.mechanism`` are
public).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
from collections import Counter
from typing import Dict, Iterator, List, Sequence, Tuple

import pytest

from conftest import build
from helpers import (GUARD, NOP5, REPO, Hammer, Lines, RecordingObserver, Target, captured_stdout,
                     code_in_memory, fast_build, file_bytes, load_bias, proc_status, ptprobe_cli, read_mem,
                     recorder, repo_env, run_traced, summaries, symbol, untraced, watchdog)

import ptprobe

MODES = pytest.mark.parametrize("mode", ["return", "seed", "int3"])
SITES = ("life_sites.c",)


# --------------------------------------------------------------------------- helpers

def options(mode: str) -> Dict[str, object]:
    """ptprobe.run/attach options for a mode: a slot kind, or int3 only (no seccomp)."""
    return {"seccomp": False} if mode == "int3" else {"slots": mode}


def nop5_mechanism(mode: str) -> str:
    return "int3" if mode == "int3" else "jmp"


def life(source: str, *flags: str, extra: Sequence[str] = SITES) -> str:
    return build(source, "-O1", *flags, extra_sources=tuple(extra))


def site_specs(path: str) -> Tuple[str, str]:
    return f"uprobe:{path}:life_nop5", f"uprobe:{path}:life_int3"


def original_byte(path: str, name: str) -> str:
    """The first byte of function *name* in the file, as the targets print it."""
    return file_bytes(path, symbol(path, name)[0], 1).hex()


def patched_bytes(mode: str) -> str:
    """What the targets print as the first bytes of life_nop5, life_int3 while armed."""
    return ("cc" if mode == "int3" else "e9") + ",cc"


def stat_state(pid: int, gone_ok: bool = False) -> str:
    """The state letter of /proc/PID/stat; with *gone_ok*, "" once the process is gone
    (else that is an error)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        if gone_ok:
            return ""
        raise


def task_tracers(pid: int) -> Dict[int, int]:
    """TracerPid of every thread of *pid*."""
    out = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            out[int(task)] = int(proc_status(int(task))["TracerPid"])
    return out


def pump(session: ptprobe.Session, lines: Lines, predicate, what: str, rounds: int = 1500) -> None:
    """Run the session's event loop in short slices until predicate(lines) holds."""
    for _ in range(rounds):
        if predicate(list(lines.lines)):
            return
        status = session.wait(timeout=0.02)
        assert status is None, f"the program ended (status {status}) before {what}: {lines.lines[-5:]}"
    raise AssertionError(f"never saw {what}; last lines: {lines.lines[-5:]}")


@contextlib.contextmanager
def piped_run(argv: Sequence[str], **opts) -> Iterator[Tuple[ptprobe.Session, Lines]]:
    """ptprobe.run with the program's stdout on a pipe whose lines are collected."""
    r, w = os.pipe()
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(w, 1)
    try:
        session = ptprobe.run(list(argv), **opts)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(w)
    lines = Lines(os.fdopen(r, "rb"))
    with watchdog(GUARD, [session.main_pid]):
        with session:
            yield session, lines
    lines.wait_for(lambda ls: "<EOF>" in ls, "the end of the program's output")


def cli_popen(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ptprobe", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=repo_env(), cwd=str(REPO))


# --------------------------------------------------------------------------- fork: a prefork server

WORKER = re.compile(r"^worker (\d+) sum=(\d+) ok=(\d) code=(\w\w,\w\w)$")
PARENT = re.compile(r"^parent (\d+) ok=(\d) workers=(\d+) code=(\w\w,\w\w)$")
WORKERS, PER_WORKER, PER_PARENT = 4, 25, 3


def parse_prefork(out: str) -> Tuple[Dict[int, str], Tuple[int, str]]:
    """({worker pid: code bytes}, (parent pid, code bytes)); every line must say ok."""
    workers: Dict[int, str] = {}
    parent = None
    for line in out.splitlines():
        m = WORKER.match(line)
        if m:
            assert m[3] == "1", f"a worker computed a wrong sum: {line}"
            workers[int(m[1])] = m[4]
            continue
        m = PARENT.match(line)
        if m:
            assert m[2] == "1" and int(m[3]) == WORKERS, line
            parent = (int(m[1]), m[4])
    assert len(workers) == WORKERS and parent is not None, out
    return workers, parent


@MODES
@pytest.mark.parametrize("follow", [True, False], ids=["follow", "no-follow"])
def test_prefork_server(mode, follow):
    """Hits land on the right process; without following, the workers get their
    original code back before they run and are let go."""
    path = life("life_prefork.c")
    nop5, int3 = site_specs(path)
    hits: Dict[str, List] = {"nop5": [], "int3": []}
    status, out, (p5, p3), _ = run_traced(
        [path, str(WORKERS), str(PER_WORKER), str(PER_PARENT)],
        [(nop5, recorder(hits["nop5"])), (int3, recorder(hits["int3"]))], follow=follow, **options(mode))
    assert status == 0, out
    workers, (parent, parent_code) = parse_prefork(out)
    assert parent_code == patched_bytes(mode)           # the parent's sites stay armed throughout
    expected = {parent: 2 * PER_PARENT}
    if follow:
        expected.update({pid: PER_WORKER for pid in workers})
        assert set(workers.values()) == {patched_bytes(mode)}, workers
    else:
        original = f"{original_byte(path, 'life_nop5')},{original_byte(path, 'life_int3')}"
        assert original == "0f,48"
        assert set(workers.values()) == {original}, workers
    for name, records in hits.items():
        assert Counter(pid for pid, _, _ in records) == expected, name
        for pid, tid, _ in records:
            assert tid == pid                         # single-threaded processes
    assert p5.hits == p3.hits == sum(expected.values())
    assert {s.mechanism for s in p5.sites} == {nop5_mechanism(mode)}
    assert {s.mechanism for s in p3.sites} == {"int3"}


@pytest.mark.parametrize("follow", [True, False], ids=["follow", "no-follow"])
def test_cli_prefork_server(follow):
    path = life("life_prefork.c")
    nop5, int3 = site_specs(path)
    res = ptprobe_cli("run", "-q", *(() if follow else ("--no-follow",)), "-p", nop5, "-p", int3, "--",
                      path, str(WORKERS), str(PER_WORKER), str(PER_PARENT))
    assert res.returncode == 0, res.stderr
    workers, (_, parent_code) = parse_prefork(res.stdout)
    assert parent_code == "e9,cc"
    want = 2 * PER_PARENT + (WORKERS * PER_WORKER if follow else 0)
    assert summaries(res.stderr) == {nop5: (want, "1 jmp"), int3: (want, "1 int3")}, res.stderr
    assert set(workers.values()) == {"e9,cc" if follow else "0f,48"}


# --------------------------------------------------------------------------- vfork-style children

SPAWN = re.compile(r"^spawn sem1=(\d+) sem2=(\d+) enabled=(\d+) system=3 spawn=5 vfork=7 ok=1$", re.M)


@MODES
@pytest.mark.parametrize("follow", [True, False], ids=["follow", "no-follow"])
def test_system_posix_spawn_vfork_keep_parent_probes(mode, follow):
    """Children sharing the parent's memory must not take its probes or semaphores away."""
    path = life("life_spawn.c")
    n = 15
    m = SPAWN.search(untraced([path, str(n)]).stdout)
    assert m and m.groups() == ("0", "0", "0")
    nop5, int3 = site_specs(path)
    records: Dict[str, List] = {"nop5": [], "int3": [], "usdt": []}
    status, out, probes, _ = run_traced(
        [path, str(n)], [(nop5, recorder(records["nop5"])), (int3, recorder(records["int3"])),
                         (f"usdt:{path}:life:tick", recorder(records["usdt"]))],
        follow=follow, **options(mode))
    assert status == 0, out
    m = SPAWN.search(out)
    assert m, out
    sem1, sem2, enabled = map(int, m.groups())
    assert sem1 > 0 and sem2 > 0, out                  # the semaphore survived the children
    assert enabled == 2 * n
    want = list(range(n)) + list(range(1000, 1000 + n))
    assert [a for _, _, a in records["nop5"]] == want
    assert [a for _, _, a in records["int3"]] == want
    assert [a for _, _, a in records["usdt"]] == want  # after the spawns too
    assert len({pid for recs in records.values() for pid, _, _ in recs}) == 1
    assert [p.hits for p in probes] == [2 * n] * 3
    assert {s.mechanism for s in probes[0].sites} == {nop5_mechanism(mode)}
    assert {s.mechanism for s in probes[2].sites} == {nop5_mechanism(mode)}


# --------------------------------------------------------------------------- threads that come and go

LONG_THREADS, ROUND_PASSES = 64, 4


@MODES
def test_attach_64_threads_while_threads_are_created(mode):
    """Attach while two threads keep creating short-lived threads: every one of the 64
    long-lived threads is traced and hits exactly as often as it passes the sites."""
    path = life("life_threads.c", "-pthread")
    target = Target([path, str(LONG_THREADS), str(ROUND_PASSES)])
    try:
        long_tids = {int(line.split()[1]) for line in target.out.lines if line.startswith("tid ")}
        assert len(long_tids) == LONG_THREADS
        nop5, int3 = site_specs(path)
        records: Dict[str, List] = {"nop5": [], "int3": []}
        observer = RecordingObserver()
        with watchdog(GUARD / 3, [target.pid]):
            session = ptprobe.attach(target.pid, observer=observer, **options(mode))
            try:
                p5 = session.probe(nop5, recorder(records["nop5"]))
                p3 = session.probe(int3, recorder(records["int3"]))
                target.send(b"g")
                pump(session, target.out, lambda ls: "round 1 done" in ls, "round 1 done")
            finally:
                session.detach()
        assert observer.handler_errors == []
        assert all(t == 0 for t in task_tracers(target.pid).values())
        for name, recs in records.items():
            per_tid = Counter(tid for _, tid, _ in recs if tid in long_tids)
            assert len(per_tid) == LONG_THREADS, f"{name}: {LONG_THREADS - len(per_tid)} threads never hit"
            assert set(per_tid.values()) == {ROUND_PASSES}, name
            assert {pid for pid, _, _ in recs} == {target.pid}
        # short-lived threads created while attached were traced too
        assert any(tid not in long_tids for _, tid, _ in records["nop5"])
        assert p3.hits == LONG_THREADS * ROUND_PASSES
        assert {s.mechanism for s in p5.sites} == {nop5_mechanism(mode)}
        # untraced again: another round runs, and the program is content
        target.send(b"g")
        target.out.wait_for(lambda ls: "round 2 done" in ls, "round 2 done")
        assert target.finish() == 0
        assert any(re.match(r"^done spawned=\d+ failures=0$", line) for line in target.out.lines), \
            target.out.lines[-3:]
    finally:
        target.kill()


# --------------------------------------------------------------------------- exec

@MODES
def test_exec_rearms_probes_by_path(mode, tmp_path):
    """Probes by path follow the program through exec (also from a non-leader thread)
    into every image of that file, by device and inode: a copy of the binary under the
    same name elsewhere is another file; a probe on a file never run ends quietly."""
    path = life("life_exec.c", "-pthread")
    copy_dir = tmp_path / "elsewhere"
    copy_dir.mkdir()
    copy = str(copy_dir / os.path.basename(path))
    shutil.copy2(path, copy)
    never = life("life_prefork.c")
    argv = [path, "a", "3", path, "t", "4", copy, "c", "5", path, "d", "2"]
    specs = {"path": f"uprobe:{path}:life_nop5", "copy": f"uprobe:{copy}:life_nop5",
             "never": f"uprobe:{never}:life_nop5"}
    records: Dict[str, List] = {k: [] for k in specs}
    status, out, probes, observer = run_traced(
        argv, [(spec, recorder(records[k])) for k, spec in specs.items()], **options(mode))
    assert status == 0, out
    stages = re.findall(r"^stage (\w) pid (\d+) count (\d+) ok=1$", out, re.M)
    assert [s[0] for s in stages] == ["a", "t", "c", "d"], out
    (pid,) = {int(s[1]) for s in stages}

    def tags(stage: str, count: int) -> List[int]:
        return [ord(stage) * 1000 + i for i in range(count)]

    assert [a for _, _, a in records["path"]] == tags("a", 3) + tags("t", 4) + tags("d", 2)
    assert [a for _, _, a in records["copy"]] == tags("c", 5)
    assert records["never"] == []
    assert {p for recs in records.values() for p, _, _ in recs} == {pid}
    assert [p.hits for p in probes] == [9, 5, 0]
    assert probes[2].sites == []


# --------------------------------------------------------------------------- dlopen

CALLED = re.compile(r"^called calls=(\d+) enabled=(\d+) sem=(\d+) ok=1$")


def plug_paths() -> Tuple[str, str]:
    lib = build("lifelib_plug.c", "-O1", shared=True, output="liblifeplug.so")
    exe = build("life_dlopen.c", "-O1", "-ldl")
    return exe, lib


def last_called(lines: Sequence[str]) -> Tuple[int, int, int]:
    matches = [CALLED.match(line) for line in lines]
    matches = [m for m in matches if m]
    assert matches, lines[-5:]
    return tuple(map(int, matches[-1].groups()))


@MODES
def test_dlopen_after_attach(mode):
    """Probes on a library given by path before the program dlopens it are armed when
    it is mapped; its semaphore is up while traced and back to 0 after the detach."""
    exe, lib = plug_paths()
    target = Target([exe, lib])
    try:
        usdt_recs: List = []
        func_recs: List = []
        observer = RecordingObserver()
        with watchdog(GUARD, [target.pid]):
            with ptprobe.attach(target.pid, observer=observer, **options(mode)) as session:
                pu = session.probe(f"usdt:{lib}:lifeplug:work",
                                   lambda hit: usdt_recs.append(tuple(hit.args)))
                pf = session.probe(f"uprobe:{lib}:plug_func", recorder(func_recs))
                assert pu.sites == [] and pf.sites == []
                target.send(b"o")
                pump(session, target.out, lambda ls: "opened" in ls, "opened")
                target.send(b"c")
                pump(session, target.out, lambda ls: any(x.startswith("called calls=10 ") for x in ls),
                     "the first calls")
                calls, enabled, sem = last_called(target.out.lines)
                assert (calls, enabled) == (10, 10)
                assert sem > 0
                session.detach()
        assert observer.handler_errors == []
        assert usdt_recs == [(i, 3 * i + 1) for i in range(10)]
        assert [a for _, _, a in func_recs] == list(range(10))
        assert pu.hits == pf.hits == 10
        assert [s.mechanism for s in pu.sites] == [nop5_mechanism(mode)]
        assert [s.mechanism for s in pf.sites] == ["int3"]
        assert all(t == 0 for t in task_tracers(target.pid).values())
        memory, original = code_in_memory(target.pid, lib, "plug_func")
        assert memory == original
        site = pu.sites[0].address
        bias = load_bias(target.pid, lib)
        assert read_mem(target.pid, site, 5) == file_bytes(lib, site - bias, 5) == NOP5
        # untraced: the semaphore is down, the guarded code is skipped
        target.send(b"c")
        target.out.wait_for(lambda ls: any(x.startswith("called calls=20 ") for x in ls), "more calls")
        assert last_called(target.out.lines) == (20, 10, 0)
        assert target.finish() == 0
    finally:
        target.kill()


@MODES
def test_dlopen_in_run_mode_by_library_name(mode):
    """In run mode probes given by the library's name before the program dlopens it."""
    exe, lib = plug_paths()
    n = 12
    usdt_recs: List = []
    func_recs: List = []
    status, out, (pu, pf), observer = run_traced(
        [exe, lib, "auto", str(n)],
        [("usdt:liblifeplug.so:lifeplug:work", lambda hit: usdt_recs.append(tuple(hit.args))),
         ("uprobe:liblifeplug.so:plug_func", recorder(func_recs))], **options(mode))
    assert status == 0, out
    assert "opened" in out.splitlines()
    calls, enabled, sem = last_called(out.splitlines())
    assert (calls, enabled) == (n, n) and sem > 0, out
    assert usdt_recs == [(i, 3 * i + 1) for i in range(n)]
    assert [a for _, _, a in func_recs] == list(range(n))
    assert pu.hits == pf.hits == n
    assert [s.mechanism for s in pu.sites] == [nop5_mechanism(mode)]
    assert any("liblifeplug.so" in text for text in observer.notices), observer.notices


# --------------------------------------------------------------------------- signals

def signals_binary() -> str:
    return life("life_signals.c", "-pthread")


def counting(path: str) -> List[Tuple[str, None]]:
    """Both sites of life_sites.c, counted without a handler."""
    return [(spec, None) for spec in site_specs(path)]


@MODES
def test_sigstop_stays_stopped_until_sigcont(mode):
    path = signals_binary()
    nop5, int3 = site_specs(path)
    with piped_run([path, "stop"], observer=RecordingObserver(), **options(mode)) as (session, lines):
        pid = session.main_pid
        p5 = session.probe(nop5)
        p3 = session.probe(int3)
        pump(session, lines, lambda ls: "stopping" in ls, "stopping")
        for _ in range(1500):                     # until the stop has taken effect
            if stat_state(pid) in "Tt":
                break
            assert session.wait(timeout=0.02) is None
        # stopped (T; t while a ptrace tracer holds it in the group stop), and stays so
        for _ in range(15):
            assert stat_state(pid) in "Tt", stat_state(pid)
            assert session.wait(timeout=0.02) is None
            assert "continued" not in lines.lines
        assert stat_state(pid) in "Tt"
        os.kill(pid, signal.SIGCONT)
        status = session.wait()
    assert status == 0
    assert lines.lines[:2] == ["stopping", "continued"]
    assert p5.hits == p3.hits == 2


@MODES
def test_realtime_signals_in_order_with_values(mode):
    path = signals_binary()
    n = 64
    status, out, (p5, p3), _ = run_traced([path, "rt", str(n)], counting(path), **options(mode))
    assert f"rt received={3 * n} ok=1" in out.splitlines(), out
    assert status == 0
    assert p5.hits == p3.hits >= 3 + 3 * n             # main passes + one pass per signal handled


@MODES
def test_program_handles_its_own_sigsegv(mode):
    path = signals_binary()
    n = 8
    status, out, (p5, p3), _ = run_traced([path, "segv", str(n)], counting(path), **options(mode))
    assert f"segv handled={n} ok=1" in out.splitlines(), out
    assert status == 0
    assert p5.hits == p3.hits == 1 + 3 * n             # two passes around each fault, one in the handler


DEATHS = pytest.mark.parametrize("how, sig", [("kill", signal.SIGKILL), ("abort", signal.SIGABRT)])


@DEATHS
@MODES
def test_death_by_signal(how, sig, mode):
    path = signals_binary()
    status, _, (p5, p3), _ = run_traced([path, how], counting(path), **options(mode))
    assert status == -sig
    assert p5.hits == p3.hits == 1


@DEATHS
def test_cli_run_dies_by_the_same_signal(how, sig):
    path = signals_binary()
    nop5, int3 = site_specs(path)
    res = ptprobe_cli("run", "-q", "-p", nop5, "-p", int3, "--", path, how)
    assert res.returncode == -sig, res.stderr
    assert summaries(res.stderr) == {nop5: (1, "1 jmp"), int3: (1, "1 int3")}, res.stderr


# --------------------------------------------------------------------------- handlers that raise

@MODES
def test_handler_that_raises(mode):
    """A handler that raises is reported with the probe's name; tracing goes on."""
    path = life("life_handler.c")
    n = 12
    expected = untraced([path, str(n)])
    assert expected.returncode == 0
    nop5, int3 = site_specs(path)
    deref = f"usdt:{path}:life:deref"
    seen: Dict[str, List[int]] = {"nop5": [], "int3": [], "deref": []}

    def raising(name):
        def handler(hit):
            seen[name].append(hit.args[0])
            if hit.args[0] % 4 == 1:
                raise ValueError(f"boom {hit.args[0]}")
        return handler

    observer = RecordingObserver()
    pids: List[int] = []
    with captured_stdout() as out, watchdog(GUARD, pids):
        with ptprobe.run([path, str(n)], observer=observer, **options(mode)) as session:
            pids.append(session.main_pid)
            p5 = session.probe(nop5, raising("nop5"))
            p3 = session.probe(int3, raising("int3"))
            # reading the argument faults on odd passes: a ptprobe.FaultError from the handler
            pd = session.probe(deref, lambda hit: seen["deref"].append(hit.args[0]))
            status = session.wait()
    assert status == 0
    assert out.text == expected.stdout                 # the program never noticed
    assert p5.hits == p3.hits == pd.hits == n          # later hits counted
    assert seen["nop5"] == seen["int3"] == list(range(n))
    assert seen["deref"] == [4242] * (n // 2)
    booms = [i for i in range(n) if i % 4 == 1]
    for spec in (nop5, int3):
        assert [e for e in observer.handler_errors if e.startswith(spec + ":")] == \
            [f"{spec}: ValueError: boom {i}" for i in booms]
    faults = [e for e in observer.handler_errors if e.startswith(deref + ":")]
    assert len(faults) == n // 2 and all(e.startswith(f"{deref}: FaultError") for e in faults), faults
    assert p5.errors == p3.errors == len(booms) and pd.errors == n // 2


def test_cli_handler_error_one_line_naming_the_probe():
    path = life("life_handler.c")
    n = 12
    expected = untraced([path, str(n)])
    deref = f"usdt:{path}:life:deref"
    nop5, _ = site_specs(path)
    res = ptprobe_cli("run", "-o", "-", "-p", deref, "-p", nop5, "--", path, str(n))
    assert res.returncode == 0, res.stderr
    program = [line for line in res.stdout.splitlines() if line.startswith(("pass ", "handler done"))]
    assert program == expected.stdout.splitlines()
    assert len([line for line in res.stdout.splitlines() if line.startswith("life:deref ")]) == n // 2
    assert len([line for line in res.stdout.splitlines() if line.startswith("life_nop5 ")]) == n
    errors = [line for line in res.stderr.splitlines() if not line.startswith(f"ptprobe: {nop5}:")
              and not line.startswith(f"ptprobe: {deref}:")]
    assert len(errors) == n // 2, res.stderr
    for line in errors:
        assert line.startswith(f"ptprobe: probe {deref}: FaultError"), line
    assert "Traceback" not in res.stderr
    assert summaries(res.stderr) == {deref: (n, "1 jmp"), nop5: (n, "1 jmp")}, res.stderr


# --------------------------------------------------------------------------- detaching from the command line

@pytest.mark.parametrize("how", ["SIGTERM", "SIGHUP", "duration"])
def test_cli_attach_detaches_cleanly(loop_target, how):
    target = loop_target
    specs = [f"uprobe:{target.path}:work", f"uprobe:{target.path}:work_nop5"]
    extra = ["--duration", "1"] if how == "duration" else []
    cli = cli_popen("attach", str(target.pid), "--json", "-p", specs[0], "-p", specs[1], *extra)
    try:
        hits = Lines(cli.stdout)
        hits.wait_for(lambda ls: set(specs) <= {json.loads(x)["probe"] for x in ls if x.startswith("{")},
                      "hits of both probes")
        if how != "duration":
            cli.send_signal(getattr(signal, how))
        assert cli.wait(timeout=GUARD) == 0
        err = cli.stderr.read().decode()
        found = summaries(err)
        assert set(found) == set(specs), err
        assert found[specs[0]][0] > 0 and found[specs[0]][1] == "1 int3"
        assert found[specs[1]][0] > 0 and found[specs[1]][1] == "1 jmp"
        # not traced, code as in the file byte for byte, running on
        target.assert_alive_untraced_and_original(("work", "spare"))
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()


def test_cli_run_sigkilled_kills_the_program():
    path = build("core_loop.c", "-O1")
    cli = cli_popen("run", "-o", "-", "-p", f"uprobe:{path}:work", "--", path)
    pidfd = None
    try:
        out = Lines(cli.stdout)
        out.wait_for(lambda ls: any(x.startswith("ready ") for x in ls)
                     and any(x.startswith("work pid=") for x in ls), "the program and its hits")
        pid = int(next(x for x in out.lines if x.startswith("ready ")).split()[1])
        pidfd = os.pidfd_open(pid)
        assert int(proc_status(pid)["TracerPid"]) == cli.pid
        cli.send_signal(signal.SIGKILL)
        assert cli.wait(timeout=GUARD) == -signal.SIGKILL
        ready, _, _ = select.select([pidfd], [], [], GUARD)
        assert ready, "the program outlived its tracer"
        out.wait_for(lambda ls: "<EOF>" in ls, "the end of the program's output")
    finally:
        if pidfd is not None:
            os.close(pidfd)
        if cli.poll() is None:
            cli.kill()
            cli.wait()


def test_attach_while_the_main_thread_creates_threads():
    """Arming runs system calls in a stopped thread; the main thread may be stopped
    inside clone3() at its clone event. The new thread's tid must reach the program
    then, not the -ENOSYS rax holds at that stop (glibc would fall back to clone() on
    the same stack, and the process would die). Fresh targets: a second attach would
    reuse the first one's pages and run no system call."""
    path = life("life_clone_burst.c", "-pthread")
    for cycle in range(20):
        target = Target([path])
        try:
            with watchdog(GUARD, [target.pid]):
                with ptprobe.attach(target.pid) as session:
                    session.probe(f"uprobe:{path}:life_nop5")
                    session.wait(timeout=0.03)
                    target.send(b"g")
                    while session.returncode is None and not target.out.count("quiet "):
                        session.wait(timeout=0.05)
                    assert session.returncode is None, f"cycle {cycle}: the program died ({session.returncode})"
                    session.detach()
            assert not target.out.count("FAIL"), target.out.lines[-5:]
            assert all(t == 0 for t in task_tracers(target.pid).values())
            assert target.finish() == 0
            assert target.out.count("done") == 1
        finally:
            target.kill()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cli_run_signalled_while_the_program_sleeps(sig):
    """ptprobe alone gets the signal while the program sits in nanosleep(): ptprobe
    detaches, and the sleep goes on to its full length (the kernel restarts it)."""
    binary = build("life_sleep.c", "-O1")
    cli = cli_popen("run", "-q", "-p", f"uprobe:{binary}:main", "--", binary, "1500")
    try:
        out = Lines(cli.stdout)
        (line,) = [x for x in out.wait_for(lambda ls: any(x.startswith("sleeping ") for x in ls),
                                           "the program going to sleep") if x.startswith("sleeping ")]
        pid = int(line.split()[1])
        # the program in its sleep: state S (read from /proc, no timing guess)
        while stat_state(pid, gone_ok=True) not in ("S", ""):
            pass
        cli.send_signal(sig)
        assert cli.wait(timeout=GUARD) == 0
        lines = out.wait_for(lambda ls: any(x.startswith("slept ") for x in ls), "the end of the sleep")
        (slept,) = [x for x in lines if x.startswith("slept ")]
        ms, rc = re.match(r"slept (\d+) ms rc=(-?\d+)$", slept).groups()
        assert rc == "0" and int(ms) >= 1500, slept
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()


@pytest.mark.parametrize("slots", ["return", "seed"])
def test_cli_sigint_while_four_threads_hammer(slots):
    binary = fast_build("fast_hammer.c")
    slot_spec, int3_spec = f"uprobe:{binary}:regs_site", f"uprobe:{binary}:regs_site+5"
    hammer = Hammer(binary, 4, 5000)
    cli = None
    try:
        site = load_bias(hammer.pid, binary) + symbol(binary, "regs_site")[0]
        original = read_mem(hammer.pid, site, 6)
        assert original == NOP5 + b"\x9c"                 # the nop5, then pushfq
        cli = cli_popen("attach", str(hammer.pid), "--json", "--slots", slots, "-p", slot_spec, "-p", int3_spec)
        hits = Lines(cli.stdout)

        def enough(ls: List[str]) -> bool:
            names = Counter(json.loads(x)["probe"] for x in ls if x.startswith("{"))
            return names[slot_spec] >= 100 and names[int3_spec] >= 100

        hits.wait_for(enough, "100 hits of each probe")
        cli.send_signal(signal.SIGINT)
        assert cli.wait(timeout=GUARD) == 0
        err = cli.stderr.read().decode()
        found = summaries(err)
        assert found[slot_spec][1] == "1 jmp" and found[int3_spec][1] == "1 int3", err
        assert all(t == 0 for t in task_tracers(hammer.pid).values())
        assert read_mem(hammer.pid, site, 6) == original
        # every thread runs on, its own register checks passing
        hammer.wait_for_progress(4, "progress after the detach", or_failure=True)
        assert hammer.failures() == []
        assert hammer.finish() == 0
        assert hammer.failures() == []
    finally:
        if cli is not None and cli.poll() is None:
            cli.kill()
            cli.wait()
        hammer.kill()


# --------------------------------------------------------------------------- attach/detach cycles

CYCLES = 200


@pytest.mark.parametrize("slots", ["return", "seed"])
def test_200_attach_detach_cycles(slots):
    binary = life("life_cycle.c", "-pthread", extra=("fast_regcheck.c",) + SITES)
    specs = [f"uprobe:{binary}:regs_site", f"uprobe:{binary}:life_int3", f"usdt:{binary}:life:cycle"]
    target = Target([binary, "4"])
    try:
        base = load_bias(target.pid, binary)
        semaphore = base + symbol(binary, "life_cycle_semaphore")[0]
        totals = [0, 0, 0]
        originals: Dict[int, bytes] = {}
        first_filters = None
        observer = RecordingObserver()
        with watchdog(GUARD * 2 / 3, [target.pid]):
            for cycle in range(CYCLES):
                session = ptprobe.attach(target.pid, slots=slots, observer=observer)
                try:
                    probes = [session.probe(spec) for spec in specs]
                    if cycle == 0:
                        assert [[s.mechanism for s in p.sites] for p in probes] == [["jmp"], ["int3"], ["jmp"]]
                        for p in probes:
                            address = p.sites[0].address
                            originals[address] = file_bytes(binary, address - base, 6)
                        assert int.from_bytes(read_mem(target.pid, semaphore, 2), "little") == 1
                    assert session.wait(timeout=0.02) is None
                finally:
                    session.detach()
                totals = [t + p.hits for t, p in zip(totals, probes)]
                assert target.proc.poll() is None, f"cycle {cycle}: the program died: {target.out.lines[-3:]}"
                assert not [x for x in target.out.lines if x.startswith("FAIL")], f"cycle {cycle}"
                assert read_mem(target.pid, semaphore, 2) == b"\0\0", f"cycle {cycle}"
                for address, data in originals.items():
                    assert read_mem(target.pid, address, 6) == data, f"cycle {cycle}: {address:#x}"
                filters = int(proc_status(target.pid)["Seccomp_filters"])
                if first_filters is None:
                    first_filters = filters
                    assert filters == 1
                assert filters <= first_filters, f"cycle {cycle}: {filters} seccomp filters"
        assert observer.handler_errors == []
        assert all(t > 0 for t in totals), totals
        assert all(t == 0 for t in task_tracers(target.pid).values())
        assert target.finish() == 0
        done = [x for x in target.out.lines if x.startswith("done ")]
        assert done and done[0].endswith(" sem=0"), target.out.lines[-3:]
        assert not [x for x in target.out.lines if x.startswith("FAIL")]
    finally:
        target.kill()
