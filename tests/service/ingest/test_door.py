"""The listener's door against the attacks of issue 20: half PDU headers, lying lengths, silent connections
holding slots, malformed requests. Each attack is made on a bare socket (raw_peer), and a real sender
(pynetdicom) must still get in while it lasts.

The listener's timers are set to half a second here; tests wait for what the listener does (a closed
socket, an A-ABORT) with generous socket timeouts and never assert on how long it took.
"""

from __future__ import annotations

import re
import struct
import time
from collections.abc import Iterator

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import

from service.ingest.door import SILENT_GRACE_S
from tests.service.ingest.raw_peer import A_ABORT, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, RawPeer, associate_rq

FAST = {"artim_seconds": 0.5, "pdu_seconds": 0.5, "idle_seconds": 0.5}


@pytest.fixture
def raw() -> Iterator[object]:
    """``raw(port)`` → a RawPeer, closed at teardown."""
    peers: list[RawPeer] = []

    def connect(port: int) -> RawPeer:
        peers.append(RawPeer(port))
        return peers[-1]

    yield connect
    for p in peers:
        p.close()


def _echo(port: int, calling: str = "MODALITY") -> bool:
    """A real sender: pynetdicom associates and echoes; True when it was served."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_TRIAGE")
    if not assoc.is_established:
        return False
    try:
        return bool(assoc.send_c_echo().Status == 0x0000)
    finally:
        assoc.release()


def _eventually(predicate, timeout: float = 10.0) -> bool:
    """For what the listener does after a socket closes on its side (asynchronous by nature)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_half_pdu_header_loses_its_connection(listen, raw) -> None:
    lst = listen(**FAST)
    peer = raw(lst.port)
    peer.send(b"\x01\x00\x00")  # three of six header bytes, then nothing
    assert peer.closed()
    assert _echo(lst.port)


def test_dripping_pdu_loses_its_connection(listen, raw, caplog: pytest.LogCaptureFixture) -> None:
    """A valid A-ASSOCIATE-RQ sent a byte at a time, slower than the PDU deadline allows."""
    lst = listen(**{**FAST, "artim_seconds": 30.0})
    peer = raw(lst.port)
    rq = associate_rq()
    with pytest.raises((BrokenPipeError, ConnectionResetError)):  # noqa: PT012 - the drip is the test
        for byte in rq:
            peer.send(bytes([byte]))
            time.sleep(0.05)
    assert "not complete within 0.5 s" in caplog.text


@pytest.mark.parametrize("pdu_type", [0x01, 0x04])
def test_four_gib_declared_before_association_is_aborted_unread(listen, raw, caplog, pdu_type: int) -> None:
    lst = listen(**FAST)
    peer = raw(lst.port)
    peer.send(struct.pack(">BBL", pdu_type, 0, 0xFFFFFFFF))
    got = peer.recv_pdu()
    assert got is not None and got[0] == A_ABORT
    assert peer.closed()
    assert "declares 4294967295 bytes" in caplog.text
    assert _echo(lst.port)


def test_p_data_above_our_maximum_is_aborted_unread(listen, raw, caplog: pytest.LogCaptureFixture) -> None:
    lst = listen(**FAST, max_pdu=16384)
    peer = raw(lst.port)
    assert peer.associate()[0] == A_ASSOCIATE_AC
    peer.send(struct.pack(">BBL", 0x04, 0, 0xFFFFFFFF))  # header only: the body never comes
    got = peer.recv_pdu()
    assert got is not None and got[0] == A_ABORT
    assert peer.closed()
    assert "P-DATA-TF declares 4294967295 bytes, above our limit of 16384" in caplog.text


