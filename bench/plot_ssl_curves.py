"""Figure of the SSL learning curves measured by bench/ssl_curves.py: kNN and 10%-label probe
validation AUROC against optimizer steps, per dataset and method, with a profile's step budget
marked, and a short table of the values at chosen steps.

    python bench/plot_ssl_curves.py docs/bench/ssl-curves-cpu.jsonl --budget 800 --out docs/ssl_learning_curves.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def curve_label(point: dict) -> str:
    """What tells two curves of one dataset apart: the method, MoCo's momentum, the schedule length."""
    momentum = f" m={point['moco_momentum']}" if point.get("moco_momentum") else ""
    return f"{point['method']}{momentum}, {point['steps']}-step schedule"


def load(path: Path) -> dict[tuple[str, str], list[dict]]:
    """Monitor points by (dataset, curve label), in step order."""
    curves: dict[tuple[str, str], list[dict]] = {}
    for line in path.read_text().splitlines():
        point = json.loads(line)
        curves.setdefault((point["dataset"], curve_label(point)), []).append(point)
    return {key: sorted(points, key=lambda p: p["step"]) for key, points in curves.items()}


def figure(curves: dict[tuple[str, str], list[dict]], budget: int) -> plt.Figure:
    datasets = sorted({d for d, _ in curves})
    fig, axes = plt.subplots(len(datasets), 2, figsize=(10, 3.6 * len(datasets)), squeeze=False, constrained_layout=True)
    for row, dataset in enumerate(datasets):
        for col, (key, label) in enumerate((("knn_val_auroc", "kNN (k=20) val AUROC"), ("probe_val_auroc", "linear probe, 10% of labels: val AUROC"))):
            ax = axes[row][col]
            for (d, method), points in sorted(curves.items()):
                if d == dataset:
                    ax.plot([p["step"] for p in points], [p[key] for p in points], "o-", ms=3, label=f"{method} (batch {points[0]['batch_size']})")
            ax.axvline(budget, color="grey", linestyle="--", label=f"paper budget ({budget} steps)")
            ax.set_title(f"{dataset}: {label}")
            ax.set_xlabel("optimizer step (0 = random init)")
            ax.set_ylabel("AUROC")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("SSL learning curves, smallcnn, one pretraining seed (validation only)")
    return fig


def table(curves: dict[tuple[str, str], list[dict]], steps: list[int]) -> str:
    """Markdown: kNN / probe val AUROC at the chosen steps, and the wall time to the last point."""
    lines = ["| dataset | curve | " + " | ".join(f"step {s}" for s in steps) + " | wall time (s) |", "|---|---|" + "---|" * (len(steps) + 1)]
    for (dataset, method), points in sorted(curves.items()):
        at = {p["step"]: p for p in points}
        cells = [f"{at[s]['knn_val_auroc']:.3f} / {at[s]['probe_val_auroc']:.3f}" if s in at else "—" for s in steps]
        lines.append(f"| {dataset} | {method} | " + " | ".join(cells) + f" | {points[-1]['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("curves", type=Path)
    parser.add_argument("--budget", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", default="0,100,200,400,600,800,1000,1500,2000")
    args = parser.parse_args()
    curves = load(args.curves)
    figure(curves, args.budget).savefig(args.out, dpi=110)
    print(table(curves, [int(s) for s in args.steps.split(",")]))


if __name__ == "__main__":
    main()
