"""Holds and spend tokens outside the ledger: the clients, the HTTP routes, MCP and the CLI.

One scenario runs four ways (embedded sync/async, HTTP sync/async on a live server on
127.0.0.1) and must tell the same story: the same Decimal amounts, statuses and error
classes. Then what only the HTTP face shows (the `*_usdc` twins, 422s for bad bodies,
route order), hold expiry on a clock the test moves, MCP tools and CLI commands.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from decimal import Decimal

import httpx
import pytest

import hf_escrow
from hf_escrow import (
    CaptureResult, Forbidden, Hold, IdempotencyConflict, InsufficientFunds, InvalidAmount, NotFound, StateConflict,
    ValidationError,
)
from hf_escrow.client import EmbeddedTransport, EscrowClient
from hf_escrow.ledger import Ledger, LedgerConfig
from hf_escrow.server import create_app

from .conftest import FakeClock
from .helpers import assert_audit_clean, parties, snapshot
from .liveserver import serve_app
from .test_client_contract import MODES, Mode, call, refused

D = Decimal
TRANSCRIPTS: dict[str, list] = {}


def hold_facts(h: Hold) -> tuple:
    """Everything observable of a hold but its ids and clock times."""
    assert isinstance(h, Hold) and h.id.startswith("hold_") and h.escrow_id.startswith("esc_")
    assert h.open == (h.amount - h.captured if h.status == "open" else 0)
    return (h.holder, h.status, h.amount, h.captured, h.open, h.escrow_status, h.escrow_remaining,
            (h.expires_at - h.created_at).total_seconds(), h.closed_at is None)


def money(e: hf_escrow.Escrow) -> tuple:
    assert e.amount == e.paid + e.refunded + e.held + e.remaining, e
    return e.status, e.amount, e.paid, e.refunded, e.held, e.remaining


def receipt_money(r: hf_escrow.Receipt) -> tuple:
    assert r.gross == r.net + r.fee
    hold = hold_facts(r.hold) if r.hold else None
    return r.kind, r.status, r.gross, r.net, r.fee, r.refunded, r.remaining, money(r.escrow), hold


def result_facts(results: list[CaptureResult]) -> list:
    assert all(isinstance(r, CaptureResult) for r in results)
    return [receipt_money(r.receipt) if r.ok else (type(r.error).__name__, r.error.status_code) for r in results]


async def scenario(m: Mode) -> list:
    t: list = []
    note = t.append
    buyer, seller, rival, third = (m.client(name) for name in ("buyer", "seller", "rival", "third"))
    for client, name in ((buyer, "buyer"), (seller, "seller"), (rival, "rival"), (third, "third")):
        await call(client.register, name)
    assert await call(buyer.claim_faucet) == D("10")

    # ---- a create's spend token is shown once: a replay of the create has none ----------------
    e = await call(buyer.create_escrow, "seller", "2", ttl_seconds=600, idempotency_key="holds-create")
    assert e.spend_token.startswith("est_") and len(e.spend_token) > 30
    assert money(e) == ("active", D("2"), 0, 0, 0, D("2"))
    again = await call(buyer.create_escrow, "seller", "2", ttl_seconds=600, idempotency_key="holds-create")
    assert again.id == e.id and again.spend_token is None and money(again) == money(e)
    assert e.spend_token not in repr(e)  # a secret stays out of logged reprs
    assert (await call(buyer.get, e.id)).spend_token is None
    token = e.spend_token
    note(money(e))

    # ---- the seller holds by token -------------------------------------------------------------
    h = await call(seller.hold, token, "0.5", ttl_seconds=60)
    assert h.escrow_id == e.id
    assert hold_facts(h) == ("seller", "open", D("0.5"), 0, D("0.5"), "active", D("1.5"), 60.0, True)
    assert money(await call(buyer.get, e.id)) == ("active", D("2"), 0, 0, D("0.5"), D("1.5"))
    assert hold_facts(await call(buyer.get_hold, h.id)) == hold_facts(h)  # a party may look
    note(hold_facts(h))

    # ---- nobody else can use the token or the seller's hold; nothing moves -----------------------
    before = snapshot(m.ledger)
    await refused(Forbidden, rival.hold, token, "0.1")   # another seller
    await refused(Forbidden, buyer.hold, token, "0.1")   # the token pays the seller, not the buyer
    await refused(NotFound, rival.hold, e.id, "0.1")     # by id: a stranger learns nothing
    await refused(Forbidden, buyer.capture, h.id, "0.1")
    await refused(Forbidden, buyer.void, h.id)
    await refused(NotFound, third.capture, h.id, "0.1")
    await refused(NotFound, third.void, h.id)
    await refused(NotFound, third.get_hold, h.id)
    await refused(NotFound, third.holds, e.id)
    await refused(NotFound, seller.capture, "hold_does_not_exist", "0.1")
    await refused(Forbidden, rival.hold, "est_not-a-token", "0.1")
    await refused(InsufficientFunds, seller.hold, token, "1.500001")
    await refused(InvalidAmount, seller.hold, token, "-1")
    await refused(ValidationError, seller.hold, token, "0.1", ttl_seconds=0)
    await refused(ValidationError, seller.hold, "", "0.1")
    assert snapshot(m.ledger) == before
    assert hold_facts(await call(seller.get_hold, h.id)) == hold_facts(h)

    # ---- captures pay the seller out of the hold; beyond it is refused and moves nothing ---------
    r = await call(seller.capture, h.id, "0.2", usage={"prompt_tokens": 10, "completion_tokens": 20})
    assert receipt_money(r)[:7] == ("capture", "active", D("0.2"), D("0.198"), D("0.002"), 0, D("1.5"))
    assert money(r.escrow) == ("active", D("2"), D("0.2"), 0, D("0.3"), D("1.5"))
    assert (r.hold.status, r.hold.captured, r.hold.open, r.escrow.tokens_in, r.escrow.tokens_out) == \
        ("open", D("0.2"), D("0.3"), 10, 20)
    note(receipt_money(r))
    before = snapshot(m.ledger)
    error = await refused(InsufficientFunds, seller.capture, h.id, "0.300001")
    assert "0.300000" in error.message
    await refused(ValidationError, seller.capture, h.id, "0")  # 0 only with final
    assert snapshot(m.ledger) == before
    assert (await call(seller.get_hold, h.id)).open == D("0.3")
    r = await call(seller.capture, h.id, "0.1", final=True)  # final frees the other 0.2
    assert receipt_money(r)[:7] == ("capture", "active", D("0.1"), D("0.099"), D("0.001"), 0, D("1.7"))
    assert (r.hold.status, r.hold.captured, r.hold.open, r.hold.closed_at is not None) == \
        ("captured", D("0.3"), 0, True)
    assert money(r.escrow) == ("active", D("2"), D("0.3"), 0, 0, D("1.7"))
    await refused(StateConflict, seller.capture, h.id, "0.01")
    await refused(StateConflict, seller.void, h.id)
    note(receipt_money(r))

    # ---- retries under one key move nothing twice ---------------------------------------------------
    h2 = await call(seller.hold, e.id, "0.3", idempotency_key="holds-h2")  # by escrow id, as a party
    h2_again = await call(seller.hold, e.id, "0.3", idempotency_key="holds-h2")
    assert h2_again.id == h2.id and hold_facts(h2_again) == hold_facts(h2)
    await refused(IdempotencyConflict, seller.hold, e.id, "0.4", idempotency_key="holds-h2")
    assert money(await call(buyer.get, e.id)) == ("active", D("2"), D("0.3"), 0, D("0.3"), D("1.4"))
    c1 = await call(seller.capture, h2.id, "0.1", idempotency_key="holds-c1")
    c2 = await call(seller.capture, h2.id, "0.1", idempotency_key="holds-c1")
    assert receipt_money(c1) == receipt_money(c2) and c1.hold.captured == D("0.1")
    assert money(await call(buyer.get, e.id)) == ("active", D("2"), D("0.4"), 0, D("0.2"), D("1.4"))
    v = await call(seller.void, h2.id, idempotency_key="holds-v")
    v_again = await call(seller.void, h2.id, idempotency_key="holds-v")
    assert receipt_money(v) == receipt_money(v_again)
    assert receipt_money(v)[:7] == ("void", "active", 0, 0, 0, 0, D("1.6"))
    assert (v.hold.status, v.hold.captured, v.hold.open, v.escrow.held) == ("voided", D("0.1"), 0, 0)
    note(receipt_money(v))

    # ---- the buyer may hold on its own escrow; its captures pay the seller ----------------------------
    hb = await call(buyer.hold, e.id, "0.2")
    assert [x.id for x in await call(seller.holds, e.id)] == [hb.id]
    assert [hold_facts(x) for x in await call(buyer.holds, e.id)] == [hold_facts(hb)]
    await refused(Forbidden, seller.capture, hb.id, "0.05")
    rb = await call(buyer.capture, hb.id, "0.05", final=True)
    assert receipt_money(rb)[:7] == ("capture", "active", D("0.05"), D("0.0495"), D("0.0005"), 0, D("1.55"))
    assert await call(buyer.holds, e.id) == []
    note(receipt_money(rb))

    # ---- spend tokens: only the buyer mints and revokes; a revoke stops them at once ------------------
    await refused(Forbidden, seller.mint_spend_token, e.id)
    await refused(Forbidden, seller.revoke_spend_tokens, e.id)
    await refused(NotFound, third.mint_spend_token, e.id)
    token2 = await call(buyer.mint_spend_token, e.id)
    assert token2.startswith("est_") and token2 != token
    ht = await call(seller.hold, token2, "0.1")
    assert await call(buyer.revoke_spend_tokens, e.id) == 2
    before = snapshot(m.ledger)
    await refused(Forbidden, seller.hold, token2, "0.01")
    await refused(Forbidden, seller.hold, token, "0.01")
    assert snapshot(m.ledger) == before
    assert await call(buyer.revoke_spend_tokens, e.id) == 0
    rt = await call(seller.capture, ht.id, "0.1")  # a hold made before the revoke still captures
    assert (rt.gross, rt.hold.status, rt.escrow.paid, rt.remaining) == (D("0.1"), "captured", D("0.55"), D("1.45"))

    # ---- capture_many: one bad item is reported alone, the others are paid -----------------------------
    ha, hb2, hc = [await call(seller.hold, e.id, "0.1") for _ in range(3)]
    results = await call(seller.capture_many, [
        (ha.id, "0.04", True), (hb2.id, "0.2", True),
        {"hold_id": hc.id, "amount": "0.1", "usage": {"prompt_tokens": 5, "completion_tokens": 7}}])
    assert [r.ok for r in results] == [True, False, True]
    assert type(results[1].error) is InsufficientFunds and results[1].receipt is None
    assert "cannot capture 0.200000" in results[1].error.message
    assert (results[0].receipt.gross, results[0].receipt.hold.status, results[0].receipt.hold.open) == \
        (D("0.04"), "captured", 0)
    assert (results[2].receipt.gross, results[2].receipt.hold.status) == (D("0.1"), "captured")
    assert (await call(seller.get_hold, hb2.id)).open == D("0.1")  # the refused item moved nothing
    assert money(await call(buyer.get, e.id)) == ("active", D("2"), D("0.69"), 0, D("0.1"), D("1.21"))
    note(result_facts(results))
    batch = [(hb2.id, "0.01"), (hb2.id, "0.02", True)]
    first = await call(seller.capture_many, batch, idempotency_key="holds-batch")
    replay = await call(seller.capture_many, batch, idempotency_key="holds-batch")
    assert result_facts(first) == result_facts(replay) and [r.ok for r in first] == [True, True]
    assert money(await call(buyer.get, e.id)) == ("active", D("2"), D("0.72"), 0, 0, D("1.28"))
    hx = await call(buyer.hold, e.id, "0.01")
    mixed = await call(seller.capture_many, [(hx.id, "0.01"), ("hold_nope", "0.01"), (hb2.id, "0.01")])
    assert [(type(r.error).__name__, r.error.status_code) for r in mixed] == \
        [("Forbidden", 403), ("NotFound", 404), ("StateConflict", 409)]
    await refused(InvalidAmount, seller.capture_many, [(ha.id, "0.01"), (hb2.id, "abc")])
    await refused(ValidationError, seller.capture_many, [("only-an-id",)])
    await refused(ValidationError, seller.capture_many, [])
    await call(buyer.void, hx.id)
    note(result_facts(first))
    note(result_facts(mixed))

    # ---- cancel closes the escrow: the token stops, an open hold still captures within the grace -----
    e2 = await call(buyer.create_escrow, "seller", "1", ttl_seconds=600)
    hc2 = await call(seller.hold, e2.spend_token, "0.4", ttl_seconds=300)
    c = await call(buyer.cancel, e2.id)
    assert (c.status, c.refunded, c.remaining) == ("cancelled", D("0.6"), 0)
    assert money(c.escrow) == ("cancelled", D("1"), 0, D("0.6"), D("0.4"), 0)
    await refused(StateConflict, seller.hold, e2.spend_token, "0.1")
    await refused(StateConflict, buyer.mint_spend_token, e2.id)
    still = await call(seller.get_hold, hc2.id)
    assert (still.status, still.open, still.escrow_status) == ("open", D("0.4"), "cancelled")
    assert still.expires_at <= c.escrow.closed_at + timedelta(seconds=30)  # the grace, not the 300 s TTL
    r = await call(seller.capture, hc2.id, "0.15", final=True)
    assert receipt_money(r)[:7] == ("capture", "cancelled", D("0.15"), D("0.1485"), D("0.0015"), D("0.25"), 0)
    assert money(r.escrow) == ("cancelled", D("1"), D("0.15"), D("0.85"), 0, 0)
    note(receipt_money(r)[:8] + (r.hold.status, r.hold.captured))  # its TTL now depends on the clock

    # ---- balances: the buyer got back all it did not pay; the seller got the nets ---------------------
    balances = {name: (await call(client.me)).balance for name, client in (("buyer", buyer), ("seller", seller))}
    assert balances == {"buyer": D("10") - 2 - 1 + D("0.85"), "seller": D("0.72") * D("0.99") + D("0.1485")}
    note(balances)
    r = await call(buyer.release, e.id, "0")  # closes e: the rest goes back to the buyer
    assert money(r.escrow) == ("released", D("2"), D("0.72"), D("1.28"), 0, 0)
    return t


@pytest.mark.parametrize("mode", MODES)
def test_holds_tell_the_same_story_from_every_client(mode, tmp_path):
    async def run():
        m = Mode(mode, tmp_path)
        try:
            return m, await scenario(m)
        finally:
            await m.close()

    m, transcript = asyncio.run(run())
    ledger = Ledger(m.url)
    report = assert_audit_clean(ledger)
    assert report["minted_micro"] == 10_000_000
    ledger.close()
    TRANSCRIPTS[mode] = transcript


def test_all_four_clients_told_the_same_hold_story():
    missing = [mode for mode in MODES if mode not in TRANSCRIPTS]
    if missing:
        pytest.skip(f"not run in this session: {missing}")
    for mode in MODES[1:]:
        assert TRANSCRIPTS[mode] == TRANSCRIPTS[MODES[0]], mode


# ---- what the HTTP face shows --------------------------------------------------------------------------


@pytest.fixture
def live(db_url):
    """A live server on a ledger with a funded buyer, a seller and a stranger; their keys."""
    ledger = Ledger(db_url)
    keys = {name: reg["api_key"] for name, reg in parties(ledger, "buyer", "seller", "stranger").items()}
    with serve_app(create_app(ledger, sweep_interval_s=0, mcp=False)) as base:
        with httpx.Client(base_url=base, timeout=30) as http:
            yield ledger, keys, http, base
    assert_audit_clean(ledger)
    ledger.close()


def auth(key: str, idempotency_key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {key}"}
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    return headers


def test_http_answers_carry_tokens_holds_and_usdc_twins(live):
    ledger, keys, http, base = live
    b, s = auth(keys["buyer"]), auth(keys["seller"])
    body = {"seller_id": "seller", "amount_usdc": 2}
    created = http.post("/api/escrow", json=body, headers=auth(keys["buyer"], "c1"))
    assert created.status_code == 201
    e = created.json()
    assert e["spend_token"].startswith("est_") and (e["held_micro"], e["held_usdc"]) == (0, 0.0)
    replay = http.post("/api/escrow", json=body, headers=auth(keys["buyer"], "c1"))
    assert replay.json()["id"] == e["id"] and "spend_token" not in replay.json()
    vllm = http.post("/escrow/create", json={"recipient_wallet": "seller", "amount_usdc": 0.5}, headers=b).json()
    assert vllm["spend_token"].startswith("est_") and vllm["escrow_id"] == vllm["id"]

    hold = http.post("/api/holds", json={"spend_token": e["spend_token"], "amount_usdc": "0.5", "ttl_seconds": 30.5},
                     headers=s)
    assert hold.status_code == 201, hold.text
    h = hold.json()
    assert (h["status"], h["amount_micro"], h["amount_usdc"], h["open_usdc"], h["escrow_remaining_usdc"]) == \
        ("open", 500_000, 0.5, 0.5, 1.5)
    assert h["expires_at_ms"] - h["created_at_ms"] == 30_500
    assert e["spend_token"] not in hold.text

    # The HF dialect's remaining_usdc is what can still be spent: the seeds' check stays right.
    view = http.get(f"/api/escrow/{e['id']}", headers=b).json()
    assert (view["held_usdc"], view["remaining_usdc"], view["amount_usdc"], view["paid_usdc"]) == (0.5, 1.5, 2.0, 0.0)
    assert [x["id"] for x in http.get(f"/api/escrow/{e['id']}/holds", headers=b).json()] == [h["id"]]
    assert http.get(f"/api/holds/{h['id']}", headers=b).json()["open_micro"] == 500_000

    cap = http.post(f"/api/holds/{h['id']}/capture", json={"amount_usdc": 0.2, "usage": {"prompt_tokens": 3}},
                    headers=auth(keys["seller"], "cap-1"))
    assert cap.status_code == 200, cap.text
    r = cap.json()
    assert (r["kind"], r["gross_usdc"], r["net_usdc"], r["amount_paid"], r["remaining_usdc"]) == \
        ("capture", 0.2, 0.198, 0.2, 1.5)
    assert (r["hold"]["captured_usdc"], r["hold"]["open_usdc"], r["escrow"]["held_usdc"]) == (0.2, 0.3, 0.3)
    again = http.post(f"/api/holds/{h['id']}/capture", json={"amount_usdc": 0.2, "usage": {"prompt_tokens": 3}},
                      headers=auth(keys["seller"], "cap-1"))
    assert again.json()["hold"] == r["hold"]
    assert ledger.get("buyer", e["id"])["paid_micro"] == 200_000  # the retry paid nothing more

    # The batch route is not taken for a hold id, and answers per item.
    h2 = http.post(f"/api/escrow/{e['id']}/holds", json={"amount_usdc": 0.1}, headers=s).json()
    assert h2["expires_at_ms"] - h2["created_at_ms"] == 60_000  # the default TTL
    batch = http.post("/api/holds/capture", headers=s, json={"items": [
        {"hold_id": h["id"], "amount_usdc": 0.3, "final": True},
        {"hold_id": h2["id"], "amount_usdc": "0.5"}]})
    assert batch.status_code == 200, batch.text
    first, second = batch.json()["results"]
    assert first["ok"] and first["receipt"]["gross_usdc"] == 0.3 and first["receipt"]["hold"]["status"] == "captured"
    assert (second["ok"], second["status"], second["error"]) == (False, 402, "insufficient_funds")
    assert http.get("/api/holds/capture", headers=s).status_code == 404  # GET: a hold id that does not exist
    void = http.post(f"/api/holds/{h2['id']}/void", headers=s).json()
    assert (void["kind"], void["gross_usdc"], void["hold"]["status"], void["escrow"]["held_usdc"]) == \
        ("void", 0.0, "voided", 0.0)

    minted = http.post(f"/api/escrow/{e['id']}/tokens", headers=b)
    assert minted.status_code == 201 and minted.json()["spend_token"].startswith("est_")
    revoked = http.delete(f"/api/escrow/{e['id']}/tokens", headers=b).json()
    assert revoked == {"escrow_id": e["id"], "revoked": 2}
    refused = http.post("/api/holds", json={"spend_token": minted.json()["spend_token"], "amount_usdc": 0.1},
                        headers=s)
    assert refused.status_code == 403 and "revoked" in refused.json()["message"]
    assert http.post(f"/api/escrow/{e['id']}/tokens", headers=s).status_code == 403
    assert http.get(f"/api/escrow/{e['id']}/holds", headers=auth(keys["stranger"])).status_code == 404
    assert http.get(f"/api/holds/{h['id']}", headers=auth(keys["stranger"])).status_code == 404
    assert http.post("/api/holds", json={"spend_token": "est_x", "amount_usdc": 1}).status_code == 401
    final = ledger.get("buyer", e["id"])
    assert (final["paid_micro"], final["held_micro"], final["remaining_micro"]) == (500_000, 0, 1_500_000)


@pytest.mark.parametrize("path, body, words", [
    ("/api/holds", {"amount_usdc": 0.1}, "spend_token: Field required"),
    ("/api/holds", {"spend_token": "est_x", "amount_usdc": "abc"}, "must be a number"),
    ("/api/holds", {"spend_token": "est_x", "amount_usdc": 0.1, "ttl_seconds": "long"}, "ttl_seconds"),
    ("/api/holds", {"spend_token": "est_x", "amount_usdc": 0.1, "ttl_seconds": -5}, "must be a positive number"),
    ("/api/holds", {"spend_token": 7, "amount_usdc": 0.1}, "spend_token"),
    ("/api/holds", [1, 2], "invalid request"),
    ("/api/holds/capture", {"items": "all"}, "items"),
    ("/api/holds/capture", {"items": []}, "1 to 1000 captures"),
    ("/api/holds/capture", {"items": [{"hold_id": "hold_x", "amount_usdc": 0.1}] * 1001}, "at most 1000"),
    ("/api/holds/capture", {"items": [{"hold_id": "hold_x", "amount_usdc": -1}]}, "capture 0: amount"),
    ("/api/holds/capture", {"items": [{"hold_id": "hold_x", "amount_usdc": 0.1, "final": "yes"}]}, "final"),
    ("/api/holds/hold_x/capture", {"amount_usdc": 0}, "a capture of 0 pays nothing"),
    ("/api/holds/hold_x/capture", {"amount_usdc": 0.1, "usage": {"prompt_tokens": -1}}, "prompt_tokens"),
    ("/api/holds/hold_x/capture", {}, "amount_usdc: Field required"),
    ("/api/holds/hold_x/capture", {"amount_usdc": 1e300}, "absurdly large"),
])
def test_bad_hold_bodies_are_422_with_a_message(live, path, body, words):
    ledger, keys, http, base = live
    before = snapshot(ledger)
    answer = http.post(path, json=body, headers=auth(keys["seller"]))
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"] in ("validation_error", "invalid_amount")
    assert words in answer.json()["message"], answer.json()
    assert snapshot(ledger) == before


def test_ids_that_are_not_ids_are_refused_alike_by_both_clients(live):
    """'/', '?', '#' or nothing in a hold id or a hold target reach the ledger as part of the
    id (quoted into the path), so both clients refuse them with the same error."""
    ledger, keys, http, base = live
    escrow = ledger.create_escrow("buyer", "seller", "1")
    embedded = EscrowClient(EmbeddedTransport(ledger), agent="seller")
    with hf_escrow.connect(base, api_key=keys["seller"], max_retries=0) as over_http:
        def outcome(client, method, *args):
            try:
                result = getattr(client, method)(*args)
            except hf_escrow.EscrowError as error:
                return type(error).__name__
            if method == "capture_many":  # refused alone, in its result
                return "item " + " ".join(type(r.error).__name__ if r.error else "accepted" for r in result)
            return "accepted"

        for bad in ("hold_a/void", "x?y=1", "a#b", "", "../hold_x", "capture", escrow["id"] + "/holds"):
            for method, args in (("capture", (bad, "0.1")), ("capture_many", ([(bad, "0.1")],)), ("void", (bad,)),
                                 ("get_hold", (bad,)), ("hold", (bad, "0.1")), ("holds", (bad,))):
                seen = {outcome(embedded, method, *args), outcome(over_http, method, *args)}
                assert len(seen) == 1 and "accepted" not in seen.pop(), (method, bad, seen)
        assert outcome(over_http, "hold", None, "0.1") == "ValidationError"
    assert ledger.get("buyer", escrow["id"])["held_micro"] == 0


# ---- expiry, on a clock the test moves -------------------------------------------------------------------


def test_an_expired_hold_is_refused_and_freed_once_from_both_clients(sqlite_url):
    clock = FakeClock()
    ledger = Ledger(sqlite_url, config=LedgerConfig(hold_max_ttl_s=120, hold_grace_s=30), clock=clock)
    keys = {name: reg["api_key"] for name, reg in parties(ledger, "buyer", "seller").items()}
    with serve_app(create_app(ledger, sweep_interval_s=0, mcp=False)) as base:
        embedded = EscrowClient(EmbeddedTransport(ledger), agent="seller")
        over_http = hf_escrow.connect(base, api_key=keys["seller"], max_retries=0)
        e = ledger.create_escrow("buyer", "seller", "1", ttl_seconds=3600)
        for client in (embedded, over_http):
            h = client.hold(e["spend_token"], "0.25", ttl_seconds=10_000)
            assert (h.expires_at - h.created_at).total_seconds() == 120  # capped
            clock.advance(121)
            with pytest.raises(StateConflict, match="has expired"):
                client.capture(h.id, "0.1")
            gone = client.get_hold(h.id)
            assert (gone.status, gone.open, gone.captured, gone.escrow_remaining) == ("expired", 0, 0, D("1"))
            with pytest.raises(StateConflict):
                client.void(h.id)
        over_http.close()
    assert ledger.get("buyer", e["id"])["held_micro"] == 0
    assert [ev["kind"] for ev in ledger.get("buyer", e["id"])["events"]].count("hold_expired") == 2
    assert_audit_clean(ledger)
    ledger.close()


# ---- MCP and CLI -------------------------------------------------------------------------------------------


def test_mcp_hold_tools(tmp_path):
    from .test_mcp import error, mcp_session, ok, run

    ledger = Ledger(f"sqlite:///{tmp_path / 'mcp.db'}")
    keys = {name: reg["api_key"] for name, reg in parties(ledger, "buyer", "seller", "rival").items()}
    with serve_app(create_app(ledger, sweep_interval_s=0)) as base:
        async def scenario():
            async with mcp_session(base, keys["buyer"]) as b, mcp_session(base, keys["seller"]) as s, \
                    mcp_session(base, keys["rival"]) as rival:
                e = await ok(b, "escrow_create", {"seller_id": "seller", "amount_usdc": "1"})
                assert e["spend_token"].startswith("est_")
                h = await ok(s, "escrow_hold", {"spend_token": e["spend_token"], "amount_usdc": 0.3})
                assert (h["status"], h["amount_micro"], h["open_usdc"], h["escrow_remaining_micro"]) == \
                    ("open", 300_000, 0.3, 700_000)
                text = await error(rival, "escrow_hold", {"spend_token": e["spend_token"], "amount_usdc": 0.1})
                assert "forbidden (403)" in text and "another seller" in text
                text = await error(s, "escrow_hold", {"amount_usdc": 0.1})
                assert "validation_error (422)" in text and "exactly one of spend_token or escrow_id" in text
                listed = await ok(b, "escrow_holds", {"escrow_id": e["id"]})
                assert listed["count"] == 1 and listed["holds"][0]["id"] == h["id"]
                r = await ok(s, "escrow_capture", {"hold_id": h["id"], "amount_usdc": "0.1", "prompt_tokens": 4,
                                                   "completion_tokens": 6})
                assert (r["kind"], r["gross_micro"], r["net_micro"], r["hold"]["open_micro"]) == \
                    ("capture", 100_000, 99_000, 200_000)
                text = await error(s, "escrow_capture", {"hold_id": h["id"], "amount_usdc": 0.5})
                assert "insufficient_funds (402)" in text
                text = await error(b, "escrow_void", {"hold_id": h["id"]})
                assert "forbidden (403)" in text
                v = await ok(s, "escrow_void", {"hold_id": h["id"]})
                assert (v["kind"], v["hold"]["status"], v["escrow"]["held_micro"], v["remaining_micro"]) == \
                    ("void", "voided", 0, 900_000)
                h2 = await ok(b, "escrow_hold", {"escrow_id": e["id"], "amount_usdc": 0.05})
                assert h2["holder"] == "buyer"
                minted = await ok(b, "escrow_mint_token", {"escrow_id": e["id"]})
                assert minted["spend_token"].startswith("est_") and minted["escrow_id"] == e["id"]
                assert "forbidden (403)" in await error(s, "escrow_mint_token", {"escrow_id": e["id"]})
                revoked = await ok(b, "escrow_revoke_tokens", {"escrow_id": e["id"]})
                assert revoked == {"escrow_id": e["id"], "revoked": 2}
                text = await error(s, "escrow_hold", {"spend_token": minted["spend_token"], "amount_usdc": 0.1})
                assert "forbidden (403)" in text and "revoked" in text
                return e["id"]

        escrow_id = run(scenario())
    view = ledger.get("buyer", escrow_id)
    assert (view["paid_micro"], view["held_micro"], view["remaining_micro"], view["tokens_in"]) == \
        (100_000, 50_000, 850_000, 4)
    assert_audit_clean(ledger)
    ledger.close()


def test_cli_hold_commands_embedded_and_over_http(tmp_path, monkeypatch):
    from rich.console import Console

    from hf_escrow import cli as cli_module

    from .test_cli import cli, cli_json, flat

    monkeypatch.setattr(cli_module, "console", Console(width=200))
    cli("register", "buyer")
    cli("register", "seller")
    cli("claim", "--agent", "buyer")
    shown = flat(cli("create", "seller", "1", "--agent", "buyer").stdout)
    assert "spend token (shown once" in shown and "est_" in shown
    e = cli_json("create", "seller", "2", "--agent", "buyer")
    assert e["spend_token"].startswith("est_") and (e["held"], e["remaining"]) == ("0.000000", "2.000000")

    h = cli_json("hold", e["spend_token"], "0.5", "--ttl", "120", "--agent", "seller")
    assert (h["status"], h["amount"], h["open"], h["escrow_remaining"]) == ("open", "0.500000", "0.500000", "1.500000")
    table = flat(cli("hold", e["id"], "0.25", "--agent", "buyer").stdout)
    assert "hold_" in table and "open" in table and "1.250000 USDC left to spend" in table
    rows = cli_json("holds", e["id"], "--agent", "buyer")
    assert len(rows) == 2 and {r["holder"] for r in rows} == {"seller", "buyer"}
    assert "open holds" in cli("holds", e["id"], "--agent", "seller").stdout
    buyer_hold = next(r["id"] for r in rows if r["holder"] == "buyer")

    r = cli_json("capture", h["id"], "0.2", "--agent", "seller", "--idempotency-key", "cli-cap")
    again = cli_json("capture", h["id"], "0.2", "--agent", "seller", "--idempotency-key", "cli-cap")
    assert (r["gross"], r["net"], r["hold"]["open"]) == ("0.200000", "0.198000", "0.300000") and again == r
    text = flat(cli("capture", h["id"], "0.1", "--final", "--agent", "seller").stdout)
    assert "capture receipt for" in text and "captured, 0.000000 open" in text and "remaining │ 1.450000" in text
    failed = json.loads(cli("capture", h["id"], "0.1", "--agent", "seller", "--json", code=2).stdout)
    assert failed["status"] == 409 and "is captured" in failed["message"]
    failed = cli("void", buyer_hold, "--agent", "seller", code=2)
    assert "(403 forbidden)" in failed.stderr
    v = cli_json("void", buyer_hold, "--agent", "buyer")
    assert (v["kind"], v["hold"]["status"], v["remaining"]) == ("void", "voided", "1.700000")

    minted = cli_json("tokens", "mint", e["id"], "--agent", "buyer")
    assert minted["spend_token"].startswith("est_")
    assert "revoked 2 spend tokens" in cli("tokens", "revoke", e["id"], "--agent", "buyer").stdout
    refused = cli("hold", minted["spend_token"], "0.1", "--agent", "seller", code=2)
    assert "(403 forbidden)" in refused.stderr and "revoked" in flat(refused.stderr)
    got = cli_json("get", e["id"], "--agent", "buyer")
    assert (got["paid"], got["held"], got["remaining"]) == ("0.300000", "0.000000", "1.700000")

    db = f"sqlite:///{tmp_path / 'server.db'}"
    ledger = Ledger(db)
    keys = {name: reg["api_key"] for name, reg in parties(ledger, "http-buyer", "http-seller").items()}
    with serve_app(create_app(ledger, sweep_interval_s=0, mcp=False)) as base:
        b = ("--url", base, "--api-key", keys["http-buyer"])
        s = ("--url", base, "--api-key", keys["http-seller"])
        e = cli_json("create", "http-seller", "1", *b)
        h = cli_json("hold", e["spend_token"], "0.4", *s)
        r = cli_json("capture", h["id"], "0.1", "--final", *s)
        assert (r["gross"], r["hold"]["status"], r["escrow"]["held"], r["remaining"]) == \
            ("0.100000", "captured", "0.000000", "0.900000")
        assert cli_json("holds", e["id"], *b) == []
        assert cli_json("tokens", "revoke", e["id"], *b)["revoked"] == 1
        assert json.loads(cli("tokens", "mint", e["id"], *s, "--json", code=2).stdout)["status"] == 403
    assert_audit_clean(ledger)
    ledger.close()


def test_bad_hold_arguments_raise_the_same_class_from_both_clients(live):
    ledger, keys, http, base = live
    escrow = ledger.create_escrow("buyer", "seller", "1")
    embedded = EscrowClient(EmbeddedTransport(ledger), agent="seller")
    with hf_escrow.connect(base, api_key=keys["seller"], max_retries=0) as over_http:
        for kwargs in ({"ttl_seconds": D("5")}, {"ttl_seconds": float("nan")}, {"ttl_seconds": None},
                       {"ttl_seconds": True}, {"ttl_seconds": "10"}, {"ttl_seconds": -1}):
            for client in (embedded, over_http):
                with pytest.raises(ValidationError):
                    client.hold(escrow["spend_token"], "0.1", **kwargs)
        for amount in (D("NaN"), None, True, float("inf"), [1]):
            for client in (embedded, over_http):
                with pytest.raises(InvalidAmount):
                    client.hold(escrow["id"], amount)
                with pytest.raises(InvalidAmount):
                    client.capture_many([("hold_x", amount)])
        for items in (None, "hold_x", [("hold_x",)], [{"hold_id": "hold_x", "amount": 1, "tip": 1}]):
            for client in (embedded, over_http):
                with pytest.raises(ValidationError):
                    client.capture_many(items)
    assert ledger.get("buyer", escrow["id"])["held_micro"] == 0
