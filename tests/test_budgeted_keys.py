"""Budgeted keys, as an attacker holding one would try them: over the budget, past the cap
per escrow, to a seller outside the list, after expiry, after revocation, into the owner's
escrows and powers; and several processes racing on one key's budget.

Every refusal is a named `EscrowError` with its HTTP status and moves nothing (the
ledger's snapshot is unchanged and the audit is clean); the key's escrows are its owner's
money, refunded to its owner.
"""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
from decimal import Decimal as D

import pytest
from sqlalchemy import func, select

import hf_escrow
from hf_escrow import (
    BudgetExceeded, IdempotencyConflict, KeyInactive, NotFound, OutsideMandate, Unauthorized, ValidationError,
)
from hf_escrow.ledger import Ledger, LedgerConfig
from hf_escrow.ledger.schema import agent_keys, escrows
from hf_escrow.money import parse_usdc
from hf_escrow.server import create_app
from hf_escrow.server.faucet import FaucetSettings

from . import race_workers
from .helpers import assert_audit_clean, parties, snapshot
from .holds_helpers import hold_snapshot, stored_text
from .liveserver import serve_app

PROCESSES = 4
RACE_AMOUNT = "0.001"
RACE_BUDGET = "0.2"        # 200 locks in all: long enough for every process to take part
RACE_OPS = 250             # tries per process: one that wins nearly every lock still meets three refusals
RACE_TIMEOUT_S = 180


@pytest.fixture
def world(ledger):
    """A live server on the test's ledger (its clock is the test's), an owner with a key, two sellers."""
    agents = parties(ledger, "owner", "seller-a", "seller-b", fund="10")
    app = create_app(ledger, sweep_interval_s=0, faucet=FaucetSettings(enabled=True, per_client=10**6,
                                                                     overall=10**6))
    with serve_app(app) as url:
        owner = hf_escrow.connect(url, api_key=agents["owner"]["api_key"])
        key = owner.create_key(budget="1.00", sellers=["seller-a"], max_escrow="0.40", expires_in=3600,
                               label="research agent")
        agent = hf_escrow.connect(url, api_key=key.api_key)
        seller = hf_escrow.connect(url, api_key=agents["seller-a"]["api_key"])
        yield {"url": url, "ledger": ledger, "owner": owner, "agent": agent, "seller": seller, "key": key}
        for client in (owner, agent, seller):
            client.close()


def assert_keys_add_up(ledger: Ledger) -> None:
    """Every key's counters are its escrows' sums: what they locked, what came back."""
    with ledger.engine.connect() as conn:
        sums = {r.key_id: (int(r.amount), int(r.refunded)) for r in conn.execute(
            select(escrows.c.key_id, func.sum(escrows.c.amount_micro).label("amount"),
                   func.sum(escrows.c.refunded_micro).label("refunded"))
            .where(escrows.c.key_id.is_not(None)).group_by(escrows.c.key_id))}
        for row in conn.execute(select(agent_keys)):
            assert (row.locked_micro, row.refunded_micro) == sums.get(row.key_id, (0, 0)), row
            assert row.locked_micro - row.refunded_micro <= row.budget_micro, row


def refused(ledger: Ledger, error: type, status: int, action) -> str:
    """Run `action`; it must raise exactly `error` (status `status`) and move nothing."""
    before = hold_snapshot(ledger)
    with pytest.raises(error) as caught:
        action()
    assert type(caught.value) is error and caught.value.status_code == status, caught.value
    if caught.value.response is not None:   # over HTTP: the status the server really answered
        assert caught.value.response.status_code == status, caught.value
    assert hold_snapshot(ledger) == before, caught.value
    assert_audit_clean(ledger)
    assert_keys_add_up(ledger)
    return caught.value.message


