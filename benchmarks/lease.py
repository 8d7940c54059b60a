"""The till's two ways to take payment, side by side: a hold per call (`Tab`) or a lease.

    python benchmarks/lease.py [--threads 64] [--calls 20] [--flush-ms 50] [--lease-calls 128]

`threads` callers each make `calls` calls on one escrow of an embedded SQLite ledger, with
no work in between (the till's own cost). Reported for each path: calls/s, the ledger
calls it made (holds, captures, capture_many), and per call the time the caller waited
(p50 / p95). The lease's money is checked after `close`: paid == calls x price, nothing
held, audit clean. The machine is shared and noisy: compare the two columns of one run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from _table import median, percentile, show  # noqa: E402

PRICE_MICRO = 10


def run(threads: int, calls: int, one_call) -> tuple[float, list[float]]:
    """calls/s of `threads` callers, and each call's wait in ms."""
    waits: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(threads + 1)

    def caller() -> None:
        mine = []
        barrier.wait()
        for _ in range(calls):
            started = time.perf_counter()
            one_call()
            mine.append((time.perf_counter() - started) * 1000)
        with lock:
            waits.extend(mine)

    workers = [threading.Thread(target=caller) for _ in range(threads)]
    for worker in workers:
        worker.start()
    barrier.wait()
    started = time.perf_counter()
    for worker in workers:
        worker.join()
    return threads * calls / (time.perf_counter() - started), waits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--flush-ms", type=float, default=50.0)
    parser.add_argument("--lease-calls", type=int, default=128)
    args = parser.parse_args()

    import hf_escrow
    from hf_escrow.ledger import audit
    from hf_escrow.seller.till import Till

    with tempfile.TemporaryDirectory() as tmp:
        db = f"sqlite:///{Path(tmp) / 'ledger.db'}"
        seller = hf_escrow.connect(agent="seller", database_url=db)
        seller.register()
        buyer = hf_escrow.connect(agent="buyer", database_url=db)
        buyer.register()
        ledger = hf_escrow.client.embedded_ledger(db)
        ledger.deposit("buyer", "100")
        total = args.threads * args.calls
        per_call_escrow, lease_escrow = (buyer.create_escrow("seller", "10", ttl_seconds=3600) for _ in range(2))
        till = Till(seller)

        def per_call() -> None:
            with till.open(per_call_escrow.spend_token, PRICE_MICRO) as tab:
                tab.finish(PRICE_MICRO)

        leases = till.leases(lease_calls=args.lease_calls, flush_ms=args.flush_ms)

        def leased() -> None:
            with leases.admit(lease_escrow.spend_token, PRICE_MICRO) as charge:
                charge.finish(PRICE_MICRO)

        tab_rate, tab_waits = run(args.threads, args.calls, per_call)
        lease_rate, lease_waits = run(args.threads, args.calls, leased)
        leases.close()
        paid = buyer.get(lease_escrow.id)
        if paid.paid != hf_escrow.money.to_usdc(total * PRICE_MICRO) or paid.held != 0:
            raise RuntimeError(f"the lease path paid {paid.paid} and holds {paid.held}")
        if not audit(ledger.engine)["ok"]:
            raise RuntimeError("audit failed")
        show(f"till: a hold per call vs a lease ({args.threads} threads x {args.calls} calls, embedded SQLite, "
             f"flush every {args.flush_ms:g} ms; shared, noisy machine)", [
                 ("per call: calls/s", f"{tab_rate:.0f}", "a hold and a capture per call"),
                 ("lease: calls/s", f"{lease_rate:.0f}", f"{lease_rate / tab_rate:.1f} x the per-call path"),
                 ("per call: ledger calls", f"{2 * total}", f"for {total} calls"),
                 ("lease: ledger calls", f"{leases.ledger_calls}", f"{leases.flushes} flushes; "
                                                                  f"{total / max(leases.ledger_calls, 1):.0f} calls each"),
                 ("per call: wait p50 / p95", f"{median(tab_waits):.2f} / {percentile(tab_waits, 95):.2f} ms", ""),
                 ("lease: wait p50 / p95", f"{median(lease_waits):.3f} / {percentile(lease_waits, 95):.3f} ms",
                  "in memory, unless the lease ran out of room"),
                 ("lease: paid exactly", f"{total} calls", f"{paid.paid} USDC, nothing held, audit clean"),
             ])


if __name__ == "__main__":
    main()
