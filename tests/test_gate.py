"""`hf_escrow.gate.paid`: charge before the result leaves, nothing for a failure, never an overdraw.

Plain callables first (every refusal, errors, streams, async, 64 threads), then the same
gate inside a real Gradio app on 127.0.0.1 called with `gradio_client`, and with the
seller talking to an escrow server over HTTP.
"""

from __future__ import annotations

import asyncio
import threading
from decimal import Decimal

import pytest

import hf_escrow
from hf_escrow import Forbidden, InsufficientFunds, InvalidAmount, NotFound, StateConflict, Unauthorized
from hf_escrow.client import embedded_ledger
from hf_escrow.gate import Gate, PaymentFailed, PaymentRequired, paid, seller_from_env

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
        self.stranger_key = self.stranger.register().api_key
        for name in ("buyer", "stranger"):
            self.ledger.deposit(name, "10")
        self.gate = Gate(self.seller)

    def escrow(self, amount: str, *, buyer=None, seller: str = "seller"):
        return (buyer or self.buyer).create_escrow(seller, amount, ttl_seconds=600)

    def headers(self, escrow_id: str, key: str | None = None) -> dict:
        return {"X-Escrow-Id": escrow_id, "Authorization": f"Bearer {key or self.key}"}


@pytest.fixture
def world(sqlite_url) -> World:
    return World(sqlite_url)


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


# ---- plain callables ----------------------------------------------------------------------


def test_a_call_is_charged_exactly_the_price_and_reports_the_balance(world):
    shout, runs = counted(world, with_receipt=True)
    e = world.escrow("0.005")
    answer, receipt = shout("hi", request=world.headers(e.id))
    assert answer == "HI" and runs == ["hi"]
    after = world.buyer.get(e.id)
    assert after.remaining == Decimal("0.004") and after.paid == PRICE
    assert receipt["charged_usdc"] == "0.001000" and receipt["remaining_usdc"] == "0.004000"
    assert Decimal(receipt["fee_usdc"]) + Decimal(receipt["seller_net_usdc"]) == PRICE
    assert receipt["buyer"] == "buyer" and receipt["seller"] == "seller" and receipt["billing"] == "call"
    assert world.gate.receipts[-1].receipt_id == receipt["receipt_id"]
    for _ in range(4):
        shout("again", request=world.headers(e.id))
    assert world.buyer.get(e.id).remaining == 0
    with pytest.raises(InsufficientFunds, match="0.000000 USDC left"):
        shout("one too many", request=world.headers(e.id))
    assert len(runs) == 5
    assert_audit_clean(world.ledger)


@pytest.mark.parametrize("case", ["nothing", "no key", "unknown key", "another buyer's escrow",
                                  "escrow for another seller", "unfunded", "cancelled", "no such escrow"])
def test_a_refused_call_never_runs_the_handler_and_moves_nothing(world, case):
    shout, runs = counted(world)
    e = world.escrow("0.0005" if case == "unfunded" else "0.005",
                     seller="other-seller" if case == "escrow for another seller" else "seller")
    if case == "cancelled":
        world.buyer.cancel(e.id)
    request, error, message = {
        "nothing": ({}, PaymentRequired, "X-Escrow-Id"),
        "no key": ({"X-Escrow-Id": e.id}, PaymentRequired, "Authorization: Bearer"),
        "unknown key": (world.headers(e.id, "hfe_not-a-key"), Unauthorized, "not a key of this ledger"),
        "another buyer's escrow": (world.headers(e.id, world.stranger_key), Forbidden, "belongs to another buyer"),
        "escrow for another seller": (world.headers(e.id), NotFound, "open one with seller 'seller'"),
        "unfunded": (world.headers(e.id), InsufficientFunds, "0.000500 USDC left; this costs 0.001000"),
        "cancelled": (world.headers(e.id), StateConflict, "is cancelled; open a new escrow"),
        "no such escrow": (world.headers("esc_000000000000000000000000"), NotFound, "not an escrow for this"),
    }[case]
    before = snapshot(world.ledger)
    with pytest.raises(error, match=message):
        shout("hi", request=request)
    assert runs == []
    assert snapshot(world.ledger) == before


def test_a_handler_error_costs_nothing_and_frees_its_hold(world):
    shout, runs = counted(world)
    e = world.escrow("0.001")          # exactly one call
    before = snapshot(world.ledger)
    with pytest.raises(ValueError, match="model crashed"):
        shout("boom", request=world.headers(e.id))
    assert snapshot(world.ledger) == before
    assert shout("ok", request=world.headers(e.id)) == "OK"   # the failed call's hold is gone
    assert world.buyer.get(e.id).remaining == 0
    assert runs == ["boom", "ok"]


