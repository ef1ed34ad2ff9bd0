"""How results are shown: the `Table` that `compare`'s tables, the draft and the hand-ins share,
number and interval formatting, and writing a table as Markdown, CSV, LaTeX and a figure."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from pipeline import tables


@dataclass
class Table:
    """One report table: display rows for Markdown/LaTeX, records for CSV, and an optional figure."""

    name: str
    title: str
    header: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    missing: str = ""
    figure: Figure | None = None
    settings: dict[str, str] = field(default_factory=dict)  # logged config the methods text cites
    not_run: list[str] = field(default_factory=list)  # what was asked for but could not run, and why

    @property
    def csv_columns(self) -> list[str]:
        return list(dict.fromkeys(k for record in self.records for k in record)) or ["status"]


SPREAD = "mean ± sample std (ddof 1) over seeds"


def fmt(value: Any, digits: int = 3) -> str:
    """A number to `digits` decimals, or `—` when missing."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "—"
    return "—" if number != number else f"{number:.{digits}f}"


def plural(count: Any, word: str) -> str:
    """`1 epoch`, `15 epochs`."""
    return f"{count} {word}{'' if str(count) == '1' else 's'}"


def seed_list(rows: Iterable[Mapping[str, Any]], sep: str = " ") -> str:
    """The distinct seeds of some rows, in numeric order (`0 1 2`)."""
    seeds = {str(r["seed"]) for r in rows}
    return sep.join(sorted(seeds, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s)))


PAIRED_METRICS = ("test_auroc", "test_acc", "test_ece")


def interval_text(record: Mapping[str, Any] | None) -> str:
    """`+0.012 [−0.004, +0.028]`, or the mean alone when there is no interval."""
    if record is None:
        return "—"
    if math.isnan(record["ci_low"]):
        return f"{record['diff_mean']:+.3f}"
    return f"{record['diff_mean']:+.3f} [{record['ci_low']:+.3f}, {record['ci_high']:+.3f}]"


def write_atomic(path: Path, text: str) -> None:
    """Write a file under a temporary name and rename it, so a failure never leaves half a table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def markdown(table: Table, level: int = 2, not_run: bool = True) -> str:
    """The table as a Markdown section (title, table or the missing note, what did not run unless
    the caller lists that itself)."""
    body = tables.rows_to_markdown(table.rows, table.header) if table.rows else ""
    note = f"\n_{table.missing}_\n" if table.missing else ""
    skipped = "".join(f"\n- **not run**: {line}\n" for line in table.not_run) if not_run else ""
    return f"{'#' * level} {table.title}\n\n{body}{note}{skipped}"


def write_table(table: Table, out_dir: Path) -> list[Path]:
    """`<name>.md`, `.csv`, `.tex` (and `.png` when the table has a figure) under out_dir."""
    paths = [out_dir / f"{table.name}.{ext}" for ext in ("md", "csv", "tex")]
    write_atomic(paths[0], markdown(table))
    write_atomic(paths[1], tables.to_csv(table.records, table.csv_columns) if table.records else f"status\n{table.missing}\n")
    write_atomic(paths[2], tables.to_latex(table.rows, table.header, table.title) if table.rows else f"% {table.missing}\n")
    figure_path = out_dir / f"{table.name}.png"
    figure_path.unlink(missing_ok=True)  # a figure from an earlier compare must not outlive its table
    if table.figure is not None:
        tmp = figure_path.with_name(f".{figure_path.name}.tmp.png")
        table.figure.savefig(tmp, dpi=120, bbox_inches="tight")
        plt.close(table.figure)
        os.replace(tmp, figure_path)
        paths.append(figure_path)
    return paths


def validation_auroc(record: Mapping[str, Any]) -> float:
    """A record's validation AUROC, or -inf where it is missing or NaN (a one-class split)."""
    value = record.get("val_auroc")
    return value if value is not None and math.isfinite(value) else -math.inf


def best_on_validation(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The record with the highest validation AUROC; records come newest first, and max keeps the
    first of ties (so the newest run when none has one)."""
    return max(records, key=validation_auroc)
