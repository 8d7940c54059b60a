"""Holds and spend tokens on the ledger itself, rule by rule (DESIGN.md, "Holds and spend tokens").

Each rule is checked on SQLite and PostgreSQL (the `ledger` fixture), on the clock the
tests move by hand; every refusal is also checked to have moved and reserved nothing.
"""

from __future__ import annotations

import json
import threading
from collections import Counter

import pytest
from sqlalchemy import func, select

from hf_escrow import (
    EscrowError, Forbidden, IdempotencyConflict, InsufficientFunds, NotFound, StateConflict, ValidationError,
)
from hf_escrow.ledger import Ledger, LedgerConfig
from hf_escrow.ledger.schema import escrow_events, holds, spend_tokens, transactions
from hf_escrow.ledger.rules import hash_secret
from hf_escrow.money import parse_usdc as M

from .helpers import assert_audit_clean, parties
from .holds_helpers import hold_snapshot, stored_text

GRACE_MS = LedgerConfig().hold_grace_s * 1000
MAX_TTL_MS = LedgerConfig().hold_max_ttl_s * 1000
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


def set_ms(clock, ms: int) -> None:
    # Half a millisecond in, so that float seconds never truncate to the millisecond before.
    clock.now = (ms + 0.5) / 1000


def escrow(ledger: Ledger, amount: str = "1", **kwargs) -> dict:
    return ledger.create_escrow("buyer", "seller", amount, **kwargs)


def view(ledger: Ledger, escrow_id: str) -> dict:
    e = ledger.get("buyer", escrow_id)
    assert e["amount_micro"] == e["paid_micro"] + e["refunded_micro"] + e["held_micro"] + e["remaining_micro"]
    return e


def balance(ledger: Ledger, agent: str) -> int:
    return ledger.me(agent)["balance_micro"]


def hold_events(ledger: Ledger, kind: str) -> Counter:
    """How many `kind` events each hold has."""
    with ledger.engine.connect() as conn:
        return Counter(data["hold_id"] for data in conn.scalars(
            select(escrow_events.c.data).where(escrow_events.c.kind == kind)))


# ---- reserving ------------------------------------------------------------------------

def test_a_hold_reserves_part_of_the_remainder_and_a_capture_pays_the_seller_with_the_split(world):
    e = escrow(world, "1")
    h = world.hold("seller", e["spend_token"], "0.4", ttl_seconds=60)
    assert (h["status"], h["holder"], h["escrow_id"], h["amount_micro"], h["captured_micro"], h["open_micro"]) == \
        ("open", "seller", e["id"], M("0.4"), 0, M("0.4"))
    assert (h["escrow_status"], h["escrow_remaining_micro"]) == ("active", M("0.6"))
    assert (view(world, e["id"])["held_micro"], view(world, e["id"])["remaining_micro"]) == (M("0.4"), M("0.6"))
    seller_before, ref_before = balance(world, "seller"), balance(world, "ref")

    r = world.capture("seller", h["id"], "0.1", usage={"prompt_tokens": 7, "completion_tokens": 3})
    # 1% fee on 0.1 is 0.001, of which the referrer's 15% is 0.00015.
    assert (r["kind"], r["gross_micro"], r["net_micro"], r["fee_micro"], r["referral_micro"], r["refunded_micro"]) \
        == ("capture", M("0.1"), M("0.099"), M("0.001"), M("0.00015"), 0)
    assert (r["hold"]["status"], r["hold"]["captured_micro"], r["hold"]["open_micro"]) == ("open", M("0.1"), M("0.3"))
    assert (r["remaining_micro"], r["escrow"]["held_micro"], r["escrow"]["paid_micro"]) == \
        (M("0.6"), M("0.3"), M("0.1"))
    assert (r["escrow"]["tokens_in"], r["escrow"]["tokens_out"]) == (7, 3)
    assert balance(world, "seller") == seller_before + M("0.099")
    assert balance(world, "ref") == ref_before + M("0.00015")

    # Capturing exactly what is open closes the hold without `final`.
    r = world.capture("seller", h["id"], "0.3")
    assert (r["hold"]["status"], r["hold"]["open_micro"], r["escrow"]["held_micro"]) == ("captured", 0, 0)
    assert world.holds("buyer", e["id"]) == []
    assert_audit_clean(world)


def test_a_hold_larger_than_the_free_remainder_is_refused(world):
    e = escrow(world, "1")
    world.hold("seller", e["spend_token"], "0.7")
    error = refused(world, InsufficientFunds, world.hold, "seller", e["spend_token"], "0.300001")
    assert error.details == {"remaining_micro": M("0.3"), "needed_micro": M("0.300001")}
    refused(world, InsufficientFunds, world.hold, "buyer", e["id"], "0.300001")
    assert world.hold("seller", e["id"], "0.3")["escrow_remaining_micro"] == 0
    for bad in ("0", "-1", "abc", None, float("nan")):
        with pytest.raises(ValidationError):
            world.hold("seller", e["spend_token"], bad)
    refused(world, ValidationError, world.hold, "seller", 12345, "0.1")
    refused(world, ValidationError, world.hold, "seller", "x" * 41, "0.1")


