"""The command line's documentation, written once: ``ptprobe --help`` (with the
option help of the parser), ``ptprobe help TOPIC`` and the man page
(``ptprobe help --man``) are made from the texts here.

A topic's text is plain text: paragraphs, and blocks indented by two spaces
or more that are shown as they are (examples, tables).
"""

from __future__ import annotations

import argparse
import datetime
import re
from typing import Dict, List, Tuple

SUMMARY = "probe instructions of a process with ptrace: function entries, offsets, USDT probes"

DESCRIPTION = """\
ptprobe starts a program under tracing (run) or attaches to running processes
(attach), arms probes on instructions (function entries, offsets inside
functions, USDT probes), and on every hit prints a line, feeds aggregations,
or only counts. It needs no root, no eBPF and no kernel module: only the right
to ptrace the program. Every site gets its original bytes back when ptprobe
detaches."""

SYNOPSIS = (
    "ptprobe run [OPTIONS] -p SPEC... -- PROGRAM [ARGS...]",
    "ptprobe attach TARGET... [--tree] [OPTIONS] -p SPEC...",
    "ptprobe record [-o FILE] [-F PATTERN]... [-N PATTERN]... [--object OBJECT]... -- PROGRAM [ARGS...]",
    "ptprobe record --pid TARGET [--duration S] [OPTIONS]",
    "ptprobe report [FILE] [--sort total|self|calls|name]",
    "ptprobe graph [FILE] [--tid TID] [-F FUNCTION]",
    "ptprobe list PATH|NAME|SPEC [PATTERN] [--symbols [PATTERN]] [--json]",
    "ptprobe list --pid PID [PATTERN] [--symbols [PATTERN]] [--json]",
    "ptprobe help [TOPIC] [--man]",
)

TOPICS: Dict[str, Tuple[str, str]] = {}


def _topic(name: str, summary: str, text: str) -> None:
    TOPICS[name] = (summary, text.strip("\n"))


_topic("specs", "probe specs: uprobe:PATH:SYMBOL, usdt:PATH:PROVIDER:NAME, wildcards", """
  uprobe:PATH:SYMBOL            the function's first instruction
  uprobe:PATH:SYMBOL+OFFSET     an instruction inside it (decimal or 0x hex)
  uprobe:PATH:0xADDRESS         an instruction by its address in the file
  uprobe:PATH:PATTERN           every function matching a pattern: str*, *_init, [a-c]*
  uretprobe:PATH:SYMBOL         the function's returns (also uprobe:PATH:SYMBOL%return)
  usdt:PATH:PROVIDER:NAME       every site of a USDT probe (* and ? in PROVIDER and NAME)

PATH is a file (./prog, /usr/lib/x86_64-linux-gnu/libc.so.6) or the name of an
object as /proc/PID/maps shows it: libc.so.6, or libc for any libc.so*. A name
that is not mapped (yet) is looked for in PATH (programs: python3 finds the
python3.11 it links to) and in the dynamic loader's directories (libraries):
a library found there is armed when the program loads it; a name found nowhere
is an error (exit 6), with the names that are mapped.

A pattern arms every function symbol that matches (each address once); those
that cannot be probed are skipped and counted. An OFFSET or ADDRESS must be the
start of an instruction: it is checked by decoding from the start of its
function.

IFUNC symbols (strlen, memcpy, strcmp in glibc) are resolved as gdb resolves
them: the probe goes on the implementation the resolver chose in that process
(read from the process's GOT), and ptprobe says which.

An object replaced on disk while mapped ("(deleted)" in /proc/PID/maps, after a
package upgrade or a rebuild) is probed as it is mapped: through
/proc/PID/map_files/ where that is allowed (root), else from its mapped bytes
(ELF header, dynamic section and dynamic symbols). A PATH that names the new
file matches the mapped old one.""")

