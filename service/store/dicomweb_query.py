"""The read side of DICOMweb: which studies, series and objects we hold, and their stored headers.

QIDO-RS (PS3.18 10.6) and WADO-RS (PS3.18 10.4) answer from two sources: the SQL rows the ingest wrote
(study UID, accession number, series modality, SOP class, transfer syntax, file path) and, for everything
the rows do not keep (PatientID, StudyDate, SeriesNumber, Rows...), the header of a stored file, read up to
the pixel data. Our own result objects (the TID 1500 SR, the preview Secondary Capture: ``OutputRow``,
written under ``outputs_dir`` by the render step) are objects of their study here too, so a viewer that
searches the study finds and shows them; when the PACS sends one of them back to us it also has an
instance row, and the SOP Instance UID is listed once.

Synchronous on purpose: the API runs these calls in a worker thread. Reads only; the module takes the
store's engine and never another module's private members, so it survives the store's split into
database/instances/jobs/results.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import Engine, Select, exists, or_, select
from sqlalchemy.orm import Session

from service.store.db import InstanceRow, OutputRow, SeriesRow, StudyRow

__all__ = ["DicomwebQuery", "StoredObject", "StudySummary", "read_header"]

logger = logging.getLogger(__name__)

SR_MODALITY = "SR"
"""Modality of our TID 1500 SR (PS3.3 C.17.1: the SR Document Series Module fixes it to SR)."""


@dataclass(frozen=True)
class StoredObject:
    """One object of a study that WADO-RS can return: a received instance or one of our own outputs."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str | None
    """As stored; None for our outputs (read from the file's meta information when it matters)."""
    modality: str | None
    path: Path
    ours: bool
    """True for an SR or preview we rendered (kept under ``outputs_dir``)."""


@dataclass(frozen=True)
class StudySummary:
    """The DB's view of a study, for a QIDO-RS study answer; ``header`` names a file to read the rest from."""

    study_uid: str
    accession_number: str | None
    modalities: tuple[str, ...]
    series_count: int
    instance_count: int
    header: Path | None


def read_header(path: Path) -> Dataset | None:
    """The file's attributes up to (not including) the pixel data; None when the file is gone or unreadable.

    Retention removes instance files of delivered studies (their rows stay), so a missing file is an
    expected state, not an error: the caller answers with what the rows know.
    """
    try:
        return dcmread(path, stop_before_pixels=True)
    except FileNotFoundError:
        return None
    except Exception as exc:  # a file we stored was parseable then; log the kind, never the content
        logger.warning("stored file %s cannot be read back: %s", path.name, type(exc).__name__)
        return None


