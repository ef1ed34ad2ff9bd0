"""SimCLR/MoCo losses against reference formulas, queue and momentum behaviour, the pretraining
loop (learns, resumes exactly, stops on NaN) and the kNN monitor."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline import config
from pipeline.data import load_splits
from pipeline.errors import DivergenceError
from pipeline.features import knn_predict
from pipeline.models import ModelSpec, build_classifier
from pipeline.pretrain import pretrain, warmup_cosine
from pipeline.runtime import seed_everything
from pipeline.ssl import MoCo, SimCLR, build_ssl, info_nce, nt_xent


def reference_nt_xent(z1, z2, t):
    z = F.normalize(torch.cat([z1, z2]), dim=1).double()
    n2 = z.shape[0]
    total = 0.0
    for i in range(n2):
        partner = (i + n2 // 2) % n2
        others = [k for k in range(n2) if k != i]
        denominator = sum(math.exp(float(z[i] @ z[k]) / t) for k in others)
        total += -math.log(math.exp(float(z[i] @ z[partner]) / t) / denominator)
    return total / n2


def reference_info_nce(q, k, queue, t):
    total = 0.0
    for i in range(q.shape[0]):
        positive = math.exp(float(q[i] @ k[i]) / t)
        negatives = sum(math.exp(float(q[i] @ n) / t) for n in queue)
        total += -math.log(positive / (positive + negatives))
    return total / q.shape[0]


@pytest.mark.parametrize("t", [0.1, 0.2, 0.5])
def test_nt_xent_matches_the_direct_formula(t):
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 8), torch.randn(6, 8)
    assert nt_xent(z1, z2, t).item() == pytest.approx(reference_nt_xent(z1, z2, t), rel=1e-5)


def test_info_nce_matches_the_direct_formula():
    torch.manual_seed(1)
    q, k = F.normalize(torch.randn(5, 8), dim=1), F.normalize(torch.randn(5, 8), dim=1)
    queue = F.normalize(torch.randn(12, 8), dim=1)
    assert info_nce(q, k, queue, 0.2).item() == pytest.approx(reference_info_nce(q, k, queue, 0.2), rel=1e-5)


def test_info_nce_leaves_each_querys_own_keys_out_of_its_negatives():
    torch.manual_seed(2)
    q, k = F.normalize(torch.randn(3, 8), dim=1), F.normalize(torch.randn(3, 8), dim=1)
    queue = F.normalize(torch.randn(6, 8), dim=1)
    own = torch.zeros(3, 6, dtype=torch.bool)
    own[0, [1, 4]] = own[2, 0] = True
    losses = [reference_info_nce(q[i:i + 1], k[i:i + 1], queue[~own[i]], 0.2) for i in range(3)]
    assert info_nce(q, k, queue, 0.2, own).item() == pytest.approx(sum(losses) / 3, rel=1e-5)


def small_moco(queue_size=10, momentum=0.9):
    seed_everything(0)
    return MoCo(build_classifier(ModelSpec("smallcnn")), temperature=0.2, momentum=momentum, queue_size=queue_size,
                hidden_dim=16, out_dim=8)


def test_queue_is_fifo_and_wraps_around():
    moco = small_moco(queue_size=10)
    first, second = torch.ones(6, 8), torch.full((6, 8), 2.0)
    moco.enqueue(first)
    assert moco.queue_ptr.item() == 6 and torch.equal(moco.queue[:6], first)
    moco.enqueue(second)
    assert moco.queue_ptr.item() == 2
    assert torch.equal(moco.queue[6:], second[:4]) and torch.equal(moco.queue[:2], second[4:])
    assert torch.equal(moco.queue[2:6], first[:4])
    assert torch.equal(moco.queue_ids, torch.full((10,), -1))  # enqueued without image ids


def test_moco_masks_earlier_keys_of_the_same_images():
    # a queue holding several epochs of a small dataset's keys: each query's own earlier keys are
    # near copies of its positive, so they are not negatives
    moco = small_moco(queue_size=8).eval()
    x, ids = torch.rand(4, 1, 28, 28), torch.tensor([3, 7, 1, 5])
    moco.enqueue(F.normalize(torch.randn(4, 8), dim=1), torch.tensor([7, 0, 3, 9]))
    reference = copy.deepcopy(moco)
    with torch.no_grad():
        loss = moco(x, x, ids).item()
        reference.momentum_update()
        query = F.normalize(reference.projector(reference.backbone.features(x)), dim=1)
        key = F.normalize(reference.key_projector(reference.key_backbone.features(x)), dim=1)

    def mean_loss(negatives):
        return sum(reference_info_nce(query[i:i + 1], key[i:i + 1], negatives(i), 0.2) for i in range(4)) / 4

    assert loss == pytest.approx(mean_loss(lambda i: reference.queue[reference.queue_ids != ids[i]]), rel=1e-4)
    assert loss != pytest.approx(mean_loss(lambda i: reference.queue), rel=1e-3)  # images 3 and 7 were queued
    assert torch.equal(moco.queue_ids[4:], ids) and moco.queue_ptr.item() == 0


def test_a_training_state_without_queue_ids_resumes_with_ids_unknown():
    # saved before the queue kept image ids: resuming it must not fail on the missing buffer
    old = {k: v for k, v in small_moco(queue_size=10).state_dict().items() if k != "queue_ids"}
    moco = small_moco(queue_size=10)
    moco.queue_ids.fill_(4)
    moco.load_state_dict(old)
    assert torch.equal(moco.queue_ids, torch.full((10,), -1)) and torch.equal(moco.queue, old["queue"])


def test_momentum_update_is_an_exponential_moving_average():
    moco = small_moco(momentum=0.9)
    with torch.no_grad():
        for p in moco.backbone.parameters():
            p.add_(1.0)
    query = [p.clone() for p in moco.backbone.parameters()]
    key = [p.clone() for p in moco.key_backbone.parameters()]
    moco.momentum_update()
    for q, k_before, k_after in zip(query, key, moco.key_backbone.parameters()):
        assert torch.allclose(k_after, 0.9 * k_before + 0.1 * q)
    assert not any(p.requires_grad for p in moco.key_backbone.parameters())


def test_moco_forward_enqueues_keys_and_trains_only_the_query_side():
    moco = small_moco(queue_size=16)
    x = torch.rand(4, 1, 28, 28)
    loss = moco(x, x.flip(-1))
    loss.backward()
    assert moco.queue_ptr.item() == 4
    assert torch.allclose(moco.queue[:4].norm(dim=1), torch.ones(4), atol=1e-5)
    assert moco.backbone.encoder.features[0].weight.grad is not None
    assert all(p.grad is None for p in moco.key_backbone.parameters())


def test_warmup_then_cosine_schedule():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = warmup_cosine(optimizer, warmup_steps=4, total_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] < 0.1


def test_knn_predict_votes_by_similarity():
    support = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([1, 1, 0, 0])
    probs = knn_predict(support, labels, torch.tensor([[1.0, 0.05], [0.05, 1.0]]), k=2)
    assert probs[0] == pytest.approx(1.0) and probs[1] == pytest.approx(0.0)


@pytest.fixture()
def splits(synthetic_root):
    return load_splits("breastmnist", 28, str(synthetic_root), torch.device("cpu"))


def ssl_cfg(**overrides):
    base = config.resolve("ssl_pretrain", "breastmnist", {})
    return {**base, "epochs": 4, "batch_size": 32, "warmup_epochs": 1, "queue_size": 64, **overrides}


def fresh_module(method, cfg):
    seed_everything(cfg["seed"])
    return build_ssl(method, build_classifier(ModelSpec("smallcnn")), cfg)


@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_pretraining_runs_and_simclr_lowers_its_loss(method, splits):
    cfg = ssl_cfg(method=method, epochs=5, lr=3e-3)
    module = fresh_module(method, cfg)
    history = pretrain(module, splits, cfg)
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(row["ssl_loss"]) and 0 <= row["knn_val_auroc"] <= 1 for row in history)
    if method == "simclr":
        assert history[-1]["ssl_loss"] < history[0]["ssl_loss"]
    else:  # the loop hands MoCo the images' indices, which the queue keeps to mask own keys
        queued = module.queue_ids[module.queue_ids >= 0]
        assert len(queued) > 0 and int(queued.max()) < len(splits.train)


def test_pretraining_resumes_exactly(splits):
    cfg = ssl_cfg(method="moco")
    saved = {}

    def keep_epoch_two(epoch, row, state):
        if epoch == 2:
            saved.update(copy.deepcopy(state()))

    full = pretrain(fresh_module("moco", cfg), splits, cfg, on_epoch=keep_epoch_two)
    resumed = pretrain(fresh_module("moco", {**cfg, "seed": 5}), splits, cfg, resume=saved)
    assert resumed == full


def test_diverging_ssl_loss_fails_with_a_message(splits):
    cfg = ssl_cfg(method="simclr", epochs=1)
    module = fresh_module("simclr", cfg)
    with torch.no_grad():
        module.projector[-1].bias.fill_(float("nan"))
    with pytest.raises(DivergenceError, match="SSL loss became nan"):
        pretrain(module, splits, cfg)


def test_simclr_wraps_the_classifier_backbone():
    model = build_classifier(ModelSpec("smallcnn"))
    simclr = SimCLR(model, hidden_dim=16, out_dim=8)
    assert simclr.backbone is model
    assert np.isfinite(simclr(torch.rand(4, 1, 28, 28), torch.rand(4, 1, 28, 28)).item())
