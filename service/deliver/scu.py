"""The DICOM client (SCU): C-ECHO and C-STORE to a peer such as the PACS, for the CLI and the delivery outbox.

pynetdicom does the protocol (ACSE, DIMSE, fragmentation); this module decides what to propose, turns every
way an association can fail into one :class:`DicomPeerError` sentence, and reports each object's fate.

**Presentation contexts from the objects.** A requestor may propose at most 128 contexts (their IDs are the
odd numbers 1-255, PS3.8 9.3.2.2), fewer than there are storage SOP classes, so proposing "everything" is not
an option. For each SOP class among the objects we propose one context per non-native transfer syntax found
(JPEG, JPEG 2000, RLE, deflate...), that syntax alone, so a peer that accepts it gets the object as stored;
plus one context offering Explicit then Implicit VR Little Endian. pynetdicom converts uncompressed objects
to whichever of those the peer picked; a compressed object whose own syntax was refused is decompressed by
pydicom and sent uncompressed (``decompress_fallback``), as DICOM routers do. More than 128 contexts →
several associations, each SOP class kept in one.

**Failures.** No association at all (host unknown, port closed, timeout, A-ASSOCIATE-RJ, no context
accepted) raises :class:`DicomPeerError`: nothing was sent, so the caller retries everything. Once objects
flow, each gets a :class:`SendOutcome`; an association that aborts mid-way marks the rest "not sent" instead
of raising, so the outbox retries just those (the one in flight may have been stored: resending it is safe,
a PACS keeps one copy per SOP Instance UID).

**TLS**: pass a :class:`~service.dicom.tls.TlsClient` (PS3.15 Annex B; see :mod:`service.dicom.tls`).
Associations themselves, and how each failure reads, are :mod:`service.deliver.association`.

**No PHI in logs.** We log peers, counts, timings, statuses; SOP Instance UIDs only at DEBUG; never a dataset.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import
from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS

from service.deliver.association import (
    DEFAULT_CALLING_AE,
    DEFAULT_MAX_PDU,
    MAX_CONTEXTS,
    Peer,
    associate,
    finish,
    make_ae,
)
from service.dicom.tls import TlsClient
from service.errors import DicomPeerError

__all__ = ["OK_STATUSES", "EchoResult", "SendOutcome", "echo", "send"]

logger = logging.getLogger(__name__)

# PS3.4 B.2.3: success, and the warnings under which the object was stored anyway.
OK_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
_NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


@dataclass(frozen=True)
class EchoResult:
    """A C-ECHO answer: DIMSE status and seconds from connecting to the C-ECHO-RSP (what a user waits)."""

    status: int
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == 0x0000


@dataclass(frozen=True)
class SendOutcome:
    """One object's fate: ``status`` is None when no C-STORE-RSP came; ``error`` is set whenever not ok."""

    sop_instance_uid: str
    status: int | None
    ok: bool
    error: str | None = None


# ---- C-ECHO -------------------------------------------------------------------------------------------


def echo(
    peer: Peer, *, calling_ae: str = DEFAULT_CALLING_AE, timeout: float = 10.0, tls: TlsClient | None = None
) -> EchoResult:
    """C-ECHO (Verification, PS3.4 Annex A): does the peer answer us, with our AE title, right now?

    With ``tls`` the association runs over TLS (a good check of certificates before the first delivery).

    Raises
    ------
    DicomPeerError
        No association (refused, rejected with the reason, aborted, timed out, TLS handshake failed) or no
        C-ECHO response.
    ValueError
        ``tls`` names a file that cannot be used (missing, not PEM, key not matching the certificate).
    """
    ae = make_ae(calling_ae, timeout)
    started = time.perf_counter()
    cxs = [build_context(Verification)]
    assoc = associate(ae, peer, cxs, timeout=timeout, max_pdu=DEFAULT_MAX_PDU, tls=tls)
    try:
        status = assoc.send_c_echo()
        seconds = time.perf_counter() - started
    finally:
        finish(assoc)
    if "Status" not in status:
        raise DicomPeerError(
            f"no C-ECHO response from {peer} (aborted, or no answer within {timeout:g} s)", reason="aborted"
        )
    logger.info("C-ECHO to %s: status 0x%04X in %.1f ms", peer, status.Status, seconds * 1000)
    return EchoResult(status=int(status.Status), seconds=seconds)


