"""Operating a server: /metrics (Prometheus), /readyz, JSON logs, on a real HTTP server."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

import hf_escrow
from hf_escrow._exceptions import error_for_status
from hf_escrow.ledger import Ledger
from hf_escrow.ledger.schema import holds, transactions
from hf_escrow.server import create_app
from tests.conftest import PG_SKIP_REASON, fresh_pg_database
from tests.helpers import assert_audit_clean, parties
from tests.liveserver import free_port, serve_app, wait_http

ADMIN_KEY = "metrics-operator-key-0123456789"
ROOT = Path(__file__).resolve().parent.parent
CALLS = 40


def scrape(base: str, key: str = ADMIN_KEY) -> dict[tuple, float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    answer = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(answer.text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scripted_run(base: str, keys: dict) -> dict:
    """Escrows, holds, captures, a void, a release, a cancel, two refusals; what it did."""
    buyer = hf_escrow.connect(base, api_key=keys["buyer"])
    seller = hf_escrow.connect(base, api_key=keys["seller"])
    done = {"holds": 0, "captures": 0, "insufficient": 0, "escrows": [], "hold_ids": []}
    for i in range(3):
        e = buyer.create_escrow("seller", "1.00", ttl_seconds=600, meta={"model": "m"})
        done["escrows"].append(e.id)
        for amount in ("0.10", "0.20"):
            h = seller.hold(e.spend_token, amount, ttl_seconds=60)
            done["hold_ids"].append(h.id)
            seller.capture(h.id, "0.05")
            seller.capture(h.id, "0.01", final=True)
            done["holds"] += 1
            done["captures"] += 2
        spare = seller.hold(e.spend_token, "0.30", ttl_seconds=60)
        done["holds"] += 1
        seller.void(spare.id)
        with pytest.raises(hf_escrow.InsufficientFunds):
            seller.hold(e.spend_token, "5.00", ttl_seconds=60)
        done["insufficient"] += 1
        if i == 0:
            buyer.release(e.id, "0.10")
        elif i == 1:
            buyer.cancel(e.id)
    with pytest.raises(hf_escrow.NotFound):
        buyer.get("esc_nothing_here")
    return done


def test_metrics_count_what_the_ledger_did(ledger: Ledger):
    keys = {name: r["api_key"] for name, r in parties(ledger, "buyer", "seller").items()}
    with serve_app(create_app(ledger, admin_key=ADMIN_KEY, sweep_interval_s=0)) as base:
        done = scripted_run(base, keys)
        samples = scrape(base)
        escrows = [hf_escrow.connect(base, api_key=keys["buyer"]).get(e) for e in done["escrows"]]

    requests = "hf_escrow_http_requests_total"
    with ledger.engine.connect() as conn:
        hold_rows = conn.scalar(select(func.count()).select_from(holds))
        captures = conn.scalar(select(func.count()).where(transactions.c.kind == "capture"))
    assert value(samples, requests, method="POST", route="/api/holds", status="201") == hold_rows == done["holds"]
    assert value(samples, requests, method="POST", route="/api/holds/{hold_id:path}/capture", status="200") \
        == captures == done["captures"]
    assert value(samples, requests, method="POST", route="/api/holds/{hold_id:path}/void", status="200") == 3
    assert value(samples, requests, method="POST", route="/api/escrow", status="201") == 3
    assert value(samples, "hf_escrow_payment_required_total", route="/api/holds", reason="insufficient_funds") \
        == done["insufficient"]
    assert value(samples, "hf_escrow_http_errors_total", method="GET", route="/api/escrow/{escrow_id}",
                 error="not_found") == 1
    assert value(samples, "hf_escrow_http_request_duration_seconds_count", method="POST", route="/api/holds") \
        == done["holds"] + done["insufficient"]

    # Gauges: the ledger's own totals at scrape time, to the micro-USDC.
    report = assert_audit_clean(ledger)
    assert value(samples, "hf_escrow_ledger_paid_micro") == sum(int(e.paid * 10**6) for e in escrows)
    assert value(samples, "hf_escrow_ledger_refunded_micro") == sum(int(e.refunded * 10**6) for e in escrows)
    assert value(samples, "hf_escrow_ledger_captured_micro") == 3 * 2 * 60_000
    assert value(samples, "hf_escrow_ledger_fees_micro") == sum(int(e.fees * 10**6) for e in escrows) \
        == report["platform_fees_micro"]
    assert value(samples, "hf_escrow_ledger_holds_open") == 0
    assert value(samples, "hf_escrow_ledger_escrows", status="active") == 1
    assert value(samples, "hf_escrow_ledger_escrows", status="released") == 1
    assert value(samples, "hf_escrow_ledger_escrows", status="cancelled") == 1

    # No id, key or token ever becomes a label.
    labels = {v for (_, pairs) in samples for _, v in pairs}
    for forbidden in (*done["escrows"], *done["hold_ids"], "esc_", "hfe_", "est_", "buyer", "seller"):
        assert not [v for v in labels if forbidden in v], forbidden


def test_metrics_need_the_operator_key(ledger: Ledger):
    keys = {name: r["api_key"] for name, r in parties(ledger, "agent").items()}
    with serve_app(create_app(ledger, admin_key=ADMIN_KEY, sweep_interval_s=0)) as base:
        assert httpx.get(base + "/metrics").status_code == 401
        assert httpx.get(base + "/metrics", headers={"Authorization": "Bearer not-a-key"}).status_code == 401
        as_agent = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {keys['agent']}"})
        assert as_agent.status_code == 403 and "operator" in as_agent.json()["message"]
        assert httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}x"}).status_code == 401
    with serve_app(create_app(ledger, sweep_interval_s=0)) as base:  # no operator key configured: nobody
        refused = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {keys['agent']}"})
        assert refused.status_code == 403 and "without one" in refused.json()["message"]


@pytest.mark.postgres
def test_readyz_says_when_the_database_is_gone():
    if PG_SKIP_REASON:
        pytest.skip(PG_SKIP_REASON)
    url, drop = fresh_pg_database()
    ledger = Ledger(url)
    try:
        with serve_app(create_app(ledger, sweep_interval_s=0)) as base:
            assert httpx.get(base + "/readyz").json() == {"ok": True}
            drop()
            answer = httpx.get(base + "/readyz")
            assert answer.status_code == 503 and answer.json()["error"] == "not_ready"
            assert "hfe_" not in answer.text and "127.0.0.1" not in answer.text
            assert httpx.get(base + "/healthz").status_code == 200  # alive, not ready
    finally:
        ledger.close()
        drop()


@pytest.mark.slow
def test_workers_share_metrics_and_log_json_without_secrets(tmp_path):
    """`serve --workers 2 --log-json`: counters summed over both processes; every log line
    JSON, naming escrows and holds, never a key or a token."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_ESCROW_ADMIN_KEY=ADMIN_KEY, HF_ESCROW_FAUCET="1")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    server = subprocess.Popen([sys.executable, "-m", "hf_escrow.cli", "serve", "--port", str(port), "--workers", "2",
                               "--log-json", "--database-url", f"sqlite:///{tmp_path / 'ledger.db'}"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    secrets = [ADMIN_KEY]
    try:
        wait_http(base + "/healthz", timeout_s=90)
        keys = {}
        for name in ("buyer", "seller"):
            keys[name] = httpx.post(base + "/register", json={"agent_id": name}).json()["api_key"]
            secrets.append(keys[name])
        buyer, seller = (hf_escrow.connect(base, api_key=keys[n]) for n in ("buyer", "seller"))
        buyer.claim_faucet()
        e = buyer.create_escrow("seller", "1.00", ttl_seconds=600)
        secrets.append(e.spend_token)
        seller_auth = {"Authorization": f"Bearer {keys['seller']}"}

        def paid_call(_: int) -> str:
            # A connection of its own each time, from several threads: both workers answer some.
            h = httpx.post(base + "/api/holds", json={"spend_token": e.spend_token, "amount_usdc": 0.01},
                           headers=seller_auth).json()
            httpx.post(f"{base}/api/holds/{h['id']}/capture", json={"amount_usdc": 0.01, "final": True},
                       headers=seller_auth).raise_for_status()
            return h["id"]

        with ThreadPoolExecutor(4) as pool:
            hold_ids = list(pool.map(paid_call, range(CALLS)))
        samples = scrape(base)
        assert value(samples, "hf_escrow_http_requests_total", method="POST", route="/api/holds", status="201") \
            == CALLS
        assert value(samples, "hf_escrow_ledger_captured_micro") == CALLS * 10_000
    finally:
        server.terminate()
        try:
            _, log = server.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            _, log = server.communicate(timeout=10)
    lines = [json.loads(line) for line in log.splitlines() if line.strip()]  # every line is JSON
    access = [line for line in lines if line.get("logger") == "hf_escrow.access"]
    assert any(line.get("escrow_id") == e.id for line in access)
    assert {line.get("hold_id") for line in access} >= set(hold_ids)
    assert len({line["pid"] for line in access if line.get("route") == "/api/holds"}) == 2  # summed over both
    for secret in secrets:
        assert secret not in log


