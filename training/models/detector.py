"""A CenterNet-style lesion detector (Zhou et al. 2019, "Objects as Points"), fully convolutional.

The ResNet backbone of :mod:`training.models.classifier` gives features at strides 4, 8, 16 and 32 model
pixels; a small top-down path (upsample, add a 1x1 lateral projection, 3x3 convolution: a feature pyramid
in the manner of Lin et al. 2017) brings them back to stride :data:`STRIDE`. Two heads read that map:

- ``heatmap`` ``[N, 1, h, w]``: probability (after a sigmoid) that a lesion centre lies in each cell;
- ``size`` ``[N, 2, h, w]``: box width and height in model-input pixels (non-negative, via softplus).

That is exactly the contract of ``service.inference.postprocess.decode_detections``, which turns the two maps
into boxes (peaks above a threshold, then NMS) in both evaluation and serving. As in the classifier, the
parameters are split into ``backbone`` (encoder and top-down path) and ``head`` (the two output heads).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from training.models.classifier import ResNetBackbone

__all__ = ["STRIDE", "CenterNetDetector", "DetectorBackbone"]

STRIDE = 4
"""Model-input pixels per output cell: the stride-2 stem, then a 2x2 max pool before the first stage."""

HEATMAP_PRIOR = 0.01
"""Initial lesion-centre probability, so the focal loss starts stable (CenterNet sets the bias to -2.19)."""


class DetectorBackbone(nn.Module):
    """Encoder (stride 2·2^i per stage after a stride-2 max pool) and a top-down path back to stride 4."""

    def __init__(self, widths: Sequence[int] = (16, 32, 64, 128), blocks_per_stage: int = 1, neck: int = 48):
        super().__init__()
        self.encoder = ResNetBackbone(widths, blocks_per_stage)
        self.pool = nn.MaxPool2d(2)  # stem (2) x pool (2): the first stage works at stride 4
        self.lateral = nn.ModuleList(nn.Conv2d(w, neck, 1) for w in widths)
        self.smooth = nn.Sequential(
            nn.Conv2d(neck, neck, 3, padding=1, bias=False),
            nn.BatchNorm2d(neck),
            nn.ReLU(inplace=True),
        )
        self.out_channels = neck

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(self.encoder.stem(x))
        feats: list[torch.Tensor] = []
        for stage in self.encoder.stages:
            out = stage(out)
            feats.append(out)
        top = self.lateral[-1](feats[-1])
        for feat, lateral in zip(reversed(feats[:-1]), reversed(self.lateral[:-1]), strict=True):
            top = F.interpolate(top, size=feat.shape[-2:], mode="nearest") + lateral(feat)
        smoothed: torch.Tensor = self.smooth(top)
        return smoothed


class _Heads(nn.Module):
    def __init__(self, channels: int, hidden: int = 32) -> None:
        super().__init__()
        self.heatmap = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(hidden, 1, 1)
        )
        self.size = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(hidden, 2, 1)
        )
        last = self.heatmap[-1]
        assert isinstance(last, nn.Conv2d) and last.bias is not None
        nn.init.constant_(last.bias, float(torch.logit(torch.tensor(HEATMAP_PRIOR))))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heatmap(x), F.softplus(self.size(x)) * 8.0


class CenterNetDetector(nn.Module):
    """``image [N, 1, H, W]`` → ``(heatmap [N, 1, H/4, W/4], size [N, 2, H/4, W/4])``."""

    stride = STRIDE

    def __init__(self, widths: Sequence[int] = (16, 32, 64, 128), blocks_per_stage: int = 1) -> None:
        super().__init__()
        self.backbone = DetectorBackbone(widths, blocks_per_stage)
        self.head = _Heads(self.backbone.out_channels)

    def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Heatmap logits and sizes, for the training loss."""
        heatmap, size = self.head(self.backbone(x))
        return heatmap, size

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, size = self.raw(x)
        return torch.sigmoid(logits), size
