"""Ledger throughput and latency, measured side by side in one run.

    python benchmarks/ledger.py [--lifecycles 150] [--pg postgresql+psycopg://postgres@127.0.0.1:5432/test]

A lifecycle is create + 10 deducts + release: 12 ledger transactions. The raw SQLite
commit rate (one INSERT per commit, same file system, same WAL/synchronous settings) is
the ceiling the embedded ledger is compared with. A paid call is billed either by one
deduct after the work (the seeds' way) or by a hold before it and a final capture after
it (how the seller's till pays every face): both are timed side by side.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import median, percentile, show  # noqa: E402

from hf_escrow.ledger import Ledger  # noqa: E402

OPS_PER_LIFECYCLE = 12


def lifecycles(ledger: Ledger, buyer: str, seller: str, count: int, latencies_ms: list[float] | None = None) -> None:
    for _ in range(count):
        escrow_id = ledger.create_escrow(buyer, seller, "1.00", ttl_seconds=600)["id"]
        for _ in range(10):
            start = time.perf_counter()
            ledger.deduct(seller, escrow_id, "0.01")
            if latencies_ms is not None:
                latencies_ms.append((time.perf_counter() - start) * 1000)
        ledger.release(buyer, escrow_id, "0.05")


def paid_calls_ms(ledger: Ledger, buyer: str, seller: str, calls: int) -> tuple[list[float], list[float]]:
    """Per-call billing latency, interleaved: one deduct vs hold + final capture (the till's way)."""
    escrow = ledger.create_escrow(buyer, seller, "1.00", ttl_seconds=600)
    deducts, holds = [], []
    for _ in range(calls):
        start = time.perf_counter()
        ledger.deduct(seller, escrow["id"], "0.0001")
        deducts.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        hold = ledger.hold(seller, escrow["spend_token"], "0.0002", ttl_seconds=60)
        ledger.capture(seller, hold["id"], "0.0001", final=True)
        holds.append((time.perf_counter() - start) * 1000)
    return deducts, holds


def setup_pair(ledger: Ledger, tag: str, count: int) -> tuple[str, str]:
    buyer, seller = f"buyer-{tag}", f"seller-{tag}"
    for name in (buyer, seller):
        ledger.register(name)
    ledger.deposit(buyer, str(count + 1))
    return buyer, seller


def raw_sqlite_commits_per_s(path: Path, count: int) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER)")
    start = time.perf_counter()
    for i in range(count):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t (v) VALUES (?)", (i,))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return count / elapsed


def _pg_worker(url: str, tag: str, count: int, barrier) -> float:
    ledger = Ledger(url)
    buyer, seller = setup_pair(ledger, tag, count)
    barrier.wait(timeout=120)
    start = time.perf_counter()
    lifecycles(ledger, buyer, seller, count)
    return time.perf_counter() - start


def pg_lifecycles_per_s(url: str, processes: int, count: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    manager = ctx.Manager()
    barrier = manager.Barrier(processes)
    with ctx.Pool(processes) as pool:
        durations = pool.starmap(_pg_worker, [(url, f"p{processes}-{i}", count, barrier) for i in range(processes)])
    return processes * count / max(durations)


def fresh_pg(admin_url: str) -> tuple[str, callable] | None:
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.conftest import PG_SKIP_REASON, fresh_pg_database
    except ImportError:
        return None
    if PG_SKIP_REASON:
        print(f"PostgreSQL skipped: {PG_SKIP_REASON}")
        return None
    return fresh_pg_database()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lifecycles", type=int, default=150)
    parser.add_argument("--pg-lifecycles", type=int, default=40)
    parser.add_argument("--paid-calls", type=int, default=300)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        raw = raw_sqlite_commits_per_s(Path(tmp) / "raw.db", args.lifecycles * OPS_PER_LIFECYCLE)
        ledger = Ledger(f"sqlite:///{Path(tmp) / 'ledger.db'}")
        buyer, seller = setup_pair(ledger, "sqlite", args.lifecycles)
        latencies: list[float] = []
        start = time.perf_counter()
        lifecycles(ledger, buyer, seller, args.lifecycles, latencies)
        per_s = args.lifecycles / (time.perf_counter() - start)
        deduct_ms, hold_ms = paid_calls_ms(ledger, buyer, seller, args.paid_calls)
        ledger.close()
    ratio = per_s * OPS_PER_LIFECYCLE / raw
    rows += [
        ("SQLite lifecycles/s (create + 10 deducts + release)", f"{per_s:.1f}", ""),
        ("SQLite ledger transactions/s", f"{per_s * OPS_PER_LIFECYCLE:.0f}", ""),
        ("raw SQLite commits/s (same file system, WAL, synchronous=FULL)", f"{raw:.0f}", ""),
        ("ledger tx/s / raw commits/s", f"{ratio:.2f}", "goal >= 0.5"),
        ("deduct latency p50 (ms)", f"{median(latencies):.2f}", ""),
        ("deduct latency p99 (ms)", f"{percentile(latencies, 99):.2f}", ""),
        ("paid call by one deduct, p50 / p99 (ms)", f"{median(deduct_ms):.2f} / {percentile(deduct_ms, 99):.2f}", ""),
        ("paid call by hold + final capture, p50 / p99 (ms)",
         f"{median(hold_ms):.2f} / {percentile(hold_ms, 99):.2f}", ""),
        ("hold + capture / deduct, p50", f"{median(hold_ms) / median(deduct_ms):.2f}x", "two transactions vs one"),
    ]
    pg = fresh_pg("")
    if pg:
        url, drop = pg
        try:
            Ledger(url).close()  # migrate once, before the processes race to
            one = pg_lifecycles_per_s(url, 1, args.pg_lifecycles)
            eight = pg_lifecycles_per_s(url, 8, args.pg_lifecycles)
        finally:
            drop()
        rows += [
            ("PostgreSQL lifecycles/s, 1 process", f"{one:.1f}", ""),
            ("PostgreSQL lifecycles/s, 8 processes", f"{eight:.1f}", ""),
            ("8 processes / 1 process", f"{eight / one:.2f}x", "goal >= 3x"),
        ]
    show("hf-escrow ledger benchmark", rows)


if __name__ == "__main__":
    main()
