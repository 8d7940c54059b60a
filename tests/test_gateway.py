"""The seller's metered gateway in front of real `transformers serve` upstreams, paid by holds.

A buyer sends only the escrow's spend token; each request is one ledger hold for its worst
case, streams are captured as they flow, and the upstream (behind a recording relay) never
sees a token or a key. "Delivered" below means what the gateway bills for a stream that did
not run to its end: the delivered text counted with the tokenizer, but never more tokens
than content chunks arrived (see `hf_escrow.gateway._Bill`). A stream that ran to its end
is billed by the server's usage, exactly.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from huggingface_hub import InferenceClient

import hf_escrow
from hf_escrow._exceptions import InsufficientFunds, PaymentRequired, ValidationError, error_for_status
from hf_escrow.gateway import MAX_UNPAID_CHUNKS, create_gateway
from hf_escrow.ledger import Ledger
from hf_escrow.localmodel import served_model
from hf_escrow.tokens import TokenCounter
from hf_escrow.money import to_usdc
from hf_escrow.pricing import Pricing

from .helpers import assert_audit_clean
from .liveserver import free_port, serve_app, wait_http
from .models import build_tiny_chat_model

PRICES = {"input_per_1k": "0.0005", "output_per_1k": "0.0015"}
SHEET = Pricing.coerce(PRICES)
MSGS = [{"role": "user", "content": "hello world"}]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = build_tiny_chat_model(tmp_path_factory.mktemp("gw-tiny"))
    with served_model(folder, timeout_s=120) as url:
        yield folder, url


@pytest.fixture(scope="module")
def counter(tiny):
    return TokenCounter(str(tiny[0]))


@pytest.fixture(scope="module")
def prompt(counter):
    return counter.prompt_tokens(MSGS)[0]


class Relay:
    """A loopback relay in front of the upstream: records every request that reaches it.

    `inflate` multiplies the output limits it forwards: a model server that ignores them.
    """

    def __init__(self, upstream: str, inflate: int = 1):
        from fastapi import FastAPI, Request
        from fastapi.responses import StreamingResponse
        from starlette.background import BackgroundTask
        self.seen: list[tuple[dict, dict]] = []
        self.app = FastAPI()

        @self.app.api_route("/v1/{path:path}", methods=["GET", "POST"])
        async def relay(path: str, request: Request):
            raw = await request.body()
            body = json.loads(raw) if raw else {}
            self.seen.append((dict(request.headers), dict(body)))
            for name in ("max_tokens", "max_completion_tokens"):
                if name in body:
                    body[name] *= inflate
            client = httpx.AsyncClient(timeout=120)
            answer = await client.send(client.build_request(request.method, f"{upstream}/{path}", json=body or None),
                                       stream=True)

            async def close():
                await answer.aclose()
                await client.aclose()
            return StreamingResponse(answer.aiter_raw(), status_code=answer.status_code,
                                     media_type=answer.headers.get("content-type"), background=BackgroundTask(close))

    @property
    def count(self) -> int:
        return len(self.seen)


@dataclass
class Market:
    ledger: Ledger
    db: str
    keys: dict
    url: str
    folder: Path
    relay: Relay

    def post(self, token=None, model=None, **options):
        return _post(self.url, model or str(self.folder), token, **options)

    def stream(self, token, max_tokens, model=None, **options):
        return read_stream(self.url, model or str(self.folder), token, max_tokens, **options)


def _market(tmp_path, tiny, inflate=1, **options):
    folder, upstream = tiny
    db = f"sqlite:///{tmp_path / 'l.db'}"
    ledger = Ledger(db)
    ref = ledger.register("referrer")
    keys = {name: ledger.register(name)["api_key"] for name in ("buyer", "buyer2")}
    ledger.register("seller", referral_code=ref["referral_code"])
    for name in keys:
        ledger.deposit(name, "1")
    relay = Relay(upstream, inflate)
    with serve_app(relay.app) as relay_url:
        app = create_gateway(f"{relay_url}/v1", escrow=hf_escrow.connect(agent="seller", database_url=db),
                             pricing=PRICES, tokenizer=str(folder), **options)
        with serve_app(app) as url:
            yield Market(ledger, db, keys, url, folder, relay)
    assert_audit_clean(ledger)


@pytest.fixture
def market(tmp_path, tiny):
    yield from _market(tmp_path, tiny)


@pytest.fixture
def lying_market(tmp_path, tiny):
    """A gateway in front of a model server that generates 5x the limit it is told."""
    yield from _market(tmp_path, tiny, inflate=5)


def _escrow(db, buyer="buyer", amount="0.01", **options):
    return hf_escrow.connect(agent=buyer, database_url=db).create_escrow("seller", amount, **options)


def _post(url, model, token=None, headers=None, **body):
    body = {"model": model, "messages": MSGS, **body}
    sent = {**({"X-Escrow-Token": token} if token else {}), **(headers or {})}
    return httpx.post(f"{url}/v1/chat/completions", headers=sent, json=body, timeout=60)


def read_stream(url, model, token, max_tokens, *, stop_after=None, on_chunk=None, **body) -> dict:
    """One streamed chat through the gateway, as a client sees it."""
    seen = {"status": None, "pieces": [], "usage": None, "errors": [], "body": None, "broken": False}
    request = {"model": model, "messages": MSGS, "max_tokens": max_tokens, "stream": True, **body}
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", headers={"X-Escrow-Token": token}, json=request,
                          timeout=120) as stream:
            seen["status"] = stream.status_code
            if stream.status_code != 200:
                seen["body"] = json.loads(stream.read())
                return seen
            for line in stream.iter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    seen["errors"].append(event)
                    continue
                seen["usage"] = event.get("usage") or seen["usage"]
                piece = (event.get("choices") or [{}])[0].get("delta", {}).get("content")
                if piece:
                    seen["pieces"].append(piece)
                    if on_chunk:
                        on_chunk(len(seen["pieces"]))
                    if stop_after and len(seen["pieces"]) >= stop_after:
                        break
    except httpx.HTTPError:
        seen["broken"] = True
    return seen


def _delivered_micro(counter, prompt, pieces) -> int:
    counted, _ = counter.text_tokens("".join(pieces), fallback=len(pieces))
    return SHEET.tokens_micro(prompt, min(counted, len(pieces)))


def _wait_settled(ledger, escrow_id, timeout_s=20):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        view = ledger.get("buyer", escrow_id)
        if view["held_micro"] == 0:
            return view
        time.sleep(0.05)
    raise AssertionError(f"escrow {escrow_id} still holds money after {timeout_s} s: {view}")


def _assert_nothing_secret_forwarded(relay, *secrets):
    assert relay.seen
    for headers, body in relay.seen:
        assert "authorization" not in headers and "x-escrow-token" not in headers
        assert not any(secret in json.dumps([headers, body]) for secret in secrets)


# ---- paying with a spend token ---------------------------------------------------------


def test_inference_client_through_the_gateway_streamed_and_not(market, prompt):
    escrow = _escrow(market.db)
    client = InferenceClient(base_url=f"{market.url}/v1", headers={"X-Escrow-Token": escrow.spend_token})
    out = client.chat_completion(MSGS, model=str(market.folder), max_tokens=9)
    chunks = list(client.chat_completion(MSGS, model=str(market.folder), max_tokens=6, stream=True))
    view = _wait_settled(market.ledger, escrow.id)
    assert out.usage.completion_tokens == 9 and chunks[-1].usage.completion_tokens == 6
    assert out.usage.prompt_tokens == prompt == chunks[-1].usage.prompt_tokens
    assert view["paid_micro"] == SHEET.tokens_micro(prompt, 9) + SHEET.tokens_micro(prompt, 6)
    assert view["tokens_out"] == 15 and view["tokens_in"] == 2 * prompt and view["status"] == "active"
    plain, streamed = (body for _, body in market.relay.seen)
    assert plain["max_tokens"] == plain["max_completion_tokens"] == 9
    assert streamed["max_tokens"] == streamed["max_completion_tokens"] == 6
    assert streamed["stream_options"] == {"include_usage": True}
    _assert_nothing_secret_forwarded(market.relay, escrow.spend_token)
    assert httpx.get(f"{market.url}/v1/models").json()["data"][0]["id"] == str(market.folder)


def test_tokens_and_keys_never_reach_the_upstream(market):
    escrow = _escrow(market.db)
    answer = market.post(escrow.spend_token, headers={"Authorization": "Bearer hf_seller_side_secret"},
                   max_tokens=3)
    streamed = market.stream(escrow.spend_token, 3)
    assert answer.status_code == 200 and streamed["usage"]["completion_tokens"] == 3
    _assert_nothing_secret_forwarded(market.relay, escrow.spend_token, "hf_seller_side_secret")


def test_a_buyer_api_key_is_refused_with_the_tills_message(market):
    escrow = _escrow(market.db)
    as_bearer = market.post(headers={"Authorization": f"Bearer {market.keys['buyer']}"}, max_tokens=3)
    as_token = market.post(market.keys["buyer"], max_tokens=3)
    with_escrow_id = market.post(headers={"Authorization": f"Bearer {market.keys['buyer']}",
                                                "X-Escrow-Id": escrow.id}, max_tokens=3)
    nothing = market.post(max_tokens=3)
    for answer in (as_bearer, as_token, with_escrow_id):
        assert answer.status_code == 402 and answer.json()["error"]["type"] == "payment_required"
        assert "buyer API key" in answer.json()["error"]["message"] and "X-Escrow-Token" in answer.json()["error"]["message"]
        assert isinstance(error_for_status(answer.status_code, answer.json()), PaymentRequired)
    assert nothing.status_code == 402 and "send the escrow's spend token" in nothing.json()["error"]["message"]
    assert market.relay.count == 0
    assert market.ledger.get("buyer", escrow.id)["paid_micro"] == 0


def test_an_escrow_paying_another_seller_is_refused_even_with_the_gateway_as_verifier(market):
    # The buyer pays its own second account and names the gateway's seller as verifier:
    # a party of the escrow, but not the one it pays. The token scopes to the escrow's seller.
    escrow = hf_escrow.connect(agent="buyer", database_url=market.db).create_escrow(
        "buyer2", "0.01", release_condition={"metric": "accuracy", "threshold": 0.5, "verifier": "seller"})
    answer = market.post(escrow.spend_token, max_tokens=3)
    streamed = market.stream(escrow.spend_token, 400)
    assert answer.status_code == 402 and answer.json()["error"]["type"] == "forbidden"
    assert answer.json()["reason"] == "token_unknown_or_revoked"
    assert streamed["status"] == 402 and not streamed["pieces"]
    assert market.relay.count == 0
    assert market.ledger.get("buyer", escrow.id)["paid_micro"] == 0


def test_raw_http_answer_is_paid_by_its_usage(market, prompt):
    escrow = _escrow(market.db)
    answer = market.post(escrow.spend_token, max_tokens=5)
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 5
    view = market.ledger.get("buyer", escrow.id)
    assert view["paid_micro"] == SHEET.tokens_micro(prompt, 5) and view["held_micro"] == 0


def test_max_completion_tokens_alone_is_obeyed_and_held_for(market, prompt):
    worst = SHEET.tokens_micro(prompt, 7)
    exact = _escrow(market.db, amount=to_usdc(worst))   # covers 7 output tokens, no more
    answer = market.post(exact.spend_token, max_completion_tokens=7)
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 7
    (_, forwarded), = market.relay.seen
    assert forwarded["max_tokens"] == forwarded["max_completion_tokens"] == 7
    view = market.ledger.get("buyer", exact.id)
    assert view["paid_micro"] == worst and view["remaining_micro"] == 0
    # vLLM obeys max_completion_tokens over max_tokens: the hold is for the larger ask.
    again = _escrow(market.db, amount=to_usdc(worst))
    refused = market.post(again.spend_token, max_tokens=2, max_completion_tokens=50)
    assert refused.status_code == 402 and "up to 50 output tokens" in refused.json()["error"]["message"]
    assert isinstance(error_for_status(refused.status_code, refused.json()), InsufficientFunds)
    assert market.relay.count == 1 and market.ledger.get("buyer", again.id)["paid_micro"] == 0


def test_a_stream_costing_more_than_the_hold_is_cut_there_and_paid_for_what_it_delivered(lying_market, counter,
                                                                                           prompt):
    # The model server generates 5 x 20 tokens although told 20; the escrow covers exactly 20.
    escrow = _escrow(lying_market.db, amount=to_usdc(SHEET.tokens_micro(prompt, 20)))
    seen = lying_market.stream(escrow.spend_token, 20)
    view = _wait_settled(lying_market.ledger, escrow.id)
    assert len(seen["pieces"]) == 20 and seen["usage"] is None
    assert [event["error"]["type"] for event in seen["errors"]] == ["payment_required"]
    assert view["paid_micro"] == _delivered_micro(counter, prompt, seen["pieces"]) > 0
    assert view["paid_micro"] + view["remaining_micro"] == view["amount_micro"]


def test_client_disconnect_mid_stream_pays_what_was_delivered(market):
    escrow = _escrow(market.db)
    seen = market.stream(escrow.spend_token, 400, stop_after=3)
    view = _wait_settled(market.ledger, escrow.id)
    assert len(seen["pieces"]) == 3
    assert 3 <= view["tokens_out"] < 400 and view["paid_micro"] > 0
    assert view["paid_micro"] == SHEET.tokens_micro(view["tokens_in"], view["tokens_out"])
    assert view["paid_micro"] + view["remaining_micro"] == view["amount_micro"]


def test_buyer_cancel_mid_stream_cuts_it_pays_the_delivered_slices_and_refuses_the_token_at_once(
        market, counter, prompt):
    escrow = _escrow(market.db, amount="0.05")
    buyer = hf_escrow.connect(agent="buyer", database_url=market.db)
    seen = market.stream(escrow.spend_token, 1500,
                       on_chunk=lambda n: n == 70 and buyer.cancel(escrow.id))
    view = _wait_settled(market.ledger, escrow.id)
    assert [event["error"]["type"] for event in seen["errors"]] == ["state_conflict"] and seen["usage"] is None
    assert 70 <= len(seen["pieces"]) < 300     # cut at the gateway's next capture, not at 1500 tokens
    assert view["status"] == "cancelled"
    assert view["paid_micro"] == _delivered_micro(counter, prompt, seen["pieces"]) > 0
    assert view["refunded_micro"] == view["amount_micro"] - view["paid_micro"]
    forwarded = market.relay.count
    again = market.post(escrow.spend_token, max_tokens=3)
    assert again.status_code == 402 and again.json()["error"]["type"] == "state_conflict"
    assert again.json()["reason"] == "escrow_closed"
    assert market.relay.count == forwarded


def test_a_revoked_token_is_refused_at_once(market):
    escrow = _escrow(market.db)
    assert market.post(escrow.spend_token, max_tokens=2).status_code == 200
    hf_escrow.connect(agent="buyer", database_url=market.db).revoke_spend_tokens(escrow.id)
    answer = market.post(escrow.spend_token, max_tokens=2)
    assert answer.status_code == 402 and "revoked" in answer.json()["error"]["message"] and market.relay.count == 1
    assert answer.json()["reason"] == "token_unknown_or_revoked"


def test_an_escrow_that_cannot_cover_the_request_gets_402_and_the_upstream_sees_nothing(market):
    escrow = _escrow(market.db, amount="0.000010")
    answer = market.post(escrow.spend_token, max_tokens=5000)
    assert answer.status_code == 402 and answer.json()["error"]["type"] == "insufficient_funds"
    assert "may cost up to" in answer.json()["error"]["message"] and market.relay.count == 0
    assert market.ledger.get("buyer", escrow.id)["held_micro"] == 0


def test_upstream_errors_cost_nothing(market):
    escrow = _escrow(market.db)
    plain = market.post(escrow.spend_token, max_tokens=2, model="no-such-model")
    streamed = market.stream(escrow.spend_token, 2, model="no-such-model")
    assert plain.status_code >= 400 and plain.json()["error"]["type"] == "upstream_error"
    assert streamed["status"] >= 400 and streamed["body"]["error"]["type"] == "upstream_error"
    assert market.relay.count == 2
    view = market.ledger.get("buyer", escrow.id)
    assert view["paid_micro"] == 0 == view["held_micro"] and view["remaining_micro"] == view["amount_micro"]


def test_an_unreachable_upstream_costs_nothing(tmp_path):
    db = f"sqlite:///{tmp_path / 'l.db'}"
    ledger = Ledger(db)
    ledger.register("buyer")
    ledger.register("seller")
    ledger.deposit("buyer", "1")
    seller = hf_escrow.connect(agent="seller", database_url=db)
    app = create_gateway(f"http://127.0.0.1:{free_port()}/v1", escrow=seller, pricing=PRICES)
    escrow = _escrow(db)
    with serve_app(app) as url:
        plain = _post(url, "m", escrow.spend_token, max_tokens=2)
        streamed = read_stream(url, "m", escrow.spend_token, 2)
        models = httpx.get(f"{url}/v1/models")
    assert plain.status_code == streamed["status"] == models.status_code == 502
    assert plain.json()["error"]["type"] == streamed["body"]["error"]["type"] == "upstream_unreachable"
    view = ledger.get("buyer", escrow.id)
    assert view["paid_micro"] == 0 == view["held_micro"]
    assert_audit_clean(ledger)


@pytest.mark.parametrize("body, raw", [
    ({"messages": MSGS, "max_tokens": 0}, None),
    ({"messages": MSGS, "max_completion_tokens": "9"}, None),
    ({"messages": MSGS, "max_tokens": True}, None),
    ({"messages": MSGS, "n": 3}, None),
    ({"messages": MSGS, "stream": True, "stream_options": "yes"}, None),
    ({"messages": []}, None),
    ({"messages": ["hello"]}, None),
    ({"messages": [{"content": "no role"}]}, None),
    (None, b"not json"),
])
def test_bad_requests_get_422_in_the_error_shape_and_hold_nothing(market, body, raw):
    escrow = _escrow(market.db)
    answer = httpx.post(f"{market.url}/v1/chat/completions", headers={"X-Escrow-Token": escrow.spend_token},
                        content=raw or json.dumps(body), timeout=30)
    assert answer.status_code == 422 and set(answer.json()) == {"error"}
    assert set(answer.json()["error"]) == {"message", "type", "code", "param"}
    assert isinstance(error_for_status(422, answer.json()), ValidationError)
    assert market.relay.count == 0 and market.ledger.get("buyer", escrow.id)["held_micro"] == 0


def test_concurrent_buyers_are_each_charged_their_own_tokens(market):
    escrows = {name: _escrow(market.db, name) for name in market.keys}
    results = {name: [] for name in market.keys}
    lock = threading.Lock()

    def call(i):
        name = "buyer" if i % 2 else "buyer2"
        client = InferenceClient(base_url=f"{market.url}/v1", headers={"X-Escrow-Token": escrows[name].spend_token})
        out = client.chat_completion(MSGS, model=str(market.folder), max_tokens=3 + i % 4)
        with lock:
            results[name].append(out.usage)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(call, range(12)))
    for name, usages in results.items():
        view = market.ledger.get(name, escrows[name].id)
        assert view["paid_micro"] == sum(SHEET.tokens_micro(u.prompt_tokens, u.completion_tokens) for u in usages)
        assert view["tokens_out"] == sum(u.completion_tokens for u in usages) and view["held_micro"] == 0


def test_gateway_refuses_a_price_sheet_without_token_prices():
    with pytest.raises(hf_escrow.ValidationError):
        create_gateway(f"http://127.0.0.1:{free_port()}/v1", escrow=None, pricing={"per_call": "0.01"})


# ---- gateways as separate OS processes on one ledger -----------------------------------


class Processes:
    """Gateway processes started for one test; each is stopped (or found killed) at the end."""

    def __init__(self, tmp_path: Path, database_url: str):
        self.tmp_path, self.env = tmp_path, {**os.environ, "HF_ESCROW_DATABASE_URL": database_url,
                                             "HF_ESCROW_HOME": str(tmp_path / "home")}
        self.env.pop("HF_HUB_OFFLINE", None)
        self.running: list[tuple[subprocess.Popen, Path]] = []

    def start(self, args: list[str]) -> tuple[subprocess.Popen, str]:
        port = free_port()
        log = self.tmp_path / f"gateway-{port}.log"
        with log.open("wb") as out:
            process = subprocess.Popen([sys.executable, *args, "--port", str(port)], cwd=REPO, env=self.env,
                                       stdout=out, stderr=subprocess.STDOUT)
        self.running.append((process, log))
        return process, f"http://127.0.0.1:{port}"

    def wait_ready(self, url: str) -> None:
        try:
            wait_http(f"{url}/healthz", timeout_s=120)
        except RuntimeError:
            raise AssertionError("\n".join(log.read_text()[-3000:] for _, log in self.running)) from None

    def stop(self) -> None:
        for process, _ in self.running:
            if process.poll() is None:
                process.terminate()
        for process, _ in self.running:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)


@pytest.fixture
def processes(tmp_path, db_url):
    started = Processes(tmp_path, db_url)
    yield started
    started.stop()


def _seller_ledger(db_url) -> Ledger:
    ledger = Ledger(db_url)
    ledger.register("buyer")
    ledger.register("seller")
    ledger.deposit("buyer", "1")
    return ledger


@pytest.mark.timeout(300)
def test_two_gateway_processes_on_one_escrow_never_overdraw_and_every_token_is_paid(
        tiny, processes, db_url, tmp_path, prompt):
    folder, upstream = tiny
    ledger = _seller_ledger(db_url)
    sheet = tmp_path / "pricing.toml"
    sheet.write_text("".join(f'{name} = "{price}"\n' for name, price in PRICES.items()))
    urls = []
    for _ in range(2):   # the CLI's own gateway command, twice, on one ledger database
        _, url = processes.start(["-m", "hf_escrow.cli", "gateway", "--upstream", upstream, "--seller", "seller",
                                  "--pricing", str(sheet), "--tokenizer", str(folder)])
        urls.append(url)
    for url in urls:
        processes.wait_ready(url)
        warm = _escrow(db_url)
        assert read_stream(url, str(folder), warm.spend_token, 2)["usage"]["completion_tokens"] == 2
    limit = 120
    worst = SHEET.tokens_micro(prompt, limit)
    escrow = _escrow(db_url, amount=to_usdc(worst * 4 + worst // 2))   # 10 asked, ~4.5 covered
    start = threading.Barrier(10)

    def one(i):
        start.wait(timeout=30)
        return read_stream(urls[i % 2], str(folder), escrow.spend_token, limit)

    with ThreadPoolExecutor(10) as pool:
        streams = list(pool.map(one, range(10)))
    view = _wait_settled(ledger, escrow.id, timeout_s=60)
    served = [s for s in streams if s["status"] == 200]
    refused = [s for s in streams if s["status"] != 200]
    assert len(served) >= 4 and refused, [s["status"] for s in streams]
    for stream in refused:
        assert stream["status"] == 402 and stream["body"]["error"]["type"] == "insufficient_funds" and not stream["pieces"]
    # The upstream obeys the held limit, so no stream is cut early: each ran to its end and
    # is paid exactly its usage (prompt + completion x price), to the micro-USDC.
    for stream in served:
        assert not stream["errors"] and not stream["broken"] and stream["pieces"]
        assert stream["usage"] == {"prompt_tokens": prompt, "completion_tokens": limit,
                                   "total_tokens": prompt + limit}
    assert view["paid_micro"] == len(served) * worst <= view["amount_micro"]
    assert view["tokens_out"] == len(served) * limit
    assert view["paid_micro"] + view["remaining_micro"] == view["amount_micro"]
    assert_audit_clean(ledger)


@pytest.mark.timeout(300)
def test_a_gateway_killed_mid_stream_keeps_what_it_captured_and_the_hold_expires_to_the_buyer(
        tiny, processes, db_url, counter, prompt):
    folder, upstream = tiny
    ledger = _seller_ledger(db_url)
    hold_ttl = 8
    process, url = processes.start(["tests/gateway_process.py", "--upstream", upstream, "--database-url", db_url,
                                    "--seller", "seller", "--pricing", json.dumps(PRICES),
                                    "--tokenizer", str(folder), "--hold-ttl", str(hold_ttl)])
    processes.wait_ready(url)
    escrow = _escrow(db_url, amount="0.01")

    def kill_once_paid(n):
        if n != 70:
            return
        deadline = time.monotonic() + 10
        while ledger.get("buyer", escrow.id)["paid_micro"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

    seen = read_stream(url, str(folder), escrow.spend_token, 2000, on_chunk=kill_once_paid)
    assert process.returncode == -signal.SIGKILL and seen["usage"] is None
    at_kill = ledger.get("buyer", escrow.id)
    paid = at_kill["paid_micro"]
    assert at_kill["held_micro"] > 0   # the dead gateway's hold still reserves the rest ...
    # ... every slice but the last MAX_UNPAID_CHUNKS delivered chunks was captured, and no more than was delivered
    assert _delivered_micro(counter, prompt, seen["pieces"][:-MAX_UNPAID_CHUNKS]) <= paid
    assert 0 < paid <= _delivered_micro(counter, prompt, seen["pieces"])
    (hold,) = ledger.holds("buyer", escrow.id)
    time.sleep(max(hold["expires_at_ms"] / 1000 - time.time(), 0) + 0.5)
    assert ledger.expire_due() >= 1
    after = ledger.get("buyer", escrow.id)
    assert after["paid_micro"] == paid and after["held_micro"] == 0 and not ledger.holds("buyer", escrow.id)
    assert after["remaining_micro"] == after["amount_micro"] - paid   # the uncaptured rest is the buyer's again
    ledger.cancel("buyer", escrow.id)
    final = ledger.get("buyer", escrow.id)
    assert final["refunded_micro"] == final["amount_micro"] - paid
    assert ledger.me("buyer")["balance_micro"] == 1_000_000 - paid
    assert ledger.me("seller")["balance_micro"] == paid - final["fees_micro"]
    assert_audit_clean(ledger)


# ---- the real model ----------------------------------------------------------------------


@pytest.mark.model
def test_gateway_in_front_of_the_real_model(gemma_url, gemma_dir, tmp_path):
    db = f"sqlite:///{tmp_path / 'l.db'}"
    ledger = Ledger(db)
    ledger.register("buyer")
    ledger.register("seller")
    ledger.deposit("buyer", "1")
    app = create_gateway(gemma_url, escrow=hf_escrow.connect(agent="seller", database_url=db), pricing=PRICES,
                         tokenizer=str(gemma_dir))
    with serve_app(app) as url:
        escrow = _escrow(db)
        client = InferenceClient(base_url=f"{url}/v1", headers={"X-Escrow-Token": escrow.spend_token})
        out = client.chat_completion(MSGS, model=str(gemma_dir), max_tokens=8)
        chunks = list(client.chat_completion(MSGS, model=str(gemma_dir), max_tokens=40, stream=True))
        view = _wait_settled(ledger, escrow.id)
    usage = chunks[-1].usage
    assert view["paid_micro"] == (SHEET.tokens_micro(out.usage.prompt_tokens, out.usage.completion_tokens)
                                  + SHEET.tokens_micro(usage.prompt_tokens, usage.completion_tokens))
    assert view["tokens_out"] == out.usage.completion_tokens + usage.completion_tokens
    assert_audit_clean(ledger)
