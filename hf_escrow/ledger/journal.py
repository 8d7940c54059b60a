"""The double-entry journal: every movement of money is one balanced transaction.

`post` and the settlement batch (`batch.py`) are the only writers of `entries` and of
`accounts.balance_micro`. Each checks that a transaction sums to zero, then applies each
stored balance change as one conditional UPDATE (so a debit can never overdraw, even
between processes), in account-id order (so two transactions touching the same accounts
never deadlock on PostgreSQL).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, bindparam, func, insert, select, update

from .._exceptions import InsufficientFunds
from .records import LedgerCorrupted
from .schema import accounts, entries, transactions

MINT = "system:mint"
PLATFORM = "system:platform"
SYSTEM_ACCOUNTS = (MINT, PLATFORM)
MAX_ENTRIES_PER_TX = 8

# Built once: the settlement path runs these on every deduct.
_APPLY = (update(accounts)
          .where(accounts.c.account_id == bindparam("aid"), accounts.c.balance_micro + bindparam("delta") >= 0)
          .values(balance_micro=accounts.c.balance_micro + bindparam("delta")))
_INSERT_TX = insert(transactions)
_INSERT_ENTRIES = insert(entries)


def agent_account(agent_id: str) -> str:
    return f"agent:{agent_id}"


def escrow_account(escrow_id: str) -> str:
    return f"escrow:{escrow_id}"


@dataclass(frozen=True)
class Leg:
    """One side of a transaction: `amount_micro` > 0 credits the account, < 0 debits it."""

    account_id: str
    role: str
    amount_micro: int


def ensure_system_accounts(conn: Connection) -> None:
    existing = set(conn.scalars(select(accounts.c.account_id).where(accounts.c.account_id.in_(SYSTEM_ACCOUNTS))))
    for account_id in SYSTEM_ACCOUNTS:
        if account_id not in existing:
            conn.execute(insert(accounts).values(account_id=account_id, kind="system", balance_micro=None))


def open_account(conn: Connection, account_id: str, kind: str) -> None:
    if kind not in ("agent", "escrow"):
        raise LedgerCorrupted(f"account {account_id} of unknown kind {kind!r}")
    conn.execute(insert(accounts).values(account_id=account_id, kind=kind, balance_micro=0))


def post(conn: Connection, kind: str, legs: list[Leg], *, at_ms: int, escrow_id: str | None = None,
         agent_id: str | None = None) -> int:
    """Write one balanced transaction; raises InsufficientFunds (nothing written) on overdraw.

    The caller's database transaction makes the whole call atomic: on an exception it
    rolls back, so a partially applied transfer never survives.
    """
    legs = [leg for leg in legs if leg.amount_micro != 0]
    if not 2 <= len(legs) <= MAX_ENTRIES_PER_TX or sum(leg.amount_micro for leg in legs) != 0:
        raise LedgerCorrupted(f"unbalanced transaction {kind}: {legs}")  # raised: survives python -O
    for leg in sorted(legs, key=lambda leg: leg.account_id):
        if leg.account_id not in SYSTEM_ACCOUNTS:
            _apply(conn, leg)
    tx_id = conn.execute(
        _INSERT_TX, {"kind": kind, "escrow_id": escrow_id, "agent_id": agent_id, "at_ms": at_ms}
    ).inserted_primary_key[0]
    conn.execute(_INSERT_ENTRIES, [
        {"tx_id": tx_id, "account_id": leg.account_id, "role": leg.role, "amount_micro": leg.amount_micro}
        for leg in legs
    ])
    return tx_id


def _apply(conn: Connection, leg: Leg) -> None:
    result = conn.execute(_APPLY, {"aid": leg.account_id, "delta": leg.amount_micro})
    if result.rowcount != 1:
        raise InsufficientFunds(
            f"{leg.account_id} cannot cover {-leg.amount_micro} micro-USDC",
            details={"account": leg.account_id, "needed_micro": -leg.amount_micro},
        )


def balance_micro(conn: Connection, account_id: str) -> int:
    """The balance of one account, read where it is kept (stored, or summed for system)."""
    if account_id in SYSTEM_ACCOUNTS:
        total = conn.scalar(select(func.coalesce(func.sum(entries.c.amount_micro), 0))
                            .where(entries.c.account_id == account_id))
        return int(total)
    stored = conn.scalar(select(accounts.c.balance_micro).where(accounts.c.account_id == account_id))
    if stored is not None and stored < 0:
        raise LedgerCorrupted(f"account {account_id} holds a negative balance: {stored} micro-USDC")
    return int(stored or 0)
