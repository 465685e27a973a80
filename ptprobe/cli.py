"""The ``ptprobe`` command.

Uses only ptprobe's public API: :mod:`ptprobe` (sessions, probes, specs),
:mod:`ptprobe.discover` (files, processes), :mod:`ptprobe.filter`,
:mod:`ptprobe.aggregate` and :mod:`ptprobe.output` (what is done with a hit),
and :mod:`ptprobe.manual` (its own documentation). The per-hit work is a
function of a hit-like value (see :mod:`ptprobe.output`), so that records of
hits that did not stop the program can go through it too.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import sys
import time
import traceback
from typing import IO, Any, Callable, Dict, List, NoReturn, Optional, Sequence, Tuple

import ptprobe
from ptprobe import callcli, discover, manual, render
from ptprobe.console import (SHOWN_ERRORS, Console, ConsoleObserver, Signals, WaitInterrupted, die_by, isatty, pids_and_names,
                             processes, ring_size, seconds)
from ptprobe.aggregate import Aggregation
from ptprobe.errors import ProbeSpecError, PtprobeError, SymbolNotFoundError, UsageError
from ptprobe.filter import STRING_SIZE, Context, Filter
from ptprobe.output import Format, Output, UPROBE_INTEGER_ARGS, default_line, json_record

EXIT_USAGE = 2
EXIT_INTERNAL = 70
#: seconds between two refreshes of the live status line
_STATUS_PERIOD = 1.0
#: what in a --filter or --agg expression needs the thread stopped: a string, the stack
_STOPPING_EXPRESSION = re.compile(r"\bstr\s*\(|\bstack\b")


# --------------------------------------------------------------------------- the parser

class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors ('ptprobe: ...', exit 2) instead of a usage block."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (ptprobe {self.prog.split()[-1]} --help)"
                         if " " in self.prog else f"{message} (ptprobe --help)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ptprobe", description=manual.SUMMARY[0].upper() + manual.SUMMARY[1:] + ".",
                     epilog=manual.EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ptprobe {ptprobe.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("-p", "--probe", action="append", default=[], metavar="SPEC",
                       help="a probe: uprobe:PATH:SYMBOL[+OFFSET], uprobe:PATH:0xADDRESS, uprobe:PATH:PATTERN, "
                       "usdt:PATH:PROVIDER:NAME (repeat for more; ptprobe help specs)")
        p.add_argument("-f", "--format", metavar="FMT",
                       help="a printf-style line per hit: %%d %%u %%x %%p %%f %%s %%5d %%ld %%{comm} ... "
                       "(ptprobe help format)")
        p.add_argument("--json", action="store_true",
                       help="one JSON object per hit (with -f: also its line and the strings it read)")
        p.add_argument("--filter", metavar="EXPR",
                       help="keep only the hits where EXPR holds: 'arg0 > 100 && tid == 1234' "
                       "(ptprobe help filter)")
        p.add_argument("--agg", action="append", default=[], metavar="AGG",
                       help="aggregate instead of printing (hits are printed too if -f asks; with --json the "
                       "aggregations are JSON): 'count() by tid', 'hist(arg2)', 'sum(arg1) by comm' (repeatable; "
                       "ptprobe help agg)")
        p.add_argument("--interval", type=float, metavar="S",
                       help="print the aggregations every S seconds too")
        p.add_argument("-o", "--output", metavar="FILE",
                       help="hits and aggregations to FILE ('-': stdout); default: stderr for run, stdout "
                       "for attach")
        p.add_argument("-s", "--string-size", type=int, default=STRING_SIZE, metavar="N",
                       help="read at most N bytes of a string (%%s, str()); default %(default)s")
        p.add_argument("-q", "--quiet", action="store_true",
                       help="print no hits and no status line: only the summary at the end")
        p.add_argument("--no-status", action="store_true",
                       help="no live status line (shown on a terminal when hits do not go to it)")
        p.add_argument("--duration", type=float, metavar="S",
                       help="stop tracing after S seconds (attach detaches; run lets the program go on)")
        p.add_argument("--latency", action="append", default=[], metavar="FUNC",
                       help="print a log2 histogram of FUNC's durations at the end (PATH:SYMBOL or a "
                            "uprobe/uretprobe spec; repeat for more)")
        p.add_argument("--stack", action="store_true",
                       help="the user stack of every hit (after its line, or a \"stack\" field in --json)")
        p.add_argument("-t", "--timestamp", action="store_true",
                       help="start each text line with the hit's CLOCK_MONOTONIC time in seconds")
        p.add_argument("--stop", action="store_true",
                       help="stop the program at every hit; by default a 5-byte NOP site counts (-q) or "
                            "records (a line, --json, -f, --filter, --agg) inside the program, with no stop, "
                            "unless something needs the thread stopped: %%s, %%S, --stack, str(), a uprobe's "
                            "float arguments, return probes")
        p.add_argument("--drop", action="store_true",
                       help="when the ring of records is full, drop records (counted in the summary) "
                            "instead of making the program wait for ptprobe")
        p.add_argument("--ring-size", type=int, default=4 << 20, metavar="BYTES",
                       help="the ring of records shared with each process (a power of two; default 4 MiB)")
        p.add_argument("--slots", choices=("return", "seed"), default="return",
                       help="slot kind for 5-byte NOP sites (default: return)")
        p.add_argument("--no-seccomp", action="store_true",
                       help="install no seccomp filter: int3 for every site")
        p.add_argument("--max-trampoline-pages", type=int, default=64, metavar="N",
                       help="at most N slot pages per process (default 64)")
        p.add_argument("--no-follow", action="store_true", help="do not trace forked children")
        p.add_argument("--colocate", choices=("hitting", "single", "all", "off"), default="hitting",
                       help="share one CPU with the program: with the threads that hit probes often "
                            "(default), only while it has a single thread, with all its threads "
                            "(faster hits, no parallelism), or never")
        p.add_argument("--no-colocate", dest="colocate", action="store_const", const="off",
                       help="same as --colocate=off")

    run = sub.add_parser("run", help="start a program under tracing", formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Start PROGRAM with the probes armed before its own code (constructors "
                         "included) runs. Hits go to stderr (the program owns stdout); ptprobe exits with "
                         "the program's status.", epilog=manual.EPILOG)
    common(run)
    run.add_argument("program", nargs=argparse.REMAINDER, metavar="-- PROGRAM [ARGS...]")

    att = sub.add_parser("attach", help="attach to running processes", formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Attach to every thread of each TARGET: a process id, a process name "
                         "(every process of that name) or several; detach on Ctrl-C, SIGTERM, SIGHUP, "
                         "--duration, a closed output or when they have exited. Hits go to stdout.",
                         epilog=manual.EPILOG)
    att.add_argument("targets", nargs="+", metavar="TARGET", help="a process id (1234, 1234,5678) or a name")
    common(att)
    att.add_argument("--tree", action="store_true",
                     help="also every process descending from each target (a server and its workers)")
    att.add_argument("--allow-no-new-privs", action="store_true",
                     help="allow setting no_new_privs in the process (irrevocable) so that jmp slots "
                     "can be used without CAP_SYS_ADMIN")

    callcli.add_commands(sub, manual.EPILOG)

    lst = sub.add_parser("list", help="list the USDT probes (and functions) of a file or process",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="List the USDT probes of an ELF file (a path or a name: libc, python3), "
                         "or of every object mapped in a process, or the probes a spec pattern arms "
                         "('uprobe:libc:str*'), one spec per line.", epilog=manual.EPILOG)
    lst.add_argument("target", nargs="?", metavar="PATH|SPEC", help="a file, an object name, or a spec pattern")
    lst.add_argument("pattern", nargs="?", metavar="PATTERN", help="only USDT probes matching PROVIDER:NAME")
    lst.add_argument("--pid", type=int, help="a running process instead of a file")
    lst.add_argument("--symbols", nargs="?", const="*", metavar="PATTERN",
                     help="also list function symbols (those matching PATTERN)")
    lst.add_argument("--json", action="store_true", help="JSON output")

    hlp = sub.add_parser("help", help="topic help, or the man page", formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Show a topic: " + ", ".join(manual.TOPICS) + "; --man prints the "
                         "man page (roff: ptprobe help --man | man -l -).", epilog=manual.EPILOG)
    hlp.add_argument("topic", nargs="?", metavar="TOPIC")
    hlp.add_argument("--man", action="store_true", help="print the man page")
    return parser


# --------------------------------------------------------------------------- checked settings

class _Settings:
    """The run/attach options, checked before anything starts."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.command = args.command
        if not args.probe and not args.latency:
            raise UsageError("no probe: give one with -p SPEC (ptprobe help specs) or --latency FUNC", "")
        self.specs = [ptprobe.parse_spec(text) for text in args.probe]
        self.latency_specs = [ptprobe.return_spec(text) for text in args.latency]
        self.stack = args.stack
        self.timestamp = args.timestamp
        if args.string_size <= 0 or args.string_size > 1 << 20:
            raise UsageError(f"-s must be between 1 and {1 << 20}, not {args.string_size}", "")
        if args.max_trampoline_pages < 0:
            raise UsageError("--max-trampoline-pages must be >= 0", "")
        self.duration = seconds(args.duration, "--duration")
        self.interval = seconds(args.interval, "--interval")
        self.context = Context(comm=discover.process_name, string_size=args.string_size)
        self.format = Format(args.format) if args.format is not None else None
        self.filter = Filter(args.filter, self.context) if args.filter is not None else None
        self.aggregations: List[Aggregation] = []
        for text in args.agg:
            agg = Aggregation(text, self.context)
            names = [a.name for a in self.aggregations]
            if agg.name in names:
                agg = Aggregation(text, self.context, name=f"{agg.name}{names.count(agg.name) + 1}")
            self.aggregations.append(agg)
        if self.interval is not None and not self.aggregations:
            raise UsageError("--interval prints aggregations: give one with --agg", "")
        self.json = args.json
        self.quiet = args.quiet
        # a line per hit, unless aggregating (then only if -f asks) or quiet; with
        # --agg, --json shapes the aggregations (and the hits' lines if -f asks)
        self.printing = not args.quiet and bool(self.specs) and (not self.aggregations or self.format is not None)
        self.output = args.output
        self.no_status = args.no_status
        ring = ring_size(args.ring_size)
        self.stop = args.stop
        self.options: Dict[str, Any] = dict(
            slots=args.slots, seccomp=not args.no_seccomp, max_trampoline_pages=args.max_trampoline_pages,
            follow=not args.no_follow, colocate=args.colocate, in_program=not args.stop, ring_size=ring,
            drop=args.drop)
        self.program: List[str] = []
        self.pids: List[int] = []
        self.names: List[str] = []
        self.tree = False
        for spec in self.specs:       # a uprobe's arguments are known now: six registers
            if spec.kind != "usdt":
                _check_uprobe_arguments(self)
                break
        if args.command == "run":
            self.program = list(args.program)
            if self.program and self.program[0] == "--":
                self.program = self.program[1:]
            if not self.program:
                raise UsageError("run needs a program: ptprobe run [-p SPEC]... -- PROGRAM [ARGS...]", "")
        else:
            self.pids, self.names = pids_and_names(args.targets)
            self.tree = args.tree
            self.options["allow_no_new_privs"] = args.allow_no_new_privs

    @property
    def needs_handler(self) -> bool:
        return self.printing or self.filter is not None or bool(self.aggregations)

    def records(self, spec: ptprobe.ProbeSpec) -> bool:
        """Can the program record the hits of *spec* itself (no stop), for what is
        done with them? Not with --stop, for return probes, nor when a line, the
        filter or an aggregation needs the thread stopped."""
        if self.stop or spec.kind not in ("uprobe", "usdt") or self.stack:
            return False
        if self.format is not None and self.format.needs_stop(spec.kind == "uprobe"):
            return False
        texts = ([self.filter.text] if self.filter is not None else []) + [a.text for a in self.aggregations]
        return not any(_STOPPING_EXPRESSION.search(text) for text in texts)

    def argument_users(self) -> List[Tuple[str, Tuple[int, ...]]]:
        """(option, argument indexes) of what reads arguments by index."""
        users = []
        if self.filter is not None:
            users.append(("--filter", self.filter.arguments))
        for agg in self.aggregations:
            users.append((f"--agg {agg.text!r}", agg.arguments))
        return users


