"""Exact USDC amounts as integer micro-USDC, and the fee and referral split.

The rounding rule (the only one in hf-escrow): whenever a USDC value has more than six
decimals - an input such as the float product ``2048/1000*0.0005`` or a derived share
such as 1% of 150 micro-USDC - it is rounded to the nearest micro-USDC, ties to even
(banker's rounding, ``decimal.ROUND_HALF_EVEN``). Every split is then completed by
subtraction, so ``net + fee == gross`` and ``referral + platform == fee`` hold exactly
for every amount, one micro-USDC included.

Time is priced the same way: a run is measured in whole nanoseconds (an integer clock,
never a float), and its cost - nanoseconds x the rate per second / 10^9 - is rounded
once, by the rule above (`seconds_cost_micro`). A stream's captures are differences of
that rounded cost of its running total, so slicing a run never changes its price.

Floats are accepted at the edge (JSON numbers, the seed snippets) and converted through
their shortest ``repr`` - the number the caller wrote - never through binary arithmetic.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any

from ._exceptions import InvalidAmount

MICRO_PER_USDC = 1_000_000
# A single amount above this is refused: it keeps every amount within 15 significant
# digits, so a JSON number round-trips through a float exactly.
MAX_AMOUNT_MICRO = 100_000_000 * MICRO_PER_USDC
_MICRO = Decimal(1) / MICRO_PER_USDC
_MAX_TEXT_CHARS = 64
# What a person writes for an amount: ASCII digits, one point, an exponent. Python's
# Decimal also takes "1_000", other scripts' digits and "NaN"; an amount never does.
_AMOUNT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", re.ASCII)
BPS = 10_000



class MoneyInvariantBroken(ArithmeticError):
    """Money figures that break a rule of this module: a bug, never a caller's input."""


def require(ok: bool, what: str) -> None:
    """Check a money invariant; raised rather than asserted, so it holds under `python -O`."""
    if not ok:
        raise MoneyInvariantBroken(what)

