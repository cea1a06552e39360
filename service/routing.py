"""Which models look at which series, from YAML rules plus each model card's eligibility gate.

A version 2 card's eligibility (modalities, body parts, description keywords) is a route of its own: a
model dropped into ``models/`` runs without a YAML edit. The YAML rules stay as the site's overrides: they
add models to series (every card version) and ``disabled`` switches models off whatever their card says.

A series is never dropped silently: a series no rule matches, a model that is not loaded, a colour image,
too few slices or a non-image SOP class each become a :class:`NotAnalysed` entry whose reason starts with
``"not analysed: "``, so a radiologist reading the result knows what the AI did not look at.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydicom.uid import UID

from service.inference.card import ModelCard
from service.results.schema import NotAnalysed

__all__ = ["Route", "RoutingRule", "RoutingRules", "SeriesInfo", "load_rules", "route_series", "shadows"]

logger = logging.getLogger(__name__)


class RoutingRule(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    modalities: list[str] = Field(min_length=1)
    body_parts: list[str] = Field(default_factory=list)
    keywords: list[str] = Field(default_factory=list, description="description words if no body part")
    sop_classes: list[str] = Field(default_factory=list)
    models: list[str] = Field(min_length=1)

    def matches(self, series: SeriesInfo) -> bool:
        if self.sop_classes and series.sop_class_uid not in self.sop_classes:
            return False
        return _describes(series, self.modalities, self.body_parts, self.keywords)


def _describes(series: SeriesInfo, modalities: list[str], body_parts: list[str], keywords: list[str]) -> bool:
    """Modality in ``modalities``; then BodyPartExamined in ``body_parts`` or, without one, a keyword as a
    word of the descriptions (neither list given: any body part)."""
    if (series.modality or "").upper() not in {m.upper() for m in modalities}:
        return False
    if not body_parts and not keywords:
        return True
    if series.body_part:
        return series.body_part.strip().upper() in {b.upper() for b in body_parts}
    words = set(re.findall(r"[a-z0-9]+", " ".join(series.descriptions).lower()))
    return any(k.lower() in words for k in keywords)


class RoutingRules(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    rules: list[RoutingRule]
    disabled: list[str] = Field(
        default_factory=list,
        description="models this site does not run, whatever a rule or a version 2 card's eligibility says",
    )


def load_rules(path: Path) -> RoutingRules:
    """Read and validate a rules file (see ``service/routing_rules.yaml``)."""
    return RoutingRules.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))


@dataclass(frozen=True)
class SeriesInfo:
    """What routing needs to know about one series, taken from its first instance."""

    series_uid: str
    modality: str | None
    body_part: str | None
    descriptions: tuple[str, ...]
    sop_class_uid: str
    samples_per_pixel: int
    photometric: str
    n_instances: int


@dataclass(frozen=True)
class Route:
    series_uid: str
    model: str


def _is_image_sop_class(uid: str) -> bool:
    """Known SOP classes whose name says image storage; unknown (private) ones get the benefit of doubt."""
    name = UID(uid).name
    if name == uid:  # not in pydicom's dictionary
        return True
    return "Image" in name or "Secondary Capture" in name


def shadows(cards: Mapping[str, ModelCard], rules: RoutingRules) -> dict[str, list[str]]:
    """Primary model → the loaded models that run in its shadow (card ``shadow_of``), less disabled ones."""
    found: dict[str, list[str]] = {}
    for name, card in sorted(cards.items()):
        if card.shadow_of and name not in rules.disabled:
            found.setdefault(card.shadow_of, []).append(name)
    return found


def route_series(
    series: SeriesInfo,
    rules: RoutingRules,
    cards: Mapping[str, ModelCard],
    load_errors: Mapping[str, str] | None = None,
) -> tuple[list[Route], list[NotAnalysed]]:
    """Routes for one series and the reasons for everything that will not run on it."""
    load_errors = load_errors or {}

    def skip(reason: str, model: str | None = None) -> NotAnalysed:
        return NotAnalysed(series_uid=series.series_uid, model=model, reason=f"not analysed: {reason}")

    if not _is_image_sop_class(series.sop_class_uid):
        return [], [skip(f"SOP class {UID(series.sop_class_uid).name} is not an image")]
    models: list[str] = []
    for rule in rules.rules:
        if rule.matches(series):
            models.extend(m for m in rule.models if m not in models)
    for name, candidate in sorted(cards.items()):  # a version 2 card's eligibility routes on its own
        elig = candidate.eligibility
        if candidate.card_version >= 2 and name not in models:
            if _describes(series, elig.modalities, elig.body_parts, elig.keywords):
                models.append(name)
    # a shadow model never routes on its own: it runs beside its primary (service.analyse)
    models = [m for m in models if m not in rules.disabled and not (m in cards and cards[m].shadow_of)]
    if not models:
        what = series.body_part or "/".join(series.descriptions) or "unknown body part"
        return [], [skip(f"no routing rule for modality {series.modality or 'unknown'}, {what}")]

    routes: list[Route] = []
    skipped: list[NotAnalysed] = []
    colour = series.samples_per_pixel != 1 or series.photometric not in ("MONOCHROME1", "MONOCHROME2")
    for name in models:
        card = cards.get(name)
        if card is None:
            why = load_errors.get(name)
            skipped.append(skip(f"model {name} is not loaded" + (f" ({why})" if why else ""), name))
            continue
        elig = card.eligibility
        if (series.modality or "").upper() not in {m.upper() for m in elig.modalities}:
            skipped.append(skip(f"model {name} does not take modality {series.modality}", name))
        elif colour:
            skipped.append(
                skip(
                    f"colour image ({series.photometric or 'unknown'}, {series.samples_per_pixel} samples); "
                    f"model {name} takes grayscale images only",
                    name,
                )
            )
        elif series.n_instances < elig.min_slices:
            skipped.append(
                skip(
                    f"series has {series.n_instances} instance(s), model {name} needs at least "
                    f"{elig.min_slices}",
                    name,
                )
            )
        else:
            routes.append(Route(series.series_uid, name))
    return routes, skipped
