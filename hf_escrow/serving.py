"""Serve an ASGI app (the escrow server, a shard server, a gateway) in a background thread.

For scripts, notebooks and tests that need a real HTTP server on 127.0.0.1 next to their
own code, the way Gradio's ``launch(prevent_thread_lock=True)`` does for a Space.
"""

from __future__ import annotations

import contextlib
import importlib.util
import threading
import time
from typing import Any, Iterator

STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


@contextlib.contextmanager
def serve_in_thread(app: Any, *, host: str = "127.0.0.1", port: int = 0,
                    timeout_s: float = STARTUP_TIMEOUT_S) -> Iterator[str]:
    """Serve `app` with uvicorn for the length of a `with` block; yields its base URL.

    `port=0` takes a free port. Startup (the app's lifespan included) must finish within
    `timeout_s`; on exit the server is asked to stop and its thread joined.

    Example:
        >>> from hf_escrow.server import create_app
        >>> with serve_in_thread(create_app()) as url:  # doctest: +SKIP
        ...     httpx.get(url + "/healthz").json()
        {'ok': True}
    """
    import uvicorn
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server for {type(app).__name__} did not start within {timeout_s:g} s")
        time.sleep(0.02)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=STOP_TIMEOUT_S)


def fast_loop() -> dict:
    """uvicorn's options for uvloop's event loop and httptools' parser (dependencies of the
    server extra), or its pure-Python ones where a platform has neither (uvloop: not Windows)."""
    have = {name: importlib.util.find_spec(name) is not None for name in ("uvloop", "httptools")}
    return {"loop": "uvloop" if have["uvloop"] else "asyncio", "http": "httptools" if have["httptools"] else "h11"}


__all__ = ["fast_loop", "serve_in_thread"]
