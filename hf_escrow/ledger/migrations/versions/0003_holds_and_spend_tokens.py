"""Holds (reservations of an escrow's remainder) and spend tokens.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_context().dialect.name == "sqlite":
        # SQLite adds a column with its CHECK in place; a batch rebuild of `escrows` would
        # have to drop a table that events, holds and tokens reference.
        op.execute("ALTER TABLE escrows ADD COLUMN held_micro BIGINT NOT NULL DEFAULT 0 "
                   "CONSTRAINT ck_escrows_held_nonnegative CHECK (held_micro >= 0)")
    else:
        op.add_column("escrows", sa.Column("held_micro", sa.BigInteger(), nullable=False, server_default="0"))
        op.create_check_constraint("ck_escrows_held_nonnegative", "escrows", "held_micro >= 0")
    op.create_table(
        "holds",
        sa.Column("hold_id", sa.String(40), primary_key=True),
        sa.Column("escrow_id", sa.String(40), sa.ForeignKey("escrows.escrow_id"), nullable=False),
        sa.Column("holder", sa.String(64), sa.ForeignKey("agents.agent_id"), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("amount_micro", sa.BigInteger(), nullable=False),
        sa.Column("captured_micro", sa.BigInteger(), nullable=False),
        sa.Column("captures", sa.Integer(), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("expires_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("closed_at_ms", sa.BigInteger(), nullable=True),
        sa.CheckConstraint("amount_micro > 0 AND captured_micro >= 0 AND captured_micro <= amount_micro",
                           name="ck_holds_captured_within"),
    )
    op.create_index("ix_holds_escrow", "holds", ["escrow_id", "status"])
    op.create_index("ix_holds_due", "holds", ["status", "expires_at_ms"])
    op.create_table(
        "spend_tokens",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("escrow_id", sa.String(40), sa.ForeignKey("escrows.escrow_id"), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("revoked_at_ms", sa.BigInteger(), nullable=True),
    )
    op.create_index("ix_spend_tokens_escrow", "spend_tokens", ["escrow_id"])


def downgrade() -> None:
    op.drop_index("ix_spend_tokens_escrow", table_name="spend_tokens")
    op.drop_table("spend_tokens")
    op.drop_index("ix_holds_due", table_name="holds")
    op.drop_index("ix_holds_escrow", table_name="holds")
    op.drop_table("holds")
    with op.batch_alter_table("escrows") as batch:
        batch.drop_column("held_micro")
