"""A model-based test of the whole ledger: random sequences of every operation, checked step by step.

The model predicts, in integer micro-USDC, the outcome of each call (its error class, or the
exact amounts it moves) with arithmetic of its own (integer half-even, fractions), and after
every step compares every agent balance, every escrow and every hold with the ledger, and
runs the audit. Holds are modelled as reservations: an escrow's `held` is the open part of
its open holds, `remaining` what is neither paid, refunded nor held, and closing an escrow
leaves its holds the grace to capture work already delivered.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from sqlalchemy import func, select

from hf_escrow import (
    EscrowError, Forbidden, IdempotencyConflict, InsufficientFunds, NotFound, RateLimited, StateConflict,
    ValidationError,
)
from hf_escrow.ledger import Ledger, LedgerConfig, audit
from hf_escrow.ledger.schema import accounts, escrows, holds, spend_tokens
from hf_escrow.money import format_usdc, to_usdc

from .conftest import PG_SKIP_REASON, FakeClock, fresh_pg_database
from .holds_helpers import hold_snapshot as snapshot

DAY_MS = 86_400_000
FEE_BPS, REFERRAL_BPS = 100, 1_500
FAUCET_MICRO = 10_000_000
PARTIES = ("b1", "b2", "s1", "s2")
AGENTS = ("r1", "v1") + PARTIES   # r1 refers s1 at registration; v1 verifies
KEY_KEEP_MS = DAY_MS - 1_000  # keys are kept at least 24 h: replay only younger ones
PICK = st.tuples(st.integers(0, 10_000), st.sampled_from([False, False, False, True]))  # (which, any escrow?)
PRICE_SHEETS = [None, {"input_per_1k": "0.0005", "output_per_1k": "0.0015"}, {"per_token": "0.000003"}]
GRACE_MS = 30_000            # LedgerConfig's hold_grace_s
MAX_HOLD_TTL_MS = 900_000    # LedgerConfig's hold_max_ttl_s
BOGUS_TOKEN = "est_" + "q" * 43
GHOST_HOLD = "hold_" + "0" * 24
ERROR_CODES = {NotFound: ("not_found", 404), Forbidden: ("forbidden", 403), StateConflict: ("state_conflict", 409),
               InsufficientFunds: ("insufficient_funds", 402)}


def half_even(value: Fraction) -> int:
    assert value >= 0
    quotient, rest = divmod(value.numerator, value.denominator)
    if 2 * rest > value.denominator or (2 * rest == value.denominator and quotient % 2):
        quotient += 1
    return quotient


def split(e: "ModelEscrow", gross: int) -> tuple[int, int, int]:
    """(net, fee, referral) of the escrow's next payout, computed independently of hf_escrow.money.

    Fees are exact over the escrow's life: the fee on everything paid so far, less the fees
    already taken (likewise the referral share of the fee).
    """
    fee_after = half_even(Fraction((e.paid + gross) * FEE_BPS, 10_000))
    fee = min(max(fee_after - e.fees, 0), gross)
    referral = 0
    if e.referrer is not None:
        referral_after = half_even(Fraction((e.fees + fee) * REFERRAL_BPS, 10_000))
        referral = min(max(referral_after - e.referral_paid, 0), fee)
    return gross - fee, fee, referral


def token_cost(sheet: dict, prompt: int, completion: int) -> int:
    total = Fraction(0)
    if "per_token" in sheet:
        total += (prompt + completion) * Fraction(sheet["per_token"])
    if "input_per_1k" in sheet:
        total += prompt * Fraction(sheet["input_per_1k"]) / 1000
    if "output_per_1k" in sheet:
        total += completion * Fraction(sheet["output_per_1k"]) / 1000
    return half_even(total * 1_000_000)


@dataclass
class ModelEscrow:
    id: str
    buyer: str
    seller: str
    verifier: str | None
    referrer: str | None
    amount: int
    expires_at_ms: int
    threshold: float | None = None        # benchmark escrows
    bonus: tuple[float, int] | None = None  # (throughput_tps_min, bonus_pct)
    pricing: dict | None = None
    paid: int = 0
    bonus_paid: int = 0
    fees: int = 0
    referral_paid: int = 0
    refunded: int = 0
    held: int = 0          # the open part of its open holds
    remaining: int = 0     # spendable: amount == paid + refunded + held + remaining
    status: str = "active"
    closed_at_ms: int | None = None
    cancelled_by: str | None = None
    tokens: list = field(default_factory=list)  # [token, revoked]

    @property
    def open(self) -> bool:
        return self.status in ("active", "awaiting_verification")


@dataclass
class ModelHold:
    id: str
    escrow: ModelEscrow
    holder: str
    amount: int
    created_at_ms: int
    expires_at_ms: int
    captured: int = 0
    status: str = "open"

    @property
    def open_micro(self) -> int:
        return self.amount - self.captured if self.status == "open" else 0


@dataclass
class KeyedCall:
    agent: str
    method: str
    args: tuple
    kwargs: dict
    result: Any
    at_ms: int
    alternatives: list = field(default_factory=list)  # (method, args, kwargs) with the same key, another request


class LedgerMachine(RuleBasedStateMachine):
    """Subclasses say where the database lives (`open_database`/`close_database`)."""

    def open_database(self) -> str:
        raise NotImplementedError

    def close_database(self) -> None:
        pass

    # ---- setup ----------------------------------------------------------------------

    def __init__(self):
        super().__init__()
        self.clock = FakeClock()
        self.ledger = Ledger(self.open_database(), config=LedgerConfig(), clock=self.clock)
        self.balances = {agent: 0 for agent in AGENTS}
        self.minted = 0
        self.platform = 0
        self.escrows: list[ModelEscrow] = []
        self.holds: list[ModelHold] = []
        self.last_faucet: dict[str, int] = {}
        self.keyed: list[KeyedCall] = []
        self.key_counter = 0
        self.codes = {}
        self.referred_by = {}
        for agent in AGENTS:
            code = self.codes["r1"] if agent == "s1" else None
            self.codes[agent] = self.ledger.register(agent, referral_code=code)["referral_code"]
            self.referred_by[agent] = "r1" if agent == "s1" else None
        for agent in PARTIES:
            self._deposit(agent, 20_000_000)

    def teardown(self):
        if hasattr(self, "ledger"):
            self.ledger.close()
        self.close_database()

    # ---- helpers ----------------------------------------------------------------------

    @property
    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _key(self, use: bool) -> str | None:
        if not use:
            return None
        self.key_counter += 1
        return f"key-{self.key_counter}"

    def _deposit(self, agent: str, micro: int) -> None:
        self.ledger.deposit(agent, format_usdc(micro))
        self.balances[agent] += micro
        self.minted += micro

    def _remember(self, key, agent, method, args, kwargs, result, alternatives):
        if key is not None:
            if isinstance(result, dict) and "spend_token" in result:
                # A replay answers the first result less its secret: the token is shown once.
                result = {k: v for k, v in result.items() if k != "spend_token"}
            self.keyed.append(KeyedCall(agent, method, args, kwargs, result, self.now_ms, alternatives))

    def _call(self, expected_error, method: str, *args, key=None, alternatives=(), **kwargs):
        """Call the ledger; an expected error must be exactly that class and move nothing."""
        kwargs = dict(kwargs)
        event(f"{method}: {expected_error.__name__ if expected_error else 'ok'}")
        if key is not None:
            kwargs["idempotency_key"] = key
        if expected_error is not None:
            # a call that finds its escrow past the TTL refunds it (and only that) before refusing
            expiring, self._expiring = getattr(self, "_expiring", False), False
            before = None if expiring else snapshot(self.ledger)
            with pytest.raises(EscrowError) as info:
                getattr(self.ledger, method)(*args, **kwargs)
            assert type(info.value) is expected_error, \
                f"{method}{args}: {type(info.value).__name__}({info.value}) instead of {expected_error.__name__}"
            if before is not None:
                assert snapshot(self.ledger) == before, f"refused {method} moved something"
            return None
        result = getattr(self.ledger, method)(*args, **kwargs)
        self._remember(key, args[0], method, args, kwargs, result, list(alternatives))
        return result

    def _amount_forms(self, micro: int, form: int) -> Any:
        """The same amount as text, Decimal, float or (when whole) an int."""
        usdc = to_usdc(micro)
        if form == 0:
            return format_usdc(micro)
        if form == 1:
            return usdc
        if form == 2:
            return float(usdc)
        return int(usdc) if usdc == usdc.to_integral_value() else str(usdc.normalize())

    def _live(self, prefer) -> bool:
        return any(e.open and e.expires_at_ms > self.now_ms and prefer(e) for e in self.escrows)

    def _workable(self) -> bool:
        return self._live(lambda e: True)

    def _benchmark_workable(self) -> bool:
        return self._live(lambda e: e.status == "active" and e.threshold is not None)

    def _awaiting(self) -> bool:
        return self._live(lambda e: e.status == "awaiting_verification")

    def _pick(self, pick: tuple[int, bool], prefer=lambda e: e.status == "active") -> ModelEscrow:
        """Mostly an escrow the operation can work on (open, before its TTL), sometimes any escrow."""
        index, anyone = pick
        preferred = [e for e in self.escrows if e.open and e.expires_at_ms > self.now_ms and prefer(e)]
        pool = self.escrows if anyone or not preferred else preferred
        return pool[index % len(pool)]

    def _actor(self, e: ModelEscrow, who: str) -> str:
        if who == "buyer":
            return e.buyer
        if who == "seller":
            return e.seller
        if who == "verifier":
            return e.verifier or "v1"
        return next(a for a in AGENTS if a not in (e.buyer, e.seller, e.verifier))

    def _expire(self, e: ModelEscrow) -> None:
        self._close(e, "expired")

    def _close(self, e: ModelEscrow, status: str) -> int:
        """Refund the spendable remainder; open holds keep at most the grace from now."""
        refund = e.remaining
        self.balances[e.buyer] += refund
        e.refunded += refund
        e.remaining = 0
        e.status = status
        e.closed_at_ms = self.now_ms
        for h in self._holds_of(e):
            h.expires_at_ms = min(h.expires_at_ms, self.now_ms + GRACE_MS)
        return refund

    def _pay(self, e: ModelEscrow, gross: int, bonus: int = 0, *, held: bool = False) -> tuple[int, int, int]:
        """Pay the seller out of the remainder, or (a capture) out of what holds reserve."""
        net, fee, referral = split(e, gross)
        if held:
            assert gross <= e.held
            e.held -= gross
        else:
            assert gross <= e.remaining
            e.remaining -= gross
        e.paid += gross
        e.bonus_paid += bonus
        e.fees += fee
        e.referral_paid += referral
        self.balances[e.seller] += net
        if e.referrer:
            self.balances[e.referrer] += referral
        self.platform += fee - referral
        return net, fee, referral

    def _holds_of(self, e: ModelEscrow) -> list[ModelHold]:
        return [h for h in self.holds if h.escrow is e and h.status == "open"]

    def _free(self, h: ModelHold, status: str) -> int:
        """Close a hold; what it frees returns to the remainder, or to the buyer once the escrow closed."""
        e, freed = h.escrow, h.open_micro
        h.status = status
        e.held -= freed
        if e.open:
            e.remaining += freed
            return 0
        self.balances[e.buyer] += freed
        e.refunded += freed
        return freed

    def _expire_hold(self, h: ModelHold) -> None:
        """The ledger's expire_hold: the escrow's own expiry first, then the hold is freed, once."""
        if h.status != "open":
            return
        if h.escrow.open and h.escrow.expires_at_ms <= self.now_ms:
            self._expire(h.escrow)
        event(f"hold expired on a {h.escrow.status} escrow")
        self._free(h, "expired")

    def _sweep(self) -> int:
        """What one `expire_due()` does: escrows past their TTL, then holds past theirs."""
        due = [e for e in self.escrows if e.open and e.expires_at_ms <= self.now_ms]
        for e in due:
            self._expire(e)
        due_holds = [h for h in self.holds if h.status == "open" and h.expires_at_ms <= self.now_ms]
        for h in due_holds:
            self._expire_hold(h)
        return len(due) + len(due_holds)

    def _gate(self, e: ModelEscrow, actor: str, allowed: tuple, states: tuple):
        """The ledger's checks in its order: visible, role, expiry (refunds), state. Returns an error or None."""
        if actor not in (e.buyer, e.seller, e.verifier):
            return NotFound
        if actor not in allowed:
            return Forbidden
        if e.open and e.expires_at_ms <= self.now_ms:
            self._expire(e)
            self._expiring = True
            return StateConflict
        if e.status not in states:
            return StateConflict
        return None

    def _streak(self, seller: str) -> bool:
        today = self.now_ms // DAY_MS
        window_start = (today - 7) * DAY_MS
        recent = [x for x in self.escrows if x.seller == seller and x.closed_at_ms is not None
                  and x.closed_at_ms >= window_start and x.status in ("released", "cancelled")]
        if any(x.status == "cancelled" and x.cancelled_by == seller for x in recent):
            return False  # only the seller's own cancel breaks its streak
        paid_days = {x.closed_at_ms // DAY_MS for x in recent if x.status == "released"}
        return all(day in paid_days for day in range(today - 7, today))

    # ---- rules ------------------------------------------------------------------------

    @rule(agent=st.sampled_from(AGENTS), micro=st.one_of(st.integers(1, 100), st.integers(1, 50_000_000)))
    def deposit(self, agent, micro):
        self._deposit(agent, micro)

    @rule(agent=st.sampled_from(AGENTS), use_key=st.booleans())
    def claim_faucet(self, agent, use_key):
        last = self.last_faucet.get(agent)
        key = self._key(use_key)
        if last is not None and last > self.now_ms - DAY_MS:
            self._call(RateLimited, "claim_faucet", agent, key=key)
            return
        result = self._call(None, "claim_faucet", agent, key=key,
                            alternatives=[("deposit", (agent, "0.000001"), {})])
        self.balances[agent] += FAUCET_MICRO
        self.minted += FAUCET_MICRO
        self.last_faucet[agent] = self.now_ms
        assert result["amount_micro"] == FAUCET_MICRO and result["balance_micro"] == self.balances[agent]

    CREATE_ARGS = dict(
        buyer=st.sampled_from(PARTIES),
        seller_offset=st.sampled_from([1, 1, 2, 2, 3, 3, 0]),   # 0: the buyer itself (refused)
        micro=st.one_of(st.integers(1, 20), st.integers(1, 3_000_000), st.integers(1, 40_000_000)),
        form=st.integers(0, 3),
        ttl=st.sampled_from([1, 30, 600, 3_600, 3_600, 86_400, 7 * 86_400]),
        kind=st.sampled_from(["plain", "plain", "priced", "bonus",
                              "bench-self", "bench-buyer", "bench-v1", "bench-v1"]),
        sheet=st.integers(1, len(PRICE_SHEETS) - 1),
        referral=st.sampled_from([None, None, None, "r1", "r1", "own"]),
        use_key=st.booleans())

    @initialize(**CREATE_ARGS)
    def first_escrow(self, **kwargs):
        self.create_escrow(**kwargs)

    @initialize(**CREATE_ARGS)
    def second_escrow(self, **kwargs):
        self.create_escrow(**kwargs)

    @initialize(**{**CREATE_ARGS, "micro": st.integers(1_000, 3_000_000), "ttl": st.sampled_from([600, 3_600, 86_400]),
                   "kind": st.sampled_from(["plain", "priced", "bonus"]), "seller_offset": st.sampled_from([1, 2, 3])})
    def escrow_to_hold_on(self, **kwargs):  # one that lives long enough for holds, captures and their grace
        self.create_escrow(**kwargs)

    @rule(**CREATE_ARGS)
    def create_escrow(self, buyer, seller_offset, micro, form, ttl, kind, sheet, referral, use_key):
        seller = PARTIES[(PARTIES.index(buyer) + seller_offset) % len(PARTIES)]
        kwargs: dict = {"ttl_seconds": ttl}
        threshold = bonus = pricing = None
        verifier = None
        if kind == "priced":
            pricing = kwargs["pricing"] = PRICE_SHEETS[sheet]
        elif kind == "bonus":
            bonus = (100.0, 5)
            kwargs["bonus_conditions"] = {"throughput_tps_min": 100, "bonus_pct": 5}
        elif kind.startswith("bench"):
            threshold = 0.8
            named = {"bench-self": None, "bench-buyer": "buyer", "bench-v1": "v1"}[kind]
            kwargs["release_condition"] = {"type": "benchmark", "metric": "accuracy", "threshold": threshold,
                                           **({"verifier": named} if named else {})}
            verifier = {"bench-self": None, "bench-buyer": buyer, "bench-v1": "v1"}[kind]
        if referral == "r1":
            kwargs["referral_code"] = self.codes["r1"]
        elif referral == "own":
            kwargs["referral_code"] = self.codes[seller]
        key = self._key(use_key)
        args = (buyer, seller, self._amount_forms(micro, form))
        # the ledger's order: seller is buyer, verifier is seller, self-referral, then funds
        if seller == buyer or (referral == "own"):
            self._call(ValidationError, "create_escrow", *args, key=key, **kwargs)
            return
        if self.balances[buyer] < micro:
            self._call(InsufficientFunds, "create_escrow", *args, key=key, **kwargs)
            return
        result = self._call(None, "create_escrow", *args, key=key,
                            alternatives=[("create_escrow", (buyer, seller, format_usdc(micro + 1)), kwargs)],
                            **kwargs)
        referrer = "r1" if referral == "r1" else self.referred_by[seller]
        e = ModelEscrow(result["id"], buyer, seller, verifier, referrer, micro, self.now_ms + ttl * 1000,
                        threshold=threshold, bonus=bonus, pricing=pricing, remaining=micro,
                        tokens=[[result["spend_token"], False]])
        self.balances[buyer] -= micro
        self.escrows.append(e)
        assert (result["amount_micro"], result["remaining_micro"], result["referrer"], result["verifier"]) == \
            (micro, micro, referrer, verifier)

    DEDUCT_ARGS = dict(
        pick=PICK, who=st.sampled_from(["seller"] * 6 + ["buyer", "other"]),
        part=st.sampled_from(["small", "small", "half", "half", "all", "over"]), tiny=st.integers(1, 30),
        use_key=st.booleans(), form=st.integers(0, 3))

    @precondition(lambda self: self._workable())
    @rule(**DEDUCT_ARGS)
    def deduct(self, pick, who, part, tiny, use_key, form):
        e = self._pick(pick)
        actor = self._actor(e, who)
        micro = {"small": tiny, "half": max(1, e.remaining // 2), "all": max(1, e.remaining),
                 "over": e.remaining + tiny}[part]
        args = (actor, e.id, self._amount_forms(micro, form))
        key = self._key(use_key)
        error = self._gate(e, actor, (e.seller,), ("active",))
        if error is None and e.threshold is not None:
            error = StateConflict  # a benchmark escrow pays on a passing result only
        if error is None and micro > e.remaining:
            error = InsufficientFunds
        if error is not None:
            self._call(error, "deduct", *args, key=key, reason="work")
            return
        result = self._call(None, "deduct", *args, key=key, reason="work",
                            alternatives=[("deduct", args, {"reason": "other work"})])
        net, fee, referral = self._pay(e, micro)
        assert (result["gross_micro"], result["net_micro"], result["fee_micro"], result["referral_micro"]) == \
            (micro, net, fee, referral)
        assert (result["status"], result["remaining_micro"]) == ("active", e.remaining)

    RELEASE_ARGS = dict(
        pick=PICK, who=st.sampled_from(["buyer"] * 6 + ["seller", "other"]),
        mode=st.sampled_from(["none", "amount", "amount", "over", "usage-price", "usage-sheet"]),
        fraction=st.integers(0, 100), prompt=st.integers(0, 5_000), completion=st.integers(0, 2_000),
        refund=st.booleans(), quality=st.sampled_from([None, 0.5, 0.9, 0.91, 0.95]),
        tps=st.sampled_from([None, 50.0, 100.0, 150.0]), use_key=st.booleans())

    @precondition(lambda self: self._workable())
    @rule(**RELEASE_ARGS)
    def release_again(self, **kwargs):  # money moves most here: give it twice the weight
        self.release(**kwargs)

    @precondition(lambda self: self._workable())
    @rule(**DEDUCT_ARGS)
    def deduct_again(self, **kwargs):
        self.deduct(**kwargs)

    @precondition(lambda self: self._workable())
    @rule(**RELEASE_ARGS)
    def release(self, pick, who, mode, fraction, prompt, completion, refund, quality, tps, use_key):
        e = self._pick(pick, lambda e: True)
        actor = self._actor(e, who)
        kwargs: dict = {"refund_remainder": refund, "quality_score": quality, "throughput_tps": tps}
        amount = None
        if mode == "amount":
            amount = e.remaining * fraction // 100
            kwargs["amount"] = format_usdc(amount)
        elif mode == "over":
            amount = e.remaining + 1 + fraction
            kwargs["amount"] = format_usdc(amount)
        elif mode.startswith("usage"):
            kwargs["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion}
            if mode == "usage-price":
                kwargs["price_per_token"] = "0.000002"
        key = self._key(use_key)
        error = self._gate(e, actor, (e.buyer,), ("active", "awaiting_verification"))
        base = None
        if error is None:
            if amount is not None:
                if amount > e.remaining:
                    error = InsufficientFunds
                base = amount
            elif mode == "usage-price":
                base = min(token_cost({"per_token": "0.000002"}, prompt, completion), e.remaining)
            elif mode == "usage-sheet":
                if e.pricing is None:
                    error = ValidationError
                else:
                    base = min(token_cost(e.pricing, prompt, completion), e.remaining)
            else:
                base = e.remaining
        if error is not None:
            self._call(error, "release", actor, e.id, key=key, **kwargs)
            return
        streak = self._streak(e.seller)
        if streak:
            event("release with a streak")
        result = self._call(None, "release", actor, e.id, key=key,
                            alternatives=[("release", (actor, e.id), {**kwargs, "meta": {"other": 1}})], **kwargs)

        def pct(p: int) -> int:
            return half_even(Fraction(base * p, 100))
        wanted = [pct(e.bonus[1]) if e.bonus and tps is not None and tps > e.bonus[0] else 0,
                  pct(10) if quality is not None and quality > 0.9 else 0,
                  pct(2) if streak else 0]
        room = e.remaining - base
        parts = []
        for value in wanted:
            parts.append(min(value, room))
            room -= parts[-1]
        bonus = sum(parts)
        net, fee, referral = self._pay(e, base + bonus, bonus)
        refunded = self._close(e, "released") if refund else 0
        assert result["bonus_parts"] == {"throughput_micro": parts[0], "quality_micro": parts[1],
                                         "streak_micro": parts[2]}
        assert (result["base_micro"], result["bonus_micro"], result["gross_micro"], result["net_micro"],
                result["fee_micro"], result["referral_micro"], result["refunded_micro"]) == \
            (base, bonus, base + bonus, net, fee, referral, refunded)
        assert (result["status"], result["remaining_micro"]) == (e.status, e.remaining)

    @precondition(lambda self: self._workable())
    @rule(pick=PICK, who=st.sampled_from(["buyer", "buyer", "seller", "seller", "verifier", "other"]),
          use_key=st.booleans())
    def cancel(self, pick, who, use_key):
        e = self._pick(pick, lambda e: True)
        actor = self._actor(e, who)
        key = self._key(use_key)
        # Not while a result awaits its verifier: the verdict or the TTL decides.
        error = self._gate(e, actor, (e.buyer, e.seller), ("active",))
        if error is not None:
            self._call(error, "cancel", actor, e.id, key=key)
            return
        result = self._call(None, "cancel", actor, e.id, key=key,
                            alternatives=[("cancel", (actor, e.id), {"reason": "another reason"})])
        refunded = self._close(e, "cancelled")
        e.cancelled_by = actor
        assert (result["status"], result["refunded_micro"], result["gross_micro"]) == ("cancelled", refunded, 0)

    def _judge(self, e: ModelEscrow, score: float, result: dict) -> None:
        if score >= e.threshold:
            gross = e.remaining
            net, fee, referral = self._pay(e, gross)
            self._close(e, "released")
            assert (result["passed"], result["gross_micro"], result["net_micro"], result["fee_micro"]) == \
                (True, gross, net, fee)
        else:
            e.status = "active"
            assert (result["passed"], result["gross_micro"]) == (False, 0)
        assert result["status"] == e.status

    @precondition(lambda self: self._benchmark_workable())
    @rule(pick=PICK, who=st.sampled_from(["seller"] * 6 + ["buyer", "other"]),
          score=st.sampled_from([0.5, 0.79, 0.8, 0.95]), wrong_metric=st.sampled_from([False] * 5 + [True]),
          use_key=st.booleans())
    def submit_result(self, pick, who, score, wrong_metric, use_key):
        e = self._pick(pick, lambda e: e.status == "active" and e.threshold is not None)
        actor = self._actor(e, who)
        metric = "f1" if wrong_metric else "accuracy"
        key = self._key(use_key)
        error = self._gate(e, actor, (e.seller,), ("active",))
        if error is None and e.threshold is None:
            error = StateConflict
        if error is None and wrong_metric:
            error = ValidationError
        if error is not None:
            self._call(error, "submit_result", actor, e.id, key=key, metric=metric, score=score)
            return
        result = self._call(None, "submit_result", actor, e.id, key=key, metric=metric, score=score,
                            alternatives=[("submit_result", (actor, e.id), {"metric": metric, "score": score + 1})])
        if e.verifier is not None:
            e.status = "awaiting_verification"
            assert (result["status"], result["gross_micro"]) == ("awaiting_verification", 0)
        else:
            self._judge(e, score, result)

    @precondition(lambda self: self._awaiting())
    @rule(pick=PICK, who=st.sampled_from(["verifier"] * 6 + ["buyer", "seller", "other"]),
          score=st.sampled_from([0.5, 0.8, 0.95]), use_key=st.booleans())
    def verify(self, pick, who, score, use_key):
        e = self._pick(pick, lambda e: e.status == "awaiting_verification")
        actor = self._actor(e, who)
        key = self._key(use_key)
        error = self._gate(e, actor, (e.verifier,), ("awaiting_verification",))
        if error is not None:
            self._call(error, "verify", actor, e.id, key=key, score=score)
            return
        result = self._call(None, "verify", actor, e.id, key=key, score=score,
                            alternatives=[("verify", (actor, e.id), {"score": score + 1})])
        self._judge(e, score, result)

    @precondition(lambda self: self.escrows)
    @rule(pick=PICK, who=st.sampled_from(["buyer", "seller", "verifier", "other"]))
    def get(self, pick, who):
        e = self._pick(pick, lambda e: True)
        actor = self._actor(e, who)
        if actor not in (e.buyer, e.seller, e.verifier):
            self._call(NotFound, "get", actor, e.id)
            return
        if e.open and e.expires_at_ms <= self.now_ms:
            self._expire(e)
        view = self.ledger.get(actor, e.id)
        assert (view["status"], view["paid_micro"], view["refunded_micro"], view["held_micro"],
                view["remaining_micro"]) == (e.status, e.paid, e.refunded, e.held, e.remaining)

    @rule(seconds=st.sampled_from([0.5, 1, 10, 30, 600, 3_600, 3_600, 43_200, 86_400, 129_600]),
          sweep=st.booleans())
    def advance_clock(self, seconds, sweep):
        self.clock.advance(seconds)
        if sweep:
            expected = self._sweep()
            assert self.ledger.expire_due() == expected

    @precondition(lambda self: self.keyed)
    @rule(index=st.integers(0, 10_000))
    def replay(self, index):
        call = self.keyed[index % len(self.keyed)]
        if self.now_ms - call.at_ms > KEY_KEEP_MS:
            return
        before = snapshot(self.ledger)
        event(f"replay {call.method}")
        again = getattr(self.ledger, call.method)(*call.args, **call.kwargs)
        assert again == call.result, f"replayed {call.method} answered differently"
        assert snapshot(self.ledger) == before, f"replayed {call.method} moved something"

    @precondition(lambda self: self.keyed)
    @rule(index=st.integers(0, 10_000))
    def reuse_key_for_another_request(self, index):
        call = self.keyed[index % len(self.keyed)]
        if self.now_ms - call.at_ms > KEY_KEEP_MS or not call.alternatives:
            return
        method, args, kwargs = call.alternatives[0]
        event(f"key conflict {call.method}")
        before = snapshot(self.ledger)
        with pytest.raises(IdempotencyConflict):
            getattr(self.ledger, method)(*args, **{**kwargs, "idempotency_key": call.kwargs["idempotency_key"]})
        assert snapshot(self.ledger) == before

    # ---- holds and spend tokens ---------------------------------------------------------

    def _hold_ttl_ms(self, ttl: float, e: ModelEscrow) -> int:
        return min(self.now_ms + max(1, int(min(ttl * 1000, MAX_HOLD_TTL_MS))), e.expires_at_ms + GRACE_MS)

    def _token_for(self, e: ModelEscrow, via: str) -> str:
        live = [t for t, revoked in e.tokens if not revoked]
        revoked = [t for t, gone in e.tokens if gone]
        if via == "token" and live:
            return live[-1]
        if via == "revoked" and revoked:
            return revoked[0]
        others = [t for x in self.escrows if x is not e for t, gone in x.tokens if not gone]
        if via == "other token" and others:
            return others[0]
        return BOGUS_TOKEN

    def _token_escrow(self, token: str) -> tuple[ModelEscrow | None, bool]:
        for x in self.escrows:
            for t, revoked in x.tokens:
                if t == token:
                    return x, revoked
        return None, False

    def _hold_gate(self, actor: str, target: str, e: ModelEscrow, by_token: bool):
        """(error or None, the escrow held on), in the ledger's order of checks."""
        if by_token:
            e, revoked = self._token_escrow(target)
            if e is None or revoked or e.seller != actor:
                return Forbidden, e
            error = self._gate(e, actor, (e.seller,), ("active",))
        else:
            error = self._gate(e, actor, (e.buyer, e.seller), ("active",))
        if error is None and e.threshold is not None and actor == e.seller:
            error = StateConflict  # a seller is paid on a gated escrow only by a passing result
        return error, e

    HOLD_ARGS = dict(
        pick=PICK, via=st.sampled_from(["token"] * 6 + ["id"] * 3 + ["revoked", "bogus", "other token"]),
        who=st.sampled_from(["seller"] * 8 + ["buyer", "buyer", "verifier", "other"]),
        part=st.sampled_from(["small", "small", "half", "all", "over"]), tiny=st.integers(1, 30),
        ttl=st.sampled_from([0.5, 5, 30, 60, 900, 3_600]), use_key=st.booleans(), form=st.integers(0, 3))

    @precondition(lambda self: self._workable())
    @rule(**HOLD_ARGS)
    def hold(self, pick, via, who, part, tiny, ttl, use_key, form):
        self._hold(pick, via, who, part, tiny, ttl, use_key, form)

    def _hold(self, pick, via, who, part, tiny, ttl, use_key, form) -> ModelHold | None:
        e = self._pick(pick, lambda e: e.status == "active" and e.remaining > 0 and e.threshold is None)
        actor = self._actor(e, who)
        by_token = via != "id"
        target = self._token_for(e, via) if by_token else e.id
        key = self._key(use_key)
        error, held_on = self._hold_gate(actor, target, e, by_token)
        base = held_on.remaining if held_on is not None else e.remaining
        micro = {"small": tiny, "half": max(1, base // 2), "all": max(1, base), "over": base + tiny}[part]
        args = (actor, target, self._amount_forms(micro, form))
        if error is None and micro > held_on.remaining:
            error = InsufficientFunds
        if error is not None:
            self._call(error, "hold", *args, key=key, ttl_seconds=ttl)
            return None
        result = self._call(None, "hold", *args, key=key, ttl_seconds=ttl,
                            alternatives=[("hold", (actor, target, format_usdc(micro + 1)), {"ttl_seconds": ttl})])
        h = ModelHold(result["id"], held_on, actor, micro, self.now_ms, self._hold_ttl_ms(ttl, held_on))
        self.holds.append(h)
        held_on.remaining -= micro
        held_on.held += micro
        assert (result["status"], result["holder"], result["escrow_id"], result["amount_micro"],
                result["open_micro"], result["expires_at_ms"], result["escrow_remaining_micro"]) == \
            ("open", actor, held_on.id, micro, micro, h.expires_at_ms, held_on.remaining)
        return h

    @precondition(lambda self: self._workable())
    @rule(**HOLD_ARGS)
    def hold_again(self, **kwargs):  # holds and their captures are most of a paid face's traffic: more weight
        self.hold(**kwargs)

    def _pick_hold(self, index: int, anyone: bool) -> ModelHold:
        """Mostly an open hold (past its TTL or not), sometimes any hold."""
        open_holds = [h for h in self.holds if h.status == "open"]
        pool = self.holds if anyone or not open_holds else open_holds
        return pool[index % len(pool)]

    def _hold_actor(self, h: ModelHold, who: str) -> str:
        if who == "holder":
            return h.holder
        if who == "party":
            return h.escrow.seller if h.holder == h.escrow.buyer else h.escrow.buyer
        return self._actor(h.escrow, who)

    def _capture_error(self, actor: str, h: ModelHold, micro: int):
        """Why the ledger refuses this capture (or void), in its order; None if it takes it."""
        if actor not in (h.escrow.buyer, h.escrow.seller):
            return NotFound
        if actor != h.holder:
            return Forbidden
        if h.status != "open":
            return StateConflict
        if h.expires_at_ms <= self.now_ms:
            return "expired"
        if micro > h.open_micro:
            return InsufficientFunds
        return None

    def _apply_capture(self, h: ModelHold, micro: int, final: bool, status: str = "captured") -> dict:
        """A capture the ledger takes: the escrow's expiry settled first, then the payout from the hold."""
        e = h.escrow
        if e.open and e.expires_at_ms <= self.now_ms:
            self._expire(e)
        if not e.open:
            event(f"captured within the grace of a {e.status} escrow")
        open_before = h.open_micro
        net, fee, referral = self._pay(e, micro, held=True)
        h.captured += micro
        refunded = 0
        if final or micro == open_before:
            refunded = self._free(h, status)
        return {"gross_micro": micro, "net_micro": net, "fee_micro": fee, "referral_micro": referral,
                "refunded_micro": refunded, "status": e.status, "remaining_micro": e.remaining}

    def _check_receipt(self, receipt: dict, h: ModelHold, expected: dict, kind: str) -> None:
        assert {name: receipt[name] for name in expected} == expected, (receipt, expected)
        assert receipt["kind"] == kind and receipt["escrow"]["held_micro"] == h.escrow.held
        hold = receipt["hold"]
        assert (hold["id"], hold["status"], hold["captured_micro"], hold["open_micro"], hold["expires_at_ms"]) == \
            (h.id, h.status, h.captured, h.open_micro, h.expires_at_ms)

    CAPTURE_ARGS = dict(
        index=st.integers(0, 10_000), anyone=st.sampled_from([False] * 4 + [True]),
        who=st.sampled_from(["holder"] * 7 + ["party", "verifier", "other"]),
        part=st.sampled_from(["small", "small", "half", "all", "over", "zero"]), final=st.booleans(),
        tiny=st.integers(1, 30), use_key=st.booleans(), form=st.integers(0, 3), usage=st.booleans())

    @precondition(lambda self: self.holds)
    @rule(**CAPTURE_ARGS)
    def capture(self, index, anyone, who, part, final, tiny, use_key, form, usage):
        h = self._pick_hold(index, anyone)
        open_micro = h.open_micro
        micro = {"small": tiny, "half": max(1, open_micro // 2), "all": max(1, open_micro),
                 "over": open_micro + tiny, "zero": 0}[part]
        self._capture(h, self._hold_actor(h, who), micro, final, use_key, form,
                      {"prompt_tokens": tiny, "completion_tokens": 2} if usage else None)

    def _capture(self, h: ModelHold, actor: str, micro: int, final: bool, use_key: bool, form: int,
                 usage: dict | None) -> None:
        kwargs = {"final": final, "usage": usage}
        args = (actor, h.id, self._amount_forms(micro, form))
        key = self._key(use_key)
        error = ValidationError if micro == 0 and not final else self._capture_error(actor, h, micro)
        if error == "expired":
            self._expire_hold(h)
            self._expiring = True
            error = StateConflict
        if error is not None:
            self._call(error, "capture", *args, key=key, **kwargs)
            return
        result = self._call(None, "capture", *args, key=key, **kwargs,
                            alternatives=[("capture", (actor, h.id, format_usdc(micro + 1)), kwargs)])
        expected = self._apply_capture(h, micro, final)
        self._check_receipt(result, h, expected, "capture")

    @precondition(lambda self: self.holds)
    @rule(**CAPTURE_ARGS)
    def capture_again(self, **kwargs):
        self.capture(**kwargs)

    @precondition(lambda self: self.holds)
    @rule(index=st.integers(0, 10_000), anyone=st.sampled_from([False] * 4 + [True]),
          who=st.sampled_from(["holder"] * 7 + ["party", "other"]), use_key=st.booleans())
    def void(self, index, anyone, who, use_key):
        h = self._pick_hold(index, anyone)
        self._void(h, self._hold_actor(h, who), use_key)

    def _void(self, h: ModelHold, actor: str, use_key: bool) -> None:
        key = self._key(use_key)
        error = self._capture_error(actor, h, 0)
        if error == "expired":
            self._expire_hold(h)
            self._expiring = True
            error = StateConflict
        if error is not None:
            self._call(error, "void", actor, h.id, key=key)
            return
        result = self._call(None, "void", actor, h.id, key=key,
                            alternatives=[("capture", (actor, h.id, "0"), {"final": True})])
        expected = self._apply_capture(h, 0, True, "voided")
        self._check_receipt(result, h, expected, "void")

    @precondition(lambda self: self._workable())
    @rule(pick=PICK, via=st.sampled_from(["token", "token", "token", "id"]),
          who=st.sampled_from(["seller"] * 4 + ["buyer"]),
          part=st.sampled_from(["small", "half", "all"]), tiny=st.integers(1, 5_000), ttl=st.sampled_from([5, 60, 900]),
          slices=st.lists(st.integers(1, 100), max_size=3), finish=st.sampled_from(["final", "void", "leave open"]),
          use_key=st.booleans(), form=st.integers(0, 3))
    def serve_a_piece_of_work(self, pick, via, who, part, tiny, ttl, slices, finish, use_key, form):
        """What a paid face does: hold for the worst case, capture slices as delivered, then finish or void."""
        h = self._hold(pick, via, who, part, tiny, ttl, use_key, form)
        if h is None:
            return
        for percent in slices:
            self._capture(h, h.holder, max(1, h.open_micro * percent // 100), False, use_key, form, None)
            if h.status != "open":
                return
        if finish == "final":
            self._capture(h, h.holder, 0, True, use_key, form, None)
        elif finish == "void":
            self._void(h, h.holder, use_key)

    def _held_live_escrows(self) -> list[ModelEscrow]:
        return [e for e in self.escrows if e.status == "active" and e.expires_at_ms > self.now_ms and self._holds_of(e)]

    @precondition(lambda self: self._held_live_escrows())
    @rule(index=st.integers(0, 10_000),
          how=st.sampled_from(["cancel by the buyer", "cancel by the seller", "release", "expiry", "swept expiry"]),
          later_ms=st.sampled_from([0, 1_000, GRACE_MS - 1, GRACE_MS, GRACE_MS + 1]),
          part=st.sampled_from(["small", "all"]), final=st.booleans(), tiny=st.integers(1, 30))
    def close_with_holds_open(self, index, how, later_ms, part, final, tiny):
        """Close an escrow that has open holds, then capture from one a while later: within the grace
        the work already delivered is paid, from the grace's end on the capture is refused and the rest refunded."""
        escrows = self._held_live_escrows()
        e = escrows[index % len(escrows)]
        pick = ([x for x in self.escrows if x.open and x.expires_at_ms > self.now_ms].index(e), False)
        if how.startswith("cancel"):
            self.cancel(pick=pick, who=how.rsplit(" ", 1)[-1], use_key=False)
        elif how == "release":
            self.release(pick=pick, who="buyer", mode="none", fraction=0, prompt=0, completion=0, refund=True,
                         quality=None, tps=None, use_key=False)
        else:
            self.clock.now = (e.expires_at_ms + 0.5) / 1000
            if how == "swept expiry":
                assert self.ledger.expire_due() == self._sweep()
        closed_ms = self.now_ms
        self.clock.now = (closed_ms + later_ms + 0.5) / 1000
        still_open = self._holds_of(e)
        if not still_open:
            return  # the sweep at the escrow's expiry also ended every hold that was due by then
        h = still_open[tiny % len(still_open)]
        event(f"close with holds open: {how}, capture {later_ms} ms later")
        self._capture(h, h.holder, tiny if part == "small" else h.open_micro, final, False, 0, None)

    def _batch_item(self, agent: str, h: ModelHold | None, micro: int, final: bool, expired: list) -> Any:
        """One item of a batch, as the ledger settles it in its savepoint: (error, None) or (None, expected)."""
        error = NotFound if h is None else self._capture_error(agent, h, micro)
        if error == "expired":
            expired.append(h)
            return StateConflict, None
        if error is not None:
            return error, None
        return None, self._apply_capture(h, micro, final)

    @precondition(lambda self: any(h.status == "open" for h in self.holds))
    @rule(picks=st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(["small", "half", "all", "final"])),
                         min_size=1, max_size=4),
          bad=st.sampled_from(["over", "stranger", "closed", "unknown", "invalid", "none"]),
          bad_at=st.integers(0, 4), item_keys=st.booleans(), use_key=st.booleans(), tiny=st.integers(1, 30))
    def capture_many(self, picks, bad, bad_at, item_keys, use_key, tiny):
        open_holds = [h for h in self.holds if h.status == "open"]
        agent = open_holds[picks[0][0] % len(open_holds)].holder
        mine = [h for h in open_holds if h.holder == agent]
        plan = []   # (hold or None, micro, final)
        for index, part in picks:
            h = mine[index % len(mine)]
            micro = {"small": tiny, "half": max(1, h.open_micro // 2), "all": h.open_micro, "final": tiny}[part]
            plan.append((h, micro, part == "final"))
        others = [h for h in self.holds if h.holder != agent]
        closed = [h for h in self.holds if h.status != "open"]
        bad_item = {"over": (mine[0], mine[0].open_micro + tiny, False),
                    "stranger": (others[tiny % len(others)], 1, False) if others else None,
                    "closed": (closed[tiny % len(closed)], 1, False) if closed else None,
                    "unknown": (None, 1, False), "invalid": (mine[0], 0, False), "none": None}[bad]
        if bad_item is not None:
            plan.insert(bad_at % (len(plan) + 1), bad_item)
        items = []
        for h, micro, final in plan:
            item = {"hold_id": h.id if h else GHOST_HOLD, "amount": format_usdc(micro), "final": final}
            if item_keys:
                item["idempotency_key"] = self._key(True)
            items.append(item)
        key = self._key(use_key)
        if bad == "invalid":
            self._call(ValidationError, "capture_many", agent, items, key=key)
            return
        event(f"capture_many: {len(items)} items, bad {bad}")
        result = self._call(None, "capture_many", agent, items, key=key,
                            alternatives=[("capture_many", (agent, items + items[:1]), {})])
        expired: list[ModelHold] = []
        assert len(result["results"]) == len(plan)
        for (h, micro, final), item, answer in zip(plan, items, result["results"]):
            error, expected = self._batch_item(agent, h, micro, final, expired)
            if error is not None:
                assert (answer["ok"], answer["error"], answer["status"]) == (False, *ERROR_CODES[error]), answer
                continue
            assert answer["ok"], answer
            self._check_receipt(answer["receipt"], h, expected, "capture")
            if item_keys:
                # Each item is idempotent under its own key, exactly like a single capture.
                self._remember(item["idempotency_key"], agent, "capture", (agent, h.id, item["amount"]),
                               {"final": final, "idempotency_key": item["idempotency_key"]}, answer["receipt"],
                               [("capture", (agent, h.id, format_usdc(micro + 1)), {"final": final})])
        for h in expired:   # freed after the batch, each once
            self._expire_hold(h)

    @precondition(lambda self: self.escrows)
    @rule(pick=PICK, who=st.sampled_from(["buyer"] * 5 + ["seller", "verifier", "other"]))
    def mint_spend_token(self, pick, who):
        e = self._pick(pick, lambda e: True)
        actor = self._actor(e, who)
        error = self._gate(e, actor, (e.buyer,), ("active",))
        if error is not None:
            self._call(error, "mint_spend_token", actor, e.id)
            return
        result = self._call(None, "mint_spend_token", actor, e.id)
        assert result["escrow_id"] == e.id and result["spend_token"].startswith("est_")
        assert result["spend_token"] not in [t for t, _ in e.tokens]
        e.tokens.append([result["spend_token"], False])

    @precondition(lambda self: self.escrows)
    @rule(pick=PICK, who=st.sampled_from(["buyer"] * 5 + ["seller", "verifier", "other"]))
    def revoke_spend_tokens(self, pick, who):
        e = self._pick(pick, lambda e: True)
        actor = self._actor(e, who)
        if actor not in (e.buyer, e.seller, e.verifier):
            self._call(NotFound, "revoke_spend_tokens", actor, e.id)
            return
        if actor != e.buyer:
            self._call(Forbidden, "revoke_spend_tokens", actor, e.id)
            return
        live = [t for t in e.tokens if not t[1]]
        assert self.ledger.revoke_spend_tokens(actor, e.id) == {"escrow_id": e.id, "revoked": len(live)}
        for t in live:
            t[1] = True

    @precondition(lambda self: self.escrows)
    @rule(pick=PICK, who=st.sampled_from(["buyer", "seller", "verifier", "other"]), index=st.integers(0, 10_000))
    def look_at_holds(self, pick, who, index):
        e = self._pick(pick, lambda e: True)
        actor = self._actor(e, who)
        if actor not in (e.buyer, e.seller, e.verifier):
            self._call(NotFound, "holds", actor, e.id)
            for h in [h for h in self.holds if h.escrow is e][:1]:
                self._call(NotFound, "get_hold", actor, h.id)
            return
        listed = [(h["id"], h["open_micro"], h["expires_at_ms"]) for h in self.ledger.holds(actor, e.id)]
        mine = sorted(self._holds_of(e), key=lambda h: (h.created_at_ms, h.id))
        assert listed == [(h.id, h.open_micro, h.expires_at_ms) for h in mine]
        for h in mine[:1]:
            got = self.ledger.get_hold(actor, h.id)
            assert (got["status"], got["captured_micro"], got["escrow_remaining_micro"]) == \
                (h.status, h.captured, e.remaining)

    @precondition(lambda self: any(h.status == "open" and h.expires_at_ms > self.now_ms for h in self.holds))
    @rule(index=st.integers(0, 10_000), offset_ms=st.sampled_from([-1, 0, 0, 1]), sweep=st.booleans())
    def advance_to_a_hold_expiry(self, index, offset_ms, sweep):
        """Right to (or a millisecond around) the end of a live hold: its TTL, the grace, or the escrow's cap."""
        live = [h for h in self.holds if h.status == "open" and h.expires_at_ms > self.now_ms]
        target = max(self.now_ms, live[index % len(live)].expires_at_ms + offset_ms)
        self.clock.now = (target + 0.5) / 1000   # half a millisecond in: float seconds never truncate below it
        assert self.now_ms == target
        if sweep:
            expected = self._sweep()
            assert self.ledger.expire_due() == expected

    # ---- invariants ---------------------------------------------------------------------

    @invariant()
    def ledger_matches_the_model(self):
        report = audit(self.ledger.engine)
        assert report["ok"], report["problems"]
        assert report["agent_balances_micro"] + report["escrow_holdings_micro"] + report["platform_fees_micro"] \
            == report["minted_micro"] == self.minted
        assert report["platform_fees_micro"] == self.platform
        assert report["held_micro"] == sum(e.held for e in self.escrows)
        with self.ledger.engine.connect() as conn:
            stored = dict(conn.execute(select(accounts.c.account_id, accounts.c.balance_micro)
                                       .where(accounts.c.kind.in_(("agent", "escrow")))).all())
            rows = {r.escrow_id: r for r in conn.execute(select(escrows))}
            hold_rows = {r.hold_id: r for r in conn.execute(select(holds))}
            revoked = dict(conn.execute(select(spend_tokens.c.escrow_id, func.count())
                                        .where(spend_tokens.c.revoked_at_ms.is_not(None))
                                        .group_by(spend_tokens.c.escrow_id)).all())
        assert all(value >= 0 for value in stored.values())
        assert {agent: stored[f"agent:{agent}"] for agent in AGENTS} == self.balances
        assert len(rows) == len(self.escrows)
        for e in self.escrows:
            row = rows[e.id]
            balance = stored[f"escrow:{e.id}"]  # what the escrow still has: held + spendable
            assert e.amount == e.paid + e.refunded + e.held + e.remaining
            assert row.amount_micro == row.paid_micro + row.refunded_micro + balance
            assert (row.status, row.paid_micro, row.refunded_micro, row.held_micro, balance - row.held_micro,
                    row.bonus_micro, row.fees_micro, row.referral_micro) == \
                (e.status, e.paid, e.refunded, e.held, e.remaining, e.bonus_paid, e.fees, e.referral_paid), e.id
            assert min(e.paid, e.refunded, e.held, e.remaining) >= 0
            assert e.open or e.remaining == 0
            assert e.held == sum(h.open_micro for h in self._holds_of(e))
            assert revoked.get(e.id, 0) == sum(1 for _, gone in e.tokens if gone)
        assert {h.id: (h.status, h.amount, h.captured, h.expires_at_ms) for h in self.holds} == \
            {r.hold_id: (r.status, r.amount_micro, r.captured_micro, r.expires_at_ms) for r in hold_rows.values()}


class SQLiteLedgerMachine(LedgerMachine):
    def open_database(self) -> str:
        self._tmp = tempfile.TemporaryDirectory(prefix="hfe-stateful-")
        return f"sqlite:///{Path(self._tmp.name) / 'ledger.db'}"

    def close_database(self) -> None:
        if hasattr(self, "_tmp"):
            self._tmp.cleanup()


class PostgresLedgerMachine(LedgerMachine):
    def open_database(self) -> str:
        url, self._drop = fresh_pg_database()
        return url

    def close_database(self) -> None:
        if hasattr(self, "_drop"):
            self._drop()


_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

class TestSQLiteLedger(SQLiteLedgerMachine.TestCase):
    settings = settings(max_examples=30, stateful_step_count=50, **_SETTINGS)


@pytest.mark.postgres
@pytest.mark.skipif(PG_SKIP_REASON is not None, reason=PG_SKIP_REASON or "")
class TestPostgresLedger(PostgresLedgerMachine.TestCase):
    settings = settings(max_examples=10, stateful_step_count=40, **_SETTINGS)
