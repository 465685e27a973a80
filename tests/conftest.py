"""Shared test fixtures: C targets compiled with gcc at test time, and the fixtures
several test modules use (their helpers are in helpers.py)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Sequence

import pytest

from helpers import Target

C_DIR = Path(__file__).parent / "c"
_CACHE = Path(os.environ.get("PTPROBE_TEST_BUILD", "/tmp/ptprobe-test-build"))


def build(source: str, *flags: str, output: str | None = None, shared: bool = False,
          extra_sources: Sequence[str] = ()) -> str:
    """Compile tests/c/SOURCE (plus extra sources) with gcc and FLAGS; return the binary's path.

    Binaries are cached by content of sources and flags, so each distinct
    build happens once per machine run.
    """
    sources = [C_DIR / source] + [C_DIR / s for s in extra_sources]
    digest = hashlib.sha256()
    for src in sources:
        digest.update(src.read_bytes())
    for header in sorted(C_DIR.glob("*.h")):
        digest.update(header.read_bytes())
    digest.update(repr((flags, shared, "compiled apart from -pg")).encode())
    name = output or (Path(source).stem + ("-lib.so" if shared else ""))
    out_dir = _CACHE / digest.hexdigest()[:16]
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / name
    if not out.exists():
        base = ["gcc", "-g", "-I", str(C_DIR)] + (["-shared", "-fPIC"] if shared else [])
        inputs = [str(s) for s in sources]
        link_flags = list(flags)
        if "-pg" in flags:
            # -pg only to compile (a 5-byte NOP at each entry with -mnop-mcount): linked
            # with it, the program would write gmon.out into the current directory
            link_flags = [f for f in flags if f != "-pg"]
            objects = []
            for src in sources:
                obj = out_dir / (src.stem + ".o")
                subprocess.run(base + ["-c", str(src)] + list(flags) + ["-o", str(obj)],
                               check=True, capture_output=True, text=True)
                objects.append(str(obj))
            inputs = objects
        subprocess.run(base + inputs + link_flags + ["-o", str(out) + ".tmp"],
                       check=True, capture_output=True, text=True)
        os.replace(str(out) + ".tmp", out)
    return str(out)


@pytest.fixture(scope="session")
def cbuild():
    """The :func:`build` function, for tests that want it as a fixture."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    return build


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
_UNPRIV_DIR = Path(os.environ.get("PTPROBE_TEST_UNPRIV", "/tmp/ptprobe-test-unpriv"))


def unprivileged_python() -> tuple:
    """(python, env) with which user nobody can run ``python -m ptprobe``.

    The interpreter running the tests may live where nobody cannot read (a
    pyenv under /root), so this uses the system's python3 and a world-readable
    copy of ptprobe and its dependencies. Skips when there is none.
    """
    import importlib
    candidates = [sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"]
    python = None
    for cand in candidates:
        if not os.path.exists(cand):
            continue
        probe = subprocess.run(NOBODY + [cand, "-c", "import sys; print(sys.version_info[:2])"],
                               capture_output=True, text=True)
        if probe.returncode == 0:
            python = cand
            break
    if python is None:
        pytest.skip("no python3 that user nobody can run")
    site = _UNPRIV_DIR / "site"
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    repo = Path(__file__).resolve().parent.parent
    shutil.copytree(repo / "ptprobe", site / "ptprobe", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("ptrace", "elftools", "capstone", "keystone"):
        mod = importlib.import_module(name)
        src = Path(mod.__file__).parent
        shutil.copytree(src, site / name, ignore=shutil.ignore_patterns("__pycache__"))
    for path in [_UNPRIV_DIR, *_UNPRIV_DIR.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644 | (0o111 if os.access(path, os.X_OK) else 0))
    env = dict(os.environ, PYTHONPATH=str(site), PYTHONDONTWRITEBYTECODE="1")
    return python, env


@pytest.fixture
def loop_binary() -> str:
    """core_loop (calls work() for ever, printing "progress N ..."), built."""
    return build("core_loop.c", "-O1")


@pytest.fixture
def loop_target(loop_binary) -> Iterator[Target]:
    """core_loop running untraced; killed afterwards."""
    target = Target([loop_binary])
    try:
        yield target
    finally:
        target.kill()