def to_decimal(value: Any, *, what: str = "amount") -> Decimal:
    """A finite, non-negative Decimal from str/int/Decimal/float; refuses everything else."""
    if isinstance(value, bool) or value is None:
        raise InvalidAmount(f"{what} must be a number of USDC such as \"0.25\", got {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidAmount(f"{what} must be finite, got {value!r}")
        value = repr(value)
    if isinstance(value, str):
        text = value.strip()
        if len(text) > _MAX_TEXT_CHARS or not _AMOUNT_TEXT.fullmatch(text):
            raise InvalidAmount(f"{what} must be a number of USDC such as \"0.25\" (ASCII digits), "
                                f"got {value[:_MAX_TEXT_CHARS]!r}")
        try:
            value = Decimal(text)
        except InvalidOperation:
            raise InvalidAmount(f"{what} must be a number of USDC such as \"0.25\", got {text!r}") from None
    elif isinstance(value, int):
        value = Decimal(value)
    elif not isinstance(value, Decimal):
        raise InvalidAmount(f"{what} must be a number of USDC such as \"0.25\", got {type(value).__name__}")
    if not value.is_finite():
        raise InvalidAmount(f"{what} must be finite, got {value}")
    if value < 0:
        raise InvalidAmount(f"{what} must not be negative, got {value}")
    if value.adjusted() > 15:
        raise InvalidAmount(f"{what} is absurdly large: {value}")
    return value


def round_micro(value: Decimal) -> int:
    """USDC (Decimal) -> integer micro-USDC, half-even: the one rounding rule."""
    return int((value * MICRO_PER_USDC).to_integral_value(rounding=ROUND_HALF_EVEN))


def parse_usdc(value: Any, *, what: str = "amount", allow_zero: bool = False) -> int:
    """Parse a USDC amount into micro-USDC.

    Example:
        >>> parse_usdc("1.50"), parse_usdc(0.0017920000000000002), parse_usdc(Decimal("0.0000185"))
        (1500000, 1792, 18)
    """
    micro = round_micro(to_decimal(value, what=what))
    if micro > MAX_AMOUNT_MICRO:
        raise InvalidAmount(f"{what} {value} exceeds the limit of {format_usdc(MAX_AMOUNT_MICRO)} USDC")
    if micro == 0 and not allow_zero:
        raise InvalidAmount(
            f"{what} {value} rounds to 0 micro-USDC (USDC has 6 decimals); send at least 0.000001"
        )
    return micro


def was_rounded(value: Any) -> bool:
    """Whether `value` (already valid) had more than six decimals."""
    exact = to_decimal(value) * MICRO_PER_USDC
    return exact != exact.to_integral_value()


def to_usdc(micro: int) -> Decimal:
    """Integer micro-USDC -> exact Decimal USDC with six decimals."""
    require(isinstance(micro, int) and not isinstance(micro, bool), f"micro-USDC must be an int, got {micro!r}")
    return (Decimal(micro) * _MICRO).quantize(_MICRO)


def format_usdc(micro: int) -> str:
    """'1.500000' style text, exact."""
    return str(to_usdc(micro))


def usdc_number(micro: int) -> float:
    """A JSON number for `micro`; exact when printed, as amounts stay within 15 digits.

    Python's int division is correctly rounded, as float() of the exact Decimal is: the
    same number, for a tenth of the cost (a receipt carries a score of these)."""
    require(isinstance(micro, int) and not isinstance(micro, bool), f"micro-USDC must be an int, got {micro!r}")
    return micro / MICRO_PER_USDC


def share(amount_micro: int, bps: int) -> int:
    """`bps` basis points of `amount_micro`, rounded half-even to the micro-USDC."""
    require(amount_micro >= 0 and 0 <= bps <= BPS, f"share of {amount_micro} at {bps} bps")
    return round_micro(Decimal(amount_micro * bps) / BPS / MICRO_PER_USDC)


def percent_of(amount_micro: int, pct: Decimal) -> int:
    """`pct` percent of `amount_micro` (a bonus rate such as Decimal("2.5")), rounded half-even
    to the micro-USDC: how the ledger rounds each bonus, and how a buyer sizes headroom for it.

    Example:
        >>> percent_of(1_000_001, Decimal("2.5"))
        25000
    """
    require(amount_micro >= 0 and pct >= 0, f"{pct}% of {amount_micro}")
    return round_micro(Decimal(amount_micro) * pct / 100 / MICRO_PER_USDC)


def milestone_amounts(amount_micro: int, shares_bps: list[int]) -> list[int]:
    """Each milestone's part of `amount_micro`, for shares in basis points summing to at most 10000.

    The rounding rule: the cumulative share up to each milestone is rounded (half-even, as
    everywhere) and each milestone gets the difference to the one before. Every prefix and the
    whole sum are therefore exact, and shares reaching 10000 end on exactly `amount_micro`: the
    last milestone takes the remainder.

    Example:
        >>> milestone_amounts(1_000_001, [3000, 4000, 3000])
        [300000, 400001, 300000]
    """
    amounts, before, cumulative_bps = [], 0, 0
    for bps in shares_bps:
        cumulative_bps += bps
        if not 0 < bps <= BPS or cumulative_bps > BPS:
            raise MoneyInvariantBroken(f"milestone shares {shares_bps} are not within 1..10000 basis points in all")
        upto = share(amount_micro, cumulative_bps)
        amounts.append(upto - before)
        before = upto
    return amounts


@dataclass(frozen=True)
class Split:
    """How a gross payout to a seller is divided."""

    gross_micro: int
    net_micro: int       # to the seller
    fee_micro: int       # platform fee, of which:
    referral_micro: int  # to the referrer
    platform_micro: int  # kept by the platform


def split_over_life(gross_micro: int, *, paid_before_micro: int, fees_before_micro: int,
                    referral_before_micro: int, fee_bps: int, referral_bps: int, has_referrer: bool) -> Split:
    """Split the next payout of an escrow so that its fees are exact over the escrow's life.

    The fee on this payout is the fee on the cumulative gross after it minus the fees
    already taken (likewise the referral share of the fee): a thousand 1-micro captures pay
    the same fee as one capture of their sum, so splitting a payment cannot avoid it.

    Example:
        >>> paid = fees = 0
        >>> for _ in range(200):
        ...     part = split_over_life(50, paid_before_micro=paid, fees_before_micro=fees,
        ...                            referral_before_micro=0, fee_bps=100, referral_bps=0, has_referrer=False)
        ...     paid, fees = paid + part.gross_micro, fees + part.fee_micro
        >>> fees == share(200 * 50, 100) == 100
        True
    """
    require(min(gross_micro, paid_before_micro, fees_before_micro, referral_before_micro) >= 0,
            f"negative payout figures: {gross_micro}, {paid_before_micro}, {fees_before_micro}, {referral_before_micro}")
    fee_after = share(paid_before_micro + gross_micro, fee_bps)
    fee = min(max(fee_after - fees_before_micro, 0), gross_micro)
    referral = 0
    if has_referrer:
        referral_after = share(fees_before_micro + fee, referral_bps)
        referral = min(max(referral_after - referral_before_micro, 0), fee)
    return _checked(Split(gross_micro, gross_micro - fee, fee, referral, fee - referral))


def _checked(result: Split) -> Split:
    if result.net_micro + result.fee_micro != result.gross_micro \
            or result.referral_micro + result.platform_micro != result.fee_micro \
            or min(result.net_micro, result.fee_micro, result.referral_micro, result.platform_micro) < 0:
        raise MoneyInvariantBroken(f"unbalanced split: {result}")
    return result



def split_payout(gross_micro: int, *, fee_bps: int, referral_bps: int, has_referrer: bool) -> Split:
    """Split an escrow's first (or only) payout into seller net, fee, referral and platform shares.

    Example:
        >>> split_payout(1_500_000, fee_bps=100, referral_bps=1500, has_referrer=True)
        Split(gross_micro=1500000, net_micro=1485000, fee_micro=15000, referral_micro=2250, platform_micro=12750)
    """
    return split_over_life(gross_micro, paid_before_micro=0, fees_before_micro=0, referral_before_micro=0,
                           fee_bps=fee_bps, referral_bps=referral_bps, has_referrer=has_referrer)


def cost_micro(quantity: int, unit_price: Decimal, *, per: int = 1) -> int:
    """Exact cost of `quantity` units at `unit_price` USDC per `per` units, one rounding."""
    require(quantity >= 0 and per > 0, f"cost of {quantity} units per {per}")
    return round_micro(Decimal(quantity) * unit_price / per)


NS_PER_SECOND = 1_000_000_000


def seconds_cost_micro(elapsed_ns: int, per_second: Decimal) -> int:
    """What `elapsed_ns` nanoseconds cost at `per_second` USDC a second, rounded once (half-even).

    Example:
        >>> seconds_cost_micro(250_000_000, Decimal("0.0004")), seconds_cost_micro(1_250_000, Decimal("0.0004"))
        (100, 0)
    """
    if isinstance(elapsed_ns, bool) or not isinstance(elapsed_ns, int) or elapsed_ns < 0:
        raise ValueError(f"elapsed time must be a whole, non-negative number of nanoseconds, got {elapsed_ns!r}")
    return cost_micro(elapsed_ns, per_second, per=NS_PER_SECOND)
