"""`AsyncEscrowClient` is the twin of `EscrowClient`, and this fails when they drift: the same
public names, each an `async def` with the same signature, hints and docstring, and the same
errors for the same bad input, embedded and over HTTP."""

from __future__ import annotations

import asyncio
import inspect

import pytest

import hf_escrow
from hf_escrow import AsyncEscrowClient, EscrowClient, EscrowError
from hf_escrow.ledger import Ledger
from hf_escrow.server import create_app

from .helpers import assert_audit_clean, parties, snapshot
from .liveserver import serve_app

CLOSERS = {"close": "aclose"}


def _public(cls) -> dict:
    return {name: fn for name, fn in inspect.getmembers(cls, inspect.isfunction) if not name.startswith("_")}


def test_the_twins_have_the_same_methods_signatures_hints_and_docs():
    sync, aio = _public(EscrowClient), _public(AsyncEscrowClient)
    assert {CLOSERS.get(name, name) for name in sync} == set(aio), set(sync) ^ set(aio)
    for name, fn in sync.items():
        twin = aio[CLOSERS.get(name, name)]
        assert inspect.iscoroutinefunction(twin) and not inspect.iscoroutinefunction(fn), name
        if name in CLOSERS:
            continue
        assert inspect.signature(twin) == inspect.signature(fn), name
        assert twin.__doc__ == fn.__doc__ and twin.__doc__, name
        assert twin.__name__ == name and twin.__qualname__ == f"AsyncEscrowClient.{name}"


def test_connect_and_connect_async_take_the_same_arguments():
    sync, aio = inspect.signature(hf_escrow.connect), inspect.signature(hf_escrow.connect_async)
    assert sync.parameters == aio.parameters
    assert (sync.return_annotation, aio.return_annotation) == ("EscrowClient", "AsyncEscrowClient")


# Bad input for every method; a method missing here fails the test, so a new one comes with its own.
def _bad_calls(escrow_id: str) -> dict[str, list[tuple[tuple, dict]]]:
    return {
        "register": [(("",), {}), ((None,), {"referral_code": 5})],
        "claim_faucet": [((), {"idempotency_key": "k" * 300})],
        "me": [], "rotate_key": [], "analytics": [],
        "create_escrow": [(("seller", "NaN"), {}), (("seller", True), {}), (("seller", "1"), {"pricing": "nope"}),
                          (("seller", "1"), {"ttl_seconds": -1})],
        "deduct": [((escrow_id, "abc"), {}), (("esc_nope", "0.1"), {}), ((5, "0.1"), {}), (("a/b?c#d", "1"), {})],
        "deduct_many": [(("all",), {}), (([("only-an-id",)],), {}), (([],), {}), (([(escrow_id, "x")],), {})],
        "release": [((escrow_id,), {"amount": "-1"}), ((escrow_id,), {"price_per_token": float("nan")})],
        "cancel": [(("esc_nope",), {})],
        "submit_result": [((escrow_id,), {"metric": "accuracy", "score": "high"})],
        "verify": [((escrow_id,), {"score": 0.5})],
        "get": [(("esc_nope",), {}), ((None,), {})],
        "history": [((), {"limit": 0}), ((), {"role": "nobody"})],
        "mint_spend_token": [((None,), {}), (("esc_nope",), {})],
        "revoke_spend_tokens": [(("esc_nope",), {})],
        "hold": [((None, "0.1"), {}), ((escrow_id, "0"), {}), (("est_nope", "0.1"), {})],
        "capture": [(("hold_nope", "0.1"), {}), ((None, "0.1"), {}), (("hold_nope", "x"), {})],
        "void": [(("hold_nope",), {})],
        "capture_many": [(("all",), {}), (([("hold_x", "0.1", True, "extra")],), {}), (([],), {})],
        "get_hold": [(("hold_nope",), {}), ((7,), {})],
        "holds": [(("esc_nope",), {})],
        "create_key": [(("-1",), {}), (("1",), {"expires_in": "soon"})],
        "revoke_key": [(("key_nope",), {}), (("key_nope",), {"cancel_escrows": "yes"})],
        "keys": [((), {"limit": 0})],
        "mandate": [((), {}), (("key_nope",), {})],
    }


def _sync_error(client, name, args, kwargs) -> tuple:
    try:
        getattr(client, name)(*args, **kwargs)
    except EscrowError as error:
        return type(error), error.message
    return ("accepted",)


async def _async_error(client, name, args, kwargs) -> tuple:
    try:
        await getattr(client, name)(*args, **kwargs)
    except EscrowError as error:
        return type(error), error.message
    return ("accepted",)


def _same_errors(ledger: Ledger, sync_client, make_async, escrow_id: str) -> int:
    bad = _bad_calls(escrow_id)
    assert set(bad) == set(_public(EscrowClient)) - {"close"}, "give each method its bad input here"
    compared = 0

    async def run() -> None:
        nonlocal compared
        async_client = make_async()   # inside the loop its HTTP connections belong to
        try:
            await compare(async_client)
        finally:
            await async_client.aclose()

    async def compare(async_client) -> None:
        nonlocal compared
        for name, calls in bad.items():
            for args, kwargs in calls:
                before = snapshot(ledger)
                seen = _sync_error(sync_client, name, args, kwargs)
                assert await _async_error(async_client, name, args, kwargs) == seen, (name, args, kwargs)
                assert seen != ("accepted",), (name, args, kwargs)
                assert snapshot(ledger) == before, (name, args, kwargs)
                compared += 1
    asyncio.run(run())
    return compared


@pytest.fixture
def world(tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    keys = {name: reg["api_key"] for name, reg in parties(ledger, "buyer", "seller").items()}
    escrow_id = ledger.create_escrow("buyer", "seller", "1")["id"]
    yield ledger, keys, escrow_id
    assert_audit_clean(ledger)
    ledger.close()


def test_the_twins_raise_the_same_errors_embedded(world):
    from hf_escrow.client import AsyncEmbeddedTransport, EmbeddedTransport
    ledger, keys, escrow_id = world
    sync = EscrowClient(EmbeddedTransport(ledger), agent="buyer")
    assert _same_errors(ledger, sync, lambda: AsyncEscrowClient(AsyncEmbeddedTransport(ledger), agent="buyer"),
                        escrow_id) > 40
    # Acting for nobody: every method but register refuses alike.
    nobody, async_nobody = EscrowClient(EmbeddedTransport(ledger)), AsyncEscrowClient(AsyncEmbeddedTransport(ledger))
    for name in set(_public(EscrowClient)) - {"close", "register"}:
        params = list(inspect.signature(getattr(EscrowClient, name)).parameters.values())[1:]
        args = ["x" for p in params if p.default is inspect.Parameter.empty and p.kind != p.KEYWORD_ONLY]
        seen = _sync_error(nobody, name, args, {})
        assert seen[0] is hf_escrow.Unauthorized or name in ("capture_many", "deduct_many"), (name, seen)
        assert asyncio.run(_async_error(async_nobody, name, args, {})) == seen, name


def test_the_twins_raise_the_same_errors_over_http(world):
    ledger, keys, escrow_id = world
    with serve_app(create_app(ledger, sweep_interval_s=0, mcp=False)) as base:
        with hf_escrow.connect(base, api_key=keys["buyer"], max_retries=0) as sync:
            assert _same_errors(ledger, sync, lambda: hf_escrow.connect_async(base, api_key=keys["buyer"],
                                                                              max_retries=0), escrow_id) > 40
