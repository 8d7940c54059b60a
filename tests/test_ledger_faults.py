"""Fault injection: the database connection breaks at every statement boundary of every
write operation, alone and inside a group; the retry under the same idempotency key
applies each operation exactly once, and the audit is clean after every fault.

A fault comes just before the k-th statement (or the commit) of the operation: on
PostgreSQL the driver's connection is closed, so the statement fails as a lost connection
does; on SQLite (a file, no connection to lose) the statement fails as a failed write does.
"""

from __future__ import annotations

import contextlib
import functools
import random
import sqlite3

import pytest
from sqlalchemy import event

from hf_escrow.ledger import sql as ledger_sql

from .helpers import assert_audit_clean, parties
from .holds_helpers import hold_snapshot

MAX_BOUNDARIES = 40


class Broken(Exception):
    """What the operation raised because of the injected fault (any error will do)."""


@contextlib.contextmanager
def break_at(ledger, boundary: int):
    """Close the connection before the `boundary`-th statement or commit; yields a counter."""
    seen = {"n": 0, "fired": False}

    def tick(conn) -> None:
        seen["n"] += 1
        if seen["n"] == boundary and not seen["fired"]:
            seen["fired"] = True
            if conn.dialect.name == "sqlite":
                raise sqlite3.OperationalError("disk I/O error (injected)")
            conn.connection.driver_connection.close()

    def before_cursor(conn, cursor, statement, params, context, executemany):
        tick(conn)

    def before_commit(conn):
        tick(conn)

    real_execute, real_many = ledger_sql.execute, ledger_sql.execute_many

    def execute(conn, statement, params=None):
        tick(conn)
        return real_execute(conn, statement, params)

    def execute_many(conn, statement, rows):
        if rows:
            tick(conn)
        return real_many(conn, statement, rows)

    event.listen(ledger.engine, "before_cursor_execute", before_cursor)
    event.listen(ledger.engine, "commit", before_commit)
    ledger_sql.execute, ledger_sql.execute_many = execute, execute_many
    try:
        yield seen
    finally:
        ledger_sql.execute, ledger_sql.execute_many = real_execute, real_many
        event.remove(ledger.engine, "before_cursor_execute", before_cursor)
        event.remove(ledger.engine, "commit", before_commit)


def _call(prepared, key):
    return prepared[0](prepared[1], key)


def _state(ledger) -> dict:
    return hold_snapshot(ledger)


def _check_fault(ledger, call, key_name: str, prepare=None) -> None:
    """For every boundary k: break at k, then retry; the result and the state are those of one run.

    `prepare(key)` makes what the call works on (a hold, an escrow) before the fault armed."""
    for boundary in range(1, MAX_BOUNDARIES):
        if prepare is not None:
            prepared = prepare(f"{key_name}-{boundary}")
            call = functools.partial(_call, prepared)
        before = _state(ledger)
        with break_at(ledger, boundary) as seen:
            try:
                first = call(f"{key_name}-{boundary}")
            except Exception:  # the injected fault, as the caller would see it
                first = None
        assert_audit_clean(ledger)
        if not seen["fired"]:
            return  # past the operation's last boundary: it ran whole
        after_fault = _state(ledger)
        again = call(f"{key_name}-{boundary}")
        assert_audit_clean(ledger)
        if first is not None:
            assert again == first
        # Applied at most once by the fault and exactly once by the retry: a replay changes nothing.
        settled = _state(ledger)
        assert call(f"{key_name}-{boundary}") == again and _state(ledger) == settled
        assert after_fault in (before, settled)
    raise AssertionError("the operation has more boundaries than the test tries")


@pytest.fixture
def world(ledger):
    parties(ledger, "buyer", "seller", fund="100")
    return ledger


