"""``ptprobe record``, ``report`` and ``graph`` (issue 15) end to end: real programs
built with -pg -mfentry -mnop-mcount (tests/c/graph_target.c), recorded from run and
from attach, the trace file checked against its format, read back by report and
graph; Ctrl-C, --duration, errors.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from conftest import build
from helpers import (GUARD, Lines, Target, code_in_memory, ptprobe_cli, ptprobe_popen, stop_popen, tracer_pid)

from ptprobe import calltrace

MCOUNT = ("-O1", "-pg", "-mfentry", "-mnop-mcount", "-fno-pie", "-no-pie", "-pthread")
PATCHABLE = ("-O1", "-fpatchable-function-entry=5", "-pthread")


def target(flags=MCOUNT) -> str:
    return build("graph_target.c", *flags)


def fib_calls(n: int) -> int:
    return 1 if n < 2 else 1 + fib_calls(n - 1) + fib_calls(n - 2)


def error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ptprobe: "), result.stderr
    return lines[0]


def load(path: Path) -> dict:
    doc = json.loads(path.read_text())
    calltrace.validate(doc)
    return doc


def report_rows(text: str) -> Dict[str, Tuple[int, str]]:
    """report's table: function -> (calls, 'no return' column)."""
    lines = text.splitlines()
    assert lines[0].split() == ["total", "self", "calls", "average", "no", "return", "function"], text
    rows = {}
    for line in lines[1:]:
        if not line.strip():
            break
        rows[line[64:]] = (int(line[28:37]), line[53:62].strip())
    return rows


