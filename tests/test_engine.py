"""The engine's risks found by reading the code (issue 10), each shown on a real
program: a handler set after fork, an out-of-line copy after dlclose, a foreign
SIGTRAP one byte past a site, probes on syscall instructions (vfork, exec, a
blocking read), Ctrl-C in the middle of the loop, and detach/wait when another
waitpid took what was ours.

Every test bounds its time: a hang fails the test (the watchdog kills the
program), it does not stall the suite.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from typing import List, Optional, Tuple

import pytest

from conftest import build
from helpers import GUARD, watchdog

import ptprobe
from ptprobe import arch
from ptprobe.elf import ElfFile

class Reader:
    """Lines from a pipe's read end, each within a time bound."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    def line(self, pump: Optional[ptprobe.Session] = None, timeout: float = GUARD) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            if time.monotonic() > deadline:
                raise AssertionError(f"no line within {timeout} s (have {self.buf!r})")
            if pump is not None:
                pump.wait(timeout=0.02)
            ready, _, _ = select.select([self.fd], [], [], 0 if pump is not None else 0.5)
            if ready:
                chunk = os.read(self.fd, 4096)
                if not chunk:
                    raise AssertionError(f"end of output (have {self.buf!r})")
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()


def inheritable_pipe() -> Tuple[int, int]:
    r, w = os.pipe()
    os.set_inheritable(r, True)
    os.set_inheritable(w, True)
    return r, w


def libc_path() -> str:
    with open("/proc/self/maps") as fh:
        for line in fh:
            path = line.split()[-1]
            if "/libc.so" in path or "/libc-" in path:
                return path
    pytest.skip("no libc mapped")


def syscall_offsets(path: str, function: str) -> List[int]:
    """Offsets of the `syscall` instructions in *function* of *path*."""
    elf = ElfFile(path)
    sym = elf.get_symbol(function)
    code = elf.read(sym.address, max(sym.size, 64), partial=True)
    found = [insn.address - sym.address for insn in arch.iter_instructions(code, sym.address)
             if insn.raw == b"\x0f\x05"]
    if not found:
        pytest.skip(f"no syscall instruction in {function} of {path}")
    return found


def syscall_probes(libc: str, function: str) -> List[Tuple[str, object]]:
    return [(f"uprobe:{libc}:{function}+{offset:#x}", None) for offset in syscall_offsets(libc, function)]


def run_to_end(argv: List[str], probes: List[Tuple[str, object]], **options) -> Tuple[int, List[ptprobe.Probe]]:
    pids: List[int] = []
    with watchdog(GUARD, pids):
        with ptprobe.run(argv, **options) as session:
            pids.append(session.main_pid)
            armed = [session.probe(spec, handler) for spec, handler in probes]
            status = session.wait()
    return status, armed


