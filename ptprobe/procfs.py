"""Reading ``/proc``: the one module that parses its text files.

Maps, status, stat and task lists of processes and threads, each read once per
call and parsed here, with the positions of the fields ptprobe uses named
once. Errors are translated where they enter: a vanished process is a
:class:`~ptprobe.errors.NoSuchProcessError`, a refused read a
:class:`~ptprobe.errors.TracePermissionError`. (Process memory,
``/proc/PID/mem``, is I/O rather than parsing: see :class:`ptprobe.linux.Memory`.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

from .errors import NoSuchProcessError, TracePermissionError

#: Fields of ``/proc/PID/stat`` after the ``(comm)`` field, counted from 0 there
#: (the state is field 3 of proc(5), so index 0 here).
STAT_STATE = 0
STAT_PPID = 1
STAT_PROCESSOR = 36          # field 39 of proc(5): the CPU the task last ran on

CAP_SYS_ADMIN = 21
_DELETED = " (deleted)"
#: Signal bits of ``SigPnd``/``ShdPnd`` lines: signal n is bit n - 1.
_SIGTRAP = 5


@dataclass(frozen=True)
class Mapping:
    """One line of ``/proc/PID/maps``."""

    start: int
    end: int
    perms: str
    offset: int
    dev: str
    inode: int
    path: str

    @property
    def is_exec(self) -> bool:
        return "x" in self.perms

    @property
    def identity(self) -> Tuple[int, int]:
        """(device, inode) of the mapped file, comparable with :func:`file_identity`."""
        major, minor = (int(x, 16) for x in self.dev.split(":"))
        return (os.makedev(major, minor), self.inode)

    @property
    def is_file(self) -> bool:
        """A mapping of a file that still exists under its path."""
        return self.path.startswith("/") and self.inode != 0 and not self.path.endswith(_DELETED)

    @property
    def deleted(self) -> bool:
        """A mapping of a file removed or replaced since it was mapped ("PATH (deleted)")."""
        return self.path.startswith("/") and self.inode != 0 and self.path.endswith(_DELETED)

    @property
    def file_path(self) -> str:
        """The path of the mapped file, without the " (deleted)" of a deleted one."""
        return self.path[:-len(_DELETED)] if self.deleted else self.path

    @property
    def map_file(self) -> str:
        """Where this mapping's file can be opened even when deleted (needs
        CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE): its /proc/PID/map_files/ entry,
        relative to the process directory."""
        return f"map_files/{self.start:x}-{self.end:x}"


def _read(path: str, pid: int, what: str) -> str:
    try:
        with open(path) as fh:
            return fh.read()
    except (FileNotFoundError, ProcessLookupError):
        raise NoSuchProcessError(f"no such process: {pid}", pid) from None
    except PermissionError:
        raise TracePermissionError(f"cannot read the {what} of process {pid}: permission denied", pid) from None
    except OSError as exc:      # ESRCH from a task that is going away
        raise NoSuchProcessError(f"cannot read the {what} of process {pid}: {exc.strerror}", pid) from None


def read_maps(pid: int) -> List[Mapping]:
    """Every mapping of process *pid*, in address order."""
    maps = []
    for line in _read(f"/proc/{pid}/maps", pid, "maps").splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        maps.append(Mapping(start, end, parts[1], int(parts[2], 16), parts[3], int(parts[4]),
                            parts[5] if len(parts) > 5 else ""))
    return maps


def _task(pid: int, tid: Optional[int]) -> str:
    return f"/proc/{pid}" if tid is None else f"/proc/{pid}/task/{tid}"


def read_status(pid: int, tid: Optional[int] = None) -> Dict[str, str]:
    """The ``status`` file of process *pid* (or of its thread *tid*) as a dict."""
    out = {}
    for line in _read(_task(pid, tid) + "/status", pid, "status").splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def read_stat(pid: int, tid: Optional[int] = None) -> List[str]:
    """The fields of a ``stat`` file after ``(comm)`` (index with ``STAT_*``)."""
    text = _read(_task(pid, tid) + "/stat", pid, "stat")
    return text.rsplit(")", 1)[1].split()


def thread_state(pid: int, tid: int) -> Optional[str]:
    """The one-letter state of a thread (``R``, ``S``, ``t``, ``Z`` ...), None if it is gone."""
    try:
        return read_stat(pid, tid)[STAT_STATE]
    except (NoSuchProcessError, TracePermissionError, IndexError):
        return None


def is_exiting(pid: int, tid: int) -> bool:
    """A thread that is exiting or gone (ptrace refuses to attach to it)."""
    return thread_state(pid, tid) in (None, "Z", "X", "x")


def current_cpu(tid: int) -> Optional[int]:
    """The CPU *tid* last ran on."""
    try:
        return int(read_stat(tid)[STAT_PROCESSOR])
    except (NoSuchProcessError, TracePermissionError, IndexError, ValueError):
        return None


def tracer_of(pid: int, tid: Optional[int] = None) -> int:
    """The pid of the process tracing *pid* (or its thread *tid*); 0 when untraced or gone."""
    try:
        return int(read_status(pid, tid).get("TracerPid", "0"))
    except (NoSuchProcessError, TracePermissionError, ValueError):
        return 0


def sigtrap_pending(pid: int, tid: int) -> bool:
    """A SIGTRAP is pending for the thread itself (``SigPnd``)."""
    try:
        mask = int(read_status(pid, tid).get("SigPnd", "0"), 16)
    except (NoSuchProcessError, TracePermissionError, ValueError):
        return False
    return bool(mask & (1 << (_SIGTRAP - 1)))


def iter_threads(pid: int) -> Iterator[int]:
    """The thread ids of process *pid*."""
    try:
        names = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        raise NoSuchProcessError(f"no such process: {pid}", pid) from None
    except PermissionError:
        raise TracePermissionError(f"cannot list the threads of process {pid}: permission denied", pid) from None
    for name in names:
        yield int(name)


def thread_group(tid: int) -> Optional[int]:
    """The process (thread group) id of thread *tid*, None if it is gone."""
    try:
        return int(read_status(tid)["Tgid"])
    except (NoSuchProcessError, TracePermissionError, KeyError, ValueError):
        return None


def parent_of(pid: int) -> int:
    """The parent pid of *pid*, 0 if unknown."""
    try:
        return int(read_status(pid).get("PPid", "0"))
    except (NoSuchProcessError, TracePermissionError, ValueError):
        return 0


def seccomp_status(pid: int, tid: Optional[int] = None) -> Tuple[int, Optional[int]]:
    """(seccomp mode, number of filters) of process *pid* (or its thread *tid*):
    ``Seccomp:`` (0 none, 1 strict, 2 filter) and ``Seccomp_filters:`` (None on a
    kernel without that line)."""
    status = read_status(pid, tid)
    try:
        mode = int(status.get("Seccomp", "0"))
        count = int(status["Seccomp_filters"]) if "Seccomp_filters" in status else None
    except ValueError:
        return 2, None          # not understood: filters of an unknown number
    return mode, count


def has_cap_sys_admin(pid: int) -> bool:
    caps = int(read_status(pid).get("CapEff", "0"), 16)
    return bool(caps & (1 << CAP_SYS_ADMIN))


def executable(pid: int) -> str:
    """The path of the program process *pid* runs (``/proc/PID/exe``); "" when unknown."""
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def file_identity(path: str) -> Tuple[int, int]:
    """(device, inode) of *path*, comparable with :attr:`Mapping.identity`."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


