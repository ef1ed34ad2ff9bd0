"""Frozen-encoder features, extracted once per split, and the kNN classifier used to monitor SSL."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import metrics
from pipeline.data import Split, to_float
from pipeline.models import Classifier
from pipeline.runtime import autocast


@torch.inference_mode()
def extract_features(model: Classifier, split: Split, batch_size: int = 1024, amp: bool = False) -> torch.Tensor:
    """Encoder features of a whole split (eval mode, large batches), float32 on the split's device."""
    was_training = model.training
    model.eval()
    device = split.images.device
    chunks = []
    for chunk in split.images.split(batch_size):
        with autocast(device, amp):
            chunks.append(model.features(to_float(chunk)).float())
    model.train(was_training)
    return torch.cat(chunks)


def knn_predict(support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, k: int = 20, temperature: float = 0.07) -> np.ndarray:
    """p(class 1) of each query from its k most cosine-similar support samples, weighted by
    exp(similarity / temperature) as in Wu et al. (2018)."""
    support = F.normalize(support, dim=1)
    query = F.normalize(query, dim=1)
    k = min(k, support.shape[0])
    similarity, index = (query @ support.T).topk(k, dim=1)
    weights = (similarity / temperature).exp()
    positive = (weights * support_labels[index].float()).sum(dim=1)
    return (positive / weights.sum(dim=1)).double().cpu().numpy()


def knn_monitor(model: Classifier, train: Split, val: Split, k: int, batch_size: int, amp: bool) -> dict[str, float]:
    """kNN AUROC and accuracy on validation with the training split as support (labels used only
    to monitor, never to train)."""
    probs = knn_predict(extract_features(model, train, batch_size, amp), train.labels, extract_features(model, val, batch_size, amp), k)
    labels = val.labels.cpu().numpy()
    return {"knn_val_auroc": metrics.auroc(probs, labels), "knn_val_acc": float(np.mean((probs >= 0.5) == labels))}
