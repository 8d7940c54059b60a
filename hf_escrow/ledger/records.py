"""Rows -> plain JSON-able dicts (amounts as integer micro-USDC), the ledger's wire shape.

Both clients build their `Escrow`/`Receipt` objects from these dicts, the embedded one
directly and the HTTP one after the server sends them, so that both return the same.
"""

from __future__ import annotations

from typing import Any

from ..money import milestone_amounts

ESCROW_AMOUNTS = ("amount_micro", "paid_micro", "bonus_micro", "fees_micro", "referral_micro", "refunded_micro",
                  "held_micro")
OPEN_STATUSES = ("active", "awaiting_verification")


def escrow_dict(row: Any, remaining_micro: int, events: list[dict] | None = None) -> dict:
    data = {
        "id": row.escrow_id, "buyer": row.buyer, "seller": row.seller, "status": row.status,
        "verifier": row.verifier, "referrer": row.referrer,
        **{name: int(getattr(row, name)) for name in ESCROW_AMOUNTS},
        "remaining_micro": remaining_micro,
        "tokens_in": int(row.tokens_in), "tokens_out": int(row.tokens_out),
        "model": row.model, "description": row.description, "meta": row.meta,
        "release_condition": row.release_condition, "bonus_conditions": row.bonus_conditions,
        "pricing": row.pricing, "result": row.result,
        "created_at_ms": int(row.created_at_ms), "expires_at_ms": int(row.expires_at_ms),
        "closed_at_ms": None if row.closed_at_ms is None else int(row.closed_at_ms),
        "key_id": row.key_id,
    }
    if events is not None:
        data["events"] = events
    if (row.release_condition or {}).get("type") == "milestones":
        data["milestones"] = milestones_view(row.release_condition, row.result, int(row.amount_micro))
    assert_conserved(data)
    return data


def milestones_view(condition: dict, result: dict | None, amount_micro: int) -> list[dict]:
    """Each milestone of a milestone escrow: its threshold and share, and how far it got."""
    plan = condition["milestones"]
    progress = milestone_progress(result, len(plan))
    amounts = milestone_amounts(amount_micro, [m["share_bps"] for m in plan])
    return [{"number": number, "threshold": m["threshold"], "share_bps": m["share_bps"], "rest": m["rest"],
             "amount_micro": amount, **state}
            for number, (m, amount, state) in enumerate(zip(plan, amounts, progress), 1)]


def milestone_progress(result: dict | None, count: int) -> list[dict]:
    """The stored progress of each milestone (kept in the escrow's `result`), fresh when none."""
    stored = (result or {}).get("milestones")
    if stored is None:
        return [{"status": "open", "paid_micro": 0, "failures": 0, "verified_score": None, "sha256": None}
                for _ in range(count)]
    if len(stored) != count:
        raise LedgerCorrupted(f"milestone progress {stored} does not match {count} milestones")
    return [dict(state) for state in stored]


def assert_conserved(escrow: dict) -> None:
    """The escrow invariant, checked wherever an escrow is read (raised, so `python -O` keeps it)."""
    amount, paid, refunded = escrow["amount_micro"], escrow["paid_micro"], escrow["refunded_micro"]
    held, remaining = escrow["held_micro"], escrow["remaining_micro"]
    if amount != paid + refunded + held + remaining or min(paid, refunded, held, remaining) < 0 \
            or (escrow["status"] not in OPEN_STATUSES and remaining != 0):
        raise LedgerCorrupted(f"escrow {escrow['id']} breaks amount == paid + refunded + held + remaining: {escrow}")


class LedgerCorrupted(AssertionError):
    """A stored invariant does not hold: never caught, never a client's fault."""


def hold_dict(row: Any) -> dict:
    """A hold with its escrow's status and spendable remainder (`row` from the ledger's hold query)."""
    is_open = row.status == "open"
    data = {"id": row.hold_id, "escrow_id": row.escrow_id, "holder": row.holder, "status": row.status,
            "amount_micro": int(row.amount_micro), "captured_micro": int(row.captured_micro),
            "open_micro": int(row.amount_micro - row.captured_micro) if is_open else 0,
            "captures": int(row.captures), "created_at_ms": int(row.created_at_ms),
            "expires_at_ms": int(row.expires_at_ms),
            "closed_at_ms": None if row.closed_at_ms is None else int(row.closed_at_ms),
            "escrow_status": row.escrow_status, "escrow_remaining_micro": int(row.escrow_remaining_micro)}
    if not 0 <= data["captured_micro"] <= data["amount_micro"] or is_open != (data["closed_at_ms"] is None):
        raise LedgerCorrupted(f"hold {row.hold_id} is inconsistent: {data}")
    return data


def event_dict(row: Any) -> dict:
    return {"kind": row.kind, "actor": row.actor, "at_ms": int(row.at_ms), "data": row.data or {}}


def receipt_dict(kind: str, escrow: dict, **amounts: Any) -> dict:
    """What one operation did to an escrow, with the escrow as it was left."""
    receipt = {"kind": kind, "escrow_id": escrow["id"], "status": escrow["status"],
               "remaining_micro": escrow["remaining_micro"], "escrow": escrow}
    receipt.update({key: value for key, value in amounts.items()})
    return receipt


def split_data(split: Any) -> dict:
    """A payout's split as receipt fields (all zero when nothing was paid)."""
    if split is None:
        return {"gross_micro": 0, "net_micro": 0, "fee_micro": 0, "referral_micro": 0}
    return {"gross_micro": split.gross_micro, "net_micro": split.net_micro, "fee_micro": split.fee_micro,
            "referral_micro": split.referral_micro}
