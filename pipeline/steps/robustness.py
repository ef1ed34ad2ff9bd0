"""Week 8: robustness of a trained classifier to small input shifts, and MC-dropout uncertainty.

Corruptions are pure functions of a float batch N×C×H×W in [0, 1] (and a torch.Generator where
random), applied batch-wise on the device and clamped back to [0, 1]; severity 1–5 indexes LEVELS.
Blur sigmas are given at 28 px and scaled with the image size, so a severity means the same
relative blur at every size.

MC dropout: the model stays in eval mode (batch-norm uses its running statistics) and only its
dropout layers sample. In both architectures (pipeline.models) dropout sits only at the head
input, so the encoder features are computed once and the T passes resample the head-input mask,
which is exactly equivalent to T full forward passes. A model trained with p = 0 gets
`mc_dropout_p` at that layer (inverted dropout keeps the expected activation).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from torch import nn

from pipeline import metrics, plots, tables, tracking
from pipeline.checkpoint import load_classifier
from pipeline.data import Split, to_float, to_split
from pipeline.models import Classifier
from pipeline.runtime import autocast, resolve_device
from pipeline.source import SourceRun, load_source

Corruption = Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]


def gaussian_noise(x: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """Additive per-pixel Gaussian noise of standard deviation `std` (intensity units)."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x + std * noise).clamp(0.0, 1.0)


def gaussian_blur(x: torch.Tensor, sigma_28px: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian blur with sigma given in pixels at 28 px, scaled to the image size."""
    sigma = sigma_28px * x.shape[-1] / 28
    kernel = 2 * math.ceil(3 * sigma) + 1
    return TF.gaussian_blur(x, [kernel, kernel], [sigma, sigma]).clamp(0.0, 1.0)


def contrast(x: torch.Tensor, factor: float, generator: torch.Generator) -> torch.Tensor:
    """Scale each image's deviations from its own mean intensity by `factor` (< 1 lowers contrast)."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * factor + mean).clamp(0.0, 1.0)


def brightness(x: torch.Tensor, shift: float, generator: torch.Generator) -> torch.Tensor:
    """Add a constant `shift` to every intensity."""
    return (x + shift).clamp(0.0, 1.0)


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise,
    "gaussian_blur": gaussian_blur,
    "contrast": contrast,
    "brightness": brightness,
}
# Severity 1..5 → parameter (noise std, blur sigma at 28 px, contrast factor, brightness shift).
LEVELS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.02, 0.04, 0.06, 0.09, 0.12),
    "gaussian_blur": (0.4, 0.6, 0.8, 1.1, 1.5),
    "contrast": (0.8, 0.65, 0.5, 0.4, 0.3),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
}


