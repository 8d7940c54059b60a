"""Every ledger operation on both backends: exact amounts, roles, states, idempotency, refusals."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest
from sqlalchemy import func, select

import hf_escrow
from hf_escrow import (
    EscrowError, Forbidden, IdempotencyConflict, InsufficientFunds, InvalidAmount, NotFound, RateLimited,
    StateConflict, Unauthorized, ValidationError,
)
from hf_escrow.ledger import Ledger, LedgerConfig
from hf_escrow.ledger.schema import transactions

from .helpers import assert_audit_clean, snapshot

DAY = 86_400
BENCH = {"type": "benchmark", "metric": "accuracy", "threshold": 0.85}
TOKEN_PRICES = {"input_per_1k": "0.0005", "output_per_1k": "0.0015"}


@pytest.fixture(autouse=True)
def _audit_after_each_test(ledger):
    yield
    assert_audit_clean(ledger)


def bal(ledger: Ledger, agent: str) -> int:
    return ledger.me(agent)["balance_micro"]


def register(ledger: Ledger, *names: str, fund: str | None = "100", referral_code: str | None = None) -> dict:
    out = {}
    for name in names:
        out[name] = ledger.register(name, referral_code=referral_code)
        if fund:
            ledger.deposit(name, fund)
    return out


@pytest.fixture
def world(ledger):
    """buyer (100 USDC), seller referred by `ref`, plain seller `seller2`, a stranger and an auditor."""
    refs = register(ledger, "ref", "ref2", fund=None)
    register(ledger, "buyer")
    register(ledger, "seller", fund=None, referral_code=refs["ref"]["referral_code"])
    register(ledger, "seller2", "stranger", "auditor", fund=None)
    return {"ref_code": refs["ref"]["referral_code"], "ref2_code": refs["ref2"]["referral_code"]}


def expect_nothing_moved(ledger: Ledger, error: type[EscrowError], call, *args, **kwargs) -> EscrowError:
    before = snapshot(ledger)
    with pytest.raises(error) as info:
        call(*args, **kwargs)
    assert type(info.value) is error, f"{type(info.value).__name__} instead of {error.__name__}: {info.value}"
    assert str(info.value), "an error without a message"
    assert snapshot(ledger) == before, "a refused operation moved something"
    return info.value


def refund_count(ledger: Ledger, escrow_id: str) -> int:
    with ledger.engine.connect() as conn:
        return conn.scalar(select(func.count()).select_from(transactions).where(
            transactions.c.escrow_id == escrow_id, transactions.c.kind == "refund"))


# ---- lifecycle with exact fee and referral ---------------------------------------------

def test_full_lifecycle_with_fee_and_referral_from_the_sellers_registration(ledger, world):
    e = ledger.create_escrow("buyer", "seller", "1.50", ttl_seconds=3600, description="job",
                             meta={"model": "gemma-3-270m"})
    assert (e["status"], e["amount_micro"], e["remaining_micro"], e["referrer"]) == \
        ("active", 1_500_000, 1_500_000, "ref")
    assert (e["buyer"], e["seller"], e["model"], e["description"]) == ("buyer", "seller", "gemma-3-270m", "job")
    assert e["expires_at_ms"] - e["created_at_ms"] == 3_600_000
    assert bal(ledger, "buyer") == 98_500_000
    assert ledger.me("buyer")["escrows_open"] == 1 and ledger.me("seller")["escrows_open"] == 1

    d = ledger.deduct("seller", e["id"], "0.5", reason="first 1k tokens")
    assert (d["gross_micro"], d["net_micro"], d["fee_micro"], d["referral_micro"]) == (500_000, 495_000, 5_000, 750)
    assert (d["status"], d["remaining_micro"]) == ("active", 1_000_000)
    assert bal(ledger, "seller") == 495_000 and bal(ledger, "ref") == 750

    r = ledger.release("buyer", e["id"], amount="0.25")
    assert (r["gross_micro"], r["net_micro"], r["fee_micro"], r["referral_micro"]) == (250_000, 247_500, 2_500, 375)
    assert (r["base_micro"], r["bonus_micro"], r["refunded_micro"]) == (250_000, 0, 750_000)
    assert (r["status"], r["remaining_micro"]) == ("released", 0)
    assert bal(ledger, "buyer") == 99_250_000
    assert bal(ledger, "seller") == 742_500
    assert bal(ledger, "ref") == 1_125

    view = ledger.get("buyer", e["id"])
    assert (view["paid_micro"], view["fees_micro"], view["referral_micro"], view["refunded_micro"]) == \
        (750_000, 7_500, 1_125, 750_000)
    assert view["amount_micro"] == view["paid_micro"] + view["refunded_micro"] + view["remaining_micro"]
    assert [ev["kind"] for ev in view["events"]] == ["created", "deducted", "released"]
    assert view["closed_at_ms"] is not None
    assert ledger.me("buyer")["escrows_open"] == 0
    report = assert_audit_clean(ledger)
    assert report["platform_fees_micro"] == 7_500 - 1_125
    assert report["agent_balances_micro"] + report["escrow_holdings_micro"] + report["platform_fees_micro"] \
        == report["minted_micro"]


def test_referral_code_at_create_wins_over_registration(ledger, world):
    e = ledger.create_escrow("buyer", "seller2", "1", referral_code=world["ref2_code"])
    assert e["referrer"] == "ref2"
    d = ledger.deduct("seller2", e["id"], "1")
    assert (d["net_micro"], d["fee_micro"], d["referral_micro"]) == (990_000, 10_000, 1_500)
    assert bal(ledger, "ref2") == 1_500
    e2 = ledger.create_escrow("buyer", "seller", "1", referral_code=world["ref2_code"])
    assert e2["referrer"] == "ref2"
    ledger.release("buyer", e2["id"])
    assert bal(ledger, "ref2") == 3_000 and bal(ledger, "ref") == 0


def test_no_referrer_means_the_platform_keeps_the_whole_fee(ledger, world):
    e = ledger.create_escrow("buyer", "seller2", "2")
    assert e["referrer"] is None
    r = ledger.release("buyer", e["id"])
    assert (r["gross_micro"], r["net_micro"], r["fee_micro"], r["referral_micro"], r["refunded_micro"]) == \
        (2_000_000, 1_980_000, 20_000, 0, 0)
    assert assert_audit_clean(ledger)["platform_fees_micro"] == 20_000


def test_self_referral_is_refused(ledger, world):
    seller_code = ledger.me("seller2")["referral_code"]
    buyer_code = ledger.me("buyer")["referral_code"]
    for code in (seller_code, buyer_code):
        expect_nothing_moved(ledger, ValidationError, ledger.create_escrow, "buyer", "seller2", "1",
                             referral_code=code)
    expect_nothing_moved(ledger, ValidationError, ledger.create_escrow, "buyer", "seller2", "1",
                         referral_code="ref_nonexistent")
    with pytest.raises(StateConflict):
        ledger.register("buyer")


def test_tiny_amounts_and_rounding_are_exact(ledger, world):
    e = ledger.create_escrow("buyer", "seller", "0.000001")
    d = ledger.deduct("seller", e["id"], 0.000001)
    assert (d["gross_micro"], d["net_micro"], d["fee_micro"], d["referral_micro"]) == (1, 1, 0, 0)
    e = ledger.create_escrow("buyer", "seller", 2048 / 1000 * 0.0005 + 512 / 1000 * 0.0015)
    assert e["amount_micro"] == 1_792
    d = ledger.deduct("seller", e["id"], "0.0000185")
    assert d["gross_micro"] == 18 and d["rounded_from"] == "0.0000185"
    r = ledger.release("buyer", e["id"], amount=Decimal("0.0000015"))
    assert r["base_micro"] == 2 and r["refunded_micro"] == 1_792 - 18 - 2
    assert r["rounded_from"] == "0.0000015"
    created = ledger.get("buyer", ledger.create_escrow("buyer", "seller", "0.0000025")["id"])
    assert created["amount_micro"] == 2
    assert created["events"][0]["data"]["rounded_from"] == "0.0000025"


# ---- release variants ------------------------------------------------------------------

def test_release_whole_remainder_by_default(ledger, world):
    e = ledger.create_escrow("buyer", "seller2", "1")
    ledger.deduct("seller2", e["id"], "0.3")
    r = ledger.release("buyer", e["id"])
    assert (r["base_micro"], r["refunded_micro"], r["status"]) == (700_000, 0, "released")
    assert bal(ledger, "seller2") == 990_000


def test_release_by_usage_times_the_escrows_pricing(ledger, world):
    e = ledger.create_escrow("buyer", "seller2", "0.01", pricing=TOKEN_PRICES)
    assert e["pricing"] == TOKEN_PRICES
    r = ledger.release("buyer", e["id"], usage={"prompt_tokens": 2048, "completion_tokens": 512})
    assert (r["base_micro"], r["gross_micro"], r["fee_micro"], r["refunded_micro"]) == (1_792, 1_792, 18, 8_208)
    view = ledger.get("buyer", e["id"])
    assert (view["tokens_in"], view["tokens_out"]) == (2048, 512)
    # a per-1M sheet and a TOML-free dict with price_per_token work the same way
    e = ledger.create_escrow("buyer", "seller2", "0.01", pricing={"input_per_1m": "0.5", "output_per_1m": "1.5"})
    usage = {"prompt_tokens": 2048, "completion_tokens": 512}
    assert ledger.release("buyer", e["id"], usage=usage)["base_micro"] == 1_792


def test_release_vllm_style_usage_and_price_per_token(ledger, world):
    e = ledger.create_escrow("buyer", "seller2", "0.01", meta={"prompt_tokens": 100})
    r = ledger.release("buyer", e["id"], usage={"prompt_tokens": 100, "completion_tokens": 50},
                       price_per_token="0.00001")
    assert (r["base_micro"], r["refunded_micro"]) == (1_500, 8_500)
    e = ledger.create_escrow("buyer", "seller2", "0.01")
    r = ledger.release("buyer", e["id"], usage={"prompt_tokens": 37}, price_per_token=0.0000005)
    assert r["base_micro"] == 18  # 18.5 micro -> 18, ties to even
    # price_per_token overrides the escrow's own pricing
    e = ledger.create_escrow("buyer", "seller2", "0.01", pricing=TOKEN_PRICES)
    r = ledger.release("buyer", e["id"], usage={"prompt_tokens": 10, "completion_tokens": 10},
                       price_per_token="0.0001")
    assert r["base_micro"] == 2_000


def test_usage_cost_is_capped_at_the_remainder(ledger, world):
    e = ledger.create_escrow("buyer", "seller2", "0.001", pricing=TOKEN_PRICES)
    r = ledger.release("buyer", e["id"], usage={"prompt_tokens": 2048, "completion_tokens": 512})
    assert (r["base_micro"], r["gross_micro"], r["refunded_micro"], r["status"]) == (1_000, 1_000, 0, "released")


def test_usage_without_any_price_is_refused(ledger, world):
    e = ledger.create_escrow("buyer", "seller2", "0.01")
    expect_nothing_moved(ledger, ValidationError, ledger.release, "buyer", e["id"],
                         usage={"prompt_tokens": 5, "completion_tokens": 5})


def test_explicit_amount_above_the_remainder_is_refused_and_nothing_moves(ledger, world):
    e = ledger.create_escrow("buyer", "seller2", "1")
    error = expect_nothing_moved(ledger, InsufficientFunds, ledger.release, "buyer", e["id"], amount="1.000001")
    assert error.details["remaining_micro"] == 1_000_000
    expect_nothing_moved(ledger, InsufficientFunds, ledger.deduct, "seller2", e["id"], "1.000001")
    ledger.deduct("seller2", e["id"], "0.6")
    expect_nothing_moved(ledger, InsufficientFunds, ledger.release, "buyer", e["id"], amount="0.400001")
    expect_nothing_moved(ledger, InsufficientFunds, ledger.deduct, "seller2", e["id"], "0.400001")
    assert ledger.release("buyer", e["id"], amount="0.4")["remaining_micro"] == 0


def test_release_without_refund_keeps_the_escrow_active(ledger, world):
    e = ledger.create_escrow("buyer", "seller2", "1")
    r = ledger.release("buyer", e["id"], amount="0.1", refund_remainder=False)
    assert (r["status"], r["remaining_micro"], r["refunded_micro"]) == ("active", 900_000, 0)
    assert ledger.get("buyer", e["id"])["closed_at_ms"] is None
    assert bal(ledger, "buyer") == 99_000_000
    ledger.deduct("seller2", e["id"], "0.2")
    r = ledger.release("buyer", e["id"], amount="0", refund_remainder=True)
    assert (r["gross_micro"], r["refunded_micro"], r["status"]) == (0, 700_000, "released")
    assert bal(ledger, "buyer") == 99_700_000
    assert bal(ledger, "seller2") == 297_000


def test_cancel_by_buyer_and_by_seller(ledger, world):
    e1 = ledger.create_escrow("buyer", "seller2", "1")
    ledger.deduct("seller2", e1["id"], "0.25")
    c = ledger.cancel("buyer", e1["id"], reason="changed my mind")
    assert (c["status"], c["refunded_micro"], c["gross_micro"]) == ("cancelled", 750_000, 0)
    e2 = ledger.create_escrow("buyer", "seller2", "2")
    c = ledger.cancel("seller2", e2["id"])
    assert (c["status"], c["refunded_micro"]) == ("cancelled", 2_000_000)
    assert bal(ledger, "buyer") == 100_000_000 - 250_000
    view = ledger.get("seller2", e2["id"])
    assert view["events"][-1]["kind"] == "cancelled" and view["events"][-1]["actor"] == "seller2"
    for escrow in (e1, e2):
        expect_nothing_moved(ledger, StateConflict, ledger.cancel, "buyer", escrow["id"])


# ---- expiry ----------------------------------------------------------------------------

def test_lazy_expiry_on_get(ledger, world, clock):
    e = ledger.create_escrow("buyer", "seller2", "1", ttl_seconds=60)
    ledger.deduct("seller2", e["id"], "0.1")
    start = clock.now
    clock.now = start + 59.999
    assert ledger.get("buyer", e["id"])["status"] == "active"
    clock.now = start + 60  # due at expires_at exactly
    view = ledger.get("seller2", e["id"])
    assert (view["status"], view["refunded_micro"], view["remaining_micro"]) == ("expired", 900_000, 0)
    assert view["events"][-1]["kind"] == "expired"
    assert bal(ledger, "buyer") == 99_900_000
    assert ledger.get("buyer", e["id"])["status"] == "expired"
    assert refund_count(ledger, e["id"]) == 1


def test_lazy_expiry_on_deduct_refunds_exactly_once(ledger, world, clock):
    e = ledger.create_escrow("buyer", "seller2", "1", ttl_seconds=60)
    clock.advance(61)
    with pytest.raises(StateConflict, match="expired"):
        ledger.deduct("seller2", e["id"], "0.1")
    assert bal(ledger, "buyer") == 100_000_000
    assert bal(ledger, "seller2") == 0
    for _ in range(2):
        expect_nothing_moved(ledger, StateConflict, ledger.deduct, "seller2", e["id"], "0.1")
        expect_nothing_moved(ledger, StateConflict, ledger.release, "buyer", e["id"])
        expect_nothing_moved(ledger, StateConflict, ledger.cancel, "buyer", e["id"])
    assert ledger.expire_due() == 0
    assert ledger.expire(e["id"]) is False
    view = ledger.get("buyer", e["id"])
    assert (view["status"], view["refunded_micro"]) == ("expired", 1_000_000)
    assert [ev["kind"] for ev in view["events"]].count("expired") == 1
    assert refund_count(ledger, e["id"]) == 1


@pytest.mark.parametrize("operation", ["release", "cancel"])
def test_lazy_expiry_on_release_and_cancel(ledger, world, clock, operation):
    e = ledger.create_escrow("buyer", "seller2", "1", ttl_seconds=5)
    clock.advance(5.5)
    with pytest.raises(StateConflict):
        getattr(ledger, operation)("buyer", e["id"])
    assert ledger.get("buyer", e["id"])["status"] == "expired"
    assert bal(ledger, "buyer") == 100_000_000 and refund_count(ledger, e["id"]) == 1


def test_expire_due_sweeps_what_is_due_once(ledger, world, clock):
    short = [ledger.create_escrow("buyer", "seller2", "1", ttl_seconds=ttl)["id"] for ttl in (10, 20)]
    long = ledger.create_escrow("buyer", "seller2", "1", ttl_seconds=1000)["id"]
    assert ledger.expire_due() == 0
    clock.advance(30)
    assert ledger.expire_due() == 2
    assert ledger.expire_due() == 0
    assert [ledger.get("buyer", i)["status"] for i in short] == ["expired", "expired"]
    assert ledger.get("buyer", long)["status"] == "active"
    assert bal(ledger, "buyer") == 99_000_000
    clock.advance(1000)
    assert ledger.expire_due() == 1
    assert bal(ledger, "buyer") == 100_000_000
    assert all(refund_count(ledger, i) == 1 for i in short + [long])


# ---- benchmark escrows -----------------------------------------------------------------

def test_benchmark_with_verifier_self_pass_releases_fail_stays_active(ledger, world):
    e = ledger.create_escrow("buyer", "seller2", "2", release_condition=BENCH)
    assert e["release_condition"]["verifier"] == "self" and e["verifier"] is None
    fail = ledger.submit_result("seller2", e["id"], metric="accuracy", score=0.84)
    assert (fail["passed"], fail["status"], fail["gross_micro"], fail["remaining_micro"]) == \
        (False, "active", 0, 2_000_000)
    assert bal(ledger, "seller2") == 0
    ok = ledger.submit_result("seller2", e["id"], metric="accuracy", score=0.85,
                              artifact={"repo": "me/lora", "revision": "abc", "sha256": "0" * 64})
    assert (ok["passed"], ok["status"], ok["gross_micro"], ok["net_micro"], ok["fee_micro"]) == \
        (True, "released", 2_000_000, 1_980_000, 20_000)
    view = ledger.get("buyer", e["id"])
    assert view["result"]["artifact"]["repo"] == "me/lora" and view["result"]["score"] == 0.85
    assert bal(ledger, "seller2") == 1_980_000
    kinds = [ev["kind"] for ev in view["events"]]
    assert kinds == ["created", "result_submitted", "benchmark_failed", "result_submitted", "benchmark_passed"]


def test_benchmark_escrow_is_not_paid_by_deduct(ledger, world):
    e = ledger.create_escrow("buyer", "seller2", "1", release_condition=BENCH)
    error = expect_nothing_moved(ledger, StateConflict, ledger.deduct, "seller2", e["id"], "0.1")
    assert "submit_result" in error.message
    assert ledger.get("buyer", e["id"])["remaining_micro"] == 1_000_000


def test_benchmark_lower_is_better(ledger, world):
    e = ledger.create_escrow("buyer", "seller2", "1", release_condition={
        "metric": "loss", "threshold": 0.2, "higher_is_better": False})
    assert ledger.submit_result("seller2", e["id"], metric="loss", score=0.21)["passed"] is False
    assert ledger.submit_result("seller2", e["id"], metric="loss", score=0.2)["passed"] is True


def test_benchmark_with_named_verifier(ledger, world):
    e = ledger.create_escrow("buyer", "seller2", "1", release_condition={**BENCH, "verifier": "auditor"})
    assert e["verifier"] == "auditor"
    sub = ledger.submit_result("seller2", e["id"], metric="accuracy", score=0.99)
    assert (sub["status"], sub["gross_micro"]) == ("awaiting_verification", 0)
    assert ledger.get("auditor", e["id"])["status"] == "awaiting_verification"
    expect_nothing_moved(ledger, Forbidden, ledger.verify, "buyer", e["id"], score=0.99)
    expect_nothing_moved(ledger, Forbidden, ledger.verify, "seller2", e["id"], score=0.99)
    expect_nothing_moved(ledger, NotFound, ledger.verify, "stranger", e["id"], score=0.99)
    expect_nothing_moved(ledger, StateConflict, ledger.submit_result, "seller2", e["id"], metric="accuracy",
                         score=0.99)
    expect_nothing_moved(ledger, StateConflict, ledger.deduct, "seller2", e["id"], "0.1")
    expect_nothing_moved(ledger, Forbidden, ledger.cancel, "auditor", e["id"])
    v = ledger.verify("auditor", e["id"], score=0.86)
    assert (v["passed"], v["status"], v["gross_micro"], v["net_micro"]) == (True, "released", 1_000_000, 990_000)
    assert bal(ledger, "seller2") == 990_000 and bal(ledger, "auditor") == 0


def test_benchmark_named_verifier_fail_returns_to_active_then_ttl_refunds(ledger, world, clock):
    e = ledger.create_escrow("buyer", "seller2", "1", ttl_seconds=600,
                             release_condition={**BENCH, "verifier": "auditor"})
    ledger.submit_result("seller2", e["id"], metric="accuracy", score=0.99)
    v = ledger.verify("auditor", e["id"], score=0.5)
    assert (v["passed"], v["status"], v["remaining_micro"]) == (False, "active", 1_000_000)
    expect_nothing_moved(ledger, StateConflict, ledger.verify, "auditor", e["id"], score=0.9)
    clock.advance(600)
    assert ledger.expire_due() == 1
    view = ledger.get("buyer", e["id"])
    assert (view["status"], view["refunded_micro"], view["paid_micro"]) == ("expired", 1_000_000, 0)
    assert bal(ledger, "buyer") == 100_000_000


def test_benchmark_verified_by_the_buyer(ledger, world):
    e = ledger.create_escrow("buyer", "seller2", "1", release_condition={**BENCH, "verifier": "buyer"})
    assert e["verifier"] == "buyer"
    ledger.submit_result("seller2", e["id"], metric="accuracy", score=0.9)
    assert ledger.verify("buyer", e["id"], score=0.9)["status"] == "released"


def test_benchmark_refusals(ledger, world):
    e = ledger.create_escrow("buyer", "seller2", "1", release_condition=BENCH)
    expect_nothing_moved(ledger, ValidationError, ledger.submit_result, "seller2", e["id"], metric="f1", score=0.99)
    expect_nothing_moved(ledger, Forbidden, ledger.submit_result, "buyer", e["id"], metric="accuracy", score=0.99)
    expect_nothing_moved(ledger, Forbidden, ledger.verify, "buyer", e["id"], score=0.99)  # verifier self: nobody
    plain = ledger.create_escrow("buyer", "seller2", "1")
    expect_nothing_moved(ledger, StateConflict, ledger.submit_result, "seller2", plain["id"], metric="accuracy",
                         score=0.99)
    expect_nothing_moved(ledger, ValidationError, ledger.create_escrow, "buyer", "seller2", "1",
                         release_condition={**BENCH, "verifier": "seller2"})
    expect_nothing_moved(ledger, NotFound, ledger.create_escrow, "buyer", "seller2", "1",
                         release_condition={**BENCH, "verifier": "nobody"})


# ---- bonuses and streak ----------------------------------------------------------------

def test_throughput_bonus_only_strictly_above_the_minimum(ledger, world):
    for tps, bonus in [(99.999, 0), (100, 0), ("100", 0), (100.001, 50_000), (1e6, 50_000), (None, 0)]:
        e = ledger.create_escrow("buyer", "seller2", "2",
                                 bonus_conditions={"throughput_tps_min": 100, "bonus_pct": 5})
        r = ledger.release("buyer", e["id"], amount="1", throughput_tps=tps)
        assert (r["base_micro"], r["bonus_micro"], r["gross_micro"]) == (1_000_000, bonus, 1_000_000 + bonus), tps
        assert r["bonus_parts"] == {"throughput_micro": bonus, "quality_micro": 0, "streak_micro": 0}
        assert r["refunded_micro"] == 1_000_000 - bonus
        assert r["fee_micro"] == round((1_000_000 + bonus) / 100)
        assert ledger.get("buyer", e["id"])["bonus_micro"] == bonus
    # without bonus_conditions, throughput earns nothing
    e = ledger.create_escrow("buyer", "seller2", "2")
    assert ledger.release("buyer", e["id"], amount="1", throughput_tps=1e6)["bonus_micro"] == 0


def test_quality_bonus_above_0_9(ledger, world):
    for quality, bonus in [(0.9, 0), (0.90000001, 100_000), (0.91, 100_000), (0.5, 0), (1, 100_000), ("0.95", 100_000)]:
        e = ledger.create_escrow("buyer", "seller2", "2")
        r = ledger.release("buyer", e["id"], amount="1", quality_score=quality)
        assert (r["bonus_micro"], r["gross_micro"]) == (bonus, 1_000_000 + bonus), quality
        assert r["bonus_parts"]["quality_micro"] == bonus


def test_bonuses_add_up_and_are_capped_at_the_remainder(ledger, world):
    e = ledger.create_escrow("buyer", "seller2", "2", bonus_conditions={"throughput_tps_min": 50, "bonus_pct": 20})
    r = ledger.release("buyer", e["id"], amount="1", throughput_tps=60, quality_score=0.95, refund_remainder=False)
    assert r["bonus_parts"] == {"throughput_micro": 200_000, "quality_micro": 100_000, "streak_micro": 0}
    assert (r["base_micro"], r["bonus_micro"], r["gross_micro"], r["remaining_micro"]) == \
        (1_000_000, 300_000, 1_300_000, 700_000)
    # now only 0.7 left: base 0.6 earns 0.12 + 0.06 but only 0.1 is there; throughput first
    r = ledger.release("buyer", e["id"], amount="0.6", throughput_tps=60, quality_score=0.95)
    assert r["bonus_parts"] == {"throughput_micro": 100_000, "quality_micro": 0, "streak_micro": 0}
    assert (r["base_micro"], r["bonus_micro"], r["gross_micro"], r["refunded_micro"]) == (600_000, 100_000, 700_000, 0)
    view = ledger.get("buyer", e["id"])
    assert (view["paid_micro"], view["bonus_micro"]) == (2_000_000, 400_000)
    # a release of the whole remainder leaves no room for a bonus
    e = ledger.create_escrow("buyer", "seller2", "1")
    r = ledger.release("buyer", e["id"], quality_score=0.99)
    assert (r["bonus_micro"], r["gross_micro"]) == (0, 1_000_000)
    e = ledger.create_escrow("buyer", "seller2", "1")
    r = ledger.release("buyer", e["id"], amount="0.95", quality_score=0.99)
    assert r["bonus_parts"]["quality_micro"] == 50_000 and r["refunded_micro"] == 0


def _paid_job_on(ledger, clock, start, days_ago, seller="seller2"):
    clock.now = start - days_ago * DAY
    e = ledger.create_escrow("buyer", seller, "0.1")
    r = ledger.release("buyer", e["id"])
    assert r["bonus_parts"]["streak_micro"] == 0
    return e


def test_seven_day_streak_earns_two_percent(ledger, world, clock):
    start = clock.now
    for days_ago in range(7, 0, -1):
        _paid_job_on(ledger, clock, start, days_ago)
    clock.now = start
    e = ledger.create_escrow("buyer", "seller2", "1")
    r = ledger.release("buyer", e["id"], amount="0.5")
    assert r["bonus_parts"] == {"throughput_micro": 0, "quality_micro": 0, "streak_micro": 10_000}
    assert (r["base_micro"], r["bonus_micro"], r["gross_micro"], r["refunded_micro"]) == \
        (500_000, 10_000, 510_000, 490_000)
    # another seller has no streak
    e = ledger.create_escrow("buyer", "seller", "1")
    assert ledger.release("buyer", e["id"], amount="0.5")["bonus_micro"] == 0


@pytest.mark.parametrize("who,cancel_days_ago,streak_micro", [
    ("seller2", 3, 0), ("seller2", 0, 0),
    # A buyer's cancel is free (a 1-micro escrow): it must not reset the seller's streak.
    ("buyer", 3, 10_000), ("buyer", 0, 10_000),
])
def test_only_the_sellers_own_cancellation_removes_the_streak(ledger, world, clock, who, cancel_days_ago,
                                                             streak_micro):
    start = clock.now
    for days_ago in range(7, 0, -1):
        _paid_job_on(ledger, clock, start, days_ago)
        if days_ago == cancel_days_ago:
            ledger.cancel(who, ledger.create_escrow("buyer", "seller2", "0.000001")["id"])
    clock.now = start
    if cancel_days_ago == 0:
        ledger.cancel(who, ledger.create_escrow("buyer", "seller2", "0.000001")["id"])
    e = ledger.create_escrow("buyer", "seller2", "1")
    assert ledger.release("buyer", e["id"], amount="0.5")["bonus_parts"]["streak_micro"] == streak_micro


def test_many_small_payouts_pay_the_fee_of_their_sum(ledger, world):
    """Fees are exact over an escrow's life: 200 deductions of 50 micro-USDC pay 1% of 10,000."""
    e = ledger.create_escrow("buyer", "seller", "1")     # seller was referred: referral share too
    for _ in range(200):
        ledger.deduct("seller", e["id"], "0.00005")
    split = ledger.get("buyer", e["id"])
    one = ledger.create_escrow("buyer", "seller", "1")
    ledger.deduct("seller", one["id"], "0.01")
    single = ledger.get("buyer", one["id"])
    assert (split["paid_micro"], split["fees_micro"], split["referral_micro"]) == \
        (single["paid_micro"], single["fees_micro"], single["referral_micro"]) == (10_000, 100, 15)
    assert_audit_clean(ledger)


