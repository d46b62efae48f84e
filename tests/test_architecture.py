"""The folder tree is the architecture (docs/architecture.md): check the rules on the real imports.

Every import counts, including the ones inside functions (a lazy import is still a dependency, and
still a cycle); only imports under `if TYPE_CHECKING:` are skipped, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "evomerge"

# part -> the parts it may import (besides itself and the shared base: evomerge, evomerge.errors)
ALLOWED: dict[str, set[str]] = {
    "io": set(),
    "merge": {"io"},
    "candidates": {"merge", "io"},
    "scoring": {"io"},
    "workers": {"candidates", "scoring", "merge", "io"},
    "search": {"workers", "scoring", "candidates", "merge", "io"},
    "report": {"search", "workers", "scoring", "candidates", "merge", "io"},
    "zoo": {"io"},
    "cli": {"report", "search", "workers", "scoring", "candidates", "merge", "io", "zoo"},
}
BASE = {"evomerge", "evomerge.errors"}
TOP_LEVEL = set(ALLOWED) | {"__init__.py", "errors.py"}
MAX_LINES = 500


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The evomerge modules `module` imports (`from pkg import submodule` names the submodule)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            for child in getattr(node, "orelse", []):
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "evomerge")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "evomerge":
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
                found.update(subs)
                if len(subs) < len(node.names):
                    found.add(target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    found.discard(module)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    return {
        name: imports_of(path.read_text(), name, path.name == "__init__.py", set(files)) for name, path in files.items()
    }


def part_of(module: str) -> str | None:
    """The part a module belongs to (`evomerge.merge.plan` -> merge); None for the shared base."""
    if module in BASE:
        return None
    return module.split(".")[1]


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for module, deps in sorted(graph.items()):
        part = part_of(module)
        for dep in sorted(deps):
            target = part_of(dep)
            if target is None:
                continue
            if part is None:
                out.append(f"{module} -> {dep}: the shared base imports nothing else of evomerge")
            elif part not in ALLOWED:
                out.append(f"{module}: not in a known part ({', '.join(sorted(ALLOWED))})")
            elif target != part and target not in ALLOWED[part]:
                out.append(f"{module} -> {dep}: {part} may not import {target}")
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return found


# -- the rules, on the real package ------------------------------------------------------------------


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_parts_import_only_what_they_may():
    assert layer_violations(import_graph()) == []


def test_top_level_holds_only_the_parts():
    assert {p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"} == TOP_LEVEL


def test_no_module_is_too_long():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_each_part_says_what_it_may_import():
    for part in ALLOWED:
        doc = ast.get_docstring(ast.parse((PACKAGE / part / "__init__.py").read_text())) or ""
        assert "import" in doc, f"evomerge/{part}/__init__.py: say what the part is and what it may import"


# -- the checker catches what it should ----------------------------------------------------------------


def test_checker_reports_a_forbidden_import():
    graph = {
        "evomerge.io.checkpoint": {"evomerge.errors"},
        "evomerge.merge.plan": {"evomerge.io.checkpoint", "evomerge.scoring.lm_tasks"},
        "evomerge.scoring.lm_tasks": {"evomerge.io.checkpoint"},
        "evomerge.workers.fitness": {"evomerge.search.space"},
    }
    assert layer_violations(graph) == [
        "evomerge.merge.plan -> evomerge.scoring.lm_tasks: merge may not import scoring",
        "evomerge.workers.fitness -> evomerge.search.space: workers may not import search",
    ]


def test_checker_reports_a_cycle():
    graph = {
        "evomerge.search.driver": {"evomerge.search.objectives"},
        "evomerge.search.objectives": {"evomerge.search.run", "evomerge.search.driver"},
        "evomerge.search.run": set(),
    }
    assert cycles(graph) == [["evomerge.search.driver", "evomerge.search.objectives"]]


def test_checker_reads_lazy_imports_and_skips_type_checking(tmp_path):
    pkg = tmp_path / "evomerge"
    (pkg / "io").mkdir(parents=True)
    (pkg / "search").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "io" / "__init__.py").write_text("")
    (pkg / "search" / "__init__.py").write_text("")
    (pkg / "search" / "driver.py").write_text("")
    (pkg / "io" / "reader.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from evomerge.search import driver\n"
        "def read():\n    from ..search.driver import x\n"
    )
    graph = import_graph(pkg)
    assert graph["evomerge.io.reader"] == {"evomerge.search.driver"}
    assert layer_violations(graph) == ["evomerge.io.reader -> evomerge.search.driver: io may not import search"]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from evomerge.merge import plan", {"evomerge.merge.plan"}),
        ("from evomerge.merge import run_plan", {"evomerge.merge"}),
        ("import evomerge.io.checkpoint", {"evomerge.io.checkpoint"}),
        ("from . import runner", {"evomerge.merge.runner"}),
    ],
)
def test_imports_of_resolves_names(source, expected):
    known = {"evomerge.merge", "evomerge.merge.plan", "evomerge.merge.runner", "evomerge.io.checkpoint"}
    assert imports_of(source, "evomerge.merge.recipe", False, known) == expected
