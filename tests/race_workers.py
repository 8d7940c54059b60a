"""Worker functions for the multi-process tests (top level, so that `spawn` can import them)."""

from __future__ import annotations

import random
import time

from hf_escrow import EscrowError
from hf_escrow.ledger import Ledger
from hf_escrow.money import format_usdc

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


HOLD_TTLS_S = (1, 2, 3)
SHARED_SLOTS = 4
SHARED_HOLD, SHARED_CAPTURE = "0.002", "0.0005"


def hold_and_capture(url: str, seed: int, token: str, escrow_id: str, buyer: str, seller: str,
                     ops: int) -> dict:
    """Hold parts of one escrow and capture them (slices, finals, batches, voids, abandoned
    holds), racing other processes for a remainder too small for all of them.

    Some holds are shared: every process makes them under the same key, so they are the same
    hold, and captures from it race (without a key, and once under a shared key).
    Returns every capture that succeeded: (hold_id, gross_micro, key or None).
    """
    rng = random.Random(seed)
    ledger = Ledger(url)
    captured: list[tuple[str, int, str | None]] = []
    refused = 0
    deadline = time.monotonic() + MAX_SECONDS
    for _ in range(min(ops, MAX_OPS)):
        if time.monotonic() > deadline:
            break
        try:
            if rng.random() < 0.25:
                _shared_hold(ledger, rng, token, seller, captured)
            else:
                _own_hold(ledger, rng, token, escrow_id, buyer, seller, captured)
        except EscrowError:
            refused += 1  # the remainder or the hold was too small, or another process closed the hold
        if rng.random() < 0.1:
            ledger.expire_due()
    ledger.close()
    return {"captured": captured, "refused": refused}


def _shared_hold(ledger: Ledger, rng: random.Random, token: str, seller: str, captured: list) -> None:
    slot = rng.randrange(SHARED_SLOTS)
    hold = ledger.hold(seller, token, SHARED_HOLD, ttl_seconds=3, idempotency_key=f"shared-hold-{slot}")
    key = f"shared-capture-{slot}"
    receipt = ledger.capture(seller, hold["id"], SHARED_CAPTURE, idempotency_key=key)
    captured.append((hold["id"], receipt["gross_micro"], key))
    receipt = ledger.capture(seller, hold["id"], format_usdc(rng.randint(1, 300)))
    captured.append((hold["id"], receipt["gross_micro"], None))


def _own_hold(ledger: Ledger, rng: random.Random, token: str, escrow_id: str, buyer: str, seller: str,
              captured: list) -> None:
    agent, target = (buyer, escrow_id) if rng.random() < 0.2 else (seller, token)
    hold = ledger.hold(agent, target, format_usdc(rng.randint(200, 2_500)), ttl_seconds=rng.choice(HOLD_TTLS_S))
    mode = rng.choice(["slices", "batch", "void", "abandon"])
    if mode == "void":
        ledger.void(agent, hold["id"])
    elif mode == "batch":
        items = [(hold["id"], format_usdc(rng.randint(1, 500))), (hold["id"], format_usdc(rng.randint(1, 500)), True),
                 ("hold_" + "0" * 24, "0.000001")]
        for item in ledger.capture_many(agent, items)["results"]:
            if item["ok"]:
                captured.append((hold["id"], item["receipt"]["gross_micro"], None))
    elif mode == "slices":
        for _ in range(rng.randint(1, 3)):
            receipt = ledger.capture(agent, hold["id"], format_usdc(rng.randint(1, 700)))
            captured.append((hold["id"], receipt["gross_micro"], None))
            if receipt["hold"]["status"] != "open":
                return
        ledger.capture(agent, hold["id"], 0, final=True)


def lock_with_key(url: str, api_key: str, seller: str, amount: str, barrier, ops: int) -> dict:
    """A sub-agent process: lock escrows with one budgeted key until its budget refuses thrice."""
    from hf_escrow import BudgetExceeded
    ledger = Ledger(url)
    identity = ledger.authenticate(api_key)
    barrier.wait(timeout=MAX_SECONDS)  # every process starts at the same moment
    created, refused = [], 0
    deadline = time.monotonic() + MAX_SECONDS
    for _ in range(min(ops, MAX_OPS)):
        if refused >= 3 or time.monotonic() > deadline:
            break
        try:
            created.append(ledger.create_escrow(identity, seller, amount, ttl_seconds=3600)["id"])
        except BudgetExceeded:
            refused += 1
    ledger.close()
    return {"created": created, "refused": refused}


