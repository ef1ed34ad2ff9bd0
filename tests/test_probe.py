"""Linear probe: the head equals scikit-learn's model on standardised features, C is chosen on
validation AUROC, and the installed head reproduces the probe inside the classifier."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from pipeline import metrics
from pipeline.models import ModelSpec, build_classifier
from pipeline.probe import fit_linear_head, install_head


def features(n, rng, informative):
    """Features whose first `informative` columns carry the label; the rest are noise on other scales."""
    labels = rng.integers(0, 2, n)
    x = rng.normal(0, 1, (n, 6)) * np.array([1, 2, 5, 0.1, 3, 1]) + 4
    x[:, :informative] += labels[:, None] * 1.5
    return x, labels


def test_head_is_the_logistic_regression_on_standardised_features():
    rng = np.random.default_rng(0)
    x, y = features(80, rng, 2)
    head = fit_linear_head(x, y, x, y, [0.5], seed=0)
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    reference = LogisticRegression(C=0.5, max_iter=5000).fit((x - mean) / std, y)
    test_x, _ = features(20, rng, 2)
    assert head.logits(test_x) == pytest.approx(reference.decision_function((test_x - mean) / std), rel=1e-6, abs=1e-8)


def test_c_is_chosen_on_validation_auroc():
    rng = np.random.default_rng(1)
    train_x, train_y = features(40, rng, 1)
    val_x, val_y = features(200, rng, 1)
    cs = [1e-4, 1e-2, 1.0, 100.0]
    scores = {c: metrics.auroc(metrics.sigmoid(fit_linear_head(train_x, train_y, val_x, val_y, [c], 0).logits(val_x)), val_y) for c in cs}
    best = max(cs, key=lambda c: (scores[c], -c))  # ties: the smaller C (stronger regularisation)
    assert len(set(scores.values())) > 1
    assert fit_linear_head(train_x, train_y, val_x, val_y, cs, 0).C == best
    # another validation set that prefers another C is followed
    flipped = fit_linear_head(train_x, train_y, val_x, 1 - val_y, cs, 0).C
    assert flipped == max(cs, key=lambda c: (1 - scores[c], -c))


def test_installed_head_reproduces_the_probe_logits():
    torch.manual_seed(0)
    model = build_classifier(ModelSpec("smallcnn")).eval()
    images = torch.rand(12, 1, 28, 28)
    with torch.no_grad():
        feats = model.features(images).numpy()
    labels = np.array([0, 1] * 6)
    head = fit_linear_head(feats, labels, feats, labels, [1.0], seed=0)
    install_head(model, head)
    with torch.no_grad():
        logits = model(images).squeeze(-1).numpy()
    assert logits == pytest.approx(head.logits(feats), rel=1e-4, abs=1e-4)