def _open_output(settings: _Settings, console: Console) -> Tuple[IO[str], str]:
    path = settings.output
    if path is None:
        return (sys.stderr, "stderr") if settings.command == "run" else (sys.stdout, "stdout")
    if path == "-":
        return sys.stdout, "stdout"
    try:
        return open(path, "w"), path
    except OSError as exc:
        raise UsageError(f"cannot open {path}: {exc.strerror or exc}", path) from None


def _check_uprobe_arguments(settings: _Settings) -> None:
    if settings.format is not None:
        problem = settings.format.check_uprobe()
        if problem:
            raise UsageError(f"-f: {problem}", settings.format.text)
    for option, indexes in settings.argument_users():
        if indexes and max(indexes) >= UPROBE_INTEGER_ARGS:
            raise UsageError(f"{option}: arg{max(indexes)}: a uprobe has {UPROBE_INTEGER_ARGS} "
                             f"arguments (arg0..arg{UPROBE_INTEGER_ARGS - 1})", option)


def _check_arguments(probe: ptprobe.Probe, settings: _Settings) -> None:
    """Refuse, before the program runs on, a -f, --filter or --agg that reads an
    argument *probe* does not have."""
    users = settings.argument_users()
    if probe.spec.kind != "usdt":
        _check_uprobe_arguments(settings)
        return
    if settings.format is not None:
        users.append((f"-f {settings.format.text!r}", (settings.format.arguments_needed() - 1,)
                      if settings.format.arguments_needed() else ()))
    for site in probe.sites:
        have = len(probe.argument_types(site.address) or ())
        for option, indexes in users:
            if indexes and max(indexes) >= have:
                raise UsageError(f"{option} reads arg{max(indexes)}, but {probe.name} at {site.label} has "
                                 f"{have} argument{'' if have == 1 else 's'}", option)


