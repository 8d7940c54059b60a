"""Worker functions for the multi-process tests (top level, so that `spawn` can import them)."""

from __future__ import annotations

import random
import time

from hf_escrow import EscrowError
from hf_escrow.ledger import Ledger

MAX_OPS = 400
MAX_SECONDS = 60


def race(url: str, seed: int, escrow_ids: list[str], buyer: str, seller: str, ops: int) -> list[tuple]:
    """Random deduct/release/cancel/expire on shared escrows; returns what succeeded."""
    rng = random.Random(seed)
    ledger = Ledger(url)
    done: list[tuple] = []
    deadline = time.monotonic() + MAX_SECONDS
    for step in range(min(ops, MAX_OPS)):
        if time.monotonic() > deadline:
            break
        escrow_id = rng.choice(escrow_ids)
        action = rng.choices(["deduct", "shared_deduct", "release", "cancel", "expire"], [6, 3, 2, 1, 1])[0]
        try:
            if action == "deduct":
                r = ledger.deduct(seller, escrow_id, rng.randint(1, 40) * 10**-6 if rng.random() < 0.5 else "0.00001")
                done.append(("deduct", escrow_id, r["gross_micro"], None))
            elif action == "shared_deduct":
                # Every process sends the same key for the same slot: only one may take effect.
                slot = rng.randint(0, 4)
                r = ledger.deduct(seller, escrow_id, "0.000007", idempotency_key=f"{escrow_id}-slot-{slot}")
                done.append(("shared_deduct", escrow_id, r["gross_micro"], f"{escrow_id}-slot-{slot}"))
            elif action == "release":
                r = ledger.release(buyer, escrow_id, rng.randint(0, 30) * 10**-6,
                                   refund_remainder=rng.random() < 0.3)
                done.append(("release", escrow_id, r["gross_micro"], None))
            elif action == "cancel":
                ledger.cancel(buyer if rng.random() < 0.5 else seller, escrow_id)
                done.append(("cancel", escrow_id, 0, None))
            else:
                if ledger.expire(escrow_id):
                    done.append(("expire", escrow_id, 0, None))
        except EscrowError:
            pass  # refused operations (closed escrow, remainder too small) move nothing
    ledger.close()
    return done


def settle_forever(url: str, escrow_ids: list[str], buyer: str, seller: str) -> None:
    """Settle as fast as possible until killed (the SIGKILL test); bounded by MAX_SECONDS."""
    ledger = Ledger(url)
    deadline = time.monotonic() + MAX_SECONDS
    i = 0
    while time.monotonic() < deadline:
        escrow_id = escrow_ids[i % len(escrow_ids)]
        try:
            if i % 7 == 6:
                ledger.release(buyer, escrow_id, "0.000003", refund_remainder=False)
            else:
                ledger.deduct(seller, escrow_id, "0.000002")
        except EscrowError:
            pass
        i += 1


def sweep(url: str, rounds: int) -> int:
    """A sweeper process: expire due escrows until none are left (bounded); returns its count."""
    ledger = Ledger(url)
    total = 0
    for _ in range(rounds):
        count = ledger.expire_due(limit=50)
        total += count
        if count == 0:
            break
    ledger.close()
    return total
