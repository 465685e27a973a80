"""Call traces: function entries and exits, as calls, as a trace file, as reports.

Pure data and text: nothing here talks to a process. :class:`CallTrace`
takes the events of a recording (:meth:`CallTrace.entered`,
:meth:`CallTrace.exited`) and pairs them per thread into :class:`Call`
values; :func:`write_trace` and :func:`read_trace` store and load them in
ptprobe's trace file format (Chrome's JSON trace event format, which the
Perfetto UI opens, with a version of ptprobe's own: see ``docs/trace-format.md``);
:func:`report` and :func:`graph` make the text of ``ptprobe report`` and
``ptprobe graph``.

A call whose exit was not seen is never given one: it is *lost* (a longjmp or
an exception skipped its return), *unfinished* (the recording ended first: the
thread was inside it, or the program exited or exec'd from it) or has *no exit*
(its return could not be followed).
"""

from __future__ import annotations

import fnmatch
import gc
import json
from typing import IO, Any, Dict, Iterable, Iterator, List, Optional, Set, Tuple

from .errors import TraceFormatError

__all__ = ["Call", "CallTrace", "TraceFormatError", "TRACE_VERSION", "read_trace", "write_trace", "validate",
           "report", "graph", "trace_events"]

#: The trace file's format version (``otherData.ptprobe_trace_version``).
TRACE_VERSION = 1
FORMAT_NAME = "ptprobe-calls"
#: events encoded at a time when a trace file is written
_WRITE_BATCH = 20000

#: How a call ended: returned; its exit skipped (longjmp); the recording ended
#: inside it; its return could not be followed
RETURNED = "returned"
LOST = "lost"
UNFINISHED = "unfinished"
NO_EXIT = "no exit"


class Call:
    """One call of a function by one thread: *depth* is 0 for the outermost
    recorded call of the thread; *end_ns* None when it did not return (*status*
    says why); *children* the calls it made, in order."""

    __slots__ = ("pid", "tid", "name", "start_ns", "depth", "end_ns", "status", "children")

    def __init__(self, pid: int, tid: int, name: str, start_ns: int, depth: int, end_ns: Optional[int] = None,
                 status: str = UNFINISHED, children: Optional[List["Call"]] = None) -> None:
        self.pid = pid
        self.tid = tid
        self.name = name
        self.start_ns = start_ns
        self.depth = depth
        self.end_ns = end_ns
        self.status = status
        self.children: List[Call] = [] if children is None else children

    def __repr__(self) -> str:
        return (f"Call(pid={self.pid}, tid={self.tid}, name={self.name!r}, start_ns={self.start_ns}, "
                f"depth={self.depth}, end_ns={self.end_ns}, status={self.status!r})")

    @property
    def duration_ns(self) -> Optional[int]:
        return None if self.end_ns is None else self.end_ns - self.start_ns

    @property
    def self_ns(self) -> Optional[int]:
        """Time in the function itself: its duration less its children's."""
        if self.end_ns is None:
            return None
        return self.end_ns - self.start_ns - sum(c.duration_ns or 0 for c in self.children)


