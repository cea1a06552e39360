"""Instance files on disk, named only by validated UIDs, written so a crash never leaves half a file.

Layout: ``<instances_dir>/<study>/<series>/<sop>.dcm``. Paths are built only from UIDs that passed
:func:`is_safe_uid` (digits and single dots, at most 64 characters), so no part can climb out of the
instances directory whatever a client sends.

A write is: temporary file in the target directory → write → ``fsync`` → ``os.replace`` onto the final
name → ``fsync`` of the directory (so the rename itself is durable, POSIX rename semantics). Only then does
the caller answer (the HTTP path after committing the row, the DICOM listener before its group commit).
The two halves are :func:`stage` and :meth:`Staged.place`, so a caller can check, while the data are
being fsynced, whether it wants the file; writers renaming into one directory at once share its fsync.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from service.errors import InvalidUIDError, StorageFullError

__all__ = [
    "DiskSpace",
    "check_free_space",
    "disk_space",
    "fsync_dir",
    "instance_relname",
    "instance_relpath",
    "is_safe_uid",
    "make_parents",
    "place_all",
    "read_instance_bytes",
    "Staged",
    "remove_partial_writes",
    "stage",
    "write_durably",
]

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def is_safe_uid(uid: str) -> bool:
    """True for a PS3.5 9.1 UID: digit components without leading zeros, dots between, ≤ 64 characters."""
    return 0 < len(uid) <= 64 and _UID_RE.fullmatch(uid) is not None


def instance_relname(study_uid: str, series_uid: str, sop_instance_uid: str) -> str:
    """Relative path of an instance file, ``<study>/<series>/<sop>.dcm`` (POSIX separators, as the
    ``instances.path`` column holds it); refuses anything that is not a UID, so no name can leave the
    instances directory.

    Why a string: every received instance needs it three times (its placement, its row, its record), and
    building it as a ``Path`` (three joins, each parsed) cost ~13 µs a call against ~2 µs, ~4 % of the
    four-association listener's GIL time (bench/RESULTS.md, session 26)."""
    for name, uid in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid)):
        if not is_safe_uid(uid):
            raise InvalidUIDError(f"{name} is not a valid UID")
    if not is_safe_uid(sop_instance_uid):
        raise InvalidUIDError("SOPInstanceUID is not a valid UID")
    return f"{study_uid}/{series_uid}/{sop_instance_uid}.dcm"


