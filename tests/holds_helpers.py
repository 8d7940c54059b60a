"""Helpers for the hold tests: a snapshot that sees reservations, and every stored cell as text."""

from __future__ import annotations

import json

from sqlalchemy import Engine, MetaData, select

from hf_escrow.ledger import Ledger
from hf_escrow.ledger.schema import escrows, holds, spend_tokens

from .helpers import snapshot


def hold_snapshot(ledger: Ledger) -> dict:
    """`helpers.snapshot` plus what only reserves money: held amounts, hold rows, token revocations.

    A hold moves no journal entry, so the plain snapshot cannot tell that a refused hold
    reserved nothing; this one can.
    """
    with ledger.engine.connect() as conn:
        held = sorted(map(tuple, conn.execute(select(escrows.c.escrow_id, escrows.c.held_micro))))
        rows = sorted(map(tuple, conn.execute(select(
            holds.c.hold_id, holds.c.status, holds.c.amount_micro, holds.c.captured_micro, holds.c.captures,
            holds.c.expires_at_ms, holds.c.closed_at_ms))))
        tokens = sorted(map(tuple, conn.execute(select(spend_tokens.c.token_hash, spend_tokens.c.revoked_at_ms))))
    return {**snapshot(ledger), "held": held, "holds": rows, "tokens": tokens}


def stored_text(engine: Engine) -> dict[str, str]:
    """Every row of every table in the database (reflected, so a new table is searched too), as text."""
    meta = MetaData()
    meta.reflect(engine)
    with engine.connect() as conn:
        return {table.name: "\n".join(json.dumps(list(row), default=str) for row in conn.execute(select(table)))
                for table in meta.sorted_tables}
