"""Linear probes on cached features: logistic regression fitted once per (fraction, seed), its
regularisation chosen on validation AUROC, then folded into the classifier's linear head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from pipeline import metrics
from pipeline.models import Classifier


@dataclass(frozen=True)
class LinearHead:
    """w·x + b on raw (unstandardised) features, and the inverse regularisation C it used."""

    weight: np.ndarray
    bias: float
    C: float

    def logits(self, features: np.ndarray) -> np.ndarray:
        return features @ self.weight + self.bias


def fit_linear_head(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, cs: Sequence[float], seed: int) -> LinearHead:
    """Standardise on the training subset, fit L2 logistic regression for each C, keep the best on
    validation AUROC (ties: the stronger regularisation), and fold the standardisation into w, b."""
    mean = train_x.mean(axis=0)
    std = train_x.std(axis=0) + 1e-6
    best: LinearHead | None = None
    best_score = -np.inf
    for c in sorted(cs):
        model = LogisticRegression(C=c, max_iter=5000, random_state=seed).fit((train_x - mean) / std, train_y)
        weight = model.coef_[0] / std
        head = LinearHead(weight, float(model.intercept_[0] - np.dot(weight, mean)), c)
        score = metrics.auroc(head.logits(val_x), val_y)
        if best is None or score > best_score:
            best, best_score = head, score
    return best


def install_head(model: Classifier, head: LinearHead) -> Classifier:
    """Copy a fitted linear head into the classifier, so its checkpoint reproduces the probe."""
    with torch.no_grad():
        model.head.weight.copy_(torch.as_tensor(head.weight, dtype=model.head.weight.dtype)[None])
        model.head.bias.fill_(head.bias)
    return model
