"""End-to-end tests of the ``ptprobe`` command line: real targets, real ptrace.

The command runs as ``python -m ptprobe`` from the repository root with
PYTHONPATH pointing at it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

import ptprobe
from conftest import NOBODY, build
from helpers import (GUARD, SUMMARY, Lines, Target, code_in_memory, decode, proc_status, ptprobe_cli,
                     ptprobe_popen, read_mem, reaped_pid, runtime_address, stop_popen, summaries, symbol,
                     tracer_pid, unprivileged, watchdog, write_mem)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The error report: exactly one line, starting with 'ptprobe: '."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ptprobe: "), result.stderr
    return lines[0]


@pytest.fixture
def simple() -> str:
    return build("core_simple.c", "-O1", "-fno-pie", "-no-pie")


@pytest.fixture
def cli_target() -> str:
    """tests/c/cli_target.c (-fno-builtin: its strlen() calls reach libc)."""
    return build("cli_target.c", "-O1", "-fno-builtin", "-ldl")


def until(predicate, what: str, timeout: float = GUARD) -> None:
    """Poll *predicate* (a /proc or memory read) until it holds; fail after *timeout*
    seconds. The short sleep only spares the CPU: nothing depends on its length."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.005)


def state(pid: int) -> str:
    return proc_status(pid)["State"][0]


# ---------------------------------------------------------------------------- run

def test_run_prints_hits_and_summary(simple):
    expected = subprocess.run([simple], capture_output=True, text=True).stdout.splitlines()
    spec = f"uprobe:{simple}:compute"
    result = ptprobe_cli("run", "-p", spec, "--", simple)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # the program's own lines, in order (its pid differs), and one line per hit besides
    program = [line for line in lines if line.startswith(("pid ", "compute(", "secret ", "total "))]
    assert program[1:] == expected[1:]
    hit_lines = [line for line in lines if line not in program]
    assert len(hit_lines) == 11, lines
    assert all("compute" in line for line in hit_lines), hit_lines
    assert summaries(result.stderr) == {spec: (11, "1 int3")}


def test_run_json_schema(simple):
    spec = f"uprobe:{simple}:compute"
    result = ptprobe_cli("run", "--json", "-p", spec, "--", simple)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    pid = int(next(line for line in result.stdout.splitlines() if line.startswith("pid "))[4:])
    assert len(records) == 11
    for record in records:
        assert {"probe", "pid", "tid", "address", "args"} <= set(record), record
        assert record["probe"] == spec
        assert record["pid"] == record["tid"] == pid
        assert type(record["address"]) is int
        assert record["address"] == symbol(simple, "compute")[0]       # non-PIE: the link address
        assert isinstance(record["args"], list) and len(record["args"]) == 6
        assert all(type(a) is int for a in record["args"])
    assert [r["args"][0] for r in records] == list(range(10)) + [5]


def test_run_output_file(simple, tmp_path):
    spec = f"uprobe:{simple}:compute"
    out = tmp_path / "hits.jsonl"
    result = ptprobe_cli("run", "--json", "-o", str(out), "-p", spec, "--", simple)
    assert result.returncode == 0, result.stderr
    assert not any(line.startswith("{") for line in result.stdout.splitlines())
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["args"][0] for r in records] == list(range(10)) + [5]


def test_run_several_probes_and_library(simple):
    specs = [f"uprobe:{simple}:compute", f"uprobe:{simple}:touch", "uprobe:libc.so.6:getpid"]
    result = ptprobe_cli("run", "--json", *[a for s in specs for a in ("-p", s)], "--", simple)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    counts = {s: sum(r["probe"] == s for r in records) for s in specs}
    assert counts[specs[0]] == 11 and counts[specs[1]] == 1 and counts[specs[2]] >= 4
    found = summaries(result.stderr)
    assert {s: found[s][0] for s in specs} == counts
    assert re.search(rf"^ptprobe: {re.escape(specs[1])}: 1 hit \(", result.stderr, re.M), result.stderr


