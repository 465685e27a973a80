#!/usr/bin/env python3
"""Benchmark ptprobe's call graphs (``trace_calls``, ``ptprobe record``) against the
bare call and against uftrace.

    python3 tools/bench_calls.py [--json] [--runs N] [--quick] [--no-lua]

* Per recorded call (entry and exit) in the program: tools/bench_calls_target.c,
  one thread and 4 threads calling a tiny function; ns per call of the measured
  phase, bare, under ``ptprobe`` (the ring large enough for the run) and under
  ``uftrace record -P leaf`` (when uftrace is installed).
* A whole real program: Lua 5.4 (its sources from the lupa sdist on PyPI,
  downloaded once into ~/.cache/ptprobe-bench), built with ``-pg -mfentry
  -mnop-mcount``, running a Lua workload: slowdown, calls per second and trace
  size under ptprobe and uftrace, and every function's call count checked against
  a second build with ``-finstrument-functions`` counting in the program itself.
  (Both builds use -fno-inline, so that they have the same functions, and a
  fixed hash seed, so that they make the same calls.)
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "tools"
sys.path.insert(0, str(REPO))

import ptprobe  # noqa: E402
from ptprobe import calltrace  # noqa: E402
from ptprobe.elf import ElfFile  # noqa: E402

CACHE = Path(os.environ.get("PTPROBE_BENCH_CACHE", Path.home() / ".cache" / "ptprobe-bench"))
LUPA_URL = "https://pypi.org/pypi/lupa/json"
LUPA_VERSION = "2.8"
MCOUNT = ["-pg", "-mfentry", "-mnop-mcount", "-fno-pie", "-no-pie"]

LUA_WORKLOAD = """
local function fib(n) if n < 2 then return n end return fib(n - 1) + fib(n - 2) end
local t = {}
for i = 1, 60000 do t[i] = (i * 7919) % 100003 end
table.sort(t)
local parts = {}
for i = 1, 20000 do parts[#parts + 1] = string.format("%d:%s", i, tostring(t[i])) end
local s = table.concat(parts, ",")
local words = 0
for w in s:gmatch("[^,]+") do words = words + 1 end
print(fib(22), #s, words)
"""

COUNTER_C = r"""
/* Counts every function entry in the program itself (-finstrument-functions),
 * written out at exit to $PTPROBE_COUNTS as "address count" lines. */
#include <stdio.h>
#include <stdlib.h>
#define SLOTS (1 << 16)
static void *keys[SLOTS];
static unsigned long counts[SLOTS];
__attribute__((no_instrument_function)) void __cyg_profile_func_enter(void *fn, void *site)
{
    (void)site;
    unsigned long h = ((unsigned long)fn >> 4) & (SLOTS - 1);
    while (keys[h] && keys[h] != fn)
        h = (h + 1) & (SLOTS - 1);
    keys[h] = fn;
    __atomic_add_fetch(&counts[h], 1, __ATOMIC_RELAXED);
}
__attribute__((no_instrument_function)) void __cyg_profile_func_exit(void *fn, void *site)
{
    (void)fn;
    (void)site;
}
__attribute__((no_instrument_function, destructor)) static void dump(void)
{
    const char *path = getenv("PTPROBE_COUNTS");
    FILE *out = path ? fopen(path, "w") : NULL;
    if (!out)
        return;
    for (int i = 0; i < SLOTS; i++)
        if (keys[i])
            fprintf(out, "%lx %lu\n", (unsigned long)keys[i], counts[i]);
    fclose(out);
}
"""


class _Quiet(ptprobe.Observer):
    def notice(self, text: str) -> None:
        pass


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- per call
def _parse(text: str) -> Dict[str, int]:
    return {k: int(v) for k, v in (t.split("=") for t in text.split() if "=" in t)}


def _ring_for(calls: int) -> int:
    need = max(calls * 2 * 32 * 2, 1 << 20)
    return 1 << (need - 1).bit_length()


def ptprobe_run(argv: List[str], functions: str = "*", ring: int = 4 << 20) -> Tuple[str, float, ptprobe.Probe]:
    """(stdout, wall seconds of wait(), the probe) of *argv* with its calls recorded."""
    out_r, out_w = os.pipe()
    saved = os.dup(1)
    os.dup2(out_w, 1)
    os.close(out_w)
    try:
        session = ptprobe.run(argv, observer=_Quiet(), ring_size=ring)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    chunks = []
    try:
        with session:
            probe = session.trace_calls(argv[0], functions)
            start = time.perf_counter()
            status = session.wait()
            elapsed = time.perf_counter() - start
    finally:
        while True:
            data = os.read(out_r, 65536) if _readable(out_r) else b""
            if not data:
                break
            chunks.append(data)
        os.close(out_r)
    if status != 0:
        raise SystemExit(f"bench_calls: {argv} exited with {status}")
    return b"".join(chunks).decode(), elapsed, probe


def _readable(fd: int) -> bool:
    import select
    return bool(select.select([fd], [], [], 0)[0])


def uftrace_run(argv: List[str], functions: str, workdir: Path) -> Tuple[str, float, int]:
    """(stdout, wall seconds, bytes of data) of *argv* under ``uftrace record -P``."""
    data = workdir / "uftrace.data"
    shutil.rmtree(data, ignore_errors=True)
    start = time.perf_counter()
    res = subprocess.run(["uftrace", "record", "--no-pager", "-d", str(data), "-P", functions, *argv],
                         capture_output=True, text=True, timeout=1200)
    elapsed = time.perf_counter() - start
    if res.returncode != 0:
        raise SystemExit(f"bench_calls: uftrace failed: {res.stderr.strip()[-300:]}")
    size = sum(f.stat().st_size for f in data.rglob("*") if f.is_file())
    return res.stdout, elapsed, size


def per_call(workdir: Path, runs: int, quick: bool) -> Dict:
    target = workdir / "bench_calls_target"
    subprocess.run(["gcc", "-O2", "-pthread", *MCOUNT, "-c", str(TOOLS / "bench_calls_target.c"),
                    "-o", str(target) + ".o"], check=True)
    subprocess.run(["gcc", "-no-pie", "-pthread", str(target) + ".o", "-o", str(target)], check=True)
    n = 20_000 if quick else 400_000
    res: Dict = {}
    for threads in (0, 4):
        per_thread = n if threads == 0 else n // 2
        argv = [str(target), str(threads), str(per_thread)]
        calls = max(threads, 1) * per_thread
        row: Dict[str, Optional[float]] = {}
        row["bare_ns"] = statistics.median(
            _parse(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)["ns"] / calls
            for _ in range(runs))
        samples = []
        for _ in range(runs):
            out, _, probe = ptprobe_run(argv, "leaf", ring=_ring_for(calls))
            got = sum(1 for c in probe.calls.calls if c.name == "leaf" and c.status == calltrace.RETURNED)
            if got != calls:
                raise SystemExit(f"bench_calls: {got} leaf calls recorded, expected {calls}")
            samples.append(_parse(out)["ns"] / calls)
        row["ptprobe_ns"] = statistics.median(samples)
        if shutil.which("uftrace"):
            row["uftrace_ns"] = statistics.median(
                _parse(uftrace_run(argv, "leaf", workdir)[0])["ns"] / calls for _ in range(runs))
        else:
            row["uftrace_ns"] = None
        res[str(max(threads, 1))] = row
    return res


# --------------------------------------------------------------------------- a real program
def lua_sources() -> Path:
    """The Lua 5.4 sources of the lupa sdist (downloaded once)."""
    dest = CACHE / "lua54"
    if (dest / "lua.c").exists():
        return dest
    CACHE.mkdir(parents=True, exist_ok=True)
    meta = json.load(urllib.request.urlopen(LUPA_URL, timeout=60))
    sdist = next(f for f in meta["releases"][LUPA_VERSION] if f["packagetype"] == "sdist")
    blob = urllib.request.urlopen(sdist["url"], timeout=120).read()
    if hashlib.sha256(blob).hexdigest() != sdist["digests"]["sha256"]:
        raise SystemExit("bench_calls: the lupa sdist does not match its sha256")
    tmp = Path(tempfile.mkdtemp(dir=CACHE))
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        # the interpreter's sources: the files of third-party/lua54/ itself (not its tests)
        members = [m for m in tar.getmembers() if m.isfile() and m.name.split("/")[-3:-1] == ["third-party", "lua54"]]
        for member in members:
            member.name = Path(member.name).name
            tar.extract(member, tmp)
    tmp.rename(dest)
    return dest


def build_lua(src: Path, workdir: Path, flags: List[str], name: str, extra: List[str] = ()) -> Path:
    objs = []
    for c in sorted(src.glob("*.c")):
        if c.name in ("luac.c", "onelua.c", "ltests.c"):
            continue
        obj = workdir / f"{name}-{c.stem}.o"
        # (a fixed hash seed: Lua seeds its string hashes from the clock and ASLR, and the
        # calls of its table code vary from run to run with it)
        subprocess.run(["gcc", "-O2", "-fno-inline", "-std=gnu99", "-DLUA_USE_LINUX", "-Dluai_makeseed(L)=0x2545F491u",
                        *flags, "-c", str(c),
                        "-o", str(obj)], check=True, capture_output=True)
        objs.append(str(obj))
    exe = workdir / name
    subprocess.run(["gcc", "-no-pie", *objs, *extra, "-o", str(exe), "-lm", "-ldl"], check=True, capture_output=True)
    return exe


def _logical(name: str) -> str:
    """A function's name without gcc's clone suffix (``.isra.0``, ``.constprop.0``,
    ``.part.0``): the two builds clone different functions."""
    return name.split(".", 1)[0]


def whole_program(workdir: Path, runs: int) -> Dict:
    src = lua_sources()
    script = workdir / "work.lua"
    script.write_text(LUA_WORKLOAD)
    lua = build_lua(src, workdir, MCOUNT, "lua-mcount")
    counter = workdir / "counter.c"
    counter.write_text(COUNTER_C)
    subprocess.run(["gcc", "-O2", "-c", str(counter), "-o", str(workdir / "counter.o")], check=True)
    # (a name as long as the other's: Lua interns short strings, argv[0] among them)
    lua_counted = build_lua(src, workdir, ["-fno-pie", "-finstrument-functions"], "lua-counts",
                            [str(workdir / "counter.o")])
    argv = [str(lua), str(script)]
    res: Dict = {"program": "Lua 5.4 (lupa 2.8 sdist), -O2 -fno-inline", "workload": "fib(22), sort 60k, strings"}
    bare = []
    for _ in range(runs):
        t0 = time.perf_counter()
        expected = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        bare.append(time.perf_counter() - t0)
    res["bare_s"] = statistics.median(bare)
    samples = []
    probe = None
    for _ in range(runs):
        out, elapsed, probe = ptprobe_run(argv, "*", ring=64 << 20)
        if out != expected:
            raise SystemExit("bench_calls: lua printed something else under ptprobe")
        samples.append(elapsed)
    assert probe is not None
    res["ptprobe_s"] = statistics.median(samples)
    calls = probe.calls
    start = time.perf_counter()                 # what ptprobe record does after the program:
    res["calls"] = len(calls.calls)             # decode and pair the calls, write the file
    buf = io.StringIO()
    calltrace.write_trace(calls, buf)
    res["ptprobe_after_s"] = time.perf_counter() - start
    res["ptprobe_trace_bytes"] = len(buf.getvalue())
    res["unpatchable"] = len(probe.unpatchable)
    # exact against the in-program count of the -finstrument-functions build
    counts_file = workdir / "counts.txt"
    subprocess.run([str(lua_counted), str(script)], capture_output=True, check=True,
                   env=dict(os.environ, PTPROBE_COUNTS=str(counts_file)))
    elf = ElfFile(str(lua_counted))
    theirs: Dict[str, int] = {}
    for line in counts_file.read_text().split("\n"):
        if line:
            address, count = line.split()
            sym = elf.symbol_at(int(address, 16))
            if sym is not None:
                theirs[_logical(sym.name)] = theirs.get(_logical(sym.name), 0) + int(count)
    ours: Dict[str, int] = {}
    for call in calls.calls:
        ours[_logical(call.name)] = ours.get(_logical(call.name), 0) + 1
    common = set(ours) & set(theirs)
    res["functions_compared"] = len(common)
    res["count_mismatches"] = sorted(f"{n}: {ours[n]} != {theirs[n]}" for n in common if ours[n] != theirs[n])[:10]
    res["only_in_one"] = sorted((set(ours) ^ set(theirs)) - {"main"})[:10]
    if shutil.which("uftrace"):
        times, size = [], 0
        for _ in range(runs):
            out, elapsed, size = uftrace_run(argv, ".", workdir)
            times.append(elapsed)
        res["uftrace_s"] = statistics.median(times)
        res["uftrace_bytes"] = size
    return res


def format_report(res: Dict) -> str:
    lines = [f"Call graphs (median of {res['runs']} run(s)), ns per recorded call (entry and exit):"]
    for threads, row in res["per_call"].items():
        uf = row.get("uftrace_ns")
        lines.append(f"  {threads} thread{'s' if threads != '1' else ' '}: bare {row['bare_ns']:7.2f}  "
                     f"ptprobe {row['ptprobe_ns']:7.2f} (+{row['ptprobe_ns'] - row['bare_ns']:.1f})  "
                     + (f"uftrace {uf:7.2f} (+{uf - row['bare_ns']:.1f})" if uf else "uftrace -"))
    lua = res.get("lua")
    if lua:
        lines.append(f"  {lua['program']}, {lua['workload']}: {lua['calls']} calls, "
                     f"{lua['functions_compared']} functions compared with -finstrument-functions counts, "
                     f"{len(lua['count_mismatches'])} mismatches")
        lines.append(f"    bare {lua['bare_s']:.3f} s; ptprobe {lua['ptprobe_s']:.3f} s "
                     f"({lua['ptprobe_s'] / lua['bare_s']:.1f}x, {lua['calls'] / lua['ptprobe_s'] / 1e6:.1f} M calls/s, "
                     f"trace {lua['ptprobe_trace_bytes'] / 1e6:.1f} MB, decoded and written in "
                     f"{lua.get('ptprobe_after_s', 0):.1f} s after the run)")
        if "uftrace_s" in lua:
            lines.append(f"    uftrace {lua['uftrace_s']:.3f} s ({lua['uftrace_s'] / lua['bare_s']:.1f}x, "
                         f"data {lua['uftrace_bytes'] / 1e6:.1f} MB)")
    return "\n".join(lines)


def run(runs: int, quick: bool, lua: bool = True) -> Dict:
    """Every case (the whole program unless *quick* or not *lua*), *runs* times each."""
    workdir = Path(tempfile.mkdtemp(prefix="ptprobe-bench-calls-"))
    try:
        res: Dict = {"runs": runs, "per_call": per_call(workdir, runs, quick)}
        if lua and not quick:
            log("whole program: Lua ...")
            res["lua"] = whole_program(workdir, runs)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return res


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-lua", action="store_true", help="skip the whole-program case (it downloads Lua)")
    args = parser.parse_args()
    res = run(args.runs or (1 if args.quick else 5), args.quick, not args.no_lua)
    print(json.dumps(res, indent=2) if args.json else format_report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