def corrupt(x: torch.Tensor, name: str, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Apply corruption `name` at severity 1–5 to a [0, 1] float batch."""
    return CORRUPTIONS[name](x, LEVELS[name][severity - 1], generator)


def corruption_seed(seed: int, name: str, severity: int) -> int:
    """A distinct, reproducible seed per (run seed, corruption, severity)."""
    return seed * 1_000 + list(CORRUPTIONS).index(name) * 10 + severity


@torch.inference_mode()
def corrupted_logits(model: nn.Module, split: Split, name: str, severity: int, seed: int, batch_size: int, amp: bool) -> np.ndarray:
    """Logits (eval mode) of a split under one corruption; severity 0 means clean."""
    model.eval()
    device = split.images.device
    generator = torch.Generator(device=device).manual_seed(corruption_seed(seed, name, severity) if severity else seed)
    outputs = []
    for chunk in split.images.split(batch_size):
        x = to_float(chunk)
        if severity:
            x = corrupt(x, name, severity, generator)
        with autocast(device, amp):
            outputs.append(model(x).float())
    return torch.cat(outputs).cpu().double().numpy()


def summary(probs: np.ndarray, labels: np.ndarray, n_bins: int, scores: np.ndarray | None = None) -> dict[str, float]:
    """AUROC (ranked by `scores` when given: logits, which do not saturate as probabilities do),
    accuracy at 0.5 and top-label ECE of p(class 1)."""
    return {
        "auroc": metrics.auroc(probs if scores is None else scores, labels),
        "acc": float(np.mean((probs >= 0.5) == labels)),
        "ece": metrics.ece(probs, labels, n_bins),
    }


def robustness_rows(
    model: nn.Module,
    test: Split,
    corruptions: Sequence[str],
    severities: Sequence[int],
    seed: int,
    batch_size: int,
    amp: bool,
    n_bins: int,
) -> list[dict[str, Any]]:
    """A clean row (severity 0) and one row per corruption × severity with AUROC, accuracy and ECE."""
    labels = test.labels.cpu().numpy()
    clean_logits = corrupted_logits(model, test, "clean", 0, seed, batch_size, amp)
    clean = summary(metrics.sigmoid(clean_logits), labels, n_bins, scores=clean_logits)
    rows = [{"corruption": "clean", "severity": 0, "level": math.nan, **clean}]
    for name in corruptions:
        for severity in sorted(severities):
            logits = corrupted_logits(model, test, name, severity, seed, batch_size, amp)
            values = summary(metrics.sigmoid(logits), labels, n_bins, scores=logits)
            rows.append({"corruption": name, "severity": severity, "level": LEVELS[name][severity - 1], **values, "auroc_drop": clean["auroc"] - values["auroc"]})
    return rows


def corruption_examples(image: torch.Tensor, corruptions: Sequence[str], severities: Sequence[int], seed: int) -> dict[tuple[str, int], np.ndarray]:
    """One [0, 1] image (1×C×H×W) under every corruption and severity, first channel as H×W arrays."""
    out = {}
    for name in corruptions:
        for severity in sorted(severities):
            generator = torch.Generator(device=image.device).manual_seed(corruption_seed(seed, name, severity))
            out[(name, severity)] = corrupt(image, name, severity, generator).cpu().numpy()[0, 0]
    return out


def enable_mc_dropout(model: Classifier, p: float) -> tuple[float, bool]:
    """Eval mode with dropout layers sampling; a model trained without dropout gets `p` at the head
    input. Returns the dropout rate in use and whether it was enabled here."""
    model.eval()
    enabled_here = model.dropout.p == 0
    if enabled_here:
        model.dropout.p = p
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.train()
    return float(model.dropout.p), enabled_here


@torch.inference_mode()
def mc_dropout_logits(model: Classifier, split: Split, passes: int, seed: int, batch_size: int, amp: bool) -> np.ndarray:
    """passes × N logits: features once (eval mode), then `passes` sampled dropout masks at the head."""
    device = split.images.device
    features = []
    for chunk in split.images.split(batch_size):
        with autocast(device, amp):
            features.append(model.features(to_float(chunk)).float())
    feats = torch.cat(features)
    torch.manual_seed(seed)
    return torch.stack([model.head(model.dropout(feats)).squeeze(1) for _ in range(passes)]).cpu().double().numpy()


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in nats of a Bernoulli(p), 0 at p ∈ {0, 1}."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    return -(p * np.log(p) + (1 - p) * np.log(1 - p))


def uncertainty(mc_logits: np.ndarray) -> dict[str, np.ndarray]:
    """Mean MC probability, predictive entropy H(mean p) and mutual information (H − mean H)."""
    probs = metrics.sigmoid(mc_logits)
    mean = probs.mean(axis=0)
    entropy = binary_entropy(mean)
    return {"prob": mean, "entropy": entropy, "mutual_info": entropy - binary_entropy(probs).mean(axis=0)}


def error_detection_auroc(score: np.ndarray, errors: np.ndarray) -> float:
    """AUROC of an uncertainty score for telling errors (1) from correct predictions (0)."""
    return metrics.auroc(score, errors.astype(np.float64))


def mc_summary(mc_logits: np.ndarray, clean_logits: np.ndarray, labels: np.ndarray, n_bins: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """MC-dropout metrics (prefixed `mc_`) and per-sample values; also the deterministic baseline."""
    u = uncertainty(mc_logits)
    errors = (u["prob"] >= 0.5) != labels
    det_probs = metrics.sigmoid(clean_logits)
    det_errors = (det_probs >= 0.5) != labels
    values = {
        **{f"mc_test_{k}": v for k, v in summary(u["prob"], labels, n_bins).items()},
        # entropy, mutual information and 1 − confidence of the same MC-mean predictions, so the
        # three scores are compared on one set of errors
        "mc_error_auroc_entropy": error_detection_auroc(u["entropy"], errors),
        "mc_error_auroc_mutual_info": error_detection_auroc(u["mutual_info"], errors),
        "mc_error_auroc_confidence": error_detection_auroc(-np.abs(u["prob"] - 0.5), errors),
        # the deterministic model's own errors: −|logit| ranks as 1 − confidence does, without the
        # ties of saturated probabilities
        "error_auroc_confidence": error_detection_auroc(-np.abs(clean_logits), det_errors),
        "mc_errors": float(errors.sum()),
        "mc_mean_entropy_correct": float(u["entropy"][~errors].mean()) if (~errors).any() else math.nan,
        "mc_mean_entropy_error": float(u["entropy"][errors].mean()) if errors.any() else math.nan,
    }
    return values, {**u, "error": errors.astype(int), "prob_deterministic": det_probs}


def ethics_note(cfg: Mapping[str, Any], source: SourceRun, rows: Sequence[Mapping[str, Any]], mc: Mapping[str, float]) -> str:
    """A Markdown template for the week-8 note on risks, assumptions and mitigations, numbers filled in."""
    clean = rows[0]
    worst = min(rows[1:], key=lambda r: r["auroc"]) if len(rows) > 1 else clean
    worst_ece = max(rows[1:], key=lambda r: r["ece"]) if len(rows) > 1 else clean
    if worst_ece["ece"] > clean["ece"]:
        ece_shift = (
            f"Calibration degrades under shift (ECE {clean['ece']:.3f} clean, up to {worst_ece['ece']:.3f} under "
            f"{worst_ece['corruption']} at severity {worst_ece['severity']}):\n  probabilities cannot be read at "
            "face value on shifted data."
        )
    else:
        ece_shift = (
            f"Calibration did not degrade under these corruptions (ECE {clean['ece']:.3f} clean, at most "
            f"{worst_ece['ece']:.3f} corrupted); TODO: would a real shift behave the same?"
        )
    source_metrics = source.run.metrics
    ci = f"{source_metrics['test_auroc_ci_low']:.3f}–{source_metrics['test_auroc_ci_high']:.3f}" if "test_auroc_ci_low" in source_metrics else "not logged"
    per_corruption = "\n".join(
        f"| {r['corruption']} | {r['severity']} | {r['level']:g} | {r['auroc']:.3f} | {r['acc']:.3f} | {r['ece']:.3f} |"
        for r in rows[1:]
        if r["severity"] == max(cfg["severities"])
    )
    return f"""# Week 8 note: risks, assumptions and mitigations ({cfg["dataset"]})

Source classifier run `{source.run_id}` (stage `{source.run.tags.get("stage")}`, model
`{source.tags()["model"]}`, seed {source.tags()["seed"]}); numbers are on the test split
(n = {len(source.test.labels)}). Fill in the parts marked TODO.

## Measured

- Clean test: AUROC {clean["auroc"]:.3f}, accuracy {clean["acc"]:.3f}, ECE {clean["ece"]:.3f}.
- Worst corruption: {worst["corruption"]} at severity {worst["severity"]}: AUROC {worst["auroc"]:.3f}
  (drop {clean["auroc"] - worst["auroc"]:.3f}), accuracy {worst["acc"]:.3f}, ECE {worst["ece"]:.3f}.
- At the highest severity tested ({max(cfg["severities"])}):

| corruption | severity | level | AUROC | accuracy | ECE |
|---|---|---|---|---|---|
{per_corruption}

- MC dropout ({cfg["mc_passes"]} passes, p = {mc["mc_dropout_p"]:g}): AUROC {mc["mc_test_auroc"]:.3f}, ECE {mc["mc_test_ece"]:.3f};
  on the same MC-mean predictions ({int(mc["mc_errors"])} errors), predictive entropy separates errors from
  correct predictions with AUROC {mc["mc_error_auroc_entropy"]:.3f}, 1 − confidence with {mc["mc_error_auroc_confidence"]:.3f}
  (the deterministic model's 1 − confidence on its own errors: {mc["error_auroc_confidence"]:.3f}).

## Assumptions

- Test images come from the same sources and acquisition as training (MedMNIST's fixed split).
- The synthetic corruptions (noise, blur, contrast, brightness) stand in for scanner and protocol
  shift; they are not a validated model of real shift. TODO: which real shifts matter here?
- Positive class is label 1; accuracy and errors use threshold 0.5 (see the `thresholds` step for
  screening operating points).

## Risks

- TODO: which corruption hurts most and what it would mean clinically (missed positives vs. false alarms).
- {ece_shift}
- Small test split: differences of a few AUROC points are within the bootstrap CI of the source run
  (test AUROC 95% CI {ci}).

## Mitigations

- TODO: augmentation matching the harmful corruptions (see `augment_ablation`), re-check after retraining.
- Recalibrate on data from the target site (`calibrate`), and monitor input statistics.
- Defer uncertain cases to a reader: entropy flags errors with AUROC {mc["mc_error_auroc_entropy"]:.3f}.
"""


def run_robustness(cfg: Mapping[str, Any], run_id: str = "latest", data_root: str = "") -> dict[str, Any]:
    """Evaluate a classifier run's checkpoint under corruptions and MC dropout; log tables, plots, note."""
    source = load_source(cfg["source_stages"], cfg["dataset"], run_id, extra=("checkpoints/best.pt",))
    device = resolve_device(cfg["device"])
    with tempfile.TemporaryDirectory(prefix="medmnist-ssl-") as tmp:
        model, checkpoint = load_classifier(tracking.download_artifact(source.run_id, "checkpoints/best.pt", Path(tmp)), device)
    size = int(checkpoint["config"].get("size", source.image_size()))
    amp = bool(checkpoint["config"].get("amp", False))
    test = to_split(source.test_arrays(data_root, size), device)
    batch, bins, seed = cfg["eval_batch_size"], cfg["ece_bins"], cfg["seed"]
    rows = robustness_rows(model, test, cfg["corruptions"], cfg["severities"], seed, batch, amp, bins)
    clean_logits = corrupted_logits(model, test, "clean", 0, seed, batch, amp)
    p, enabled_here = enable_mc_dropout(model, cfg["mc_dropout_p"])
    mc_logits = mc_dropout_logits(model, test, cfg["mc_passes"], seed, batch, amp)
    labels = test.labels.cpu().numpy()
    mc, per_sample = mc_summary(mc_logits, clean_logits, labels, bins)
    mc.update(mc_dropout_p=p, mc_passes=cfg["mc_passes"])
    dropout_note = (
        f"the model was trained without dropout: MC dropout enabled at the head input with p = {p:g}"
        if enabled_here
        else f"MC dropout uses the model's own dropout p = {p:g}"
    )
    values = {f"clean_test_{k}": rows[0][k] for k in ("auroc", "acc", "ece")}
    values["clean_logit_max_abs_diff"] = float(np.max(np.abs(clean_logits - source.test.logits)))
    corrupted = rows[1:]
    values["mean_corrupted_auroc"] = float(np.mean([r["auroc"] for r in corrupted]))
    values["worst_corrupted_auroc"] = float(np.min([r["auroc"] for r in corrupted]))
    values.update({k: v for k, v in mc.items() if k not in ("mc_dropout_p", "mc_passes")})  # settings, not results
    name = f"robustness-{source.tags()['model']}-{source.run_id[:8]}"
    with tracking.tracked_run("robustness", cfg["dataset"], {**source.tags(), "mc_dropout": dropout_note}, run_name=name):
        tracking.log_config(cfg)
        tracking.log_params({"mc_dropout_p_used": p})
        tracking.log_metrics(values)
        for row in corrupted:
            tracking.log_metrics({f"{row['corruption']}_{k}": row[k] for k in ("auroc", "acc", "ece")}, step=row["severity"])
        columns = ["corruption", "severity", "level", "auroc", "acc", "ece", "auroc_drop"]
        tracking.log_text(tables.to_csv(rows, columns), "robustness/table.csv")
        tracking.log_text(tables.to_markdown(rows, columns), "robustness/table.md")
        sample_rows = [{"index": int(i), "label": int(y), **{k: v[n].item() for k, v in per_sample.items()}} for n, (i, y) in enumerate(zip(source.test.index, labels))]
        tracking.log_text(tables.to_csv(sample_rows, ["index", "label", "prob_deterministic", "prob", "entropy", "mutual_info", "error"]), "robustness/mc_dropout.csv")
        tracking.log_text(f"{dropout_note}\n", "robustness/mc_dropout.txt")
        tracking.log_text(ethics_note(cfg, source, rows, mc), "robustness/week8_note.md")
        tracking.log_figure(plots.robustness_curves(rows), "plots/robustness.png")
        tracking.log_figure(plots.entropy_histogram(per_sample["entropy"], per_sample["error"].astype(bool), mc), "plots/mc_dropout_entropy.png")
        image = to_float(test.images[:1])
        examples = corruption_examples(image, cfg["corruptions"], cfg["severities"], seed)
        tracking.log_figure(plots.corruption_examples(image.cpu().numpy()[0, 0], examples, LEVELS), "plots/corruption_examples.png")
    return {**values, "dropout_note": dropout_note}
