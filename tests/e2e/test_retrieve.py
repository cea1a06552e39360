"""Pull by accession against a real Orthanc: C-FIND (Study Root), then C-MOVE to our listener.

Orthanc holds the study and knows our AE title as a DICOM modality (its move destination); the service runs
in-process with its listener on a known port. ``POST /v1/retrievals`` and ``pacs-triage retrieve`` must bring
the study in through the normal path (stored by the listener, analysed, result readable), and every way it
can go wrong must be a clear answer, never a hang: unknown accession (404), unreachable source (502), a
source that does not know our AE title (502, and the problem asks whether it knows our AE title).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from io import BytesIO

import httpx
import pytest
from pydicom import dcmread

from service.__main__ import main
from service.config import Settings
from tests.peers import free_port
from tests.peers.orthanc import OrthancFactory
from tests.service.conftest import make_settings, running_app, tiny_models_dir  # noqa: F401 - fixtures
from tests.service.dicom_factory import chest, make_dataset, to_bytes

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

AET = "PACS_TRIAGE"


async def _result(client: httpx.AsyncClient, study_uid: str, timeout: float = 60.0) -> dict[str, object]:
    """The study's result once written (the listener's quiet timer, then the worker)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        r = await client.get(f"/v1/studies/{study_uid}/result")
        if r.status_code == 200:
            body: dict[str, object] = r.json()
            return body
        assert r.status_code in (202, 404), r.text
        assert loop.time() < deadline, f"no result after {timeout} s: {r.status_code} {r.text}"
        await asyncio.sleep(0.1)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _settings(build: Callable[..., Settings], port: int, *sources: str) -> Settings:
    return build(dicom={"port": port, "ae_title": AET, "retrieve_sources": list(sources)})


async def test_retrieve_by_accession_through_the_api(
    make_settings: Callable[..., Settings],  # noqa: F811
    orthanc_factory: OrthancFactory,
) -> None:
    port = free_port()
    pacs = orthanc_factory(modalities={"triage": (AET, "127.0.0.1", port)})
    first = dcmread(BytesIO(chest()))
    second = make_dataset(
        study_uid=first.StudyInstanceUID, series_uid=first.SeriesInstanceUID, instance_number=2
    )
    second.AccessionNumber = first.AccessionNumber = "ACC-PULL-1"
    for ds in (first, second):
        pacs.upload(to_bytes(ds))
    pacs.upload(chest())  # another study, another accession: must stay where it is

    async with running_app(_settings(make_settings, port, pacs.peer_text)) as (_app, client):
        r = await client.post(
            "/v1/retrievals", json={"accession_number": "ACC-PULL-1", "source": pacs.peer_text}
        )
        assert r.status_code == 202, r.text
        body = r.json()
        assert body["studies"] == [first.StudyInstanceUID]
        assert (body["completed"], body["failed"]) == (2, 0)
        assert r.headers["location"] == f"/v1/studies/{first.StudyInstanceUID}/result"
        result = await _result(client, first.StudyInstanceUID)
        assert result["status"] != "failed" and result["accession_number"] == "ACC-PULL-1"

        # by study UID too; the instances are known already, so the retry is harmless
        r = await client.post(
            "/v1/retrievals", json={"study_uid": first.StudyInstanceUID, "source": pacs.peer_text}
        )
        assert r.status_code == 202 and r.json()["completed"] == 2

        r = await client.post(
            "/v1/retrievals", json={"accession_number": "NO-SUCH-ACC", "source": pacs.peer_text}
        )
        assert r.status_code == 404 and r.headers["content-type"].startswith("application/problem+json")
        assert "ACC" not in r.json()["detail"]  # the accession number is not echoed
        r = await client.post("/v1/retrievals", json={"accession_number": "ACC*", "source": pacs.peer_text})
        assert r.status_code == 422
        r = await client.post("/v1/retrievals", json={"source": pacs.peer_text})
        assert r.status_code == 422
        r = await client.post("/v1/retrievals", json={"accession_number": "A", "source": "not a peer"})
        assert r.status_code == 400
        elsewhere = {"accession_number": "ACC-PULL-1", "source": f"OTHER@127.0.0.1:{free_port()}"}
        r = await client.post("/v1/retrievals", json=elsewhere)  # not configured: no association opened
        assert r.status_code == 422 and "dicom.retrieve_sources" in r.json()["detail"]


