"""The server's edge as an attacker meets it (issue 16): request bodies capped before they
are read whole, ledger-wide figures and deposits for the operator only, API keys that an
agent rotates, a faucet that needs a key and counts per client and in all, amounts that are
never booleans or exotic digits. Real uvicorn servers on 127.0.0.1, real SQLite.
"""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import socket
import subprocess
import sys
import time

import httpx
import pytest
from typer.testing import CliRunner

import hf_escrow
from hf_escrow import Unauthorized
from hf_escrow.cli import _faucet_on, app as cli_app
from hf_escrow.ledger import Ledger, LedgerConfig
from hf_escrow.server import create_app
from hf_escrow.server.faucet import FaucetSettings
from hf_escrow.server.limits import DEFAULT_MAX_BODY_BYTES
from hf_escrow.ledger.schema import idempotency_keys

import sqlalchemy

from .conftest import FakeClock
from .helpers import assert_audit_clean, snapshot
from .liveserver import free_port, serve_app, wait_http

ADMIN = "operator-" + "k" * 31
FAUCET_MICRO = 10_000_000
SOCKET_TIMEOUT_S = 20


@pytest.fixture
def ledger(tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}", config=LedgerConfig())
    yield ledger
    assert_audit_clean(ledger)
    ledger.close()


def serve(ledger, **options):
    options.setdefault("admin_key", ADMIN)
    return serve_app(create_app(ledger, sweep_interval_s=0, mcp=False, **options))


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def register(base: str, agent_id: str, **kw) -> dict:
    response = httpx.post(f"{base}/register", json={"agent_id": agent_id}, timeout=10, **kw)
    assert response.status_code == 201, response.text
    return response.json()


# ---- request bodies ----------------------------------------------------------------------

def _raw_request(port: int, head: bytes, body_chunks=()) -> tuple[bytes, int]:
    """Send a request over a plain socket, chunk after chunk until an answer is there to
    read; returns (the answer, body bytes sent before it came)."""
    sent = 0
    # selectors, not select.select: a long test run may hold descriptors above select()'s 1024
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S) as sock, \
            selectors.DefaultSelector() as answered:
        answered.register(sock, selectors.EVENT_READ)
        sock.sendall(head)
        for chunk in body_chunks:
            if answered.select(0):
                break
            try:
                sock.sendall(chunk)
            except (TimeoutError, BrokenPipeError, ConnectionResetError):
                break  # the server stopped reading: its answer is waiting
            sent += len(chunk)
        answer = b""
        deadline = time.monotonic() + SOCKET_TIMEOUT_S
        while time.monotonic() < deadline:  # a 413 closes the connection: read to its end
            try:
                more = sock.recv(65536)
            except ConnectionResetError:  # closed with our unread body still in its buffer
                break
            if not more:
                break
            answer += more
        return answer, sent


def test_declared_body_over_the_cap_is_413_before_a_byte_of_it_is_sent(ledger):
    with serve(ledger) as base:
        port = int(base.rsplit(":", 1)[1])
        head = (b"POST /register HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100000000\r\n\r\n")
        answer, _ = _raw_request(port, head)
    status_line, _, rest = answer.partition(b"\r\n")
    assert b" 413 " in status_line, answer[:300]
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"] == "payload_too_large" and str(DEFAULT_MAX_BODY_BYTES) in body["message"]


def test_chunked_body_is_refused_while_it_is_still_arriving(ledger):
    """The finding: a 100 MB unauthenticated /register grew the server by 530 MB. Now the
    answer comes while the client is still sending, after about the cap."""
    chunk = b"x" * 65536
    chunks = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 1600  # 100 MiB of body, if it were all sent
    with serve(ledger) as base:
        port = int(base.rsplit(":", 1)[1])
        head = (b"POST /register HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        answer, sent = _raw_request(port, head, [b"5\r\n{\"a\":\r\n"] + chunks)
        assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200  # and the server serves on
    assert b" 413 " in answer.partition(b"\r\n")[0], answer[:300]
    assert b"connection: close" in answer.lower()
    # Socket buffers on loopback hold a few MiB; the whole body would be 100 MiB.
    assert sent < 24 * 2**20, sent


