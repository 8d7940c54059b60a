"""AutoPay on a budgeted key: the key's mandate, the ledger's refusals, and buyer processes
that each run their own AutoPay on one key never locking more than its budget together.

A person hands sub-agents one budgeted key; each AutoPay counts only its own escrows, so the
guarantee across processes is the ledger's: the key's budget is checked in the escrow's
own transaction. The face is the shard server (one charge per shard) on 127.0.0.1.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from decimal import Decimal as D

import httpx
import pytest

import hf_escrow
from hf_escrow import BudgetExceeded, Declined, KeyInactive, OutsideMandate
from hf_escrow.autopay import AutoPay, Mandate
from hf_escrow.ledger import Ledger
from hf_escrow.shardserver import create_shard_app

from . import race_workers
from .helpers import assert_audit_clean, parties
from .holds_helpers import hold_snapshot
from .liveserver import serve_app
from .test_budgeted_keys import assert_keys_add_up
from .test_datasets import write_shards

SHARD_PRICE = "0.002"
SHARD_PRICE_MICRO = 2_000
PROCESSES = 2
KEY_BUDGET_MICRO = 50_000
RACE_TIMEOUT_S = 180


def _shard_face(tmp_path, seller: hf_escrow.EscrowClient, shards: int, name: str = "shards"):
    folder = tmp_path / name
    write_shards(folder, shards=shards, rows=2)
    return (serve_app(create_shard_app(folder, escrow=seller, price_per_shard=SHARD_PRICE)),
            sorted(p.name for p in folder.glob("*.parquet")))


@pytest.fixture
def keyed(tmp_path):
    """An owner with 5 USDC, two sellers each behind a shard server, and an owner's client."""
    db = f"sqlite:///{tmp_path / 'l.db'}"
    ledger = Ledger(db)
    registered = parties(ledger, "owner", "seller", "other", fund="5")
    clients = {name: hf_escrow.connect(agent=name, database_url=db) for name in ("owner", "seller", "other")}
    face, names = _shard_face(tmp_path, clients["seller"], 12)
    other_face, other_names = _shard_face(tmp_path, clients["other"], 2, "other")
    with face as url, other_face as other_url:
        yield {"db": db, "ledger": ledger, "url": url, "names": names, "other_url": f"{other_url}/{other_names[0]}",
               "api_keys": {name: r["api_key"] for name, r in registered.items()}, **clients}
    assert_audit_clean(ledger)
    assert_keys_add_up(ledger)
    ledger.close()


def test_from_key_takes_the_keys_mandate_and_its_spent_budget_raises(keyed):
    ledger, owner = keyed["ledger"], keyed["owner"]
    start = ledger.me("owner")["balance_micro"]
    key = owner.create_key(budget="0.01", sellers=["seller"], max_escrow="0.004", expires_in=600)
    agent = hf_escrow.connect(database_url=keyed["db"], api_key=key.api_key)
    pay = AutoPay.from_key(agent)
    assert pay.mandate == Mandate(budget_micro=10_000, sellers=frozenset({"seller"}), max_escrow_micro=4_000,
                                  expires_at=key.expires_at.timestamp())
    with pay, httpx.Client(auth=pay.auth, timeout=30) as http:
        for name in keyed["names"][:5]:
            assert http.get(f"{keyed['url']}/{name}").status_code == 200
        with pytest.raises(BudgetExceeded) as spent:     # raised, not a 402: the money stopped the work
            http.get(f"{keyed['url']}/{keyed['names'][5]}")
        assert spent.value.details["left_micro"] == 0
        # A face outside the key's sellers: AutoPay's own mandate declines, the face's 402 comes back.
        answer = http.get(keyed["other_url"])
        assert answer.status_code == 402 and answer.json()["seller"] == "other"
        with pytest.raises(Declined):
            pay.headers_for(keyed["other_url"])
    amounts = [agent.get(i).amount for i in pay.escrow_ids]
    assert amounts == [D("0.004"), D("0.004"), D("0.002")]      # capped by max_escrow, then by what was left
    view = owner.mandate(key.key_id)
    assert (view.paid, view.in_escrow, view.left, view.escrows_open) == (D("0.01"), 0, 0, 0)
    assert ledger.me("owner")["balance_micro"] == start - 5 * SHARD_PRICE_MICRO


def test_the_ledgers_refusals_reach_the_caller_as_they_came(keyed):
    """AutoPay's mandate allows what the key's does not: the ledger refuses, nothing moves."""
    ledger, owner = keyed["ledger"], keyed["owner"]
    start = ledger.me("owner")["balance_micro"]
    key = owner.create_key(budget="0.05", sellers=["seller"])
    agent = hf_escrow.connect(database_url=keyed["db"], api_key=key.api_key)
    with AutoPay(agent, budget="0.05") as pay, httpx.Client(auth=pay.auth, timeout=30) as http:
        before = hold_snapshot(ledger)
        with pytest.raises(OutsideMandate, match="may not pay 'other'"):
            http.get(keyed["other_url"])
        assert hold_snapshot(ledger) == before and pay.locked_micro == 0 and pay.escrow_ids == []
        assert http.get(f"{keyed['url']}/{keyed['names'][0]}").status_code == 200
        revoked = owner.revoke_key(key.key_id, cancel_escrows=True)     # the human stops it mid-run
        assert revoked.cancelled == pay.escrow_ids
        with pytest.raises(KeyInactive, match="revoked"):
            http.get(f"{keyed['url']}/{keyed['names'][1]}")
    # close() left the revoked key's escrows to the owner, who had them cancelled already.
    assert ledger.me("owner")["balance_micro"] == start - SHARD_PRICE_MICRO


