"""Leases (`hf_escrow.seller.lease`): one hold for many calls, paid in batches, on a real ledger.

Money first (every cost captured once, the rest freed, audit clean, on SQLite and
PostgreSQL), then what stops a lease (a revoke, a cancel: within one flush), what it does
when the escrow is too small, refused and lost flushes, asyncio, and real processes: two
sellers racing one escrow, and one killed with SIGKILL mid-run.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hf_escrow import Forbidden, InsufficientFunds, StateConflict, TransportError
from hf_escrow import challenge
from hf_escrow.ledger.schema import holds
from hf_escrow.seller.till import Till
from sqlalchemy import func, select

from . import lease_workers
from .helpers import assert_audit_clean
from .test_gate import World as GateWorld

WORST = 1_000            # micro-USDC: a call's worst case in these tests
NEVER_MS = 3_600_000     # a flush timer that never fires during a test: flushes are made by hand


class World(GateWorld):
    """test_gate's world: a seller, a funded buyer, escrows of the amount asked."""

    def paid_micro(self, escrow_id: str) -> int:
        return self.ledger.get("buyer", escrow_id)["paid_micro"]


class Counting:
    """The seller's client, counting its ledger calls (and failing capture_many when told to)."""

    def __init__(self, client):
        self.client = client
        self.calls: list[tuple[str, int]] = []
        self.lose_next_answer = False

    def __getattr__(self, name):
        return getattr(self.client, name)

    def hold(self, *args, **kwargs):
        self.calls.append(("hold", 1))
        return self.client.hold(*args, **kwargs)

    def capture_many(self, items, **kwargs):
        self.calls.append(("capture_many", len(items)))
        results = self.client.capture_many(items, **kwargs)
        if self.lose_next_answer:
            self.lose_next_answer = False
            raise TransportError("connection reset after the commit")
        return results


@pytest.fixture
def world(sqlite_url) -> World:
    return World(sqlite_url)


@pytest.fixture
def any_world(db_url) -> World:
    return World(db_url)


def open_holds(world: World, escrow_id: str) -> int:
    with world.ledger.engine.connect() as conn:
        return conn.scalar(select(func.count()).select_from(holds).where(
            holds.c.escrow_id == escrow_id, holds.c.status == "open"))


