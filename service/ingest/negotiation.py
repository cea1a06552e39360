"""A-ASSOCIATE negotiation as the acceptor (PS3.8 Section 7.1, PS3.7 Annex D): accept, or say why not.

The checks run in the order that costs an attacker most and us least: protocol version and application
context (PS3.8 9.3.2), called AE title, calling AE title against the allow-list; only then does the
caller count an association slot (:mod:`service.ingest.door`). Presentation contexts are negotiated by
pynetdicom's :func:`~pynetdicom.presentation.negotiate_as_acceptor`: every storage SOP class with the
transfer syntaxes we can decode (:func:`storage_transfer_syntaxes`), Verification with the uncompressed
ones, SCP/SCU role selection answered there (PS3.7 D.3.3.4).

User information we answer (PS3.7 D.3.3, PS3.8 D.1): our Maximum Length Received (the settings' max PDU),
our Implementation Class UID and Version Name, and an Asynchronous Operations Window of 1/1 when one was
proposed (operations are performed one at a time: the request is refused cleanly, D.3.3.3). User identity
and extended negotiation items are ignored (no response item), as D.3.3.7 allows.

**Proposals remembered** (:meth:`Negotiator.decode`, :meth:`Negotiator.agree`): DCMTK ``storescu`` proposes
every storage SOP class it knows (120 presentation contexts, each with its transfer syntaxes), and
pynetdicom's codecs build a validated ``UID`` for every one of them: ~10 ms to decode such a request and
~4 ms to negotiate it, on the listener's loop, for every association (a sender of one image per
association spent 50 ms per association against ``storescp``'s 23; bench/RESULTS.md, session 26). A sender
proposes the same thing every time, so the variable items of the last :data:`_REMEMBERED` distinct
requests (everything after the AE titles, PS3.8 Table 9-11) are kept with what they decoded to and the
A-ASSOCIATE-AC they got; a request whose items are byte for byte the same reuses them, its own AE titles
decoded and checked as before and copied into the AC (PS3.8 9.3.3: "identical to the A-ASSOCIATE-RQ").
Only a request that decoded without error is remembered; the settings the answer depends on are fixed for
the negotiator's life.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from pydicom.pixels import get_decoder
from pydicom.uid import UID
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, build_context, negotiate_as_acceptor
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import

from service.config import DicomSettings
from service.dicom.ae import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from service.ingest.pdu import RQ_FIXED, accept_pdu, decode_associate_rq

__all__ = [
    "Agreement",
    "Negotiator",
    "Rejection",
    "storage_transfer_syntaxes",
]

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # DICOM Application Context Name, PS3.7 A.2.1
# A-ASSOCIATE-RJ (result, source, reason), PS3.8 Table 9-21
REJECT_NO_REASON = (1, 1, 1)
REJECT_CONTEXT_NAME = (1, 1, 2)
REJECT_CALLING_AE = (1, 1, 3)
REJECT_CALLED_AE = (1, 1, 7)
REJECT_VERSION = (1, 2, 2)
REJECT_LIMIT = (2, 3, 2)  # transient, presentation related: local limit exceeded
_REMEMBERED = 32
"""Distinct proposals kept (least recently used dropped first)."""
_AC_TITLES = slice(10, 42)  # called and calling AE titles in an A-ASSOCIATE-AC PDU, PS3.8 Table 9-17
_RQ_TITLES = slice(4, 36)  # the same in an A-ASSOCIATE-RQ's body (after its 6-byte header), Table 9-11

_UNCOMPRESSED = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian first: our preferred
    "1.2.840.10008.1.2",  # Implicit VR Little Endian, the default every SCU must support
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
)


def storage_transfer_syntaxes() -> list[str]:
    """Uncompressed syntaxes plus every compressed one pydicom has a working decoder for here."""
    decodable = []
    for ts in ALL_TRANSFER_SYNTAXES:
        if ts in _UNCOMPRESSED:
            continue
        try:
            if get_decoder(UID(ts)).is_available:
                decodable.append(ts)
        except NotImplementedError:
            continue
    return [*_UNCOMPRESSED, *decodable]


@dataclass(frozen=True)
class Rejection:
    """Why an A-ASSOCIATE-RQ is refused: the RJ's result, source and reason, and words for the log."""

    result: int
    source: int
    reason: int
    words: str


@dataclass
class _Proposal:
    """A request's variable items as decoded once, and the agreement they got (None until negotiated)."""

    rq: A_ASSOCIATE
    agreement: Agreement | None = None


@dataclass
class Agreement:
    """An accepted association: the A-ASSOCIATE-AC to send and what was agreed."""

    ac: bytes
    contexts: dict[int, tuple[str, str]]  # context ID → (abstract syntax, transfer syntax)
    peer_max_pdu: int  # 0: no limit (PS3.8 D.1)
    proposed: int = 0
    rejected: list[str] = field(default_factory=list)


