"""One corpus of hostile values, sent through every face of the ledger: each field of each
JSON route of the HTTP API, each argument of each embedded client method, each MCP tool.

Lone surrogates, NUL, integers beyond 2^63 and 10^400, huge and deeply nested values,
booleans as amounts, non-ASCII digits. Properties: HTTP never answers >= 500 and every
refusal is `{error, message}`; the embedded client raises only `EscrowError`s; MCP tools
answer tool errors, never crash; a refusal moves nothing; the audit is clean at the end.
"""

from __future__ import annotations

import asyncio
import inspect
import json

import pytest

import hf_escrow
from hf_escrow import EscrowError
from hf_escrow.client import EmbeddedTransport, EscrowClient

from .helpers import assert_audit_clean, snapshot
from .test_service_fuzz import World, http, world  # noqa: F401  (the fuzz world's fixtures, one per module)

DEEP = 1
for _ in range(200):
    DEEP = [DEEP]

HOSTILE = {
    "lone surrogate": "\ud800", "surrogate in text": "ok\udfffok", "nul": "a\x00b", "int64+1": 2 ** 63,
    "-int64-1": -(2 ** 63) - 1, "10^400": 10 ** 400, "-10^400": -(10 ** 400), "true": True, "false": False,
    "null": None, "list": [1, "2"], "object": {"a": "\ud800"}, "deep": DEEP, "long text": "x" * 100_000,
    "arabic-indic digits": "١٢٣", "underscored digits": "1_000", "nan text": "NaN", "empty": "",
    "float max": 1.7976931348623157e308, "tiny": 5e-324,
}
BIG_DIGITS = b'{"amount_usdc": ' + b"9" * 5_000 + b"}"   # past Python's int-parsing digit limit


def _json_routes(world: World) -> list[tuple[str, str, list[str]]]:
    """(method, path template, body fields) of every route whose body is a JSON object."""
    spec = world.app.openapi()
    schemas = spec["components"]["schemas"]
    routes = []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            ref = (((operation.get("requestBody") or {}).get("content") or {}).get("application/json") or {}) \
                .get("schema", {})
            ref = ref.get("$ref") or next((s.get("$ref") for s in ref.get("anyOf", []) if "$ref" in s), None)
            if ref:
                fields = list(schemas[ref.rsplit("/", 1)[-1]].get("properties", {}))
                routes.append((method.upper(), path, fields))
    return routes


def _fill(world: World, path: str) -> tuple[str, str]:
    """A concrete path for a template, and the agent whose key a request on it carries."""
    world.refresh()
    agent = "buyer"
    if path.endswith(("/deduct", "/submit-result")) or path.startswith("/api/holds"):
        agent = "seller"
    if path.endswith("/verify"):
        agent = "verifier"
    escrow = world.benchmark if path.endswith(("/submit-result", "/verify")) else world.plain
    return path.replace("{escrow_id}", escrow).replace("{hold_id}", world.hold), agent


def _check_answer(world: World, response, before: dict, what: str) -> None:
    assert response.status_code < 500, (what, response.status_code, response.text[:300])
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body, dict) and body.get("error") and body.get("message"), (what, response.text[:300])
        assert snapshot(world.ledger) == before, (what, response.text[:300])


def test_every_field_of_every_json_route_refuses_hostile_values_cleanly(world, http):
    routes = _json_routes(world)
    assert len(routes) >= 15, routes   # the corpus really covers the API
    sent = 0
    for method, template, fields in routes:
        for field in fields:
            for name, value in HOSTILE.items():
                path, agent = _fill(world, template)
                before = snapshot(world.ledger)
                raw = json.dumps({field: value})    # lone surrogates travel as \ud800 escapes
                response = http.request(method, path, content=raw.encode(), headers={
                    "Authorization": f"Bearer {world.keys[agent]}", "Content-Type": "application/json"})
                _check_answer(world, response, before, f"{method} {template} {field}={name}")
                sent += 1
    assert sent > 500


def test_bodies_no_parser_can_take_are_refused(world, http):
    path, agent = _fill(world, "/api/escrow/{escrow_id}/deduct")
    for raw in (BIG_DIGITS, b'{"amount_usdc": "\\ud800"}', b'{"reason": "\\u0000"}', b"[" * 10_000 + b"]" * 10_000,
                b'{"amount_usdc": 1e999999}'):
        before = snapshot(world.ledger)
        response = http.post(path, content=raw, headers={"Authorization": f"Bearer {world.keys[agent]}"})
        _check_answer(world, response, before, raw[:40])
        assert response.status_code in (413, 422), (raw[:40], response.status_code)


