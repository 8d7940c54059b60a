"""deduct_many from every client (embedded and over a real HTTP server, sync and async): one
request is one ledger transaction, a refused item moves nothing while its neighbours are
paid, a stranger cannot take from someone else's escrow, and a replay pays once."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import httpx
import pytest
from sqlalchemy import event

from hf_escrow import CaptureResult, Forbidden, InsufficientFunds, InvalidAmount, NotFound, ValidationError
from hf_escrow.ledger import Ledger
from hf_escrow.server import create_app

from .helpers import assert_audit_clean, parties, snapshot
from .liveserver import serve_app
from .test_client_contract import MODES, Mode, call, refused

D = Decimal


def outcome(results: list) -> list:
    assert all(isinstance(r, CaptureResult) for r in results)
    return [(r.receipt.kind, r.receipt.gross, r.receipt.remaining) if r.ok else type(r.error).__name__
            for r in results]


async def batch_story(m: Mode) -> None:
    keys = {name: reg["api_key"] for name, reg in parties(m.ledger, "buyer", "seller", "stranger").items()}
    buyer, seller, stranger = (m.client(name, keys[name]) for name in ("buyer", "seller", "stranger"))
    e1, e2 = (m.ledger.create_escrow("buyer", "seller", "1")["id"] for _ in range(2))
    theirs = m.ledger.create_escrow("buyer", "stranger", "1")["id"]

    results = await call(seller.deduct_many, [
        (e1, "0.1"), (e2, "5"), (theirs, "0.1"),
        {"escrow_id": e2, "amount": "0.25", "reason": "batch 7", "usage": {"prompt_tokens": 3, "completion_tokens": 4}},
        (e1, "0.2", "second slice")])
    assert outcome(results) == [("deduct", D("0.1"), D("0.9")), "InsufficientFunds", "NotFound",
                                ("deduct", D("0.25"), D("0.75")), ("deduct", D("0.2"), D("0.7"))]
    assert type(results[1].error) is InsufficientFunds and "cannot deduct 5.000000" in results[1].error.message
    got = m.ledger.get("buyer", e2)
    assert (got["paid_micro"], got["tokens_in"], got["tokens_out"]) == (250_000, 3, 4)
    assert m.ledger.get("buyer", theirs)["paid_micro"] == 0          # the refused item moved nothing
    assert m.ledger.get("buyer", e1)["paid_micro"] == 300_000
    assert [ev["data"].get("reason") for ev in m.ledger.get("buyer", e1)["events"]
            if ev["kind"] == "deducted"][-1] == "second slice"

    # A stranger to the escrow hears what an unknown id gets; its buyer may not deduct: nothing moves.
    before = snapshot(m.ledger)
    stolen = await call(stranger.deduct_many, [(e1, "0.1"), ("esc_nope", "0.1")])
    assert [type(r.error) for r in stolen] == [NotFound, NotFound] and snapshot(m.ledger) == before
    own = await call(buyer.deduct_many, [(e1, "0.1")])
    assert type(own[0].error) is Forbidden and own[0].error.status_code == 403 and snapshot(m.ledger) == before

    # Replayed under one key: the same answer, money moved once.
    first = await call(seller.deduct_many, [(e1, "0.01"), (e2, "0.02")], idempotency_key="dm-1")
    replay = await call(seller.deduct_many, [(e1, "0.01"), (e2, "0.02")], idempotency_key="dm-1")
    assert outcome(first) == outcome(replay) == [("deduct", D("0.01"), D("0.69")), ("deduct", D("0.02"), D("0.73"))]
    assert m.ledger.get("buyer", e1)["paid_micro"] == 310_000

    # Bad batches are refused whole, before anything moves.
    before = snapshot(m.ledger)
    await refused(InvalidAmount, seller.deduct_many, [(e1, "0.01"), (e2, "abc")])
    error = await refused(ValidationError, seller.deduct_many, [("only-an-id",)])
    assert "deduct 0: give (escrow_id, amount[, reason])" in error.message
    await refused(ValidationError, seller.deduct_many, [{"escrow_id": e1, "amount": "0.1", "hold_id": "x"}])
    await refused(ValidationError, seller.deduct_many, [])
    await refused(ValidationError, seller.deduct_many, "all of them")
    assert snapshot(m.ledger) == before


@pytest.mark.parametrize("mode", MODES)
def test_deduct_many_from_every_client(mode, tmp_path):
    m = Mode(mode, tmp_path)

    async def run():
        try:
            await batch_story(m)
        finally:
            await m.close()
    asyncio.run(run())
    assert_audit_clean(m.ledger)


@pytest.fixture
def live(tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    keys = {name: reg["api_key"] for name, reg in parties(ledger, "buyer", "seller").items()}
    with serve_app(create_app(ledger, sweep_interval_s=0, mcp=False)) as base:
        with httpx.Client(base_url=base, timeout=30) as http:
            yield ledger, keys, http
    assert_audit_clean(ledger)
    ledger.close()


def test_one_request_is_one_ledger_transaction(live):
    """A batch of three commits as often as one deduct does: the ledger writes it in one go."""
    ledger, keys, http = live
    e = ledger.create_escrow("buyer", "seller", "1")["id"]
    commits = []
    event.listen(ledger.engine, "commit", lambda conn: commits.append(1))
    auth = {"Authorization": f"Bearer {keys['seller']}"}
    single = http.post(f"/api/escrow/{e}/deduct", headers=auth, json={"amount_usdc": "0.01"})
    assert single.status_code == 200, single.text
    per_single, commits[:] = len(commits), []
    batch = http.post("/api/escrow/deduct", headers=auth, json={"items": [
        {"escrow_id": e, "amount_usdc": "0.01"}, {"escrow_id": e, "amount_usdc": 9},
        {"escrow_id": e, "amount_usdc": 0.02, "reason": "r", "idempotency_key": "item-3"}]})
    assert batch.status_code == 200, batch.text
    assert len(commits) == per_single, (len(commits), per_single)
    results = batch.json()["results"]
    assert [r["ok"] for r in results] == [True, False, True]
    assert (results[1]["error"], results[1]["status"]) == ("insufficient_funds", 402)
    assert results[2]["receipt"]["gross_usdc"] == 0.02 and results[2]["receipt"]["escrow"]["paid_micro"] == 40_000
    # The item's own key answers as a single deduct under that key would: paid once.
    again = http.post(f"/api/escrow/{e}/deduct", headers={**auth, "Idempotency-Key": "item-3"},
                      json={"amount_usdc": 0.02, "reason": "r"})
    assert again.status_code == 200 and ledger.get("buyer", e)["paid_micro"] == 40_000


@pytest.mark.parametrize("body, words", [
    ({"items": "all"}, "items"),
    ({"items": []}, "1 to 1000 deducts"),
    ({"items": [{"escrow_id": "esc_x", "amount_usdc": 0.1}] * 1001}, "at most 1000"),
    ({"items": [{"escrow_id": "esc_x", "amount_usdc": -1}]}, "deduct 0: amount"),
    ({"items": [{"amount_usdc": 0.1}]}, "escrow_id"),
    ({"items": [{"escrow_id": "esc_x", "amount_usdc": True}]}, "amount_usdc"),
])
def test_bad_batches_are_422_with_a_message(live, body, words):
    ledger, keys, http = live
    before = snapshot(ledger)
    answer = http.post("/api/escrow/deduct", json=body, headers={"Authorization": f"Bearer {keys['seller']}"})
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"] in ("validation_error", "invalid_amount")
    assert words in answer.json()["message"], answer.json()
    assert snapshot(ledger) == before


def test_a_batch_without_a_key_is_401(live):
    ledger, keys, http = live
    answer = http.post("/api/escrow/deduct", json={"items": [{"escrow_id": "esc_x", "amount_usdc": 1}]})
    assert answer.status_code == 401 and answer.json()["error"] == "unauthorized"
