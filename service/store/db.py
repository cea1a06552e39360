"""SQL tables (SQLAlchemy 2 ORM) and the states and priorities stored in them.

Portable SQL only: everything SQLite-specific lives in :mod:`service.store.database` (WAL, synchronous,
busy timeout, foreign keys), so PostgreSQL is a different URL and nothing else. States are enums here
(``StrEnum``: the stored values stay the plain strings of the schema, so no migration was needed to
introduce them); priorities are stored as :class:`service.results.schema.Priority` numbers.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

__all__ = [
    "AuditRow",
    "Base",
    "DeliveryRow",
    "InstanceRow",
    "NotificationRow",
    "OutputRow",
    "JobRow",
    "JobState",
    "OutboxState",
    "ResultRow",
    "SeriesRow",
    "StudyRow",
]

UID = String(64)


class JobState(StrEnum):
    """A job's life: ``pending`` (waiting for its gate and a worker) → ``running`` (leased by a worker) →
    ``done`` with one result, or back to ``pending`` after a failed attempt, ``failed`` after the last one."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class OutboxState(StrEnum):
    """A delivery or notification: ``pending`` → ``sending`` (claimed) → ``done`` (final, never sent again),
    or back to ``pending`` with a backoff, ``dead`` after ``max_attempts`` (visible, can be re-queued)."""

    PENDING = "pending"
    SENDING = "sending"
    DONE = "done"
    DEAD = "dead"


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in, timezone-aware UTC out, on backends that drop the zone (SQLite)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:  # noqa: ARG002
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:  # noqa: ARG002
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    pass


class StudyRow(Base):
    __tablename__ = "studies"

    study_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    accession_number: Mapped[str | None] = mapped_column(String(16))
    first_received: Mapped[datetime] = mapped_column(UTCDateTime)
    last_received: Mapped[datetime] = mapped_column(UTCDateTime)
    instance_count: Mapped[int] = mapped_column(Integer, default=0, doc="for api.max_instances_per_study")
    purged_at: Mapped[datetime | None] = mapped_column(
        UTCDateTime, doc="when retention removed its instance files (results and outbox history stay)"
    )
    ai_priority: Mapped[int | None] = mapped_column(
        Integer, doc="worklist priority from results, 0 stat .. 2 routine; only ever raised (lower number)"
    )
    last_result_priority: Mapped[int | None] = mapped_column(Integer, doc="the newest result's own priority")
    flagged_at: Mapped[datetime | None] = mapped_column(UTCDateTime, doc="worklist last updated by a result")
    acknowledged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    acknowledged_by: Mapped[str | None] = mapped_column(String(128))
    escalated_at: Mapped[datetime | None] = mapped_column(UTCDateTime, doc="escalation sent for this flag")


class SeriesRow(Base):
    __tablename__ = "series"

    series_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, ForeignKey("studies.study_uid"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(64))
    expected_instances: Mapped[int | None] = mapped_column(
        Integer, doc="ImagesInAcquisition when the sender gave it: the series is complete when full"
    )