def test_cancel_is_refused_while_a_result_awaits_its_verifier(ledger, world):
    e = ledger.create_escrow("buyer", "seller2", "1", release_condition={
        "metric": "accuracy", "threshold": 0.8, "verifier": "buyer"})
    ledger.submit_result("seller2", e["id"], metric="accuracy", score=0.95)
    for party in ("buyer", "seller2"):
        expect_nothing_moved(ledger, StateConflict, ledger.cancel, party, e["id"])
    assert ledger.verify("buyer", e["id"], score=0.9)["status"] == "released"


def test_a_missing_day_breaks_the_streak(ledger, world, clock):
    start = clock.now
    for days_ago in (7, 6, 5, 3, 2, 1):
        _paid_job_on(ledger, clock, start, days_ago)
    clock.now = start
    e = ledger.create_escrow("buyer", "seller2", "1")
    assert ledger.release("buyer", e["id"], amount="0.5")["bonus_micro"] == 0


# ---- idempotency -----------------------------------------------------------------------

def test_idempotent_create_deduct_release(ledger, world):
    e = ledger.create_escrow("buyer", "seller2", "1", idempotency_key="create-1")
    token = e.pop("spend_token")
    assert token.startswith("est_")
    after = snapshot(ledger)
    # A replay answers the first result, less the spend token: it is shown once (mint another).
    assert ledger.create_escrow("buyer", "seller2", "1", idempotency_key="create-1") == e
    assert ledger.create_escrow("buyer", "seller2", "1.000000", idempotency_key="create-1") == e
    assert snapshot(ledger) == after
    expect_nothing_moved(ledger, IdempotencyConflict, ledger.create_escrow, "buyer", "seller2", "2",
                         idempotency_key="create-1")
    expect_nothing_moved(ledger, IdempotencyConflict, ledger.create_escrow, "buyer", "seller", "1",
                         idempotency_key="create-1")

    d = ledger.deduct("seller2", e["id"], "0.1", idempotency_key="create-1")  # keys are per agent
    after = snapshot(ledger)
    assert ledger.deduct("seller2", e["id"], "0.1", idempotency_key="create-1") == d
    assert snapshot(ledger) == after
    expect_nothing_moved(ledger, IdempotencyConflict, ledger.deduct, "seller2", e["id"], "0.2",
                         idempotency_key="create-1")
    expect_nothing_moved(ledger, IdempotencyConflict, ledger.deduct, "seller2", e["id"], "0.1", reason="x",
                         idempotency_key="create-1")

    r = ledger.release("buyer", e["id"], amount="0.2", idempotency_key="rel-1")
    after = snapshot(ledger)
    # the escrow is closed now; the replay still answers with the stored receipt
    assert ledger.release("buyer", e["id"], amount="0.2", idempotency_key="rel-1") == r
    assert snapshot(ledger) == after
    expect_nothing_moved(ledger, IdempotencyConflict, ledger.release, "buyer", e["id"], amount="0.2",
                         refund_remainder=False, idempotency_key="rel-1")
    assert bal(ledger, "buyer") == 100_000_000 - 300_000
    assert bal(ledger, "seller2") == 297_000


