"""Week 6: post-hoc calibration of a classifier's logged logits (temperature scaling, Platt, isotonic).

Every calibrator is fitted on the validation split only and applied unchanged to test. Temperature
scaling divides the logit by one scalar T > 0 chosen to minimise validation NLL (Guo et al.,
2017); it is monotone, so it never changes the ranking (AUROC, computed from the scaled logits, so
probabilities that round to 0 or 1 cannot tie) nor, for a binary logit, the prediction at
threshold 0.5 (accuracy). Platt scaling (a·logit + b) and isotonic regression are
optional comparisons; isotonic may merge scores into ties and so can change AUROC.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from pipeline import metrics, paired, plots, tables, tracking
from pipeline.errors import UserError
from pipeline.source import SourceRun, load_source
from pipeline.supervised import predictions_csv

METHODS = ("temperature", "platt", "isotonic")
TEMPERATURE_BOUNDS = (1e-2, 1e2)
METRICS = ("ece", "ece_eqfreq", "mce", "brier", "nll", "acc", "auroc")
# Metric-key suffix of each method: "before" is the uncalibrated model, "after" temperature scaling.
SUFFIX = {"uncalibrated": "before", "temperature": "after", "platt": "platt", "isotonic": "isotonic"}


def nll_at_temperature(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean binary cross-entropy of sigmoid(logit / T), computed stably from the logits."""
    return metrics.nll_from_logits(np.asarray(logits, dtype=np.float64) / temperature, labels)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising NLL of sigmoid(logit / T): bounded Brent search over log T.

    NLL is convex in 1/T, hence unimodal in log T, so the bounded search finds the minimum within
    [0.01, 100]; a result at a bound means the logits carry (almost) no usable signal or are
    perfectly separable on validation.
    """
    low, high = np.log(TEMPERATURE_BOUNDS)
    result = minimize_scalar(
        lambda log_t: nll_at_temperature(logits, labels, float(np.exp(log_t))),
        bounds=(low, high),
        method="bounded",
        options={"xatol": 1e-7},
    )
    return float(np.exp(result.x))


def at_bound(temperature: float) -> bool:
    """Whether a fitted temperature sits at a search bound (logits without usable scale signal)."""
    low, high = TEMPERATURE_BOUNDS
    return not low * 1.001 < temperature < high / 1.001


@dataclass(frozen=True)
class Calibrator:
    """A fitted map from logits to calibrated p(class 1), with its fitted parameters: `logit` maps to
    calibrated logits where the method has them (temperature, Platt; exact AUROC and NLL), `prob`
    straight to probabilities where it has not (isotonic)."""

    name: str
    params: dict[str, float] = field(default_factory=dict)
    logit: Callable[[np.ndarray], np.ndarray] | None = None
    prob: Callable[[np.ndarray], np.ndarray] | None = None

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated p(class 1) of raw logits."""
        return metrics.sigmoid(self.logit(logits)) if self.logit is not None else self.prob(logits)


def fit_calibrator(name: str, logits: np.ndarray, labels: np.ndarray) -> Calibrator:
    """Fit one calibrator (`temperature`, `platt` or `isotonic`) on validation logits and labels."""
    logits = np.asarray(logits, dtype=np.float64)
    if name == "temperature":
        t = fit_temperature(logits, labels)
        return Calibrator(name, {"temperature": t}, logit=lambda z: np.asarray(z) / t)
    if name == "platt":
        model = LogisticRegression(C=1e6, max_iter=1000).fit(logits.reshape(-1, 1), labels)
        params = {"platt_slope": float(model.coef_[0, 0]), "platt_intercept": float(model.intercept_[0])}
        return Calibrator(name, params, logit=lambda z: model.decision_function(np.asarray(z).reshape(-1, 1)))
    if name == "isotonic":
        model = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(logits, labels)
        return Calibrator(name, prob=lambda z: model.predict(np.asarray(z, dtype=np.float64)))
    raise UserError(f"calibration method {name!r} is unknown; choose from {', '.join(METHODS)}")


