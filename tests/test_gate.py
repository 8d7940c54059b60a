"""`hf_escrow.gate.paid` on the till: a ledger hold per call from the caller's spend token.

Plain callables first (every refusal, errors, streams per call and per chunk, a cancel
mid-stream, async, 64 threads on SQLite and PostgreSQL), then the same gate inside a real
Gradio app on 127.0.0.1 called with `gradio_client`, and with the seller talking to an
escrow server over HTTP.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from decimal import Decimal

import pytest

import hf_escrow
from hf_escrow import (
    Forbidden, InsufficientFunds, InvalidAmount, NotFound, StateConflict, Unauthorized, ValidationError,
)
from hf_escrow._exceptions import PaymentRequired
from hf_escrow.client import embedded_ledger
from hf_escrow.gate import Gate, paid, seller_from_env, trial_escrow

from .helpers import assert_audit_clean, snapshot
from .liveserver import free_port, serve_app

PRICE = Decimal("0.001")


class World:
    """A ledger with a seller, a funded buyer (and a stranger), and helpers to open escrows."""

    def __init__(self, url: str):
        self.url = url
        self.ledger = embedded_ledger(url)
        self.seller = hf_escrow.connect(agent="seller", database_url=url)
        self.seller.register()
        self.other_seller = hf_escrow.connect(agent="other-seller", database_url=url)
        self.other_seller.register()
        self.buyer = hf_escrow.connect(agent="buyer", database_url=url)
        self.key = self.buyer.register().api_key
        self.stranger = hf_escrow.connect(agent="stranger", database_url=url)
        self.stranger.register()
        for name in ("buyer", "stranger"):
            self.ledger.deposit(name, "10")
        self.gate = Gate(self.seller)

    def escrow(self, amount: str, *, buyer=None, seller: str = "seller"):
        return (buyer or self.buyer).create_escrow(seller, amount, ttl_seconds=600)

    @staticmethod
    def pay(escrow) -> dict:
        return {"X-Escrow-Token": escrow.spend_token}


@pytest.fixture
def world(sqlite_url) -> World:
    return World(sqlite_url)


@pytest.fixture
def any_world(db_url) -> World:
    """The same world on SQLite and on PostgreSQL."""
    return World(db_url)


def counted(world: World, **options):
    """A gated function that counts its runs."""
    runs = []

    @world.gate.paid(price=PRICE, **options)
    def shout(text: str) -> str:
        runs.append(text)
        if text == "boom":
            raise ValueError("model crashed")
        return text.upper()
    return shout, runs


def chunks(world: World, release: threading.Event | None = None, **options):
    """A gated generator yielding `n` chunks (it waits for `release` after chunk `wait_after`)."""
    @world.gate.paid(price=PRICE, per="chunk", **options)
    def stream(n, fail_at=None, wait_after=None):
        for i in range(n):
            if i == fail_at:
                raise RuntimeError("broke mid-stream")
            if i == wait_after and release is not None:
                assert release.wait(30)
            yield i
    return stream


# ---- plain callables ----------------------------------------------------------------------


def test_a_call_is_held_then_captured_at_the_price_and_reports_the_balance(world, caplog):
    caplog.set_level(logging.DEBUG)
    shout, runs = counted(world, with_receipt=True)
    e = world.escrow("0.005")
    answer, receipt = shout("hi", request=world.pay(e))
    assert answer == "HI" and runs == ["hi"]
    after = world.buyer.get(e.id)
    assert after.remaining == Decimal("0.004") and after.paid == PRICE and after.held == 0
    assert receipt["charged_usdc"] == "0.001000" and receipt["remaining_usdc"] == "0.004000"
    assert Decimal(receipt["fee_usdc"]) + Decimal(receipt["seller_net_usdc"]) == PRICE
    assert receipt["buyer"] == "buyer" and receipt["seller"] == "seller" and receipt["billing"] == "call"
    hold = world.seller.get_hold(receipt["receipt_id"])                      # one ledger hold per call
    assert hold.status == "captured" and hold.captured == PRICE and hold.escrow_id == e.id
    with pytest.raises(NotFound):                                            # nobody else captures it
        world.other_seller.capture(hold.id, "0.000001")
    with pytest.raises(Forbidden, match="only its maker"):
        world.buyer.capture(hold.id, "0.000001")
    assert world.gate.receipts[-1].receipt_id == receipt["receipt_id"]
    for _ in range(4):
        shout("again", request=world.pay(e))
    assert world.buyer.get(e.id).remaining == 0
    with pytest.raises(InsufficientFunds, match="this call may cost up to 0.001000 USDC; the escrow has 0.000000"):
        shout("one too many", request=world.pay(e))
    assert len(runs) == 5
    assert e.spend_token not in caplog.text and e.spend_token not in str(list(world.gate.receipts))
    assert_audit_clean(world.ledger)


@pytest.mark.parametrize("case", ["nothing", "api key as token", "api key as bearer", "unknown token",
                                  "revoked token", "another seller's token", "unfunded", "cancelled",
                                  "not a token", "oversized"])
def test_a_refused_call_never_runs_the_handler_and_moves_nothing(world, case):
    shout, runs = counted(world)
    e = world.escrow("0.0005" if case == "unfunded" else "0.005",
                     seller="other-seller" if case == "another seller's token" else "seller")
    if case == "cancelled":
        world.buyer.cancel(e.id)
    if case == "revoked token":
        world.buyer.revoke_spend_tokens(e.id)
    request, error, message = {
        "nothing": ({}, PaymentRequired, "send the escrow's spend token in the X-Escrow-Token"),
        "api key as token": ({"X-Escrow-Token": world.key}, PaymentRequired, "that is a buyer API key"),
        "api key as bearer": ({"Authorization": f"Bearer {world.key}"}, PaymentRequired, "that is a buyer API key"),
        "unknown token": ({"X-Escrow-Token": "est_" + "x" * 43}, Forbidden, "unknown or was revoked"),
        "revoked token": (world.pay(e), Forbidden, "unknown or was revoked"),
        "another seller's token": (world.pay(e), Forbidden, "pays another seller"),
        "unfunded": (world.pay(e), InsufficientFunds, "up to 0.001000 USDC; the escrow has 0.000500 USDC free"),
        "cancelled": (world.pay(e), StateConflict, "cancelled"),
        "not a token": ({"X-Escrow-Token": e.id}, ValidationError, "must be a spend token"),
        "oversized": ({"X-Escrow-Token": "est_" + "x" * 500}, ValidationError, "must be a spend token"),
    }[case]
    before = snapshot(world.ledger)
    with pytest.raises(error, match=message):
        shout("hi", request=request)
    assert runs == []
    assert snapshot(world.ledger) == before
    assert world.buyer.holds(e.id) == []


def test_a_handler_error_costs_nothing_and_frees_its_hold(world):
    shout, runs = counted(world)
    e = world.escrow("0.001")          # exactly one call
    before = snapshot(world.ledger)
    with pytest.raises(ValueError, match="model crashed"):
        shout("boom", request=world.pay(e))
    assert snapshot(world.ledger) == before and world.buyer.holds(e.id) == []
    assert shout("ok", request=world.pay(e)) == "OK"   # the failed call's hold was voided
    assert world.buyer.get(e.id).remaining == 0
    assert runs == ["boom", "ok"]


def test_a_result_is_never_handed_out_unpaid(world):
    """A call that outlives its hold cannot be captured: its result is withheld, nothing is charged."""
    gate = Gate(world.seller, hold_ttl_s=0.3)
    e = world.escrow("0.005")

    @gate.paid(price=PRICE)
    def slow(text):
        time.sleep(0.8)
        return "secret answer"

    with pytest.raises(StateConflict, match="the result was withheld"):
        slow("hi", request=world.pay(e))
    after = world.buyer.get(e.id)
    assert after.paid == 0 and after.held == 0 and after.remaining == Decimal("0.005")
    assert_audit_clean(world.ledger)


def test_cancel_during_a_call_pays_it_and_stops_the_next_at_once(world):
    e = world.escrow("0.005")
    gated, runs = counted(world)

    @world.gate.paid(price=PRICE)
    def cancelled_meanwhile(text):
        world.buyer.cancel(e.id)       # the buyer pulls the escrow while the call runs
        return "answer"

    assert cancelled_meanwhile("hi", request=world.pay(e)) == "answer"   # held before it ran: paid
    with pytest.raises(StateConflict):
        gated("next", request=world.pay(e))
    after = world.buyer.get(e.id)
    assert runs == [] and after.status == "cancelled" and after.paid == PRICE
    assert after.refunded == Decimal("0.004")
    assert_audit_clean(world.ledger)


def test_revoking_the_tokens_stops_the_next_call_at_once(world):
    shout, runs = counted(world)
    e = world.escrow("0.005")
    spare = world.buyer.mint_spend_token(e.id)
    assert shout("one", request=world.pay(e)) == "ONE"
    assert shout("two", request={"X-Escrow-Token": spare}) == "TWO"
    world.buyer.revoke_spend_tokens(e.id)
    for token in (e.spend_token, spare):
        with pytest.raises(Forbidden):
            shout("three", request={"X-Escrow-Token": token})
    fresh = world.buyer.mint_spend_token(e.id)
    assert shout("four", request={"X-Escrow-Token": fresh}) == "FOUR"
    assert runs == ["one", "two", "four"] and world.buyer.get(e.id).paid == 3 * PRICE


def test_64_concurrent_callers_get_exactly_what_the_escrow_covers(any_world):
    world, calls = any_world, 7
    e = world.escrow(str(PRICE * calls + Decimal("0.0005")))
    shout, runs = counted(world)
    barrier = threading.Barrier(64, timeout=30)
    outcomes: list = []

    def caller(i: int) -> None:
        barrier.wait()
        try:
            outcomes.append(shout(f"q{i}", request=world.pay(e)))
        except InsufficientFunds as error:
            outcomes.append(error)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    answers = [o for o in outcomes if isinstance(o, str)]
    assert len(outcomes) == 64 and len(answers) == calls and len(runs) == calls
    after = world.buyer.get(e.id)
    assert after.remaining == Decimal("0.0005") and after.paid == PRICE * calls and after.held == 0
    assert_audit_clean(world.ledger)


def test_the_field_wins_over_the_header_and_price_can_depend_on_the_input(world):
    e = world.escrow("0.010")
    other = world.escrow("0.010")

    @world.gate.paid(price=lambda text: PRICE * len(text.split()), fields=True, with_receipt=True)
    def words(text):
        return len(text.split())

    assert list(inspect.signature(words).parameters) == ["text", "spend_token", "request"]
    count, receipt = words("one two three", e.spend_token, request=world.pay(other))
    assert count == 3 and receipt["charged_usdc"] == "0.003000" and receipt["escrow_id"] == e.id
    count, receipt = words("four", request=world.pay(e))             # an empty field: the header
    assert receipt["remaining_usdc"] == "0.006000"
    with pytest.raises(PaymentRequired, match="buyer API key"):        # a key typed into the field
        words("five", world.key)

    @world.gate.paid(price=PRICE, fields=True)
    def declares_it(text, spend_token=None):                           # a handler that wants the field too
        return spend_token

    assert declares_it("x", e.spend_token) == e.spend_token
    assert list(inspect.signature(declares_it).parameters) == ["text", "spend_token", "request"]
    assert world.buyer.get(e.id).remaining == Decimal("0.005") and world.buyer.get(other.id).paid == 0


def test_stream_billed_per_call(world):
    e = world.escrow("0.005")

    @world.gate.paid(price=PRICE)
    def stream(n, fail_at=None):
        for i in range(n):
            if i == fail_at:
                raise RuntimeError("broke mid-stream")
            yield i

    assert list(stream(3, request=world.pay(e))) == [0, 1, 2]
    assert world.buyer.get(e.id).remaining == Decimal("0.004")      # one capture for the whole stream
    with pytest.raises(RuntimeError):
        list(stream(3, fail_at=2, request=world.pay(e)))
    assert world.buyer.get(e.id).remaining == Decimal("0.004")      # an error costs nothing
    it = stream(3, request=world.pay(e))
    assert next(it) == 0
    assert world.buyer.get(e.id).held == PRICE                      # held before the first chunk
    it.close()                                                      # the caller stopped after output
    assert world.buyer.get(e.id).remaining == Decimal("0.003")
    it = stream(3, request=world.pay(e))
    del it                                                          # never started: nothing
    after = world.buyer.get(e.id)
    assert after.remaining == Decimal("0.003") and after.held == 0
    assert_audit_clean(world.ledger)


def test_stream_billed_per_chunk(world):
    stream = chunks(world, with_receipt=True, capture_every=2)
    e = world.escrow("0.003")
    out = list(stream(3, request=world.pay(e)))                    # exactly covered: ends cleanly
    assert [c for c, _ in out] == [0, 1, 2, 2]                     # the last output repeats with the receipt
    assert [r.get("units") for _, r in out] == [1, 2, 3, 3] and out[0][1]["status"] == "pending"
    assert out[-1][1]["charged_usdc"] == "0.003000" and out[-1][1]["billing"] == "chunk"
    assert world.buyer.get(e.id).remaining == 0

    e = world.escrow("0.0025")                                     # two chunks and a half
    got = []
    with pytest.raises(InsufficientFunds, match="stopped after 2 paid chunk"):
        for chunk, _ in stream(5, request=world.pay(e)):
            got.append(chunk)
    after = world.buyer.get(e.id)
    assert got == [0, 1] and after.paid == 2 * PRICE and after.remaining == Decimal("0.0005")

    e = world.escrow("0.005")
    with pytest.raises(RuntimeError):
        list(stream(5, fail_at=3, request=world.pay(e)))
    assert world.buyer.get(e.id).paid == 3 * PRICE                 # three delivered, three paid

    it = stream(5, request=world.pay(e))
    next(it)
    it.close()                                                     # the caller stopped: one chunk paid
    after = world.buyer.get(e.id)
    assert after.paid == 4 * PRICE and after.held == 0
    assert_audit_clean(world.ledger)


def test_a_stream_holds_its_worst_case_captures_as_it_flows_and_stops_at_max_chunks(world):
    release = threading.Event()
    stream = chunks(world, release, max_chunks=10, capture_every=3)
    e = world.escrow("1")
    it = stream(20, wait_after=7, request=world.pay(e))
    got = [next(it) for _ in range(7)]
    state = world.buyer.get(e.id)
    assert got == list(range(7)) and state.held == 10 * PRICE - state.paid
    assert state.paid == 6 * PRICE                                  # captured at 3 and 6 chunks
    release.set()
    got += list(it)
    after = world.buyer.get(e.id)
    assert got == list(range(10)) and after.paid == 10 * PRICE and after.held == 0   # cut at max_chunks


def test_buyer_cancel_mid_stream_pays_every_delivered_chunk_and_cuts_the_stream(any_world):
    world, release = any_world, threading.Event()
    stream = chunks(world, release, capture_every=4)
    e = world.escrow("0.050")
    it = stream(40, wait_after=6, request=world.pay(e))
    got = [next(it) for _ in range(6)]
    world.buyer.cancel(e.id)                                        # the buyer pulls out mid-stream
    release.set()
    with pytest.raises(StateConflict, match="closed: the stream stopped after 8 paid chunk"):
        for chunk in it:
            got.append(chunk)
    after = world.buyer.get(e.id)
    assert got == list(range(8))                                    # the next capture learned of the cancel
    assert after.status == "cancelled" and after.paid == 8 * PRICE and after.held == 0
    assert after.paid + after.refunded == after.amount
    assert_audit_clean(world.ledger)


def test_async_handlers_and_async_streams(world):
    e = world.escrow("0.005")

    @world.gate.paid(price=PRICE)
    async def answer(text):
        await asyncio.sleep(0)
        if text == "boom":
            raise ValueError("no")
        return text[::-1]

    @world.gate.paid(price=PRICE, per="chunk", capture_every=1)
    async def tokens(n):
        for i in range(n):
            await asyncio.sleep(0)
            yield i

    async def main():
        assert await answer("abc", request=world.pay(e)) == "cba"
        with pytest.raises(ValueError):
            await answer("boom", request=world.pay(e))
        got = [i async for i in tokens(3, request=world.pay(e))]
        stopped = tokens(3, request=world.pay(e))
        got.append(await stopped.__anext__())
        await stopped.aclose()                                      # stopped after one chunk: one paid
        return got

    assert asyncio.run(main()) == [0, 1, 2, 0]
    after = world.buyer.get(e.id)
    assert after.remaining == 0 and after.held == 0                 # 1 call + 3 chunks + 1 chunk
    assert_audit_clean(world.ledger)


def test_bad_declarations_are_refused_at_decoration(world):
    with pytest.raises(InvalidAmount):
        world.gate.paid(price="0")
    with pytest.raises(InvalidAmount):
        paid(price="free", seller=world.seller)
    with pytest.raises(ValidationError, match="generator"):
        world.gate.paid(price=PRICE, per="chunk")(lambda x: x)
    with pytest.raises(ValidationError, match="between 1 and 64"):
        world.gate.paid(price=PRICE, per="chunk", capture_every=65)
    with pytest.raises(ValidationError, match="max_chunks"):
        world.gate.paid(price=PRICE, per="chunk", max_chunks=0)
    with pytest.raises(ValidationError, match="synchronous"):
        Gate(hf_escrow.connect_async(agent="seller", database_url=world.url))


def test_balance_check_and_trial_escrow(world, monkeypatch, tmp_path):
    e = world.escrow("0.005")
    assert world.gate.balance(e.spend_token) == Decimal("0.005")
    assert world.buyer.get(e.id).held == 0                          # the probe's hold is gone
    with pytest.raises(PaymentRequired, match="buyer API key"):
        world.gate.balance(world.key)
    spent = world.escrow("0.001")
    counted(world)[0]("x", request=world.pay(spent))
    assert world.gate.balance(spent.spend_token) == 0

    monkeypatch.setenv("HF_ESCROW_HOME", str(tmp_path))
    seller = seller_from_env("trial-space")
    escrow_id, token = trial_escrow("trial-space", "0.002")
    assert token.startswith("est_") and Gate(seller).balance(token) == Decimal("0.002")
    assert seller.get(escrow_id).seller == "trial-space"


def test_seller_from_env_registers_once_and_checks_a_server_key(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ESCROW_HOME", str(tmp_path))
    first = seller_from_env("space-1")
    second = seller_from_env("space-1")                              # a second start: already registered
    assert first.me().agent_id == second.me().agent_id == "space-1"
    monkeypatch.setenv("HF_ESCROW_URL", "http://127.0.0.1:9")
    with pytest.raises(Unauthorized, match="HF_ESCROW_SELLER_KEY"):
        seller_from_env("space-1")


# ---- in a real Gradio app, with gradio_client --------------------------------------------


@pytest.fixture
def gradio_app(world):
    """A Blocks app with a sync, a per-chunk streaming and an async gated endpoint."""
    import gradio as gr
    runs, release = [], threading.Event()

    @world.gate.paid(price=PRICE, with_receipt=True)
    def shout(text, request: gr.Request):
        runs.append(text)
        assert request.headers["x-escrow-token"]        # the handler's own gr.Request still arrives
        if text == "boom":
            raise ValueError("hidden detail")
        return text.upper()

    @world.gate.paid(price=PRICE, per="chunk", capture_every=2)
    def spell(text):
        runs.append(text)
        for i, letter in enumerate(text):
            if letter == "|":
                assert release.wait(30)
                continue
            yield text[:i + 1].replace("|", "")

    @world.gate.paid(price=PRICE, fields=True)
    async def echo(text):
        runs.append(text)
        return text

    with gr.Blocks() as demo:
        box, out, receipt = gr.Textbox(), gr.Textbox(), gr.JSON()
        token_box = gr.Textbox()
        gr.Button().click(shout, box, [out, receipt], api_name="shout", concurrency_limit=None)
        gr.Button().click(spell, box, out, api_name="spell", concurrency_limit=3)
        gr.Button().click(echo, [box, token_box], out, api_name="echo")
    port = free_port()
    demo.queue(default_concurrency_limit=2).launch(server_name="127.0.0.1", server_port=port,
                                                   prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}", runs, release
    finally:
        release.set()
        demo.close()


def test_in_gradio_with_gradio_client_headers(world, gradio_app):
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    url, runs, _ = gradio_app
    e = world.escrow("0.010")
    client = Client(url, headers=world.pay(e), verbose=False)
    answer, receipt = client.predict("hi", api_name="/shout")
    assert answer == "HI" and receipt["remaining_usdc"] == "0.009000"
    with pytest.raises(AppError, match=r"failed \(ValueError\); you were not charged"):
        client.predict("boom", api_name="/shout")
    assert world.buyer.get(e.id).remaining == Decimal("0.009")
    job = client.submit("abc", api_name="/spell")
    job.result(timeout=30)
    assert job.outputs() == ["a", "ab", "abc"] and world.buyer.get(e.id).remaining == Decimal("0.006")
    assert client.predict("x", api_name="/echo") == "x"              # the field is optional in the API
    assert Client(url, verbose=False).predict("y", e.spend_token, api_name="/echo") == "y"
    assert world.buyer.get(e.id).remaining == Decimal("0.004")

    ran = len(runs)
    for headers, message in [({}, "X-Escrow-Token"), ({"X-Escrow-Token": world.key}, "buyer API key"),
                             ({"Authorization": f"Bearer {world.key}"}, "buyer API key")]:
        with pytest.raises(AppError, match=message):
            Client(url, headers=headers, verbose=False).predict("hi", api_name="/spell")
    foreign = world.escrow("0.010", seller="other-seller")
    with pytest.raises(AppError, match="pays another seller"):
        Client(url, headers=world.pay(foreign), verbose=False).predict("hi", api_name="/shout")
    assert len(runs) == ran and world.buyer.get(foreign.id).paid == 0


def test_in_gradio_a_cancel_mid_stream_pays_the_delivered_chunks(world, gradio_app):
    from gradio_client import Client
    url, runs, release = gradio_app
    e = world.escrow("0.050")
    client = Client(url, headers=world.pay(e), verbose=False)
    job = client.submit("abc|defghijk", api_name="/spell")
    deadline = time.monotonic() + 30
    while len(job.outputs()) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    world.buyer.cancel(e.id)
    release.set()
    with pytest.raises(Exception, match="was closed"):
        job.result(timeout=30)
    delivered = len(job.outputs())
    after = world.buyer.get(e.id)
    assert delivered == 4 and after.paid == delivered * PRICE and after.held == 0   # cut at the next capture
    assert after.refunded == after.amount - after.paid
    assert_audit_clean(world.ledger)


def test_in_gradio_unlimited_concurrency_never_overdraws(world, gradio_app):
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    url, runs, _ = gradio_app
    e = world.escrow("0.005")
    client = Client(url, headers=world.pay(e), verbose=False, max_workers=32)
    jobs = [client.submit(f"q{i}", api_name="/shout") for i in range(32)]
    ok, refused = 0, 0
    for job in jobs:
        try:
            job.result(timeout=60)
            ok += 1
        except AppError as error:
            assert "USDC free" in str(error)
            refused += 1
    assert (ok, refused) == (5, 27) and len(runs) == 5
    assert world.buyer.get(e.id).remaining == 0
    assert_audit_clean(world.ledger)


# ---- the seller on an escrow server over HTTP -----------------------------------------------


def test_seller_over_http(world):
    from hf_escrow.server import create_app
    with serve_app(create_app(world.ledger, sweep_interval_s=0, mcp=False)) as base:
        seller_key = world.ledger.register("http-seller")["api_key"]
        gate = Gate(hf_escrow.connect(base, api_key=seller_key))

        @gate.paid(price=PRICE, with_receipt=True)
        def shout(text):
            return text.upper()

        e = world.escrow("0.002", seller="http-seller")
        assert shout("a", request=world.pay(e))[1]["remaining_usdc"] == "0.001000"
        assert gate.seller_id == "http-seller"
        with pytest.raises(Forbidden):
            shout("a", request=world.pay(world.escrow("0.002")))     # a token for another seller
        shout("b", request=world.pay(e))
        with pytest.raises(InsufficientFunds):
            shout("c", request=world.pay(e))
        assert world.buyer.get(e.id).paid == Decimal("0.002")
    assert_audit_clean(world.ledger)
