"""stored completions: delivery, deletion, idempotency keys, list and metadata indexes"""

import sqlalchemy as sa
from alembic import op

revision, down_revision = "0003", "0002"
branch_labels = depends_on = None

STORED = sa.text("store AND deleted_at IS NULL AND status = 'succeeded'")


def upgrade() -> None:
    op.add_column("jobs", sa.Column("idempotency_key", sa.String(length=255), nullable=True))
    op.add_column("jobs", sa.Column("request_hash", sa.String(length=64), nullable=True))
    op.add_column("jobs", sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("jobs", sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_jobs_stored_project_created",
        "jobs",
        ["project", "created_at", "id"],
        postgresql_where=STORED,
    )
    op.create_index(
        "ix_jobs_stored_project_model_created",
        "jobs",
        ["project", "model", "created_at", "id"],
        postgresql_where=STORED,
    )
    op.create_index(
        "ix_jobs_metadata",
        "jobs",
        ["metadata"],
        postgresql_using="gin",
        postgresql_ops={"metadata": "jsonb_path_ops"},
        postgresql_where=sa.text("store AND deleted_at IS NULL"),
    )
    op.create_index(
        "uq_jobs_api_key_idempotency_key",
        "jobs",
        ["api_key_id", "idempotency_key"],
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("uq_jobs_api_key_idempotency_key", table_name="jobs")
    op.drop_index("ix_jobs_metadata", table_name="jobs")
    op.drop_index("ix_jobs_stored_project_model_created", table_name="jobs")
    op.drop_index("ix_jobs_stored_project_created", table_name="jobs")
    op.drop_column("jobs", "deleted_at")
    op.drop_column("jobs", "delivered_at")
    op.drop_column("jobs", "request_hash")
    op.drop_column("jobs", "idempotency_key")
