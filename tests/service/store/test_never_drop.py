"""Never drop silently (issue 15 item 4): truncated datasets and SOP Instance UIDs already stored in another
study are refused on both doors (422 / 0xC000, 409 / 0xA900) instead of being acknowledged and lost;
``store.keep_truncated`` keeps a truncated dataset, and then the answer and the result say so."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.config import DicomSettings, Settings
from service.errors import TruncatedDatasetError
from service.ingest.scp import DicomListener
from service.store.db import InstanceRow
from service.store.instances import Instances
from service.store.validate import parse_instance
from tests.pydicom_files import pydicom_testdata
from tests.service.conftest import running_app
from tests.service.dicom_factory import chest, multipart_related

MR_TRUNCATED = pydicom_testdata("MR_truncated.dcm")
CT_SMALL = pydicom_testdata("CT_small.dcm")


def _cuts() -> list[tuple[str, int, str]]:
    """CT_small.dcm cut short at places that exercise each check: (what, length, element named)."""
    size = CT_SMALL.stat().st_size
    return [
        ("inside the pixel data", size - 1000, "PixelData declares 32768 bytes"),
        ("inside the trailing padding", size - 10, "DataSetTrailingPadding declares 126 bytes"),
        ("inside a value", 1306, "DistanceSourceToPatient declares 10 bytes and only 0"),
        ("inside an element header", 1303, "ends inside the header of the element after"),
    ]


def test_pydicom_truncated_files_are_refused_naming_the_element() -> None:
    with pytest.raises(TruncatedDatasetError, match="PixelData declares 8192 bytes and only 8130"):
        parse_instance(MR_TRUNCATED.read_bytes(), "part 1")
    rtplan = pydicom_testdata("rtplan_truncated.dcm").read_bytes()
    with pytest.raises(TruncatedDatasetError, match="BeamSequence declares 976 bytes"):
        parse_instance(rtplan, "C-STORE dataset", images_only=False)
    assert parse_instance(CT_SMALL.read_bytes(), "part 1").truncated is None  # the whole file is fine


@pytest.mark.parametrize(("what", "length", "named"), _cuts(), ids=[c[0] for c in _cuts()])
def test_files_cut_short_are_refused(what: str, length: int, named: str) -> None:
    with pytest.raises(TruncatedDatasetError, match=named) as info:
        parse_instance(CT_SMALL.read_bytes()[:length], "part 1")
    assert info.value.http_status == 422 and info.value.dimse_status == 0xC000, what
    if length > 2000:  # cut after the UIDs: store.keep_truncated keeps it, noted (earlier cuts lack UIDs)
        kept = parse_instance(CT_SMALL.read_bytes()[:length], "part 1", keep_truncated=True)
        assert kept.truncated is not None and named in kept.truncated


def test_encapsulated_pixel_data_without_its_delimiter_is_refused() -> None:
    data = pydicom_testdata("JPEG2000.dcm").read_bytes()
    with pytest.raises(TruncatedDatasetError, match="no delimiter"):
        parse_instance(data[:-10], "part 1")


# ---- HTTP -------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_http_refuses_a_truncated_part_and_keeps_it_when_configured(make_settings) -> None:
    async with running_app(make_settings()) as (_app, client):
        r = await client.post(
            "/v1/studies", content=MR_TRUNCATED.read_bytes(), headers={"Content-Type": "application/dicom"}
        )
        assert r.status_code == 422, r.text
        problem = r.json()
        assert problem["type"].endswith("/truncated-dataset") and "PixelData" in problem["detail"]
    settings: Settings = make_settings(store={"keep_truncated": True})
    async with running_app(settings) as (_app, client):
        r = await client.post(
            "/v1/studies", content=MR_TRUNCATED.read_bytes(), headers={"Content-Type": "application/dicom"}
        )
        assert r.status_code == 202, r.text
        assert "PixelData declares 8192 bytes" in r.json()["truncated"][0]["why"]
        # The same instance again, waiting for the result: the result says it was truncated.
        r = await client.post(
            "/v1/studies",
            content=MR_TRUNCATED.read_bytes(),
            headers={"Content-Type": "application/dicom", "Prefer": "wait=30"},
        )
        assert r.status_code == 200, r.text
        reasons = [n["reason"] for n in r.json()["not_analysed"]]
        assert any("is truncated (PixelData declares 8192 bytes" in r for r in reasons), reasons


@pytest.mark.anyio
async def test_http_refuses_a_sop_instance_uid_stored_in_another_study(make_settings) -> None:
    sop = generate_uid()
    first, second = generate_uid(), generate_uid()
    dicom = {"Content-Type": "application/dicom"}
    async with running_app(make_settings()) as (_app, client):
        assert (
            await client.post("/v1/studies", content=chest(study_uid=first, sop_uid=sop), headers=dicom)
        ).status_code == 202
        again = await client.post("/v1/studies", content=chest(study_uid=first, sop_uid=sop), headers=dicom)
        assert again.status_code == 202  # the same instance again: a retry, still a success
        r = await client.post("/v1/studies", content=chest(study_uid=second, sop_uid=sop), headers=dicom)
        assert r.status_code == 409, r.text
        problem = r.json()
        assert problem["type"].endswith("/sop-instance-conflict")
        assert problem["conflicting_study"] == first and problem["sop_instance_uid"] == sop
        assert (await client.get(f"/v1/studies/{second}/result")).status_code == 404  # nothing half-stored
        # Two parts of one request with one UID in two studies: refused too, nothing stored.
        third, fourth, sop2 = generate_uid(), generate_uid(), generate_uid()
        body, ctype = multipart_related(
            [chest(study_uid=third, sop_uid=sop2), chest(study_uid=fourth, sop_uid=sop2)]
        )
        r = await client.post("/v1/studies", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 409 and r.json()["conflicting_study"] == third
        assert (await client.get(f"/v1/studies/{third}/result")).status_code == 404


# ---- DICOM ------------------------------------------------------------------------------------------


@pytest.fixture
def listen(store: Instances) -> Iterator[Callable[..., DicomListener]]:
    started: list[DicomListener] = []

    def start(**kwargs: object) -> DicomListener:
        listener = DicomListener(
            DicomSettings(host="127.0.0.1", port=0),
            store,
            quiet_seconds=60.0,
            **kwargs,  # type: ignore[arg-type]
        )
        listener.start()
        started.append(listener)
        return listener

    yield start
    for listener in started:
        listener.stop()


@pytest.fixture(autouse=True)
def _send_files_as_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom re-encodes a file it reads (fixing its lengths) unless told to send its bytes in chunks,
    as a modality sending a file cut short would."""
    monkeypatch.setattr("pynetdicom._config.STORE_SEND_CHUNKED_DATASET", True)


