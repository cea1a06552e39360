"""DICOMweb edge cases through the app (ASGI): STOW-RS failures and status codes, QIDO-RS matching and
paging, WADO-RS transfer syntaxes, and 404/400/406/415 problems. The dicomweb-client round trip against a
real uvicorn is tests/service/api/test_dicomweb.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from io import BytesIO
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, generate_uid

from service.api.stow import split_parts
from service.config import Settings
from service.errors import STOW_FAILURE_REASONS
from tests.service.conftest import running_app
from tests.service.dicom_factory import chest, make_dataset, multipart_related, to_bytes

pytestmark = pytest.mark.anyio

# PS3.18 Table 10.5.3-2 FailureReason codes
CANNOT_UNDERSTAND, TRANSFER_SYNTAX_NOT_SUPPORTED, DOES_NOT_MATCH = 0xC000, 0xC122, 0xA900

STOW_TYPE = "application/dicom+json"
_RELATED = 'multipart/related; type="application/dicom"; boundary=b'


@pytest.fixture
async def app(make_settings: Callable[..., Settings]) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    async with running_app(make_settings()) as pair:
        yield pair


@pytest.fixture
def client(app: tuple[FastAPI, httpx.AsyncClient]) -> httpx.AsyncClient:
    return app[1]


@pytest.fixture(params=["held", "spooled"])
async def stow_app(
    request: pytest.FixtureRequest, make_settings: Callable[..., Settings]
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """STOW-RS with the body's instances held in memory (the default for small bodies) and spooled to disk
    as they arrive (``api.upload_memory_bytes`` 0: each staged, then placed by the ingest)."""
    memory = {"api": {"upload_memory_bytes": 0}} if request.param == "spooled" else {}
    async with running_app(make_settings(**memory)) as pair:
        yield pair
        assert not list(pair[0].state.triage.instances.instances_dir.rglob("*.tmp"))  # nothing left staged


@pytest.fixture
def stow_client(stow_app: tuple[FastAPI, httpx.AsyncClient]) -> httpx.AsyncClient:
    return stow_app[1]


async def _stow(client: httpx.AsyncClient, parts: list[bytes], study: str | None = None) -> httpx.Response:
    body, ctype = multipart_related(parts)
    url = "/dicomweb/studies" + (f"/{study}" if study else "")
    return await client.post(url, content=body, headers={"Content-Type": ctype})


def _stow_answer(r: httpx.Response) -> Dataset:
    assert r.headers["content-type"] == STOW_TYPE, r.text
    return Dataset.from_json(r.json())


def _problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    return body


def _rle_chest(study_uid: str) -> bytes:
    ds = make_dataset(study_uid=study_uid, pixels=np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    ds.compress(RLELossless)
    return to_bytes(ds)


def _parts(r: httpx.Response) -> list[Dataset]:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith('multipart/related; type="application/dicom"')
    return [dcmread(BytesIO(p.data)) for p in split_parts(r.headers["content-type"], r.content)]


# ---- STOW-RS ----------------------------------------------------------------------------------------


async def test_stow_partial_failure_is_202_with_reasons(stow_client: httpx.AsyncClient) -> None:
    good = chest()
    r = await _stow(stow_client, [good, b"not dicom at all"])
    assert r.status_code == 202
    answer = _stow_answer(r)
    assert [i.ReferencedSOPInstanceUID for i in answer.ReferencedSOPSequence] == [
        dcmread(BytesIO(good)).SOPInstanceUID
    ]
    assert [i.FailureReason for i in answer.FailedSOPSequence] == [CANNOT_UNDERSTAND]
    assert r.headers["warning"].startswith('299 pacs-triage "part 2: cannot understand')
    body = (
        b"--b\r\nContent-Type: application/dicom\r\n"
        b'Content-Disposition: attachment; filename="r\xe9sum\xe9.dcm"\r\n\r\nnot dicom\r\n--b--\r\n'
    )
    r = await stow_client.post("/dicomweb/studies", content=body, headers={"Content-Type": _RELATED})
    assert r.status_code == 409 and r.headers["warning"].startswith('299 pacs-triage "part 1 (r?sum?.dcm)')


async def test_stow_nothing_stored_is_409_and_stores_nothing(stow_client: httpx.AsyncClient) -> None:
    study = generate_uid()
    other_study = chest()  # its own study UID, not the one in the URL
    unsupported = make_dataset(study_uid=study)
    unsupported.file_meta.TransferSyntaxUID = MPEG2MPML  # MPEG2: no decoder here
    unsupported.PixelData = encapsulate([b"\x00" * 64])
    r = await _stow(stow_client, [other_study, to_bytes(unsupported)], study=study)
    assert r.status_code == 409
    answer = _stow_answer(r)
    assert "ReferencedSOPSequence" not in answer and "RetrieveURL" not in answer
    reasons = {i.ReferencedSOPInstanceUID: i.FailureReason for i in answer.FailedSOPSequence}
    assert reasons == {
        dcmread(BytesIO(other_study)).SOPInstanceUID: DOES_NOT_MATCH,
        unsupported.SOPInstanceUID: TRANSFER_SYNTAX_NOT_SUPPORTED,
    }
    _problem(await stow_client.get(f"/dicomweb/studies/{study}/series"), 404)
    assert (await stow_client.get("/dicomweb/studies", params={"StudyInstanceUID": study})).json() == []


async def test_stow_study_in_path_and_retries(stow_client: httpx.AsyncClient) -> None:
    study = generate_uid()
    data = chest(study_uid=study)
    for _ in range(2):  # a retry of a stored instance is a success, as for C-STORE
        r = await _stow(stow_client, [data], study=study)
        assert r.status_code == 200, r.text
        answer = _stow_answer(r)
        assert answer.RetrieveURL == f"http://test/dicomweb/studies/{study}"
        assert answer.ReferencedSOPSequence[0].RetrieveURL.startswith(answer.RetrieveURL + "/series/")


async def test_stow_sop_instance_conflicts_are_refused_one_by_one(
    stow_app: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    """One SOP Instance UID, different content: FailedSOPSequence 0xA900, nothing stored or replaced;
    409 when every part conflicts, 202 beside a good part; the same bytes again are a retry. Spooled, the
    parts' bytes are compared from their staged files."""
    fast, client = stow_app
    study = generate_uid()
    original = make_dataset(study_uid=study)
    stored_bytes = to_bytes(original)
    assert (await _stow(client, [stored_bytes])).status_code == 200
    edited = make_dataset(study_uid=study, series_uid=original.SeriesInstanceUID)
    edited.SOPInstanceUID = original.SOPInstanceUID
    edited.PixelData = np.full((64, 64), 7, dtype=np.uint16).tobytes()
    elsewhere = make_dataset()  # another study, reusing the UID
    elsewhere.SOPInstanceUID = original.SOPInstanceUID

    r = await _stow(client, [to_bytes(edited), to_bytes(elsewhere)])
    assert r.status_code == 409
    answer = _stow_answer(r)
    assert "ReferencedSOPSequence" not in answer
    assert [(i.ReferencedSOPInstanceUID, i.FailureReason) for i in answer.FailedSOPSequence] == [
        (original.SOPInstanceUID, DOES_NOT_MATCH)
    ] * 2
    assert "different content" in r.headers["warning"] and "(and 1 more)" in r.headers["warning"]

    fresh = make_dataset(study_uid=study, series_uid=original.SeriesInstanceUID)
    r = await _stow(client, [to_bytes(fresh), to_bytes(edited), stored_bytes])
    assert r.status_code == 202
    answer = _stow_answer(r)
    assert {i.ReferencedSOPInstanceUID for i in answer.ReferencedSOPSequence} == {
        fresh.SOPInstanceUID,
        original.SOPInstanceUID,  # the stored bytes again: a retry, a success
    }
    assert [i.FailureReason for i in answer.FailedSOPSequence] == [DOES_NOT_MATCH]

    # two parts of one request: the first decides, a second with other content is refused
    twin = make_dataset(study_uid=study)
    other = make_dataset(study_uid=study, series_uid=twin.SeriesInstanceUID)
    other.SOPInstanceUID = twin.SOPInstanceUID
    other.PatientName = "Someone^Else"
    r = await _stow(client, [to_bytes(twin), to_bytes(other)])
    assert r.status_code == 202
    assert [i.FailureReason for i in _stow_answer(r).FailedSOPSequence] == [DOES_NOT_MATCH]

    # what is stored is the original, byte for byte, and the other study was never created
    path = (await fast.state.triage.instances.paths([original.SOPInstanceUID]))[original.SOPInstanceUID]
    assert path.read_bytes() == stored_bytes
    query = {"StudyInstanceUID": elsewhere.StudyInstanceUID}
    assert (await client.get("/dicomweb/studies", params=query)).json() == []
    assert STOW_FAILURE_REASONS[DOES_NOT_MATCH].startswith("data set does not match")