# --------------------------------------------------------------------------- tracing

class _Tracer:
    """One run or attach: the session, what each hit does, the loop with its
    periodic work, and the reports at the end."""

    def __init__(self, settings: _Settings, console: Console) -> None:
        self.settings = settings
        self.console = console
        self.observer = ConsoleObserver(console)
        self.session: Optional[ptprobe.Session] = None
        self.probes: List[ptprobe.Probe] = []
        self.latency: List[ptprobe.Probe] = []       # --latency: return probes that only time calls
        self.signals = Signals(self._stop)
        self.names: Dict[int, str] = {}
        stream, name = _open_output(settings, console)
        self.out = Output(stream, name, on_close=self._stop)
        self.line = self._line_function()

    # --- per hit -------------------------------------------------------------------------
    def _line_function(self) -> Optional[Callable[[Any], str]]:
        settings, context = self.settings, self.settings.context
        if not settings.printing:
            return None
        fmt = settings.format
        if settings.json:
            stack = settings.stack
            return lambda hit: json.dumps(json_record(hit, context, fmt, stack))
        text: Callable[[Any], str] = (lambda hit: fmt.render(hit, context)) if fmt is not None else \
            (lambda hit: default_line(hit, context))
        if not settings.timestamp and not settings.stack:
            return text
        before = render.timestamp if settings.timestamp else (lambda hit: "")
        after = render.stack_text if settings.stack else (lambda hit: "")
        return lambda hit: (before(hit) + " " if settings.timestamp else "") + text(hit) + after(hit)

    def on_hit(self, hit: Any) -> None:
        """What the command line does with one hit (or record of one)."""
        settings = self.settings
        if isinstance(hit, ptprobe.Record):
            for i, value in enumerate(hit.args):
                if value is ptprobe.UNREADABLE:
                    # as a stopped hit's argument read fails: the handler error line
                    raise ptprobe.FaultError(f"cannot read argument {i} of {hit.name}: its memory is not "
                                             "readable", hit.address)
        if settings.filter is not None and not settings.filter.matches(hit):
            return
        for agg in settings.aggregations:
            agg.add(hit)
        if self.line is not None and not self.out.closed:
            self.out.write(self.line(hit) + "\n")

    # --- signals ---------------------------------------------------------------------------
    def _stop(self) -> None:
        if self.session is not None:
            self.session.request_stop()

    @property
    def stopping(self) -> bool:
        return bool(self.signals.received) or self.out.closed

    # --- the run ------------------------------------------------------------------------------
    def start(self) -> ptprobe.Session:
        settings = self.settings
        options = dict(settings.options, observer=self.observer)
        if settings.command == "run":
            return ptprobe.run(settings.program, **options)
        pids = processes(settings.pids, settings.names)
        for pid in pids:
            self.names[pid] = discover.process_name(pid)
        # processes found by name may include some ptprobe may not trace: leave those out
        strict = not settings.names
        return ptprobe.attach(pids, tree=settings.tree, strict=strict, **options)

    def arm(self, session: ptprobe.Session) -> None:
        handler = self.on_hit if self.settings.needs_handler else None
        for spec in self.settings.specs:
            mapped = session.mapped_names()
            if not spec.is_path and not any(discover.name_matches(name, spec.path) for name in mapped) \
                    and not discover.names_a_file(spec.path):
                # a typo, most likely: nothing mapped answers to that name and no program
                # or library on disk does (a plugin loaded later is given by its path)
                raise SymbolNotFoundError(
                    f"{spec.text}: nothing matches {spec.path!r}: it is not mapped (mapped: "
                    f"{', '.join(mapped[:12])}{', ...' if len(mapped) > 12 else ''}) and there is no such "
                    "program in PATH nor library in the loader's directories; for a file loaded later, "
                    "give its path", spec.path)
            if handler is not None and self.settings.records(spec):
                probe = session.record(spec, handler)
            else:
                probe = session.probe(spec, handler)
            self.probes.append(probe)
            _check_arguments(probe, self.settings)
        for spec in self.settings.latency_specs:
            self.latency.append(session.probe(spec))
        roots = session.roots
        if self.settings.command == "attach" and (len(roots) > 1 or self.settings.tree):
            for pid in session.processes:
                self.names.setdefault(pid, discover.process_name(pid))
            shown = ", ".join(f"{pid} ({self.names.get(pid, '?')})" for pid in sorted(session.processes))
            self.console.line(f"ptprobe: attached to {len(session.processes)} process"
                              f"{'' if len(session.processes) == 1 else 'es'}: {shown}")

    def trace(self, session: ptprobe.Session) -> None:
        """Wait for hits until the end: the program's exit, a signal, the duration,
        a closed output. Wakes up for the interval, the status line and flushing."""
        settings = self.settings
        start = time.monotonic()
        deadline = start + settings.duration if settings.duration else None
        next_print = start + settings.interval if settings.interval else None
        # every second at least: the status line, flushing, and a stop request that came
        # while wait() was getting ready (it is not seen until wait() returns)
        periodic = True
        next_status = start + _STATUS_PERIOD
        last = {id(p): 0 for p in self.probes + self.latency}
        last_time = start
        while not self.stopping:
            now = time.monotonic()
            wakes = [t for t in (deadline, next_print, next_status if periodic else None) if t is not None]
            timeout = max(min(wakes) - now, 0.001) if wakes else None
            status = session.wait(timeout=timeout)
            if status is not None or not session.attached or self.stopping:
                break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            if next_print is not None and now >= next_print:
                self.print_aggregations(interval=True)
                while next_print <= now:
                    next_print += settings.interval or 1.0
            if periodic and now >= next_status:
                self.out.flush()
                self._status(now - start, now - last_time, last)
                last_time = now
                next_status = now + _STATUS_PERIOD

    def _status(self, elapsed: float, span: float, last: Dict[int, int]) -> None:
        if not self.console.status_on:
            return
        parts = []
        for probe in self.probes + self.latency:
            rate = (probe.hits - last[id(probe)]) / span if span > 0 else 0.0
            last[id(probe)] = probe.hits
            parts.append(f"{_short(probe)} {probe.hits:,} ({rate:,.0f}/s)")
        self.console.status(f"ptprobe {elapsed:.0f}s: " + "  ".join(parts))

    # --- reports -----------------------------------------------------------------------------
    def print_latency(self) -> None:
        for probe in self.latency:
            self.out.write("\n".join(render.latency_report(probe)) + "\n")

    def print_aggregations(self, interval: bool = False) -> None:
        if not self.settings.aggregations:
            return
        if self.out.line_buffered:
            self.console.clear()
        if self.settings.json:              # one object per aggregation, as the hits are
            when = {"time": time.strftime("%H:%M:%S")} if interval else {}
            for agg in self.settings.aggregations:
                self.out.write(json.dumps(dict(agg.to_json(), **when)) + "\n")
            self.out.flush()
            return
        text = "\n\n".join(agg.render() for agg in self.settings.aggregations)
        head = time.strftime("%H:%M:%S") + "\n" if interval else ""
        self.out.write(head + text + "\n" + ("\n" if interval else ""))
        self.out.flush()

    def summary(self, session: ptprobe.Session) -> None:
        """On stderr: a line per probe (hits, and its sites by mechanism; a site armed
        in several processes counts once), then the filter, aggregation and handler
        problems, then a line per process when there were several."""
        console = self.console
        console.clear()
        for probe in self.probes + self.latency:
            kinds: Dict[str, set] = {}
            for site in probe.sites:
                obj = site.obj
                where = (obj.identity, obj.link_time(site.address)) if obj is not None else (site.pid, site.address)
                kinds.setdefault(site.mechanism, set()).add(where)
            how = ", ".join(f"{len(w)} {k}" for k, w in sorted(kinds.items())) or "not armed"
            inside = {site.action for site in probe.sites} & {"count", "record"}
            where = f", {' and '.join(sorted(a + 'ed' for a in inside))} in the program" if inside else ""
            console.line(f"ptprobe: {probe.name}: {probe.hits} hit{'' if probe.hits == 1 else 's'} ({how}){where}")
        drops = session.drops
        if drops:
            console.line(f"ptprobe: {drops} record{'' if drops == 1 else 's'} dropped (the ring was full: --drop)")
        flt = self.settings.filter
        if flt is not None:
            total = flt.passed + flt.rejected
            extra = f"; {flt.errors} could not be evaluated ({flt.last_error})" if flt.errors else ""
            console.line(f"ptprobe: --filter: {flt.passed} of {total} hit{'' if total == 1 else 's'} passed{extra}")
        for agg in self.settings.aggregations:
            if agg.errors:
                console.line(f"ptprobe: --agg @{agg.name}: {agg.errors} hit{'' if agg.errors == 1 else 's'} "
                             f"left out ({agg.last_error})")
        if self.observer.handler_errors > SHOWN_ERRORS:
            console.line(f"ptprobe: {self.observer.handler_errors} handler errors in all "
                         f"({self.observer.handler_errors - SHOWN_ERRORS} not shown)")
        self._per_process(session)

    def _per_process(self, session: ptprobe.Session) -> None:
        counts: Dict[int, int] = {}
        for probe in self.probes + self.latency:
            for pid, hits in probe.hits_by_process().items():
                counts[pid] = counts.get(pid, 0) + hits
        exits = session.exit_statuses
        pids = sorted(set(counts) | set(session.roots) | set(exits))
        if len(pids) < 2:
            return
        for pid in pids:
            hits = counts.get(pid, 0)
            if pid in exits:
                code = exits[pid]
                end = f"exited with status {code}" if code >= 0 else f"killed by signal {-code}"
            else:
                end = "detached" if session.mode == "attach" else "let go"
            name = self.names.get(pid) or self.settings.context.comm(pid) or "?"
            self.console.line(f"ptprobe: process {pid} ({name}): {hits} hit{'' if hits == 1 else 's'}, {end}")

    def report_exit(self, session: ptprobe.Session) -> None:
        if session.mode != "attach":
            return
        for pid, code in sorted(session.exit_statuses.items()):
            if pid in session.roots and len(session.roots) == 1:
                self.observer.notice(f"process {pid} exited " +
                                     (f"with status {code}" if code >= 0 else f"by signal {-code}"))


