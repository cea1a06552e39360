"""Shapes and contracts of the two model families (classifier probability, CenterNet heatmap/size)."""

from __future__ import annotations

import torch

from training.models.classifier import ResNetClassifier
from training.models.detector import STRIDE, CenterNetDetector


def test_classifier_outputs_one_probability_per_image():
    model = ResNetClassifier(widths=(4, 8, 8, 16)).eval()
    with torch.no_grad():
        p = model(torch.randn(3, 1, 64, 48))
    assert p.shape == (3, 1)
    assert bool(((p >= 0) & (p <= 1)).all())
    with torch.no_grad():
        x = torch.randn(2, 1, 32, 32)
        assert torch.allclose(model(x), torch.sigmoid(model.logits(x)))


def test_classifier_has_separate_backbone_and_head():
    model = ResNetClassifier(widths=(4, 8, 8, 16))
    head = {id(p) for p in model.head.parameters()}
    backbone = {id(p) for p in model.backbone.parameters()}
    assert head and backbone and not head & backbone
    assert head | backbone == {id(p) for p in model.parameters()}


def test_detector_outputs_match_the_decode_contract():
    model = CenterNetDetector(widths=(4, 8, 8, 16)).eval()
    with torch.no_grad():
        heat, size = model(torch.randn(2, 1, 64, 96))
    assert heat.shape == (2, 1, 64 // STRIDE, 96 // STRIDE)
    assert size.shape == (2, 2, 64 // STRIDE, 96 // STRIDE)
    assert bool(((heat > 0) & (heat < 1)).all())
    assert bool((size >= 0).all())


def test_detector_starts_with_a_low_prior():
    model = CenterNetDetector(widths=(4, 8, 8, 16)).eval()
    with torch.no_grad():
        heat, _ = model(torch.zeros(1, 1, 32, 32))
    assert float(heat.mean()) < 0.1
