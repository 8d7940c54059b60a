"""The one 402 of every paid face, and AutoPay paying it within a mandate, against real faces on 127.0.0.1.

Faces: the gateway before a tiny `transformers serve` model, a Gradio app of `gate.paid`
functions called with `gradio_client`, the shard server read with `datasets` streaming.
A buyer with AutoPay and no escrow of its own gets its answers, pays exactly the listed
prices and gets the rest back on close; many threads and tasks never lock more than
the budget; a challenge AutoPay must not pay comes back to the caller unchanged.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import datasets
import httpx
import pytest

import hf_escrow
from hf_escrow import challenge
from hf_escrow.autopay import AutoPay, Mandate
from hf_escrow.gate import Gate
from hf_escrow.gateway import create_gateway
from hf_escrow.ledger import Ledger
from hf_escrow.pricing import Pricing
from hf_escrow.shardserver import create_shard_app

from .helpers import assert_audit_clean
from .liveserver import free_port, serve_app
from .test_datasets import write_shards
from .test_gateway import MSGS, PRICES, tiny  # noqa: F401  (tiny: the module's served tiny chat model)

SHEET = Pricing.coerce(PRICES)
CALL_PRICE = "0.001"
SHARD_PRICE_MICRO = 2_000
FACTS = ("scheme", "version", "escrow_server", "seller", "currency", "pricing", "min_escrow_micro", "token_header")


def _world(db: str) -> tuple[Ledger, hf_escrow.EscrowClient, hf_escrow.EscrowClient]:
    ledger = Ledger(db)
    for name in ("buyer", "seller", "other"):
        ledger.register(name)
    ledger.deposit("buyer", "5")
    return (ledger, hf_escrow.connect(agent="buyer", database_url=db),
            hf_escrow.connect(agent="seller", database_url=db))


def _locked_micro(ledger: Ledger, start_micro: int) -> int:
    """What the buyer has locked or spent now: its balance's fall since `start_micro`."""
    return start_micro - ledger.me("buyer")["balance_micro"]


@pytest.fixture
def world(tmp_path):
    ledger, buyer, seller = _world(f"sqlite:///{tmp_path / 'l.db'}")
    yield ledger, buyer, seller
    assert_audit_clean(ledger)


@pytest.fixture
def gateway(world, tiny):  # noqa: F811
    folder, upstream = tiny
    app = create_gateway(upstream + "/v1" if not upstream.endswith("/v1") else upstream, escrow=world[2],
                         pricing=PRICES, tokenizer=str(folder), max_tokens=8)
    with serve_app(app) as url:
        yield url, str(folder)


@pytest.fixture
def shards(world, tmp_path):
    folder = tmp_path / "shards"
    write_shards(folder, shards=40, rows=5)
    app = create_shard_app(folder, escrow=world[2], price_per_shard=Decimal(SHARD_PRICE_MICRO) / 10**6)
    with serve_app(app) as url:
        yield url, sorted(p.name for p in folder.glob("*.parquet"))


@pytest.fixture
def gradio_app(world):
    import gradio as gr
    gate = Gate(world[2])

    @gate.paid(price=CALL_PRICE)
    def shout(text: str) -> str:
        return text.upper()

    with gr.Blocks() as demo:
        box, out = gr.Textbox(), gr.Textbox()
        gr.Button().click(shout, box, out, api_name="shout", concurrency_limit=None)
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                        app_kwargs={"routes": gate.discovery_routes()})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        demo.close()


def _chat(model: str, max_tokens: int = 4) -> dict:
    return {"model": model, "messages": MSGS, "max_tokens": max_tokens}


def _facts(body: dict) -> dict:
    return {k: body[k] for k in FACTS}


# ---- one 402 shape --------------------------------------------------------------------