def test_a_refused_deduction_withholds_the_result(world):
    e = world.escrow("0.005")

    @world.gate.paid(price=PRICE)
    def sneaky(text):
        world.buyer.cancel(e.id)       # the buyer pulls the escrow while the call runs
        return "secret answer"

    with pytest.raises(PaymentFailed, match="withheld and nothing was charged"):
        sneaky("hi", request=world.headers(e.id))
    after = world.buyer.get(e.id)
    assert after.status == "cancelled" and after.paid == 0 and after.refunded == Decimal("0.005")
    assert_audit_clean(world.ledger)


def test_64_concurrent_callers_get_exactly_what_the_escrow_covers(world):
    calls = 7
    e = world.escrow(str(PRICE * calls))
    shout, runs = counted(world)
    barrier = threading.Barrier(64, timeout=30)
    outcomes: list = []

    def caller(i: int) -> None:
        barrier.wait()
        try:
            outcomes.append(shout(f"q{i}", request=world.headers(e.id)))
        except InsufficientFunds as error:
            outcomes.append(error)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    answers = [o for o in outcomes if isinstance(o, str)]
    assert len(outcomes) == 64 and len(answers) == calls and len(runs) == calls
    after = world.buyer.get(e.id)
    assert after.remaining == 0 and after.paid == PRICE * calls
    assert_audit_clean(world.ledger)


def test_fields_win_over_headers_and_price_can_depend_on_the_input(world):
    e = world.escrow("0.010")

    @world.gate.paid(price=lambda text: PRICE * len(text.split()), fields=True, with_receipt=True)
    def words(text):
        return len(text.split())

    import inspect
    assert list(inspect.signature(words).parameters) == ["text", "escrow_id", "api_key", "request"]
    count, receipt = words("one two three", e.id, world.key, request=world.headers("esc_wrong", "hfe_wrong"))
    assert count == 3 and receipt["charged_usdc"] == "0.003000"
    count, receipt = words("four", request=world.headers(e.id))       # empty fields: the headers
    assert receipt["remaining_usdc"] == "0.006000"

    @world.gate.paid(price=PRICE, fields=True)
    def declares_them(text, escrow_id=None, api_key=None):             # a handler that wants the fields too
        return escrow_id, api_key

    assert declares_them("x", e.id, world.key) == (e.id, world.key)
    assert list(inspect.signature(declares_them).parameters) == ["text", "escrow_id", "api_key", "request"]

    @world.gate.paid(price=PRICE)
    def own_api_key(text, api_key=None):                                # without fields: not a payment key
        return api_key

    with pytest.raises(PaymentRequired):
        own_api_key("x", e.id, request={"X-Escrow-Id": e.id})
    assert own_api_key("x", "sk-other", request=world.headers(e.id)) == "sk-other"
    assert world.buyer.get(e.id).remaining == Decimal("0.004")


def test_stream_billed_per_call(world):
    e = world.escrow("0.005")

    @world.gate.paid(price=PRICE)
    def stream(n, fail_at=None):
        for i in range(n):
            if i == fail_at:
                raise RuntimeError("broke mid-stream")
            yield i

    assert list(stream(3, request=world.headers(e.id))) == [0, 1, 2]
    assert world.buyer.get(e.id).remaining == Decimal("0.004")      # one charge for the whole stream
    with pytest.raises(RuntimeError):
        list(stream(3, fail_at=2, request=world.headers(e.id)))
    assert world.buyer.get(e.id).remaining == Decimal("0.004")      # an error costs nothing
    it = stream(3, request=world.headers(e.id))
    assert next(it) == 0
    it.close()                                                      # the caller stopped after output
    assert world.buyer.get(e.id).remaining == Decimal("0.003")
    it = stream(3, request=world.headers(e.id))
    del it                                                          # never started: nothing
    assert world.buyer.get(e.id).remaining == Decimal("0.003")
    assert_audit_clean(world.ledger)


def test_stream_billed_per_chunk(world):
    @world.gate.paid(price=PRICE, per="chunk", with_receipt=True)
    def stream(n, fail_at=None):
        for i in range(n):
            if i == fail_at:
                raise RuntimeError("broke mid-stream")
            yield i

    e = world.escrow("0.003")
    chunks = list(stream(3, request=world.headers(e.id)))            # exactly covered: ends cleanly
    assert [c for c, _ in chunks] == [0, 1, 2]
    assert [r["units"] for _, r in chunks] == [1, 2, 3] and chunks[-1][1]["total_usdc"] == "0.003000"
    assert world.buyer.get(e.id).remaining == 0

    e = world.escrow("0.002")
    got = []
    with pytest.raises(InsufficientFunds, match="stopped after 2 paid chunk"):
        for chunk, _ in stream(5, request=world.headers(e.id)):
            got.append(chunk)
    assert got == [0, 1] and world.buyer.get(e.id).remaining == 0   # the third chunk was withheld

    e = world.escrow("0.005")
    with pytest.raises(RuntimeError):
        list(stream(5, fail_at=2, request=world.headers(e.id)))
    assert world.buyer.get(e.id).remaining == Decimal("0.003")      # two delivered, two paid
    assert_audit_clean(world.ledger)


