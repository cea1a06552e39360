"""results: a job may store a measurements-pending result before its final one

The classifier's findings are stored (and flagged on the worklist) before the segmentation that measures
them, in a result of the same job marked ``measurements_pending``; the final result follows. The unique
constraint on ``results.job_id`` becomes a partial unique index: one final result per job.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# 0001 left the unique constraint unnamed; batch mode names it with this convention to drop it (SQLite
# recreates the table; PostgreSQL named it results_job_id_key).
_NAMING = {"uq": "uq_%(table_name)s_%(column_0_name)s"}


def upgrade() -> None:
    bind = op.get_bind()
    with op.batch_alter_table("results", naming_convention=_NAMING) as batch_op:
        batch_op.add_column(
            sa.Column("measurements_pending", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        if bind.dialect.name == "postgresql":
            batch_op.drop_constraint("results_job_id_key", type_="unique")
        else:
            batch_op.drop_constraint("uq_results_job_id", type_="unique")
    with op.batch_alter_table("results") as batch_op:
        batch_op.create_index(
            "ux_results_one_final_per_job",
            ["job_id"],
            unique=True,
            sqlite_where=sa.text("NOT measurements_pending"),
            postgresql_where=sa.text("NOT measurements_pending"),
        )


def downgrade() -> None:
    with op.batch_alter_table("results") as batch_op:
        batch_op.drop_index("ux_results_one_final_per_job")
    op.execute("DELETE FROM results WHERE measurements_pending")
    with op.batch_alter_table("results", naming_convention=_NAMING) as batch_op:
        batch_op.drop_column("measurements_pending")
        batch_op.create_unique_constraint("uq_results_job_id", ["job_id"])