def _short(probe: ptprobe.Probe) -> str:
    spec = probe.spec
    if spec.kind == "usdt":
        return f"{spec.provider}:{spec.name}"
    suffix = "%return" if spec.kind == "uretprobe" else ""
    if spec.symbol is not None:
        return spec.symbol + (f"+{spec.offset:#x}" if spec.offset else "") + suffix
    return (f"{spec.address:#x}" + suffix) if spec.address is not None else probe.name


def _trace(args: argparse.Namespace, console: Console) -> int:
    settings = _Settings(args)
    tracer = _Tracer(settings, console)
    out = tracer.out
    console.status_on = (not settings.quiet and not settings.no_status and isatty(sys.stderr)
                         and not (settings.printing and out.line_buffered))
    session: Optional[ptprobe.Session] = None
    summarised = False
    with tracer.signals:
        try:
            session = tracer.start()
            tracer.session = session
            with session:
                tracer.arm(session)
                if not tracer.stopping:
                    tracer.trace(session)
                session.detach()
                console.clear()
                tracer.print_latency()
                tracer.print_aggregations()
                out.flush()
                if out.problem:
                    console.line(f"ptprobe: {out.problem}")
                tracer.summary(session)
                tracer.report_exit(session)
                summarised = True
                if settings.command == "run" and session.returncode is None:
                    # let go: the program runs on, and run exits with its status
                    tracer.signals.wait_for(session)
            if out.problem:
                return ptprobe.errors.OutputError.exit_code
            if settings.command == "run":
                status = session.returncode if session.returncode is not None else 0
                if status < 0:
                    die_by(-status)
                return status
            return 0
        except WaitInterrupted as stop:
            die_by(stop.signum)
            return 128 + stop.signum
        except PtprobeError as exc:
            console.line(f"ptprobe: {exc}")
            if session is not None and tracer.probes and not summarised and not isinstance(exc, UsageError):
                tracer.summary(session)
            return exc.exit_code
        finally:
            console.clear()
            out.close()


