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
from pipeline.data import Split
from pipeline.features import knn_monitor, knn_predict
from pipeline.models import ModelSpec, build_classifier
from pipeline.pretrain import PretrainSettings, monitor, pretrain, warmup_cosine
from pipeline.runtime import seed_everything
from pipeline.ssl import MoCo, SimCLR, SplitBatchNorm, build_ssl, chunkwise_batch_norm, folded_batch_norm, info_nce, key_order, nt_xent, split_batch_norm


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
    losses = [reference_info_nce(q[i : i + 1], k[i : i + 1], queue[~own[i]], 0.2) for i in range(3)]
    assert info_nce(q, k, queue, 0.2, own).item() == pytest.approx(sum(losses) / 3, rel=1e-5)


def small_moco(queue_size=10, momentum=0.9):
    seed_everything(0)
    return MoCo(build_classifier(ModelSpec("smallcnn")), temperature=0.2, momentum=momentum, queue_size=queue_size, hidden_dim=16, out_dim=8)


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
        return sum(reference_info_nce(query[i : i + 1], key[i : i + 1], negatives(i), 0.2) for i in range(4)) / 4

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


@pytest.mark.parametrize("shape", [(16, 6, 5, 5), (16, 6)])
def test_split_batch_norm_normalises_each_group_on_its_own(shape):
    seed_everything(0)
    plain = torch.nn.BatchNorm2d(6) if len(shape) == 4 else torch.nn.BatchNorm1d(6)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 2)
        plain.bias.uniform_(-1, 1)
    split = split_batch_norm(copy.deepcopy(torch.nn.Sequential(plain)), 4)[0]
    x = torch.randn(*shape) * 3 + 1
    out = split(x)
    groups = [copy.deepcopy(plain) for _ in range(4)]
    for g, bn in enumerate(groups):  # four consecutive chunks of four samples
        assert torch.allclose(out[4 * g : 4 * g + 4], bn(x[4 * g : 4 * g + 4]), atol=1e-5)
    assert not torch.allclose(out, copy.deepcopy(plain)(x), atol=1e-3)  # whole-batch statistics differ
    assert torch.allclose(split.running_mean, sum(bn.running_mean for bn in groups) / 4, atol=1e-6)
    assert torch.allclose(split.running_var, sum(bn.running_var for bn in groups) / 4, atol=1e-6)
    plain.load_state_dict(split.state_dict())
    assert torch.allclose(split.eval()(x), plain.eval()(x))  # eval: plain BN with the averaged statistics
    assert split(x[:3]).shape == (3, *shape[1:])
    if len(shape) == 4:  # the chunks keep the channels_last layout the CPU path trains in
        assert split.train()(x.contiguous(memory_format=torch.channels_last)).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", [(16, 6, 5, 5), (16, 6)])
def test_folded_batch_norm_equals_one_batch_norm_per_chunk(shape):
    # the GPU path (one batch norm over chunks folded into channels) against the CPU path
    torch.manual_seed(0)
    x = torch.randn(*shape) * 2 + 1
    if len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(6, requires_grad=True), torch.rand(6, requires_grad=True)
    start_means, start_variances = torch.rand(4, 6), torch.rand(4, 6) + 0.5
    results = []
    for normalise in (chunkwise_batch_norm, folded_batch_norm):
        inputs = x.clone().requires_grad_(True)
        means, variances = start_means.clone(), start_variances.clone()
        out = normalise(inputs, 4, means, variances, weight, bias, 0.1, 1e-5)
        grads = torch.autograd.grad((out * torch.arange(out.numel()).view(out.shape).sin()).sum(), (inputs, weight, bias))
        results.append((out, means, variances, *grads))
    for chunked, folded in zip(*results):
        assert torch.allclose(chunked, folded, atol=1e-5)
    assert not torch.allclose(results[0][1], start_means)  # the running statistics moved