def test_hold_ttl_is_capped_at_the_configured_maximum(world, db_url, clock):
    e = escrow(world, "1", ttl_seconds=86_400)
    for asked, lasts_ms in ((60, 60_000), (0.25, 250), (900, MAX_TTL_MS), (901, MAX_TTL_MS), (86_400, MAX_TTL_MS)):
        h = world.hold("seller", e["spend_token"], "0.01", ttl_seconds=asked)
        assert h["expires_at_ms"] - h["created_at_ms"] == lasts_ms, asked
    for bad in (0, -1, float("inf"), float("nan"), True, "60", None, 90 * 86_400 + 1):
        refused(world, ValidationError, world.hold, "seller", e["spend_token"], "0.01", ttl_seconds=bad)

    strict = Ledger(db_url, config=LedgerConfig(hold_max_ttl_s=120), clock=clock)
    try:
        h = strict.hold("seller", e["spend_token"], "0.01", ttl_seconds=900)
        assert h["expires_at_ms"] - h["created_at_ms"] == 120_000
        assert "120" in refused(strict, ValidationError, strict.hold, "seller", e["id"], "0.01", ttl_seconds=0).message
    finally:
        strict.close()
    with pytest.raises(ValidationError):
        LedgerConfig(hold_max_ttl_s=0)


def test_no_hold_outlives_the_escrow_expiry_plus_the_grace(world, clock):
    e = escrow(world, "1", ttl_seconds=60)
    h = world.hold("seller", e["spend_token"], "0.5", ttl_seconds=900)
    assert h["expires_at_ms"] == e["expires_at_ms"] + GRACE_MS
    late = world.hold("seller", e["id"], "0.1", ttl_seconds=900)
    assert late["expires_at_ms"] == e["expires_at_ms"] + GRACE_MS

    # Past the escrow's TTL, before any sweeper: a capture settles the expiry and still pays.
    set_ms(clock, e["expires_at_ms"] + 5_000)
    buyer_before = balance(world, "buyer")
    r = world.capture("seller", h["id"], "0.2")
    assert (r["status"], r["gross_micro"], r["escrow"]["refunded_micro"]) == ("expired", M("0.2"), M("0.4"))
    assert balance(world, "buyer") == buyer_before + M("0.4")
    assert world.get_hold("seller", h["id"])["expires_at_ms"] == e["expires_at_ms"] + GRACE_MS
    refused(world, StateConflict, world.hold, "seller", e["spend_token"], "0.000001")

    set_ms(clock, e["expires_at_ms"] + GRACE_MS - 1)
    assert world.capture("seller", h["id"], "0.1")["gross_micro"] == M("0.1")
    set_ms(clock, e["expires_at_ms"] + GRACE_MS)
    with pytest.raises(StateConflict, match="expired"):
        world.capture("seller", h["id"], "0.000001")
    assert world.get_hold("seller", h["id"])["status"] == "expired"
    assert world.expire_due() == 1  # `late`; `h` was freed by the refused capture
    final = view(world, e["id"])
    assert (final["paid_micro"], final["held_micro"], final["refunded_micro"]) == (M("0.3"), 0, M("0.7"))
    assert balance(world, "buyer") == buyer_before + M("0.7")
    assert hold_events(world, "hold_expired") == Counter({h["id"]: 1, late["id"]: 1})
    assert_audit_clean(world)


CLOSINGS = {
    "cancel by the buyer": lambda ledger, clock, e: ledger.cancel("buyer", e["id"]),
    "cancel by the seller": lambda ledger, clock, e: ledger.cancel("seller", e["id"]),
    "release with refund": lambda ledger, clock, e: ledger.release("buyer", e["id"], "0.1"),
    "expiry by the sweeper": lambda ledger, clock, e: (set_ms(clock, e["expires_at_ms"] + 2_000),
                                                       ledger.expire_due()),
}


