"""Week 5: label efficiency — linear probes on a frozen SSL encoder vs. supervised-only training
(and an ImageNet-transfer probe when its weights are available), at several label fractions × seeds.

One parent run; one nested child run per (method, fraction, seed), each a classifier run with
predictions and a checkpoint. Features are extracted once per encoder; every probe is fitted on
the cached features. The supervised-only model uses the SSL encoder's architecture, trained from
scratch on the same stratified subsets.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import matplotlib.pyplot as plt
import numpy as np
import torch

from pipeline import config, tables, tracking
from pipeline.checkpoint import load_classifier
from pipeline.data import DatasetSplits, load_splits, stratified_subset
from pipeline.errors import UserError
from pipeline.features import extract_features
from pipeline.models import Classifier, ModelSpec, build_classifier
from pipeline.probe import fit_linear_head, install_head
from pipeline.runtime import configure_speed, prepare_model, resolve_device, seed_everything
from pipeline.ssl_pretrain import load_encoder_checkpoint
from pipeline.supervised import fit_and_log, log_evaluation

METHOD_LABELS = {"ssl_probe": "SSL linear probe", "supervised": "supervised only", "imagenet_probe": "ImageNet probe",
                 "ssl_finetune": "SSL fine-tune"}
RESULT_KEYS = ("test_acc", "test_auroc", "test_ece", "val_auroc")


class FrozenEncoder:
    """A frozen classifier with its split features computed once."""

    def __init__(self, model: Classifier, data: DatasetSplits, cfg: Mapping[str, Any]):
        self.model = model
        self.features = {
            s: extract_features(model, data.split(s), cfg["eval_batch_size"], cfg["amp"]).cpu().numpy()
            for s in ("train", "val", "test")
        }


def imagenet_encoder(data: DatasetSplits, cfg: Mapping[str, Any], device: torch.device) -> tuple[FrozenEncoder | None, str]:
    """ResNet-18 with ImageNet weights (torchvision stem), or None and the reason it is unavailable."""
    try:
        model = build_classifier(ModelSpec("resnet18", data.channels, "imagenet", "imagenet"), finetune="head")
    except UserError as exc:
        return None, str(exc)
    return FrozenEncoder(prepare_model(model, device, cfg).eval(), data, cfg), ""


def probe_child(
    encoder: FrozenEncoder, data: DatasetSplits, subset: np.ndarray, cfg: Mapping[str, Any], tags: Mapping[str, Any]
) -> dict[str, float]:
    """Fit one linear probe on cached features and log it as a nested classifier run."""
    labels = {s: data.split(s).labels.cpu().numpy() for s in ("train", "val")}
    head = fit_linear_head(
        encoder.features["train"][subset], labels["train"][subset], encoder.features["val"], labels["val"],
        cfg["probe_cs"], tags["seed"],
    )
    logits = {s: head.logits(encoder.features[s]) for s in ("val", "test")}
    install_head(encoder.model, head)
    child_cfg = {**cfg, "seed": tags["seed"], "label_fraction": tags["label_fraction"], "probe_C": head.C, "size": data.size}
    name = f"{tags['method']}-f{tags['label_fraction']}-s{tags['seed']}"
    with tracking.tracked_run("linear_probe", cfg["dataset"], tags, run_name=name, nested=True) as run:
        tracking.log_config(child_cfg)
        values = log_evaluation(encoder.model, encoder.model.spec, data, child_cfg, len(subset), logits=logits)
    return {**values, "run_id": run.info.run_id}


def supervised_child(
    data: DatasetSplits, spec: ModelSpec, subset: np.ndarray, cfg: Mapping[str, Any], tags: Mapping[str, Any],
    device: torch.device,
) -> dict[str, float]:
    """Train the encoder's architecture from scratch on the same subset (a nested classifier run)."""
    overrides = {
        "model": spec.model, "stem": spec.stem, "epochs": cfg["supervised_epochs"], "augment": cfg["supervised_augment"],
        "batch_size": cfg["batch_size"],
        "lr": cfg["lr"], "seed": tags["seed"], "label_fraction": tags["label_fraction"], "size": data.size,
        "device": cfg["device"], "amp": cfg["amp"], "channels_last": cfg["channels_last"], "compile": cfg["compile"],
        "ece_bins": cfg["ece_bins"], "bootstrap": cfg["bootstrap"],
    }
    child_cfg = config.resolve("baseline", cfg["dataset"], overrides)
    seed_everything(tags["seed"])
    model = prepare_model(build_classifier(spec), device, child_cfg)
    name = f"supervised-f{tags['label_fraction']}-s{tags['seed']}"
    with tracking.tracked_run("linear_probe", cfg["dataset"], tags, run_name=name, nested=True) as run:
        values = fit_and_log(model, spec, data, data.train.subset(subset), child_cfg).metrics
    return {**values, "run_id": run.info.run_id}


