"""Exceptions raised by ptprobe.

Every error a user can cause is a :class:`PtprobeError`. Each subclass also
derives from the closest builtin exception (so ``except LookupError`` works),
carries the data that describes it, and has an ``exit_code`` that the command
line tool uses as its exit status (see the README's "Exit codes").
"""

from __future__ import annotations

from typing import Optional


class PtprobeError(Exception):
    """Base class of every error ptprobe reports."""

    exit_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ProbeSpecError(PtprobeError, ValueError):
    """A probe specification that cannot be parsed or does not make sense."""

    exit_code = 2

    def __init__(self, message: str, spec: str = "") -> None:
        super().__init__(message)
        self.spec = spec


class NoSuchProcessError(PtprobeError, ProcessLookupError):
    """The process (or thread) does not exist."""

    exit_code = 3

    def __init__(self, message: str, pid: int) -> None:
        super().__init__(message)
        self.pid = pid


class TracePermissionError(PtprobeError, PermissionError):
    """ptrace or /proc access was refused."""

    exit_code = 4

    def __init__(self, message: str, pid: int) -> None:
        super().__init__(message)
        self.pid = pid


class ObjectFileError(PtprobeError, ValueError):
    """A file that is missing, unreadable, or not an x86-64 ELF object."""

    exit_code = 5

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


class SymbolNotFoundError(PtprobeError, LookupError):
    """A symbol (or a USDT probe, or a mapped object) that is not there."""

    exit_code = 6

    def __init__(self, message: str, name: str) -> None:
        super().__init__(message)
        self.name = name


class InstructionBoundaryError(PtprobeError, ValueError):
    """A probe address that is not the start of an instruction."""

    exit_code = 7

    def __init__(self, message: str, address: int) -> None:
        super().__init__(message)
        self.address = address


class SitePatchedError(PtprobeError, RuntimeError):
    """The bytes at a probe site differ from the file: someone else patched it."""

    exit_code = 8

    def __init__(self, message: str, address: int) -> None:
        super().__init__(message)
        self.address = address


class ProgramStartError(PtprobeError, OSError):
    """``run`` could not start the program."""

    exit_code = 9

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


class FaultError(PtprobeError, OSError):
    """Reading or writing tracee memory failed."""

    exit_code = 10

    def __init__(self, message: str, address: int) -> None:
        super().__init__(message)
        self.address = address


class TracerError(PtprobeError, RuntimeError):
    """Anything else that went wrong while tracing (a ptrace call that failed)."""

    exit_code = 11


class SyscallRefusedError(TracerError):
    """A system call ptprobe will not make inside a process: a seccomp filter of the
    process would kill it for it (or its filters cannot be read)."""

    def __init__(self, message: str, pid: int, nr: int, reason: str) -> None:
        super().__init__(message)
        self.pid = pid
        self.nr = nr
        self.reason = reason


class HandlerError(PtprobeError, RuntimeError):
    """A user handler raised; carries the probe name and the original exception."""

    exit_code = 12

    def __init__(self, message: str, probe: str, error: Optional[BaseException] = None) -> None:
        super().__init__(message)
        self.probe = probe
        self.error = error


class TraceFormatError(PtprobeError, ValueError):
    """A trace file that is not one of ptprobe's, or of a version it does not read."""

    exit_code = 13

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class UsageError(PtprobeError, ValueError):
    """A command-line option or an expression (``--filter``, ``--agg``, ``-f``) that
    cannot be used as given."""

    exit_code = 2

    def __init__(self, message: str, text: str = "") -> None:
        super().__init__(message)
        self.text = text


class OutputError(PtprobeError, OSError):
    """The output cannot be written (a full disk, an I/O error)."""

    exit_code = 74

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path
