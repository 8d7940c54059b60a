"""Two real `hf-escrow serve` processes on one database (one SQLite file, or PostgreSQL),
hammered at once by a bounded load on loopback through `hf_escrow.connect(url)`.

Requests alternate between the servers; some are sent again with the same
Idempotency-Key to the OTHER server (one after the other, and both at the same moment):
each takes effect exactly once and every copy gets the same receipt. Afterwards
`hf-escrow audit` exits 0 and the paid totals are exactly what the clients were told.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

import hf_escrow
from hf_escrow import IdempotencyConflict, InsufficientFunds, StateConflict
from hf_escrow.ledger import Ledger
from hf_escrow.ledger.schema import escrows
from hf_escrow.money import parse_usdc

from .conftest import PG_SKIP_REASON, fresh_pg_database
from .helpers import assert_audit_clean
from .liveserver import free_port

THREADS = 4
REQUESTS_PER_THREAD = 40
LOAD_DEADLINE_S = 60
STARTUP_S = 60


def _cli() -> list[str]:
    exe = shutil.which("hf-escrow")
    return [exe] if exe else [sys.executable, "-c", "from hf_escrow.cli import app; app()"]


@contextlib.contextmanager
def _servers(database_url: str, log_dir: Path, count: int = 2):
    """`count` server processes on their own free ports; terminated (then killed) on exit."""
    procs, urls, logs = [], [], []
    try:
        for i in range(count):
            port = free_port()
            log = open(log_dir / f"server-{i}.log", "wb")
            logs.append(log)
            procs.append(subprocess.Popen(_cli() + ["serve", "--host", "127.0.0.1", "--port", str(port),
                                                    "--database-url", database_url],
                                          stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=dict(os.environ, PYTHONUNBUFFERED="1")))
            urls.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + STARTUP_S
        for proc, url in zip(procs, urls):
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server {url} exited with {proc.returncode}: {_tail(log_dir)}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server {url} did not answer in {STARTUP_S} s: {_tail(log_dir)}")
                time.sleep(0.1)
        yield urls
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for log in logs:
            log.close()


def _tail(log_dir: Path) -> str:
    return " | ".join(p.read_text(errors="replace")[-1500:] for p in sorted(log_dir.glob("server-*.log")))


class Tally:
    """What the clients were told took effect, by escrow (gross micro-USDC paid, per op)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.paid: Counter = Counter()
        self.deducts: Counter = Counter()
        self.created: set[str] = set()
        self.closed: set[str] = set()
        self.errors: list[str] = []
        self.requests = 0

    def receipt(self, receipt) -> None:
        with self.lock:
            self.paid[receipt.escrow_id] += parse_usdc(receipt.gross)
            if receipt.kind == "deduct":
                self.deducts[receipt.escrow_id] += 1
            if receipt.status != "active":
                self.closed.add(receipt.escrow_id)

    def count(self, n: int = 1) -> None:
        with self.lock:
            self.requests += n


