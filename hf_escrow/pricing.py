"""Price sheets: what one unit of work costs, in exact USDC.

Prices are per 1k input/output tokens (the convention of the Inference API and the
guides), per 1M tokens (converted), per token (the vLLM guide), or per call, image,
vector or shard. A cost is computed on the whole call and rounded once, by the rule in
`hf_escrow.money`.

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
from .money import round_micro, to_decimal

UNIT_PRICES = ("per_call", "per_image", "per_vector", "per_shard")
_ALIASES = {"input_per_1m": ("input_per_1k", 1000), "output_per_1m": ("output_per_1k", 1000),
            "price_per_token": ("per_token", 1)}
MAX_TOKENS_PER_CALL = 10_000_000


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

    def __init__(self, *, input_per_1k: Any = None, output_per_1k: Any = None, per_token: Any = None,
                 per_call: Any = None, per_image: Any = None, per_vector: Any = None, per_shard: Any = None,
                 input_per_1m: Any = None, output_per_1m: Any = None):
        given = dict(input_per_1k=input_per_1k, output_per_1k=output_per_1k, per_token=per_token,
                     per_call=per_call, per_image=per_image, per_vector=per_vector, per_shard=per_shard)
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
