"""Billing throughput: captures embedded, batched, grouped, over HTTP and on PostgreSQL,
each beside the ceiling it is measured against, all in one run.

    python benchmarks/throughput.py [--captures 400] [--http-clients 16] [--pg-captures 200]

On PostgreSQL it also drives `hf-escrow serve --workers 1/2/4` with the same HTTP clients.

A capture is timed on a hold made beforehand (the work's price known at the end). The
ceilings are measured in the same run: raw SQLite commits/s (one INSERT per commit, WAL,
synchronous=FULL, same file system) and `pgbench -N` on a scratch database created for
the run and dropped after it. The floors (`floors.py`) say where a capture's time goes:
its SQL with no Python around it, its CPU with no fsync, a request that runs no route, and
the event loop's hop to the committer thread. Every loop is bounded in count; the whole run takes a
couple of minutes on two cores.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _table import median, show  # noqa: E402
from floors import http_floor_ms, loop_hop_ms, replayed_sql_per_s, unsynced_captures_per_s  # noqa: E402
from ledger import fresh_pg, raw_sqlite_commits_per_s  # noqa: E402

import hf_escrow  # noqa: E402
from hf_escrow.ledger import Ledger  # noqa: E402
from tests.liveserver import free_port, wait_http  # noqa: E402

BATCH = 100
PGBENCH_S = 5
THREADS = 16
SERVE_WORKERS = (1, 2, 4)


def world(ledger: Ledger, tag: str, funds: str = "1000") -> tuple[str, str, dict]:
    buyer, seller = f"buyer-{tag}", f"seller-{tag}"
    keys = {name: ledger.register(name)["api_key"] for name in (buyer, seller)}
    ledger.deposit(buyer, funds)
    return buyer, seller, keys


def make_holds(ledger: Ledger, seller: str, token: str, count: int) -> list[str]:
    return [ledger.hold(seller, token, "0.001", ttl_seconds=600)["id"] for _ in range(count)]


def single_captures(ledger: Ledger, seller: str, holds: list[str]) -> tuple[float, list[float]]:
    """(captures/s, latencies in ms), one at a time."""
    latencies = []
    start = time.perf_counter()
    for hold_id in holds:
        t = time.perf_counter()
        ledger.capture(seller, hold_id, "0.0005", final=True)
        latencies.append((time.perf_counter() - t) * 1000)
    return len(holds) / (time.perf_counter() - start), latencies


def batched_captures(ledger: Ledger, seller: str, holds: list[str]) -> float:
    start = time.perf_counter()
    for i in range(0, len(holds), BATCH):
        results = ledger.capture_many(seller, [(h, "0.0005", True) for h in holds[i:i + BATCH]])["results"]
        if not all(r["ok"] for r in results):
            raise RuntimeError(f"a batched capture was refused: {results}")
    return len(holds) / (time.perf_counter() - start)


def threaded(capture, holds: list[str], threads: int) -> float:
    """Captures/s with `threads` callers at once, each on its own share of the holds."""
    shares = [holds[i::threads] for i in range(threads)]
    errors: list[Exception] = []

    def run(share: list[str], n: int) -> None:
        try:
            for hold_id in share:
                capture(n, hold_id)
        except Exception as error:  # reported after the run, not swallowed
            errors.append(error)

    pool = [threading.Thread(target=run, args=(share, n)) for n, share in enumerate(shares)]
    start = time.perf_counter()
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    if errors:
        raise errors[0]
    return len(holds) / (time.perf_counter() - start)


def start_server(db: str, workers: int = 1) -> tuple[subprocess.Popen, str]:
    """`hf-escrow serve` (uvloop and httptools where installed, as it runs for real)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", "from hf_escrow.cli import app; app()", "serve", "--host",
                             "127.0.0.1", "--port", str(port), "--database-url", db, "--workers", str(workers)],
                            stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz", 60)
    return proc, url