async def test_stow_refuses_other_media_types(client: httpx.AsyncClient) -> None:
    for ctype in (
        "application/dicom",
        "multipart/form-data; boundary=x",
        'multipart/related; type="image/jpeg"; boundary=x',
    ):
        r = await client.post("/dicomweb/studies", content=chest(), headers={"Content-Type": ctype})
        _problem(r, 415)
    body, ctype = multipart_related([chest()])
    _problem(
        await client.post("/dicomweb/studies/not-a-uid", content=body, headers={"Content-Type": ctype}), 422
    )


# ---- QIDO-RS ----------------------------------------------------------------------------------------


async def test_qido_matching_includefield_and_paging(client: httpx.AsyncClient) -> None:
    studies = []
    for i in range(3):
        ds = make_dataset(modality="CT" if i == 2 else "CR", body_part="CHEST")
        ds.StudyDate, ds.PatientID, ds.AccessionNumber = f"2026010{i + 1}", f"QIDO-{i}", f"ACC{i}"
        ds.InstitutionName = "General Hospital"
        assert (await _stow(client, [to_bytes(ds)])).status_code == 200
        studies.append(str(ds.StudyInstanceUID))

    async def search(**params: str) -> list[str]:
        r = await client.get("/dicomweb/studies", params=params)
        assert r.status_code == 200 and r.headers["content-type"] == STOW_TYPE, r.text
        return [s["0020000D"]["Value"][0] for s in r.json()]

    assert await search() == studies  # oldest first
    assert await search(limit="2") == studies[:2]
    assert await search(limit="2", offset="2") == studies[2:]
    assert await search(offset="9") == []
    assert await search(StudyDate="20260102-") == studies[1:]
    assert await search(StudyDate="-20260101") == studies[:1]
    assert await search(**{"00100020": "QIDO-1"}) == [studies[1]]
    assert await search(PatientID="QIDO-?") == studies
    assert await search(AccessionNumber="ACC2") == [studies[2]]
    assert await search(AccessionNumber="ACC*", limit="1", offset="1") == [studies[1]]
    assert await search(ModalitiesInStudy="CT") == [studies[2]]
    assert await search(Modality="CR") == studies[:2]
    assert await search(StudyInstanceUID=f"{studies[0]},{studies[2]}") == [studies[0], studies[2]]

    plain = (await client.get("/dicomweb/studies", params={"StudyInstanceUID": studies[0]})).json()[0]
    assert "00080080" not in plain  # InstitutionName is not a study attribute QIDO must return
    assert plain["00080061"]["Value"] == ["CR"] and plain["00201206"]["Value"] == [1]
    extra = await client.get(
        "/dicomweb/studies", params={"StudyInstanceUID": studies[0], "includefield": "InstitutionName"}
    )
    assert extra.json()[0]["00080080"]["Value"] == ["General Hospital"]
    everything = await client.get(
        "/dicomweb/studies", params={"StudyInstanceUID": studies[0], "includefield": "all"}
    )
    assert everything.json()[0]["00180015"]["Value"] == ["CHEST"]  # BodyPartExamined, from the header

    series = (await client.get(f"/dicomweb/studies/{studies[2]}/series")).json()
    assert [s["00080060"]["Value"] for s in series] == [["CT"]]
    assert (
        await client.get(f"/dicomweb/studies/{studies[2]}/series", params={"Modality": "MR"})
    ).json() == []
    instances = (await client.get(f"/dicomweb/studies/{studies[0]}/instances")).json()
    assert instances[0]["00280010"]["Value"] == [64]  # Rows, from the stored header
    series_uid = instances[0]["0020000E"]["Value"][0]
    again = await client.get(f"/dicomweb/studies/{studies[0]}/series/{series_uid}/instances")
    assert again.json() == instances


