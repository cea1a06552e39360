"""WADO-RS: retrieve a study, series or instance (PS3.18 10.4) and its metadata, ours included.

Instances go out as ``multipart/related; type="application/dicom"``, one Part 10 file per part, streamed
from disk one file at a time. The transfer syntax follows the Accept header (PS3.18 8.7.3.5.2):
``transfer-syntax=*`` sends each file as stored; no parameter means Explicit VR Little Endian, the default
of ``application/dicom``, so a compressed or implicit-VR file is decoded and re-encoded on the way out; an
explicit UID is honoured when the file is stored in it (else 406). No Accept header, or ``*/*``, sends
files as stored. Retrieve Frames (``.../frames/1,2``) answers each frame's decoded pixel values as
``application/octet-stream`` in Explicit VR Little Endian, what a web viewer such as OHIF fetches to draw.
Metadata is the stored header up to the pixel data, in dicom+json (PS3.18 F.2), so a viewer can list our
SR's content tree and the preview's attributes; bulk data other than pixels is inline.

The SR, preview and KOS objects we rendered (kept under ``outputs_dir`` until delivered) are objects of their
study here, listed by QIDO-RS and retrieved the same way (:mod:`service.store.dicomweb_query`). Unknown
UIDs, and files removed by retention, are 404 problems.
"""

from __future__ import annotations

import asyncio
import pathlib
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from io import BytesIO
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import StreamingResponse
from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.pixels import pixel_array
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian
from python_multipart.multipart import parse_options_header

from service.api.deps import StateDep, StudyUID
from service.api.dicomweb_common import (
    DICOM_JSON,
    JSON_ARRAY,
    DicomJSONResponse,
    SeriesUID,
    SopUID,
    dicom_json,
    query_for,
)
from service.dicom.decode import contained_decoder
from service.errors import (
    NotAcceptableError,
    ObjectNotFoundError,
    StudyNotFoundError,
    UnsupportedTransferSyntaxError,
)
from service.store.dicomweb_query import DicomwebQuery, StoredObject, read_header

__all__ = ["accepted_syntaxes", "accepts_octet_stream", "router"]

router = APIRouter(tags=["dicomweb"])

ANY = "*"
FRAME_LIST = r"^[1-9][0-9]{0,8}(,[1-9][0-9]{0,8}){0,99}$"
"""Frame numbers in a Retrieve Frames path (PS3.18 10.4.1.1.3): 1-based, comma-separated."""
_MULTIPART: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {
            'multipart/related; type="application/dicom"': {"schema": {"type": "string", "format": "binary"}}
        }
    },
    404: {},
    406: {},
}
_METADATA: dict[int | str, dict[str, Any]] = {200: {"content": {DICOM_JSON: {"schema": JSON_ARRAY}}}, 404: {}}


def accepted_syntaxes(accept: str | None) -> set[str]:
    """Transfer syntaxes the Accept header allows for instances; ``*`` means as stored.

    Raises
    ------
    NotAcceptableError
        The header names no representation of instances we send (multipart/related of application/dicom).
    """
    if not accept or not accept.strip():
        return {ANY}
    wanted: set[str] = set()
    for media_range in accept.split(","):
        media, params = parse_options_header(media_range.strip())
        kind = media.decode("latin-1").lower()
        options = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in params.items()}
        if kind in ("*/*", "multipart/*"):
            wanted.add(ANY)
        elif kind == "multipart/related" and options.get("type", "application/dicom").lower() in (
            "application/dicom",
            "application/*",
            "*/*",
        ):
            wanted.add(options.get("transfer-syntax", ExplicitVRLittleEndian))
    if not wanted:
        raise NotAcceptableError(
            'instances are sent as multipart/related; type="application/dicom"; ask for that in Accept',
            part="Accept",
        )
    return wanted


def _stored_syntax(obj: StoredObject) -> str:
    if obj.transfer_syntax_uid:
        return obj.transfer_syntax_uid
    return str(read_file_meta_info(obj.path).TransferSyntaxUID)


def _plan(objects: list[StoredObject], wanted: set[str]) -> list[tuple[StoredObject, str, bool]]:
    """(object, syntax it goes out in, transcode?) for each; 406 if one cannot go out as asked."""
    plan = []
    for obj in objects:
        stored = _stored_syntax(obj)
        if ANY in wanted or stored in wanted:
            plan.append((obj, stored, False))
        elif ExplicitVRLittleEndian in wanted and stored != ExplicitVRBigEndian:
            plan.append((obj, str(ExplicitVRLittleEndian), True))
        else:
            raise NotAcceptableError(
                f"an instance is stored in {UID(stored).name} and cannot be sent in the transfer syntax"
                " asked for; ask for transfer-syntax=* or 1.2.840.10008.1.2.1",
                part="Accept",
            )
    return plan