def _worker(t: int, urls: list[str], keys: dict, names: dict, shared: str, tally: Tally, deadline: float) -> None:
    buyers = [hf_escrow.connect(url, api_key=keys["buyer"], timeout=30) for url in urls]
    sellers = [hf_escrow.connect(url, api_key=keys["seller"], timeout=30) for url in urls]
    own = None
    try:
        for i in range(REQUESTS_PER_THREAD):
            if time.monotonic() > deadline:
                tally.errors.append(f"thread {t} stopped at request {i}: load deadline")
                return
            s, other = (t + i) % 2, (t + i + 1) % 2
            step = i % 8
            try:
                if step == 0 or own is None:
                    key = f"create-{t}-{i}-{uuid.uuid4().hex[:8]}"
                    e = buyers[s].create_escrow(names["seller"], "0.500000", ttl_seconds=600, meta={"model": f"m{t}"},
                                                idempotency_key=key)
                    tally.count()
                    if i % 16 == 0:  # the retry goes to the other server: the same escrow comes back
                        again = buyers[other].create_escrow(names["seller"], "0.500000", ttl_seconds=600,
                                                            meta={"model": f"m{t}"}, idempotency_key=key)
                        tally.count()
                        assert again.id == e.id, (e.id, again.id)
                    own = e.id
                    with tally.lock:
                        tally.created.add(e.id)
                elif step in (1, 3):
                    tally.receipt(sellers[s].deduct(shared, "0.001000", reason=f"t{t} i{i}"))
                    tally.count()
                elif step == 2:  # retried one after the other on the other server
                    key = f"deduct-{t}-{i}-{uuid.uuid4().hex[:8]}"
                    first = sellers[s].deduct(shared, "0.000300", idempotency_key=key)
                    second = sellers[other].deduct(shared, "0.000300", idempotency_key=key)
                    tally.count(2)
                    assert first == second, (first, second)
                    tally.receipt(first)
                elif step == 4:
                    tally.receipt(sellers[s].deduct(own, "0.010000"))
                    tally.count()
                elif step == 5:  # a release, retried on the other server (concurrent twins: see below)
                    key = f"release-{t}-{i}-{uuid.uuid4().hex[:8]}"
                    receipts = [buyers[n].release(own, "0.020000", idempotency_key=key) for n in (s, other)]
                    tally.count(2)
                    assert receipts[0] == receipts[1], receipts
                    assert receipts[0].status == "released" and receipts[0].gross == Decimal("0.020000")
                    assert receipts[0].refunded == Decimal("0.500000") - receipts[0].escrow.paid
                    tally.receipt(receipts[0])
                    own = None
                elif step == 6:
                    view = buyers[s].get(shared)
                    assert view.amount == view.paid + view.refunded + view.remaining
                    assert sellers[other].me().balance >= 0
                    tally.count(2)
                else:  # a concurrent twin of a tiny deduct on both servers
                    key = f"twin-{t}-{i}-{uuid.uuid4().hex[:8]}"
                    with ThreadPoolExecutor(2) as pool:
                        futures = [pool.submit(sellers[n].deduct, shared, "0.000007", None, key) for n in (s, other)]
                        receipts = [f.result(timeout=60) for f in futures]
                    tally.count(2)
                    assert receipts[0] == receipts[1], receipts
                    tally.receipt(receipts[0])
            except (InsufficientFunds, StateConflict) as error:  # allowed outcomes, nothing moved
                tally.errors.append(f"thread {t} request {i}: {type(error).__name__}: {error}")
    finally:
        for client in buyers + sellers:
            client.close()


class Cluster:
    """Two server processes on one database, with a ledger in this process for checks."""

    def __init__(self, backend: str, database_url: str, urls: list[str], ledger: Ledger):
        self.backend, self.database_url, self.urls, self.ledger = backend, database_url, urls, ledger

    def agents(self, *roles: str, fund: str = "1000") -> tuple[dict, dict]:
        """Fresh agents for one test: ({role: agent id}, {role: api key})."""
        names = {role: f"{role}-{uuid.uuid4().hex[:8]}" for role in roles}
        keys = {role: self.ledger.register(name)["api_key"] for role, name in names.items()}
        for name in names.values():
            self.ledger.deposit(name, fund)
        return names, keys


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def cluster(request, tmp_path_factory):
    """One pair of servers per backend for the whole module (starting them costs seconds)."""
    tmp = tmp_path_factory.mktemp(f"cluster-{request.param}")
    drop = None
    if request.param == "sqlite":
        url = f"sqlite:///{tmp / 'ledger.db'}"
    else:
        if PG_SKIP_REASON:
            pytest.skip(PG_SKIP_REASON)
        url, drop = fresh_pg_database()
    ledger = Ledger(url)  # migrates the database once before the servers open it
    try:
        with _servers(url, tmp) as urls:
            yield Cluster(request.param, url, urls, ledger)
        assert_audit_clean(ledger)
    finally:
        ledger.close()
        if drop:
            drop()