class CallTrace:
    """Calls of every thread, paired from entry and exit events.

    Events are kept as they come (cheap: they arrive while the program runs)
    and paired into :class:`Call` values when :attr:`calls` or :attr:`roots` is
    read."""

    def __init__(self) -> None:
        self._calls: List[Call] = []                         # in order of entry
        self._roots: List[Call] = []                         # outermost calls, in order
        self._stacks: Dict[Tuple[int, int], List[Call]] = {}
        #: threads gone (exited, exec'd, or their process) whose last records may still
        #: come: the ring is read in order, and a record of another thread not
        #: committed yet holds back those behind it; an outermost entry of that thread
        #: id (depth 0) starts a new stack
        self._gone: Set[Tuple[int, int]] = set()
        self._pending: List[tuple] = []
        self.process_names: Dict[int, str] = {}
        #: object -> the names of the functions that were to be recorded but have no
        #: patchable entry (kept in the trace file)
        self.unpatchable: Dict[str, List[str]] = {}

    @property
    def calls(self) -> List[Call]:
        """Every call, in the order of their entries."""
        self._build()
        return self._calls

    @property
    def roots(self) -> List[Call]:
        """The outermost calls of each thread, in order (the others are their children)."""
        self._build()
        return self._roots

    def entered(self, pid: int, tid: int, name: str, time_ns: int, depth: Optional[int] = None) -> None:
        """*tid* entered *name* with *depth* calls pending under it (None: its return
        will not be seen: the call is recorded with status "no exit"); pending
        calls beyond *depth* were skipped (longjmp): they are marked lost."""
        self._pending.append(((0, pid, tid, name, time_ns, depth),))

    def exited(self, pid: int, tid: int, time_ns: int, lost: int = 0) -> None:
        """The innermost pending call of *tid* returned, after *lost* deeper ones
        had been skipped (by longjmp): those are marked lost, not ended."""
        self._pending.append(((1, pid, tid, None, time_ns, lost),))

    def add_events(self, events: Iterable[tuple]) -> None:
        """Entries and exits in bulk, in order: ``(0, pid, tid, name, time_ns,
        depth)`` as :meth:`entered` takes them, ``(1, pid, tid, name, time_ns,
        lost)`` as :meth:`exited` does. *events* may be an iterator: it is read
        when the calls are."""
        self._pending.append(events)

    def thread_gone(self, pid: int, tid: int) -> None:
        """*tid* is gone (it exited, or exec'd): its pending calls stay unfinished."""
        self._pending.append(((2, pid, tid, None, 0, 0),))

    def process_gone(self, pid: int) -> None:
        """Process *pid* exec'd (or ended): its pending calls stay unfinished."""
        self._pending.append(((3, pid, 0, None, 0, 0),))

    def finish(self) -> None:
        """The recording ended: every pending call stays unfinished."""
        self._pending.append(((4, 0, 0, None, 0, 0),))

    def _build(self) -> None:
        if not self._pending:
            return
        # millions of new objects, none of them garbage: the cyclic collector would
        # scan them again and again for nothing
        collecting = gc.isenabled()
        gc.disable()
        try:
            self._pair()
        finally:
            if collecting:
                gc.enable()

    def _pair(self) -> None:
        pending, self._pending = self._pending, []
        stacks = self._stacks
        gone = self._gone
        calls = self._calls
        roots = self._roots
        add_call = calls.append
        key: Tuple[int, int] = (0, 0)
        stack: Optional[List[Call]] = None
        for batch in pending:
            for kind, pid, tid, name, time_ns, value in batch:
                if (pid, tid) != key:
                    key = (pid, tid)
                    stack = stacks.get(key)
                if kind == 0:
                    if value == 0 and gone and key in gone:
                        # an outermost call of a thread id that is gone: a new thread (or a
                        # new image); a late entry of the old thread has its depth
                        gone.discard(key)
                        stack = stacks[key] = []
                    if stack is None:
                        stack = stacks[key] = []
                    if value is not None:
                        while len(stack) > value:
                            stack.pop().status = LOST
                    call = Call(pid, tid, name, time_ns, len(stack))
                    (stack[-1].children if stack else roots).append(call)
                    add_call(call)
                    if value is not None:
                        stack.append(call)
                    else:
                        call.status = NO_EXIT
                elif kind == 1:
                    if not stack:
                        continue
                    if value:
                        for _ in range(min(value, len(stack) - 1)):
                            stack.pop().status = LOST
                    call = stack.pop()
                    call.end_ns = time_ns
                    call.status = RETURNED
                else:
                    if kind == 2:
                        gone.add((pid, tid))
                    elif kind == 3:
                        gone.update(k for k in stacks if k[0] == pid)
                    else:
                        stacks.clear()
                        gone.clear()
                    key, stack = (0, 0), None


# --------------------------------------------------------------------------- the file
def trace_events(trace: CallTrace) -> List[Dict[str, Any]]:
    """The Chrome trace events of *trace*: one complete ("X") event per returned
    call, a begin ("B") event without an end for the others (with its status),
    and names for processes and threads."""
    return list(_iter_events(trace))


def _meta_events(trace: CallTrace) -> List[Dict[str, Any]]:
    """The events that name the processes and threads of *trace*."""
    threads = sorted({(c.pid, c.tid) for c in trace.calls})
    return ([{"ph": "M", "name": "process_name", "pid": pid, "tid": pid,
              "args": {"name": trace.process_names.get(pid, f"process {pid}")}}
             for pid in sorted({p for p, _ in threads})]
            + [{"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": f"thread {tid}"}}
               for pid, tid in threads])


def _iter_events(trace: CallTrace) -> Iterator[Dict[str, Any]]:
    yield from _meta_events(trace)
    for call in trace.calls:
        if call.end_ns is not None:
            yield {"name": call.name, "cat": "function", "ph": "X", "pid": call.pid, "tid": call.tid,
                   "ts": _us(call.start_ns), "dur": _us(call.end_ns - call.start_ns), "args": {"depth": call.depth}}
        else:
            yield {"name": call.name, "cat": "function", "ph": "B", "pid": call.pid, "tid": call.tid,
                   "ts": _us(call.start_ns), "args": {"depth": call.depth, "status": call.status}}