@contextmanager
def _decoding(what: str) -> Iterator[None]:
    """A stored instance whose pixels cannot be decoded (the listener stores what it cannot analyse, and a
    native decoder may panic on corrupt data): a 422 problem naming it, never a 500."""
    try:
        with contained_decoder():
            yield
    except Exception as exc:
        raise UnsupportedTransferSyntaxError(
            f"the stored pixel data of {what} cannot be decoded ({type(exc).__name__})", part="frames"
        ) from exc


def _read(path: pathlib.Path, transcode: bool) -> bytes:
    """The file as stored, or re-encoded as Explicit VR Little Endian (decompressed if need be)."""
    if not transcode:
        return path.read_bytes()
    ds = dcmread(path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        # Explicit VR Little Endian; the same instance, so the same SOP Instance UID (pydicom would make one)
        with _decoding("the instance"):
            ds.decompress(generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _objects(
    db: DicomwebQuery, study: str, series: str | None = None, sop: str | None = None
) -> list[StoredObject]:
    objects = db.objects(study, series, sop)
    if not objects:
        if not db.study_exists(study):
            raise StudyNotFoundError("no instance of this study has been received", part="study_uid")
        what = "instance" if sop else "series"
        raise ObjectNotFoundError(f"the study has no {what} with this UID", part=f"{what}_uid")
    if any(not o.path.exists() for o in objects):
        raise ObjectNotFoundError(
            "the files of this study were removed by the retention policy; only its results remain",
            part="study_uid",
        )
    return objects


async def _retrieve(
    state: StateDep, accept: str | None, study: str, series: str | None = None, sop: str | None = None
) -> StreamingResponse:
    wanted = accepted_syntaxes(accept)

    def prepare() -> list[tuple[StoredObject, str, bool]]:
        return _plan(_objects(query_for(state), study, series, sop), wanted)

    plan = await asyncio.to_thread(prepare)

    async def parts() -> AsyncIterator[tuple[str, bytes]]:
        for obj, syntax, transcode in plan:
            yield (
                f"application/dicom; transfer-syntax={syntax}",
                await asyncio.to_thread(_read, obj.path, transcode),
            )

    return _multipart(parts(), "application/dicom")


def _multipart(parts: AsyncIterator[tuple[str, bytes]], kind: str) -> StreamingResponse:
    """A ``multipart/related`` answer (RFC 2387) streamed part by part: (Content-Type, bytes) each."""
    boundary = uuid.uuid4().hex

    async def body() -> AsyncIterator[bytes]:
        async for content_type, data in parts:
            yield f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode()
            yield data
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    return StreamingResponse(body(), media_type=f'multipart/related; type="{kind}"; boundary="{boundary}"')


def accepts_octet_stream(accept: str | None) -> bool:
    """Does Accept allow frames as ``multipart/related; type="application/octet-stream"`` in Explicit VR
    Little Endian (PS3.18 8.7.3.3.2: the default syntax of octet-stream bulk data)?"""
    if not accept or not accept.strip():
        return True
    for media_range in accept.split(","):
        media, params = parse_options_header(media_range.strip())
        kind = media.decode("latin-1").lower()
        options = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in params.items()}
        syntax = options.get("transfer-syntax", ExplicitVRLittleEndian)
        if kind in ("*/*", "multipart/*"):
            return True
        if (
            kind == "multipart/related"
            and options.get("type", "").lower() in ("application/octet-stream", "application/*", "*/*")
            and syntax in (ANY, ExplicitVRLittleEndian)
        ):
            return True
    return False


def _frames(path: pathlib.Path, numbers: list[int]) -> list[bytes]:
    """The frames' pixel values, decoded, as native little-endian bytes (blocking)."""
    header = dcmread(path, defer_size=1024)  # deferred: the pixels stay on disk until a frame is decoded
    if not any(k in header for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ObjectNotFoundError("the instance has no pixel data, so no frames", part="frames")
    count = int(header.get("NumberOfFrames", 1) or 1)
    beyond = [n for n in numbers if n > count]
    if beyond:
        raise ObjectNotFoundError(
            f"the instance has {count} frame(s); there is no frame {beyond[0]}", part="frames"
        )
    answers = []
    for n in numbers:
        with _decoding(f"frame {n}"):
            frame = pixel_array(path, index=n - 1)
        answers.append(frame.astype(frame.dtype.newbyteorder("<"), copy=False).tobytes())
    return answers


@router.get(
    "/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/frames/{frames}",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {'multipart/related; type="application/octet-stream"': {"schema": {"type": "string"}}}
        },
        422: {},
        404: {},
        406: {},
    },
)
async def retrieve_frames(
    study_uid: StudyUID,
    series_uid: SeriesUID,
    sop_uid: SopUID,
    frames: Annotated[str, Path(pattern=FRAME_LIST, description="1-based frame numbers, e.g. 1,2,3")],
    state: StateDep,
    request: Request,
) -> StreamingResponse:
    """Retrieve Frames (PS3.18 10.4.1.1.3): decoded pixel values, one part per frame, for viewers (OHIF)."""
    if not accepts_octet_stream(request.headers.get("accept")):
        raise NotAcceptableError(
            'frames are sent as multipart/related; type="application/octet-stream" in Explicit VR Little'
            " Endian; ask for that in Accept",
            part="Accept",
        )
    numbers = [int(n) for n in frames.split(",")]  # FRAME_LIST checked the form

    def load() -> list[bytes]:
        [obj] = _objects(query_for(state), study_uid, series_uid, sop_uid)
        return _frames(obj.path, numbers)

    data = await asyncio.to_thread(load)

    async def parts() -> AsyncIterator[tuple[str, bytes]]:
        for frame in data:
            yield f"application/octet-stream; transfer-syntax={ExplicitVRLittleEndian}", frame

    return _multipart(parts(), "application/octet-stream")


