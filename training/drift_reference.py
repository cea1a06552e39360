"""The card's drift reference: what the service's drift monitor compares a site's latest studies with.

Why at export: a reference taken from the first studies after start (the monitor's fallback) describes
whatever the site happened to send first, possibly already unlike the validated domain, and is lost at every
restart. The card's reference describes the series the model was validated on, so the alarm means "these
studies are not like those the model was measured on" (issue 17 item 5).

How: each held-out in-domain series goes through the serving path exactly as
:mod:`service.analyse` runs it: :func:`service.inference.preprocess.preprocess_dataset`, the ONNX model in
ONNX Runtime, then :func:`service.inference.domain.judge_series` (the input-domain gate, the findings of
the images it keeps and the drift summary), so each value is the one the service would compute for that
series. The card stores the raw values per series (:class:`service.inference.card.DriftReference`); the
monitor bins them as it bins any reference.

The score features follow the generator's prevalence, not a hospital's: a site with fewer positives moves
``score:<label>`` even when its images are in domain. The source string says so; the input features
(manufacturer, spacing, window, size, mean intensity) are the ones to read first.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from service.inference.card import DriftReference, ModelCard
from service.inference.domain import judge_series
from service.inference.postprocess import ModelImage
from service.inference.preprocess import preprocess_dataset

__all__ = ["drift_reference", "ship_drift_reference"]

log = logging.getLogger(__name__)


def _series_features(card: ModelCard, session: Any, datasets: Sequence[Dataset]) -> dict[str, Any]:
    """One series (datasets in model order) through the serving path: its drift features."""
    from training.export import ort_predict

    arrays = [preprocess_dataset(ds, card.preprocessing) for ds in datasets]
    images = [ModelImage(str(ds.SOPInstanceUID), a) for ds, a in zip(datasets, arrays, strict=True)]
    batch = np.concatenate([a.array for a in arrays])
    outputs = ort_predict(session, batch)
    judged = judge_series(card, str(datasets[0].SeriesInstanceUID), images, batch, outputs, datasets[0])
    return judged.summary.features()


def drift_reference(
    card: ModelCard, session: Any, series: Sequence[Sequence[Dataset]], source: str
) -> DriftReference:
    """The reference of ``card``'s model on ``series`` (each in model order: slice order for a CT).

    Every feature seen on any series gets one value per series (None where that series had none: a label
    the model did not report there, an absent header)."""
    rows = [_series_features(card, session, datasets) for datasets in series]
    if not rows:
        raise ValueError("a drift reference needs at least one series")
    names = sorted({name for row in rows for name in row})
    features = {name: [_json_value(row.get(name)) for row in rows] for name in names}
    return DriftReference(source=source, series=len(rows), features=features)


def _json_value(value: Any) -> float | str | None:
    """A value as the card stores it (JSON numbers as Python floats, so a reread card bins the same)."""
    if value is None or isinstance(value, str):
        return value
    return float(value)


def ship_drift_reference(model_dir: Path, series: Sequence[Sequence[Dataset]], source: str) -> ModelCard:
    """Compute ``model_dir``'s drift reference on ``series`` and write it into card.json and card.md.

    The ONNX file is not touched, so the card's sha256 stays valid."""
    from training.export import ort_session, write_card_md

    card = ModelCard.read(model_dir / "card.json")
    reference = drift_reference(card, ort_session(model_dir / card.file), series, source)
    final = card.model_copy(update={"drift_reference": reference})
    final.write(model_dir / "card.json")
    write_card_md(final, model_dir, sorted(model_dir.glob("*.png")))
    log.info(
        "%s: drift reference of %d series, features %s",
        card.name,
        reference.series,
        sorted(reference.features),
    )
    return final
