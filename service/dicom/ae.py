"""Who we are on a DICOM association: our Implementation Class UID and Implementation Version Name.

Both are sent in the A-ASSOCIATE-RQ and -AC user information (PS3.7 Annex D.3.3.2) by every AE of ours,
the listener and the client, and identify the software to the peer's logs and conformance checks. Without
them pynetdicom announces itself (``PYNETDICOM_...``), so a PACS administrator tracing an association sees
the library, not the product or its version.

The class UID is under ``2.25`` (PS3.5 Annex B.2: a UUID as a decimal integer, ISO/IEC 9834-8), which needs
no registered organisation root; it names the implementation and stays the same across releases. The
version name changes with each release: ``PACSTRIAGE_`` + the package version, cut to 16 characters (SH).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from pydicom.uid import UID

__all__ = [
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "PACKAGE_VERSION",
    "implementation_version_name",
]

IMPLEMENTATION_CLASS_UID = UID("2.25.295376248795373201264142647371174312975")
"""pacs-triage's Implementation Class UID (PS3.7 D.3.3.2.1); UUID de376570-168c-4eb6-9747-f315b6bcfc0f."""

_PREFIX = "PACSTRIAGE_"
_MAX_LENGTH = 16  # PS3.7 D.3.3.2.3: 1 to 16 characters of the Default Character Repertoire (SH)


def implementation_version_name(package_version: str) -> str:
    """``PACSTRIAGE_<version>`` cut to 16 characters, with characters outside ``[0-9A-Za-z._]`` dropped."""
    allowed = "".join(c for c in package_version if c.isascii() and (c.isalnum() or c in "._"))
    return (_PREFIX + allowed)[:_MAX_LENGTH]


def _package_version() -> str:
    try:
        return version("pacs-triage")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0"


PACKAGE_VERSION = _package_version()
"""The installed pacs-triage version (``"0"`` from a source tree never installed); results record it."""

IMPLEMENTATION_VERSION_NAME = implementation_version_name(PACKAGE_VERSION)
"""Our Implementation Version Name (PS3.7 D.3.3.2.3), e.g. ``PACSTRIAGE_0.1.0``."""
