"""Where an object given by name is on disk: programs in ``PATH``, libraries in the
dynamic loader's directories.

A probe spec or ``ptprobe list`` may name an object instead of giving its path:
``libc`` (any ``libc.so*``), ``libssl.so.3``, ``python3``. Mapped objects are
matched by that name directly; this module finds the files a name can mean
before they are mapped (a library loaded later) or when the name is a link
(``python3`` runs ``python3.11``).
"""

from __future__ import annotations

import functools
import glob
import os
import shutil
from typing import Iterable, List, Optional

#: searched after LD_LIBRARY_PATH and /etc/ld.so.conf, as ld.so does
DEFAULT_LIBRARY_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64",
                        "/lib", "/usr/lib", "/usr/local/lib")


def name_matches(basename: str, name: str) -> bool:
    """Does the file *basename* answer to the object name *name*? ``libc.so.6``
    answers to ``libc.so.6``, ``libc.so`` and ``libc``; the dynamic loader
    (``ld-linux-x86-64.so.2``) also to ``ld.so``."""
    return basename == name or basename.startswith(name + ".so") or \
        (name == "ld.so" and basename.startswith("ld-linux"))


def _conf_dirs(path: str, depth: int = 0) -> List[str]:
    dirs: List[str] = []
    if depth > 8:
        return dirs
    try:
        with open(path) as fh:
            lines = fh.read().splitlines()
    except OSError:
        return dirs
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("include "):
            pattern = line[len("include "):].strip()
            if not pattern.startswith("/"):
                pattern = os.path.join(os.path.dirname(path), pattern)
            for included in sorted(glob.glob(pattern)):
                dirs.extend(_conf_dirs(included, depth + 1))
        elif line.startswith("/"):
            dirs.append(line)
    return dirs


def library_dirs() -> List[str]:
    """The directories the dynamic loader searches, in its order, existing ones only."""
    env = os.environ.get("LD_LIBRARY_PATH", "")
    candidates = [d for d in env.split(":") if d] + _conf_dirs("/etc/ld.so.conf") + list(DEFAULT_LIBRARY_DIRS)
    out: List[str] = []
    for d in candidates:
        if d not in out and os.path.isdir(d):
            out.append(d)
    return out


@functools.lru_cache(maxsize=64)
def _listing(directory: str) -> List[str]:
    try:
        return sorted(os.listdir(directory))
    except OSError:
        return []


def find_libraries(name: str, dirs: Optional[Iterable[str]] = None) -> List[str]:
    """The files in the loader's directories that answer to *name* (real paths, each once)."""
    if not name or "/" in name:
        return []
    found: List[str] = []
    for directory in dirs if dirs is not None else library_dirs():
        for entry in _listing(directory):
            if name_matches(entry, name):
                path = os.path.realpath(os.path.join(directory, entry))
                if path not in found and _is_elf(path):
                    found.append(path)
    return found


def _is_elf(path: str) -> bool:
    """A regular file that starts as an ELF file does (``libc.so`` may be a linker script)."""
    try:
        if not os.path.isfile(path):
            return False
        with open(path, "rb") as fh:
            return fh.read(4) == b"\x7fELF"
    except OSError:
        return False


def find_program(name: str) -> Optional[str]:
    """The real path of program *name* found in PATH, None if there is none."""
    if not name or "/" in name:
        return None
    path = shutil.which(name)
    return os.path.realpath(path) if path else None


def find_object(name: str) -> Optional[str]:
    """The file *name* means: itself when it exists (a path), else the program in
    PATH, else the first library of that name; None if there is none."""
    if "/" in name or os.path.isfile(name):
        return name if os.path.exists(name) else None
    program = find_program(name)
    if program is not None:
        return program
    libraries = find_libraries(name)
    return libraries[0] if libraries else None