def _assert_challenge(answer: httpx.Response, reason: str, doc: dict) -> dict:
    assert answer.status_code == 402, answer.text
    body = answer.json()
    assert body["reason"] == reason and body["scheme"] == "hf-escrow" and body["token_header"] == "X-Escrow-Token"
    assert _facts(body) == _facts(doc)
    header = json.loads(base64.urlsafe_b64decode(answer.headers["X-Escrow-Challenge"]))
    assert _facts(header) == _facts(doc) and header["reason"] == reason
    return body


def test_every_face_answers_the_same_challenge_with_its_reason(world, gateway, shards, gradio_app):
    ledger, buyer, seller = world
    url, model = gateway
    server = challenge.server_id(seller)
    assert server == challenge.server_id(buyer) and server.startswith("embedded:")

    doc = httpx.get(url + "/.well-known/hf-escrow").json()
    assert doc["seller"] == "seller" and doc["escrow_server"] == server and doc["pricing"] == SHEET.to_dict()
    assert doc["min_escrow_micro"] == SHEET.tokens_micro(16, 8)
    post = lambda headers: httpx.post(url + "/v1/chat/completions", json=_chat(model), headers=headers)  # noqa
    _assert_challenge(post({}), "no_token", doc)
    key = ledger.register("keyholder")["api_key"]
    _assert_challenge(post({"Authorization": f"Bearer {key}"}), "api_key_sent", doc)
    _assert_challenge(post({"X-Escrow-Token": "est_" + "x" * 40}), "token_unknown_or_revoked", doc)
    poor = buyer.create_escrow("seller", "0.000001")
    too_little = _assert_challenge(post({"X-Escrow-Token": poor.spend_token}), "insufficient_remaining", doc)
    assert too_little["price_micro"] > 1 and too_little["error"]["type"] == "insufficient_funds"
    buyer.cancel(poor.id)
    _assert_challenge(post({"X-Escrow-Token": poor.spend_token}), "escrow_closed", doc)

    shard_url, names = shards
    shard_doc = httpx.get(shard_url + "/.well-known/hf-escrow").json()
    assert shard_doc["pricing"] == {"per_shard": "0.002000"} and shard_doc["min_escrow_micro"] == SHARD_PRICE_MICRO
    _assert_challenge(httpx.get(f"{shard_url}/{names[0]}"), "no_token", shard_doc)

    space_doc = httpx.get(gradio_app + "/.well-known/hf-escrow").json()
    assert space_doc["pricing"] == {"per_call": "0.001000"} and space_doc["endpoints"] == {
        "shout": {"per_call": "0.001000"}} and space_doc["escrow_server"] == server
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    with pytest.raises(AppError) as refused:
        Client(gradio_app, verbose=False).predict("hi", api_name="/shout")
    found = challenge.from_text(str(refused.value))
    assert found is not None and found.reason == "no_token" and found.seller == "seller"
    assert found.price_micro == 1_000 and found.escrow_server == server
    assert "send the escrow's spend token" in str(refused.value)     # the human message stays first
    assert ledger.get("buyer", poor.id)["paid_micro"] == 0


# ---- AutoPay against the real faces ----------------------------------------------------