@pytest.mark.parametrize("closing", CLOSINGS)
def test_closing_keeps_open_holds_capturable_for_the_grace_then_refunds_them_once(world, clock, closing):
    e = escrow(world, "1", ttl_seconds=5)  # the long hold ends at the escrow's expiry + the grace at the latest
    long = world.hold("seller", e["spend_token"], "0.3", ttl_seconds=900)
    short = world.hold("buyer", e["id"], "0.2", ttl_seconds=10)
    clock.advance(3)
    buyer_before = balance(world, "buyer")
    CLOSINGS[closing](world, clock, e)
    closed_ms = world.now_ms()
    after = view(world, e["id"])
    paid = after["paid_micro"]
    assert after["status"] in ("cancelled", "released", "expired") and after["remaining_micro"] == 0
    assert (after["held_micro"], after["refunded_micro"]) == (M("0.5"), M("1") - M("0.5") - paid)
    assert balance(world, "buyer") == buyer_before + after["refunded_micro"]
    long_deadline = min(long["expires_at_ms"], closed_ms + GRACE_MS)
    assert world.get_hold("buyer", long["id"])["expires_at_ms"] == long_deadline
    short_deadline = min(short["expires_at_ms"], closed_ms + GRACE_MS)
    assert world.get_hold("seller", short["id"])["expires_at_ms"] == short_deadline
    assert {h["id"] for h in world.holds("seller", e["id"])} == {long["id"], short["id"]}

    # A closed escrow takes no new hold and mints no token; its token stops working.
    refused(world, StateConflict, world.hold, "seller", e["spend_token"], "0.000001")
    refused(world, StateConflict, world.hold, "buyer", e["id"], "0.000001")
    refused(world, StateConflict, world.mint_spend_token, "buyer", e["id"])

    # Work already delivered is still paid within the grace; a final capture refunds the rest at once.
    r = world.capture("seller", long["id"], "0.05")
    assert (r["status"], r["gross_micro"], r["refunded_micro"]) == (after["status"], M("0.05"), 0)
    set_ms(clock, long_deadline - 1)
    r = world.capture("seller", long["id"], "0.05", final=True)
    assert (r["gross_micro"], r["refunded_micro"], r["hold"]["status"]) == (M("0.05"), M("0.2"), "captured")

    # The short hold's own TTL is over: refused, and what it reserved goes back to the buyer, once.
    set_ms(clock, max(short_deadline, world.now_ms()))
    with pytest.raises(StateConflict):
        world.capture("buyer", short["id"], "0.01")
    refused(world, StateConflict, world.capture, "buyer", short["id"], "0.01")
    assert world.expire_due() == 0
    end = view(world, e["id"])
    assert (end["held_micro"], end["remaining_micro"], end["paid_micro"]) == (0, 0, paid + M("0.1"))
    assert end["refunded_micro"] == M("1") - end["paid_micro"]
    assert balance(world, "buyer") == buyer_before + end["refunded_micro"]
    assert world.holds("buyer", e["id"]) == []
    assert hold_events(world, "hold_expired") == Counter({short["id"]: 1})
    assert_audit_clean(world)


def test_a_capture_after_the_grace_is_refused_and_the_rest_refunded(world, clock):
    e = escrow(world, "1")
    h = world.hold("seller", e["spend_token"], "0.6", ttl_seconds=900)
    world.capture("seller", h["id"], "0.1")
    world.cancel("buyer", e["id"])
    buyer_before = balance(world, "buyer")
    clock.advance(GRACE_MS / 1000)
    with pytest.raises(StateConflict, match="expired"):
        world.capture("seller", h["id"], "0.1")
    refused(world, StateConflict, world.void, "seller", h["id"])
    assert balance(world, "buyer") == buyer_before + M("0.5")
    assert view(world, e["id"])["paid_micro"] == M("0.1")
    assert_audit_clean(world)


def test_a_closed_escrow_takes_no_new_hold(world, clock):
    cancelled = escrow(world)
    world.cancel("buyer", cancelled["id"])
    released = escrow(world)
    world.release("buyer", released["id"])
    gated = world.create_escrow("buyer", "seller", "1", release_condition={**BENCH, "verifier": "ver"})
    world.submit_result("seller", gated["id"], metric="accuracy", score=0.9)  # awaiting verification
    for e in (cancelled, released, gated):
        refused(world, StateConflict, world.hold, "seller", e["spend_token"], "0.01")
        refused(world, StateConflict, world.hold, "buyer", e["id"], "0.01")

    # Past its TTL but not yet swept: the hold is refused and the escrow refunded, once.
    lapsed = escrow(world, ttl_seconds=5)
    clock.advance(5)
    buyer_before = balance(world, "buyer")
    with pytest.raises(StateConflict, match="expired"):
        world.hold("seller", lapsed["spend_token"], "0.01")
    assert view(world, lapsed["id"])["status"] == "expired"
    assert balance(world, "buyer") == buyer_before + M("1")
    refused(world, StateConflict, world.hold, "buyer", lapsed["id"], "0.01")
    assert world.expire_due() == 0


def test_a_seller_cannot_hold_on_a_benchmark_gated_escrow(world):
    """Deduct refuses to pay a gated escrow before its result passes; a seller's hold must too."""
    gated = world.create_escrow("buyer", "seller", "1", release_condition=BENCH)
    refused(world, StateConflict, world.hold, "seller", gated["spend_token"], "1")
    refused(world, StateConflict, world.hold, "seller", gated["id"], "0.5")
    assert view(world, gated["id"])["paid_micro"] == 0
    # The buyer may still pay part of it, as a partial release would.
    h = world.hold("buyer", gated["id"], "0.25")
    assert world.capture("buyer", h["id"], "0.25")["gross_micro"] == M("0.25")