def test_idempotent_cancel_submit_verify_and_faucet(ledger, world, clock):
    e = ledger.create_escrow("buyer", "seller2", "1")
    c = ledger.cancel("seller2", e["id"], idempotency_key="k")
    after = snapshot(ledger)
    assert ledger.cancel("seller2", e["id"], idempotency_key="k") == c
    assert snapshot(ledger) == after

    b = ledger.create_escrow("buyer", "seller2", "1", release_condition={**BENCH, "verifier": "auditor"})
    s = ledger.submit_result("seller2", b["id"], metric="accuracy", score=0.9, idempotency_key="s")
    v = ledger.verify("auditor", b["id"], score=0.9, idempotency_key="v")
    after = snapshot(ledger)
    assert ledger.submit_result("seller2", b["id"], metric="accuracy", score=0.9, idempotency_key="s") == s
    assert ledger.verify("auditor", b["id"], score=0.9, idempotency_key="v") == v
    assert snapshot(ledger) == after
    expect_nothing_moved(ledger, IdempotencyConflict, ledger.verify, "auditor", b["id"], score=0.8,
                         idempotency_key="v")

    f = ledger.claim_faucet("stranger", idempotency_key="f")
    after = snapshot(ledger)
    assert ledger.claim_faucet("stranger", idempotency_key="f") == f  # a replay, not a rate-limited claim
    assert snapshot(ledger) == after
    expect_nothing_moved(ledger, RateLimited, ledger.claim_faucet, "stranger", idempotency_key="f2")
    dep = ledger.deposit("stranger", "1", idempotency_key="d")
    assert ledger.deposit("stranger", "1", idempotency_key="d") == dep
    expect_nothing_moved(ledger, IdempotencyConflict, ledger.deposit, "stranger", "2", idempotency_key="d")
    assert bal(ledger, "stranger") == 11_000_000