def test_two_server_processes_share_one_ledger(cluster):
    ledger = cluster.ledger
    names, keys = cluster.agents("buyer", "seller")
    buyer, seller = names["buyer"], names["seller"]
    shared = ledger.create_escrow(buyer, seller, "50", ttl_seconds=3600)["id"]
    seller_start = ledger.me(seller)["balance_micro"]
    buyer_start = ledger.me(buyer)["balance_micro"] + 50 * 10**6
    tally = Tally()
    started = time.monotonic()
    deadline = started + LOAD_DEADLINE_S
    with ThreadPoolExecutor(THREADS) as pool:
        futures = [pool.submit(_worker, t, cluster.urls, keys, names, shared, tally, deadline)
                   for t in range(THREADS)]
        for future in futures:
            future.result(timeout=LOAD_DEADLINE_S + 120)
    load_s = time.monotonic() - started
    # Both servers still serve and agree on what happened.
    views = []
    for url in cluster.urls:
        with hf_escrow.connect(url, api_key=keys["seller"]) as client:
            views.append(client.get(shared))
    assert views[0] == views[1]

    assert not [e for e in tally.errors if "deadline" in e], tally.errors
    assert tally.requests >= THREADS * REQUESTS_PER_THREAD, tally.requests
    print(f"\n{cluster.backend}: {tally.requests} requests in {load_s:.1f} s; allowed refusals: {tally.errors}")

    # Exactly what the clients were told, no more, no less.
    for escrow_id in set(tally.paid) | tally.created | {shared}:
        view = ledger.get(buyer, escrow_id)
        assert view["paid_micro"] == tally.paid[escrow_id], (escrow_id, view["paid_micro"], tally.paid[escrow_id])
        deducted = [e for e in view["events"] if e["kind"] == "deducted"]
        assert len(deducted) == tally.deducts[escrow_id], (escrow_id, len(deducted), tally.deducts[escrow_id])
        closing = [e for e in view["events"] if e["kind"] in ("released", "cancelled", "expired")]
        assert len(closing) == (1 if escrow_id in tally.closed else 0), (escrow_id, closing)
    mine = ledger.history(buyer, limit=1000)
    assert {e["id"] for e in mine} == tally.created | {shared}, "a retried create made a second escrow"
    paid_total = sum(tally.paid.values())
    fees_total = sum(e["fees_micro"] for e in mine)
    assert sum(e["paid_micro"] for e in mine) == paid_total
    assert ledger.me(seller)["balance_micro"] == seller_start + paid_total - fees_total
    holdings = sum(e["remaining_micro"] for e in mine)
    assert ledger.me(buyer)["balance_micro"] + holdings == buyer_start - paid_total

    report = assert_audit_clean(ledger)
    with ledger.engine.connect() as conn:
        all_fees = int(conn.scalar(select(func.coalesce(func.sum(escrows.c.fees_micro), 0))))
    assert report["platform_fees_micro"] == all_fees
    audit = subprocess.run(_cli() + ["audit", "--database-url", cluster.database_url, "--json"],
                           capture_output=True, text=True, timeout=120)
    assert audit.returncode == 0, (audit.stdout, audit.stderr)
    cli_report = json.loads(audit.stdout)
    assert cli_report["ok"] and cli_report["platform_fees_micro"] == report["platform_fees_micro"]
    assert cli_report["minted_micro"] == report["minted_micro"]
    text = subprocess.run(_cli() + ["audit", "--database-url", cluster.database_url], capture_output=True,
                          text=True, timeout=120)
    assert text.returncode == 0 and "clean" in text.stdout, (text.stdout, text.stderr)


@pytest.mark.parametrize("retry_on", ["same", "other"])
def test_sequential_retries_across_servers_take_effect_once(cluster, retry_on):
    """The plainest form, one escrow: every call sent three times under one key."""
    names, keys = cluster.agents("buyer", "seller", fund="10")
    order = [0, 0, 0] if retry_on == "same" else [0, 1, 0]
    buyers = [hf_escrow.connect(url, api_key=keys["buyer"]) for url in cluster.urls]
    sellers = [hf_escrow.connect(url, api_key=keys["seller"]) for url in cluster.urls]
    try:
        created = {buyers[n].create_escrow(names["seller"], "2", idempotency_key="c1").id for n in order}
        assert len(created) == 1
        escrow_id = created.pop()
        deducts = [sellers[n].deduct(escrow_id, "0.25", idempotency_key="d1") for n in order]
        assert deducts[0] == deducts[1] == deducts[2]
        releases = [buyers[n].release(escrow_id, "0.5", idempotency_key="r1") for n in order]
        assert releases[0] == releases[1] == releases[2] and releases[0].refunded == Decimal("1.25")
        with pytest.raises(IdempotencyConflict):
            sellers[1].deduct(escrow_id, "0.26", idempotency_key="d1")
    finally:
        for client in buyers + sellers:
            client.close()
    view = cluster.ledger.get(names["buyer"], escrow_id)
    assert (view["paid_micro"], view["refunded_micro"], view["status"]) == (750_000, 1_250_000, "released")
    assert cluster.ledger.me(names["buyer"])["balance_micro"] == 9_250_000


TWIN_ROUNDS = 10