def instance_relpath(study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
    """:func:`instance_relname` as a ``Path``."""
    return Path(instance_relname(study_uid, series_uid, sop_instance_uid))


def fsync_dir(path: Path) -> None:
    """Make a directory's entries durable (a rename or a new file is not, until its directory is fsynced:
    POSIX fsync(2); ext4 and XFS honour it)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _DirState:
    cond: threading.Condition = field(default_factory=threading.Condition)
    tickets: int = 0  # renames done and waiting to be durable, numbered
    synced: int = 0  # every ticket up to this one is covered by a finished fsync
    running: bool = False
    users: int = 0


class _SharedDirSync:
    """Concurrent fsyncs of one directory, shared: a writer whose rename was done before an fsync of the
    directory *started* is covered once that fsync ends, so it waits for it instead of issuing its own.

    Why: several associations writing one series rename into one directory at once; each needs its rename
    durable before its answer, and one directory fsync after all of their renames makes all of them
    durable. Measured on our disk with four writers into one directory: +10-15 % (bench/RESULTS.md).
    A failed fsync raises in the thread that issued it; the writers waiting on it try again themselves.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dirs: dict[Path, _DirState] = {}

    def sync(self, path: Path) -> None:
        with self._lock:
            st = self._dirs.setdefault(path, _DirState())
            st.users += 1
        try:
            with st.cond:
                st.tickets += 1
                ticket = st.tickets  # our rename is done: any fsync that starts from now on covers it
                while st.synced < ticket:
                    if st.running:
                        st.cond.wait()
                        continue
                    st.running, covers = True, st.tickets
                    st.cond.release()
                    try:
                        fsync_dir(path)
                    finally:
                        st.cond.acquire()
                        st.running = False
                        st.cond.notify_all()
                    st.synced = max(st.synced, covers)
        finally:
            with self._lock:
                st.users -= 1
                if not st.users:
                    del self._dirs[path]


_dir_sync = _SharedDirSync()


@dataclass(frozen=True)
class DiskSpace:
    """A file system as ``df`` shows it: ``used`` bytes and ``available`` ones (``f_bavail``: what an
    unprivileged process may still write; blocks reserved for root are neither)."""

    used: int
    available: int

    @property
    def fraction_used(self) -> float:
        """``df``'s Use%: used / (used + available); 0 for a file system that reports no blocks.

        Not ``shutil.disk_usage``'s used / total: total counts the blocks reserved for root, 5 % of an ext4
        disk by default and far more on some volumes (this project's machines: 35 of 252 GiB used, 68
        available: 34 % for ``df``, 14 % of total), so a watermark measured on total let the disk run to
        ENOSPC for anyone but root, and disagreed with the journal's room test (which counts
        ``f_bavail``): between the two the journal stopped preallocating its segments, and every
        instance paid for a segment of its own (bench/RESULTS.md, session 18)."""
        total = self.used + self.available
        return self.used / total if total else 0.0

    def room_below(self, high_watermark: float) -> int:
        """Bytes that may still be written before ``fraction_used`` passes ``high_watermark`` (1: all)."""
        if high_watermark >= 1.0:
            return self.available
        return max(0, int(high_watermark * (self.used + self.available)) - self.used)


def disk_space(path: Path) -> DiskSpace:
    """:class:`DiskSpace` of the file system holding ``path`` (statvfs(3))."""
    st = os.statvfs(path)
    return DiskSpace((st.f_blocks - st.f_bfree) * st.f_frsize, st.f_bavail * st.f_frsize)


def check_free_space(root: Path, high_watermark: float) -> None:
    """Refuse new data above the disk's high watermark (fraction used, as ``df`` says), before the disk is
    really full.

    Keeping headroom means the database can still commit, results can still be written and the retention
    sweep can still run; senders get 0xA700 / 507 ("try again later") and nothing acknowledged is lost.
    """
    if high_watermark >= 1.0:
        return
    used = disk_space(root).fraction_used
    if used > high_watermark:
        raise StorageFullError(
            f"the data disk is {used:.0%} full, above the high watermark of {high_watermark:.0%}; "
            "try again later"
        )


@dataclass
class Staged:
    """A file written and fsynced under a temporary name in its target's directory (:func:`stage`):
    :meth:`place` renames it onto the target durably, :meth:`discard` removes it. Split so that a caller
    can decide, while the data are being fsynced, whether the file is wanted at all."""

    target: Path
    tmp: Path
    created: list[Path]
    """Directories :func:`stage` created, whose own entries :meth:`place` makes durable too."""

    def place(self) -> Path:
        """``os.replace`` onto the target, then fsync its directory (and new parents); returns the target."""
        with _storage_errors():
            try:
                os.replace(self.tmp, self.target)
            except BaseException:
                self.discard()
                raise
            try:
                _dir_sync.sync(self.target.parent)
                for parent in self.created:  # new directories must be durable in their own parents too
                    fsync_dir(parent.parent)
            except BaseException:
                self.target.unlink(missing_ok=True)  # not durable, so never acknowledged: not kept either
                raise
        return self.target

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


def place_all(staged: list[Staged], also: Iterable[Path] = ()) -> None:
    """:meth:`Staged.place` for a batch: every rename first, then one fsync per directory, the ones the
    files left and ``also`` included (the placement of received instances from their slots,
    :mod:`service.store.slot_place`, where nobody waits per file). Unlike :meth:`Staged.place`, nothing
    renamed is removed when a fsync fails: the caller retries the fsyncs."""
    with _storage_errors():
        for st in staged:
            os.replace(st.tmp, st.target)
        # every entry exists by now, so one fsync of each directory (and of new ones' parents) covers all
        dirs = {st.target.parent for st in staged} | {p.parent for st in staged for p in st.created}
        dirs |= {st.tmp.parent for st in staged} | set(also)
        for d in dirs:
            fsync_dir(d)


@contextlib.contextmanager
def _storage_errors() -> Iterator[None]:
    """A full disk (ENOSPC/EDQUOT) becomes :class:`StorageFullError`: the client sees 507 and a DICOM
    sender 0xA700, both of which mean "try again later" rather than "your data is bad"."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFullError("no space left to store the instance; try again later") from exc
        raise


def make_parents(root: Path, target: Path) -> list[Path]:
    """Create the missing directories between ``root`` and ``target``; returns those it created (not yet
    durable in their parents: :meth:`Staged.place` and :func:`place_all` fsync those)."""
    created: list[Path] = []
    if not target.parent.is_dir():  # one stat in the common case: the series' directory exists
        for parent in reversed(target.parents):
            if (parent == root or root in parent.parents) and not parent.exists():
                parent.mkdir(exist_ok=True)
                created.append(parent)
    return created


def stage(root: Path, relpath: Path, data: bytes | memoryview) -> Staged:
    """Write ``data`` to a temporary file beside ``root / relpath`` and fsync it (the first half of
    :func:`write_durably`)."""
    target = root / relpath
    with _storage_errors():
        created = make_parents(root, target)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return Staged(target, Path(tmp), created)


def write_durably(root: Path, relpath: Path, data: bytes | memoryview) -> Path:
    """Write ``data`` to ``root / relpath`` atomically and durably; returns the final path.

    Raises :class:`StorageFullError` when the disk is full (ENOSPC/EDQUOT).
    """
    return stage(root, relpath, data).place()


def remove_partial_writes(root: Path) -> int:
    """Delete temporary files a crash left mid-write (never acknowledged: their rename never happened).

    Only for a process that owns ``root`` alone: on a shared filesystem another process may be writing.
    """
    removed = 0
    for tmp in root.rglob(".incoming-*.tmp"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def read_instance_bytes(root: Path, relpath: str) -> bytes:
    return (root / relpath).read_bytes()
