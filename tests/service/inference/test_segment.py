"""Segmentation in the analysis: it runs only on series the classifier flags, and the segment's volume and
diameter are those of the painted blood (a tiny ONNX model through the real engine)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid

import service.analyse
from service.analyse import Flagged, analyse_study
from service.inference.engine import InferenceEngine
from service.inference.registry import ModelRegistry
from service.results.build import Analysis
from service.results.quantify import decode_mask
from service.routing import load_rules
from service.store.instances import InstanceRecord
from tests.fixtures.tiny_models import write_tiny_model
from tests.fixtures.tiny_seg_model import write_tiny_seg_model
from tests.service.dicom_factory import make_dataset

pytestmark = pytest.mark.anyio

RULES = load_rules(Path(__file__).resolve().parents[3] / "service" / "routing_rules.yaml")
BLOOD = (slice(20, 30), slice(10, 16))  # 10 rows x 6 columns on two slices


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[InferenceEngine]:
    write_tiny_model(tmp_path, "ct-hemorrhage", "series_classification")
    write_tiny_seg_model(tmp_path)
    eng = InferenceEngine(ModelRegistry.from_directory(tmp_path), providers="cpu")
    await eng.start()
    yield eng
    await eng.stop()


def series(
    background_hu: float, blood_slices: tuple[int, ...] = (3, 4), spacing: bool = True
) -> list[Dataset]:
    """8 slices (given in reverse scan order), 64 x 64 px of 0.5 mm, 5 mm apart; blood at 80 HU."""
    study, uid = generate_uid(), generate_uid()
    out = []
    for k in range(8):
        pixels = np.full((64, 64), background_hu + 1024, np.uint16)
        if k in (3, 4):
            pixels[BLOOD] = 80 + 1024
        ds = make_dataset(
            study_uid=study,
            series_uid=uid,
            modality="CT",
            body_part="HEAD",
            sop_class=CTImageStorage,
            instance_number=8 - k,
            position_z=5.0 * k,
            pixels=pixels,
        )
        if spacing:
            ds.PixelSpacing = [0.5, 0.5]
        out.append(ds)
    return out[::-1]


async def analyse(engine: InferenceEngine, slices: list[Dataset], flagged: Flagged | None = None) -> Analysis:
    records = [
        InstanceRecord(
            str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), CTImageStorage, "CT", "HEAD", Path("held")
        )
        for ds in slices
    ]
    cards = {name: model.card for name, model in engine.registry.models.items()}
    held = {str(ds.SOPInstanceUID): ds for ds in slices}
    return await analyse_study(
        records,
        rules=RULES,
        cards=cards,
        load_errors={},
        engine=engine,
        priority=0,
        datasets=held,
        flagged=flagged,
    )


async def test_flagged_series_gets_a_measured_segment(engine: InferenceEngine) -> None:
    slices = series(background_hu=45.0)
    analysis = await analyse(engine, slices)
    (finding,) = analysis.findings
    assert finding.positive and finding.model == "ct-hemorrhage"
    (segment,) = finding.segments
    assert segment.model == "ct-hemorrhage-seg" and segment.code == finding.code
    assert segment.volume_ml == pytest.approx(2 * 10 * 6 * 0.5 * 0.5 * 5.0 / 1000)
    assert segment.max_axial_diameter_mm == pytest.approx(math.hypot(10 * 0.5, 6 * 0.5), abs=0.01)
    assert len(segment.lesions) == 1 and segment.slice_spacing_source == "positions"
    scan_order = sorted(slices, key=lambda ds: float(ds.ImagePositionPatient[2]))
    assert segment.instances == [str(ds.SOPInstanceUID) for ds in scan_order]
    assert [f.sop_instance_uid for f in segment.frames] == [segment.instances[3], segment.instances[4]]
    expected = np.zeros((64, 64), np.uint8)
    expected[BLOOD] = 1
    assert np.array_equal(decode_mask(segment.frames[0].mask, 64, 64), expected)
    assert "ct-hemorrhage-seg" in analysis.models
    assert analysis.not_analysed == []


async def test_negative_series_is_not_segmented(engine: InferenceEngine) -> None:
    analysis = await analyse(engine, series(background_hu=20.0))
    (finding,) = analysis.findings
    assert not finding.positive
    assert finding.segments == []
    assert "ct-hemorrhage-seg" not in analysis.models


async def test_unmeasurable_series_says_why(engine: InferenceEngine) -> None:
    analysis = await analyse(engine, series(background_hu=45.0, spacing=False))
    (finding,) = analysis.findings
    assert finding.positive and finding.segments == []
    (reason,) = analysis.not_analysed
    assert reason.model == "ct-hemorrhage-seg"
    assert (
        reason.reason
        == "not analysed: the bleed cannot be measured: PixelSpacing is missing or not two numbers"
    )


async def test_the_findings_are_handed_over_before_the_measurement(engine: InferenceEngine) -> None:
    """``flagged`` gets the classifier's findings, without segments, while the segmentation runs on; a
    negative study has nothing to measure and no early hand-over."""
    handed: list[Analysis] = []

    async def flagged(partial: Analysis) -> None:
        handed.append(partial)

    analysis = await analyse(engine, series(background_hu=45.0), flagged)
    (partial,) = handed
    (early,) = partial.findings
    (final,) = analysis.findings
    assert early.positive and early.segments == [] and len(final.segments) == 1
    assert early.model_copy(update={"segments": final.segments}) == final
    assert "ct-hemorrhage-seg" not in partial.models and "ct-hemorrhage-seg" in analysis.models

    handed.clear()
    await analyse(engine, series(background_hu=20.0), flagged)
    assert handed == []


async def test_a_segmentation_that_breaks_waits_for_the_flag_to_be_saved(
    engine: InferenceEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the measurement fails unexpectedly, the flag's save has settled before the failure reaches the
    worker (which then records it on the job): a late flag must not land on a job already failed."""
    saved: list[Analysis] = []

    async def flagged(partial: Analysis) -> None:
        await asyncio.sleep(0.05)
        saved.append(partial)

    async def broken(*_args: object) -> None:
        raise RuntimeError("a bug in the measurement")

    monkeypatch.setattr(service.analyse, "_segment", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        await analyse(engine, series(background_hu=45.0), flagged)
    assert len(saved) == 1
