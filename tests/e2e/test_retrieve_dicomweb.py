"""Pull from a DICOMweb source against a real Orthanc with its DICOMweb plugin: QIDO-RS, then WADO-RS.

The DICOMweb twin of test_retrieve.py: ``POST /v1/retrievals`` with a base URL as the source, and
``pacs-triage retrieve --from https://…``, must bring the study in through the normal path (stored durably,
analysed, result readable), and an unknown accession, an unconfigured or unreachable source must each be a
clear answer. The plugin is the Debian package ``orthanc-dicomweb`` (scripts/install-peers), loaded through
the test Orthanc's ``Plugins`` setting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread

from service.__main__ import main
from service.config import Settings
from tests.e2e.test_retrieve import _result
from tests.peers import free_port
from tests.peers.orthanc import Orthanc, OrthancFactory
from tests.service.conftest import make_settings, running_app, tiny_models_dir  # noqa: F401 - fixtures
from tests.service.dicom_factory import chest, make_dataset, to_bytes

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

AET = "PACS_TRIAGE"
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _dicomweb_orthanc(factory: OrthancFactory) -> tuple[Orthanc, str]:
    """An Orthanc serving DICOMweb at ``/dicom-web``; the base URL a client uses."""
    if not PLUGIN.exists():
        pytest.skip(f"{PLUGIN} not installed: run scripts/install-peers (scripts/test does)")
    plugin = {"Plugins": [str(PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    pacs = factory(extra_config=plugin)
    return pacs, f"{pacs.http_url}/dicom-web"


def _two_instance_study(pacs: Orthanc, accession: str) -> str:
    first = dcmread(BytesIO(chest()))
    second = make_dataset(
        study_uid=first.StudyInstanceUID, series_uid=first.SeriesInstanceUID, instance_number=2
    )
    second.AccessionNumber = first.AccessionNumber = accession
    for ds in (first, second):
        pacs.upload(to_bytes(ds))
    return str(first.StudyInstanceUID)


async def test_retrieve_from_dicomweb_through_the_api(
    make_settings: Callable[..., Settings],  # noqa: F811
    orthanc_factory: OrthancFactory,
) -> None:
    pacs, base = _dicomweb_orthanc(orthanc_factory)
    study_uid = _two_instance_study(pacs, "ACC-WEB-1")
    pacs.upload(chest())  # another study, another accession: must stay where it is
    closed = f"http://127.0.0.1:{free_port()}/dicom-web"
    settings = make_settings(dicom={"enabled": False, "retrieve_sources": [base + "/", closed]})
    async with running_app(settings) as (_app, client):
        r = await client.post("/v1/retrievals", json={"accession_number": "ACC-WEB-1", "source": base})
        assert r.status_code == 202, r.text
        body = r.json()
        assert (body["studies"], body["completed"], body["failed"]) == ([study_uid], 2, 0)
        assert r.headers["location"] == f"/v1/studies/{study_uid}/result"
        result = await _result(client, study_uid)
        assert result["status"] != "failed" and result["accession_number"] == "ACC-WEB-1"
        r = await client.get("/dicomweb/studies", params={"StudyInstanceUID": study_uid})
        assert r.status_code == 200 and len(r.json()) == 1  # stored here, visible through our QIDO-RS

        # by study UID too; the instances are known already, so the retry is harmless
        r = await client.post("/v1/retrievals", json={"study_uid": study_uid, "source": base + "/"})
        assert r.status_code == 202 and r.json()["completed"] == 2

        r = await client.post("/v1/retrievals", json={"accession_number": "NO-SUCH-ACC", "source": base})
        assert r.status_code == 404 and r.headers["content-type"].startswith("application/problem+json")
        assert "holds no study with this accession number" in r.json()["detail"]
        assert "NO-SUCH" not in r.json()["detail"]  # the accession number is not echoed
        r = await client.post("/v1/retrievals", json={"accession_number": "A", "source": closed})
        assert r.status_code == 502 and "could not be reached" in r.json()["detail"]
        elsewhere = {"accession_number": "ACC-WEB-1", "source": f"http://127.0.0.1:{free_port()}/x"}
        r = await client.post("/v1/retrievals", json=elsewhere)  # not configured: nothing is asked
        assert r.status_code == 422 and "dicom.retrieve_sources" in r.json()["detail"]
        r = await client.post(
            "/v1/retrievals", json={"accession_number": "ACC-WEB-1", "source": base, "method": "get"}
        )
        assert r.status_code == 400 and r.json()["part"] == "method"
        with_password = base.replace("http://", "http://user:secret@")
        r = await client.post("/v1/retrievals", json={"accession_number": "A", "source": with_password})
        assert r.status_code == 400 and "secret" not in r.text


async def test_retrieve_command_from_dicomweb(
    make_settings: Callable[..., Settings],  # noqa: F811
    orthanc_factory: OrthancFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The command fetches the study and C-STOREs it to the running listener (``--store-to``)."""
    pacs, base = _dicomweb_orthanc(orthanc_factory)
    study_uid = _two_instance_study(pacs, "ACC-WEB-CLI")
    port = free_port()
    async with running_app(make_settings(dicom={"port": port, "ae_title": AET})) as (_app, client):
        listener = f"{AET}@127.0.0.1:{port}"
        command = ["retrieve", "--accession", "ACC-WEB-CLI", "--from", base, "--store-to", listener]
        assert await asyncio.to_thread(main, command) == 0
        result = await _result(client, study_uid)
        assert result["accession_number"] == "ACC-WEB-CLI"
        unknown = ["retrieve", "--accession", "UNKNOWN-ACC", "--from", base, "--store-to", listener]
        assert await asyncio.to_thread(main, unknown) == 1
        r = await client.get(f"/dicomweb/studies/{study_uid}/instances")
        assert r.status_code == 200 and len(r.json()) >= 2
    out, err = capsys.readouterr()
    assert f"retrieved 1 study(ies) to {listener}: 2 instance(s) sent, 0 failed" in out
    assert "retrieve failed:" in err and "holds no study with this accession number" in err


def test_dicomweb_source_url_is_checked() -> None:
    from service.retrieve_web import is_dicomweb_source, source_url

    assert is_dicomweb_source("HTTPS://pacs/dicom-web") and not is_dicomweb_source("PACS@host:104")
    assert source_url("HTTP://Pacs:8042/dicom-web/") == "http://pacs:8042/dicom-web"
    for bad in ("http:///x", "ftp://pacs/x", "https://u:p@pacs/x"):
        with pytest.raises(ValueError):
            source_url(bad)
