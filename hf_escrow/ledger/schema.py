"""The ledger's tables (SQLAlchemy Core). Alembic migrations create and change them.

Money lives in two places that must always agree: the append-only journal
(`transactions` + `entries`, every transaction summing to zero) and the running
`accounts.balance_micro` kept for agents and escrow holdings so that a debit can be
checked and applied in one conditional UPDATE. System accounts (the mint, the platform's
fees) have no stored balance: they would be one hot row under every settlement; their
balance is the sum of their entries.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON, BigInteger, CheckConstraint, Column, ForeignKey, Index, Integer, MetaData,
    PrimaryKeyConstraint, String, Table, Text,
)

metadata = MetaData()

# Integer primary keys that autoincrement on both SQLite and PostgreSQL.
_ID = BigInteger().with_variant(Integer(), "sqlite")

agents = Table(
    "agents", metadata,
    Column("agent_id", String(64), primary_key=True),
    Column("api_key_hash", String(64), nullable=False, unique=True),
    Column("wallet", String(42), nullable=False, unique=True),
    Column("referral_code", String(32), nullable=False, unique=True),
    Column("referred_by", String(64), ForeignKey("agents.agent_id"), nullable=True),
    Column("created_at_ms", BigInteger, nullable=False),
    # The agent that registered this one with its own key (an orchestrator's workers):
    # it may claim the faucet for it.
    Column("owner", String(64), nullable=True),
)

accounts = Table(
    "accounts", metadata,
    Column("account_id", String(80), primary_key=True),
    Column("kind", String(16), nullable=False),  # agent | escrow | system
    Column("balance_micro", BigInteger, nullable=True),  # NULL for system accounts
    CheckConstraint("balance_micro IS NULL OR balance_micro >= 0", name="ck_accounts_nonnegative"),
)

transactions = Table(
    "transactions", metadata,
    Column("tx_id", _ID, primary_key=True, autoincrement=True),
    Column("kind", String(24), nullable=False),
    Column("escrow_id", String(40), nullable=True),
    Column("agent_id", String(64), nullable=True),
    Column("at_ms", BigInteger, nullable=False),
    Index("ix_transactions_escrow", "escrow_id"),
    Index("ix_transactions_agent_kind", "agent_id", "kind", "at_ms"),
)

entries = Table(
    "entries", metadata,
    Column("entry_id", _ID, primary_key=True, autoincrement=True),
    Column("tx_id", _ID, ForeignKey("transactions.tx_id"), nullable=False),
    Column("account_id", String(80), ForeignKey("accounts.account_id"), nullable=False),
    Column("role", String(16), nullable=False),
    Column("amount_micro", BigInteger, nullable=False),
    CheckConstraint("amount_micro <> 0", name="ck_entries_nonzero"),
    Index("ix_entries_account", "account_id"),
    Index("ix_entries_tx", "tx_id"),
)

escrows = Table(
    "escrows", metadata,
    Column("escrow_id", String(40), primary_key=True),
    Column("buyer", String(64), ForeignKey("agents.agent_id"), nullable=False),
    Column("seller", String(64), ForeignKey("agents.agent_id"), nullable=False),
    Column("verifier", String(64), nullable=True),
    Column("referrer", String(64), ForeignKey("agents.agent_id"), nullable=True),
    Column("status", String(24), nullable=False),
    Column("amount_micro", BigInteger, nullable=False),
    Column("paid_micro", BigInteger, nullable=False, default=0),
    Column("bonus_micro", BigInteger, nullable=False, default=0),
    Column("fees_micro", BigInteger, nullable=False, default=0),
    Column("referral_micro", BigInteger, nullable=False, default=0),
    Column("refunded_micro", BigInteger, nullable=False, default=0),
    Column("held_micro", BigInteger, nullable=False, default=0, server_default="0"),
    Column("tokens_in", BigInteger, nullable=False, default=0),
    Column("tokens_out", BigInteger, nullable=False, default=0),
    Column("model", String(200), nullable=True),
    Column("description", Text, nullable=True),
    Column("meta", JSON, nullable=True),
    Column("release_condition", JSON, nullable=True),
    Column("bonus_conditions", JSON, nullable=True),
    Column("pricing", JSON, nullable=True),
    Column("result", JSON, nullable=True),
    Column("created_at_ms", BigInteger, nullable=False),
    Column("expires_at_ms", BigInteger, nullable=False),
    Column("closed_at_ms", BigInteger, nullable=True),
    # The budgeted key that opened it (its buyer of record is the key's owner), if any.
    Column("key_id", String(24), nullable=True),
    CheckConstraint("amount_micro > 0", name="ck_escrows_amount_positive"),
    CheckConstraint(
        "paid_micro >= 0 AND refunded_micro >= 0 AND paid_micro + refunded_micro <= amount_micro",
        name="ck_escrows_conservation",
    ),
    CheckConstraint("held_micro >= 0", name="ck_escrows_held_nonnegative"),
    # 0006: on SQLite these two are triggers of the same name (see that migration).
    CheckConstraint("bonus_micro >= 0 AND bonus_micro <= paid_micro AND fees_micro >= 0 AND fees_micro <= paid_micro "
                    "AND referral_micro >= 0 AND referral_micro <= fees_micro", name="ck_escrows_split"),
    CheckConstraint("tokens_in >= 0 AND tokens_out >= 0", name="ck_escrows_tokens_nonnegative"),
    Index("ix_escrows_buyer", "buyer", "created_at_ms"),
    Index("ix_escrows_seller", "seller", "created_at_ms"),
    Index("ix_escrows_seller_closed", "seller", "closed_at_ms"),
    Index("ix_escrows_due", "status", "expires_at_ms"),
    Index("ix_escrows_key", "key_id", "created_at_ms"),
)

escrow_events = Table(
    "escrow_events", metadata,
    Column("event_id", _ID, primary_key=True, autoincrement=True),
    Column("escrow_id", String(40), ForeignKey("escrows.escrow_id"), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("actor", String(64), nullable=True),
    Column("at_ms", BigInteger, nullable=False),
    Column("data", JSON, nullable=True),
    Index("ix_escrow_events_escrow", "escrow_id", "event_id"),
)

# A hold reserves part of an escrow's remainder for one piece of work. The money stays in
# the escrow's account (no journal movement): `escrows.held_micro` is the sum of the open
# holds' `amount_micro - captured_micro`, and spendable remainder = balance - held.
holds = Table(
    "holds", metadata,
    Column("hold_id", String(40), primary_key=True),
    Column("escrow_id", String(40), ForeignKey("escrows.escrow_id"), nullable=False),
    Column("holder", String(64), ForeignKey("agents.agent_id"), nullable=False),
    Column("status", String(16), nullable=False),  # open | captured | voided | expired
    Column("amount_micro", BigInteger, nullable=False),
    Column("captured_micro", BigInteger, nullable=False),
    Column("captures", Integer, nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
    Column("expires_at_ms", BigInteger, nullable=False),
    Column("closed_at_ms", BigInteger, nullable=True),
    CheckConstraint("amount_micro > 0 AND captured_micro >= 0 AND captured_micro <= amount_micro",
                    name="ck_holds_captured_within"),
    Index("ix_holds_escrow", "escrow_id", "status"),
    Index("ix_holds_due", "status", "expires_at_ms"),
)

# Spend tokens: bearer secrets a buyer hands to a seller's face, stored as SHA-256 only.
spend_tokens = Table(
    "spend_tokens", metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("escrow_id", String(40), ForeignKey("escrows.escrow_id"), nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
    Column("revoked_at_ms", BigInteger, nullable=True),
    Index("ix_spend_tokens_escrow", "escrow_id"),
)

# Budgeted keys: API keys an agent mints for sub-agents, spending the agent's own money
# within a mandate (see `hf_escrow.ledger.keys`). Stored as SHA-256 only. `locked_micro`
# counts what the key's escrows locked over its life, `refunded_micro` what came back of
# it: the budget check reads one row.
agent_keys = Table(
    "agent_keys", metadata,
    Column("key_id", String(24), primary_key=True),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("owner", String(64), ForeignKey("agents.agent_id"), nullable=False),
    Column("label", String(200), nullable=True),
    Column("budget_micro", BigInteger, nullable=False),
    Column("max_escrow_micro", BigInteger, nullable=True),
    Column("sellers", JSON, nullable=True),  # agent ids; NULL: any seller
    Column("locked_micro", BigInteger, nullable=False),
    Column("refunded_micro", BigInteger, nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
    Column("expires_at_ms", BigInteger, nullable=True),
    Column("revoked_at_ms", BigInteger, nullable=True),
    CheckConstraint("budget_micro > 0 AND refunded_micro >= 0 AND refunded_micro <= locked_micro",
                    name="ck_agent_keys_amounts"),
    CheckConstraint("locked_micro >= 0 AND (max_escrow_micro IS NULL OR max_escrow_micro > 0)",
                    name="ck_agent_keys_locked"),   # 0006: a trigger on SQLite
    Index("ix_agent_keys_owner", "owner", "created_at_ms"),
)

idempotency_keys = Table(
    "idempotency_keys", metadata,
    Column("agent_id", String(64), nullable=False),
    Column("key", String(255), nullable=False),
    Column("request_hash", String(64), nullable=False),
    Column("response", JSON, nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
    PrimaryKeyConstraint("agent_id", "key"),
    Index("ix_idempotency_created", "created_at_ms"),
)
