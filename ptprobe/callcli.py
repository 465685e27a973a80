"""The ``ptprobe record``, ``report`` and ``graph`` commands.

``record`` arms every patchable function entry of the chosen objects (by
default the program's executable) with :meth:`ptprobe.Session.trace_calls`:
the program records each entry and exit itself, with no stop per call, and the
calls go to a trace file (``docs/trace-format.md``) when recording ends: the
program's exit, Ctrl-C, SIGTERM or SIGHUP, or ``--duration``. ``report`` and
``graph`` read that file back (:mod:`ptprobe.calltrace`).

Uses only ptprobe's public API; prints nothing but through its console.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
import tempfile
import time
from collections import Counter
from typing import IO, Dict, List, Optional, Sequence

import ptprobe
from ptprobe import calltrace, discover
from ptprobe.console import (Console, ConsoleObserver, Signals, WaitInterrupted, die_by, pids_and_names, processes,
                             ring_size, seconds)
from ptprobe.errors import OutputError, ProbeSpecError, SymbolNotFoundError, UsageError

#: the trace file record writes and report and graph read when none is named
DEFAULT_FILE = "ptprobe.json"
COMMANDS = ("record", "report", "graph")
#: function names shown in a line before "and N more"
_SHOWN_NAMES = 8
_WILDCARDS = "*?["


def add_commands(sub: "argparse._SubParsersAction", epilog: str) -> None:
    """The record, report and graph subcommands, on the parser's *sub*."""
    rec = sub.add_parser(
        "record", help="record every call of a program's functions into a trace file",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog,
        description="Record the entry and exit of every call of the program's functions, with "
        "times and threads, written by the program itself (no stop per call), into a trace "
        "file that ptprobe report, ptprobe graph and the Perfetto UI read. Start PROGRAM under "
        "tracing, or attach to running processes with --pid. Functions need a patchable entry: "
        "build with -pg -mfentry -mnop-mcount or -fpatchable-function-entry=5; those without "
        "one are listed. Recording ends when the program exits, on Ctrl-C, SIGTERM or SIGHUP, "
        "or after --duration; every return address taken over is given back, and the program "
        "runs on.")
    rec.add_argument("program", nargs=argparse.REMAINDER, metavar="-- PROGRAM [ARGS...]")
    rec.add_argument("--pid", dest="targets", action="append", default=[], metavar="TARGET",
                     help="attach to running processes instead of starting one: a process id "
                     "(1234, 1234,5678) or a name; repeatable")
    rec.add_argument("-o", "--output", default=DEFAULT_FILE, metavar="FILE",
                     help="the trace file ('-': stdout, which a program run by record shares); "
                     "default %(default)s")
    rec.add_argument("-F", "--function", dest="functions", action="append", default=[], metavar="PATTERN",
                     help="record only the functions matching PATTERN (* ? [..]; repeatable: any of "
                     "them); default every function")
    rec.add_argument("-N", "--exclude", action="append", default=[], metavar="PATTERN",
                     help="leave out the functions matching PATTERN (repeatable)")
    rec.add_argument("--object", dest="objects", action="append", default=[], metavar="OBJECT",
                     help="record the functions of OBJECT: a path, an object's name (libfoo.so; one "
                     "loaded later is armed when it is) or a pattern over the names of the objects "
                     "mapped when recording starts ('lib*'); repeatable; default the executable")
    rec.add_argument("--exclude-object", action="append", default=[], metavar="PATTERN",
                     help="leave out the objects whose name or path matches PATTERN (repeatable)")
    rec.add_argument("--duration", type=float, metavar="S",
                     help="stop recording after S seconds (the program runs on)")
    rec.add_argument("--ring-size", type=int, default=4 << 20, metavar="BYTES",
                     help="the ring of records shared with each process (a power of two; default 4 MiB)")
    rec.add_argument("--no-follow", action="store_true", help="do not record forked children")
    rec.add_argument("--max-trampoline-pages", type=int, default=64, metavar="N",
                     help="at most N slot pages per process (default 64)")
    rec.add_argument("--allow-no-new-privs", action="store_true",
                     help="(--pid) allow setting no_new_privs in the process (irrevocable): needed "
                     "without CAP_SYS_ADMIN")

    rep = sub.add_parser(
        "report", help="calls, total and self time per function, from a trace file",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog,
        description="Per function of a trace file: total time (a recursive call counted once), "
        "self time (less the calls it made), calls, average, and calls that did not return; "
        "sorted by total time unless --sort says otherwise.")
    rep.add_argument("file", nargs="?", default=DEFAULT_FILE, metavar="FILE",
                     help="the trace file; default %(default)s")
    rep.add_argument("-s", "--sort", choices=("total", "self", "calls", "name"), default="total",
                     help="the order of the functions (default: %(default)s)")

    gra = sub.add_parser(
        "graph", help="the call tree of each thread, with times, from a trace file",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog,
        description="The call tree of each thread of a trace file, the calls of one function "
        "under one caller merged: total time and number of calls, as uftrace graph shows it.")
    gra.add_argument("file", nargs="?", default=DEFAULT_FILE, metavar="FILE",
                     help="the trace file; default %(default)s")
    gra.add_argument("--tid", type=int, metavar="TID", help="only the thread TID")
    gra.add_argument("-F", "--function", metavar="PATTERN",
                     help="only the trees under the calls of the functions PATTERN matches (a name, or "
                     "* ? [..]; the outermost calls, when they recurse)")


