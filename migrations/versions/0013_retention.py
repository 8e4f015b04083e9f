"""retention: projects' settings for how long stored completions and files are kept; files'
expiry; a batch's output file expiry"""

import sqlalchemy as sa
from alembic import op

revision, down_revision = "0013", "0012"
branch_labels = depends_on = None

SETTINGS = ("completions_ttl_seconds", "file_ttl_seconds", "batch_output_ttl_seconds")


def upgrade() -> None:
    for name in SETTINGS:
        op.add_column("projects", sa.Column(name, sa.BigInteger(), nullable=True))
    op.add_column("files", sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_files_expires_at",
        "files",
        ["expires_at"],
        postgresql_where=sa.text("expires_at IS NOT NULL AND deleted_at IS NULL"),
    )
    op.add_column("batches", sa.Column("output_expires_after", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column("batches", "output_expires_after")
    op.drop_index("ix_files_expires_at", table_name="files")
    op.drop_column("files", "expires_at")
    for name in SETTINGS:
        op.drop_column("projects", name)