# --------------------------------------------------------------------------- list

def _list(args: argparse.Namespace, out: IO[str]) -> int:
    target = args.target
    if args.pid is not None:
        if args.pid <= 0:
            raise UsageError(f"--pid {args.pid} is not a process id", str(args.pid))
        if target is not None and args.pattern is not None:
            raise UsageError("list --pid PID takes one PATTERN (or a spec pattern)", "")
        pattern = args.pattern if target is None else target
        if pattern is not None and pattern.startswith(("uprobe:", "usdt:", "u:", "p:")):
            return _list_specs(ptprobe.parse_spec(pattern), out, args.json, pid=args.pid)
        return _list_objects(discover.process_objects(args.pid), pattern, args, out)
    if target is None and args.symbols not in (None, "*") and discover.looks_like_object(args.symbols):
        target, args.symbols = args.symbols, "*"      # 'list --symbols PATH': PATH is not a pattern
    if target is None:
        raise ProbeSpecError("list needs a PATH, a spec pattern or --pid PID", "")
    if target.startswith(("uprobe:", "usdt:", "u:", "p:")) and target.count(":") >= 2:
        if args.pattern is not None:
            raise UsageError("a spec pattern takes no PATTERN after it", target)
        return _list_specs(ptprobe.parse_spec(target), out, args.json)
    return _list_objects([discover.open_object(target)], args.pattern, args, out)


