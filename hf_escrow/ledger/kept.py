"""A connection kept open between transactions, for the ledger's hottest paths.

Checking a connection out of SQLAlchemy's pool and back in (reset, pre-ping, events)
costs more Python than a whole capture's statements do. The group committer runs one
transaction at a time, so it keeps one connection for itself, and key lookups keep
another (read-only): `begin()` hands the kept one out while nobody else holds it, and a
pooled one when it is busy (a caller's own batch running beside the group's). A connection that failed in any way is closed, never
reused; one idle longer than `max_idle_s` goes back to the pool, so that the next
transaction gets a pre-pinged one (a database restarted meanwhile is noticed there); a
forked child leaves its parent's alone.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Iterator

from sqlalchemy import Connection, Engine

MAX_IDLE_S = 1.0


class KeptConnection:
    """One connection of `engine`, kept between transactions (see the module)."""

    def __init__(self, engine: Engine, *, max_idle_s: float = MAX_IDLE_S):
        self._engine = engine
        self._max_idle_s = max_idle_s
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._used_at = 0.0
        self._pid = os.getpid()

    @contextlib.contextmanager
    def begin(self) -> Iterator[Connection]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        if not self._lock.acquire(blocking=False):
            with self._engine.begin() as conn:
                yield conn
            return
        try:
            conn = self._take()
            try:
                with conn.begin():
                    yield conn
            except BaseException:
                self._drop()
                raise
            self._used_at = time.monotonic()
        finally:
            self._lock.release()

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _take(self) -> Connection:
        if self._pid != os.getpid():
            # A forked child never touches its parent's connection (nor closes it): it opens its own.
            self._conn, self._pid = None, os.getpid()
        if self._conn is not None and time.monotonic() - self._used_at > self._max_idle_s:
            self._drop()
        if self._conn is None:
            self._conn = self._engine.connect()
        return self._conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # a connection already broken closes as it can
                conn.close()
