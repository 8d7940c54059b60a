"""Holds and spend tokens on the ledger itself, rule by rule (DESIGN.md, "Holds and spend tokens").

Each rule is checked on SQLite and PostgreSQL (the `ledger` fixture), on the clock the
tests move by hand; every refusal is also checked to have moved and reserved nothing.
"""

from __future__ import annotations

import pytest

from hf_escrow import EscrowError, Forbidden, NotFound, StateConflict
from hf_escrow.ledger import Ledger
from hf_escrow.money import parse_usdc as M

from .helpers import parties
from .holds_helpers import hold_snapshot

BENCH = {"type": "benchmark", "metric": "accuracy", "threshold": 0.85}


@pytest.fixture
def world(ledger):
    """buyer -> seller escrows; seller is referred by `ref`; `seller2` sells elsewhere; `eve` is nobody's."""
    code = ledger.register("ref")["referral_code"]
    ledger.register("seller", referral_code=code)
    parties(ledger, "buyer", "seller2", "eve", "ver", fund="100")
    return ledger


def refused(ledger: Ledger, error: type[EscrowError], call, *args, **kwargs) -> EscrowError:
    """`call` raises exactly `error`, with a message, having moved and reserved nothing."""
    before = hold_snapshot(ledger)
    with pytest.raises(EscrowError) as info:
        call(*args, **kwargs)
    assert type(info.value) is error, f"{type(info.value).__name__} instead of {error.__name__}: {info.value}"
    assert info.value.message
    assert hold_snapshot(ledger) == before, "a refused operation moved or reserved something"
    return info.value


def escrow(ledger: Ledger, amount: str = "1", **kwargs) -> dict:
    return ledger.create_escrow("buyer", "seller", amount, **kwargs)


def view(ledger: Ledger, escrow_id: str) -> dict:
    e = ledger.get("buyer", escrow_id)
    assert e["amount_micro"] == e["paid_micro"] + e["refunded_micro"] + e["held_micro"] + e["remaining_micro"]
    return e


def test_a_seller_cannot_hold_on_a_benchmark_gated_escrow(world):
    """Deduct refuses to pay a gated escrow before its result passes; a seller's hold must too."""
    gated = world.create_escrow("buyer", "seller", "1", release_condition=BENCH)
    refused(world, StateConflict, world.hold, "seller", gated["spend_token"], "1")
    refused(world, StateConflict, world.hold, "seller", gated["id"], "0.5")
    assert view(world, gated["id"])["paid_micro"] == 0
    # The buyer may still pay part of it, as a partial release would.
    h = world.hold("buyer", gated["id"], "0.25")
    assert world.capture("buyer", h["id"], "0.25")["gross_micro"] == M("0.25")


def test_a_third_agent_learns_nothing_about_a_hold_or_an_escrow(world):
    e = escrow(world)
    h = world.hold("seller", e["spend_token"], "0.5")
    ghost = "hold_" + "0" * 24
    ghost_escrow = "esc_" + "0" * 24
    calls = {
        "capture": lambda hid: world.capture("eve", hid, "0.1"),
        "final capture": lambda hid: world.capture("eve", hid, "0", final=True),
        "void": lambda hid: world.void("eve", hid),
        "get_hold": lambda hid: world.get_hold("eve", hid),
        "capture_many": lambda hid: _only_error(world.capture_many("eve", [(hid, "0.1")])),
    }
    for name, call in calls.items():
        real, fake = _error_of(world, call, h["id"]), _error_of(world, call, ghost)
        assert real == fake.replace(ghost, h["id"]), name
        assert real.startswith("NotFound"), name
    for name, call in {"hold": lambda eid: world.hold("eve", eid, "0.1"),
                       "holds": lambda eid: world.holds("eve", eid),
                       "mint": lambda eid: world.mint_spend_token("eve", eid),
                       "revoke": lambda eid: world.revoke_spend_tokens("eve", eid)}.items():
        real, fake = _error_of(world, call, e["id"]), _error_of(world, call, ghost_escrow)
        assert real == fake.replace(ghost_escrow, e["id"]) and real.startswith("NotFound"), name
    assert world.get_hold("seller", h["id"])["open_micro"] == M("0.5")


def _error_of(ledger: Ledger, call, target: str) -> str:
    before = hold_snapshot(ledger)
    try:
        call(target)
    except EscrowError as error:
        assert hold_snapshot(ledger) == before
        return f"{type(error).__name__} {error.status_code} {error.message}"
    raise AssertionError(f"a stranger was answered about {target}")


def _only_error(result: dict) -> None:
    (item,) = result["results"]
    assert item["ok"] is False
    raise {"not_found": NotFound, "forbidden": Forbidden}[item["error"]](item["message"])