async def _metadata(
    state: StateDep, study: str, series: str | None = None, sop: str | None = None
) -> DicomJSONResponse:
    def build() -> list[dict[str, object]]:
        answers = []
        for obj in _objects(query_for(state), study, series, sop):
            header = read_header(obj.path)
            if header is not None:
                answers.append(dicom_json(header))
        return answers

    return DicomJSONResponse(await asyncio.to_thread(build))


@router.get("/studies/{study_uid}", response_class=StreamingResponse, responses=_MULTIPART)
async def retrieve_study(study_uid: StudyUID, state: StateDep, request: Request) -> StreamingResponse:
    """Retrieve Study (PS3.18 10.4.1): every instance, our SR and preview included."""
    return await _retrieve(state, request.headers.get("accept"), study_uid)


@router.get("/studies/{study_uid}/metadata", response_class=DicomJSONResponse, responses=_METADATA)
async def retrieve_study_metadata(study_uid: StudyUID, state: StateDep) -> DicomJSONResponse:
    """Retrieve Study Metadata (PS3.18 10.4.1): one dicom+json header per instance."""
    return await _metadata(state, study_uid)


@router.get(
    "/studies/{study_uid}/series/{series_uid}", response_class=StreamingResponse, responses=_MULTIPART
)
async def retrieve_series(
    study_uid: StudyUID, series_uid: SeriesUID, state: StateDep, request: Request
) -> StreamingResponse:
    """Retrieve Series (PS3.18 10.4.1)."""
    return await _retrieve(state, request.headers.get("accept"), study_uid, series_uid)


@router.get(
    "/studies/{study_uid}/series/{series_uid}/metadata", response_class=DicomJSONResponse, responses=_METADATA
)
async def retrieve_series_metadata(
    study_uid: StudyUID, series_uid: SeriesUID, state: StateDep
) -> DicomJSONResponse:
    """Retrieve Series Metadata (PS3.18 10.4.1)."""
    return await _metadata(state, study_uid, series_uid)


@router.get(
    "/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}",
    response_class=StreamingResponse,
    responses=_MULTIPART,
)
async def retrieve_instance(
    study_uid: StudyUID,
    series_uid: SeriesUID,
    sop_uid: SopUID,
    state: StateDep,
    request: Request,
) -> StreamingResponse:
    """Retrieve Instance (PS3.18 10.4.1)."""
    return await _retrieve(state, request.headers.get("accept"), study_uid, series_uid, sop_uid)


@router.get(
    "/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/metadata",
    response_class=DicomJSONResponse,
    responses=_METADATA,
)
async def retrieve_instance_metadata(
    study_uid: StudyUID, series_uid: SeriesUID, sop_uid: SopUID, state: StateDep
) -> DicomJSONResponse:
    """Retrieve Instance Metadata (PS3.18 10.4.1)."""
    return await _metadata(state, study_uid, series_uid, sop_uid)
