"""instances: one index on (series_uid, role) instead of series_uid alone

The assembly gate counts a study's image instances per series in every ingest transaction that may make
the study full (:func:`service.store.gates.series_fill`). With an index on ``series_uid`` alone each count
read every instance row of the series: O(series size) table reads per group commit, 1.4 ms per commit at
2,400 instances (bench/RESULTS.md, session 30). An index on ``(series_uid, role)`` answers the count from
the index alone (covering) and still serves every lookup by series.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch_op:
        batch_op.create_index("ix_instances_series_role", ["series_uid", "role"], unique=False)
        batch_op.drop_index("ix_instances_series_uid")


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch_op:
        batch_op.create_index("ix_instances_series_uid", ["series_uid"], unique=False)
        batch_op.drop_index("ix_instances_series_role")
