"""pydicom's own test files by name, as a Path (never downloaded).

``pydicom.data.get_testdata_file`` answers ``str | Dataset | None`` (a Dataset only with ``read=True``, None
when the file is neither in the wheel nor in the download cache); the tests want a path and a clear failure
naming the file when it is missing.
"""

from __future__ import annotations

from pathlib import Path

from pydicom.data import get_testdata_file


def pydicom_testdata(name: str) -> Path:
    """The path of pydicom's test file ``name``; fails naming it when this pydicom does not ship it."""
    found = get_testdata_file(name, download=False)
    assert isinstance(found, str), f"pydicom test file {name} not found (not in the wheel, not downloaded)"
    return Path(found)
