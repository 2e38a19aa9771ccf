"""The library's module structure: imports between pipeline/ modules form no cycle."""

from __future__ import annotations

import ast

from .conftest import ROOT

PACKAGE = ROOT / "pipeline"


def import_graph() -> dict[str, set[str]]:
    """Module -> the pipeline modules it imports, at the top or inside functions (`from pipeline import x` too)."""
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    graph = {}
    for name in modules:
        deps = set()
        for node in ast.walk(ast.parse((PACKAGE / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "pipeline":
                deps |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("pipeline.")}
        graph[name] = deps - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that returns to its start (depth-first search), or None."""
    state: dict[str, str] = {}  # "open" while on the search path, "done" once every import below it is checked
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return [*path[path.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_sees_a_cycle() -> None:
    """The check itself: a two-module and a three-module cycle are found, a diamond is not a cycle."""
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) is None


def test_graph_sees_function_level_imports() -> None:
    """Imports inside functions count: evaluate reads exported students through train's loader."""
    assert "train" in import_graph()["evaluate"]


def test_pipeline_imports_form_no_cycle() -> None:
    """A cycle means two modules cannot be read (or imported) one without the other."""
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle in pipeline/: " + " -> ".join(cycle)
