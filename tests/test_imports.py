"""Imports inside madakv_vllm point one way: no module imports, at its top or inside a function,
a module that imports it back (directly or through others). In madakv_vllm/integration the entry
point (plugin.register) is on top, the patches below it, and what they apply below them."""

import ast

from conftest import ROOT

PACKAGE = ROOT / "madakv_vllm"


def _module_name(path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the madakv_vllm modules it imports anywhere in its source}. ``from pkg import x``
    names the submodule ``pkg.x`` where that is a module, else ``pkg``."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        is_pkg = path.name == "__init__.py"
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolved against this module's package
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in paths:  # ``import madakv_vllm.integration.plugin`` -> that module
                    t = t.rpartition(".")[0]
                if t and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_graph_is_read_from_the_sources():
    graph = import_graph()
    integ = "madakv_vllm.integration"
    assert f"{integ}.plugin" in graph["madakv_vllm"]  # a function-level import counts
    assert f"{integ}.kv_manager" in graph[f"{integ}.patches"]  # so does one inside a wrapper
    assert {f"{integ}.rules", f"{integ}.metrics", f"{integ}.mm_cache"} <= graph[f"{integ}.patches"]
    assert integ in graph[f"{integ}.plugin"]  # ``from madakv_vllm.integration import VLLM_MINOR``


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_madakv_vllm():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_integration_layers_entry_then_patches_then_rules():
    """Only the entry point imports plugin and the patches; the rules, metrics and config import
    neither, so what the patches apply never reaches back up to them."""
    graph = import_graph()
    integ = "madakv_vllm.integration"
    importers = {m: {n for n, deps in graph.items() if m in deps} for m in graph}
    assert importers[f"{integ}.plugin"] == {"madakv_vllm"}
    assert importers[f"{integ}.patches"] == {f"{integ}.plugin"}

    def below(module):
        seen, todo = set(), [module]
        while todo:
            for dep in graph[todo.pop()] - seen:
                seen.add(dep)
                todo.append(dep)
        return seen

    for lower in ("rules", "metrics", "mm_cache", "kv_manager", "eviction", "per_head", "cpu_backend", "cuda_backend"):
        reached = below(f"{integ}.{lower}")
        assert not reached & {f"{integ}.plugin", f"{integ}.patches"}, (lower, sorted(reached))
