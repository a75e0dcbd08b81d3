"""The package's import graph: imports run one way (no cycles between packages or modules), none inside functions.

Nodes are the subpackages (``train``, ``data``, ``evaluation``, ``analysis``, ``embedded``) and the top-level
modules (``cli``, ``user_errors``, ``atomic_files``, ``__main__``); an edge is an ``import``/``from ... import`` of a
project module anywhere in a file. Modules are read as text (``ast``), so a cycle that Python would tolerate at
import time because one side imports inside a function is still found.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "baldro_lightning"
FILES = sorted(PACKAGE.rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_imports(tree: ast.AST, module: str) -> list[tuple[ast.stmt, str]]:
    """(statement, imported project module) for every import of ``baldro_lightning`` code in ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node, alias.name) for alias in node.names if alias.name.startswith("baldro_lightning")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("baldro_lightning"):
            for alias in node.names:
                # `from baldro_lightning.evaluation import metrics` imports the module evaluation.metrics.
                candidate = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).is_file()
                found.append((node, candidate if is_module else node.module))
    return found


def _node(module: str) -> str:
    """The graph node of a module: its subpackage, or itself for a top-level module."""
    parts = module.split(".")
    if len(parts) >= 2 and (PACKAGE / parts[1]).is_dir():
        return parts[1]
    return parts[1] if len(parts) >= 2 else "__init__"


def _graph(level) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in FILES:
        module = _module_name(path)
        for _, target in _project_imports(ast.parse(path.read_text()), module):
            source, dest = level(module), level(target)
            if source != dest and dest != "__init__":
                edges.setdefault(source, set()).add(dest)
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


@pytest.mark.parametrize("level", ["package", "module"])
def test_imports_have_no_cycle(level: str):
    edges = _graph(_node if level == "package" else (lambda m: m))
    assert edges, "no project imports found: the test reads the wrong folder"
    assert _cycle(edges) is None, f"import cycle: {' -> '.join(_cycle(edges))}"


def test_package_layers():
    """The intended order, lowest first; a package may import only those before it."""
    order = [
        "user_errors",
        "atomic_files",
        "data",
        "train",
        "evaluation",
        "robustness",
        "cli",
        "analysis",
        "embedded",
        "__main__",
    ]
    edges = _graph(_node)
    assert set(edges) | {d for ds in edges.values() for d in ds} <= set(order)
    wrong = [(s, d) for s, ds in edges.items() for d in ds if order.index(d) > order.index(s)]
    assert not wrong, f"imports against the layer order {order}: {wrong}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_function_local_project_imports(path: Path):
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    local = [
        f"line {node.lineno}: {target}"
        for node, target in _project_imports(tree, _module_name(path))
        if id(node) not in top_level
    ]
    assert not local, f"{path.name} imports project modules inside functions or blocks: {local}"
