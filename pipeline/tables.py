"""Small result tables: group rows, aggregate mean ± std, render CSV, Markdown and LaTeX."""

from __future__ import annotations

import csv
import io
import math
import unicodedata
from typing import Any, Iterable, Mapping, Sequence

import numpy as np


def aggregate(rows: Iterable[Mapping[str, Any]], by: Sequence[str], values: Sequence[str]) -> list[dict[str, Any]]:
    """One row per group of `by`: `<value>_mean`, `<value>_std` (sample std, ddof 1; NaN for one
    value, where no spread is measured) and `n`."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in by), []).append(row)
    out = []
    for key, members in groups.items():
        summary: dict[str, Any] = dict(zip(by, key))
        for name in values:
            numbers = np.array([float(m[name]) for m in members if m.get(name) is not None], dtype=float)
            numbers = numbers[np.isfinite(numbers)]
            summary[f"{name}_mean"] = float(numbers.mean()) if len(numbers) else math.nan
            summary[f"{name}_std"] = float(numbers.std(ddof=1)) if len(numbers) > 1 else math.nan
        summary["n"] = len(members)
        out.append(summary)
    return out


def mean_std(row: Mapping[str, Any], name: str, digits: int = 3) -> str:
    """`0.912 ± 0.013`, the mean alone when one value has no spread, or `—` when it is missing."""
    mean, std = (row.get(f"{name}_{part}") for part in ("mean", "std"))
    if mean is None or math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f}" if std is None or math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _cell(value: Any, digits: int) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def to_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """CSV with a header; floats at full precision, NaN as an empty cell."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if isinstance(v, float) and math.isnan(v) else v for v in (row.get(c, "") for c in columns)])
    return buffer.getvalue()


def to_markdown(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], digits: int = 3) -> str:
    """A GitHub Markdown table of row dicts; floats rounded to `digits`, NaN shown as an empty cell."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, ""), digits) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def rows_to_markdown(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A GitHub-flavoured Markdown table of already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def latex_escape(value: Any) -> str:
    """Text safe inside LaTeX, in ASCII: its special characters escaped, the Unicode symbols our
    tables and methods text use (±, τ, ×, →, —, −, Δ, ≥, ≤, –) written as LaTeX, accents dropped and
    any other non-ASCII character (from a run's tag or a path) written as `?`."""
    replacements = {
        "\\": "\\textbackslash{}",
        "_": "\\_",
        "%": "\\%",
        "&": "\\&",
        "#": "\\#",
        "$": "\\$",
        "{": "\\{",
        "}": "\\}",
        "~": "\\textasciitilde{}",
        "^": "\\textasciicircum{}",
        "<": "\\textless{}",
        ">": "\\textgreater{}",
        "|": "\\textbar{}",
        "±": "$\\pm$",
        "τ": "$\\tau$",
        "—": "--",
        "×": "$\\times$",
        "→": "$\\to$",
        "−": "$-$",
        "Δ": "$\\Delta$",
        "≥": "$\\geq$",
        "≤": "$\\leq$",
        "–": "--",
    }
    text = "".join(replacements.get(ch, ch) for ch in str(value))
    plain = "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))  # é → e
    return plain.encode("ascii", "replace").decode("ascii")  # any other symbol: `?`


def to_latex(rows: Sequence[Sequence[Any]], header: Sequence[str], caption: str = "") -> str:
    """A booktabs LaTeX table; one wider than seven columns is scaled to the text width (graphicx)."""
    cell = latex_escape

    wide = len(header) > 7  # scaled to the text width (needs graphicx), so it never runs off the page
    lines = [
        "\\begin{table}[t]",
        "\\centering",
        *(["\\resizebox{\\linewidth}{!}{%"] if wide else []),
        f"\\begin{{tabular}}{{{'l' * len(header)}}}",
        "\\toprule",
        " & ".join(cell(h) for h in header) + " \\\\",
        "\\midrule",
    ]
    lines += [" & ".join(cell(c) for c in row) + " \\\\" for row in rows]
    lines += ["\\bottomrule", "\\end{tabular}" + ("}" if wide else "")]
    if caption:
        lines.append(f"\\caption{{{cell(caption)}}}")
    lines.append("\\end{table}")
    return "\n".join(lines) + "\n"
