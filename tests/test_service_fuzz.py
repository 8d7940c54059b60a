"""Fuzzing the HTTP API: schemathesis over every operation of `create_app` (MCP left out),
sent as a funded agent that has open escrows, and targeted cases for bad bodies and amounts.

Properties: no generated request gets a 5xx; every refusal is JSON {error, message}; a
refused request moves nothing (the ledger's snapshot is unchanged); the journal audits
clean at the end. Amounts with more than 6 decimals are rounded half-even (allowed) and
the receipt says what was sent (`rounded_from`).
"""

from __future__ import annotations

import itertools
import json
import zlib
from decimal import ROUND_HALF_EVEN, Decimal

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from hf_escrow.ledger import Ledger, LedgerConfig
from hf_escrow.server import create_app
from hf_escrow.server.faucet import FaucetSettings

from .helpers import assert_audit_clean, parties, snapshot

FUZZ_EXAMPLES = 80
MIN_AUTHED_PER_MONEY_ROUTE = 50
# Every POST moves money or reserves it, except these.
NOT_MONEY_ROUTES = {"POST /register", "POST /api/escrow/{escrow_id}/tokens", "POST /api/me/key", "POST /api/keys"}
OPERATOR_KEY = "fuzz-operator-" + "k" * 20
# The faucet on and its limits out of reach: the fuzzer reaches the ledger behind them.
FAUCET = FaucetSettings(enabled=True, per_client=10**6, overall=10**6)


class World:
    """One ledger with a funded buyer, a seller, a verifier and open escrows between them."""

    def __init__(self, url: str):
        self.ledger = Ledger(url, config=LedgerConfig())
        self.agents = parties(self.ledger, "buyer", "seller", "verifier", "rotator", fund="1000")
        self.keys = {name: reg["api_key"] for name, reg in self.agents.items()}
        self.keys["operator"] = OPERATOR_KEY
        self.app = create_app(self.ledger, sweep_interval_s=0, mcp=False, faucet=FAUCET, admin_key=OPERATOR_KEY)
        self.plain = self.benchmark = self.token = self.hold = None
        self.statuses: dict[str, set[int]] = {}
        self.sent: dict[str, int] = {}
        self.authed: dict[str, int] = {}   # requests that got past authentication (not 401)
        self.counter = itertools.count()
        self.refresh()

    def refresh(self) -> None:
        """Keep one open plain escrow and one open benchmark escrow (verifier named) at hand."""
        if self.ledger.me("buyer")["balance_micro"] < 200_000_000:
            self.ledger.deposit("buyer", "1000")
        plain = self.plain and self.ledger.get("buyer", self.plain)
        if not plain or plain["status"] != "active" or plain["remaining_micro"] < 2_000_000:
            created = self.ledger.create_escrow("buyer", "seller", "100", ttl_seconds=86_400,
                                                meta={"model": "m", "prompt_tokens": 10, "max_completion_tokens": 90})
            self.plain, self.token = created["id"], created["spend_token"]
        # The fuzzer may have revoked the escrow's tokens: a fresh one for every case.
        self.token = self.ledger.mint_spend_token("buyer", self.plain)["spend_token"]
        hold = self.hold and self.ledger.get_hold("seller", self.hold)
        if not hold or hold["status"] != "open" or hold["expires_at_ms"] < self.ledger.now_ms() + 60_000:
            # A hold left in its grace after a cancel would expire under a refused request
            # (which then rightly frees it): settle it here, before the case runs.
            self.ledger.expire_due_holds(10)
            self.hold = self.ledger.hold("seller", self.plain, "1", ttl_seconds=600)["id"]
        if self.benchmark is None or self.ledger.get("buyer", self.benchmark)["status"] not in (
                "active", "awaiting_verification"):
            self.benchmark = self.ledger.create_escrow(
                "buyer", "seller", "5", ttl_seconds=86_400,
                release_condition={"metric": "accuracy", "threshold": 0.8, "verifier": "verifier"})["id"]

    def close(self) -> None:
        self.ledger.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'ledger.db'}")
    yield w
    assert_audit_clean(w.ledger)
    w.close()