_topic("format", "-f FORMAT: printf-style lines over the arguments", """
-f prints one line per hit, printf-style:

  %d %i %u %x %X %o %c     integers      %p      a pointer
  %f %F %e %E %g %G        floating      %s      the string at the address
  %%                       a percent sign

with flags (- + space # 0), a width, a precision and a length (hh h l ll z j
t): %5d %-8s %08lx %.20s. \\n \\t \\e are escapes.

Which argument: a USDT probe's arguments in order, each with the size and sign
its spec declares (an int holding -7 prints -7). For a uprobe, integer
conversions take the integer argument registers in order (rdi, rsi, rdx, rcx,
r8, r9) and floating ones the SSE registers (xmm0..xmm7), as the C calling
convention hands them to a function: '%d %f %d' suits f(int, double, int). A
register has no type: without a length, %d %u %x read an int (32 bits) as
C's printf does; %ld reads 64 bits; %hf reads a float (%f: a double). %N$d
picks argument N (from 1). A conversion past the arguments a probe has is an
error (exit 2) when ptprobe can tell, else it prints <no argN>.

%s reads at most 64 bytes (-s N changes it, a precision too: %.200s), escapes
control characters (\\n, \\t, \\xNN) and ends a cut string with ...; NULL
prints (null).

Fields: %{probe} (the spec), %{name} (symbol+offset or provider:name),
%{pid}, %{tid}, %{comm} (process name), %{time} (seconds since tracing
began), %{time_ns} (CLOCK_MONOTONIC), %{address}, %{args} (as the default
line shows them), %{retval}; a width applies: %-16{comm}. %S is the user
stack, a line per frame after the text.

For a return probe's hit, the values are its return value, then the
arguments the function was entered with: '%d <- %d' prints f's result and
its first argument.

With --json the object also has "text" (the -f line) and "strings" (what its
%s conversions read, by argument: {"arg1": "..."}).""")

_topic("filter", "--filter EXPR: keep only the hits where a condition holds", """
--filter keeps a hit only when the expression is true (not zero):

  --filter 'arg0 > 100 && tid == 1234'
  --filter 'str(arg1) == "GET" || comm == "nginx"'
  --filter 's32(arg2) < 0'

Values: arg0..argN (the arguments: uprobe registers rdi, rsi, rdx, rcx, r8,
r9; USDT: the probe's own), pid, tid, address, comm, name, probe (strings),
numbers (123, 0x7b, 1.5) and "strings". Functions: str(x) and str(x, n) (the
string at address x), reg("rax") (any register at the site), s8 s16 s32 s64
u8 u16 u32 u64 (truncate, signed or not), contains(s, t), startswith(s, t).

Operators as in C, loosest first: || && | ^ & (== !=) (< <= > >=) (<< >>)
(+ -) (* / %), unary ! - ~. Strings compare with == and !=. A hit for which
the condition cannot be evaluated (a NULL string, an argument the probe does
not have) is left out, and the summary says how many were.

The expression is parsed by ptprobe (never given to Python's eval) and checked
before the program runs: a mistake is an error with its column (exit 2).""")

_topic("agg", "--agg AGG: counts, sums, histograms by key, printed as bpftrace does", """
--agg (repeatable) aggregates the hits that pass --filter instead of printing
them (add -f to print them too), and prints the result at the end, and
every --interval S seconds (with --json: one JSON object per aggregation,
its entries as {"key": [...], "value": ...} or {"key": [...], "buckets":
[[low, high, count], ...]}):

  --agg 'count() by tid'                 hits per thread
  --agg 'bytes = sum(arg2) by comm'      a named sum per process name
  --agg 'hist(arg1)'                     a power-of-two histogram
  --agg 'lhist(arg1, 0, 1000, 100)'      a linear one: min, max, step
  --agg 'avg(arg0) by str(arg1)'         min(), max(), avg(), stats() too
  --agg 'count() by stack'               by user stack (where stack traces exist)

Keys and values are --filter expressions. Output, as bpftrace prints maps:

  @count[1234]: 56
  @hist:
  [4, 8)                 8 |@@@@@@@@@@                                          |
  [8, 16)               40 |@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@|

The Python API has the same: ptprobe.Aggregation("hist(arg1) by tid"), fed by
session.probe(spec, agg.add), read with agg.data() or agg.render().""")