def label_efficiency_figure(summary: list[dict[str, Any]], metric: str, title: str) -> plt.Figure:
    """Label fraction (log scale) vs. a test metric, one line per method with ±1 std error bars."""
    fig, ax = plt.subplots(figsize=(5.6, 4.0), constrained_layout=True)
    methods = list(dict.fromkeys(row["method"] for row in summary))
    for k, method in enumerate(methods):
        rows = sorted((r for r in summary if r["method"] == method), key=lambda r: r["label_fraction"])
        nudge = 1 + 0.06 * (k - (len(methods) - 1) / 2)  # side by side on the log axis, so error bars do not hide each other
        ax.errorbar([r["label_fraction"] * nudge for r in rows], [r[f"{metric}_mean"] for r in rows],
                    yerr=np.nan_to_num([r[f"{metric}_std"] for r in rows]), marker="o", capsize=3,
                    label=METHOD_LABELS.get(method, method))
    fractions = sorted({r["label_fraction"] for r in summary})
    ax.set_xscale("log")
    ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
    ax.set_xlabel("fraction of training labels (log scale)")
    ax.set_ylabel(metric.replace("_", " ").replace("auroc", "AUROC").replace("acc", "accuracy"))
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def log_label_efficiency(rows: list[dict[str, Any]], not_run: Mapping[str, str], title: str) -> list[dict[str, Any]]:
    """Aggregate child results (mean ± std over seeds) into the parent's table and figures."""
    summary = tables.aggregate(rows, ("method", "label_fraction"), RESULT_KEYS)
    for method, reason in not_run.items():
        for fraction in sorted({r["label_fraction"] for r in rows}):
            summary.append({"method": method, "label_fraction": fraction, "n": 0, "status": f"not run: {reason}"})
    for row in summary:
        row.setdefault("status", "ok")
        row["run_ids"] = " ".join(r["run_id"] for r in rows if (r["method"], r["label_fraction"]) == (row["method"], row["label_fraction"]))
    columns = ["method", "label_fraction", "n"] + [f"{k}_{s}" for k in RESULT_KEYS for s in ("mean", "std")] + ["status", "run_ids"]
    tracking.log_text(tables.to_csv(summary, columns), "label_efficiency.csv")
    header = ["method", "labels", "n", "test acc", "test AUROC", "test ECE"]
    body = [[METHOD_LABELS.get(r["method"], r["method"]), f"{r['label_fraction']:.0%}", r["n"],
             tables.mean_std(r, "test_acc"), tables.mean_std(r, "test_auroc"), tables.mean_std(r, "test_ece")]
            for r in summary]
    note = "".join(f"\n{METHOD_LABELS.get(m, m)}: not run ({reason}).\n" for m, reason in not_run.items())
    tracking.log_text(f"# {title}\n\nmean ± sample std (ddof 1) over seeds; test split.\n\n" + tables.rows_to_markdown(body, header) + note,
                      "label_efficiency.md")
    ran = [r for r in summary if r["n"]]
    tracking.log_figure(label_efficiency_figure(ran, "test_acc", f"{title}: accuracy"), "plots/label_efficiency_acc.png")
    tracking.log_figure(label_efficiency_figure(ran, "test_auroc", f"{title}: AUROC"), "plots/label_efficiency_auroc.png")
    for row in ran:
        key = f"{row['method']}/f{row['label_fraction']:g}"
        tracking.log_metrics({f"{key}/test_auroc_mean": row["test_auroc_mean"], f"{key}/test_acc_mean": row["test_acc_mean"]})
    return summary


