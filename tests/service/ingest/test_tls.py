"""The listener over DICOM TLS: DCMTK storescu/echoscu with certificates from a throwaway CA (e2e), the
settings that cannot work (a clear error at start), and a silent connection not stalling other clients.
"""

from __future__ import annotations

import logging
import socket
import ssl
import subprocess
import time
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import

from service.config import DicomSettings
from service.dicom import tls
from service.ingest.scp import DicomListener
from service.store.instances import Instances
from tests.peers.dcmtk import ECHOSCU, dcmtk_env, require_dcmtk, storescu
from tests.peers.tls import Pki
from tests.service.dicom_factory import chest


def _tls_settings(pki: Pki, *, ca: bool = True, require: bool = False) -> dict[str, object]:
    return {
        "tls_cert_file": pki.server.cert,
        "tls_key_file": pki.server.key,
        "tls_ca_file": pki.ca if ca else None,
        "tls_require_client_cert": require,
    }


@pytest.fixture
def dcm_file(tmp_path: Path) -> Path:
    path = tmp_path / "chest.dcm"
    path.write_bytes(chest())
    return path


def _stored(store: Instances) -> list[str]:
    return sorted(dcmread(p).SOPInstanceUID for p in store.instances_dir.rglob("*.dcm"))


def _store_tls(port: int, path: Path, tls: Sequence[str | Path]) -> subprocess.CompletedProcess[str]:
    return storescu(
        port, [path], aet="PACS_TRIAGE", calling_ae="MODALITY", extra_args=[str(a) for a in tls], timeout=20
    )


def _client(pki: Pki) -> list[str | Path]:
    """storescu/echoscu options: our client certificate, and our CA to verify the listener."""
    return ["+tls", pki.client.key, pki.client.cert, "+cf", pki.ca]


# ---- DCMTK against the TLS listener -------------------------------------------------------------------


