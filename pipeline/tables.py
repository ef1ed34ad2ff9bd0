"""Small tables (lists of row dicts) rendered as CSV and Markdown for artifacts and the paper."""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Mapping, Sequence


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
    """A GitHub Markdown table; floats rounded to `digits`, NaN shown as an empty cell."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, ""), digits) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"