def http_rate(url: str, ledger: Ledger, seller: str, key: str, token: str, captures: int, clients: int) -> float:
    """Captures/s from `clients` keep-alive clients at once, after one warm-up capture each."""
    conns = [hf_escrow.connect(url, api_key=key) for _ in range(clients)]
    try:
        threaded(lambda n, h: conns[n].capture(h, "0.0005", final=True), make_holds(ledger, seller, token, clients),
                 clients)
        return threaded(lambda n, h: conns[n].capture(h, "0.0005", final=True),
                        make_holds(ledger, seller, token, captures), clients)
    finally:
        for conn in conns:
            conn.close()


def http_figures(db: str, ledger: Ledger, seller: str, key: str, token: str, captures: int, clients: int) -> dict:
    proc, url = start_server(db)
    try:
        client = hf_escrow.connect(url, api_key=key)
        latencies = []
        for hold_id in make_holds(ledger, seller, token, min(captures, 200)):
            t = time.perf_counter()
            client.capture(hold_id, "0.0005", final=True)
            latencies.append((time.perf_counter() - t) * 1000)
        client.close()
        return {"rate": http_rate(url, ledger, seller, key, token, captures, clients), "p50_ms": median(latencies),
                "floor_ms": http_floor_ms(url, min(captures, 200))}
    finally:
        proc.terminate()
        proc.wait(10)


def pg_served(url: str, workers: int, captures: int, clients: int) -> float:
    """Captures/s through `hf-escrow serve --workers N` on one PostgreSQL database."""
    ledger = Ledger(url)
    buyer, seller, keys = world(ledger, f"served{workers}", "10000")
    token = ledger.create_escrow(buyer, seller, "9000", ttl_seconds=3600)["spend_token"]
    proc, base = start_server(url, workers)
    try:
        return http_rate(base, ledger, seller, keys[seller], token, captures, clients)
    finally:
        proc.terminate()
        proc.wait(30)
        ledger.close()


def _pg_worker(url: str, tag: str, count: int, barrier) -> float:
    ledger = Ledger(url)
    buyer, seller, _ = world(ledger, tag)
    escrow = ledger.create_escrow(buyer, seller, "100", ttl_seconds=3600)
    holds = make_holds(ledger, seller, escrow["spend_token"], count)
    barrier.wait(timeout=120)
    start = time.perf_counter()
    for hold_id in holds:
        ledger.capture(seller, hold_id, "0.0005", final=True)
    elapsed = time.perf_counter() - start
    ledger.close()
    return elapsed