class Negotiator:
    """The acceptor's side of A-ASSOCIATE for one listener's settings (built once, used per association)."""

    def __init__(self, settings: DicomSettings) -> None:
        self.settings = settings
        self.allowed = {ae.strip() for ae in settings.allowed_calling_aets}
        syntaxes = storage_transfer_syntaxes()
        self.syntax_count = len(syntaxes)
        self.supported: list[PresentationContext] = [build_context(Verification, list(_UNCOMPRESSED))]
        self.supported += [
            build_context(str(cx.abstract_syntax), syntaxes) for cx in AllStoragePresentationContexts
        ]
        self._proposals: OrderedDict[bytes, _Proposal] = OrderedDict()

    def decode(self, body: bytes) -> A_ASSOCIATE:
        """The A-ASSOCIATE-RQ ``body`` (after its PDU header) as :func:`~service.ingest.pdu.
        decode_associate_rq` reads it (:class:`~service.errors.MalformedPduError` where it cannot), its
        variable items decoded once per distinct proposal (module docstring)."""
        key = body[RQ_FIXED:]
        known = self._proposals.get(key)
        if known is None:
            rq = decode_associate_rq(body)
            self._proposals[key] = _Proposal(rq)
            if len(self._proposals) > _REMEMBERED:
                self._proposals.popitem(last=False)
            return rq
        self._proposals.move_to_end(key)
        fixed = decode_associate_rq(body[:RQ_FIXED])  # this request's own AE titles, checked as ever
        rq = copy.copy(known.rq)  # shares the decoded items: nothing changes them
        rq.called_ae_title, rq.calling_ae_title = fixed.called_ae_title, fixed.calling_ae_title
        return rq

    def check(self, rq: A_ASSOCIATE, version: int) -> Rejection | None:
        """The checks before a slot is counted; None when the request may go on."""
        if not version & 1:
            return Rejection(*REJECT_VERSION, f"protocol version 0x{version:04X} has no version 1 bit")
        if rq.application_context_name != APPLICATION_CONTEXT:
            return Rejection(*REJECT_CONTEXT_NAME, "application context is not the DICOM one")
        if self.settings.check_called_aet and rq.called_ae_title.strip() != self.settings.ae_title:
            return Rejection(*REJECT_CALLED_AE, f"called AE {rq.called_ae_title.strip()!r} is not ours")
        if self.allowed and rq.calling_ae_title.strip() not in self.allowed:
            return Rejection(*REJECT_CALLING_AE, f"calling AE {rq.calling_ae_title.strip()!r} not allowed")
        if not rq.presentation_context_definition_list:
            return Rejection(*REJECT_NO_REASON, "no presentation context proposed")
        return None

    def limit_reached(self, in_use: int) -> Rejection:
        """The A-ASSOCIATE-RJ for a request that passed its checks when every slot is taken."""
        return Rejection(*REJECT_LIMIT, f"all {in_use} association slots in use (dicom.max_associations)")

    def agree(self, rq: A_ASSOCIATE, body: bytes) -> Agreement:
        """Negotiate contexts and user information for ``rq``, decoded from ``body`` by :meth:`decode`;
        the AC to send (contexts may all be rejected), its AE titles those of the request."""
        known = self._proposals.get(body[RQ_FIXED:])
        agreement = known.agreement if known is not None else None
        if agreement is None:
            agreement = self._agree(rq)
            if known is not None:
                known.agreement = agreement
        ac = bytearray(agreement.ac)
        ac[_AC_TITLES] = body[_RQ_TITLES]
        return Agreement(
            bytes(ac),
            dict(agreement.contexts),
            agreement.peer_max_pdu,
            agreement.proposed,
            list(agreement.rejected),
        )

    def _agree(self, rq: A_ASSOCIATE) -> Agreement:
        roles: dict[UID, tuple[bool | None, bool | None]] = {}
        peer_max, asked_async = 0, False
        for item in rq.user_information:
            if isinstance(item, MaximumLengthNotification):
                peer_max = item.maximum_length_received or 0
            elif isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid:
                roles[item.sop_class_uid] = (item.scu_role, item.scp_role)
            elif isinstance(item, AsynchronousOperationsWindowNegotiation):
                asked_async = True
        proposed = rq.presentation_context_definition_list
        result, reply_roles = negotiate_as_acceptor(proposed, self.supported, roles or None)
        ac = A_ASSOCIATE()
        ac.application_context_name = UID(APPLICATION_CONTEXT)
        ac.calling_ae_title = rq.calling_ae_title
        ac.called_ae_title = rq.called_ae_title
        ac.result, ac.result_source = 0x00, 0x01
        ac.presentation_context_definition_results_list = result
        ac.user_information = [*self._user_information(asked_async), *reply_roles]
        accepted = {
            int(cx.context_id): (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
            for cx in result
            if cx.result == 0x00 and cx.context_id is not None
        }
        refused = [str(cx.abstract_syntax) for cx in result if cx.result != 0x00]
        return Agreement(accept_pdu(ac), accepted, peer_max, len(proposed), refused)

    def _user_information(self, asked_async: bool) -> list[Any]:
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = self.settings.max_pdu
        class_uid = ImplementationClassUIDNotification()
        class_uid.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        items: list[Any] = [max_length, class_uid, version]
        if asked_async:
            window = AsynchronousOperationsWindowNegotiation()
            window.maximum_number_operations_invoked = 1
            window.maximum_number_operations_performed = 1
            items.append(window)
        return items