@pytest.mark.parametrize("op", ["deduct", "deduct_all", "release", "cancel"])
def test_concurrent_twins_on_both_servers_get_the_same_receipt(cluster, op):
    """The same request under the same key, sent to both servers at the same moment (a client
    that timed out and retried elsewhere): one effect, and both copies get the stored receipt."""
    names, keys = cluster.agents("buyer", "seller", fund="10")
    buyers = [hf_escrow.connect(url, api_key=keys["buyer"]) for url in cluster.urls]
    sellers = [hf_escrow.connect(url, api_key=keys["seller"]) for url in cluster.urls]
    failures = []
    try:
        for n in range(TWIN_ROUNDS):
            escrow_id = buyers[0].create_escrow(names["seller"], "0.5").id
            key = f"twin-{op}-{n}"
            call = {"deduct": lambda c: sellers[c].deduct(escrow_id, "0.1", idempotency_key=key),
                    "deduct_all": lambda c: sellers[c].deduct(escrow_id, "0.5", idempotency_key=key),
                    "release": lambda c: buyers[c].release(escrow_id, "0.1", idempotency_key=key),
                    "cancel": lambda c: buyers[c].cancel(escrow_id, idempotency_key=key)}[op]
            barrier = threading.Barrier(2)

            def twin(c: int):
                barrier.wait(timeout=30)
                return call(c)

            with ThreadPoolExecutor(2) as pool:
                futures = [pool.submit(twin, c) for c in (0, 1)]
                outcomes = []
                for future in futures:
                    try:
                        outcomes.append(future.result(timeout=60))
                    except hf_escrow.EscrowError as error:
                        outcomes.append(error)
            view = cluster.ledger.get(names["buyer"], escrow_id)
            expected_paid = {"deduct": 100_000, "deduct_all": 500_000, "release": 100_000, "cancel": 0}[op]
            assert view["paid_micro"] == expected_paid, (op, view)  # one effect, whatever the answers
            moves = [e for e in view["events"] if e["kind"] in ("deducted", "released", "cancelled")]
            assert len(moves) == 1, moves
            if any(isinstance(o, Exception) for o in outcomes) or outcomes[0] != outcomes[1]:
                failures.append([repr(o)[:160] for o in outcomes])
    finally:
        for client in buyers + sellers:
            client.close()
    assert not failures, f"{len(failures)} of {TWIN_ROUNDS} twins disagreed: {failures[:2]}"


def test_server_processes_are_gone_after_the_context(tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    Ledger(url).close()
    with _servers(url, tmp_path, count=1) as urls:
        assert httpx.get(urls[0] + "/healthz", timeout=5).json() == {"ok": True}
    with pytest.raises(httpx.HTTPError):
        httpx.get(urls[0] + "/healthz", timeout=2)


def _status(url: str, method: str, path: str, key: str, body: dict | None = None) -> int:
    return httpx.request(method, url + path, json=body, timeout=30,
                         headers={"Authorization": f"Bearer {key}"}).status_code


def test_a_key_rotated_or_revoked_on_one_server_stops_on_the_other_at_once(cluster):
    """Whatever a server keeps between requests, a credential changed through the other
    process is refused by this one on the very next request: an agent's rotated key, a
    budgeted key its owner revoked, and the spend tokens a buyer revoked."""
    a, b = cluster.urls
    names, keys = cluster.agents("buyer", "seller")
    escrow = cluster.ledger.create_escrow(names["buyer"], names["seller"], "5", ttl_seconds=3600)
    budgeted = cluster.ledger.create_key(names["buyer"], budget="2")
    hold = {"spend_token": escrow["spend_token"], "amount_usdc": "0.01", "ttl_seconds": 60}
    for _ in range(20):  # warm whatever server B might keep of these credentials
        assert _status(b, "GET", "/api/me", keys["seller"]) == 200
        assert _status(b, "GET", "/api/keys/me", budgeted["api_key"]) == 200
    assert _status(b, "POST", "/api/holds", keys["seller"], hold) == 201

    rotated = httpx.post(a + "/api/me/key", headers={"Authorization": f"Bearer {keys['seller']}"}, timeout=30)
    assert rotated.status_code == 200
    assert _status(b, "GET", "/api/me", keys["seller"]) == 401
    assert _status(b, "GET", "/api/me", rotated.json()["api_key"]) == 200

    assert _status(a, "DELETE", f"/api/keys/{budgeted['key_id']}", keys["buyer"]) == 200
    assert _status(b, "GET", "/api/keys/me", budgeted["api_key"]) == 401

    assert _status(a, "DELETE", f"/api/escrow/{escrow['id']}/tokens", keys["buyer"]) == 200
    assert _status(b, "POST", "/api/holds", rotated.json()["api_key"], hold) == 403
