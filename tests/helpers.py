"""Helpers shared by the end-to-end tests (test_core, test_cli, test_fastpath,
test_lifecycle, test_usdt): ELF and /proc readers, programs started untraced and
their output, ptprobe run from the API or the command line under a watchdog.

Fixtures built on them (``loop_binary``, ``loop_target``) are in conftest.py, which
also holds ``build``, ``NOBODY`` and ``unprivileged_python``; conftest imports this
module, so the few helpers here that need conftest import it when called.

Synchronisation with running programs goes through pipes and /proc, never through
sleeps; every timeout here only guards against hangs (nothing asserts on time).
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import capstone
from elftools.elf.elffile import ELFFile

import ptprobe

REPO = Path(__file__).resolve().parent.parent
NOP5 = bytes.fromhex("0f1f440000")
GUARD = 60.0                  # seconds: guards against hangs only; nothing asserts on time
LINE_TIMEOUT = 30.0           # the same, for one wait on a program's output
WALL = 0x40000000             # __WALL, for waitpid on threads


# ---------------------------------------------------------------------------- ELF

def symbol(path: str, name: str) -> Tuple[int, int]:
    """(link-time address, size) of symbol *name* in *path* (symtab, then dynsym)."""
    with open(path, "rb") as fh:
        elf = ELFFile(fh)
        for section_name in (".symtab", ".dynsym"):
            table = elf.get_section_by_name(section_name)
            if table is None:
                continue
            for sym in table.get_symbol_by_name(name) or ():
                if sym["st_shndx"] != "SHN_UNDEF":
                    return sym["st_value"], sym["st_size"]
    raise LookupError(f"{name} not in {path}")


def file_offset(path: str, address: int) -> int:
    """The file offset of link-time *address* (through the PT_LOAD headers)."""
    with open(path, "rb") as fh:
        for seg in ELFFile(fh).iter_segments():
            if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= address < seg["p_vaddr"] + seg["p_filesz"]:
                return address - seg["p_vaddr"] + seg["p_offset"]
    raise LookupError(f"{address:#x} is not in a PT_LOAD segment of {path}")


def file_bytes(path: str, address: int, size: int) -> bytes:
    """*size* bytes of the file *path* at link-time *address*."""
    with open(path, "rb") as fh:
        fh.seek(file_offset(path, address))
        return fh.read(size)


def decode(path: str, name: str) -> List[capstone.CsInsn]:
    """The instructions of function *name*, at link-time addresses."""
    address, size = symbol(path, name)
    assert size > 0, f"{name} has no size"
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    insns = list(md.disasm(file_bytes(path, address, size), address))
    assert sum(i.size for i in insns) == size, f"{name} did not decode completely"
    return insns


def runtime_address(pid: int, path: str, address: int) -> int:
    """Where link-time *address* of file *path* is mapped in process *pid*."""
    off = file_offset(path, address)
    st = os.stat(path)
    with open(f"/proc/{pid}/maps") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) < 6 or int(fields[4]) != st.st_ino:
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            map_off = int(fields[2], 16)
            if map_off <= off < map_off + (end - start):
                return start + off - map_off
    raise LookupError(f"{path}+{off:#x} is not mapped in {pid}")


def load_bias(pid: int, path: str) -> int:
    """Load bias of *path* in process *pid* (run-time address minus link-time address;
    0 for an ET_EXEC): its lowest mapping minus its lowest PT_LOAD (page-aligned),
    from /proc/PID/maps and the file's program headers."""
    real = os.path.realpath(path)
    starts = []
    with open(f"/proc/{pid}/maps") as fh:
        for line in fh:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == real:
                starts.append(int(fields[0].split("-")[0], 16))
    assert starts, f"{real} is not mapped in process {pid}"
    with open(real, "rb") as fh:
        vaddrs = [seg["p_vaddr"] for seg in ELFFile(fh).iter_segments() if seg["p_type"] == "PT_LOAD"]
    return min(starts) - (min(vaddrs) & ~0xFFF)


def code_in_memory(pid: int, path: str, name: str) -> Tuple[bytes, bytes]:
    """(bytes of function *name* in the process, the same bytes in the file)."""
    address, size = symbol(path, name)
    return read_mem(pid, runtime_address(pid, path, address), size), file_bytes(path, address, size)


# ---------------------------------------------------------------------------- /proc

def read_mem(pid: int, address: int, size: int) -> bytes:
    """*size* bytes at *address* in process *pid*, read through /proc/PID/mem (unbuffered:
    nothing beyond them is read)."""
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as fh:
        fh.seek(address)
        return fh.read(size)


def write_mem(pid: int, address: int, data: bytes) -> None:
    with open(f"/proc/{pid}/mem", "r+b", buffering=0) as fh:
        fh.seek(address)
        fh.write(data)


