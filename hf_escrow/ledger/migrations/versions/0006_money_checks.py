"""The money columns' invariants as database checks, so no writer can break them.

Every check compares columns that one UPDATE writes together (the payout statement writes
paid, bonus, fees and referral at once), so none fails halfway through an operation.
PostgreSQL gets CHECK constraints. SQLite cannot add a CHECK to an existing table without
rebuilding it, and rebuilding `escrows` or `accounts` means dropping a table that others
reference, which its foreign keys refuse inside the migration's transaction; there each
check is a pair of triggers that abort the INSERT or UPDATE breaking it, with the same name.

Revision ID: 0006
Revises: 0005
"""

import re

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# (table, name, condition): also declared in `hf_escrow.ledger.schema`.
CHECKS = (
    ("escrows", "ck_escrows_split",
     "bonus_micro >= 0 AND bonus_micro <= paid_micro AND fees_micro >= 0 AND fees_micro <= paid_micro "
     "AND referral_micro >= 0 AND referral_micro <= fees_micro"),
    ("escrows", "ck_escrows_tokens_nonnegative", "tokens_in >= 0 AND tokens_out >= 0"),
    ("agent_keys", "ck_agent_keys_locked",
     "locked_micro >= 0 AND (max_escrow_micro IS NULL OR max_escrow_micro > 0)"),
)


def _triggers(name: str) -> tuple[str, str]:
    return f"{name}_insert", f"{name}_update"


def upgrade() -> None:
    sqlite = op.get_context().dialect.name == "sqlite"
    for table, name, condition in CHECKS:
        if not sqlite:
            op.create_check_constraint(name, table, condition)
            continue
        for trigger, event in zip(_triggers(name), ("INSERT", "UPDATE")):
            op.execute(f"CREATE TRIGGER {trigger} BEFORE {event} ON {table} FOR EACH ROW "
                       f"WHEN NOT ({_new(condition)}) "
                       f"BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: {name}'); END")


def downgrade() -> None:
    sqlite = op.get_context().dialect.name == "sqlite"
    for table, name, _ in reversed(CHECKS):
        if sqlite:
            for trigger in _triggers(name):
                op.execute(f"DROP TRIGGER IF EXISTS {trigger}")
        else:
            op.drop_constraint(name, table, type_="check")


def _new(condition: str) -> str:
    """The condition on the row being written: each column as `NEW.column`."""
    return re.sub(r"\b([a-z_]+_micro|tokens_in|tokens_out)\b", r"NEW.\1", condition)
