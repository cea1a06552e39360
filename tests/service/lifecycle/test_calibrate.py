"""Per-site threshold calibration: the threshold for a target sensitivity and its intervals, the labels CSV,
and ``pacs-triage models calibrate`` on stored studies whose site override the service then applies."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from pydicom.uid import generate_uid

from service.__main__ import main
from service.config import Settings
from service.errors import LabelsError, SiteThresholdsError
from service.inference.registry import ModelRegistry
from service.lifecycle.calibrate import calibrate, read_labels, wilson
from service.lifecycle.site_thresholds import apply_site_thresholds, write_site_threshold
from tests.service.conftest import running_app
from tests.service.dicom_factory import make_dataset as dataset
from tests.service.dicom_factory import to_bytes

DICOM = {"Content-Type": "application/dicom", "Prefer": "wait=10"}
PTX = "cxr-pneumothorax"


def test_wilson_matches_the_published_interval() -> None:
    """18 of 20 at 95 %: 0.699 to 0.972 (Brown, Cai & DasGupta 2001, Wilson score interval)."""
    low, high = wilson(18, 20, 1.959964)
    assert (round(low, 3), round(high, 3)) == (0.699, 0.972)
    assert wilson(0, 0, 1.96) == (0.0, 1.0)


def test_the_threshold_reaches_the_target_sensitivity() -> None:
    positives = [i / 20 for i in range(1, 21)]  # 0.05 .. 1.00
    negatives = [0.02, 0.1, 0.2, 0.3]
    c = calibrate(positives, negatives, 0.9)
    assert c.threshold == 0.15  # the 18th highest of 20 positives: 18 / 20 = 0.9
    assert c.sensitivity == 0.9 and c.specificity == 0.5
    assert c.sensitivity_ci == wilson(18, 20, 1.959963984540054)
    assert c.threshold_ci[0] <= c.threshold <= c.threshold_ci[1]
    assert calibrate(positives, negatives, 0.9) == c  # the bootstrap has a fixed seed
    assert calibrate(positives, [], 0.5).specificity is None
    with pytest.raises(ValueError, match="no positive study"):
        calibrate([], negatives, 0.9)


def test_a_larger_sample_narrows_the_threshold_interval() -> None:
    rng = np.random.default_rng(0)
    small = calibrate(list(rng.beta(5, 2, 30)), [], 0.9)
    large = calibrate(list(rng.beta(5, 2, 600)), [], 0.9)
    assert large.threshold_ci[1] - large.threshold_ci[0] < small.threshold_ci[1] - small.threshold_ci[0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("uid,truth\n1.2,1\n", "needs a header with study_uid"),
        ("study_uid,positive\n1.2,maybe\n", "line 2: needs a study UID and positive"),
        ("study_uid,positive\n1.2,1\n1.2,0\n", "line 3: study 1.2 is labelled both"),
    ],
)
def test_bad_labels_are_refused_naming_the_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(text)
    with pytest.raises(LabelsError, match=message):
        read_labels(path, "pneumothorax")


def test_labels_of_other_findings_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("StudyInstanceUID,label,positive\n1.2,pneumothorax,yes\n1.3,nodule,1\n1.4,,no\n")
    assert read_labels(path, "pneumothorax") == {"1.2": True, "1.4": False}


def radiograph(study_uid: str, bright: bool) -> bytes:
    """Mostly bright (the tiny classifier says positive, p ~ 0.87) or mostly dark (p ~ 0.13)."""
    pixels = np.full((64, 64), 4000 if bright else 0, dtype=np.uint16)
    pixels[:8, :8] = 0 if bright else 4000
    return to_bytes(dataset(study_uid=study_uid, pixels=pixels))


@pytest.mark.anyio
async def test_calibrate_on_stored_studies_and_the_service_applies_it(
    make_settings: Any,
    tiny_models_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings: Settings = make_settings()
    card_bytes = (tiny_models_dir / PTX / "card.json").read_bytes()
    # three bright positives, one dark positive the card's threshold misses, two dark negatives
    studies = {generate_uid(): (bright, truth) for bright, truth in [(1, 1)] * 3 + [(0, 1)] + [(0, 0)] * 2}
    async with running_app(settings) as (_app, client):
        for uid, (bright, _) in studies.items():
            r = await client.post("/v1/studies", content=radiograph(uid, bool(bright)), headers=DICOM)
            assert r.status_code == 200, r.text
        (dark,) = [f for f in r.json()["findings"] if f["model"] == PTX]
        assert not dark["positive"] and dark["threshold"] > dark["probability"]
    labels = tmp_path / "labels.csv"
    rows = "".join(f"{uid},{truth}\n" for uid, (_, truth) in studies.items())
    labels.write_text(f"study_uid,positive\n{rows}{generate_uid()},1\n")  # one study never stored

    monkeypatch.setenv("PACS_TRIAGE_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("PACS_TRIAGE_MODELS_DIR", str(tiny_models_dir))
    argv = ["models", "calibrate", PTX, "--labels", str(labels), "--sensitivity", "0.9"]
    assert main(argv) == 1  # 4 positives: fewer than the default --min-positives
    assert "refused: 4 positive studies" in capsys.readouterr().out
    assert main([*argv, "--min-positives", "4"]) == 0
    out = capsys.readouterr().out
    assert "7 labelled studies: 4 positive and 2 negative" in out and "1 without one, not counted" in out
    assert "(percentile bootstrap, 2000 replicates of the positive studies)" in out
    assert "sensitivity 1.000, 95% CI 0.510 - 1.000 (Wilson)" in out
    assert "specificity 0.000" in out
    entry = yaml.safe_load(settings.site_thresholds_path.read_text())[PTX]
    assert entry["sha256"] == hashlib.sha256((tiny_models_dir / PTX / "model.onnx").read_bytes()).hexdigest()
    chosen = entry["labels"]["pneumothorax"]
    assert chosen["threshold"] == pytest.approx(dark["probability"], abs=1e-6)
    assert chosen["positives"] == 4 and chosen["threshold_ci_bootstrap"][0] <= chosen["threshold"]
    assert (tiny_models_dir / PTX / "card.json").read_bytes() == card_bytes  # the card is never edited

    async with running_app(settings) as (_app, client):
        r = await client.post("/v1/studies", content=radiograph(generate_uid(), False), headers=DICOM)
        models = (await client.get("/v1/models")).json()["models"]
    (finding,) = [f for f in r.json()["findings"] if f["model"] == PTX]
    assert finding["positive"] and finding["threshold"] == chosen["threshold"]
    (shown,) = [m for m in models if m["name"] == PTX]
    (label,) = shown["labels"]
    assert label["threshold"] == chosen["threshold"]
    assert label["threshold_rule"].endswith(
        "on 4 positive studies (" + chosen["calibrated_at"][:10] + ") (site override of the card's threshold)"
    )


def test_an_override_for_another_model_file_is_not_applied(
    tiny_models_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "site-thresholds.yaml"
    write_site_threshold(path, PTX, "0" * 64, "pneumothorax", {"threshold": 0.2})
    registry = ModelRegistry.from_directory(tiny_models_dir)
    card = registry.models[PTX].card
    with caplog.at_level(logging.WARNING):
        assert apply_site_thresholds(registry, path) == []
    assert registry.models[PTX].card == card
    assert f"site thresholds for {PTX} not applied: calibrated on another model file" in caplog.text
    assert apply_site_thresholds(registry, tmp_path / "absent.yaml") == []


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"nodule": {"threshold": 0.2}}, "has no label 'nodule'"),
        ({"pneumothorax": {"threshold": 2}}, "between"),
    ],
)
def test_a_malformed_override_stops_the_start(
    tiny_models_dir: Path, tmp_path: Path, entry: dict[str, Any], message: str
) -> None:
    registry = ModelRegistry.from_directory(tiny_models_dir)
    path = tmp_path / "site-thresholds.yaml"
    path.write_text(yaml.safe_dump({PTX: {"sha256": registry.models[PTX].card.sha256, "labels": entry}}))
    with pytest.raises(SiteThresholdsError, match=message):
        apply_site_thresholds(registry, path)
    path.write_text("- a list\n")
    with pytest.raises(SiteThresholdsError, match="must hold a mapping"):
        apply_site_thresholds(registry, path)