async def test_retrieve_failures_are_clear(
    make_settings: Callable[..., Settings],  # noqa: F811
    orthanc_factory: OrthancFactory,
) -> None:
    stranger = orthanc_factory(
        aet="STRANGER", extra_config={"DicomAlwaysAllowFind": True, "DicomAlwaysAllowMove": True}
    )
    data = chest()
    accession = str(dcmread(BytesIO(data)).AccessionNumber)
    stranger.upload(data)
    closed = f"PACS@127.0.0.1:{free_port()}"
    async with running_app(_settings(make_settings, free_port(), stranger.peer_text, closed)) as (
        _app,
        client,
    ):
        r = await client.post(
            "/v1/retrievals", json={"accession_number": accession, "source": stranger.peer_text}
        )
        assert r.status_code == 502, r.text
        # Orthanc 1.10 answers 0xC000 rather than 0xA801 for a destination it does not know
        assert "status 0xC000" in r.json()["detail"] and "our AE title" in r.json()["detail"]
        r = await client.post("/v1/retrievals", json={"accession_number": accession, "source": closed})
        assert r.status_code == 502 and "cannot connect" in r.json()["detail"]


async def test_retrieve_command(
    make_settings: Callable[..., Settings],  # noqa: F811
    orthanc_factory: OrthancFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = free_port()
    pacs = orthanc_factory(modalities={"triage": (AET, "127.0.0.1", port)})
    data = chest()
    ds = dcmread(BytesIO(data))
    pacs.upload(data)

    async with running_app(_settings(make_settings, port)) as (_app, client):
        command = ["retrieve", "--accession", str(ds.AccessionNumber), "--from", pacs.peer_text]
        assert await asyncio.to_thread(main, command) == 0
        await _result(client, ds.StudyInstanceUID)
        unknown = ["retrieve", "--accession", "UNKNOWN-ACC", "--from", pacs.peer_text]
        assert await asyncio.to_thread(main, unknown) == 1
    out, err = capsys.readouterr()
    assert "retrieved 1 study(ies) to PACS_TRIAGE: 1 instance(s) sent, 0 failed" in out
    assert "retrieve failed:" in err and "holds no study with this accession number" in err


async def test_retrieve_by_c_get_without_a_listener(
    make_settings: Callable[..., Settings],  # noqa: F811
    orthanc_factory: OrthancFactory,
) -> None:
    """C-GET brings the study on our own association: no listener here, and Orthanc's entry for our AE
    title points at a closed port, so a C-MOVE could not have delivered it."""
    pacs = orthanc_factory(modalities={"triage": (AET, "127.0.0.1", free_port())})
    first = dcmread(BytesIO(chest()))
    second = make_dataset(
        study_uid=first.StudyInstanceUID, series_uid=first.SeriesInstanceUID, instance_number=2
    )
    second.AccessionNumber = first.AccessionNumber = "ACC-GET-1"
    for ds in (first, second):
        pacs.upload(to_bytes(ds))
    settings = make_settings(dicom={"enabled": False, "ae_title": AET, "retrieve_sources": [pacs.peer_text]})
    async with running_app(settings) as (_app, client):
        request = {"accession_number": "ACC-GET-1", "source": pacs.peer_text, "method": "get"}
        r = await client.post("/v1/retrievals", json=request)
        assert r.status_code == 202, r.text
        assert (r.json()["studies"], r.json()["completed"], r.json()["failed"]) == (
            [first.StudyInstanceUID],
            2,
            0,
        )
        result = await _result(client, first.StudyInstanceUID)
        assert result["accession_number"] == "ACC-GET-1"
        r = await client.post("/v1/retrievals", json={**request, "method": "move"})
        assert r.status_code == 502  # the same study by C-MOVE: Orthanc cannot reach a listener
