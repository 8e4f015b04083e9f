"""served models' context length, for the most output a request may ask for"""

import sqlalchemy as sa
from alembic import op

revision, down_revision = "0009", "0008"
branch_labels = depends_on = None


def upgrade() -> None:
    op.add_column("served_models", sa.Column("max_model_len", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("served_models", "max_model_len")