def test_sixteen_silent_connections_do_not_keep_a_sender_out(
    listen, raw, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 20: 16 connections that say nothing held all 16 slots; now they hold no slot at all, and a
    flood of them from one address pushes out only its own oldest."""
    lst = listen(**{**FAST, "artim_seconds": 30.0}, max_associations=2)
    silent = [raw(lst.port) for _ in range(16)]
    time.sleep(SILENT_GRACE_S)  # silent for longer than a sender in a burst may take to speak
    assert _echo(lst.port)
    assert _echo(lst.port, calling="SECOND")
    silent_ports = {str(p.sock.getsockname()[1]) for p in silent}
    pushed = re.findall(r"closed the connection from 127\.0\.0\.1:(\d+)", caplog.text)
    assert pushed and set(pushed) <= silent_ports  # the log names the silent ones, never the sender


def test_silent_connection_is_closed_after_artim(listen, raw) -> None:
    lst = listen(**FAST)
    peer = raw(lst.port)
    assert peer.closed()  # nothing sent: ARTIM (0.5 s here) closes it


def test_a_slot_is_taken_only_after_the_checks_and_freed_when_the_socket_closes(listen, raw, caplog) -> None:
    lst = listen(**FAST, max_associations=1, allowed_calling_aets=["MODALITY", "RAW"])
    intruder = raw(lst.port)
    pdu_type, _ = intruder.associate(calling="INTRUDER")
    assert pdu_type == A_ASSOCIATE_RJ  # refused on its AE title: it never held the one slot
    holder = raw(lst.port)
    assert holder.associate()[0] == A_ASSOCIATE_AC  # the one slot
    assert not _echo(lst.port)
    assert "association from 127.0.0.1" in caplog.text and "slots in use" in caplog.text
    holder.close()  # no release, no abort: the socket just goes
    assert _eventually(lambda: _echo(lst.port))
    assert "'INTRUDER' not allowed" in caplog.text


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda rq: rq[:74] + b"\x10\x00\xff\xff" + rq[78:], id="item-length-overruns"),
        pytest.param(lambda rq: rq[:99] + b"\x20\x00\x00\x02" + rq[103:], id="context-item-too-short"),
        pytest.param(lambda rq: rq[:80] + b"\xff" + rq[81:], id="uid-not-ascii"),
        pytest.param(lambda rq: rq[:74] + b"\x99" + rq[75:], id="unknown-item-type"),
        pytest.param(lambda rq: rq[:-3], id="truncated-user-information"),
        pytest.param(lambda rq: rq[:6] + bytes(68), id="no-items"),
        pytest.param(
            lambda rq: rq.replace(b"1.2.840.10008.3.1.1.1", b"1.2.840.10008.3.1.1.9"), id="app-context"
        ),
        pytest.param(lambda rq: rq[:6] + b"\x00\x00" + rq[8:], id="protocol-version-0"),
        pytest.param(lambda rq: rq[:10] + b"\xff" * 16 + rq[26:], id="called-ae-not-ascii"),
        pytest.param(
            lambda rq: rq.replace(b"\x51\x00\x00\x04", b"\x51\x00\x00\x03", 1), id="max-length-3-bytes"
        ),
    ],
)
def test_malformed_associate_rq_gets_a_reject_not_a_crash(listen, raw, caplog, mangle) -> None:
    lst = listen(**FAST)
    rq = associate_rq()
    bad = mangle(rq)
    bad = bad[:2] + struct.pack(">L", len(bad) - 6) + bad[6:]  # the PDU length matches what is sent
    peer = raw(lst.port)
    peer.send(bad)
    got = peer.recv_pdu()
    assert got is not None and got[0] in (A_ASSOCIATE_RJ, A_ABORT), got
    assert peer.closed()
    assert "Traceback" not in caplog.text and "AssertionError" not in caplog.text
    assert _echo(lst.port)


def test_a_pdu_other_than_associate_first_is_aborted(listen, raw) -> None:
    lst = listen(**FAST)
    peer = raw(lst.port)
    peer.send(struct.pack(">BBL", 0x05, 0, 4) + bytes(4))  # A-RELEASE-RQ with no association
    got = peer.recv_pdu()
    assert got is not None and got[0] == A_ABORT
    assert peer.closed()


def test_idle_association_is_aborted(listen, raw, caplog: pytest.LogCaptureFixture) -> None:
    lst = listen(**FAST)
    peer = raw(lst.port)
    assert peer.associate()[0] == A_ASSOCIATE_AC
    got = peer.recv_pdu()  # we send nothing more: the idle timer (0.5 s here) aborts
    assert got is not None and got[0] == A_ABORT
    assert peer.closed()


def test_a_burst_of_talking_senders_from_one_address_is_never_pushed_out(
    listen, raw, caplog: pytest.LogCaptureFixture
) -> None:
    """Twenty modalities behind one router connect at once (the CI load test): their requests are on the
    wire, so the per-address cap on *silent* connections must not close any of them."""
    lst = listen(**{**FAST, "artim_seconds": 30.0}, max_associations=16, max_pending_per_address=2)
    peers = []
    for _ in range(8):  # each sends its request as soon as it is connected, as a modality does
        peers.append(raw(lst.port))
        peers[-1].send(associate_rq())
    answers = [peer.recv_pdu() for peer in peers]
    assert all(a is not None and a[0] == A_ASSOCIATE_AC for a in answers), answers
    assert "closed the connection from" not in caplog.text


def test_a_sender_that_has_not_spoken_yet_is_not_pushed_out(
    listen, raw, caplog: pytest.LogCaptureFixture
) -> None:
    """The CI load test's race: in a burst, the next connection arrived before an earlier sender had written
    its A-ASSOCIATE-RQ, and that sender was closed "after 0.0 s". Silent for less than the grace: kept."""
    lst = listen(**{**FAST, "artim_seconds": 30.0}, max_associations=16, max_pending_per_address=2)
    late = [raw(lst.port) for _ in range(6)]  # connected, their requests not written yet
    for peer in late:
        peer.send(associate_rq())
    answers = [peer.recv_pdu() for peer in late]
    assert all(a is not None and a[0] == A_ASSOCIATE_AC for a in answers), answers
    assert "closed the connection from" not in caplog.text
