"""admin keys: they see the whole fleet on the dashboard"""

import sqlalchemy as sa
from alembic import op

revision, down_revision = "0007", "0006"
branch_labels = depends_on = None


def upgrade() -> None:
    # Every existing key becomes an ordinary one: fleet-wide views need a key made with --admin.
    op.add_column(
        "api_keys",
        sa.Column("admin", sa.Boolean(), server_default=sa.false(), nullable=False),
    )


def downgrade() -> None:
    op.drop_column("api_keys", "admin")
