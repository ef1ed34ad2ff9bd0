"""Benchmark (not a test): K grid members trained as one grouped model against the same K trained one after another.

The shapes are the paper profile's fine-tuning children (`ssl_finetune`: smallcnn, batch 128, flip
augmentation, Adam, an encoder lr scale) at each label fraction: member k trains on the stratified
subset of subset seed k, so a fraction's members share the subset size, as a grid's do. Each round
times, in alternating order so the machine's drift hits both alike, `--steps` optimizer steps (at
least `--images` images) of every member (whole epochs of the shipped functions: `train.train_epoch` per member, and
`grouped_train.train_group_epoch` for the group), and one evaluation of every member (precise batch
norm over its subset, then the validation split). The table gives member steps/s (K × steps per
member / wall seconds) and seconds per evaluation of all K members as medians over rounds, the
median per-round speed-up in wall and in process CPU time, and a grid cell's projected wall time
(the profile's step budget and evaluations, K members) solo and grouped.
Usage: `python bench/grouped_bench.py [--datasets breastmnist,pneumoniamnist] [--fractions 0.01,0.05,0.1]
[--members 5] [--steps 8] [--images 512] [--rounds 4] [--data-root DIR] [--out FILE.json]`.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline import config  # noqa: E402
from pipeline.augment import build_augment  # noqa: E402
from pipeline.batchnorm import recompute_bn_statistics  # noqa: E402
from pipeline.data import Split, load_splits, stratified_subset  # noqa: E402
from pipeline.grouped_model import GroupedClassifier, stack_channels  # noqa: E402
from pipeline.grouped_train import train_group_epoch  # noqa: E402
from pipeline.models import ModelSpec, build_classifier  # noqa: E402
from pipeline.runtime import configure_speed, epoch_seed, prepare_model  # noqa: E402
from pipeline.train import TrainSettings, epochs_for_steps, eval_interval, make_optimizer, predict_logits, train_epoch  # noqa: E402


def child_config(dataset: str, n: int) -> dict[str, Any]:
    """The paper profile's fine-tuning child config for a subset of n images (encoder lr scale 0.1)."""
    cfg = config.resolve("ssl_finetune", dataset, {"device": "cpu"}, profile="paper")
    epochs = epochs_for_steps(cfg["steps"], n, cfg["batch_size"])
    return {**cfg, "encoder_lr_scale": 0.1, "epochs": epochs, "eval_every": eval_interval(epochs)}


def seconds(work: Callable[[], None]) -> tuple[float, float]:
    """Wall and process CPU seconds of `work` (CPU time is what neighbours' load disturbs least)."""
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - wall, time.process_time() - cpu


