"""Pull a study with C-GET (PS3.4 C.4.3): the source sends the instances back on our own association.

C-MOVE (:mod:`service.retrieve`) needs the source to know our AE title, host and port and to open a
connection to us; C-GET needs neither, which is what a PACS behind a firewall, or one whose AE table we do
not control, allows. We propose the Study Root GET model plus the common storage SOP classes with the SCP
role (SCP/SCU Role Selection, PS3.7 D.3.3.4), and each C-STORE sub-operation the source sends is handed to
``store_instance``: the caller stores it the way the listener does (file fsynced, then row) and returns the
C-STORE status, so nothing is acknowledged before it is durable and the study then takes the normal path.

A compressed instance arrives in whichever of the proposed transfer syntaxes the source picks: the
uncompressed ones pynetdicom proposes by default, which every source supports.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import StoragePresentationContexts, build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet  # type: ignore[attr-defined]

from service.deliver.association import MAX_CONTEXTS, Peer, finish, make_ae
from service.dicom.tls import TlsClient
from service.errors import DicomPeerError

__all__ = ["PENDING", "StoreInstance", "get_study"]

logger = logging.getLogger(__name__)

StoreInstance = Callable[[bytes], int]
"""Store one received Part 10 file durably; return the C-STORE status (0x0000 once it is on disk)."""

_PROCESSING_FAILURE = 0x0110
PENDING = frozenset({0xFF00, 0xFF01})
"""PS3.4 C.4.1.1.4 / C.4.2.1.5 / C.4.3.1.4: a match (C-FIND) or sub-operations under way (C-MOVE, C-GET)."""


def _handle_store(event: evt.Event, store_instance: StoreInstance) -> int:
    """EVT_C_STORE on the C-GET association: the bytes as received, with their file meta, to the store."""
    try:
        return store_instance(event.encoded_dataset(include_meta=True))
    except Exception:  # a bug of ours: the source logs a failed sub-operation, we log why
        logger.exception("storing an instance received by C-GET failed")
        return _PROCESSING_FAILURE


def get_study(
    source: Peer,
    study_uid: str,
    *,
    store_instance: StoreInstance,
    calling_ae: str,
    timeout: float = 30.0,
    tls: TlsClient | None = None,
) -> Dataset:
    """C-GET one study from ``source``; the final C-GET response (status, sub-operation counts).

    Raises
    ------
    DicomPeerError
        No association (the source refuses C-GET, or our AE title) or no final response within ``timeout``.
    """
    storage = StoragePresentationContexts[: MAX_CONTEXTS - 1]  # one ID left for the GET model itself
    contexts = [build_context(StudyRootQueryRetrieveInformationModelGet)]
    contexts += [build_context(str(cx.abstract_syntax)) for cx in storage]
    # pynetdicom annotates these as invariant lists of a union
    roles: list[Any] = [build_role(str(cx.abstract_syntax), scp_role=True) for cx in storage]
    ae = make_ae(calling_ae, timeout)
    handlers: list[Any] = [(evt.EVT_C_STORE, _handle_store, [store_instance])]
    tls_args = None if tls is None else (tls.context(), source.host)
    assoc = ae.associate(
        source.host,
        source.port,
        contexts,
        ae_title=source.ae_title,
        ext_neg=roles,
        evt_handlers=handlers,
        max_pdu=0,
        tls_args=tls_args,
    )
    if not assoc.is_established:
        finish(assoc)
        raise DicomPeerError(
            f"{source} did not accept a C-GET association from us (it may not offer C-GET)", reason="rejected"
        )
    if not any(
        cx.abstract_syntax == StudyRootQueryRetrieveInformationModelGet for cx in assoc.accepted_contexts
    ):
        finish(assoc)
        raise DicomPeerError(f"{source} does not offer C-GET (Study Root)", reason="no-contexts")
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    responses = assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)
    return final_status(responses, assoc, what="C-GET", source=source, timeout=timeout)


def final_status(
    responses: Iterable[tuple[Dataset, Dataset | None]],
    assoc: Association,
    *,
    what: str,
    source: Peer,
    timeout: float,
) -> Dataset:
    """The final (non-pending) status of a C-MOVE or C-GET (PS3.4 C.4.2.1.5 / C.4.3.1.4), releasing the
    association after it, or aborting it when the peer stopped answering before one came."""
    final: Dataset | None = None
    try:
        for status, _identifier in responses:
            if "Status" not in status:
                break
            final = status
            if int(status.Status) not in PENDING:
                break
    finally:
        finish(assoc, abort=final is None or int(final.Status) in PENDING)
    if final is None or int(final.Status) in PENDING:
        raise DicomPeerError(
            f"the {what} from {source} stopped answering (no response within {timeout:g} s)", reason="timeout"
        )
    return final
