"""Where a capture's time goes: the floors that `throughput.py` sets beside its ratios.

Each floor removes one layer and measures what is left, in the same run as the ratios:

- `replayed_sql_per_s`: the statements single captures send, traced from the ledger and
  replayed by bare sqlite3 on a copy of the database taken before them (same commits,
  same fsyncs, no Python around the statements): the most any one-at-a-time capture on
  this schema could reach.
- `unsynced_captures_per_s`: the ledger itself with `synchronous=OFF` (no fsync): the
  CPU one capture costs, Python and SQLite together.
- `loop_hop_ms`: a capture settled from an event loop (`settle_async`, as the HTTP
  routes settle it) beside a blocking one: what the committer thread's round trip adds.
- `http_floor_ms`: `GET /healthz` from httpx to `hf-escrow serve`: what any request
  costs before a route does anything.

Every loop is bounded by its `count`.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Callable

import httpx
from sqlalchemy import event

from _table import median
from ledger import setup_pair

from hf_escrow.ledger import Ledger

SQLITE_PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=FULL", "PRAGMA foreign_keys=ON")
MAX_TRACED_STATEMENTS = 100_000


def p50_ms(fn: Callable[[], object], count: int) -> float:
    latencies = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        latencies.append((time.perf_counter() - start) * 1000)
    return median(latencies)


def _funded(ledger: Ledger, tag: str, count: int) -> tuple[str, list[str]]:
    """A seller and `count` holds of 0.001 USDC on one escrow."""
    buyer, seller = setup_pair(ledger, tag, count)
    token = ledger.create_escrow(buyer, seller, str(count), ttl_seconds=3600)["spend_token"]
    return seller, [ledger.hold(seller, token, "0.001", ttl_seconds=600)["id"] for _ in range(count)]


def _traced(ledger: Ledger, run: Callable[[], None]) -> list[list[str]]:
    """The statements `run` sent on the ledger's connections, one list per write transaction.

    sqlite3 reports a trigger's statements as the text of the statement that fired them,
    right after it: a repeat of the statement just before is one of those and is dropped."""
    statements: list[str] = []

    def keep(text: str) -> None:
        if len(statements) < MAX_TRACED_STATEMENTS:
            statements.append(text)

    def on_connect(dbapi_connection, _record):
        dbapi_connection.set_trace_callback(keep)

    event.listen(ledger.engine, "connect", on_connect)
    ledger.close()  # the next connections pass the listener
    try:
        run()
    finally:
        event.remove(ledger.engine, "connect", on_connect)
        ledger.close()  # the traced connections go: nothing after this is traced
    transactions, current, previous = [], None, None
    for text in statements:
        if text.startswith("BEGIN IMMEDIATE"):
            current = []
        elif text == "COMMIT" and current is not None:
            transactions.append(current)
            current = None
        elif current is not None and text != previous:
            current.append(text)
        previous = text
    return transactions


def replayed_sql_per_s(tmp: Path, count: int) -> tuple[float, int]:
    """(commits/s of the captures' own SQL replayed by bare sqlite3, statements per capture)."""
    source, copy = tmp / "traced.db", tmp / "replayed.db"
    ledger = Ledger(f"sqlite:///{source}")
    seller, holds = _funded(ledger, "traced", count)
    ledger.close()  # the last close checkpoints: the file alone is the database (the ledger reopens on use)
    shutil.copy(source, copy)
    transactions = _traced(ledger, lambda: [ledger.capture(seller, hold_id, "0.0005", final=True)
                                            for hold_id in holds])
    ledger.close()
    if len(transactions) != count:
        raise RuntimeError(f"traced {len(transactions)} write transactions for {count} captures")
    conn = sqlite3.connect(copy, isolation_level=None)
    for pragma in SQLITE_PRAGMAS:
        conn.execute(pragma)
    start = time.perf_counter()
    for statements in transactions:
        conn.execute("BEGIN IMMEDIATE")
        for text in statements:
            conn.execute(text).fetchall()
        conn.execute("COMMIT")
    rate = count / (time.perf_counter() - start)
    conn.close()
    return rate, len(transactions[-1])


def unsynced_captures_per_s(tmp: Path, count: int) -> float:
    """Single captures/s of the ledger with fsync off: the CPU a capture costs, nothing else."""
    ledger = Ledger(f"sqlite:///{tmp / 'unsynced.db'}")
    event.listen(ledger.engine, "connect", lambda dbapi_connection, _: dbapi_connection.execute(
        "PRAGMA synchronous=OFF"))
    ledger.close()  # the next connections pass the listener
    seller, holds = _funded(ledger, "unsynced", count)
    start = time.perf_counter()
    for hold_id in holds:
        ledger.capture(seller, hold_id, "0.0005", final=True)
    rate = count / (time.perf_counter() - start)
    ledger.close()
    return rate


def loop_hop_ms(ledger: Ledger, seller: str, holds: list[str]) -> tuple[float, float]:
    """(blocking capture p50, capture awaited on an event loop p50), on alternate holds."""
    blocking, awaited = iter(holds[0::2]), holds[1::2]
    blocking_ms = p50_ms(lambda: ledger.capture(seller, next(blocking), "0.0005", final=True), len(holds[0::2]))

    async def on_loop() -> float:
        latencies = []
        for hold_id in awaited:
            start = time.perf_counter()
            await ledger.settle_async(ledger.capture_operation(seller, hold_id, "0.0005", final=True))
            latencies.append((time.perf_counter() - start) * 1000)
        return median(latencies)

    try:
        import uvloop  # as `hf-escrow serve` runs its loop, where installed
    except ImportError:
        return blocking_ms, asyncio.run(on_loop())
    return blocking_ms, uvloop.run(on_loop())


def http_floor_ms(url: str, count: int) -> float:
    """`GET /healthz` p50 on one keep-alive httpx client."""
    with httpx.Client() as client:
        client.get(f"{url}/healthz").raise_for_status()
        return p50_ms(lambda: client.get(f"{url}/healthz"), count)
