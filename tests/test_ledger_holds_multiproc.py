"""Several OS processes hold and capture on one escrow that covers only part of what they ask.

The escrow's row lock is all that stands between them: at no moment may what was captured
plus what is held exceed the escrow, every capture a process was told succeeded must be in
the journal exactly once (a capture sent by every process under one key, once in all), and
when the last hold has expired the audit is clean and the buyer has the rest back.
"""

from __future__ import annotations

import multiprocessing
import time
from collections import Counter, defaultdict

import pytest
from sqlalchemy import func, select

from hf_escrow.ledger import Ledger
from hf_escrow.ledger.schema import entries, holds, transactions
from hf_escrow.money import parse_usdc

from . import race_workers
from .helpers import assert_audit_clean, parties

pytestmark = pytest.mark.slow
PROCESSES = 6
OPS_PER_PROCESS = 30
ESCROW = "0.02"          # the processes ask for about ten times as much
POLL_S = 0.05
RACE_TIMEOUT_S = 240


def test_processes_racing_for_one_escrow_never_capture_or_hold_more_than_it_has(db_url):
    ledger = Ledger(db_url)
    parties(ledger, "buyer", "seller", fund="1")
    e = ledger.create_escrow("buyer", "seller", ESCROW, ttl_seconds=3600)
    amount = parse_usdc(ESCROW)
    buyer_after_lock = ledger.me("buyer")["balance_micro"]

    with multiprocessing.get_context("spawn").Pool(PROCESSES) as pool:
        pending = pool.starmap_async(race_workers.hold_and_capture, [
            (db_url, seed, e["spend_token"], e["id"], "buyer", "seller", OPS_PER_PROCESS)
            for seed in range(PROCESSES)])
        peak = _watch(ledger, e["id"], amount, pending)
        results = pending.get(timeout=RACE_TIMEOUT_S)

    unique = _unique_captures(results)
    assert len(unique) > 20, "the race did too little to show anything"
    assert sum(r["refused"] for r in results) > 20, "the escrow was never too small: no race for its remainder"
    assert peak > amount // 2, "the processes never held or paid most of the escrow at once"

    _wait_for_every_hold_to_end(ledger)
    view = ledger.get("buyer", e["id"])
    paid = sum(gross for _, gross in unique.values())
    assert (view["paid_micro"], view["held_micro"]) == (paid, 0)
    assert view["amount_micro"] == view["paid_micro"] + view["refunded_micro"] + view["remaining_micro"]

    per_hold = defaultdict(int)
    for hold_id, gross in unique.values():
        per_hold[hold_id] += gross
    with ledger.engine.connect() as conn:
        stored = dict(conn.execute(select(holds.c.hold_id, holds.c.captured_micro)
                                   .where(holds.c.escrow_id == e["id"])).all())
        capture_txs = conn.scalar(select(func.count()).select_from(transactions).where(
            transactions.c.escrow_id == e["id"], transactions.c.kind == "capture"))
        paid_out = -conn.scalar(select(func.sum(entries.c.amount_micro)).select_from(
            entries.join(transactions, transactions.c.tx_id == entries.c.tx_id)).where(
            transactions.c.escrow_id == e["id"], transactions.c.kind == "capture", entries.c.role == "payout"))
    assert capture_txs == len(unique), "a capture a process was told of is missing from the journal, or is twice"
    assert paid_out == paid
    assert {hold_id: micro for hold_id, micro in stored.items() if micro} == dict(per_hold)
    assert_audit_clean(ledger)
    # Nothing held, nothing spendable is lost: what was not paid can still be paid or refunded.
    ledger.cancel("buyer", e["id"])
    assert ledger.me("buyer")["balance_micro"] == buyer_after_lock + amount - paid
    assert_audit_clean(ledger)
    ledger.close()


def _watch(ledger: Ledger, escrow_id: str, amount: int, pending) -> int:
    """While the workers run: paid + held never above the escrow. Returns the highest seen."""
    peak = 0
    deadline = time.monotonic() + RACE_TIMEOUT_S
    while not pending.ready() and time.monotonic() < deadline:
        view = ledger.get("buyer", escrow_id)  # the ledger checks amount == paid + refunded + held + remaining
        committed = view["paid_micro"] + view["held_micro"]
        assert committed <= amount and view["remaining_micro"] >= 0, view
        peak = max(peak, committed)
        time.sleep(POLL_S)
    return peak


def _unique_captures(results: list[dict]) -> dict:
    """Each capture once: keyed ones by their key (every process that sent it was told of it)."""
    unique: dict = {}
    seen = Counter()
    for result in results:
        for hold_id, gross, key in result["captured"]:
            if key is None:
                seen["unkeyed"] += 1
                unique[("unkeyed", seen["unkeyed"])] = (hold_id, gross)
            else:
                assert unique.setdefault(key, (hold_id, gross)) == (hold_id, gross), "one key, two answers"
    return unique


def _wait_for_every_hold_to_end(ledger: Ledger) -> None:
    """Sleep past the last open hold's TTL (each lasts at most a few seconds), then sweep."""
    with ledger.engine.connect() as conn:
        last_ms = conn.scalar(select(func.max(holds.c.expires_at_ms)).where(holds.c.status == "open"))
    if last_ms is not None:
        time.sleep(max(0.0, last_ms / 1000 - time.time()) + 0.05)
    ledger.expire_due()
    with ledger.engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(holds).where(holds.c.status == "open")) == 0
