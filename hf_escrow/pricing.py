"""Price sheets and bonuses: what work costs, and what the ledger pays on top, in exact USDC.

Prices are per 1k input/output tokens (the convention of the Inference API and the
guides), per 1M tokens (converted), per token (the vLLM guide), per call, image,
vector or shard, or per second of compute: `per_second`, and `per_gpu_second` for a
Space that names its hardware (``hardware="a10g-largex2"`` runs 2 GPUs, so a second
costs twice the GPU-second price). A cost is computed on the whole call and rounded
once, by the rule in `hf_escrow.money`. The bonus rules (throughput, quality, streak) are
here too: the ledger pays them with `earned_bonus`, and buyers size their escrows' headroom
for them with `with_headroom_micro`, so both round each bonus the same way.

Example:
    >>> p = Pricing(input_per_1k="0.0005", output_per_1k="0.0015")
    >>> p.tokens_micro(prompt_tokens=2048, completion_tokens=512)
    1792
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from decimal import Decimal
from pathlib import Path
from typing import Any, Mapping

from ._exceptions import ValidationError
from .money import percent_of, round_micro, seconds_cost_micro, to_decimal, to_usdc

UNIT_PRICES = ("per_call", "per_image", "per_vector", "per_shard")
_ALIASES = {"input_per_1m": ("input_per_1k", 1000), "output_per_1m": ("output_per_1k", 1000),
            "price_per_token": ("per_token", 1)}
MAX_TOKENS_PER_CALL = 10_000_000
MAX_GPUS = 64


def gpus_of(hardware: str) -> int:
    """GPUs of a Spaces hardware flavour: ``cpu-*`` none, ``...x<N>`` N (``l4x4``), any other one.

    Example:
        >>> gpus_of("a10g-largex2"), gpus_of("zero-a10g"), gpus_of("t4-small"), gpus_of("cpu-basic")
        (2, 1, 1, 0)
    """
    if not isinstance(hardware, str) or not hardware.strip() or len(hardware) > 64:
        raise ValidationError(f"hardware must name a Spaces hardware flavour such as \"a10g-small\", got {hardware!r}")
    name = hardware.strip().lower()
    if name.startswith("cpu"):
        return 0
    head, _, count = name.rpartition("x")
    return int(count) if head and count.isdigit() and 0 < int(count) <= MAX_GPUS else 1


@dataclass(frozen=True)
class Pricing:
    """A price sheet. Every field is USDC (Decimal); None means "not sold"."""

    input_per_1k: Decimal | None = None
    output_per_1k: Decimal | None = None
    per_token: Decimal | None = None
    per_call: Decimal | None = None
    per_image: Decimal | None = None
    per_vector: Decimal | None = None
    per_shard: Decimal | None = None
    per_second: Decimal | None = None       # a second of the handler's own run time
    per_gpu_second: Decimal | None = None   # a second of one GPU of `hardware`
    hardware: str | None = None             # the Space's hardware flavour (e.g. "a10g-largex2")

    def __init__(self, *, input_per_1k: Any = None, output_per_1k: Any = None, per_token: Any = None,
                 per_call: Any = None, per_image: Any = None, per_vector: Any = None, per_shard: Any = None,
                 input_per_1m: Any = None, output_per_1m: Any = None, per_second: Any = None,
                 per_gpu_second: Any = None, hardware: str | None = None):
        given = dict(input_per_1k=input_per_1k, output_per_1k=output_per_1k, per_token=per_token,
                     per_call=per_call, per_image=per_image, per_vector=per_vector, per_shard=per_shard,
                     per_second=per_second, per_gpu_second=per_gpu_second)
        for name, value in (("input_per_1m", input_per_1m), ("output_per_1m", output_per_1m)):
            if value is not None:
                target, divisor = _ALIASES[name]
                if given[target] is not None:
                    raise ValidationError(f"give either {target} or {name}, not both")
                given[target] = to_decimal(value, what=f"price {name}") / divisor
        for name, value in given.items():
            object.__setattr__(self, name, None if value is None else to_decimal(value, what=f"price {name}"))
        if all(value is None for value in given.values()):
            raise ValidationError("a price sheet needs at least one price, e.g. input_per_1k=\"0.0005\"")
        if (per_gpu_second is None) != (hardware is None):
            raise ValidationError("per_gpu_second needs the hardware it prices (e.g. hardware=\"a10g-small\"), "
                                  "and hardware is only read with per_gpu_second")
        if hardware is not None and gpus_of(hardware) == 0:
            raise ValidationError(f"hardware {hardware!r} has no GPU: price it with per_second")
        object.__setattr__(self, "hardware", hardware.strip().lower() if hardware is not None else None)

    @classmethod
    def coerce(cls, value: "Pricing | Mapping[str, Any] | str | Path | None") -> "Pricing | None":
        """A Pricing from a Pricing, a dict of its keys, or the path of a TOML file."""
        if value is None or isinstance(value, Pricing):
            return value
        if isinstance(value, (str, Path)):
            return cls.from_toml(value)
        if not isinstance(value, Mapping):
            raise ValidationError(f"pricing must be a Pricing, a dict or a TOML path, got {type(value).__name__}")
        known = {f.name for f in fields(cls)} | set(_ALIASES)
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValidationError(f"unknown pricing keys {unknown}; known: {sorted(known)}")
        values = dict(value)
        if "price_per_token" in values:
            values["per_token"] = values.pop("price_per_token")
        return cls(**values)

    @classmethod
    def from_toml(cls, path: str | Path) -> "Pricing":
        """Read a price sheet such as ``input_per_1k = "0.0005"`` from a TOML file."""
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:  # ValueError: a path no OS can encode
            raise ValidationError(f"cannot read price sheet {path}: {exc}") from None
        return cls.coerce(data.get("pricing", data))

    def to_dict(self) -> dict[str, str]:
        """The sheet as exact decimal strings (JSON- and TOML-safe)."""
        return {f.name: str(getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None}

    @property
    def sells_seconds(self) -> bool:
        return self.per_second is not None or self.per_gpu_second is not None

    @property
    def second_rate(self) -> Decimal:
        """USDC per second of run time: `per_second` plus `per_gpu_second` x the hardware's GPUs."""
        if not self.sells_seconds:
            raise ValidationError("this price sheet has no time prices (per_second/per_gpu_second)")
        rate = self.per_second or Decimal(0)
        if self.per_gpu_second is not None:
            rate += self.per_gpu_second * gpus_of(self.hardware)
        if rate <= 0:
            raise ValidationError("a price per second must be more than 0")
        return rate

    def seconds_micro(self, elapsed_ns: int) -> int:
        """Cost of `elapsed_ns` nanoseconds of run time, rounded once."""
        return seconds_cost_micro(elapsed_ns, self.second_rate)

    @property
    def sells_tokens(self) -> bool:
        return self.per_token is not None or self.input_per_1k is not None or self.output_per_1k is not None

    def tokens_micro(self, prompt_tokens: int, completion_tokens: int) -> int:
        """Cost of one call's tokens, rounded once."""
        for count in (prompt_tokens, completion_tokens):
            if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_TOKENS_PER_CALL:
                raise ValidationError(f"token counts must be integers from 0 to {MAX_TOKENS_PER_CALL}, got {count!r}")
        if not self.sells_tokens:
            raise ValidationError("this price sheet has no token prices (input_per_1k/output_per_1k/per_token)")
        total = Decimal(0)
        if self.per_token is not None:
            total += (prompt_tokens + completion_tokens) * self.per_token
        if self.input_per_1k is not None:
            total += prompt_tokens * self.input_per_1k / 1000
        if self.output_per_1k is not None:
            total += completion_tokens * self.output_per_1k / 1000
        return round_micro(total)

    def unit_micro(self, unit: str, count: int = 1) -> int:
        """Cost of `count` calls, images, vectors or shards; refused when the unit is not sold."""
        if unit not in UNIT_PRICES:
            raise ValidationError(f"unknown unit {unit!r}; one of {UNIT_PRICES}")
        price = getattr(self, unit)
        if price is None:
            raise ValidationError(f"this price sheet sets no {unit} price, so this work is not for sale")
        return round_micro(price * count)


