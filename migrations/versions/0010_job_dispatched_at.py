"""jobs' dispatch records, from which the reconciler decides what to send again"""

import sqlalchemy as sa
from alembic import op

revision, down_revision = "0010", "0009"
branch_labels = depends_on = None


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
    # Only jobs never sent are looked up by when they were queued now.
    op.drop_index("ix_jobs_queued_at", table_name="jobs")


def downgrade() -> None:
    op.create_index(
        "ix_jobs_queued_at", "jobs", ["queued_at"], postgresql_where=sa.text("status = 'queued'")
    )
    op.drop_index("ix_jobs_queued_dispatched", table_name="jobs")
    op.drop_index("ix_jobs_undispatched", table_name="jobs")
    op.drop_column("jobs", "dispatched_at")