def main(args: argparse.Namespace, console: Console, out: IO[str]) -> int:
    """Run the command *args* names (one of :data:`COMMANDS`)."""
    if args.command == "record":
        return _Recording(args, console).run()
    trace = _read(args.file)
    if args.command == "report":
        out.write(calltrace.report(trace, args.sort) + "\n")
        skipped = sum(len(names) for names in trace.unpatchable.values())
        if skipped:
            out.write(f"\n{skipped} function{'' if skipped == 1 else 's'} not recorded (no patchable entry): "
                      f"{_names(sorted(n for names in trace.unpatchable.values() for n in names))}\n")
        return 0
    if args.function is not None and not any(c.name == args.function or fnmatch.fnmatchcase(c.name, args.function)
                                             for c in trace.calls):
        raise SymbolNotFoundError(f"{args.file}: no call of {args.function!r}", args.function)
    if args.tid is not None and not any(c.tid == args.tid for c in trace.calls):
        raise UsageError(f"{args.file}: no thread {args.tid} (threads: "
                         f"{_names([str(t) for t in sorted({c.tid for c in trace.calls})])})", str(args.tid))
    text = calltrace.graph(trace, args.tid, args.function)
    out.write(text + "\n" if text else "")
    return 0


def _read(path: str) -> ptprobe.CallTrace:
    try:
        source = sys.stdin if path == "-" else open(path, encoding="utf-8")
    except OSError as exc:
        raise ptprobe.TraceFormatError(f"{path}: {exc.strerror}", path) from None
    try:
        return calltrace.read_trace(source)
    except ptprobe.TraceFormatError as exc:
        raise ptprobe.TraceFormatError(f"{path}: {exc}", path) from None
    finally:
        if source is not sys.stdin:
            source.close()


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_SHOWN_NAMES])
    return shown + (f" and {len(names) - _SHOWN_NAMES} more" if len(names) > _SHOWN_NAMES else "")


def _plural(count: int, word: str, many: str = "") -> str:
    return f"{count} {word if count == 1 else many or word + 's'}"


