"""Many processes on one ledger: no double spend, no lost update, no half-applied transfer."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections import Counter

import pytest
from sqlalchemy import func, select

from hf_escrow.ledger import Ledger
from hf_escrow.ledger.schema import escrow_events, transactions

from . import race_workers
from .helpers import assert_audit_clean, parties

pytestmark = pytest.mark.slow
PROCESSES = 8


def _spawn():
    return multiprocessing.get_context("spawn")


def test_eight_processes_race_on_the_same_escrows(db_url):
    ledger = Ledger(db_url)
    parties(ledger, "buyer", "seller", fund="10")
    # Short TTLs on some escrows, so that expiry races with deducts and releases too. A cancel
    # or a refunding release closes an escrow after about eight operations on it: 24 escrows
    # leave enough open work for the race to mean something however slowly the workers start.
    escrow_ids = [ledger.create_escrow("buyer", "seller", "0.000300", ttl_seconds=2 if i % 3 == 0 else 600)["id"]
                  for i in range(24)]
    with _spawn().Pool(PROCESSES) as pool:
        results = pool.starmap(race_workers.race,
                               [(db_url, seed, escrow_ids, "buyer", "seller", 120) for seed in range(PROCESSES)])
    done = [row for rows in results for row in rows]
    assert len(done) > 50, "the race did too little to show anything"

    # A shared idempotency key took effect once however many processes sent it.
    shared = [row for row in done if row[0] == "shared_deduct"]
    assert shared, "no process got to a shared-key deduct"
    for escrow_id in escrow_ids:
        view = ledger.get("buyer", escrow_id)
        effective_keys = {key for op, eid, _, key in shared if eid == escrow_id}
        paid_by_workers = (sum(g for op, eid, g, _ in done if eid == escrow_id and op != "shared_deduct")
                           + 7 * len(effective_keys))
        assert view["paid_micro"] == paid_by_workers, "a lost update or a double spend"
        assert view["amount_micro"] == view["paid_micro"] + view["refunded_micro"] + view["remaining_micro"]
        closing = [e for e in view["events"] if e["kind"] in ("cancelled", "expired")
                   or (e["kind"] == "released" and e["data"].get("refunded_micro", 0) > 0)]
        assert len(closing) <= 1, f"escrow {escrow_id} closed twice: {closing}"
    report = assert_audit_clean(ledger)
    assert report["agent_balances_micro"] + report["escrow_holdings_micro"] + report["platform_fees_micro"] \
        == report["minted_micro"]
    ledger.close()


@pytest.mark.parametrize("kill_after_s", [0.7, 1.5])
def test_sigkill_in_the_middle_of_settlements_leaves_no_half_transfer(db_url, kill_after_s):
    ledger = Ledger(db_url)
    parties(ledger, "buyer", "seller", fund="10")
    escrow_ids = [ledger.create_escrow("buyer", "seller", "0.5", ttl_seconds=600)["id"] for _ in range(4)]
    before = _tx_count(ledger)
    proc = _spawn().Process(target=race_workers.settle_forever, args=(db_url, escrow_ids, "buyer", "seller"))
    proc.start()
    deadline = time.monotonic() + 60
    while _tx_count(ledger) < before + 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(kill_after_s)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout=30)
    assert proc.exitcode == -signal.SIGKILL
    assert _tx_count(ledger) >= before + 20, "the worker never settled anything before the kill"
    ledger.close()

    reopened = Ledger(db_url)  # as after a restart
    assert_audit_clean(reopened)
    for escrow_id in escrow_ids:
        view = reopened.get("buyer", escrow_id)
        assert view["amount_micro"] == view["paid_micro"] + view["refunded_micro"] + view["remaining_micro"]
    # The ledger keeps working after the crash.
    reopened.deduct("seller", escrow_ids[0], "0.000001")
    assert_audit_clean(reopened)
    reopened.close()


def test_two_sweepers_refund_every_expired_escrow_exactly_once(db_url):
    ledger = Ledger(db_url)
    parties(ledger, "buyer", "seller", fund="10")
    count = 120
    escrow_ids = [ledger.create_escrow("buyer", "seller", "0.01", ttl_seconds=1)["id"] for _ in range(count)]
    balance_after_lock = ledger.me("buyer")["balance_micro"]
    time.sleep(1.2)
    with _spawn().Pool(2) as pool:
        per_sweeper = pool.starmap(race_workers.sweep, [(db_url, 20), (db_url, 20)])
    assert sum(per_sweeper) == count
    with ledger.engine.connect() as conn:
        expired_events = Counter(conn.scalars(select(escrow_events.c.escrow_id)
                                              .where(escrow_events.c.kind == "expired")))
        refunds = Counter(conn.scalars(select(transactions.c.escrow_id).where(transactions.c.kind == "refund")))
    assert set(expired_events) == set(escrow_ids) and set(expired_events.values()) == {1}
    assert set(refunds) == set(escrow_ids) and set(refunds.values()) == {1}
    assert ledger.me("buyer")["balance_micro"] == balance_after_lock + count * 10_000
    assert_audit_clean(ledger)
    ledger.close()


def _tx_count(ledger: Ledger) -> int:
    with ledger.engine.connect() as conn:
        return conn.scalar(select(func.count()).select_from(transactions))