def test_autopay_pays_the_gateway_sync_and_async_exactly_and_refunds_the_rest(world, gateway):
    ledger, buyer, _ = world
    url, model = gateway
    start = ledger.me("buyer")["balance_micro"]
    pay = AutoPay(buyer, budget="0.05", sellers=["seller"])
    usages = []
    with httpx.Client(auth=pay.auth, timeout=60) as http:
        for _ in range(2):
            answer = http.post(url + "/v1/chat/completions", json=_chat(model))
            assert answer.status_code == 200, answer.text
            usages.append(answer.json()["usage"])

    async def run_async() -> None:
        async with httpx.AsyncClient(auth=pay.auth, timeout=60) as http:
            answers = await asyncio.gather(*(http.post(url + "/v1/chat/completions", json=_chat(model))
                                             for _ in range(3)))
        for answer in answers:
            assert answer.status_code == 200, answer.text
            usages.append(answer.json()["usage"])
    asyncio.run(run_async())
    hub = pay.inference_client(url + "/v1")
    usages.append(hub.chat_completion(MSGS, model=model, max_tokens=3).usage.__dict__)

    async def run_hub() -> None:
        ahub = pay.inference_client(url + "/v1", asynchronous=True)
        usages.append((await ahub.chat_completion(MSGS, model=model, max_tokens=2)).usage.__dict__)
    asyncio.run(run_hub())
    assert len(pay.escrow_ids) == 1                       # one escrow, reused by every later call
    summary = pay.close()
    escrow = buyer.get(pay.escrow_ids[0])
    owed = sum(SHEET.tokens_micro(u["prompt_tokens"], u["completion_tokens"]) for u in usages)
    assert escrow.status == "cancelled" and escrow.held == 0
    assert int(escrow.paid * 10**6) == owed
    assert int(escrow.refunded * 10**6) == summary["refunded_micro"] == summary["locked_micro"] - owed
    assert ledger.me("buyer")["balance_micro"] == start - owed


def test_autopay_pays_a_gradio_app_per_call_and_opens_another_escrow_when_low(world, gradio_app):
    ledger, buyer, _ = world
    start = ledger.me("buyer")["balance_micro"]
    with AutoPay(buyer, budget="0.02", max_per_seller="0.005", calls_per_escrow=2) as pay:
        client = pay.gradio_client(gradio_app, verbose=False)
        words = ("a", "b", "c", "d", "e")
        assert [client.predict(w, api_name="/shout") for w in words] == [w.upper() for w in words]
        with pytest.raises(hf_escrow.BudgetExceeded) as refused:     # the seller's share of the mandate is spent
            client.predict("f", api_name="/shout")
        assert refused.value.details["left_micro"] == 0
        amounts = [buyer.get(i).amount for i in pay.escrow_ids]
    assert amounts == [Decimal("0.002"), Decimal("0.002"), Decimal("0.001")]   # the last one capped by the mandate
    escrows = [buyer.get(i) for i in pay.escrow_ids]
    assert sum(e.paid for e in escrows) == Decimal("0.005") and all(e.status == "cancelled" for e in escrows)
    assert ledger.me("buyer")["balance_micro"] == start - 5_000


def test_autopay_pays_datasets_streaming_per_shard(world, shards):
    ledger, buyer, _ = world
    url, names = shards
    start = ledger.me("buyer")["balance_micro"]
    files = [f"{url}/{name}" for name in names[:3]]
    with AutoPay(buyer, budget="0.05", sellers=["seller"]) as pay:
        ds = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True,
                                   storage_options=pay.storage_options(url))
        rows = list(ds)
    assert [row["id"] for row in rows] == list(range(15))
    escrow = buyer.get(pay.escrow_ids[0])
    assert escrow.paid == Decimal("0.006") and escrow.refunded == escrow.amount - escrow.paid
    assert ledger.me("buyer")["balance_micro"] == start - 3 * SHARD_PRICE_MICRO


def test_autopay_pays_through_requests_too(world, shards):
    import requests
    ledger, buyer, _ = world
    url, names = shards
    start = ledger.me("buyer")["balance_micro"]
    with AutoPay(buyer, budget="0.01") as pay, requests.Session() as session:
        first = session.get(f"{url}/{names[0]}", auth=pay.requests_auth, timeout=30)
        second = session.get(f"{url}/{names[1]}", auth=pay.requests_auth, timeout=30)
        assert first.status_code == second.status_code == 200 and first.content[:4] == b"PAR1"
        assert [r.status_code for r in first.history] == [402] and second.history == []   # the token was known
    assert len(pay.escrow_ids) == 1 and ledger.me("buyer")["balance_micro"] == start - 2 * SHARD_PRICE_MICRO


