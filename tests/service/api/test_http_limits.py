"""Timeouts on the HTTP door (issue 15 item 5) on a real uvicorn configured as ``pacs-triage serve`` does
(service.api.http_server.uvicorn_options), over loopback sockets: slow request heads are closed with 408,
slow bodies get a 408 problem and a closed connection, and uploads beyond the cap get 503 + Retry-After.

No assertion is about time: each case waits for the server's answer (or the closed socket) with a generous
safety timeout, and checks what came back."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from service.api.http_server import uvicorn_options
from service.app import create_app
from service.config import Settings
from tests.service.conftest import wait_until_ready
from tests.service.dicom_factory import head_ct_series, multipart_related

SAFETY = 60.0
"""Seconds a socket read may block before the test fails (the limits under test are a fraction of it)."""


@contextmanager
def served(settings: Settings) -> Iterator[int]:
    """The app in a real uvicorn on a free loopback port with the serve command's options; yields the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        create_app(settings), log_level="warning", lifespan="on", **uvicorn_options(settings.api)
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", lambda: None if thread.is_alive() else "uvicorn ended")
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def _connect(port: int) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=SAFETY)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def _read_all(conn: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    while chunk := conn.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _response(conn: socket.socket) -> bytes:
    """One whole response (head and its Content-Length body) from a kept-alive connection: a single
    ``recv`` may return the head alone (a CI run), leaving the body to be read as the next answer."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    while len(body) < length:
        chunk = conn.recv(65536)
        assert chunk, f"closed after {data!r}"
        body += chunk
    return head + b"\r\n\r\n" + body


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def _body(response: bytes) -> dict[str, object]:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])


def test_a_request_head_that_never_ends_is_closed(make_settings) -> None:
    settings = make_settings(api={"header_timeout_seconds": 0.5})
    with served(settings) as port:
        conns = [_connect(port) for _ in range(5)]
        for conn in conns:
            conn.sendall(b"GET /healthz/live HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and nothing more
        answers = [_read_all(conn) for conn in conns]
        assert all(_status(a) == 408 for a in answers), answers
        # A normal request on a fresh connection still works, and keep-alive re-arms the deadline.
        conn = _connect(port)
        conn.sendall(b"GET /healthz/live HTTP/1.1\r\nHost: x\r\n\r\n")
        first = _response(conn)
        assert _status(first) == 200
        conn.sendall(b"GET /healthz/live HTTP/1.1\r\nHo")  # the second request stalls in its head
        assert _status(_read_all(conn)) == 408
        for c in [*conns, conn]:
            c.close()


def test_a_kept_alive_connection_idle_past_the_head_deadline_is_still_served(make_settings) -> None:
    """The head's deadline starts with the head's first byte on a kept-alive connection, not with the last
    answer: an idle connection is the keep-alive timer's (75 s by default, longer than HTTP clients keep
    theirs), and a client that reuses it after a pause gets its answer, not a 408 or a closed socket."""
    settings = make_settings(api={"header_timeout_seconds": 0.2, "keepalive_seconds": 60})
    with served(settings) as port, _connect(port) as conn:
        conn.sendall(b"GET /healthz/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _status(_response(conn)) == 200
        threading.Event().wait(1.0)  # five head deadlines pass with the connection idle
        conn.sendall(b"GET /healthz/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _status(_response(conn)) == 200
        conn.sendall(b"GET /healthz/live HTTP/1.1\r\nHo")  # a head begun and stalled: its deadline holds
        assert _status(_read_all(conn)) == 408


def test_bytes_waiting_on_a_socket_are_seen_before_a_keep_alive_close() -> None:
    """What the keep-alive close asks before it closes (:func:`_unread_bytes`): a request that reached the
    socket while the event loop was busy is served rather than dropped."""
    from service.api.http_server import _unread_bytes

    class _Transport:
        def __init__(self, sock: socket.socket | None) -> None:
            self.sock = sock

        def get_extra_info(self, name: str, default: object = None) -> object:
            return self.sock if name == "socket" else default

    a, b = socket.socketpair()
    with a, b:
        assert _unread_bytes(_Transport(b)) == 0  # type: ignore[arg-type]
        a.sendall(b"GET / HTTP/1.1\r\n")  # a Unix socket: there on return
        assert _unread_bytes(_Transport(b)) == 16  # type: ignore[arg-type]
    assert _unread_bytes(_Transport(None)) == 0  # type: ignore[arg-type]
    assert _unread_bytes(_Transport(b)) == 0  # type: ignore[arg-type]  # closed: unknown, never an error


def test_a_request_head_beyond_16_kib_gets_431_and_the_connection_is_closed(make_settings) -> None:
    """llhttp (httptools) sets no limit on a head: without ours, header bytes sent faster than the head's
    deadline would pile up in memory. A head just under the limit is served; the connection stays open.
    The client goes on sending after the 431: the server reads and discards it (a lingering close), so the
    client reads its 431 instead of a TCP reset (which a plain close with unread bytes provokes)."""
    with served(make_settings()) as port, _connect(port) as conn:
        filler = b"X-Pad: " + b"a" * 200 + b"\r\n"
        conn.sendall(b"GET /healthz/live HTTP/1.1\r\nHost: x\r\n" + filler * 60 + b"\r\n")  # ~12.5 KiB
        assert _status(_response(conn)) == 200
        conn.sendall(b"GET /healthz/live HTTP/1.1\r\nHost: x\r\n")
        for _ in range(2000):  # ~420 KiB of header fields, never a blank line
            conn.sendall(filler)
        conn.shutdown(socket.SHUT_WR)
        assert _status(_read_all(conn)) == 431


def test_pipelined_requests_are_each_answered(make_settings) -> None:
    """Two requests in one write (HTTP/1.1 pipelining): both answered in order, no deadline fires between."""
    with served(make_settings(api={"header_timeout_seconds": 0.5})) as port:
        with _connect(port) as conn:
            one = b"GET /healthz/live HTTP/1.1\r\nHost: x\r\n\r\n"
            conn.sendall(one + one.replace(b"Host: x", b"Host: x\r\nConnection: close"))
            answer = _read_all(conn)
        assert answer.count(b"HTTP/1.1 200") == 2, answer


def test_a_slow_body_gets_408_and_the_connection_is_closed(make_settings) -> None:
    settings = make_settings(api={"body_idle_seconds": 0.5, "body_timeout_seconds": 30})
    with served(settings) as port:
        conn = _connect(port)
        conn.sendall(
            b"POST /v1/studies HTTP/1.1\r\nHost: x\r\nContent-Type: application/dicom\r\n"
            b"Content-Length: 500000000\r\n\r\n" + b"\0" * 1024
        )
        answer = _read_all(conn)  # returns only because the server closed the connection
        conn.close()
        assert _status(answer) == 408, answer
        assert b"application/problem+json" in answer.lower() or b"problem+json" in answer
        problem = _body(answer)
        assert problem["status"] == 408 and problem["part"] == "body"
        assert "no part of the request body arrived" in str(problem["detail"])


def test_a_spooled_body_that_stalls_gets_408_and_leaves_nothing_staged(make_settings) -> None:
    """Past ``api.upload_memory_bytes`` the instances a body carried are written as they arrive; the body
    then stalls: 408, and the files staged for it are removed (nothing was stored, nothing is left)."""
    settings = make_settings(api={"body_idle_seconds": 0.5, "upload_memory_bytes": 0})
    body, ctype = multipart_related(head_ct_series(3))
    with served(settings) as port:
        conn = _connect(port)
        conn.sendall(
            f"POST /v1/studies HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body) + 100_000}\r\n\r\n".encode()
            + body[: body.rindex(b"--b0undary")]  # three whole instances, then nothing more
        )
        answer = _read_all(conn)
        conn.close()
        assert _status(answer) == 408, answer
        instances = Path(settings.instances_dir)
        assert not list(instances.rglob("*.tmp")) and not list(instances.rglob("*.dcm"))


def test_an_early_answer_closes_the_connection(make_settings) -> None:
    """A 413 for a declared length over the limit: the server does not go on reading the body."""
    settings = make_settings(api={"max_body_bytes": 1024 * 1024})
    with served(settings) as port, _connect(port) as conn:
        conn.sendall(
            b"POST /v1/studies HTTP/1.1\r\nHost: x\r\nContent-Type: application/dicom\r\n"
            b"Content-Length: 500000000\r\n\r\n" + b"\0" * 1024
        )
        answer = _read_all(conn)  # returns only because the server closed (its side of) the connection
        assert _status(answer) == 413 and b"connection: close" in answer.lower()


def test_a_client_still_sending_after_an_early_answer_reads_the_answer(make_settings) -> None:
    """curl and most clients send the whole body before they read: the 413 is written while 4 MiB more
    arrive. The server half-closes and discards them (a lingering close); a plain close would answer them
    with a TCP reset, and the client would see "connection reset" instead of its 413."""
    settings = make_settings(api={"max_body_bytes": 1024 * 1024})
    with served(settings) as port, _connect(port) as conn:
        conn.sendall(
            b"POST /v1/studies HTTP/1.1\r\nHost: x\r\nContent-Type: application/dicom\r\n"
            b"Content-Length: 500000000\r\n\r\n"
        )
        for _ in range(64):
            conn.sendall(b"\0" * 65536)
        conn.shutdown(socket.SHUT_WR)  # the client gives up sending; the server then closes its side too
        answer = _read_all(conn)
        assert _status(answer) == 413 and _body(answer)["status"] == 413


def test_a_body_over_its_total_deadline_gets_408(make_settings) -> None:
    settings = make_settings(api={"body_idle_seconds": 30, "body_timeout_seconds": 0.5})
    with served(settings) as port:
        conn = _connect(port)
        conn.sendall(
            b"POST /v1/studies HTTP/1.1\r\nHost: x\r\nContent-Type: application/dicom\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n400\r\n" + b"\0" * 1024 + b"\r\n"
        )
        answer = _read_all(conn)
        conn.close()
        assert _status(answer) == 408
        assert "was not complete within 0.5 s" in str(_body(answer)["detail"])


def test_uploads_beyond_the_cap_get_503_with_retry_after(make_settings) -> None:
    settings = make_settings(api={"max_concurrent_uploads": 2, "body_idle_seconds": 30})
    head = (
        b"POST /v1/studies HTTP/1.1\r\nHost: x\r\nContent-Type: application/dicom\r\n"
        b"Content-Length: 1000000\r\n\r\n"
    )
    with served(settings) as port:
        holding = [_connect(port) for _ in range(2)]
        for conn in holding:
            conn.sendall(head + b"\0" * 1024)
        # The two bodies are being received: wait until the server counts them (a small GET answers only
        # after the uploads' heads were handled, since one event loop serves them in order).
        probe = _connect(port)
        probe.sendall(b"GET /healthz/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert _status(_read_all(probe)) == 200
        extra = _connect(port)
        extra.sendall(head)
        answer = _read_all(extra)
        assert _status(answer) == 503, answer
        assert b"retry-after: 1" in answer.lower()
        assert _body(answer)["type"] == "https://pacs-triage.invalid/problems/uploads-busy"
        # A small body (an acknowledgement) is never held back by the cap.
        small = _connect(port)
        payload = b'{"by": "x"}'
        small.sendall(
            b"POST /v1/studies/1.2.3/acknowledge HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: "
            + str(len(payload)).encode()
            + b"\r\n\r\n"
            + payload
        )
        assert _status(_read_all(small)) == 404  # unknown study: it got through to the route
        for conn in [*holding, probe, extra, small]:
            conn.close()
