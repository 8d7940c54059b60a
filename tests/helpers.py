"""Small helpers shared by tests: parties with funds, and a snapshot of every balance."""

from __future__ import annotations

from sqlalchemy import select

from hf_escrow.ledger import Ledger, audit
from hf_escrow.ledger.schema import accounts, entries, escrows


def parties(ledger: Ledger, *names: str, fund: str = "100") -> dict[str, dict]:
    """Register agents and deposit `fund` USDC to each; returns their registration dicts."""
    registered = {}
    for name in names:
        registered[name] = ledger.register(name)
        ledger.deposit(name, fund)
    return registered


def buyer_and_seller(db_url: str):
    """Clients of a registered "buyer" (faucet claimed) and "seller" on one embedded ledger."""
    import hf_escrow
    seller = hf_escrow.connect(agent="seller", database_url=db_url)
    seller.register()
    buyer = hf_escrow.connect(agent="buyer", database_url=db_url)
    buyer.register()
    buyer.claim_faucet()
    return buyer, seller


def snapshot(ledger: Ledger) -> dict:
    """Every stored balance, escrow row and journal size: equal before and after means nothing moved."""
    with ledger.engine.connect() as conn:
        return {
            "accounts": sorted(map(tuple, conn.execute(select(accounts.c.account_id, accounts.c.balance_micro)))),
            "escrows": sorted(map(tuple, conn.execute(select(escrows.c.escrow_id, escrows.c.status,
                                                             escrows.c.paid_micro, escrows.c.refunded_micro,
                                                             escrows.c.held_micro)))),
            "entries": conn.scalar(select(entries.c.entry_id).order_by(entries.c.entry_id.desc()).limit(1)),
        }


def assert_audit_clean(ledger: Ledger) -> dict:
    report = audit(ledger.engine)
    assert report["ok"], report["problems"]
    return report
