"""served models' context length, for the most output a request may ask for

Revision ID: 0009
Revises: 0008
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("served_models", sa.Column("max_model_len", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("served_models", "max_model_len")
