"""Week 5: label efficiency — linear probes on a frozen SSL encoder vs. supervised-only training,
with controls (a probe on a randomly initialised encoder, the majority class) and an
ImageNet-transfer probe when its weights are available, at several label fractions × seeds.

One parent run; one nested child run per (method, fraction, seed), each a classifier run with
predictions and a checkpoint. `ssl_run_id` may name several pretraining runs (one per pretraining
seed): subset seed number i uses encoder i mod K, so the SSL rows' spread includes pretraining
variance as the supervised rows' includes initialisation variance. Features are extracted once per
encoder; every probe is fitted on the cached features. The supervised-only model uses the SSL
encoder's architecture, trained from scratch on the same stratified subsets, for a fixed number of
optimizer steps at every fraction; with `group_members` a fraction's supervised-only seeds train
together as one grouped model (`pipeline/grouped_train.py`, each equal to its solo run) before their
child runs log them. The parent logs the paired differences (pipeline/paired.py).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline import config, paired, tables, tracking
from pipeline.batchnorm import recompute_bn_statistics
from pipeline.checkpoint import load_classifier
from pipeline.data import DatasetSplits, load_splits
from pipeline.errors import UserError
from pipeline.features import extract_features
from pipeline.grids import GRID_GUIDE, for_seed, load_encoder_checkpoint, majority_rows, pretraining_seed_note, raise_failures, run_grid, ssl_run_ids
from pipeline.models import Classifier, ModelSpec, build_classifier
from pipeline.probe import fit_linear_head, install_head
from pipeline.results import METHOD_LABELS, PAIRED_COLUMNS, RESULT_KEYS, label_efficiency_figure
from pipeline.runtime import configure_speed, prepare_model, resolve_device, seed_everything
from pipeline.supervised import MemberRun, evaluate, log_classifier, log_member, log_selected_model, train_together
from pipeline.train import epochs_for_steps, eval_interval

PROBE_COMPARISONS = (("ssl_probe", "supervised"), ("ssl_probe", "random_probe"))


class FrozenEncoder:
    """A frozen classifier with its split features computed once."""

    def __init__(self, model: Classifier, data: DatasetSplits, cfg: Mapping[str, Any]):
        self.model = model
        self.features = {s: extract_features(model, data.split(s), cfg["eval_batch_size"], cfg["amp"]).cpu().numpy() for s in ("train", "val", "test")}


def random_encoder(spec: ModelSpec, data: DatasetSplits, cfg: Mapping[str, Any], device: torch.device, seed: int) -> FrozenEncoder:
    """The control encoder: the SSL encoder's architecture at a seeded random initialisation, its
    batch-norm statistics recomputed over the training images as the SSL encoder's were."""
    seed_everything(seed)
    model = prepare_model(build_classifier(spec), device, cfg)
    recompute_bn_statistics(model, data.train.images, cfg["eval_batch_size"], cfg["amp"])
    model.freeze_encoder()
    return FrozenEncoder(model.eval(), data, cfg)


def load_ssl_encoders(value: str, dataset: str, device: torch.device, cfg: Mapping[str, Any]) -> list[tuple[Classifier, Any]]:
    """(frozen SSL model, its ssl_pretrain run) for each id of `ssl_run_id`; they must share the
    method, architecture and image size, or the rows would average different things."""
    loaded = []
    for run_id in ssl_run_ids(value):
        path, run = load_encoder_checkpoint(run_id, dataset)
        model, checkpoint = load_classifier(path, device)
        model = prepare_model(model, device, cfg)
        model.freeze_encoder()
        loaded.append((model, run, checkpoint["config"]["size"]))
    kinds = {(run.tags.get("method", ""), model.spec.model, model.spec.stem, size) for model, run, size in loaded}
    if len(kinds) > 1:
        raise UserError(f"ssl_run_id names pretraining runs of different methods, encoders or sizes: {sorted(kinds)}")
    return [(model, run) for model, run, _ in loaded]


def imagenet_encoder(data: DatasetSplits, cfg: Mapping[str, Any], device: torch.device) -> tuple[FrozenEncoder | None, str]:
    """ResNet-18 with ImageNet weights (torchvision stem), or None and the reason it is unavailable."""
    try:
        model = build_classifier(ModelSpec("resnet18", data.channels, "imagenet", "imagenet"), finetune="head")
    except UserError as exc:
        return None, str(exc)
    return FrozenEncoder(prepare_model(model, device, cfg).eval(), data, cfg), ""


