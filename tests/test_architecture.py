"""The module rules docs/architecture.md states, checked on the source: one step module per entry
point, named as it; steps are siblings (no step imports another); the library below them imports
no step and no entry point; only `pipeline.tracking` imports MLflow; the import graph below a step
stays shallow."""

import ast
import functools
from pathlib import Path

import yaml

from tests.conftest import REPO


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, as dotted names (`from pipeline import x` counts as pipeline.x)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def modules(folder: str) -> dict[str, Path]:
    """The modules under a folder of the repository, by dotted name."""
    return {".".join(path.relative_to(REPO).with_suffix("").parts): path for path in (REPO / folder).rglob("*.py") if path.name != "__init__.py"}


def step_modules() -> dict[str, Path]:
    return {path.stem: path for path in (REPO / "pipeline" / "steps").glob("*.py") if path.name != "__init__.py"}


def test_there_is_one_step_module_per_entry_point_named_as_it():
    entry_points = set(yaml.safe_load((REPO / "MLproject").read_text())["entry_points"])
    assert set(step_modules()) == entry_points


def test_steps_never_import_each_other():
    crossings = {
        f"{name} imports {other}"
        for name, path in step_modules().items()
        for other in set(step_modules()) - {name}
        if f"pipeline.steps.{other}" in imported_modules(path)
    }
    assert not crossings, sorted(crossings)


def test_the_library_imports_no_step_and_no_entry_point():
    library = {name: path for name, path in modules("pipeline").items() if not name.startswith("pipeline.steps.")}
    offenders = {name for name, path in library.items() if any(m.split(".")[0] == "entrypoints" or m.startswith("pipeline.steps") for m in imported_modules(path))}
    assert library and not offenders, offenders


def test_only_tracking_imports_mlflow():
    """Every other module reads runs as `RunRecord`s and calls `tracking`; none names MLflow."""
    files = {**modules("pipeline"), **modules("entrypoints")}
    importers = {
        name
        for name, path in files.items()
        if not name.startswith("pipeline.tracking.") and any(m == "mlflow" or m.startswith("mlflow.") for m in imported_modules(path))
    }
    assert "pipeline.tracking.lookup" in files and not importers, importers


STEP_FLOORS = 8  # a step and the chain of internal modules below it, down to `errors` (docs/architecture.md)


def internal_imports() -> dict[str, set[str]]:
    """pipeline module → the pipeline modules it imports (a package counts as its `__init__`)."""
    files = {name.removesuffix(".__init__"): path for name, path in ((".".join(p.relative_to(REPO).with_suffix("").parts), p) for p in (REPO / "pipeline").rglob("*.py"))}
    return {name: {m for m in imported_modules(path) if m in files and m != name} for name, path in files.items()}


def longest_chain(graph: dict[str, set[str]], start: str) -> list[str]:
    """The longest import chain from `start` (the graph has no cycles at module level)."""

    @functools.cache
    def chain(name: str) -> tuple[str, ...]:
        return (name, *max((chain(d) for d in graph[name]), key=len, default=()))

    return list(chain(start))


def test_no_step_stands_more_than_eight_floors_above_the_bottom():
    graph = internal_imports()
    chains = {name: longest_chain(graph, f"pipeline.steps.{name}") for name in step_modules()}
    too_deep = {name: " → ".join(c) for name, c in chains.items() if len(c) > STEP_FLOORS}
    assert chains and max(map(len, chains.values())) >= 3 and not too_deep, too_deep