def _us(ns: int) -> float:
    """Microseconds, with three decimals (exact to the nanosecond, as the file has them)."""
    return float(f"{ns // 1000}.{ns % 1000:03d}")


def write_trace(trace: CallTrace, out: IO[str], *, command: Optional[List[str]] = None) -> None:
    """Write *trace* as a trace file (one JSON object), the calls' events formatted
    a batch at a time (the same events as :func:`trace_events`)."""
    calls = trace.calls
    other = {"format": FORMAT_NAME, "ptprobe_trace_version": TRACE_VERSION, "clock": "CLOCK_MONOTONIC",
             "command": command or [], "calls": len(calls), "unpatchable": trace.unpatchable}
    head = [json.dumps(e, separators=(",", ":")) for e in _meta_events(trace)]
    out.write('{"traceEvents":[' + ",".join(head))
    names: Dict[str, str] = {}
    lines: List[str] = []
    for call in calls:
        name = names.get(call.name)
        if name is None:
            name = names[call.name] = json.dumps(call.name)
        start = call.start_ns
        if call.end_ns is not None:
            dur = max(call.end_ns - start, 0)
            lines.append(f'{{"name":{name},"cat":"function","ph":"X","pid":{call.pid},"tid":{call.tid},'
                         f'"ts":{start // 1000}.{start % 1000:03d},"dur":{dur // 1000}.{dur % 1000:03d},'
                         f'"args":{{"depth":{call.depth}}}}}')
        else:
            lines.append(f'{{"name":{name},"cat":"function","ph":"B","pid":{call.pid},"tid":{call.tid},'
                         f'"ts":{start // 1000}.{start % 1000:03d},'
                         f'"args":{{"depth":{call.depth},"status":"{call.status}"}}}}')
        if len(lines) >= _WRITE_BATCH:
            out.write(("," if head else "") + ",".join(lines))
            head = head or ["(written)"]
            lines.clear()
    if lines:
        out.write(("," if head else "") + ",".join(lines))
    out.write('],"displayTimeUnit":"ns","otherData":' + json.dumps(other, separators=(",", ":")) + "}\n")


def validate(doc: Any) -> None:
    """Raise :class:`TraceFormatError` unless *doc* is a trace file ptprobe reads."""
    if not isinstance(doc, dict) or not isinstance(doc.get("traceEvents"), list):
        raise TraceFormatError("not a trace file: no traceEvents list")
    other = doc.get("otherData")
    if not isinstance(other, dict) or other.get("format") != FORMAT_NAME:
        raise TraceFormatError("not a ptprobe trace file (otherData.format)")
    version = other.get("ptprobe_trace_version")
    if version != TRACE_VERSION:
        raise TraceFormatError(f"trace file version {version!r}: this ptprobe reads version {TRACE_VERSION}")
    for i, event in enumerate(doc["traceEvents"]):
        if not isinstance(event, dict) or event.get("ph") not in ("X", "B", "M"):
            raise TraceFormatError(f"event {i}: not an X, B or M event")
        for key, kind in (("pid", int), ("tid", int), ("name", str)):
            if not isinstance(event.get(key), kind):
                raise TraceFormatError(f"event {i}: {key} missing or not {kind.__name__}")
        if event["ph"] == "M":
            continue
        if not isinstance(event.get("ts"), (int, float)) or not isinstance(event.get("args"), dict) \
                or not isinstance(event["args"].get("depth"), int):
            raise TraceFormatError(f"event {i}: ts or args.depth missing")
        if event["ph"] == "X" and not isinstance(event.get("dur"), (int, float)):
            raise TraceFormatError(f"event {i}: an X event without dur")
        if event["ph"] == "B" and event["args"].get("status") not in (LOST, UNFINISHED, NO_EXIT):
            raise TraceFormatError(f"event {i}: a B event without a status")
    count = other.get("calls")
    found = sum(1 for event in doc["traceEvents"] if event["ph"] != "M")
    if isinstance(count, int) and count != found:
        raise TraceFormatError(f"{found} call events where otherData.calls says {count}: the file was cut "
                               "or edited")


