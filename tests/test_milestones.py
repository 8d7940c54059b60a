"""Milestone escrows on the ledger: shares paid as each milestone passes its verifier, never
skipped, never twice, the unpaid rest refunded at the TTL; on SQLite and PostgreSQL.

The MiniLM job that reaches milestones while it trains is in test_finetune_milestones.py.
"""

from __future__ import annotations

import multiprocessing
import time
from decimal import Decimal as D

import pytest

import hf_escrow
from hf_escrow.client import EmbeddedTransport, EscrowClient
from hf_escrow.money import milestone_amounts

from . import race_workers
from .helpers import assert_audit_clean, snapshot
from .liveserver import serve_app

ARTIFACT = {"repo": "/runs/esc/stages/step-00050", "revision": "abc123", "sha256": "ab" * 32}
MILESTONES = [{"threshold": 0.80, "share_bps": 3000}, {"threshold": 0.88, "share_bps": 4000},
              {"threshold": 0.92, "share": "rest"}]


def condition(milestones=None, **extra) -> dict:
    return {"type": "milestones", "metric": "accuracy", "milestones": MILESTONES if milestones is None else milestones,
            **extra}


@pytest.fixture
def market(ledger):
    referrer = ledger.register("referrer")
    for name in ("buyer", "auditor", "mallory"):
        ledger.register(name)
    ledger.register("seller", referral_code=referrer["referral_code"])
    ledger.deposit("buyer", "100")
    return ledger, {name: EscrowClient(EmbeddedTransport(ledger), agent=name)
                    for name in ("buyer", "seller", "auditor", "mallory")}


def checked(ledger, client, escrow_id: str, released=D(0)) -> hf_escrow.Escrow:
    """The escrow after a step: audit clean, amount == paid + refunded + held + remaining, and
    paid == what its milestones paid (+ what the buyer `released` itself)."""
    assert_audit_clean(ledger)
    e = client.get(escrow_id)
    assert e.amount == e.paid + e.refunded + e.held + e.remaining
    assert e.paid == sum(m.paid for m in e.milestones) + released
    assert sum(m.amount for m in e.milestones) <= e.amount
    return e


def submit(client, escrow_id, score=0.9, milestone=None, **kwargs):
    return client.submit_result(escrow_id, "accuracy", score, artifact=ARTIFACT, milestone=milestone, **kwargs)


def test_each_pass_pays_its_share_with_fee_and_referral_and_the_ttl_refunds_the_rest(market, clock):
    ledger, c = market
    e = c["buyer"].create_escrow("seller", "10", ttl_seconds=3600, release_condition=condition())
    assert e.verifier == "buyer" and [m.amount for m in e.milestones] == [3, 4, 3]
    assert [m.status for m in e.milestones] == ["open"] * 3

    r = submit(c["seller"], e.id, 0.81)
    assert (r.status, r.milestone, r.gross) == ("awaiting_verification", 1, 0)
    r = c["buyer"].verify(e.id, 0.80)   # exactly at the threshold passes
    assert (r.passed, r.milestone, r.status) == (True, 1, "active")
    assert (r.gross, r.fee, r.referral, r.net) == (D("3"), D("0.03"), D("0.0045"), D("2.97"))
    checked(ledger, c["buyer"], e.id)

    submit(c["seller"], e.id, 0.9, milestone=2)
    r = c["buyer"].verify(e.id, 0.87)   # below: pays nothing, milestone 2 stays open
    assert (r.passed, r.gross, r.status) == (False, 0, "active")
    e2 = checked(ledger, c["buyer"], e.id)
    assert [(m.status, m.failures) for m in e2.milestones] == [("paid", 0), ("open", 1), ("open", 0)]
    submit(c["seller"], e.id, 0.9, milestone=2)
    assert c["buyer"].verify(e.id, 0.885).gross == 4
    checked(ledger, c["buyer"], e.id)

    clock.advance(3601)                 # milestone 3 never reached: its share goes back at the TTL
    assert ledger.expire_due() == 1
    e = checked(ledger, c["buyer"], e.id)
    assert (e.status, e.paid, e.fees, e.refunded) == ("expired", D("7"), D("0.07"), D("3"))
    assert c["seller"].me().balance == D("6.93") and c["buyer"].me().balance == D("93")
    with pytest.raises(hf_escrow.StateConflict):
        submit(c["seller"], e.id, 0.95, milestone=3)