def test_a_two_mebibyte_body_is_refused_before_it_is_read(world, http):
    before = snapshot(world.ledger)
    response = http.post("/register", content=b'{"agent_id": "' + b"a" * (2 * 1024 * 1024) + b'"}')
    assert response.status_code == 413, response.text[:200]
    _check_answer(world, response, before, "2 MiB register")


# ---- the embedded client ----------------------------------------------------------------

_CLIENT_OPS = ["create_escrow", "deduct", "release", "cancel", "submit_result", "verify", "get", "history",
               "hold", "capture", "void", "capture_many", "get_hold", "holds", "mint_spend_token",
               "revoke_spend_tokens", "register", "create_key", "revoke_key", "keys", "mandate"]


def _valid_args(world: World, op: str) -> dict:
    world.refresh()
    return {
        "create_escrow": {"seller": "seller", "amount": "0.1"},
        "deduct": {"escrow_id": world.plain, "amount": "0.000001"},
        "release": {"escrow_id": world.plain, "amount": "0.000001", "refund_remainder": False},
        "cancel": {"escrow_id": "esc_unknown"},
        "submit_result": {"escrow_id": world.benchmark, "metric": "accuracy", "score": 0.1},
        "verify": {"escrow_id": world.benchmark, "score": 0.1},
        "get": {"escrow_id": world.plain}, "history": {},
        "hold": {"target": world.plain, "amount": "0.000001"},
        "capture": {"hold_id": world.hold, "amount": "0.000001"},
        "void": {"hold_id": "hold_unknown"}, "capture_many": {"items": [(world.hold, "0.000001", False)]},
        "get_hold": {"hold_id": world.hold}, "holds": {"escrow_id": world.plain},
        "mint_spend_token": {"escrow_id": world.plain}, "revoke_spend_tokens": {"escrow_id": "esc_unknown"},
        "register": {"agent_id": "fresh-agent"},
        "create_key": {"budget": "0.1", "sellers": ["seller"], "max_escrow": "0.1", "expires_in": 60},
        "revoke_key": {"key_id": "key_unknown"}, "keys": {}, "mandate": {"key_id": "key_unknown"},
    }[op]


def test_the_embedded_client_raises_only_escrow_errors(world):
    roles = {"deduct": "seller", "submit_result": "seller", "verify": "verifier", "hold": "seller",
             "capture": "seller", "void": "seller", "capture_many": "seller", "get_hold": "seller"}
    tried = 0
    for op in _CLIENT_OPS:
        client = EscrowClient(EmbeddedTransport(world.ledger), agent=roles.get(op, "buyer"))
        method = getattr(client, op)
        for param in inspect.signature(method).parameters:
            for name, value in HOSTILE.items():
                args = dict(_valid_args(world, op), **{param: value})
                before = snapshot(world.ledger)
                try:
                    method(**args)
                except EscrowError:
                    assert snapshot(world.ledger) == before, (op, param, name)
                tried += 1
    assert tried > 1_000


# ---- MCP --------------------------------------------------------------------------------

MCP_HOSTILE_TIMEOUT_S = 300   # every tool x argument x value, a ledger snapshot each: minutes under load

def test_mcp_tools_answer_tool_errors_for_hostile_arguments(world):
    from .liveserver import serve_app
    from .test_mcp import mcp_session, run

    async def drive(url: str) -> int:
        calls = 0
        async with mcp_session(url, world.keys["buyer"]) as client:
            tools = (await client.list_tools()).tools
            for tool in tools:
                for arg in tool.input_schema.get("properties", {}):
                    for name, value in HOSTILE.items():
                        if name in ("deep", "long text", "lone surrogate", "surrogate in text", "object"):
                            # The JSON-RPC layer's own limits, and text the SDK client itself cannot
                            # encode: the same values reach the same ledger checks over HTTP above.
                            continue
                        world.refresh()
                        before = snapshot(world.ledger)
                        result = await client.call_tool(tool.name, {arg: value})
                        if result.is_error:
                            assert snapshot(world.ledger) == before, (tool.name, arg, name)
                        calls += 1
        return calls

    from hf_escrow.server import create_app
    with serve_app(create_app(world.ledger, sweep_interval_s=0)) as url:   # the fuzz world's app has no MCP
        assert run(drive(url), timeout_s=MCP_HOSTILE_TIMEOUT_S) > 300


def test_hostile_inputs_leave_the_ledger_balanced(world):
    report = assert_audit_clean(world.ledger)
    assert report["transactions"] > 0


def test_async_client_raises_only_escrow_errors_too(world):
    client = hf_escrow.connect_async(database_url=world.ledger.url, agent="seller")

    async def go() -> None:
        for value in HOSTILE.values():
            with pytest.raises(EscrowError):
                await client.capture(world.hold, value)
    asyncio.run(go())
