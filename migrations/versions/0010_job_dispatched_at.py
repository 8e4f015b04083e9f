"""jobs' dispatch records, from which the reconciler decides what to send again

Revision ID: 0010
Revises: 0009
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True))
    # Jobs queued before this revision have no record: the reconciler sends them once more (a
    # worker claims only queued jobs, so a second message is harmless).
    op.create_index(
        "ix_jobs_undispatched",
        "jobs",
        ["queued_at"],
        postgresql_where=sa.text("status = 'queued' AND dispatched_at IS NULL"),
    )
    op.create_index(
        "ix_jobs_queued_dispatched",
        "jobs",
        ["model", "dispatched_at"],
        postgresql_where=sa.text("status = 'queued'"),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_queued_dispatched", table_name="jobs")
    op.drop_index("ix_jobs_undispatched", table_name="jobs")
    op.drop_column("jobs", "dispatched_at")
