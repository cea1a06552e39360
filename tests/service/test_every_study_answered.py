"""Every stored study gets an answer (issue 15): pydicom's whole test corpus over C-STORE and over HTTP.

Non-image studies (SR, RT plans and structures, waveforms, CT without pixel data) used to get no job over
DICOM, and ``GET /v1/studies/{uid}/result`` answered 202 "retry" forever. Now every study a door accepted
reaches 200, with findings or with "not analysed: <why>".
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_files
from pynetdicom import AE

from tests.service.conftest import running_app

pytestmark = pytest.mark.anyio


def _corpus() -> list[tuple[Path, str, str, str]]:
    """(path, study UID, SOP class UID, transfer syntax UID) of each test file a sender could send."""
    out = []
    for name in get_testdata_files():
        path = Path(name)
        try:
            ds = dcmread(path, stop_before_pixels=True)
            out.append(
                (path, str(ds.StudyInstanceUID), str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
            )
        except Exception:  # no meta, no UIDs: nothing a C-STORE SCU could send as it is
            continue
    return out


def _c_store_each(port: int, corpus: list[tuple[Path, str, str, str]]) -> set[str]:
    """C-STORE every file on its own association; the studies of the ones answered 0x0000."""
    stored: set[str] = set()
    for path, study_uid, sop_class, syntax in corpus:
        ae = AE(ae_title="CORPUS")
        ae.add_requested_context(sop_class, [syntax])
        assoc = ae.associate("127.0.0.1", port, ae_title="PACS_TRIAGE")
        if not assoc.is_established:
            continue  # a transfer syntax we cannot decode is refused at negotiation, by design
        try:
            status = assoc.send_c_store(path)
        except Exception:
            status = None
        finally:
            assoc.release()
        if status is not None and status.get("Status") == 0x0000:
            stored.add(study_uid)
    return stored


async def _all_answered(client: httpx.AsyncClient, studies: set[str], timeout: float = 240) -> None:
    waiting = set(studies)
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        for uid in sorted(waiting):
            r = await client.get(f"/v1/studies/{uid}/result")
            assert r.status_code in (200, 202), r.text
            if r.status_code == 200:
                body = r.json()
                assert body["findings"] or body["not_analysed"], body
                assert all(n["reason"].startswith("not analysed: ") for n in body["not_analysed"])
                waiting.discard(uid)
        await asyncio.sleep(0.2)
    assert not waiting, f"{len(waiting)} of {len(studies)} stored studies never got an answer"


async def test_every_study_stored_over_c_store_gets_an_answer(make_settings) -> None:
    corpus = _corpus()
    async with running_app(make_settings()) as (app, client):
        port = app.state.triage.listener.port
        stored = await asyncio.to_thread(_c_store_each, port, corpus)
        assert len(stored) > 20  # most of the corpus is storable (many files share a study)
        await _all_answered(client, stored)


async def test_every_study_stored_over_http_gets_an_answer(make_settings) -> None:
    corpus = _corpus()
    async with running_app(make_settings()) as (_app, client):
        stored: set[str] = set()
        for path, study_uid, _sop, _ts in corpus:
            r = await client.post(
                "/v1/studies", content=path.read_bytes(), headers={"Content-Type": "application/dicom"}
            )
            assert r.status_code < 500, r.text
            if r.status_code in (200, 202):
                stored.add(study_uid)
        assert len(stored) > 20
        await _all_answered(client, stored)
