"""A small ResNet-style image classifier with one grayscale input channel.

He et al. 2016 ("Deep Residual Learning"), shrunk so that a CPU trains it in minutes: a strided stem, four
stages of one or two basic blocks each (the first block of a stage halves the resolution), global average
pooling and one linear unit per label. ``forward`` returns the probability after a sigmoid, which is what
the exported ONNX graph outputs as ``probability``; training calls :meth:`ResNetClassifier.logits` so the
loss is the numerically stable ``BCEWithLogitsLoss``.

The parameters are split in two attributes, ``backbone`` (everything up to the pooled features) and
``head`` (the final linear layer), so transfer learning can freeze one and fine-tune the other.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["BasicBlock", "ResNetBackbone", "ResNetClassifier"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        activated: torch.Tensor = self.relu(out + self.shortcut(x))
        return activated


class ResNetBackbone(nn.Module):
    """Stem then one stage per width.

    ``full_res_stem=False`` (the detector's): a 5x5 stride-2 stem, then stage ``i > 0`` halves the resolution.
    ``full_res_stem=True`` (the classifier's): two 3x3 convolutions at full resolution, then every stage
    halves it. Thin, low-contrast signs (a pleural line one or two pixels wide, missing lung texture) do not
    survive a strided first layer at 128 px, so the classifier pays for full-resolution features.
    ``features`` returns the output of every stage, finest first, so the detector can build on it.
    """

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64, 128),
        blocks_per_stage: int = 1,
        full_res_stem: bool = False,
    ) -> None:
        super().__init__()
        widths = list(widths)
        self.widths = widths
        if full_res_stem:
            self.stem = nn.Sequential(
                nn.Conv2d(1, widths[0], 3, padding=1, bias=False),
                nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True),
                nn.Conv2d(widths[0], widths[0], 3, padding=1, bias=False),
                nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(1, widths[0], 5, stride=2, padding=2, bias=False),
                nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True),
            )
        stages: list[nn.Module] = []
        in_ch = widths[0]
        for i, width in enumerate(widths):
            first_stride = 2 if full_res_stem or i > 0 else 1
            blocks: list[nn.Module] = [BasicBlock(in_ch, width, stride=first_stride)]
            blocks += [BasicBlock(width, width) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            in_ch = width
        self.stages = nn.ModuleList(stages)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.stem(x)
        feats: list[torch.Tensor] = []
        for stage in self.stages:
            out = stage(out)
            feats.append(out)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[-1]


class ResNetClassifier(nn.Module):
    """``image [N, 1, H, W]`` → ``probability [N, 1]`` (one binary label).

    ``aux_mask=True`` adds ``aux``, a 1x1 convolution over the last feature map that training supervises
    with where the finding is (a per-pixel mask max-pooled to that map, :func:`training.train._loss`). It is
    deep supervision for a finding a few pixels wide in a few slices of a series: the image label alone
    says *whether*, the map says *where*, so the features (and the class-activation map built from them)
    learn the lesion rather than whatever else separates the labels. ``forward`` never uses it, so the
    exported graph is the plain classifier; :mod:`training.explain` adds its map as the ``cam`` output.
    """

    def __init__(
        self, widths: Sequence[int] = (16, 32, 64, 128), blocks_per_stage: int = 1, aux_mask: bool = False
    ) -> None:
        super().__init__()
        self.backbone = ResNetBackbone(widths, blocks_per_stage, full_res_stem=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(list(widths)[-1], 1)
        self.aux: nn.Conv2d | None = nn.Conv2d(list(widths)[-1], 1, 1) if aux_mask else None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.pool(self.backbone(x)).flatten(1))
        return logits

    def logits_and_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The image logit, and the ``aux`` head's logit map over the last feature map (None without it)."""
        features = self.backbone(x)
        logit = self.head(self.pool(features).flatten(1))
        return logit, (self.aux(features) if self.aux is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))
