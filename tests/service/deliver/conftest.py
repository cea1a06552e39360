"""Fixtures of the delivery tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.service.deliver.messages import header


@pytest.fixture
def header_file(tmp_path: Path) -> Path:
    """A stored instance's header (sentinel patient data) for senders that read demographics."""
    path = tmp_path / "header.dcm"
    header().save_as(path, enforce_file_format=True)
    return path