def evaluate(probs: np.ndarray, labels: np.ndarray, n_bins: int, logits: np.ndarray | None = None) -> dict[str, float]:
    """Calibration and discrimination metrics of p(class 1): ECE (equal width and frequency),
    MCE, Brier, NLL, accuracy at 0.5 and AUROC. With `logits`, NLL and AUROC come from them:
    exact where probabilities round to 0 or 1 (a small temperature), which would tie ranks and clip the loss."""
    probs = np.asarray(probs, dtype=np.float64)
    return {
        "ece": metrics.ece(probs, labels, n_bins, "uniform"),
        "ece_eqfreq": metrics.ece(probs, labels, n_bins, "quantile"),
        "mce": metrics.mce(probs, labels, n_bins),
        "brier": metrics.brier(probs, labels),
        "nll": metrics.nll(probs, labels) if logits is None else metrics.nll_from_logits(logits, labels),
        "acc": float(np.mean((probs >= 0.5) == np.asarray(labels))),
        "auroc": metrics.auroc(probs if logits is None else logits, labels),
    }


def calibrated_scores(source: SourceRun, calibrators: Sequence[Calibrator]) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, np.ndarray]]]:
    """p(class 1) per method (`uncalibrated` first) and split, and the calibrated logits of the
    methods that have them."""
    probs = {"uncalibrated": {"val": source.val.probs, "test": source.test.probs}}
    logits = {"uncalibrated": {"val": source.val.logits, "test": source.test.logits}}
    for calibrator in calibrators:
        probs[calibrator.name] = {"val": calibrator.apply(source.val.logits), "test": calibrator.apply(source.test.logits)}
        if calibrator.logit is not None:
            logits[calibrator.name] = {"val": calibrator.logit(source.val.logits), "test": calibrator.logit(source.test.logits)}
    return probs, logits


