"""Statements built once: the settlement path runs them on every operation."""

from __future__ import annotations

from sqlalchemy import bindparam, insert, literal, select, update

from .schema import accounts, escrow_events, escrows, holds

# An escrow with its spendable remainder: the escrow account's balance less what open
# holds reserve.
ESCROW = (select(escrows, (accounts.c.balance_micro - escrows.c.held_micro).label("remaining_micro"))
          .join(accounts, accounts.c.account_id == literal("escrow:") + escrows.c.escrow_id)
          .where(escrows.c.escrow_id == bindparam("eid")))
ESCROW_FOR_UPDATE = ESCROW.with_for_update()
INSERT_EVENT = insert(escrow_events)
PAYOUT = (update(escrows).where(escrows.c.escrow_id == bindparam("eid")).values(
    paid_micro=escrows.c.paid_micro + bindparam("gross"), bonus_micro=escrows.c.bonus_micro + bindparam("bonus"),
    fees_micro=escrows.c.fees_micro + bindparam("fee"), referral_micro=escrows.c.referral_micro + bindparam("ref")))

# A hold with its escrow's status and spendable remainder.
HOLD = (select(holds, escrows.c.status.label("escrow_status"),
               (accounts.c.balance_micro - escrows.c.held_micro).label("escrow_remaining_micro"))
        .join(escrows, escrows.c.escrow_id == holds.c.escrow_id)
        .join(accounts, accounts.c.account_id == literal("escrow:") + escrows.c.escrow_id))
HOLD_BY_ID = HOLD.where(holds.c.hold_id == bindparam("hid"))
HOLD_ESCROW_ID = select(holds.c.escrow_id).where(holds.c.hold_id == bindparam("hid"))
HOLD_ROW_FOR_UPDATE = select(holds).where(holds.c.hold_id == bindparam("hid")).with_for_update()
HELD = (update(escrows).where(escrows.c.escrow_id == bindparam("eid"))
        .values(held_micro=escrows.c.held_micro + bindparam("delta")))