@pytest.fixture(scope="module")
def api_schema(world):
    schema = schemathesis.openapi.from_asgi("/openapi.json", world.app)
    schema.config.generation.update(max_examples=FUZZ_EXAMPLES)
    return schema.exclude(path_regex="^/mcp")


schema = schemathesis.pytest.from_fixture("api_schema")

_VALID_AMOUNTS = ["0.000001", "0.0000015", 0.0017920000000000002, 1, "0.25", 0.5, "2.5e-3"]
_ID_FIELDS = {"seller_id": "seller", "recipient_wallet": "seller", "agent_id": "buyer"}


def _steer(case, world: World) -> None:
    """Point most generated requests at real parties and escrows, so that they get past 401/404
    and reach the amount, role and state checks; leave a share fully random."""
    world.refresh()
    path = case.operation.path
    salt = zlib.crc32(repr((path, case.body, case.query, case.path_parameters, next(world.counter))).encode())
    steer = salt % 5 != 0
    role = "seller" if path.endswith(("/deduct", "/submit-result")) else "buyer"
    if path.endswith("/verify"):
        role = "verifier"
    if salt % 11 == 0:
        role = "seller"  # sometimes the wrong role
    if path == "/api/me/key":
        role = "rotator"  # its key changes with each rotation; the others' stay
    if (path.startswith("/api/admin/") or path == "/api/audit") and salt % 2:
        role = "operator"
    escrow = world.benchmark if path.endswith(("/submit-result", "/verify")) or salt % 7 == 0 else world.plain
    headers = {k: v for k, v in (case.headers or {}).items() if not steer or k.lower() != "authorization"}
    if steer:
        headers["Authorization"] = f"Bearer {world.keys[role]}"
    case.headers = headers
    if path.startswith("/api/holds"):
        role = "seller"
        headers["Authorization"] = f"Bearer {world.keys[role]}" if steer else headers.get("Authorization", "")
    if steer and case.path_parameters and "escrow_id" in case.path_parameters:
        case.path_parameters = dict(case.path_parameters, escrow_id=escrow)
    if steer and case.path_parameters and "hold_id" in case.path_parameters:
        case.path_parameters = dict(case.path_parameters, hold_id=world.hold)
    if steer and isinstance(case.body, dict):
        body = dict(case.body)
        if "escrow_id" in body:
            body["escrow_id"] = escrow
        if "spend_token" in body:
            body["spend_token"] = world.token
        if isinstance(body.get("items"), list):
            body["items"] = [dict(item, hold_id=world.hold) if isinstance(item, dict) else item
                             for item in body["items"]]
        for name, agent in _ID_FIELDS.items():
            if name in body and salt % 3:
                body[name] = agent
        if "amount_usdc" in body and salt % 4 == 1:
            body["amount_usdc"] = _VALID_AMOUNTS[(salt >> 8) % len(_VALID_AMOUNTS)]
        if path == "/register" and "agent_id" in body and salt % 3 == 1:
            body["agent_id"] = f"fz-{salt:x}"  # a fresh, valid agent id
        if "metric" in body and salt % 2:
            body["metric"] = "accuracy"
        case.body = body


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), max_examples=FUZZ_EXAMPLES)
def test_no_server_error_anywhere(case, world):
    _steer(case, world)
    before = snapshot(world.ledger)
    response = case.call()
    route = f"{case.method} {case.operation.path}"
    world.statuses.setdefault(route, set()).add(response.status_code)
    if route == "POST /api/me/key" and response.status_code == 200:
        world.keys["rotator"] = response.json()["api_key"]
    if case.method.upper() == case.operation.method.upper():  # not schemathesis' wrong-method probes
        world.sent[route] = world.sent.get(route, 0) + 1
        world.authed[route] = world.authed.get(route, 0) + (response.status_code != 401)
    assert response.status_code < 500, (case.method, case.formatted_path, case.body, response.text[:500])
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body, dict) and body.get("error") and body.get("message"), response.text[:500]
        assert snapshot(world.ledger) == before, (case.method, case.formatted_path, case.body, response.text)


# ---- targeted cases -----------------------------------------------------------------


@pytest.fixture(scope="module")
def http(world):
    with TestClient(world.app, raise_server_exceptions=False) as client:
        yield client