# --------------------------------------------------------------------------- the trace file
class _TraceFile:
    """Where the trace goes: a file written whole at the end (a temporary one
    beside it, made at the start so that an unwritable place fails before
    anything is traced, renamed over it), or stdout."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._temp: Optional[str] = None
        if path == "-":
            return
        if os.path.isdir(path):
            raise OutputError(f"cannot write {path}: it is a directory", path)
        folder = os.path.dirname(os.path.abspath(path))
        try:
            fd, self._temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)           # as open() would make it, not mkstemp's 0600
            os.close(fd)
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror}", path) from None

    def write(self, trace: ptprobe.CallTrace, command: List[str]) -> None:
        try:
            if self._temp is None:
                calltrace.write_trace(trace, sys.stdout, command=command)
                sys.stdout.flush()
                return
            with open(self._temp, "w", encoding="utf-8") as out:
                calltrace.write_trace(trace, out, command=command)
            try:
                os.replace(self._temp, self.path)
            except OSError as exc:
                kept, self._temp = self._temp, None             # (kept: the recording is in it)
                raise OutputError(f"cannot write {self.path}: {exc.strerror}; the trace is in {kept}",
                                  self.path) from None
            self._temp = None
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {exc.strerror}", self.path) from None

    def discard(self) -> None:
        if self._temp is not None:
            try:
                os.unlink(self._temp)
            except OSError:
                pass
            self._temp = None


# --------------------------------------------------------------------------- record
class _Recording:
    """One ``ptprobe record``: the session, the objects armed, waiting for the
    end, the trace file, and (run form) the program let go."""

    def __init__(self, args: argparse.Namespace, console: Console) -> None:
        self.console = console
        program = list(args.program)
        if program and program[0] == "--":
            program = program[1:]
        if program and args.targets:
            raise UsageError("record takes a program (-- PROGRAM) or --pid TARGET, not both", "")
        if not program and not args.targets:
            raise UsageError("record needs a program (ptprobe record -- PROGRAM [ARGS...]) or --pid TARGET", "")
        self.program = program
        self.pids, self.names = pids_and_names(args.targets)
        for pattern in args.functions + args.exclude:
            if not pattern or any(ch in pattern for ch in ":,\0"):
                raise ProbeSpecError(f"bad function pattern {pattern!r}", pattern)
        self.functions: List[str] = args.functions or ["*"]
        self.exclude: List[str] = args.exclude
        self.objects: List[str] = args.objects
        self.exclude_objects: List[str] = args.exclude_object
        self.duration = seconds(args.duration, "--duration")
        if args.max_trampoline_pages < 0:
            raise UsageError("--max-trampoline-pages must be >= 0", "")
        self.observer = ConsoleObserver(console)
        self.options = dict(observer=self.observer, follow=not args.no_follow, ring_size=ring_size(args.ring_size),
                            max_trampoline_pages=args.max_trampoline_pages)
        if not program:
            self.options["allow_no_new_privs"] = args.allow_no_new_privs
        self.file = _TraceFile(args.output)
        self.session: Optional[ptprobe.Session] = None
        self.probes: List[ptprobe.Probe] = []
        self.process_names: Dict[int, str] = {}
        self.signals = Signals(self._stop)

    # --- signals -------------------------------------------------------------------------------
    def _stop(self) -> None:
        if self.session is not None:
            self.session.request_stop()

    # --- the run -------------------------------------------------------------------------------
    def run(self) -> int:
        with self.signals:
            try:
                return self._run()
            except WaitInterrupted as stop:
                die_by(stop.signum)
                return 128 + stop.signum
            finally:
                self.file.discard()

    def _run(self) -> int:
        session = self._start()
        self.session = session
        with session:
            self._arm(session)
            self._record(session)
            session.detach()
            self._write(session)
            if self.program and session.returncode is None:
                # the program runs on: wait for it (leaving the session waits too)
                self.signals.wait_for(session)
        if self.program:
            status = session.returncode if session.returncode is not None else 0
            if status < 0:
                die_by(-status)
            return status
        return 0

    def _write(self, session: ptprobe.Session) -> None:
        trace = self.probes[0].calls if self.probes and self.probes[0].calls is not None else ptprobe.CallTrace()
        for probe in self.probes:
            if probe.unpatchable:
                trace.unpatchable[probe.spec.path] = list(probe.unpatchable)
        calls = trace.calls
        for pid in {c.pid for c in calls}:
            trace.process_names.setdefault(pid, self.process_names.get(pid) or f"process {pid}")
        self.file.write(trace, self.program)
        self._summary(trace, session)

    def _start(self) -> ptprobe.Session:
        if self.program:
            return ptprobe.run(self.program, **self.options)
        return ptprobe.attach(processes(self.pids, self.names), strict=not self.names, **self.options)

    def _chosen_objects(self, session: ptprobe.Session) -> List[str]:
        """The objects to record: the executables of the processes, or --object's
        (patterns matched against the objects mapped now), less --exclude-object's."""
        chosen: List[str] = []
        if not self.objects:
            chosen = [path for path in dict.fromkeys(discover.executable(pid) for pid in session.roots) if path]
        mapped = session.mapped_names()
        for text in self.objects:
            if any(ch in text for ch in _WILDCARDS):
                matches = [name for name in mapped if fnmatch.fnmatchcase(name, text)]
                if not matches:
                    raise SymbolNotFoundError(
                        f"--object {text!r} matches no mapped object (mapped: {_names(mapped)}); a library "
                        "loaded later is named without a pattern", text)
                chosen.extend(matches)
            else:
                if not any(discover.name_matches(os.path.basename(name), text) or name == text for name in mapped):
                    discover.find_object(text)   # a library loaded later, or a typo (ObjectFileError)
                chosen.append(text)
        kept = [obj for obj in dict.fromkeys(chosen)
                if not any(fnmatch.fnmatchcase(obj, p) or fnmatch.fnmatchcase(os.path.basename(obj), p)
                           for p in self.exclude_objects)]
        if not kept:
            raise UsageError("--exclude-object leaves no object to record", "")
        return kept

    def _arm(self, session: ptprobe.Session) -> None:
        for pid in session.processes:
            self.process_names[pid] = discover.process_name(pid)
        for obj in self._chosen_objects(session):
            probe = session.trace_calls(obj, self.functions, self.exclude)
            self.probes.append(probe)
            functions = len({(site.obj.identity, site.obj.link_time(site.address)) if site.obj is not None
                             else (site.pid, site.address) for site in probe.sites})
            if probe.sites:
                self.console.line(f"ptprobe: recording the calls of {_plural(functions, 'function')} of "
                                  f"{os.path.basename(obj)}")
            if probe.unpatchable:
                self.console.line(f"ptprobe: {os.path.basename(obj)}: "
                                  f"{_plural(len(probe.unpatchable), 'function')} without a patchable entry, "
                                  f"not recorded: {_names(probe.unpatchable)}")

    def _record(self, session: ptprobe.Session) -> None:
        """Wait for the end: the program's exit, a signal, --duration. Wakes once a
        second to learn the names of new processes (and to see a stop request made
        while wait() was getting ready)."""
        deadline = time.monotonic() + self.duration if self.duration else None
        while not self.signals.received:
            timeout = 1.0 if deadline is None else min(1.0, max(deadline - time.monotonic(), 0.001))
            if session.wait(timeout=timeout) is not None or not session.attached or self.signals.received:
                return
            for pid in session.processes:
                if pid not in self.process_names:
                    self.process_names[pid] = discover.process_name(pid)
            if deadline is not None and time.monotonic() >= deadline:
                return

    def _summary(self, trace: ptprobe.CallTrace, session: ptprobe.Session) -> None:
        calls = trace.calls
        threads = {(c.pid, c.tid) for c in calls}
        processes = {c.pid for c in calls}
        where = "stdout" if self.file.path == "-" else self.file.path
        self.console.line(
            f"ptprobe: {_plural(len(calls), 'call')} of {_plural(len({c.name for c in calls}), 'function')} "
            f"by {_plural(len(threads), 'thread')} in {_plural(len(processes), 'process', 'processes')}, "
            f"written to {where}")
        open_calls = Counter(c.status for c in calls if c.status != calltrace.RETURNED)
        if open_calls:
            self.console.line(f"ptprobe: {_plural(sum(open_calls.values()), 'call')} without a return: " +
                              ", ".join(f"{n} {status}" for status, n in sorted(open_calls.items())))
        if session.mode == "attach" and len(session.roots) == 1:
            for pid, code in session.exit_statuses.items():
                if pid in session.roots:
                    self.observer.notice(f"process {pid} exited " +
                                         (f"with status {code}" if code >= 0 else f"by signal {-code}"))
