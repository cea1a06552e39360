"""Suite-wide test set-up: no network from pydicom's test-data helpers; deterministic hypothesis runs."""

from __future__ import annotations

import pytest
from hypothesis import settings

# CI must be deterministic: the same examples every run (derandomize), none replayed from a local
# database that a clean checkout lacks. Exploring new examples is a fuzzing session's job, not CI's; a
# case found there becomes an explicit example or a namesake test.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.load_profile("ci")

# The real-peer fixtures (orthanc_factory, storescp_factory, tls_pki, postgres_url) for every test package.
pytest_plugins = [
    "tests.peers.orthanc",
    "tests.peers.dcmtk",
    "tests.peers.tls",
    "tests.peers.mlserver",
    "tests.peers.postgres",
    "tests.fixtures.listener",  # store + listen: our DICOM listener on a real store
]


@pytest.fixture(autouse=True, scope="session")
def _no_pydicom_downloads() -> object:
    """pydicom fetches missing test files from GitHub on demand; the suite must never touch the network."""
    from pydicom.data import download

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("pydicom test-data download attempted in tests (network is off-limits)")

    mp = pytest.MonkeyPatch()
    mp.setattr(download, "download_with_progress", refuse)
    yield
    mp.undo()