def _auth(world: World, agent: str) -> dict:
    return {"Authorization": f"Bearer {world.keys[agent]}"}


def _refused(world: World, http: TestClient, method: str, path: str, agent: str, *, status: int | tuple = 422,
             error: str | None = None, **kwargs) -> dict:
    before = snapshot(world.ledger)
    response = http.request(method, path, headers={**_auth(world, agent), **kwargs.pop("headers", {})}, **kwargs)
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status_code in statuses, (path, kwargs, response.status_code, response.text)
    body = response.json()
    assert set(body) >= {"error", "message"} and body["message"], body
    if error:
        assert body["error"] == error, body
    assert snapshot(world.ledger) == before, (path, kwargs)
    return body


def _targets(world: World) -> list[tuple[str, str, str, dict]]:
    """(path, acting agent, amount field, the rest of a valid body) for every amount field."""
    world.refresh()
    return [
        ("/api/escrow", "buyer", "amount_usdc", {"seller_id": "seller"}),
        ("/escrow/create", "buyer", "amount_usdc", {"recipient_wallet": "seller"}),
        (f"/api/escrow/{world.plain}/deduct", "seller", "amount_usdc", {}),
        (f"/api/escrow/{world.plain}/release", "buyer", "amount_usdc", {"refund_remainder": False}),
        (f"/api/escrow/{world.plain}/release", "buyer", "price_per_token",
         {"refund_remainder": False, "usage": {"prompt_tokens": 1, "completion_tokens": 1}}),
        ("/escrow/release", "buyer", "price_per_token", {"escrow_id": world.plain, "actual_completion_tokens": 3}),
    ]


BAD_AMOUNTS = [True, False, None, [1], ["0.5"], {"usdc": 1}, {}, "", " ", "abc", "0x10", "1,5", "NaN", "nan",
               "Infinity", "-Infinity", "inf", "-1", -1, -0.5, "-0.000001", "1e400", 1e300, "9" * 70,
               "100000000.000001", 10**12, "1e16", "0.5 USDC", "1.2.3", "--1", "1e", "+-1"]
ZERO_AMOUNTS = [0, "0", 0.0, "0.0000004", 4e-7, "-0"]


@pytest.mark.parametrize("bad", BAD_AMOUNTS, ids=repr)
def test_bad_amounts_are_refused_with_json_and_move_nothing(world, http, bad):
    for path, agent, field, rest in _targets(world):
        if field == "price_per_token" and bad in ("100000000.000001", 10**12, "1e16"):
            continue  # a large per-token price is a valid price; the payout is capped at the remainder
        if field == "price_per_token" and bad is None:
            continue  # optional
        if field == "amount_usdc" and bad is None and path.endswith("/release"):
            continue  # optional: release the remainder
        _refused(world, http, "POST", path, agent, status=(422,), json={**rest, field: bad})


@pytest.mark.parametrize("zero", ZERO_AMOUNTS, ids=repr)
def test_amounts_rounding_to_zero_are_refused(world, http, zero):
    for path, agent, field, rest in _targets(world)[:3]:
        body = _refused(world, http, "POST", path, agent, json={**rest, field: zero})
        assert body["error"] == "invalid_amount", body


@pytest.mark.parametrize("raw", [b"{", b"{\"amount_usdc\": ", b"not json", b"[1, 2]", b"\"0.5\"", b"null",
                                 b"{\"amount_usdc\": NaN}", b"{\"amount_usdc\": Infinity}", b"\xff\xfe",
                                 b"{\"amount_usdc\": 1e999}", b"{\"amount_usdc\": \"0.1\"} trailing"])
@pytest.mark.parametrize("content_type", ["application/json", "application/x-www-form-urlencoded"])
def test_bad_json_bodies(world, http, raw, content_type):
    world.refresh()
    for path, agent in (("/api/escrow", "buyer"), (f"/api/escrow/{world.plain}/deduct", "seller"),
                        (f"/api/escrow/{world.plain}/release", "buyer"), ("/escrow/release", "buyer"),
                        ("/register", "buyer"), ("/claim", "buyer")):
        _refused(world, http, "POST", path, agent, content=raw, headers={"Content-Type": content_type})


