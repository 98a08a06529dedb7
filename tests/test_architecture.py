"""The package's layering, read from the source with `ast` (no imports run): the core is the adapters' SDK and
never reaches up into training, evaluation or the CLI; evaluation does not use training internals; no module
imports itself back through a cycle (lazy imports inside functions count: they are real dependencies too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "at2_rag"
CLI_MODULES = {"at2_rag.cli", "at2_rag.training.cli"}  # entry points: may wire every layer together


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """at2_rag modules `path` imports (anywhere in the file), resolved to the most specific known module."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from . import x` / `from .pkg import mod` name modules too
            targets = [f"{prefix}.{alias.name}" for alias in node.names] + [prefix]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, modules) for p in paths}


def layer(module: str) -> str:
    if module in CLI_MODULES:
        return "cli"
    for sub in ("training", "evaluation"):
        if module == f"at2_rag.{sub}" or module.startswith(f"at2_rag.{sub}."):
            return sub
    return "core"


ALLOWED = {  # layer -> layers it may import
    "core": {"core"},
    "evaluation": {"core", "evaluation"},
    "training": {"core", "training"},
    "cli": {"core", "evaluation", "training", "cli"},
}


def back_edges(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{src} ({layer(src)}) imports {dst} ({layer(dst)})"
        for src, targets in graph.items()
        for dst in targets
        if layer(dst) not in ALLOWED[layer(src)]
    )


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_graph_sees_the_package():
    graph = import_graph()
    capture = "at2_rag.capture.attention"
    assert capture in graph["at2_rag.capture._runner"] or capture in graph["at2_rag.attributor"]
    assert "at2_rag.evaluation.report" in graph["at2_rag.training.cli"]  # lazy imports inside functions count


def test_no_back_edges():
    """Core modules never import training, evaluation or the CLI; evaluation never imports training."""
    assert back_edges(import_graph()) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"at2_rag.attribution.estimator": {"at2_rag.training.data"}, "at2_rag.training.data": set()}, 1),
        ({"at2_rag.evaluation.report": {"at2_rag.training.collect"}, "at2_rag.training.collect": set()}, 1),
        (
            {
                "at2_rag.training.cli": {"at2_rag.evaluation.report"},
                "at2_rag.evaluation.report": {"at2_rag.capture._runner"},
            },
            0,
        ),
    ],
)
def test_back_edge_check_catches_back_edges(graph, expected):
    assert len(back_edges(graph)) == expected


def test_cycle_check_catches_lazy_cycles(tmp_path):
    a = {"at2_rag.a": {"at2_rag.b"}, "at2_rag.b": {"at2_rag.c"}, "at2_rag.c": {"at2_rag.a"}, "at2_rag.d": set()}
    assert cycles(a) == [["at2_rag.a", "at2_rag.b", "at2_rag.c"]]
    # a function-level import is read as an edge too
    pkg = tmp_path / "at2_rag"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "x.py").write_text("def f():\n    from .y import g\n    return g\n")
    modules = {"at2_rag", "at2_rag.x", "at2_rag.y"}
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert imported_modules(pkg / "x.py", modules) == {"at2_rag.y"}
    finally:
        ROOT = saved
