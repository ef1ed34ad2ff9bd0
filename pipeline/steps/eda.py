"""Week 2 data exploration: per-split statistics, class balance, sample tiles, histograms, duplicates.

Everything here is a pure function of medmnist's numpy arrays (uint8 images, 0/1 labels) so it runs
on any machine without a model; `run_eda` logs the results to one MLflow run.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from itertools import combinations
from typing import Any, Mapping

import numpy as np
from medmnist.info import INFO

from pipeline import plots, tracking
from pipeline.data import SPLITS, ArraySplit, load_arrays, resolve_root
from pipeline.errors import UserError
from pipeline.gallery import log_run_gallery
from pipeline.records import RunRecord


def split_stats(split: ArraySplit) -> dict[str, Any]:
    """Shape, dtype, value range and intensity statistics of one split's images."""
    images = split.images
    pixels = images.reshape(-1).astype(np.float64)
    per_image = images.reshape(len(images), -1).mean(axis=1)
    p1, p50, p99 = np.percentile(pixels, [1, 50, 99])
    return {
        "n": int(len(images)),
        "image_shape": list(images.shape[1:]),
        "dtype": str(images.dtype),
        "min": int(images.min()),
        "max": int(images.max()),
        "mean": float(pixels.mean()),
        "std": float(pixels.std()),
        "p1": float(p1),
        "median": float(p50),
        "p99": float(p99),
        "image_mean_min": float(per_image.min()),
        "image_mean_max": float(per_image.max()),
    }


def class_counts(labels: np.ndarray) -> dict[int, int]:
    """Number of images per class label (0 and 1 always present as keys)."""
    values, counts = np.unique(np.asarray(labels).reshape(-1), return_counts=True)
    found = dict(zip(values.tolist(), counts.tolist()))
    return {label: int(found.get(label, 0)) for label in (0, 1)}


def balance_rows(splits: Mapping[str, ArraySplit], label_names: Mapping[str, str]) -> list[dict[str, Any]]:
    """The class-balance table: one row per (split, class) with count and fraction of the split."""
    rows = []
    for split, arrays in splits.items():
        counts = class_counts(arrays.labels)
        total = sum(counts.values())
        for label, count in counts.items():
            rows.append(
                {
                    "split": split,
                    "label": label,
                    "class": label_names[str(label)],
                    "count": count,
                    "fraction": count / total if total else float("nan"),
                }
            )
    return rows


def image_hashes(images: np.ndarray) -> list[str]:
    """A content hash of each image's bytes (exact duplicates share a hash)."""
    return [hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).hexdigest() for image in images]


