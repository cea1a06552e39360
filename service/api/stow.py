"""Request bodies → DICOM parts: ``multipart/related; type="application/dicom"`` (STOW-RS, PS3.18 10.5),
``multipart/form-data`` (file fields) or one ``application/dicom`` body.

Multipart bodies are split by python-multipart's streaming parser (the one Starlette uses for forms), for
both ``related`` and ``form-data``: the framing is the same (RFC 2046), only the part headers differ.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError, MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from service.errors import MalformedMultipartError, PayloadTooLargeError, UnsupportedMediaTypeError

__all__ = ["BodyPart", "read_body", "split_parts"]

DICOM_TYPES = {"application/dicom", "application/octet-stream"}


@dataclass
class BodyPart:
    """One part of a request: its 1-based index, file name if any, content type and bytes."""

    index: int
    filename: str | None
    content_type: str | None
    data: bytes
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """How errors name the part: ``part 2 (chest.dcm)``; never more than a file name."""
        return f"part {self.index}" + (f" ({self.filename})" if self.filename else "")


async def read_body(stream: AsyncIterator[bytes], content_length: str | None, limit: int) -> bytes:
    """The whole body, refusing more than ``limit`` bytes before reading it where the length is declared."""
    if content_length and content_length.isdigit() and int(content_length) > limit:
        raise PayloadTooLargeError(f"the body is {content_length} bytes; the limit is {limit}", part="body")
    chunks: list[bytes] = []
    size = 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"the body is larger than the limit of {limit} bytes", part="body")
        chunks.append(chunk)
    return b"".join(chunks)


def _media_type(content_type: str | None) -> tuple[str, dict[str, str]]:
    if not content_type:
        return "", {}
    mt, params = parse_options_header(content_type)
    return mt.decode("latin-1").lower(), {
        k.decode("latin-1").lower(): v.decode("latin-1") for k, v in params.items()
    }


def split_parts(content_type: str | None, body: bytes) -> list[BodyPart]:
    """The DICOM parts of a request body, by content type; every refusal names what was wrong."""
    media, params = _media_type(content_type)
    if not body:
        raise MalformedMultipartError("the request body is empty", part="body")
    if media in DICOM_TYPES:
        return [BodyPart(index=1, filename=None, content_type=media, data=body)]
    if media not in ("multipart/related", "multipart/form-data"):
        raise UnsupportedMediaTypeError(
            f"content type {media or 'missing'} is not accepted; send multipart/related; "
            'type="application/dicom", multipart/form-data or application/dicom',
            part="Content-Type",
        )
    if (
        media == "multipart/related"
        and params.get("type", "application/dicom").lower() != "application/dicom"
    ):
        raise UnsupportedMediaTypeError(
            f"multipart/related type {params['type']} is not accepted; only application/dicom",
            part="Content-Type",
        )
    boundary = params.get("boundary")
    if not boundary:
        raise MalformedMultipartError(
            "the multipart Content-Type has no boundary parameter", part="Content-Type"
        )
    parts = _parse(boundary, body)
    if media == "multipart/form-data":
        # Plain form fields (no file name, text type) are not instances; file fields are.
        parts = [p for p in parts if p.filename is not None or (p.content_type or "") in DICOM_TYPES]
    if not parts:
        raise MalformedMultipartError("the multipart body holds no DICOM parts", part="body")
    return parts


_CHUNK = 1 << 20


def _preamble_end(body: bytes, boundary: str) -> int:
    """Where the first boundary delimiter starts. RFC 2046 5.1.1 allows a preamble before it, to be
    ignored; python-multipart refuses one ("Expected boundary character 45"), so a valid body got 400
    (found by tests/reliability/test_fuzz_multipart.py)."""
    delimiter = b"--" + boundary.encode("latin-1")
    if body.startswith(delimiter):
        return 0
    at = body.find(b"\r\n" + delimiter)
    return at + 2 if at >= 0 else 0


def _parse(boundary: str, body: bytes) -> list[BodyPart]:
    parts: list[BodyPart] = []
    state: dict[str, object] = {"ended": False}
    data = bytearray()
    headers: dict[str, str] = {}
    field_name = bytearray()
    value = bytearray()

    def on_part_begin() -> None:
        data.clear()
        headers.clear()

    def on_part_data(buf: bytes, start: int, end: int) -> None:
        data.extend(buf[start:end])

    def on_header_field(buf: bytes, start: int, end: int) -> None:
        field_name.extend(buf[start:end])

    def on_header_value(buf: bytes, start: int, end: int) -> None:
        value.extend(buf[start:end])

    def on_header_end() -> None:
        headers[field_name.decode("latin-1").lower()] = value.decode("latin-1")
        field_name.clear()
        value.clear()

    def on_part_end() -> None:
        media, _ = _media_type(headers.get("content-type"))
        _, disp = _media_type(headers.get("content-disposition"))
        filename = disp.get("filename")
        if filename:
            filename = filename.replace("\\", "/").rsplit("/", 1)[-1][:128]
        parts.append(BodyPart(len(parts) + 1, filename or None, media or None, bytes(data), dict(headers)))

    def on_end() -> None:
        state["ended"] = True

    try:
        # The constructor refuses a boundary over 256 bytes with FormParserError, the base class of
        # MultipartParseError: it answered 500 (found by tests/reliability/test_fuzz_multipart.py).
        parser = MultipartParser(
            boundary.encode("latin-1"),
            {
                "on_part_begin": on_part_begin,
                "on_part_data": on_part_data,
                "on_part_end": on_part_end,
                "on_header_field": on_header_field,
                "on_header_value": on_header_value,
                "on_header_end": on_header_end,
                "on_end": on_end,
            },
        )
    except FormParserError as exc:
        raise MalformedMultipartError(
            f"the multipart boundary is not usable: {exc}", part="Content-Type"
        ) from exc
    try:
        # In chunks from the end of any preamble: a slice of the body is a copy, so never take one whole.
        for at in range(_preamble_end(body, boundary), len(body), _CHUNK):
            parser.write(body[at : at + _CHUNK])
        parser.finalize()
    except MultipartParseError as exc:
        raise MalformedMultipartError(f"the multipart body cannot be parsed: {exc}", part="body") from exc
    if not state["ended"]:
        raise MalformedMultipartError(
            "the multipart body ends without its closing boundary (truncated?)", part="body"
        )
    return parts
