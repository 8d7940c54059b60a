"""Ledger-wide totals for operators' metrics: a few aggregates, read-only, safe on a live database."""

from __future__ import annotations

from sqlalchemy import Engine, func, select, text

from .schema import escrows, holds


def ping(engine: Engine) -> None:
    """Raise unless the database answers a query."""
    with engine.connect().execution_options(readonly=True) as conn, conn.begin():
        conn.execute(text("SELECT 1"))


def totals(engine: Engine) -> dict:
    """Micro-USDC paid to sellers (gross), captured from holds, refunded, taken as fees and
    held now; open holds; escrows by status."""
    with engine.connect().execution_options(readonly=True) as conn, conn.begin():
        paid, refunded, fees, held = conn.execute(select(
            *(func.coalesce(func.sum(column), 0) for column in
              (escrows.c.paid_micro, escrows.c.refunded_micro, escrows.c.fees_micro, escrows.c.held_micro)))).one()
        captured, holds_open = conn.execute(select(
            func.coalesce(func.sum(holds.c.captured_micro), 0),
            func.count().filter(holds.c.status == "open"))).one()
        by_status = conn.execute(select(escrows.c.status, func.count()).group_by(escrows.c.status)).all()
    return {"paid_micro": int(paid), "captured_micro": int(captured), "refunded_micro": int(refunded),
            "fees_micro": int(fees), "held_micro": int(held), "holds_open": int(holds_open),
            "escrows": {status: int(count) for status, count in by_status}}