def milestone_race(url: str, escrow_ids: list[str], buyer: str, seller: str, artifact: dict,
                   start_at: float) -> dict:
    """Submit milestone 1 of each escrow, then verify it, as every other process does at once
    (all start at the wall-clock time `start_at`).

    Returns the escrows whose submit this process won and the verdicts it recorded."""
    ledger = Ledger(url)
    time.sleep(min(max(0.0, start_at - time.time()), MAX_SECONDS))
    won: dict[str, list] = {"submitted": [], "verified": []}
    deadline = time.monotonic() + MAX_SECONDS
    for escrow_id in escrow_ids[:MAX_OPS]:
        if time.monotonic() > deadline:
            break
        try:
            ledger.submit_result(seller, escrow_id, metric="accuracy", score=0.9, artifact=artifact, milestone=1)
            won["submitted"].append(escrow_id)
        except EscrowError:
            pass  # another process submitted it first (or it was already paid)
        try:
            won["verified"].append((escrow_id, ledger.verify(buyer, escrow_id, score=0.9)["gross_micro"]))
        except EscrowError:
            pass  # not awaiting verification (yet, or any more)
    ledger.close()
    return won


GROUP_THREADS = 8


def capture_in_groups_forever(url: str, token: str, seller: str, threads: int = GROUP_THREADS) -> None:
    """Threads that hold and capture (each under its own key) until killed; concurrent
    captures are group-committed. Bounded by MAX_SECONDS."""
    import threading

    ledger = Ledger(url)
    deadline = time.monotonic() + MAX_SECONDS

    def worker(n: int) -> None:
        i = 0
        while time.monotonic() < deadline:
            try:
                hold = ledger.hold(seller, token, "0.000010", idempotency_key=f"h-{n}-{i}")
                ledger.capture(seller, hold["id"], "0.000010", final=True, idempotency_key=f"c-{n}-{i}")
            except EscrowError:
                pass
            i += 1

    pool = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()


def read_shards_on_key(url: str, api_key: str, shard_url: str, names: list[str], barrier) -> dict:
    """A sub-agent process: read paid shards through its own AutoPay on a budgeted key it
    shares with other processes, until the ledger refuses the key's budget."""
    import httpx

    import hf_escrow
    from hf_escrow import AutoPay, BudgetExceeded
    agent = hf_escrow.connect(database_url=url, api_key=api_key)
    pay = AutoPay.from_key(agent, calls_per_escrow=3)      # each process sees the key's whole budget left
    barrier.wait(timeout=MAX_SECONDS)
    read, statuses, refusal = 0, [], None
    deadline = time.monotonic() + MAX_SECONDS
    with pay, httpx.Client(auth=pay.auth, timeout=30) as http:
        for name in names[:MAX_OPS]:
            if time.monotonic() > deadline:
                break
            try:
                answer = http.get(f"{shard_url}/{name}")
            except BudgetExceeded as refused:
                refusal = {"message": refused.message, "left_micro": refused.details.get("left_micro")}
                break
            statuses.append(answer.status_code)
            read += answer.status_code == 200
    return {"read": read, "statuses": statuses, "refusal": refusal, "escrow_ids": pay.escrow_ids,
            "mandate_budget_micro": pay.mandate.budget_micro, "locked_micro": pay.locked_micro}


def paid_chat_calls(url: str, upstream: str, escrow_id: str, buyer: str, pricing: dict, messages: list,
                    barrier, calls: int) -> dict:
    """Chat completions through `PaidInferenceClient` on an escrow other processes share.

    Returns each served call's usage and what its receipt says was taken, and how many were
    refused (InsufficientFunds, before the model was called).
    """
    from hf_escrow import InsufficientFunds, PaidInferenceClient, connect
    client = PaidInferenceClient(upstream, escrow=connect(agent=buyer, database_url=url), escrow_id=escrow_id,
                                 pricing=pricing)
    served, refused = [], 0
    barrier.wait(timeout=MAX_SECONDS)  # both processes start calling at the same moment
    deadline = time.monotonic() + MAX_SECONDS
    for step in range(min(calls, MAX_OPS)):
        if time.monotonic() > deadline:
            break
        try:
            out = client.chat_completion(messages, max_tokens=4 + step % 5)
        except InsufficientFunds:
            refused += 1
            continue
        receipt = client.receipts[-1]
        served.append({"usage": (out.usage.prompt_tokens, out.usage.completion_tokens),
                       "receipt": (receipt.tokens_in, receipt.tokens_out, str(receipt.gross), str(receipt.bonus))})
    return {"served": served, "refused": refused}