class Cell:
    """K members of one (dataset, fraction), ready to be timed solo and grouped."""

    def __init__(self, dataset: str, fraction: float, members: int, data_root: str):
        self.data = load_splits(dataset, 28, data_root, torch.device("cpu"))
        labels = self.data.train.labels.numpy()
        self.trains = [self.data.train.subset(stratified_subset(labels, fraction, seed)) for seed in range(members)]
        self.cfg = child_config(dataset, len(self.trains[0]))
        self.augment = build_augment(self.cfg["augment"])
        models = []
        for seed in range(members):
            torch.manual_seed(seed)
            models.append(build_classifier(ModelSpec("smallcnn")))
        self.solo = [prepare_model(copy.deepcopy(model), torch.device("cpu"), self.cfg) for model in models]
        self.solo_optimizers = [make_optimizer(model, TrainSettings.of(self.cfg)) for model in self.solo]
        self.group = prepare_model(GroupedClassifier(models), torch.device("cpu"), self.cfg)
        self.group_optimizer = make_optimizer(self.group, TrainSettings.of(self.cfg))
        self.train_images = stack_channels([train.images for train in self.trains])
        self.val_grouped = Split(self.data.val.images.repeat(1, members, 1, 1), self.data.val.labels)

    def steps_per_epoch(self) -> int:
        n, batch = len(self.trains[0]), self.cfg["batch_size"]
        return max(1, n // batch + (n % batch > 1))

    def train_solo(self, epochs: int) -> None:
        for seed, (model, optimizer, train) in enumerate(zip(self.solo, self.solo_optimizers, self.trains)):
            for epoch in range(1, epochs + 1):
                train_epoch(model, train, optimizer, self.augment, self.cfg["batch_size"], epoch_seed(seed, epoch), False, "solo")

    def train_grouped(self, epochs: int) -> None:
        for epoch in range(1, epochs + 1):
            seeds = [epoch_seed(seed, epoch) for seed in range(len(self.trains))]
            train_group_epoch(self.group, self.trains, self.group_optimizer, self.augment, self.cfg["batch_size"], seeds, False)

    def evaluate_solo(self) -> None:
        for model, train in zip(self.solo, self.trains):
            recompute_bn_statistics(model, train.images, self.cfg["eval_batch_size"])
            predict_logits(model, self.data.val, self.cfg["eval_batch_size"])

    def evaluate_grouped(self) -> None:
        recompute_bn_statistics(self.group, self.train_images, self.cfg["eval_batch_size"])
        predict_logits(self.group, self.val_grouped, self.cfg["eval_batch_size"])


def measure(dataset: str, fraction: float, args: argparse.Namespace) -> dict[str, Any]:
    """Median member steps/s and evaluation seconds, solo and grouped, over alternating rounds."""
    cell = Cell(dataset, fraction, args.members, args.data_root)
    steps = max(args.steps, -(-args.images // cell.cfg["batch_size"]), -(-args.images // len(cell.trains[0])))
    epochs = -(-steps // cell.steps_per_epoch())
    member_steps = args.members * epochs * cell.steps_per_epoch()
    for warm_up in (cell.train_solo, cell.train_grouped):
        warm_up(1)
    cell.evaluate_solo()
    cell.evaluate_grouped()
    times: dict[str, list[tuple[float, float]]] = {"solo_train": [], "grouped_train": [], "solo_eval": [], "grouped_eval": []}
    for round_ in range(args.rounds):
        order = ("solo", "grouped") if round_ % 2 == 0 else ("grouped", "solo")
        for path in order:
            times[f"{path}_train"].append(seconds(lambda: getattr(cell, f"train_{path}")(epochs)))
            times[f"{path}_eval"].append(seconds(getattr(cell, f"evaluate_{path}")))
    cfg = cell.cfg
    evaluations = len([e for e in range(1, cfg["epochs"] + 1) if e % cfg["eval_every"] == 0 or e == cfg["epochs"]])
    budget = cfg["epochs"] * cell.steps_per_epoch()
    row: dict[str, Any] = {
        "dataset": dataset,
        "fraction": fraction,
        "n_train": len(cell.trains[0]),
        "batch": min(cfg["batch_size"], len(cell.trains[0])),
        "steps_per_epoch": cell.steps_per_epoch(),
        "members": args.members,
        "budget_steps": budget,
        "evaluations": evaluations,
        "times": times,
    }
    for path in ("solo", "grouped"):
        row[f"{path}_steps_per_s"] = member_steps / statistics.median(wall for wall, _ in times[f"{path}_train"])
        row[f"{path}_eval_s"] = statistics.median(wall for wall, _ in times[f"{path}_eval"])
        row[f"{path}_cell_s"] = args.members * budget / row[f"{path}_steps_per_s"] + evaluations * row[f"{path}_eval_s"]
    for kind in ("train", "eval"):
        pairs = list(zip(times[f"solo_{kind}"], times[f"grouped_{kind}"]))
        row[f"{kind}_ratio"] = statistics.median(solo[0] / grouped[0] for solo, grouped in pairs)
        row[f"{kind}_cpu_ratio"] = statistics.median(solo[1] / grouped[1] for solo, grouped in pairs)
    row["member_steps"] = member_steps
    return row


def render(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of docs/speed.md."""
    lines = [
        "| dataset | labels | images (batch) | member steps/s solo | grouped | speed-up wall (CPU time) | "
        "s per evaluation of K solo | grouped | speed-up wall (CPU time) | grid cell of K, solo → grouped |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['fraction']:.0%} | {r['n_train']} ({r['batch']}) | {r['solo_steps_per_s']:.1f} | "
            f"{r['grouped_steps_per_s']:.1f} | {r['train_ratio']:.2f} ({r['train_cpu_ratio']:.2f}) | {r['solo_eval_s']:.2f} | "
            f"{r['grouped_eval_s']:.2f} | {r['eval_ratio']:.2f} ({r['eval_cpu_ratio']:.2f}) | "
            f"{r['solo_cell_s']:.0f} s → {r['grouped_cell_s']:.0f} s ({r['budget_steps']} steps, {r['evaluations']} evaluations) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="breastmnist,pneumoniamnist")
    parser.add_argument("--fractions", default="0.01,0.05,0.1")
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per member per timing (whole epochs)")
    parser.add_argument("--images", type=int, default=512, help="at least this many images per member per timing")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--data-root", default="")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    configure_speed(torch.device("cpu"))
    rows = []
    for dataset in args.datasets.split(","):
        for fraction in map(float, args.fractions.split(",")):
            rows.append(measure(dataset, fraction, args))
            print(render(rows[-1:]).splitlines()[-1], flush=True)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "processor": platform.processor(),
        "machine": platform.machine(),
        "args": vars(args),
        "when": time.strftime("%Y-%m-%d %H:%M"),
    }
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(render(rows))


if __name__ == "__main__":
    main()