# ---- who may do what ------------------------------------------------------------------

def test_only_the_holder_captures_or_voids(world):
    e = escrow(world)
    h = world.hold("seller", e["spend_token"], "0.5")
    for call, kwargs in ((world.capture, {"amount": "0.1"}), (world.capture, {"amount": "0", "final": True}),
                         (world.void, {})):
        assert "only its maker" in refused(world, Forbidden, call, "buyer", h["id"], **kwargs).message
    # The verifier of an escrow may read its holds, never settle them.
    gated = world.create_escrow("buyer", "seller", "1", release_condition={**BENCH, "verifier": "ver"})
    b = world.hold("buyer", gated["id"], "0.5")
    assert world.get_hold("ver", b["id"])["status"] == "open"
    assert [x["id"] for x in world.holds("ver", gated["id"])] == [b["id"]]
    for agent in ("seller", "ver"):
        with pytest.raises((Forbidden, NotFound)):
            world.capture(agent, b["id"], "0.1")
        with pytest.raises((Forbidden, NotFound)):
            world.void(agent, b["id"])
    assert world.get_hold("buyer", b["id"])["captured_micro"] == 0
    assert world.capture("seller", h["id"], "0.5")["hold"]["status"] == "captured"


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


def test_holding_by_escrow_id_needs_a_party_and_by_token_the_seller(world):
    e = escrow(world)
    refused(world, Forbidden, world.hold, "buyer", e["spend_token"], "0.1")      # a token is the seller's
    other = world.create_escrow("buyer", "seller2", "1")
    assert "another seller" in refused(world, Forbidden, world.hold, "seller", other["spend_token"], "0.1").message
    assert "another seller" in refused(world, Forbidden, world.hold, "eve", e["spend_token"], "0.1").message
    gated = world.create_escrow("buyer", "seller", "1", release_condition={**BENCH, "verifier": "ver"})
    refused(world, Forbidden, world.hold, "ver", gated["id"], "0.1")             # the verifier is no party
    assert world.hold("seller2", other["id"], "0.1")["holder"] == "seller2"
    assert world.hold("buyer", other["id"], "0.1")["holder"] == "buyer"


def test_the_buyer_may_hold_on_its_own_escrow_and_its_capture_pays_the_seller(world):
    e = escrow(world, "2")
    h = world.hold("buyer", e["id"], "1")
    seller_before, ref_before, buyer_before = balance(world, "seller"), balance(world, "ref"), balance(world, "buyer")
    r = world.capture("buyer", h["id"], "0.5", final=True)
    assert (r["gross_micro"], r["net_micro"], r["fee_micro"], r["referral_micro"]) == \
        (M("0.5"), M("0.495"), M("0.005"), M("0.00075"))
    assert balance(world, "seller") == seller_before + M("0.495")
    assert balance(world, "ref") == ref_before + M("0.00075")
    assert balance(world, "buyer") == buyer_before  # an open escrow keeps what a final capture frees
    assert (r["hold"]["status"], r["escrow"]["held_micro"], r["remaining_micro"]) == ("captured", 0, M("1.5"))
    assert_audit_clean(world)


# ---- spend tokens ---------------------------------------------------------------------

def test_revoked_tokens_stop_and_a_minted_one_works(world):
    e = escrow(world)
    first = e["spend_token"]
    second = world.mint_spend_token("buyer", e["id"])
    assert second["escrow_id"] == e["id"] and second["spend_token"].startswith("est_")
    assert second["spend_token"] != first
    world.hold("seller", second["spend_token"], "0.1")
    refused(world, Forbidden, world.mint_spend_token, "seller", e["id"])
    refused(world, Forbidden, world.revoke_spend_tokens, "seller", e["id"])
    assert world.revoke_spend_tokens("buyer", e["id"]) == {"escrow_id": e["id"], "revoked": 2}
    assert world.revoke_spend_tokens("buyer", e["id"])["revoked"] == 0
    for token in (first, second["spend_token"]):
        assert "revoked" in refused(world, Forbidden, world.hold, "seller", token, "0.1").message
    for bogus in ("est_" + "A" * 43, "est_", "est_\x00", "est_" + "x" * 500):
        refused(world, Forbidden, world.hold, "seller", bogus, "0.1")
    third = world.mint_spend_token("buyer", e["id"])["spend_token"]
    assert world.hold("seller", third, "0.1")["escrow_id"] == e["id"]
    # Holds made before the revocation are the seller's to finish.
    assert len(world.holds("buyer", e["id"])) == 2

    world.cancel("buyer", e["id"])
    refused(world, StateConflict, world.hold, "seller", third, "0.000001")
    refused(world, StateConflict, world.mint_spend_token, "buyer", e["id"])
    assert world.revoke_spend_tokens("buyer", e["id"])["revoked"] == 1


