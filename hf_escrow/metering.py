"""The buyer-side meter: what a call may cost at worst, and what each call cost.

Pure bookkeeping, shared by the sync and async paid clients; the escrow calls themselves
happen in `hf_escrow.inference`. The reservation itself is a ledger hold on the escrow,
so that every process sharing the escrow sees it: no count in one process's memory.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from ._exceptions import InsufficientFunds, ValidationError
from .money import STREAK_BONUS_PCT, format_usdc, percent_of
from .pricing import Pricing

MAX_RECEIPTS = 10_000          # the receipt log keeps the newest calls only
PER_MESSAGE_OVERHEAD_TOKENS = 8  # chat template tokens per message when no tokenizer is known


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
    counted_by: str      # "usage" (server), "tokenizer", "chunks", or "units"
    pricing: dict = field(default_factory=dict)
    bonus: Decimal = Decimal("0.000000")   # the part of `gross` the ledger added as bonus (e.g. a streak)


class TokenCounter:
    """Counts tokens with the model's tokenizer when one is known, else estimates safely."""

    def __init__(self, tokenizer: Any = None):
        self.tokenizer = _load_tokenizer(tokenizer)

    def prompt_tokens(self, messages: list[dict]) -> tuple[int, bool]:
        """(tokens, exact): exact with a tokenizer, else an upper bound from UTF-8 bytes."""
        if self.tokenizer is not None:
            try:
                ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
                # transformers 5 returns a BatchEncoding (a mapping), older versions a list of ids
                return len(ids["input_ids"] if hasattr(ids, "keys") else ids), True
            except (ValueError, TypeError, KeyError):
                pass  # no chat template: fall through to the plain count
            return len(self.tokenizer.encode(_messages_text(messages))), True
        return len(_messages_text(messages).encode()) + PER_MESSAGE_OVERHEAD_TOKENS * len(messages), False

    def plain_prompt_tokens(self, text: str) -> tuple[int, bool]:
        """(tokens, exact) of a raw prompt (no chat template), special tokens included as servers add them."""
        if self.tokenizer is not None:
            return len(self.tokenizer(text)["input_ids"]), True
        return len(text.encode()) + PER_MESSAGE_OVERHEAD_TOKENS, False

    def text_tokens(self, text: str, fallback: int) -> tuple[int, str]:
        """Tokens of delivered text: with the tokenizer, else the number of chunks received."""
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(text, add_special_tokens=False)), "tokenizer"
        return fallback, "chunks"


def _load_tokenizer(tokenizer: Any) -> Any:
    if tokenizer is None or not isinstance(tokenizer, str):
        return tokenizer
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)


def _messages_text(messages: list[dict]) -> str:
    parts = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):  # multimodal parts: count their text
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        parts.append(str(content or ""))
    return "\n".join(parts)


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
        return worst_micro + percent_of(worst_micro, STREAK_BONUS_PCT)

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
