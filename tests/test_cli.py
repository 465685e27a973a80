"""End-to-end tests of the ``ptprobe`` command line: real targets, real ptrace.

The command runs as ``python -m ptprobe`` from the repository root with
PYTHONPATH pointing at it.
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
import tempfile
import time

import pytest

import ptprobe
from conftest import NOBODY, build, unprivileged_python
from helpers import (GUARD, SUMMARY, Lines, RecordingObserver, Target, code_in_memory, decode, proc_status,
                     ptprobe_cli, ptprobe_popen, read_mem, reaped_pid, runtime_address, stop_popen, summaries,
                     symbol, tracer_pid, unprivileged, watchdog, write_mem)


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
    # the program owns stdout: its lines alone, as without ptprobe (its pid differs)
    lines = result.stdout.splitlines()
    assert lines[1:] == expected[1:] and lines[0].startswith("pid ")
    # hits on stderr, one line each, then the summary
    hit_lines = [line for line in result.stderr.splitlines() if not line.startswith("ptprobe: ")]
    assert len(hit_lines) == 11, result.stderr
    assert all(line.startswith("compute pid=") for line in hit_lines), hit_lines
    assert summaries(result.stderr) == {spec: (11, "1 int3")}


def test_run_json_schema(simple):
    spec = f"uprobe:{simple}:compute"
    result = ptprobe_cli("run", "--json", "-o", "-", "-p", spec, "--", simple)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    pid = int(next(line for line in result.stdout.splitlines() if line.startswith("pid "))[4:])
    assert len(records) == 11
    for record in records:
        assert {"probe", "name", "pid", "tid", "comm", "time_ns", "address", "args"} <= set(record), record
        assert record["name"] == "compute" and record["comm"] == os.path.basename(simple)[:15]
        assert record["probe"] == spec
        assert record["pid"] == record["tid"] == pid
        assert type(record["address"]) is int
        assert record["address"] == symbol(simple, "compute")[0]       # non-PIE: the link address
        assert isinstance(record["args"], list) and len(record["args"]) == 6
        assert all(type(a) is int for a in record["args"])
    assert [r["args"][0] for r in records] == list(range(10)) + [5]
    times = [r["time_ns"] for r in records]
    assert times == sorted(times)


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
    records = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
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
        assert badfmt.returncode == 2, badfmt.stderr
        assert ("%q" if fmt == "%q" else "lone %") in error_line(badfmt) and "total" not in badfmt.stdout
        # checked before -o FILE is opened: the file is left as it was
        with_output = ptprobe_cli("run", "-f", fmt, "-o", str(kept), "-p", f"uprobe:{simple}:compute",
                                  "--", simple)
        assert with_output.returncode == 2 and kept.read_text() == "earlier hits\n"


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
    for target in ("-5", "0", "12,-3", "99999999999"):
        result = ptprobe_cli("attach", target, "-p", "uprobe:libc.so.6:getpid")
        assert result.returncode == 2, (target, result.stderr)
        assert "not a process id" in error_line(result)
    # anything else is a process name
    result = ptprobe_cli("attach", "no-such-process-name", "-p", "uprobe:libc.so.6:getpid")
    assert result.returncode == 3
    assert "no process named 'no-such-process-name'" in error_line(result)


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
        out.wait_for(lambda ls: "progress 100" in ls, "100 rounds, traced")
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


def _ifunc_marks(text: str) -> list:
    return [line for line in text.splitlines() if line.startswith("ifunc-mark-")]


def test_ifunc_probes_the_implementation(cli_target):
    """libc's strlen is an IFUNC: its symbol is the resolver, which runs once. The
    probe goes on the implementation the resolver chose in that process, and says
    which: every call is seen, in run mode (armed before the program's own code)
    and when attached."""
    spec = "uprobe:libc:strlen"
    result = ptprobe_cli("run", "-o", "-", "-f", "%s", "-p", spec, "--", cli_target, "calls", "5", timeout=GUARD)
    assert result.returncode == 0, result.stderr
    assert _ifunc_marks(result.stdout) == [f"ifunc-mark-{i}" for i in range(5)], result.stdout
    assert re.search(r"^ptprobe: uprobe:libc:strlen: IFUNC strlen -> \S+ at 0x[0-9a-f]+$", result.stderr, re.M), \
        result.stderr
    target = Target([cli_target, "loop"])
    cli = ptprobe_popen("attach", str(target.pid), "-f", "%s", "-p", "uprobe:libc.so.6:strlen")
    try:
        Lines(cli.stdout).wait_for(lambda ls: len(set(_ifunc_marks("\n".join(ls)))) >= 3, "three strlen() calls")
        cli.send_signal(signal.SIGINT)
        assert cli.wait(timeout=GUARD) == 0
        target.assert_alive_untraced_and_original(("cli_last",))
    finally:
        stop_popen(cli)
        target.kill()


def test_format_floats_and_too_many_conversions(cli_target):
    """-f %f printed integer registers for a uprobe, and a 7th conversion printed 0.
    Floating conversions take xmm0.. (as the C ABI passes doubles), integer ones
    rdi..; more integer conversions than a uprobe's six is a usage error before the
    program runs."""
    spec = f"uprobe:{cli_target}:cli_mixed"
    result = ptprobe_cli("run", "-o", "-", "-f", "%f %d %hf %s", "-p", spec, "--", cli_target, "calls", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["2.500000 40 0.250000 mixed", "3.500000 41 0.250000 mixed", "done 2"]
    # by position: %N$ is argument N of its kind (integer or floating)
    result = ptprobe_cli("run", "-o", "-", "-f", "%2$s %1$f|%1$6.2f|%1$-4d|%1$d", "-p", spec, "--", cli_target,
                         "calls", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["mixed 2.500000|  2.50|40  |40", "mixed 3.500000|  3.50|41  |41", "done 2"]
    seven = ptprobe_cli("run", "-f", "%d " * 7, "-p", f"uprobe:{cli_target}:cli_ints", "--", cli_target, "calls", "1")
    assert seven.returncode == 2 and "done" not in seven.stdout
    assert "integer argument 7" in error_line(seven)


def test_format_sizes_signs_strings_and_fields(cli_target):
    """Widths and lengths; a uprobe's %d reads an int (as C's printf), %ld a long;
    a USDT argument prints with the size and sign its spec declares; %s escapes
    control characters and marks a string cut at the size limit; NULL is (null)."""
    ints = f"uprobe:{cli_target}:cli_ints"
    usdt = f"usdt:{cli_target}:cli:ints"
    strs = f"uprobe:{cli_target}:cli_str"
    result = ptprobe_cli("run", "-o", "-", "-p", ints, "-f", "%{name} %1$d %2$ld %3$u %4$hd %5$hhd %6$#lx "
                         "%1$5d|%1$-5d|%1$05d|%1$x|%1$lx|%2$d", "--", cli_target, "calls", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == ("cli_ints -7 -100000000000 4000000000 -300 -5 0xdeadbeef00 "
                                             "   -7|-7   |-0007|fffffff9|fffffff9|-1215752192")
    sized = ptprobe_cli("run", "-o", "-", "-p", usdt, "-f", "%1$d %2$d %3$u %1$x %4$s", "--", cli_target, "calls", "1")
    assert sized.stdout.splitlines()[0] == "-7 -100000000000 65000 fffffff9 usdt-str", sized.stdout
    strings = ptprobe_cli("run", "-o", "-", "-s", "20", "-p", strs, "-f", "[%1$s] %2$ld [%1$.3s]", "--",
                          cli_target, "calls", "1")
    assert strings.stdout.splitlines()[:4] == [
        "[plain] 0 [pla...]", "[tab\\there\\n] 0 [tab...]", f"[{'x' * 20}...] 0 [xxx...]", "[(null)] 0 [(null)]"]


@pytest.mark.parametrize("argv, words", [
    (["--duration", "nan"], "--duration"), (["--duration", "inf"], "--duration"),
    (["--duration", "-1"], "--duration"), (["--duration", "0"], "--duration"),
    (["-f", "abc %"], "lone %"), (["-f", "%{nope}"], "unknown field"),
    (["--filter", "arg0 >"], "column"), (["--filter", "comm > 3"], "needs numbers"),
    (["--agg", "hist()"], "hist()"), (["--interval", "1"], "--agg"), (["-s", "0"], "-s"),
    (["--filter", "arg6 == 1"], "arg6"), (["--json", "-f", "%d %d %d %d %d %d %d"], "integer argument 7"),
])
def test_usage_errors(cli_target, argv, words):
    """Each is one line, exit 2, before the program runs (never an internal error)."""
    result = ptprobe_cli("run", *argv, "-p", f"uprobe:{cli_target}:cli_last", "--", cli_target, "calls", "1")
    assert result.returncode == 2, result.stderr
    assert words in error_line(result)
    assert "done" not in result.stdout


def test_output_choices(cli_target):
    """-o - is stdout (no file named '-'); --json with -f carries the line and the
    strings it read; -o /dev/full ends tracing with an error and exit 74; `list` takes
    an object name as specs do."""
    spec = f"uprobe:{cli_target}:cli_str"
    dash = ptprobe_cli("run", "-o", "-", "-p", spec, "-f", "%s", "--", cli_target, "calls", "1")
    assert dash.returncode == 0 and dash.stdout.splitlines()[0] == "plain"
    assert not os.path.exists(os.path.join(os.path.dirname(os.path.dirname(__file__)), "-"))
    both = ptprobe_cli("run", "-o", "-", "--json", "-s", "9", "-p", spec, "-f", "<%s>", "--", cli_target, "calls", "1")
    records = [json.loads(line) for line in both.stdout.splitlines() if line.startswith("{")]
    assert [r["text"] for r in records] == ["<plain>", "<tab\\there\\n>", "<xxxxxxxxx...>", "<(null)>"]
    assert [r.get("strings") for r in records] == [{"arg0": "plain"}, {"arg0": "tab\there\n"},
                                                   {"arg0": "x" * 9}, None]
    assert records[2]["truncated"] == ["arg0"]
    full = ptprobe_cli("run", "-o", "/dev/full", "-p", spec, "--", cli_target, "calls", "300")
    assert full.returncode == 74, full.stderr
    assert "internal error" not in full.stderr and "Traceback" not in full.stderr
    assert re.search(r"^ptprobe: cannot write to /dev/full: No space left on device$", full.stderr, re.M), full.stderr
    assert "done 300" in full.stdout            # the program went on
    listed = ptprobe_cli("list", "libc", "--symbols", "strlen")
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"\bstrlen\s+\(libc\.so\.6\)\s+\(IFUNC", listed.stdout), listed.stdout


def test_name_that_matches_nothing(cli_target, tmp_path):
    """In run mode every startup object is mapped: a name that matches none of them,
    and no program or library on disk, is an error naming what is mapped (exit 6,
    the program never runs). A name that is a program in PATH matches the file it
    links to (as python3 -> python3.11)."""
    result = ptprobe_cli("run", "-p", "uprobe:libnosuch:foo", "--", cli_target, "calls", "1")
    assert result.returncode == 6, result.stderr
    line = error_line(result)
    assert "'libnosuch'" in line and "libc.so.6" in line and "cli_target" in line
    assert "done" not in result.stdout
    os.symlink(cli_target, tmp_path / "clialias")
    env = ["env", f"PATH={tmp_path}:{os.environ.get('PATH', '/usr/bin:/bin')}"]
    alias = ptprobe_cli("run", "-q", "-p", "uprobe:clialias:cli_last", "--", "clialias", "calls", "3", prefix=env)
    assert alias.returncode == 0, alias.stderr
    assert summaries(alias.stderr)["uprobe:clialias:cli_last"] == (3, "1 int3")


@pytest.mark.parametrize("how", ["replaced", "deleted", "replaced-unprivileged"])
def test_probe_an_object_replaced_on_disk(cli_target, how):
    """A library replaced (or removed) on disk while mapped ("(deleted)" in maps, as
    after a package upgrade) was "not loaded yet" with 0 hits. It is probed as
    mapped: as root through /proc/PID/map_files/, as a user from its mapped bytes.
    By name, and (replaced) by the path, which now holds another file."""
    unprivileged_run = how.endswith("unprivileged")
    directory = tempfile.mkdtemp(prefix="ptprobe-cli-lib-")
    os.chmod(directory, 0o755)
    lib = os.path.join(directory, "libclidel.so")
    shutil.copy(build("cli_lib.c", "-O1", shared=True, output="libcli1.so"), lib)
    os.chmod(lib, 0o755)
    prefix = NOBODY if unprivileged_run else ()
    target = Target([cli_target, "dl", lib], prefix=prefix)
    cli = None
    try:
        if how == "deleted":
            os.unlink(lib)
        else:       # a different build of it under the same path (a new inode)
            other = build("cli_lib.c", "-O0", "-fno-omit-frame-pointer", shared=True, output="libcli2.so")
            shutil.copy(other, lib + ".new")
            os.chmod(lib + ".new", 0o755)
            os.replace(lib + ".new", lib)
        with open(f"/proc/{target.pid}/maps") as fh:
            assert f"{lib} (deleted)" in fh.read()
        specs = ["uprobe:libclidel:cli_lib_fn"] + ([f"uprobe:{lib}:cli_lib_fn"] if how != "deleted" else [])
        args = ["attach", str(target.pid), "-f", "%{probe} %d", *[a for s in specs for a in ("-p", s)]]
        if unprivileged_run:
            python, env = unprivileged_python()
            cli = subprocess.Popen([*NOBODY, python, "-m", "ptprobe", *args], cwd="/", env=env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        else:
            cli = ptprobe_popen(*args)
        hits = Lines(cli.stdout)
        hits.wait_for(lambda ls: all(sum(x.startswith(s + " ") for x in ls) >= 3 for s in specs), "hits")
        cli.send_signal(signal.SIGINT)
        assert cli.wait(timeout=GUARD) == 0
        err = cli.stderr.read().decode()
        found = summaries(err)
        assert all(found[s][0] >= 3 for s in specs), err
        source = "its mapped bytes" if unprivileged_run else "/proc/PID/map_files"
        assert f"{lib} was replaced or removed since process {target.pid} mapped it: probing the mapped one " \
               f"(read from {source})" in err, err
        # the arguments are right: cli_lib_fn(round), rounds counting up
        rounds = [int(x.split()[1]) for x in hits.lines if x.startswith(specs[0] + " ")]
        assert rounds == list(range(rounds[0], rounds[0] + len(rounds)))
        target.assert_alive_untraced_and_original(("cli_last",))
    finally:
        if cli is not None:
            stop_popen(cli)
        target.kill()
        shutil.rmtree(directory, ignore_errors=True)


def test_attach_duration_must_be_a_positive_number(loop_target):
    """--duration nan, inf, -1: an internal error or accepted before; now a usage error
    before anything is touched."""
    for value in ("nan", "inf", "-1", "0", "abc"):
        result = ptprobe_cli("attach", str(loop_target.pid), "--duration", value, "-p",
                             f"uprobe:{loop_target.path}:work")
        assert result.returncode == 2, (value, result.stderr)
        assert "--duration" in error_line(result)
        assert tracer_pid(loop_target.pid) == 0
    loop_target.assert_alive_untraced_and_original(("work",))


# ---------------------------------------------------------------------------- what the command line grew

@pytest.mark.parametrize("how", ["name", "tree", "pids"])
def test_attach_by_name_by_tree_and_several_pids(cli_target, tmp_path, how):
    """A server and its existing workers (cli_target tree 3: a parent and three
    children, all calling cli_last): by name (every process of that name), as a
    tree from the parent, or as a list of pids. Each one's hits, and a line per
    process at the end."""
    name = f"ct{os.getpid() % 100000}{how[0]}"
    program = str(tmp_path / name)
    shutil.copy(cli_target, program)
    target = Target([program, "tree", "3"])
    children = [int(x) for x in next(line for line in target.out.lines if line.startswith("children ")).split()[1:]]
    everyone = [target.pid] + children
    spec = f"uprobe:{program}:cli_last"
    where = {"name": [name], "tree": ["--tree", str(target.pid)],
             "pids": [f"{children[0]},{children[1]}", str(children[2]), str(target.pid)]}[how]
    cli = ptprobe_popen("attach", *where, "-f", "%{pid} %{comm}", "-p", spec)
    try:
        out = Lines(cli.stdout)
        out.wait_for(lambda ls: {f"{pid} {name}" for pid in everyone} <= set(ls), "hits in every process")
        cli.send_signal(signal.SIGINT)
        assert cli.wait(timeout=GUARD) == 0
        err = cli.stderr.read().decode()
        assert "ptprobe: attached to 4 processes: " in err, err
        per_process = dict(re.findall(rf"^ptprobe: process (\d+) \({name}\): (\d+) hits?, detached$", err, re.M))
        assert sorted(map(int, per_process)) == sorted(everyone), err
        assert sum(map(int, per_process.values())) == summaries(err)[spec][0]
        for pid in everyone:
            assert tracer_pid(pid) == 0
            assert code_in_memory(pid, program, "cli_last")[0] == code_in_memory(pid, program, "cli_last")[1]
    finally:
        stop_popen(cli)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        target.kill()


def test_filter_and_aggregations(cli_target):
    """--filter keeps the hits where it holds; --agg counts, sums and draws
    histograms as bpftrace does; per-hit lines only when -f asks. Exact over a known
    run: 20 rounds of cli_str("plain"), cli_str("tab\\there\\n"), cli_str(x*100),
    cli_str(NULL), cli_str's second argument being the round."""
    spec = f"uprobe:{cli_target}:cli_str"
    result = ptprobe_cli(
        "run", "-o", "-", "-p", spec, "--filter", "arg0 != 0 && arg1 >= 10",
        "--agg", "count() by str(arg0, 5)", "--agg", "rounds = sum(arg1)", "--agg", "hist(arg1)",
        "--agg", "lhist(arg1, 0, 20, 5) by name", "--", cli_target, "calls", "20")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "@count[plain]: 10\n@count[tab\\th]: 10\n@count[xxxxx]: 10\n" in out, out
    assert "@rounds: 435\n" in out                          # 3 * (10 + ... + 19)
    rows = {line.split()[0] + (" " + line.split()[1] if line.startswith("[") and "," in line else ""):
            int(line[16:24]) for line in out.splitlines() if line.startswith(("[", "("))}
    assert rows["[8, 16)"] == 18 and rows["[16, 32)"] == 12          # hist: 10..15, 16..19, three each
    assert "@lhist[cli_str]:\n[10, 15)              15 |" in out and "[15, 20)              15 |" in out, out
    assert summaries(result.stderr)[spec] == (80, "1 int3")
    assert "ptprobe: --filter: 30 of 80 hits passed" in result.stderr
    assert not any(line.startswith("cli_str ") for line in out.splitlines())       # no per-hit lines


