"""The DICOM client over TLS against DCMTK storescp ``+tls`` (e2e): delivery, certificate checks on both
sides, and the CLI's ``--tls*`` options. Every failure must be one DicomPeerError sentence, and no socket
may leak (a ResourceWarning fails the test: warnings are errors and each failure test collects garbage).
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
from pydicom import dcmread

from service.__main__ import main
from service.config import Settings
from service.deliver.association import Peer
from service.deliver.dicom import DicomDelivery
from service.deliver.scu import echo, send
from service.dicom.tls import TlsClient
from service.errors import DicomPeerError
from tests.peers.dcmtk import StoreSCP
from tests.peers.tls import Pki
from tests.service.dicom_factory import make_dataset, to_bytes


def _tls_scp(
    factory, pki: Pki, *, server=None, ca: Path | None = None, extra: tuple[str, ...] = ()
) -> StoreSCP:
    """storescp with DCMTK's default TLS profile (BCP 195 non-downgrading), requiring a client certificate
    from ``ca`` unless ``-ic`` is in ``extra``."""
    server = server or pki.server
    args = ["+tls", str(server.key), str(server.cert), "+cf", str(ca or pki.ca), *extra]
    return factory(aet="PACS", extra_args=args)


def _full(pki: Pki) -> TlsClient:
    return TlsClient(pki.ca, pki.client.cert, pki.client.key)


def _fails(peer: Peer, tls: TlsClient) -> DicomPeerError:
    with pytest.raises(DicomPeerError) as info:
        echo(peer, tls=tls, timeout=5)
    gc.collect()  # a leaked socket's ResourceWarning would surface here, as an error
    assert info.value.reason == "tls"
    assert str(info.value).startswith(f"TLS handshake with {peer} failed: ")
    return info.value


@pytest.mark.e2e
class TestDcmtk:
    def test_send_arrives(self, storescp_factory, tls_pki: Pki) -> None:
        scp = _tls_scp(storescp_factory, tls_pki)
        datasets = [make_dataset() for _ in range(3)]
        outcomes = send(Peer.parse(scp.peer_text), datasets, tls=_full(tls_pki))
        assert all(o.ok for o in outcomes), outcomes
        received = sorted(dcmread(p).SOPInstanceUID for p in scp.wait_for_files(3))
        assert received == sorted(ds.SOPInstanceUID for ds in datasets)
        assert "TLS" in scp.log(200)

    def test_by_host_name(self, storescp_factory, tls_pki: Pki) -> None:
        scp = _tls_scp(storescp_factory, tls_pki)
        assert echo(Peer("PACS", "localhost", scp.port), tls=_full(tls_pki)).ok  # DNS:localhost in the SAN

    def test_server_certificate_from_another_ca(self, storescp_factory, tls_pki: Pki) -> None:
        scp = _tls_scp(storescp_factory, tls_pki, server=tls_pki.other_server)
        exc = _fails(Peer.parse(scp.peer_text), _full(tls_pki))
        assert "certificate verify failed: unable to get local issuer certificate" in str(exc)
        assert f"issued by the CA file {tls_pki.ca}" in str(exc)
        assert exc.transient is False
        assert scp.files() == []

    def test_system_cas_do_not_know_a_private_ca(self, storescp_factory, tls_pki: Pki) -> None:
        scp = _tls_scp(storescp_factory, tls_pki, extra=("-ic",))
        exc = _fails(Peer.parse(scp.peer_text), TlsClient())
        assert "certificate verify failed" in str(exc) and "system CAs" in str(exc)

    def test_address_not_in_the_certificate(self, storescp_factory, tls_pki: Pki) -> None:
        """127.0.0.2 reaches the same storescp (all of 127/8 is loopback) but is not in its certificate."""
        scp = _tls_scp(storescp_factory, tls_pki)
        peer = Peer("PACS", "127.0.0.2", scp.port)
        exc = _fails(peer, _full(tls_pki))
        assert "certificate verify failed: IP address mismatch" in str(exc)
        assert "must name 127.0.0.2 in its subjectAltName" in str(exc)
        unchecked = TlsClient(tls_pki.ca, tls_pki.client.cert, tls_pki.client.key, check_hostname=False)
        assert echo(peer, tls=unchecked).ok  # the chain is still verified: see the other-CA test

    def test_no_client_certificate_for_a_peer_that_requires_one(self, storescp_factory, tls_pki) -> None:
        scp = _tls_scp(storescp_factory, tls_pki)
        exc = _fails(Peer.parse(scp.peer_text), TlsClient(tls_pki.ca))
        assert "certificate required" in str(exc) and "client certificate" in str(exc)

    def test_client_certificate_from_another_ca(self, storescp_factory, tls_pki: Pki) -> None:
        scp = _tls_scp(storescp_factory, tls_pki)
        theirs = TlsClient(tls_pki.ca, tls_pki.other_client.cert, tls_pki.other_client.key)
        exc = _fails(Peer.parse(scp.peer_text), theirs)
        assert "unknown ca" in str(exc) and "does not trust the CA of our client certificate" in str(exc)

    def test_tls_to_a_plain_port(self, storescp_factory, tls_pki: Pki) -> None:
        scp = storescp_factory(aet="PACS")
        exc = _fails(Peer.parse(scp.peer_text), _full(tls_pki))
        assert "is that port TLS at all?" in str(exc)
        assert exc.transient is True

    def test_plain_to_a_tls_port_is_not_a_tls_error(self, storescp_factory, tls_pki: Pki) -> None:
        scp = _tls_scp(storescp_factory, tls_pki)
        with pytest.raises(DicomPeerError) as info:
            echo(Peer.parse(scp.peer_text), timeout=5)
        assert info.value.reason != "tls"


# ---- TLS settings that cannot work -------------------------------------------------------------------


class TestTlsClient:
    def test_certificate_without_key(self, tls_pki: Pki) -> None:
        with pytest.raises(ValueError, match="needs its key"):
            TlsClient(tls_pki.ca, tls_pki.client.cert)

    def test_missing_ca_file(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match=r"TLS CA file .*nope.pem: No such file or directory"):
            TlsClient(tmp_path / "nope.pem").context()

    def test_key_of_another_certificate(self, tls_pki: Pki) -> None:
        with pytest.raises(ValueError, match="the key does not belong to the certificate"):
            TlsClient(tls_pki.ca, tls_pki.client.cert, tls_pki.server.key).context()

    def test_context_is_tls_1_2_or_later_and_checks_names(self, tls_pki: Pki) -> None:
        import ssl

        ctx = _full(tls_pki).context()
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
        assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname

    def test_delivery_settings(self, tls_pki: Pki, tmp_path: Path) -> None:
        tls = {
            "tls_ca_file": tls_pki.ca,
            "tls_cert_file": tls_pki.client.cert,
            "tls_key_file": tls_pki.client.key,
        }
        settings = Settings(data_dir=tmp_path, delivery={"tls": True, **tls})
        assert DicomDelivery(None, settings).tls == _full(tls_pki)  # type: ignore[arg-type]
        assert DicomDelivery(None, Settings(data_dir=tmp_path, delivery=tls)).tls is None  # type: ignore[arg-type]

    def test_delivery_with_a_missing_file_fails_at_start(self, tmp_path: Path) -> None:
        settings = Settings(data_dir=tmp_path, delivery={"tls": True, "tls_ca_file": tmp_path / "x.pem"})
        with pytest.raises(ValueError, match="TLS CA file"):
            DicomDelivery(None, settings)  # type: ignore[arg-type]


# ---- the CLI ------------------------------------------------------------------------------------------


@pytest.mark.e2e
class TestCli:
    def test_echo_with_a_ca_only(self, storescp_factory, tls_pki: Pki, capsys) -> None:
        scp = _tls_scp(storescp_factory, tls_pki, extra=("-ic",))  # asks no client certificate
        assert main(["echo", "--tls", "--tls-ca", str(tls_pki.ca), scp.peer_text]) == 0
        assert "success" in capsys.readouterr().out

    def test_send_with_a_client_certificate(
        self, storescp_factory, tls_pki: Pki, tmp_path: Path, capsys
    ) -> None:
        scp = _tls_scp(storescp_factory, tls_pki)
        (tmp_path / "a.dcm").write_bytes(to_bytes(make_dataset()))
        cert = ["--tls-ca", str(tls_pki.ca), "--tls-cert", str(tls_pki.client.cert)]
        assert (
            main(
                [
                    "send",
                    str(tmp_path / "a.dcm"),
                    "--to",
                    scp.peer_text,
                    *cert,
                    "--tls-key",
                    str(tls_pki.client.key),
                ]
            )
            == 0
        )
        assert capsys.readouterr().out.startswith("sent 1, failed 0")
        assert len(scp.wait_for_files(1)) == 1

    def test_echo_untrusted_server(self, storescp_factory, tls_pki: Pki, capsys) -> None:
        scp = _tls_scp(storescp_factory, tls_pki, server=tls_pki.other_server, extra=("-ic",))
        assert main(["echo", "--tls-ca", str(tls_pki.ca), scp.peer_text]) == 1  # --tls-ca implies --tls
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "certificate verify failed" in err and "Traceback" not in err

    def test_certificate_without_key(self, tls_pki: Pki, capsys) -> None:
        assert main(["echo", "--tls-cert", str(tls_pki.client.cert), "PACS@127.0.0.1:104"]) == 1
        assert "needs its key" in capsys.readouterr().err