def read_trace(source: IO[str]) -> CallTrace:
    """A :class:`CallTrace` from a trace file (its calls rebuilt into trees)."""
    try:
        doc = json.load(source)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TraceFormatError(f"not a trace file: {exc}") from None
    validate(doc)
    trace = CallTrace()
    unpatchable = doc["otherData"].get("unpatchable", {})
    if isinstance(unpatchable, dict):
        trace.unpatchable = {str(k): [str(n) for n in v] for k, v in unpatchable.items() if isinstance(v, list)}
    parents: Dict[Tuple[int, int], List[Call]] = {}
    for event in doc["traceEvents"]:
        if event["ph"] == "M":
            if event["name"] == "process_name":
                trace.process_names[event["pid"]] = str(event["args"].get("name", ""))
            continue
        start = round(event["ts"] * 1000)
        end = start + round(event["dur"] * 1000) if event["ph"] == "X" else None
        call = Call(event["pid"], event["tid"], event["name"], start, event["args"]["depth"], end,
                    RETURNED if end is not None else event["args"]["status"])
        stack = parents.setdefault((call.pid, call.tid), [])
        del stack[call.depth:]
        (stack[-1].children if stack else trace._roots).append(call)
        trace._calls.append(call)
        stack.append(call)
    return trace


# --------------------------------------------------------------------------- reports
def _time(ns: Optional[float]) -> str:
    if ns is None:
        return "-"
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3f} {unit}"
    return f"{ns:.0f} ns"


def report(trace: CallTrace, sort: str = "total") -> str:
    """Per function: calls, total time (of returned calls, a recursive call's
    counted once, in its outermost call), self time, average (total over the
    returned calls), and calls without a return, sorted by *sort*
    ("total", "self", "calls", "name")."""
    rows: Dict[str, List[int]] = {}
    # a recursive call's time is already in its caller's: the total counts only
    # the calls with no call of the same function above them
    work: List[Tuple[Call, frozenset]] = [(c, frozenset()) for c in trace.roots]
    while work:
        call, above = work.pop()
        row = rows.setdefault(call.name, [0, 0, 0, 0])          # calls, total, self, unreturned
        row[0] += 1
        if call.end_ns is None:
            row[3] += 1
        else:
            if call.name not in above:
                row[1] += call.duration_ns or 0
            row[2] += call.self_ns or 0
        inner = above | {call.name}
        work.extend((child, inner) for child in call.children)
    key = {"total": lambda kv: -kv[1][1], "self": lambda kv: -kv[1][2], "calls": lambda kv: -kv[1][0],
           "name": lambda kv: kv[0]}.get(sort)
    if key is None:
        raise ValueError(f"unknown sort key {sort!r}: total, self, calls or name")
    lines = [f"{'total':>12}  {'self':>12}  {'calls':>9}  {'average':>12}  {'no return':>9}  function"]
    for name, (calls, total, self_ns, unreturned) in sorted(rows.items(), key=key):
        returned = calls - unreturned
        lines.append(f"{_time(total if returned else None):>12}  {_time(self_ns if returned else None):>12}  "
                     f"{calls:>9}  "
                     f"{_time(total / returned if returned else None):>12}  {unreturned or '':>9}  {name}")
    return "\n".join(lines)


def graph(trace: CallTrace, thread: Optional[int] = None, function: Optional[str] = None) -> str:
    """The call tree of each thread, calls of one function under one parent
    merged (total time, calls), as uftrace's graph shows it; only thread *thread*
    if given; with *function* (a name, or a pattern: * ? [..]), the trees under
    the calls of the functions it matches (the outermost ones, when they recurse)."""
    lines: List[str] = []
    threads: Dict[Tuple[int, int], List[Call]] = {}
    for root in _tops(trace.roots, function) if function is not None else trace.roots:
        if thread is None or root.tid == thread:
            threads.setdefault((root.pid, root.tid), []).append(root)
    for (pid, tid), roots in sorted(threads.items()):
        lines.append(f"# process {pid} thread {tid}")
        lines.append(f"{'total time':>12}  {'calls':>7}  function")
        _graph_lines(roots, 0, lines)
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def _tops(roots: Iterable[Call], function: str) -> List[Call]:
    """The calls of the functions *function* matches with no such call above
    them, in order."""
    found: List[Call] = []
    work = list(reversed(list(roots)))
    while work:
        call = work.pop()
        if call.name == function or fnmatch.fnmatchcase(call.name, function):
            found.append(call)
        else:
            work.extend(reversed(call.children))
    return found


def _graph_lines(calls: Iterable[Call], depth: int, lines: List[str]) -> None:
    merged: Dict[str, List[Call]] = {}
    for call in calls:
        merged.setdefault(call.name, []).append(call)
    for name, group in merged.items():
        total = sum(c.duration_ns or 0 for c in group)
        open_calls = sum(1 for c in group if c.end_ns is None)
        mark = f"  ({open_calls} without return)" if open_calls else ""
        shown = _time(total if open_calls < len(group) else None)     # ('-': none returned)
        lines.append(f"{shown:>12}  {len(group):>7}  {'  ' * depth}{name}{mark}")
        _graph_lines([child for c in group for child in c.children], depth + 1, lines)
