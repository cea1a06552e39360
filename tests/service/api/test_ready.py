"""``/healthz/ready`` (issue 15 item 3): 503 with the reason while the data disk is over its watermark or
refuses writes, and 200 again once it recovers, without a restart. The full disk is a real one: a tmpfs
filled to the last byte (needs root to mount, as tests/reliability/test_faults.py)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.tmpfs import mounted_tmpfs
from tests.service.conftest import running_app
from tests.service.dicom_factory import chest

pytestmark = pytest.mark.anyio

DICOM = {"Content-Type": "application/dicom"}


async def test_over_the_watermark_is_503_until_it_is_not(make_settings) -> None:
    async with running_app(make_settings()) as (app, client):
        store = app.state.triage.instances  # retention.disk_high_watermark, as the store applies it
        store.disk_high_watermark = 1e-9  # any real disk is fuller than that
        r = await client.get("/healthz/ready")
        assert r.status_code == 503 and r.headers["content-type"].startswith("application/problem+json")
        problem = r.json()
        assert problem["part"] == "disk" and "the data disk is" in problem["detail"]
        assert "above the high watermark" in problem["detail"]
        assert problem["disks"][0]["disk"] == "data"
        assert (await client.post("/v1/studies", content=chest(), headers=DICOM)).status_code == 507
        assert (await client.get("/healthz/live")).status_code == 200  # alive, just not ready
        store.disk_high_watermark = 0.999999
        assert (await client.get("/healthz/ready")).status_code == 200
        assert (await client.post("/v1/studies", content=chest(), headers=DICOM)).status_code == 202


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted where the app keeps its instances."""
    mnt = tmp_path / "var" / "instances"
    with mounted_tmpfs(mnt, "2m"):
        yield mnt


def _fill(directory: Path) -> Path:
    """Write until the file system says ENOSPC; returns the filler file."""
    filler = directory / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


async def test_a_disk_that_refuses_writes_is_503_until_it_has_room(make_settings, small_disk: Path) -> None:
    # Watermark off: only the write probe can notice the full disk.
    settings = make_settings(retention={"disk_high_watermark": 1.0})
    async with running_app(settings) as (_app, client):
        filler = _fill(small_disk)
        r = await client.get("/healthz/ready")
        assert r.status_code == 503, r.text
        assert "the data disk refuses writes (No space left on device)" in r.json()["detail"]
        assert (await client.post("/v1/studies", content=chest(), headers=DICOM)).status_code == 507
        filler.unlink()
        assert (await client.get("/healthz/ready")).status_code == 200
        assert (await client.post("/v1/studies", content=chest(), headers=DICOM)).status_code == 202
    assert not list(small_disk.glob(".incoming-*"))  # the probe leaves nothing behind
