"""served models' capabilities and system fingerprint

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "served_models",
        sa.Column("capabilities", postgresql.JSONB(), server_default="[]", nullable=False),
    )
    op.add_column(
        "served_models", sa.Column("system_fingerprint", sa.String(length=64), nullable=True)
    )


def downgrade() -> None:
    op.drop_column("served_models", "system_fingerprint")
    op.drop_column("served_models", "capabilities")
