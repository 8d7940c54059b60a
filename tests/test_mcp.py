"""The MCP tools, driven by the official MCP SDK's own client: streamable HTTP at /mcp on
a live server (identity from the Authorization header) and stdio (`hf-escrow mcp`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
from pathlib import Path

import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from hf_escrow.ledger import Ledger
from hf_escrow.server import create_app

from .helpers import assert_audit_clean, snapshot
from .liveserver import serve_app

TOOLS = {"register_agent", "claim_faucet", "escrow_create", "escrow_release", "escrow_cancel", "escrow_deduct",
         "escrow_get", "escrow_history", "escrow_hold", "escrow_capture", "escrow_void", "escrow_holds",
         "escrow_mint_token", "escrow_revoke_tokens", "rotate_api_key", "escrow_submit_result", "escrow_verify",
         "key_mandate", "key_create", "key_list", "key_revoke"}
RUN_TIMEOUT_S = 60


def hf_escrow_exe() -> str:
    """The `hf-escrow` console script of this interpreter (`python -m hf_escrow.cli` has no main)."""
    beside = Path(sys.executable).with_name("hf-escrow")
    found = str(beside) if beside.exists() else shutil.which("hf-escrow")
    if not found:
        pytest.skip("the hf-escrow console script is not installed")
    return found


def run(coro, timeout_s: float = RUN_TIMEOUT_S):
    async def bounded():
        return await asyncio.wait_for(coro, timeout_s)
    return asyncio.run(bounded())


@contextlib.asynccontextmanager
async def mcp_session(base: str, key: str | None = None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=60)) as hc:
        async with Client(streamable_http_client(f"{base}/mcp", http_client=hc)) as client:
            yield client


async def ok(client, tool: str, args: dict) -> dict:
    result = await client.call_tool(tool, args)
    assert not result.is_error, result.content[0].text
    return result.structured_content


async def error(client, tool: str, args: dict) -> str:
    result = await client.call_tool(tool, args)
    assert result.is_error, result.structured_content
    return result.content[0].text


@pytest.fixture
def server(tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    with serve_app(create_app(ledger, sweep_interval_s=0)) as base:
        yield base, ledger
    ledger.close()


def test_http_tools_full_flow(server):
    base, ledger = server

    async def scenario():
        async with mcp_session(base) as anon:
            tools = (await anon.list_tools()).tools
            assert {t.name for t in tools} == TOOLS and len(tools) == len(TOOLS)
            assert all(t.description for t in tools)
            buyer = await ok(anon, "register_agent", {"agent_id": "mcp-buyer"})
            seller = await ok(anon, "register_agent", {"agent_id": "mcp-seller"})
            assert buyer["agent_id"] == "mcp-buyer" and buyer["api_key"].startswith("hfe_")
            assert seller["wallet"].startswith("0x") and buyer["api_key"] != seller["api_key"]
            # The seeds' register_agent: "register a new worker agent wallet and claim initial USDC".
            claim = buyer["claim"]
            assert claim["amount_micro"] == 10_000_000 and claim["amount_usdc"] == 10.0
            assert claim["balance_micro"] == 10_000_000 and claim["agent_id"] == "mcp-buyer"
            # A claim needs a key: a stranger cannot spend the buyer's allowance.
            text = await error(anon, "claim_faucet", {"agent_id": "mcp-buyer"})
            assert "unauthorized" in text
            # Without a key, escrow tools answer with an error result, not a crash.
            text = await error(anon, "escrow_history", {})
            assert "unauthorized" in text and "Authorization: Bearer" in text

        async with mcp_session(base, buyer["api_key"]) as b, mcp_session(base, seller["api_key"]) as s:
            e = await ok(b, "escrow_create", {"seller_id": seller["wallet"], "amount_usdc": "1.5",
                                              "meta": {"model": "gemma-3-270m"}, "ttl_seconds": 600})
            assert (e["status"], e["buyer"], e["seller"]) == ("active", "mcp-buyer", "mcp-seller")
            assert e["amount_micro"] == e["remaining_micro"] == 1_500_000 and e["escrow_id"] == e["id"]

            d = await ok(s, "escrow_deduct", {"escrow_id": e["id"], "amount_usdc": 0.25, "reason": "batch 1"})
            assert (d["kind"], d["status"]) == ("deduct", "active")
            assert (d["gross_micro"], d["fee_micro"], d["net_micro"]) == (250_000, 2_500, 247_500)
            assert d["remaining_micro"] == 1_250_000 and d["amount_paid"] == 0.25

            r = await ok(b, "escrow_release", {"escrow_id": e["id"], "amount_usdc": "0.5"})
            assert (r["kind"], r["status"]) == ("release", "released")
            assert (r["gross_micro"], r["net_micro"], r["refunded_micro"]) == (500_000, 495_000, 750_000)

            g = await ok(b, "escrow_get", {"escrow_id": e["id"]})
            assert (g["status"], g["paid_micro"], g["refunded_micro"], g["remaining_micro"], g["fees_micro"]) == \
                ("released", 750_000, 750_000, 0, 7_500)
            assert [ev["kind"] for ev in g["events"]] == ["created", "deducted", "released"]
            assert (await ok(s, "escrow_get", {"escrow_id": e["id"]}))["id"] == e["id"]  # the seller sees it too

            # Usage-priced release and a cancel.
            e2 = await ok(b, "escrow_create", {"seller_id": "mcp-seller", "amount_usdc": 0.01})
            r2 = await ok(b, "escrow_release", {"escrow_id": e2["id"], "prompt_tokens": 100,
                                                "completion_tokens": 400, "price_per_token": 0.000002})
            assert r2["gross_micro"] == 1_000 and r2["refunded_micro"] == 9_000
            e3 = await ok(b, "escrow_create", {"seller_id": "mcp-seller", "amount_usdc": 0.1})
            c3 = await ok(s, "escrow_cancel", {"escrow_id": e3["id"], "reason": "no capacity"})
            assert (c3["status"], c3["refunded_micro"], c3["gross_micro"], c3["payout_usdc"]) == \
                ("cancelled", 100_000, 0, None)

            # Escrow errors come back as error results carrying the ledger's message.
            e4 = await ok(b, "escrow_create", {"seller_id": "mcp-seller", "amount_usdc": 0.1})
            text = await error(s, "escrow_deduct", {"escrow_id": e4["id"], "amount_usdc": 0.2})
            assert "insufficient_funds (402)" in text and "cannot deduct 0.200000" in text
            text = await error(b, "escrow_deduct", {"escrow_id": e4["id"], "amount_usdc": 0.01})
            assert "forbidden (403)" in text and "only the seller" in text
            text = await error(s, "escrow_release", {"escrow_id": e4["id"]})
            assert "forbidden (403)" in text
            text = await error(b, "escrow_create", {"seller_id": "mcp-seller", "amount_usdc": 1_000})
            assert "insufficient_funds (402)" in text
            text = await error(b, "escrow_create", {"seller_id": "mcp-seller", "amount_usdc": -1})
            assert "invalid_amount (422)" in text and "negative" in text
            text = await error(b, "escrow_release", {"escrow_id": e["id"]})
            assert "state_conflict (409)" in text and "released" in text
            text = await error(b, "escrow_get", {"escrow_id": "esc_nope"})
            assert "not_found (404)" in text
            text = await error(b, "register_agent", {"agent_id": "mcp-buyer"})
            assert "already registered" in text
            text = await error(b, "claim_faucet", {})
            assert "rate_limited (429)" in text and "already claimed" in text
            text = await error(s, "claim_faucet", {"agent_id": "mcp-buyer"})
            assert "forbidden (403)" in text
            # With a key, register_agent makes the new agent the caller's own: the caller may claim for it.
            worker = await ok(s, "register_agent", {"agent_id": "mcp-worker"})
            assert worker["owner"] == "mcp-seller" and worker["claim"]["amount_micro"] == 10_000_000
            assert "already claimed" in await error(s, "claim_faucet", {"agent_id": "mcp-worker"})
            assert "forbidden (403)" in await error(b, "claim_faucet", {"agent_id": "mcp-worker"})
            after = await ok(b, "escrow_get", {"escrow_id": e4["id"]})
            assert (after["status"], after["remaining_micro"], after["paid_micro"]) == ("active", 100_000, 0)

            h = await ok(b, "escrow_history", {})
            assert h["count"] == 4 and [row["id"] for row in h["escrows"]][-1] == e["id"]
            h = await ok(b, "escrow_history", {"status": "cancelled"})
            assert [row["id"] for row in h["escrows"]] == [e3["id"]]

        async with mcp_session(base, "hfe_not_a_key") as wrong:
            assert "unknown API key" in await error(wrong, "escrow_get", {"escrow_id": e["id"]})

        # Rotation: the key the call used stops at once; the new one acts for the same agent.
        async with mcp_session(base, seller["api_key"]) as s:
            rotated = await ok(s, "rotate_api_key", {})
            assert rotated["agent_id"] == "mcp-seller" and rotated["api_key"] != seller["api_key"]
            assert "unknown API key" in await error(s, "escrow_history", {})
        async with mcp_session(base, rotated["api_key"]) as s:
            assert (await ok(s, "escrow_get", {"escrow_id": e["id"]}))["seller"] == "mcp-seller"

    run(scenario())
    assert_audit_clean(ledger)


@pytest.mark.parametrize("tool,args", [
    ("escrow_create", {"seller_id": "strict-seller", "amount_usdc": True}),
    ("escrow_create", {"seller_id": "strict-seller", "amount_usdc": False}),
    ("escrow_create", {"seller_id": "strict-seller", "amount_usdc": "1_000"}),
    ("escrow_create", {"seller_id": "strict-seller", "amount_usdc": "\u0661\u0660"}),
    ("escrow_create", {"seller_id": "strict-seller", "amount_usdc": "1", "ttl_seconds": True}),
    ("escrow_release", {"escrow_id": "{escrow}", "amount_usdc": True}),
    ("escrow_release", {"escrow_id": "{escrow}", "prompt_tokens": True, "price_per_token": "0.001"}),
    ("escrow_release", {"escrow_id": "{escrow}", "price_per_token": True, "prompt_tokens": 5}),
    ("escrow_release", {"escrow_id": "{escrow}", "quality_score": True}),
    ("escrow_release", {"escrow_id": "{escrow}", "refund_remainder": 1}),
    ("escrow_deduct", {"escrow_id": "{escrow}", "amount_usdc": True}),
    ("escrow_hold", {"escrow_id": "{escrow}", "amount_usdc": True}),
    ("escrow_history", {"limit": True}),
])
def test_booleans_and_exotic_digits_are_never_amounts(server, tool, args):
    """The finding: MCP took JSON `true` as 1 USDC."""
    base, ledger = server
    buyer = ledger.register("strict-buyer")["api_key"]
    ledger.register("strict-seller")
    ledger.deposit("strict-buyer", "50")
    escrow = ledger.create_escrow("strict-buyer", "strict-seller", "5")["id"]
    before = snapshot(ledger)
    args = {k: (v.format(escrow=escrow) if isinstance(v, str) and "{" in v else v) for k, v in args.items()}

    async def scenario():
        async with mcp_session(base, buyer) as client:
            return await error(client, tool, args)

    text = run(scenario())
    assert "invalid" in text.lower() or "validation" in text.lower(), text
    assert snapshot(ledger) == before

def test_stdio_server_lists_tools_and_acts_as_its_agent(tmp_path):
    url = f"sqlite:///{tmp_path / 'stdio.db'}"
    ledger = Ledger(url)
    ledger.register("desk-seller")
    ledger.close()
    params = StdioServerParameters(command=hf_escrow_exe(), args=["mcp", "--agent", "desk", "--database-url", url],
                                   env=dict(os.environ))

    async def scenario():
        async with Client(params) as client:
            assert {t.name for t in (await client.list_tools()).tools} == TOOLS
            registered = await ok(client, "register_agent", {"agent_id": "desk"})
            assert registered["claim"]["balance_micro"] == 10_000_000
            assert "rate_limited" in await error(client, "claim_faucet", {})
            e = await ok(client, "escrow_create", {"seller_id": "desk-seller", "amount_usdc": 2})
            assert e["buyer"] == "desk" and e["amount_micro"] == 2_000_000
            h = await ok(client, "escrow_history", {})
            assert [row["id"] for row in h["escrows"]] == [e["id"]]
            text = await error(client, "escrow_deduct", {"escrow_id": e["id"], "amount_usdc": 1})
            assert "forbidden (403)" in text
            return e["id"]

    escrow_id = run(scenario())
    ledger = Ledger(url)
    assert ledger.get("desk", escrow_id)["remaining_micro"] == 2_000_000
    assert_audit_clean(ledger)
    ledger.close()