def test_bad_idempotency_keys_are_refused(ledger, world):
    for key in ["", 5, b"key", "k" * 256, ["k"]]:
        expect_nothing_moved(ledger, ValidationError, ledger.create_escrow, "buyer", "seller2", "1",
                             idempotency_key=key)
    assert ledger.create_escrow("buyer", "seller2", "1", idempotency_key="k" * 255)["amount_micro"] == 1_000_000


def test_a_failed_call_does_not_burn_its_key(ledger, world):
    e = ledger.create_escrow("buyer", "seller2", "1")
    expect_nothing_moved(ledger, InsufficientFunds, ledger.deduct, "seller2", e["id"], "2", idempotency_key="k")
    assert ledger.deduct("seller2", e["id"], "0.5", idempotency_key="k")["gross_micro"] == 500_000


# ---- faucet ----------------------------------------------------------------------------

def test_faucet_is_rate_limited_and_reopens_with_the_clock(ledger, world, clock):
    assert ledger.claim_faucet("stranger")["amount_micro"] == 10_000_000
    error = expect_nothing_moved(ledger, RateLimited, ledger.claim_faucet, "stranger")
    assert error.details["retry_after_s"] == DAY  # the honest wait, rounded up to whole seconds
    clock.advance(DAY - 1)
    error = expect_nothing_moved(ledger, RateLimited, ledger.claim_faucet, "stranger")
    assert error.details["retry_after_s"] == 1
    clock.advance(0.5)
    assert expect_nothing_moved(ledger, RateLimited, ledger.claim_faucet, "stranger").details["retry_after_s"] == 1
    clock.advance(0.5)
    assert ledger.claim_faucet("stranger")["balance_micro"] == 20_000_000
    assert ledger.claim_faucet("auditor")["balance_micro"] == 10_000_000  # per agent
    expect_nothing_moved(ledger, Unauthorized, ledger.claim_faucet, "nobody")


