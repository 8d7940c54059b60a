"""Who may do what, over a live server: the authorization matrix of both seed dialects.

Agents: a buyer, a seller, a stranger and a verifier (named by a benchmark escrow). A
non-party gets 404 and learns nothing (the answer is the one an unknown id gets: no
amount, party, wallet, description or model in it); a party in the wrong role gets 403;
no key or a bad key gets 401. After every refusal the ledger's snapshot is unchanged.
"""

from __future__ import annotations

import httpx
import pytest

from hf_escrow.ledger import Ledger, LedgerConfig
from hf_escrow.server import create_app

from .helpers import assert_audit_clean, snapshot
from .liveserver import serve_app

BUYER, SELLER, STRANGER, VERIFIER = "buyer-b7q", "seller-s7q", "stranger-x7q", "verifier-v7q"
PLAIN_AMOUNT, BENCH_AMOUNT = "7.654321", "3.141593"
SECRET_DESC, SECRET_MODEL = "desc-ZZ81-secret", "model-QQ42-secret"


class Env:
    def __init__(self, ledger: Ledger, url: str):
        self.ledger = ledger
        self.http = httpx.Client(base_url=url, timeout=30)
        self.reg = {}
        for name in (BUYER, SELLER, STRANGER, VERIFIER):
            response = self.http.post("/register", json={"agent_id": name})
            assert response.status_code == 201, response.text
            self.reg[name] = response.json()
            ledger.deposit(name, "100")
        self.plain = self.as_(BUYER).post("/api/escrow", json={
            "seller_id": SELLER, "amount_usdc": PLAIN_AMOUNT, "description": SECRET_DESC,
            "meta": {"model": SECRET_MODEL, "prompt_tokens": 5}}).json()["id"]
        self.bench = self.as_(BUYER).post("/api/escrow", json={
            "seller_id": SELLER, "amount_usdc": BENCH_AMOUNT, "description": SECRET_DESC,
            "meta": {"model": SECRET_MODEL},
            "release_condition": {"metric": "accuracy", "threshold": 0.8, "verifier": VERIFIER}}).json()["id"]
        response = self.as_(SELLER).post(f"/api/escrow/{self.bench}/submit-result",
                                         json={"metric": "accuracy", "score": 0.95, "model_repo": "org/secret"})
        assert response.status_code == 200 and response.json()["status"] == "awaiting_verification", response.text
        # The stranger has a life of its own: an escrow with the verifier.
        self.strangers = self.as_(STRANGER).post("/api/escrow", json={
            "seller_id": VERIFIER, "amount_usdc": "1.25", "meta": {"model": "stranger-model"}}).json()["id"]

    def key(self, agent: str) -> str:
        return self.reg[agent]["api_key"]

    def as_(self, agent: str | None, raw_header: str | None = None) -> "Caller":
        if raw_header is not None:
            return Caller(self.http, {"Authorization": raw_header})
        return Caller(self.http, {"Authorization": f"Bearer {self.key(agent)}"} if agent else {})

    def secrets(self) -> list[str]:
        """Everything a non-party must never see about the buyer's escrows."""
        out = [PLAIN_AMOUNT, PLAIN_AMOUNT.rstrip("0"), "7654321", BENCH_AMOUNT, "3141593", BUYER, SELLER,
               SECRET_DESC, SECRET_MODEL, "org/secret"]
        out += [self.reg[name]["wallet"] for name in (BUYER, SELLER)]
        return out


