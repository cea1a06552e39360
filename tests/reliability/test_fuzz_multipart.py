"""Multipart fuzzing: hypothesis-built bodies and Content-Type headers through the real app (issue 9, part 2).

``POST /v1/studies`` splits the body itself (service/api/stow.py), so it is where a malformed request meets
our own parsing. Bodies are built from parts (valid instances, truncated ones, noise, empty parts, nested
multipart bodies) with part headers that go wrong (missing, huge, odd file names, other types), then
framed with CRLF or bare LF, a boundary that may not match the header's, a closing boundary that may be
truncated or missing, a preamble and epilogue, and sometimes a few flipped bytes. Every answer must be:

* below 500;
* for a 4xx, ``application/problem+json`` with ``type``, ``title``, ``status`` (equal to the HTTP status)
  and ``detail``;
* for 200/202, JSON naming the stored instances;

and after the run the app still answers ``/healthz/live``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from tests.reliability.conftest import LiveApp, examples
from tests.service.dicom_factory import chest, head_ct_series

BCHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=?"
"""RFC 2046 5.1.1 boundary characters (less the space, which may not end one)."""

_VALID = [chest(), chest(), *head_ct_series(2)]

boundaries = st.one_of(
    st.text(BCHARS, min_size=1, max_size=70),
    st.text(BCHARS, min_size=1, max_size=70),
    st.text(BCHARS, min_size=1, max_size=70),
    st.sampled_from(["", " ", "a b", '"quoted"', "x" * 71, "x" * 500, "é", "--", "\r\n", ";", "\x00"]),
)

payloads = st.one_of(
    st.sampled_from(_VALID),
    st.tuples(st.sampled_from(_VALID), st.floats(0, 1)).map(lambda t: t[0][: int(len(t[0]) * t[1])]),
    st.binary(max_size=512),
    st.just(b""),
    st.just(b"DICM" * 64),
)

part_headers = st.one_of(
    st.just(b"Content-Type: application/dicom"),
    st.just(b""),
    st.sampled_from(
        [
            b"Content-Type: application/octet-stream",
            b"Content-Type: text/plain",
            b"Content-Type: image/jpeg",
            b"Content-Type: application/dicom+json",
            b"Content-Type: multipart/related; boundary=inner",
            b'Content-Disposition: form-data; name="file"; filename="chest.dcm"',
            b'Content-Disposition: form-data; name="file"; filename="../../../etc/passwd"',
            b'Content-Disposition: form-data; name="file"; filename="C:\\\\x\\\\y.dcm"',
            b'Content-Disposition: form-data; name="note"',
            b"Content-Disposition: form-data; name=file; filename=" + b"\xff\xfe" * 10,
            b"Content-Type",
            b": no name",
            b"X-Huge: " + b"h" * 70_000,
            b"Content-Type: application/dicom\r\nContent-Type: text/plain",
        ]
    ),
    st.binary(max_size=64).filter(lambda b: b"\r" not in b and b"\n" not in b),
)


def _mostly(usual: Any, *odd: Any) -> st.SearchStrategy[Any]:
    """``usual`` about three times in four, else one of ``odd``: most requests have one or two faults,
    so that the parser gets past the framing often enough to meet the faults further in."""
    return st.integers(0, 3).flatmap(lambda i: st.sampled_from(odd) if i == 0 else st.just(usual))


MEDIA_TYPES = [
    'multipart/related; type=application/dicom; boundary="{b}"',
    "multipart/related; boundary={b}",
    'multipart/related; type="application/dicom+xml"; boundary={b}',
    'Multipart/Related; Type="Application/DICOM"; Boundary={b}',
    'multipart/related; type="application/dicom"',
    "multipart/related; boundary",
    "multipart/related; boundary=; boundary={b}",
    "multipart/form-data; boundary={b}",
    "multipart/form-data",
    "multipart/mixed; boundary={b}",
    "application/dicom",
    "application/octet-stream",
    "text/plain",
    "garbage",
    "",
    None,
]


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes | None, bytes, str]:
    """(Content-Type header or None, body, what was built): a multipart body that may be broken."""
    header_boundary = draw(boundaries)
    body_boundary = draw(_mostly(header_boundary, "other", header_boundary + "x", header_boundary[:-1]))
    newline = draw(_mostly(b"\r\n", b"\n"))
    bnd = body_boundary.encode("utf-8", "replace")
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        headers = draw(st.one_of(st.just(b"Content-Type: application/dicom"), part_headers))
        if draw(st.integers(0, 9)) == 0:  # a nested multipart body as the payload
            payload = b"--inner\r\nContent-Type: application/dicom\r\n\r\n" + _VALID[0] + b"\r\n--inner--\r\n"
        else:
            payload = draw(st.one_of(st.sampled_from(_VALID), payloads))
        parts.append(
            b"--" + bnd + newline + (headers + newline if headers else b"") + newline + payload + newline
        )
    preamble = draw(_mostly(b"", b"preamble" + newline, newline))
    closing = draw(
        _mostly(b"--" + bnd + b"--" + newline, b"--" + bnd + b"--", b"--" + bnd + b"-", b"--" + bnd, b"")
    )
    epilogue = draw(_mostly(b"", b"epilogue", newline, b"--" + bnd + newline))
    body = preamble + b"".join(parts) + closing + epilogue
    if body and draw(st.integers(0, 5)) == 0:  # a few flipped bytes anywhere
        out = bytearray(body)
        for where, value in draw(st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=8)):
            out[min(int(where * len(out)), len(out) - 1)] = value
        body = bytes(out)
    media = draw(
        st.one_of(st.just('multipart/related; type="application/dicom"; boundary={b}'), _mostly(*MEDIA_TYPES))
    )
    content_type = None if media is None else media.replace("{b}", header_boundary).encode("utf-8")
    return content_type, body, f"{len(parts)} part(s), {media!r}"


def check_answer(response: httpx.Response) -> str:
    """The promise for one answer; the outcome's name."""
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    if response.status_code >= 400:
        assert response.headers["content-type"].startswith("application/problem+json"), response.headers
        problem = response.json()
        assert {"type", "title", "status", "detail"} <= problem.keys(), problem
        assert problem["status"] == response.status_code, problem
        assert isinstance(problem["detail"], str) and problem["detail"], problem
        return f"{response.status_code} {problem['type'].rsplit('/', 1)[-1]}"
    assert response.status_code in (200, 202), response.status_code
    answer = response.json()
    assert answer.get("stored") or answer.get("study_uid"), answer
    return str(response.status_code)