# --------------------------------------------------------------------------- 1. fork
@pytest.mark.parametrize("seccomp", [True, False], ids=["jmp", "int3"])
def test_handler_set_after_fork_runs_in_the_child(seccomp):
    """Risk 1: the child's copies of the sites join their probe, so a handler set
    after the fork runs on the child's hits too (they do not stay on the
    counting-only hot path)."""
    prog = build("risk_fork.c", "-O1", "-pg", "-mfentry", "-mnop-mcount", "-fno-pie", "-no-pie")
    out_r, out_w = inheritable_pipe()
    go_r, go_w = inheritable_pipe()
    n = 50
    seen: List[Tuple[int, int]] = []
    pids: List[int] = []
    try:
        with watchdog(GUARD, pids):
            with ptprobe.run([prog, str(out_w), str(go_r), str(n)], seccomp=seccomp) as session:
                pids.append(session.main_pid)
                os.close(out_w)
                os.close(go_r)
                probe = session.probe(f"uprobe:{prog}:work")       # counting only
                reader = Reader(out_r)
                child = int(reader.line(pump=session).split()[1])
                pids.append(child)
                assert len({s.pid for s in probe.sites}) == 2, probe.sites
                probe.handler = lambda hit: seen.append((hit.pid, hit.args[0]))
                os.write(go_w, b"gg")
                assert session.wait() == 0
    finally:
        for fd in (out_r, go_w):
            os.close(fd)
        for pid in pids[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    parent = session.main_pid
    assert sorted(i for pid, i in seen if pid == child) == list(range(n))
    assert sorted(i for pid, i in seen if pid == parent) == list(range(n))
    assert probe.hits == 2 * n


# --------------------------------------------------------------------------- 2. dlclose
def test_out_of_line_copy_not_reused_for_another_library_at_the_same_address(capfd):
    """Risk 2: a library unmapped and another mapped at the same address: the new
    site's displaced instruction gets its own out-of-line copy, and the program
    computes what library B says (12), not what A's copy did (11)."""
    prog = build("risk_dlswap.c", "-O2", "-ldl")
    lib_a = build("risk_lib.c", "-O2", "-DINC=1", shared=True, output="risklib_a.so")
    lib_b = build("risk_lib.c", "-O2", "-DINC=2", shared=True, output="risklib_b.so")
    status, (pa, pb) = run_to_end([prog, lib_a, lib_b], [("uprobe:risklib_a.so:value", None),
                                                         ("uprobe:risklib_b.so:value", None)], seccomp=False)
    out = capfd.readouterr().out
    assert status == 0
    words = out.split()
    assert words[1] == words[3], f"precondition: B was not mapped where A was: {out}"
    assert (words[0], words[2]) == ("a=11", "b=12"), out
    assert pa.hits == 1 and pb.hits == 1
    assert [s.mechanism for s in pa.sites + pb.sites] == ["int3", "int3"]


# --------------------------------------------------------------------------- 3. foreign SIGTRAP
@pytest.mark.parametrize("with_handler", [False, True])
def test_foreign_sigtrap_one_byte_past_a_site_is_delivered(capfd, with_handler):
    """Risk 3: a SIGTRAP the program raised itself, reported with rip == site + 1
    (where an int3 of ours would leave it), reaches the program's handler and is
    not counted as a hit."""
    prog = build("risk_trap.c", "-O2", "-pthread")
    status, (probe,) = run_to_end([prog], [(f"uprobe:{prog}:trap_site",
                                            (lambda hit: None) if with_handler else None)], seccomp=False)
    out = capfd.readouterr().out
    assert status == 0
    assert "traps=1" in out, out
    assert probe.hits == 1


# --------------------------------------------------------------------------- 4. syscall sites
def test_probe_on_the_syscall_of_vfork(capfd):
    """Risk 4: a probe on vfork's syscall instruction (stepping it in place with the
    world stopped waits for a child that is held stopped: a deadlock)."""
    libc = libc_path()
    prog = build("risk_syscalls.c", "-O2", "-pthread")
    status, probes = run_to_end([prog, "vfork"], syscall_probes(libc, "vfork"))
    assert status == 0
    assert "vfork ok" in capfd.readouterr().out
    assert sum(p.hits for p in probes) == 1


def test_probe_on_the_syscall_of_execve(capfd):
    """Risk 4: a probe on execve's syscall instruction: the exec is seen (probes
    given by path are armed again in the new image)."""
    libc = libc_path()
    prog = build("risk_syscalls.c", "-O2", "-pthread")
    status, probes = run_to_end([prog, "exec"], [(f"uprobe:{prog}:work", None)]
                                + syscall_probes(libc, "execve"))
    work, sys_probes = probes[0], probes[1:]
    out = capfd.readouterr().out
    assert status == 0
    assert "before exec" in out and "after exec" in out
    assert sum(p.hits for p in sys_probes) == 1
    assert work.hits == 2


def test_probe_on_the_syscall_of_a_blocking_read(capfd):
    """Risk 4: a probe on read's syscall instruction while another thread must run
    to end the read (stepping in place with the world stopped: a deadlock)."""
    libc = libc_path()
    prog = build("risk_syscalls.c", "-O2", "-pthread")
    status, probes = run_to_end([prog, "read"], syscall_probes(libc, "read"))
    assert status == 0
    assert "read x" in capfd.readouterr().out
    assert sum(p.hits for p in probes) >= 1


# --------------------------------------------------------------------------- 5. Ctrl-C
@pytest.mark.parametrize("handler", [False, True])
def test_ctrl_c_in_wait_never_loses_a_stop(handler):
    """Risk 5: KeyboardInterrupt raised in the middle of the loop's bookkeeping
    (after waitpid returned a stop) must not lose that stop: a later detach
    would wait for it forever. SIGINT is sent over and over while the program
    hits a probe; each time, wait() raises KeyboardInterrupt, then tracing goes
    on; detach ends it and the program finishes right."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("SIGINT reaches the main thread only")
    prog = build("risk_loop.c", "-O1", "-pg", "-mfentry", "-mnop-mcount", "-fno-pie", "-no-pie")
    n = 3_000_000
    pids: List[int] = []
    interrupts = 0
    stop = threading.Event()
    me = os.getpid()

    def pester() -> None:
        while not stop.wait(0.003):
            os.kill(me, signal.SIGINT)

    with watchdog(GUARD, pids):
        session = ptprobe.run([prog, str(n)], in_program=False)      # every hit a stop
        pids.append(session.main_pid)
        probe = session.probe(f"uprobe:{prog}:work", (lambda hit: None) if handler else None)
        sender = threading.Thread(target=pester, daemon=True)
        sender.start()
        try:
            while interrupts < 100 and session.returncode is None:
                try:
                    session.wait(timeout=0.05)
                except KeyboardInterrupt:
                    interrupts += 1
        finally:
            stop.set()
            sender.join()
        # the last SIGINT may still be on its way
        for _ in range(3):
            with contextlib.suppress(KeyboardInterrupt):
                time.sleep(0.05)
        hits_at_detach = probe.hits
        session.detach()
        proc_status = os.waitpid(session.main_pid, 0)[1]
    assert interrupts > 0
    assert os.WIFEXITED(proc_status) and os.WEXITSTATUS(proc_status) == 0
    assert 0 < hits_at_detach <= n


# --------------------------------------------------------------------------- 6. errors not swallowed
def test_exit_status_collected_elsewhere_is_not_invented():
    """Risk 6: when another waitpid of the host collected the program's exit
    status, wait() says so instead of returning 0."""
    prog = build("risk_wait.c", "-O2")
    go_r, go_w = os.pipe()
    pids: List[int] = []
    with watchdog(GUARD, pids):
        stdin = os.dup(0)
        os.dup2(go_r, 0)
        try:
            session = ptprobe.run([prog])
        finally:
            os.dup2(stdin, 0)
            os.close(stdin)
        pids.append(session.main_pid)
        assert session.wait(timeout=0.05) is None
        os.write(go_w, b"x")
        pid, status = os.waitpid(session.main_pid, 0)          # the host takes it
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3
        with pytest.raises(ptprobe.TracerError, match="collected"):
            session.wait()
        session.close()
    os.close(go_r)
    os.close(go_w)


def test_detach_recovers_a_stop_collected_elsewhere():
    """Risk 6: a thread stopped in a ptrace-stop whose status the host's own
    waitpid took: detach neither waits forever nor leaves it traced; the stop's
    signal (SIGSTOP here) is delivered as the program was due."""
    prog = build("risk_wait.c", "-O2")
    go_r, go_w = os.pipe()
    pids: List[int] = []
    with watchdog(GUARD, pids):
        stdin = os.dup(0)
        os.dup2(go_r, 0)
        try:
            session = ptprobe.run([prog])
        finally:
            os.dup2(stdin, 0)
            os.close(stdin)
        pid = session.main_pid
        pids.append(pid)
        assert session.wait(timeout=0.05) is None
        os.kill(pid, signal.SIGSTOP)
        got, status = os.waitpid(pid, 0x40000000)                 # __WALL: the stop, taken
        assert got == pid and os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGSTOP
        session.detach()
        assert _tracer(pid) == 0
        deadline = time.monotonic() + GUARD
        while _state(pid) != "T" and time.monotonic() < deadline:
            time.sleep(0.01)                 # (polling /proc for a state: the only way to see it)
        assert _state(pid) == "T"            # the SIGSTOP was delivered
        os.kill(pid, signal.SIGCONT)
        os.write(go_w, b"x")
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3
    os.close(go_r)
    os.close(go_w)


def _tracer(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    return 0


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0]
