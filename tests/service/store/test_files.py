"""Instance files: UID-only paths, atomic durable writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.errors import InvalidUIDError, StorageFullError
from service.store.files import (
    DiskSpace,
    check_free_space,
    disk_space,
    instance_relpath,
    is_safe_uid,
    write_durably,
)


@pytest.mark.parametrize("uid", ["1.2.3", "0", "1.2.840.10008.1.2.4.50", "1." + "2" * 62])
def test_valid_uids(uid: str) -> None:
    assert is_safe_uid(uid)


@pytest.mark.parametrize(
    "uid", ["", "..", "1..2", "1.02", "1.2.", "/etc", "1.2/3", "1.a", "1." + "2" * 63, "1.2 "]
)
def test_invalid_uids(uid: str) -> None:
    assert not is_safe_uid(uid)


def test_relpath_refuses_traversal() -> None:
    with pytest.raises(InvalidUIDError):
        instance_relpath("1.2", "..", "1.3")
    assert instance_relpath("1.2", "1.3", "1.4") == Path("1.2/1.3/1.4.dcm")


def test_write_durably_replaces_atomically(tmp_path: Path) -> None:
    rel = instance_relpath("1.2", "1.3", "1.4")
    write_durably(tmp_path, rel, b"first")
    path = write_durably(tmp_path, rel, b"second")
    assert path.read_bytes() == b"second"
    assert [p.name for p in path.parent.iterdir()] == ["1.4.dcm"]  # no temp files left behind


def test_concurrent_writers_into_one_directory_share_its_fsyncs(tmp_path: Path) -> None:
    """Sixteen writers into one series directory: every file whole and in place, nothing staged left."""
    from concurrent.futures import ThreadPoolExecutor

    def write(i: int) -> Path:
        return write_durably(tmp_path, Path("1.2") / "1.3" / f"1.4.{i}.dcm", bytes([i]) * 100_000)

    with ThreadPoolExecutor(16) as pool:
        paths = list(pool.map(write, range(64)))
    assert [p.read_bytes() == bytes([i]) * 100_000 for i, p in enumerate(paths)] == [True] * 64
    assert not list(tmp_path.rglob(".incoming-*"))


def test_a_failed_directory_fsync_fails_its_writer_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer whose directory fsync failed is told (so its sender hears 0xA700); the next writer into
    the directory issues its own fsync rather than trusting the failed one."""
    import errno
    import os

    from service.errors import StorageFullError
    from service.store import files

    real, failures = files.fsync_dir, [OSError(errno.ENOSPC, "No space left on device")]

    def flaky(path: Path) -> None:
        if failures:
            raise failures.pop()
        real(path)

    monkeypatch.setattr(files, "fsync_dir", flaky)
    with pytest.raises(StorageFullError):
        write_durably(tmp_path, Path("1.2/1.3/1.4.dcm"), b"first")
    assert write_durably(tmp_path, Path("1.2/1.3/1.5.dcm"), b"second").read_bytes() == b"second"
    assert os.listdir(tmp_path / "1.2" / "1.3") == ["1.5.dcm"]  # the failed one is not left behind


class _Volume:
    """statvfs(3) of a 1,000-block volume with 400 blocks used and 500 reserved for root: ``df`` shows
    400 used, 100 available, 80 %; ``shutil.disk_usage`` used / total says 40 %."""

    f_frsize = f_bsize = 4096
    f_blocks, f_bfree, f_bavail = 1000, 600, 100


@pytest.fixture
def reserved_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("service.store.files.os.statvfs", lambda _path: _Volume())


def test_disk_space_is_what_df_shows(reserved_volume: None, tmp_path: Path) -> None:
    space = disk_space(tmp_path)
    assert space == DiskSpace(used=400 * 4096, available=100 * 4096)
    assert space.fraction_used == pytest.approx(0.8)
    assert space.room_below(0.9) == int(0.9 * 500 * 4096) - 400 * 4096  # 50 blocks
    assert space.room_below(0.5) == 0 and space.room_below(1.0) == 100 * 4096


def test_the_watermark_counts_reserved_blocks_as_taken(reserved_volume: None, tmp_path: Path) -> None:
    """80 % for df: refused above a 75 % watermark (measured on total it was 40 %, and taken until
    ENOSPC for anyone but root), taken below an 85 % one."""
    with pytest.raises(StorageFullError, match="80% full"):
        check_free_space(tmp_path, 0.75)
    check_free_space(tmp_path, 0.85)


def test_a_file_system_without_blocks_is_never_full(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    class Empty(_Volume):
        f_blocks = f_bfree = f_bavail = 0

    monkeypatch.setattr("service.store.files.os.statvfs", lambda _path: Empty())
    assert disk_space(tmp_path).fraction_used == 0.0
    check_free_space(tmp_path, 0.5)