def test_tokens_are_stored_only_hashed_and_never_shown_again(world):
    e = world.create_escrow("buyer", "seller", "1", idempotency_key="create-1")
    tokens = [e["spend_token"], world.mint_spend_token("buyer", e["id"])["spend_token"]]
    assert "spend_token" not in world.create_escrow("buyer", "seller", "1", idempotency_key="create-1")
    answers = [world.hold("seller", tokens[0], "0.2", idempotency_key="h1"),
               world.hold("seller", tokens[0], "0.2", idempotency_key="h1"),
               world.hold("seller", tokens[1], "0.3", idempotency_key="h2")]
    answers += [world.capture("seller", answers[0]["id"], "0.1", idempotency_key="c1"),
                world.void("seller", answers[0]["id"], idempotency_key="v1"),
                world.capture_many("seller", [{"hold_id": answers[2]["id"], "amount": "0.1", "final": True,
                                               "idempotency_key": "i1"}], idempotency_key="b1"),
                world.get("buyer", e["id"]), world.holds("seller", e["id"]),
                world.revoke_spend_tokens("buyer", e["id"])]
    refused(world, Forbidden, world.hold, "seller", tokens[0], "0.1", idempotency_key="h3")
    world.cancel("buyer", e["id"])
    text = stored_text(world.engine)
    assert {"spend_tokens", "idempotency_keys", "escrow_events", "holds"} <= set(text)
    for token in tokens:
        secret = token.removeprefix("est_")
        for table, cells in text.items():
            assert secret not in cells, f"a spend token is stored in {table}"
        assert hash_secret(token) in text["spend_tokens"]
        for answer in answers:
            assert secret not in json.dumps(answer), "a spend token is in an answer other than the first"
    with world.engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(spend_tokens)) == 2


# ---- idempotency ----------------------------------------------------------------------

def test_hold_capture_and_void_retries_take_effect_once(world):
    e = escrow(world, "1")
    token = e["spend_token"]
    h = world.hold("seller", token, "0.5", ttl_seconds=60, idempotency_key="k-hold")
    assert world.hold("seller", token, "0.500000", ttl_seconds=60, idempotency_key="k-hold") == h
    assert view(world, e["id"])["held_micro"] == M("0.5")
    refused(world, IdempotencyConflict, world.hold, "seller", token, "0.4", idempotency_key="k-hold")
    refused(world, IdempotencyConflict, world.hold, "seller", e["id"], "0.5", idempotency_key="k-hold")
    another = world.mint_spend_token("buyer", e["id"])["spend_token"]
    refused(world, IdempotencyConflict, world.hold, "seller", another, "0.5", idempotency_key="k-hold")
    # Keys are per agent: the buyer's "k-hold" is a different request.
    assert world.hold("buyer", e["id"], "0.1", idempotency_key="k-hold")["holder"] == "buyer"

    c = world.capture("seller", h["id"], "0.2", idempotency_key="k-cap")
    seller_after = balance(world, "seller")
    assert world.capture("seller", h["id"], "0.2", idempotency_key="k-cap") == c
    assert balance(world, "seller") == seller_after
    refused(world, IdempotencyConflict, world.capture, "seller", h["id"], "0.2", final=True, idempotency_key="k-cap")
    v = world.void("seller", h["id"], idempotency_key="k-void")
    assert (v["kind"], v["gross_micro"], v["hold"]["status"], v["escrow"]["held_micro"]) == \
        ("void", 0, "voided", M("0.1"))
    assert world.void("seller", h["id"], idempotency_key="k-void") == v
    # After the hold closed, the capture's key still answers its first result; a new request does not.
    assert world.capture("seller", h["id"], "0.2", idempotency_key="k-cap") == c
    refused(world, StateConflict, world.void, "seller", h["id"])
    refused(world, StateConflict, world.capture, "seller", h["id"], "0.1")
    with world.engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(holds).where(holds.c.escrow_id == e["id"])) == 2
        assert conn.scalar(select(func.count()).select_from(transactions)
                           .where(transactions.c.kind == "capture", transactions.c.escrow_id == e["id"])) == 1
    assert_audit_clean(world)


def test_a_capture_beyond_the_hold_is_refused_with_nothing_moved(world):
    e = escrow(world)
    h = world.hold("seller", e["spend_token"], "0.5")
    error = refused(world, InsufficientFunds, world.capture, "seller", h["id"], "0.500001")
    assert error.details == {"hold_open_micro": M("0.5"), "needed_micro": M("0.500001")}
    world.capture("seller", h["id"], "0.2")
    refused(world, InsufficientFunds, world.capture, "seller", h["id"], "0.300001", final=True)
    refused(world, ValidationError, world.capture, "seller", h["id"], "0")
    refused(world, ValidationError, world.capture, "seller", h["id"], "0.1", final="yes")
    refused(world, ValidationError, world.capture, "seller", "not a hold id " * 5, "0.1")
    refused(world, ValidationError, world.capture, "seller", h["id"], "0.1", usage={"prompt_tokens": -1})
    r = world.capture("seller", h["id"], "0", final=True)  # frees the rest, pays nothing
    assert (r["gross_micro"], r["hold"]["status"], r["hold"]["captured_micro"], r["remaining_micro"]) == \
        (0, "captured", M("0.2"), M("0.8"))
    refused(world, StateConflict, world.capture, "seller", h["id"], "0.1")
    assert view(world, e["id"])["paid_micro"] == M("0.2")


