"""Contrastive self-supervised methods: SimCLR-lite (NT-Xent) and MoCo-lite (momentum encoder,
queue of negatives, InfoNCE), each one small module holding the whole method.

Both wrap a `Classifier` as the backbone and use its `features` (normalisation + encoder), so the
pretrained backbone is saved in the classifier checkpoint format that probes and fine-tuning load.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models import Classifier


def projection_head(in_dim: int, hidden_dim: int = 512, out_dim: int = 128) -> nn.Sequential:
    """The 2-layer MLP projector (Linear-BN-ReLU-Linear) used by SimCLR and MoCo v2."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


class SplitBatchNorm:
    """Batch norm that, in training, normalises `splits` consecutive chunks of the batch separately:
    the single-device stand-in for MoCo's shuffling BN across GPUs (the MoCo authors' CIFAR demo
    splits its batch the same way). Running statistics become the mean of the chunks' updates. In
    eval mode, and for a batch `splits` does not divide, it is plain batch norm. Parameters and
    state_dict keys are those of the batch norm it replaces, so checkpoints load into the plain
    model.

    Two computations of the same result: on the CPU one batch norm per chunk (keeps channels_last;
    about 5% of a smallcnn MoCo step, bench/split_bn_cost.py); elsewhere the chunks folded into the
    channel dimension, one batch norm for the whole batch (a GPU at 28 px is bound by the number of
    kernels, not their size)."""

    splits: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.splits == 1 or x.shape[0] % self.splits:
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        means = self.running_mean.repeat(self.splits, 1)
        variances = self.running_var.repeat(self.splits, 1)
        normalise = chunkwise_batch_norm if x.device.type == "cpu" else folded_batch_norm
        out = normalise(x, self.splits, means, variances, self.weight, self.bias, factor, self.eps)
        with torch.no_grad():
            self.running_mean.copy_(means.mean(dim=0))
            self.running_var.copy_(variances.mean(dim=0))
        return out


def chunkwise_batch_norm(x, splits, means, variances, weight, bias, factor: float, eps: float) -> torch.Tensor:
    """Training-mode batch norm of each of `splits` chunks; chunk k updates row k of `means`/`variances`."""
    return torch.cat([F.batch_norm(chunk, means[k], variances[k], weight, bias, True, factor, eps) for k, chunk in enumerate(x.chunk(splits))])


