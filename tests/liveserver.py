"""A real uvicorn server on 127.0.0.1 in a background thread, for tests."""

from __future__ import annotations

import contextlib
import socket
import time

import httpx

from hf_escrow.serving import serve_in_thread


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_app(app, port: int | None = None):
    """Serve an ASGI app on 127.0.0.1; yields its base URL; stops it on exit."""
    return serve_in_thread(app, port=port or 0)


def wait_http(url: str, timeout_s: float = 60) -> None:
    """Poll `url` until it answers 200 (bounded in time)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s")