class InstanceRow(Base):
    __tablename__ = "instances"
    __table_args__ = (
        # Serves every lookup by series, and counts a series' images from the index alone (store.gates).
        Index("ix_instances_series_role", "series_uid", "role"),
    )

    sop_instance_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    series_uid: Mapped[str] = mapped_column(UID, ForeignKey("series.series_uid"))
    study_uid: Mapped[str] = mapped_column(UID, ForeignKey("studies.study_uid"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(Text, doc="relative to the instances directory")
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    role: Mapped[str] = mapped_column(String(8), default="image", doc="image|other|ours (validate.Role)")


class JobRow(Base):
    """One analysis of one study. ``not_before`` is the assembly gate: the quiet timer, or now for HTTP."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_claim", "state", "priority", "not_before"),
        # At most one pending job per study, even with several ingesting processes on one PostgreSQL:
        # the loser of a race gets an IntegrityError, retries, and joins the existing pending job.
        Index(
            "ux_jobs_one_pending_per_study",
            "study_uid",
            unique=True,
            sqlite_where=text("state = 'pending'"),
            postgresql_where=text("state = 'pending'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_uid: Mapped[str] = mapped_column(UID, ForeignKey("studies.study_uid"), index=True)
    state: Mapped[str] = mapped_column(String(16), default="pending", doc="pending|running|done|failed")
    priority: Mapped[int] = mapped_column(Integer, default=2, doc="0 stat, 1 urgent, 2 routine")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    not_before: Mapped[datetime] = mapped_column(UTCDateTime)
    ready_at: Mapped[datetime | None] = mapped_column(UTCDateTime, doc="study_complete hop time")
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    result_id: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    worker_id: Mapped[str | None] = mapped_column(String(64), doc="the process that holds the lease")
    lease_expires_at: Mapped[datetime | None] = mapped_column(
        UTCDateTime, doc="a running job whose lease passed is given back (its worker died)"
    )


class ResultRow(Base):
    """A job's result; a job whose findings a segmentation measures first stores a measurements-pending
    one (``StudyResult.measurements_pending``), then its final one: one final result per job (a job re-run
    after a crash or a failure may have stored more than one measurements-pending result)."""

    __tablename__ = "results"
    __table_args__ = (
        Index(
            "ux_results_one_final_per_job",
            "job_id",
            unique=True,
            sqlite_where=text("NOT measurements_pending"),
            postgresql_where=text("NOT measurements_pending"),
        ),
    )

    result_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, ForeignKey("studies.study_uid"), index=True)
    job_id: Mapped[int] = mapped_column(Integer, ForeignKey("jobs.id"))
    measurements_pending: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    supersedes: Mapped[str | None] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(Text, doc="StudyResult JSON")
    rendered_at: Mapped[datetime | None] = mapped_column(
        UTCDateTime, index=True, doc="when its SR/preview were written and queued (NULL: still to do)"
    )
    render_lease_until: Mapped[datetime | None] = mapped_column(
        UTCDateTime, doc="a renderer is on it until then (several worker processes on one database)"
    )


class AuditRow(Base):
    """Who did what to a study's worklist entry, and when: flags, re-runs, acknowledgements, notifications,
    and which remote backend saw the study's data (``remote_inference``)."""

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    study_uid: Mapped[str] = mapped_column(UID, ForeignKey("studies.study_uid"), index=True)
    event: Mapped[str] = mapped_column(
        String(32), doc="flagged|raised|rerun_lower|acknowledged|remote_inference|..."
    )
    actor: Mapped[str] = mapped_column(String(128), doc='"pacs-triage" or who acknowledged')
    detail: Mapped[str | None] = mapped_column(Text, doc="JSON; never PHI")


class NotificationRow(Base):
    """One message to one target (webhook, escalation, HL7, FHIR): an outbox like deliveries."""

    __tablename__ = "notifications"
    __table_args__ = (Index("ix_notifications_due", "state", "priority", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_uid: Mapped[str] = mapped_column(UID, ForeignKey("studies.study_uid"), index=True)
    result_id: Mapped[str | None] = mapped_column(String(64))
    channel: Mapped[str] = mapped_column(String(16), doc="webhook|escalation|hl7|fhir")
    target: Mapped[str] = mapped_column(String(512), doc="URL or host:port")
    state: Mapped[str] = mapped_column(String(16), default="pending", doc="pending|sending|done|dead")
    priority: Mapped[int] = mapped_column(Integer, default=2)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, doc="when a sender took it (sending)")


class OutputRow(Base):
    """A DICOM object we created for a result (SR or preview), kept on disk until delivered."""

    __tablename__ = "outputs"

    sop_instance_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    result_id: Mapped[str] = mapped_column(String(64), ForeignKey("results.result_id"), index=True)
    study_uid: Mapped[str] = mapped_column(UID, ForeignKey("studies.study_uid"), index=True)
    series_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    kind: Mapped[str] = mapped_column(String(16), doc="sr|preview")
    path: Mapped[str] = mapped_column(Text, doc="relative to the outputs directory")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class DeliveryRow(Base):
    """One object to one destination: the outbox. ``done`` is final, so nothing is delivered twice."""

    __tablename__ = "deliveries"
    __table_args__ = (
        Index("ix_deliveries_due", "state", "priority", "next_attempt_at"),
        Index("ux_deliveries_object_dest", "sop_instance_uid", "destination", unique=True),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, ForeignKey("outputs.sop_instance_uid"))
    destination: Mapped[str] = mapped_column(String(128), doc='"AE@host:port"')
    state: Mapped[str] = mapped_column(String(16), default="pending", doc="pending|sending|done|dead")
    priority: Mapped[int] = mapped_column(Integer, default=2, doc="the result's priority: stat first")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, doc="when a sender took it (sending)")
