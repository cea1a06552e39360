"""DICOMweb with ``dicomweb-client`` as the real client against a real uvicorn: store, search, retrieve.

The service runs with bearer tokens and a real DCMTK storescp as its delivery destination, so the study is
analysed and our SR and preview are rendered under ``outputs_dir``; a viewer must then find them with
QIDO-RS and fetch them with WADO-RS like any other object of the study.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import requests
import uvicorn
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from service.app import create_app
from service.config import Settings
from tests.peers.dcmtk import StoreSCPFactory
from tests.service.conftest import wait_until_ready
from tests.service.dicom_factory import SENTINEL_ID, chest, make_dataset, to_bytes
from tests.service.results.dciodvfy import run_dciodvfy

pytestmark = pytest.mark.slow

ADMIN = "dicomweb-admin-token-0123456789"
READER = "dicomweb-reader-token-0123456789"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR


@contextmanager
def live_server(settings: Settings) -> Iterator[str]:
    """The app in a real uvicorn on a free loopback port (bound here, so no race for it); yields its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base, lambda: None if thread.is_alive() else "uvicorn thread ended")
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _client(base: str, token: str) -> DICOMwebClient:
    return DICOMwebClient(url=f"{base}/dicomweb", headers=_bearer(token))


def _dataset(**kwargs: object) -> Dataset:
    return dcmread(BytesIO(chest(**kwargs)))


def _wait_for_sr(client: DICOMwebClient, study_uid: str, timeout: float = 60.0) -> list[dict[str, Any]]:
    """The study's series once our SR is among them (the worker analyses, the render step writes it)."""
    deadline = time.monotonic() + timeout
    while True:
        series = client.search_for_series(study_uid)
        if any(s.get("00080060", {}).get("Value") == ["SR"] for s in series):
            return series
        assert time.monotonic() < deadline, f"no SR series after {timeout} s: {series}"
        time.sleep(0.2)


@pytest.fixture
def server(make_settings: Callable[..., Settings], storescp_factory: StoreSCPFactory) -> Iterator[str]:
    pacs = storescp_factory(aet="PACS")
    settings = make_settings(
        auth={"open": False, "admin_tokens": [ADMIN], "reader_tokens": [READER]},
        delivery={"destinations": [pacs.peer_text], "send_kos": True, "send_gsps": True},
    )
    with live_server(settings) as base:
        yield base


