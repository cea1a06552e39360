"""Run dicom3tools' ``dciodvfy`` on a file and count its errors; shared by unit and e2e tests.

dciodvfy checks a file against its IOD's modules and attributes (PS3.3) and prints one line per problem,
starting with ``Error - `` or ``Warning - ``. It exits 0 even with errors, so the lines are what we count.
A missing tool skips the test, never passes it silently.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

__all__ = ["DCIODVFY", "run_dciodvfy"]

DCIODVFY = "/usr/bin/dciodvfy"


def run_dciodvfy(path: str | Path) -> tuple[int, str]:
    """Return (number of ``Error`` lines, whole output) of ``dciodvfy path``; skip if it is absent."""
    if not Path(DCIODVFY).exists() and shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    tool = DCIODVFY if Path(DCIODVFY).exists() else str(shutil.which("dciodvfy"))
    proc = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60, check=False)
    output = proc.stdout + proc.stderr
    errors = sum(1 for line in output.splitlines() if line.lstrip().startswith("Error"))
    return errors, output