async def test_qido_refusals(client: httpx.AsyncClient) -> None:
    _problem(await client.get("/dicomweb/studies", params={"NoSuchKeyword": "x"}), 400)
    _problem(await client.get("/dicomweb/studies", params={"limit": "-1"}), 400)
    _problem(await client.get("/dicomweb/studies", params={"00081111.00081150": "1.2"}), 400)
    _problem(await client.get(f"/dicomweb/studies/{generate_uid()}/instances"), 404)
    data = chest()
    assert (await _stow(client, [data])).status_code == 200
    study = dcmread(BytesIO(data)).StudyInstanceUID
    _problem(await client.get(f"/dicomweb/studies/{study}/series/{generate_uid()}/instances"), 404)


# ---- WADO-RS ----------------------------------------------------------------------------------------


async def test_wado_transfer_syntaxes(client: httpx.AsyncClient) -> None:
    study = generate_uid()
    rle = _rle_chest(study)
    implicit = make_dataset(study_uid=study)
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    r = await _stow(client, [rle, to_bytes(implicit)], study=study)
    assert r.status_code == 200, r.text
    original = dcmread(BytesIO(rle))
    url = f"/dicomweb/studies/{study}"

    default = _parts(await client.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'}))
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in default} == {ExplicitVRLittleEndian}
    decoded = next(ds for ds in default if ds.SOPInstanceUID == original.SOPInstanceUID)
    assert np.array_equal(decoded.pixel_array, original.pixel_array)

    as_stored = _parts(
        await client.get(
            url, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
        )
    )
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in as_stored} == {RLELossless, ImplicitVRLittleEndian}
    assert len(_parts(await client.get(url))) == 2  # no Accept: as stored

    jpeg = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
    _problem(await client.get(url, headers={"Accept": jpeg}), 406)
    _problem(await client.get(url, headers={"Accept": "application/json"}), 406)


