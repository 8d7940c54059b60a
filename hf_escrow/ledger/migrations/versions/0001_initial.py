"""The initial ledger: agents, accounts, journal, escrows, events, idempotency keys.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "agents",
        sa.Column("agent_id", sa.String(64), primary_key=True),
        sa.Column("api_key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("wallet", sa.String(42), nullable=False, unique=True),
        sa.Column("referral_code", sa.String(32), nullable=False, unique=True),
        sa.Column("referred_by", sa.String(64), sa.ForeignKey("agents.agent_id"), nullable=True),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "accounts",
        sa.Column("account_id", sa.String(80), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("balance_micro", sa.BigInteger, nullable=True),
        sa.CheckConstraint("balance_micro IS NULL OR balance_micro >= 0", name="ck_accounts_nonnegative"),
    )
    op.create_table(
        "transactions",
        sa.Column("tx_id", _ID, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(24), nullable=False),
        sa.Column("escrow_id", sa.String(40), nullable=True),
        sa.Column("agent_id", sa.String(64), nullable=True),
        sa.Column("at_ms", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_transactions_escrow", "transactions", ["escrow_id"])
    op.create_index("ix_transactions_agent_kind", "transactions", ["agent_id", "kind", "at_ms"])
    op.create_table(
        "entries",
        sa.Column("entry_id", _ID, primary_key=True, autoincrement=True),
        sa.Column("tx_id", _ID, sa.ForeignKey("transactions.tx_id"), nullable=False),
        sa.Column("account_id", sa.String(80), sa.ForeignKey("accounts.account_id"), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("amount_micro", sa.BigInteger, nullable=False),
        sa.CheckConstraint("amount_micro <> 0", name="ck_entries_nonzero"),
    )
    op.create_index("ix_entries_account", "entries", ["account_id"])
    op.create_index("ix_entries_tx", "entries", ["tx_id"])
    op.create_table(
        "escrows",
        sa.Column("escrow_id", sa.String(40), primary_key=True),
        sa.Column("buyer", sa.String(64), sa.ForeignKey("agents.agent_id"), nullable=False),
        sa.Column("seller", sa.String(64), sa.ForeignKey("agents.agent_id"), nullable=False),
        sa.Column("verifier", sa.String(64), nullable=True),
        sa.Column("referrer", sa.String(64), sa.ForeignKey("agents.agent_id"), nullable=True),
        sa.Column("status", sa.String(24), nullable=False),
        sa.Column("amount_micro", sa.BigInteger, nullable=False),
        sa.Column("paid_micro", sa.BigInteger, nullable=False),
        sa.Column("bonus_micro", sa.BigInteger, nullable=False),
        sa.Column("fees_micro", sa.BigInteger, nullable=False),
        sa.Column("referral_micro", sa.BigInteger, nullable=False),
        sa.Column("refunded_micro", sa.BigInteger, nullable=False),
        sa.Column("tokens_in", sa.BigInteger, nullable=False),
        sa.Column("tokens_out", sa.BigInteger, nullable=False),
        sa.Column("model", sa.String(200), nullable=True),
        sa.Column("description", sa.Text, nullable=True),
        sa.Column("meta", sa.JSON, nullable=True),
        sa.Column("release_condition", sa.JSON, nullable=True),
        sa.Column("bonus_conditions", sa.JSON, nullable=True),
        sa.Column("pricing", sa.JSON, nullable=True),
        sa.Column("result", sa.JSON, nullable=True),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
        sa.Column("expires_at_ms", sa.BigInteger, nullable=False),
        sa.Column("closed_at_ms", sa.BigInteger, nullable=True),
        sa.CheckConstraint("amount_micro > 0", name="ck_escrows_amount_positive"),
        sa.CheckConstraint(
            "paid_micro >= 0 AND refunded_micro >= 0 AND paid_micro + refunded_micro <= amount_micro",
            name="ck_escrows_conservation",
        ),
    )
    op.create_index("ix_escrows_buyer", "escrows", ["buyer", "created_at_ms"])
    op.create_index("ix_escrows_seller", "escrows", ["seller", "created_at_ms"])
    op.create_index("ix_escrows_due", "escrows", ["status", "expires_at_ms"])
    op.create_table(
        "escrow_events",
        sa.Column("event_id", _ID, primary_key=True, autoincrement=True),
        sa.Column("escrow_id", sa.String(40), sa.ForeignKey("escrows.escrow_id"), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(64), nullable=True),
        sa.Column("at_ms", sa.BigInteger, nullable=False),
        sa.Column("data", sa.JSON, nullable=True),
    )
    op.create_index("ix_escrow_events_escrow", "escrow_events", ["escrow_id", "event_id"])
    op.create_table(
        "idempotency_keys",
        sa.Column("agent_id", sa.String(64), nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("response", sa.JSON, nullable=False),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("agent_id", "key"),
    )
    op.create_index("ix_idempotency_created", "idempotency_keys", ["created_at_ms"])


def downgrade() -> None:
    for table in ("idempotency_keys", "escrow_events", "escrows", "entries", "transactions",
                  "accounts", "agents"):
        op.drop_table(table)
