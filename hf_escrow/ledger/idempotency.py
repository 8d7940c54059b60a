"""Idempotency records: one stored result per (agent, key), checked inside the mutation's
own database transaction so that a retry either finds the first result or redoes nothing.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import Connection, delete, insert, select

from .._exceptions import IdempotencyConflict, ValidationError
from .rules import is_text
from .schema import idempotency_keys

MAX_KEY_CHARS = 255
KEEP_MS = 48 * 3_600_000  # kept at least 24 h, as promised; swept after 48 h


def check_key(key: Any) -> str | None:
    if key is None:
        return None
    if not isinstance(key, str) or not 1 <= len(key) <= MAX_KEY_CHARS or not is_text(key):
        raise ValidationError(f"an idempotency key must be text of 1 to {MAX_KEY_CHARS} characters, without NUL "
                              "or lone surrogates")
    return key


def request_hash(op: str, request: dict) -> str:
    canonical = json.dumps({"op": op, **request}, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def lookup(conn: Connection, agent_id: str, key: str, digest: str) -> dict | None:
    """The stored result for this key, or None; a different request under it is refused."""
    row = conn.execute(
        select(idempotency_keys.c.request_hash, idempotency_keys.c.response)
        .where(idempotency_keys.c.agent_id == agent_id, idempotency_keys.c.key == key)
    ).first()
    if row is None:
        return None
    if row.request_hash != digest:
        raise conflict(key)
    return row.response


def conflict(key: str) -> IdempotencyConflict:
    return IdempotencyConflict(
        f"idempotency key {key!r} was already used for a different request; use a new key for a new request")


def store(conn: Connection, agent_id: str, key: str, digest: str, response: dict, now_ms: int) -> None:
    conn.execute(insert(idempotency_keys).values(
        agent_id=agent_id, key=key, request_hash=digest, response=response, created_at_ms=now_ms))


def purge(conn: Connection, now_ms: int) -> int:
    return conn.execute(delete(idempotency_keys).where(idempotency_keys.c.created_at_ms < now_ms - KEEP_MS)).rowcount
