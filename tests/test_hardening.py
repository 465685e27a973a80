"""Hardening (issue 14): hangs, foreign seccomp filters, fairness under load and
the death of the tracer, each shown on real programs under real ptrace.

Every test bounds its time: a hang fails the test (the program and ptprobe are
killed), it does not stall the suite. Long stress loops run only with their
environment variable set (the counts quoted in the closing note):

* ``PTPROBE_HARD_CTRLC=N``: Ctrl-C trials on multi-threaded programs (default 10);
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from typing import Iterator, List

import pytest

from conftest import build
from helpers import (GUARD, REPO, Hammer, Lines, fast_build, load_bias, proc_status, read_mem, repo_env,
                     run_traced, symbol)


def env_count(name: str, default: int) -> int:
    """A stress count from the environment (*default* when unset)."""
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def hard_build(source: str, *flags: str) -> str:
    """A tests/c/hard_*.c program, with 5-byte NOPs at function entries (jmp sites)."""
    return build(source, "-O1", "-pg", "-mfentry", "-mnop-mcount", "-fno-pie", "-no-pie", "-pthread", *flags)


@contextlib.contextmanager
def cli_group(*args: str) -> Iterator[subprocess.Popen]:
    """``python -m ptprobe ARGS`` as the leader of a process group of its own (with the
    program it starts), as a shell runs a command; the whole group is SIGKILLed at the
    end if it is still there."""
    cli = subprocess.Popen([sys.executable, "-m", "ptprobe", *args], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, stdin=subprocess.PIPE, env=repo_env(), cwd=str(REPO),
                           start_new_session=True)
    try:
        yield cli
    finally:
        if cli.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(cli.pid, signal.SIGKILL)
            cli.wait(timeout=GUARD)
        for stream in (cli.stdin, cli.stdout, cli.stderr):
            with contextlib.suppress(OSError):
                stream.close()


# --------------------------------------------------------------------------- 1. Ctrl-C on run

CTRLC_TRIALS = env_count("PTPROBE_HARD_CTRLC", 10)
_CTRLC_MODES = [("--slots", "return"), ("--slots", "seed"), ("--no-seccomp",)]


def ctrl_c_trial(binary: str, trial: int) -> str:
    """One trial: ``ptprobe run`` of a program whose 4 threads hit a probe; SIGINT or
    SIGTERM to the process group once they run. '' if ptprobe died by that signal,
    else what happened."""
    sig = (signal.SIGINT, signal.SIGTERM)[trial % 2]
    mode = _CTRLC_MODES[trial // 2 % len(_CTRLC_MODES)]
    with cli_group("run", "-q", *mode, "-p", f"uprobe:{binary}:hit", "--", binary, "4", "0") as cli:
        out = Lines(cli.stdout)
        out.wait_for(lambda ls: "ready" in ls, "the program's threads running")
        os.killpg(cli.pid, sig)
        try:
            status = cli.wait(timeout=GUARD / 2)
        except subprocess.TimeoutExpired:
            return f"trial {trial} ({signal.Signals(sig).name}, {' '.join(mode)}): ptprobe hung"
        out.close()
        if status != -sig:
            err = cli.stderr.read().decode(errors="replace")
            return f"trial {trial} ({signal.Signals(sig).name}, {' '.join(mode)}): status {status}: {err[-300:]}"
    return ""


def test_ctrl_c_on_run_of_a_threaded_program_never_hangs():
    """Item 1: the whole process group gets SIGINT or SIGTERM, as from a terminal;
    ptprobe ends by the program's signal every time (it used to block in
    wait4(main pid) with the program's other threads zombies still traced by it)."""
    binary = hard_build("hard_threads.c")
    failures: List[str] = []
    for trial in range(CTRLC_TRIALS):
        problem = ctrl_c_trial(binary, trial)
        if problem:
            failures.append(problem)
    assert not failures, f"{len(failures)} of {CTRLC_TRIALS} trials failed: {failures}"


# --------------------------------------------------------------------------- 2. a FIFO as a path, in run