def test_shares_are_exact_for_any_amount_and_the_last_takes_the_remainder(market):
    ledger, c = market
    shares = [{"threshold": 0.1, "share_bps": 3333}, {"threshold": 0.2, "share_bps": 3333},
              {"threshold": 0.3, "share": "rest"}]
    e = c["buyer"].create_escrow("seller", "0.000007", release_condition=condition(shares))
    assert [int(m.amount * 10**6) for m in e.milestones] == milestone_amounts(7, [3333, 3333, 3334]) == [2, 3, 2]
    for number, score in ((1, 0.1), (2, 0.2), (3, 0.3)):
        submit(c["seller"], e.id, score, milestone=number)
        c["buyer"].verify(e.id, score)
        checked(ledger, c["buyer"], e.id)
    e = c["buyer"].get(e.id)
    assert (e.status, e.paid, e.refunded, e.remaining) == ("released", D("0.000007"), 0, 0)

    # Shares under 100% without a rest: the last pass closes the escrow and refunds what no milestone claims.
    partial = c["buyer"].create_escrow("seller", "1", release_condition=condition(
        [{"threshold": 0.5, "share_bps": 2500}, {"threshold": 0.6, "share_bps": 2500}]))
    for number in (1, 2):
        submit(c["seller"], partial.id, 0.7, milestone=number)
        r = c["buyer"].verify(partial.id, 0.7)
    assert (r.status, r.gross, r.refunded) == ("released", D("0.25"), D("0.5"))
    checked(ledger, c["buyer"], partial.id)

    # Lower is better (a loss): thresholds fall in order.
    loss = c["buyer"].create_escrow("seller", "1", release_condition=condition(
        [{"threshold": 0.5, "share_bps": 5000}, {"threshold": 0.2, "share": "rest"}], higher_is_better=False))
    c["seller"].submit_result(loss.id, "accuracy", 0.4, artifact=ARTIFACT)
    assert c["buyer"].verify(loss.id, 0.45).gross == D("0.5")
    checked(ledger, c["buyer"], loss.id)


BAD_CONDITIONS = [
    (condition([{"threshold": 0.8, "share_bps": 6000}, {"threshold": 0.9, "share_bps": 5000}]), "over 10000"),
    (condition([{"threshold": 0.9, "share_bps": 3000}, {"threshold": 0.8, "share_bps": 3000}]), "must be above"),
    (condition([{"threshold": 0.8, "share_bps": 3000}, {"threshold": 0.8, "share_bps": 3000}]), "must be above"),
    (condition([]), "non-empty list"),
    (condition([{"threshold": 0.8, "share_bps": 30.5}]), "whole number of basis points"),
    (condition([{"threshold": 0.8, "share_bps": "3000"}]), "whole number of basis points"),
    (condition([{"threshold": 0.8, "share_bps": True}]), "whole number of basis points"),
    (condition([{"threshold": 0.8, "share_bps": 0}]), "whole number of basis points"),
    (condition([{"threshold": 0.8}]), "whole number of basis points"),
    (condition([{"threshold": 0.8, "share": "rest"}, {"threshold": 0.9, "share_bps": 10}]), "last milestone only"),
    (condition([{"threshold": float("nan"), "share_bps": 10}]), "finite"),
    (condition([{"share_bps": 10}]), "threshold must be a number"),
    (condition([{"threshold": 0.8, "share_bps": 10, "bonus": 1}]), "milestone 1 must be"),
    (condition(verifier="self"), "not \"self\""),
    (condition(verifier="seller"), "cannot verify its own"),
    ({"type": "milestones", "milestones": MILESTONES}, "metric"),
    (condition(MILESTONES * 7), "at most 20"),
]


def test_bad_milestone_conditions_are_refused_and_nothing_moves(market):
    ledger, c = market
    before = snapshot(ledger)
    for bad, message in BAD_CONDITIONS:
        with pytest.raises(hf_escrow.ValidationError, match=message):
            c["buyer"].create_escrow("seller", "10", release_condition=bad)
    with pytest.raises(hf_escrow.ValidationError, match="rounds to nothing"):
        c["buyer"].create_escrow("seller", "0.000002", release_condition=condition())
    assert snapshot(ledger) == before