def test_every_call_is_paid_once_and_the_rest_freed(any_world):
    world = any_world
    e = world.escrow("1")
    seller = Counting(world.seller)
    leases = Till(seller).leases(lease_calls=16, flush_ms=NEVER_MS, flush_calls=32)
    costs, lock = [], threading.Lock()

    def caller(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(40):
            with leases.admit(e.spend_token, WORST) as charge:
                cost = rng.randint(0, WORST)
                if cost % 7 == 0:
                    continue               # a failed call: voided on the way out, costs nothing
                charge.finish(cost)
                with lock:
                    costs.append(cost)

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    leases.close()

    view = world.buyer.get(e.id)
    assert world.paid_micro(e.id) == sum(costs) > 0
    assert view.held == 0 and open_holds(world, e.id) == 0
    assert view.amount == view.paid + view.remaining + view.refunded
    assert_audit_clean(world.ledger)
    ledger_calls = len(seller.calls)
    assert ledger_calls * 4 < len(costs), f"{ledger_calls} ledger calls for {len(costs)} calls: not batched"


def test_a_flush_pays_many_escrows_in_one_capture_many(world):
    escrows = [world.escrow("0.1") for _ in range(3)]
    seller = Counting(world.seller)
    leases = Till(seller).leases(flush_ms=NEVER_MS)
    for e in escrows:
        for _ in range(5):
            leases.admit(e.spend_token, WORST).finish(WORST // 2)
    seller.calls.clear()
    leases.flush()
    # One renewal by token per lease (the ledger's check), then one capture_many paying the
    # three replaced holds in full.
    assert sorted(seller.calls) == [("capture_many", 3), ("hold", 1), ("hold", 1), ("hold", 1)]
    assert [world.paid_micro(e.id) for e in escrows] == [5 * WORST // 2] * 3
    leases.close()
    assert all(open_holds(world, e.id) == 0 for e in escrows)
    assert_audit_clean(world.ledger)


def test_revoking_the_tokens_stops_new_calls_after_one_flush(world):
    e = world.escrow("1")
    leases = Till(world.seller).leases(flush_ms=NEVER_MS)
    leases.admit(e.spend_token, WORST).finish(WORST)
    assert world.buyer.revoke_spend_tokens(e.id) == 1
    late = leases.admit(e.spend_token, WORST)      # within the flush window: admitted, and paid
    late.finish(WORST)
    leases.flush()
    with pytest.raises(Forbidden) as refused:
        leases.admit(e.spend_token, WORST)
    assert challenge.reason_of(refused.value) == challenge.TOKEN_REFUSED
    assert not late.escrow_open
    leases.close()
    assert world.paid_micro(e.id) == 2 * WORST
    assert open_holds(world, e.id) == 0
    assert_audit_clean(world.ledger)


def test_a_cancel_stops_new_calls_after_one_flush_and_calls_in_flight_are_paid(any_world):
    world = any_world
    e = world.escrow("1")
    leases = Till(world.seller).leases(flush_ms=NEVER_MS)
    leases.admit(e.spend_token, WORST).finish(WORST)
    in_flight = leases.admit(e.spend_token, WORST)
    world.buyer.cancel(e.id)
    leases.flush()
    with pytest.raises(StateConflict) as refused:
        leases.admit(e.spend_token, WORST)
    assert challenge.reason_of(refused.value) == challenge.ESCROW_CLOSED
    in_flight.finish(WORST)         # delivered after the cancel: its hold still captures (grace)
    leases.close()
    view = world.buyer.get(e.id)
    assert (view.status, world.paid_micro(e.id), view.held) == ("cancelled", 2 * WORST, 0)
    assert view.amount == view.paid + view.refunded
    assert_audit_clean(world.ledger)


def test_a_call_that_does_not_fit_waits_then_gets_the_usual_402(world):
    e = world.escrow("0.005")
    leases = Till(world.seller).leases(lease_calls=64, flush_ms=NEVER_MS, wait_s=30)
    first, second = leases.admit(e.spend_token, 2_000), leases.admit(e.spend_token, 2_000)
    assert world.buyer.get(e.id).remaining == 0        # the lease took what the escrow had
    first.finish(2_000)
    second.finish(2_000)
    with pytest.raises(InsufficientFunds) as refused:   # 1,000 left: the lease frees its hold, then refuses
        leases.admit(e.spend_token, 2_000)
    assert challenge.reason_of(refused.value) == challenge.INSUFFICIENT
    assert refused.value.details["price_micro"] == 2_000
    small = leases.admit(e.spend_token, 1_000)          # what does fit is still sold
    small.finish(1_000)
    leases.close()
    assert world.paid_micro(e.id) == 5_000
    assert_audit_clean(world.ledger)


def test_a_refused_item_does_not_fail_its_neighbours(world):
    a, b = world.escrow("0.1"), world.escrow("0.1")
    leases = Till(world.seller).leases(flush_ms=NEVER_MS)
    lost = leases.admit(a.spend_token, WORST)
    lost.finish(WORST)
    leases.admit(b.spend_token, WORST).finish(WORST)
    world.seller.void(lost.hold_id)                 # a's hold ends behind the lease's back
    leases.flush()
    assert world.paid_micro(b.id) == WORST          # b paid in the same capture_many
    assert world.paid_micro(a.id) == 0              # a's delivered call is the loss, alone
    leases.admit(a.spend_token, WORST).finish(WORST)   # a new lease (a new hold) for a
    leases.close()
    assert (world.paid_micro(a.id), world.paid_micro(b.id)) == (WORST, WORST)
    assert open_holds(world, a.id) == open_holds(world, b.id) == 0
    assert_audit_clean(world.ledger)


def test_a_flush_whose_answer_was_lost_is_resent_and_pays_once(world):
    e = world.escrow("0.1")
    seller = Counting(world.seller)
    leases = Till(seller).leases(flush_ms=NEVER_MS)
    for _ in range(3):
        leases.admit(e.spend_token, WORST).finish(WORST)
    seller.lose_next_answer = True
    leases.flush()                                   # committed, but the lease never heard
    leases.flush()                                   # the same items, the same keys
    assert world.paid_micro(e.id) == 3 * WORST
    leases.close()
    assert world.paid_micro(e.id) == 3 * WORST
    assert_audit_clean(world.ledger)


def test_an_idle_lease_pays_and_frees_its_hold_by_itself(world):
    e = world.escrow("0.1")
    leases = Till(world.seller).leases(flush_ms=NEVER_MS, idle_s=0)
    leases.admit(e.spend_token, WORST).finish(WORST)
    assert world.buyer.get(e.id).held > 0
    leases.flush()                                   # idle: paid, and the rest of its hold freed
    view = world.buyer.get(e.id)
    assert (world.paid_micro(e.id), view.held, open_holds(world, e.id)) == (WORST, 0, 0)
    leases.admit(e.spend_token, WORST).finish(WORST)   # the next call opens a new lease
    leases.close()
    assert world.paid_micro(e.id) == 2 * WORST
    assert_audit_clean(world.ledger)


def test_asyncio_callers(world):
    e = world.escrow("1")
    leases = Till(world.seller).leases(lease_calls=8, flush_ms=5, flush_calls=8)

    async def call(n: int) -> int:
        charge = await leases.admit_async(e.spend_token, WORST)
        await asyncio.sleep(0)
        charge.finish(n % WORST)
        return charge.cost_micro

    async def main() -> list[int]:
        return await asyncio.gather(*(call(n) for n in range(200)))

    owed = asyncio.run(main())
    leases.close()
    assert world.paid_micro(e.id) == sum(owed) == sum(n % WORST for n in range(200))
    assert_audit_clean(world.ledger)


def test_bad_options_and_costs_are_refused(world):
    from hf_escrow import PaymentRequired, ValidationError
    till = Till(world.seller)
    for options in ({"lease_calls": 0}, {"flush_ms": 0}, {"flush_calls": 2, "max_unpaid": 1}, {"idle_s": -1},
                    {"wait_s": "1"}):
        with pytest.raises(ValidationError):
            till.leases(**options)
    leases = till.leases(flush_ms=NEVER_MS)
    with pytest.raises(PaymentRequired):
        leases.admit(None, WORST)
    e = world.escrow("0.1")
    with pytest.raises(ValidationError):
        leases.admit(e.spend_token, 0)
    charge = leases.admit(e.spend_token, WORST)
    with pytest.raises(ValidationError):
        charge.finish(-1)
    charge.finish(10 * WORST)
    assert charge.cost_micro == WORST               # capped at the worst case it reserved
    leases.close()
    with pytest.raises(StateConflict):
        leases.admit(e.spend_token, WORST)
    assert world.paid_micro(e.id) == WORST


# ---- processes ------------------------------------------------------------------------


@pytest.mark.slow
def test_two_seller_processes_on_one_escrow_never_overdraw(any_world):
    world = any_world
    price, amount = 1_000, "0.3"
    e = world.escrow(amount)
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, context.Pool(2) as pool:
        barrier = manager.Barrier(2)
        results = pool.starmap(lease_workers.call_until_refused,
                               [(world.url, "seller", e.spend_token, price, 8, barrier)] * 2)
    delivered = sum(r["delivered"] for r in results)
    view = world.buyer.get(e.id)
    assert world.paid_micro(e.id) == delivered * price <= 300_000
    assert all(r["delivered"] > 0 and r["refused"] for r in results), results
    assert view.held == 0 and view.remaining < price
    assert_audit_clean(world.ledger)


@pytest.mark.slow
def test_a_killed_seller_loses_at_most_its_unpaid_calls_and_never_overcharges(any_world, tmp_path: Path):
    world = any_world
    price, max_unpaid = 1_000, 16
    e = world.escrow("5")
    log_path = tmp_path / "delivered.log"
    log_path.touch()
    code = ("import sys; from tests import lease_workers; "
            "lease_workers.call_until_killed(sys.argv[1], 'seller', sys.argv[2], int(sys.argv[3]), sys.argv[4], "
            "int(sys.argv[5]))")
    worker = subprocess.Popen([sys.executable, "-c", code, world.url, e.spend_token, str(price), str(log_path),
                               str(max_unpaid)], cwd=Path(__file__).parent.parent,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    try:
        for _ in range(6_000):   # up to 60 s for a few hundred calls
            if log_path.read_bytes().count(b"\n") >= 300 or worker.poll() is not None:
                break
            time.sleep(0.01)
        assert worker.poll() is None, "the seller process stopped by itself"
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
    delivered = log_path.read_bytes().count(b"\n")
    paid_calls, rest = divmod(world.paid_micro(e.id), price)
    assert rest == 0 and delivered >= 300
    assert paid_calls <= delivered, "charged for calls never delivered"
    assert delivered - paid_calls <= max_unpaid, f"{delivered - paid_calls} delivered calls lost"
    view = world.buyer.get(e.id)
    assert view.amount == view.paid + view.held + view.remaining
    assert_audit_clean(world.ledger)
