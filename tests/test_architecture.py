"""The module rules docs/architecture.md states, checked on the source: steps are siblings (no step
module imports another), `pipeline/` never imports `entrypoints/`, and only `tracking` calls MLflow."""

import ast
from pathlib import Path

from tests.conftest import REPO

STEP_MODULES = {"baseline", "ablation", "ssl_pretrain", "linear_probe", "ssl_finetune", "calibration", "thresholds",
                "robustness", "eda", "finetune_compare", "report", "study"}


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


def pipeline_files() -> dict[str, Path]:
    return {path.stem: path for path in (REPO / "pipeline").glob("*.py")}


def test_every_step_module_exists():
    assert STEP_MODULES <= set(pipeline_files()), STEP_MODULES - set(pipeline_files())


def test_steps_never_import_each_other():
    crossings = {f"{name} imports {other}" for name, path in pipeline_files().items() if name in STEP_MODULES
                 for other in STEP_MODULES - {name} if f"pipeline.{other}" in imported_modules(path)}
    assert not crossings, sorted(crossings)


def test_pipeline_never_imports_entrypoints():
    offenders = {name for name, path in pipeline_files().items()
                 if any(m == "entrypoints" or m.startswith("entrypoints.") for m in imported_modules(path))}
    assert not offenders, offenders


def test_only_tracking_calls_mlflow():
    """`mlflow.entities.Run` may be named in type hints elsewhere; every call goes through tracking."""
    callers = {name for name, path in pipeline_files().items() if name != "tracking"
               and any(m == "mlflow" or (m.startswith("mlflow.") and m != "mlflow.entities.Run" and m != "mlflow.entities")
                       for m in imported_modules(path))}
    assert not callers, callers
