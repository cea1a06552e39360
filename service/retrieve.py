"""Pull a study from a PACS by accession number or Study Instance UID: C-FIND, then C-MOVE to our own AE.

A triage service is often asked to analyse a study that is already in the PACS (a re-read, a missed
routing rule, an order from the RIS). Query/Retrieve (PS3.4 Annex C) does it with the PACS's own rules:

1. **C-FIND** at STUDY level in the Study Root information model (PS3.4 C.6.2) with the accession number
   (or the study UID) as the key, asking back StudyInstanceUID: which studies, if any, match;
2. **C-MOVE** of each study to our AE title (PS3.4 C.4.2). The PACS opens its own association to our
   listener and C-STOREs every instance there, so retrieved studies take the normal path (file fsynced,
   row, quiet timer, analysis, delivery); the C-MOVE's final response counts the sub-operations.

A PACS that cannot connect to us may allow C-GET instead: :mod:`service.retrieve_get` (``store_instance``).

The PACS must know our AE title as a move destination (Orthanc: DicomModalities; a PACS: its AE table),
else it answers 0xA801 "move destination unknown", which we report in those words (Orthanc 1.10 answers
0xC000 with no sub-operation done; the problem then asks whether our AE title is known there). Nothing
here can hang: every association has connection, ACSE, DIMSE and network timeouts, and a C-FIND that
matches nothing is a :class:`StudyNotFoundAtSourceError` (404), not an empty success.

No PHI in logs: we log the source, counts, statuses and timings; never the accession number, study
UIDs only at DEBUG; and pynetdicom's identifier logging is switched off before any query.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom import _config as pynetdicom_config
from pynetdicom import build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

# One association helper for every SCU of ours: pynetdicom's failures become one DicomPeerError sentence.
from service.deliver.association import Peer, associate, check_ae_title, finish, make_ae
from service.dicom.tls import TlsClient
from service.errors import DicomPeerError, MoveRefusedError, StudyNotFoundAtSourceError
from service.retrieve_get import PENDING, StoreInstance, final_status, get_study

__all__ = [
    "DicomPeerError",
    "RetrieveResult",
    "find_studies",
    "retrieve",
]

logger = logging.getLogger(__name__)


MOVE_FAILURES = {
    0xA701: "refused: out of resources (unable to calculate the number of matches)",
    0xA702: "refused: out of resources (unable to perform the sub-operations)",
    0xA801: "refused: move destination unknown (add our AE title to the source's list of DICOM nodes)",
    0xA900: "the identifier does not match the SOP class",
    0xFE00: "cancelled",
}
"""PS3.4 Table C.4-2 failure statuses of C-MOVE, in words."""

MAX_STUDIES = 20
"""An accession number names one order; a few studies at most. More matches means a bad key (a wildcard)."""


@dataclass(frozen=True)
class RetrieveResult:
    """What a pull did: the studies moved and the sum of their C-MOVE sub-operation counts."""

    study_uids: tuple[str, ...]
    completed: int
    failed: int
    warning: int
    seconds: float


def _identify() -> None:
    """C-FIND identifiers carry PHI; pynetdicom logs them at INFO unless told not to (STYLE.md)."""
    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False


def find_studies(
    source: Peer,
    *,
    accession_number: str | None = None,
    study_uid: str | None = None,
    calling_ae: str,
    timeout: float = 30.0,
    tls: TlsClient | None = None,
) -> list[str]:
    """Study Instance UIDs at ``source`` matching the key (C-FIND, Study Root, STUDY level).

    Raises
    ------
    ValueError
        Neither or both keys given, or a key with wildcards (a pull names one study, PS3.4 C.2.2.2.4).
    DicomPeerError
        No association, or the C-FIND failed (the status in words).
    """
    if (accession_number is None) == (study_uid is None):
        raise ValueError("give an accession number or a study UID, not both")
    key = accession_number if accession_number is not None else study_uid
    if not key or any(c in key for c in "*?\\"):
        raise ValueError("the key must be one exact value (no wildcards, no lists)")
    _identify()
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.AccessionNumber = accession_number or ""
    query.StudyInstanceUID = study_uid or ""
    ae = make_ae(calling_ae, timeout)
    assoc = associate(
        ae,
        source,
        [build_context(StudyRootQueryRetrieveInformationModelFind)],
        timeout=timeout,
        max_pdu=0,
        tls=tls,
    )
    found: list[str] = []
    final: int | None = None
    try:
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if "Status" not in status:
                break  # no response within the DIMSE timeout, or the association went away
            final = int(status.Status)
            if final in PENDING and identifier is not None:
                uid = str(identifier.get("StudyInstanceUID", "") or "")
                if uid and uid not in found:
                    found.append(uid)
    finally:
        finish(assoc, abort=final is None)
    if final is None:
        raise DicomPeerError(f"no C-FIND response from {source} within {timeout:g} s", reason="timeout")
    if final != 0x0000:
        raise DicomPeerError(f"C-FIND at {source} failed: status 0x{final:04X}", reason="aborted")
    logger.info("C-FIND at %s: %d matching study(ies)", source, len(found))
    return found


def _move(
    source: Peer, study_uid: str, *, destination: str, calling_ae: str, timeout: float, tls: TlsClient | None
) -> Dataset:
    """C-MOVE one study to ``destination``; the final response (status and sub-operation counts)."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    ae = make_ae(calling_ae, timeout)
    assoc = associate(
        ae,
        source,
        [build_context(StudyRootQueryRetrieveInformationModelMove)],
        timeout=timeout,
        max_pdu=0,
        tls=tls,
    )
    responses = assoc.send_c_move(query, destination, StudyRootQueryRetrieveInformationModelMove)
    return final_status(responses, assoc, what="C-MOVE", source=source, timeout=timeout)