def test_a_key_locks_its_owners_money_within_its_mandate_and_the_owner_sees_it(world):
    ledger, owner, agent, seller = world["ledger"], world["owner"], world["agent"], world["seller"]
    before = owner.me().balance
    e = agent.create_escrow("seller-a", "0.40", ttl_seconds=600)
    assert (e.buyer, e.key_id) == ("owner", world["key"].key_id)   # the owner is the buyer of record
    assert owner.me().balance == before - D("0.40")
    # The seller is paid as from any buyer; the key releases its own escrow.
    h = seller.hold(e.spend_token, "0.10")
    seller.capture(h.id, "0.04", final=True)
    receipt = agent.release(e.id, amount="0.06")
    assert receipt.status == "released" and receipt.refunded == D("0.30")
    mandate = agent.mandate()
    assert (mandate.locked, mandate.paid, mandate.refunded) == (
        D("0.40"), D("0.10"), D("0.30"))
    assert mandate.left == D("0.90")     # the refund gave budget back
    assert owner.me().balance == before - D("0.10")
    # Buyer-side holds on its own escrow, a fresh spend token, a cancel: all as the owner would.
    e2 = agent.create_escrow("seller-a", "0.30")
    hold = agent.hold(e2.id, "0.05")
    agent.capture(hold.id, "0.01", final=True)
    assert agent.mint_spend_token(e2.id).startswith("est_")
    assert agent.cancel(e2.id).refunded == D("0.29")
    listed = {k.key_id: k for k in owner.keys()}[world["key"].key_id]
    assert (listed.label, listed.escrows, listed.escrows_open, listed.paid) == (
        "research agent", 2, 0, D("0.11"))
    assert listed.left == agent.mandate().left == D("0.89")
    assert {x.id for x in owner.history()} >= {e.id, e2.id}         # the owner sees every escrow
    assert_audit_clean(ledger)
    assert_keys_add_up(ledger)


def test_every_refusal_of_a_key_is_named_has_its_status_and_moves_nothing(world, clock):
    ledger, owner, agent = world["ledger"], world["owner"], world["agent"]
    own = owner.create_escrow("seller-b", "1.00")
    opened = agent.create_escrow("seller-a", "0.40", ttl_seconds=7200)
    agent.create_escrow("seller-a", "0.40")
    assert "may not pay 'seller-b'" in refused(ledger, OutsideMandate, 403,
                                                lambda: agent.create_escrow("seller-b", "0.01"))
    refused(ledger, OutsideMandate, 403, lambda: agent.create_escrow("seller-a", "0.400001"))
    message = refused(ledger, BudgetExceeded, 402, lambda: agent.create_escrow("seller-a", "0.200001"))
    assert "0.200000 USDC of its 1.000000 USDC budget left" in message
    # The owner's escrows do not exist for the key, and it has none of the owner's powers.
    for action in (lambda: agent.get(own.id), lambda: agent.cancel(own.id), lambda: agent.release(own.id),
                   lambda: agent.hold(own.id, "0.01"), lambda: agent.holds(own.id),
                   lambda: agent.mint_spend_token(own.id), lambda: agent.revoke_spend_tokens(own.id)):
        refused(ledger, NotFound, 404, action)
    assert own.id not in {e.id for e in agent.history()} and len(agent.history()) == 2
    assert agent.history(role="seller") == [] and len(agent.history(role="buyer")) == 2
    for action in (agent.me, agent.claim_faucet, agent.rotate_key, agent.analytics, agent.keys,
                   lambda: agent.create_key(budget="5"), lambda: agent.revoke_key(world["key"].key_id),
                   lambda: agent.register("minion")):
        refused(ledger, OutsideMandate, 403, action)
    # Past its expiry: nothing more, though the money in its escrows is the owner's to settle.
    clock.advance(3601)
    for action in (lambda: agent.create_escrow("seller-a", "0.01"), lambda: agent.get(opened.id),
                   agent.history, agent.mandate):
        refused(ledger, KeyInactive, 401, action)
    assert owner.cancel(opened.id).refunded == D("0.40")
    assert_audit_clean(ledger)


def test_revoking_stops_a_key_at_once_and_can_cancel_what_it_opened(world):
    ledger, owner, agent = world["ledger"], world["owner"], world["agent"]
    key_id = world["key"].key_id
    opened = [agent.create_escrow("seller-a", "0.20").id for _ in range(3)]
    agent.release(opened[0], amount="0.05")
    balance = owner.me().balance
    revoked = owner.revoke_key(key_id, cancel_escrows=True)
    assert sorted(revoked.cancelled) == sorted(opened[1:]) and not revoked.active
    assert owner.me().balance == balance + D("0.40")   # refunded to the owner
    assert (revoked.paid, revoked.in_escrow) == (D("0.05"), 0)
    message = refused(ledger, KeyInactive, 401, lambda: agent.create_escrow("seller-a", "0.01"))
    assert "revoked by its owner" in message
    refused(ledger, KeyInactive, 401, lambda: agent.get(opened[0]))
    assert owner.revoke_key(key_id).revoked_at == revoked.revoked_at   # twice: no error, no change
    # A revoked key's escrow that a race left open is refused in the lock's own transaction too.
    identity = "@" + key_id
    refused(ledger, KeyInactive, 401, lambda: ledger.create_escrow(identity, "seller-a", "0.01"))
    # Another agent cannot see or revoke the key; nor can anyone name an unknown one.
    stranger = hf_escrow.connect(world["url"], api_key=ledger.register("stranger")["api_key"])
    refused(ledger, NotFound, 404, lambda: stranger.revoke_key(key_id))
    refused(ledger, NotFound, 404, lambda: stranger.mandate(key_id))
    assert stranger.keys() == []
    stranger.close()


