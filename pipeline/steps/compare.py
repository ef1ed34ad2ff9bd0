"""Weeks 9–10, the `compare` step: build every cross-week table from the tracking store, write the
tables, figures, draft and slides under `<out_root>/<dataset>/`, log them to a `compare` run,
register the champion model and, when asked, export the weekly hand-ins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

from pipeline import tracking
from pipeline.errors import UserError
from pipeline.handin import check_export_is_new, export_results
from pipeline.paper import write_paper
from pipeline.render import Table, write_table
from pipeline.report import Scope, add_not_run, build_tables


def run_compare(
    dataset: str,
    out_root: str = "reports",
    export_name: str = "",
    results_root: str = "results",
    scope: Scope = None,
    not_run: Mapping[str, tuple[str, str]] | None = None,
    echo: Callable[[str], None] = print,
) -> tuple[list[Table], Path]:
    """Build every table (from the runs in `scope` when given), write them, the figures, the draft
    and the slides under `<out_root>/<dataset>/`, and log them to a `compare` run. `not_run`: the
    steps a study skipped, step → (stage, reason)."""
    built = build_tables(dataset, scope)
    add_not_run(built, not_run or {})
    if export_name:  # refused before anything is written or logged
        check_export_is_new(Path(results_root), export_name, dataset)
    out_dir = Path(out_root) / dataset
    with tracking.tracked_run("compare", dataset, {"model": "-", "seed": "-"}, run_name=f"compare-{dataset}"):
        written = {table.name: write_table(table, out_dir) for table in built}
        paper_paths, said = write_paper(dataset, built, out_dir)
        for line in said:
            echo(line)
        for path in [p for paths in written.values() for p in paths] + paper_paths:
            tracking.log_file(path, "reports" if path.parent == out_dir else f"reports/{path.parent.name}")
        missing = [t.name for t in built if t.missing]
        tracking.set_tags({"missing_tables": ",".join(missing) or "none", "pdf_status": "; ".join(said)})
        tracking.log_metrics({"tables_complete": len(built) - len(missing), "tables_missing": len(missing)})
        register_champion(dataset, echo)
        if export_name:
            folders = export_results(built, written, out_dir, Path(results_root), export_name, dataset)
            echo(f"hand-ins written: {results_root}/week1..week{len(folders)}/{dataset}/{export_name}/")
    return built, out_dir


def register_champion(dataset: str, echo: Callable[[str], None] = print) -> None:
    """Point `<dataset>-classifier@champion` at the logged model with the best validation AUROC and
    say so; a server that refuses the registry write costs the champion, not the tables."""
    try:
        champion = tracking.register_champion(dataset)
    except UserError as exc:
        echo(f"champion not registered: {exc}")
        return
    if champion is None:
        echo(f"champion not registered: no {dataset} run logged an MLflow model")
        return
    tracking.set_tags({"champion": f"{champion.name}@{champion.alias}", "champion_version": champion.version, "champion_model_id": champion.model_id})
    echo(
        f"champion: models:/{champion.name}@{champion.alias} = version {champion.version}, model {champion.model_id} "
        f"of run {champion.run_id} (validation AUROC {champion.val_auroc:.3f})"
    )