def test_faucet_switched_off_is_forbidden(ledger, db_url, clock, world):
    off = Ledger(db_url, config=LedgerConfig(faucet_enabled=False), clock=clock)
    try:
        expect_nothing_moved(off, Forbidden, off.claim_faucet, "stranger")
        assert off.deposit("stranger", "1")["balance_micro"] == 1_000_000
    finally:
        off.close()


# ---- every bad input: the right error, nothing moved ------------------------------------

def _bad_input_cases(ids: dict):
    active, closed, bench, awaiting = ids["active"], ids["closed"], ids["bench"], ids["awaiting"]
    create = lambda **kw: lambda L: L.create_escrow(**{"buyer": "buyer", "seller": "seller2", "amount": "1", **kw})
    deduct = lambda **kw: lambda L: L.deduct(**{"agent_id": "seller2", "escrow_id": active, "amount": "0.1", **kw})
    release = lambda **kw: lambda L: L.release(**{"agent_id": "buyer", "escrow_id": active, **kw})
    submit = lambda **kw: lambda L: L.submit_result(**{"agent_id": "seller2", "escrow_id": bench,
                                                      "metric": "accuracy", "score": 0.9, **kw})
    cases = []
    for amount in ["0", "-1", "abc", None, True, float("nan"), float("inf"), "1e400", "0.0000004", [], "", 10 ** 12]:
        cases.append((f"create amount {amount!r}", create(amount=amount), InvalidAmount))
        cases.append((f"deduct amount {amount!r}", deduct(amount=amount), InvalidAmount))
    for amount in ["-1", "abc", True, float("nan"), "1e400", {}]:
        cases.append((f"release amount {amount!r}", release(amount=amount), InvalidAmount))
    for price in ["-0.1", "abc", float("inf"), True]:
        cases.append((f"release price_per_token {price!r}", release(usage={"prompt_tokens": 1}, price_per_token=price),
                      InvalidAmount))
    for ttl in [0, -5, 0.5, True, "60", None, float("nan"), float("inf"), 90 * DAY + 1, [60]]:
        cases.append((f"ttl {ttl!r}", create(ttl_seconds=ttl), ValidationError))
    for meta in ["x", [1], {"a": float("nan")}, {"a": {1, 2}}, {"big": "x" * 20_000}, 5]:
        cases.append((f"meta {str(meta)[:30]}", create(meta=meta), ValidationError))
        cases.append((f"release meta {str(meta)[:30]}", release(meta=meta), ValidationError))
    cases += [
        ("description not text", create(description=5), ValidationError),
        ("description too long", create(description="d" * 2_001), ValidationError),
        ("reason too long", deduct(reason="r" * 2_001), ValidationError),
        ("cancel reason not text", lambda L: L.cancel("buyer", active, reason=["r"]), ValidationError),
        ("release_condition not a dict", create(release_condition="accuracy>0.8"), ValidationError),
        ("release_condition no metric", create(release_condition={"threshold": 0.8}), ValidationError),
        ("release_condition no threshold", create(release_condition={"metric": "accuracy"}), ValidationError),
        ("release_condition nan threshold", create(release_condition={**BENCH, "threshold": float("nan")}),
         ValidationError),
        ("release_condition other type", create(release_condition={**BENCH, "type": "vibes"}), ValidationError),
        ("release_condition higher_is_better", create(release_condition={**BENCH, "higher_is_better": "yes"}),
         ValidationError),
        ("bonus unknown key", create(bonus_conditions={"throughput_tps_min": 1, "bonus_pct": 5, "x": 1}),
         ValidationError),
        ("bonus pct above 100", create(bonus_conditions={"throughput_tps_min": 1, "bonus_pct": 101}), ValidationError),
        ("bonus negative tps", create(bonus_conditions={"throughput_tps_min": -1, "bonus_pct": 5}), ValidationError),
        ("bonus pct negative", create(bonus_conditions={"throughput_tps_min": 1, "bonus_pct": -5}), InvalidAmount),
        ("bonus not a dict", create(bonus_conditions=[1, 5]), ValidationError),
        ("pricing unknown key", create(pricing={"per_banana": "1"}), ValidationError),
        ("pricing empty", create(pricing={}), ValidationError),
        ("pricing negative", create(pricing={"per_token": "-1"}), InvalidAmount),
        ("unknown seller", create(seller="nobody"), NotFound),
        ("unknown seller wallet", create(seller="0x" + "0" * 40), NotFound),
        ("seller not text", create(seller=123), ValidationError),
        ("seller empty", create(seller=""), ValidationError),
        ("seller is the buyer", create(seller="buyer"), ValidationError),
        ("unknown referral code", create(referral_code="ref_000000000000"), ValidationError),
        ("referral code not text", create(referral_code=12345), ValidationError),
        ("insufficient funds", create(amount="100.000001"), InsufficientFunds),
        ("unregistered buyer", create(buyer="nobody"), Unauthorized),
        ("unregistered deductor", deduct(agent_id="nobody"), Unauthorized),
        ("unregistered getter", lambda L: L.get("nobody", active), Unauthorized),
        ("unregistered history", lambda L: L.history("nobody"), Unauthorized),
        ("unregistered me", lambda L: L.me("nobody"), Unauthorized),
        ("deposit zero", lambda L: L.deposit("buyer", "0"), InvalidAmount),
        ("deposit negative", lambda L: L.deposit("buyer", -1), InvalidAmount),
        ("deposit unregistered", lambda L: L.deposit("nobody", "1"), Unauthorized),
        ("register bad id", lambda L: L.register("bad id!"), ValidationError),
        ("register empty id", lambda L: L.register(""), ValidationError),
        ("register non-str id", lambda L: L.register(7), ValidationError),
        ("register taken id", lambda L: L.register("buyer"), StateConflict),
        ("register unknown referral", lambda L: L.register("newbie", referral_code="ref_nope"), ValidationError),
    ]
    for escrow_id in ["esc_000000000000000000000000", "", 123, None, ["x"], {"id": active}, active + "x",
                      "x" * 500]:
        cases.append((f"deduct unknown id {escrow_id!r}", deduct(escrow_id=escrow_id), NotFound))
        cases.append((f"release unknown id {escrow_id!r}", release(escrow_id=escrow_id), NotFound))
        cases.append((f"cancel unknown id {escrow_id!r}", lambda L, i=escrow_id: L.cancel("buyer", i), NotFound))
        cases.append((f"get unknown id {escrow_id!r}", lambda L, i=escrow_id: L.get("buyer", i), NotFound))
        cases.append((f"submit unknown id {escrow_id!r}", submit(escrow_id=escrow_id), NotFound))
        cases.append((f"verify unknown id {escrow_id!r}", lambda L, i=escrow_id: L.verify("auditor", i, score=1),
                      NotFound))
    for usage in ["100", [1, 2], {"prompt_tokens": -1}, {"prompt_tokens": True}, {"completion_tokens": 1.5},
                  {"prompt_tokens": 10 ** 8}, {"completion_tokens": "5"}]:
        cases.append((f"deduct usage {usage!r}", deduct(usage=usage), ValidationError))
        cases.append((f"release usage {usage!r}", release(usage=usage, price_per_token="0.00001"), ValidationError))
    for score in [float("nan"), float("inf"), "abc", True, None, [0.9], {"s": 1}]:
        cases.append((f"submit score {score!r}", submit(score=score), ValidationError))
        cases.append((f"verify score {score!r}", lambda L, s=score: L.verify("auditor", awaiting, score=s),
                      ValidationError))
        if score is not None:  # None means "not measured" for these two
            cases.append((f"quality {score!r}", release(quality_score=score), ValidationError))
            cases.append((f"throughput {score!r}", release(throughput_tps=score), ValidationError))
    cases += [
        ("refund_remainder not bool", release(refund_remainder="yes"), ValidationError),
        ("refund_remainder int", release(refund_remainder=1), ValidationError),
        ("release above remainder", release(amount="1.000001"), InsufficientFunds),
        ("deduct above remainder", deduct(amount="1.000001"), InsufficientFunds),
        ("usage without price", release(usage={"prompt_tokens": 3}), ValidationError),
        ("metric mismatch", submit(metric="f1"), ValidationError),
        ("metric not text", submit(metric=None), ValidationError),
        ("artifact not a dict", submit(artifact="repo"), ValidationError),
        # wrong role
        ("buyer deducts", deduct(agent_id="buyer"), Forbidden),
        ("seller releases", release(agent_id="seller2"), Forbidden),
        ("buyer submits", submit(agent_id="buyer"), Forbidden),
        ("seller verifies", lambda L: L.verify("seller2", awaiting, score=1), Forbidden),
        ("buyer verifies (auditor named)", lambda L: L.verify("buyer", awaiting, score=1), Forbidden),
        ("verifier cancels", lambda L: L.cancel("auditor", awaiting), Forbidden),
        ("verifier releases", lambda L: L.release("auditor", awaiting), Forbidden),
        ("verifier deducts", lambda L: L.deduct("auditor", awaiting, "0.1"), Forbidden),
        # wrong state
        ("submit on plain escrow", submit(escrow_id=active), StateConflict),
        ("submit while awaiting", submit(escrow_id=awaiting), StateConflict),
        ("deduct while awaiting", deduct(escrow_id=awaiting), StateConflict),
        ("verify while active", lambda L: L.verify("buyer", bench, score=1), Forbidden),
        # closed escrow
        ("deduct closed", deduct(escrow_id=closed), StateConflict),
        ("release closed", release(escrow_id=closed), StateConflict),
        ("release closed amount 0", release(escrow_id=closed, amount="0"), StateConflict),
        ("cancel closed", lambda L: L.cancel("seller2", closed), StateConflict),
        # history bounds
        ("history limit 0", lambda L: L.history("buyer", limit=0), ValidationError),
        ("history limit 1001", lambda L: L.history("buyer", limit=1_001), ValidationError),
        ("history limit str", lambda L: L.history("buyer", limit="10"), ValidationError),
        ("history status", lambda L: L.history("buyer", status="open"), ValidationError),
        ("history role", lambda L: L.history("buyer", role="verifier"), ValidationError),
    ]
    return cases


