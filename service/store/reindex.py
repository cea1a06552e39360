"""Start-up re-index: instance files that have no row get one, before the listener opens.

Why: the DICOM listener answers a C-STORE once the file and its directory are fsynced and writes the row in
the next group commit (:mod:`service.store.group_commit`). A crash between the two leaves an acknowledged
instance whose file is durable and whose row is missing; the sender will not send it again. Re-indexing
it at the next start, through the same insert as every arrival (:meth:`Instances.commit_rows`: study
and series rows, counts, the job behind its assembly gate), makes it an ordinary arrival: a series it
completes is due at once, otherwise the quiet timer runs; an instance already stored is skipped. So an
acknowledged instance is never lost and, since a study is complete only on its rows, never analysed
twice. (A file the HTTP path wrote but whose transaction died with the process was never acknowledged;
indexing it is what the client's retry would have done.)

Cheap on a large store: one query counts rows per series; only series directories holding more ``.dcm``
files than rows are listed against the database, and only files without a row are read (a store of 20,000
instances with nothing missing: 30-100 ms here). Files are named
by their UIDs (:func:`service.store.files.instance_relpath`); a file whose content names other UIDs than
its path, or that does not parse, is left where it is and counted, never guessed at.

Two kinds of file without a row are not arrivals:

- **Retention leftovers.** Retention deletes a study's rows, then unlinks their files
  (:mod:`service.store.retention`); a crash in between leaves files of a purged study. A file of a study
  whose ``purged_at`` is later than the file's modification time is such a leftover: it is removed, not
  resurrected (re-indexing it would analyse the study again).
- **Another process's work in progress** (a shared PostgreSQL store, several processes on one instance
  directory): files younger than ``min_age_seconds`` are left to the process that wrote them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.clock import utcnow
from service.errors import PacsTriageError
from service.store.db import InstanceRow, StudyRow
from service.store.files import instance_relpath, is_safe_uid
from service.store.instances import Instances
from service.store.validate import ParsedInstance, parse_instance

__all__ = ["Reindexed", "index_acknowledged", "known_sops", "reindex"]

logger = logging.getLogger(__name__)

_CHUNK = 500  # SOP UIDs per IN (...) query, and instances per transaction


@dataclass
class Reindexed:
    """What one re-index did (counts only: the log never names an instance)."""

    instances: int = 0
    """Files given their row (and their study's job)."""
    studies: int = 0
    leftovers: int = 0
    """Files of studies retention had purged, removed."""
    unreadable: int = 0
    """Files without a row that do not parse, or whose content does not match their path: left alone."""
    due: bool = False
    """A re-indexed study is due at once (its series became full)."""


def reindex(
    instances: Instances,
    *,
    quiet_seconds: float,
    complete_when_full: bool = True,
    min_age_seconds: float = 0.0,
) -> Reindexed:
    """Give every instance file without a row its row; blocking (run it before the listener starts)."""
    done = Reindexed()
    root = instances.instances_dir
    if not root.is_dir():
        return done
    db = instances.db
    counts: dict[str, int] = dict(db.read_blocking(_series_counts))
    young = utcnow().timestamp() - min_age_seconds
    found: list[tuple[Path, str, str, str, float]] = []  # path, study, series, sop, mtime
    for study_dir, series_dir, names in _series_dirs(root):
        if len(names) <= counts.get(series_dir.name, 0):
            continue  # as many rows as files: nothing missing (a row never outlives its file)
        sops = [n.removesuffix(".dcm") for n in names]
        known = known_sops(instances, sops)
        for sop in sops:
            path = series_dir / f"{sop}.dcm"
            if sop in known or not is_safe_uid(sop):
                continue
            try:
                mtime = path.stat().st_mtime
            except FileNotFoundError:
                continue
            if not min_age_seconds or mtime <= young:
                found.append((path, study_dir.name, series_dir.name, sop, mtime))
    if not found:
        return done
    purged = db.read_blocking(_purged, sorted({study for _, study, _, _, _ in found}))
    fresh: list[ParsedInstance] = []
    for path, study, series, sop, mtime in found:
        when = purged.get(study)
        if when is not None and datetime.fromtimestamp(mtime, UTC) <= when:
            path.unlink(missing_ok=True)
            done.leftovers += 1
            continue
        parsed = _parse(path, study, series, sop)
        if parsed is None:
            done.unreadable += 1
            continue
        fresh.append(parsed)
    done.due = index_acknowledged(
        instances, fresh, quiet_seconds=quiet_seconds, complete_when_full=complete_when_full
    )
    done.instances = len(fresh)
    done.studies = len({p.study_uid for p in fresh})
    return done


def known_sops(instances: Instances, sops: Iterable[str]) -> set[str]:
    """Those of ``sops`` that have a row (blocking; :data:`_CHUNK` UIDs per query). Shared with the slots'
    replay (:mod:`service.store.slot_place`)."""
    ordered = sorted(set(sops))
    known: set[str] = set()
    for i in range(0, len(ordered), _CHUNK):
        known |= instances.db.read_blocking(_known, ordered[i : i + _CHUNK])
    return known


def index_acknowledged(
    instances: Instances, fresh: list[ParsedInstance], *, quiet_seconds: float, complete_when_full: bool
) -> bool:
    """Rows (and jobs) for instances acknowledged before a restart and found without one, :data:`_CHUNK`
    per transaction, as ordinary arrivals (:meth:`Instances.commit_rows`); True if a study is due at once.
    Blocking, before the listener opens: the re-index's and the slots' replay's last step."""
    now = utcnow()
    due = False
    for i in range(0, len(fresh), _CHUNK):
        ingested = instances.db.run_blocking(
            instances.commit_rows,
            fresh[i : i + _CHUNK],
            not_before=now + timedelta(seconds=quiet_seconds),
            hold_until=None,  # no association survives a restart
            complete_when_full=complete_when_full,
        )
        due = due or any(gate <= utcnow() for gate in ingested.gates)
    return due


def _series_dirs(root: Path) -> list[tuple[Path, Path, list[str]]]:
    """(study directory, series directory, ``.dcm`` file names) under ``root``, UID-named folders only."""
    out = []
    for study in _subdirs(root):
        for series in _subdirs(study):
            with os.scandir(series) as entries:
                names = [
                    e.name for e in entries if e.name.endswith(".dcm") and e.is_file(follow_symlinks=False)
                ]
            if names:
                out.append((study, series, names))
    return out


def _subdirs(path: Path) -> list[Path]:
    with os.scandir(path) as entries:
        return [Path(e.path) for e in entries if is_safe_uid(e.name) and e.is_dir(follow_symlinks=False)]


def _parse(path: Path, study: str, series: str, sop: str) -> ParsedInstance | None:
    """The file as an arrival, or None when it does not parse or names other UIDs than its path."""
    try:
        parsed = parse_instance(
            path.read_bytes(),
            part="re-indexed file",
            images_only=False,
            keep_truncated=True,
            with_dataset=False,
        )
        named = instance_relpath(parsed.study_uid, parsed.series_uid, parsed.sop_instance_uid)
    except (PacsTriageError, OSError) as exc:
        logger.warning(
            "re-index: an instance file without a row cannot be read (%s); left in place", type(exc).__name__
        )
        return None
    if named != Path(study) / series / f"{sop}.dcm":
        logger.warning(
            "re-index: an instance file without a row names other UIDs than its path; left in place"
        )
        return None
    return parsed


def _series_counts(s: Session) -> list[tuple[str, int]]:
    rows = s.execute(select(InstanceRow.series_uid, func.count()).group_by(InstanceRow.series_uid)).all()
    return [(series, int(n)) for series, n in rows]


def _known(s: Session, sops: list[str]) -> set[str]:
    return set(s.scalars(select(InstanceRow.sop_instance_uid).where(InstanceRow.sop_instance_uid.in_(sops))))


def _purged(s: Session, studies: list[str]) -> dict[str, datetime]:
    """``purged_at`` of the studies retention purged (aware UTC; SQLite hands back naive UTC)."""
    out = {}
    for i in range(0, len(studies), _CHUNK):
        rows = s.execute(
            select(StudyRow.study_uid, StudyRow.purged_at).where(
                StudyRow.study_uid.in_(studies[i : i + _CHUNK]), StudyRow.purged_at.is_not(None)
            )
        ).all()
        for study, when in rows:
            if when is not None:  # never: the query asks for purged_at IS NOT NULL
                out[study] = when if when.tzinfo else when.replace(tzinfo=UTC)
    return out
