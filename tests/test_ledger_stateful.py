"""A model-based test of the whole ledger: random sequences of every operation, checked step by step.

The model predicts, in integer micro-USDC, the outcome of each call (its error class, or the
exact amounts it moves) with arithmetic of its own (integer half-even, fractions), and after
every step compares every agent balance and every escrow with the ledger, and runs the audit.
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
from sqlalchemy import select

from hf_escrow import (
    EscrowError, Forbidden, IdempotencyConflict, InsufficientFunds, NotFound, RateLimited, StateConflict,
    ValidationError,
)
from hf_escrow.ledger import Ledger, LedgerConfig, audit
from hf_escrow.ledger.schema import accounts, escrows
from hf_escrow.money import format_usdc, to_usdc

from .conftest import PG_SKIP_REASON, FakeClock, fresh_pg_database
from .helpers import snapshot

DAY_MS = 86_400_000
FEE_BPS, REFERRAL_BPS = 100, 1_500
FAUCET_MICRO = 10_000_000
PARTIES = ("b1", "b2", "s1", "s2")
AGENTS = ("r1", "v1") + PARTIES   # r1 refers s1 at registration; v1 verifies
KEY_KEEP_MS = DAY_MS - 1_000  # keys are kept at least 24 h: replay only younger ones
PICK = st.tuples(st.integers(0, 10_000), st.sampled_from([False, False, False, True]))  # (which, any escrow?)
PRICE_SHEETS = [None, {"input_per_1k": "0.0005", "output_per_1k": "0.0015"}, {"per_token": "0.000003"}]


def half_even(value: Fraction) -> int:
    assert value >= 0
    quotient, rest = divmod(value.numerator, value.denominator)
    if 2 * rest > value.denominator or (2 * rest == value.denominator and quotient % 2):
        quotient += 1
    return quotient


def split(gross: int, has_referrer: bool) -> tuple[int, int, int]:
    """(net, fee, referral) of a gross payout, computed independently of hf_escrow.money."""
    fee = half_even(Fraction(gross * FEE_BPS, 10_000))
    referral = half_even(Fraction(fee * REFERRAL_BPS, 10_000)) if has_referrer else 0
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
    refunded: int = 0
    remaining: int = 0
    status: str = "active"
    closed_at_ms: int | None = None

    @property
    def open(self) -> bool:
        return self.status in ("active", "awaiting_verification")


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
        self.balances[e.buyer] += e.remaining
        e.refunded += e.remaining
        e.remaining = 0
        e.status = "expired"
        e.closed_at_ms = self.now_ms

    def _close(self, e: ModelEscrow, status: str) -> int:
        refund = e.remaining
        self.balances[e.buyer] += refund
        e.refunded += refund
        e.remaining = 0
        e.status = status
        e.closed_at_ms = self.now_ms
        return refund

    def _pay(self, e: ModelEscrow, gross: int, bonus: int = 0) -> tuple[int, int, int]:
        net, fee, referral = split(gross, e.referrer is not None)
        assert gross <= e.remaining
        e.remaining -= gross
        e.paid += gross
        e.bonus_paid += bonus
        self.balances[e.seller] += net
        if e.referrer:
            self.balances[e.referrer] += referral
        self.platform += fee - referral
        return net, fee, referral

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
        if any(x.status == "cancelled" for x in recent):
            return False
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
                        threshold=threshold, bonus=bonus, pricing=pricing, remaining=micro)
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
        error = self._gate(e, actor, (e.buyer, e.seller), ("active", "awaiting_verification"))
        if error is not None:
            self._call(error, "cancel", actor, e.id, key=key)
            return
        result = self._call(None, "cancel", actor, e.id, key=key,
                            alternatives=[("cancel", (actor, e.id), {"reason": "another reason"})])
        refunded = self._close(e, "cancelled")
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
        assert (view["status"], view["paid_micro"], view["refunded_micro"], view["remaining_micro"]) == \
            (e.status, e.paid, e.refunded, e.remaining)

    @rule(seconds=st.sampled_from([0.5, 1, 30, 600, 3_600, 3_600, 43_200, 86_400, 129_600]), sweep=st.booleans())
    def advance_clock(self, seconds, sweep):
        self.clock.advance(seconds)
        if sweep:
            due = [e for e in self.escrows if e.open and e.expires_at_ms <= self.now_ms]
            assert self.ledger.expire_due() == len(due)
            for e in due:
                self._expire(e)

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

    # ---- invariants ---------------------------------------------------------------------

    @invariant()
    def ledger_matches_the_model(self):
        report = audit(self.ledger.engine)
        assert report["ok"], report["problems"]
        assert report["agent_balances_micro"] + report["escrow_holdings_micro"] + report["platform_fees_micro"] \
            == report["minted_micro"] == self.minted
        assert report["platform_fees_micro"] == self.platform
        with self.ledger.engine.connect() as conn:
            stored = dict(conn.execute(select(accounts.c.account_id, accounts.c.balance_micro)
                                       .where(accounts.c.kind.in_(("agent", "escrow")))).all())
            rows = {r.escrow_id: r for r in conn.execute(select(escrows))}
        assert all(value >= 0 for value in stored.values())
        assert {agent: stored[f"agent:{agent}"] for agent in AGENTS} == self.balances
        assert len(rows) == len(self.escrows)
        for e in self.escrows:
            row = rows[e.id]
            remaining = stored[f"escrow:{e.id}"]
            assert e.amount == e.paid + e.refunded + e.remaining
            assert row.amount_micro == row.paid_micro + row.refunded_micro + remaining
            assert (row.status, row.paid_micro, row.refunded_micro, remaining, row.bonus_micro) == \
                (e.status, e.paid, e.refunded, e.remaining, e.bonus_paid), e.id
            assert min(e.paid, e.refunded, e.remaining) >= 0


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
    settings = settings(max_examples=40, stateful_step_count=30, **_SETTINGS)


@pytest.mark.postgres
@pytest.mark.skipif(PG_SKIP_REASON is not None, reason=PG_SKIP_REASON or "")
class TestPostgresLedger(PostgresLedgerMachine.TestCase):
    settings = settings(max_examples=10, stateful_step_count=20, **_SETTINGS)
