"""A small 2-D U-net for per-pixel intracranial hemorrhage on one head CT slice.

Ronneberger, Fischer and Brox (MICCAI 2015): an encoder that halves the resolution and doubles the
channels at each level, a decoder that upsamples back, and **skip connections** that concatenate each
encoder level's features into the decoder at the same resolution, so the output keeps the fine edges the
bottleneck loses (a 1.5 mm subdural rim is two pixels wide at 128 px). Sized for the 2-core CPU budget of
``scripts/retrain-models`` (about 0.12 M parameters at ``base=12``, three levels); GroupNorm rather than
BatchNorm so that small batches of mostly empty slices do not skew the statistics.

Input ``[N, 1, H, W]`` (H and W divisible by 2**levels), output ``probability`` ``[N, 1, H, W]`` in [0, 1]
(a sigmoid in the graph, as the classifiers, so the served ONNX model needs no post-hoc activation).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["UNet"]


def _block(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3 convolutions with GroupNorm and ReLU (the U-net's basic unit)."""
    groups = 4 if cout % 4 == 0 else 1
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.GroupNorm(groups, cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.GroupNorm(groups, cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """Encoder-decoder with skip connections; ``forward`` returns per-pixel probabilities."""

    def __init__(self, base: int = 12, levels: int = 3) -> None:
        super().__init__()
        if levels < 1 or base < 1:
            raise ValueError("a U-net needs at least one level and one channel")
        widths = [base * 2**i for i in range(levels + 1)]
        self.levels = levels
        self.encoders = nn.ModuleList(
            [_block(1, widths[0])] + [_block(widths[i], widths[i + 1]) for i in range(levels)]
        )
        self.pool = nn.MaxPool2d(2)
        self.ups = nn.ModuleList(
            [nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(levels))]
        )
        self.decoders = nn.ModuleList([_block(widths[i] * 2, widths[i]) for i in reversed(range(levels))])
        self.head = nn.Conv2d(widths[0], 1, 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid scores (the training loss works on these for numerical stability)."""
        skips: list[torch.Tensor] = []
        for i, encoder in enumerate(self.encoders):
            x = encoder(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, decoder in zip(self.ups, self.decoders, strict=True):
            x = decoder(torch.cat([up(x), skips.pop()], dim=1))
        scores: torch.Tensor = self.head(x)
        return scores

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))
