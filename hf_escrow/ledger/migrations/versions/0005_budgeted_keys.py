"""Budgeted keys: API keys an agent mints for sub-agents, limited by a mandate.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "agent_keys",
        sa.Column("key_id", sa.String(24), primary_key=True),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("owner", sa.String(64), sa.ForeignKey("agents.agent_id"), nullable=False),
        sa.Column("label", sa.String(200), nullable=True),
        sa.Column("budget_micro", sa.BigInteger(), nullable=False),
        sa.Column("max_escrow_micro", sa.BigInteger(), nullable=True),
        sa.Column("sellers", sa.JSON(), nullable=True),
        sa.Column("locked_micro", sa.BigInteger(), nullable=False),
        sa.Column("refunded_micro", sa.BigInteger(), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("expires_at_ms", sa.BigInteger(), nullable=True),
        sa.Column("revoked_at_ms", sa.BigInteger(), nullable=True),
        sa.CheckConstraint("budget_micro > 0 AND refunded_micro >= 0 AND refunded_micro <= locked_micro",
                           name="ck_agent_keys_amounts"),
    )
    op.create_index("ix_agent_keys_owner", "agent_keys", ["owner", "created_at_ms"])
    # A plain nullable column: SQLite adds it in place, no rebuild of `escrows`.
    op.add_column("escrows", sa.Column("key_id", sa.String(24), nullable=True))
    op.create_index("ix_escrows_key", "escrows", ["key_id", "created_at_ms"])


def downgrade() -> None:
    op.drop_index("ix_escrows_key", table_name="escrows")
    if op.get_context().dialect.name == "sqlite":
        # In place (SQLite 3.35+): a batch rebuild would drop a table that others reference.
        op.execute("ALTER TABLE escrows DROP COLUMN key_id")
    else:
        op.drop_column("escrows", "key_id")
    op.drop_index("ix_agent_keys_owner", table_name="agent_keys")
    op.drop_table("agent_keys")
