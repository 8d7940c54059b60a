"""`gate.paid` on the batched path: per-call prices paid through a lease (`Gate(lease_calls=...)`).

Plain callables (money, receipts, a handler error, a revoke and a cancel within one
flush, bad declarations), then a real Gradio app on 127.0.0.1 called with
`gradio_client`: 64 callers on an escrow too small for all of them never overdraw.
"""

from __future__ import annotations

import asyncio
import threading
from decimal import Decimal

import pytest

from hf_escrow import Forbidden, InsufficientFunds, StateConflict, ValidationError
from hf_escrow.gate import Gate

from .helpers import assert_audit_clean
from .liveserver import free_port
from .test_gate import World as GateWorld, counted

PRICE = Decimal("0.001")
NEVER_MS = 3_600_000     # flushes are made by hand (or by close)


class World(GateWorld):
    """test_gate's world, its gate on the batched path."""

    def __init__(self, url: str):
        super().__init__(url)
        self.gate = Gate(self.seller, lease_calls=16, flush_ms=NEVER_MS)


@pytest.fixture
def world(sqlite_url):
    world = World(sqlite_url)
    yield world
    world.gate.close()


@pytest.fixture
def any_world(db_url):
    world = World(db_url)
    yield world
    world.gate.close()


def test_calls_are_paid_by_the_lease_once_each_and_the_rest_freed(any_world):
    world = any_world
    shout, runs = counted(world, with_receipt=True)
    e = world.escrow("0.050")
    answer, receipt = shout("hi", request={"X-Escrow-Token": e.spend_token})
    assert answer == "HI" and receipt["charged_usdc"] == "0.001000" and receipt["settled"] is False
    assert receipt["fee_usdc"] is None and receipt["remaining_usdc"] is None   # known at the flush only
    with pytest.raises(ValueError):
        shout("boom", request={"X-Escrow-Token": e.spend_token})               # costs nothing
    threads = [threading.Thread(target=lambda: [shout("x", request={"X-Escrow-Token": e.spend_token})
                                                for _ in range(5)]) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert world.buyer.get(e.id).paid <= 41 * PRICE  # flushed when the lease ran out: never ahead of delivery
    world.gate.close()
    after = world.buyer.get(e.id)
    assert (after.paid, after.held) == (41 * PRICE, 0) and len(runs) == 42
    assert after.remaining == Decimal("0.050") - 41 * PRICE
    assert_audit_clean(world.ledger)


def test_a_revoke_or_a_cancel_stops_calls_after_one_flush(world):
    shout, runs = counted(world)
    revoked, cancelled = world.escrow("0.050"), world.escrow("0.050")
    for e in (revoked, cancelled):
        shout("a", request={"X-Escrow-Token": e.spend_token})
    world.buyer.revoke_spend_tokens(revoked.id)
    world.buyer.cancel(cancelled.id)
    world.gate.leases.flush()
    with pytest.raises(Forbidden):
        shout("b", request={"X-Escrow-Token": revoked.spend_token})
    with pytest.raises(StateConflict):
        shout("b", request={"X-Escrow-Token": cancelled.spend_token})
    assert runs == ["a", "a"]
    world.gate.close()
    assert world.buyer.get(revoked.id).paid == world.buyer.get(cancelled.id).paid == PRICE
    assert world.buyer.get(cancelled.id).held == 0
    assert_audit_clean(world.ledger)


def test_an_escrow_too_small_refuses_with_the_price(world):
    shout, runs = counted(world)
    e = world.escrow("0.002")
    for _ in range(2):
        shout("a", request={"X-Escrow-Token": e.spend_token})
    with pytest.raises(InsufficientFunds) as refused:
        shout("a", request={"X-Escrow-Token": e.spend_token})
    assert refused.value.details["price_micro"] == 1_000 and len(runs) == 2
    world.gate.close()
    assert world.buyer.get(e.id).paid == 2 * PRICE
    assert_audit_clean(world.ledger)


def test_async_handlers_on_the_batched_path(world):
    @world.gate.paid(price=PRICE)
    async def echo(text):
        await asyncio.sleep(0)
        return text

    e = world.escrow("0.100")

    async def main():
        return await asyncio.gather(*(echo(str(i), request={"X-Escrow-Token": e.spend_token}) for i in range(30)))

    assert asyncio.run(main()) == [str(i) for i in range(30)]
    world.gate.close()
    assert world.buyer.get(e.id).paid == 30 * PRICE
    assert_audit_clean(world.ledger)


def test_batched_declarations_that_cannot_work_are_refused(world):
    def stream(n):
        yield n
    with pytest.raises(ValidationError, match="batch"):
        world.gate.paid(price=PRICE, per="chunk", batch=True)(stream)
    with pytest.raises(ValidationError, match="batch"):
        world.gate.paid(price=PRICE, batch=True)(stream)
    with pytest.raises(ValidationError, match="lease_calls"):
        Gate(world.seller, lease_calls=0)
    per_call = Gate(world.seller)                       # the per-call path stays the default
    shout = per_call.paid(price=PRICE)(lambda text: text)
    e = world.escrow("0.010")
    shout("a", request={"X-Escrow-Token": e.spend_token})
    assert world.buyer.get(e.id).paid == PRICE          # captured before the result left


# ---- in Gradio ---------------------------------------------------------------------------


@pytest.fixture
def gradio_app(world):
    import gradio as gr

    @world.gate.paid(price=PRICE)
    def shout(text):
        return text.upper()

    @world.gate.paid(price=PRICE, fields=True)
    async def echo(text):
        return text

    with gr.Blocks() as demo:
        box, out, token = gr.Textbox(), gr.Textbox(), gr.Textbox()
        gr.Button().click(shout, box, out, api_name="shout", concurrency_limit=None)
        gr.Button().click(echo, [box, token], out, api_name="echo")
    port = free_port()
    demo.queue(default_concurrency_limit=None).launch(server_name="127.0.0.1", server_port=port,
                                                      prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}"
    demo.close()


def test_in_gradio_64_callers_on_a_small_escrow_never_overdraw(world, gradio_app):
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    e = world.escrow("0.040")                        # 40 calls; 128 are asked for
    outcomes, lock = {"ok": 0, "refused": 0}, threading.Lock()

    def caller() -> None:
        client = Client(gradio_app, headers={"X-Escrow-Token": e.spend_token}, verbose=False)
        for _ in range(2):
            try:
                assert client.predict("hi", api_name="/shout") == "HI"
                outcome = "ok"
            except AppError as error:
                assert "USDC" in str(error), error   # the usual 402: the price and what is free
                outcome = "refused"
            with lock:
                outcomes[outcome] += 1

    threads = [threading.Thread(target=caller) for _ in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    world.gate.close()
    after = world.buyer.get(e.id)
    assert outcomes == {"ok": 40, "refused": 88}
    assert (after.paid, after.held, after.remaining) == (Decimal("0.040"), 0, 0)
    assert_audit_clean(world.ledger)


def test_in_gradio_a_cancel_stops_calls_after_one_flush(world, gradio_app):
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    e = world.escrow("0.050")
    client = Client(gradio_app, headers={"X-Escrow-Token": e.spend_token}, verbose=False)
    assert client.predict("hi", api_name="/shout") == "HI"
    assert Client(gradio_app, verbose=False).predict("x", e.spend_token, api_name="/echo") == "x"  # the field
    world.buyer.cancel(e.id)
    world.gate.leases.flush()
    with pytest.raises(AppError, match="(?i)closed"):
        client.predict("hi", api_name="/shout")
    world.gate.close()
    assert world.buyer.get(e.id).paid == 2 * PRICE and world.buyer.get(e.id).held == 0
    assert_audit_clean(world.ledger)