def test_no_milestone_is_skipped_paid_twice_or_verified_by_the_seller(market):
    ledger, c = market
    e = c["buyer"].create_escrow("seller", "10", release_condition=condition(verifier="auditor"))
    assert e.verifier == "auditor"
    before = snapshot(ledger)
    refused = [
        (hf_escrow.StateConflict, "before milestone 1", lambda: submit(c["seller"], e.id, 0.95, milestone=2)),
        (hf_escrow.ValidationError, "no milestone 4", lambda: submit(c["seller"], e.id, 0.95, milestone=4)),
        (hf_escrow.ValidationError, "milestone must be", lambda: submit(c["seller"], e.id, 0.95, milestone=0)),
        (hf_escrow.ValidationError, "does not reach milestone 1", lambda: submit(c["seller"], e.id, 0.79)),
        (hf_escrow.ValidationError, "needs its artifact", lambda: c["seller"].submit_result(e.id, "accuracy", 0.9)),
        (hf_escrow.ValidationError, "needs its artifact", lambda: c["seller"].submit_result(
            e.id, "accuracy", 0.9, artifact=dict(ARTIFACT, sha256="not-a-hash"))),
        (hf_escrow.Forbidden, "only the seller", lambda: submit(c["buyer"], e.id, 0.9)),
        (hf_escrow.NotFound, "not found", lambda: submit(c["mallory"], e.id, 0.9)),
        (hf_escrow.StateConflict, "by deduct", lambda: c["seller"].deduct(e.id, "1")),
    ]
    for error, message, attempt in refused:
        with pytest.raises(error, match=message):
            attempt()
    assert snapshot(ledger) == before

    submit(c["seller"], e.id, 0.85, idempotency_key="m1")
    assert submit(c["seller"], e.id, 0.85, idempotency_key="m1").milestone == 1   # a replay, nothing new
    with pytest.raises(hf_escrow.StateConflict, match="awaiting_verification"):
        submit(c["seller"], e.id, 0.9, milestone=2)           # one result at a time
    for agent in ("seller", "buyer"):                         # only the named verifier judges
        with pytest.raises(hf_escrow.Forbidden, match="verifier"):
            c[agent].verify(e.id, 0.99)
    paid = c["auditor"].verify(e.id, 0.85, idempotency_key="v1")
    assert paid.gross == 3 and c["auditor"].verify(e.id, 0.85, idempotency_key="v1").gross == 3  # replayed
    with pytest.raises(hf_escrow.StateConflict):
        c["auditor"].verify(e.id, 0.85, idempotency_key="v2")  # nothing awaits: not paid twice
    with pytest.raises(hf_escrow.StateConflict, match="already been paid"):
        submit(c["seller"], e.id, 0.99, milestone=1)
    with pytest.raises(hf_escrow.IdempotencyConflict):
        submit(c["seller"], e.id, 0.9, milestone=2, idempotency_key="m1")
    e = checked(ledger, c["buyer"], e.id)
    assert e.paid == 3 and [m.status for m in e.milestones] == ["paid", "open", "open"]

    # The buyer's own release still works (and the rest milestone pays what is left then).
    c["buyer"].release(e.id, "1", refund_remainder=False)
    submit(c["seller"], e.id, 0.9)
    assert c["auditor"].verify(e.id, 0.9).gross == 4
    submit(c["seller"], e.id, 0.93)
    last = c["auditor"].verify(e.id, 0.93)
    assert (last.gross, last.status) == (2, "released")
    checked(ledger, c["buyer"], e.id, released=D(1))


def test_a_single_threshold_escrow_refuses_a_milestone_number(market):
    ledger, c = market
    e = c["buyer"].create_escrow("seller", "1", release_condition={"metric": "accuracy", "threshold": 0.5,
                                                                   "verifier": "buyer"})
    with pytest.raises(hf_escrow.ValidationError, match="leave milestone out"):
        submit(c["seller"], e.id, 0.9, milestone=1)
    assert c["buyer"].get(e.id).milestones is None


@pytest.mark.slow
def test_processes_racing_to_submit_and_verify_the_same_milestone_pay_it_once(market, db_url):
    ledger, c = market
    ids = [c["buyer"].create_escrow("seller", "1", release_condition=condition()).id for _ in range(6)]
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        start_at = time.time() + 4  # after every worker has started and imported
        results = pool.starmap(race_workers.milestone_race, [(db_url, ids, "buyer", "seller", ARTIFACT, start_at)] * 4)
    submitted = [eid for r in results for eid in r["submitted"]]
    verified = [v for r in results for v in r["verified"]]
    assert sorted(submitted) == sorted(ids) and sorted(eid for eid, _ in verified) == sorted(ids)
    assert all(gross == 300_000 for _, gross in verified)
    for eid in ids:
        e = checked(ledger, c["buyer"], eid)
        assert e.paid == D("0.3") and [m.status for m in e.milestones] == ["paid", "open", "open"]


def test_milestones_over_http(tmp_path):
    """The same rules through `hf-escrow serve`: the HTTP client sends the milestone number."""
    from hf_escrow.ledger import Ledger, LedgerConfig
    from hf_escrow.server.app import create_app
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}", config=LedgerConfig())
    keys = {name: ledger.register(name)["api_key"] for name in ("buyer", "seller")}
    ledger.deposit("buyer", "10")
    with serve_app(create_app(ledger, sweep_interval_s=0, mcp=False)) as url:
        buyer, seller = (hf_escrow.connect(url, api_key=keys[n]) for n in ("buyer", "seller"))
        e = buyer.create_escrow("seller", "5", release_condition=condition())
        assert [m.amount for m in e.milestones] == [D("1.5"), 2, D("1.5")]
        with pytest.raises(hf_escrow.StateConflict, match="before milestone 1"):
            submit(seller, e.id, 0.9, milestone=2)
        assert submit(seller, e.id, 0.9, milestone=1).milestone == 1
        with pytest.raises(hf_escrow.Forbidden):
            seller.verify(e.id, 0.99)
        r = buyer.verify(e.id, 0.9)
        assert (r.passed, r.milestone, r.gross, r.net) == (True, 1, D("1.5"), D("1.485"))
        with pytest.raises(hf_escrow.ValidationError, match="over 10000"):
            buyer.create_escrow("seller", "5", release_condition=condition(
                [{"threshold": 0.8, "share_bps": 9000}, {"threshold": 0.9, "share_bps": 2000}]))
        assert [m.status for m in buyer.get(e.id).milestones] == ["paid", "open", "open"]
    assert_audit_clean(ledger)
    ledger.close()
