"""The package's shape, read from the source with `ast` (no imports run): the core's stages import only their own
stage or earlier ones (prepare -> run -> evidence -> score -> the front door -> serving); the core never reaches up
into training, evaluation or the CLI; evaluation does not use training internals; no module imports itself back
through a cycle (lazy imports inside functions count: they are real dependencies too); only the front door and the
capture stage touch the private runner, and nothing outside the package touches a private module; the public
surface is the list below, and each integration exports only its own classes."""

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


# ---- the core's stages, in the order data flows ---------------------------------------------------------------

STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("base", (
        "at2_rag._version", "at2_rag.errors", "at2_rag.storage", "at2_rag.plotting", "at2_rag.models",
        "at2_rag.model_families", "at2_rag.stats",
    )),
    ("prepare", ("at2_rag.prompting", "at2_rag.examples")),
    ("run", ("at2_rag.capture",)),
    ("evidence", ("at2_rag.evidence",)),
    ("score", ("at2_rag.attribution", "at2_rag.estimators")),
    ("front door", ("at2_rag.attributor",)),
    ("serving", ("at2_rag.serving", "at2_rag.demo")),
]


def stage_rank(module: str) -> int | None:
    """The stage a core module belongs to (None: the package root, training, evaluation, the CLI)."""
    for rank, (_, prefixes) in enumerate(STAGES):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for src, targets in graph.items():
        own = stage_rank(src)
        for dst in targets:
            theirs = stage_rank(dst)
            if own is not None and theirs is not None and theirs > own:
                found.append(f"{src} ({STAGES[own][0]}) imports {dst} ({STAGES[theirs][0]})")
    return sorted(found)


def test_every_core_module_has_a_stage():
    graph = import_graph()
    entry_points = {"at2_rag", "at2_rag.cli"}
    unplaced = [m for m in graph if layer(m) == "core" and m not in entry_points and stage_rank(m) is None]
    assert unplaced == []


def test_no_upward_imports_between_stages():
    """prepare never imports the run, the run never imports evidence or scoring, and so on."""
    assert upward_imports(import_graph()) == []


def test_upward_check_catches_an_upward_import():
    assert upward_imports({"at2_rag.capture.features": {"at2_rag.attribution.scoring"}}) != []
    assert upward_imports({"at2_rag.attribution.scoring": {"at2_rag.capture.features"}}) == []


RUNNER = "at2_rag.capture._runner"


def test_only_the_front_door_and_the_run_stage_reach_the_runner():
    graph = import_graph()
    reach = sorted(m for m, targets in graph.items() if RUNNER in targets)
    assert all(m == "at2_rag.attributor" or m.startswith("at2_rag.capture.") for m in reach), reach


def _outside_files() -> list[Path]:
    roots = [ROOT / "integrations", ROOT / "examples", ROOT / "bench", ROOT / "research", ROOT / "scripts"]
    return sorted(p for r in roots if r.is_dir() for p in r.rglob("*.py") if "tests" not in p.parts)


def private_reaches(path: Path) -> list[str]:
    """Imports of a private at2_rag module and attribute reads of a runner in one file outside the core."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "at2_rag" and any(p.startswith("_") and p != "__version__" for p in parts[1:]):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
                break
        if isinstance(node, ast.Attribute) and node.attr in {"runner", "_runner", "_scorer"}:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} reads .{node.attr}")
    return found


def test_nothing_outside_the_core_reaches_a_private_part():
    """Adapters, apps, benchmarks and scripts use the public stages (prepare, run, score) only."""
    assert [hit for path in _outside_files() for hit in private_reaches(path)] == []


def test_private_reach_check_catches_one(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from at2_rag.capture._runner import ModelRunner\nx = att.runner.generate\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert len(private_reaches(bad)) == 2
    finally:
        ROOT = saved


PUBLIC_SURFACE = {
    # the front door and its stages' hand-offs
    "Attributor", "Prepared", "Captured", "Evidence", "Attribution", "Citation", "DocumentScore",
    # what goes in
    "AttributionRequest", "Document", "PromptTemplate", "map_documents", "to_document",
    # the estimator and the model
    "ScoreEstimator", "load_model", "load_default_model", "download_default_model",
    # serving
    "MicroBatcher", "get_attributor", "get_micro_batcher",
    # errors worth catching (the rest: at2_rag.errors)
    "AT2Error", "InvalidInputError", "ContextTooLongError", "NoDocumentsError",
    "__version__",
}


def test_the_public_surface_is_what_a_user_writes():
    import at2_rag

    assert set(at2_rag.__all__) == PUBLIC_SURFACE
    assert all(hasattr(at2_rag, name) for name in at2_rag.__all__)


@pytest.mark.parametrize("package", ["langchain_at2", "llama_index.postprocessor.at2"])
def test_each_integration_exports_only_its_own_names(package):
    """Every class or function an integration exports is defined in that integration (no re-exported core
    internals, no example helpers)."""
    module = pytest.importorskip(package)
    foreign = []
    for name in module.__all__:
        obj = getattr(module, name)
        if isinstance(obj, type) or callable(obj):
            origin = getattr(obj, "__module__", "") or ""
            if not origin.startswith(package):
                foreign.append(f"{name} (from {origin})")
    assert foreign == []