def test_many_threads_and_tasks_sharing_one_autopay_never_lock_more_than_the_budget(db_url, tmp_path):
    """16 threads and 16 asyncio tasks buy distinct shards (one charge each) with a 0.05 USDC budget."""
    ledger, buyer, seller = _world(db_url)
    folder = tmp_path / "shards"
    write_shards(folder, shards=64, rows=2)
    names = sorted(p.name for p in folder.glob("*.parquet"))
    start = ledger.me("buyer")["balance_micro"]
    budget_micro, peak, stop = 50_000, [0], threading.Event()
    pay = AutoPay(buyer, budget="0.05", calls_per_escrow=7)

    def watch() -> None:   # the ledger's view, sampled while everyone spends
        while not stop.is_set():
            peak[0] = max(peak[0], _locked_micro(ledger, start))
            time.sleep(0.005)

    with serve_app(create_shard_app(folder, escrow=seller, price_per_shard="0.002")) as url:
        watcher = threading.Thread(target=watch)
        watcher.start()
        with httpx.Client(auth=pay.auth, timeout=60) as http:
            def thread_reads(i: int) -> list[int | str]:
                return [_status(lambda: http.get(f"{url}/{names[i * 2 + k]}")) for k in range(2)]
            with ThreadPoolExecutor(16) as pool:
                codes = [c for cs in pool.map(thread_reads, range(16)) for c in cs]

        async def task_reads() -> list[int | str]:
            async with httpx.AsyncClient(auth=pay.auth, timeout=60) as http:
                answers = await asyncio.gather(*(http.get(f"{url}/{names[32 + i]}") for i in range(16)),
                                               return_exceptions=True)
                answers += await asyncio.gather(*(http.get(f"{url}/{names[48 + i]}") for i in range(16)),
                                                return_exceptions=True)
            return [_status(lambda: a) for a in answers]
        codes += asyncio.run(task_reads())
        stop.set()
        watcher.join()
    summary = pay.close()
    paid = codes.count(200)
    assert set(codes) <= {200, "budget_exceeded"} and paid + codes.count("budget_exceeded") == 64
    assert peak[0] <= budget_micro and pay.locked_micro <= budget_micro
    assert summary["locked_micro"] - summary["refunded_micro"] <= budget_micro
    assert paid == 25 and codes.count("budget_exceeded") == 39     # every micro of the budget bought a shard
    spent = sum(int(buyer.get(i).paid * 10**6) for i in pay.escrow_ids)
    assert spent == paid * SHARD_PRICE_MICRO == start - ledger.me("buyer")["balance_micro"]
    assert all(buyer.get(i).status == "cancelled" and buyer.get(i).held == 0 for i in pay.escrow_ids)
    assert_audit_clean(ledger)
    ledger.close()


def _status(call) -> int | str:
    """An answer's status, or the code of the error a call raised (or gather returned)."""
    try:
        answer = call()
        if isinstance(answer, BaseException):
            raise answer
    except hf_escrow.EscrowError as error:
        return error.code
    return answer.status_code


# ---- what AutoPay must not pay ------------------------------------------------------------


def _foreign_face(body: dict | bytes, *, header: str | None = None):
    """A face answering every request with one fixed 402, and counting the requests."""
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route
    seen = []

    async def answer(request):
        seen.append((request.method, request.url.path, dict(request.headers)))
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return Response(raw, status_code=402, media_type="application/json",
                        headers={"X-Escrow-Challenge": header} if header else None)
    return Starlette(routes=[Route("/{path:path}", answer, methods=["GET", "POST"])]), seen


def _challenge_for(buyer, **changes) -> dict:
    offer = challenge.Offer(seller=changes.pop("seller", "seller"),
                            escrow_server=changes.pop("escrow_server", challenge.server_id(buyer)),
                            pricing={"per_call": "0.001"}, min_escrow_micro=1_000)
    return {**offer.challenge(hf_escrow.PaymentRequired("pay", details={"reason": "no_token"})), **changes}