@pytest.mark.parametrize("slots", ["seed", "return"])
def test_run_slots_option(slots):
    path = build("core_regs.c", "-O1")
    spec = f"uprobe:{path}:regs_site_nop5"
    result = ptprobe_cli("run", "--slots", slots, "-p", spec, "--", path, "3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "registers ok after 3 rounds" in result.stdout
    assert summaries(result.stderr) == {spec: (3, "1 jmp")}


def test_run_no_seccomp_uses_int3():
    path = build("core_regs.c", "-O1")
    spec = f"uprobe:{path}:regs_site_nop5"
    result = ptprobe_cli("run", "--no-seccomp", "-p", spec, "--", path, "3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "registers ok after 3 rounds" in result.stdout
    assert summaries(result.stderr) == {spec: (3, "1 int3")}


@pytest.mark.parametrize("mode, status", [("exit7", 7), ("segv", -signal.SIGSEGV), ("abort", -signal.SIGABRT)])
def test_run_exit_status_passes_through(simple, mode, status):
    spec = f"uprobe:{simple}:compute"
    result = ptprobe_cli("run", "-q", "-p", spec, "--", simple, mode)
    assert result.returncode == status, result.stderr
    assert "total 298" in result.stdout


def test_run_errors(simple, tmp_path):
    missing = ptprobe_cli("run", "-p", f"uprobe:{simple}:compute", "--", str(tmp_path / "nothing"))
    assert missing.returncode == 9
    error_line(missing)
    bad = ptprobe_cli("run", "-p", "uprobe:", "--", simple)
    assert bad.returncode == 2
    error_line(bad)
    nosym = ptprobe_cli("run", "-p", f"uprobe:{simple}:no_such_symbol", "--", simple)
    assert nosym.returncode == 6
    assert "total" not in nosym.stdout          # the program never ran its own code
    error_line(nosym)
    kept = tmp_path / "kept.txt"
    kept.write_text("earlier hits\n")
    for fmt in ("%q", "x=%d %"):
        badfmt = ptprobe_cli("run", "-f", fmt, "-p", f"uprobe:{simple}:compute", "--", simple)
        if fmt == "%q":
            assert badfmt.returncode == 2, badfmt.stderr
            assert "%q" in error_line(badfmt) and "total" not in badfmt.stdout
            # checked before -o FILE is opened: the file is left as it was
            with_output = ptprobe_cli("run", "-f", fmt, "-o", str(kept), "-p", f"uprobe:{simple}:compute",
                                      "--", simple)
            assert with_output.returncode == 2 and kept.read_text() == "earlier hits\n"
        else:       # a lone % at the end is printed as it is
            assert badfmt.returncode == 0, badfmt.stderr
            assert "x=5 %" in badfmt.stdout.splitlines()


# ---------------------------------------------------------------------------- attach

def test_attach_duration(loop_target):
    target = loop_target
    spec = f"uprobe:{target.path}:work"
    result = ptprobe_cli("attach", str(target.pid), "--json", "-p", spec, "--duration", "0.5")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    hits, how = summaries(result.stderr)[spec]
    assert hits > 0 and how == "1 int3"
    assert len(records) == hits
    assert {r["pid"] for r in records} == {target.pid}
    assert {r["address"] for r in records} == {runtime_address(target.pid, target.path, symbol(target.path, "work")[0])}
    target.assert_alive_untraced_and_original(("work", "spare"))


def test_attach_with_slot(loop_target):
    target = loop_target
    spec = f"uprobe:{target.path}:work_nop5"
    result = ptprobe_cli("attach", str(target.pid), "-q", "-p", spec, "--duration", "0.5")
    assert result.returncode == 0, result.stderr
    hits, how = summaries(result.stderr)[spec]
    assert hits > 0 and how == "1 jmp"
    target.assert_alive_untraced_and_original(("work", "spare"))


def test_attach_unknown_pid():
    result = ptprobe_cli("attach", str(reaped_pid()), "-p", "uprobe:libc.so.6:getpid", "--duration", "0.1")
    assert result.returncode == 3
    error_line(result)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to set up a process it may not trace")
def test_attach_permission_denied():
    python, env, target = unprivileged(build("core_loop.c", "-O1"))
    try:
        result = subprocess.run([*NOBODY, python, "-m", "ptprobe", "attach", str(target.pid), "-p",
                                 f"uprobe:{target.path}:work", "--duration", "0.1"], cwd="/", env=env,
                                capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert result.returncode == 4, result.stderr
        error_line(result)
        target.assert_alive_untraced_and_original(("work",))
    finally:
        target.kill()


@pytest.mark.parametrize("case, code", [
    ("bad-spec", 2), ("bad-offset", 2), ("not-elf", 5), ("missing-file", 5), ("missing-symbol", 6),
    ("lib-missing-symbol", 6), ("boundary", 7),
])
def test_attach_bad_probe(loop_target, tmp_path, case, code):
    target = loop_target
    text = tmp_path / "notes.txt"
    text.write_text("not an ELF file\n")
    assert decode(target.path, "work")[0].size > 1
    spec = {
        "bad-spec": "uprobe:nocolon",
        "bad-offset": f"uprobe:{target.path}:work+zz",
        "not-elf": f"uprobe:{text}:main",
        "missing-file": f"uprobe:{target.path}.missing:main",
        "missing-symbol": f"uprobe:{target.path}:no_such_function",
        "lib-missing-symbol": "uprobe:libc.so.6:no_such_function_in_libc",
        "boundary": f"uprobe:{target.path}:work+1",
    }[case]
    result = ptprobe_cli("attach", str(target.pid), "-p", spec, "--duration", "0.2")
    assert result.returncode == code, result.stderr
    error_line(result)
    target.assert_alive_untraced_and_original(("work", "spare"))


def test_attach_not_elf_etc_hostname(loop_target):
    if not os.path.isfile("/etc/hostname"):
        pytest.skip("no /etc/hostname")
    result = ptprobe_cli("attach", str(loop_target.pid), "-p", "uprobe:/etc/hostname:main", "--duration", "0.2")
    assert result.returncode == 5
    error_line(result)
    loop_target.assert_alive_untraced_and_original(("work",))


def test_attach_site_already_patched(loop_target):
    target = loop_target
    runtime = runtime_address(target.pid, target.path, symbol(target.path, "spare")[0])
    assert read_mem(target.pid, runtime, 1) != b"\xcc"
    write_mem(target.pid, runtime, b"\xcc")
    patched, _ = code_in_memory(target.pid, target.path, "spare")
    good = f"uprobe:{target.path}:work"
    result = ptprobe_cli("attach", str(target.pid), "-p", good, "-p", f"uprobe:{target.path}:spare",
                         "--duration", "0.2")
    assert result.returncode == 8, result.stderr
    # one error line; the probe armed before the error may be summed up
    lines = result.stderr.splitlines()
    assert all(line.startswith("ptprobe: ") for line in lines), result.stderr
    assert len([line for line in lines if not SUMMARY.match(line)]) == 1, result.stderr
    target.assert_alive_untraced_and_original(("work", "spare"), patched={"spare": patched})


def test_attach_bad_pid_argument():
    result = ptprobe_cli("attach", "notapid", "-p", "uprobe:libc.so.6:getpid")
    assert result.returncode == 2
    error_line(result)


# ---------------------------------------------------------------------------- bugs a new user hit

def test_run_never_lets_the_program_run_after_a_refused_probe(tmp_path):
    """`for i in $(seq 60); do ptprobe run -p uprobe:/etc/passwd:foo -- touch mk/ran_$i; done`
    created 2 of 60 files: the program was let go before it was killed. The same loop
    through the API, a file that is not ELF and a missing symbol in turn, tracer and
    program on two CPUs (the race is likelier there)."""
    touch = shutil.which("touch")
    assert touch is not None
    pids = []
    with watchdog(GUARD, pids):
        for i in range(60):
            spec = "uprobe:/etc/passwd:foo" if i % 2 else f"uprobe:{touch}:no_such_symbol"
            with pytest.raises((ptprobe.ObjectFileError, ptprobe.SymbolNotFoundError)):
                with ptprobe.run([touch, str(tmp_path / f"ran_{i}")], colocate=False) as session:
                    pids.append(session.main_pid)
                    session.probe(spec)
            assert session.returncode == -signal.SIGKILL
    assert sorted(os.listdir(tmp_path)) == []


def test_attach_to_a_stopped_process(cli_target):
    """A process stopped by SIGSTOP (state T): attach used to hang or fail, ignoring
    --duration and signals. Attaching works, the process stays stopped as it was, and
    runs into its probes once continued."""
    target = Target([cli_target, "loop"])
    spec = f"uprobe:{cli_target}:cli_last"
    cli = None
    try:
        site = runtime_address(target.pid, cli_target, symbol(cli_target, "cli_last")[0])
        os.kill(target.pid, signal.SIGSTOP)
        until(lambda: state(target.pid) == "T", "the stop")
        # with a limit: detaches at its end, and the process is still stopped
        result = ptprobe_cli("attach", str(target.pid), "-q", "-p", spec, "--duration", "0.3", timeout=GUARD)
        assert result.returncode == 0, result.stderr
        assert summaries(result.stderr)[spec] == (0, "1 int3"), result.stderr
        assert state(target.pid) == "T" and tracer_pid(target.pid) == 0
        # continued while attached: hits; a signal ends the attach
        cli = ptprobe_popen("attach", str(target.pid), "-p", spec)
        until(lambda: read_mem(target.pid, site, 1) == b"\xcc", "the probe armed")
        assert state(target.pid) in "Tt"
        os.kill(target.pid, signal.SIGCONT)
        Lines(cli.stdout).wait_for(lambda ls: any(line.startswith("cli_last") for line in ls), "a hit")
        cli.send_signal(signal.SIGINT)
        assert cli.wait(timeout=GUARD) == 0
        found = summaries(cli.stderr.read().decode())
        assert found[spec][0] > 0
        target.assert_alive_untraced_and_original(("cli_last", "cli_ints"))
    finally:
        if cli is not None:
            stop_popen(cli)
        target.kill()


def test_run_a_second_signal_after_the_detach_ends_the_wait(cli_target):
    """A signal makes `run` detach and wait for the program, which runs on; once
    detached, ptprobe used to ignore every further SIGTERM and wait for ever. The second
    signal ends the wait: ptprobe exits (by that signal), the program runs on untraced."""
    spec = f"uprobe:{cli_target}:cli_last"
    cli = ptprobe_popen("run", "-q", "-p", spec, "--", cli_target, "loop")
    pid = 0
    try:
        out, err = Lines(cli.stdout), Lines(cli.stderr)
        (ready,) = [x for x in out.wait_for(lambda ls: any(x.startswith("ready ") for x in ls), "the program")
                    if x.startswith("ready ")]
        pid = int(ready.split()[1])
        assert tracer_pid(pid) == cli.pid
        cli.send_signal(signal.SIGTERM)
        until(lambda: tracer_pid(pid) == 0, "the detach")
        assert cli.poll() is None               # waiting for the program, which runs on
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(timeout=GUARD) == -signal.SIGTERM
        # (the program holds the pipes open: no end of output to wait for)
        text = "\n".join(err.wait_for(lambda ls: summaries("\n".join(ls)), "the summary"))
        assert summaries(text)[spec][0] > 0, text
        assert "Traceback" not in text
        assert state(pid) in "RS" and tracer_pid(pid) == 0
        memory, original = code_in_memory(pid, cli_target, "cli_last")
        assert memory == original
    finally:
        stop_popen(cli)
        if pid:
            os.kill(pid, signal.SIGKILL)


def test_closed_output_ends_tracing_quietly(cli_target):
    """`ptprobe run ... | head -2` wrote a BrokenPipeError line per hit and traced on.
    A closed output ends tracing quietly: ptprobe detaches, the program runs on to its
    end untraced (here it then writes to the closed pipe itself and dies by SIGPIPE,
    as it would without ptprobe), and ptprobe exits with the program's status."""
    rounds = 20000
    spec = f"uprobe:{cli_target}:cli_ints"
    cli = ptprobe_popen("run", "-o", "/dev/stdout", "-p", spec, "--", cli_target, "calls", str(rounds))
    try:
        assert cli.stdout.readline() and cli.stdout.readline()      # head -2
        cli.stdout.close()
        assert cli.wait(timeout=GUARD) == -signal.SIGPIPE
        err = cli.stderr.read().decode()
        assert "Error" not in err and len(err.splitlines()) <= 2, err[:2000]
        hits, _ = summaries(err)[spec]
        assert 2 <= hits < rounds
    finally:
        stop_popen(cli)


def test_closed_output_ends_attach_quietly(cli_target):
    target = Target([cli_target, "loop"])
    spec = f"uprobe:{cli_target}:cli_ints"
    cli = ptprobe_popen("attach", str(target.pid), "-p", spec)
    try:
        assert cli.stdout.readline() and cli.stdout.readline()
        cli.stdout.close()
        assert cli.wait(timeout=GUARD) == 0
        err = cli.stderr.read().decode()
        assert "Error" not in err and len(err.splitlines()) <= 2, err[:2000]
        assert summaries(err)[spec][0] >= 2
        target.assert_alive_untraced_and_original(("cli_ints", "cli_last"))
    finally:
        stop_popen(cli)
        target.kill()
