"""Seller processes that take payment through leases (spawned by tests/test_lease.py)."""

from __future__ import annotations

import os
import threading

import hf_escrow
from hf_escrow import EscrowError
from hf_escrow.seller.till import Till

MAX_CALLS = 2_000


def call_until_refused(url: str, seller: str, token: str, price: int, threads: int, barrier) -> dict:
    """`threads` callers on one Leases, each calling until the escrow refuses; returns what was delivered."""
    client = hf_escrow.connect(agent=seller, database_url=url)
    leases = Till(client).leases(lease_calls=8, flush_ms=5, flush_calls=16)
    delivered, refused, lock = [0], [0], threading.Lock()

    def caller() -> None:
        for _ in range(MAX_CALLS):
            try:
                with leases.admit(token, price) as charge:
                    charge.finish(price)
                    with lock:
                        delivered[0] += 1
            except EscrowError:
                with lock:
                    refused[0] += 1
                return

    barrier.wait()
    workers = [threading.Thread(target=caller) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    leases.close()
    return {"delivered": delivered[0], "refused": refused[0]}


def call_until_killed(url: str, seller: str, token: str, price: int, log_path: str, max_unpaid: int) -> None:
    """Calls forever on one lease; each call is written to `log_path` before it is charged.

    Flushes come only from `flush_calls` (the timer is an hour), so what a kill loses is
    bounded by calls, not by time.
    """
    client = hf_escrow.connect(agent=seller, database_url=url)
    leases = Till(client).leases(lease_calls=64, flush_ms=3_600_000, flush_calls=max_unpaid // 2,
                                 max_unpaid=max_unpaid)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    lock = threading.Lock()

    def caller() -> None:
        for _ in range(10 * MAX_CALLS):
            with leases.admit(token, price) as charge:
                with lock:
                    os.write(fd, b"1\n")
                charge.finish(price)

    workers = [threading.Thread(target=caller, daemon=True) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