def _groups(hashes: list[str]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for index, digest in enumerate(hashes):
        groups[digest].append(index)
    return groups


def within_duplicates(hashes: list[str], labels: np.ndarray, max_examples: int = 5) -> dict[str, Any]:
    """Exact duplicates inside one split: redundant images, groups, label conflicts, example pairs."""
    groups = [g for g in _groups(hashes).values() if len(g) > 1]
    pairs = [(a, b) for g in groups for a, b in combinations(g, 2)]
    return {
        "duplicate_images": sum(len(g) - 1 for g in groups),
        "groups": len(groups),
        "pairs": len(pairs),
        "label_conflict_pairs": sum(int(labels[a] != labels[b]) for a, b in pairs),
        "examples": [list(p) for p in pairs[:max_examples]],
    }


def across_duplicates(hashes_a: list[str], hashes_b: list[str], labels_a: np.ndarray, labels_b: np.ndarray, max_examples: int = 5) -> dict[str, Any]:
    """Exact duplicates between two splits: images of b also in a, (a, b) pairs, label conflicts."""
    groups_a, groups_b = _groups(hashes_a), _groups(hashes_b)
    shared = sorted(set(groups_a) & set(groups_b), key=lambda h: groups_b[h][0])
    pairs = [(i, j) for h in shared for i in groups_a[h] for j in groups_b[h]]
    return {
        "images_in_second": sum(len(groups_b[h]) for h in shared),
        "images_in_first": sum(len(groups_a[h]) for h in shared),
        "pairs": len(pairs),
        "label_conflict_pairs": sum(int(labels_a[i] != labels_b[j]) for i, j in pairs),
        "examples": [list(p) for p in pairs[:max_examples]],
    }


def duplicate_report(splits: Mapping[str, ArraySplit], max_examples: int = 5) -> dict[str, Any]:
    """Exact-duplicate check inside each split and across every pair of splits (hash of image bytes)."""
    hashes = {name: image_hashes(s.images) for name, s in splits.items()}
    report: dict[str, Any] = {"within": {}, "across": {}}
    for name, arrays in splits.items():
        report["within"][name] = within_duplicates(hashes[name], arrays.labels, max_examples)
    for a, b in combinations(splits, 2):
        report["across"][f"{a}/{b}"] = across_duplicates(hashes[a], hashes[b], splits[a].labels, splits[b].labels, max_examples)
    return report


def sample_indices(labels: np.ndarray, per_class: int, seed: int) -> dict[int, np.ndarray]:
    """A seeded choice of up to `per_class` image indices for each class."""
    rng = np.random.default_rng(seed)
    chosen = {}
    for label in (0, 1):
        members = np.flatnonzero(labels == label)
        chosen[label] = np.sort(rng.choice(members, size=min(per_class, len(members)), replace=False))
    return chosen


def example_pairs(splits: Mapping[str, ArraySplit], report: Mapping[str, Any], limit: int = 8) -> list[tuple[str, np.ndarray, str, np.ndarray]]:
    """Up to `limit` duplicate pairs with their images for a figure, taken in turn from each check."""
    checks = [[(s, s, p) for p in r["examples"]] for s, r in report["within"].items()]
    checks += [[(*key.split("/"), p) for p in r["examples"]] for key, r in report["across"].items()]
    pairs = [check[k] for k in range(max(map(len, checks), default=0)) for check in checks if k < len(check)]

    def caption(split: str, index: int) -> str:
        return f"{split} #{index} (label {splits[split].labels[index]})"

    return [(caption(a, i), splits[a].images[i], caption(b, j), splits[b].images[j]) for a, b, (i, j) in pairs[:limit]]


def duplicate_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """Flat metric keys of the duplicate report (e.g. `dup_within_train`, `dup_train_test`)."""
    values = {f"dup_within_{s}": r["duplicate_images"] for s, r in report["within"].items()}
    values.update({f"dup_{k.replace('/', '_')}": r["images_in_second"] for k, r in report["across"].items()})
    return values


def summary_lines(dataset: str, size: int, stats: Mapping[str, Any], rows: list[dict[str, Any]], report: Mapping[str, Any]) -> list[str]:
    """The short terminal summary of an EDA run."""
    lines = [f"eda {dataset} ({size} px)"]
    for split, s in stats.items():
        counts = {r["label"]: r["count"] for r in rows if r["split"] == split}
        positive = counts[1] / max(s["n"], 1)
        lines.append(
            f"  {split:<5} n={s['n']:<5} shape={tuple(s['image_shape'])} {s['dtype']} range=[{s['min']}, {s['max']}] "
            f"mean={s['mean']:.1f} std={s['std']:.1f}  class 0: {counts[0]}  class 1: {counts[1]} ({positive:.1%} positive)"
        )
    within = ", ".join(f"{s} {r['duplicate_images']}" for s, r in report["within"].items())
    across = ", ".join(f"{k} {r['images_in_second']}" for k, r in report["across"].items())
    lines.append(f"  exact duplicates within splits: {within}; across splits (images of the 2nd): {across}")
    return lines


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A GitHub Markdown table of dict rows (floats to 3 decimals)."""

    def cell(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def run_eda(cfg: Mapping[str, Any], data_root: str = "") -> list[str]:
    """Explore one dataset at one size, log everything to one `eda` run; returns the summary lines."""
    dataset, size = cfg["dataset"], cfg["size"]
    source, skipped = gallery_source(cfg)  # a wrong run id is refused before any work
    splits = load_arrays(dataset, size, resolve_root(data_root))
    label_names = dict(INFO[dataset]["label"])
    stats = {name: split_stats(splits[name]) for name in SPLITS}
    rows = balance_rows(splits, label_names)
    report = duplicate_report(splits, cfg["max_examples"])
    lines = summary_lines(dataset, size, stats, rows, report)
    tags = {"model": "-", "seed": cfg["seed"]}
    with tracking.tracked_run("eda", dataset, tags, run_name=f"eda-{dataset}-{size}px"):
        tracking.log_config(cfg)
        tracking.log_metrics({f"{s}_{k}": v for s, st in stats.items() for k, v in st.items() if k in ("n", "mean", "std")})
        tracking.log_metrics({f"{r['split']}_class{r['label']}_count": r["count"] for r in rows})
        tracking.log_metrics(duplicate_metrics(report))
        tracking.log_table(rows, "eda/class_balance.json")
        tracking.log_json({"dataset": dataset, "size": size, "label_names": label_names, "stats": stats, "class_balance": rows, "duplicates": report}, "eda/summary.json")
        tracking.log_text(markdown_table(rows, ["split", "label", "class", "count", "fraction"]), "eda/class_balance.md")
        tracking.log_text("\n".join(lines) + "\n", "eda/summary.txt")
        train = splits["train"]
        picks = sample_indices(train.labels, cfg["samples_per_class"], cfg["seed"])
        tracking.log_figure(plots.sample_grid(train.images, picks, label_names, f"{dataset} train samples ({size} px)"), "eda/samples_per_class.png")
        tracking.log_figure(plots.intensity_histograms(splits, label_names, cfg["hist_bins"], f"{dataset} pixel intensities"), "eda/intensity_histograms.png")
        tracking.log_figure(plots.duplicate_pairs(example_pairs(splits, report), f"{dataset}: example exact duplicates"), "eda/duplicate_examples.png")
        if source is not None:
            rows = log_run_gallery(source, cfg["gallery_n"], data_root)
            lines.append(f"  error gallery of run {source.id}: {len(rows)} most confident test mistakes logged")
    return lines + skipped


def gallery_source(cfg: Mapping[str, Any]) -> tuple[RunRecord | None, list[str]]:
    """The classifier run whose error gallery to add (`run_id`), and a note when `latest` finds none;
    an explicit id that is wrong is a UserError."""
    if cfg["run_id"] in ("", "none"):
        return None, []
    try:
        return tracking.find_run("baseline,classifier", cfg["dataset"], cfg["run_id"]), []
    except UserError:
        if cfg["run_id"] != "latest":
            raise
        return None, ["  error gallery: skipped (no FINISHED baseline run yet; run `baseline` first or pass run_id=<id>)"]