def _send(port: int, items: list[Dataset | Path]) -> list[int]:
    """C-STORE each dataset or file on one association; a file goes as its bytes are."""
    ae = AE(ae_title="MODALITY")
    for item in items:
        ds = dcmread(item, stop_before_pixels=True) if isinstance(item, Path) else item
        ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_TRIAGE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(item).Status) for item in items]
    finally:
        assoc.release()


def _studies(store: Instances) -> dict[str, str]:
    with Session(store.db.engine) as s:
        return dict(s.execute(select(InstanceRow.sop_instance_uid, InstanceRow.study_uid)).all())


def test_dicom_refuses_truncated_files_with_0xc000(listen, store: Instances, tmp_path: Path) -> None:
    listener = listen()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(CT_SMALL.read_bytes()[: CT_SMALL.stat().st_size - 1000])
    assert _send(listener.port, [MR_TRUNCATED, cut, CT_SMALL]) == [0xC000, 0xC000, 0x0000]
    assert listener.flush(30)  # rows follow the success statuses in the next group commit
    assert list(_studies(store)) == [dcmread(CT_SMALL).SOPInstanceUID]


def test_dicom_keeps_truncated_files_when_configured(listen, store: Instances) -> None:
    listener = listen(keep_truncated=True)
    assert _send(listener.port, [MR_TRUNCATED]) == [0x0000]  # stored, and the result will say why not
    assert listener.flush(30)  # rows follow the success statuses in the next group commit
    assert list(_studies(store)) == [dcmread(MR_TRUNCATED).SOPInstanceUID]


def test_dicom_refuses_a_sop_instance_uid_stored_in_another_study(listen, store: Instances) -> None:
    listener = listen()
    sop, first, second = generate_uid(), generate_uid(), generate_uid()
    a = dcmread(BytesIO(chest(study_uid=first, sop_uid=sop)))
    b = dcmread(BytesIO(chest(study_uid=second, sop_uid=sop, pixels=None, value=200.0)))
    assert _send(listener.port, [a, a, b]) == [0x0000, 0x0000, 0xA900]
    assert listener.flush(30)
    assert _studies(store) == {sop: first}  # the first instance kept, the other refused, none dropped
