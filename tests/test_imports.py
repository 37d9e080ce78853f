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


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("headstart",) + parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its source (functions, conditionals, ...)."""
    modules = {_module_name(p, package): p for p in sorted(package.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative to the importing module's package
                    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    here = here[: len(here) - node.level + 1]
                    base = ".".join(here + ([node.module] if node.module else []))
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
    assert len(graph) >= 20 and "headstart.learn.heads" in graph["headstart.strategies.fitting"]  # the walk sees the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_walk_sees_imports_inside_functions(tmp_path):
    (tmp_path / "__init__.py").write_text("from .a import f\n")
    (tmp_path / "a.py").write_text("def f():\n    from .b import g\n    return g()\n")
    (tmp_path / "b.py").write_text("from . import a\n\ndef g():\n    return 1\n")
    graph = import_graph(tmp_path)
    assert graph["headstart.a"] == {"headstart.b"} and graph["headstart.b"] == {"headstart.a"}
    assert find_cycle(graph) == ["headstart.a", "headstart.b", "headstart.a"]


# The layers, lowest first: a module imports only modules of its own layer or of layers below it.
# The face (the package's lazy exports, the CLI) sits above everything and may import any layer.
LAYERS = [
    ("base", ["headstart._version", "headstart.settings", "headstart.errors", "headstart.cpu", "headstart.fileio",
              "headstart.quiet", "headstart.progress", "headstart.memory", "headstart.faults",
              "headstart.distributed"]),
    ("data", ["headstart.data"]),
    ("nets", ["headstart.nets"]),
    ("engines", ["headstart.engines"]),
    ("learn", ["headstart.learn"]),
    ("heatmaps", ["headstart.heatmaps"]),  # class activation maps of torch networks; Model.explain uses them
    ("models", ["headstart.models"]),
    ("reports", ["headstart.reports"]),
    ("strategies", ["headstart.strategies"]),
    ("runs", ["headstart.runs"]),
    ("inspection", ["headstart.inspection"]),  # reads a prepared run's features; writes only its own report
    ("serve", ["headstart.serve"]),
    ("face", ["headstart", "headstart.__main__", "headstart.cli"]),
]


def layer_of(module: str) -> int:
    """The index in LAYERS of a module: the longest entry that is the module or a package holding it."""
    hits = [(len(prefix), i) for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
            if module == prefix or prefix != "headstart" and module.startswith(prefix + ".")]
    if not hits:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_imports.py")
    return max(hits)[1]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
                  for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))


def test_every_module_imports_only_its_own_layer_or_those_below():
    graph = import_graph()
    assert {layer_of(m) for m in graph} == set(range(len(LAYERS)))  # every layer has modules
    assert upward_imports(graph) == []


def test_an_upward_import_is_found(tmp_path):
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "errors.py").write_text("")
    for pkg, body in (("data", "from ..runs import train\n"), ("runs", "from headstart.data import folders\n")):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "data" / "folders.py").write_text("def f():\n    from ..runs import train\n")
    (tmp_path / "runs" / "train.py").write_text("from headstart.data import folders\n")
    graph = import_graph(tmp_path)
    assert graph["headstart.data.folders"] == {"headstart.runs.train"}
    assert upward_imports(graph) == ["headstart.data.folders (data) imports headstart.runs.train (runs)"]