def _shrinks_to_what_the_key_has_left(owner, connect_key, shard_url: str, names: list[str]) -> None:
    """Another holder of the key spent most of it: the next escrow is what is left, if that pays a call."""
    key = owner.create_key(budget="0.01")
    first, second = connect_key(key.api_key), connect_key(key.api_key)
    other_process = first.create_escrow("seller", "0.007")
    assert AutoPay.from_key(second).mandate.budget_micro == 3_000     # read after the other holder locked
    with AutoPay(second, budget="0.01") as pay, httpx.Client(auth=pay.auth, timeout=30) as http:   # read before
        assert http.get(f"{shard_url}/{names[0]}").status_code == 200
        assert [second.get(i).amount for i in pay.escrow_ids] == [D("0.003")]
        with pytest.raises(BudgetExceeded, match="budget left") as spent:   # the ledger's own words
            http.get(f"{shard_url}/{names[1]}")
        assert spent.value.details["left_micro"] == 1_000
    first.cancel(other_process.id)
    assert owner.mandate(key.key_id).left == D("0.008")


def test_autopay_shrinks_an_escrow_to_what_the_key_has_left(keyed):
    _shrinks_to_what_the_key_has_left(keyed["owner"], lambda api_key: hf_escrow.connect(
        database_url=keyed["db"], api_key=api_key), keyed["url"], keyed["names"])


def test_autopay_on_a_key_over_http(keyed, tmp_path):
    """The same against an escrow server: the key's mandate and the ledger's refusal travel over HTTP."""
    from hf_escrow.server import create_app
    with serve_app(create_app(keyed["ledger"], sweep_interval_s=0)) as escrow_url:
        owner, seller = (hf_escrow.connect(escrow_url, api_key=keyed["api_keys"][name]) for name in ("owner", "seller"))
        face, names = _shard_face(tmp_path, seller, 4, "over-http")
        with face as shard_url:
            _shrinks_to_what_the_key_has_left(owner, lambda api_key: hf_escrow.connect(escrow_url, api_key=api_key),
                                              shard_url, names)
        owner.close()
        seller.close()


def _key_locked_micro(ledger: Ledger, key_id: str) -> int:
    view = ledger.key("owner", key_id)
    return view["locked_micro"] - view["refunded_micro"]


@pytest.mark.slow
def test_buyer_processes_with_their_own_autopay_on_one_key_never_lock_more_than_its_budget(db_url, tmp_path):
    ledger = Ledger(db_url)
    parties(ledger, "owner", "seller", fund="5")
    key = ledger.create_key("owner", budget="0.05")
    start = ledger.me("owner")["balance_micro"]
    seller = hf_escrow.connect(agent="seller", database_url=db_url)
    face, names = _shard_face(tmp_path, seller, 64)
    peak, stop = [0], threading.Event()

    def watch() -> None:   # the ledger's view while the processes spend, bounded in time
        deadline = time.monotonic() + RACE_TIMEOUT_S
        while not stop.is_set() and time.monotonic() < deadline:
            peak[0] = max(peak[0], _key_locked_micro(ledger, key["key_id"]),
                          start - ledger.me("owner")["balance_micro"])
            time.sleep(0.005)

    context = multiprocessing.get_context("spawn")
    with face as url, context.Manager() as manager, context.Pool(PROCESSES) as pool:
        barrier = manager.Barrier(PROCESSES)
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            results = pool.starmap_async(race_workers.read_shards_on_key, [
                (db_url, key["api_key"], url, names[i * 32:(i + 1) * 32], barrier) for i in range(PROCESSES)]
            ).get(timeout=RACE_TIMEOUT_S)
        finally:
            stop.set()
            watcher.join()
    read = sum(r["read"] for r in results)
    assert all(r["mandate_budget_micro"] == KEY_BUDGET_MICRO for r in results)   # each saw the whole budget
    assert all(set(r["statuses"]) == {200} for r in results), results
    assert all(r["refusal"] is not None and "budget" in r["refusal"]["message"] for r in results), results
    assert sum(1 for r in results if r["read"]) == PROCESSES, "only one process paid: no race happened"
    assert peak[0] <= KEY_BUDGET_MICRO
    assert read == KEY_BUDGET_MICRO // SHARD_PRICE_MICRO       # every micro of the budget bought a shard
    view = ledger.key("owner", key["key_id"])
    assert view["paid_micro"] == read * SHARD_PRICE_MICRO and view["in_escrow_micro"] == 0
    assert view["escrows_open"] == 0 and view["escrows"] == sum(len(r["escrow_ids"]) for r in results)
    assert ledger.me("owner")["balance_micro"] == start - read * SHARD_PRICE_MICRO   # the rest came back
    assert_audit_clean(ledger)
    assert_keys_add_up(ledger)
    seller.close()
    ledger.close()
