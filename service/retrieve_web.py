"""Pull a study from a DICOMweb source: QIDO-RS to find it, then WADO-RS to fetch its instances.

The DICOMweb twin of :mod:`service.retrieve` (C-FIND, C-MOVE) for a PACS or archive that offers DICOMweb
(PS3.18) rather than, or besides, DIMSE:

1. **QIDO-RS** ``GET {base}/studies?AccessionNumber=…`` (or ``StudyInstanceUID=…``), asking back
   StudyInstanceUID only (``includefield``, PS3.18 10.6.1): which studies, if any, match;
2. **WADO-RS** ``GET {base}/studies/{study}`` (Retrieve Study, PS3.18 10.4.1), instances as
   ``multipart/related; type="application/dicom"``, read one part at a time as they stream in.

Each instance is handed to ``store_instance`` (:data:`service.retrieve_get.StoreInstance`), the very
function the C-GET path uses: the caller stores it as the listener stores a C-STORE (file fsynced, then
row), so the study then takes the normal path (assembled, analysed, delivered). `dicomweb-client` is the
client; its retries (429/503/504, bounded) and ``timeout`` (connect and each read) mean nothing here can
hang: a source that stops answering is a :class:`DicomwebSourceError` (502) after ``timeout`` seconds.

A QIDO that matches nothing is :class:`~service.retrieve.StudyNotFoundAtSourceError` (404), never an
empty success. No PHI in logs: the source (without credentials), counts and timings; never the accession
number (dicomweb-client logs study UIDs at INFO, so :mod:`service.logs` keeps it at WARNING).
"""

from __future__ import annotations

import logging
import tempfile
import time
from io import BytesIO
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from service.deliver.association import Peer
from service.deliver.scu import send
from service.dicom.tls import TlsClient
from service.errors import DicomwebSourceError, MoveRefusedError, StudyNotFoundAtSourceError
from service.retrieve import MAX_STUDIES, RetrieveResult
from service.retrieve_get import StoreInstance

__all__ = [
    "find_studies_web",
    "is_dicomweb_source",
    "retrieve_dicomweb",
    "retrieve_dicomweb_to",
    "source_url",
]

logger = logging.getLogger(__name__)

_STUDY_UID = "0020000D"
_UID_CHARS = frozenset("0123456789.")


def is_dicomweb_source(text: str) -> bool:
    """A retrieve source given as an ``http(s)://`` DICOMweb base URL (else it is ``AE@host:port``)."""
    return text.strip().lower().startswith(("http://", "https://"))


def source_url(text: str) -> str:
    """The DICOMweb base URL as we compare and show it: no trailing slash, no query, no credentials.

    Raises
    ------
    ValueError
        Not an http(s) URL with a host, or it carries a user name or password (credentials do not belong
        in a setting printed by ``config show`` nor in an API request body).
    """
    parts = urlsplit(text.strip())
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"a DICOMweb source is an http(s)://host[:port]/path base URL, not {text[:100]!r}")
    if parts.username or parts.password:
        raise ValueError("a DICOMweb source URL must not carry a user name or password")
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/"), "", ""))


def _client(base: str, timeout: float) -> DICOMwebClient:
    return DICOMwebClient(base, timeout=(min(timeout, 10.0), timeout))


def _fail(base: str, what: str, exc: Exception) -> DicomwebSourceError:
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        why = f"answered {exc.response.status_code} {exc.response.reason}"
    elif isinstance(exc, requests.Timeout):
        why = "did not answer in time"
    elif isinstance(exc, requests.ConnectionError):
        why = "could not be reached"
    else:
        why = f"answered something unusable ({type(exc).__name__})"
    return DicomwebSourceError(f"the DICOMweb source {base} {why} ({what})", part="source")


def find_studies_web(
    base: str, *, accession_number: str | None = None, study_uid: str | None = None, timeout: float = 30.0
) -> list[str]:
    """Study Instance UIDs at ``base`` matching the key (QIDO-RS Search for Studies, PS3.18 10.6).

    Raises
    ------
    ValueError
        Neither or both keys, or a key with wildcards (a pull names one study, as C-FIND's key does).
    DicomwebSourceError
        The source cannot be reached or answers with an error.
    """
    if (accession_number is None) == (study_uid is None):
        raise ValueError("give an accession number or a study UID, not both")
    key = accession_number if accession_number is not None else study_uid
    if not key or any(c in key for c in "*?\\,"):
        raise ValueError("the key must be one exact value (no wildcards, no lists)")
    keyword = "AccessionNumber" if accession_number is not None else "StudyInstanceUID"
    client = _client(base, timeout)
    try:
        matches = client.search_for_studies(search_filters={keyword: key}, fields=["StudyInstanceUID"])
    except (requests.RequestException, ValueError) as exc:
        raise _fail(base, "QIDO-RS search for studies", exc) from exc
    found: list[str] = []
    for match in matches:
        try:
            uid = str(match[_STUDY_UID]["Value"][0])
        except (KeyError, IndexError, TypeError):
            continue  # a match without its UID cannot be retrieved; PS3.18 requires it, so rare
        if uid and set(uid) <= _UID_CHARS and uid not in found:
            found.append(uid)
    logger.info("QIDO-RS at %s: %d matching study(ies)", base, len(found))
    return found