def test_deduct_and_release_cannot_take_held_money(world):
    e = escrow(world, "1")
    h = world.hold("seller", e["spend_token"], "0.7")
    refused(world, InsufficientFunds, world.deduct, "seller", e["id"], "0.300001")
    world.deduct("seller", e["id"], "0.3")
    refused(world, InsufficientFunds, world.deduct, "seller", e["id"], "0.000001")
    refused(world, InsufficientFunds, world.release, "buyer", e["id"], "0.000001", refund_remainder=False)
    usage_priced = world.release("buyer", e["id"], usage={"prompt_tokens": 10**6, "completion_tokens": 0},
                                 price_per_token="1", refund_remainder=False)
    assert usage_priced["gross_micro"] == 0  # capped at the free remainder, which is nothing
    r = world.release("buyer", e["id"])      # the whole remainder: nothing free, the held part stays reserved
    assert (r["gross_micro"], r["refunded_micro"], r["status"], r["escrow"]["held_micro"]) == \
        (0, 0, "released", M("0.7"))
    assert world.capture("seller", h["id"], "0.7")["gross_micro"] == M("0.7")
    end = view(world, e["id"])
    assert (end["paid_micro"], end["refunded_micro"], end["held_micro"]) == (M("1"), 0, 0)
    assert_audit_clean(world)


# ---- capture_many ---------------------------------------------------------------------

def test_capture_many_reports_a_bad_item_alone_and_moves_the_good_ones(world, clock):
    a, b = escrow(world, "1"), world.create_escrow("buyer", "seller2", "1")
    ha = world.hold("seller", a["spend_token"], "0.5")
    hb = world.hold("seller2", b["spend_token"], "0.5")
    hc = world.hold("seller", a["id"], "0.2", ttl_seconds=1)
    hd = world.hold("buyer", b["id"], "0.3")   # the buyer's, and on an escrow the caller is no party of
    clock.advance(1)                            # hc has expired
    seller_before = balance(world, "seller")
    result = world.capture_many("seller", [
        (ha["id"], "0.1"),
        {"hold_id": ha["id"], "amount": "0.5"},             # more than is left
        (ha["id"], "0.1", True),
        (hb["id"], "0.1"),                                  # seller2's hold: a stranger's view
        (hc["id"], "0.1"),
        ("hold_" + "f" * 24, "0.1"),
        (ha["id"], "0.1"),                                  # closed by the final item above
        (hd["id"], "0.1"),
    ])["results"]
    assert [item["ok"] for item in result] == [True, False, True, False, False, False, False, False]
    assert [(item.get("error"), item.get("status")) for item in result if not item["ok"]] == [
        ("insufficient_funds", 402), ("not_found", 404), ("state_conflict", 409), ("not_found", 404),
        ("state_conflict", 409), ("not_found", 404)]
    assert all(item["message"] for item in result if not item["ok"])
    assert [result[0]["receipt"]["gross_micro"], result[2]["receipt"]["refunded_micro"]] == [M("0.1"), 0]
    assert result[2]["receipt"]["hold"]["status"] == "captured"
    assert balance(world, "seller") == seller_before + 2 * M("0.099")
    # The expired hold in the batch was freed after it.
    assert world.get_hold("seller", hc["id"])["status"] == "expired"
    assert (view(world, a["id"])["held_micro"], view(world, a["id"])["remaining_micro"]) == (0, M("0.8"))
    assert world.get_hold("seller2", hb["id"])["open_micro"] == M("0.5")
    assert world.get_hold("buyer", hd["id"])["open_micro"] == M("0.3")
    assert_audit_clean(world)