def test_aggregation_through_the_api(cli_target):
    """The same as data from Python: an Aggregation is a handler."""
    agg = ptprobe.Aggregation("count() by str(arg0)")
    keep = ptprobe.Filter("arg0 != 0")
    pids = []
    with watchdog(GUARD, pids):
        with ptprobe.run([cli_target, "calls", "4"], observer=RecordingObserver()) as session:
            pids.append(session.main_pid)
            session.probe(f"uprobe:{cli_target}:cli_str", lambda hit: keep.matches(hit) and agg.add(hit))
            assert session.wait() == 0
    assert agg.data() == {("plain",): 4, ("tab\there\n",): 4, ("x" * 64,): 4}
    assert keep.rejected == 4


def test_symbol_patterns_and_list(cli_target):
    """uprobe:PATH:cli_* arms every cli_ function, each hit counted exactly; list
    shows what a spec pattern arms (as bpftrace -l), filters USDT probes and symbols
    by pattern, and takes an object name."""
    result = ptprobe_cli("run", "-q", "-p", f"uprobe:{cli_target}:cli_*", "--", cli_target, "calls", "7")
    assert result.returncode == 0, result.stderr
    assert summaries(result.stderr)[f"uprobe:{cli_target}:cli_*"] == (7 * 7, "4 int3")   # ints, 4 str, mixed, last
    listed = ptprobe_cli("list", f"uprobe:{cli_target}:cli_[im]*")
    assert listed.stdout.splitlines() == [f"uprobe:{cli_target}:cli_ints", f"uprobe:{cli_target}:cli_mixed"]
    usdt = ptprobe_cli("list", cli_target, "cli:i*")
    assert "cli:ints" in usdt.stdout and "args: -4@" in usdt.stdout
    assert "no USDT probes matching" in ptprobe_cli("list", cli_target, "nosuch:*").stdout
    symbols = ptprobe_cli("list", cli_target, "--symbols", "cli_s*")
    assert [line.split()[2] for line in symbols.stdout.splitlines() if line.startswith("  0x")] == ["cli_str"]
    old_style = ptprobe_cli("list", "--symbols", cli_target)        # --symbols before PATH still works
    assert old_style.returncode == 0 and "cli_mixed" in old_style.stdout
    nothing = ptprobe_cli("list", f"uprobe:{cli_target}:nosuch*")
    assert nothing.returncode == 6 and "nothing matches" in error_line(nothing)


