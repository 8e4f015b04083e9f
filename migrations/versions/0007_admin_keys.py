"""admin keys: they see the whole fleet on the dashboard

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Every existing key becomes an ordinary one: fleet-wide views need a key made with --admin.
    op.add_column(
        "api_keys",
        sa.Column("admin", sa.Boolean(), server_default=sa.false(), nullable=False),
    )


def downgrade() -> None:
    op.drop_column("api_keys", "admin")