def test_capture_many_keys_per_batch_and_per_item(world):
    e = escrow(world, "1")
    h1 = world.hold("seller", e["spend_token"], "0.4")
    h2 = world.hold("seller", e["spend_token"], "0.4")
    single = world.capture("seller", h1["id"], "0.1", idempotency_key="item-1")
    items = [{"hold_id": h1["id"], "amount": "0.1", "idempotency_key": "item-1"},   # already done singly
             {"hold_id": h2["id"], "amount": "0.2", "idempotency_key": "item-2"},
             {"hold_id": h2["id"], "amount": "0.05"}]
    first = world.capture_many("seller", items, idempotency_key="batch-1")
    assert first["results"][0] == {"ok": True, "receipt": single}
    assert [r["receipt"]["gross_micro"] for r in first["results"][1:]] == [M("0.2"), M("0.05")]
    after = hold_snapshot(world)
    assert world.capture_many("seller", items, idempotency_key="batch-1") == first
    assert hold_snapshot(world) == after
    refused(world, IdempotencyConflict, world.capture_many, "seller", items[:2], idempotency_key="batch-1")
    # A new batch that resends an item under its key gets that item's first receipt, paid once.
    again = world.capture_many("seller", [items[1], (h2["id"], "0.01")])["results"]
    assert again[0] == first["results"][1]
    assert again[1]["receipt"]["gross_micro"] == M("0.01")
    assert world.capture("seller", h2["id"], "0.2", idempotency_key="item-2") == first["results"][1]["receipt"]
    conflicting = world.capture_many("seller", [{"hold_id": h2["id"], "amount": "0.02", "idempotency_key": "item-2"}])
    assert conflicting["results"][0]["error"] == "idempotency_conflict"
    assert view(world, e["id"])["paid_micro"] == M("0.1") + M("0.2") + M("0.05") + M("0.01")
    assert_audit_clean(world)


@pytest.mark.slow
def test_capture_many_takes_at_most_a_thousand_items_in_one_transaction(world):
    e = escrow(world, "1")
    h = world.hold("seller", e["spend_token"], "0.001")  # a thousand micro-USDC, one per item
    refused(world, ValidationError, world.capture_many, "seller", [(h["id"], "0.000001")] * 1001)
    refused(world, ValidationError, world.capture_many, "seller", [])
    refused(world, ValidationError, world.capture_many, "seller", "not a list")
    refused(world, ValidationError, world.capture_many, "seller", [(h["id"], "0.000001"), (h["id"], "0")])
    refused(world, ValidationError, world.capture_many, "seller", [(h["id"], "0.000001"), 7])
    with pytest.raises(ValidationError, match="capture 1"):
        world.capture_many("seller", [(h["id"], "0.000001"), ("", "0.1")])
    results = world.capture_many("seller", [(h["id"], "0.000001")] * 1000)["results"]
    assert all(item["ok"] for item in results)
    assert results[-1]["receipt"]["hold"]["status"] == "captured"
    assert view(world, e["id"])["paid_micro"] == M("0.001")
    assert_audit_clean(world)


# ---- expiry, exactly once -------------------------------------------------------------

def _expiring_holds(ledger: Ledger, clock, count: int, escrows: int = 4) -> list[str]:
    ids = [escrow(ledger, "1")["id"] for _ in range(escrows)]
    made = [ledger.hold("seller" if i % 2 else "buyer", ids[i % escrows], "0.01", ttl_seconds=5)["id"]
            for i in range(count)]
    clock.advance(5)
    return made


def _run_threads(*targets) -> list:
    results: list = [None] * len(targets)
    errors: list[BaseException] = []

    def run(index, target):
        try:
            results[index] = target()
        except BaseException as error:  # surfaced below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i, t)) for i, t in enumerate(targets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a racing thread hung"
    assert not errors, errors
    return results


def _sweep_until_done(ledger: Ledger, limit: int) -> int:
    total = 0
    for _ in range(100):
        count = ledger.expire_due(limit=limit)
        total += count
        if count == 0:
            return total
    raise AssertionError("the sweeper never finished")


def test_two_sweepers_on_one_database_expire_each_hold_exactly_once(world, db_url, clock):
    made = _expiring_holds(world, clock, 40)
    other = Ledger(db_url, clock=clock)
    try:
        counts = _run_threads(lambda: _sweep_until_done(world, 7), lambda: _sweep_until_done(other, 5),
                              lambda: sum(other.expire_hold(hid) for hid in reversed(made)))
    finally:
        other.close()
    assert sum(counts) == len(made)
    assert hold_events(world, "hold_expired") == Counter({hid: 1 for hid in made})
    with world.engine.connect() as conn:
        assert set(conn.scalars(select(holds.c.status))) == {"expired"}
    for e in world.history("buyer"):
        assert (e["held_micro"], e["remaining_micro"], e["status"]) == (0, M("1"), "active")
    assert_audit_clean(world)


def test_late_captures_racing_a_sweeper_are_refused_and_free_each_hold_once(world, db_url, clock):
    made = _expiring_holds(world, clock, 24)
    other = Ledger(db_url, clock=clock)
    refusals = []

    def capture_all():
        for hid in made:
            holder = world.get_hold("buyer", hid)["holder"]
            with pytest.raises(StateConflict):
                other.capture(holder, hid, "0.005")
            refusals.append(hid)
    try:
        _run_threads(lambda: _sweep_until_done(world, 3), capture_all)
    finally:
        other.close()
    assert refusals == made
    assert hold_events(world, "hold_expired") == Counter({hid: 1 for hid in made})
    with world.engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(transactions).where(transactions.c.kind == "capture")) == 0
    assert sum(e["held_micro"] + e["paid_micro"] for e in world.history("buyer")) == 0
    assert_audit_clean(world)


# ---- release with the buyer's own hold ------------------------------------------------

