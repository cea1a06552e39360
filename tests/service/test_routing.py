"""Routing rules and eligibility: every series gets models or a "not analysed: <reason>"."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.inference.card import Eligibility, ModelCard
from service.routing import RoutingRules, SeriesInfo, load_rules, route_series, shadows

RULES = load_rules(Path(__file__).resolve().parents[2] / "service" / "routing_rules.yaml")


@pytest.fixture(scope="module")
def cards(tiny_models_dir: Path) -> dict[str, ModelCard]:
    return {p.parent.name: ModelCard.read(p) for p in tiny_models_dir.glob("*/card.json")}


def series(**kw: object) -> SeriesInfo:
    base: dict[str, object] = {
        "series_uid": "1.2.3",
        "modality": "CR",
        "body_part": "CHEST",
        "descriptions": (),
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1",
        "samples_per_pixel": 1,
        "photometric": "MONOCHROME2",
        "n_instances": 1,
    }
    base.update(kw)
    return SeriesInfo(**base)  # type: ignore[arg-type]


def test_chest_goes_to_both_chest_models(cards) -> None:
    routes, skipped = route_series(series(body_part="chest"), RULES, cards)
    assert [r.model for r in routes] == ["cxr-pneumothorax", "cxr-nodule"]
    assert skipped == []


def test_head_ct(cards) -> None:
    routes, _ = route_series(series(modality="CT", body_part="HEAD", n_instances=30), RULES, cards)
    assert [r.model for r in routes] == ["ct-hemorrhage"]


def test_description_fallback_only_without_body_part(cards) -> None:
    routes, _ = route_series(
        series(body_part=None, descriptions=("CT HEAD W/O",), modality="CT"), RULES, cards
    )
    assert [r.model for r in routes] == ["ct-hemorrhage"]
    routes, skipped = route_series(series(body_part="KNEE", descriptions=("chest",)), RULES, cards)
    assert routes == [] and skipped[0].reason.startswith("not analysed: no routing rule")


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"modality": "MR"}, "no routing rule for modality MR"),
        ({"sop_class_uid": "1.2.840.10008.5.1.4.1.1.88.22"}, "is not an image"),
        ({"photometric": "RGB", "samples_per_pixel": 3}, "colour image (RGB"),
    ],
)
def test_not_analysed_reasons(cards, kw, needle) -> None:
    routes, skipped = route_series(series(**kw), RULES, cards)
    assert routes == []
    assert skipped and all(s.reason.startswith("not analysed: ") for s in skipped)
    assert needle in skipped[0].reason


def test_missing_model_and_min_slices(cards) -> None:
    ct = cards["ct-hemorrhage"]
    strict = ct.model_copy(
        update={"eligibility": Eligibility(modalities=["CT"], body_parts=["HEAD"], min_slices=10)}
    )
    routes, skipped = route_series(
        series(modality="CT", body_part="HEAD", n_instances=3), RULES, {"ct-hemorrhage": strict}
    )
    assert routes == []
    assert (
        skipped[0].reason == "not analysed: series has 3 instance(s), model ct-hemorrhage needs at least 10"
    )
    routes, skipped = route_series(series(), RULES, {}, {"cxr-nodule": "sha256 mismatch"})
    assert [s.model for s in skipped] == ["cxr-pneumothorax", "cxr-nodule"]
    assert skipped[1].reason == "not analysed: model cxr-nodule is not loaded (sha256 mismatch)"


class TestCardEligibilityRoutes:
    """A version 2 card routes by its eligibility alone; YAML rules stay the site's overrides."""

    @pytest.fixture
    def v2(self, cards: dict[str, ModelCard]) -> dict[str, ModelCard]:
        elig = Eligibility(modalities=["CR"], body_parts=["CHEST"], keywords=["chest"])
        foreign = cards["cxr-pneumothorax"].model_copy(
            update={"name": "cxr-foreign", "card_version": 2, "eligibility": elig}
        )
        return {**cards, "cxr-foreign": foreign}

    def test_no_yaml_rule_needed(self, v2) -> None:
        routes, skipped = route_series(series(), RULES, v2)
        assert [r.model for r in routes] == ["cxr-pneumothorax", "cxr-nodule", "cxr-foreign"]
        routes, _ = route_series(series(body_part=None, descriptions=("CHEST PA",)), RULES, v2)
        assert "cxr-foreign" in [r.model for r in routes]
        routes, _ = route_series(series(modality="DX"), RULES, v2)  # DX: not in its card
        assert "cxr-foreign" not in [r.model for r in routes]

    def test_version_1_cards_still_need_a_rule(self, cards) -> None:
        only_ct = RoutingRules(rules=[r for r in RULES.rules if r.name == "head-ct"])
        routes, skipped = route_series(series(), only_ct, cards)
        assert routes == [] and skipped[0].reason.startswith("not analysed: no routing rule")

    def test_site_disables_a_model(self, v2) -> None:
        rules = RoutingRules(rules=RULES.rules, disabled=["cxr-foreign", "cxr-nodule"])
        routes, _ = route_series(series(), rules, v2)
        assert [r.model for r in routes] == ["cxr-pneumothorax"]


def test_a_shadow_model_never_routes_on_its_own(cards) -> None:
    """Shadow mode (card shadow_of): listed by a rule or eligible by its card, it still gets no route;
    service.analyse runs it beside its primary."""
    shadow = cards["cxr-pneumothorax"].model_copy(
        update={"name": "cxr-next", "card_version": 2, "shadow_of": "cxr-pneumothorax"}
    )
    with_shadow = {**cards, "cxr-next": shadow}
    rules = RoutingRules(
        rules=[r.model_copy(update={"models": [*r.models, "cxr-next"]}) for r in RULES.rules]
    )
    routes, skipped = route_series(series(), rules, with_shadow)
    assert [r.model for r in routes] == ["cxr-pneumothorax", "cxr-nodule"] and skipped == []
    assert shadows(with_shadow, rules) == {"cxr-pneumothorax": ["cxr-next"]}
    assert shadows(with_shadow, RoutingRules(rules=rules.rules, disabled=["cxr-next"])) == {}