def per_token_price(amount_micro: int, tokens: int) -> Decimal:
    """The per-token price an escrow of `amount_micro` was sized with for `tokens` tokens
    (exact Decimal, not rounded: the cost at this price is rounded once, when charged).

    Example:
        >>> per_token_price(2_774, 1_387)
        Decimal('0.000002')
    """
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
        raise ValidationError("give price_per_token: the escrow's metadata has no prompt_tokens or "
                              "max_completion_tokens to derive it from")
    return to_usdc(amount_micro) / tokens


# ---- bonuses ------------------------------------------------------------------------

# The ledger's default bonus rates (LedgerConfig): the vLLM guide's "+10% above 0.9" and its
# "2% streak multiplier". Buyers size their headroom with them.
QUALITY_BONUS_PCT = Decimal(10)
STREAK_BONUS_PCT = Decimal(2)
QUALITY_BONUS_ABOVE = 0.9


@dataclass(frozen=True)
class Bonus:
    throughput_micro: int = 0
    quality_micro: int = 0
    streak_micro: int = 0

    @property
    def total_micro(self) -> int:
        return self.throughput_micro + self.quality_micro + self.streak_micro


def earned_bonus(base_micro: int, conditions: dict | None, *, throughput_tps: float | None,
                 quality_score: float | None, streak: bool, quality_pct: Decimal,
                 streak_pct: Decimal) -> Bonus:
    """Bonuses on the base payout: throughput above the minimum, quality > 0.9, the streak."""
    throughput = 0
    if conditions and throughput_tps is not None and throughput_tps > conditions["throughput_tps_min"]:
        throughput = percent_of(base_micro, Decimal(conditions["bonus_pct"]))
    quality = percent_of(base_micro, quality_pct) \
        if quality_score is not None and quality_score > QUALITY_BONUS_ABOVE else 0
    return Bonus(throughput, quality, percent_of(base_micro, streak_pct) if streak else 0)


def capped(bonus: Bonus, available_micro: int) -> Bonus:
    """Cut bonuses to what the escrow has left, in the order throughput, quality, streak."""
    parts = []
    for value in (bonus.throughput_micro, bonus.quality_micro, bonus.streak_micro):
        take = min(value, available_micro)
        parts.append(take)
        available_micro -= take
    return Bonus(*parts)


def with_headroom_micro(base_micro: int, bonus_pcts: list[Decimal]) -> int:
    """`base_micro` plus each bonus rate of it, each rounded as `earned_bonus` rounds it, so
    every bonus the ledger may pay on that base fits in what a buyer locks.

    Example:
        >>> with_headroom_micro(2_774, [STREAK_BONUS_PCT, Decimal(5)])
        2968
    """
    return base_micro + sum(percent_of(base_micro, pct) for pct in bonus_pcts)