def test_every_bad_input_raises_the_right_error_and_moves_nothing(ledger, world):
    ids = {"active": ledger.create_escrow("buyer", "seller2", "1")["id"]}
    closed = ledger.create_escrow("buyer", "seller2", "1")["id"]
    ledger.release("buyer", closed, amount="0.5")
    ids["closed"] = closed
    ids["bench"] = ledger.create_escrow("buyer", "seller2", "1", release_condition=BENCH)["id"]
    ids["awaiting"] = ledger.create_escrow("buyer", "seller2", "1",
                                           release_condition={**BENCH, "verifier": "auditor"})["id"]
    ledger.submit_result("seller2", ids["awaiting"], metric="accuracy", score=0.9)
    ledger.deposit("buyer", "3.5")  # buyer holds exactly 100 USDC again
    assert bal(ledger, "buyer") == 100_000_000

    problems = []
    cases = _bad_input_cases(ids)
    assert len(cases) > 150
    for name, call, expected in cases:
        before = snapshot(ledger)
        try:
            call(ledger)
        except EscrowError as error:
            if type(error) is not expected:
                problems.append(f"{name}: {type(error).__name__} ({error}) instead of {expected.__name__}")
            elif not str(error):
                problems.append(f"{name}: no message")
        except Exception as error:  # anything outside the error tree is a bug
            problems.append(f"{name}: {type(error).__name__} outside the error tree: {error!r}"[:300])
        else:
            problems.append(f"{name}: accepted, expected {expected.__name__}")
        if snapshot(ledger) != before:
            problems.append(f"{name}: something moved")
    assert not problems, "\n".join(problems)