_topic("output", "where hits, aggregations, notices and the summary go", """
Hit lines and aggregations go to stderr with run (the program owns stdout, as
with ltrace and strace), and to stdout with attach (as bpftrace and perf
print). -o FILE writes them to FILE, -o - to stdout. Notices, errors and the
summary always go to stderr.

A line per hit by default: 'NAME pid=.. tid=.. address=.. args: ...' (a
return: 'NAME%return ... retval=.. duration=..us args: ...'); -f FORMAT for
your own; --json for one object per hit with probe, name, pid, tid, comm,
time_ns, address and args (a return: retval, duration_ns, entry_time_ns,
return_address). -t starts each text line with the hit's CLOCK_MONOTONIC
time; --stack adds the user stack (a line per frame, or a "stack" field).
--latency FUNC prints a log2 histogram of FUNC's durations at the end. -q
prints no hits, only the summary.

When the output closes (ptprobe ... | head), tracing ends quietly: attach
detaches, run detaches and lets the program go on. A write error (a full disk)
ends it the same way, with an error (exit 74).

On a terminal, while hits do not go to it, a status line shows hits and
hits per second per probe, refreshed in place; -q, --no-status, or a stderr
that is not a terminal turn it off.

At the end, on stderr, a line per probe: its hits and how its sites are armed
(jmp or int3); when several processes were traced, a line per process.""")

_topic("attach", "attach TARGET...: PIDs, names, process trees; when it detaches", """
  ptprobe attach 1234 -p SPEC              one process (all its threads)
  ptprobe attach 1234 5678 -p SPEC         several
  ptprobe attach nginx -p SPEC             every process of that name (pgrep -x)
  ptprobe attach --tree 4321 -p SPEC       the process and all its descendants:
                                           a PostgreSQL postmaster and its backends

Children the traced processes fork later are traced too (--no-follow: not).
Processes given by name or found by --tree that ptprobe may not trace are left
out with a notice. ptprobe detaches on Ctrl-C, SIGTERM, SIGHUP, at the end of
--duration S, when its output closes, or when every process has exited; each
process runs on with its original code. A process stopped by SIGSTOP or Ctrl-Z
stays stopped.

With run, a first signal (or --duration, or a closed output) detaches and
waits for the program, which runs on; a second signal ends that wait.""")

_topic("list", "ptprobe list: what can be probed in a file or a process", """
  ptprobe list PATH [PATTERN]              USDT probes of a file (PATH may be a
                                           name: libc, python3)
  ptprobe list PATH --symbols [PATTERN]    and its functions
  ptprobe list --pid PID [PATTERN]         of every object a process maps
  ptprobe list 'uprobe:libc:str*'          the probes a spec pattern arms, one
  ptprobe list 'usdt:python3:*:gc*'        spec per line (as bpftrace -l)

PATTERN filters USDT probes by PROVIDER:NAME (or NAME), and with --symbols
PATTERN the functions by name; * ? [..] wildcards. --json for machines.""")

_topic("record", "ptprobe record, report, graph: every call of a program, as uftrace shows it", """
ptprobe record arms the entry of every function of the program (or of the
objects --object names) that has a patchable entry: the 5-byte NOP that
-pg -mfentry -mnop-mcount leaves (also after an endbr64), or the five 1-byte
NOPs of -fpatchable-function-entry=5. The program itself writes each entry
and exit, with the time and thread, into memory it shares with ptprobe; its
return addresses are taken over in the program, not by stops, and all given
back when recording ends, also for threads inside recorded functions.

  gcc -O2 -pg -mfentry -mnop-mcount -fno-pie -no-pie -o prog prog.c
  ptprobe record -- ./prog args             writes ptprobe.json
  ptprobe record --pid 1234 --duration 5    a running process, 5 seconds
  ptprobe report                            total, self time and calls per function
  ptprobe graph --tid 1234                  the call tree of thread 1234

Functions without a patchable entry are listed, not recorded. A call that a
longjmp left is marked lost, one still pending when recording ended is
unfinished: neither gets an invented end. Children forked are recorded as
processes of their own. The trace file is JSON in Chrome's trace event format
(see docs/trace-format.md): the Perfetto UI (ui.perfetto.dev) opens it with a
track per thread.

Recording needs the jmp slots: root, CAP_SYS_ADMIN, or --allow-no-new-privs
with --pid. Each call costs the program about a hundred nanoseconds; ptprobe
decodes the calls when recording ends, at about a microsecond or two each, so
a hot program recorded for seconds makes a large file: narrow it with -F and
-N.""")