def test_fuzz_multipart(live_app: Callable[..., LiveApp]) -> None:
    """Short form 300 requests, long form 5,000: never a 5xx, every refusal a problem document."""
    app = live_app()
    n = examples(300, 5_000)
    outcomes: Counter[str] = Counter()
    t0 = time.perf_counter()

    @settings(
        max_examples=n,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(request=requests())
    def run(request: tuple[bytes | None, bytes, str]) -> None:
        content_type, body, what = request
        note(f"Content-Type: {content_type!r}; {what}; body {len(body)} bytes: {body[:300]!r}")
        headers: dict[str, Any] = {} if content_type is None else {"content-type": content_type}
        outcomes[check_answer(app.request("POST", "/v1/studies", content=body, headers=headers))] += 1

    run()
    elapsed = time.perf_counter() - t0
    print(f"\n{sum(outcomes.values())} requests in {elapsed:.1f} s")  # noqa: T201
    for outcome, count in outcomes.most_common():
        print(f"  {count:5d}  {outcome}")  # noqa: T201
    assert app.request("GET", "/healthz/live").status_code == 200
    assert any(o in ("200", "202", "409 partial-store") for o in outcomes), outcomes  # some got through


NAMED = [  # (name, Content-Type, body, status, problem type)
    ("no boundary", b'multipart/related; type="application/dicom"', b"--x\r\n\r\n\r\n--x--", 400,
     "malformed-multipart"),
    ("boundary not in body", b"multipart/related; boundary=abc", b"--zzz\r\n\r\nDICM\r\n--zzz--\r\n", 400,
     "malformed-multipart"),
    ("no closing boundary", b"multipart/related; boundary=abc", b"--abc\r\n\r\n" + _VALID[0][:-5], 400,
     "malformed-multipart"),
    ("empty body", b"multipart/related; boundary=abc", b"", 400, "malformed-multipart"),
    ("text/plain", b"text/plain", b"hello", 415, "unsupported-media-type"),
    ("no Content-Type", None, b"hello", 415, "unsupported-media-type"),
    ("not DICOM", b"application/dicom", b"not dicom at all", 415, "not-dicom"),
    ("an empty part", b"multipart/related; boundary=abc", b"--abc\r\n\r\n\r\n--abc--\r\n", 415, "not-dicom"),
]  # fmt: skip


def test_named_refusals(live_app: Callable[..., LiveApp]) -> None:
    """Cases the fuzzer draws at random, named: each refusal says what was wrong and which part."""
    app = live_app()
    for name, content_type, body, status, slug in NAMED:
        headers = {} if content_type is None else {"content-type": content_type}
        response = app.request("POST", "/v1/studies", content=body, headers=headers)
        assert check_answer(response) == f"{status} {slug}", (name, response.text)
        assert json.loads(response.text)["part"], (name, "the problem names the bad part")
