"""Re-derive every balance from the journal and check the ledger's invariants.

Read-only; safe on a live database. Each check is one aggregate query, so the audit
costs a few table scans whatever the size of the ledger.
"""

from __future__ import annotations

from sqlalchemy import Engine, case, func, literal, select

from .journal import MINT, PLATFORM
from .records import OPEN_STATUSES
from .schema import accounts, entries, escrows, holds

MAX_REPORTED = 20


def audit(engine: Engine) -> dict:
    """Totals and a list of problems (empty when the ledger is sound)."""
    with engine.connect().execution_options(readonly=True) as conn, conn.begin():
        problems: list[str] = []
        unbalanced = conn.execute(select(entries.c.tx_id, func.sum(entries.c.amount_micro))
                                  .group_by(entries.c.tx_id).having(func.sum(entries.c.amount_micro) != 0)
                                  .limit(MAX_REPORTED)).all()
        problems += [f"transaction {tx} sums to {total}, not 0" for tx, total in unbalanced]
        total = int(conn.scalar(select(func.coalesce(func.sum(entries.c.amount_micro), 0))))
        if total != 0:
            problems.append(f"all accounts sum to {total}, not 0")

        sums = select(entries.c.account_id, func.sum(entries.c.amount_micro).label("total")) \
            .group_by(entries.c.account_id).subquery()
        drift = conn.execute(
            select(accounts.c.account_id, accounts.c.balance_micro, sums.c.total)
            .select_from(accounts.outerjoin(sums, sums.c.account_id == accounts.c.account_id))
            .where(accounts.c.balance_micro.is_not(None),
                   accounts.c.balance_micro != func.coalesce(sums.c.total, 0)).limit(MAX_REPORTED)).all()
        problems += [f"{a} stores {b} but its entries sum to {t or 0}" for a, b, t in drift]
        negative = conn.execute(select(sums.c.account_id, sums.c.total)
                                .where(sums.c.total < 0, sums.c.account_id != MINT).limit(MAX_REPORTED)).all()
        problems += [f"{a} is negative: {t}" for a, t in negative]

        escrow_sums = select(
            entries.c.account_id,
            func.sum(case((entries.c.role == "payout", -entries.c.amount_micro), else_=0)).label("paid"),
            func.sum(case((entries.c.role == "refund", -entries.c.amount_micro), else_=0)).label("refunded"),
            func.sum(entries.c.amount_micro).label("remaining"),
        ).where(entries.c.account_id.like("escrow:%")).group_by(entries.c.account_id).subquery()
        hold_sums = select(holds.c.escrow_id,
                           func.sum(holds.c.amount_micro - holds.c.captured_micro).label("open_holds"),
                           ).where(holds.c.status == "open").group_by(holds.c.escrow_id).subquery()
        rows = conn.execute(select(escrows, escrow_sums.c.paid, escrow_sums.c.refunded, escrow_sums.c.remaining,
                                   hold_sums.c.open_holds)
                            .select_from(escrows.outerjoin(
                                escrow_sums, escrow_sums.c.account_id == literal("escrow:") + escrows.c.escrow_id)
                                .outerjoin(hold_sums, hold_sums.c.escrow_id == escrows.c.escrow_id)))
        for row in rows:
            problems += _escrow_problems(row)
            if len(problems) > MAX_REPORTED:
                break

        by_status = dict(conn.execute(select(escrows.c.status, func.count()).group_by(escrows.c.status)).all())
        return {
            "ok": not problems,
            "problems": problems[:MAX_REPORTED],
            "transactions": int(conn.scalar(select(func.count(func.distinct(entries.c.tx_id))))),
            "escrows": {status: int(count) for status, count in by_status.items()},
            "minted_micro": -_sum(conn, MINT),
            "platform_fees_micro": _sum(conn, PLATFORM),
            "agent_balances_micro": int(conn.scalar(select(func.coalesce(func.sum(accounts.c.balance_micro), 0))
                                                    .where(accounts.c.kind == "agent"))),
            "escrow_holdings_micro": int(conn.scalar(select(func.coalesce(func.sum(accounts.c.balance_micro), 0))
                                                     .where(accounts.c.kind == "escrow"))),
            "held_micro": int(conn.scalar(select(func.coalesce(func.sum(escrows.c.held_micro), 0)))),
        }


def _sum(conn, account_id: str) -> int:
    return int(conn.scalar(select(func.coalesce(func.sum(entries.c.amount_micro), 0))
                           .where(entries.c.account_id == account_id)))


def _escrow_problems(row) -> list[str]:
    # `balance` is what the journal leaves in the escrow's account: held + spendable.
    paid, refunded, balance = int(row.paid or 0), int(row.refunded or 0), int(row.remaining or 0)
    held, open_holds = int(row.held_micro), int(row.open_holds or 0)
    problems = []
    if (paid, refunded) != (row.paid_micro, row.refunded_micro):
        problems.append(f"escrow {row.escrow_id} records paid={row.paid_micro} refunded={row.refunded_micro} "
                        f"but its journal shows paid={paid} refunded={refunded}")
    if row.amount_micro != paid + refunded + balance:
        problems.append(f"escrow {row.escrow_id}: amount {row.amount_micro} != paid {paid} + refunded "
                        f"{refunded} + held and remaining {balance}")
    if held != open_holds:
        problems.append(f"escrow {row.escrow_id} records {held} held but its open holds reserve {open_holds}")
    if balance < held or (row.status not in OPEN_STATUSES and balance != held):
        problems.append(f"escrow {row.escrow_id} is {row.status} with {balance - held} spendable beside {held} held")
    return problems