class DicomwebQuery:
    """Read queries for DICOMweb on the store's engine.

    Parameters
    ----------
    engine
        The store's SQLAlchemy engine (SQLite or PostgreSQL).
    instances_dir, outputs_dir
        Where instance rows' and output rows' relative paths point.
    """

    def __init__(self, engine: Engine, instances_dir: Path, outputs_dir: Path) -> None:
        self.engine = engine
        self.instances_dir = instances_dir
        self.outputs_dir = outputs_dir

    # ---- studies --------------------------------------------------------------------------------------

    def find_studies(
        self,
        *,
        study_uids: Sequence[str] | None = None,
        accession_number: str | None = None,
        modalities: Sequence[str] | None = None,
    ) -> list[str]:
        """Study UIDs matching the DB-held keys, oldest first (a stable order for limit/offset paging).

        ``accession_number`` is an exact match (wildcards are matched on headers by the caller);
        ``modalities`` matches a study with a series of any of them (ModalitiesInStudy, PS3.4 C.6.1.1.3),
        counting our SR series as ``SR``.
        """
        query: Select[tuple[str]] = select(StudyRow.study_uid)
        if study_uids is not None:
            query = query.where(StudyRow.study_uid.in_(list(study_uids)))
        if accession_number is not None:
            query = query.where(StudyRow.accession_number == accession_number)
        if modalities is not None:
            wanted = list(modalities)
            has_series = exists().where(
                SeriesRow.study_uid == StudyRow.study_uid, SeriesRow.modality.in_(wanted)
            )
            conditions = [has_series]
            if SR_MODALITY in wanted:
                conditions.append(
                    exists().where(OutputRow.study_uid == StudyRow.study_uid, OutputRow.kind == "sr")
                )
            query = query.where(or_(*conditions))
        query = query.order_by(StudyRow.first_received, StudyRow.study_uid)
        with Session(self.engine) as s:
            return list(s.scalars(query))

    def study_exists(self, study_uid: str) -> bool:
        with Session(self.engine) as s:
            return s.get(StudyRow, study_uid) is not None

    def summaries(self, study_uids: Sequence[str]) -> list[StudySummary]:
        """One summary per known study, in the order given."""
        uids = list(study_uids)
        if not uids:
            return []
        by_study: dict[str, list[StoredObject]] = {uid: [] for uid in uids}
        for obj in self._objects(uids):
            by_study[obj.study_uid].append(obj)
        with Session(self.engine) as s:
            accession = dict(
                s.execute(
                    select(StudyRow.study_uid, StudyRow.accession_number).where(StudyRow.study_uid.in_(uids))
                ).all()
            )
        summaries = []
        for uid in uids:
            if uid not in accession:
                continue
            objects = by_study[uid]
            received = [o for o in objects if not o.ours]
            modalities = sorted({o.modality for o in objects if o.modality})
            summaries.append(
                StudySummary(
                    study_uid=uid,
                    accession_number=accession[uid],
                    modalities=tuple(modalities),
                    series_count=len({o.series_uid for o in objects}),
                    instance_count=len(objects),
                    header=(received or objects)[0].path if objects else None,
                )
            )
        return summaries

    # ---- objects --------------------------------------------------------------------------------------

    def objects(
        self, study_uid: str, series_uid: str | None = None, sop_instance_uid: str | None = None
    ) -> list[StoredObject]:
        """The study's objects (received and ours), optionally narrowed to a series or one instance."""
        found = self._objects([study_uid], series_uid, sop_instance_uid)
        return sorted(found, key=lambda o: (o.ours, o.series_uid, o.sop_instance_uid))

    def _objects(
        self,
        study_uids: Iterable[str],
        series_uid: str | None = None,
        sop_instance_uid: str | None = None,
    ) -> list[StoredObject]:
        uids = list(study_uids)
        received = (
            select(InstanceRow, SeriesRow.modality)
            .join(SeriesRow, SeriesRow.series_uid == InstanceRow.series_uid)
            .where(InstanceRow.study_uid.in_(uids))
        )
        ours = select(OutputRow).where(OutputRow.study_uid.in_(uids))
        if series_uid is not None:
            received = received.where(InstanceRow.series_uid == series_uid)
            ours = ours.where(OutputRow.series_uid == series_uid)
        if sop_instance_uid is not None:
            received = received.where(InstanceRow.sop_instance_uid == sop_instance_uid)
            ours = ours.where(OutputRow.sop_instance_uid == sop_instance_uid)
        with Session(self.engine) as s:
            found = {
                i.sop_instance_uid: StoredObject(
                    study_uid=i.study_uid,
                    series_uid=i.series_uid,
                    sop_instance_uid=i.sop_instance_uid,
                    sop_class_uid=i.sop_class_uid,
                    transfer_syntax_uid=i.transfer_syntax_uid,
                    modality=modality,
                    path=self.instances_dir / i.path,
                    ours=False,
                )
                for i, modality in s.execute(received).all()
            }
            outputs = list(s.scalars(ours))
        for o in outputs:  # after the session: a preview's modality is read from its file
            if o.sop_instance_uid in found:
                continue  # our object came back from the PACS: one SOP Instance UID, listed once
            found[o.sop_instance_uid] = StoredObject(
                study_uid=o.study_uid,
                series_uid=o.series_uid,
                sop_instance_uid=o.sop_instance_uid,
                sop_class_uid=o.sop_class_uid,
                transfer_syntax_uid=None,
                modality=SR_MODALITY if o.kind == "sr" else self._output_modality(o.path),
                path=self.outputs_dir / o.path,
                ours=True,
            )
        return list(found.values())

    def _output_modality(self, relpath: str) -> str | None:
        """A preview copies its source image's modality (highdicom SCImage.from_ref_dataset), a KOS is KO:
        read it from the file."""
        header = read_header(self.outputs_dir / relpath)
        value = header.get("Modality") if header is not None else None
        return str(value) if value else None
