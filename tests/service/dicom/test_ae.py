"""Our Implementation Class UID and Version Name (PS3.7 D.3.3.2), as DCMTK storescp sees them."""

from __future__ import annotations

import time

import pytest
from pydicom.uid import UID

from service.deliver.association import Peer
from service.deliver.scu import echo
from service.dicom.ae import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    implementation_version_name,
)
from tests.peers.dcmtk import StoreSCPFactory


def test_uid_is_valid_and_ours() -> None:
    assert UID(IMPLEMENTATION_CLASS_UID).is_valid
    assert IMPLEMENTATION_CLASS_UID.startswith("2.25.") and len(IMPLEMENTATION_CLASS_UID) <= 64


@pytest.mark.parametrize(
    ("version", "name"),
    [
        ("0.1.0", "PACSTRIAGE_0.1.0"),
        ("10.20.30", "PACSTRIAGE_10.20"),  # cut to 16 characters (SH)
        ("1.0+local-build", "PACSTRIAGE_1.0lo"),  # "+" and "-" are dropped
    ],
)
def test_version_name(version: str, name: str) -> None:
    assert implementation_version_name(version) == name
    assert 1 <= len(IMPLEMENTATION_VERSION_NAME) <= 16 and IMPLEMENTATION_VERSION_NAME.startswith(
        "PACSTRIAGE_"
    )


def test_the_client_announces_them(storescp_factory: StoreSCPFactory) -> None:
    scp = storescp_factory(aet="PACS", extra_args=["-d"])  # -d: storescp logs the A-ASSOCIATE-RQ
    assert echo(Peer.parse(scp.peer_text), timeout=10).ok
    for _ in range(100):  # storescp writes its log after answering; the C-ECHO-RSP may arrive first
        log = scp.log(lines=400)
        if IMPLEMENTATION_VERSION_NAME in log:
            break
        time.sleep(0.05)
    assert f"Their Implementation Class UID:    {IMPLEMENTATION_CLASS_UID}" in log, log
    assert f"Their Implementation Version Name: {IMPLEMENTATION_VERSION_NAME}" in log, log