@pytest.mark.parametrize("kind", ["uprobe", "usdt"])
def test_run_with_a_fifo_as_probe_path_fails_at_once(tmp_path, kind):
    """Item 2 in run mode: a probe whose path is a FIFO is refused (exit 5, one line)
    without opening it, and the program started for it does not outlive ptprobe."""
    binary = hard_build("hard_threads.c")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    spec = f"uprobe:{fifo}:main" if kind == "uprobe" else f"usdt:{fifo}:p:n"
    with cli_group("run", "-p", spec, "--", binary, "2", "0") as cli:
        try:
            cli.wait(timeout=GUARD / 2)
        except subprocess.TimeoutExpired:
            pytest.fail("ptprobe run blocked on a FIFO given as a probe path")
        err = cli.stderr.read().decode()
        assert cli.returncode == 5, err
        assert err.splitlines() == [f"ptprobe: {fifo}: is a FIFO, not an ELF file"], err
        assert cli.stdout.read() == b""          # the program never ran its own code
    # nothing of the group is left (the program was killed before its own code ran)
    with pytest.raises(ProcessLookupError):
        os.killpg(cli.pid, 0)


# --------------------------------------------------------------------------- 5. fairness

@pytest.mark.parametrize("threads, lead, mode", [(16, 20000, "return"), (16, 20000, "int3"), (64, 4000, "seed")])
def test_every_thread_makes_progress(threads, lead, mode):
    """Item 5: *threads* threads hit one probe until the busiest has made *lead* calls;
    by then every one has made at least a tenth as many (nothing here is timed: the
    program itself stops at the lead). Served in the kernel's order, the newest
    threads were served over and over while the others sat stopped for seconds."""
    binary = hard_build("hard_threads.c")
    options = {"seccomp": False} if mode == "int3" else {"slots": mode}
    status, out, (probe,), _ = run_traced([binary, str(threads), "0", str(lead)],
                                          [(f"uprobe:{binary}:hit", None)], **options)
    assert status == 0, out
    counts = [int(line.split()[2]) for line in out.splitlines() if line.startswith("count ")]
    assert len(counts) == threads, out
    assert min(counts) * 10 >= max(counts), f"per-thread calls: {sorted(counts)}"
    assert probe.hits >= sum(counts)


# --------------------------------------------------------------------------- 9. the tracer killed

@pytest.mark.parametrize("mode", ["seed", "return", "int3"])
def test_sigkilled_tracer(mode):
    """Item 9: ptprobe attached to a program whose threads pass a probed nop5 and check
    every register there is SIGKILLed. With slots of either kind the program runs on,
    its registers intact (a seed slot's syscall now returns into a tail that goes
    back to the site, as a self-returning slot does); with an int3 site the program
    dies of SIGTRAP or SIGILL, as the README says."""
    binary = fast_build("fast_hammer.c")
    hammer = Hammer(binary, 2, 5000)
    options = ["--no-seccomp"] if mode == "int3" else ["--slots", mode]
    cli = None
    try:
        site = load_bias(hammer.pid, binary) + symbol(binary, "regs_site")[0]
        cli = subprocess.Popen([sys.executable, "-m", "ptprobe", "attach", str(hammer.pid), *options,
                                "-p", f"uprobe:{binary}:regs_site"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=repo_env(), cwd=str(REPO))
        hits = Lines(cli.stdout)
        hits.wait_for(lambda ls: len(ls) >= 200, "200 hit lines from the CLI")
        assert read_mem(hammer.pid, site, 1) == (b"\xcc" if mode == "int3" else b"\xe9")
        cli.send_signal(signal.SIGKILL)
        assert cli.wait(timeout=GUARD) == -signal.SIGKILL
        hits.close()
        if mode == "int3":
            # SIGTRAP at the next int3, or SIGILL for a thread whose trap was taken and
            # not yet handled: it is let go one byte into the NOP
            assert hammer.proc.wait(timeout=GUARD) in (-signal.SIGTRAP, -signal.SIGILL)
            return
        for task in os.listdir(f"/proc/{hammer.pid}/task"):
            assert proc_status(int(task))["TracerPid"] == "0"
        hammer.wait_for_progress(2, "progress after the tracer died", lines=3, or_failure=True)
        assert hammer.failures() == []
        assert hammer.proc.poll() is None, f"the program died: {hammer.proc.returncode}"
        assert hammer.finish() == 0
        assert hammer.failures() == []
    finally:
        if cli is not None and cli.poll() is None:
            cli.kill()
            cli.wait()
        hammer.kill()
