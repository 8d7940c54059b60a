"""Group commit and batches: many operations in one transaction, each with its own outcome.

The committer is made to group for sure by holding a database lock from another
connection while callers queue: on SQLite the write lock, on PostgreSQL the escrow row.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from sqlalchemy import func, select

from hf_escrow import EscrowError
from hf_escrow._exceptions import IdempotencyConflict, InsufficientFunds, NotFound, StateConflict
from hf_escrow.ledger import Ledger
from hf_escrow.ledger.queries import ESCROW_FOR_UPDATE
from hf_escrow.ledger.schema import holds, transactions

from . import race_workers
from .helpers import assert_audit_clean, parties
from .holds_helpers import hold_snapshot
from .test_ledger_concurrency import _spawn

WAIT_S = 30


def _until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _grouped(ledger: Ledger, blocker_escrow: str, first, calls: list) -> list:
    """Run `first` (which touches `blocker_escrow`), then every call of `calls` while the
    first's transaction waits on a lock: they commit together in the next transaction.
    Returns each call's result or the EscrowError it raised, in order."""
    group = ledger._group
    outcomes: list = [None] * len(calls)

    def call(i: int, fn) -> None:
        try:
            outcomes[i] = fn()
        except EscrowError as error:
            outcomes[i] = error

    with ledger.engine.connect() as blocker:
        blocker.begin()
        blocker.execute(ESCROW_FOR_UPDATE, {"eid": blocker_escrow}).first()
        leader = threading.Thread(target=first)
        leader.start()
        _until(lambda: group._leading and not group._waiting, "the first transaction to start")
        before = group.transactions
        threads = [threading.Thread(target=call, args=(i, fn)) for i, fn in enumerate(calls)]
        for thread in threads:
            thread.start()
        _until(lambda: len(group._waiting) == len(calls), "every caller to queue")
        blocker.rollback()
    leader.join(WAIT_S)
    for thread in threads:
        thread.join(WAIT_S)
    assert group.transactions == before + 2, "the queued callers did not share one transaction"
    return outcomes


def test_group_committed_operations_that_fail_do_so_alone_and_move_nothing(ledger):
    parties(ledger, "buyer", "seller", "eve", fund="10")
    a = ledger.create_escrow("buyer", "seller", "1")
    b = ledger.create_escrow("buyer", "seller", "1")
    open_hold = ledger.hold("seller", b["spend_token"], "0.2")
    closed = ledger.hold("seller", b["spend_token"], "0.1")
    ledger.void("seller", closed["id"])
    ledger.deduct("seller", b["id"], "0.01", idempotency_key="used")
    before = hold_snapshot(ledger)

    calls = [
        lambda: ledger.deduct("seller", b["id"], "0.05"),                                     # ok
        lambda: ledger.deduct("seller", b["id"], "5"),                                        # insufficient
        lambda: ledger.capture("seller", open_hold["id"], "0.15", final=True),                # ok
        lambda: ledger.capture("seller", closed["id"], "0.01"),                               # wrong state
        lambda: ledger.deduct("seller", b["id"], "0.02", idempotency_key="used"),             # key conflict
        lambda: ledger.deduct("seller", b["id"], "0.01", idempotency_key="used"),             # replay
        lambda: ledger.hold("eve", b["id"], "0.01"),                                          # a stranger
        lambda: ledger.hold("seller", b["spend_token"], "0.3", idempotency_key="h1"),         # ok
        lambda: ledger.hold("seller", b["spend_token"], "0.3", idempotency_key="h1"),         # the same hold
    ]
    out = _grouped(ledger, a["id"], lambda: ledger.deduct("seller", a["id"], "0.1"), calls)

    assert [type(o).__name__ if isinstance(o, Exception) else "ok" for o in out] == [
        "ok", "InsufficientFunds", "ok", "StateConflict", "IdempotencyConflict", "ok", "NotFound", "ok", "ok"]
    assert isinstance(out[1], InsufficientFunds) and isinstance(out[3], StateConflict)
    assert isinstance(out[4], IdempotencyConflict) and isinstance(out[6], NotFound)
    assert out[7]["id"] == out[8]["id"]  # one hold, not two
    assert out[5]["gross_micro"] == 10_000 and out[5] == ledger.deduct("seller", b["id"], "0.01",
                                                                        idempotency_key="used")
    # Only the accepted ones moved: 0.05 + 0.15 captured from b, 0.1 from a; 0.05 freed; 0.3 held.
    view = ledger.get("buyer", b["id"])
    assert (view["paid_micro"], view["held_micro"]) == (10_000 + 50_000 + 150_000, 300_000)
    assert ledger.get("buyer", a["id"])["paid_micro"] == 100_000
    assert hold_snapshot(ledger) != before
    with ledger.engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(holds).where(holds.c.escrow_id == b["id"])) == 3
    assert_audit_clean(ledger)