def _matches_usdt(probe: "discover.UsdtProbe", pattern: Optional[str]) -> bool:
    if pattern is None:
        return True
    if ":" in pattern:
        provider, _, name = pattern.partition(":")
        return fnmatch.fnmatchcase(probe.provider, provider) and fnmatch.fnmatchcase(probe.name, name)
    return fnmatch.fnmatchcase(probe.name, pattern)


def _list_objects(objects: Sequence[discover.ObjectInfo], pattern: Optional[str],
                  args: argparse.Namespace, out: IO[str]) -> int:
    probes: List[discover.UsdtProbe] = []
    functions: List[discover.Function] = []
    for obj in objects:
        probes += [p for p in obj.usdt_probes() if _matches_usdt(p, pattern)]
        if args.symbols is not None:
            functions += [f for f in obj.functions() if fnmatch.fnmatchcase(f.name, args.symbols)]
    if args.json:
        records = [{"type": "usdt", "path": p.path, "provider": p.provider, "name": p.name,
                    "addresses": list(p.addresses), "semaphore": p.semaphore, "args": p.args,
                    "spec": p.spec} for p in probes]
        records += [{"type": "function", "path": f.path, "name": f.name, "address": f.address,
                     "size": f.size, "ifunc": f.ifunc} for f in functions]
        out.write(json.dumps(records, indent=1) + "\n")
        return 0
    by_path: Dict[str, List[discover.UsdtProbe]] = {}
    for p in probes:
        by_path.setdefault(p.path, []).append(p)
    if not probes:
        out.write("no USDT probes" + (f" matching {pattern!r}" if pattern else "") + "\n")
    for path, group in by_path.items():
        out.write(f"{path}\n")
        width = max(len(f"{p.provider}:{p.name}") for p in group)
        for p in sorted(group, key=lambda p: (p.provider, p.name)):
            sites = ", ".join(f"{a:#x}" for a in p.addresses[:4]) + (" ..." if len(p.addresses) > 4 else "")
            extra = f"  semaphore {p.semaphore:#x}" if p.semaphore else ""
            out.write(f"  {p.provider + ':' + p.name:<{width}}  {sites}{extra}\n")
            if p.args:
                out.write(f"  {'':<{width}}  args: {p.args}\n")
    if args.symbols is not None:
        out.write("functions" + (f" matching {args.symbols!r}" if args.symbols != "*" else "") + ":\n")
        for f in functions:
            ifunc = "  (IFUNC: resolved when probed)" if f.ifunc else ""
            out.write(f"  {f.address:#014x} {f.size:6d}  {f.name}  ({os.path.basename(f.path)}){ifunc}\n")
    return 0