def _read_until(fd: int, seen: bytearray, wanted: bytes, timeout: float = GUARD) -> None:
    """Read the terminal *fd* into *seen* until *wanted* shows (or the timeout, or its end)."""
    deadline = time.monotonic() + timeout
    while wanted not in seen and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.5)[0]:
            try:
                data = os.read(fd, 4096)
            except OSError:
                return
            if not data:
                return
            seen += data


def test_live_status_on_a_terminal(cli_target):
    """On a terminal, while hits do not go to it (here: aggregating), a status line
    shows hits and hits per second per probe, redrawn in place; -q turns it off."""
    import pty
    for quiet in (False, True):
        master, slave = pty.openpty()
        cli = ptprobe_popen("run", *(["-q"] if quiet else []), "--agg", "count()", "-p",
                            f"uprobe:{cli_target}:cli_last", "--", cli_target, "loop", stderr=slave)
        os.close(slave)
        seen = bytearray()
        pid = 0
        try:
            out = Lines(cli.stdout)
            lines = out.wait_for(lambda ls: any(x.startswith("ready ") for x in ls), "the program")
            pid = int(next(x for x in lines if x.startswith("ready ")).split()[1])
            if quiet:       # 1500 rounds of at least 1 ms: the status would have been drawn
                out.wait_for(lambda ls: "progress 1500" in ls, "1500 rounds")
            else:
                _read_until(master, seen, b"/s)")
            cli.send_signal(signal.SIGTERM)
            _read_until(master, seen, b" hits (")
        finally:
            stop_popen(cli)
            if pid:
                os.kill(pid, signal.SIGKILL)
            os.close(master)
        if quiet:
            assert b"/s)" not in seen and b"\x1b[K" not in seen, bytes(seen)
        else:
            assert re.search(rb"\rptprobe \d+s: cli_last [\d,]+ \([\d,]+/s\)\x1b\[K", seen), bytes(seen)
        assert re.search(rb"ptprobe: uprobe:\S+:cli_last: \d+ hits \(1 int3\)", seen), bytes(seen)