def test_split_batch_norm_without_momentum_keeps_a_cumulative_average():
    bn = split_batch_norm(torch.nn.Sequential(torch.nn.BatchNorm1d(3, momentum=None)), 2)[0]
    batches = [torch.randn(8, 3) + i for i in range(3)]
    for batch in batches:
        bn(batch)
    chunk_means = [batch[k * 4 : k * 4 + 4].mean(dim=0) for batch in batches for k in range(2)]
    assert torch.allclose(bn.running_mean, torch.stack(chunk_means).mean(dim=0), atol=1e-5)
    untracked = split_batch_norm(torch.nn.Sequential(torch.nn.BatchNorm1d(3, track_running_stats=False)), 2)[0]
    assert not isinstance(untracked, SplitBatchNorm)  # nothing to average: left as it is


def test_split_batch_norm_keeps_parameters_and_checkpoint_keys():
    model = build_classifier(ModelSpec("smallcnn"))
    keys = model.state_dict().keys()
    split_batch_norm(model, 8)
    assert model.state_dict().keys() == keys
    assert sum(isinstance(m, SplitBatchNorm) for m in model.modules()) == 6
    build_classifier(ModelSpec("smallcnn")).load_state_dict(model.state_dict())


def test_key_order_puts_most_keys_in_another_group_than_their_query():
    order = key_order(256, 8)
    assert sorted(order.tolist()) == list(range(256))
    # samples shared by query chunk a (sample // 32) and key chunk c (position // 32): every key chunk
    # draws 4 of its 32 samples from each query chunk, as a shuffle across 8 devices does on average
    shared = torch.zeros(8, 8, dtype=torch.long)
    for position, sample in enumerate(order.tolist()):
        shared[sample // 32, position // 32] += 1
    assert torch.equal(shared, torch.full((8, 8), 4))
    assert torch.equal(key_order(60, 8), torch.arange(60)) and torch.equal(key_order(64, 1), torch.arange(64))


def test_moco_with_split_bn_matches_groupwise_reference():
    seed_everything(0)
    backbone = build_classifier(ModelSpec("smallcnn"))
    moco = MoCo(copy.deepcopy(backbone), temperature=0.2, momentum=0.9, queue_size=16, hidden_dim=16, out_dim=8, bn_splits=2)
    reference = MoCo(backbone, temperature=0.2, momentum=0.9, queue_size=16, hidden_dim=16, out_dim=8)
    reference.load_state_dict(moco.state_dict())
    x1, x2 = torch.rand(8, 1, 28, 28), torch.rand(8, 1, 28, 28)
    loss = moco(x1, x2)
    with torch.no_grad():
        reference.momentum_update()
        query = torch.empty(8, 8)
        key = torch.empty(8, 8)
        order = key_order(8, 2)
        for g in range(2):  # queries in two chunks of four; keys chunked by their reordered position
            query[4 * g : 4 * g + 4] = reference.projector(reference.backbone.features(x1[4 * g : 4 * g + 4]))
            chunk = order[4 * g : 4 * g + 4]
            key[chunk] = reference.key_projector(reference.key_backbone.features(x2[chunk]))
        query, key = F.normalize(query, dim=1), F.normalize(key, dim=1)
    expected = sum(reference_info_nce(query[i : i + 1], key[i : i + 1], reference.queue, 0.2) for i in range(8)) / 8
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert torch.allclose(moco.queue[:8], key, atol=1e-5)  # keys enqueued in the batch's own order


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


class PixelFeatures(torch.nn.Module):
    """A stand-in encoder: the image's two pixels are its features."""

    def features(self, x):
        return x.flatten(1)


def test_knn_monitor_uses_the_training_split_as_support():
    rng = np.random.default_rng(0)

    def split(n, flip=False):
        labels = rng.integers(0, 2, n)
        angle = np.where(labels == 1, 0.3, 1.2) + rng.normal(0, 0.1, n)  # the class sets the direction
        images = np.stack([np.cos(angle), np.sin(angle)], axis=1) * 200
        labels = 1 - labels if flip else labels
        return Split(torch.tensor(images, dtype=torch.uint8).view(n, 1, 1, 2), torch.tensor(labels))

    train, val = split(60), split(40)
    assert knn_monitor(PixelFeatures(), train, val, 5, 16, False)["knn_val_auroc"] > 0.95
    # validation labels inverted: only validation as its own support could still score well
    assert knn_monitor(PixelFeatures(), train, split(40, flip=True), 5, 16, False)["knn_val_auroc"] < 0.05


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
    return {**base, "steps": 8, "knn_every": 4, "batch_size": 32, "warmup_steps": 2, "queue_size": 64, **overrides}


def fresh_module(method, cfg):
    seed_everything(cfg["seed"])
    return build_ssl(method, build_classifier(ModelSpec("smallcnn")), cfg)


@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_pretraining_runs_its_step_budget_and_simclr_lowers_its_loss(method, splits):
    cfg = ssl_cfg(method=method, steps=10, knn_every=5, lr=3e-3)
    module = fresh_module(method, cfg)
    history = pretrain(module, splits, PretrainSettings.of(cfg))
    assert [row["step"] for row in history] == [0, 5, 10]
    assert [row["epoch"] for row in history] == [0, 2, 4]  # 96 images at batch 32: 3 steps an epoch
    assert math.isnan(history[0]["ssl_loss"]) and history[0]["lr"] == 0.0  # step 0: the random initialisation
    assert all(math.isfinite(row["ssl_loss"]) and 0 <= row["knn_val_auroc"] <= 1 for row in history[1:])
    if method == "simclr":
        assert history[-1]["ssl_loss"] < history[1]["ssl_loss"]
    else:  # the loop hands MoCo the images' indices, which the queue keeps to mask own keys
        queued = module.queue_ids[module.queue_ids >= 0]
        assert len(queued) > 0 and int(queued.max()) < len(splits.train)


def test_step_zero_monitors_the_untrained_encoder(splits):
    cfg = ssl_cfg(method="simclr")
    module = fresh_module("simclr", cfg)
    untouched = copy.deepcopy(module)
    first = pretrain(module, splits, PretrainSettings.of({**cfg, "steps": 1, "knn_every": 1}))[0]
    assert first["knn_val_auroc"] == monitor(untouched, splits, PretrainSettings.of(cfg))["knn_val_auroc"]


def budget(**overrides) -> PretrainSettings:
    return PretrainSettings.of({**config.resolve("ssl_pretrain", "breastmnist", {}), **overrides})


def test_an_epoch_budget_is_converted_to_steps():
    assert budget(epochs=4, steps=1000, batch_size=32).total_steps(96) == 12
    assert budget(epochs=0, steps=1000, batch_size=32).total_steps(96) == 1000
    assert budget(epochs=3, steps=1, batch_size=256).total_steps(96) == 3  # a batch above the data: one step an epoch


def test_the_learning_rate_warms_up_then_decays_to_zero_over_the_steps(splits):
    cfg = ssl_cfg(method="simclr", steps=10, knn_every=1, warmup_steps=4, lr=1e-3)
    lrs = [row["lr"] for row in pretrain(fresh_module("simclr", cfg), splits, PretrainSettings.of(cfg))[1:]]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4:] == sorted(lrs[4:], reverse=True) and lrs[-1] < 1e-4