def _list_specs(spec: ptprobe.ProbeSpec, out: IO[str], as_json: bool, pid: Optional[int] = None) -> int:
    specs = discover.expand_spec(spec, pid=pid)
    if as_json:
        out.write(json.dumps(specs, indent=1) + "\n")
    else:
        for text in specs:
            out.write(text + "\n")
    return 0


# --------------------------------------------------------------------------- help

def _help(args: argparse.Namespace, parser: argparse.ArgumentParser, out: IO[str]) -> int:
    if args.man:
        out.write(manual.man_page(parser, ptprobe.__version__))
        return 0
    if args.topic is None:
        out.write(parser.format_help())
        return 0
    topic = args.topic.lower()
    aliases = {"spec": "specs", "probes": "specs", "fmt": "format", "-f": "format", "predicate": "filter",
               "aggregation": "agg", "aggregations": "agg", "exit-codes": "exit", "codes": "exit"}
    topic = aliases.get(topic, topic)
    if topic in ("run", "attach", "list") and topic not in manual.TOPICS:
        out.write(parser._subparsers._group_actions[0].choices[topic].format_help())  # type: ignore
        return 0
    if topic not in manual.TOPICS:
        raise UsageError(f"no help topic {args.topic!r} (topics: {', '.join(manual.TOPICS)})", args.topic)
    out.write(manual.topic_text(topic))
    return 0


# --------------------------------------------------------------------------- main

def main(argv: Optional[Sequence[str]] = None) -> int:
    console = Console(sys.stderr)
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "help":
            return _help(args, parser, sys.stdout)
        if args.command == "list":
            return _list(args, sys.stdout)
        if args.command in callcli.COMMANDS:
            return callcli.main(args, console, sys.stdout)
        return _trace(args, console)
    except PtprobeError as exc:
        console.line(f"ptprobe: {exc}")
        return exc.exit_code
    except BrokenPipeError:
        _quiet_stdout()
        return 0


def _quiet_stdout() -> None:
    """stdout's reader went away (ptprobe list | head): let the last flush go nowhere."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError):
        pass


def entry() -> None:
    try:
        code = main()
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:  # noqa: BLE001 - a bug of ours: one line, unless asked for more
        if os.environ.get("PTPROBE_DEBUG"):
            traceback.print_exc()
        else:
            print(f"ptprobe: internal error: {type(exc).__name__}: {exc} (PTPROBE_DEBUG=1 shows the traceback)",
                  file=sys.stderr)
        code = EXIT_INTERNAL
    sys.exit(code)


if __name__ == "__main__":
    entry()