@pytest.mark.parametrize("case", ["not_hf_escrow", "another_escrow_server", "seller_outside_mandate", "expired",
                                  "unknown_version", "over_budget"])
def test_a_402_autopay_may_not_pay_reaches_the_caller_unchanged(world, case):
    ledger, buyer, _ = world
    mandate = dict(budget="0.05", sellers=["seller"])
    body: dict | bytes = _challenge_for(buyer)
    if case == "not_hf_escrow":   # an x402-style challenge: another scheme
        body = {"x402Version": 1, "accepts": [{"scheme": "exact", "payTo": "0xabc", "maxAmountRequired": "1000"}]}
    elif case == "another_escrow_server":
        body = _challenge_for(buyer, escrow_server="https://escrow.example.com")
    elif case == "seller_outside_mandate":
        body = _challenge_for(buyer, seller="other")
    elif case == "expired":
        mandate["expires_at"] = time.time() - 1
    elif case == "unknown_version":
        body = _challenge_for(buyer, version=99)
    elif case == "over_budget":
        body = {**_challenge_for(buyer), "min_escrow_micro": 60_000}
    start = ledger.me("buyer")["balance_micro"]
    app, seen = _foreign_face(body, header=challenge.encode_header(body) if isinstance(body, dict) else None)
    with serve_app(app) as url, AutoPay(buyer, **mandate) as pay:
        with httpx.Client(auth=pay.auth) as http:
            answer = http.post(url + "/v1/chat/completions", json={"x": 1})
        with pytest.raises(hf_escrow.Forbidden):
            pay.headers_for(url)
    assert answer.status_code == 402 and answer.content == json.dumps(body).encode()
    assert [(method, path) for method, path, _ in seen] == [("POST", "/v1/chat/completions"),
                                                           ("GET", "/.well-known/hf-escrow")]
    assert not any("x-escrow-token" in headers for _, _, headers in seen)   # sent once, never with a token
    assert pay.escrow_ids == [] and ledger.me("buyer")["balance_micro"] == start


def test_mandate_refuses_bad_terms():
    with pytest.raises(hf_escrow.ValidationError):
        Mandate.of("0.05", sellers="seller")
    with pytest.raises(hf_escrow.InvalidAmount):
        Mandate.of("-1")
    with pytest.raises(hf_escrow.ValidationError):
        AutoPay(hf_escrow.connect_async(agent="buyer"), budget="1")
    with pytest.raises(hf_escrow.ValidationError):
        AutoPay(hf_escrow.connect(agent="buyer"))


def test_only_well_formed_hf_escrow_challenges_parse():
    good = _challenge_for(hf_escrow.connect(agent="buyer"))
    assert challenge.from_response(402, {}, json.dumps(good)).seller == "seller"
    assert challenge.from_response(200, {}, json.dumps(good)) is None                # only a 402 challenges
    header = {"x-escrow-challenge": challenge.encode_header(good)}
    assert challenge.from_response(402, header, b"not json").reason == "no_token"   # the header stands in
    for bad in ({**good, "scheme": "x402"}, {**good, "min_escrow_micro": -1}, {**good, "min_escrow_micro": True},
                {**good, "seller": ""}, {**good, "pricing": "cheap"}, {**good, "escrow_server": 7}, [good]):
        assert challenge.from_response(402, {}, json.dumps(bad)) is None, bad
    assert challenge.from_response(402, {"X-Escrow-Challenge": "%%%"}, b"") is None
    assert challenge.from_response(402, {}, b"{" * 20_000) is None
    assert challenge.from_text("plain error") is None and challenge.from_text("x hf-escrow-402: {oops") is None
    text = "refused " + challenge.GRADIO_MARK + json.dumps(good) + " (and more)"
    assert challenge.from_text(text).min_escrow_micro == 1_000