# ---- C-STORE ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    """What we need to plan an object's presentation context, without holding its pixels."""

    index: int
    source: Dataset | Path
    sop_class: UID
    sop_instance_uid: str
    transfer_syntax: UID


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception on one short line: codec errors span lines; outcomes end up in logs and a DB column."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _describe(index: int, obj: Dataset | Path | str) -> _Item | SendOutcome:
    """An _Item from the object's header (a path is read up to its pixels only), or a failed outcome."""
    source: Dataset | Path
    if isinstance(obj, Dataset):
        ds, source = obj, obj
    else:
        source = Path(obj)
        try:
            ds = dcmread(source, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
        except Exception as exc:  # pydicom raises many types for damaged files: one object's failure only
            return SendOutcome("", None, False, f"cannot read {source.name}: {_one_line(exc)}")
    meta = getattr(ds, "file_meta", None)
    sop_class = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
    sop_uid = str(ds.get("SOPInstanceUID") or "")
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    missing = [name for name, v in (("SOPClassUID", sop_class), ("SOPInstanceUID", sop_uid)) if not v]
    if syntax is None:
        missing.append("file meta TransferSyntaxUID")
    if missing:
        return SendOutcome(sop_uid, None, False, f"not sent: no {', '.join(missing)}")
    return _Item(index, source, UID(str(sop_class)), sop_uid, UID(str(syntax)))


def _plan(items: list[_Item]) -> list[tuple[list[PresentationContext], list[_Item]]]:
    """Batches of at most 128 contexts, one association each; objects in input order within a batch."""
    by_class: dict[UID, list[_Item]] = {}
    for it in items:
        by_class.setdefault(it.sop_class, []).append(it)
    units: list[tuple[list[PresentationContext], list[_Item]]] = []
    for sop_class, group in by_class.items():
        odd = sorted({it.transfer_syntax for it in group} - set(_NATIVE))
        step = MAX_CONTEXTS - 1  # room for the native fallback; only forged files have this many syntaxes
        chunks = [odd[i : i + step] for i in range(0, len(odd), step)] or [[]]
        for n, chunk in enumerate(chunks):
            wanted = set(chunk) | (set(_NATIVE) if n == 0 else set())
            cxs = [build_context(sop_class, ts) for ts in chunk] + [build_context(sop_class, list(_NATIVE))]
            units.append((cxs, [it for it in group if it.transfer_syntax in wanted]))
    batches: list[tuple[list[PresentationContext], list[_Item]]] = []
    for cxs, members in units:
        if batches and len(batches[-1][0]) + len(cxs) <= MAX_CONTEXTS:
            batches[-1][0].extend(cxs)
            batches[-1][1].extend(members)
        else:
            batches.append((list(cxs), list(members)))
    return [(cxs, sorted(members, key=lambda it: it.index)) for cxs, members in batches]


def _route(assoc: Association, item: _Item) -> Literal["as-is", "decompress"] | None:
    """How the object can travel on the contexts the peer accepted (pynetdicom converts only uncompressed)."""
    accepted = {
        cx.transfer_syntax[0]
        for cx in assoc.accepted_contexts
        if cx.abstract_syntax == item.sop_class and cx.as_scu and cx.transfer_syntax
    }
    ts = item.transfer_syntax
    if ts in accepted:
        return "as-is"
    if not ts.is_transfer_syntax:  # a private syntax: exact match only
        return None
    if not ts.is_compressed:
        same_order = [s for s in accepted if s.is_transfer_syntax and not s.is_compressed]
        return "as-is" if any(s.is_little_endian == ts.is_little_endian for s in same_order) else None
    return "decompress" if accepted & set(_NATIVE) else None


def _status_error(code: int, status: Dataset) -> str:
    category, meaning = STORAGE_SERVICE_CLASS_STATUS.get(code) or GENERAL_STATUS.get(code) or ("Failure", "?")
    text = f"status 0x{code:04X} ({category}: {meaning})"
    comment = status.get("ErrorComment")
    return f"{text}: {comment}" if comment else text


def _failed(item: _Item, error: str) -> SendOutcome:
    return SendOutcome(item.sop_instance_uid, None, False, error)


def _no_context(item: _Item, peer: Peer) -> SendOutcome:
    what = f"{item.sop_class.name} in {item.transfer_syntax.name}"
    return _failed(item, f"not sent: {peer.ae_title} accepted no presentation context for {what}")


def _store(
    assoc: Association, item: _Item, peer: Peer, *, decompress_fallback: bool, timeout: float
) -> tuple[SendOutcome, bool]:
    """C-STORE one object; also says whether the association is lost (no response: abort or timeout)."""
    route = _route(assoc, item)
    if route is None or (route == "decompress" and not decompress_fallback):
        return _no_context(item, peer), False
    try:
        if isinstance(item.source, Dataset):  # never change the caller's dataset
            ds = copy.deepcopy(item.source) if route == "decompress" else item.source
        else:
            ds = dcmread(item.source)
        if route == "decompress":
            ds.decompress()
    except Exception as exc:  # unreadable or undecodable: this object fails, the batch goes on
        return _failed(item, f"not sent: {_one_line(exc)}"), False
    started = time.monotonic()
    try:
        status = assoc.send_c_store(ds)
    except RuntimeError:  # the association ended between our check and the send
        return _failed(item, f"not sent: the association with {peer} ended"), True
    except (ValueError, AttributeError) as exc:  # pynetdicom could not encode it for the accepted context
        return _failed(item, f"not sent: {_one_line(exc)}"), False
    if "Status" not in status:  # it may or may not have been stored; resending is safe
        if time.monotonic() - started >= 0.9 * timeout:
            return _failed(item, f"no C-STORE response from {peer} within {timeout:g} s"), True
        return _failed(item, f"{peer} aborted the association before its C-STORE response"), True
    code = int(status.Status)
    ok = code in OK_STATUSES
    logger.debug("C-STORE %s → status 0x%04X", item.sop_instance_uid, code)
    return SendOutcome(item.sop_instance_uid, code, ok, None if ok else _status_error(code, status)), False


def send(
    peer: Peer,
    datasets_or_paths: Iterable[Dataset | Path | str],
    *,
    calling_ae: str = DEFAULT_CALLING_AE,
    timeout: float = 30.0,
    max_pdu: int = DEFAULT_MAX_PDU,
    decompress_fallback: bool = True,
    tls: TlsClient | None = None,
) -> list[SendOutcome]:
    """C-STORE every object to ``peer`` on one association (more only past 128 presentation contexts).

    Paths are read twice, each time one at a time: their headers to plan the contexts, then whole just
    before sending, so a 1,000-slice CT never sits in memory at once. Datasets need
    ``file_meta.TransferSyntaxUID`` (how they are encoded) and are never modified.

    Returns
    -------
    list[SendOutcome]
        One per input, in input order. Unreadable inputs, objects the peer accepted no context for and
        objects left when an association aborted are ``ok=False`` with ``status=None``.

    Raises
    ------
    DicomPeerError
        The first association failed (peer down, rejected us, timed out, TLS handshake failed): nothing
        was sent. A peer that accepts the association but none of the objects' SOP classes is a
        per-object failure instead.
    ValueError
        ``tls`` names a file that cannot be used (missing, not PEM, key not matching the certificate).
    """
    described = [_describe(i, obj) for i, obj in enumerate(datasets_or_paths)]
    outcomes: list[SendOutcome | None] = [d if isinstance(d, SendOutcome) else None for d in described]
    items = [d for d in described if isinstance(d, _Item)]
    ae = make_ae(calling_ae, timeout)
    for n, (contexts, batch) in enumerate(_plan(items)):
        started = time.monotonic()
        try:
            assoc = associate(ae, peer, contexts, timeout=timeout, max_pdu=max_pdu, tls=tls)
        except DicomPeerError as exc:
            if exc.reason == "no-contexts":  # about these objects, not the peer: each gets its own answer
                for it in batch:
                    outcomes[it.index] = _no_context(it, peer)
            elif n == 0:
                raise
            else:
                for it in batch:
                    outcomes[it.index] = _failed(it, f"not sent: {exc}")
            continue
        lost = False
        try:
            for it in batch:
                if lost or not assoc.is_established:
                    outcomes[it.index] = _failed(it, f"not sent: the association with {peer} was aborted")
                    continue
                outcomes[it.index], lost = _store(
                    assoc, it, peer, decompress_fallback=decompress_fallback, timeout=timeout
                )
        finally:
            finish(assoc, abort=lost)
        done = [outcomes[it.index] for it in batch]
        n_ok = sum(1 for o in done if o is not None and o.ok)
        logger.info(
            "C-STORE to %s: %d of %d object(s) stored in %.2f s (%d presentation contexts)",
            peer,
            n_ok,
            len(batch),
            time.monotonic() - started,
            len(contexts),
        )
    assert all(o is not None for o in outcomes), "every input gets an outcome"
    return [o for o in outcomes if o is not None]