def graph_rows(text: str) -> List[Tuple[int, int, str]]:
    """graph's lines under its headers: (depth, calls, function and mark)."""
    rows = []
    for line in text.splitlines():
        if not line or line.startswith("#") or line.lstrip().startswith("total time"):
            continue
        name = line[23:]
        rows.append(((len(name) - len(name.lstrip())) // 2, int(line[14:21]), name.strip()))
    return rows


def no_leftovers(folder: Path) -> None:
    assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []


# --------------------------------------------------------------------------- run form
@pytest.mark.parametrize("flags", [MCOUNT, PATCHABLE], ids=["mnop-mcount", "patchable-entry"])
def test_record_run_report_graph(tmp_path, flags):
    """Record fib(12) with the default file name in the current directory; report and
    graph read it back with exact counts and nesting."""
    prog = target(flags)
    n = 12
    result = ptprobe_cli("record", "--", prog, "fib", str(n), cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "fib 144" in result.stdout
    lines = result.stderr.splitlines()
    assert any(line.startswith("ptprobe: recording the calls of ") and line.endswith(" of graph_target")
               for line in lines), result.stderr
    unpatchable = [line for line in lines if "without a patchable entry, not recorded:" in line]
    assert len(unpatchable) == 1 and "_start" in unpatchable[0]
    total = fib_calls(n) + 1
    assert f"ptprobe: {total} calls of 2 functions by 1 thread in 1 process, written to ptprobe.json" in lines
    doc = load(tmp_path / "ptprobe.json")
    assert doc["otherData"]["command"] == [prog, "fib", str(n)]
    assert doc["otherData"]["calls"] == total
    assert "_start" in doc["otherData"]["unpatchable"][prog]
    events = [e for e in doc["traceEvents"] if e["ph"] != "M"]
    assert Counter(e["name"] for e in events) == {"fib": fib_calls(n), "main": 1}
    assert all(e["ph"] == "X" for e in events)
    no_leftovers(tmp_path)

    report = ptprobe_cli("report", cwd=str(tmp_path))
    assert report.returncode == 0, report.stderr
    rows = report_rows(report.stdout)
    assert rows == {"main": (1, ""), "fib": (fib_calls(n), "")}
    assert list(rows) == ["main", "fib"]                     # by total time: main holds fib
    assert "not recorded (no patchable entry): " in report.stdout and "_start" in report.stdout
    by_calls = report_rows(ptprobe_cli("report", "--sort", "calls", cwd=str(tmp_path)).stdout)
    assert list(by_calls) == ["fib", "main"]

    graph = ptprobe_cli("graph", "ptprobe.json", cwd=str(tmp_path))
    assert graph.returncode == 0, graph.stderr
    rows = graph_rows(graph.stdout)
    # main, then fib at each depth: 1, 2, 4, ... calls, merged per caller
    assert rows[0] == (0, 1, "main")
    assert [(depth, name) for depth, _, name in rows[1:]] == [(d, "fib") for d in range(1, n + 1)]
    assert sum(calls for _, calls, _ in rows[1:]) == fib_calls(n)
    only = graph_rows(ptprobe_cli("graph", "-F", "fib", cwd=str(tmp_path)).stdout)
    assert only[0] == (0, 1, "fib") and sum(c for _, c, _ in only) == fib_calls(n)
    assert graph_rows(ptprobe_cli("graph", "-F", "f?b*", cwd=str(tmp_path)).stdout) == only     # a pattern too


def test_record_function_patterns(tmp_path):
    prog = target()
    out = tmp_path / "t.json"
    result = ptprobe_cli("record", "-o", str(out), "-F", "outer", "-F", "mid*", "--", prog, "threads", "2", "100")
    assert result.returncode == 0, result.stderr
    names = Counter(e["name"] for e in load(out)["traceEvents"] if e["ph"] != "M")
    assert names == {"outer": 200, "middle": 200}
    result = ptprobe_cli("record", "-o", str(out), "-N", "inner", "-N", "main", "--", prog, "threads", "2", "100")
    assert result.returncode == 0, result.stderr
    names = Counter(e["name"] for e in load(out)["traceEvents"] if e["ph"] != "M")
    assert names == {"worker": 2, "outer": 200, "middle": 200}
    threads = {e["tid"] for e in load(out)["traceEvents"] if e["ph"] != "M"}
    assert len(threads) == 2
    rows = report_rows(ptprobe_cli("report", str(out)).stdout)
    assert rows["outer"] == (200, "") and rows["middle"] == (200, "")


def test_record_fork_and_exit(tmp_path):
    """A child is recorded apart (its own process in the file); a function that calls
    exit() stays without a return, marked, never given one."""
    prog = target()
    out = tmp_path / "fork.json"
    result = ptprobe_cli("record", "-o", str(out), "--", prog, "fork")
    assert result.returncode == 0, result.stderr
    doc = load(out)
    pids = {e["pid"] for e in doc["traceEvents"] if e["ph"] != "M"}
    assert len(pids) == 2
    assert {e["pid"] for e in doc["traceEvents"] if e["ph"] == "M" and e["name"] == "process_name"} == pids
    assert "by 2 threads in 2 processes" in result.stderr
    result = ptprobe_cli("record", "-o", str(out), "--", prog, "exit")
    assert result.returncode == 3, result.stderr                 # the program's own status
    assert "ptprobe: 2 calls without a return: 2 unfinished" in result.stderr.splitlines()
    rows = report_rows(ptprobe_cli("report", str(out)).stdout)
    assert rows["quitter"] == (1, "1") and rows["main"] == (1, "1") and rows["inner"] == (1, "")


def test_record_run_ctrl_c_writes_the_file_and_lets_the_program_go(tmp_path):
    """Ctrl-C (SIGINT to ptprobe) ends the recording: every return address back, the
    trace written; the program runs on and ends right, and ptprobe with its status."""
    prog = target()
    out = tmp_path / "run.json"
    proc = ptprobe_popen("record", "-o", str(out), "--", prog, "wait", "50", stdin=subprocess.PIPE)
    try:
        stdout = Lines(proc.stdout)
        stdout.wait_for(lambda ls: any(line.startswith("progress ") for line in ls), "progress")
        pid = next(p for p in _children(proc.pid))
        proc.send_signal(signal.SIGINT)
        stderr = Lines(proc.stderr)
        stderr.wait_for(lambda ls: any("written to" in line for line in ls), "the trace written")
        assert tracer_pid(pid) == 0
        for name in ("outer", "middle", "inner"):
            memory, original = code_in_memory(pid, prog, name)
            assert memory == original
        proc.stdin.write(b"q")
        proc.stdin.flush()
        assert proc.wait(timeout=GUARD) == 0
        lines = stdout.wait_for(lambda ls: any(line.startswith("sum ") for line in ls), "sum")
        total, calls = (int(w) for w in next(line for line in lines if line.startswith("sum ")).split()[1::2])
        assert total == 2 * calls * (calls - 1) + 6 * calls
        outer = sum(1 for e in load(out)["traceEvents"] if e["name"] == "outer")
        assert 100000 <= outer <= calls            # (recorded from the start to past "progress 100000")
        no_leftovers(tmp_path)
    finally:
        stop_popen(proc)


def _children(pid: int) -> List[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


# --------------------------------------------------------------------------- attach form
@pytest.mark.parametrize("how", ["duration", "sigint"])
def test_record_attach(tmp_path, how):
    prog = target()
    t = Target([prog, "wait", "50"], ready="ready")
    out = tmp_path / "attach.json"
    try:
        extra = ["--duration", "0.5"] if how == "duration" else []
        proc = ptprobe_popen("record", "--pid", str(t.pid), "-o", str(out), *extra)
        try:
            stderr = Lines(proc.stderr)
            stderr.wait_for(lambda ls: any("recording the calls of" in line for line in ls), "recording")
            if how == "sigint":
                t.out.wait_for(lambda ls: any(line.startswith("progress ") for line in ls), "progress")
                proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=GUARD) == 0
        finally:
            stop_popen(proc)
        assert tracer_pid(t.pid) == 0
        for name in ("outer", "middle", "inner"):
            memory, original = code_in_memory(t.pid, prog, name)
            assert memory == original
        doc = load(out)
        assert doc["otherData"]["command"] == []
        names = Counter(e["name"] for e in doc["traceEvents"] if e["ph"] != "M")
        assert names["outer"] > 100 and abs(names["inner"] - 2 * names["middle"]) <= 2
        assert abs(names["middle"] - names["outer"]) <= 1
        t.send(b"q")
        assert t.proc.wait(timeout=GUARD) == 0
        lines = t.out.wait_for(lambda ls: any(line.startswith("sum ") for line in ls), "sum")
        total, calls = (int(w) for w in next(line for line in lines if line.startswith("sum ")).split()[1::2])
        assert total == 2 * calls * (calls - 1) + 6 * calls
    finally:
        t.kill()


def test_record_attach_killed_leaves_the_program_running(tmp_path):
    """ptprobe record --pid killed (SIGKILL, the OOM killer): the program runs on
    through its patched entries (their stubs go on by themselves) and through a
    later dlopen (no breakpoint is left on the dynamic loader: the loader is watched
    only for probes whose object is not loaded yet)."""
    prog = target()
    t = Target([prog, "wait", "50", "dlopen"], ready="ready")
    try:
        proc = ptprobe_popen("record", "--pid", str(t.pid), "-o", str(tmp_path / "killed.json"))
        try:
            Lines(proc.stderr).wait_for(lambda ls: any("recording the calls of" in line for line in ls),
                                        "recording")
            proc.kill()
            proc.wait(timeout=GUARD)
        finally:
            stop_popen(proc)
        assert tracer_pid(t.pid) == 0
        t.send(b"q")
        assert t.proc.wait(timeout=GUARD) == 0
        t.out.wait_for(lambda ls: "dlopen ok" in ls, "dlopen ok")
    finally:
        t.kill()


# --------------------------------------------------------------------------- errors
def test_record_errors(tmp_path):
    prog = target()
    plain = build("core_simple.c", "-O1", "-fno-pie", "-no-pie")
    cases = [
        (["record"], 2, "record needs a program"),
        (["record", "--pid", "1", "--", prog], 2, "not both"),
        (["record", "--duration", "0", "--", prog, "fib", "3"], 2, "--duration must be"),
        (["record", "--ring-size", "100", "--", prog, "fib", "3"], 2, "--ring-size must be"),
        (["record", "-F", "a:b", "--", prog, "fib", "3"], 2, "bad function pattern"),
        (["record", "-o", str(tmp_path / "no" / "such" / "dir.json"), "--", prog, "fib", "3"], 74, "cannot write"),
        (["record", "--pid", "999999999", "-o", str(tmp_path / "x.json")], 3, "no such process"),
        (["record", "--pid", "0", "-o", str(tmp_path / "x.json")], 2, "not a process id"),
        (["record", "--object", "nosuch*", "-o", str(tmp_path / "x.json"), "--", prog, "fib", "3"], 6,
         "matches no mapped object"),
        (["record", "-o", str(tmp_path / "x.json"), "--", plain], 6, "has a patchable entry"),
        (["record", "-F", "nosuch", "-o", str(tmp_path / "x.json"), "--", prog, "fib", "3"], 6,
         "matches 'nosuch'"),
        (["record", "-N", "*", "-o", str(tmp_path / "x.json"), "--", prog, "fib", "3"], 6, "(leaving out '*')"),
        (["record", "-o", str(tmp_path), "--", prog, "fib", "3"], 74, "it is a directory"),
        (["record", "--object", "libnosuch.so", "-o", str(tmp_path / "x.json"), "--", prog, "fib", "3"], 5,
         "libnosuch.so: no such file"),
        (["report", str(tmp_path / "missing.json")], 13, "No such file"),
        (["graph", str(prog)], 13, "not a trace file"),
    ]
    for argv, code, words in cases:
        result = ptprobe_cli(*argv)
        assert result.returncode == code, (argv, result.stderr)
        assert words in error_line(result), (argv, result.stderr)
        assert result.stdout == "", (argv, result.stdout)          # the program never ran
    no_leftovers(tmp_path)
    assert not (tmp_path / "x.json").exists()


def test_report_and_graph_errors(tmp_path):
    (tmp_path / "other.json").write_text(json.dumps({"traceEvents": [], "otherData": {"format": "chrome"}}))
    result = ptprobe_cli("report", str(tmp_path / "other.json"))
    assert result.returncode == 13 and "not a ptprobe trace file" in error_line(result)
    (tmp_path / "v9.json").write_text(json.dumps(
        {"traceEvents": [], "otherData": {"format": "ptprobe-calls", "ptprobe_trace_version": 9}}))
    result = ptprobe_cli("graph", str(tmp_path / "v9.json"))
    assert result.returncode == 13 and "version 9" in error_line(result)
    out = tmp_path / "fib.json"
    assert ptprobe_cli("record", "-o", str(out), "--", target(), "fib", "4").returncode == 0
    result = ptprobe_cli("graph", "--tid", "1", str(out))
    assert result.returncode == 2 and "no thread 1" in error_line(result)
    result = ptprobe_cli("graph", "-F", "nosuch", str(out))
    assert result.returncode == 6 and "no call of 'nosuch'" in error_line(result)
    result = ptprobe_cli("report", "--sort", "size", str(out))
    assert result.returncode == 2 and "--sort" in error_line(result)
    doc = json.loads(out.read_text())                        # cut short, and still JSON
    doc["traceEvents"] = doc["traceEvents"][:-2]
    (tmp_path / "cut.json").write_text(json.dumps(doc))
    result = ptprobe_cli("report", str(tmp_path / "cut.json"))
    assert result.returncode == 13 and "otherData.calls says" in error_line(result)


def test_record_needs_jmp_slots():
    """A process ptprobe may trace but not give jmp slots (no CAP_SYS_ADMIN, no
    --allow-no-new-privs): an error that says why and what to do, not a trap at
    every function entry; the process goes on untraced, its code as it was."""
    import shutil
    import tempfile
    from conftest import NOBODY, unprivileged_python
    python, env = unprivileged_python()
    folder = tempfile.mkdtemp(prefix="ptprobe-callcli-")
    try:
        os.chmod(folder, 0o777)                      # (nobody writes its trace there)
        prog = shutil.copy(target(), os.path.join(folder, "graph_target"))
        os.chmod(prog, 0o755)
        t = Target([*NOBODY, prog, "wait", "50"], ready="ready")
        t.path = prog
        try:
            result = subprocess.run([*NOBODY, python, "-m", "ptprobe", "record", "--pid", str(t.pid), "-o",
                                     os.path.join(folder, "x.json")], cwd="/", env=env, capture_output=True,
                                    text=True, timeout=GUARD, stdin=subprocess.DEVNULL)
            assert result.returncode == 11, result.stderr
            last = result.stderr.splitlines()[-1]
            assert "calls are recorded through jmp slots only" in last and "--allow-no-new-privs" in last
            assert not os.path.exists(os.path.join(folder, "x.json"))
            assert tracer_pid(t.pid) == 0
            for name in ("outer", "middle", "inner"):
                memory, original = code_in_memory(t.pid, prog, name)
                assert memory == original
            assert t.proc.poll() is None
        finally:
            t.kill()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