async def test_wado_objects_metadata_and_missing_files(app: tuple[FastAPI, httpx.AsyncClient]) -> None:
    fastapi_app, client = app
    data = chest()
    ds = dcmread(BytesIO(data))
    assert (await _stow(client, [data])).status_code == 200
    base = f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
    one = _parts(await client.get(f"{base}/instances/{ds.SOPInstanceUID}"))
    assert [x.SOPInstanceUID for x in one] == [ds.SOPInstanceUID]
    assert len(_parts(await client.get(base))) == 1
    for url in (
        f"/dicomweb/studies/{ds.StudyInstanceUID}/metadata",
        f"{base}/metadata",
        f"{base}/instances/{ds.SOPInstanceUID}/metadata",
    ):
        r = await client.get(url)
        assert r.status_code == 200 and r.headers["content-type"] == STOW_TYPE
        [meta] = r.json()
        assert meta["00080018"]["Value"] == [ds.SOPInstanceUID] and "7FE00010" not in meta  # no pixel data

    _problem(await client.get(f"{base}/instances/{generate_uid()}"), 404)
    _problem(
        await client.get(f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{generate_uid()}/metadata"), 404
    )
    _problem(await client.get(f"/dicomweb/studies/{generate_uid()}"), 404)

    settings: Settings = fastapi_app.state.settings
    for path in settings.instances_dir.rglob("*.dcm"):  # what the retention sweep does to old studies
        path.unlink()
    problem = _problem(await client.get(base), 404)
    assert "retention" in problem["detail"]


async def test_wado_frames(client: httpx.AsyncClient) -> None:
    study = generate_uid()
    rle = dcmread(BytesIO(_rle_chest(study)))
    other = make_dataset(study_uid=study)
    del other.PixelData
    r = await _stow(client, [to_bytes(rle), to_bytes(other)], study=study)
    assert r.status_code == 200, r.text
    base = f"/dicomweb/studies/{study}/series/{rle.SeriesInstanceUID}/instances/{rle.SOPInstanceUID}"
    octets = 'multipart/related; type="application/octet-stream"'
    r = await client.get(f"{base}/frames/1", headers={"Accept": octets})
    assert r.status_code == 200 and r.headers["content-type"].startswith(octets), r.text
    [part] = _raw_parts(r)
    expected = rle.pixel_array.astype("<u2").tobytes()  # decoded from RLE, native little endian
    assert part == expected
    assert len(_raw_parts(await client.get(f"{base}/frames/1,1"))) == 2
    _problem(await client.get(f"{base}/frames/2"), 404)
    _problem(await client.get(f"{base}/frames/0"), 422)  # not a frame list: refused by the path pattern
    _problem(
        await client.get(f"{base}/frames/1", headers={"Accept": 'multipart/related; type="image/jpeg"'}), 406
    )
    no_pixels = f"/dicomweb/studies/{study}/series/{other.SeriesInstanceUID}/instances/{other.SOPInstanceUID}"
    _problem(await client.get(f"{no_pixels}/frames/1"), 404)


def _raw_parts(r: httpx.Response) -> list[bytes]:
    """Bodies of a multipart/related answer (RFC 2046 framing), whatever their type."""
    assert r.status_code == 200, r.text
    boundary = r.headers["content-type"].split("boundary=")[1].strip('"')
    chunks = r.content.split(f"--{boundary}".encode())[1:-1]
    return [chunk.split(b"\r\n\r\n", 1)[1][:-2] for chunk in chunks]