def probe_child(encoder: FrozenEncoder, data: DatasetSplits, subset: np.ndarray, cfg: Mapping[str, Any], tags: Mapping[str, Any]) -> dict[str, float]:
    """Fit one linear probe on cached features and log it as a nested classifier run."""
    labels = {s: data.split(s).labels.cpu().numpy() for s in ("train", "val")}
    head = fit_linear_head(
        encoder.features["train"][subset],
        labels["train"][subset],
        encoder.features["val"],
        labels["val"],
        cfg["probe_cs"],
        tags["seed"],
    )
    logits = {s: head.logits(encoder.features[s]) for s in ("val", "test")}
    install_head(encoder.model, head)
    child_cfg = config.derive(cfg, {"seed": tags["seed"], "label_fraction": tags["label_fraction"], "probe_C": head.C, "size": data.size})
    name = f"{tags['method']}-{tags['ssl_method']}-f{tags['label_fraction']}-s{tags['seed']}"
    with tracking.tracked_run("linear_probe", cfg["dataset"], tags, run_name=name, nested=True) as run_id:
        tracking.log_config(child_cfg)
        train = data.train.subset(subset)
        evaluation = evaluate(encoder.model, data, child_cfg, train, logits=logits)
        values = log_classifier(evaluation, encoder.model, encoder.model.spec, data, child_cfg, train)
    return {**values, "run_id": run_id}


def supervised_member(
    data: DatasetSplits,
    spec: ModelSpec,
    subset: np.ndarray,
    cfg: Mapping[str, Any],
    seed: int,
    fraction: float,
    device: torch.device,
) -> MemberRun:
    """The supervised-only model of one subset, initialised from its seed: the encoder's architecture
    from scratch for `supervised_steps` optimizer steps (converted to epochs of this subset), or
    `supervised_epochs` when given."""
    epochs = cfg["supervised_epochs"] or epochs_for_steps(cfg["supervised_steps"], len(subset), cfg["batch_size"])
    overrides = {
        "model": spec.model,
        "stem": spec.stem,
        "epochs": epochs,
        "eval_every": eval_interval(epochs),
        "augment": cfg["supervised_augment"],
        "seed": seed,
        "label_fraction": fraction,
        "size": data.size,
    }
    child_cfg = config.derive(cfg, overrides, stage="baseline")
    seed_everything(seed)
    return MemberRun(prepare_model(build_classifier(spec), device, child_cfg), data.train.subset(subset), child_cfg)


def supervised_child(
    data: DatasetSplits,
    spec: ModelSpec,
    member: MemberRun,
    cfg: Mapping[str, Any],
    tags: Mapping[str, Any],
) -> dict[str, float]:
    """Log a supervised-only member as a nested classifier run: trained with its group, or now alone."""
    name = f"supervised-{tags['ssl_method']}-f{tags['label_fraction']}-s{tags['seed']}"
    run_tags = {**tags, "grouped": str(member.result is not None).lower()}
    with tracking.tracked_run("linear_probe", cfg["dataset"], run_tags, run_name=name, nested=True) as run_id:
        values = log_member(member, spec, data)
    return {**values, "run_id": run_id}


def log_label_efficiency(rows: list[dict[str, Any]], not_run: Mapping[str, str], title: str, notes: list[str]) -> list[dict[str, Any]]:
    """Aggregate child results (mean ± std over seeds) into the parent's table and figures, and the
    paired differences of the SSL probe against supervised-only and the random encoder."""
    summary = tables.aggregate(rows, ("method", "label_fraction"), RESULT_KEYS)
    for method, reason in not_run.items():
        for fraction in sorted({r["label_fraction"] for r in rows}):
            summary.append({"method": method, "label_fraction": fraction, "n": 0, "status": f"not run: {reason}"})
    for row in summary:
        row.setdefault("status", "ok")
        row["run_ids"] = " ".join(r["run_id"] for r in rows if (r["method"], r["label_fraction"]) == (row["method"], row["label_fraction"]) and r["run_id"])
    columns = ["method", "label_fraction", "n"] + [f"{k}_{s}" for k in RESULT_KEYS for s in ("mean", "std")] + ["status", "run_ids"]
    tracking.log_text(tables.to_csv(summary, columns), "label_efficiency.csv")
    header = ["method", "labels", "n", "test acc", "test balanced acc", "test AUROC", "test ECE"]
    body = [
        [
            METHOD_LABELS.get(r["method"], r["method"]),
            f"{r['label_fraction']:.0%}",
            r["n"],
            tables.mean_std(r, "test_acc"),
            tables.mean_std(r, "test_balanced_acc"),
            tables.mean_std(r, "test_auroc"),
            tables.mean_std(r, "test_ece"),
        ]
        for r in summary
    ]
    note = "".join(f"\n{METHOD_LABELS.get(m, m)}: not run ({reason}).\n" for m, reason in not_run.items())
    text = (
        f"# {title}\n\nmean ± sample std (ddof 1) over seeds; test split.\n\n" + tables.rows_to_markdown(body, header) + note + "".join(f"\n{line}\n" for line in notes)
    )
    tracking.log_text(text, "label_efficiency.md")
    tracking.describe_run(text + GRID_GUIDE)
    ran = [r for r in summary if r["n"] and r["method"] != "majority_class"]
    tracking.log_figure(label_efficiency_figure(ran, "test_acc", f"{title}: accuracy"), "plots/label_efficiency_acc.png")
    tracking.log_figure(label_efficiency_figure(ran, "test_auroc", f"{title}: AUROC"), "plots/label_efficiency_auroc.png")
    for row in ran:  # one curve per method and metric in the UI's charts: step = percent of the labels
        tracking.log_metrics(
            {f"label_efficiency/{row['method']}_{k}_mean": row[f"{k}_mean"] for k in ("test_auroc", "test_acc")}, step=round(row["label_fraction"] * 100)
        )
    differences = paired.compare_methods(rows, PROBE_COMPARISONS)
    tracking.log_text(tables.to_csv(differences, PAIRED_COLUMNS), "paired_differences.csv")
    return summary


