"""The ``ptprobe`` command. Uses only the public API of :mod:`ptprobe`."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from typing import IO, Dict, List, Optional, Sequence

import ptprobe
from ptprobe import render
from ptprobe.errors import ProbeSpecError, PtprobeError

EXIT_USAGE = 2
_U64 = (1 << 64) - 1
EXIT_INTERNAL = 70

_EPILOG = """\
probe specs:
  uprobe:PATH:SYMBOL[+OFFSET]   function entry, or an instruction inside it
  uprobe:PATH:0xADDRESS         an instruction by its address in the file
  uretprobe:PATH:SYMBOL         the function's returns (also uprobe:PATH:SYMBOL%return)
  usdt:PATH:PROVIDER:NAME       USDT probes (* and ? wildcards)
  PATH is a file path or a mapped object's name as /proc/PID/maps shows it (libc.so.6).

exit codes: run exits with the program's status (and dies by the same signal);
  2 bad usage or probe spec, 3 no such process, 4 permission denied,
  5 not an ELF file, 6 symbol not found, 7 not an instruction boundary,
  8 site already patched, 9 program cannot be started, 10 memory fault,
  11 tracer error, 70 internal error.
"""


class _CliObserver(ptprobe.Observer):
    def __init__(self, err: IO[str]) -> None:
        self.err = err

    def notice(self, text: str) -> None:
        print(f"ptprobe: {text}", file=self.err)

    def handler_error(self, probe: ptprobe.Probe, hit: ptprobe.Hit, error: BaseException) -> None:
        print(f"ptprobe: probe {probe.name}: {type(error).__name__}: {error}", file=self.err)
        if os.environ.get("PTPROBE_DEBUG"):
            traceback.print_exception(type(error), error, error.__traceback__, file=self.err)


class _Printer:
    def __init__(self, out: IO[str], as_json: bool, fmt: Optional[str], stack: bool = False,
                 timestamps: bool = False) -> None:
        self.out = out
        self.as_json = as_json
        self.fmt = fmt
        self.stack = stack
        self.timestamps = timestamps

    def __call__(self, hit: ptprobe.Hit) -> None:
        args = list(hit.args)
        if self.as_json:
            record = {"probe": hit.probe.name, "name": hit.name, "pid": hit.pid, "tid": hit.tid,
                      "address": hit.address, "args": args, "time_ns": hit.time_ns}
            if isinstance(hit, ptprobe.ReturnHit):
                record.update(render.return_json(hit))
            if self.stack:
                record["stack"] = render.stack_json(hit)
            self.out.write(json.dumps(record) + "\n")
            return
        when = render.timestamp(hit) + " " if self.timestamps else ""
        if self.fmt is not None:
            # a return hit's values: the return value, then the entry's arguments
            values = [hit.retval] + args if isinstance(hit, ptprobe.ReturnHit) else args
            self.out.write(when + _format(self.fmt, hit, values) + "\n")
            return
        shown = " ".join(_show(a) for a in args)
        if isinstance(hit, ptprobe.ReturnHit):
            line = f"{hit.name}%return pid={hit.pid} tid={hit.tid} {render.return_text(hit)} args: {shown}"
        else:
            line = f"{hit.name} pid={hit.pid} tid={hit.tid} address={hit.address:#x} args: {shown}"
        self.out.write(when + line + (render.stack_text(hit) if self.stack else "") + "\n")


def _show(value: object) -> str:
    """Small integers in decimal, large ones (addresses, masks) in hex, floats as floats."""
    if isinstance(value, int):
        return str(value) if -0x10000 < value < 0x10000 else f"{value:#x}"
    return repr(value)


_CONVERSIONS = "duxpfs"


def _check_format(fmt: str) -> Optional[str]:
    """Why *fmt* is not a valid -f format, or None."""
    i = 0
    while i < len(fmt) - 1:
        if fmt[i] == "%":
            conv = fmt[i + 1]
            if conv != "%" and conv != "S" and conv not in _CONVERSIONS:
                return (f"-f: unknown conversion %{conv} "
                        f"(use {' '.join('%' + c for c in _CONVERSIONS)}, %S for the stack "
                        "or %% for a percent sign)")
            i += 2
        else:
            i += 1
    return None


def _format(fmt: str, hit: ptprobe.Hit, args: Sequence) -> str:
    """printf-style: %d %u %x %s (string at the address) %p %f %%, one per argument in order."""
    out: List[str] = []
    i = 0
    n = 0
    while i < len(fmt):
        c = fmt[i]
        if c != "%" or i + 1 == len(fmt):
            out.append(c)
            i += 1
            continue
        conv = fmt[i + 1]
        i += 2
        if conv == "%":
            out.append("%")
            continue
        if conv == "S":
            out.append(render.stack_text(hit))
            continue
        value = args[n] if n < len(args) else 0
        n += 1
        if isinstance(value, float) and conv in "duxp":
            value = int(value)
        if conv == "d":
            v = int(value) & _U64
            out.append(str(v - (1 << 64) if v >= 1 << 63 else v))
        elif conv == "u":
            out.append(str(int(value) & _U64))
        elif conv == "x":
            out.append(f"{int(value) & _U64:x}")
        elif conv == "p":
            out.append(f"{int(value) & _U64:#x}")
        elif conv == "f":
            out.append(str(float(value)))
        else:  # "s", the last of _CONVERSIONS (checked by _check_format)
            try:
                out.append(hit.read_str(int(value)))
            except PtprobeError:
                out.append(f"<bad address {int(value):#x}>")
    out.append("")
    return "".join(out).replace("\\n", "\n").replace("\\t", "\t")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ptprobe", description="Probe instructions of a process with ptrace: function entries, "
        "offsets, USDT probes.", epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ptprobe {ptprobe.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("-p", "--probe", action="append", default=[], metavar="SPEC",
                       help="a probe spec (repeat for more)")
        p.add_argument("--json", action="store_true", help="one JSON object per hit")
        p.add_argument("-f", "--format", metavar="FMT",
                       help="printf-style line per hit over the arguments: %%d %%u %%x %%p %%f %%s")
        p.add_argument("-o", "--output", metavar="FILE", help="write hits to FILE instead of stdout")
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
        p.add_argument("-q", "--quiet", action="store_true", help="print no hits (counts only)")
        p.add_argument("--latency", action="append", default=[], metavar="FUNC",
                       help="print a log2 histogram of FUNC's durations at the end (PATH:SYMBOL or a "
                            "uprobe/uretprobe spec; repeat for more)")
        p.add_argument("--stack", action="store_true",
                       help="the user stack of every hit (after its line, or a \"stack\" field in --json)")
        p.add_argument("-t", "--timestamp", action="store_true",
                       help="start each text line with the hit's CLOCK_MONOTONIC time in seconds")

    run = sub.add_parser("run", help="start a program under tracing",
                         description="Start PROGRAM with the probes armed before its own code runs.")
    common(run)
    run.add_argument("program", nargs=argparse.REMAINDER, metavar="-- PROGRAM [ARGS...]")

    att = sub.add_parser("attach", help="attach to a running process",
                         description="Attach to every thread of PID; detach on Ctrl-C, SIGTERM, SIGHUP, "
                         "--duration or the process's exit.")
    att.add_argument("pid", metavar="PID")
    common(att)
    att.add_argument("--duration", type=float, metavar="SECONDS", help="detach after SECONDS")
    att.add_argument("--allow-no-new-privs", action="store_true",
                     help="allow setting no_new_privs in the process (irrevocable) so that jmp slots "
                     "can be used without CAP_SYS_ADMIN")
    lst = sub.add_parser("list", help="list the USDT probes (and functions) of a file or process",
                         description="List the USDT probes of an ELF file, or of every object mapped "
                         "in a process: provider, name, sites, semaphore, argument spec.")
    lst.add_argument("path", nargs="?", metavar="PATH", help="an executable or shared library")
    lst.add_argument("--pid", type=int, help="a running process instead of a file")
    lst.add_argument("--symbols", action="store_true", help="also list function symbols")
    lst.add_argument("--json", action="store_true", help="JSON output")
    return parser


def _list(args: argparse.Namespace, out: IO[str]) -> int:
    from ptprobe import discover
    if (args.path is None) == (args.pid is None):
        raise ProbeSpecError("list needs a PATH or --pid PID (one of them)")
    if args.pid is not None:
        probes = list(discover.iter_process_usdt_probes(args.pid))
        functions = list(discover.iter_process_functions(args.pid)) if args.symbols else []
    else:
        probes = list(discover.iter_usdt_probes(args.path))
        functions = list(discover.iter_functions(args.path)) if args.symbols else []
    if args.json:
        records = [{"type": "usdt", "path": p.path, "provider": p.provider, "name": p.name,
                    "addresses": list(p.addresses), "semaphore": p.semaphore, "args": p.args,
                    "spec": p.spec} for p in probes]
        records += [{"type": "function", "path": f.path, "name": f.name, "address": f.address,
                     "size": f.size} for f in functions]
        out.write(json.dumps(records, indent=1) + "\n")
        return 0
    by_path: Dict[str, List] = {}
    for p in probes:
        by_path.setdefault(p.path, []).append(p)
    if not probes:
        out.write("no USDT probes\n")
    for path, group in by_path.items():
        out.write(f"{path}\n")
        width = max(len(f"{p.provider}:{p.name}") for p in group)
        for p in sorted(group, key=lambda p: (p.provider, p.name)):
            sites = ", ".join(f"{a:#x}" for a in p.addresses[:4]) + (" ..." if len(p.addresses) > 4 else "")
            extra = f"  semaphore {p.semaphore:#x}" if p.semaphore else ""
            out.write(f"  {p.provider + ':' + p.name:<{width}}  {sites}{extra}\n")
            if p.args:
                out.write(f"  {'':<{width}}  args: {p.args}\n")
    if functions:
        out.write("functions:\n")
        for f in functions:
            out.write(f"  {f.address:#014x} {f.size:6d}  {f.name}  ({os.path.basename(f.path)})\n")
    return 0


def _summary(session: ptprobe.Session, probes: List[ptprobe.Probe], err: IO[str]) -> None:
    """One line per probe: hits, and its sites by mechanism. A site armed in several
    processes (children that inherited it, or exec'd the same file) counts once."""
    for probe in probes:
        kinds: Dict[str, set] = {}
        for site in probe.sites:
            obj = site.obj
            where = (obj.identity, obj.link_time(site.address)) if obj is not None else (site.pid, site.address)
            kinds.setdefault(site.mechanism, set()).add(where)
        how = ", ".join(f"{len(w)} {k}" for k, w in sorted(kinds.items())) or "not armed"
        print(f"ptprobe: {probe.name}: {probe.hits} hit{'' if probe.hits == 1 else 's'} ({how})", file=err)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    err = sys.stderr
    observer = _CliObserver(err)
    out: IO[str] = sys.stdout
    problem = _check_format(args.format) if getattr(args, "format", None) is not None else None
    if problem is not None:
        print(f"ptprobe: {problem}", file=err)
        return EXIT_USAGE
    if getattr(args, "output", None):
        try:
            out = open(args.output, "w")
        except OSError as exc:
            print(f"ptprobe: cannot open {args.output}: {exc.strerror}", file=err)
            return EXIT_USAGE
    if getattr(args, "max_trampoline_pages", 0) < 0:
        print("ptprobe: --max-trampoline-pages must be >= 0", file=err)
        return EXIT_USAGE
    if args.command == "list":
        try:
            return _list(args, out)
        except PtprobeError as exc:
            print(f"ptprobe: {exc}", file=err)
            return exc.exit_code
    printer = None if args.quiet else _Printer(out, args.json, args.format, args.stack, args.timestamp)
    options = dict(slots=args.slots, seccomp=not args.no_seccomp,
                   max_trampoline_pages=args.max_trampoline_pages, follow=not args.no_follow,
                   colocate=args.colocate, observer=observer)
    try:
        specs = [ptprobe.parse_spec(s) for s in args.probe]
        latency_specs = [ptprobe.return_spec(s) for s in args.latency]
    except ProbeSpecError as exc:
        print(f"ptprobe: {exc}", file=err)
        return exc.exit_code
    session: Optional[ptprobe.Session] = None
    probes: List[ptprobe.Probe] = []
    latency: List[ptprobe.Probe] = []
    stop_signal: List[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stop_signal.append(signum)
        if session is not None:
            session.request_stop()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        if args.command == "run":
            program = list(args.program)
            if program and program[0] == "--":
                program = program[1:]
            if not program:
                print("ptprobe: run needs a program: ptprobe run [-p SPEC]... -- PROGRAM [ARGS...]", file=err)
                return EXIT_USAGE
            session = ptprobe.run(program, **options)
        else:
            try:
                pid = int(args.pid)
            except ValueError:
                print(f"ptprobe: {args.pid!r} is not a process id", file=err)
                return EXIT_USAGE
            session = ptprobe.attach(pid, allow_no_new_privs=args.allow_no_new_privs, **options)
        with session:
            for spec in specs:
                probes.append(session.probe(spec, printer))
            for spec in latency_specs:
                latency.append(session.probe(spec))
            if stop_signal:
                session.detach()
            elif args.command == "attach":
                status = session.wait(timeout=args.duration)
                session.detach()
                if status is not None:
                    observer.notice(f"process {session.main_pid} exited "
                                    + (f"with status {status}" if status >= 0 else f"by signal {-status}"))
            else:
                session.wait()
                session.detach()
        for probe in latency:
            out.write("\n".join(render.latency_report(probe)) + "\n")
        out.flush()
        _summary(session, probes + latency, err)
        if args.command == "run":
            status = session.returncode if session.returncode is not None else 0
            if status < 0:
                _die_by(-status)
            return status
        return 0
    except PtprobeError as exc:
        print(f"ptprobe: {exc}", file=err)
        if session is not None and probes:
            _summary(session, probes, err)
        return exc.exit_code
    except BrokenPipeError:
        return 1
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if out is not sys.stdout:
            out.close()


def _die_by(sig: int) -> None:
    """End the way the program did: by the same signal (without a core dump)."""
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, ValueError, OSError):
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    if sig not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)


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
