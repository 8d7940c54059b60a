"""The escrow service over HTTP vs the embedded ledger, and 1 vs 2 server processes, in one run.

    python benchmarks/service.py [--pairs 150] [--requests 400]

p50/p99 of one create + release pair embedded and over HTTP (the difference is the HTTP
overhead), and requests/s (GET /api/me and deducts, 4 client threads) against one and
two `hf-escrow serve` processes on the same SQLite file.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _table import median, percentile, show  # noqa: E402

import hf_escrow  # noqa: E402
from hf_escrow.ledger import Ledger  # noqa: E402
from hf_escrow.server import create_app  # noqa: E402
from hf_escrow.serving import serve_in_thread  # noqa: E402
from tests.liveserver import free_port, wait_http  # noqa: E402

THREADS = 4


def pair_latencies_ms(client, seller: str, count: int) -> list[float]:
    out = []
    for _ in range(count):
        start = time.perf_counter()
        escrow = client.create_escrow(seller, "0.01")
        client.release(escrow.id, "0.005")
        out.append((time.perf_counter() - start) * 1000)
    return out


def requests_per_s(urls: list[str], keys: dict, escrow_ids: list[str], total: int) -> float:
    clients = [(hf_escrow.connect(url, api_key=keys["seller"]), hf_escrow.connect(url, api_key=keys["buyer"]))
               for url in urls]

    def work(i: int) -> None:
        seller, buyer = clients[i % len(clients)]
        if i % 2:
            seller.deduct(escrow_ids[i % len(escrow_ids)], "0.000001")
        else:
            buyer.me()

    start = time.perf_counter()
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(work, range(total)))
    return total / (time.perf_counter() - start)


def start_servers(db: str, count: int) -> tuple[list[subprocess.Popen], list[str]]:
    procs, urls = [], []
    for _ in range(count):
        port = free_port()
        env = dict(os.environ, HF_ESCROW_DATABASE_URL=db)
        procs.append(subprocess.Popen([sys.executable, "-m", "uvicorn", "hf_escrow.server.app:create_app", "--factory",
                                       "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"], env=env))
        urls.append(f"http://127.0.0.1:{port}")
    for url in urls:
        wait_http(f"{url}/healthz", 60)
    return procs, urls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=150)
    parser.add_argument("--requests", type=int, default=400)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = f"sqlite:///{Path(tmp) / 'l.db'}"
        ledger = Ledger(db)
        keys = {name: ledger.register(name)["api_key"] for name in ("buyer", "seller")}
        ledger.deposit("buyer", "1000")
        embedded = pair_latencies_ms(hf_escrow.connect(agent="buyer", database_url=db), "seller", args.pairs)
        with serve_in_thread(create_app(ledger, sweep_interval_s=0, mcp=False)) as url:
            http = pair_latencies_ms(hf_escrow.connect(url, api_key=keys["buyer"]), "seller", args.pairs)
        escrow_ids = [ledger.create_escrow("buyer", "seller", "10")["id"] for _ in range(8)]
        rates = {}
        for count in (1, 2):
            procs, urls = start_servers(db, count)
            try:
                requests_per_s(urls, keys, escrow_ids, 20)  # warm up
                rates[count] = requests_per_s(urls, keys, escrow_ids, args.requests)
            finally:
                for proc in procs:
                    proc.terminate()
                    proc.wait(10)
    overhead = median(http) - median(embedded)
    show("escrow service benchmark", [
        ("create+release p50, embedded (ms)", f"{median(embedded):.2f}", ""),
        ("create+release p99, embedded (ms)", f"{percentile(embedded, 99):.2f}", ""),
        ("create+release p50, HTTP (ms)", f"{median(http):.2f}", ""),
        ("create+release p99, HTTP (ms)", f"{percentile(http, 99):.2f}", ""),
        ("HTTP overhead p50 (ms)", f"{overhead:.2f}", "goal <= 5 ms"),
        ("requests/s, 1 server process", f"{rates[1]:.0f}", f"{THREADS} client threads"),
        ("requests/s, 2 server processes", f"{rates[2]:.0f}", "same SQLite file"),
        ("2 / 1 processes", f"{rates[2] / rates[1]:.2f}x", ""),
    ])


if __name__ == "__main__":
    main()