def test_a_batch_sees_its_own_earlier_operations(ledger):
    """Operations on one escrow in one group are decided in order: the second finds what the first left."""
    parties(ledger, "buyer", "seller", fund="10")
    a = ledger.create_escrow("buyer", "seller", "1")
    b = ledger.create_escrow("buyer", "seller", "0.3")
    calls = [lambda: ledger.deduct("seller", b["id"], "0.2"), lambda: ledger.deduct("seller", b["id"], "0.2"),
             lambda: ledger.hold("seller", b["spend_token"], "0.1"), lambda: ledger.deduct("seller", b["id"], "0.01")]
    out = _grouped(ledger, a["id"], lambda: ledger.deduct("seller", a["id"], "0.1"), calls)
    kinds = sorted(type(o).__name__ if isinstance(o, Exception) else "ok" for o in out)
    # Whatever order they queued in, the escrow's 0.3 covers exactly what the serial order allows.
    view = ledger.get("buyer", b["id"])
    assert view["paid_micro"] + view["held_micro"] + view["remaining_micro"] == 300_000
    assert view["paid_micro"] + view["held_micro"] == sum(
        o["gross_micro"] if "gross_micro" in o else o["amount_micro"] for o in out if not isinstance(o, Exception))
    assert kinds.count("ok") >= 2 and set(kinds) <= {"ok", "InsufficientFunds"}
    assert_audit_clean(ledger)


def test_capture_many_on_one_escrow_is_one_transaction_of_linear_cost(ledger):
    parties(ledger, "buyer", "seller", fund="100")
    e = ledger.create_escrow("buyer", "seller", "50")
    ids = [ledger.hold("seller", e["spend_token"], "0.01")["id"] for _ in range(300)]
    with ledger.engine.connect() as conn:
        tx_before = conn.scalar(select(func.max(transactions.c.tx_id)))
    result = ledger.capture_many("seller", [(h, "0.004", True) for h in ids])
    assert all(r["ok"] for r in result["results"])
    # The receipts are each capture's own, in order: the remainder grows as holds free their rest.
    remaining = [r["receipt"]["remaining_micro"] for r in result["results"]]
    assert remaining == sorted(remaining) and remaining[-1] - remaining[0] == 299 * 6_000
    with ledger.engine.connect() as conn:
        assert conn.scalar(select(func.max(transactions.c.tx_id))) - tx_before == 300  # one journal tx each
    view = ledger.get("buyer", e["id"])
    assert (view["paid_micro"], view["held_micro"]) == (300 * 4_000, 0)
    assert_audit_clean(ledger)


def test_sigkill_during_group_commits_leaves_each_operation_whole(db_url):
    ledger = Ledger(db_url)
    parties(ledger, "buyer", "seller", fund="10")
    e = ledger.create_escrow("buyer", "seller", "5", ttl_seconds=600)

    def captured() -> int:
        with ledger.engine.connect() as conn:
            return conn.scalar(select(func.count()).select_from(holds).where(holds.c.status == "captured"))

    proc = _spawn().Process(target=race_workers.capture_in_groups_forever, args=(db_url, e["spend_token"], "seller"))
    proc.start()
    deadline = time.monotonic() + 60
    while captured() < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout=30)
    assert proc.exitcode == -signal.SIGKILL
    assert captured() >= 40, "the worker never captured before the kill"
    ledger.close()

    reopened = Ledger(db_url)
    assert_audit_clean(reopened)
    with reopened.engine.connect() as conn:
        rows = conn.execute(select(holds.c.status, holds.c.captured_micro, holds.c.captures)).all()
    # Every hold is whole: open and untouched, or captured once in full.
    assert {tuple(r) for r in rows} <= {("open", 0, 0), ("captured", 10, 1)}
    view = reopened.get("buyer", e["id"])
    assert view["paid_micro"] == 10 * sum(1 for r in rows if r.status == "captured")
    assert view["held_micro"] == 10 * sum(1 for r in rows if r.status == "open")
    reopened.close()