def test_store_search_retrieve_with_dicomweb_client(server: str, tmp_path: Path) -> None:
    admin, reader = _client(server, ADMIN), _client(server, READER)
    study_uid, series_uid = generate_uid(), generate_uid()
    first = _dataset(study_uid=study_uid, series_uid=series_uid, instance_number=1)
    second = _dataset(study_uid=study_uid, series_uid=series_uid, instance_number=2)
    first.StudyDate = second.StudyDate = "20260301"

    answer = admin.store_instances([first, second], study_instance_uid=study_uid)
    stored = {item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence}
    assert stored == {first.SOPInstanceUID, second.SOPInstanceUID}
    assert "FailedSOPSequence" not in answer
    # dicomweb-client sends "Host: 127.0.0.1" without the port, and URLs are built from the Host header
    assert answer.RetrieveURL.endswith(f"/dicomweb/studies/{study_uid}")

    # Search: by each key the brief names, and keys that must not match.
    for filters in (
        {"StudyInstanceUID": study_uid},
        {"PatientID": SENTINEL_ID},
        {"AccessionNumber": first.AccessionNumber},
        {"StudyDate": "20260201-20260331"},
        {"ModalitiesInStudy": "CR"},
        {"PatientID": "PHI-ID-*"},
    ):
        found = reader.search_for_studies(search_filters=filters)
        assert [s["0020000D"]["Value"] for s in found] == [[study_uid]], filters
    assert reader.search_for_studies(search_filters={"PatientID": "someone-else"}) == []
    assert reader.search_for_studies(search_filters={"StudyDate": "20250101-20251231"}) == []
    study = reader.search_for_studies(search_filters={"StudyInstanceUID": study_uid})[0]
    # NumberOfStudyRelatedInstances: ours two, plus our own SR and preview once the analysis (which runs
    # while this test searches) has stored them
    assert study["00201208"]["Value"][0] >= 2

    # Our SR and preview become objects of the study: QIDO lists them, WADO returns them.
    series = _wait_for_sr(reader, study_uid)
    assert {s["0020000E"]["Value"][0] for s in series} >= {series_uid}
    instances = reader.search_for_instances(study_uid)
    classes = {i["00080016"]["Value"][0] for i in instances}
    assert SR_CLASS in classes
    retrieved = reader.retrieve_study(study_uid)
    assert {str(ds.SOPInstanceUID) for ds in retrieved} == {str(i["00080018"]["Value"][0]) for i in instances}
    sr = next(ds for ds in retrieved if ds.SOPClassUID == SR_CLASS)
    assert sr.StudyInstanceUID == study_uid
    assert sr.ContentSequence  # the TID 1500 content tree came through

    # The optional Key Object Selection (IHE AIR) flags the positive findings' key images.
    result = requests.get(
        f"{server}/v1/studies/{study_uid}/result", headers=_bearer(READER), timeout=10
    ).json()
    flagged = {f["key_instance_uid"] for f in result["findings"] if f["positive"] and f["key_instance_uid"]}
    assert flagged  # the tiny models find something on this image
    kos = next(ds for ds in retrieved if ds.Modality == "KO")
    images = [i for i in kos.ContentSequence if i.ValueType == "IMAGE"]
    assert {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in images} == flagged
    # The optional presentation state (IHE AIR) draws the positive findings' boxes over those images.
    boxed = {d["sop_instance_uid"] for f in result["findings"] if f["positive"] for d in f["detections"]}
    assert boxed  # the tiny detector boxes something on this image
    [gsps] = [ds for ds in retrieved if ds.Modality == "PR"]
    drawn = {
        str(a.ReferencedImageSequence[0].ReferencedSOPInstanceUID) for a in gsps.GraphicAnnotationSequence
    }
    assert drawn == boxed
    path = tmp_path / "gsps.dcm"
    gsps.save_as(path, enforce_file_format=True)
    errors, output = run_dciodvfy(path)
    assert errors == 0, output

    metadata = reader.retrieve_instance_metadata(study_uid, sr.SeriesInstanceUID, sr.SOPInstanceUID)
    assert metadata["00080016"]["Value"] == [SR_CLASS]
    [frame] = reader.retrieve_instance_frames(study_uid, series_uid, first.SOPInstanceUID, frame_numbers=[1])
    assert frame == first.PixelData  # what a viewer (OHIF) fetches to draw the image
    one = reader.retrieve_instance(study_uid, series_uid, first.SOPInstanceUID)
    assert one.SOPInstanceUID == first.SOPInstanceUID
    assert one.PixelData == first.PixelData


def test_roles_and_unknown_uids(server: str) -> None:
    """Reader tokens search and retrieve but cannot store; unknown UIDs are 404 problems, not 500s."""
    reader = _client(server, READER)
    with pytest.raises(requests.HTTPError) as refused:
        reader.store_instances([_dataset()])
    assert refused.value.response is not None and refused.value.response.status_code == 403
    unknown = generate_uid()
    for call in (
        lambda: reader.search_for_series(unknown),
        lambda: reader.retrieve_study(unknown),
        lambda: reader.retrieve_study_metadata(unknown),
    ):
        with pytest.raises(requests.HTTPError) as missing:
            call()
        response = missing.value.response
        assert response is not None and response.status_code == 404
        assert response.headers["content-type"].startswith("application/problem+json")
    answer = requests.get(f"{server}/dicomweb/studies", timeout=10)
    assert answer.status_code == 401


def test_store_mixed_study_objects(server: str) -> None:
    """An SR without pixel data is stored by STOW-RS (a storage service, like C-STORE), not refused."""
    admin = _client(server, ADMIN)
    image = _dataset()
    other = make_dataset(study_uid=image.StudyInstanceUID)
    del other.PixelData
    other = dcmread(BytesIO(to_bytes(other)))  # a FileDataset: dicomweb-client writes its preamble
    answer = admin.store_instances([image, other])
    assert len(answer.ReferencedSOPSequence) == 2
