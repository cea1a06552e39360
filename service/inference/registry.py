"""The model registry: which models the service can run, read from ``models/<name>/card.json``.

Why verify at load: a card describes one exact ONNX file (sha256, size). A model file swapped or truncated
after export would otherwise serve findings under a card that is not its own, and every result names the
model's sha256. One bad model must not take the others down, so each failure is recorded with a reason a
person can act on (``/v1/models`` shows it) and loading goes on.

The card is then checked against what the graph declares (:mod:`service.inference.cardcheck`: input
name, shape, channels, outputs, label columns, opset, placeholders of a draft card) before the engine opens
a session and warms it up. Whether the graph itself runs is only known when ONNX Runtime opens it; the
engine does that and reports failures back through :meth:`ModelRegistry.mark_failed`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from service.errors import GraphError, ModelLoadError
from service.inference.card import ModelCard, sha256_file
from service.inference.cardcheck import contradictions
from service.inference.graph import read_graph

__all__ = ["CARD_FILE", "LoadedModel", "ModelRegistry", "load_model"]

logger = logging.getLogger(__name__)

CARD_FILE = "card.json"


@dataclass(frozen=True)
class LoadedModel:
    """A model whose card parsed and whose ONNX file matches the card's sha256 and size."""

    card: ModelCard
    onnx_path: Path

    @property
    def name(self) -> str:
        return self.card.name


@dataclass
class ModelRegistry:
    """Models that loaded (``models``) and those that did not, with why (``errors``), both by name.

    A name is in at most one of the two dicts.
    """

    models: dict[str, LoadedModel] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_directory(cls, models_dir: Path) -> ModelRegistry:
        """Load every ``models_dir/*/card.json``; failures go to ``errors`` and are logged.

        Parameters
        ----------
        models_dir
            Folder with one subfolder per model. A missing folder gives an empty registry with an error
            under the key ``"*"``, so a misconfigured path shows on ``/v1/models`` instead of silence.
        """
        registry = cls()
        if not models_dir.is_dir():
            registry.errors["*"] = f"models directory {models_dir} does not exist"
            logger.error("models directory %s does not exist: no models loaded", models_dir)
            return registry
        for card_path in sorted(models_dir.glob(f"*/{CARD_FILE}")):
            folder = card_path.parent.name
            try:
                model = load_model(card_path)
            except ModelLoadError as exc:
                registry.mark_failed(folder, str(exc))
                continue
            if model.name in registry.models:
                registry.mark_failed(model.name, f"duplicate model name (also in folder {folder})")
                continue
            registry.models[model.name] = model
            logger.info(
                "model %s %s loaded (sha256 %s…)", model.name, model.card.version, model.card.sha256[:12]
            )
        if not registry.models:
            logger.warning("no usable models in %s", models_dir)
        return registry

    def mark_failed(self, name: str, reason: str) -> None:
        """Move ``name`` from ``models`` (if there) to ``errors`` and log ``reason``."""
        self.models.pop(name, None)
        self.errors[name] = reason
        logger.error("model %s not available: %s", name, reason)

    def get(self, name: str) -> LoadedModel | None:
        return self.models.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self.models

    def __len__(self) -> int:
        return len(self.models)


def load_model(card_path: Path) -> LoadedModel:
    """One model folder's card, file and graph checked; raises :class:`ModelLoadError` saying why not."""
    try:
        card = ModelCard.read(card_path)
    except ValidationError as exc:
        errors = [f"{'.'.join(str(p) for p in err['loc']) or 'card'}: {err['msg']}" for err in exc.errors()]
        raise ModelLoadError(f"invalid {CARD_FILE}: {'; '.join(errors[:5])}", errors) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"cannot read {CARD_FILE}: {exc}") from exc
    if card.name != card_path.parent.name:
        raise ModelLoadError(f"card name {card.name!r} does not match its folder {card_path.parent.name!r}")
    onnx_path = card_path.parent / card.file
    if onnx_path.parent != card_path.parent or not onnx_path.is_file():
        raise ModelLoadError(f"model file {card.file!r} missing from {card_path.parent.name}/")
    size = onnx_path.stat().st_size
    if size != card.size_bytes:
        raise ModelLoadError(
            f"model file is {size} bytes, card says {card.size_bytes}: file changed since export"
        )
    digest = sha256_file(onnx_path)
    if digest != card.sha256:
        raise ModelLoadError(
            f"sha256 mismatch: file {digest[:12]}…, card {card.sha256[:12]}…: file changed since export"
        )
    try:
        graph = read_graph(onnx_path)
    except GraphError as exc:
        raise ModelLoadError(f"{card.file}: {exc}") from exc
    problems = contradictions(card, graph)
    if problems:
        raise ModelLoadError(
            f"card contradicts the model ({len(problems)}): " + "; ".join(problems), problems
        )
    return LoadedModel(card=card, onnx_path=onnx_path)