def test_a_release_with_the_buyers_hold_frees_it_as_a_void_and_pays_in_one_transaction(world):
    e = escrow(world, "1")
    other = world.hold("buyer", e["id"], "0.3")        # another call's reservation, left alone
    h = world.hold("buyer", e["id"], "0.6")
    # Only 0.1 is free besides the hold: the release is paid out of what the hold frees.
    r = world.release("buyer", e["id"], "0.5", refund_remainder=False, hold_id=h["id"],
                      usage={"prompt_tokens": 3, "completion_tokens": 4}, idempotency_key="call-1")
    assert (r["gross_micro"], r["status"], r["hold"]["status"], r["hold"]["id"]) == \
        (M("0.5"), "active", "voided", h["id"])
    assert (r["escrow"]["held_micro"], r["remaining_micro"]) == (M("0.3"), M("0.2"))
    assert world.get_hold("buyer", h["id"])["closed_at_ms"] is not None
    assert hold_events(world, "hold_closed") == Counter({h["id"]: 1})
    with world.engine.connect() as conn:
        data = conn.scalar(select(escrow_events.c.data).where(escrow_events.c.kind == "hold_closed"))
    assert (data["freed_micro"], data["captured_micro"]) == (M("0.6"), 0)
    # A replay answers as the first time and moves nothing; a second use of the hold is refused.
    again = world.release("buyer", e["id"], "0.5", refund_remainder=False, hold_id=h["id"],
                          usage={"prompt_tokens": 3, "completion_tokens": 4}, idempotency_key="call-1")
    assert again == r and view(world, e["id"])["paid_micro"] == M("0.5")
    refused(world, StateConflict, world.release, "buyer", e["id"], "0.1", refund_remainder=False, hold_id=h["id"])
    refused(world, IdempotencyConflict, world.release, "buyer", e["id"], "0.5", refund_remainder=False,
            hold_id=other["id"], usage={"prompt_tokens": 3, "completion_tokens": 4}, idempotency_key="call-1")
    assert view(world, e["id"])["held_micro"] == M("0.3")
    assert_audit_clean(world)


def test_a_release_with_a_hold_not_the_callers_own_open_one_is_refused_with_nothing_moved(world, clock):
    e, elsewhere = escrow(world, "1"), escrow(world, "1")
    sellers = world.hold("seller", e["spend_token"], "0.2")
    mine_elsewhere = world.hold("buyer", elsewhere["id"], "0.2")
    voided = world.hold("buyer", e["id"], "0.1")
    world.void("buyer", voided["id"])
    assert "maker" in refused(world, Forbidden, world.release, "buyer", e["id"], "0.1", refund_remainder=False,
                              hold_id=sellers["id"]).message
    refused(world, NotFound, world.release, "buyer", e["id"], "0.1", refund_remainder=False,
            hold_id=mine_elsewhere["id"])
    refused(world, NotFound, world.release, "buyer", e["id"], "0.1", refund_remainder=False,
            hold_id="hold_" + "0" * 24)
    refused(world, StateConflict, world.release, "buyer", e["id"], "0.1", refund_remainder=False,
            hold_id=voided["id"])
    for malformed in ("", "x" * 41, 12, "hold_\x00"):
        refused(world, ValidationError, world.release, "buyer", e["id"], "0.1", hold_id=malformed)
    # The seller's own hold does not let the seller release (only the buyer releases).
    refused(world, Forbidden, world.release, "seller", e["id"], "0.1", hold_id=sellers["id"])
    # An expired hold is refused and freed once, by that refusal.
    late = world.hold("buyer", e["id"], "0.3", ttl_seconds=5)
    clock.advance(6)
    with pytest.raises(StateConflict, match="expired"):
        world.release("buyer", e["id"], "0.1", refund_remainder=False, hold_id=late["id"])
    assert world.get_hold("buyer", late["id"])["status"] == "expired"
    assert (view(world, e["id"])["paid_micro"], view(world, e["id"])["held_micro"]) == (0, M("0.2"))
    assert_audit_clean(world)


def test_a_budgeted_keys_release_with_its_own_hold_counts_as_its_owners(world):
    key = world.create_key("buyer", budget="1", sellers=["seller"])
    me = "@" + key["key_id"]
    e = world.create_escrow(me, "seller", "0.5")
    h = world.hold(me, e["id"], "0.4")
    r = world.release(me, e["id"], "0.1", refund_remainder=False, hold_id=h["id"])
    assert (r["gross_micro"], r["hold"]["status"], r["escrow"]["held_micro"]) == (M("0.1"), "voided", 0)
    closed = world.release(me, e["id"], "0")
    assert closed["refunded_micro"] == M("0.4")
    spent = world.key("buyer", key["key_id"])
    assert (spent["paid_micro"], spent["refunded_micro"], spent["left_micro"]) == (M("0.1"), M("0.4"), M("0.9"))
    assert_audit_clean(world)
