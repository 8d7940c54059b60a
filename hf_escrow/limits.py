"""Rates per client: at most so many events (registrations, claims, test escrows) from one
client, and from all, within a sliding window. Framework-free: the server and the Space
helpers share it.

These limits live in one process's memory: N server workers allow N times as much. They
bound what a flood costs; the ledger's own checks (one faucet claim per agent per
interval) hold across processes.
"""

from __future__ import annotations

import collections
import ipaddress
import math
import threading
import time
from typing import Callable

from ._exceptions import RateLimited

__all__ = ["WindowLimiter", "client_key", "is_loopback"]


def client_key(host: str | None) -> str:
    """Who a request comes from, for limits: its IP; an IPv6 client by its /64, which one
    subscriber usually holds whole."""
    if not host:
        return "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 6 and not address.is_loopback:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


class WindowLimiter:
    """At most `per_client` events per client and `overall` events in all within any
    `window_s` seconds (a sliding log). Memory stays bounded by `overall`: only accepted
    events are kept, and each expires with the window."""

    def __init__(self, what: str, *, per_client: int, overall: int, window_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.what = what
        self.per_client, self.overall, self.window_s = per_client, overall, window_s
        self.clock = clock
        self._events: collections.deque[tuple[float, str]] = collections.deque()
        self._by_client: dict[str, collections.deque[float]] = {}
        self._lock = threading.Lock()

    def take(self, client: str) -> None:
        """Count one event for `client`, or raise RateLimited with the seconds to wait."""
        with self._lock:
            now = self.clock()
            self._forget(now - self.window_s)
            mine = self._by_client.get(client)
            if mine is not None and len(mine) >= self.per_client:
                raise self._refused(mine[0], now, f"{self.per_client} {self.what} per client")
            if len(self._events) >= self.overall:
                raise self._refused(self._events[0][0], now, f"{self.overall} {self.what} from all clients")
            self._events.append((now, client))
            self._by_client.setdefault(client, collections.deque()).append(now)

    def _forget(self, cutoff: float) -> None:
        # Events go in in time order, globally and per client: the oldest of all is also
        # the oldest of its client.
        while self._events and self._events[0][0] <= cutoff:
            _, client = self._events.popleft()
            mine = self._by_client[client]
            mine.popleft()
            if not mine:
                del self._by_client[client]

    def _refused(self, oldest: float, now: float, limit: str) -> RateLimited:
        wait_s = max(1, math.ceil(oldest + self.window_s - now))
        return RateLimited(f"too many requests: at most {limit} every {self.window_s:g} s; "
                           f"try again in {wait_s} s", details={"retry_after_s": wait_s})
