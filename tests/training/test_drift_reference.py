"""The card's drift reference: its values are those the service computes for the same series (one
definition, :func:`service.inference.domain.judge_series`), and the monitor built from the card reads them.

A tiny ONNX model (tests/fixtures/tiny_models.py) through the real engine and through ONNX Runtime as
training runs it; the series are built here, so no generator run or shipped model is needed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, DigitalXRayImageStorageForPresentation, generate_uid

from service.analyse import analyse_study
from service.config import DriftSettings
from service.inference.card import ModelCard
from service.inference.domain import InputSummary
from service.inference.engine import InferenceEngine
from service.inference.registry import ModelRegistry
from service.lifecycle.drift import DriftMonitor
from service.routing import load_rules
from service.store.instances import InstanceRecord
from tests.fixtures.tiny_models import write_tiny_model
from tests.service.dicom_factory import make_dataset
from training.drift_reference import drift_reference, ship_drift_reference
from training.export import ort_session

pytestmark = pytest.mark.anyio

RULES = load_rules(Path(__file__).resolve().parents[2] / "service" / "routing_rules.yaml")


def chest(brightness: int, manufacturer: str = "ACME") -> list[Dataset]:
    pixels = np.full((64, 64), brightness, np.uint16)
    pixels[20:40, 20:40] = min(4095, brightness * 2)
    ds = make_dataset(
        study_uid=generate_uid(),
        series_uid=generate_uid(),
        modality="DX",
        body_part="CHEST",
        sop_class=DigitalXRayImageStorageForPresentation,
        pixels=pixels,
    )
    ds.Manufacturer = manufacturer
    ds.ImagerPixelSpacing = [0.2, 0.2]
    return [ds]


def head(hu: float) -> list[Dataset]:
    """6 slices in scan order, 5 mm apart."""
    study, uid = generate_uid(), generate_uid()
    out = []
    for k in range(6):
        ds = make_dataset(
            study_uid=study,
            series_uid=uid,
            modality="CT",
            body_part="HEAD",
            sop_class=CTImageStorage,
            instance_number=k + 1,
            position_z=5.0 * k,
            pixels=np.full((64, 64), hu + 1024, np.uint16),
        )
        ds.PixelSpacing = [0.5, 0.5]
        out.append(ds)
    return out


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the engine's micro-batcher runs on asyncio


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[InferenceEngine]:
    write_tiny_model(tmp_path, "cxr-pneumothorax", "classification")
    write_tiny_model(tmp_path, "ct-hemorrhage", "series_classification")
    eng = InferenceEngine(ModelRegistry.from_directory(tmp_path), providers="cpu")
    await eng.start()
    yield eng
    await eng.stop()


async def served_features(engine: InferenceEngine, series: list[Dataset]) -> dict[str, object]:
    """The drift features the service takes from one series (the worker feeds these to the monitor)."""
    records = [
        InstanceRecord(
            str(ds.SOPInstanceUID),
            str(ds.SeriesInstanceUID),
            str(ds.SOPClassUID),
            ds.Modality,
            ds.BodyPartExamined,
            Path("held"),
        )  # fmt: skip
        for ds in series
    ]
    cards = {name: model.card for name, model in engine.registry.models.items()}
    analysis = await analyse_study(
        records,
        rules=RULES,
        cards=cards,
        load_errors={},
        engine=engine,
        priority=0,
        datasets={str(ds.SOPInstanceUID): ds for ds in series},
    )
    (summary,) = analysis.inputs
    return dict(summary.features())


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("cxr-pneumothorax", [lambda: chest(300), lambda: chest(2500, "OTHER"), lambda: chest(1200)]),
        ("ct-hemorrhage", [lambda: head(20.0), lambda: head(45.0)]),
    ],
)
async def test_reference_values_are_what_the_service_computes(engine, name, make) -> None:
    series = [m() for m in make]
    model = engine.registry.models[name]
    reference = drift_reference(model.card, ort_session(model.onnx_path), series, "built in the test")
    assert reference.series == len(series)
    served = [await served_features(engine, s) for s in series]
    for name_, values in reference.features.items():
        for got, want in zip(values, served, strict=True):
            want_value = want.get(name_)
            if isinstance(got, float):
                assert want_value == pytest.approx(got, rel=1e-6), name_
            else:
                assert got == want_value, name_
    assert set(reference.features) == {k for row in served for k in row}


async def test_written_card_reference_drives_the_monitor(engine, tmp_path: Path) -> None:
    model = engine.registry.models["cxr-pneumothorax"]
    folder = model.onnx_path.parent
    sha = model.card.sha256
    card = ship_drift_reference(folder, [chest(300 + 10 * i) for i in range(12)], "built in the test")
    reread = ModelCard.read(folder / "card.json")
    assert reread.drift_reference == card.drift_reference and reread.sha256 == sha
    assert "## Drift reference" in (folder / "card.md").read_text(encoding="utf-8")
    assert reread.drift_reference is not None
    monitor = DriftMonitor(
        DriftSettings(window_series=10, check_every=1),
        {reread.name: (reread.version, reread.drift_reference)},
    )
    for i in range(10):  # another manufacturer: the inputs moved
        features = await served_features(engine, chest(2400 + 10 * i, "OTHER"))
        values = {k: v for k, v in features.items() if not k.startswith("score:")}
        scores = {k[6:]: v for k, v in features.items() if k.startswith("score:") and v is not None}
        monitor.observe([InputSummary(reread.name, reread.version, values, scores)])  # type: ignore[arg-type]
    state = monitor.models[reread.name]
    assert state.drifted == ["manufacturer"]
    report = monitor.report(reread.name)
    assert report is not None and report["reference"]["series"] == 12
