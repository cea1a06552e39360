"""POST /v1/studies and GET /v1/studies/{uid}/result over real HTTP semantics (ASGI transport)."""

from __future__ import annotations

import asyncio
import logging
import warnings
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.uid import MPEG2MPML, generate_uid

from service.config import Settings
from tests.service.conftest import running_app
from tests.service.dicom_factory import (
    SENTINEL_ACCESSION,
    SENTINEL_ID,
    SENTINEL_NAME,
    chest,
    head_ct_series,
    make_dataset,
    multipart_related,
    to_bytes,
)

pytestmark = pytest.mark.anyio

DICOM = {"Content-Type": "application/dicom"}


def assert_problem(r: httpx.Response, status: int, slug: str, part: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["status"] == status
    assert body["type"].endswith(slug), body
    assert body["title"] and body["detail"]
    if part is not None:
        assert body.get("part") == part, body
    return body


async def wait_result(client: httpx.AsyncClient, study_uid: str, timeout: float = 10.0) -> dict:
    for _ in range(int(timeout / 0.05)):
        r = await client.get(f"/v1/studies/{study_uid}/result")
        if r.status_code == 200:
            return r.json()
        assert r.status_code == 202, r.text
        assert r.headers["retry-after"]
        await asyncio.sleep(0.05)
    raise AssertionError("no result in time")


class TestContentTypes:
    async def test_application_dicom_without_wait_is_202_with_location(self, settings: Settings) -> None:
        study = generate_uid()
        async with running_app(settings) as (_app, client):
            r = await client.post("/v1/studies", content=chest(study_uid=study), headers=DICOM)
            assert r.status_code == 202, r.text
            assert r.headers["location"] == f"/v1/studies/{study}/result"
            result = await wait_result(client, study)
            assert result["study_uid"] == study
            assert result["status"] == "complete"

    async def test_multipart_related(self, settings: Settings) -> None:
        study = generate_uid()
        body, ctype = multipart_related([chest(study_uid=study), chest(study_uid=study)])
        async with running_app(settings) as (_app, client):
            r = await client.post(
                "/v1/studies", content=body, headers={"Content-Type": ctype, "Prefer": "wait=10"}
            )
            assert r.status_code == 200, r.text
            result = r.json()
            assert result["study_uid"] == study
            assert len({f["key_instance_uid"] for f in result["findings"]}) >= 1

    async def test_multipart_form_data(self, settings: Settings) -> None:
        study = generate_uid()
        files = [
            ("file", ("a.dcm", chest(study_uid=study), "application/dicom")),
            ("file", ("b.dcm", chest(study_uid=study), "application/octet-stream")),
        ]
        async with running_app(settings) as (_app, client):
            r = await client.post(
                "/v1/studies", files=files, data={"note": "x"}, headers={"Prefer": "wait=10"}
            )
            assert r.status_code == 200, r.text
            assert r.json()["status"] == "complete"


class TestBadInput:
    async def test_not_dicom(self, settings: Settings) -> None:
        async with running_app(settings) as (_app, client):
            r = await client.post("/v1/studies", content=b"hello, not dicom" * 20, headers=DICOM)
            assert_problem(r, 415, "not-dicom", "part 1")

    async def test_not_dicom_names_form_file(self, settings: Settings) -> None:
        async with running_app(settings) as (_app, client):
            r = await client.post("/v1/studies", files=[("file", ("notes.txt", b"plain text", "text/plain"))])
            assert_problem(r, 415, "not-dicom", "part 1 (notes.txt)")

    async def test_no_pixel_data(self, settings: Settings) -> None:
        ds = make_dataset()
        del ds.PixelData
        async with running_app(settings) as (_app, client):
            r = await client.post("/v1/studies", content=to_bytes(ds), headers=DICOM)
            assert_problem(r, 422, "no-pixel-data", "part 1")

    async def test_transfer_syntax_without_decoder(self, settings: Settings) -> None:
        ds = make_dataset()
        ds.file_meta.TransferSyntaxUID = MPEG2MPML  # MPEG2: no pydicom decoder
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([b"\x00" * 16])
        data = to_bytes(ds)
        async with running_app(settings) as (_app, client):
            r = await client.post("/v1/studies", content=data, headers=DICOM)
            body = assert_problem(r, 422, "unsupported-transfer-syntax", "part 1")
            assert "1.2.840.10008.1.2.4.100" in body["detail"]

    @pytest.mark.parametrize(
        ("keyword", "value"),
        [("StudyInstanceUID", "1.2.abc"), ("SeriesInstanceUID", "1." + "2" * 70), ("SOPInstanceUID", None)],
    )
    async def test_bad_uid(self, settings: Settings, keyword: str, value: str | None) -> None:
        ds = make_dataset()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about the bad value we set on purpose
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
            data = to_bytes(ds)
        async with running_app(settings) as (_app, client):
            r = await client.post("/v1/studies", content=data, headers=DICOM)
            body = assert_problem(r, 422, "invalid-uid", "part 1")
            assert keyword in body["detail"]

    async def test_path_traversal_uid_refused(self, settings: Settings) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = to_bytes(make_dataset(study_uid="../../etc"))
        async with running_app(settings) as (_app, client):
            r = await client.post("/v1/studies", content=data, headers=DICOM)
            assert_problem(r, 422, "invalid-uid", "part 1")
        assert not (settings.data_dir.parent / "etc").exists()

    @pytest.mark.parametrize(
        ("ctype", "body", "status", "slug", "part"),
        [
            (
                'multipart/related; type="application/dicom"',
                b"--x\r\n\r\nabc",
                400,
                "malformed-multipart",
                "Content-Type",
            ),
            (
                "multipart/related; boundary=zzz",
                b"garbage without boundary",
                400,
                "malformed-multipart",
                "body",
            ),
            (
                "multipart/related; boundary=zzz",
                b"--zzz\r\nContent-Type: application/dicom\r\n\r\nabc",
                400,
                "malformed-multipart",
                "body",
            ),
            (
                'multipart/related; type="application/dicom+json"; boundary=zzz',
                b"--zzz--\r\n",
                415,
                "unsupported-media-type",
                "Content-Type",
            ),
            ("application/dicom", b"", 400, "malformed-multipart", "body"),
            ("text/plain", b"abc", 415, "unsupported-media-type", "Content-Type"),
        ],
    )
    async def test_bad_request_bodies(
        self, settings: Settings, ctype: str, body: bytes, status: int, slug: str, part: str
    ) -> None:
        async with running_app(settings) as (_app, client):
            r = await client.post("/v1/studies", content=body, headers={"Content-Type": ctype})
            assert_problem(r, status, slug, part)

    async def test_body_too_large(self, make_settings) -> None:
        settings = make_settings(api={"max_body_bytes": 1000})
        async with running_app(settings) as (_app, client):
            r = await client.post("/v1/studies", content=chest(), headers=DICOM)
            assert_problem(r, 413, "payload-too-large", "body")

    async def test_partial_success_is_409_listing_failures(self, settings: Settings) -> None:
        study = generate_uid()
        good = chest(study_uid=study)
        body, ctype = multipart_related([good, b"not dicom at all"])
        async with running_app(settings) as (_app, client):
            r = await client.post("/v1/studies", content=body, headers={"Content-Type": ctype})
            problem = assert_problem(r, 409, "partial-store", "part 2")
            assert [f["part"] for f in problem["failed"]] == ["part 2"]
            assert problem["failed"][0]["status"] == 415
            assert len(problem["stored"]) == 1
            assert r.headers["location"] == f"/v1/studies/{study}/result"
            assert (await wait_result(client, study))["status"] == "complete"

    async def test_part_with_other_content_type_is_refused(self, settings: Settings) -> None:
        boundary = "bnd"
        body = (
            f"--{boundary}\r\nContent-Type: application/dicom+json\r\n\r\n{{}}\r\n--{boundary}--\r\n".encode()
        )
        async with running_app(settings) as (_app, client):
            r = await client.post(
                "/v1/studies",
                content=body,
                headers={"Content-Type": f"multipart/related; boundary={boundary}"},
            )
            problem = assert_problem(r, 415, "not-dicom", "part 1")
            assert "application/dicom+json" in problem["detail"]

    async def test_all_parts_bad_is_422(self, settings: Settings) -> None:
        body, ctype = multipart_related([b"nope", b"nope either"])
        async with running_app(settings) as (_app, client):
            r = await client.post("/v1/studies", content=body, headers={"Content-Type": ctype})
            problem = assert_problem(r, 422, "invalid-instance", "part 1")
            assert len(problem["failed"]) == 2

    async def test_unknown_study_is_404_problem(self, settings: Settings) -> None:
        async with running_app(settings) as (_app, client):
            r = await client.get(f"/v1/studies/{generate_uid()}/result")
            assert_problem(r, 404, "study-not-found", "study_uid")
            r = await client.get("/v1/studies/not..a..uid/result")
            assert_problem(r, 422, "invalid-uid", "study_uid")
            r = await client.get("/no/such/route")
            assert r.status_code == 404
            assert r.headers["content-type"].startswith("application/problem+json")

    async def test_bad_query_is_problem(self, settings: Settings) -> None:
        async with running_app(settings) as (_app, client):
            r = await client.post("/v1/studies?priority=whenever", content=chest(), headers=DICOM)
            assert r.status_code == 422
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.json()["part"] == "query.priority"


async def test_duplicate_sop_stored_once(settings: Settings) -> None:
    data = chest()
    async with running_app(settings) as (app, client):
        first = await client.post("/v1/studies", content=data, headers={**DICOM, "Prefer": "wait=10"})
        second = await client.post("/v1/studies", content=data, headers={**DICOM, "Prefer": "wait=10"})
        assert first.status_code == 200
        assert second.status_code == 200
        assert second.json() == first.json()  # nothing new arrived: same result, no re-run
        study = first.json()["study_uid"]
        assert await app.state.triage.results.count(study) == 1
    files = list(Path(settings.instances_dir).rglob("*.dcm"))
    assert len(files) == 1
    assert not list(Path(settings.instances_dir).rglob("*.tmp"))


async def test_late_instance_supersedes(settings: Settings) -> None:
    study = generate_uid()
    async with running_app(settings) as (_app, client):
        first = await client.post(
            "/v1/studies", content=chest(study_uid=study), headers={**DICOM, "Prefer": "wait=10"}
        )
        second = await client.post(
            "/v1/studies", content=chest(study_uid=study), headers={**DICOM, "Prefer": "wait=10"}
        )
        assert second.status_code == 200
        assert second.json()["supersedes"] == first.json()["result_id"]
        assert (await wait_result(client, study))["result_id"] == second.json()["result_id"]


async def test_head_ct_series_key_slice(settings: Settings) -> None:
    parts = head_ct_series(5)
    body, ctype = multipart_related(parts)
    async with running_app(settings) as (_app, client):
        r = await client.post(
            "/v1/studies", content=body, headers={"Content-Type": ctype, "Prefer": "wait=10"}
        )
        assert r.status_code == 200, r.text
        result = r.json()
    (finding,) = result["findings"]
    assert finding["model"] == "ct-hemorrhage"
    assert finding["code"] == {"scheme": "SCT", "value": "1386000", "meaning": finding["code"]["meaning"]}
    assert finding["key_instance_uid"] and finding["key_frame"] == 1
    # 60 HU in a 40/80 window is bright: positive, and ct-hemorrhage is a stat label.
    assert finding["positive"] and finding["urgent"]
    assert result["priority"] == "stat"
    assert result["models"][0]["provider"] == "CPUExecutionProvider"
    stamps = result["timestamps"]
    assert all(stamps[k] for k in stamps), stamps


async def test_detection_boxes_in_source_pixels(settings: Settings) -> None:
    import numpy as np

    pixels = np.zeros((256, 128), dtype=np.uint16)  # not the model's 64x64 and not square
    pixels[100:140, 60:100] = 4000
    data = to_bytes(make_dataset(rows=256, columns=128, pixels=pixels))
    async with running_app(settings) as (_app, client):
        r = await client.post("/v1/studies", content=data, headers={**DICOM, "Prefer": "wait=10"})
        result = r.json()
    nodule = next(f for f in result["findings"] if f["model"] == "cxr-nodule")
    assert nodule["positive"] and not nodule["urgent"]
    box = nodule["detections"][0]
    assert box["frame"] == 1
    cx, cy = (box["x0"] + box["x1"]) / 2, (box["y0"] + box["y1"]) / 2
    assert 50 <= cx <= 110 and 90 <= cy <= 150, box
    assert 0 <= box["x0"] < box["x1"] <= 128 and 0 <= box["y0"] < box["y1"] <= 256


async def test_not_analysed_is_never_silent(settings: Settings) -> None:
    study = generate_uid()
    mr = to_bytes(make_dataset(study_uid=study, modality="MR", body_part="KNEE"))
    nodesc = to_bytes(
        make_dataset(study_uid=study, modality="DX", body_part=None, series_description="PA CHEST")
    )
    body, ctype = multipart_related([mr, nodesc])
    async with running_app(settings) as (_app, client):
        r = await client.post(
            "/v1/studies", content=body, headers={"Content-Type": ctype, "Prefer": "wait=10"}
        )
        result = r.json()
    assert result["status"] == "partial"
    (skipped,) = result["not_analysed"]
    assert skipped["reason"].startswith("not analysed: no routing rule for modality MR")
    assert {f["model"] for f in result["findings"]} == {"cxr-pneumothorax", "cxr-nodule"}  # keyword fallback


async def test_no_phi_in_logs(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with running_app(settings) as (_app, client):
        r = await client.post("/v1/studies", content=chest(), headers={**DICOM, "Prefer": "wait=10"})
        assert r.status_code == 200
        await client.post("/v1/studies", content=b"junk", headers=DICOM)
    text = caplog.text + " ".join(str(rec.args) for rec in caplog.records)
    assert "job done" in caplog.text
    for secret in (SENTINEL_NAME, SENTINEL_ID, SENTINEL_ACCESSION, "19010101", "Sentinel"):
        assert secret not in text


class TestOnePass:
    """An HTTP study complete on arrival: analysed from the request's own datasets while the files are
    written, its job created and leased in the ingest transaction, nothing read back from disk."""

    @staticmethod
    def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
        import pydicom

        import service.study_inputs

        reads: list[str] = []
        real = pydicom.dcmread  # what study_inputs imported

        def counting(path, *args, **kwargs):  # the real reader, counted
            reads.append(str(path))
            return real(path, *args, **kwargs)

        monkeypatch.setattr(service.study_inputs, "dcmread", counting)
        return reads

    async def test_the_job_is_leased_at_ingest_and_nothing_is_read_back(
        self, settings: Settings, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from sqlalchemy import select

        from service.store.db import InstanceRow, JobRow

        reads = self._count_reads(monkeypatch)
        study = generate_uid()
        async with running_app(settings) as (app, client):
            r = await client.post(
                "/v1/studies", content=chest(study_uid=study), headers={**DICOM, "Prefer": "wait=10"}
            )
            assert r.status_code == 200, r.text
            assert r.json()["status"] == "complete"
            with app.state.triage.db.engine.connect() as c:
                job = c.execute(select(JobRow.created_at, JobRow.claimed_at, JobRow.state)).one()
                (path,) = c.scalars(select(InstanceRow.path)).all()
        assert job.claimed_at == job.created_at and job.state == "done"  # one transaction: created and leased
        assert reads == []  # analysed from the parsed request
        assert (settings.instances_dir / path).read_bytes()  # and durable before the answer

    async def test_a_late_instance_reads_only_the_earlier_ones_back(
        self, settings: Settings, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        study = generate_uid()
        async with running_app(settings) as (_app, client):
            first = await client.post(
                "/v1/studies", content=chest(study_uid=study), headers={**DICOM, "Prefer": "wait=10"}
            )
            reads = self._count_reads(monkeypatch)
            second = await client.post(
                "/v1/studies", content=chest(study_uid=study), headers={**DICOM, "Prefer": "wait=10"}
            )
        assert second.status_code == 200 and second.json()["supersedes"] == first.json()["result_id"]
        # the first request's instance only (its header, then its pixels); the second's came from memory
        assert len(set(reads)) == 1 and len(reads) <= 2

    async def test_without_wait_the_answer_is_202_and_the_job_finishes_anyway(
        self, settings: Settings
    ) -> None:
        study = generate_uid()
        async with running_app(settings) as (_app, client):
            r = await client.post("/v1/studies", content=chest(study_uid=study), headers=DICOM)
            assert r.status_code == 202
            assert (await wait_result(client, study))["status"] == "complete"


async def test_a_series_short_of_its_declared_count_is_never_complete(settings: Settings) -> None:
    """Issue 20: a result computed on part of a series says so (status partial, the counts), and a full
    series is labelled complete by its counts."""
    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO

    def declaring(parts: list[bytes], n: int) -> list[bytes]:
        out = []
        for part in parts:
            ds = dcmread(DicomBytesIO(part))
            ds.ImagesInAcquisition = n
            out.append(to_bytes(ds))
        return out

    async with running_app(settings) as (_app, client):
        results = []
        for declared in (5, 8):
            body, ctype = multipart_related(declaring(head_ct_series(5), declared))
            r = await client.post(
                "/v1/studies", content=body, headers={"Content-Type": ctype, "Prefer": "wait=10"}
            )
            assert r.status_code == 200, r.text
            results.append(r.json())
    full, short = results
    assert full["status"] == "complete"
    assert full["assembly"] == {"complete": True, "instances_analysed": 5, "instances_declared": 5}
    assert short["status"] == "partial" and short["findings"]
    assert short["assembly"] == {"complete": False, "instances_analysed": 5, "instances_declared": 8}


class TestDicomBeforeItsRows:
    async def test_a_study_acknowledged_over_dicom_is_202_until_its_rows_are_committed(
        self, make_settings
    ) -> None:
        """A C-STORE is answered once its file is durable; its row follows in a group commit. In between
        the result endpoint says "being analysed" (202), never "no such study" (404)."""
        from pydicom import dcmread
        from pynetdicom import AE

        settings: Settings = make_settings(dicom={"enabled": True, "commit_delay_seconds": 600})
        data = chest()
        ds = dcmread(__import__("io").BytesIO(data))
        async with running_app(settings) as (app, client):
            listener = app.state.triage.listener

            def send() -> int:
                ae = AE(ae_title="MODALITY")
                ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
                assoc = ae.associate("127.0.0.1", listener.port, ae_title="PACS_TRIAGE")
                assert assoc.is_established
                try:
                    return int(assoc.send_c_store(ds).Status)
                finally:
                    assoc.release()

            assert await asyncio.to_thread(send) == 0x0000
            r = await client.get(f"/v1/studies/{ds.StudyInstanceUID}/result")
            assert_problem(r, 202, "result-not-ready")
            assert listener.rows_waiting(str(ds.StudyInstanceUID))
        assert not listener.rows_waiting(str(ds.StudyInstanceUID))  # the stop committed the row


class TestWaitingForAResult:
    """``GET .../result`` with ``Prefer: wait=N`` (RFC 7240): held until the result is stored, woken by it."""

    async def test_the_answer_comes_when_the_result_is_stored_not_from_polling(self, make_settings) -> None:
        settings: Settings = make_settings(inference={"providers": "cpu", "debug_delay_ms": 400})
        study = generate_uid()
        async with running_app(settings) as (app, client):
            results = app.state.triage.results
            real, reads = results.status, []

            async def counted(study_uid: str) -> Any:
                reads.append(study_uid)
                return await real(study_uid)

            r = await client.post("/v1/studies", content=chest(study_uid=study), headers=DICOM)
            assert r.status_code == 202
            results.status = counted
            r = await client.get(f"/v1/studies/{study}/result", headers={"Prefer": "wait=10"})
            assert r.status_code == 200, r.text
            assert r.json()["study_uid"] == study and r.json()["status"] == "complete"
            assert r.headers["preference-applied"] == "wait=10"
            assert reads == [study, study]  # one read before the wait, one after the stored result woke it

    async def test_a_wait_that_runs_out_is_a_202_as_without_it(self, make_settings) -> None:
        settings: Settings = make_settings(inference={"providers": "cpu", "debug_delay_ms": 3000})
        study = generate_uid()
        async with running_app(settings) as (_app, client):
            await client.post("/v1/studies", content=chest(study_uid=study), headers=DICOM)
            started = asyncio.get_running_loop().time()
            r = await client.get(f"/v1/studies/{study}/result", headers={"Prefer": "wait=0.3"})
            assert asyncio.get_running_loop().time() - started >= 0.3
            body = assert_problem(r, 202, "result-not-ready")
            assert body["location"] == f"/v1/studies/{study}/result" and r.headers["retry-after"]

    async def test_an_unknown_study_is_404_at_once(self, settings: Settings) -> None:
        async with running_app(settings) as (_app, client):
            started = asyncio.get_running_loop().time()
            r = await client.get(f"/v1/studies/{generate_uid()}/result", headers={"Prefer": "wait=30"})
            assert asyncio.get_running_loop().time() - started < 5
            assert_problem(r, 404, "study-not-found", part="study_uid")
