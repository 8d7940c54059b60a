"""Pure rules of the escrow lifecycle: conditions, bonuses, streaks. No I/O here."""

from __future__ import annotations

import hashlib
import math
from decimal import Decimal
from typing import Any

from .._exceptions import StateConflict, ValidationError
from ..money import BPS as MAX_BPS, milestone_amounts, to_decimal
from ..pricing import MAX_TOKENS_PER_CALL

MAX_BONUS_PCT = Decimal(100)
DAY_MS = 86_400_000
MAX_TTL_SECONDS = 90 * 86_400
MAX_TEXT_CHARS = 2_000
MAX_JSON_CHARS = 16_000
MAX_JSON_DEPTH = 16
MAX_SCORE = 1e15            # scores, throughputs and thresholds are numbers a person can read
MAX_JSON_INT = 2 ** 63 - 1  # what every backend stores as a number


def is_text(value: Any) -> bool:
    """Text every backend stores and every reader decodes: valid UTF-8 (no lone surrogate), no NUL."""
    if not isinstance(value, str) or "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate such as "\ud800" from a JSON escape
        return False
    return True


class Expired(Exception):
    """Raised inside a transaction that found its escrow (or hold) past its TTL; the
    ledger settles the expiry in a transaction of its own and refuses the operation."""

    def __init__(self, escrow_id: str | None = None, hold_id: str | None = None):
        super().__init__(hold_id or escrow_id)
        self.escrow_id = escrow_id
        self.hold_id = hold_id


def expired_error(expired: Expired) -> StateConflict:
    """How an operation refused for an expiry is answered (once the expiry is settled)."""
    if expired.hold_id is not None:
        return StateConflict(f"hold {expired.hold_id} has expired; what it reserved was freed",
                             details={"hold_id": expired.hold_id, "hold_status": "expired"})
    return StateConflict(f"escrow {expired.escrow_id} has expired; its remainder was refunded to the buyer")


def check_state(row: Any, now_ms: int, states: tuple[str, ...]) -> None:
    """An escrow row's state allows an operation: not past its TTL, in one of `states`."""
    if row.status in ("active", "awaiting_verification") and row.expires_at_ms <= now_ms:
        raise Expired(row.escrow_id)
    if row.status not in states:
        raise StateConflict(f"escrow {row.escrow_id} is {row.status}; this needs it {' or '.join(states)}")


def check_hold_ttl(ttl_seconds: Any, max_s: int) -> int:
    """A hold's TTL in ms, capped at `max_s` so a seller cannot keep a buyer's money reserved."""
    if not _seconds(ttl_seconds) or not 0 < ttl_seconds <= MAX_TTL_SECONDS:
        raise ValidationError(f"ttl_seconds must be a positive number of seconds (holds last at most {max_s} s), "
                              f"got {_short(ttl_seconds)}")
    return max(1, int(min(ttl_seconds, max_s) * 1000))


def check_score(value: Any, what: str) -> float:
    """A finite float score (a metric, a quality score, tokens/s), at most 1e15 either way."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal, str)):
        raise ValidationError(f"{what} must be a number, got {_short(value)}")
    if isinstance(value, str) and (len(value) > 64 or not value.isascii()):
        raise ValidationError(f"{what} must be a number written in ASCII digits, got {_short(value)}")
    try:
        score = float(value)
    except (ValueError, OverflowError):
        raise ValidationError(f"{what} must be a number between -1e15 and 1e15, got {_short(value)}") from None
    if not math.isfinite(score) or abs(score) > MAX_SCORE:
        raise ValidationError(f"{what} must be a finite number between -1e15 and 1e15, got {_short(value)}")
    return score


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_json(value: Any, what: str, depth: int = 0) -> None:
    """Plain JSON that every backend stores and reads back: text as `is_text`, finite numbers
    an int64 can hold, at most 16 levels deep."""
    if depth > MAX_JSON_DEPTH:
        raise ValidationError(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep")
    if isinstance(value, dict):
        for key, item in value.items():
            if not is_text(key):
                raise ValidationError(f"{what} has a key that is not valid UTF-8 text (NUL or a lone surrogate)")
            check_json(item, f"{what}.{key}" if len(key) <= 40 else what, depth + 1)
    elif isinstance(value, list):
        for item in value:
            check_json(item, what, depth + 1)
    elif isinstance(value, str):
        if not is_text(value):
            raise ValidationError(f"{what} must be valid UTF-8 text without NUL characters or lone surrogates")
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int):
        if abs(value) > MAX_JSON_INT:
            raise ValidationError(f"{what} holds an integer beyond 64 bits")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError(f"{what} holds a number that is not finite")
    else:
        raise ValidationError(f"{what} must be plain JSON, got {type(value).__name__}")


def _seconds(value: Any) -> bool:
    """A number of seconds that compares safely (an int of any size, or a finite float)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def check_ttl(ttl_seconds: Any) -> int:
    if not _seconds(ttl_seconds):
        raise ValidationError(f"ttl_seconds must be a number of seconds, got {_short(ttl_seconds)}")
    if not 1 <= ttl_seconds <= MAX_TTL_SECONDS:
        raise ValidationError(f"ttl_seconds must be between 1 and {MAX_TTL_SECONDS} (90 days), "
                              f"got {_short(ttl_seconds)}")
    return int(ttl_seconds * 1000)