@pytest.mark.parametrize("raw", [b"\x00" * 5, b"\xe9", b'{"amount_usdc": "caf\xe9"}'])
def test_undecodable_body_gets_the_json_error(world, http, raw):
    _refused(world, http, "POST", "/register", "buyer", content=raw)


@pytest.mark.parametrize("field,value", [
    ("reason", 5), ("reason", ["x"]), ("usage", "lots"), ("usage", {"prompt_tokens": -1}),
    ("usage", {"prompt_tokens": True}), ("usage", {"completion_tokens": 1.5}), ("usage", {"prompt_tokens": 10**9}),
])
def test_wrong_types_beside_a_valid_amount(world, http, field, value):
    world.refresh()
    _refused(world, http, "POST", f"/api/escrow/{world.plain}/deduct", "seller",
             json={"amount_usdc": "0.01", field: value})


@pytest.mark.parametrize("body", [
    {"seller_id": "seller", "amount_usdc": "1", "ttl_seconds": True},
    {"seller_id": "seller", "amount_usdc": "1", "ttl_seconds": "60"},
    {"seller_id": "seller", "amount_usdc": "1", "ttl_seconds": -5},
    {"seller_id": "seller", "amount_usdc": "1", "ttl_seconds": 1e12},
    {"seller_id": "seller", "amount_usdc": "1", "meta": [1]},
    {"seller_id": "seller", "amount_usdc": "1", "meta": "x"},
    {"seller_id": ["seller"], "amount_usdc": "1"},
    {"seller_id": 7, "amount_usdc": "1"},
    {"seller_id": "buyer", "amount_usdc": "1"},
    {"seller_id": "seller", "amount_usdc": "1", "release_condition": {"metric": "acc", "threshold": "high"}},
    {"seller_id": "seller", "amount_usdc": "1", "release_condition": {"metric": "acc", "threshold": 0.5,
                                                                      "verifier": "seller"}},
    {"seller_id": "seller", "amount_usdc": "1", "bonus_conditions": {"throughput_tps_min": 1, "bonus_pct": -3}},
    {"seller_id": "seller", "amount_usdc": "1", "bonus_conditions": {"surprise": 1}},
    {"seller_id": "seller", "amount_usdc": "1", "referral_code": "ref_nope"},
    {"seller_id": "seller", "amount_usdc": "1", "pricing": {"input_per_1k": "-1"}},
])
def test_bad_create_bodies(world, http, body):
    _refused(world, http, "POST", "/api/escrow", "buyer", status=(422, 404), json=body)


def test_huge_amount_within_limit_but_over_balance_is_402(world, http):
    body = _refused(world, http, "POST", "/api/escrow", "buyer", status=402, json={"seller_id": "seller",
                                                                                   "amount_usdc": "99999999"})
    assert body["error"] == "insufficient_funds"
    world.refresh()
    body = _refused(world, http, "POST", f"/api/escrow/{world.plain}/deduct", "seller", status=402,
                    json={"amount_usdc": "99999999.999999"})
    assert body["error"] == "insufficient_funds"


@given(amount=st.decimals(min_value=Decimal("0.0000005"), max_value=Decimal("0.01"), places=7,
                          allow_nan=False, allow_infinity=False),
       as_string=st.booleans())
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_seven_decimal_deducts_round_half_even_and_say_so(world, http, amount, as_string):
    world.refresh()
    sent = str(amount) if as_string else float(amount)
    expected = int((Decimal(repr(sent) if isinstance(sent, float) else sent) * 10**6)
                   .to_integral_value(rounding=ROUND_HALF_EVEN))
    before = snapshot(world.ledger)
    response = http.post(f"/api/escrow/{world.plain}/deduct", headers=_auth(world, "seller"),
                         json={"amount_usdc": sent})
    if expected == 0:
        assert response.status_code == 422 and response.json()["error"] == "invalid_amount", response.text
        assert snapshot(world.ledger) == before
        return
    assert response.status_code == 200, response.text
    receipt = response.json()
    assert receipt["gross_micro"] == expected, (sent, receipt)
    assert receipt["net_micro"] + receipt["fee_micro"] == expected
    exact = Decimal(repr(sent)) if isinstance(sent, float) else amount
    if exact * 10**6 != (exact * 10**6).to_integral_value():
        assert receipt["rounded_from"] is not None, receipt
        assert Decimal(receipt["rounded_from"]) == exact, (receipt["rounded_from"], sent)
    else:
        assert receipt.get("rounded_from") is None, receipt


