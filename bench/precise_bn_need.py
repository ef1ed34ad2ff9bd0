"""Benchmark (not a test): after how many optimizer steps batch norm's running averages are as good as recomputed ones.

Trains the baseline config's classifier on each label fraction and, after every epoch, evaluates
the validation split twice: with the running averages training left (momentum 0.1), and with the
statistics recomputed over the training images (`pipeline.batchnorm`, on a copy, so training goes on
with the running averages alone). The table lists the optimizer steps so far and both AUROCs, NLLs
and accuracies; where they agree, recomputing is overhead. Usage: `python bench/precise_bn_need.py
[--dataset pneumoniamnist] [--fractions 1.0:5,0.1:40,0.02:120] [--model smallcnn] [--sample N] [--out FILE.json]`
(each fraction with its number of epochs).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline import config  # noqa: E402
from pipeline.augment import build_augment  # noqa: E402
from pipeline.batchnorm import recompute_bn_statistics, statistics_sample  # noqa: E402
from pipeline.data import Split, load_splits, stratified_subset  # noqa: E402
from pipeline.models import ModelSpec, build_classifier  # noqa: E402
from pipeline.runtime import configure_speed, epoch_seed, prepare_model, seed_everything  # noqa: E402
from pipeline.train import TrainSettings, epoch_metrics, make_optimizer, make_scheduler, predict_logits, train_epoch  # noqa: E402


def evaluate(model: torch.nn.Module, val: Split, cfg: dict) -> dict[str, float]:
    """Validation AUROC, NLL and accuracy with the model's current statistics."""
    values = epoch_metrics(predict_logits(model, val, cfg["eval_batch_size"]), val.labels.numpy(), cfg["ece_bins"])
    return {"auroc": values["val_auroc"], "nll": values["val_loss"], "acc": values["val_acc"]}


def recomputed(model: torch.nn.Module, images: torch.Tensor, val: Split, cfg: dict) -> dict[str, float]:
    """Validation metrics of a copy of `model` whose statistics are recomputed over `images`."""
    copied = copy.deepcopy(model)
    recompute_bn_statistics(copied, images, cfg["eval_batch_size"])
    return evaluate(copied, val, cfg)


def trace(cfg: dict, data, fraction: float, epochs: int, sample: int) -> list[dict[str, float]]:
    """One training run on `fraction` of the labels: every evaluation after every epoch."""
    seed_everything(cfg["seed"])
    model = prepare_model(build_classifier(ModelSpec(cfg["model"])), torch.device("cpu"), cfg)
    train = data.train.subset(stratified_subset(data.train.labels.numpy(), fraction, cfg["seed"]))
    cfg = {**cfg, "epochs": epochs}
    optimizer, augment = make_optimizer(model, TrainSettings.of(cfg)), build_augment(cfg["augment"])
    scheduler = make_scheduler(optimizer, TrainSettings.of(cfg))
    rows, steps = [], 0
    for epoch in range(1, epochs + 1):
        train_epoch(model, train, optimizer, augment, cfg["batch_size"], epoch_seed(cfg["seed"], epoch), False, f"epoch {epoch}")
        scheduler.step()
        steps = sum(state["step"] for state in optimizer.state.values()) / len(optimizer.state)
        views = {"running": evaluate(model, data.val, cfg), "precise": recomputed(model, train.images, data.val, cfg)}
        if sample:
            views["sampled"] = recomputed(model, statistics_sample(train.images, sample, cfg["seed"]), data.val, cfg)
        rows.append(
            {
                "fraction": fraction,
                "n_train": len(train),
                "epoch": epoch,
                "steps": int(steps),
                **{f"{k}_{view}": v for view, values in views.items() for k, v in values.items()},
            }
        )
        print(
            f"{fraction:>5} {epoch:>4} {int(steps):>6}  "
            + "  ".join(f"{k.upper() if k != 'nll' else 'NLL'} " + " / ".join(f"{values[k]:.3f}" for values in views.values()) for k in ("auroc", "nll", "acc")),
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="pneumoniamnist")
    parser.add_argument("--data-root", default="")
    parser.add_argument("--fractions", default="1.0:5,0.1:40,0.02:120", help="fraction:epochs, comma-separated")
    parser.add_argument("--model", default="smallcnn")
    parser.add_argument("--sample", type=int, default=0, help="Also evaluate with statistics over this many sampled images.")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    cfg = config.resolve("baseline", args.dataset, {"model": args.model})
    configure_speed(torch.device("cpu"), False)
    data = load_splits(args.dataset, cfg["size"], args.data_root, torch.device("cpu"))
    print("fraction epoch steps  running / precise" + (f" / sample of {args.sample}" if args.sample else ""))
    rows = []
    for item in args.fractions.split(","):
        fraction, epochs = item.split(":")
        rows += trace(cfg, data, float(fraction), int(epochs), args.sample)
    if args.out:
        Path(args.out).write_text(json.dumps({"dataset": args.dataset, "model": args.model, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
