"""Classifiers as an encoder (image → feature vector) plus a linear head (feature → one logit).

The split lets SSL steps pretrain the encoder alone and probes or fine-tuning reuse it. Inputs are
floats in [0, 1]; each model normalises them itself (a buffer), so checkpoints are self-contained.
Binary tasks use one logit: p(class 1) = sigmoid(logit).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from urllib.error import URLError

import torch
from torch import nn

from pipeline.errors import UserError

# ImageNet channel statistics, averaged over RGB for grayscale input.
IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD = 0.449, 0.226


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model's architecture (stored in every checkpoint)."""

    model: str = "smallcnn"
    in_channels: int = 1
    stem: str = "cifar"
    weights: str = "none"
    dropout: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks with pooling, then global average pooling: a 128-d encoder."""

    def __init__(self, in_channels: int = 1, width: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for out in (width, width * 2, width * 4):
            layers += [
                nn.Conv2d(channels, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
                nn.Conv2d(out, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def imagenet_weights_cached() -> bool:
    """Whether torchvision's ResNet-18 ImageNet weights file is in the torch hub cache."""
    from torchvision.models import ResNet18_Weights  # torchvision loads every architecture: only where ResNet is used

    return (Path(torch.hub.get_dir()) / "checkpoints" / Path(ResNet18_Weights.IMAGENET1K_V1.url).name).exists()


def imagenet_state_dict() -> dict[str, torch.Tensor]:
    """ResNet-18 ImageNet weights through torchvision's weights API (cached under torch hub)."""
    from torchvision.models import ResNet18_Weights

    weights = ResNet18_Weights.IMAGENET1K_V1
    target = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        return weights.get_state_dict(progress=False, weights_only=True)
    except (URLError, OSError, RuntimeError) as exc:
        raise UserError(
            f"ImageNet weights for resnet18 are not available offline ({type(exc).__name__}): "
            f"download {weights.url} and place it at {target} (or set TORCH_HOME), or train from scratch with weights=none and finetune=all"
        ) from None


def resnet18_encoder(in_channels: int, stem: str, weights: str) -> tuple[nn.Module, int]:
    """torchvision ResNet-18 without its fc layer; the `cifar` stem drops the max-pool and makes the
    first convolution stride 1, so a 28-px image is not shrunk 4× before the first block.

    Without weights the cifar stem's first convolution is a new 3×3 one (the CIFAR recipe). With
    ImageNet weights every layer keeps its pretrained values: the first convolution stays the
    pretrained 7×7 kernel (at stride 1 for the cifar stem), summed over its input channels for
    grayscale input (equivalent to feeding the gray image as RGB).
    """
    from torchvision.models import resnet18

    net = resnet18(weights=None)
    if weights == "imagenet":
        state = imagenet_state_dict()
        net.load_state_dict(state)
        if in_channels == 1:
            net.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
            net.conv1.weight.data.copy_(state["conv1.weight"].sum(dim=1, keepdim=True))
        if stem == "cifar":
            net.conv1.stride = (1, 1)
    elif in_channels != 3 or stem == "cifar":
        net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False) if stem == "cifar" else nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    if stem == "cifar":
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net, 512


class Classifier(nn.Module):
    """normalise → encoder → dropout → linear head producing one logit per image."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        if spec.model == "smallcnn":
            self.encoder: nn.Module = SmallCNN(spec.in_channels)
            feat_dim = self.encoder.out_dim
        elif spec.model == "resnet18":
            self.encoder, feat_dim = resnet18_encoder(spec.in_channels, spec.stem, spec.weights)
        else:
            raise UserError(f"model={spec.model!r} must be one of smallcnn, resnet18")
        mean, std = (IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD) if spec.weights == "imagenet" else (0.5, 0.5)
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))
        self.feat_dim = feat_dim
        self.dropout = nn.Dropout(spec.dropout)
        self.head = nn.Linear(feat_dim, 1)
        self.encoder_frozen = False

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder features of a [0, 1] float batch."""
        return self.encoder((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x))).squeeze(1)

    def set_dropout(self, p: float) -> None:
        """Dropout rate before the head (a pretrained encoder comes without one); the spec, which the
        checkpoint stores, follows."""
        self.dropout.p = p
        self.spec = replace(self.spec, dropout=p)

    def freeze_encoder(self) -> None:
        """Head-only training: encoder weights fixed and its batch-norm statistics frozen too."""
        self.encoder_frozen = True
        for param in self.encoder.parameters():
            param.requires_grad_(False)
        self.encoder.eval()

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
        return self


def build_classifier(spec: ModelSpec, finetune: str = "all") -> Classifier:
    """Build a classifier; `finetune='head'` freezes the encoder (weights and BN statistics)."""
    if spec.model == "resnet18" and spec.stem not in ("cifar", "imagenet"):
        raise UserError(f"stem={spec.stem!r} must be one of cifar, imagenet")
    if spec.weights not in ("none", "imagenet"):
        raise UserError(f"weights={spec.weights!r} must be one of none, imagenet")
    if spec.weights == "imagenet" and spec.model != "resnet18":
        raise UserError("weights=imagenet needs model=resnet18 (smallcnn has no pretrained weights)")
    if finetune not in ("head", "all"):
        raise UserError(f"finetune={finetune!r} must be one of head, all")
    model = Classifier(spec)
    if finetune == "head":
        model.freeze_encoder()
    return model