def test_async_handlers_and_async_streams(world):
    e = world.escrow("0.005")

    @world.gate.paid(price=PRICE)
    async def answer(text):
        await asyncio.sleep(0)
        if text == "boom":
            raise ValueError("no")
        return text[::-1]

    @world.gate.paid(price=PRICE, per="chunk")
    async def tokens(n):
        for i in range(n):
            await asyncio.sleep(0)
            yield i

    async def main():
        assert await answer("abc", request=world.headers(e.id)) == "cba"
        with pytest.raises(ValueError):
            await answer("boom", request=world.headers(e.id))
        return [i async for i in tokens(3, request=world.headers(e.id))]

    assert asyncio.run(main()) == [0, 1, 2]
    assert world.buyer.get(e.id).remaining == Decimal("0.001")      # 1 call + 3 chunks
    assert_audit_clean(world.ledger)


def test_bad_declarations_are_refused_at_decoration(world):
    with pytest.raises(InvalidAmount):
        world.gate.paid(price="0")
    with pytest.raises(InvalidAmount):
        paid(price="free", seller=world.seller)
    with pytest.raises(hf_escrow.ValidationError, match="generator"):
        world.gate.paid(price=PRICE, per="chunk")(lambda x: x)
    with pytest.raises(hf_escrow.ValidationError, match="synchronous"):
        Gate(hf_escrow.connect_async(agent="seller", database_url=world.url))


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
    runs = []

    @world.gate.paid(price=PRICE, with_receipt=True)
    def shout(text, request: gr.Request):
        runs.append(text)
        assert request.headers["x-escrow-id"]           # the handler's own gr.Request still arrives
        if text == "boom":
            raise ValueError("hidden detail")
        return text.upper()

    @world.gate.paid(price=PRICE, per="chunk")
    def spell(text):
        runs.append(text)
        yield from text

    @world.gate.paid(price=PRICE, fields=True)
    async def echo(text):
        runs.append(text)
        return text

    with gr.Blocks() as demo:
        box, out, receipt = gr.Textbox(), gr.Textbox(), gr.JSON()
        escrow_box, key_box = gr.Textbox(), gr.Textbox()
        gr.Button().click(shout, box, [out, receipt], api_name="shout", concurrency_limit=None)
        gr.Button().click(spell, box, out, api_name="spell", concurrency_limit=3)
        gr.Button().click(echo, [box, escrow_box, key_box], out, api_name="echo")
    port = free_port()
    demo.queue(default_concurrency_limit=2).launch(server_name="127.0.0.1", server_port=port,
                                                   prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}", runs
    finally:
        demo.close()


def test_in_gradio_with_gradio_client_headers(world, gradio_app):
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    url, runs = gradio_app
    e = world.escrow("0.010")
    client = Client(url, headers=world.headers(e.id), verbose=False)
    answer, receipt = client.predict("hi", api_name="/shout")
    assert answer == "HI" and receipt["remaining_usdc"] == "0.009000"
    with pytest.raises(AppError, match=r"failed \(ValueError\); you were not charged"):
        client.predict("boom", api_name="/shout")
    assert world.buyer.get(e.id).remaining == Decimal("0.009")
    job = client.submit("abc", api_name="/spell")
    job.result(timeout=30)
    assert job.outputs() == ["a", "b", "c"] and world.buyer.get(e.id).remaining == Decimal("0.006")
    assert client.predict("x", api_name="/echo") == "x"              # the fields are optional in the API
    assert client.predict("y", e.id, world.key, api_name="/echo") == "y"
    assert world.buyer.get(e.id).remaining == Decimal("0.004")

    stranger = Client(url, headers=world.headers(e.id, world.stranger_key), verbose=False)
    anonymous = Client(url, verbose=False)
    ran = len(runs)
    with pytest.raises(AppError, match="belongs to another buyer"):
        stranger.predict("hi", api_name="/shout")
    with pytest.raises(AppError, match="X-Escrow-Id"):
        anonymous.predict("hi", api_name="/spell")
    assert len(runs) == ran


def test_in_gradio_unlimited_concurrency_never_overdraws(world, gradio_app):
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    url, runs = gradio_app
    e = world.escrow("0.005")
    client = Client(url, headers=world.headers(e.id), verbose=False, max_workers=32)
    jobs = [client.submit(f"q{i}", api_name="/shout") for i in range(32)]
    ok, refused = 0, 0
    for job in jobs:
        try:
            job.result(timeout=60)
            ok += 1
        except AppError as error:
            assert "USDC left" in str(error)
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
        assert shout("a", request=world.headers(e.id)) [1]["remaining_usdc"] == "0.001000"
        assert gate.seller_id == "http-seller"
        with pytest.raises(Forbidden):
            shout("a", request=world.headers(e.id, world.stranger_key))
        shout("b", request=world.headers(e.id))
        with pytest.raises(InsufficientFunds):
            shout("c", request=world.headers(e.id))
        assert world.buyer.get(e.id).paid == Decimal("0.002")
    assert_audit_clean(world.ledger)