def _encode(ds: Dataset) -> bytes:
    """The Part 10 bytes of a retrieved instance (dicomweb-client parsed the part; we store a file)."""
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def retrieve_dicomweb(
    base: str,
    *,
    accession_number: str | None = None,
    study_uid: str | None = None,
    store_instance: StoreInstance,
    timeout: float = 30.0,
) -> RetrieveResult:
    """Find the study at the DICOMweb source ``base`` and store each of its instances here.

    Blocking (requests): run it in a thread from async code. ``completed`` counts instances
    ``store_instance`` stored (status 0x0000), ``failed`` the others; a study none of whose instances
    could be stored is a :class:`~service.retrieve.MoveRefusedError`, as a C-MOVE with none done is.

    Raises
    ------
    StudyNotFoundAtSourceError
        The QIDO-RS search matched nothing.
    MoveRefusedError
        Too many matches, or nothing of a study could be stored.
    DicomwebSourceError
        The source cannot be reached, stops answering, or answers with an error.
    ValueError
        A bad key or base URL.
    """
    base = source_url(base)
    started = time.monotonic()
    studies = find_studies_web(base, accession_number=accession_number, study_uid=study_uid, timeout=timeout)
    what = "accession number" if accession_number is not None else "study UID"
    if not studies:
        raise StudyNotFoundAtSourceError(f"{base} holds no study with this {what}", part=what)
    if len(studies) > MAX_STUDIES:
        raise MoveRefusedError(
            f"{len(studies)} studies match this {what} at {base}; refusing to fetch more than {MAX_STUDIES}",
            part=what,
        )
    client = _client(base, timeout)
    completed = failed = 0
    for uid in studies:
        done = bad = 0
        try:
            for ds in client.iter_study(uid):
                status = store_instance(_encode(ds))
                if status == 0x0000:
                    done += 1
                else:
                    bad += 1
        except (requests.RequestException, ValueError, OSError) as exc:
            raise _fail(base, f"WADO-RS retrieve study, after {done + bad} instance(s)", exc) from exc
        logger.debug("WADO-RS of study %s: %d stored, %d refused", uid, done, bad)
        if not done:
            raise MoveRefusedError(
                f"nothing of the study at {base} could be stored here ({bad} instance(s) refused)",
                part="source",
            )
        completed, failed = completed + done, failed + bad
    seconds = time.monotonic() - started
    logger.info(
        "WADO-RS from %s: %d study(ies), %d instance(s) stored, %d refused in %.1f s",
        base,
        len(studies),
        completed,
        failed,
        seconds,
    )
    return RetrieveResult(tuple(studies), completed, failed, 0, seconds)


def retrieve_dicomweb_to(
    base: str,
    listener: Peer,
    *,
    accession_number: str | None = None,
    study_uid: str | None = None,
    calling_ae: str,
    timeout: float = 30.0,
    tls: TlsClient | None = None,
) -> RetrieveResult:
    """``pacs-triage retrieve --from https://…``: fetch the study, then C-STORE it to our ``listener``.

    The command runs beside the service, not inside it, so it hands the instances to the running
    listener, which stores each durably before it answers 0x0000 (the C-MOVE path's guarantee). They
    wait in a private temporary directory, one file each, so a large study is never held in memory; the
    directory is removed afterwards. ``completed`` counts instances the listener accepted.
    """
    with tempfile.TemporaryDirectory(prefix="pacs-triage-retrieve-") as tmp:
        folder = Path(tmp)
        paths: list[Path] = []

        def keep(data: bytes) -> int:
            path = folder / f"{len(paths):06d}.dcm"
            path.write_bytes(data)
            paths.append(path)
            return 0x0000

        fetched = retrieve_dicomweb(
            base, accession_number=accession_number, study_uid=study_uid, store_instance=keep, timeout=timeout
        )
        outcomes = send(listener, paths, calling_ae=calling_ae, timeout=timeout, tls=tls)
    stored = sum(1 for o in outcomes if o.ok)
    return RetrieveResult(fetched.study_uids, stored, len(outcomes) - stored, 0, fetched.seconds)
