"""served models' capabilities and system fingerprint"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision, down_revision = "0002", "0001"
branch_labels = depends_on = None


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
