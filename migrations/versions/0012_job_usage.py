"""jobs' cached prompt tokens beside their other usage, and an index for the Usage API"""

import sqlalchemy as sa
from alembic import op

revision, down_revision = "0012", "0011"
branch_labels = depends_on = None

INCLUDED = [
    "model",
    "api_key_id",
    "batch_id",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
]


def upgrade() -> None:
    op.add_column("jobs", sa.Column("cached_tokens", sa.Integer(), nullable=True))
    # Jobs that ended before this revision: from their response, while it is still there (a
    # purged job keeps its prompt and completion tokens; its cached ones are unknown, counted 0).
    op.execute(
        """
        UPDATE jobs SET
            cached_tokens = (response #>> '{usage,prompt_tokens_details,cached_tokens}')::integer,
            prompt_tokens = coalesce(
                prompt_tokens, (response #>> '{usage,prompt_tokens}')::integer
            ),
            completion_tokens = coalesce(
                completion_tokens, (response #>> '{usage,completion_tokens}')::integer
            ),
            total_tokens = coalesce(total_tokens, (response #>> '{usage,total_tokens}')::integer)
        WHERE status = 'succeeded' AND response -> 'usage' IS NOT NULL
        """
    )
    op.create_index(
        "ix_jobs_usage_project_finished_at",
        "jobs",
        ["project", "finished_at"],
        postgresql_include=INCLUDED,
        postgresql_where=sa.text("status = 'succeeded'"),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_usage_project_finished_at", table_name="jobs")
    op.drop_column("jobs", "cached_tokens")
