"""K classifiers of one architecture as one module of grouped convolutions, for training grid members together.

Every convolution with `groups=g` becomes one with K times the channels and `groups=K·g`, every batch
norm one with K times the channels, and the one-logit head a per-member dot product. Member k owns
channel block k of every layer: its input is channel block k of the batch (`stack_channels`), and
since convolution groups, batch norm (statistics, running averages, affine) and the channel-wise
layers between them (ReLU, pooling, residual additions) never mix channel blocks, each member computes
what it would alone: many small launches become one, which is what a grid of tiny batches gains.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.models import Classifier


class GroupedHead(nn.Module):
    """K linear heads of one logit each: features B×(K·F) → logits B×K."""

    def __init__(self, members: int, features: int):
        super().__init__()
        self.members = members
        self.weight = nn.Parameter(torch.zeros(members, features))
        self.bias = nn.Parameter(torch.zeros(members))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bkf,kf->bk", features.reshape(features.shape[0], self.members, -1), self.weight) + self.bias


def grouped_conv(conv: nn.Conv2d, members: int) -> nn.Conv2d:
    """A convolution whose channel block k is member k's copy of `conv`."""
    return nn.Conv2d(
        conv.in_channels * members,
        conv.out_channels * members,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups * members,
        conv.bias is not None,
        conv.padding_mode,
    )


def grouped_batch_norm(norm: nn.BatchNorm2d, members: int) -> nn.BatchNorm2d:
    """A batch norm whose channel block k holds member k's weights and statistics."""
    return nn.BatchNorm2d(norm.num_features * members, norm.eps, norm.momentum, norm.affine, norm.track_running_stats)


def widen(module: nn.Module, members: int) -> None:
    """Replace, in place, every convolution and batch norm under `module` by its grouped version;
    a layer that would mix channel blocks (a linear layer, a norm over all channels) is refused."""
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d):
            setattr(module, name, grouped_conv(child, members))
        elif isinstance(child, nn.BatchNorm2d):
            setattr(module, name, grouped_batch_norm(child, members))
        elif next(child.parameters(recurse=False), None) is not None:
            raise UserError(f"grouped training cannot split {type(child).__name__} layers into members")
        else:
            widen(child, members)


def check_members(members: list[Classifier]) -> None:
    """Refuse members that cannot be grouped: different architectures, a frozen encoder or dropout
    (whose random masks would come from one generator, not one per member)."""
    specs = {member.spec for member in members}
    if len(specs) != 1:
        raise UserError(f"grouped members must share one architecture, got {sorted(map(str, specs))}")
    if any(member.encoder_frozen or member.dropout.p > 0 for member in members):
        raise UserError("grouped training needs trainable encoders without dropout")
    if len({(float(m.mean), float(m.std)) for m in members}) != 1:
        raise UserError("grouped members must share the input normalisation")


class GroupedClassifier(nn.Module):
    """normalise → grouped encoder → grouped heads: input B×(K·C)×H×W, one logit per image and member."""

    def __init__(self, members: list[Classifier]):
        super().__init__()
        check_members(members)
        template = members[0]
        self.members = len(members)
        self.spec = template.spec
        self.encoder = copy.deepcopy(template.encoder)
        widen(self.encoder, self.members)
        self.head = GroupedHead(self.members, template.feat_dim)
        self.register_buffer("mean", template.mean.detach().clone())
        self.register_buffer("std", template.std.detach().clone())
        self.to(device=template.head.weight.device, dtype=template.head.weight.dtype)
        self.load_state_dict(pack_states([member.state_dict() for member in members]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder((x - self.mean) / self.std))

    def member_state(self, index: int) -> dict[str, torch.Tensor]:
        """Member `index` as a `Classifier` state dict (detached copies, never views of the live weights)."""
        return {key: unpack(value, self.members, index).clone() for key, value in self.state_dict().items()}


def pack_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The grouped state of K member state dicts: tensors concatenated along their first dimension,
    scalars (normalisation, batch counts) taken from the first member."""
    return {key: torch.cat([state[key] for state in states]) if value.dim() else value.clone() for key, value in states[0].items()}


def unpack(value: torch.Tensor, members: int, index: int) -> torch.Tensor:
    """Member `index`'s block of a grouped tensor (a scalar is shared by all members)."""
    if not value.dim():
        return value.detach()
    return value.detach().reshape(members, -1, *value.shape[1:])[index]


def stack_channels(batches: list[torch.Tensor]) -> torch.Tensor:
    """One grouped batch from K member batches N×C×H×W: member k in channel block k."""
    return torch.cat(batches, dim=1)
