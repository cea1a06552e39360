"""The DICOM client against real peers: DCMTK storescp (e2e) and, where storescp has no such option, a
pynetdicom SCP in this process (called AE title checks, failure statuses).

The CLI commands ``echo`` and ``send`` are tested here too, not in tests/service/test_main.py: that module is
marked slow as a whole (it starts uvicorn), and these run in well under a second each.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    generate_uid,
)
from pynetdicom import AE, StoragePresentationContexts, build_context, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import

from service.__main__ import main
from service.deliver import association, scu
from service.deliver.association import MAX_CONTEXTS, Peer, check_ae_title
from service.deliver.scu import echo, send
from service.errors import DicomPeerError, PacsTriageError
from tests.peers.dcmtk import StoreSCP, echoscu, free_port, storescu
from tests.pydicom_files import pydicom_testdata
from tests.service.dicom_factory import (
    SENTINEL_ACCESSION,
    SENTINEL_ID,
    SENTINEL_NAME,
    head_ct_series,
    make_dataset,
    to_bytes,
)

JPEG_FILE = "SC_rgb_jpeg_gdcm.dcm"  # JPEG Lossless SV1, ships inside pydicom (no download)


def write(folder: Path, name: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return folder / name


# ---- Peer and AE titles ------------------------------------------------------------------------------


class TestPeer:
    @pytest.mark.parametrize(
        ("text", "ae", "host", "port"),
        [
            ("PACS@10.0.0.5:104", "PACS", "10.0.0.5", 104),
            ("ORTHANC@pacs.example.org:4242", "ORTHANC", "pacs.example.org", 4242),
            ("MY AE@localhost:65535", "MY AE", "localhost", 65535),
            ("AE@[::1]:104", "AE", "::1", 104),
            ("A@B@host:1", "A@B", "host", 1),  # "@" is a legal AE title character; the last one splits
            (" PACS @host:11112", "PACS", "host", 11112),  # spaces around an AE title are not significant
        ],
    )
    def test_parse(self, text: str, ae: str, host: str, port: int) -> None:
        peer = Peer.parse(text)
        assert (peer.ae_title, peer.host, peer.port) == (ae, host, port)

    @pytest.mark.parametrize("text", ["PACS@10.0.0.5:104", "AE@[::1]:104", "MY AE@localhost:1"])
    def test_str_gives_back_the_text(self, text: str) -> None:
        assert str(Peer.parse(text)) == text
        assert Peer.parse(str(Peer.parse(text))) == Peer.parse(text)

    @pytest.mark.parametrize(
        ("text", "words"),
        [
            ("PACS", "AE@host:port"),
            ("PACS@host", "AE@host:port"),
            ("@host:104", "AE@host:port"),
            ("PACS@:104", "not a host"),
            ("PACS@host:0", "between 1 and 65535"),
            ("PACS@host:65536", "between 1 and 65535"),
            ("PACS@host:abc", "not a number"),
            ("PACS@host:-1", "not a number"),
            ("SEVENTEEN_CHARS_X@host:104", "1 to 16 characters"),
            ("   @host:104", "AE@host:port"),
            ("A\\B@host:104", "backslash"),
            ("A\x01B@host:104", "control"),
            ("ÄE@host:104", "ASCII"),
            ("AE@::1:104", "AE@host:port"),  # IPv6 needs brackets
            ("AE@[::1]104", "AE@host:port"),
            ("AE@ho st:104", "not a host"),
        ],
    )
    def test_parse_refuses(self, text: str, words: str) -> None:
        with pytest.raises(ValueError, match=re.escape(words)):
            Peer.parse(text)

    def test_check_ae_title(self) -> None:
        assert check_ae_title("  PACS_TRIAGE ") == "PACS_TRIAGE"
        with pytest.raises(ValueError, match="calling AE title"):
            check_ae_title("", "calling AE title")
        with pytest.raises(ValueError, match="1 to 16 characters"):
            Peer("    ", "host", 104)


def test_peer_error_is_a_triage_error() -> None:
    exc = DicomPeerError("cannot connect", reason="unreachable")
    assert isinstance(exc, PacsTriageError)
    assert (exc.http_status, exc.reason, exc.transient) == (502, "unreachable", True)


# ---- presentation context planning --------------------------------------------------------------------


def _item(i: int, sop_class: str, ts: str = ExplicitVRLittleEndian) -> scu._Item:
    return scu._Item(i, Dataset(), UID(sop_class), generate_uid(), UID(ts))


class TestPlan:
    def test_one_sop_class_per_context_set(self) -> None:
        items = [
            _item(0, CTImageStorage),
            _item(1, CTImageStorage, JPEGLosslessSV1),
            _item(2, ComputedRadiographyImageStorage),
            _item(3, CTImageStorage),
        ]
        [(contexts, batch)] = scu._plan(items)
        proposed = sorted((cx.abstract_syntax, tuple(cx.transfer_syntax)) for cx in contexts)
        native = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
        assert proposed == sorted(
            [
                (CTImageStorage, (JPEGLosslessSV1,)),
                (CTImageStorage, native),
                (ComputedRadiographyImageStorage, native),
            ]
        )
        assert [it.index for it in batch] == [0, 1, 2, 3]  # input order within the association

    def test_more_than_128_contexts_split_into_associations(self) -> None:
        classes = [f"1.2.826.0.1.3680043.8.498.{n}" for n in range(1, 201)]
        items = [_item(i, c) for i, c in enumerate(classes)]
        items.append(_item(200, classes[0], JPEGBaseline8Bit))  # one class with two contexts
        batches = scu._plan(items)
        assert [len(cxs) for cxs, _ in batches] == [MAX_CONTEXTS, 201 - MAX_CONTEXTS]
        assert sorted(it.index for _, batch in batches for it in batch) == list(range(201))
        for contexts, batch in batches:  # every object travels with its SOP class's contexts
            assert {it.sop_class for it in batch} == {cx.abstract_syntax for cx in contexts}

    def test_absurd_number_of_syntaxes_for_one_class(self) -> None:
        items = [_item(i, CTImageStorage, f"1.2.826.0.1.3680043.8.498.9.{i}") for i in range(300)]
        batches = scu._plan(items)
        assert all(len(cxs) <= MAX_CONTEXTS for cxs, _ in batches)
        assert sorted(it.index for _, batch in batches for it in batch) == list(range(300))


# ---- a pynetdicom SCP for what storescp cannot do -----------------------------------------------------


@contextmanager
def pynetdicom_scp(
    *, aet: str = "PYSCP", require_called_aet: bool = False, status: int = 0
) -> Iterator[Peer]:
    """An in-process Storage SCP that checks the called AE title and answers every C-STORE with ``status``."""

    def handle_store(event: evt.Event) -> int:
        return status

    ae = AE(ae_title=aet)
    ae.require_called_aet = require_called_aet
    ae.supported_contexts = StoragePresentationContexts
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    assert server is not None  # block=False: the server, running in its own thread
    try:
        yield Peer(aet, "127.0.0.1", server.server_address[1])
    finally:
        server.shutdown()


def test_wrong_called_ae_title_is_rejected_with_the_reason() -> None:
    with pynetdicom_scp(aet="PACS", require_called_aet=True) as peer:
        assert echo(peer, timeout=5).ok
        with pytest.raises(DicomPeerError, match="called AE title not recognised") as info:
            echo(Peer("NOT_PACS", peer.host, peer.port), timeout=5)
    assert info.value.reason == "rejected"
    assert info.value.transient is False


def test_failure_and_warning_statuses() -> None:
    ds = make_dataset()
    with pynetdicom_scp(status=0xA700) as peer:
        [outcome] = send(peer, [ds], timeout=5)
    assert (outcome.ok, outcome.status, outcome.sop_instance_uid) == (False, 0xA700, ds.SOPInstanceUID)
    assert outcome.error is not None and "0xA700" in outcome.error and "Out of Resources" in outcome.error
    with pynetdicom_scp(status=0xB000) as peer:
        [outcome] = send(peer, [ds], timeout=5)
    assert (outcome.ok, outcome.status, outcome.error) == (True, 0xB000, None)


def test_echo_timeout_when_the_peer_never_answers() -> None:
    with socket.socket() as listener:  # the kernel completes the TCP handshake; nobody reads
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        started = time.monotonic()
        with pytest.raises(DicomPeerError, match="no answer") as info:
            echo(Peer("SILENT", "127.0.0.1", listener.getsockname()[1]), timeout=1)
    assert info.value.reason == "timeout"
    assert time.monotonic() - started < 5


def test_unknown_host() -> None:
    with pytest.raises(DicomPeerError, match="cannot resolve") as info:
        echo(Peer.parse("PACS@no-such-host.invalid:104"), timeout=2)
    assert info.value.reason == "unreachable"


def test_send_nothing_needs_no_peer() -> None:
    assert send(Peer("PACS", "127.0.0.1", free_port()), []) == []


# ---- against DCMTK storescp ---------------------------------------------------------------------------


@pytest.mark.e2e
class TestEcho:
    def test_echo(self, storescp_factory) -> None:
        scp = storescp_factory(aet="PACS")
        result = echo(Peer.parse(scp.peer_text))
        assert result.ok and result.status == 0
        assert 0 < result.seconds < 5
        assert echoscu(scp.port, aet="PACS").returncode == 0  # the helper agrees

    def test_closed_port(self) -> None:
        with pytest.raises(DicomPeerError, match="connection refused") as info:
            echo(Peer("PACS", "127.0.0.1", free_port()))
        assert info.value.reason == "unreachable"

    def test_refused_association(self, storescp_factory) -> None:
        scp = storescp_factory(extra_args=["--refuse"])
        with pytest.raises(DicomPeerError, match="association rejected by .*: no reason given") as info:
            echo(Peer.parse(scp.peer_text))
        assert info.value.reason == "rejected"


def _series_files(tmp_path: Path) -> list[Path]:
    """A CR and a 3-slice head CT as Part 10 files, plus a JPEG Lossless file from pydicom's test data."""
    files = [write(tmp_path / "in", "cr.dcm", to_bytes(make_dataset()))]
    files += [write(tmp_path / "in", f"ct{i}.dcm", data) for i, data in enumerate(head_ct_series(3))]
    files.append(write(tmp_path / "in", "jpeg.dcm", pydicom_testdata(JPEG_FILE).read_bytes()))
    return files