def run_grid(
    cfg: Mapping[str, Any], data: DatasetSplits, child: Callable[[np.ndarray, dict[str, Any]], Mapping[str, float]],
    methods: list[str], base_tags: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """Call `child(subset, tags)` (returning metrics and its `run_id`) for every fraction × seed ×
    method; the same stratified subset serves every method of a (fraction, seed)."""
    train_labels = data.train.labels.cpu().numpy()
    rows = []
    for fraction in cfg["label_fractions"]:
        for seed in cfg["seeds"]:
            subset = stratified_subset(train_labels, fraction, seed)
            for method in methods:
                tags = {**base_tags, "method": method, "label_fraction": fraction, "seed": seed}
                values = child(subset, tags)
                rows.append({**tags, **{k: values[k] for k in RESULT_KEYS}, "run_id": values["run_id"]})
    return rows


def run_linear_probe(cfg: Mapping[str, Any], data_root: str = "") -> list[dict[str, Any]]:
    """The whole week-5 grid under one parent run; returns the summary rows."""
    device = resolve_device(cfg["device"])
    configure_speed(device)
    encoder_path, ssl_run = load_encoder_checkpoint(cfg["ssl_run_id"], cfg["dataset"])
    ssl_model, checkpoint = load_classifier(encoder_path, device)
    ssl_model = prepare_model(ssl_model, device, cfg)
    ssl_model.freeze_encoder()
    size = checkpoint["config"]["size"]
    data = load_splits(cfg["dataset"], size, data_root, device)
    ssl_encoder = FrozenEncoder(ssl_model, data, cfg)
    methods = list(cfg["methods"])
    imagenet, reason = imagenet_encoder(data, cfg, device) if "imagenet_probe" in methods else (None, "")
    not_run = {"imagenet_probe": reason} if "imagenet_probe" in methods and imagenet is None else {}
    runnable = [m for m in methods if m not in not_run]
    source = ssl_run.info.run_id
    spec = ssl_model.spec
    parent_tags = {"model": spec.model, "seed": ",".join(map(str, cfg["seeds"])), "source_run_id": source,
                   "ssl_method": ssl_run.data.tags.get("method", ""), "config_hash": config.config_hash(cfg)}

    def child(subset: np.ndarray, tags: dict[str, Any]) -> Mapping[str, float]:
        if tags["method"] == "ssl_probe":
            return probe_child(ssl_encoder, data, subset, cfg, {**tags, "source_run_id": source})
        if tags["method"] == "imagenet_probe":
            return probe_child(imagenet, data, subset, cfg, {**tags, "model": "resnet18"})
        return supervised_child(data, spec, subset, cfg, tags, device)

    name = f"linear-probe-{parent_tags['ssl_method']}-{spec.model}"
    with tracking.tracked_run("linear_probe", cfg["dataset"], parent_tags, run_name=name):
        tracking.log_config(cfg)
        for method, why in not_run.items():
            tracking.set_tags({f"{method}_status": f"not run: {why}"[:4000]})
        rows = run_grid(cfg, data, child, runnable, {"model": spec.model})
        title = f"{cfg['dataset']} label efficiency ({parent_tags['ssl_method']} encoder)"
        return log_label_efficiency(rows, not_run, title)
