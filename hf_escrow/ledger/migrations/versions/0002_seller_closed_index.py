"""Index escrows by seller and close time: the streak check reads a seller's last days only.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_escrows_seller_closed", "escrows", ["seller", "closed_at_ms"])


def downgrade() -> None:
    op.drop_index("ix_escrows_seller_closed", table_name="escrows")
