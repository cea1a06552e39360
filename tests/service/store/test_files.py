"""Instance files: UID-only paths, atomic durable writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.errors import InvalidUIDError
from service.store.files import instance_relpath, is_safe_uid, write_durably


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
