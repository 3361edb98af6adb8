"""Imports run one way: the import graph between adapter's packages, and between its modules, has no cycle.

Every import counts, also one inside a function (a lazy import hides a cycle, it does not remove it) and one
under TYPE_CHECKING. A package node is a subpackage (`adapter.billing`) or a top-level module
(`adapter.config`); a module node is one file.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "adapter"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def known(name: str) -> str | None:
    """The adapter module `name` is, or is in (`adapter.state.base.StateBackend` -> `adapter.state.base`)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {m for alias in node.names if (m := known(alias.name))}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[:len(package.split(".")) - node.level + 1], *filter(None, [base])])
            if base.split(".")[0] == "adapter":
                found |= {m for alias in node.names if (m := known(f"{base}.{alias.name}") or known(base))}
    return found - {module}


MODULE_GRAPH = {module: imports_of(module) for module in MODULES}


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def cycle_in(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path (first node repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the path being explored, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target):], target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_the_imports_it_must_see() -> None:
    """The check is only as good as its parser: a plain, a from-, a relative-free lazy import are all found."""
    assert "adapter.config" in MODULE_GRAPH["adapter.coding.engine"]
    assert "adapter.state.base" in MODULE_GRAPH["adapter.state.sqlite"]
    assert "adapter.hl7v2.pg_ledger" in MODULE_GRAPH["adapter.hl7v2.ledgers"]  # inside a function
    assert cycle_in({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle_in({"a": {"b"}, "b": set()}) is None


def test_modules_import_each_other_one_way() -> None:
    cycle = cycle_in(MODULE_GRAPH)
    assert cycle is None, "modules import each other: " + " -> ".join(cycle or [])


def test_packages_import_each_other_one_way() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for module, targets in MODULE_GRAPH.items():
        graph[package_of(module)] |= {package_of(t) for t in targets} - {package_of(module)}
    cycle = cycle_in(dict(graph))
    assert cycle is None, "packages import each other: " + " -> ".join(cycle or [])
