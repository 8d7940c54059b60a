"""The JSON the server sends: the ledger's exact integer `*_micro` fields, each with a
`*_usdc` number beside it for people and for the seed snippets (amounts stay within 15
significant digits, so these numbers are exact too)."""

from __future__ import annotations

from typing import Any

from ..money import usdc_number


def with_usdc(data: Any) -> Any:
    """Add `x_usdc` next to every `x_micro` integer, recursively."""
    if isinstance(data, list):
        return [with_usdc(item) for item in data]
    if not isinstance(data, dict):
        return data
    out = {}
    for key, value in data.items():
        out[key] = with_usdc(value)
        if key.endswith("_micro") and isinstance(value, int) and not isinstance(value, bool):
            out[key.removesuffix("_micro") + "_usdc"] = usdc_number(value)
    return out


def escrow_view(escrow: dict) -> dict:
    """An escrow as both seed dialects read it (`id` and `escrow_id`, `amount_usdc`, ...)."""
    view = with_usdc(escrow)
    view["escrow_id"] = escrow["id"]
    view["seller_id"] = escrow["seller"]
    return view


def receipt_view(receipt: dict) -> dict:
    """A receipt, with the seeds' names for what was paid (`amount_paid`, `payout_usdc`)."""
    view = with_usdc({k: v for k, v in receipt.items() if k != "escrow"})
    view["escrow"] = escrow_view(receipt["escrow"])
    view["id"] = receipt["escrow_id"]
    view["amount_paid"] = view["gross_usdc"]
    view["payout_usdc"] = view["gross_usdc"] if receipt.get("passed", receipt["gross_micro"] > 0) else None
    return view
