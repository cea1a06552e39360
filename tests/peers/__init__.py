"""Real peers for the tests (DCMTK, Orthanc, a throwaway TLS CA) and what they share."""

from __future__ import annotations

import socket
from pathlib import Path

__all__ = ["free_port", "log_tail"]


def free_port() -> int:
    """A TCP port free on all interfaces right now (storescp and Orthanc's DICOM port bind 0.0.0.0).

    Also how a test reserves a port for "a peer that is down at first": take one, let nobody listen on it,
    then start the peer on it later (``Orthanc.start(..., dicom_port=port)``, ``StoreSCP.start(..., port=)``).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def log_tail(path: Path, lines: int = 40) -> str:
    """The end of a peer's log, for assertion messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
