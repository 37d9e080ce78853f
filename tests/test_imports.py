"""The package's import graph, imports inside functions included, has no cycle.

A cycle hides in a function-level import (bundle.py and predict.py imported each other that
way) and makes the order modules load in matter; a module that uses the model must never be
needed by the module that defines it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import headstart

PACKAGE = Path(headstart.__file__).parent


def _module_name(path: Path) -> str:
    return "headstart" if path.name == "__init__.py" else f"headstart.{path.stem}"


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its source (functions, conditionals, ...)."""
    modules = {_module_name(p): p for p in sorted(package.glob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: every module here sits directly in the package
                    base = "headstart" + (f".{node.module}" if node.module else "")
                else:
                    base = node.module or ""
                # `from . import x` imports the submodule x when there is one, else reads x from __init__.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) >= 20 and "headstart.heads" in graph["headstart.training"]  # the walk sees the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_walk_sees_imports_inside_functions(tmp_path):
    (tmp_path / "__init__.py").write_text("from .a import f\n")
    (tmp_path / "a.py").write_text("def f():\n    from .b import g\n    return g()\n")
    (tmp_path / "b.py").write_text("from . import a\n\ndef g():\n    return 1\n")
    graph = import_graph(tmp_path)
    assert graph["headstart.a"] == {"headstart.b"} and graph["headstart.b"] == {"headstart.a"}
    assert find_cycle(graph) == ["headstart.a", "headstart.b", "headstart.a"]
