"""Request bodies → DICOM parts: ``multipart/related; type="application/dicom"`` (STOW-RS, PS3.18 10.5),
``multipart/form-data`` (file fields) or one ``application/dicom`` body.

Multipart bodies are split by python-multipart's streaming parser (the one Starlette uses for forms), for
both ``related`` and ``form-data``: the framing is the same (RFC 2046), only the part headers differ. They
are split as they arrive (:class:`PartReader`, used by :mod:`service.api.upload`), so no caller needs the
whole body at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError, MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from service.errors import MalformedMultipartError, UnsupportedMediaTypeError

__all__ = ["BodyPart", "PartReader", "split_parts"]

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


def _media_type(content_type: str | None) -> tuple[str, dict[str, str]]:
    if not content_type:
        return "", {}
    mt, params = parse_options_header(content_type)
    return mt.decode("latin-1").lower(), {
        k.decode("latin-1").lower(): v.decode("latin-1") for k, v in params.items()
    }


def split_parts(content_type: str | None, body: bytes) -> list[BodyPart]:
    """The DICOM parts of a whole request body, by content type; every refusal names what was wrong."""
    reader = PartReader(content_type)
    # In chunks: a slice of the body is a copy, so never take one whole.
    parts = [part for at in range(0, len(body), _CHUNK) for part in reader.feed(body[at : at + _CHUNK])]
    return parts + reader.finish()


_CHUNK = 1 << 20


class PartReader:
    """A request body split into its DICOM parts as it arrives: :meth:`feed` each chunk and take the parts it
    completed, then :meth:`finish`. So a caller can handle each part (parse it, write it to disk) while the
    rest is still on the wire, and never hold the whole body (:mod:`service.api.upload`).

    A ``multipart/*`` body goes through python-multipart's streaming parser; ``application/dicom`` is one
    part, whole only at :meth:`finish`. Errors are the API's own (400, 415), raised where they are found;
    the content type is judged at the first byte, so an empty body is "empty" whatever its type."""

    def __init__(self, content_type: str | None) -> None:
        self._content_type = content_type
        self._media = ""
        self._parser: MultipartParser | None = None
        self._single: list[bytes] | None = None  # application/dicom: the chunks so far
        self._seen = False  # a non-empty chunk arrived
        self._preamble: bytes | None = b""  # the tail of what came before the first delimiter (None: found)
        self._at_start = True
        self._delimiter = b""
        self._ended = False
        self._count = 0  # parts seen, form fields included: a part's label keeps its place in the body
        self._yielded = 0
        self._done: list[BodyPart] = []
        self._data = bytearray()
        self._headers: dict[str, str] = {}
        self._field = bytearray()
        self._value = bytearray()

    def feed(self, chunk: bytes) -> list[BodyPart]:
        """The parts ``chunk`` completed, in body order."""
        if not chunk:
            return []
        if not self._seen:
            self._seen = True
            self._start()
        if self._single is not None:
            self._single.append(chunk)
            return []
        if self._preamble is not None:  # RFC 2046 5.1.1: a preamble before the first delimiter is ignored
            chunk = self._skip_preamble(chunk)
            if not chunk:
                return []
        self._write(chunk)
        return self._take()

    def finish(self) -> list[BodyPart]:
        """The last parts; raises if the body was empty, truncated or held no DICOM part."""
        if not self._seen:
            raise MalformedMultipartError("the request body is empty", part="body")
        if self._single is not None:
            data = b"".join(self._single)
            self._single = []
            self._yielded += 1
            return [BodyPart(index=1, filename=None, content_type=self._media, data=data)]
        assert self._parser is not None
        if self._preamble:  # no delimiter was ever found: let the parser say what it makes of the body
            self._write(self._preamble)
        try:
            self._parser.finalize()
        except MultipartParseError as exc:
            raise MalformedMultipartError(f"the multipart body cannot be parsed: {exc}", part="body") from exc
        if not self._ended:
            raise MalformedMultipartError(
                "the multipart body ends without its closing boundary (truncated?)", part="body"
            )
        last = self._take()
        if not self._yielded:
            raise MalformedMultipartError("the multipart body holds no DICOM parts", part="body")
        return last

    def _start(self) -> None:
        media, params = _media_type(self._content_type)
        self._media = media
        if media in DICOM_TYPES:
            self._single = []
            return
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
        self._delimiter = b"--" + boundary.encode("latin-1")
        try:
            # The constructor refuses a boundary over 256 bytes with FormParserError, the base class of
            # MultipartParseError: it answered 500 (found by tests/reliability/test_fuzz_multipart.py).
            self._parser = MultipartParser(
                boundary.encode("latin-1"),
                {
                    "on_part_begin": self._on_part_begin,
                    "on_part_data": self._on_part_data,
                    "on_part_end": self._on_part_end,
                    "on_header_field": self._on_header_field,
                    "on_header_value": self._on_header_value,
                    "on_header_end": self._on_header_end,
                    "on_end": self._on_end,
                },
            )
        except FormParserError as exc:
            raise MalformedMultipartError(
                f"the multipart boundary is not usable: {exc}", part="Content-Type"
            ) from exc

    def _skip_preamble(self, chunk: bytes) -> bytes:
        """What of ``chunk`` follows the preamble (empty while it lasts). python-multipart refuses a
        preamble ("Expected boundary character 45"), so a valid body got 400 (found by
        tests/reliability/test_fuzz_multipart.py). Holds at most a delimiter's length of it."""
        assert self._preamble is not None
        buf, delimiter = self._preamble + chunk, self._delimiter
        if self._at_start:  # the body may begin with the delimiter itself, without a CRLF before it
            if len(buf) < len(delimiter) and delimiter.startswith(buf):
                self._preamble = buf
                return b""
            self._at_start = False
            if buf.startswith(delimiter):
                self._preamble = None
                return buf
        at = buf.find(b"\r\n" + delimiter)
        if at >= 0:
            self._preamble = None
            return buf[at + 2 :]
        self._preamble = buf[-(len(delimiter) + 1) :]  # a CRLF and delimiter may straddle two chunks
        return b""

    def _write(self, chunk: bytes) -> None:
        assert self._parser is not None
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise MalformedMultipartError(f"the multipart body cannot be parsed: {exc}", part="body") from exc

    def _take(self) -> list[BodyPart]:
        done, self._done = self._done, []
        self._yielded += len(done)
        return done

    def _on_part_begin(self) -> None:
        self._data.clear()
        self._headers.clear()

    def _on_part_data(self, buf: bytes, start: int, end: int) -> None:
        self._data.extend(buf[start:end])

    def _on_header_field(self, buf: bytes, start: int, end: int) -> None:
        self._field.extend(buf[start:end])

    def _on_header_value(self, buf: bytes, start: int, end: int) -> None:
        self._value.extend(buf[start:end])

    def _on_header_end(self) -> None:
        self._headers[self._field.decode("latin-1").lower()] = self._value.decode("latin-1")
        self._field.clear()
        self._value.clear()

    def _on_part_end(self) -> None:
        self._count += 1
        media, _ = _media_type(self._headers.get("content-type"))
        _, disp = _media_type(self._headers.get("content-disposition"))
        filename = disp.get("filename")
        if filename:
            filename = filename.replace("\\", "/").rsplit("/", 1)[-1][:128]
        data = bytes(self._data)
        self._data.clear()
        # Plain form fields (no file name, text type) are not instances; file fields are.
        if self._media == "multipart/form-data" and filename is None and (media or "") not in DICOM_TYPES:
            return
        self._done.append(BodyPart(self._count, filename or None, media or None, data, dict(self._headers)))

    def _on_end(self) -> None:
        self._ended = True
