"""Conformance of the C-STORE SCP against real senders (issue 20, item 5): DCMTK ``storescu`` proposing every
transfer syntax found in pydicom's test files (an association profile, ``storescu -xf``), pynetdicom as the
SCU sending each file in its own syntax, and two and four ``storescu`` processes at once.

What is checked is the outcome, not the sender's exit code: every file the HTTP path would accept
(:func:`service.store.validate.parse_instance` on the file) is stored exactly once, with its pixel data as
sent, in the transfer syntax it was sent in; every other file is not stored. ``get_testdata_files`` lists
the files installed with pydicom (it never downloads). Orthanc forwarding a study to us is in
test_orthanc_forwarding.py, DICOM TLS in tests/service/ingest/test_tls.py.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_files
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import _STORAGE_CLASSES
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.config import DicomSettings
from service.ingest.negotiation import storage_transfer_syntaxes
from service.ingest.scp import DicomListener
from service.store.db import InstanceRow
from service.store.instances import Instances
from service.store.validate import parse_instance
from tests.peers.dcmtk import require_dcmtk, storescu
from tests.service.dicom_factory import head_ct_series

pytestmark = [
    pytest.mark.e2e,
    # pydicom warns about the odd files it ships to test itself; their outcome is what is checked here
    pytest.mark.filterwarnings("ignore:Expected explicit VR:UserWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning:pydicom"),
]


@pytest.fixture
def listener(store: Instances) -> Iterator[DicomListener]:
    lst = DicomListener(DicomSettings(host="127.0.0.1", port=0), store, quiet_seconds=60)
    lst.start()
    yield lst
    lst.stop()


def _rows(store: Instances) -> dict[str, InstanceRow]:
    with Session(store.db.engine) as s:
        return {r.sop_instance_uid: r for r in s.scalars(select(InstanceRow))}


Sendable = tuple[Path, str, str, str | None]


def _sendable() -> list[Sendable]:
    """pydicom's test files we can negotiate: (path, SOP class, transfer syntax, SOP instance UID when the
    HTTP path would take the file, else None)."""
    storage, syntaxes = set(_STORAGE_CLASSES.values()), set(storage_transfer_syntaxes())
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the odd files it is meant to test
        for name in sorted(get_testdata_files()):
            path = Path(name)
            try:
                meta = dcmread(path, stop_before_pixels=True).file_meta
                sop_class, syntax = str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
            except Exception:  # unreadable on purpose (truncated, no meta): not something to send
                continue
            if sop_class not in storage or syntax not in syntaxes:
                continue
            try:
                uid: str | None = parse_instance(
                    path.read_bytes(), part=path.name, images_only=False
                ).sop_instance_uid
            except Exception:
                uid = None
            out.append((path, sop_class, syntax, uid))
    return out


def _profile(files: list[Sendable], path: Path) -> Path:
    """A DCMTK association profile with one presentation context per (SOP class, transfer syntax) sent."""
    syntaxes = sorted({ts for _, _, ts, _ in files})
    pairs = sorted({(cls, ts) for _, cls, ts, _ in files})
    assert len(pairs) <= 128, "more than one association's worth of presentation contexts"
    lines = ["[[TransferSyntaxes]]"]
    for i, ts in enumerate(syntaxes):
        lines += [f"[TS{i}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[Contexts]"]
    for n, (cls, ts) in enumerate(pairs, start=1):
        lines.append(f"PresentationContext{n} = {cls}\\TS{syntaxes.index(ts)}")
    lines += ["[[Profiles]]", "[Everything]", "PresentationContexts = Contexts"]
    path.write_text("\n".join(lines) + "\n")
    return path


def _check_outcome(store: Instances, files: list[Sendable], unreadable: frozenset[str] = frozenset()) -> None:
    """Every accepted instance stored once, as one of the files that carry its UID (pydicom's test files
    share UIDs between syntaxes of one image; the first to arrive is stored, the others are duplicates).
    ``unreadable``: files the sender could not read itself (DCMTK says "Bad DICOM file"), so never sent."""
    rows = _rows(store)
    candidates: dict[str, list[Path]] = {}
    for path, _, _, uid in files:
        if uid is not None and str(path) not in unreadable:
            candidates.setdefault(uid, []).append(path)
    assert set(rows) == set(candidates), "stored ≠ what the HTTP path would accept"
    for uid, paths in candidates.items():
        stored = dcmread(store.instances_dir / rows[uid].path)
        sent = [dcmread(p) for p in paths]
        assert any(
            stored.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
            and stored.get("PixelData") == ds.get("PixelData")
            for ds in sent
        ), f"{uid} stored differs from every file sent with it: {[p.name for p in paths]}"


def test_storescu_sends_every_transfer_syntax_of_pydicom_test_files(
    store: Instances, listener: DicomListener, tmp_path: Path
) -> None:
    require_dcmtk()
    files = _sendable()
    assert len({ts for _, _, ts, _ in files}) >= 10, "pydicom's test files should cover many syntaxes"
    profile = _profile(files, tmp_path / "profile.cfg")
    result = storescu(
        listener.port,
        [p for p, *_ in files],
        aet="PACS_TRIAGE",
        extra_args=["-xf", str(profile), "Everything"],
        timeout=300,
    )
    log = result.stdout + result.stderr
    assert "Association Rejected" not in log
    unreadable = frozenset(re.findall(r"Bad DICOM file: (.+?): ", log))
    assert len(unreadable) < len(files) // 10, log[-3000:]
    assert listener.flush(60)  # rows follow the success statuses in group commits
    _check_outcome(store, files, unreadable)


def test_pynetdicom_sends_each_file_in_its_own_syntax(store: Instances, listener: DicomListener) -> None:
    files = _sendable()
    ae = AE(ae_title="PYNETDICOM")
    for cls, ts in sorted({(c, t) for _, c, t, _ in files}):
        ae.add_requested_context(cls, ts)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="PACS_TRIAGE", max_pdu=32768)
    assert assoc.is_established
    try:
        statuses, unsendable = {}, set()
        for path, _, _, uid in files:
            try:
                statuses[path.name] = (uid is not None, assoc.send_c_store(path).Status)
            except (ValueError, AttributeError):  # pynetdicom cannot encode it or finds no SOP UIDs: not sent
                unsendable.add(str(path))
    finally:
        assoc.release()
    held = {uid for *_, uid in files if uid is not None}
    for path, *_ in files:
        if path.name not in statuses:
            continue
        accepted, status = statuses[path.name]
        if accepted or status != 0:
            assert (status == 0) == accepted, f"{path.name}: status 0x{status:04X}"
        else:  # pynetdicom re-encodes what pydicom read (MR_truncated.dcm arrives whole): a duplicate only
            assert dcmread(path, stop_before_pixels=True).SOPInstanceUID in held, path.name
    assert len(unsendable) < len(files) // 10
    assert listener.flush(60)
    _check_outcome(store, files, frozenset(unsendable))


@pytest.mark.parametrize("senders", [2, 4])
def test_concurrent_storescu_senders(
    store: Instances, listener: DicomListener, tmp_path: Path, senders: int
) -> None:
    """One study split over several associations at once: every instance stored once, all acknowledged."""
    require_dcmtk()
    study = generate_uid()
    folders = []
    for i in range(senders):
        folder = tmp_path / f"sender{i}"
        folder.mkdir()
        for j, data in enumerate(head_ct_series(12, study_uid=study)):
            (folder / f"{j:03d}.dcm").write_bytes(data)
        folders.append(folder)

    def send(folder: Path) -> int:
        return storescu(listener.port, [folder], aet="PACS_TRIAGE", calling_ae=folder.name.upper()).returncode

    with ThreadPoolExecutor(senders) as pool:
        codes = list(pool.map(send, folders))
    assert codes == [0] * senders
    assert listener.flush(60)
    assert len(_rows(store)) == 12 * senders