def calibration_rows(
    probs: Mapping[str, Mapping[str, np.ndarray]],
    labels: Mapping[str, np.ndarray],
    n_bins: int,
    logits: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> list[dict[str, Any]]:
    """One table row per method and split with every metric in METRICS (from logits where given)."""
    logits = logits or {}
    return [
        {"method": method, "split": split, **evaluate(by_split[split], labels[split], n_bins, logits.get(method, {}).get(split))}
        for method, by_split in probs.items()
        for split in ("val", "test")
    ]


CHANGE_METRICS = {"ece": lambda p, y, bins: metrics.ece(p, y, bins), "brier": lambda p, y, bins: metrics.brier(p, y), "nll": lambda p, y, bins: metrics.nll(p, y)}


def calibration_change(before: np.ndarray, after: np.ndarray, labels: np.ndarray, n_bins: int, n_bootstrap: int, seed: int) -> list[dict[str, Any]]:
    """The test change (after − before) of ECE, Brier and NLL with a paired bootstrap 95% interval:
    each resample of the test images scores both probability sets, so the interval is that of the
    change itself. The verdict reads the interval (lower is better for all three)."""
    labels = np.asarray(labels)
    draws = np.random.default_rng(seed).integers(0, len(labels), size=(n_bootstrap, len(labels)))
    rows = []
    for name, score in CHANGE_METRICS.items():
        change = score(after, labels, n_bins) - score(before, labels, n_bins)
        resampled = np.array([score(after[i], labels[i], n_bins) - score(before[i], labels[i], n_bins) for i in draws])
        low, high = np.percentile(resampled, [2.5, 97.5]) if n_bootstrap else (np.nan, np.nan)
        rows.append(
            {
                "metric": name,
                "before": score(before, labels, n_bins),
                "after": score(after, labels, n_bins),
                "change": change,
                "ci_low": float(low),
                "ci_high": float(high),
                "verdict": paired.verdict(float(low), float(high), higher_is_better=False).replace("helps", "improves").replace("hurts", "worsens"),
            }
        )
    return rows


def metric_values(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Rows as MLflow metrics `<split>_<metric>_<before|after|platt|isotonic>`."""
    return {f"{r['split']}_{m}_{SUFFIX[r['method']]}": r[m] for r in rows for m in METRICS}


def probability_table(index: np.ndarray, labels: np.ndarray, probs: Mapping[str, Mapping[str, np.ndarray]], split: str) -> str:
    """CSV of one split's p(class 1) under every method, side by side."""
    columns = ["index", "label", *(f"prob_{m}" for m in probs)]
    rows = [{"index": int(i), "label": int(y), **{f"prob_{m}": float(p[split][k]) for m, p in probs.items()}} for k, (i, y) in enumerate(zip(index, labels))]
    return tables.to_csv(rows, columns)


def side_by_side(probs: Mapping[str, Mapping[str, np.ndarray]], labels: np.ndarray, n_bins: int, titles: Mapping[str, str]):
    """Test reliability diagrams of every method in one row of panels."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        2,
        len(probs),
        figsize=(4.6 * len(probs), 5.6),
        sharex=True,
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 1]},
        constrained_layout=True,
    )
    for column, method in enumerate(probs):
        plots.reliability_diagram(probs[method]["test"], labels, n_bins, titles[method], ax_pair=(axes[0, column], axes[1, column]))
    fig.suptitle("Test reliability before and after calibration (fitted on validation)")
    return fig


def run_calibrate(cfg: Mapping[str, Any], run_id: str = "latest") -> dict[str, float]:
    """Fit the calibrators on a classifier run's validation logits, evaluate on test, log it all."""
    source = load_source(cfg["source_stages"], cfg["dataset"], run_id)
    calibrators = [fit_calibrator(name, source.val.logits, source.val.labels) for name in cfg["methods"]]
    probs, logits = calibrated_scores(source, calibrators)
    labels = {"val": source.val.labels, "test": source.test.labels}
    rows = calibration_rows(probs, labels, cfg["ece_bins"], logits)
    fitted = {k: v for calibrator in calibrators for k, v in calibrator.params.items()}
    values = {**metric_values(rows), **fitted}
    temperature = fitted["temperature"]
    titles = {"uncalibrated": "Before (test)", "temperature": f"Temperature T = {temperature:.2f} (test)", "platt": "Platt (test)", "isotonic": "Isotonic (test)"}
    name = f"calibrate-{source.tags()['model']}-{source.run_id[:8]}"
    with tracking.tracked_run("calibrate", cfg["dataset"], source.tags(), run_name=name):
        tracking.log_config(cfg)
        tracking.log_metrics(values)
        columns = ["method", "split", *METRICS]
        tracking.log_text(tables.to_csv(rows, columns), "calibration/table.csv")
        tracking.log_text(tables.to_markdown(rows, columns), "calibration/table.md")
        change = calibration_change(probs["uncalibrated"]["test"], probs["temperature"]["test"], labels["test"], cfg["ece_bins"], cfg["bootstrap"], cfg["seed"])
        tracking.log_text(tables.to_csv(change, list(change[0])), "calibration/test_change.csv")
        tracking.log_metrics(
            {f"test_{r['metric']}_change{suffix}": r[key] for r in change for suffix, key in (("", "change"), ("_ci_low", "ci_low"), ("_ci_high", "ci_high"))}
        )
        tracking.log_json({"source_run_id": source.run_id, **fitted, "temperature_at_bound": at_bound(temperature)}, "calibration/fitted.json")
        for split in ("val", "test"):
            predictions = getattr(source, split)
            tracking.log_text(predictions_csv(np.asarray(predictions.logits) / temperature, predictions.labels, predictions.index), f"predictions/{split}_calibrated.csv")
            tracking.log_text(probability_table(predictions.index, predictions.labels, probs, split), f"calibration/{split}_probs.csv")
        for method, file in (("uncalibrated", "before"), ("temperature", "after")):
            fig = plots.reliability_diagram(probs[method]["test"], labels["test"], cfg["ece_bins"], titles[method])
            tracking.log_figure(fig, f"plots/reliability_{file}.png")
        tracking.log_figure(side_by_side(probs, labels["test"], cfg["ece_bins"], titles), "plots/reliability_side_by_side.png")
    return values