_topic("exit", "exit codes", """
run and record -- exit with the program's status (and die by the same
signal). ptprobe's own errors print one line, 'ptprobe: ...', on stderr and
exit with:

  2   bad usage, probe spec, -f format, --filter or --agg expression
  3   no such process
  4   permission denied (ptrace or /proc refused)
  5   not an ELF file (or missing, unreadable)
  6   symbol, USDT probe or object not found
  7   address not on an instruction boundary
  8   site already patched by someone else
  9   program cannot be started
  10  memory fault in the tracee
  11  other tracer error
  13  trace file missing, unreadable, not ptprobe's or of another version
      (report, graph)
  70  internal error (PTPROBE_DEBUG=1 prints the traceback)
  74  the output cannot be written (-o FILE on a full disk)""")

_topic("examples", "examples", """
  ptprobe run -p 'uprobe:./prog:compute' -f 'compute(%d, %d)' -- ./prog
  ptprobe run -q -p 'uprobe:libc:str*' -- ls          count every str* call
  ptprobe run --agg 'hist(arg2)' -p uprobe:libc:write -- ./prog
  ptprobe attach --tree $(pgrep -o postgres) -p 'usdt:postgres:postgresql:query__start' \\
      -f '%{pid} %s'
  ptprobe attach nginx --duration 10 --agg 'count() by comm, tid' -p uprobe:libc:malloc
  ptprobe attach 1234 --filter 'str(arg0) == "/etc/passwd"' -p uprobe:libc:open -f '%s %d'
  ptprobe list libc --symbols 'mem*'
  ptprobe record -F 'parse*' -- ./prog input.txt && ptprobe report""")


def topic_text(name: str) -> str:
    summary, text = TOPICS[name]
    return f"{name} - {summary}\n\n{text}\n"


def topics_list() -> str:
    width = max(len(name) for name in TOPICS)
    return "\n".join(f"  {name:<{width}}  {summary}" for name, (summary, _) in TOPICS.items())


EPILOG = "topics (ptprobe help TOPIC):\n" + topics_list() + "\n"


# --------------------------------------------------------------------------- the man page

def _roff_escape(text: str) -> str:
    text = text.replace("\\", "\\e")
    text = text.replace("-", "\\-")
    if text.startswith((".", "'")):
        text = "\\&" + text
    return text


def _roff_text(text: str) -> List[str]:
    """Plain text (paragraphs; blocks indented by two or more spaces kept as they are) as roff."""
    out: List[str] = []
    literal = False
    for line in text.splitlines():
        if not line.strip():
            if literal:
                out.append(".RE")
                out.append(".fi")
                literal = False
            out.append(".PP")
            continue
        if re.match(r"  \S|   ", line):
            if not literal:
                out.append(".nf")
                out.append(".RS 2")
                literal = True
            out.append(_roff_escape(line[2:]))
        else:
            if literal:
                out.append(".RE")
                out.append(".fi")
                literal = False
            out.append(_roff_escape(line))
    if literal:
        out.append(".RE")
        out.append(".fi")
    return out


def man_page(parser: argparse.ArgumentParser, version: str) -> str:
    """The man page (roff), from the parser's options and the topics."""
    date = datetime.date.today().isoformat()
    lines = [f'.TH PTPROBE 1 "{date}" "ptprobe {version}" "User Commands"',
             ".SH NAME", f"ptprobe \\- {_roff_escape(SUMMARY)}",
             ".SH SYNOPSIS", ".nf"]
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    commands = subparsers[0].choices if subparsers else {}
    lines += [_roff_escape(line) for line in SYNOPSIS]
    lines += [".fi", ".SH DESCRIPTION"] + _roff_text(DESCRIPTION)
    for name, sub in commands.items():
        lines += [f".SH {name.upper()}"] + _roff_text(sub.description or "")
        for action in sub._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            flags = ", ".join(action.option_strings) or (action.metavar or action.dest)
            if action.option_strings and action.nargs != 0:
                flags += f" {action.metavar or action.dest.upper()}"
            help_text = (action.help or "") % {"default": action.default} if action.help else ""
            lines += [".TP", f"\\fB{_roff_escape(str(flags))}\\fR", _roff_escape(help_text)]
    for name, (summary, text) in TOPICS.items():
        if name == "exit":
            lines += [".SH EXIT STATUS"]
        else:
            lines += [f".SH {name.upper()}", _roff_escape(summary[0].upper() + summary[1:] + "."), ".PP"]
        lines += _roff_text(text)
    lines += [".SH SEE ALSO", "bpftrace(8), perf-probe(1), ltrace(1), gdb(1), ptrace(2)"]
    return "\n".join(lines) + "\n"
