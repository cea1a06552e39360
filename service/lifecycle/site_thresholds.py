"""The site-thresholds file: per-site operating points that replace a card's label thresholds at start,
without ever editing the shipped card.

Why a file of its own (``site_thresholds``, default ``<data_dir>/site-thresholds.yaml``): the card is
the model developer's artefact, checked against its sha256 and shipped with the model; a site's choice of
operating point is the site's, written by ``pacs-triage models calibrate``
(:mod:`service.lifecycle.calibrate`) or by hand, and kept with the site's data. Each entry names the model
file it was calibrated on (sha256): after a model update the old threshold no longer means anything, so it
is not applied (a warning says so) and the card's threshold holds until the site calibrates again.

Format (YAML)::

    cxr-pneumothorax:
      sha256: 5f0c...        # the model file the threshold was chosen for
      labels:
        pneumothorax:
          threshold: 0.41
          rule: "site calibration: sensitivity >= 0.95 on 212 positive studies (2026-12-03)"
          ...                # the calibration report: intervals, counts, the labels file's sha256

A file that cannot be read, or an entry without a threshold in [0, 1] for a label of the model, stops the
start with a message naming it, as a bad tokens file does: a site that set an operating point must not run
silently at another one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from service.errors import SiteThresholdsError
from service.inference.registry import ModelRegistry

__all__ = ["apply_site_thresholds", "read_site_thresholds", "write_site_threshold"]

logger = logging.getLogger(__name__)

HEADER = "# per-site thresholds (pacs-triage models calibrate); the shipped cards are not edited\n"


def read_site_thresholds(path: Path) -> dict[str, Any]:
    """The file's mapping; empty when the file does not exist."""
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SiteThresholdsError(f"{path}: cannot be read ({exc})") from exc
    if not isinstance(data, dict):
        raise SiteThresholdsError(f"{path}: must hold a mapping of model names")
    return data


def write_site_threshold(path: Path, model: str, sha256: str, label: str, entry: dict[str, Any]) -> None:
    """Set one label's entry, keeping the others; written to a temporary file, fsynced, renamed over the
    old one and the folder fsynced, so a crash leaves the old file or the new one, never half of one."""
    data = read_site_thresholds(path)
    current = data.get(model) if isinstance(data.get(model), dict) else None
    if current is None or current.get("sha256") != sha256:
        current = {"sha256": sha256, "labels": {}}  # entries for another model file mean nothing now
    current.setdefault("labels", {})[label] = entry
    data[model] = current
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".site-thresholds.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(HEADER)
            yaml.safe_dump(data, fh, sort_keys=True, allow_unicode=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _threshold(path: Path, model: str, label: str, entry: Any) -> tuple[float, str]:
    value = entry.get("threshold") if isinstance(entry, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise SiteThresholdsError(f"{path}: {model}/{label} needs a threshold between 0 and 1")
    rule = entry.get("rule") or "site threshold"
    return float(value), f"{rule} (site override of the card's threshold)"


def apply_site_thresholds(registry: ModelRegistry, path: Path) -> list[str]:
    """Replace the label thresholds of loaded models by the file's entries for their model file; returns
    ``model/label`` of those applied. Raises :class:`SiteThresholdsError` for a malformed entry."""
    applied: list[str] = []
    for model, spec in read_site_thresholds(path).items():
        if not isinstance(spec, dict) or not isinstance(spec.get("labels"), dict):
            raise SiteThresholdsError(f"{path}: {model} needs sha256 and a mapping of labels")
        loaded = registry.models.get(str(model))
        if loaded is None:
            logger.warning("site threshold for %s not applied: no such model is loaded", model)
            continue
        if spec.get("sha256") != loaded.card.sha256:
            logger.warning(
                "site thresholds for %s not applied: calibrated on another model file (sha256 %s…, loaded "
                "%s…); the card's thresholds hold until it is calibrated again",
                model,
                str(spec.get("sha256"))[:12],
                loaded.card.sha256[:12],
            )
            continue
        names = {label.name for label in loaded.card.labels}
        overrides = {}
        for label, entry in spec["labels"].items():
            if label not in names:
                raise SiteThresholdsError(f"{path}: {model} has no label {label!r}")
            overrides[label] = _threshold(path, str(model), label, entry)
        fields = ("threshold", "threshold_rule")
        labels = [
            lab.model_copy(update=dict(zip(fields, overrides[lab.name], strict=True)))
            if lab.name in overrides
            else lab
            for lab in loaded.card.labels
        ]
        card = loaded.card.model_copy(update={"labels": labels})
        registry.models[str(model)] = dataclasses.replace(loaded, card=card)
        for label in overrides:
            applied.append(f"{model}/{label}")
            logger.info(
                "site threshold applied: %s/%s %.4g (card: %.4g)",
                model,
                label,
                overrides[label][0],
                next(lab.threshold for lab in loaded.card.labels if lab.name == label),
            )
    return applied
