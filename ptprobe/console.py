"""What every ``ptprobe`` command shares: stderr (one line per notice or error,
and a live status line drawn in place), the observer that prints the engine's
notices there, option values checked the same way by each command, and ending
by the signal that ended the program.

Uses only ptprobe's public API.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import traceback
from typing import IO, Callable, Dict, List, Optional, Sequence, Tuple

import ptprobe
from ptprobe import discover
from ptprobe.errors import NoSuchProcessError, UsageError

#: handler errors reported one by one; the rest are counted
SHOWN_ERRORS = 10


class Console:
    """stderr: notices and errors one line each, and the live status line, which
    is drawn in place and cleared before anything else is written."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.status_on = False
        self._shown = False

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def line(self, text: str) -> None:
        self.clear()
        self._write(text + "\n")

    def status(self, text: str) -> None:
        if not self.status_on:
            return
        width = shutil.get_terminal_size((80, 24)).columns
        if len(text) >= width:
            text = text[:max(width - 4, 0)] + "..."
        self._write("\r" + text + "\x1b[K")
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            self._shown = False
            self._write("\r\x1b[K")


class ConsoleObserver(ptprobe.Observer):
    """The engine's notices and handler errors as ``ptprobe: ...`` lines (the
    first :data:`SHOWN_ERRORS` handler errors; the rest are only counted)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.handler_errors = 0

    def notice(self, text: str) -> None:
        self.console.line(f"ptprobe: {text}")

    def handler_error(self, probe: ptprobe.Probe, hit: ptprobe.Hit, error: BaseException) -> None:
        self.handler_errors += 1
        if self.handler_errors > SHOWN_ERRORS:
            return
        self.console.line(f"ptprobe: probe {probe.name}: {type(error).__name__}: {error}")
        if os.environ.get("PTPROBE_DEBUG"):
            self.console.clear()
            traceback.print_exception(type(error), error, error.__traceback__, file=self.console.stream)


def isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------- checked values
def seconds(value: Optional[float], option: str) -> Optional[float]:
    """*value* (None: not given) if it is a number of seconds above 0."""
    if value is None:
        return None
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"{option} must be a number of seconds above 0, not {value}", str(value))
    return value


def ring_size(value: int) -> int:
    """*value* if it can be the size of a ring of records (--ring-size)."""
    if value < 0x10000 or value >= 1 << 31 or value & (value - 1):
        raise UsageError(f"--ring-size must be a power of two from 65536 to 1073741824, not {value}", str(value))
    return value


def pids_and_names(targets: Sequence[str]) -> Tuple[List[int], List[str]]:
    """Process ids and process names from TARGET arguments (``1234``,
    ``1234,5678``, ``nginx``)."""
    pids: List[int] = []
    names: List[str] = []
    for target in targets:
        for part in target.split(",") if "," in target else [target]:
            text = part.strip()
            try:
                number = int(text, 10)
            except ValueError:
                if not text:
                    raise UsageError(f"{target!r} is not a process id or name", target) from None
                names.append(text)
                continue
            if number <= 0 or number > 1 << 31:
                raise UsageError(f"{text!r} is not a process id", text)
            pids.append(number)
    return pids, names


def processes(pids: Sequence[int], names: Sequence[str]) -> List[int]:
    """*pids*, then the processes named each of *names* (one at least for each)."""
    out = list(pids)
    for name in names:
        found = discover.find_processes(name)
        if not found:
            raise NoSuchProcessError(f"no process named {name!r}", 0)
        out.extend(p for p in found if p not in out)
    return out


# --------------------------------------------------------------------------- signals
class WaitInterrupted(Exception):
    """A signal while a command waits for a program it let go: stop waiting."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class Signals:
    """Ctrl-C, SIGTERM and SIGHUP for a command that traces, installed for the
    ``with`` block: while tracing, each one calls *on_signal* (which asks the
    session to stop); while the command waits for a program it let go
    (:meth:`wait_for`), one ends the wait with :class:`WaitInterrupted`."""

    CAUGHT = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, on_signal: Callable[[], None]) -> None:
        self.received: List[int] = []
        self._on_signal = on_signal
        self._waiting = False
        self._old: Dict[int, object] = {}

    def __enter__(self) -> "Signals":
        self._old = {sig: signal.signal(sig, self._handle) for sig in self.CAUGHT}
        return self

    def __exit__(self, *exc: object) -> None:
        self._waiting = False
        for sig, handler in self._old.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, _frame: object) -> None:
        self.received.append(signum)
        if self._waiting:
            raise WaitInterrupted(signum)
        self._on_signal()

    def wait_for(self, session: ptprobe.Session) -> None:
        """Wait until the program the session let go ends; a second signal (the
        first one stopped the tracing) or one that comes now ends the wait, and the
        program runs on alone."""
        if len(self.received) > 1:
            raise WaitInterrupted(self.received[-1])
        self._waiting = True
        try:
            session.wait()
        finally:
            self._waiting = False


# --------------------------------------------------------------------------- ending
def die_by(sig: int) -> None:
    """End the way the program did: by the same signal (without a core dump)."""
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, ValueError, OSError):
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if sig not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)
