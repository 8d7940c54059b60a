"""hf_escrow.vllm: the vLLM guide's billing flow on a real transformers-backed engine.

The engine is `TransformersEngine` on a tiny random Llama (real tokenizer, real
`model.generate`, tokens streamed from a worker thread); the ledger is a real SQLite file.
Bonus arithmetic at the thresholds is driven through `release(..., throughput_tps=...)`
with chosen values, because real tokens/s cannot be steered to 100.001.
"""

from __future__ import annotations

import asyncio
import time
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from types import SimpleNamespace

import pytest

import hf_escrow
from hf_escrow import ValidationError
from hf_escrow.ledger import Ledger
from hf_escrow.vllm import BilledGeneration, EscrowedEngine, SamplingParams, TransformersEngine

from .helpers import assert_audit_clean
from .models import build_tiny_chat_model

PRICE = "0.0000015"          # 1.5 micro-USDC a token: odd token counts round (half-even)
GUIDE_BONUS = {"throughput_tps_min": 100, "bonus_pct": 5}


def micro(value: Decimal) -> int:
    """USDC or micro-USDC fraction -> micro-USDC, half-even: written here independently of hf_escrow.money."""
    return int(value.to_integral_value(rounding=ROUND_HALF_EVEN))


def usdc(micro_amount: int) -> Decimal:
    return Decimal(micro_amount) / 1_000_000


def tokens_cost(tokens: int, price: str = PRICE) -> int:
    return micro(Decimal(tokens) * Decimal(price) * 1_000_000)


def split(gross: int, referred: bool = True) -> tuple[int, int, int]:
    """(net, fee, referral): 1 % fee of the gross, 15 % of the fee to the referrer."""
    fee = micro(Decimal(gross) / 100)
    referral = micro(Decimal(fee) * 15 / 100) if referred else 0
    return gross - fee, fee, referral


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-vllm"))


@pytest.fixture(scope="session")
def engine(tiny_dir) -> TransformersEngine:
    return TransformersEngine(tiny_dir)


@pytest.fixture
def market(tmp_path):
    """A funded buyer, a seller and a referrer (whose code the buyer passes at create)."""
    url = f"sqlite:///{tmp_path}/l.db"
    ledger = Ledger(url)
    ref = ledger.register("referrer")
    ledger.register("buyer")
    ledger.register("seller")
    ledger.deposit("buyer", "10")
    world = SimpleNamespace(ledger=ledger, url=url, ref_code=ref["referral_code"],
                            buyer=hf_escrow.connect(agent="buyer", database_url=url),
                            balance=lambda agent: ledger.me(agent)["balance_micro"])
    yield world
    assert_audit_clean(ledger)
    ledger.close()


def balances(market) -> dict[str, int]:
    return {name: market.balance(name) for name in ("buyer", "seller", "referrer")}


def slow_hook(model, seconds: float = 0.0, fail_at: int | None = None):
    """A forward hook that counts forward passes, and sleeps or raises at the chosen one."""
    calls = {"n": 0}

    def hook(module, args, output):
        calls["n"] += 1
        if fail_at is not None and calls["n"] >= fail_at:
            raise RuntimeError(f"worker crashed at decode step {calls['n']}")
        if seconds:
            time.sleep(seconds)
    return calls, model.register_forward_hook(hook)


# ---- the engine -----------------------------------------------------------------------


def test_transformers_engine_streams_like_vllm(engine):
    """Cumulative outputs one token at a time, only the last finished, the model's own greedy tokens."""
    async def run():
        return [out async for out in engine.generate("hello world", SamplingParams(max_tokens=6), "req-1")]

    outputs = asyncio.run(run())
    assert [len(o.outputs[0].token_ids) for o in outputs] == [1, 2, 3, 4, 5, 6]
    assert [o.finished for o in outputs] == [False] * 5 + [True]
    assert outputs[-1].outputs[0].finish_reason == "length" and outputs[-1].request_id == "req-1"
    ids = engine.tokenizer("hello world", return_tensors="pt")["input_ids"]
    greedy = engine.model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:].tolist()
    assert outputs[-1].outputs[0].token_ids == greedy
    assert outputs[-1].outputs[0].text == engine.tokenizer.decode(greedy, skip_special_tokens=True)
    assert outputs[-1].prompt_token_ids == ids[0].tolist()


# ---- end to end -----------------------------------------------------------------------


def test_seller_paid_exactly_prompt_plus_completion_with_referral_and_refund(engine, market):
    billed = EscrowedEngine(engine, escrow=market.buyer, seller="seller", price_per_token=PRICE,
                            referral_code=market.ref_code)
    before = balances(market)
    prompt = "a buyer locks usdc before work starts"
    out = asyncio.run(billed.generate_with_billing(prompt, max_tokens=7))

    assert isinstance(out, BilledGeneration) and out.text
    prompt_tokens = len(engine.tokenizer.encode(prompt))
    assert (out.prompt_tokens, out.completion_tokens) == (prompt_tokens, 7)  # the tiny model never stops early
    assert out.tokens_per_sec > 0 and out.quality_score is None and out.finish_reason == "length"

    base = tokens_cost(prompt_tokens + 7)
    locked = tokens_cost(prompt_tokens + 7) + micro(Decimal(tokens_cost(prompt_tokens + 7)) * 2 / 100)  # + streak
    net, fee, referral = split(base)
    r = out.receipt
    assert (r.base, r.bonus, r.gross, r.fee, r.net, r.referral) == tuple(map(usdc, (base, 0, base, fee, net, referral)))
    assert r.refunded == usdc(locked - base) and r.status == "released"

    escrow = market.buyer.get(out.escrow_id)
    assert escrow.amount == usdc(locked) and escrow.referrer == "referrer" and escrow.model == engine.model_name
    assert escrow.meta == {"model": engine.model_name, "prompt_tokens": prompt_tokens, "max_completion_tokens": 7,
                           "request_id": out.request_id}
    assert (escrow.tokens_in, escrow.tokens_out) == (prompt_tokens, 7)
    after = balances(market)
    assert after["buyer"] - before["buyer"] == -base
    assert after["seller"] - before["seller"] == net
    assert after["referrer"] - before["referrer"] == referral


def test_async_client_end_to_end_bonus_earned_and_not_earned(engine, market):
    """tps_min=0 with a judge saying 0.91 earns both bonuses; a huge tps_min with 0.9 earns none."""
    async def judge_091(prompt, text):
        return 0.91

    async def run():
        async with hf_escrow.connect_async(agent="buyer", database_url=market.url) as aesc:
            earn = EscrowedEngine(engine, escrow=aesc, seller="seller", price_per_token=PRICE,
                                  bonus_conditions={"throughput_tps_min": 0, "bonus_pct": 5},
                                  referral_code=market.ref_code, quality_judge=judge_091)
            miss = EscrowedEngine(engine, escrow=aesc, seller="seller", price_per_token=PRICE,
                                  bonus_conditions={"throughput_tps_min": 1e9, "bonus_pct": 5},
                                  referral_code=market.ref_code, quality_judge=lambda prompt, text: 0.9)
            return (await earn.generate_with_billing("hello world", SamplingParams(max_tokens=5)),
                    await miss.generate_with_billing("hello world", SamplingParams(max_tokens=5)))

    before = balances(market)
    earned, missed = asyncio.run(run())
    tokens = earned.prompt_tokens + 5
    base = tokens_cost(tokens)
    locked = base + sum(micro(Decimal(base) * pct / 100) for pct in (2, 5, 10))
    assert earned.escrow_id != missed.escrow_id
    assert market.buyer.get(earned.escrow_id).amount == usdc(locked)

    throughput, quality = micro(Decimal(base) * 5 / 100), micro(Decimal(base) * 10 / 100)
    net, fee, referral = split(base + throughput + quality)
    r = earned.receipt
    assert earned.quality_score == 0.91 and earned.tokens_per_sec > 0
    assert r.base == usdc(base) and r.bonus == usdc(throughput + quality)
    assert r.bonus_parts == {"throughput": usdc(throughput), "quality": usdc(quality), "streak": usdc(0)}
    assert (r.gross, r.fee, r.net, r.referral) == tuple(map(usdc, (base + throughput + quality, fee, net, referral)))
    assert r.refunded == usdc(locked - base - throughput - quality)

    m = missed.receipt
    assert missed.quality_score == 0.9 and missed.tokens_per_sec < 1e9
    assert (m.base, m.bonus, m.gross) == (usdc(base), usdc(0), usdc(base))
    assert m.fee == usdc(split(base)[1]) and m.refunded == usdc(locked - base)

    after = balances(market)
    assert after["seller"] - before["seller"] == net + split(base)[0]
    assert after["buyer"] - before["buyer"] == -(base + throughput + quality) - base
    assert after["referrer"] - before["referrer"] == referral + split(base)[2]


def test_generation_failing_midway_cancels_with_full_refund(tiny_dir, market):
    failing = TransformersEngine(tiny_dir)
    calls, handle = slow_hook(failing.model, fail_at=4)  # prefill + 2 decode steps, then the crash
    seen = []
    real_generate = failing.generate

    async def watched(*args):  # record what was streamed before the crash
        async for out in real_generate(*args):
            seen.append(len(out.outputs[0].token_ids))
            yield out
    failing.generate = watched
    billed = EscrowedEngine(failing, escrow=market.buyer, seller="seller", price_per_token=PRICE,
                            bonus_conditions=GUIDE_BONUS, referral_code=market.ref_code)
    before = balances(market)
    with pytest.raises(RuntimeError, match="worker crashed"):
        asyncio.run(billed.generate_with_billing("hello world", max_tokens=10))
    handle.remove()

    assert seen == [1, 2, 3] and calls["n"] == 4  # it failed mid-way, after streaming tokens
    escrow = market.buyer.history(limit=1)[0]
    assert escrow.status == "cancelled" and escrow.refunded == escrow.amount and escrow.paid == 0
    assert balances(market) == before


def test_cancelled_request_cancels_escrow_and_stops_the_worker(tiny_dir, market):
    slow = TransformersEngine(tiny_dir)
    calls, handle = slow_hook(slow.model, seconds=0.02)
    billed = EscrowedEngine(slow, escrow=market.buyer, seller="seller", price_per_token=PRICE)
    before = balances(market)

    async def run():
        await asyncio.wait_for(billed.generate_with_billing("hello world", max_tokens=200), timeout=0.5)

    with pytest.raises(TimeoutError):
        asyncio.run(run())
    stopped_at = calls["n"]
    time.sleep(0.2)
    handle.remove()
    assert 1 < stopped_at < 100 and calls["n"] == stopped_at  # decoding stopped with the request
    escrow = market.buyer.history(limit=1)[0]
    assert escrow.status == "cancelled" and escrow.refunded == escrow.amount
    assert balances(market) == before


def test_batch_generate_settles_each_request_and_returns_failures_in_place(engine, market):
    billed = EscrowedEngine(engine, escrow=market.buyer, seller="seller", price_per_token=PRICE)
    before = balances(market)
    results = asyncio.run(billed.batch_generate([
        {"prompt": "hello world", "max_tokens": 3},
        "refund the remainder",                                  # vLLM's default max_tokens: 16
        {"prompt": "say hi in french", "max_tokens": 0},         # refused before any escrow
        {"prompt": "tokens are billed", "max_tokens": 4, "worker_wallet": "seller", "request_id": "job-4"},
    ]))
    ok = [r for r in results if isinstance(r, BilledGeneration)]
    assert [type(r).__name__ for r in results] == ["BilledGeneration", "BilledGeneration", "ValidationError",
                                                   "BilledGeneration"]
    assert [r.completion_tokens for r in ok] == [3, 16, 4] and ok[2].request_id == "job-4"
    paid = sum(tokens_cost(r.prompt_tokens + r.completion_tokens) for r in ok)
    assert all(r.receipt.gross == usdc(tokens_cost(r.prompt_tokens + r.completion_tokens)) for r in ok)
    assert market.balance("buyer") == before["buyer"] - paid
    assert len(market.buyer.history()) == 3


# ---- bonus arithmetic at the thresholds -----------------------------------------------

# The guide's numbers: 1000 prompt + 387 completion tokens at 0.000002 -> base 2774 micro-USDC.
# 5 % of it is 138.7 -> 139; 10 % is 277.4 -> 277 (half-even, each bonus rounded on its own).
BASE = 2774


@pytest.mark.parametrize("tps, quality, throughput_bonus, quality_bonus", [
    (99.999, None, 0, 0),        # just under the minimum
    (100, None, 0, 0),           # at it: the guide pays above (">100 tokens/sec")
    (100.001, None, 139, 0),     # just over
    (None, 0.9, 0, 0),           # quality 0.9 is not above 0.9
    (None, 0.91, 0, 277),        # 0.91: +10 % of the base
    (100.001, 0.91, 139, 277),   # both, paid from the remainder
])
def test_bonus_math_exact_at_the_thresholds(market, tps, quality, throughput_bonus, quality_bonus):
    sizing = EscrowedEngine(None, escrow=market.buyer, seller="seller", price_per_token="0.000002",
                            bonus_conditions=GUIDE_BONUS, quality_judge=lambda p, t: 1.0)
    amount = sizing.escrow_amount(prompt_tokens=1000, max_tokens=387)
    assert amount == usdc(2774 + 55 + 139 + 277)  # base + 2 % streak + 5 % throughput + 10 % quality headroom
    e = market.buyer.create_escrow("seller", amount, bonus_conditions=GUIDE_BONUS, referral_code=market.ref_code,
                                   meta={"model": "llama-3-8b-instruct", "prompt_tokens": 1000,
                                         "max_completion_tokens": 387})
    before = balances(market)
    r = market.buyer.release(e.id, usage={"prompt_tokens": 1000, "completion_tokens": 387},
                             price_per_token="0.000002", quality_score=quality, throughput_tps=tps)
    gross = BASE + throughput_bonus + quality_bonus
    net, fee, referral = split(gross)
    assert r.base == usdc(BASE)
    assert r.bonus_parts == {"throughput": usdc(throughput_bonus), "quality": usdc(quality_bonus), "streak": usdc(0)}
    assert (r.bonus, r.gross, r.fee, r.net, r.referral) == tuple(map(usdc, (throughput_bonus + quality_bonus, gross,
                                                                            fee, net, referral)))
    assert r.refunded == amount - usdc(gross)
    after = balances(market)
    assert after["seller"] - before["seller"] == net and after["referrer"] - before["referrer"] == referral
    assert after["buyer"] - before["buyer"] == round(r.refunded * 1_000_000)


def test_bonus_is_capped_at_the_remainder_without_headroom(market):
    """Without headroom the bonus can only take what the unused tokens left in the escrow."""
    sizing = EscrowedEngine(None, escrow=market.buyer, seller="seller", price_per_token="0.000002",
                            bonus_conditions=GUIDE_BONUS, headroom_pct=0)
    amount = sizing.escrow_amount(prompt_tokens=1000, max_tokens=400)
    assert amount == usdc(2800)
    e = market.buyer.create_escrow("seller", amount, bonus_conditions=GUIDE_BONUS)
    r = market.buyer.release(e.id, usage={"prompt_tokens": 1000, "completion_tokens": 387},
                             price_per_token="0.000002", quality_score=0.95, throughput_tps=150)
    assert (r.base, r.bonus, r.gross, r.refunded) == (usdc(2774), usdc(26), usdc(2800), usdc(0))
    assert r.bonus_parts["throughput"] == usdc(26) and r.bonus_parts["quality"] == usdc(0)
    assert r.fee == usdc(28)


# ---- edges ----------------------------------------------------------------------------


def test_failing_or_out_of_range_judge_still_pays_the_base(engine, market):
    def broken(prompt, text):
        raise RuntimeError("judge model offline")

    for judge in (broken, lambda prompt, text: 1.5):
        billed = EscrowedEngine(engine, escrow=market.buyer, seller="seller", price_per_token=PRICE,
                                quality_judge=judge)
        out = asyncio.run(billed.generate_with_billing("hello world", max_tokens=2))
        assert out.quality_score is None and out.receipt.bonus == 0
        assert out.receipt.base == usdc(tokens_cost(out.prompt_tokens + 2))


def test_sampling_params_need_a_bound_and_are_not_mutated(engine, market):
    billed = EscrowedEngine(engine, escrow=market.buyer, seller="seller", price_per_token=PRICE)
    params = SamplingParams(max_tokens=9)
    out = asyncio.run(billed.generate_with_billing("hello world", params, max_tokens=2))
    assert out.completion_tokens == 2 and params.max_tokens == 9
    with pytest.raises(ValidationError, match="max_tokens"):
        asyncio.run(billed.generate_with_billing("hello world", SamplingParams(max_tokens=None)))
    with pytest.raises(ValidationError, match="price_per_token"):
        EscrowedEngine(engine, escrow=market.buyer, seller="seller", price_per_token="0")
    assert len(market.buyer.history()) == 1  # the refused request locked nothing