def proc_status(pid: int) -> Dict[str, str]:
    """/proc/PID/status as {key: value}."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def tracer_pid(pid: int) -> int:
    return int(proc_status(pid)["TracerPid"])


# ---------------------------------------------------------------------------- programs and their output

class Lines:
    """The lines a program writes to a pipe, collected as they come on a thread of
    their own (the program never blocks on a full pipe). ``lines`` holds every line,
    then "<EOF>" once the pipe is closed.

    wait_for() and count() look at all the lines; readline() and drain() hand them out
    in order, each once. Every wait has a timeout: a program that stops talking makes
    the test fail, not hang.
    """

    def __init__(self, stream) -> None:
        self.stream = stream
        self.fd = stream.fileno()
        self.lines: List[str] = []
        self._buf = b""
        self._complete = 0            # lines[:_complete] ended with a newline
        self._next = 0                # the first line readline()/drain() have not handed out
        self._eof = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _read(self) -> bool:
        """With the lock held: read once what the pipe holds now; False if nothing."""
        if self._eof or not select.select([self.fd], [], [], 0)[0]:
            return False
        chunk = os.read(self.fd, 65536)
        if chunk:
            *complete, self._buf = (self._buf + chunk).split(b"\n")
            self.lines.extend(line.decode(errors="replace") for line in complete)
            self._complete = len(self.lines)
        else:
            if self._buf:
                self.lines.append(self._buf.decode(errors="replace"))
                self._buf = b""
            self.lines.append("<EOF>")
            self._eof = True
        self._cond.notify_all()
        return True

    def _pump(self) -> None:
        while not self._eof:
            select.select([self.fd], [], [])        # wait without the lock, read with it
            with self._cond:                        # (drain() may have read it first)
                self._read()

    def wait_for(self, predicate: Callable[[List[str]], object], what: str,
                 timeout: float = LINE_TIMEOUT) -> List[str]:
        """Block until predicate(lines) holds (or the stream ends); return the lines."""
        with self._cond:
            ok = self._cond.wait_for(lambda: predicate(self.lines) or "<EOF>" in self.lines, timeout=timeout)
            if not ok or not predicate(self.lines):
                raise AssertionError(f"never saw {what}; last lines: {self.lines[-10:]}")
            return list(self.lines)

    def count(self, prefix: str) -> int:
        with self._cond:
            return sum(1 for line in self.lines if line.startswith(prefix))

    def readline(self, timeout: float = 15.0) -> str:
        """The next line not handed out yet, waiting for it at most *timeout* seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._next >= self._complete:
                if self._eof:
                    raise AssertionError("the target closed its output (did it die?)")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("no line from the target within %.0f s" % timeout)
                self._cond.wait(left)
            self._next += 1
            return self.lines[self._next - 1]

    def drain(self) -> List[str]:
        """Every complete line not handed out yet, including all the pipe holds now."""
        with self._cond:
            while self._read():
                pass
            lines = self.lines[self._next:self._complete]
            self._next = self._complete
            return lines

    def close(self) -> None:
        """Close the pipe once the collecting thread has seen its end (the writer is gone)."""
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.stream.close()


def reap(proc: subprocess.Popen) -> None:
    """Kill and reap *proc* (cleanup). When an engine failure left threads of it traced by
    this process, their exits must be collected here (with __WALL) before the thread
    group leader can be reaped: Popen.wait alone would block for ever."""
    if proc.poll() is not None:
        return
    proc.kill()
    deadline = time.monotonic() + GUARD
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{proc.pid}/task"):
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(int(task), WALL | os.WNOHANG)
        time.sleep(0.01)                  # cleanup only: nothing is synchronised by it


