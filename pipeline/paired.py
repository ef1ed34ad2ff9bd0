"""Paired comparisons of two methods over matched seeds: the per-seed differences, their mean, a 95%
Student-t interval, and the verdict that interval supports.

Two methods are paired when they share a label fraction and a subset seed: the same labelled images,
so the difference removes the subset's luck from the comparison. The verdict reads the interval
alone, never which mean is larger: "helps" when it excludes zero on the better side, "hurts" on the
worse side, "no detectable difference" when it covers zero. Fewer than three pairs give no verdict:
with two, identical differences (frequent for accuracy, a multiple of 1/n_test) make a zero-width
interval that would read as certainty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import stats

# Which direction is better for each compared metric (ECE: lower is better calibrated).
HIGHER_IS_BETTER = {"test_auroc": True, "test_acc": True, "test_balanced_acc": True, "test_ece": False}
LEVEL = 0.95
MIN_PAIRS = 3
INTERVAL = "95% Student-t interval of the mean paired difference (n − 1 degrees of freedom)"


@dataclass(frozen=True)
class PairedDifference:
    """The mean of n paired differences (a − b) and its interval; NaN bounds when n < 2."""

    n: int
    mean: float
    low: float
    high: float
    verdict: str


def verdict(low: float, high: float, higher_is_better: bool, n: int = MIN_PAIRS) -> str:
    """What an interval of a − b over `n` pairs says about a: helps, hurts, or no detectable difference."""
    if n < MIN_PAIRS or math.isnan(low) or math.isnan(high):
        return f"too few seeds for a verdict (n = {n} < {MIN_PAIRS})" if n < MIN_PAIRS else "too few seeds for an interval"
    if low > 0 or high < 0:
        better = (low > 0) == higher_is_better
        return "helps" if better else "hurts"
    return "no detectable difference"


def paired_difference(a: Sequence[float], b: Sequence[float], higher_is_better: bool = True, level: float = LEVEL) -> PairedDifference:
    """Mean of a − b over pairs, with a Student-t interval at `level`."""
    diffs = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    diffs = diffs[np.isfinite(diffs)]
    n = len(diffs)
    if n == 0:
        return PairedDifference(0, math.nan, math.nan, math.nan, verdict(math.nan, math.nan, higher_is_better, 0))
    mean = float(diffs.mean())
    if n < 2:
        return PairedDifference(n, mean, math.nan, math.nan, verdict(math.nan, math.nan, higher_is_better, n))
    half = float(stats.t.ppf((1 + level) / 2, n - 1) * diffs.std(ddof=1) / math.sqrt(n))
    return PairedDifference(n, mean, mean - half, mean + half, verdict(mean - half, mean + half, higher_is_better, n))


def pairs(rows: Iterable[Mapping[str, Any]], method_a: str, method_b: str, fraction: float, metric: str) -> tuple[list[float], list[float], list[str]]:
    """The (a, b) metric values of every seed both methods ran at `fraction`, and those seeds."""

    def by_seed(method: str) -> dict[str, float]:
        return {str(r["seed"]): float(r.get(metric, math.nan)) for r in rows if r["method"] == method and float(r["label_fraction"]) == fraction}

    left, right = by_seed(method_a), by_seed(method_b)
    seeds = sorted(set(left) & set(right), key=lambda s: (len(s), s))
    return [left[s] for s in seeds], [right[s] for s in seeds], seeds


def compare_methods(
    rows: Sequence[Mapping[str, Any]],
    comparisons: Sequence[tuple[str, str]],
    metrics: Sequence[str] = tuple(HIGHER_IS_BETTER),
) -> list[dict[str, Any]]:
    """One record per (comparison, fraction, metric) that has paired seeds: the seeds, both means,
    the mean difference, its interval and the verdict."""
    fractions = sorted({float(r["label_fraction"]) for r in rows})
    out = []
    for method_a, method_b in comparisons:
        for fraction in fractions:
            for metric in metrics:
                a, b, seeds = pairs(rows, method_a, method_b, fraction, metric)
                if not seeds:
                    continue
                diff = paired_difference(a, b, HIGHER_IS_BETTER[metric])
                out.append(
                    {
                        "a": method_a,
                        "b": method_b,
                        "label_fraction": fraction,
                        "metric": metric,
                        "n": diff.n,
                        "seeds": " ".join(seeds),
                        "a_mean": float(np.nanmean(a)),
                        "b_mean": float(np.nanmean(b)),
                        "diff_mean": diff.mean,
                        "ci_low": diff.low,
                        "ci_high": diff.high,
                        "verdict": diff.verdict,
                    }
                )
    return out
