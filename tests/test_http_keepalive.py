"""Both `connect(url)` transports keep their connection to the server alive: a run of calls
rides one TCP connection (one client port as the server sees it), not one per call."""

from __future__ import annotations

import asyncio

import hf_escrow
from hf_escrow.ledger import Ledger
from hf_escrow.server import create_app

from .liveserver import serve_app

CALLS = 6


class _Peers:
    """An ASGI wrapper that notes the client address of every HTTP request."""

    def __init__(self, app):
        self.app, self.seen = app, []

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/api/"):
            self.seen.append(tuple(scope["client"]))
        await self.app(scope, receive, send)


def test_sync_and_async_clients_reuse_one_connection(sqlite_url):
    ledger = Ledger(sqlite_url)
    key = ledger.register("agent")["api_key"]
    peers = _Peers(create_app(ledger, sweep_interval_s=0, mcp=False))
    with serve_app(peers) as url:
        with hf_escrow.connect(url, api_key=key) as client:
            balances = [client.me().balance for _ in range(CALLS)]
        sync_peers = list(peers.seen)

        async def run() -> list:
            async with hf_escrow.connect_async(url, api_key=key) as client:
                return [(await client.me()).balance for _ in range(CALLS)]

        async_balances = asyncio.run(run())
        async_peers = peers.seen[len(sync_peers):]
    ledger.close()
    assert balances == async_balances and len(balances) == CALLS
    assert len(sync_peers) == CALLS and len(set(sync_peers)) == 1
    assert len(async_peers) == CALLS and len(set(async_peers)) == 1
    assert sync_peers[0] != async_peers[0]  # two clients, two connections: the port tells them apart
