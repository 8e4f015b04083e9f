"""a batch's ended jobs counted on its row: completed, failed, and their usage"""

import sqlalchemy as sa
from alembic import op

revision, down_revision = "0008", "0007"
branch_labels = depends_on = None

COLUMNS = (
    ("completed", sa.Integer()),
    ("failed", sa.Integer()),
    ("prompt_tokens", sa.BigInteger()),
    ("completion_tokens", sa.BigInteger()),
)


def upgrade() -> None:
    for name, type_ in COLUMNS:
        op.add_column(
            "batches", sa.Column(name, type_, nullable=False, server_default=sa.text("0"))
        )
    # Batches that exist already: counted once from their jobs, as the API used to on each view.
    op.execute(
        """
        UPDATE batches SET
            completed = counts.completed,
            failed = counts.failed,
            prompt_tokens = counts.prompt_tokens,
            completion_tokens = counts.completion_tokens
        FROM (
            SELECT
                batch_id,
                count(*) FILTER (WHERE status = 'succeeded') AS completed,
                count(*) FILTER (WHERE status = 'failed') AS failed,
                coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
                coalesce(sum(completion_tokens), 0) AS completion_tokens
            FROM jobs
            WHERE batch_id IS NOT NULL
            GROUP BY batch_id
        ) AS counts
        WHERE batches.id = counts.batch_id
        """
    )


def downgrade() -> None:
    for name, _ in reversed(COLUMNS):
        op.drop_column("batches", name)