@pytest.mark.e2e
class TestDcmtk:
    def test_storescu_over_tls_is_stored(
        self, listen, store: Instances, tls_pki: Pki, dcm_file: Path
    ) -> None:
        lst = listen(**_tls_settings(tls_pki, require=True))
        result = _store_tls(lst.port, dcm_file, _client(tls_pki))
        assert result.returncode == 0, result.stdout + result.stderr
        assert _stored(store) == [dcmread(BytesIO(dcm_file.read_bytes())).SOPInstanceUID]

    def test_echoscu_over_tls(self, listen, tls_pki: Pki) -> None:
        require_dcmtk()
        lst = listen(**_tls_settings(tls_pki))
        cmd = [str(ECHOSCU), *map(str, _client(tls_pki)), "-aec", "PACS_TRIAGE", "127.0.0.1", str(lst.port)]
        result = subprocess.run(cmd, capture_output=True, text=True, env=dcmtk_env(), timeout=20, check=False)
        assert result.returncode == 0, result.stdout + result.stderr

    def test_plain_storescu_to_the_tls_port_stores_nothing(
        self, listen, store: Instances, tls_pki: Pki, dcm_file: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        lst = listen(**_tls_settings(tls_pki))
        result = _store_tls(lst.port, dcm_file, [])
        assert result.returncode != 0
        assert _stored(store) == []
        _wait_for(caplog, "TLS handshake with 127.0.0.1")

    def test_anonymous_client_refused_when_a_certificate_is_required(
        self, listen, store: Instances, tls_pki: Pki, dcm_file: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        lst = listen(**_tls_settings(tls_pki, require=True))
        result = _store_tls(lst.port, dcm_file, ["+tla", "+cf", tls_pki.ca])  # TLS without a certificate
        assert result.returncode != 0
        assert _stored(store) == []
        _wait_for(caplog, "peer did not return a certificate")

    def test_anonymous_client_allowed_when_certificates_are_optional(
        self, listen, store: Instances, tls_pki: Pki, dcm_file: Path
    ) -> None:
        lst = listen(**_tls_settings(tls_pki, require=False))
        result = _store_tls(lst.port, dcm_file, ["+tla", "+cf", tls_pki.ca])
        assert result.returncode == 0, result.stdout + result.stderr
        assert len(_stored(store)) == 1

    @pytest.mark.parametrize("require", [True, False])
    def test_client_certificate_from_another_ca_refused(
        self, listen, store: Instances, tls_pki: Pki, dcm_file: Path, require: bool, caplog
    ) -> None:
        lst = listen(**_tls_settings(tls_pki, require=require))  # optional still means verified if sent
        other: list[str | Path] = [
            "+tls",
            tls_pki.other_client.key,
            tls_pki.other_client.cert,
            "+cf",
            tls_pki.ca,
        ]
        result = _store_tls(lst.port, dcm_file, other)
        assert result.returncode != 0
        assert _stored(store) == []
        _wait_for(caplog, "certificate verify failed")

    def test_storescu_refuses_a_listener_it_does_not_trust(
        self, listen, store: Instances, tls_pki: Pki, dcm_file: Path
    ) -> None:
        lst = listen(**_tls_settings(tls_pki))
        theirs: list[str | Path] = ["+tls", tls_pki.client.key, tls_pki.client.cert, "+cf", tls_pki.other_ca]
        result = _store_tls(lst.port, dcm_file, theirs)
        assert result.returncode != 0
        assert _stored(store) == []


def _wait_for(caplog: pytest.LogCaptureFixture, text: str, timeout: float = 5.0) -> None:
    """The listener logs from its association threads, maybe just after the client gave up."""
    deadline = time.monotonic() + timeout
    while text not in caplog.text:
        assert time.monotonic() < deadline, f"{text!r} never logged:\n{caplog.text}"
        time.sleep(0.02)


# ---- pynetdicom as the client: no DCMTK needed -----------------------------------------------------------


def _echo_tls(port: int, pki: Pki, *, client_cert: bool = True) -> bool:
    ctx = ssl.create_default_context(cafile=pki.ca)
    if client_cert:
        ctx.load_cert_chain(pki.client.cert, pki.client.key)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_TRIAGE", tls_args=(ctx, "127.0.0.1"))
    if not assoc.is_established:
        return False
    try:
        return bool(assoc.send_c_echo().Status == 0x0000)
    finally:
        assoc.release()


def test_pynetdicom_echo_over_tls_and_the_start_log(listen, tls_pki: Pki, caplog) -> None:
    caplog.set_level(logging.INFO, logger="service.ingest.scp")
    lst = listen(**_tls_settings(tls_pki, require=True))
    assert _echo_tls(lst.port, tls_pki)
    assert "TLS 1.2+" in caplog.text and "client certificate required" in caplog.text


def test_plain_listener_says_tls_off(listen, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="service.ingest.scp")
    listen()
    assert "TLS off" in caplog.text


def test_tls_1_2_is_the_floor(tls_pki: Pki) -> None:
    ctx = tls.server_tls(DicomSettings(**_tls_settings(tls_pki)))
    assert ctx is not None and ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_OPTIONAL  # a CA without require: verified when sent


def test_a_silent_connection_does_not_stall_other_clients(listen, tls_pki: Pki) -> None:
    """pynetdicom would do this handshake on the accepting thread, and wait for ever."""
    lst = listen(**_tls_settings(tls_pki))
    with socket.create_connection(("127.0.0.1", lst.port)):  # connects, never says a word
        started = time.monotonic()
        assert _echo_tls(lst.port, tls_pki)
        assert time.monotonic() - started < tls.TLS_HANDSHAKE_TIMEOUT_S / 2


def test_a_silent_connection_is_dropped_after_the_handshake_timeout(
    listen, tls_pki: Pki, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tls, "TLS_HANDSHAKE_TIMEOUT_S", 0.2)
    lst = listen(**_tls_settings(tls_pki))
    with socket.create_connection(("127.0.0.1", lst.port)) as silent:
        _wait_for(caplog, "no handshake within 0.2 s")
        silent.settimeout(5)
        assert silent.recv(1) == b""  # we closed it


# ---- settings that cannot work: one sentence at start, naming the setting --------------------------------


def _bad(pki: Pki, tmp_path: Path) -> list[tuple[dict[str, object], str]]:
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(
        [
            "openssl",
            "pkey",
            "-in",
            str(pki.server.key),
            "-aes256",
            "-passout",
            "pass:x",
            "-out",
            str(encrypted),
        ],
        check=True,
        capture_output=True,
    )
    ok = _tls_settings(pki)
    return [
        (
            {**ok, "tls_key_file": pki.client.key},
            "dicom.tls_key_file .* is not the key of dicom.tls_cert_file",
        ),
        ({**ok, "tls_cert_file": tmp_path / "nope.crt"}, r"dicom.tls_cert_file .*nope.crt: No such file"),
        ({**ok, "tls_ca_file": tmp_path / "nope.crt"}, r"dicom.tls_ca_file .*nope.crt: No such file"),
        ({**ok, "tls_ca_file": pki.server.key}, "dicom.tls_ca_file .* holds no PEM certificate"),
        ({**ok, "tls_cert_file": pki.server.key}, "is not PEM"),
        ({**ok, "tls_key_file": encrypted}, "dicom.tls_key_file is encrypted"),
        ({**ok, "tls_key_file": None}, "dicom.tls_key_file is missing"),
        ({**ok, "tls_ca_file": None, "tls_require_client_cert": True}, "needs dicom.tls_ca_file"),
        ({"tls_ca_file": pki.ca}, "dicom.tls_ca_file is set but the listener has no TLS"),
        (
            {"tls_require_client_cert": True},
            "dicom.tls_require_client_cert is set but the listener has no TLS",
        ),
    ]


def test_settings_that_cannot_work_fail_the_start(store: Instances, tls_pki: Pki, tmp_path: Path) -> None:
    for settings, words in _bad(tls_pki, tmp_path):
        lst = DicomListener(DicomSettings(host="127.0.0.1", port=0, **settings), store, quiet_seconds=60)
        with pytest.raises(ValueError, match=words):
            lst.start()
        lst.stop()  # nothing was bound; stopping is still safe
