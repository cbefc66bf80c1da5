"""The package's shape: every module imports, no import circles, imports point down the layers."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "sdtorch"
# A module may import from its own layer or a lower one, never a higher one.
RANK = {"config": 0, "families": 0, "models": 1, "formats": 2, "sampling": 3, "conditioning": 3, "adapters": 3, "generate": 4,
        "editing": 5, "training": 5, "cli": 6, "serve": 6}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports(path: Path, name: str) -> set[str]:
    """Every sdtorch module `path` imports, at the top or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    known = modules()
    return {m for m in found if m in known and m != name}


def layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else None


def test_no_module_over_400_lines():
    long = {n: len(p.read_text().splitlines()) for n, p in modules().items()}
    assert {n: k for n, k in long.items() if k > 400} == {}


def test_every_module_imports():
    for name in modules():
        if name.endswith("__main__"):
            continue
        importlib.import_module(name)


def test_no_import_circles():
    graph = {n: imports(p, n) for n, p in modules().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for m in sorted(graph[n]):
            if m == "sdtorch" or n == "sdtorch":
                continue  # the package root only re-exports lazily
            if state.get(m) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(m):] + [m]))
            if m not in state:
                visit(m, path + [m])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [n])


def test_imports_point_down_the_layers():
    wrong = []
    for name, path in modules().items():
        src = layer(name)
        for m in imports(path, name):
            dst = layer(m)
            if src and dst and RANK[dst] > RANK[src]:
                wrong.append(f"{name} ({src}) imports {m} ({dst})")
    assert not wrong, "\n".join(wrong)