def check_text(value: Any, what: str, max_chars: int = MAX_TEXT_CHARS) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > max_chars:
        raise ValidationError(f"{what} must be text of at most {max_chars} characters")
    if not is_text(value):  # PostgreSQL text cannot hold NUL, no reader decodes a lone surrogate
        raise ValidationError(f"{what} must be valid UTF-8 text without NUL characters or lone surrogates")
    return value


def is_key_text(value: Any, max_chars: int) -> bool:
    """Whether `value` could be a stored id or code at all (a lookup of anything else finds nothing)."""
    return isinstance(value, str) and 0 < len(value) <= max_chars and is_text(value)


def check_time_ms(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 63:
        raise ValidationError(f"{what} must be a whole number of milliseconds since the epoch")
    return value


def check_release_condition(condition: Any) -> dict | None:
    """Normalise a benchmark release condition; the verifier defaults to "self" (the seeds)."""
    if condition is None:
        return None
    if not isinstance(condition, dict):
        raise ValidationError("release_condition must be an object such as "
                              '{"type": "benchmark", "metric": "accuracy", "threshold": 0.85}')
    if condition.get("type") == "milestones":
        return check_milestones(condition)
    if condition.get("type", "benchmark") != "benchmark":
        raise ValidationError(f"release_condition type {condition.get('type')!r} is not supported; "
                              "use \"benchmark\" or \"milestones\"")
    metric, higher = _metric_and_direction(condition)
    verifier = condition.get("verifier") or "self"
    if not is_key_text(verifier, 64):
        raise ValidationError("release_condition.verifier must be \"self\", \"buyer\" or an agent id")
    return {"type": "benchmark", "metric": metric,
            "threshold": check_score(condition.get("threshold"), "release_condition.threshold"),
            "higher_is_better": higher, "verifier": verifier}


def _metric_and_direction(condition: dict) -> tuple[str, bool]:
    metric = condition.get("metric")
    if not is_key_text(metric, 64):
        raise ValidationError("release_condition.metric must name the metric, e.g. \"accuracy\"")
    higher = condition.get("higher_is_better", True)
    if not isinstance(higher, bool):
        raise ValidationError("release_condition.higher_is_better must be true or false")
    return metric, higher


MAX_MILESTONES = 20
_MILESTONES_EXAMPLE = ('{"type": "milestones", "metric": "accuracy", "milestones": [{"threshold": 0.8, '
                       '"share_bps": 3000}, {"threshold": 0.88, "share_bps": 4000}, {"threshold": 0.92, '
                       '"share": "rest"}]}')


def check_milestones(condition: dict) -> dict:
    """Normalise a milestone condition: ordered thresholds, each releasing a share of the escrow.

    Shares are whole basis points (`share_bps`, 1 = 0.01%) summing to at most 10000; the last
    milestone may take `"share": "rest"` (whatever the earlier ones leave). Thresholds must
    get strictly harder in order. A verifier other than the seller is required: "self" is
    refused, and the default is the buyer.
    """
    metric, higher = _metric_and_direction(condition)
    unknown = set(condition) - {"type", "metric", "higher_is_better", "verifier", "milestones"}
    if unknown:
        raise ValidationError(f"release_condition has unknown keys {', '.join(sorted(unknown))}; "
                              f"a milestone condition looks like {_MILESTONES_EXAMPLE}")
    verifier = condition.get("verifier") or "buyer"
    if verifier == "self":
        raise ValidationError("milestones are paid on a verifier's own score: name \"buyer\" (the default) or "
                              "another agent, not \"self\"")
    if not is_key_text(verifier, 64):
        raise ValidationError("release_condition.verifier must be \"buyer\" or an agent id")
    items = condition.get("milestones")
    if not isinstance(items, list) or not items:
        raise ValidationError(f"release_condition.milestones must be a non-empty list, e.g. {_MILESTONES_EXAMPLE}")
    if len(items) > MAX_MILESTONES:
        raise ValidationError(f"at most {MAX_MILESTONES} milestones, got {len(items)}")
    milestones, total_bps = [], 0
    for number, item in enumerate(items, 1):
        where = f"milestone {number}"
        if not isinstance(item, dict) or set(item) - {"threshold", "share_bps", "share"}:
            raise ValidationError(f"{where} must be {{\"threshold\": x, \"share_bps\": n}} "
                                  "(or \"share\": \"rest\" on the last one)")
        threshold = check_score(item.get("threshold"), f"{where} threshold")
        if milestones and not (threshold > milestones[-1]["threshold"] if higher
                               else threshold < milestones[-1]["threshold"]):
            raise ValidationError(f"{where} threshold {threshold} must be {'above' if higher else 'below'} "
                                  f"milestone {number - 1}'s {milestones[-1]['threshold']}: milestones are "
                                  "listed in the order they are reached")
        rest = "share" in item
        if rest and ("share_bps" in item or item["share"] != "rest" or number != len(items)):
            raise ValidationError(f"{where}: \"share\": \"rest\" is for the last milestone only, "
                                  "instead of share_bps")
        bps = MAX_BPS - total_bps if rest else item.get("share_bps")
        if isinstance(bps, bool) or not isinstance(bps, int) or not 1 <= bps <= MAX_BPS:
            raise ValidationError(f"{where} share_bps must be a whole number of basis points from 1 to {MAX_BPS} "
                                  f"(3000 = 30%), got {_short(item.get('share_bps'))}")
        total_bps += bps
        if total_bps > MAX_BPS:
            raise ValidationError(f"milestone shares add up to {total_bps} basis points, over 10000 (100%)")
        milestones.append({"threshold": threshold, "share_bps": bps, "rest": rest})
    return {"type": "milestones", "metric": metric, "higher_is_better": higher, "verifier": verifier,
            "milestones": milestones}


def check_milestone_amounts(condition: dict, amount_micro: int) -> None:
    """Every milestone must pay something: a share of a tiny escrow can round to nothing."""
    amounts = milestone_amounts(amount_micro, [m["share_bps"] for m in condition["milestones"]])
    if 0 in amounts:
        raise ValidationError(f"milestone {amounts.index(0) + 1}'s share of {amount_micro} micro-USDC rounds to "
                              "nothing; lock more or give it a larger share")


def is_milestones(condition: dict | None) -> bool:
    return bool(condition) and condition.get("type") == "milestones"


def benchmark_passes(condition: dict, score: float) -> bool:
    """Whether `score` meets a benchmark condition (or one milestone of a milestone condition)."""
    threshold = condition["threshold"]
    return score >= threshold if condition.get("higher_is_better", True) else score <= threshold


def check_bonus_conditions(conditions: Any) -> dict | None:
    """Normalise the vLLM guide's bonus_conditions {throughput_tps_min, bonus_pct}."""
    if conditions is None:
        return None
    if not isinstance(conditions, dict) or set(conditions) - {"throughput_tps_min", "bonus_pct"}:
        raise ValidationError('bonus_conditions must be {"throughput_tps_min": 100, "bonus_pct": 5}')
    tps_min = check_score(conditions.get("throughput_tps_min"), "bonus_conditions.throughput_tps_min")
    pct = to_decimal(conditions.get("bonus_pct"), what="bonus_conditions.bonus_pct")
    if tps_min < 0 or pct > MAX_BONUS_PCT:
        raise ValidationError("bonus_conditions need throughput_tps_min >= 0 and 0 <= bonus_pct <= 100")
    return {"throughput_tps_min": tps_min, "bonus_pct": str(pct)}


def streak_holds(paid_days: set[int], *, today: int, days: int, cancelled: bool) -> bool:
    """A seller's streak: a paid job on each of the `days` days before today, no cancellation."""
    return not cancelled and all(day in paid_days for day in range(today - days, today))




def usage_tokens(usage: Any) -> tuple[int, int]:
    """(prompt_tokens, completion_tokens) of a usage object; (0, 0) without one."""
    if usage is None:
        return 0, 0
    if not isinstance(usage, dict):
        raise ValidationError('usage must be {"prompt_tokens": n, "completion_tokens": m}')
    counts = []
    for name in ("prompt_tokens", "completion_tokens"):
        value = usage.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKENS_PER_CALL:
            raise ValidationError(f"usage.{name} must be a whole number of tokens, got {value!r}")
        counts.append(value)
    return counts[0], counts[1]


def hash_secret(secret: str) -> str:
    """API keys and spend tokens are random 256-bit secrets: one SHA-256 stores them safely."""
    # surrogatepass: a malformed secret hashes to something no stored secret matches.
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()
