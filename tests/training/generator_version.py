"""Which shipped cards can be compared with freshly generated images: those trained on this generator.

A card records ``training.generator_version`` (absent: version 1). Re-measuring a model on pictures of
another generator version measures nothing about its card, so those comparisons skip with the remedy in
the reason, and ``test_shipped_models.test_trained_on_the_current_generator`` fails until the models are
retrained (``scripts/retrain-models``): one visible failure instead of many confusing ones.
"""

from __future__ import annotations

import pytest

from service.inference.card import ModelCard
from training.data.synthetic import GENERATOR_VERSIONS

__all__ = ["current_for", "require_current_generator", "trained_on"]


def trained_on(card: ModelCard) -> int:
    """The generator version a card's model was trained on."""
    return int(card.training.get("generator_version", 1))


def current_for(card: ModelCard) -> int:
    """The generator version of the card's modality now (head CT or chest radiographs)."""
    return GENERATOR_VERSIONS["ct" if "CT" in card.eligibility.modalities else "cxr"]


def require_current_generator(card: ModelCard) -> None:
    """Skip the calling test when ``card`` predates the current generator of its modality."""
    if trained_on(card) != current_for(card):
        pytest.skip(
            f"{card.name} was trained on generator version {trained_on(card)}, the generator is at version "
            f"{current_for(card)}: fresh images cannot check its card; retrain with scripts/retrain-models"
        )