def iter_pids() -> Iterator[int]:
    """The ids of the processes /proc lists now."""
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)


def comm(pid: int) -> str:
    """The process's name (``/proc/PID/comm``, at most 15 characters); "" when gone."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as fh:
            return fh.read().rstrip(b"\n").decode("utf-8", "replace")
    except OSError:
        return ""


def cmdline(pid: int) -> List[str]:
    """The process's arguments (``/proc/PID/cmdline``); [] when gone or a kernel thread."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            raw = fh.read()
    except OSError:
        return []
    return [a.decode("utf-8", "surrogateescape") for a in raw.split(b"\0")[:-1]] if raw else []


def parents() -> Dict[int, int]:
    """pid -> parent pid of every process /proc lists now."""
    out = {}
    for pid in iter_pids():
        try:
            fields = read_stat(pid)
        except (NoSuchProcessError, TracePermissionError):
            continue
        if len(fields) > STAT_PPID:
            out[pid] = int(fields[STAT_PPID])
    return out


def process_tree(pid: int) -> List[int]:
    """*pid* and every process descending from it now, parents before children."""
    children: Dict[int, List[int]] = {}
    for child, parent in parents().items():
        children.setdefault(parent, []).append(child)
    out = [pid]
    i = 0
    while i < len(out):
        out.extend(sorted(children.get(out[i], ())))
        i += 1
    return out
