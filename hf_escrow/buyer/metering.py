"""The buyer-side meter: what a call may cost at worst, and what each call cost.

Pure bookkeeping, shared by the sync and async paid clients; the escrow calls themselves
happen in `hf_escrow.buyer.inference`. The reservation itself is a ledger hold on the escrow,
so that every process sharing the escrow sees it: no count in one process's memory.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from decimal import Decimal

from .._exceptions import InsufficientFunds, ValidationError
from ..money import format_usdc
from ..pricing import STREAK_BONUS_PCT, with_headroom_micro
from ..pricing import Pricing

MAX_RECEIPTS = 10_000          # the receipt log keeps the newest calls only


@dataclass(frozen=True)
class CallReceipt:
    """What one paid call cost: tokens or units, the money, and how the count was made."""

    escrow_id: str
    task: str
    tokens_in: int
    tokens_out: int
    units: int
    gross: Decimal
    fee: Decimal
    net: Decimal
    latency_ms: float
    billing_ms: float
    counted_by: str      # "usage" (server), "tokenizer", "chunks", "bytes" (an upper bound) or "units"
    pricing: dict = field(default_factory=dict)
    bonus: Decimal = Decimal("0.000000")   # the part of `gross` the ledger added as bonus (e.g. a streak)


class Meter:
    """Prices, the remainder the ledger last reported, and receipts for one escrow (thread-safe)."""

    def __init__(self, escrow_id: str, pricing: Pricing, remaining: Decimal):
        self.escrow_id = escrow_id
        self.pricing = pricing
        self.remaining = remaining
        self._lock = threading.Lock()
        self.receipts: list[CallReceipt] = []

    def worst_chat_micro(self, prompt_tokens: int, max_tokens: int) -> int:
        return self.pricing.tokens_micro(prompt_tokens, max_tokens)

    def unit_micro(self, task: str, unit: str, count: int) -> int:
        if getattr(self.pricing, unit) is None:
            raise ValidationError(f"{task} is priced {unit.replace('_', ' ')}, and this price sheet sets no {unit}: "
                                  "it is not for sale (add it to pricing)")
        return self.pricing.unit_micro(unit, count)

    @staticmethod
    def hold_micro(worst_micro: int) -> int:
        """What a call holds: its worst case and the seller's streak bonus on it (the only
        bonus a paid call can earn; the ledger pays it on top of the base)."""
        return with_headroom_micro(worst_micro, [STREAK_BONUS_PCT])

    def refusal(self, worst_micro: int, error: InsufficientFunds) -> InsufficientFunds:
        """The ledger's refusal of a call's hold, said in the call's terms."""
        free = int(error.details.get("remaining_micro", 0))
        return InsufficientFunds(
            f"escrow {self.escrow_id} has {format_usdc(max(free, 0))} USDC free (other calls' holds aside), and "
            f"this call may cost up to {format_usdc(worst_micro)} USDC (prompt + max_tokens at the output price, "
            "with the streak bonus on it); lower max_tokens or fund a larger escrow",
            details={"free_micro": free, "worst_micro": worst_micro})

    def record(self, receipt: CallReceipt, remaining: Decimal | None) -> CallReceipt:
        with self._lock:
            self.receipts.append(receipt)
            del self.receipts[:-MAX_RECEIPTS]
            if remaining is not None:
                self.remaining = remaining
        return receipt
