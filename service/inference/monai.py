"""A draft card from a MONAI bundle (``pacs-triage models init --monai-bundle DIR``), as far as it goes.

A MONAI bundle (MONAI Bundle Specification, docs.monai.io ``mb_specification``) is a folder with
``configs/metadata.json``, ``models/model.pt`` and optionally ``models/model.onnx``, a ``LICENSE`` and
``docs/``. What the service can take from it: the ONNX export, the version, description, intended use,
authors, references, license, evaluation metrics and data source of ``metadata.json``, and from its
``network_data_format``: the input's channels and 2-D spatial shape and the output's classes
(``channel_def``), which name the labels.

What it cannot take, said on every import (:data:`NOT_EXPRESSED`): the bundle's pre- and post-processing
are MONAI transform chains in ``configs/inference.json`` (``LoadImaged``, ``ScaleIntensityd``,
``Resized``, ``Activationsd``...), code the service does not run. The card gets the standard DICOM grayscale
pipeline instead, and a placeholder that ``models check`` refuses until a person has compared the two.
3-D inputs (volumes), patch-based inputs and segmentation outputs are refused outright.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from service.errors import DraftError
from service.inference.card import ModelCard
from service.inference.cardcheck import PLACEHOLDER

__all__ = ["METADATA", "NOT_EXPRESSED", "ONNX_EXPORT", "apply_bundle", "read_metadata"]

METADATA = Path("configs/metadata.json")
ONNX_EXPORT = Path("models/model.onnx")

NOT_EXPRESSED = (
    "the bundle's pre-processing (configs/inference.json transforms) is not read: the card uses the standard "
    "DICOM grayscale pipeline, window from the image, scaled to [0, 1], mean 0, std 1; compare and adjust "
    "preprocessing (size, window, mean/std) by hand"
)
"""What an import cannot carry over; printed, and left as a placeholder in ``training``."""


def read_metadata(bundle: Path) -> dict[str, Any]:
    """``configs/metadata.json`` of ``bundle``; :class:`DraftError` if missing or not a JSON object."""
    path = bundle / METADATA
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DraftError(f"{bundle} is not a MONAI bundle: no {METADATA}") from None
    except (OSError, ValueError) as exc:
        raise DraftError(f"{path}: cannot read it as JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise DraftError(f"{path}: not a JSON object")
    return data


def _first(section: Any, what: str) -> dict[str, Any]:
    if not isinstance(section, dict) or not section:
        raise DraftError(f"metadata.json network_data_format has no {what}")
    value = next(iter(section.values()))
    if not isinstance(value, dict):
        raise DraftError(f"metadata.json network_data_format {what} entry is not an object")
    return value


def _license(bundle: Path, metadata: dict[str, Any]) -> str | None:
    if isinstance(metadata.get("license"), str):
        return str(metadata["license"])
    path = bundle / "LICENSE"
    if not path.is_file():
        return None
    lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    first = next((line for line in lines if line), "")
    return f"{first[:120]} (bundle LICENSE file)" if first else None


def _labels(card: ModelCard, output: dict[str, Any]) -> list[Any]:
    """Label names from the output's ``channel_def`` for the columns the draft reads."""
    names = output.get("channel_def") or {}
    labels = []
    for column, label in zip(card.label_columns(), card.labels, strict=True):
        name = names.get(str(column)) if isinstance(names, dict) else None
        labels.append(label.model_copy(update={"name": str(name)}) if name else label)
    return labels


def apply_bundle(card: ModelCard, bundle: Path, metadata: dict[str, Any]) -> ModelCard:
    """The draft ``card`` (from the bundle's ONNX graph) with what ``metadata`` says filled in."""
    formats = metadata.get("network_data_format") or {}
    image = _first(formats.get("inputs"), "inputs")
    output = _first(formats.get("outputs"), "outputs")
    if image.get("is_patch_data"):
        raise DraftError("the bundle's input is patch data (sliding window): the service feeds whole images")
    shape = image.get("spatial_shape") or []
    if len(shape) != 2:
        raise DraftError(f"the bundle's input has spatial shape {shape}: the service feeds 2-D images")
    if str(output.get("format", "")).lower() == "segmentation":
        raise DraftError("the bundle outputs a segmentation: the service serves classifiers and detectors")
    channels = image.get("num_channels")
    if channels is not None and channels != card.preprocessing.channels:
        raise DraftError(
            f"metadata.json says {channels} input channel(s); "
            f"the ONNX graph takes {card.preprocessing.channels}"
        )
    spec = card.preprocessing
    if all(isinstance(s, int) and s > 0 for s in shape) and [spec.height, spec.width] != list(shape):
        raise DraftError(
            f"metadata.json spatial_shape {shape} differs from the ONNX input {spec.height} x {spec.width}"
        )
    authors = metadata.get("authors") or metadata.get("authorship")
    references = metadata.get("references") or []
    training = {
        "source": str(metadata.get("data_source") or f"{PLACEHOLDER}: where and on what data it was trained"),
        "data_type": metadata.get("data_type"),
        "monai_bundle": metadata.get("name") or bundle.name,
        "monai_version": metadata.get("monai_version"),
        "pytorch_version": metadata.get("pytorch_version"),
        "preprocessing_check": f"{PLACEHOLDER}: {NOT_EXPRESSED}",
    }
    updates: dict[str, Any] = {
        "version": str(metadata.get("version") or card.version),
        "description": " - ".join(str(metadata[k]) for k in ("task", "description") if metadata.get(k))
        or card.description,
        "intended_use": str(metadata.get("intended_use") or card.intended_use),
        "authors": [authors] if isinstance(authors, str) else list(authors or []),
        "references": [references] if isinstance(references, str) else [str(r) for r in references],
        "license": _license(bundle, metadata),
        "metrics": dict(metadata.get("eval_metrics") or {}),
        "labels": _labels(card, output),
        "training": {k: v for k, v in training.items() if v is not None},
    }
    return ModelCard.model_validate({**card.model_dump(), **updates})
