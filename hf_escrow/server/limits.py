"""What the server refuses before the ledger sees a request: bodies over a size, and more
registrations or claims from one client (or from all) than a window allows."""

from __future__ import annotations

import collections
import ipaddress
import math
import threading
import time
from typing import Callable

from starlette.exceptions import HTTPException

from .._exceptions import RateLimited

DEFAULT_MAX_BODY_BYTES = 1 << 20


class BodyTooLarge(HTTPException):
    """Raised from `receive` once a body passes the cap: FastAPI re-raises HTTPExceptions met
    while reading a body, so the route never runs on a cut-off body."""

    def __init__(self, max_bytes: int):
        # Closed after the answer: the rest of the body is not worth reading to keep the connection.
        super().__init__(413, f"the request body is over the limit of {max_bytes} bytes; send less",
                         headers={"Connection": "close"})


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes` with 413: a declared Content-Length at once,
    a chunked body as soon as its chunks add up past the cap (it is never read whole)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if _content_length(scope) > self.max_bytes:
            return await _send_413(send, self.max_bytes)
        seen = 0
        started = False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge:
            # An app that let the refusal through (a mounted one): answer for it if it has not.
            if not started:
                await _send_413(send, self.max_bytes)


def _content_length(scope) -> int:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0  # the HTTP server refuses a malformed length before the app
    return 0


async def _send_413(send, max_bytes: int) -> None:
    body = (b'{"error":"payload_too_large","message":"the request body is over the limit of %d bytes; '
            b'send less"}' % max_bytes)
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


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