def test_create_key_is_idempotent_and_its_secret_is_never_stored(world):
    ledger, owner = world["ledger"], world["owner"]
    first = owner.create_key(budget="0.5", sellers=["seller-a", "seller-b"], idempotency_key="mint-1")
    again = owner.create_key(budget="0.5", sellers=["seller-a", "seller-b"], idempotency_key="mint-1")
    assert first.api_key.startswith("hfe_") and again.api_key is None      # shown once, even to a replay
    assert (again.key_id, again.budget, again.sellers) == (first.key_id, first.budget, ["seller-a", "seller-b"])
    refused(ledger, IdempotencyConflict, 409, lambda: owner.create_key(budget="0.6", idempotency_key="mint-1"))
    assert len(owner.keys()) == 2                                           # the fixture's and this one
    text = "\n".join(stored_text(ledger.engine).values())
    for secret in (first.api_key, world["key"].api_key):
        assert secret not in text
        assert hashlib.sha256(secret.encode()).hexdigest() in text          # stored as its hash only
    # The key's idempotency keys are its own: the same key name under the owner is another request.
    agent = hf_escrow.connect(world["url"], api_key=first.api_key)
    mine = agent.create_escrow("seller-b", "0.1", idempotency_key="job-7")
    theirs = owner.create_escrow("seller-b", "2", idempotency_key="job-7")
    assert mine.id != theirs.id and agent.create_escrow("seller-b", "0.1", idempotency_key="job-7").id == mine.id
    agent.close()


def test_bad_mandates_are_refused(world):
    ledger, owner = world["ledger"], world["owner"]
    for kwargs, error, status in (
            ({"budget": "0"}, ValidationError, 422), ({"budget": "-1"}, ValidationError, 422),
            ({"budget": "1", "max_escrow": "2"}, ValidationError, 422),
            ({"budget": "1", "sellers": []}, ValidationError, 422),
            ({"budget": "1", "sellers": ["nobody"]}, NotFound, 404),
            ({"budget": "1", "sellers": ["owner"]}, ValidationError, 422),
            ({"budget": "1", "expires_in": 0}, ValidationError, 422),
            ({"budget": "1", "label": "x" * 201}, ValidationError, 422)):
        before = snapshot(ledger)
        with pytest.raises(error) as caught:
            owner.create_key(**kwargs)
        assert caught.value.status_code == status and isinstance(caught.value, error), kwargs
        assert snapshot(ledger) == before
    assert len(owner.keys()) == 1
    with pytest.raises(Unauthorized):
        hf_escrow.connect(world["url"], api_key="hfe_not-a-key").history()


def test_the_mcp_tools_read_the_mandate_and_refuse_the_owners_powers(world):
    from .test_mcp import error, mcp_session, ok, run

    async def drive() -> None:
        async with mcp_session(world["url"], world["key"].api_key) as client:
            mandate = await ok(client, "key_mandate", {})
            assert (mandate["budget_usdc"], mandate["left_usdc"], mandate["sellers"]) == (1.0, 1.0, ["seller-a"])
            await ok(client, "escrow_create", {"seller_id": "seller-a", "amount_usdc": 0.25})
            assert (await ok(client, "key_mandate", {}))["left_usdc"] == 0.75
            assert "outside_mandate (403)" in await error(client, "key_create", {"budget_usdc": 1})
            await ok(client, "escrow_create", {"seller_id": "seller-a", "amount_usdc": 0.4})
            assert "budget_exceeded (402)" in await error(client, "escrow_create",
                                                          {"seller_id": "seller-a", "amount_usdc": 0.4})
            assert "outside_mandate (403)" in await error(client, "escrow_create",
                                                          {"seller_id": "seller-b", "amount_usdc": 0.1})
        async with mcp_session(world["url"], None) as anonymous:
            assert "unauthorized" in await error(anonymous, "key_mandate", {})

    run(drive())
    listed = world["owner"].keys()[0]
    assert (listed.locked, listed.left) == (D("0.65"), D("0.35"))


