"""Shared test fixtures: C targets compiled with gcc at test time."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterable, Sequence

import pytest

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
    digest.update(repr((flags, shared)).encode())
    name = output or (Path(source).stem + ("-lib.so" if shared else ""))
    out_dir = _CACHE / digest.hexdigest()[:16]
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / name
    if not out.exists():
        cmd = ["gcc", "-g", "-I", str(C_DIR)]
        if shared:
            cmd += ["-shared", "-fPIC"]
        cmd += [str(s) for s in sources] + list(flags) + ["-o", str(out) + ".tmp"]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(str(out) + ".tmp", out)
    return str(out)


@pytest.fixture(scope="session")
def cbuild():
    """The :func:`build` function, for tests that want it as a fixture."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    return build