def pg_captures_per_s(url: str, processes: int, count: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    manager = ctx.Manager()
    barrier = manager.Barrier(processes)
    with ctx.Pool(processes) as pool:
        durations = pool.starmap(_pg_worker, [(url, f"p{processes}-{i}", count, barrier) for i in range(processes)])
    return processes * count / max(durations)


def pgbench_tps(url: str, clients: int) -> float | None:
    """`pgbench -N` (simple updates, no hot branch rows) on the scratch database."""
    if shutil.which("pgbench") is None:
        return None
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    subprocess.run(["pgbench", "-i", "-q", "-s", "1", dsn], check=True, capture_output=True, timeout=120)
    out = subprocess.run(["pgbench", "-N", "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(PGBENCH_S),
                          dsn], check=True, capture_output=True, text=True, timeout=120).stdout
    found = re.search(r"tps = ([0-9.]+)", out)
    return float(found.group(1)) if found else None


def ratio(value: float, ceiling: float | None) -> str:
    return f"{value / ceiling:.2f}" if ceiling else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--captures", type=int, default=400)
    parser.add_argument("--batched", type=int, default=3000)
    parser.add_argument("--http-clients", type=int, default=THREADS)
    parser.add_argument("--http-captures", type=int, default=640)
    parser.add_argument("--pg-captures", type=int, default=200)
    args = parser.parse_args()
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        raw = raw_sqlite_commits_per_s(Path(tmp) / "raw.db", 2000)
        db = f"sqlite:///{Path(tmp) / 'ledger.db'}"
        ledger = Ledger(db)
        buyer, seller, keys = world(ledger, "sqlite", "100000")
        escrow = ledger.create_escrow(buyer, seller, "90000", ttl_seconds=3600)
        token = escrow["spend_token"]
        single, latencies = single_captures(ledger, seller, make_holds(ledger, seller, token, args.captures))
        batched = batched_captures(ledger, seller, make_holds(ledger, seller, token, args.batched))
        holds = make_holds(ledger, seller, token, args.captures)
        grouped_before = ledger._group.transactions
        grouped = threaded(lambda n, h: ledger.capture(seller, h, "0.0005", final=True), holds, THREADS)
        per_tx = args.captures / max(1, ledger._group.transactions - grouped_before)
        http = http_figures(db, ledger, seller, keys[seller], token, args.http_captures, args.http_clients)
        blocking_ms, awaited_ms = loop_hop_ms(ledger, seller, make_holds(ledger, seller, token, args.captures))
        ledger.close()
        replayed, statements = replayed_sql_per_s(Path(tmp), args.captures)
        unsynced = unsynced_captures_per_s(Path(tmp), args.captures)
    embedded_p50 = median(latencies)
    rows += [
        ("raw SQLite commits/s (WAL, synchronous=FULL)", f"{raw:.0f}", "the SQLite ceiling"),
        ("embedded single captures/s", f"{single:.0f}", f"p50 {embedded_p50:.2f} ms"),
        ("  / raw SQLite commits/s", ratio(single, raw), "goal >= 0.5"),
        (f"embedded captures/s in batches of {BATCH}", f"{batched:.0f}", "capture_many"),
        ("  / raw SQLite commits/s", ratio(batched, raw), "goal >= 10"),
        (f"embedded captures/s, {THREADS} threads (group commit)", f"{grouped:.0f}",
         f"{per_tx:.1f} captures per transaction"),
        ("  / raw SQLite commits/s", ratio(grouped, raw), ""),
        (f"HTTP captures/s, {args.http_clients} keep-alive clients, 1 server process", f"{http['rate']:.0f}", ""),
        ("  / embedded single captures/s", ratio(http["rate"], single), "goal >= 0.5"),
        ("HTTP capture p50 (ms), one client", f"{http['p50_ms']:.2f}", ""),
        ("  HTTP added latency over embedded, p50 (ms)", f"{http['p50_ms'] - embedded_p50:.2f}", "goal <= 1 ms"),
        ("floor: a capture's own SQL replayed by bare sqlite3, commits/s", f"{replayed:.0f}",
         f"{statements} statements; {ratio(replayed, raw)} of raw: no Python at all"),
        ("floor: embedded single captures/s, fsync off", f"{unsynced:.0f}",
         f"{1e6 / unsynced:.0f} us of CPU a capture"),
        ("floor: GET /healthz p50 (ms), same client and server", f"{http['floor_ms']:.2f}", "before any route runs"),
        ("floor: capture awaited on the event loop, p50 (ms)", f"{awaited_ms:.2f}",
         f"+{awaited_ms - blocking_ms:.2f} over blocking: the committer thread's hop"),
    ]
    pg = fresh_pg("")
    if pg:
        url, drop = pg
        try:
            Ledger(url).close()  # migrate once, before the processes race to
            one = pg_captures_per_s(url, 1, args.pg_captures)
            eight = pg_captures_per_s(url, 8, args.pg_captures // 2)
            served = {n: pg_served(url, n, args.http_captures, args.http_clients) for n in SERVE_WORKERS}
            bench1, bench8 = pgbench_tps(url, 1), pgbench_tps(url, 8)
        finally:
            drop()
        rows += [
            ("pgbench -N tps, 1 / 8 clients", f"{bench1 or 0:.0f} / {bench8 or 0:.0f}", "the PostgreSQL ceiling"),
            ("PostgreSQL captures/s, 1 process", f"{one:.0f}", ""),
            ("  / pgbench -N -c 1", ratio(one, bench1), "goal >= 0.5"),
            ("PostgreSQL captures/s, 8 processes", f"{eight:.0f}", ""),
            ("  / pgbench -N -c 8", ratio(eight, bench8), "goal >= 0.5"),
        ]
        rows += [(f"PostgreSQL HTTP captures/s, serve --workers {n}, {args.http_clients} clients", f"{rate:.0f}",
                  f"{rate / served[1]:.2f} x 1 worker; {ratio(rate, bench8)} of pgbench -c 8")
                 for n, rate in served.items()]
    show("hf-escrow billing throughput", rows)


if __name__ == "__main__":
    main()