def folded_batch_norm(x, splits, means, variances, weight, bias, factor: float, eps: float) -> torch.Tensor:
    """`chunkwise_batch_norm` in one batch norm: chunk k's channels become channels k·C … k·C + C − 1."""
    n, c, rest = x.shape[0], x.shape[1], x.shape[2:]
    folded = x.reshape(splits, n // splits, c, *rest).transpose(0, 1).reshape(n // splits, splits * c, *rest)
    flat_means, flat_variances = means.view(-1), variances.view(-1)
    out = F.batch_norm(folded, flat_means, flat_variances, weight.repeat(splits), bias.repeat(splits), True, factor, eps)
    return out.reshape(n // splits, splits, c, *rest).transpose(0, 1).reshape(x.shape)


class SplitBatchNorm1d(SplitBatchNorm, nn.BatchNorm1d):
    """`SplitBatchNorm` for (N, C) inputs (the projector)."""


class SplitBatchNorm2d(SplitBatchNorm, nn.BatchNorm2d):
    """`SplitBatchNorm` for (N, C, H, W) inputs (the encoder)."""


SPLIT_BATCH_NORM = {nn.BatchNorm1d: SplitBatchNorm1d, nn.BatchNorm2d: SplitBatchNorm2d}


def split_batch_norm(module: nn.Module, splits: int) -> nn.Module:
    """Turn every BatchNorm1d/2d of `module` into its `SplitBatchNorm` with `splits` chunks, in place."""
    for layer in module.modules():
        if type(layer) in SPLIT_BATCH_NORM and layer.track_running_stats:
            layer.__class__ = SPLIT_BATCH_NORM[type(layer)]
        if isinstance(layer, SplitBatchNorm):
            layer.splits = splits
    return module


def key_order(n: int, splits: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The order the key encoder sees a batch in: with chunks of g = n / splits, position s·g + r
    (chunk s) holds sample ((s + r) mod splits)·g + r, so each key chunk draws equally from every
    query chunk, as a random shuffle across `splits` devices does on average."""
    if splits == 1 or n % splits:
        return torch.arange(n, device=device)
    g = n // splits
    chunk = torch.arange(splits, device=device)[:, None]
    row = torch.arange(g, device=device)[None, :]
    return (((chunk + row) % splits) * g + row).flatten()


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent: each of the 2N views must pick its partner among the other 2N−1."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = z1.shape[0]
    similarity = z @ z.T / temperature
    similarity.fill_diagonal_(float("-inf"))
    targets = torch.arange(2 * n, device=z.device).roll(n)
    return F.cross_entropy(similarity, targets)


def info_nce(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, temperature: float, own: torch.Tensor | None = None) -> torch.Tensor:
    """MoCo's InfoNCE: the positive is the key of the same image, negatives are the queue (K×D).

    `query`, `key` and `queue` rows are L2-normalised; the positive logit sits at index 0. `own`
    (N×K, bool) marks queue keys of each query's own image, which are left out of its negatives.
    """
    positive = (query * key).sum(dim=1, keepdim=True)
    negative = query @ queue.T
    if own is not None:
        negative = negative.masked_fill(own, float("-inf"))
    logits = torch.cat([positive, negative], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(query.shape[0], dtype=torch.long, device=query.device))


class SimCLR(nn.Module):
    """Backbone + projector; the loss contrasts two views of each image within the batch."""

    def __init__(self, backbone: Classifier, temperature: float = 0.2, hidden_dim: int = 512, out_dim: int = 128):
        super().__init__()
        self.backbone = backbone
        self.projector = projection_head(backbone.feat_dim, hidden_dim, out_dim)
        self.temperature = temperature

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """NT-Xent of the two views; `ids` is accepted for MoCo's interface (unused: the pretraining loop's
        batches hold each image once)."""
        z1 = self.projector(self.backbone.features(view1))
        z2 = self.projector(self.backbone.features(view2))
        return nt_xent(z1, z2, self.temperature)


class MoCo(nn.Module):
    """Query encoder trained by gradient, key encoder as its exponential moving average, and a
    FIFO queue of past keys as negatives (He et al., 2020; MoCo v2's MLP projector).

    The queue also keeps each key's image index: on a small dataset it holds several epochs of keys
    (BreastMNIST: 546 images, queue 2048), so a query would otherwise meet earlier keys of its own
    image among its negatives; those are masked out. With `bn_splits` > 1, both encoders normalise
    groups of the batch separately and keys are reordered across groups (`key_order`), so a query and
    its key do not share batch statistics, which would let the model find its positive by them (MoCo's
    shuffling BN).
    """

    def __init__(
        self,
        backbone: Classifier,
        temperature: float = 0.2,
        momentum: float = 0.99,
        queue_size: int = 4096,
        hidden_dim: int = 512,
        out_dim: int = 128,
        bn_splits: int = 1,
    ):
        super().__init__()
        self.backbone = split_batch_norm(backbone, bn_splits)
        self.projector = split_batch_norm(projection_head(backbone.feat_dim, hidden_dim, out_dim), bn_splits)
        self.bn_splits = bn_splits
        self.key_backbone = copy.deepcopy(backbone)
        self.key_projector = copy.deepcopy(self.projector)
        for param in [*self.key_backbone.parameters(), *self.key_projector.parameters()]:
            param.requires_grad_(False)
        self.temperature = temperature
        self.momentum = momentum
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, out_dim), dim=1))
        self.register_buffer("queue_ids", torch.full((queue_size,), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self) -> None:
        """key ← m·key + (1−m)·query for every parameter (BN statistics stay the key's own)."""
        pairs = [(self.backbone, self.key_backbone), (self.projector, self.key_projector)]
        for query, key in pairs:
            for q, k in zip(query.parameters(), key.parameters()):
                k.mul_(self.momentum).add_(q.detach(), alpha=1 - self.momentum)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Replace the oldest queue entries with `keys` and their image `ids` (-1: unknown), wrapping around."""
        size = self.queue.shape[0]
        keys = keys[-size:]
        index = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[index] = keys.to(self.queue.dtype)
        self.queue_ids[index] = -1 if ids is None else ids[-size:].to(self.queue_ids)
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """A training state saved before the queue kept image ids resumes with its ids unknown (-1)."""
        state_dict.setdefault(f"{prefix}queue_ids", torch.full_like(self.queue_ids, -1))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """InfoNCE of the batch against the queue; `ids` (the images' dataset indices) masks own keys."""
        ids = None if ids is None else ids.to(self.queue_ids.device)
        query = F.normalize(self.projector(self.backbone.features(view1)).float(), dim=1)
        with torch.no_grad():
            self.momentum_update()
            order = key_order(view2.shape[0], self.bn_splits, view2.device)
            key = self.key_projector(self.key_backbone.features(view2[order]))[torch.argsort(order)]
            key = F.normalize(key.float(), dim=1)
        own = None if ids is None else ids[:, None] == self.queue_ids[None, :]
        loss = info_nce(query, key, self.queue.clone().detach(), self.temperature, own)
        self.enqueue(key, ids)
        return loss


def build_ssl(method: str, backbone: Classifier, cfg) -> nn.Module:
    """The SSL module a config names (`simclr` or `moco`)."""
    if method == "simclr":
        return SimCLR(backbone, cfg["temperature"], cfg["proj_hidden_dim"], cfg["proj_dim"])
    return MoCo(backbone, cfg["temperature"], cfg["moco_momentum"], cfg["queue_size"], cfg["proj_hidden_dim"], cfg["proj_dim"], cfg["bn_splits"])
