"""Data flows one way: config + profile -> plan -> strategies applied to modules -> recipe.

The import graph of `lowvram/` is built from the source (ast: nothing is imported or executed), counting imports
inside functions too: a lazy import is still a dependency, and a cycle through one is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lowvram"


def module_files() -> dict[str, Path]:
    files = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """module -> the lowvram modules it imports. `from pkg import name` is an edge to `pkg.name` when that is a
    module, else to `pkg`; a submodule's implicit import of its parent package is not an edge (Python runs the
    parent's __init__ first, but the parent importing its own rooms is not a loop back up)."""
    files = module_files()

    def owner(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, module, path.name == "__init__.py")
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            targets.update(t for n in names if n.startswith("lowvram") and (t := owner(n)) and t != module)
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path a -> b -> ... -> a) per strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(_path_within(graph, component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _path_within(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A closed path through the component, from its first module back to it (breadth first: the shortest)."""
    start = min(component)
    came = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while came[path[-1]] is not None:
                        path.append(came[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
                if w not in came:
                    came[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {sorted(component)}")


def reachable(graph: dict[str, set[str]], roots: list[str]) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        v = todo.pop()
        if v not in seen:
            seen.add(v)
            todo.extend(graph[v])
    return seen


def test_the_import_graph_of_lowvram_has_no_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_cycle_finder_names_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "lowvram"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from lowvram import top\n")
    (pkg / "top.py").write_text("from lowvram.sub.b import f\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    graph = import_graph()
    assert graph["lowvram.sub"] == {"lowvram.sub.b"}
    assert graph["lowvram.sub.b"] == {"lowvram.top"}  # inside a function: still an edge
    assert graph["lowvram.top"] == {"lowvram.sub.b"}
    assert cycles(graph) == [["lowvram.sub.b", "lowvram.top", "lowvram.sub.b"]]


def _within(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _imports_of(graph, prefix: str) -> dict[str, set[str]]:
    return {m: t for m, t in graph.items() if _within(m, prefix)}


def test_the_planner_imports_nothing_from_the_trainer_the_demo_or_the_cli():
    graph = import_graph()
    banned = ("lowvram.train", "lowvram.demo", "lowvram.cli")
    bad = {
        f"{m} -> {t}"
        for m, targets in _imports_of(graph, "lowvram.plan").items()
        for t in targets
        if _within(t, *banned)
    }
    assert not bad, sorted(bad)


@pytest.mark.parametrize("recipe", ["lowvram.train.loop", "lowvram.train.recover"])
def test_the_recipe_reaches_no_loader_no_demo_and_no_planner(recipe):
    """The recipe (one step, the loop, recovery) gets its models, caches and re-planning handed in."""
    graph = import_graph()
    seen = reachable(graph, [recipe])
    banned = (
        "lowvram.plan",
        "lowvram.demo",
        "lowvram.cli",
        "lowvram.train.run",
        "lowvram.hub",
        "lowvram.models.ltx2.checkpoint",
        "lowvram.quant.stream",
        "lowvram.data.build",
    )
    assert not sorted(m for m in seen if _within(m, *banned))
