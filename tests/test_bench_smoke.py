"""Smoke test of tools/bench.py: `--quick --json` runs and reports every number.

No timing is asserted: only that each measurement exists and is positive.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import REPO, repo_env

BENCH = REPO / "tools" / "bench.py"

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")


@pytest.fixture(scope="module")
def report():
    res = subprocess.run([sys.executable, str(BENCH), "--quick", "--json"], capture_output=True, text=True,
                         timeout=120, env=repo_env(), cwd=str(REPO))
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


def _positive(entry, *keys):
    for key in keys:
        assert isinstance(entry[key], (int, float)) and entry[key] > 0, (key, entry)


def test_top_level_keys(report):
    assert {"meta", "baseline", "c_limit", "python_limit", "ptprobe", "kernel", "ratios", "arming",
            "fairness", "errors"} <= set(report)
    meta = report["meta"]
    assert meta["quick"] is True and meta["runs"] == 1
    assert meta["threads"] == [1, 2]
    assert {"default", "same"} <= set(meta["placements"])
    assert meta["ptprobe_placements"] == ["auto", "all"] + meta["placements"]


def test_baselines(report):
    base = report["baseline"]
    _positive(base, "syscall_getpgid_ns")
    assert set(base["loop_ns_per_iter"]) >= {"nop1", "push", "ret", "nop5"}
    assert all(v > 0 for v in base["loop_ns_per_iter"].values())


@pytest.mark.parametrize("key", ["c_limit", "python_limit"])
def test_limits(report, key):
    seen = {(r["stop"], r["threads"], r["placement"]) for r in report[key]}
    for stop in ("return", "seed", "int3"):
        for threads in (1, 2):
            for where in report["meta"]["placements"]:
                assert (stop, threads, where) in seen
    for r in report[key]:
        _positive(r, "us_per_hit", "hits_per_s")


def test_ptprobe_cases(report):
    seen = {(r["site"], r["stop"], r["handler"], r["threads"], r["placement"]) for r in report["ptprobe"]}
    required = [("nop5", "return", False), ("nop5", "seed", False), ("nop5", "int3", False),
                ("nop5", "return", True), ("nop5", "int3", True),
                ("usdt_nop1_5", "return", False), ("usdt_nop1_10", "return", False),
                ("nop1", "int3", False), ("push", "int3", False), ("ret", "int3", False)]
    for site, stop, handler in required:
        for threads in (1, 2):
            for where in report["meta"]["ptprobe_placements"]:
                assert (site, stop, handler, threads, where) in seen, (site, stop, handler, threads, where)
    for r in report["ptprobe"]:
        _positive(r, "us_per_hit", "hits_per_s")
        assert r["mechanism"] == ("int3" if r["stop"] == "int3" else "jmp")


def test_ratios(report):
    ratios = report["ratios"]
    assert ratios["jmp_over_int3"] and ratios["ptprobe_over_c"] and ratios["placement_same_over_default"]
    assert ratios["placement_auto_over_default"] and ratios["placement_all_over_default"]
    assert ratios["python_over_c"] and ratios["ptprobe_over_python"]
    for group in ratios.values():
        for r in group:
            _positive(r, "ratio")


def test_kernel_uprobes(report):
    kernel = report["kernel"]
    if not kernel["available"]:
        assert kernel["reason"]
        return
    assert {r["site"] for r in kernel["results"]} >= {"nop1", "nop5"}
    for r in kernel["results"]:
        _positive(r, "us_per_hit", "hits_per_s")
    # the benchmark removes its events (and unmounts tracefs if it mounted it)
    events = "/sys/kernel/tracing/uprobe_events"
    if os.path.exists(events):
        with open(events) as fh:
            assert "ptbench/" not in fh.read()


def test_arming(report):
    cases = {a["case"]: a for a in report["arming"]}
    assert {"nop5_jmp", "nop5_int3", "insn_int3", "usdt_batch_jmp"} <= set(cases)
    for a in cases.values():
        assert a["sites"] == 1000
        _positive(a, "arm_s", "disarm_s")
    assert cases["nop5_jmp"]["mechanisms"] == ["jmp"]
    assert cases["insn_int3"]["mechanisms"] == ["int3"]


def test_fairness(report):
    """The per-thread spread with 16 and 64 threads, untraced and through ptprobe (not
    judged here: a timed figure, for the report)."""
    seen = {(f["mechanism"], f["threads"]) for f in report["fairness"]}
    assert {("native", 16), ("return", 16), ("native", 64), ("return", 64)} <= seen
    for f in report["fairness"]:
        _positive(f, "median", "max", "total")
        assert 0 <= f["min"] <= f["median"] <= f["max"]


def test_no_errors(report):
    """Every case ran (an error names the case and what went wrong)."""
    assert report["errors"] == []


def test_in_program(report):
    """The in-program section: counting and recording rates, consumer rates, the stop path beside them."""
    section = report["in_program"]
    _positive(section, "bare_call_ns", "record_ns", "consumer_trivial_ns", "consumer_json_ns", "stop_handler_ns",
              "stop_json_ns", "stop_2threads_default_ns")
    _positive(section["count_ns"], "0", "2", "4")


def test_call_graphs(report):
    """The call-graph section: ns per recorded call, bare and under ptprobe, one and 4 threads."""
    section = report["calls"]
    assert set(section["per_call"]) == {"1", "4"}
    for row in section["per_call"].values():
        _positive(row, "bare_ns", "ptprobe_ns")
        assert row["uftrace_ns"] is None or row["uftrace_ns"] > 0
    assert "lua" not in section                   # --quick leaves the whole program out


def test_placement(report):
    """The placement section: every policy on every case (1-16 hitting threads, a
    single-threaded program, one hitting thread beside 7 that hit nothing), and the
    rounds per second of the threads that hit nothing, also without a tracer."""
    section = report["placement"]
    assert section["policies"] == ["single", "all", "hitting", "off"]
    rows = {(r["hitters"], r["busy"], r["policy"]): r for r in section["rows"]}
    for case in ((0, 0), (1, 0), (2, 0), (4, 0), (16, 0), (1, 7)):
        for policy in section["policies"]:
            row = rows[case + (policy,)]
            assert "error" not in row, row
            _positive(row, "us_per_hit", "hits_per_s")
            if case[1]:
                # a --quick phase lasts a few ms: under "all", where all 9 threads share
                # one CPU, the threads that hit nothing may not run in it at all
                assert isinstance(row["busy_ops_per_s"], (int, float)) and row["busy_ops_per_s"] >= 0, row
    assert section["busy_untraced_ops_per_s"]["7"] > 0