def test_body_cap_refuses_inside_the_app_after_the_cap_not_at_the_end():
    """At the ASGI boundary: the app pulls at most the cap (plus one chunk) of a 100 MiB body."""
    app = create_app(Ledger("sqlite://"), sweep_interval_s=0, mcp=False)
    pulled = 0
    sent = []

    async def receive():
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": b"x" * 65536, "more_body": pulled < 1600}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/register", "raw_path": b"/register", "query_string": b"",
             "root_path": "", "headers": [(b"host", b"testserver"), (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 413
    assert pulled <= DEFAULT_MAX_BODY_BYTES // 65536 + 1
    assert json.loads(b"".join(m.get("body", b"") for m in sent[1:]))["error"] == "payload_too_large"


def test_body_cap_is_configurable_and_checked(ledger, monkeypatch):
    monkeypatch.setenv("HF_ESCROW_MAX_BODY_BYTES", "2048")
    with serve(ledger) as base:
        big = httpx.post(f"{base}/register", content=b'{"agent_id": "%s"}' % (b"a" * 4000), timeout=10)
        small = httpx.post(f"{base}/register", json={"agent_id": "small-body"}, timeout=10)
    assert big.status_code == 413 and big.json()["error"] == "payload_too_large"
    assert small.status_code == 201
    for bad in ("0", "lots"):
        monkeypatch.setenv("HF_ESCROW_MAX_BODY_BYTES", bad)
        with pytest.raises(hf_escrow.ValidationError):
            create_app(ledger, sweep_interval_s=0, mcp=False)


# ---- the operator ------------------------------------------------------------------------

def test_audit_and_deposits_are_the_operators_only(ledger):
    """The finding: any registered agent read the ledger-wide totals."""
    with serve(ledger) as base:
        agent = register(base, "curious")
        before = snapshot(ledger)
        for path, method, body in (("/api/audit", "GET", None), ("/api/admin/faucet", "GET", None),
                                   ("/api/admin/deposit", "POST", {"agent_id": "curious", "amount_usdc": "1000"})):
            as_agent = httpx.request(method, base + path, json=body, headers=bearer(agent["api_key"]), timeout=10)
            assert as_agent.status_code == 403, as_agent.text
            assert "operator" in as_agent.json()["message"] and "minted_micro" not in as_agent.text
            for headers in ({}, bearer("hfe_guess"), bearer(ADMIN + "x"), bearer(ADMIN[:-1])):
                other = httpx.request(method, base + path, json=body, headers=headers, timeout=10)
                assert other.status_code == 401, (headers, other.text)
        assert snapshot(ledger) == before
        audit = httpx.get(f"{base}/api/audit", headers=bearer(ADMIN), timeout=10)
        assert audit.status_code == 200 and audit.json()["ok"] is True
        deposit = httpx.post(f"{base}/api/admin/deposit", json={"agent_id": "curious", "amount_usdc": "2.5"},
                             headers={**bearer(ADMIN), "Idempotency-Key": "top-up-1"}, timeout=10)
        again = httpx.post(f"{base}/api/admin/deposit", json={"agent_id": "curious", "amount_usdc": "2.5"},
                           headers={**bearer(ADMIN), "Idempotency-Key": "top-up-1"}, timeout=10)
        assert deposit.status_code == 200 and again.json() == deposit.json()
        assert deposit.json()["amount_micro"] == 2_500_000 and deposit.json()["balance_usdc"] == 2.5
        # The agent sees its own figures, and they agree.
        me = httpx.get(f"{base}/api/me", headers=bearer(agent["api_key"]), timeout=10).json()
        assert me["balance_micro"] == 2_500_000
        settings = httpx.get(f"{base}/api/admin/faucet", headers=bearer(ADMIN), timeout=10).json()
        assert settings["per_client"] == FaucetSettings.per_client and settings["amount_usdc"] == 10.0
    # The operator's key never lands among the agent's own idempotency keys.
    with ledger.engine.connect() as conn:
        keys = conn.scalars(sqlalchemy.select(idempotency_keys.c.key).where(idempotency_keys.c.agent_id == "curious"))
        assert keys.all() == ["operator-deposit:top-up-1"]


def test_without_an_operator_key_nobody_reads_the_audit(ledger, monkeypatch):
    monkeypatch.delenv("HF_ESCROW_ADMIN_KEY", raising=False)
    with serve(ledger, admin_key=None) as base:
        agent = register(base, "someone")
        response = httpx.get(f"{base}/api/audit", headers=bearer(agent["api_key"]), timeout=10)
        assert response.status_code == 403 and "HF_ESCROW_ADMIN_KEY" in response.json()["message"]
    monkeypatch.setenv("HF_ESCROW_ADMIN_KEY", "short")
    with pytest.raises(hf_escrow.ValidationError):
        create_app(ledger, sweep_interval_s=0, mcp=False)
    monkeypatch.setenv("HF_ESCROW_ADMIN_KEY", ADMIN)
    with serve_app(create_app(ledger, sweep_interval_s=0, mcp=False)) as base:
        assert httpx.get(f"{base}/api/audit", headers=bearer(ADMIN), timeout=10).status_code == 200


# ---- key rotation --------------------------------------------------------------------------

def test_rotated_key_replaces_the_old_one_at_once(ledger):
    with serve(ledger) as base:
        old = register(base, "rotator")["api_key"]
        ledger.deposit("rotator", "5")
        rotated = httpx.post(f"{base}/api/me/key", headers=bearer(old), timeout=10)
        assert rotated.status_code == 200, rotated.text
        new = rotated.json()["api_key"]
        assert rotated.json()["agent_id"] == "rotator" and new.startswith("hfe_") and new != old
        refused = httpx.get(f"{base}/api/me", headers=bearer(old), timeout=10)
        assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"
        assert httpx.post(f"{base}/api/me/key", headers=bearer(old), timeout=10).status_code == 401
        assert httpx.get(f"{base}/api/me", headers=bearer(new), timeout=10).json()["balance_micro"] == 5_000_000
        assert httpx.post(f"{base}/api/me/key", timeout=10).status_code == 401


def test_clients_rotate_and_go_on_with_the_new_key(ledger):
    ledger.register("seller")
    with serve(ledger) as base:
        first = register(base, "http-agent")["api_key"]
        ledger.deposit("http-agent", "3")
        client = hf_escrow.connect(base, api_key=first)
        new = client.rotate_key()
        assert new != first and client.me().agent_id == "http-agent"  # the client took the new key up
        assert client.create_escrow("seller", "1").buyer == "http-agent"
        with pytest.raises(Unauthorized):
            hf_escrow.connect(base, api_key=first).me()

        async def rotate_async() -> str:
            async with hf_escrow.connect_async(base, api_key=new) as aclient:
                newer = await aclient.rotate_key()
                assert (await aclient.me()).balance == 2
                return newer

        newer = asyncio.run(rotate_async())
        with pytest.raises(Unauthorized):
            hf_escrow.connect(base, api_key=new).me()
        assert hf_escrow.connect(base, api_key=newer).me().agent_id == "http-agent"
    embedded = hf_escrow.connect(agent="seller", database_url=ledger.url)
    key = embedded.rotate_key()
    assert ledger.authenticate(key) == "seller"


def test_cli_rotate_key_prints_the_new_key_and_the_old_stops(ledger):
    runner = CliRunner()
    with serve(ledger) as base:
        old = register(base, "cli-agent")["api_key"]
        result = runner.invoke(cli_app, ["rotate-key", "--url", base, "--api-key", old, "--json"],
                               catch_exceptions=False)
        assert result.exit_code == 0, result.output
        new = json.loads(result.stdout)["api_key"]
        assert ledger.authenticate(new) == "cli-agent"
        with pytest.raises(Unauthorized):
            ledger.authenticate(old)
        again = runner.invoke(cli_app, ["rotate-key", "--url", base, "--api-key", old])
        assert again.exit_code == 2 and "unknown API key" in again.output


# ---- the faucet ----------------------------------------------------------------------------

def test_a_claim_needs_the_claimants_own_key(ledger):
    """The finding: `POST /claim {"agent_id": victim}` without a key spent the victim's
    allowance (429 for it for 24 h) and wrote into the victim's idempotency namespace."""
    with serve(ledger) as base:
        victim = register(base, "victim")
        stranger = register(base, "stranger")
        before = snapshot(ledger)
        keyless = httpx.post(f"{base}/claim", json={"agent_id": "victim"}, headers={"Idempotency-Key": "plant"},
                             timeout=10)
        assert keyless.status_code == 401 and keyless.json()["error"] == "unauthorized"
        foreign = httpx.post(f"{base}/claim", json={"agent_id": "victim"},
                             headers={**bearer(stranger["api_key"]), "Idempotency-Key": "plant"}, timeout=10)
        assert foreign.status_code == 403 and "the agent that registered it" in foreign.json()["message"]
        assert snapshot(ledger) == before
        with ledger.engine.connect() as conn:
            assert conn.scalar(sqlalchemy.select(idempotency_keys.c.key).where(idempotency_keys.c.agent_id == "victim")) is None
        own = httpx.post(f"{base}/claim", json={"agent_id": "victim"}, headers=bearer(victim["api_key"]), timeout=10)
        assert own.status_code == 200 and own.json()["amount_micro"] == FAUCET_MICRO
        nameless = httpx.post(f"{base}/claim", json={}, headers=bearer(stranger["api_key"]), timeout=10)
        assert nameless.status_code == 422 and "agent_id" in nameless.json()["message"]


def test_a_keyed_claim_for_a_new_id_registers_it_as_the_callers_own(ledger):
    """The vLLM guide claims for `vllm-worker-1`, which it never registered."""
    with serve(ledger) as base:
        orchestrator = register(base, "orchestrator")
        claim = httpx.post(f"{base}/claim", json={"agent_id": "worker-1"},
                           headers={**bearer(orchestrator["api_key"]), "Idempotency-Key": "k1"}, timeout=10)
        assert claim.status_code == 200, claim.text
        body = claim.json()
        assert body["agent_id"] == "worker-1" and body["balance_micro"] == FAUCET_MICRO
        worker_key = body["registered"]["api_key"]
        me = httpx.get(f"{base}/api/me", headers=bearer(worker_key), timeout=10).json()
        assert me["agent_id"] == "worker-1" and me["wallet"] == body["registered"]["wallet"]
        with ledger.engine.connect() as conn:  # the orchestrator's key is kept apart from the worker's own
            keys = conn.scalars(sqlalchemy.select(idempotency_keys.c.key).where(
                idempotency_keys.c.agent_id == "worker-1")).all()
        assert len(keys) == 1 and keys[0].startswith("claim-by-orchestrator-") and "k1" not in keys
        assert ledger.owner_of("worker-1") == "orchestrator"
        # Its owner may claim for it again, once a day like the worker itself.
        again = httpx.post(f"{base}/claim", json={"agent_id": "worker-1"}, headers=bearer(orchestrator["api_key"]),
                           timeout=10)
        assert again.status_code == 429
        own = httpx.post(f"{base}/claim", json={"agent_id": "worker-1"}, headers=bearer(worker_key), timeout=10)
        assert own.status_code == 429 and int(own.headers["Retry-After"]) == own.json()["details"]["retry_after_s"]
        bad_key = httpx.post(f"{base}/register", json={"agent_id": "worker-2"},
                             headers=bearer("pf_live_your_key_here"), timeout=10)
        assert bad_key.status_code == 401  # the guide's placeholder, not filled in


def test_an_owner_claims_for_the_agents_it_registered_and_nobody_else_does(tmp_path):
    clock = FakeClock()
    ledger = Ledger(f"sqlite:///{tmp_path / 'owned.db'}", config=LedgerConfig(), clock=clock)
    with serve(ledger) as base:
        owner = register(base, "owner")
        worker = register(base, "worker", headers=bearer(owner["api_key"]))
        stranger = register(base, "stranger")
        assert worker["owner"] == "owner" and ledger.owner_of("worker") == "owner"
        assert ledger.owner_of("stranger") is None

        def claim(agent_id: str, caller: dict) -> int:
            return httpx.post(f"{base}/claim", json={"agent_id": agent_id}, headers=bearer(caller["api_key"]),
                              timeout=10).status_code

        assert claim("worker", stranger) == 403 and claim("owner", worker) == 403  # not theirs
        assert claim("worker", owner) == 200
        clock.advance(86_400 + 1)
        assert claim("worker", owner) == 200 and claim("worker", worker) == 429
        clock.advance(86_400 + 1)
        assert claim("worker", worker) == 200 and claim("stranger", stranger) == 200
    assert ledger.me("worker")["balance_micro"] == 3 * FAUCET_MICRO
    assert_audit_clean(ledger)
    ledger.close()


def test_one_client_cannot_mint_at_will(ledger):
    """The finding: 40 registrations from one client minted 400 USDC."""
    with serve(ledger, faucet=FaucetSettings(enabled=True)) as base:
        statuses, minted = [], 0
        for i in range(40):
            response = httpx.post(f"{base}/register", json={"agent_id": f"sybil-{i}"}, timeout=10)
            statuses.append(response.status_code)
            if response.status_code == 201:
                claim = httpx.post(f"{base}/claim", json={"agent_id": f"sybil-{i}"},
                                   headers=bearer(response.json()["api_key"]), timeout=10)
                minted += claim.json().get("amount_micro", 0) if claim.status_code == 200 else 0
        refused = httpx.post(f"{base}/register", json={"agent_id": "sybil-x"}, timeout=10)
    assert statuses.count(201) == FaucetSettings.per_client and statuses.count(429) == 40 - FaucetSettings.per_client
    assert minted == FaucetSettings.per_client * FAUCET_MICRO
    assert refused.status_code == 429 and refused.json()["error"] == "rate_limited"
    wait_s = refused.json()["details"]["retry_after_s"]
    assert refused.headers["Retry-After"] == str(wait_s) and 3500 <= wait_s <= 3600


def test_limits_per_client_and_in_all(ledger):
    """127.0.0.2 is another client on the same loopback: its own per-client count, one global one."""
    other = httpx.HTTPTransport(local_address="127.0.0.2")
    with serve(ledger, faucet=FaucetSettings(enabled=True, per_client=2, overall=3, window_s=60)) as base:
        with httpx.Client(transport=other, timeout=10) as second:
            a = [httpx.post(f"{base}/register", json={"agent_id": f"a-{i}"}, timeout=10).status_code
                 for i in range(3)]
            b = [second.post(f"{base}/register", json={"agent_id": f"b-{i}"}).status_code for i in range(2)]
            assert a == [201, 201, 429] and b == [201, 429]
            last = second.post(f"{base}/register", json={"agent_id": "b-x"})
            assert "from all clients" in last.json()["message"] and 1 <= int(last.headers["Retry-After"]) <= 60
            # Claims count apart from registrations.
            key = ledger.register("c-agent")["api_key"]
            claims = [second.post(f"{base}/claim", json={"agent_id": "c-agent"}, headers=bearer(key)).status_code
                      for _ in range(3)]
            assert claims == [200, 429, 429]  # the second: once a day per agent; the third: 2 per client


def test_faucet_is_off_unless_local_or_turned_on(ledger, monkeypatch):
    """A connection that does not arrive on loopback gets no faucet unless the operator says so;
    HF_ESCROW_FAUCET=0 wins over everything."""
    from starlette.testclient import TestClient  # its connections arrive at "testserver", not loopback
    key = ledger.register("remote")["api_key"]
    before = snapshot(ledger)
    with TestClient(create_app(ledger, sweep_interval_s=0, mcp=False)) as remote:
        off = remote.post("/claim", json={"agent_id": "remote"}, headers=bearer(key))
    assert off.status_code == 403 and "faucet is off" in off.json()["message"]
    assert snapshot(ledger) == before
    monkeypatch.setenv("HF_ESCROW_FAUCET", "0")
    with serve(ledger, faucet=FaucetSettings(enabled=True)) as base:
        response = httpx.post(f"{base}/claim", json={"agent_id": "remote"}, headers=bearer(key), timeout=10)
    assert response.status_code == 403 and snapshot(ledger) == before
    monkeypatch.setenv("HF_ESCROW_FAUCET", "1")
    with TestClient(create_app(ledger, sweep_interval_s=0, mcp=False)) as remote:
        assert remote.post("/claim", json={"agent_id": "remote"}, headers=bearer(key)).status_code == 200


@pytest.mark.parametrize("flag,env,host,on", [
    (None, None, "127.0.0.1", True), (None, None, "::1", True), (None, None, "localhost", True),
    (None, None, "0.0.0.0", False), (None, None, "192.168.1.5", False), (None, "1", "0.0.0.0", True),
    (True, None, "0.0.0.0", True), (False, None, "127.0.0.1", False), (True, "0", "127.0.0.1", False),
    (None, "off", "127.0.0.1", False), (True, "false", "0.0.0.0", False),
])
def test_serve_decides_the_faucet_from_flag_env_and_host(flag, env, host, on):
    assert _faucet_on(flag, host, env) is on


def _serve_process(db: str, env_faucet: str | None, *args: str):
    env = {k: v for k, v in os.environ.items() if k != "HF_ESCROW_FAUCET"}
    if env_faucet is not None:
        env["HF_ESCROW_FAUCET"] = env_faucet
    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "hf-escrow")
    proc = subprocess.Popen([exe, "serve", "--port", str(port), "--database-url", db, *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", 60)
    except RuntimeError:
        proc.kill()
        raise
    return proc, f"http://127.0.0.1:{port}"


def test_hf_escrow_serve_obeys_faucet_0(tmp_path):
    """The finding: `hf-escrow serve` forced the faucet on over HF_ESCROW_FAUCET=0."""
    db = f"sqlite:///{tmp_path / 'serve.db'}"
    ledger = Ledger(db)
    keys = {name: ledger.register(name)["api_key"] for name in ("a", "b")}
    for name, env_faucet, args, status in (("a", "0", ("--faucet",), 403), ("b", None, (), 200)):
        proc, base = _serve_process(db, env_faucet, *args)
        try:
            response = httpx.post(f"{base}/claim", json={"agent_id": name}, headers=bearer(keys[name]), timeout=10)
        finally:
            proc.terminate()
            proc.wait(15)
        assert response.status_code == status, response.text
    assert ledger.me("a")["balance_micro"] == 0 and ledger.me("b")["balance_micro"] == FAUCET_MICRO
    ledger.close()


# ---- amounts -------------------------------------------------------------------------------

@pytest.mark.parametrize("amount", [True, "1_000", "\u0661\u0660", "\uff11", "1\u00a0000", "\u0967"])
def test_amounts_are_never_booleans_or_exotic_digits(ledger, amount):
    ledger.register("seller")
    with serve(ledger) as base:
        buyer = register(base, "buyer")["api_key"]
        ledger.deposit("buyer", "5000")
        before = snapshot(ledger)
        for path, body in (("/api/escrow", {"seller_id": "seller"}), ("/escrow/create", {"recipient_wallet": "seller"})):
            response = httpx.post(base + path, json={**body, "amount_usdc": amount}, headers=bearer(buyer), timeout=10)
            assert response.status_code == 422, response.text
            assert "amount_usdc" in response.text or response.json()["error"] == "invalid_amount"
        deposit = httpx.post(f"{base}/api/admin/deposit", json={"agent_id": "buyer", "amount_usdc": amount},
                             headers=bearer(ADMIN), timeout=10)
        assert deposit.status_code == 422
        assert snapshot(ledger) == before