def _count(status: Dataset, keyword: str) -> int:
    value = status.get(keyword)
    return int(value) if value is not None and value != "" else 0


def retrieve(
    source: Peer,
    *,
    accession_number: str | None = None,
    study_uid: str | None = None,
    destination: str,
    calling_ae: str,
    timeout: float = 30.0,
    tls: TlsClient | None = None,
    store_instance: StoreInstance | None = None,
) -> RetrieveResult:
    """Find the study at ``source`` and C-MOVE it to ``destination`` (our listener's AE title).

    With ``store_instance`` the study is fetched with C-GET instead (:mod:`service.retrieve_get`): the
    source sends the instances back on our association and ``store_instance`` stores each one;
    ``destination`` is then not used.

    Blocking (pynetdicom): run it in a thread from async code. ``timeout`` bounds every wait for the peer
    (connection, association, each DIMSE response); a large study takes as long as its sub-operations.

    Raises
    ------
    StudyNotFoundAtSourceError
        The C-FIND matched nothing.
    MoveRefusedError
        The source refused a C-MOVE or none of its sub-operations succeeded (its status in words).
    DicomPeerError
        No association with the source, or it stopped answering.
    ValueError
        A bad key or AE title.
    """
    destination = check_ae_title(destination, "move destination AE title")
    started = time.monotonic()
    studies = find_studies(
        source,
        accession_number=accession_number,
        study_uid=study_uid,
        calling_ae=calling_ae,
        timeout=timeout,
        tls=tls,
    )
    what = "accession number" if accession_number is not None else "study UID"
    if not studies:
        raise StudyNotFoundAtSourceError(f"{source} holds no study with this {what}", part=what)
    if len(studies) > MAX_STUDIES:
        raise MoveRefusedError(
            f"{len(studies)} studies match this {what} at {source}; refusing to move more than {MAX_STUDIES}",
            part=what,
        )
    how, target = ("C-GET", "us") if store_instance is not None else ("C-MOVE", destination)
    completed = failed = warning = 0
    for uid in studies:
        if store_instance is not None:
            final = get_study(
                source, uid, store_instance=store_instance, calling_ae=calling_ae, timeout=timeout, tls=tls
            )
        else:
            final = _move(
                source, uid, destination=destination, calling_ae=calling_ae, timeout=timeout, tls=tls
            )
        code = int(final.Status)
        done, bad = (
            _count(final, "NumberOfCompletedSuboperations"),
            _count(final, "NumberOfFailedSuboperations"),
        )
        completed, failed = completed + done, failed + bad
        warning += _count(final, "NumberOfWarningSuboperations")
        logger.debug("%s of study %s: status 0x%04X", how, uid, code)
        if code in MOVE_FAILURES or (code not in (0x0000, 0xB000) and not done):
            words = MOVE_FAILURES.get(code, "failed")
            comment = str(final.get("ErrorComment") or "").strip()
            raise MoveRefusedError(
                f"{source} did not send the study ({how} to {target}): status 0x{code:04X}, {words}"
                + (f" ({bad} sub-operation(s) failed)" if bad else "")
                + (f"; it says: {comment[:200]}" if comment else "")
                + ("; is our AE title in its list of DICOM nodes?" if code == 0xC000 and not done else ""),
                part="source",
            )
    seconds = time.monotonic() - started
    logger.info(
        "%s from %s to %s: %d study(ies), %d instance(s) sent, %d failed, %d warning(s) in %.1f s",
        how,
        source,
        target,
        len(studies),
        completed,
        failed,
        warning,
        seconds,
    )
    return RetrieveResult(tuple(studies), completed, failed, warning, seconds)
