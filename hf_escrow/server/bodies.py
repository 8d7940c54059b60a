"""Request bodies of both seed dialects. Amounts stay as sent (string, int or float) and
are parsed by `hf_escrow.money`, so that rounding and refusals are the same everywhere."""

from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from ..pricing import MAX_TOKENS_PER_CALL

Amount = Union[StrictStr, StrictInt, StrictFloat]
Score = Union[StrictFloat, StrictInt]
AMOUNT_DOC = "USDC, as a number or a decimal string; more than 6 decimals are rounded half-even"
MAX_CAPTURE_ITEMS = 1_000


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Usage(_Body):
    prompt_tokens: StrictInt = Field(0, ge=0, le=MAX_TOKENS_PER_CALL)
    completion_tokens: StrictInt = Field(0, ge=0, le=MAX_TOKENS_PER_CALL)


class CreateEscrow(_Body):
    seller_id: StrictStr = Field(description="The seller's agent id or wallet address.")
    amount_usdc: Amount = Field(description=AMOUNT_DOC)
    ttl_seconds: Score = 3600
    description: Optional[StrictStr] = None
    meta: Optional[dict[str, Any]] = None
    release_condition: Optional[dict[str, Any]] = None
    bonus_conditions: Optional[dict[str, Any]] = None
    referral_code: Optional[StrictStr] = None
    pricing: Optional[dict[str, Any]] = None


class Deduct(_Body):
    amount_usdc: Amount = Field(description=AMOUNT_DOC)
    reason: Optional[StrictStr] = None
    usage: Optional[Usage] = None


class _Item(_Body):
    """What every batch item has besides its call's own body."""

    idempotency_key: Optional[StrictStr] = Field(None, description="Retry-safe key for this item alone.")


def _items(noun: str) -> Any:
    return Field(max_length=MAX_CAPTURE_ITEMS, description=f"At most {MAX_CAPTURE_ITEMS} {noun}s, in one transaction.")


class DeductItem(Deduct, _Item):
    escrow_id: StrictStr


class DeductMany(_Body):
    items: list[DeductItem] = _items("deduct")


class Release(_Body):
    amount_usdc: Optional[Amount] = Field(None, description=AMOUNT_DOC + "; default: usage x price, else all")
    refund_remainder: StrictBool = True
    meta: Optional[dict[str, Any]] = None
    usage: Optional[Usage] = None
    price_per_token: Optional[Amount] = None
    quality_score: Optional[Score] = None
    throughput_tps: Optional[Score] = None
    hold_id: Optional[StrictStr] = Field(None, description="Your own open hold on this escrow, freed to pay "
                                                           "this release in the same transaction")


class Cancel(_Body):
    reason: Optional[StrictStr] = None


class SubmitResult(_Body):
    metric: StrictStr
    score: Score
    model_repo: Optional[StrictStr] = None
    artifact: Optional[dict[str, Any]] = None
    milestone: Optional[StrictInt] = Field(None, description="A milestone escrow's milestone (1 = the first); "
                                                               "default: the next one due.")


class Verify(_Body):
    score: Score


class VllmCreate(_Body):
    recipient_wallet: StrictStr = Field(description="The seller: an agent id or wallet address.")
    amount_usdc: Amount = Field(description=AMOUNT_DOC)
    metadata: Optional[dict[str, Any]] = None
    bonus_conditions: Optional[dict[str, Any]] = None
    referral_code: Optional[StrictStr] = None
    ttl_seconds: Score = 3600
    description: Optional[StrictStr] = None


class VllmRelease(_Body):
    escrow_id: StrictStr
    actual_completion_tokens: Optional[StrictInt] = Field(None, ge=0, le=MAX_TOKENS_PER_CALL)
    price_per_token: Optional[Amount] = None
    quality_score: Optional[Score] = None
    throughput_tps: Optional[Score] = None
    amount_usdc: Optional[Amount] = None


class VllmCancel(_Body):
    escrow_id: StrictStr
    reason: Optional[StrictStr] = None


class HoldByEscrow(_Body):
    amount_usdc: Amount = Field(description=AMOUNT_DOC)
    ttl_seconds: Score = Field(60, description="Seconds the hold lasts; capped by the ledger (default 900 s max).")


class HoldByToken(HoldByEscrow):
    spend_token: StrictStr = Field(description="The escrow's spend token (est_...); you must be its seller.")


class Capture(_Body):
    amount_usdc: Amount = Field(description=AMOUNT_DOC + "; 0 only with final")
    final: StrictBool = Field(False, description="Free the rest of the hold after this capture.")
    usage: Optional[Usage] = None


class CaptureItem(Capture, _Item):
    hold_id: StrictStr


class CaptureMany(_Body):
    items: list[CaptureItem] = _items("capture")


class Register(_Body):
    agent_id: StrictStr
    referral_code: Optional[StrictStr] = None


class Claim(_Body):
    agent_id: StrictStr = Field(description="Who gets the USDC: you, or an id nobody registered yet.")


class CreateKey(_Body):
    budget_usdc: Amount = Field(description="What the key's escrows may lock, net of refunds. " + AMOUNT_DOC)
    max_escrow_usdc: Optional[Amount] = Field(None, description="The most one escrow may lock.")
    sellers: Optional[list[StrictStr]] = Field(None, description="Agent ids or wallets it may pay; null: any.")
    expires_in: Optional[Score] = Field(None, description="Seconds until the key stops; null: until revoked.")
    label: Optional[StrictStr] = None


class Deposit(_Body):
    agent_id: StrictStr
    amount_usdc: Amount = Field(description=AMOUNT_DOC)
