"""Rows -> plain JSON-able dicts (amounts as integer micro-USDC), the ledger's wire shape.

Both clients build their `Escrow`/`Receipt` objects from these dicts, the embedded one
directly and the HTTP one after the server sends them, so that both return the same.
"""

from __future__ import annotations

from typing import Any

ESCROW_AMOUNTS = ("amount_micro", "paid_micro", "bonus_micro", "fees_micro", "referral_micro", "refunded_micro")
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
    }
    if events is not None:
        data["events"] = events
    assert_conserved(data)
    return data


def assert_conserved(escrow: dict) -> None:
    """The escrow invariant, checked wherever an escrow is read."""
    assert escrow["amount_micro"] == escrow["paid_micro"] + escrow["refunded_micro"] + escrow["remaining_micro"], escrow
    assert escrow["remaining_micro"] >= 0 and escrow["paid_micro"] >= 0 and escrow["refunded_micro"] >= 0, escrow
    assert escrow["status"] in OPEN_STATUSES or escrow["remaining_micro"] == 0, escrow


def event_dict(row: Any) -> dict:
    return {"kind": row.kind, "actor": row.actor, "at_ms": int(row.at_ms), "data": row.data or {}}


def receipt_dict(kind: str, escrow: dict, **amounts: Any) -> dict:
    """What one operation did to an escrow, with the escrow as it was left."""
    receipt = {"kind": kind, "escrow_id": escrow["id"], "status": escrow["status"],
               "remaining_micro": escrow["remaining_micro"], "escrow": escrow}
    receipt.update({key: value for key, value in amounts.items()})
    return receipt
