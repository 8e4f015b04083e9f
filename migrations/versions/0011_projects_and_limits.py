"""projects and their limits; a batch's estimated tokens, held against its project's queue"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision, down_revision = "0011", "0010"
branch_labels = depends_on = None


def upgrade() -> None:
    op.create_table(
        "projects",
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("weight", sa.Integer(), nullable=False, server_default=sa.text("1")),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("name", name="pk_projects"),
    )
    # The projects keys name already: each gets a row, without limits.
    op.execute("INSERT INTO projects (name) SELECT DISTINCT project FROM api_keys")
    op.create_table(
        "project_limits",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("project", sa.String(200), nullable=False),
        sa.Column("model", sa.String(200), nullable=True),
        sa.Column("rpm", sa.Integer(), nullable=True),
        sa.Column("tpm", sa.BigInteger(), nullable=True),
        sa.Column("max_concurrent", sa.Integer(), nullable=True),
        sa.Column("batch_queue_tokens", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(
            ["project"],
            ["projects.name"],
            name="fk_project_limits_project_projects",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_project_limits"),
    )
    op.create_index(
        "uq_project_limits_project",
        "project_limits",
        ["project"],
        unique=True,
        postgresql_where=sa.text("model IS NULL"),
    )
    op.create_index(
        "uq_project_limits_project_model",
        "project_limits",
        ["project", "model"],
        unique=True,
        postgresql_where=sa.text("model IS NOT NULL"),
    )
    op.add_column("batches", sa.Column("queued_tokens", JSONB(), nullable=True))


def downgrade() -> None:
    op.drop_column("batches", "queued_tokens")
    op.drop_index("uq_project_limits_project_model", table_name="project_limits")
    op.drop_index("uq_project_limits_project", table_name="project_limits")
    op.drop_table("project_limits")
    op.drop_table("projects")