def test_help_topics_and_man_page():
    for topic in ("specs", "format", "filter", "agg", "output", "attach", "list", "exit", "examples"):
        result = ptprobe_cli("help", topic)
        assert result.returncode == 0 and result.stdout.startswith(f"{topic} - "), (topic, result.stderr)
    assert "topics (ptprobe help TOPIC)" in ptprobe_cli("--help").stdout
    assert ptprobe_cli("help", "nosuch").returncode == 2
    man = ptprobe_cli("help", "--man")
    assert man.returncode == 0 and man.stdout.startswith(".TH PTPROBE 1")
    for section in ("SYNOPSIS", "RUN", "ATTACH", "FORMAT", "FILTER", "AGG", "EXIT STATUS"):
        assert f"\n.SH {section}\n" in man.stdout, section
    assert "\\-\\-filter" in man.stdout


def test_aggregations_every_interval_and_as_json(cli_target):
    """--interval prints the aggregations while tracing (here before --duration ends
    it: the interval comes first on ptprobe's own clock), then once more at the end;
    --json prints each as a JSON object."""
    target = Target([cli_target, "loop"])
    try:
        result = ptprobe_cli("attach", str(target.pid), "--interval", "0.2", "--duration", "1", "--agg",
                             "count()", "-p", f"uprobe:{cli_target}:cli_last", timeout=GUARD)
        assert result.returncode == 0, result.stderr
        counts = [int(x) for x in re.findall(r"^@count: (\d+)$", result.stdout, re.M)]
        assert len(counts) >= 2 and counts == sorted(counts), result.stdout
        assert re.search(r"^\d\d:\d\d:\d\d\n@count: \d+$", result.stdout, re.M), result.stdout
        assert counts[-1] == summaries(result.stderr)[f"uprobe:{cli_target}:cli_last"][0]
        as_json = ptprobe_cli("attach", str(target.pid), "--json", "--duration", "0.3", "--agg", "count() by name",
                              "--agg", "hist(arg0)", "-p", f"uprobe:{cli_target}:cli_last", timeout=GUARD)
        (count, hist) = [json.loads(line) for line in as_json.stdout.splitlines()]
        assert count["aggregation"] == "@count" and count["data"][0]["key"] == ["cli_last"]
        assert count["data"][0]["value"] == sum(b[2] for b in hist["data"][0]["buckets"]) > 0
        target.assert_alive_untraced_and_original(("cli_last",))
    finally:
        target.kill()
