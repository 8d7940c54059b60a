"""Group commit over HTTP: concurrent settlement requests to one server share transactions,
and one refused request in a group answers alone, exactly as it would on its own.

The group is made for sure as in tests/test_ledger_group_commit.py: another connection
holds a lock (SQLite's write lock, PostgreSQL's escrow row) while the first request's
transaction waits on it, and every other request queues behind it meanwhile.
"""

from __future__ import annotations

import threading

import httpx

from hf_escrow.ledger import Ledger
from hf_escrow.ledger.queries import ESCROW_FOR_UPDATE
from hf_escrow.server import create_app

from .helpers import assert_audit_clean, parties
from .liveserver import serve_app
from .test_ledger_group_commit import WAIT_S, _until

REQUESTS = 12


def _post(base: str, key: str, path: str, body: dict | None = None) -> httpx.Response:
    with httpx.Client(base_url=base, timeout=WAIT_S) as http:
        return http.post(path, json=body, headers={"Authorization": f"Bearer {key}"})


def test_concurrent_http_settlements_share_transactions_and_fail_alone(db_url):
    ledger = Ledger(db_url)
    keys = {name: reg["api_key"] for name, reg in parties(ledger, "buyer", "seller", fund="10").items()}
    a = ledger.create_escrow("buyer", "seller", "1")
    b = ledger.create_escrow("buyer", "seller", "5")
    holds = [ledger.hold("seller", b["spend_token"], "0.1")["id"] for _ in range(REQUESTS)]
    voided = ledger.hold("seller", b["spend_token"], "0.1")["id"]
    ledger.void("seller", voided)
    group = ledger._group
    seller = keys["seller"]
    # Every hold captured, a deduct and a hold by token beside them; one capture of a voided hold, refused.
    requests = [(f"/api/holds/{h}/capture", {"amount_usdc": "0.05", "final": True}) for h in holds]
    requests += [(f"/api/escrow/{b['id']}/deduct", {"amount_usdc": "0.01"}),
                 ("/api/holds", {"spend_token": b["spend_token"], "amount_usdc": "0.2"}),
                 (f"/api/holds/{voided}/capture", {"amount_usdc": "0.01"})]
    answers: list = [None] * len(requests)

    def send(i: int) -> None:
        answers[i] = _post(base, seller, *requests[i])

    with serve_app(create_app(ledger, sweep_interval_s=0, mcp=False)) as base:
        with ledger.engine.connect() as blocker:
            blocker.begin()
            blocker.execute(ESCROW_FOR_UPDATE, {"eid": a["id"]}).first()
            first = threading.Thread(target=lambda: answers.append(
                _post(base, seller, f"/api/escrow/{a['id']}/deduct", {"amount_usdc": "0.1"})))
            first.start()
            _until(lambda: group._leading and not group._waiting, "the first request's transaction to start")
            before = group.transactions
            threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
            for thread in threads:
                thread.start()
            _until(lambda: len(group._waiting) == len(requests), "every request to queue")
            blocker.rollback()
        first.join(WAIT_S)
        for thread in threads:
            thread.join(WAIT_S)
        assert group.transactions == before + 2, "the queued requests did not share one transaction"

        statuses = [r.status_code for r in answers]
        assert statuses == [200] * REQUESTS + [200, 201, 409, 200]
        assert all(r.json()["gross_micro"] == 50_000 for r in answers[:REQUESTS])
        assert answers[REQUESTS + 1].json()["amount_micro"] == 200_000
        # The refused one answers as the same request alone does, word for word.
        alone = _post(base, seller, *requests[-1])
        assert (alone.status_code, alone.json()) == (409, answers[REQUESTS + 2].json())
        assert alone.json()["error"] == "state_conflict"
    view = ledger.get("buyer", b["id"])
    assert (view["paid_micro"], view["held_micro"]) == (REQUESTS * 50_000 + 10_000, 200_000)
    assert ledger.get("buyer", a["id"])["paid_micro"] == 100_000
    assert_audit_clean(ledger)
    ledger.close()


def test_an_event_loops_callers_are_bounded_withdraw_when_cancelled_and_are_led_by_the_committer():
    """`settle_async`: beyond the queue's bound it is refused at once; a caller cancelled
    before a commit took its operation withdraws it; the rest commit with no thread of their own."""
    import asyncio

    import pytest

    from hf_escrow._exceptions import RateLimited
    from hf_escrow.ledger.group import GroupCommitter

    committed, in_commit, go = [], threading.Event(), threading.Event()

    def commit(ops):
        committed.append(list(ops))
        if ops == ["first"]:
            in_commit.set()
            go.wait(WAIT_S)

    committer = GroupCommitter(commit, max_waiting=2)
    first = threading.Thread(target=committer.submit, args=("first",))
    first.start()
    assert in_commit.wait(WAIT_S)

    async def run() -> None:
        kept = asyncio.ensure_future(committer.settle_async("kept"))
        cancelled = asyncio.ensure_future(committer.settle_async("cancelled"))
        while len(committer._waiting) < 2:
            await asyncio.sleep(0.005)
        with pytest.raises(RateLimited):
            await committer.settle_async("one too many")
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert [slot.op for slot in committer._waiting] == ["kept"]
        go.set()
        await asyncio.wait_for(kept, WAIT_S)

    asyncio.run(run())
    first.join(WAIT_S)
    assert committed == [["first"], ["kept"]]
    assert (committer.transactions, committer.operations) == (2, 2)
