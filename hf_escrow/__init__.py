"""hf-escrow: escrow-backed pay-per-use for Hugging Face workloads.

A buyer locks USDC in an escrow before work starts; the seller is paid out of it as the
work is delivered; whatever is left goes back to the buyer.

Example:
    >>> import hf_escrow
    >>> buyer = hf_escrow.connect(agent="buyer-1")
    >>> buyer.register(); buyer.claim_faucet()
    >>> e = buyer.create_escrow("seller-1", "1.50", ttl_seconds=600)
    >>> seller = hf_escrow.connect(agent="seller-1")
    >>> h = seller.hold(e.spend_token, "0.05")         # reserve, then pay what the work cost
    >>> seller.capture(h.id, "0.0123", final=True).net
    Decimal('0.012177')
"""

# The one place the version is written: pyproject.toml reads it from here.
__version__ = "0.1.0"

from ._exceptions import (
    ArtifactError, ArtifactMismatch, BudgetExceeded, Declined, EscrowError, Forbidden, IdempotencyConflict,
    InsufficientFunds, InvalidAmount, JobError, KeyInactive, ModelServerError, NotFound, OutsideMandate,
    PaymentRequired, RateLimited, StateConflict, TransportError, Unauthorized, ValidationError,
)
from ._models import Agent, BudgetedKey, CaptureResult, Escrow, EscrowEvent, Hold, Me, Milestone, Receipt
from .client import AsyncEscrowClient, EscrowClient, connect, connect_async
from .pricing import Pricing


# The adapters import huggingface_hub, datasets or gradio; load them only when asked for.
_LAZY = {
    "PaidInferenceClient": "buyer.inference", "AsyncPaidInferenceClient": "buyer.inference", "paid_inference": "buyer.inference",
    "load_paid_dataset": "buyer.datasets", "paid_shards": "buyer.datasets",
    "paid": "seller.gate", "Gate": "seller.gate",
    "EscrowedEngine": "buyer.vllm",
    "AutoPay": "buyer.autopay", "Mandate": "buyer.autopay",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'hf_escrow' has no attribute {name!r}")


__all__ = [
    "connect", "connect_async", "EscrowClient", "AsyncEscrowClient",
    "PaidInferenceClient", "AsyncPaidInferenceClient", "paid_inference",
    "load_paid_dataset", "paid_shards", "paid", "Gate", "EscrowedEngine", "AutoPay", "Mandate",
    "Agent", "Escrow", "EscrowEvent", "Milestone", "Me", "Receipt", "Hold", "CaptureResult", "Pricing",
    "BudgetedKey",
    "EscrowError", "ValidationError", "InvalidAmount", "Unauthorized", "Forbidden", "NotFound",
    "InsufficientFunds", "PaymentRequired", "StateConflict", "IdempotencyConflict", "RateLimited", "TransportError",
    "BudgetExceeded", "OutsideMandate", "KeyInactive", "Declined",
    "JobError", "ArtifactMismatch", "ArtifactError", "ModelServerError",
]