def test_odd_text_is_accepted_or_refused_never_a_raw_database_error(ledger, world):
    """Text the ledger stores or looks up must give an EscrowError, not the driver's exception."""
    active = ledger.create_escrow("buyer", "seller2", "1")["id"]
    calls = {
        "model-300-chars": lambda: ledger.create_escrow("buyer", "seller2", "1", meta={"model": "m" * 300}),
        "nul-description": lambda: ledger.create_escrow("buyer", "seller2", "1", description="a\x00b"),
        "nul-escrow-id": lambda: ledger.get("buyer", "esc_\x00"),
        "nul-seller": lambda: ledger.create_escrow("buyer", "seller\x002", "1"),
        "nul-referral-code": lambda: ledger.create_escrow("buyer", "seller2", "1", referral_code="ref_\x00"),
        "nul-idempotency-key": lambda: ledger.deduct("seller2", active, "0.1", idempotency_key="k\x00"),
        "nul-verifier": lambda: ledger.create_escrow("buyer", "seller2", "1",
                                                     release_condition={**BENCH, "verifier": "a\x00"}),
    }
    problems = []
    for case, call in calls.items():
        before = snapshot(ledger)
        try:
            call()
        except EscrowError:
            if snapshot(ledger) != before:
                problems.append(f"{case}: refused but something moved")
        except Exception as error:
            problems.append(f"{case}: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("kwargs", [{"model": 5}, {"model": "m" * 201}, {"since_ms": "yesterday"},
                                    {"since_ms": True}, {"until_ms": 10 ** 30}, {"until_ms": -1}])
def test_history_filters_of_the_wrong_type_or_size_are_refused(ledger, world, kwargs):
    with pytest.raises(ValidationError):
        ledger.history("buyer", **kwargs)


def test_an_agent_id_starting_with_0x_can_be_named_as_seller(ledger, world):
    ledger.register("0xseller")
    e = ledger.create_escrow("buyer", "0xseller", "1")
    assert e["seller"] == "0xseller"
    wallet = ledger.me("0xseller")["wallet"]
    assert ledger.create_escrow("buyer", wallet, "1")["seller"] == "0xseller"


def test_an_agent_id_shaped_like_a_wallet_is_refused(ledger, world):
    with pytest.raises(ValidationError, match="wallet"):
        ledger.register("0x" + "ab" * 20)


# ---- role matrix -----------------------------------------------------------------------

def test_a_third_agent_learns_nothing(ledger, world):
    e = ledger.create_escrow("buyer", "seller2", "1", description="secret job")
    calls = {
        "get": lambda i: ledger.get("stranger", i),
        "deduct": lambda i: ledger.deduct("stranger", i, "0.1"),
        "release": lambda i: ledger.release("stranger", i),
        "cancel": lambda i: ledger.cancel("stranger", i),
        "submit_result": lambda i: ledger.submit_result("stranger", i, metric="accuracy", score=1),
        "verify": lambda i: ledger.verify("stranger", i, score=1),
    }
    fake = "esc_" + "0" * 24
    for name, call in calls.items():
        real_error = expect_nothing_moved(ledger, NotFound, call, e["id"])
        fake_error = expect_nothing_moved(ledger, NotFound, call, fake)
        real, unknown = str(real_error), str(fake_error)
        assert real.replace(e["id"], "ID") == unknown.replace(fake, "ID"), name
        for leak in ("buyer", "seller2", "secret", "active", "1.000000"):
            assert leak not in real, (name, real)
    assert ledger.history("stranger") == []
    assert ledger.me("stranger")["escrows_open"] == 0


def test_parties_see_their_escrow_and_act_only_in_their_role(ledger, world):
    e = ledger.create_escrow("buyer", "seller2", "1")
    assert ledger.get("buyer", e["id"])["id"] == ledger.get("seller2", e["id"])["id"] == e["id"]
    assert ledger.get("seller2", e["id"], events_limit=1)["events"][0]["kind"] == "created"
    expect_nothing_moved(ledger, Forbidden, ledger.release, "seller2", e["id"])
    expect_nothing_moved(ledger, Forbidden, ledger.release, "seller2", e["id"], amount="0.1")
    expect_nothing_moved(ledger, Forbidden, ledger.deduct, "buyer", e["id"], "0.1")
    expect_nothing_moved(ledger, Forbidden, ledger.submit_result, "buyer", e["id"], metric="accuracy", score=1)
    assert ledger.deduct("seller2", e["id"], "0.1")["status"] == "active"
    assert ledger.release("buyer", e["id"])["status"] == "released"


# ---- history and analytics -------------------------------------------------------------

def test_history_filters_and_order(ledger, world, clock):
    made = []
    for model, seller in (("m1", "seller2"), ("m2", "seller2"), ("m1", "seller"), ("m2", "seller2")):
        clock.advance(10)
        made.append(ledger.create_escrow("buyer", seller, "1", meta={"model": model})["id"])
    ledger.release("buyer", made[0], amount="0.5")
    ledger.cancel("seller2", made[1])
    register(ledger, "shop", fund=None)
    ledger.deposit("seller2", "1")
    clock.advance(10)
    as_buyer = ledger.create_escrow("seller2", "shop", "0.5", meta={"model": "m3"})["id"]

    ids = lambda rows: [row["id"] for row in rows]
    assert ids(ledger.history("buyer")) == made[::-1]
    assert ids(ledger.history("buyer", limit=1)) == [made[3]]
    assert len(ledger.history("buyer", limit=1_000)) == 4
    assert ids(ledger.history("buyer", status="released")) == [made[0]]
    assert ids(ledger.history("buyer", status="cancelled")) == [made[1]]
    assert ids(ledger.history("buyer", status="active")) == [made[3], made[2]]
    assert ids(ledger.history("buyer", status="expired")) == []
    assert ids(ledger.history("buyer", model="m1")) == [made[2], made[0]]
    assert ids(ledger.history("buyer", model="m1", status="active")) == [made[2]]
    assert ids(ledger.history("seller2")) == [as_buyer, made[3], made[1], made[0]]
    assert ids(ledger.history("seller2", role="seller")) == [made[3], made[1], made[0]]
    assert ids(ledger.history("seller2", role="buyer")) == [as_buyer]
    assert ids(ledger.history("seller2", role="buyer", model="m2")) == []
    assert ids(ledger.history("seller")) == [made[2]]
    created = ledger.get("buyer", made[2])["created_at_ms"]
    assert ids(ledger.history("buyer", since_ms=created)) == [made[3], made[2]]
    assert ids(ledger.history("buyer", until_ms=created)) == [made[1], made[0]]
    assert "events" not in ledger.history("buyer")[0]