def _received_by_uid(scp: StoreSCP, n: int) -> dict[str, Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in map(dcmread, scp.wait_for_files(n))}


@pytest.mark.e2e
class TestSend:
    def test_files_arrive_unchanged(self, storescp_factory, tmp_path: Path) -> None:
        scp = storescp_factory()  # +xa: accepts JPEG as it is; +B: writes what it received
        files = _series_files(tmp_path)
        outcomes = send(Peer.parse(scp.peer_text), files)
        assert [o.ok for o in outcomes] == [True] * 5, outcomes
        assert all(o.status == 0 and o.error is None for o in outcomes)
        received = _received_by_uid(scp, 5)
        for path, outcome in zip(files, outcomes, strict=True):
            sent = dcmread(path)
            got = received[outcome.sop_instance_uid]
            assert outcome.sop_instance_uid == sent.SOPInstanceUID
            assert got.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
            assert got.PixelData == sent.PixelData
            assert got == sent  # every data element, not just the pixels
        assert received[outcomes[-1].sop_instance_uid].file_meta.TransferSyntaxUID == JPEGLosslessSV1

    def test_datasets_and_paths_mixed_in_input_order(self, storescp_factory, tmp_path: Path) -> None:
        scp = storescp_factory()
        ds = [dcmread(BytesIO(b)) for b in head_ct_series(2)]
        jpeg = pydicom_testdata(JPEG_FILE)
        outcomes = send(Peer.parse(scp.peer_text), [ds[0], jpeg, tmp_path / "missing.dcm", str(jpeg), ds[1]])
        assert [o.ok for o in outcomes] == [True, True, False, True, True]
        assert [o.sop_instance_uid for o in outcomes[:2]] == [
            ds[0].SOPInstanceUID,
            dcmread(jpeg).SOPInstanceUID,
        ]
        assert outcomes[2].status is None and "missing.dcm" in (outcomes[2].error or "")
        assert len(scp.wait_for_files(3)) == 3  # the same JPEG twice is one file

    def test_compressed_decompressed_when_peer_takes_uncompressed_only(self, storescp_factory) -> None:
        scp = storescp_factory(accept_all=False)  # storescp's default: uncompressed transfer syntaxes only
        jpeg = dcmread(pydicom_testdata(JPEG_FILE))
        before = jpeg.PixelData
        [outcome] = send(Peer.parse(scp.peer_text), [jpeg])
        assert outcome.ok, outcome
        assert jpeg.PixelData == before  # the caller's dataset is left alone
        [got] = scp.wait_for_files(1)
        got_ds = dcmread(got)
        assert got_ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert (got_ds.pixel_array == jpeg.pixel_array).all()  # lossless: the same pixels

    def test_no_decompress_fallback(self, storescp_factory) -> None:
        scp = storescp_factory(accept_all=False)
        cr = make_dataset()
        outcomes = send(
            Peer.parse(scp.peer_text), [pydicom_testdata(JPEG_FILE), cr], decompress_fallback=False
        )
        assert [o.ok for o in outcomes] == [False, True]
        assert "accepted no presentation context" in (outcomes[0].error or "")

    def test_abort_mid_way_reports_the_rest_not_sent(self, storescp_factory, tmp_path: Path) -> None:
        scp = storescp_factory(extra_args=["--abort-after"])  # aborts on the first C-STORE-RQ
        started = time.monotonic()
        outcomes = send(Peer.parse(scp.peer_text), _series_files(tmp_path)[1:4], timeout=10)
        assert time.monotonic() - started < 5  # no waiting for a response that cannot come
        assert [o.ok for o in outcomes] == [False] * 3
        assert "aborted the association" in (outcomes[0].error or "")
        assert all("not sent" in (o.error or "") for o in outcomes[1:])

    def test_peer_down(self, tmp_path: Path) -> None:
        with pytest.raises(DicomPeerError, match="connection refused"):
            send(Peer("PACS", "127.0.0.1", free_port()), _series_files(tmp_path))

    def test_unknown_sop_class_is_one_failure(self, storescp_factory) -> None:
        scp = storescp_factory()  # storescp accepts known storage SOP classes only (no -pm)
        odd = make_dataset(sop_class="1.2.826.0.1.3680043.8.498.4242")
        outcomes = send(Peer.parse(scp.peer_text), [odd, make_dataset()])
        assert [o.ok for o in outcomes] == [False, True]
        assert "accepted no presentation context" in (outcomes[0].error or "")

    def test_only_unknown_sop_classes(self, storescp_factory) -> None:
        scp = storescp_factory()
        odd = [make_dataset(sop_class=f"1.2.826.0.1.3680043.8.498.424{n}") for n in range(2)]
        outcomes = send(Peer.parse(scp.peer_text), odd)  # no context accepted: not a peer failure
        assert [o.ok for o in outcomes] == [False, False]
        assert all("accepted no presentation context" in (o.error or "") for o in outcomes)

    def test_more_sop_classes_than_one_association_holds(self, storescp_factory, caplog) -> None:
        scp = storescp_factory(extra_args=["--promiscuous"])  # accepts unknown SOP classes too
        datasets = [
            make_dataset(sop_class=f"1.2.826.0.1.3680043.8.498.77.{n}", rows=8, columns=8)
            for n in range(MAX_CONTEXTS + 2)
        ]
        caplog.set_level(logging.INFO, logger="service.deliver.scu")
        outcomes = send(Peer.parse(scp.peer_text), datasets)
        assert all(o.ok for o in outcomes), [o for o in outcomes if not o.ok][:3]
        assert [o.sop_instance_uid for o in outcomes] == [ds.SOPInstanceUID for ds in datasets]
        assert len([r for r in caplog.records if "presentation contexts" in r.getMessage()]) == 2
        assert len(scp.wait_for_files(len(datasets))) == len(datasets)

    def test_a_response_is_never_taken_from_the_request_waiting_for_it(self, storescp_factory) -> None:
        """pynetdicom's reactor loop could take a C-STORE response off the queue when the sender paused it
        just after its wait returned (CI on a busy machine: 78 of 128 objects, then a 30 s DIMSE timeout
        and an abort). Here the two moments a busy machine stretches are stretched on purpose: the loop
        lingers 5 ms after its wait returns, and the sender 10 ms between sending and waiting for the
        response. pynetdicom's own loop then takes nearly every response; ours re-checks the pause
        (service/deliver/reactor.py) and takes none."""
        scp = storescp_factory()
        ae = association.make_ae("PACS_TRIAGE", 5.0)
        datasets = [make_dataset(rows=8, columns=8) for _ in range(12)]
        contexts = [build_context(datasets[0].SOPClassUID, [ExplicitVRLittleEndian])]
        assoc = association.associate(ae, Peer.parse(scp.peer_text), contexts, timeout=5.0, max_pdu=0)
        widened = _SlowAfterWait()
        widened.set()
        assoc._reactor_checkpoint = widened
        send_msg = assoc.dimse.send_msg

        def send_then_pause(*args: object) -> None:  # the response arrives before the sender waits for it
            send_msg(*args)  # type: ignore[arg-type]
            time.sleep(0.01)

        assoc.dimse.send_msg = send_then_pause  # type: ignore[method-assign,assignment]
        try:
            statuses = [assoc.send_c_store(ds) for ds in datasets]
        finally:
            association.finish(assoc)
        assert [int(s.get("Status", -1)) for s in statuses] == [0] * len(datasets)

    def test_nagle_is_off(self, storescp_factory, monkeypatch: pytest.MonkeyPatch) -> None:
        seen: list[int] = []
        create = association.ScuAE._create_socket

        def spy(self, *args):
            sock = create(self, *args)
            assert sock.socket is not None
            seen.append(sock.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            return sock

        monkeypatch.setattr(association.ScuAE, "_create_socket", spy)
        scp = storescp_factory(extra_args=["--ignore"])
        datasets = [make_dataset(rows=128, columns=128) for _ in range(40)]
        assert all(o.ok for o in send(Peer.parse(scp.peer_text), datasets))
        # With Nagle on, each C-STORE waits ~40 ms for a delayed ACK (PEERS.md); the speed itself is
        # bench/ material, never a timed assertion: the socket option is what the test checks.
        assert seen and all(seen)

    def test_no_phi_in_logs(self, storescp_factory, caplog: pytest.LogCaptureFixture) -> None:
        scp = storescp_factory()
        caplog.set_level(logging.DEBUG)
        outcomes = send(Peer.parse(scp.peer_text), [make_dataset()])
        assert outcomes[0].ok
        assert caplog.records  # pynetdicom and we did log
        for secret in (SENTINEL_NAME, SENTINEL_ID, SENTINEL_ACCESSION):
            assert secret not in caplog.text

    def test_storescu_helper(self, storescp_factory, tmp_path: Path) -> None:
        scp = storescp_factory()
        files = _series_files(tmp_path)[:4]  # uncompressed only: plain storescu fails compressed files
        result = storescu(scp.port, [tmp_path / "in" / "cr.dcm", files[1]], aet=scp.aet)
        assert result.returncode == 0, result.stderr
        assert len(scp.wait_for_files(2)) == 2


# ---- the CLI ------------------------------------------------------------------------------------------


@pytest.mark.e2e
class TestCli:
    def test_echo(self, storescp_factory, capsys: pytest.CaptureFixture[str]) -> None:
        scp = storescp_factory()
        assert main(["echo", scp.peer_text, "--calling-ae", "ME", "--timeout", "5"]) == 0
        out = capsys.readouterr().out
        assert re.fullmatch(rf"C-ECHO to {re.escape(scp.peer_text)}: success \(\d+ ms\)\n", out)

    def test_echo_closed_port(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["echo", f"PACS@127.0.0.1:{free_port()}"]) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.count("\n") == 1 and "connection refused" in captured.err
        assert "Traceback" not in captured.err

    def test_echo_bad_peer_text(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit) as info:
            main(["echo", "PACS@host"])
        assert info.value.code == 2
        assert "expected AE@host:port" in capsys.readouterr().err

    def test_send_folder(self, storescp_factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        scp = storescp_factory()
        _series_files(tmp_path)
        write(tmp_path / "in", "README", b"not DICOM\n")
        write(tmp_path / "in", "DICOMDIR", b"\0" * 128 + b"DICM")
        write(tmp_path / "in" / "sub", "more.dcm", to_bytes(make_dataset()))
        assert main(["send", str(tmp_path / "in"), "--to", scp.peer_text]) == 0
        captured = capsys.readouterr()
        assert captured.out.startswith("sent 6, failed 0, skipped 2 ")
        assert "README: not a DICOM Part 10 file" in captured.err
        assert "DICOMDIR: a DICOMDIR" in captured.err
        assert len(scp.wait_for_files(6)) == 6

    def test_send_not_recursive(self, storescp_factory, tmp_path: Path, capsys) -> None:
        scp = storescp_factory()
        write(tmp_path / "in", "a.dcm", to_bytes(make_dataset()))
        write(tmp_path / "in" / "sub", "b.dcm", to_bytes(make_dataset()))
        assert main(["send", str(tmp_path / "in"), "--no-recursive", "--to", scp.peer_text]) == 0
        assert capsys.readouterr().out.startswith("sent 1, failed 0, skipped 0 ")

    def test_send_failures_listed(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        files = [write(tmp_path, f"{n}.dcm", to_bytes(make_dataset())) for n in ("one", "two")]
        with pynetdicom_scp(status=0xA700) as peer:
            assert main(["send", *map(str, files), "--to", str(peer)]) == 1
        captured = capsys.readouterr()
        assert captured.out.startswith("sent 0, failed 2, skipped 0 ")
        assert f"failed {files[0]}: status 0xA700" in captured.err

    def test_send_peer_down(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        f = write(tmp_path, "a.dcm", to_bytes(make_dataset()))
        assert main(["send", str(f), "--to", f"PACS@127.0.0.1:{free_port()}"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "connection refused" in err

    def test_send_nothing_to_send(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        write(tmp_path, "README", b"hello")
        assert main(["send", str(tmp_path), "--to", "PACS@127.0.0.1:104"]) == 1
        assert "no DICOM files to send" in capsys.readouterr().err


class _SlowAfterWait(threading.Event):
    """A checkpoint whose ``wait`` lingers 5 ms after it returns: the moment of pynetdicom's pause race."""

    def wait(self, timeout: float | None = None) -> bool:
        got = super().wait(timeout)
        time.sleep(0.005)
        return got