def test_the_embedded_client_acts_with_a_key_too(db_url):
    ledger = Ledger(db_url, config=LedgerConfig())
    parties(ledger, "owner", "seller", fund="5")
    ledger.close()
    owner = hf_escrow.connect(database_url=db_url, agent="owner")
    key = owner.create_key(budget="0.5", max_escrow="0.5")
    agent = hf_escrow.connect(database_url=db_url, api_key=key.api_key)
    e = agent.create_escrow("seller", "0.5")
    with pytest.raises(BudgetExceeded):
        agent.create_escrow("seller", "0.000001")
    assert [x.id for x in agent.history()] == [e.id]

    async def go() -> None:
        async_agent = hf_escrow.connect_async(database_url=db_url, api_key=key.api_key)
        assert (await async_agent.mandate()).left == 0
        await async_agent.cancel(e.id)
        assert (await async_agent.mandate()).left == D("0.5")
    asyncio.run(go())
    assert owner.me().balance == 5


@pytest.mark.slow
def test_processes_racing_on_one_keys_budget_never_lock_more_than_it(db_url):
    ledger = Ledger(db_url)
    parties(ledger, "owner", "seller", fund="10")
    key = ledger.create_key("owner", budget=RACE_BUDGET)
    balance = ledger.me("owner")["balance_micro"]
    budget, amount = parse_usdc(RACE_BUDGET), parse_usdc(RACE_AMOUNT)
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, context.Pool(PROCESSES) as pool:
        barrier = manager.Barrier(PROCESSES)   # released once every process has imported and connected
        results = pool.starmap_async(race_workers.lock_with_key, [
            (db_url, key["api_key"], "seller", RACE_AMOUNT, barrier, RACE_OPS) for _ in range(PROCESSES)]
        ).get(timeout=RACE_TIMEOUT_S)
    created = [escrow_id for r in results for escrow_id in r["created"]]
    assert len(set(created)) == len(created) == budget // amount, results    # all of it, and not one more
    assert all(r["refused"] == 3 for r in results)
    assert sum(1 for r in results if r["created"]) >= 2, "only one process locked: no race happened"
    view = ledger.key("owner", key["key_id"])
    assert (view["locked_micro"], view["left_micro"], view["escrows"]) == (budget, 0, len(created))
    assert ledger.me("owner")["balance_micro"] == balance - budget
    assert_audit_clean(ledger)
    assert_keys_add_up(ledger)
    ledger.close()


def test_the_cli_mints_lists_shows_and_revokes_keys(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from hf_escrow.cli import app
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    ledger = Ledger(url, config=LedgerConfig())
    parties(ledger, "owner", "seller", fund="5")
    runner = CliRunner()

    def cli(*args: str, code: int = 0) -> dict:
        result = runner.invoke(app, [*args, "--database-url", url, "--json"], catch_exceptions=False)
        assert result.exit_code == code, (args, result.output)
        return json.loads(result.stdout)

    made = cli("keys", "create", "0.5", "--seller", "seller", "--max-escrow", "0.2", "--expires-in", "600",
               "--label", "cli agent", "--agent", "owner")
    assert made["api_key"].startswith("hfe_") and made["sellers"] == ["seller"] and made["max_escrow"] == "0.200000"
    identity = ledger.authenticate(made["api_key"])
    ledger.create_escrow(identity, "seller", "0.2")
    assert cli("keys", "show", "--agent", identity)["left"] == "0.300000"       # as the key itself
    assert [k["key_id"] for k in cli("keys", "list", "--agent", "owner")] == [made["key_id"]]
    refusal = cli("keys", "create", "1", "--agent", identity, code=2)
    assert (refusal["error"], refusal["status"]) == ("outside_mandate", 403)
    revoked = cli("keys", "revoke", made["key_id"], "--cancel-escrows", "--agent", "owner")
    assert len(revoked["cancelled"]) == 1 and revoked["active"] is False
    assert ledger.me("owner")["balance_micro"] == 5_000_000
    assert_audit_clean(ledger)
    ledger.close()


def test_what_a_hold_frees_after_its_key_escrow_closed_gives_the_key_budget_back(world):
    ledger, owner, agent, seller = world["ledger"], world["owner"], world["agent"], world["seller"]
    e = agent.create_escrow("seller-a", "0.40", ttl_seconds=600)
    h = seller.hold(e.spend_token, "0.10")
    agent.cancel(e.id)                               # the free 0.30 comes back at once; the hold stays
    assert agent.mandate().left == D("0.90")
    seller.capture(h.id, "0.04", final=True)         # within the grace: the 0.06 it frees is refunded
    after = owner.get(e.id)
    assert (after.paid, after.refunded, after.held) == (D("0.04"), D("0.36"), 0)
    assert agent.mandate().left == D("0.96")
    assert_keys_add_up(ledger)
    assert_audit_clean(ledger)