def test_shard_server_and_gateway_have_readyz_and_metrics(tmp_path, monkeypatch):
    """The seller's faces: ready while their escrow backend answers; 402s counted by reason."""
    from hf_escrow.gateway import create_gateway
    from hf_escrow.shardserver import create_shard_app
    monkeypatch.setenv("HF_ESCROW_ADMIN_KEY", ADMIN_KEY)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.jsonl").write_text('{"x": 1}\n')
    seller = hf_escrow.connect(agent="seller")
    seller.register("seller")
    faces = (create_shard_app(tmp_path / "shards", escrow=seller, price_per_shard="0.002"),
             create_gateway("http://127.0.0.1:9/v1", escrow=seller,
                            pricing={"input_per_1k": "0.001", "output_per_1k": "0.002"}))
    for app, paid_path in zip(faces, ("/a.jsonl", "/v1/chat/completions")):
        with serve_app(app) as base:
            assert httpx.get(base + "/readyz").json() == {"ok": True}
            method = httpx.get if paid_path.endswith(".jsonl") else httpx.post
            unpaid = method(base + paid_path, **({} if method is httpx.get else {"json": {"messages": []}}))
            assert unpaid.status_code == 402
            assert httpx.get(base + "/metrics").status_code == 401
            samples = scrape(base)
            reasons = {dict(labels)["reason"] for (name, labels) in samples
                       if name == "hf_escrow_payment_required_total"}
            assert reasons == {error_for_status(402, unpaid.json()).code} == {"payment_required"}
