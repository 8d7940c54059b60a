"""What the clients return: plain, immutable objects whose money is integer micro-USDC.

Every amount is stored once, as an ``*_micro`` int (what the ledger and the wire carry);
the USDC attribute of the same name (``escrow.remaining``) is a read-only exact Decimal
view of it, so code that does money math reads the ints and code that shows money reads
the Decimals, and nothing rebuilds integers from Decimals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from ._exceptions import EscrowError, error_for_status
from .money import require, to_usdc


def _micro(data: dict, name: str) -> int:
    return int(data.get(f"{name}_micro", 0))


class usdc:
    """A read-only Decimal USDC view of the int field ``<name>_micro`` (None stays None)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.field = f"{name}_micro"
        owner._usdc_views = (*getattr(owner, "_usdc_views", ()), name)

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        micro = getattr(obj, self.field)
        return None if micro is None else to_usdc(micro)


def _time(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


@dataclass(frozen=True)
class Agent:
    """A registered agent. `api_key` is only known right after registering."""

    agent_id: str
    api_key: str | None
    wallet: str
    referral_code: str
    referred_by: str | None = None

    @classmethod
    def from_dict(cls, data: dict) -> "Agent":
        return cls(data["agent_id"], data.get("api_key"), data["wallet"], data["referral_code"],
                   data.get("referred_by"))


@dataclass(frozen=True)
class Me:
    agent_id: str
    balance_micro: int
    referral_code: str
    wallet: str
    escrows_open: int
    referred_by: str | None = None

    balance = usdc()

    @classmethod
    def from_dict(cls, data: dict) -> "Me":
        return cls(data["agent_id"], _micro(data, "balance"), data["referral_code"], data["wallet"],
                   int(data["escrows_open"]), data.get("referred_by"))


@dataclass(frozen=True)
class EscrowEvent:
    kind: str
    actor: str | None
    at: datetime
    data: dict

    @classmethod
    def from_dict(cls, data: dict) -> "EscrowEvent":
        return cls(data["kind"], data.get("actor"), _time(data["at_ms"]), data.get("data") or {})


@dataclass(frozen=True)
class Milestone:
    """One milestone of a milestone escrow: its threshold, its share (`amount`) and how far it got.

    `status` is "open" (not reached, or its last result failed), "submitted" (awaiting the
    verifier) or "paid" (`paid` gross went to the seller).
    """

    number: int
    threshold: float
    share_bps: int
    rest: bool
    amount_micro: int
    status: str
    paid_micro: int
    failures: int
    verified_score: float | None
    sha256: str | None

    amount, paid = usdc(), usdc()

    @classmethod
    def from_dict(cls, data: dict) -> "Milestone":
        return cls(int(data["number"]), float(data["threshold"]), int(data["share_bps"]), bool(data["rest"]),
                   _micro(data, "amount"), data["status"], _micro(data, "paid"), int(data.get("failures", 0)),
                   data.get("verified_score"), data.get("sha256"))


@dataclass(frozen=True)
class Escrow:
    """An escrow as the ledger last saw it. Always ``amount == paid + refunded + held + remaining``.

    `held` is reserved by open holds; `remaining` is what can still be spent or held.
    `spend_token` is only set on the answer to the create that made the escrow (shown once).
    """

    id: str
    buyer: str
    seller: str
    status: str
    amount_micro: int
    remaining_micro: int
    paid_micro: int        # gross paid to the seller (fees included)
    fees_micro: int        # platform fee taken from `paid` (referral included)
    referral_micro: int    # the referrer's share of `fees`
    refunded_micro: int
    bonus_micro: int       # the part of `paid` that was bonus
    expires_at: datetime
    created_at: datetime
    closed_at: datetime | None
    tokens_in: int
    tokens_out: int
    model: str | None
    description: str | None
    meta: dict | None
    verifier: str | None
    referrer: str | None
    release_condition: dict | None
    bonus_conditions: dict | None
    pricing: dict | None
    result: dict | None
    events: list[EscrowEvent] = field(default_factory=list)
    held_micro: int = 0
    spend_token: str | None = field(default=None, repr=False)  # a secret: kept out of logged reprs
    key_id: str | None = None  # the budgeted key that opened it for its buyer, if one did
    milestones: list[Milestone] | None = None  # a milestone escrow's milestones, in order

    amount, remaining, paid, fees, referral, refunded, bonus, held = (usdc() for _ in range(8))

    def __post_init__(self):
        require(self.amount_micro == self.paid_micro + self.refunded_micro + self.held_micro + self.remaining_micro,
                f"escrow {self.id} breaks amount == paid + refunded + held + remaining")

    @property
    def is_open(self) -> bool:
        return self.status in ("active", "awaiting_verification")

    @classmethod
    def from_dict(cls, data: dict) -> "Escrow":
        return cls(
            id=data["id"], buyer=data["buyer"], seller=data["seller"], status=data["status"],
            amount_micro=_micro(data, "amount"), remaining_micro=_micro(data, "remaining"),
            paid_micro=_micro(data, "paid"), fees_micro=_micro(data, "fees"), referral_micro=_micro(data, "referral"),
            refunded_micro=_micro(data, "refunded"), bonus_micro=_micro(data, "bonus"), expires_at=_time(data["expires_at_ms"]),
            created_at=_time(data["created_at_ms"]), closed_at=_time(data.get("closed_at_ms")),
            tokens_in=int(data.get("tokens_in", 0)), tokens_out=int(data.get("tokens_out", 0)),
            model=data.get("model"), description=data.get("description"), meta=data.get("meta"),
            verifier=data.get("verifier"), referrer=data.get("referrer"),
            release_condition=data.get("release_condition"), bonus_conditions=data.get("bonus_conditions"),
            pricing=data.get("pricing"), result=data.get("result"),
            events=[EscrowEvent.from_dict(e) for e in data.get("events") or []],
            held_micro=_micro(data, "held"), spend_token=data.get("spend_token"), key_id=data.get("key_id"),
            milestones=None if data.get("milestones") is None else [Milestone.from_dict(m) for m in data["milestones"]],
        )


@dataclass(frozen=True)
class BudgetedKey:
    """A key an agent minted for a sub-agent: its mandate and what it has used.

    `left == budget - (locked - refunded)`: paid and still-locked money uses the budget, a
    refund gives it back. `api_key` is only set on the answer to `create_key` (shown once).

    Example:
        >>> k = buyer.create_key(budget="1.00", sellers=["seller-1"], max_escrow="0.25", expires_in=3600)
        >>> k.left, k.active
        (Decimal('1.000000'), True)
    """

    key_id: str
    owner: str
    label: str | None
    budget_micro: int
    max_escrow_micro: int | None
    sellers: list[str] | None   # None: any seller
    locked_micro: int           # what its escrows locked over its life
    paid_micro: int             # gross paid to sellers out of them
    refunded_micro: int         # what came back to the owner
    in_escrow_micro: int        # still locked or held in its escrows
    left_micro: int             # what it may still lock
    escrows: int
    escrows_open: int
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    active: bool
    cancelled: list[str] = field(default_factory=list)          # escrows revoke_key cancelled
    api_key: str | None = field(default=None, repr=False)      # a secret: kept out of logged reprs

    budget, max_escrow, locked, paid, refunded, in_escrow, left = (usdc() for _ in range(7))

    @classmethod
    def from_dict(cls, data: dict) -> "BudgetedKey":
        max_escrow = data.get("max_escrow_micro")
        return cls(
            key_id=data["key_id"], owner=data["owner"], label=data.get("label"), budget_micro=_micro(data, "budget"),
            max_escrow_micro=None if max_escrow is None else int(max_escrow), sellers=data.get("sellers"),
            locked_micro=_micro(data, "locked"), paid_micro=_micro(data, "paid"),
            refunded_micro=_micro(data, "refunded"), in_escrow_micro=_micro(data, "in_escrow"),
            left_micro=_micro(data, "left"), escrows=int(data["escrows"]),
            escrows_open=int(data["escrows_open"]), created_at=_time(data["created_at_ms"]),
            expires_at=_time(data.get("expires_at_ms")), revoked_at=_time(data.get("revoked_at_ms")),
            active=bool(data["active"]), cancelled=list(data.get("cancelled") or []), api_key=data.get("api_key"))


@dataclass(frozen=True)
class Hold:
    """Part of an escrow's remainder reserved by `holder` for one piece of work.

    Captures pay the escrow's seller out of it; `open` is what can still be captured
    (0 once the hold is captured in full, voided or expired).

    Example:
        >>> h = seller.hold(e.spend_token, "0.05", ttl_seconds=60)
        >>> h.status, h.amount, h.open
        ('open', Decimal('0.050000'), Decimal('0.050000'))
    """

    id: str
    escrow_id: str
    holder: str
    status: str            # open | captured | voided | expired
    amount_micro: int      # reserved when the hold was made
    captured_micro: int    # paid out of it so far (gross, fees included)
    open_micro: int
    created_at: datetime
    expires_at: datetime
    closed_at: datetime | None
    escrow_status: str
    escrow_remaining_micro: int

    amount, captured, open, escrow_remaining = usdc(), usdc(), usdc(), usdc()

    def __post_init__(self):
        require(self.captured_micro <= self.amount_micro, f"hold {self.id} captured more than it held")
        require(self.open_micro == (self.amount_micro - self.captured_micro if self.status == "open" else 0),
                f"hold {self.id}: open amount does not match amount - captured")

    @property
    def is_open(self) -> bool:
        return self.status == "open"

    @classmethod
    def from_dict(cls, data: dict) -> "Hold":
        return cls(
            id=data["id"], escrow_id=data["escrow_id"], holder=data["holder"], status=data["status"],
            amount_micro=_micro(data, "amount"), captured_micro=_micro(data, "captured"),
            open_micro=_micro(data, "open"),
            created_at=_time(data["created_at_ms"]), expires_at=_time(data["expires_at_ms"]),
            closed_at=_time(data.get("closed_at_ms")), escrow_status=data["escrow_status"],
            escrow_remaining_micro=_micro(data, "escrow_remaining"),
        )


@dataclass(frozen=True)
class Receipt:
    """What one deduct, release, cancel, submit_result, verify, capture or void did.

    `gross` left the escrow for the seller: `base` plus `bonus`; the seller got `net`,
    `fee` went to the platform, of which `referral` went on to the referrer. `refunded`
    went back to the buyer. `rounded_from` is the amount as sent when it had more than
    six decimals and was rounded (half-even) to the micro-USDC. A capture's or a void's
    receipt carries the `hold` as the operation left it.
    """

    kind: str
    escrow_id: str
    status: str
    remaining_micro: int
    gross_micro: int
    base_micro: int
    bonus_micro: int
    net_micro: int
    fee_micro: int
    referral_micro: int
    refunded_micro: int
    escrow: Escrow
    bonus_parts_micro: dict[str, int] = field(default_factory=dict)
    rounded_from: str | None = None
    passed: bool | None = None
    score: float | None = None
    hold: Hold | None = None
    milestone: int | None = None          # the milestone this submit or verdict was for

    remaining, gross, base, bonus, net, fee, referral, refunded = (usdc() for _ in range(8))

    def __post_init__(self):
        require(self.gross_micro == self.net_micro + self.fee_micro
                and self.gross_micro == self.base_micro + self.bonus_micro,
                f"receipt for {self.escrow_id} does not add up: {self}")

    @property
    def bonus_parts(self) -> dict[str, Decimal]:
        """Each earned bonus (throughput, quality, streak) in USDC."""
        return {name: to_usdc(micro) for name, micro in self.bonus_parts_micro.items()}

    @classmethod
    def from_dict(cls, data: dict) -> "Receipt":
        return cls(
            kind=data["kind"], escrow_id=data["escrow_id"], status=data["status"],
            remaining_micro=_micro(data, "remaining"), gross_micro=_micro(data, "gross"),
            base_micro=int(data.get("base_micro", data.get("gross_micro", 0)) or 0),
            bonus_micro=_micro(data, "bonus"), net_micro=_micro(data, "net"), fee_micro=_micro(data, "fee"),
            referral_micro=_micro(data, "referral"), refunded_micro=_micro(data, "refunded"),
            escrow=Escrow.from_dict(data["escrow"]),
            bonus_parts_micro={k.removesuffix("_micro"): int(v) for k, v in (data.get("bonus_parts") or {}).items()},
            rounded_from=data.get("rounded_from"), passed=data.get("passed"), score=data.get("score"),
            hold=Hold.from_dict(data["hold"]) if data.get("hold") else None, milestone=data.get("milestone"),
        )


@dataclass(frozen=True)
class CaptureResult:
    """One item of a `capture_many` batch: its receipt, or the error that refused it alone.

    Example:
        >>> [r.ok for r in seller.capture_many([(h1.id, "0.01", True), (h2.id, "99", True)])]
        [True, False]
    """

    ok: bool
    receipt: Receipt | None = None
    error: EscrowError | None = None

    def __post_init__(self):
        if (self.receipt is not None) != self.ok or (self.error is None) != self.ok:
            raise ValueError(f"a CaptureResult has a receipt when ok and an error otherwise: {self}")

    @classmethod
    def from_dict(cls, data: dict) -> "CaptureResult":
        if data["ok"]:
            return cls(True, receipt=Receipt.from_dict(data["receipt"]))
        # The same error class a single capture raises: rebuilt from its code and status.
        return cls(False, error=error_for_status(int(data["status"]),
                                                 {"error": data.get("error"), "message": data.get("message")}))


def as_dict(value: Any) -> Any:
    """A JSON-able view of a model for --json output: its fields (``*_micro`` ints) with each
    amount's USDC view beside them (Decimals as strings), times as ISO 8601."""
    from dataclasses import fields, is_dataclass
    if is_dataclass(value) and not isinstance(value, type):
        names = [f.name for f in fields(value)] + list(getattr(value, "_usdc_views", ()))
        if isinstance(value, Receipt):
            names.append("bonus_parts")
        return {name: as_dict(getattr(value, name)) for name in names}
    if isinstance(value, dict):
        return {k: as_dict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_dict(v) for v in value]
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return value
