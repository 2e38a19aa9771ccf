"""The library's module structure: imports between pipeline/ modules form no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import ROOT

PACKAGE = ROOT / "pipeline"


def _module(path: Path) -> str:
    """Dotted name of a file of the package, relative to it: `data.shards`, `config`, `data` (a package)."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


def import_graph() -> dict[str, set[str]]:
    """Module -> the pipeline modules it imports, at the top or inside functions (`from pipeline.x import y` where
    y is a module too)."""
    modules = {_module(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
                base = node.module.partition(".")[2]
                subs = {f"{base}.{alias.name}".lstrip(".") for alias in node.names}
                deps |= (subs & modules.keys()) or ({base} if base else set())
            elif isinstance(node, ast.Import):
                deps |= {alias.name.partition(".")[2] for alias in node.names if alias.name.startswith("pipeline.")}
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
    """Imports inside functions count: the training input opens the cache inside a function."""
    assert "cache.ensemble" in import_graph()["train.memory"]


def test_package_layout_follows_the_pipeline() -> None:
    """`ls pipeline/` shows the stage families, and no module outgrows a reading (STYLE: about 400 lines)."""
    packages = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    assert {"data", "teacher", "cache", "extract", "train", "distill", "evaluate"} <= packages
    long = [
        f"{path.relative_to(ROOT)} ({n})"
        for path in PACKAGE.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > 400
    ]
    assert not long, f"modules over 400 lines: {long}"


def test_training_loop_loads_no_gendd_code() -> None:
    """The loop the teacher trains with imports nothing of GenDD's head, objectives or evaluation: a method's loss is
    loaded when that method runs (MethodSpec.module)."""
    graph = import_graph()
    reached, todo = set(), ["train.loop", "teacher.teacher", "extract.extract"]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo += graph.get(name, ())
    assert not {m for m in reached if m.startswith(("distill", "evaluate"))}, sorted(reached)


def test_pipeline_imports_form_no_cycle() -> None:
    """A cycle means two modules cannot be read (or imported) one without the other."""
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle in pipeline/: " + " -> ".join(cycle)


def test_readme_is_a_manual_of_at_most_200_lines() -> None:
    """Tables and findings live in docs/; the README stays a manual someone reads through."""
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= 200, f"README.md has {lines} lines: move detail to docs/ and link it"
