"""Ledger settings: fees, faucet, bonuses. Read from the environment by default."""

from __future__ import annotations

import os
from dataclasses import dataclass
from decimal import Decimal

from .._exceptions import ValidationError
from ..money import parse_usdc
from ..pricing import QUALITY_BONUS_PCT, STREAK_BONUS_PCT


@dataclass(frozen=True)
class LedgerConfig:
    fee_bps: int = 100                 # 1% of every payout to a seller
    referral_bps: int = 1_500          # 15% of that fee goes to the referrer
    faucet_enabled: bool = True
    faucet_amount_micro: int = 10_000_000   # 10 USDC of test money per claim
    faucet_interval_s: int = 86_400
    quality_bonus_pct: Decimal = QUALITY_BONUS_PCT
    streak_bonus_pct: Decimal = STREAK_BONUS_PCT
    streak_days: int = 7
    hold_max_ttl_s: int = 900          # a seller cannot keep a buyer's money reserved longer
    hold_grace_s: int = 30             # a closed escrow's open holds still capture this long


    def __post_init__(self):
        if not (0 <= self.fee_bps <= 10_000 and 0 <= self.referral_bps <= 10_000):
            raise ValidationError("fee_bps and referral_bps must be between 0 and 10000 basis points")
        if self.faucet_amount_micro <= 0 or self.faucet_interval_s < 0 or self.streak_days < 0:
            raise ValidationError("faucet amount must be positive; intervals and days not negative")
        if self.hold_max_ttl_s < 1 or self.hold_grace_s < 0:
            raise ValidationError("the hold TTL cap must be at least 1 s and the hold grace not negative")

    @classmethod
    def from_env(cls) -> "LedgerConfig":
        """HF_ESCROW_FEE_BPS, HF_ESCROW_REFERRAL_BPS, HF_ESCROW_FAUCET (0 switches it off),
        HF_ESCROW_FAUCET_AMOUNT (USDC), HF_ESCROW_FAUCET_INTERVAL_S, HF_ESCROW_HOLD_MAX_TTL_S,
        HF_ESCROW_HOLD_GRACE_S."""
        env = os.environ
        try:
            return cls(
                fee_bps=int(env.get("HF_ESCROW_FEE_BPS", cls.fee_bps)),
                referral_bps=int(env.get("HF_ESCROW_REFERRAL_BPS", cls.referral_bps)),
                faucet_enabled=env.get("HF_ESCROW_FAUCET", "1").lower() not in ("0", "false", "off", "no"),
                faucet_amount_micro=parse_usdc(env.get("HF_ESCROW_FAUCET_AMOUNT", "10")),
                faucet_interval_s=int(env.get("HF_ESCROW_FAUCET_INTERVAL_S", cls.faucet_interval_s)),
                hold_max_ttl_s=int(env.get("HF_ESCROW_HOLD_MAX_TTL_S", cls.hold_max_ttl_s)),
                hold_grace_s=int(env.get("HF_ESCROW_HOLD_GRACE_S", cls.hold_grace_s)),
            )
        except ValueError as error:
            raise ValidationError(f"bad hf-escrow setting in the environment: {error}") from None