@pytest.mark.parametrize("at_step", [3, 4])  # an epoch boundary and mid-epoch (3 steps an epoch)
def test_pretraining_resumes_exactly(splits, at_step):
    cfg = ssl_cfg(method="moco", knn_every=1)
    saved = {}

    def keep(step, row, state):
        if step == at_step:
            saved.update(copy.deepcopy(state()))

    full = pretrain(fresh_module("moco", cfg), splits, PretrainSettings.of(cfg), on_monitor=keep)
    resumed = pretrain(fresh_module("moco", {**cfg, "seed": 5}), splits, PretrainSettings.of(cfg), resume=saved)
    assert saved["step"] == at_step
    assert resumed == full


def test_diverging_ssl_loss_fails_with_a_message(splits):
    cfg = ssl_cfg(method="simclr", steps=2, knn_every=1)
    module = fresh_module("simclr", cfg)
    with torch.no_grad():
        module.projector[-1].bias.fill_(float("nan"))
    with pytest.raises(DivergenceError, match="SSL loss became nan"):
        pretrain(module, splits, PretrainSettings.of(cfg))


def test_simclr_wraps_the_classifier_backbone():
    model = build_classifier(ModelSpec("smallcnn"))
    simclr = SimCLR(model, hidden_dim=16, out_dim=8)
    assert simclr.backbone is model
    assert np.isfinite(simclr(torch.rand(4, 1, 28, 28), torch.rand(4, 1, 28, 28)).item())
