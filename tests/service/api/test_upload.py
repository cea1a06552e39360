"""Request bodies split as they arrive and, past ``api.upload_memory_bytes``, spooled to disk instance by
instance (service/api/stow.py ``PartReader``, service/api/upload.py): the same parts and the same answers
as a body held whole, nothing left behind by a request that fails."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from service.api.stow import PartReader, split_parts
from service.config import Settings
from service.errors import MalformedMultipartError
from tests.service.api.test_studies import assert_problem, wait_result
from tests.service.conftest import running_app
from tests.service.dicom_factory import chest, head_ct_series, multipart_related

SPOOLED = {"api": {"upload_memory_bytes": 0}}


def _feed(reader: PartReader, body: bytes, size: int) -> list[bytes]:
    parts = [p for at in range(0, len(body), size) for p in reader.feed(body[at : at + size])]
    return [p.data for p in parts + reader.finish()]


@pytest.mark.parametrize("size", [1, 2, 7, 64, 1000, 1 << 20])
@pytest.mark.parametrize("preamble", [b"", b"a preamble, ignored (RFC 2046 5.1.1)\r\n", b"\r\n"])
def test_the_parts_are_the_same_whatever_the_chunks(size: int, preamble: bytes) -> None:
    """Chunk edges anywhere, inside a delimiter, a header or the preamble, change nothing."""
    datas = [b"first" * 40, b"", b"--b0undary-xy is not the delimiter\r\n" * 3, bytes(range(256))]
    body, ctype = multipart_related(datas)
    assert _feed(PartReader(ctype), preamble + body, size) == datas
    assert [p.data for p in split_parts(ctype, preamble + body)] == datas


@pytest.mark.parametrize("size", [1, 5, 1 << 20])
def test_a_body_without_its_closing_delimiter_or_any_is_refused(size: int) -> None:
    body, ctype = multipart_related([b"x" * 100])
    with pytest.raises(MalformedMultipartError, match="truncated"):
        _feed(PartReader(ctype), body[:-8], size)
    with pytest.raises(MalformedMultipartError):
        _feed(PartReader(ctype), b"no delimiter anywhere in this body", size)


def _left(settings: Settings) -> tuple[list[Path], list[Path]]:
    """(instance files, temporary files) under the instances directory."""
    root = Path(settings.instances_dir)
    return list(root.rglob("*.dcm")), list(root.rglob("*.tmp"))


@pytest.mark.anyio
@pytest.mark.parametrize("memory", [0, 1], ids=["spooled-from-the-first-part", "spooled-from-the-second"])
async def test_a_spooled_study_is_stored_and_analysed_from_its_files(
    make_settings: Callable[..., Settings], memory: int
) -> None:
    """Past ``api.upload_memory_bytes`` (here from the first or second part on) each instance is written as
    it arrives and the study analysed from its files: the same result as a body held in memory."""
    settings = make_settings(api={"upload_memory_bytes": memory})
    study = generate_uid()
    series = head_ct_series(4, study_uid=study)
    body, ctype = multipart_related([*series, series[0]])  # the first again: stored once
    async with running_app(settings) as (_app, client):
        r = await client.post(
            "/v1/studies", content=body, headers={"Content-Type": ctype, "Prefer": "wait=20"}
        )
        assert r.status_code == 200, r.text
        result = r.json()
        assert result["study_uid"] == study and result["status"] == "complete", result
        assert result["findings"] and result["findings"][0]["model"] == "ct-hemorrhage"
    files, temporary = _left(settings)
    assert len(files) == 4 and not temporary


@pytest.mark.anyio
async def test_a_spooled_request_with_a_bad_part_stores_the_others(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(**SPOOLED)
    study = generate_uid()
    body, ctype = multipart_related([chest(study_uid=study), b"not dicom at all"])
    async with running_app(settings) as (_app, client):
        r = await client.post("/v1/studies", content=body, headers={"Content-Type": ctype})
        problem = assert_problem(r, 409, "partial-store", "part 2")
        assert len(problem["stored"]) == 1
        assert (await wait_result(client, study))["status"] == "complete"
    files, temporary = _left(settings)
    assert len(files) == 1 and not temporary


@pytest.mark.anyio
async def test_a_spooled_request_that_fails_leaves_nothing(make_settings: Callable[..., Settings]) -> None:
    """Its first instances were written (staged) before the body turned out truncated: 400, and neither
    a file nor a row nor a temporary file remains."""
    settings = make_settings(**SPOOLED)
    study = generate_uid()
    body, ctype = multipart_related(head_ct_series(3, study_uid=study))
    async with running_app(settings) as (_app, client):
        r = await client.post("/v1/studies", content=body[:-8], headers={"Content-Type": ctype})
        assert_problem(r, 400, "malformed-multipart", "body")
        assert (await client.get(f"/v1/studies/{study}/result")).status_code == 404
    assert _left(settings) == ([], [])


@pytest.mark.anyio
async def test_a_large_body_is_streamed_not_held(make_settings: Callable[..., Settings]) -> None:
    """A chunked body (no Content-Length) of 24 instances (~8 KiB each) under a 32 KiB memory budget:
    held for the first few, then spooled, all stored."""
    settings = make_settings(api={"upload_memory_bytes": 32 << 10})
    study = generate_uid()
    series = head_ct_series(24, study_uid=study)
    body, ctype = multipart_related(series)

    async def chunks() -> AsyncIterator[bytes]:
        for at in range(0, len(body), 4096):
            yield body[at : at + 4096]

    async with running_app(settings) as (_app, client):
        r = await client.post("/v1/studies", content=chunks(), headers={"Content-Type": ctype})
        assert r.status_code == 202, r.text
        assert (await wait_result(client, study, timeout=30))["status"] == "complete"
    files, temporary = _left(settings)
    assert len(files) == 24 and not temporary
