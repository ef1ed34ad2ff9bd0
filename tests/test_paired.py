"""Paired differences: the t interval against an independent computation, verdicts read from the
interval alone, pairing by subset seed."""

import math

import numpy as np
import pytest
from scipy import stats

from pipeline import paired


def test_the_interval_is_the_student_t_interval_of_the_mean_difference():
    a, b = [0.80, 0.83, 0.78, 0.85, 0.81], [0.78, 0.80, 0.79, 0.80, 0.77]
    diffs = np.subtract(a, b)
    low, high = stats.t.interval(0.95, len(diffs) - 1, loc=diffs.mean(), scale=stats.sem(diffs))
    result = paired.paired_difference(a, b)
    assert result.n == 5 and result.mean == pytest.approx(diffs.mean())
    assert (result.low, result.high) == pytest.approx((low, high))


@pytest.mark.parametrize(
    "low, high, higher_is_better, expected",
    [
        (0.01, 0.05, True, "helps"),
        (-0.05, -0.01, True, "hurts"),
        (-0.01, 0.05, True, "no detectable difference"),
        (-0.05, -0.01, False, "helps"),
        (0.01, 0.05, False, "hurts"),  # ECE: lower is better
        (math.nan, math.nan, True, "too few seeds for an interval"),
    ],
)
def test_the_verdict_reads_the_interval_only(low, high, higher_is_better, expected):
    assert paired.verdict(low, high, higher_is_better, n=5) == expected


def test_two_identical_differences_are_no_verdict():
    result = paired.paired_difference([0.78, 0.80], [0.75, 0.77])  # a zero-width interval at +0.03
    assert result.low == pytest.approx(result.high) and result.verdict.startswith("too few seeds for a verdict (n = 2")


def test_a_larger_mean_with_an_interval_across_zero_is_no_detectable_difference():
    result = paired.paired_difference([0.9, 0.7, 0.95], [0.8, 0.8, 0.8])  # n = 3
    assert result.mean > 0 and result.low < 0 < result.high and result.verdict == "no detectable difference"


def test_one_pair_gives_no_interval():
    result = paired.paired_difference([0.9], [0.8])
    assert result.n == 1 and result.mean == pytest.approx(0.1) and math.isnan(result.low)


def test_methods_are_paired_by_fraction_and_seed():
    rows = [{"method": "ssl", "label_fraction": 0.1, "seed": s, "test_auroc": v} for s, v in ((0, 0.8), (1, 0.9), (2, 0.7))]
    rows += [{"method": "sup", "label_fraction": 0.1, "seed": s, "test_auroc": v} for s, v in ((1, 0.85), (2, 0.6), (3, 0.5))]
    (record,) = paired.compare_methods(rows, [("ssl", "sup")], ["test_auroc"])
    assert record["seeds"] == "1 2" and record["n"] == 2  # seeds 0 and 3 have no partner
    assert record["diff_mean"] == pytest.approx(((0.9 - 0.85) + (0.7 - 0.6)) / 2)