def run_linear_probe(cfg: Mapping[str, Any], data_root: str = "") -> list[dict[str, Any]]:
    """The whole week-5 grid under one parent run; returns the summary rows."""
    device = resolve_device(cfg["device"])
    configure_speed(device, cfg.get("deterministic", False))
    encoders = load_ssl_encoders(cfg["ssl_run_id"], cfg["dataset"], device, cfg)
    ssl_runs = [run for _, run in encoders]
    spec = encoders[0][0].spec
    size = int(ssl_runs[0].config.get("size", 28))
    data = load_splits(cfg["dataset"], size, data_root, device)
    ssl_features = {run.id: FrozenEncoder(model, data, cfg) for model, run in encoders}
    methods = list(cfg["methods"])
    imagenet, reason = imagenet_encoder(data, cfg, device) if "imagenet_probe" in methods else (None, "")
    not_run = {"imagenet_probe": reason} if "imagenet_probe" in methods and imagenet is None else {}
    runnable = [m for m in methods if m not in not_run]
    ssl_method = ssl_runs[0].tags.get("method", "")
    sources = [run.id for run in ssl_runs]
    parent_tags = {
        "model": spec.model,
        "seed": ",".join(map(str, cfg["seeds"])),
        "source_run_id": ",".join(sources),
        "ssl_method": ssl_method,
        "pretraining_runs": len(sources),
        "config_hash": config.config_hash(cfg),
    }

    random_encoders: dict[int, FrozenEncoder] = {}  # one per seed, shared by its fractions
    grouped: dict[tuple[float, int], MemberRun] = {}  # (fraction, seed): a member built, and trained, with its fraction's seeds

    def child(subset: np.ndarray, tags: dict[str, Any]) -> Mapping[str, float]:
        method, seed = tags["method"], tags["seed"]
        if method == "ssl_probe":
            run = for_seed(ssl_runs, cfg["seeds"], seed)
            return probe_child(ssl_features[run.id], data, subset, cfg, {**tags, "source_run_id": run.id, "pretrain_seed": run.tags.get("seed", "")})
        if method == "random_probe":
            if seed not in random_encoders:
                random_encoders[seed] = random_encoder(spec, data, cfg, device, seed)
            return probe_child(random_encoders[seed], data, subset, cfg, tags)
        if method == "imagenet_probe":
            return probe_child(imagenet, data, subset, cfg, {**tags, "model": "resnet18"})
        member = grouped.pop((tags["label_fraction"], seed), None)
        if member is None:
            member = supervised_member(data, spec, subset, cfg, seed, tags["label_fraction"], device)
        return supervised_child(data, spec, member, cfg, tags)

    def ahead(fraction: float, subsets: dict[int, np.ndarray]) -> None:
        members = {seed: supervised_member(data, spec, subset, cfg, seed, fraction, device) for seed, subset in subsets.items()}
        why_not = train_together(list(members.values()), data.val)
        if why_not:
            tqdm.write(f"linear_probe: the supervised-only seeds at {fraction:g} train one by one ({why_not})")
        grouped.update({(fraction, seed): member for seed, member in members.items()})

    name = f"linear-probe-{ssl_method}-{spec.model}"
    with tracking.tracked_run("linear_probe", cfg["dataset"], parent_tags, run_name=name):
        tracking.log_config(cfg)
        for method, why in not_run.items():
            tracking.set_tags({f"{method}_status": f"not run: {why}"[:4000]})
        group = ahead if cfg["group_members"] and "supervised" in runnable else None
        rows, failures = run_grid(cfg, data, child, runnable, {"model": spec.model, "ssl_method": ssl_method}, group)
        if not rows:
            raise_failures(failures, len(failures), "linear_probe")
        rows += majority_rows(data, cfg)
        log_selected_model(rows, data, cfg["dataset"])
        prevalence = float(data.test.labels.float().mean())
        notes = [
            pretraining_seed_note(list(cfg["seeds"]), ssl_runs),
            f"Test prevalence of class 1: {prevalence:.3f} (train {float(data.train.labels.float().mean()):.3f}); "
            "the majority-class row predicts each subset's most common label.",
        ]
        title = f"{cfg['dataset']} label efficiency ({ssl_method} encoder)"
        summary = log_label_efficiency(rows, not_run, title, notes)
        raise_failures(failures, len(cfg["label_fractions"]) * len(cfg["seeds"]) * len(runnable), "linear_probe")
        return summary