class Target:
    """A program started untraced: *prefix* (e.g. conftest.NOBODY), then *argv*; stdin
    on a pipe for commands, stdout collected in ``out`` (:class:`Lines`). Ready once it
    printed the line *ready* (by default "ready PID"). ``path`` is argv[0].

    For core_loop (fixture ``loop_target``), which prints "progress N ..." lines:
    :meth:`assert_alive_untraced_and_original`.
    """

    def __init__(self, argv: Sequence[str], prefix: Sequence[str] = (), ready: Optional[str] = None) -> None:
        self.path = argv[0]
        self.proc = subprocess.Popen([*prefix, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.pid = self.proc.pid
        self.out = Lines(self.proc.stdout)
        want = f"ready {self.pid}" if ready is None else ready
        try:
            self.out.wait_for(lambda ls: want in ls, "ready")
        except BaseException:
            self.kill()
            raise

    def send(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def finish(self) -> int:
        """Tell it to stop ("q", then the end of stdin); return its exit status."""
        with contextlib.suppress(BrokenPipeError):
            self.send(b"q")
            self.proc.stdin.close()
        status = self.proc.wait(timeout=GUARD)
        self.out.wait_for(lambda ls: "<EOF>" in ls, "end of output")
        return status

    def kill(self) -> None:
        """Kill and reap it (cleanup; see :func:`reap`), then close the pipes."""
        reap(self.proc)
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        self.out.close()

    def last_progress(self) -> int:
        """The last counter value printed so far (0 if none)."""
        value = 0
        for line in self.out.drain():
            if line.startswith("progress "):
                value = int(line.split()[1])
        return value

    def assert_alive_untraced_and_original(self, names: Sequence[str] = ("work",),
                                           patched: Optional[Dict[str, bytes]] = None) -> None:
        """Not traced, still making progress, and the code of *names* as in the file
        (or as the test patched it)."""
        assert self.proc.poll() is None, f"target died: {self.proc.returncode}"
        assert tracer_pid(self.pid) == 0
        assert proc_status(self.pid)["State"][0] in "RS", proc_status(self.pid)["State"]
        for name in names:
            memory, original = code_in_memory(self.pid, self.path, name)
            expected = (patched or {}).get(name, original)
            assert memory == expected, f"{name}: {memory.hex()} in memory, expected {expected.hex()}"
        before = self.last_progress()
        while True:
            line = self.out.readline()
            if line.startswith("progress ") and int(line.split()[1]) > before:
                break


class Hammer(Target):
    """fast_hammer (see :func:`fast_build`): *threads* threads pass regs_site, check
    their registers and print "t<k> <n>" every *every* passes; the main thread passes
    it once per "g" on stdin."""

    def __init__(self, binary: str, threads: int, every: int, prefix: Sequence[str] = ()) -> None:
        super().__init__([binary, str(threads), str(every)], prefix=prefix, ready="ready")
        self.binary = binary

    def failures(self) -> List[str]:
        return [line for line in self.out.lines if line.startswith("FAIL")]

    def wait_for_progress(self, threads: int, what: str, lines: int = 1, or_failure: bool = False) -> None:
        """Block until threads 1..*threads* each printed *lines* more progress lines than
        now (or, with *or_failure*, a FAIL line appeared)."""
        before = {f"t{i} ": self.out.count(f"t{i} ") for i in range(1, threads + 1)}
        self.out.wait_for(lambda ls: all(sum(1 for x in ls if x.startswith(t)) >= before[t] + lines
                                         for t in before) or (or_failure and bool(self.failures())), what)


def fast_build(name: str, *flags: str) -> str:
    """conftest.build for a tests/c/fast_*.c target: linked with fast_regcheck.c when it
    uses it, with -pthread for fast_hammer."""
    from conftest import build          # not at the top: conftest imports this module
    extra = ("fast_regcheck.c",) if name in ("fast_regs.c", "fast_nrcall.c", "fast_hammer.c") else ()
    if name == "fast_hammer.c":
        flags = flags + ("-pthread",)
    return build(name, *flags, extra_sources=extra)


def untraced(argv: Sequence[str], check: bool = False) -> subprocess.CompletedProcess:
    """Run *argv* without ptprobe, its output captured (as text)."""
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=check)


def reaped_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def unprivileged(loop_binary: str) -> Tuple[str, dict, Target]:
    """(python, env) for a tracer running as nobody, and a root-owned target it may not trace."""
    from conftest import unprivileged_python        # not at the top: conftest imports this module
    python, env = unprivileged_python()
    return python, env, Target([loop_binary])


# ---------------------------------------------------------------------------- ptprobe from Python

def our_tracees() -> List[int]:
    """Every process with a thread this test process traces (children that a
    traced program forked included)."""
    me = str(os.getpid())
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{name}/task"):
                with open(f"/proc/{name}/task/{tid}/status") as fh:
                    if any(line.split()[1:] == [me] for line in fh if line.startswith("TracerPid:")):
                        found.append(int(name))
                        break
    return found


@contextlib.contextmanager
def watchdog(seconds: float, pids: List[int]) -> Iterator[None]:
    """SIGKILL every pid in *pids*, and every process this one traces, if the block takes longer than *seconds*, so a hang
    in the engine ends the test (as a failure) instead of the run. *pids* is read when
    it fires (it may be filled in later). After killing, it collects the exits of their
    non-leader threads until the block ends: an engine blocked in waitpid() on a
    thread group leader would otherwise wait for ever, as the leader of a killed traced
    process is reported only after its other threads have been reaped."""
    fired: List[bool] = []
    done = threading.Event()

    def fire() -> None:
        if done.wait(seconds):
            return
        fired.append(True)
        victims = list(pids) + our_tracees()
        for pid in victims:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        while not done.is_set():
            for pid in victims:
                with contextlib.suppress(OSError):
                    for task in os.listdir(f"/proc/{pid}/task"):
                        if int(task) != pid:
                            with contextlib.suppress(ChildProcessError, OSError):
                                os.waitpid(int(task), WALL | os.WNOHANG)
            done.wait(0.05)

    thread = threading.Thread(target=fire, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
    assert not fired, f"watchdog: the traced program ran for more than {seconds} s and was killed"


class Captured:
    text = ""


@contextlib.contextmanager
def captured_stdout() -> Iterator[Captured]:
    """Redirect fd 1 (inherited by programs ptprobe.run starts) to a file."""
    result = Captured()
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 1)
        try:
            yield result
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            tmp.seek(0)
            result.text = tmp.read().decode(errors="replace")


class RecordingObserver(ptprobe.Observer):
    """Keeps notices and handler errors (as "probe name: Exception: text") in lists."""

    def __init__(self) -> None:
        self.notices: List[str] = []
        self.handler_errors: List[str] = []

    def notice(self, text: str) -> None:
        self.notices.append(text)

    def handler_error(self, probe, hit, error) -> None:
        self.handler_errors.append(f"{probe.name}: {type(error).__name__}: {error}")


def run_traced(argv: Sequence[str], probes: Sequence[Tuple[str, object]], timeout: float = 60.0,
               on_armed: Optional[Callable[[ptprobe.Session], None]] = None,
               **options) -> Tuple[int, str, List[ptprobe.Probe], RecordingObserver]:
    """Run *argv* with *probes* ((spec, handler) pairs) armed, its stdout captured, under
    a watchdog of *timeout* seconds; on_armed(session), if given, runs once they are
    armed, before the program starts. (status, stdout, probes, observer); no handler
    may have raised."""
    observer = options.pop("observer", None) or RecordingObserver()
    pids: List[int] = []
    with captured_stdout() as out:
        with watchdog(timeout, pids):
            with ptprobe.run(list(argv), observer=observer, **options) as session:
                pids.append(session.main_pid)
                armed = [session.probe(spec, handler) for spec, handler in probes]
                if on_armed is not None:
                    on_armed(session)
                status = session.wait()
    assert not observer.handler_errors, observer.handler_errors
    return status, out.text, armed, observer


def mechanisms(probe: ptprobe.Probe) -> List[str]:
    return [site.mechanism for site in probe.sites]


def recorder(into: list, what: Optional[Callable[[ptprobe.Hit], object]] = None) -> Callable[[ptprobe.Hit], None]:
    """A handler that appends what(hit) to *into* for every hit; by default
    (pid, tid, first argument or None)."""
    def handler(hit: ptprobe.Hit) -> None:
        if what is not None:
            into.append(what(hit))
            return
        args = hit.args
        into.append((hit.pid, hit.tid, args[0] if args else None))
    return handler


# ---------------------------------------------------------------------------- the command line

SUMMARY = re.compile(r"^ptprobe: (?P<spec>\S+): (?P<hits>\d+) hits? \((?P<how>[^)]*)\)(?:, (?P<inside>[a-z ]+ in the program))?$")


def repo_env() -> Dict[str, str]:
    """The environment with this checkout first on PYTHONPATH (for ``python -m ptprobe``
    and tools/ run as children)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def ptprobe_cli(*args: str, prefix: Sequence[str] = (), timeout: float = 60,
                cwd: Optional[str] = None) -> subprocess.CompletedProcess:
    """``python -m ptprobe ARGS`` from the repository (or *cwd*), run to its end; output
    captured (text)."""
    env = dict(repo_env(), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([*prefix, sys.executable, "-m", "ptprobe", *args], cwd=cwd or str(REPO), env=env,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def summaries(stderr: str) -> dict:
    """{spec: (hits, mechanisms text)} from the summary lines on stderr."""
    out = {}
    for line in stderr.splitlines():
        m = SUMMARY.match(line)
        if m:
            out[m["spec"]] = (int(m["hits"]), m["how"])
    return out


def ptprobe_popen(*args: str, prefix: Sequence[str] = (), stdout: object = subprocess.PIPE,
                  stderr: object = subprocess.PIPE, stdin: object = subprocess.DEVNULL,
                  cwd: Optional[str] = None) -> subprocess.Popen:
    """``python -m ptprobe ARGS`` from the repository (or *cwd*), started and left running;
    stdout and stderr on pipes (bytes) unless told otherwise. The caller waits for it
    (with a timeout)."""
    env = dict(repo_env(), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.Popen([*prefix, sys.executable, "-m", "ptprobe", *args], cwd=cwd or str(REPO), env=env,
                            stdin=stdin, stdout=stdout, stderr=stderr)


def stop_popen(proc: subprocess.Popen) -> None:
    """Kill and reap *proc* if it still runs (cleanup)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=GUARD)
