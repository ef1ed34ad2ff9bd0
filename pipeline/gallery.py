"""Error gallery: the test images a classifier got wrong with the highest confidence.

Works from a run's logged predictions (`predictions/test.csv`: index, label, logit, prob of class 1)
and the dataset's test images; it never retrains. Every classifier run logs its own gallery at the
end of training (`pipeline.supervised.fit_and_log`); `eda -P run_id=<id>` builds one for any
classifier run already in the store.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd
from medmnist.info import INFO

from pipeline import plots, tracking
from pipeline.data import load_arrays, resolve_root
from pipeline.errors import UserError
from pipeline.records import RunRecord

GALLERY_PNG = "gallery/misclassified_gallery.png"
GALLERY_CSV = "gallery/misclassified_gallery.csv"
COLUMNS = ["index", "label", "predicted", "prob", "confidence"]
STUDENT_COLUMNS = ["hypothesis", "possible_fix"]  # logged empty: why the model erred, and what might fix it, in the student's words


def most_confident_mistakes(predictions: pd.DataFrame, n: int = 5, threshold: float = 0.5) -> pd.DataFrame:
    """The n misclassified rows with the highest probability of the (wrong) predicted class.

    `predictions` has DESIGN's columns index, label, prob (p of class 1); ties go to the lower index.
    `confidence` is p(predicted class): prob when predicted 1, 1 - prob when predicted 0.
    """
    frame = predictions[["index", "label", "prob"]].copy()
    frame["predicted"] = (frame["prob"] >= threshold).astype(int)
    frame["confidence"] = np.where(frame["predicted"] == 1, frame["prob"], 1.0 - frame["prob"])
    wrong = frame[frame["predicted"] != frame["label"]]
    wrong = wrong.sort_values(["confidence", "index"], ascending=[False, True], kind="stable")
    return wrong.head(n)[COLUMNS].reset_index(drop=True)


def log_gallery(mistakes: pd.DataFrame, test_images: np.ndarray, label_names: Mapping[str, str], title: str) -> None:
    """Log the gallery figure and its rows (CSV, with empty STUDENT_COLUMNS to fill in) to the active run."""
    tiles = test_images[mistakes["index"].to_numpy(dtype=int)] if len(mistakes) else test_images[:0]
    tracking.log_figure(plots.mistake_gallery(tiles, mistakes, label_names, title), GALLERY_PNG)
    annotated = mistakes.assign(**dict.fromkeys(STUDENT_COLUMNS, ""))
    tracking.log_text(annotated.to_csv(index=False, float_format="%.6g"), GALLERY_CSV)


def log_run_gallery(run: RunRecord, n: int, data_root: str = "") -> pd.DataFrame:
    """Build the gallery of a finished classifier run from its predictions; log it to the active run."""
    run_id, dataset = run.id, run.tags["dataset"]
    predictions = pd.read_csv(tracking.download_artifact(run_id, "predictions/test.csv"))
    size = int(float(run.config.get("size", 28)))
    test = load_arrays(dataset, size, resolve_root(data_root))["test"]
    if len(predictions) != len(test.images) or not np.array_equal(predictions["label"].to_numpy(), test.labels):
        raise UserError(
            f"run {run_id}'s test predictions do not match the {dataset} {size}px test split in this data root "
            f"({len(predictions)} predictions, {len(test.images)} images)"
        )
    mistakes = most_confident_mistakes(predictions, n)
    tracking.set_tags({"source_run_id": run_id})
    title = f"{dataset}: {len(mistakes)} most confident test mistakes of run {run_id[:8]}"
    log_gallery(mistakes, test.images, dict(INFO[dataset]["label"]), title)
    return mistakes
