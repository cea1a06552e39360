"""The Orthanc harness against the real Orthanc and DCMTK: the peers the e2e tests build on must behave."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO

from tests.peers import free_port
from tests.peers.orthanc import Orthanc
from tests.service.dicom_factory import SENTINEL_ID, chest, make_dataset, to_bytes

pytestmark = pytest.mark.e2e

STORESCU = shutil.which("storescu") or "/usr/bin/storescu"


def storescu(pacs: Orthanc, path: Path) -> subprocess.CompletedProcess[str]:
    """Send one file with DCMTK's storescu, as a modality would (TCP_NODELAY=1: see PEERS.md)."""
    if not Path(STORESCU).exists():
        pytest.skip("storescu not installed: run scripts/install-peers (scripts/test does)")
    return subprocess.run(
        [STORESCU, "-v", "-aet", "TESTSCU", "-aec", pacs.aet, "127.0.0.1", str(pacs.dicom_port), str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "TCP_NODELAY": "1"},
    )


def nobody_listens(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_upload_find_and_read_back(orthanc_factory):
    pacs = orthanc_factory()
    data = chest()
    sop_uid = dcmread(DicomBytesIO(data)).SOPInstanceUID

    instance_id = pacs.upload(data)

    assert pacs.instances() == [instance_id]
    assert pacs.find("Instance", {"SOPInstanceUID": sop_uid}) == [instance_id]
    assert pacs.find("Study", {"PatientID": SENTINEL_ID, "ModalitiesInStudy": "CR"})
    assert pacs.find("Instance", {"SOPInstanceUID": "1.2.3.4"}) == []
    tags = pacs.instance_tags(instance_id)
    assert (tags["SOPInstanceUID"], tags["PatientID"], tags["Modality"]) == (sop_uid, SENTINEL_ID, "CR")
    assert dcmread(DicomBytesIO(pacs.instance_file(instance_id))).SOPInstanceUID == sop_uid

    pacs.delete_all()
    assert pacs.instances() == []


def test_storescu_stores_and_orthanc_refuses_missing_uids(orthanc_factory, tmp_path):
    """Orthanc 1.10.1 refuses (0xA700) instances without Study/Series UID, but NOT those without PatientID."""
    pacs = orthanc_factory()
    good = tmp_path / "good.dcm"
    good.write_bytes(chest())
    no_study = make_dataset()
    del no_study.StudyInstanceUID
    bad = tmp_path / "no-study-uid.dcm"
    bad.write_bytes(to_bytes(no_study))
    no_patient_id = make_dataset()
    del no_patient_id.PatientID
    anonymous = tmp_path / "no-patient-id.dcm"
    anonymous.write_bytes(to_bytes(no_patient_id))

    sent = storescu(pacs, good)
    assert sent.returncode == 0, sent.stderr
    (instance_id,) = pacs.wait_for_instances(1, timeout=10)
    assert pacs.instance_tags(instance_id)["SOPInstanceUID"] == dcmread(good).SOPInstanceUID

    refused = storescu(pacs, bad)
    assert refused.returncode != 0  # DCMTK 3.6.7 storescu: 167 when a store is refused
    assert "Refused: OutOfResources" in refused.stdout + refused.stderr, refused
    assert pacs.instances() == [instance_id]

    assert storescu(pacs, anonymous).returncode == 0
    assert len(pacs.wait_for_instances(2)) == 2


def test_fixed_ports_a_pacs_that_comes_up_later(orthanc_factory, tmp_path):
    dicom_port, http_port = free_port(), free_port()
    assert nobody_listens(dicom_port)  # "the PACS is down"

    pacs = orthanc_factory(aet="LATEPACS", dicom_port=dicom_port, http_port=http_port)

    assert (pacs.dicom_port, pacs.http_url) == (dicom_port, f"http://127.0.0.1:{http_port}")
    assert pacs.peer_text == f"LATEPACS@127.0.0.1:{dicom_port}"
    assert not nobody_listens(dicom_port)
    path = tmp_path / "late.dcm"
    path.write_bytes(chest())
    assert storescu(pacs, path).returncode == 0
    pacs.wait_for_instances(1)


def test_store_to_modality_reaches_another_orthanc(orthanc_factory):
    receiver = orthanc_factory(aet="RECEIVER")
    modalities = {"RECV": ("RECEIVER", "127.0.0.1", receiver.dicom_port)}
    sender = orthanc_factory(aet="SENDER", modalities=modalities)
    instance_id = sender.upload(chest())

    sender.store_to_modality("RECV", [instance_id])

    (received,) = receiver.wait_for_instances(1)
    assert received == instance_id  # Orthanc ids hash the UIDs, so they match across servers


def test_graceful_stop_leaves_no_process_and_frees_ports(tmp_path):
    with Orthanc.start(tmp_path) as pacs:
        pid, ports = pacs.proc.pid, (pacs.dicom_port, pacs.http_port)
        pacs.upload(chest())

    assert pacs.proc.returncode == 0  # /tools/shutdown, not a signal
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not a zombie
    assert all(nobody_listens(port) for port in ports)
    pacs.stop()  # idempotent

    # Same directory and ports again: the data survived, the ports can be bound at once.
    with Orthanc.start(tmp_path, dicom_port=ports[0], http_port=ports[1]) as again:
        assert len(again.instances()) == 1
        again.stop(graceful=False)
        assert again.proc.returncode == -9


def test_lua_forwards_every_stored_instance(orthanc_factory):
    """The auto-routing PACS set-up: an OnStoredInstance script C-STOREs each new instance onwards."""
    receiver = orthanc_factory(aet="RECEIVER")
    lua = """
    function OnStoredInstance(instanceId, tags, metadata, origin)
      SendToModality(instanceId, 'RECV')
    end
    """
    router = orthanc_factory(
        aet="ROUTER", modalities={"RECV": ("RECEIVER", "127.0.0.1", receiver.dicom_port)}, lua=lua
    )

    router.upload(chest())
    router.upload(chest())

    assert len(receiver.wait_for_instances(2)) == 2
