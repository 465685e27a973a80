"""The layers of docs/design.md hold in the code: every module of ptprobe/ is listed
there, imports go down the list (or stay on one line), and no two modules import
each other, even for typing only."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, List, Set

from helpers import REPO

PACKAGE = REPO / "ptprobe"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return "/".join(rel.parts)


def imports_of(path: Path) -> Set[str]:
    """The ptprobe modules *path* imports (every import: typing-only ones too)."""
    here = module_name(path).split("/")[:-1]           # the package it is in, below ptprobe
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - (node.level - 1)] if node.level > 1 else here
                parts = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "ptprobe":
                parts = node.module.split(".")[1:]
            else:
                continue
            names = [a.name for a in node.names]
            candidates = ["/".join(parts + [n]) for n in names] + ["/".join(parts)]
        elif isinstance(node, ast.Import):
            candidates = ["/".join(a.name.split(".")[1:]) for a in node.names if a.name.startswith("ptprobe.")]
        else:
            continue
        for name in candidates:
            if (PACKAGE / (name + ".py")).exists():
                found.add(name)
    return found


def layer_ranks() -> Dict[str, int]:
    """Module -> the line of the Layers block of docs/design.md that names it."""
    text = (REPO / "docs" / "design.md").read_text()
    block = text.split("## Layers", 1)[1].split("```", 2)[1]
    ranks: Dict[str, int] = {}
    for rank, line in enumerate(block.splitlines()):
        head = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
        for name in re.findall(r"([a-z_/]+)\.py", head):
            ranks[name] = rank
    return ranks


def modules() -> List[Path]:
    return [p for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")]


def test_every_module_is_in_the_layers():
    ranks = layer_ranks()
    missing = [module_name(p) for p in modules() if module_name(p) not in ranks]
    assert not missing, f"not in docs/design.md's Layers: {missing}"


def test_imports_go_down_the_layers():
    ranks = layer_ranks()
    upward = []
    for path in modules():
        name = module_name(path)
        for dep in imports_of(path):
            if dep != name and ranks.get(dep, 1 << 30) < ranks[name]:
                upward.append(f"{name} imports {dep}")
    assert not upward, upward


def test_no_import_cycle():
    graph = {module_name(p): imports_of(p) - {module_name(p)} for p in modules()}
    state: Dict[str, int] = {}
    cycles: List[List[str]] = []

    def visit(node: str, path: List[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles
