"""The seller's metered gateway in front of real `transformers serve` upstreams."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import httpx
import pytest
from huggingface_hub import InferenceClient

import hf_escrow
from hf_escrow.gateway import create_gateway
from hf_escrow.ledger import Ledger
from hf_escrow.localmodel import served_model
from hf_escrow.pricing import Pricing
from hf_escrow.money import to_usdc

from .helpers import assert_audit_clean
from .liveserver import free_port, serve_app
from .models import build_tiny_chat_model

PRICES = {"input_per_1k": "0.0005", "output_per_1k": "0.0015"}
MSGS = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = build_tiny_chat_model(tmp_path_factory.mktemp("gw-tiny"))
    with served_model(folder, timeout_s=120) as url:
        yield folder, url


class CountingUpstream:
    """A loopback relay in front of the upstream that counts the requests reaching it."""

    def __init__(self, upstream: str):
        from fastapi import FastAPI, Request
        from fastapi.responses import Response
        self.count = 0
        self.app = FastAPI()

        @self.app.api_route("/v1/{path:path}", methods=["GET", "POST"])
        async def relay(path: str, request: Request):
            self.count += 1
            async with httpx.AsyncClient(timeout=60) as client:
                answer = await client.request(request.method, f"{upstream}/{path}", content=await request.body(),
                                              headers={"content-type": "application/json"})
            return Response(answer.content, status_code=answer.status_code, media_type="application/json")


@pytest.fixture
def market(tmp_path, tiny):
    folder, upstream = tiny
    db = f"sqlite:///{tmp_path / 'l.db'}"
    ledger = Ledger(db)
    ref = ledger.register("referrer")
    keys = {name: ledger.register(name)["api_key"] for name in ("buyer", "buyer2")}
    ledger.register("seller", referral_code=ref["referral_code"])
    for name in keys:
        ledger.deposit(name, "1")
    app = create_gateway(upstream, escrow=hf_escrow.connect(agent="seller", database_url=db), pricing=PRICES,
                         tokenizer=str(folder))
    with serve_app(app) as gateway_url:
        yield ledger, db, keys, gateway_url, folder
    assert_audit_clean(ledger)


def _escrow(db, buyer, amount="0.01"):
    return hf_escrow.connect(agent=buyer, database_url=db).create_escrow("seller", amount)


def _cost(prompt, completion) -> Decimal:
    return to_usdc(Pricing.coerce(PRICES).tokens_micro(prompt, completion))


def test_inference_client_through_the_gateway_streamed_and_not(market):
    ledger, db, keys, url, folder = market
    escrow = _escrow(db, "buyer")
    client = InferenceClient(base_url=f"{url}/v1", api_key=keys["buyer"], headers={"X-Escrow-Id": escrow.id})
    out = client.chat_completion(MSGS, model=str(folder), max_tokens=9)
    chunks = list(client.chat_completion(MSGS, model=str(folder), max_tokens=6, stream=True))
    time.sleep(0.3)  # the deduction lands right after the last byte
    view = hf_escrow.connect(agent="buyer", database_url=db).get(escrow.id)
    assert out.usage.completion_tokens == 9 and chunks[-1].usage.completion_tokens == 6
    assert view.paid == _cost(out.usage.prompt_tokens, 9) + _cost(chunks[-1].usage.prompt_tokens, 6)
    assert view.tokens_out == 15 and view.status == "active"
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == str(folder)


def test_raw_openai_style_http_with_escrow_in_the_body(market):
    ledger, db, keys, url, folder = market
    escrow = _escrow(db, "buyer")
    answer = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {keys['buyer']}"},
                        json={"model": str(folder), "messages": MSGS, "max_tokens": 5, "escrow_id": escrow.id})
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 5
    assert ledger.get("buyer", escrow.id)["paid_micro"] == int(
        _cost(answer.json()["usage"]["prompt_tokens"], 5) * 10**6)


def test_client_disconnect_mid_stream_pays_only_what_was_delivered(market):
    ledger, db, keys, url, folder = market
    escrow = _escrow(db, "buyer")
    delivered = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {keys['buyer']}", "X-Escrow-Id": escrow.id},
                      json={"model": str(folder), "messages": MSGS, "max_tokens": 200, "stream": True}) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:") and '"content"' in line:
                event = json.loads(line[5:])
                if event["choices"][0]["delta"].get("content"):
                    delivered.append(event["choices"][0]["delta"]["content"])
            if len(delivered) >= 3:
                break
    deadline = time.monotonic() + 20
    while ledger.get("buyer", escrow.id)["paid_micro"] == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    view = ledger.get("buyer", escrow.id)
    assert 3 <= view["tokens_out"] < 200
    assert view["paid_micro"] == Pricing.coerce(PRICES).tokens_micro(view["tokens_in"], view["tokens_out"])


def test_an_escrow_that_cannot_cover_the_request_gets_402_and_the_upstream_sees_nothing(tiny, tmp_path):
    folder, upstream = tiny
    db = f"sqlite:///{tmp_path / 'l.db'}"
    ledger = Ledger(db)
    key = ledger.register("buyer")["api_key"]
    ledger.register("seller")
    ledger.deposit("buyer", "1")
    counting = CountingUpstream(upstream.removesuffix("/v1"))
    with serve_app(counting.app) as relay_url:
        app = create_gateway(f"{relay_url}/v1", escrow=hf_escrow.connect(agent="seller", database_url=db),
                             pricing=PRICES)
        with serve_app(app) as url:
            escrow = _escrow(db, "buyer", amount="0.000010")
            answer = httpx.post(f"{url}/v1/chat/completions",
                                headers={"Authorization": f"Bearer {key}", "X-Escrow-Id": escrow.id},
                                json={"model": str(folder), "messages": MSGS, "max_tokens": 5000})
            assert answer.status_code == 402 and "may cost up to" in answer.json()["error"]["message"]
            assert counting.count == 0
            bad = httpx.post(f"{url}/v1/chat/completions", headers={"X-Escrow-Id": escrow.id},
                             json={"model": "x", "messages": MSGS, "max_tokens": 5})
            assert bad.status_code == 401 and counting.count == 0
            # An upstream error (unknown model) reaches the upstream but costs nothing.
            funded = _escrow(db, "buyer", amount="0.01")
            failed = httpx.post(f"{url}/v1/chat/completions",
                                headers={"Authorization": f"Bearer {key}", "X-Escrow-Id": funded.id},
                                json={"model": "no-such-model", "messages": MSGS, "max_tokens": 2})
            assert failed.status_code >= 400 and counting.count == 1
    assert ledger.get("buyer", escrow.id)["paid_micro"] == 0 == ledger.get("buyer", funded.id)["paid_micro"]
    assert_audit_clean(ledger)


def test_another_buyers_escrow_is_refused(market):
    ledger, db, keys, url, folder = market
    escrow = _escrow(db, "buyer")
    answer = httpx.post(f"{url}/v1/chat/completions",
                        headers={"Authorization": f"Bearer {keys['buyer2']}", "X-Escrow-Id": escrow.id},
                        json={"model": str(folder), "messages": MSGS, "max_tokens": 3})
    assert answer.status_code in (403, 404)
    assert ledger.get("buyer", escrow.id)["paid_micro"] == 0


def test_concurrent_buyers_are_each_charged_their_own_tokens(market):
    ledger, db, keys, url, folder = market
    escrows = {name: _escrow(db, name) for name in keys}
    results = {name: [] for name in keys}
    lock = threading.Lock()

    def call(i):
        name = "buyer" if i % 2 else "buyer2"
        client = InferenceClient(base_url=f"{url}/v1", api_key=keys[name],
                                 headers={"X-Escrow-Id": escrows[name].id})
        out = client.chat_completion(MSGS, model=str(folder), max_tokens=3 + i % 4)
        with lock:
            results[name].append(out.usage)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(call, range(12)))
    for name, usages in results.items():
        expected = sum(int(_cost(u.prompt_tokens, u.completion_tokens) * 10**6) for u in usages)
        assert ledger.get(name, escrows[name].id)["paid_micro"] == expected
        assert ledger.get(name, escrows[name].id)["tokens_out"] == sum(u.completion_tokens for u in usages)


@pytest.mark.model
def test_gateway_in_front_of_the_real_model(gemma_url, gemma_dir, tmp_path):
    db = f"sqlite:///{tmp_path / 'l.db'}"
    ledger = Ledger(db)
    key = ledger.register("buyer")["api_key"]
    ledger.register("seller")
    ledger.deposit("buyer", "1")
    app = create_gateway(gemma_url, escrow=hf_escrow.connect(agent="seller", database_url=db), pricing=PRICES,
                         tokenizer=str(gemma_dir))
    with serve_app(app) as url:
        escrow = _escrow(db, "buyer")
        client = InferenceClient(base_url=f"{url}/v1", api_key=key, headers={"X-Escrow-Id": escrow.id})
        out = client.chat_completion(MSGS, model=str(gemma_dir), max_tokens=8)
        chunks = list(client.chat_completion(MSGS, model=str(gemma_dir), max_tokens=8, stream=True))
        time.sleep(0.3)
    paid = ledger.get("buyer", escrow.id)["paid_micro"]
    assert paid == int((_cost(out.usage.prompt_tokens, out.usage.completion_tokens)
                        + _cost(chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens)) * 10**6)
    assert_audit_clean(ledger)


def test_gateway_refuses_a_price_sheet_without_token_prices():
    with pytest.raises(hf_escrow.ValidationError):
        create_gateway(f"http://127.0.0.1:{free_port()}/v1", escrow=None, pricing={"per_call": "0.01"})
