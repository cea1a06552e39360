"""Compressed transfer syntaxes, on the DICOM files that ship inside pydicom (no download).

Every file with pixel data is posted with fresh UIDs (several test files share UIDs) to an app whose
routing sends any modality to a tiny classifier that accepts any modality, so each file is really decoded
and preprocessed. Each must end as a 4xx problem, a finding, or a "not analysed: <reason>"; never a 5xx or
silence. The six files PEERS.md lists as undecodable must say so clearly.
"""

from __future__ import annotations

import warnings
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import DATA_ROOT
from pydicom.uid import UID, generate_uid

from service.inference.card import Eligibility, ModelCard
from tests.fixtures.tiny_models import write_tiny_model
from tests.service.conftest import running_app

pytestmark = pytest.mark.anyio

UNDECODABLE = {
    "JPEG-lossy.dcm",
    "JPEG2000-embedded-sequence-delimiter.dcm",
    "MR_truncated.dcm",
    "badVR.dcm",
    "meta_missing_tsyntax.dcm",
    "nested_priv_SQ.dcm",
}
MODALITIES = ["CR", "DX", "CT", "MR", "OT", "NM", "US", "RTDOSE", "SEG", "PT", "XA", "MG", "SC"]


def _pixel_files() -> list[tuple[str, str, bytes]]:
    """(name, bytes with fresh UIDs where the file can carry them) for every test file with pixel data."""
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # several test files are deliberately odd
        # The wheel's own files only: get_testdata_files() would also try pydicom-data downloads.
        for path in sorted(p for p in (Path(DATA_ROOT) / "test_files").rglob("*") if p.is_file()):
            try:
                ds = dcmread(path)
            except Exception:
                continue
            if "PixelData" not in ds:
                continue
            raw = path.read_bytes()
            has_uids = all(k in ds for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
            if has_uids or path.name not in UNDECODABLE:  # give UID-less files UIDs so they get decoded
                ds.Modality = ds.get("Modality") or "OT"
                ds.SOPClassUID = ds.get("SOPClassUID") or "1.2.840.10008.5.1.4.1.1.7"
                ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
                ds.SOPInstanceUID = generate_uid()
                if "MediaStorageSOPInstanceUID" in ds.file_meta:
                    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                buf = BytesIO()
                try:
                    ds.save_as(buf)
                    raw = buf.getvalue()
                except Exception:
                    pass
            out.append((path.name, str(getattr(ds.file_meta, "TransferSyntaxUID", "")), raw))
    return out


@pytest.fixture
def any_modality_settings(tmp_path: Path, make_settings):
    models = tmp_path / "models"
    model_dir = write_tiny_model(models, "any-classifier", "classification")
    card = ModelCard.read(model_dir / "card.json")
    card.model_copy(update={"eligibility": Eligibility(modalities=MODALITIES, body_parts=[])}).write(
        model_dir / "card.json"
    )
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"rules:\n  - name: all\n    modalities: {MODALITIES}\n    models: [any-classifier]\n")
    return make_settings(models_dir=models, routing_rules=rules)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns while decoding odd test files
async def test_pydicom_test_files(any_modality_settings) -> None:
    files = _pixel_files()
    assert len(files) >= 90
    outcomes: dict[str, str] = {}
    async with running_app(any_modality_settings) as (_app, client):
        for name, _ts, data in files:
            r = await client.post(
                "/v1/studies",
                content=data,
                headers={"Content-Type": "application/dicom", "Prefer": "wait=20"},
            )
            assert r.status_code < 500, (name, r.text)
            if r.status_code >= 400:
                assert r.headers["content-type"].startswith("application/problem+json"), name
                outcomes[name] = f"{r.status_code} {r.json()['title']}: {r.json()['detail']}"
                continue
            assert r.status_code == 200, (name, r.text)
            result = r.json()
            assert result["findings"] or result["not_analysed"], name
            if result["findings"]:
                outcomes[name] = "finding"
            else:
                reasons = "; ".join(n["reason"] for n in result["not_analysed"])
                assert reasons.startswith("not analysed: "), name
                outcomes[name] = reasons
    for name in UNDECODABLE:
        outcome = outcomes[name]
        assert outcome != "finding", name
        assert outcome.startswith(("4", "not analysed: ")), (name, outcome)
    decoded = [n for n, o in outcomes.items() if o == "finding"]
    assert len(decoded) >= 40, outcomes
    syntaxes = {ts: UID(ts) for name, ts, _ in files if outcomes[name] == "finding" and ts}
    compressed = {ts for ts, uid in syntaxes.items() if uid.is_compressed}
    # JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE: at least one decoded file of most of them.
    assert len(compressed) >= 6, sorted(syntaxes.values())