class Caller:
    def __init__(self, http: httpx.Client, headers: dict):
        self.http, self.headers = http, headers

    def get(self, path: str, **kw) -> httpx.Response:
        return self.http.get(path, headers={**self.headers, **kw.pop("headers", {})}, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return self.http.post(path, headers={**self.headers, **kw.pop("headers", {})}, **kw)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    ledger = Ledger(f"sqlite:///{tmp_path_factory.mktemp('authz') / 'ledger.db'}", config=LedgerConfig())
    with serve_app(create_app(ledger, sweep_interval_s=0, mcp=False)) as url:
        e = Env(ledger, url)
        yield e
        e.http.close()
    assert_audit_clean(ledger)
    ledger.close()


def _requests(escrow_id: str) -> list[tuple[str, str, dict | None]]:
    """Every read and mutation on one escrow, in both dialects, with bodies that would succeed
    for the right party."""
    return [
        ("GET", f"/api/escrow/{escrow_id}", None),
        ("POST", f"/api/escrow/{escrow_id}/deduct", {"amount_usdc": "0.01", "reason": "work"}),
        ("POST", f"/api/escrow/{escrow_id}/release", {"amount_usdc": "0.01", "refund_remainder": False}),
        ("POST", f"/api/escrow/{escrow_id}/release", {}),
        ("POST", f"/api/escrow/{escrow_id}/cancel", {"reason": "mine now"}),
        ("POST", f"/api/escrow/{escrow_id}/cancel", None),
        ("POST", f"/api/escrow/{escrow_id}/submit-result", {"metric": "accuracy", "score": 0.99}),
        ("POST", f"/api/escrow/{escrow_id}/verify", {"score": 0.99}),
        ("POST", "/escrow/release", {"escrow_id": escrow_id, "actual_completion_tokens": 10,
                                     "price_per_token": "0.0001"}),
        ("POST", "/escrow/release", {"escrow_id": escrow_id, "amount_usdc": "0.01"}),
        ("POST", "/escrow/cancel", {"escrow_id": escrow_id}),
        ("GET", f"/api/escrow/{escrow_id}/holds", None),
        ("POST", f"/api/escrow/{escrow_id}/holds", {"amount_usdc": "0.01", "ttl_seconds": 30}),
        ("POST", f"/api/escrow/{escrow_id}/tokens", None),
    ]


def _send(caller: Caller, method: str, path: str, body: dict | None, key: str | None = None) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    if method == "GET":
        return caller.get(path, headers=headers)
    return caller.post(path, json=body, headers=headers) if body is not None else caller.post(path, headers=headers)


def _refused(env: Env, caller: Caller, method: str, path: str, body, status: int, key: str | None = None) -> dict:
    before = snapshot(env.ledger)
    response = _send(caller, method, path, body, key)
    assert response.status_code == status, (method, path, body, response.status_code, response.text)
    data = response.json()
    assert set(data) >= {"error", "message"} and data["message"], data
    assert snapshot(env.ledger) == before, (method, path, body)
    return data


@pytest.mark.parametrize("outsider,which", [(STRANGER, "plain"), (STRANGER, "bench"), (VERIFIER, "plain")])
def test_non_party_gets_404_and_learns_nothing(env, outsider, which):
    escrow_id = getattr(env, which)
    caller = env.as_(outsider)
    unknown = "esc_" + "0" * 24
    for (method, path, body), (_, unknown_path, unknown_body) in zip(_requests(escrow_id), _requests(unknown)):
        data = _refused(env, caller, method, path, body, 404)
        assert data["error"] == "not_found"
        for secret in env.secrets():
            assert secret not in str(data), (path, secret, data)
        # The same answer as for an escrow that does not exist at all.
        twin = _refused(env, caller, method, unknown_path, unknown_body, 404)
        assert data["message"].replace(escrow_id, "ID") == twin["message"].replace(unknown, "ID"), (data, twin)
        assert data.get("details") == twin.get("details")


@pytest.mark.parametrize("agent,method,path_tpl,body,error_part", [
    (SELLER, "POST", "/api/escrow/{plain}/release", {"amount_usdc": "0.01"}, "buyer"),
    (SELLER, "POST", "/api/escrow/{plain}/release", {}, "buyer"),
    (SELLER, "POST", "/escrow/release", {"escrow_id": "{plain}", "amount_usdc": "0.01"}, "buyer"),
    (SELLER, "POST", "/escrow/release", {"escrow_id": "{plain}", "actual_completion_tokens": 3,
                                         "price_per_token": "0.01"}, "buyer"),
    (BUYER, "POST", "/api/escrow/{plain}/deduct", {"amount_usdc": "0.01"}, "seller"),
    (BUYER, "POST", "/api/escrow/{bench}/submit-result", {"metric": "accuracy", "score": 0.99}, "seller"),
    (BUYER, "POST", "/api/escrow/{bench}/verify", {"score": 0.99}, "verifier"),
    (SELLER, "POST", "/api/escrow/{bench}/verify", {"score": 0.99}, "verifier"),
    (VERIFIER, "POST", "/api/escrow/{bench}/release", {}, "buyer"),
    (VERIFIER, "POST", "/api/escrow/{bench}/deduct", {"amount_usdc": "0.01"}, "seller"),
    (VERIFIER, "POST", "/api/escrow/{bench}/cancel", {"reason": "x"}, "buyer or seller"),
    (VERIFIER, "POST", "/escrow/cancel", {"escrow_id": "{bench}"}, "buyer or seller"),
    (VERIFIER, "POST", "/api/escrow/{bench}/submit-result", {"metric": "accuracy", "score": 0.99}, "seller"),
    (SELLER, "POST", "/api/escrow/{plain}/tokens", {}, "buyer"),
    (VERIFIER, "POST", "/api/escrow/{bench}/tokens", {}, "buyer"),
    (VERIFIER, "POST", "/api/escrow/{bench}/holds", {"amount_usdc": "0.01"}, "buyer or seller"),
])
def test_wrong_role_gets_403(env, agent, method, path_tpl, body, error_part):
    ids = {"plain": env.plain, "bench": env.bench}
    path = path_tpl.format(**ids)
    body = {k: (v.format(**ids) if isinstance(v, str) else v) for k, v in body.items()}
    data = _refused(env, env.as_(agent), method, path, body, 403)
    assert data["error"] == "forbidden" and error_part in data["message"], data


def test_verifier_may_read_but_not_list_as_party(env):
    response = env.as_(VERIFIER).get(f"/api/escrow/{env.bench}")
    assert response.status_code == 200 and response.json()["status"] == "awaiting_verification"
    assert response.json()["verifier"] == VERIFIER


@pytest.mark.parametrize("header", [None, "Bearer hfe_not-a-real-key", "Bearer", "Bearer  \tnope", "Basic Zm9vOmJhcg==",
                                    "hfe_raw-key-without-scheme", "Bearer {buyer}x", "{buyer}"])
def test_no_or_bad_key_gets_401_everywhere(env, header):
    caller = env.as_(None) if header is None else env.as_(None, raw_header=header.format(buyer=env.key(BUYER)))
    reads = [("GET", "/api/escrow", None), ("GET", "/api/me", None), ("GET", "/api/analytics", None),
             ("GET", "/escrow/history", None), ("GET", "/api/audit", None),
             ("POST", "/api/escrow", {"seller_id": SELLER, "amount_usdc": "1"}),
             ("POST", "/escrow/create", {"recipient_wallet": SELLER, "amount_usdc": "1"}),
             ("POST", "/api/holds", {"spend_token": "est_" + "x" * 43, "amount_usdc": "0.01"}),
             ("GET", "/api/holds/hold_" + "0" * 24, None),
             ("POST", "/api/holds/hold_" + "0" * 24 + "/capture", {"amount_usdc": "0.01"}),
             ("POST", "/api/holds/hold_" + "0" * 24 + "/void", None),
             ("POST", "/api/holds/capture", {"items": [{"hold_id": "hold_" + "0" * 24, "amount_usdc": "0.01"}]})]
    for method, path, body in _requests(env.plain) + _requests(env.bench) + reads:
        data = _refused(env, caller, method, path, body, 401)
        assert data["error"] == "unauthorized"
        for secret in env.secrets():
            assert secret not in str(data), (path, secret, data)


def test_lists_and_history_show_only_own_escrows(env):
    mine = {BUYER: {env.plain, env.bench}, SELLER: {env.plain, env.bench}, STRANGER: {env.strangers},
            VERIFIER: {env.strangers}}
    for agent, expected in mine.items():
        caller = env.as_(agent)
        for params in ({}, {"status": "active"}, {"status": "awaiting_verification"}, {"role": "buyer"},
                       {"role": "seller"}, {"model": SECRET_MODEL}, {"limit": 1000}):
            rows = caller.get("/api/escrow", params=params)
            assert rows.status_code == 200, rows.text
            ids = {row["id"] for row in rows.json()}
            assert ids <= expected, (agent, params, ids)
            for row in rows.json():
                assert agent in (row["buyer"], row["seller"]), (agent, row)
            hist_params = {k: v for k, v in params.items() if k != "role"}
            history = caller.get("/escrow/history", params=hist_params)
            assert history.status_code == 200, history.text
            hist_ids = {row["escrow_id"] for row in history.json()["escrows"]}
            assert hist_ids <= expected, (agent, params, hist_ids)
        full = {row["id"] for row in caller.get("/api/escrow").json()}
        assert full == expected, (agent, full)
    stranger = env.as_(STRANGER)
    text = stranger.get("/api/escrow").text + stranger.get("/escrow/history").text \
        + stranger.get("/api/analytics").text + stranger.get("/api/me").text
    for secret in [SECRET_DESC, SECRET_MODEL, PLAIN_AMOUNT, BENCH_AMOUNT, BUYER, SELLER, env.plain, env.bench]:
        assert secret not in text, secret
    me = stranger.get("/api/me").json()
    assert me["agent_id"] == STRANGER and me["escrows_open"] == 1


def test_idempotency_keys_are_per_agent(env):
    """A stranger replaying the buyer's request with the buyer's key gets no stored receipt."""
    key = "shared-key-authz-1"
    body = {"amount_usdc": "0.000001", "refund_remainder": False}
    first = env.as_(BUYER).post(f"/api/escrow/{env.plain}/release", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == 200, first.text
    data = _refused(env, env.as_(STRANGER), "POST", f"/api/escrow/{env.plain}/release", body, 404, key=key)
    assert "receipt" not in str(data) and PLAIN_AMOUNT not in str(data)
    _refused(env, env.as_(SELLER), "POST", f"/api/escrow/{env.plain}/release", body, 403, key=key)
    before = snapshot(env.ledger)
    again = env.as_(BUYER).post(f"/api/escrow/{env.plain}/release", json=body, headers={"Idempotency-Key": key})
    assert again.status_code == 200 and again.json() == first.json()
    assert snapshot(env.ledger) == before


def test_the_right_parties_can_still_act_after_all_refusals(env):
    """The refusals left everything in place: the real parties' operations work."""
    plain = env.as_(BUYER).get(f"/api/escrow/{env.plain}").json()
    assert plain["status"] == "active" and plain["paid_micro"] in (0, 1)
    deduct = env.as_(SELLER).post(f"/api/escrow/{env.plain}/deduct", json={"amount_usdc": "0.5"})
    assert deduct.status_code == 200, deduct.text
    verify = env.as_(VERIFIER).post(f"/api/escrow/{env.bench}/verify", json={"score": 0.9})
    assert verify.status_code == 200 and verify.json()["status"] == "released", verify.text
    release = env.as_(BUYER).post("/escrow/release", json={"escrow_id": env.plain, "amount_usdc": "1"})
    assert release.status_code == 200 and release.json()["status"] == "released", release.text
    cancel = env.as_(VERIFIER).post(f"/api/escrow/{env.strangers}/cancel", json={})
    assert cancel.status_code == 200 and cancel.json()["status"] == "cancelled", cancel.text
    # Closed now: the non-party answer is still 404 (not 409: state is not leaked either).
    data = _refused(env, env.as_(STRANGER), "POST", f"/api/escrow/{env.plain}/cancel", {}, 404)
    assert data["error"] == "not_found"
