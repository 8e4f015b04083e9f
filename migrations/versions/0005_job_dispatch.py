"""job dispatch times and the reconciler's indexes"""

import sqlalchemy as sa
from alembic import op

revision, down_revision = "0005", "0004"
branch_labels = depends_on = None


def upgrade() -> None:
    op.add_column(
        "jobs",
        sa.Column(
            "queued_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
    )
    op.create_index(
        "ix_jobs_queued_at",
        "jobs",
        ["queued_at"],
        postgresql_where=sa.text("status = 'queued'"),
    )
    op.create_index(
        "ix_jobs_running_worker",
        "jobs",
        ["worker"],
        postgresql_where=sa.text("status = 'running'"),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_running_worker", table_name="jobs")
    op.drop_index("ix_jobs_queued_at", table_name="jobs")
    op.drop_column("jobs", "queued_at")