@pytest.mark.parametrize("count", [1, 2])
def test_a_replayed_batch_key_answers_from_the_first_batch(ledger, count):
    parties(ledger, "buyer", "seller", fund="10")
    e = ledger.create_escrow("buyer", "seller", "1")
    ids = [ledger.hold("seller", e["spend_token"], "0.01")["id"] for _ in range(count)]
    first = ledger.capture_many("seller", [(h, "0.01") for h in ids], idempotency_key="batch")
    again = ledger.capture_many("seller", [(h, "0.01") for h in ids], idempotency_key="batch")
    assert first == again and ledger.get("buyer", e["id"])["paid_micro"] == 10_000 * count
    assert_audit_clean(ledger)


def test_deduct_many_reports_a_bad_item_alone_and_replays_by_key(ledger):
    parties(ledger, "buyer", "seller", "eve", fund="10")
    a = ledger.create_escrow("buyer", "seller", "1")
    b = ledger.create_escrow("buyer", "seller", "0.1")
    items = [(a["id"], "0.2"), {"escrow_id": b["id"], "amount": "0.5"},        # too much: refused alone
             {"escrow_id": b["id"], "amount": "0.05", "idempotency_key": "k1", "usage": {"prompt_tokens": 7}},
             (a["id"], "0.3"), ("esc_nobody", "0.01")]
    first = ledger.deduct_many("seller", items, idempotency_key="batch")
    assert [r["ok"] for r in first["results"]] == [True, False, True, True, False]
    assert (first["results"][1]["error"], first["results"][4]["error"]) == ("insufficient_funds", "not_found")
    assert first["results"][3]["receipt"]["remaining_micro"] == 500_000  # each sees the ones before it
    assert ledger.deduct_many("seller", items, idempotency_key="batch") == first
    # An item's key is the key a single deduct would use.
    assert ledger.deduct("seller", b["id"], "0.05", usage={"prompt_tokens": 7}, idempotency_key="k1") == \
        first["results"][2]["receipt"]
    assert (ledger.get("buyer", a["id"])["paid_micro"], ledger.get("buyer", b["id"])["paid_micro"]) == \
        (500_000, 50_000)
    with pytest.raises(EscrowError, match="deduct 1"):
        ledger.deduct_many("seller", [(a["id"], "0.1"), (a["id"], "nan")])
    assert_audit_clean(ledger)


def test_a_caller_interrupted_while_waiting_withdraws_and_hands_on_the_lead(monkeypatch):
    """Ctrl-C in a waiting caller must neither apply its operation later nor leave the
    group without a leader: the next caller still commits."""
    from hf_escrow.ledger import group

    committed, in_commit, go = [], threading.Event(), threading.Event()

    def commit(ops):
        committed.append(list(ops))
        if ops == ["first"]:
            in_commit.set()
            go.wait(10)

    committer = group.GroupCommitter(commit)

    class _Interrupted:
        def acquire(self, *args):
            raise KeyboardInterrupt

    first = threading.Thread(target=committer.submit, args=("first",))
    first.start()
    assert in_commit.wait(10)
    real_slot = group._Slot
    monkeypatch.setattr(group, "_Slot", lambda op: _with_wake(real_slot(op), _Interrupted()))
    with pytest.raises(KeyboardInterrupt):
        committer.submit("interrupted")
    monkeypatch.setattr(group, "_Slot", real_slot)
    third = threading.Thread(target=committer.submit, args=("third",))
    third.start()
    _until(lambda: len(committer._waiting) == 1, "the third caller to queue")
    go.set()
    first.join(10)
    third.join(10)
    assert not first.is_alive() and not third.is_alive(), "the group lost its leader"
    assert committed == [["first"], ["third"]]


def _with_wake(slot, wake):
    slot.wake = wake
    return slot