def test_hold_capture_void_deduct_survive_a_break_at_every_boundary(world):
    ledger = world
    e = ledger.create_escrow("buyer", "seller", "50", ttl_seconds=3600)
    token = e["spend_token"]
    _check_fault(ledger, lambda key: ledger.hold("seller", token, "0.01", idempotency_key=key), "hold")

    def hold(key):
        return ledger.hold("seller", token, "0.02", idempotency_key="for-" + key)["id"]
    _check_fault(ledger, None, "capture", lambda key: (
        lambda hold_id, k: ledger.capture("seller", hold_id, "0.015", final=True, idempotency_key=k), hold(key)))
    _check_fault(ledger, None, "void", lambda key: (
        lambda hold_id, k: ledger.void("seller", hold_id, idempotency_key=k), hold(key)))
    _check_fault(ledger, lambda key: ledger.deduct("seller", e["id"], "0.01", idempotency_key=key), "deduct")


def test_release_and_cancel_survive_a_break_at_every_boundary(world):
    ledger = world

    def escrow(key):
        return ledger.create_escrow("buyer", "seller", "0.1", idempotency_key="for-" + key)["id"]
    _check_fault(ledger, None, "release", lambda key: (
        lambda escrow_id, k: ledger.release("buyer", escrow_id, "0.04", idempotency_key=k), escrow(key)))
    _check_fault(ledger, None, "cancel", lambda key: (
        lambda escrow_id, k: ledger.cancel("seller", escrow_id, idempotency_key=k), escrow(key)))


def test_expiry_survives_a_break_at_every_boundary(world, clock):
    ledger = world
    for boundary in range(1, MAX_BOUNDARIES):
        e = ledger.create_escrow("buyer", "seller", "0.1", ttl_seconds=10)
        hold = ledger.hold("seller", e["spend_token"], "0.03", ttl_seconds=5)
        clock.advance(11 + ledger.config.hold_grace_s)
        with break_at(ledger, boundary) as seen:
            try:
                ledger.expire_due()
            except Exception:
                pass
        assert_audit_clean(ledger)
        ledger.expire_due()  # the sweeper's next round finishes the job, once
        assert_audit_clean(ledger)
        view = ledger.get("buyer", e["id"])
        assert (view["status"], view["refunded_micro"], view["held_micro"]) == ("expired", 100_000, 0)
        assert ledger.get_hold("seller", hold["id"])["status"] == "expired"
        if not seen["fired"]:
            return
    raise AssertionError("expiry has more boundaries than the test tries")


def test_a_group_survives_a_break_at_every_boundary(world):
    """Several callers' operations in one transaction: the break takes all of them or none."""
    ledger = world
    rng = random.Random(7)
    e = ledger.create_escrow("buyer", "seller", "50", ttl_seconds=3600)
    for boundary in range(1, MAX_BOUNDARIES):
        holds = [ledger.hold("seller", e["spend_token"], "0.01")["id"] for _ in range(3)]

        def group(tag: str) -> list:
            ops = [ledger._operation("capture", "seller", {"hold_id": h, "amount_micro": rng.choice([5_000, 10_000]),
                                                           "final": True, "usage": [0, 0]}, f"{tag}-c{i}", h)
                   for i, h in enumerate(holds)]
            ops.append(ledger._deduct_operation("seller", e["id"], "0.001", None, None, f"{tag}-d"))
            ops.append(ledger._operation("hold", "seller", {"target": e["id"], "amount_micro": 1_000,
                                                            "ttl_ms": 60_000}, f"{tag}-h", e["id"]))
            ledger._settle(ops)
            return [op.result for op in ops]

        before = _state(ledger)
        with break_at(ledger, boundary) as seen:
            try:
                group(f"g{boundary}")
            except Exception:
                pass
        assert_audit_clean(ledger)
        assert _state(ledger) == before or not seen["fired"]
        if not seen["fired"]:
            return
        rng = random.Random(7)
        results = group(f"g{boundary}")
        assert all(r is not None for r in results)
        assert_audit_clean(ledger)
    raise AssertionError("a group has more boundaries than the test tries")