def test_analytics_numbers(ledger, world):
    a = ledger.create_escrow("buyer", "seller", "1", meta={"model": "m1"})
    ledger.deduct("seller", a["id"], "0.2", usage={"prompt_tokens": 100, "completion_tokens": 20})
    ledger.release("buyer", a["id"], amount="0.3", usage={"prompt_tokens": 10, "completion_tokens": 5})
    b = ledger.create_escrow("buyer", "seller", "2", meta={"model": "m1"}, pricing=TOKEN_PRICES)
    ledger.release("buyer", b["id"], usage={"prompt_tokens": 2048, "completion_tokens": 512})
    c = ledger.create_escrow("buyer", "seller2", "0.5")
    ledger.cancel("buyer", c["id"])

    spend = {row["model"]: row for row in ledger.analytics("buyer")["spend"]}
    assert set(spend) == {"m1", None}
    assert spend["m1"] == {"model": "m1", "escrows": 2, "paid_micro": 500_000 + 1_792,
                           "fees_micro": 2_000 + 3_000 + 18, "refunded_micro": 500_000 + 2_000_000 - 1_792,
                           "tokens_in": 100 + 10 + 2048, "tokens_out": 20 + 5 + 512}
    assert spend[None]["escrows"] == 1 and spend[None]["refunded_micro"] == 500_000 and spend[None]["paid_micro"] == 0
    seller = ledger.analytics("seller")
    assert seller["spend"] == []
    assert [row["paid_micro"] for row in seller["earnings"]] == [501_792]
    ref = ledger.analytics("ref")
    # referral: 15% of each fee, rounded per payout: 2000 -> 300, 3000 -> 450, 18 -> 3 (2.7)
    assert ref["referral_earned_micro"] == 300 + 450 + 3 == bal(ledger, "ref")
    assert ledger.analytics("stranger") == {"agent_id": "stranger", "spend": [], "earnings": [],
                                            "referral_earned_micro": 0}
    with pytest.raises(Unauthorized):
        ledger.analytics("nobody")


# ---- the public clients ----------------------------------------------------------------

@pytest.fixture
def close_embedded(db_url):
    yield
    from hf_escrow import client as client_module
    with client_module._LEDGERS_LOCK:
        cached = client_module._LEDGERS.pop(db_url, None)
    if cached is not None:
        cached.close()


def _client_flow(buyer, seller, seller_name: str) -> dict:
    assert seller.register().agent_id == seller_name
    agent = buyer.register()
    assert agent.api_key.startswith("hfe_")
    assert buyer.claim_faucet() == Decimal("10.000000")
    me = buyer.me()
    assert me.balance == Decimal("10") and isinstance(me.balance, Decimal)
    e = buyer.create_escrow(seller_name, "1.50", ttl_seconds=600, meta={"model": "m"},
                            bonus_conditions={"throughput_tps_min": 10, "bonus_pct": 5})
    assert isinstance(e, hf_escrow.Escrow) and e.amount == Decimal("1.5") and e.remaining == Decimal("1.500000")
    assert isinstance(e.amount, Decimal) and e.is_open
    d = seller.deduct(e.id, "0.5", reason="tokens")
    assert isinstance(d, hf_escrow.Receipt)
    assert (d.gross, d.net, d.fee) == (Decimal("0.5"), Decimal("0.495"), Decimal("0.005"))
    r = buyer.release(e.id, amount=Decimal("0.25"), throughput_tps=20, quality_score=0.95)
    assert (r.base, r.bonus, r.gross) == (Decimal("0.25"), Decimal("0.0375"), Decimal("0.2875"))
    assert r.bonus_parts == {"throughput": Decimal("0.0125"), "quality": Decimal("0.025"), "streak": Decimal(0)}
    assert r.gross == r.net + r.fee and r.refunded == Decimal("0.7125")
    view = buyer.get(e.id)
    assert view.amount == view.paid + view.refunded + view.remaining
    assert (view.status, view.paid, view.refunded, view.remaining) == \
        ("released", Decimal("0.7875"), Decimal("0.7125"), Decimal(0))
    assert [ev.kind for ev in view.events] == ["created", "deducted", "released"]
    assert seller.me().balance == Decimal("0.495") + r.net
    history = buyer.history(status="released")
    assert [h.id for h in history] == [e.id]
    analytics = buyer.analytics()
    assert analytics["spend"][0]["paid"] == Decimal("0.7875")
    with pytest.raises(hf_escrow.Forbidden):
        seller.release(e.id)
    return {"receipts": [(x.gross, x.net, x.fee, x.referral, x.base, x.bonus, x.refunded, x.status)
                         for x in (d, r)],
            "view": (view.amount, view.paid, view.fees, view.refunded, view.remaining, view.bonus, view.status),
            "balances": (buyer.me().balance, seller.me().balance)}


def test_sync_client_flow(ledger, db_url, close_embedded):
    buyer = hf_escrow.connect(agent="c-buyer", database_url=db_url)
    seller = hf_escrow.connect(agent="c-seller", database_url=db_url)
    result = _client_flow(buyer, seller, "c-seller")
    # buyer: 10 - 0.5 deducted - 0.2875 released; seller: 0.495 + 0.2875 less its 1% fee
    assert result["balances"] == (Decimal("9.2125"), Decimal("0.495") + Decimal("0.2875") - Decimal("0.002875"))
    with pytest.raises(hf_escrow.NotFound):
        hf_escrow.connect(agent="c-seller", database_url=db_url).get("esc_" + "0" * 24)
    with pytest.raises(hf_escrow.Unauthorized):
        hf_escrow.connect(database_url=db_url).me()
    with pytest.raises(hf_escrow.InvalidAmount):
        buyer.create_escrow("c-seller", "-1")


def test_async_client_gives_the_same_results(ledger, db_url, close_embedded):
    sync = _client_flow(hf_escrow.connect(agent="s-buyer", database_url=db_url),
                        hf_escrow.connect(agent="s-seller", database_url=db_url), "s-seller")

    class Awaiting:
        """Runs the async client's coroutines one by one, so the shared flow can drive it."""

        def __init__(self, client, loop):
            self._client, self._loop = client, loop

        def __getattr__(self, name):
            method = getattr(self._client, name)
            return lambda *a, **kw: self._loop.run_until_complete(method(*a, **kw))

    loop = asyncio.new_event_loop()
    try:
        abuyer = hf_escrow.connect_async(agent="a-buyer", database_url=db_url)
        aseller = hf_escrow.connect_async(agent="a-seller", database_url=db_url)
        assert isinstance(abuyer, hf_escrow.AsyncEscrowClient)
        result = _client_flow(Awaiting(abuyer, loop), Awaiting(aseller, loop), "a-seller")

        async def errors():
            with pytest.raises(hf_escrow.NotFound):
                await aseller.get("esc_" + "0" * 24)
            with pytest.raises(hf_escrow.InsufficientFunds):
                await abuyer.create_escrow("a-seller", "1000")
            async with abuyer:
                pass
        loop.run_until_complete(errors())
    finally:
        loop.close()
    assert result == sync