def test_float_products_of_the_seeds_are_accepted(world, http):
    world.refresh()
    for sent, micro in ((0.0017920000000000002, 1792), (37 / 1000 * 0.0005, 18)):  # 18.5 -> 18 (half-even)
        response = http.post(f"/api/escrow/{world.plain}/deduct", headers=_auth(world, "seller"),
                             json={"amount_usdc": sent})
        assert response.status_code == 200, response.text
        assert response.json()["gross_micro"] == micro
        assert Decimal(response.json()["rounded_from"]) == Decimal(repr(sent)), response.json()["rounded_from"]


def test_refusals_without_a_valid_key_are_401_json(world, http):
    world.refresh()
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"},
                    {"Authorization": "Bearer "}, {"Authorization": "bearer" + world.keys["buyer"]}):
        before = snapshot(world.ledger)
        response = http.post(f"/api/escrow/{world.plain}/release", headers=headers, json={})
        assert response.status_code == 401, (headers, response.text)
        assert response.json()["error"] == "unauthorized"
        assert snapshot(world.ledger) == before


def test_idempotency_key_abuse_is_refused(world, http):
    world.refresh()
    path = f"/api/escrow/{world.plain}/deduct"
    first = http.post(path, headers={**_auth(world, "seller"), "Idempotency-Key": "fz-1"},
                      json={"amount_usdc": "0.000003"})
    assert first.status_code == 200
    before = snapshot(world.ledger)
    again = http.post(path, headers={**_auth(world, "seller"), "Idempotency-Key": "fz-1"},
                      json={"amount_usdc": "0.000003"})
    assert again.status_code == 200 and again.json() == first.json()
    assert snapshot(world.ledger) == before
    body = _refused(world, http, "POST", path, "seller", status=409, json={"amount_usdc": "0.000004"},
                    headers={"Idempotency-Key": "fz-1"})
    assert body["error"] == "idempotency_conflict"
    _refused(world, http, "POST", path, "seller", json={"amount_usdc": "0.000004"},
             headers={"Idempotency-Key": "k" * 256})


def test_fuzz_reached_past_auth(world):
    """The steering works: every money route saw enough authenticated requests, and generated
    requests did succeed and were refused. A fuzz run that did not run fails here: run this
    test together with test_no_server_error_anywhere."""
    assert world.sent, "the schemathesis run sent no request: test_no_server_error_anywhere did not run"
    print(f"\n{'route':<52} {'sent':>6} {'authed':>7}  statuses")
    for route in sorted(world.sent):
        print(f"{route:<52} {world.sent[route]:>6} {world.authed[route]:>7}  {sorted(world.statuses[route])}")
    money = [route for route in world.sent if route.startswith("POST ") and route not in NOT_MONEY_ROUTES]
    starved = {route: world.authed[route] for route in money if world.authed[route] < MIN_AUTHED_PER_MONEY_ROUTE}
    assert not starved, f"money routes with fewer than {MIN_AUTHED_PER_MONEY_ROUTE} authenticated requests: {starved}"
    for op in ("POST /api/escrow", "POST /api/escrow/{escrow_id}/deduct", "GET /api/escrow/{escrow_id}",
               "POST /register", "GET /api/me"):
        assert any(200 <= code < 300 for code in world.statuses.get(op, ())), (op, world.statuses.get(op))
    assert any(code >= 400 for codes in world.statuses.values() for code in codes)


def test_ledger_still_balances(world):
    report = assert_audit_clean(world.ledger)
    assert report["transactions"] > 0
    json.dumps(report)


@pytest.mark.parametrize("method,path,status,error", [
    ("DELETE", "/api/escrow", 405, "method_not_allowed"),
    ("GET", "/api/nowhere", 404, "not_found"),
])
def test_framework_errors_use_the_api_shape(world, http, method, path, status, error):
    body = _refused(world, http, method, path, "buyer", status=status, error=error)
    assert path in body["message"]
