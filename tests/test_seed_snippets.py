"""The seed guides' own HTTP snippets (tests/seed_snippets/) against a live `hf-escrow` server.

Each snippet runs as written, with only its base URL (and key) taken from the
environment, and must do what its guide says. Agents are registered with the guide's
curl lines, run with the real curl binary, their key placeholder filled in as the guide
tells its reader to.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import uuid
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from unittest import mock

import httpx
import pytest
import requests

from hf_escrow.ledger import Ledger, LedgerConfig
from hf_escrow.server import create_app
from hf_escrow.server.faucet import FaucetSettings

from .helpers import assert_audit_clean
from .liveserver import serve_app

SNIPPETS = Path(__file__).with_name("seed_snippets")
CURL_TIMEOUT_S = 20
FAUCET_USDC = 100  # the fine-tune guide locks $50; its faucet amount is not fixed by the guide
PLACEHOLDER = "pf_live_your_key_here"
OPERATOR_KEY = "seed-operator-key-" + "0" * 16
# One client (this test) registers a dozen agents: more than a stranger may per hour.
FAUCET = FaucetSettings(per_client=50)

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="the guide's curl lines need curl")


def load_snippet(name: str, base: str, key: str = "unused"):
    """A fresh instance of a snippet module, importing with ESCROW_BASE and PF_API_KEY set."""
    with mock.patch.dict(os.environ, {"ESCROW_BASE": base, "PF_API_KEY": key}):
        spec = importlib.util.spec_from_file_location(f"seed_{name}_{uuid.uuid4().hex}", SNIPPETS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def curl_argv(line: str, agent_id: str, guide_agent: str, key: str) -> list[str]:
    """One of the guide's curl lines: the key placeholder filled in, only agent_id swapped."""
    assert PLACEHOLDER in line
    argv = [arg for arg in shlex.split(line.replace(guide_agent, agent_id).replace(PLACEHOLDER, key)) if arg != "\n"]
    assert argv[0] == "curl" and "-H" in argv and "-d" in argv and "--json" not in argv
    return argv


def run_curl(line: str, agent_id: str, guide_agent: str, key: str) -> dict:
    """One of the guide's curl lines with the real curl binary."""
    argv = curl_argv(line, agent_id, guide_agent, key)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=CURL_TIMEOUT_S, check=True)
    return json.loads(done.stdout)


def micro(usdc_float: float) -> int:
    """What the server must lock for a float the snippet sent: its repr, half-even to 6 decimals."""
    return int((Decimal(repr(usdc_float)) * 1_000_000).to_integral_value(rounding=ROUND_HALF_EVEN))


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    """A live server on a fresh SQLite ledger, with agents registered through the faucet curl lines.

    The guide's reader holds a key before step 1 (its placeholder): a keyless registration
    gives it. With it, step 1 runs as written: register the orchestrator, then claim for
    `vllm-worker-1`, which nobody registered: the keyed claim registers it for the reader.
    """
    db = tmp_path_factory.mktemp("seeds") / "ledger.db"
    ledger = Ledger(f"sqlite:///{db}", config=LedgerConfig(faucet_amount_micro=FAUCET_USDC * 1_000_000))
    with serve_app(create_app(ledger, sweep_interval_s=0, faucet=FAUCET, admin_key=OPERATOR_KEY)) as base:
        faucet = load_snippet("faucet_curl", base)
        reader = httpx.post(f"{base}/register", json={"agent_id": "guide-reader"}, timeout=10).json()["api_key"]
        agents = {}
        for name in ("vllm-orchestrator-1", "hf-buyer", "hf-seller", "space", "stranger", "stranger-seller",
                     "ft-buyer", "ft-seller"):
            agents[name] = run_curl(faucet.REGISTER, name, "vllm-orchestrator-1", reader)
        claims = {"vllm-worker-1": run_curl(faucet.CLAIM, "vllm-worker-1", "vllm-worker-1", reader)}
        agents["vllm-worker-1"] = claims["vllm-worker-1"]["registered"]
        claims.update({name: run_curl(faucet.CLAIM, name, "vllm-worker-1", agents[name]["api_key"])
                       for name in ("vllm-orchestrator-1", "hf-buyer", "stranger", "ft-buyer")})
        yield {"base": base, "ledger": ledger, "agents": agents, "claims": claims}
    ledger.close()


def key(market, name: str) -> str:
    return market["agents"][name]["api_key"]


def me(market, name: str) -> dict:
    r = httpx.get(market["base"] + "/api/me", headers={"Authorization": f"Bearer {key(market, name)}"}, timeout=10)
    r.raise_for_status()
    return r.json()


def escrow(market, name: str, escrow_id: str) -> dict:
    r = httpx.get(f"{market['base']}/api/escrow/{escrow_id}",
                  headers={"Authorization": f"Bearer {key(market, name)}"}, timeout=10)
    r.raise_for_status()
    return r.json()


# ---- faucet (seed 000, step 1) ---------------------------------------------------------

def test_faucet_curl_lines_register_and_claim(market):
    orchestrator = market["agents"]["vllm-orchestrator-1"]
    assert orchestrator["agent_id"] == "vllm-orchestrator-1"
    assert orchestrator["api_key"] and orchestrator["wallet"].startswith("0x")
    assert orchestrator["referral_code"]
    keys = [a["api_key"] for a in market["agents"].values()]
    assert len(set(keys)) == len(keys)
    claim = market["claims"]["vllm-orchestrator-1"]
    assert claim["agent_id"] == "vllm-orchestrator-1"
    assert claim["amount_micro"] == FAUCET_USDC * 1_000_000 and claim["amount_usdc"] == FAUCET_USDC
    assert me(market, "vllm-orchestrator-1")["balance_micro"] == FAUCET_USDC * 1_000_000
    worker = market["claims"]["vllm-worker-1"]
    assert worker["agent_id"] == "vllm-worker-1" and worker["registered"]["wallet"].startswith("0x")
    assert me(market, "vllm-worker-1")["balance_micro"] == FAUCET_USDC * 1_000_000


def test_faucet_claim_again_is_rate_limited_and_needs_the_agents_key(market):
    faucet = load_snippet("faucet_curl", market["base"])
    for api_key, status, message in ((key(market, "hf-buyer"), "429", "already claimed"),
                                     (PLACEHOLDER, "401", "unknown API key"),
                                     (key(market, "stranger"), "403", "the agent that registered it")):
        argv = curl_argv(faucet.CLAIM, "hf-buyer", "vllm-worker-1", api_key)
        done = subprocess.run(argv + ["-s", "-D", "-", "-w", "\n%{http_code}"], capture_output=True, text=True,
                              timeout=CURL_TIMEOUT_S, check=True)
        head, rest = done.stdout.split("\n\n", 1)  # text mode turned the CRLFs into newlines
        body, got = rest.rsplit("\n", 1)
        assert got == status and message in json.loads(body)["message"]
        if status == "429":  # a client may wait exactly this long and then succeed
            retry_after = json.loads(body)["details"]["retry_after_s"]
            assert f"retry-after: {retry_after}" in head.lower() and retry_after > 0


# ---- hf_inference_escrow.py (seed 003) -------------------------------------------------

def test_inference_escrow_locks_max_cost_exactly(market):
    snip = load_snippet("hf_inference_escrow", market["base"], key(market, "hf-buyer"))
    assert micro(snip.MAX_COST_USDC) == 1792  # the guide's float product, 2.048 x 0.0005 + 0.512 x 0.0015
    before = me(market, "hf-buyer")["balance_micro"]
    e = snip.create_inference_escrow("hf-seller")
    assert e["status"] == "active"
    assert e["amount_micro"] == e["remaining_micro"] == 1792
    assert e["amount_usdc"] == e["remaining_usdc"] == 0.001792
    assert e["seller_id"] == "hf-seller" and e["buyer"] == "hf-buyer"
    assert e["meta"] == {"model": "mistralai/Mistral-7B-Instruct-v0.3", "max_tokens": 512}
    assert e["model"] == "mistralai/Mistral-7B-Instruct-v0.3"
    assert e["description"] == "HF inference: Mistral-7B-Instruct"
    assert e["expires_at_ms"] - e["created_at_ms"] == 60_000
    assert me(market, "hf-buyer")["balance_micro"] == before - 1792
    created = [ev for ev in escrow(market, "hf-buyer", e["id"])["events"] if ev["kind"] == "created"][0]
    assert created["data"]["amount_micro"] == 1792
    assert created["data"].get("rounded_from") == (None if repr(snip.MAX_COST_USDC) == "0.001792"
                                                   else repr(snip.MAX_COST_USDC))


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": 200, "completion_tokens": 400},   # 0.0001 + 0.0006
    {"prompt_tokens": 37, "completion_tokens": 120},    # sub-micro: 0.0000185 + 0.00018
    {"prompt_tokens": 2048, "completion_tokens": 512},  # the whole budget
])
def test_inference_release_by_tokens_pays_proportional_cost_and_refunds_rest(market, usage):
    snip = load_snippet("hf_inference_escrow", market["base"], key(market, "hf-buyer"))
    buyer0, seller0 = me(market, "hf-buyer")["balance_micro"], me(market, "hf-seller")["balance_micro"]
    e = snip.create_inference_escrow("hf-seller")
    receipt = snip.release_escrow_by_tokens(e["id"], usage)
    actual_cost = ((usage["prompt_tokens"] / 1000) * snip.PRICE_PER_1K_INPUT
                   + (usage["completion_tokens"] / 1000) * snip.PRICE_PER_1K_OUTPUT)
    paid = micro(actual_cost)
    fee = int((Decimal(paid) / 100).to_integral_value(rounding=ROUND_HALF_EVEN))
    assert receipt["status"] == "released"
    assert receipt["gross_micro"] == paid and receipt["amount_paid"] == receipt["gross_usdc"]
    assert receipt["refunded_micro"] == 1792 - paid
    assert receipt["fee_micro"] == fee and receipt["net_micro"] == paid - fee
    closed = escrow(market, "hf-buyer", e["id"])
    assert (closed["paid_micro"], closed["refunded_micro"], closed["remaining_micro"]) == (paid, 1792 - paid, 0)
    assert me(market, "hf-buyer")["balance_micro"] == buyer0 - paid
    assert me(market, "hf-seller")["balance_micro"] == seller0 + paid - fee
    released = [ev for ev in closed["events"] if ev["kind"] == "released"][0]
    assert released["data"]["meta"] == usage


def test_inference_release_twice_is_refused(market):
    snip = load_snippet("hf_inference_escrow", market["base"], key(market, "hf-buyer"))
    e = snip.create_inference_escrow("hf-seller")
    snip.release_escrow_by_tokens(e["id"], {"prompt_tokens": 10, "completion_tokens": 10})
    with pytest.raises(requests.HTTPError) as info:
        snip.release_escrow_by_tokens(e["id"], {"prompt_tokens": 10, "completion_tokens": 10})
    assert info.value.response.status_code == 409
    assert "released" in info.value.response.json()["message"]


# ---- app.py, the Space gate (seed 003) -------------------------------------------------

def test_space_gate_deducts_per_call_until_the_escrow_runs_low(market):
    buyer = load_snippet("hf_inference_escrow", market["base"], key(market, "hf-buyer"))
    r = requests.post(buyer.ESCROW_URL, json={"seller_id": "space", "amount_usdc": 0.0025}, headers=buyer.PF_HEADERS)
    r.raise_for_status()
    escrow_id = r.json()["id"]
    gate = load_snippet("space_gate", market["base"], key(market, "space"))
    space0 = me(market, "space")["balance_micro"]
    assert gate.verify_and_charge_escrow(escrow_id) is True
    assert escrow(market, "space", escrow_id)["remaining_micro"] == 1500
    assert gate.verify_and_charge_escrow(escrow_id) is True
    state = escrow(market, "space", escrow_id)
    assert (state["paid_micro"], state["remaining_micro"], state["status"]) == (2000, 500, "active")
    assert gate.verify_and_charge_escrow(escrow_id) is False  # 0.0005 < PRICE_PER_CALL: nothing taken
    assert escrow(market, "space", escrow_id)["remaining_micro"] == 500
    assert me(market, "space")["balance_micro"] == space0 + 2 * (1000 - 10)  # 1% fee on each call
    deductions = [ev for ev in state["events"] if ev["kind"] == "deducted"]
    assert [ev["data"]["reason"] for ev in deductions] == ["sentiment classification"] * 2


def test_space_gate_refuses_closed_and_foreign_escrows(market):
    buyer = load_snippet("hf_inference_escrow", market["base"], key(market, "hf-buyer"))
    gate = load_snippet("space_gate", market["base"], key(market, "space"))
    r = requests.post(buyer.ESCROW_URL, json={"seller_id": "space", "amount_usdc": 0.01}, headers=buyer.PF_HEADERS)
    closed_id = r.json()["id"]
    requests.post(f"{buyer.ESCROW_URL}/{closed_id}/cancel", headers=buyer.PF_HEADERS).raise_for_status()
    assert gate.verify_and_charge_escrow(closed_id) is False

    stranger = load_snippet("hf_inference_escrow", market["base"], key(market, "stranger"))
    r = requests.post(stranger.ESCROW_URL, json={"seller_id": "stranger-seller", "amount_usdc": 0.01},
                      headers=stranger.PF_HEADERS)
    foreign_id = r.json()["id"]
    assert gate.verify_and_charge_escrow(foreign_id) is False
    assert gate.verify_and_charge_escrow("esc_does_not_exist") is False
    foreign = escrow(market, "stranger", foreign_id)
    assert (foreign["status"], foreign["paid_micro"], foreign["remaining_micro"]) == ("active", 0, 10_000)


# ---- finetune_escrow.py (seed 003) -----------------------------------------------------

def _post_job(market, target_score=0.85, payment=50.00):
    buyer = load_snippet("finetune_escrow", market["base"], key(market, "ft-buyer"))
    return buyer.post_finetune_job(base_model="mistralai/Mistral-7B-Instruct-v0.3",
                                   dataset_id="my-org/my-proprietary-dataset", target_metric="accuracy",
                                   target_score=target_score, payment_usdc=payment, seller_agent_id="ft-seller")


def test_finetune_job_posts_benchmark_escrow_and_passing_score_releases(market):
    buyer0, seller0 = me(market, "ft-buyer")["balance_micro"], me(market, "ft-seller")["balance_micro"]
    job = _post_job(market)
    assert job["status"] == "active" and job["amount_micro"] == 50_000_000
    assert job["release_condition"] == {"type": "benchmark", "metric": "accuracy", "threshold": 0.85,
                                        "higher_is_better": True, "verifier": "self"}
    assert job["expires_at_ms"] - job["created_at_ms"] == 172_800_000
    assert job["meta"]["target_score"] == 0.85 and job["meta"]["target_metric"] == "accuracy"
    seller = load_snippet("finetune_escrow", market["base"], key(market, "ft-seller"))
    result = seller.submit_finetune_result(job["id"], job["meta"], 0.85)  # score == threshold passes
    assert result["status"] == "released"
    assert result["payout_usdc"] == 50.0 and result["gross_micro"] == 50_000_000
    assert result["fee_micro"] == 500_000 and result["net_micro"] == 49_500_000
    assert me(market, "ft-seller")["balance_micro"] == seller0 + 49_500_000
    assert me(market, "ft-buyer")["balance_micro"] == buyer0 - 50_000_000
    final = escrow(market, "ft-buyer", job["id"])
    assert final["result"]["artifact"] == {"repo": "my-hf-username/my-finetuned-model"}


def test_finetune_score_below_threshold_keeps_the_escrow_active(market):
    job = _post_job(market, payment=5.00)
    seller = load_snippet("finetune_escrow", market["base"], key(market, "ft-seller"))
    seller0 = me(market, "ft-seller")["balance_micro"]
    result = seller.submit_finetune_result(job["id"], job["meta"], 0.8499)
    assert result["status"] == "active" and result["payout_usdc"] is None
    assert result["escrow"]["remaining_micro"] == 5_000_000
    assert me(market, "ft-seller")["balance_micro"] == seller0
    # The seller may try again within the TTL; a passing score then releases it.
    result = seller.submit_finetune_result(job["id"], job["meta"], 0.91)
    assert result["status"] == "released" and result["payout_usdc"] == 5.0
    # Only the seller submits results.
    buyer = load_snippet("finetune_escrow", market["base"], key(market, "ft-buyer"))
    other = _post_job(market, payment=1.00)
    r = requests.post(f"{buyer.ESCROW_URL}/{other['id']}/submit-result",
                      json={"metric": "accuracy", "score": 0.99}, headers={"Authorization": f"Bearer {buyer.PF_KEY}"})
    assert r.status_code == 403 and "seller" in r.json()["message"]
    requests.post(f"{buyer.ESCROW_URL}/{other['id']}/cancel", headers={"Authorization": f"Bearer {buyer.PF_KEY}"})


# ---- escrow_client.py (seed 000, vLLM guide) -------------------------------------------

def _vllm(market, name="vllm-orchestrator-1"):
    snip = load_snippet("escrow_client", market["base"], key(market, name))
    return snip, snip.PurpleFleatEscrowClient(api_key=snip.API_KEY)


def test_vllm_client_create_and_release_by_actual_tokens(market):
    snip, client = _vllm(market)
    worker = market["agents"]["vllm-worker-1"]
    buyer0, worker0 = me(market, "vllm-orchestrator-1")["balance_micro"], me(market, "vllm-worker-1")["balance_micro"]

    async def flow():
        record = await client.create_escrow(worker_wallet=worker["wallet"], prompt_tokens=113,
                                            max_completion_tokens=512, model="llama-3-8b-instruct")
        result = await client.release_escrow(escrow_id=record.escrow_id, actual_completion_tokens=387)
        return record, result

    record, result = asyncio.run(flow())
    assert record.escrow_id.startswith("esc_") and record.estimated_cost_usdc == 625 * 0.000002
    assert result["amount_paid"] == 0.001  # (113 + 387) x 0.000002, exactly
    assert result["gross_micro"] == 1000 and result["refunded_micro"] == 250 and result["status"] == "released"
    assert me(market, "vllm-orchestrator-1")["balance_micro"] == buyer0 - 1000
    assert me(market, "vllm-worker-1")["balance_micro"] == worker0 + 990
    e = escrow(market, "vllm-orchestrator-1", record.escrow_id)
    assert e["seller"] == "vllm-worker-1" and e["amount_micro"] == 1250
    assert (e["tokens_in"], e["tokens_out"], e["model"]) == (113, 387, "llama-3-8b-instruct")
    assert e["meta"] == {"model": "llama-3-8b-instruct", "prompt_tokens": 113, "max_completion_tokens": 512}


@pytest.mark.parametrize("prompt_tokens,actual", [(7, 0), (1, 1), (2048, 511), (300, 512)])
def test_vllm_release_is_exact_for_any_token_count(market, prompt_tokens, actual):
    snip, client = _vllm(market)

    async def flow():
        record = await client.create_escrow("vllm-worker-1", prompt_tokens, 512, "llama-3-8b-instruct")
        return record, await client.release_escrow(record.escrow_id, actual)

    record, result = asyncio.run(flow())
    locked = micro((prompt_tokens + 512) * 0.000002)
    paid = (prompt_tokens + actual) * 2
    assert result["gross_micro"] == paid and result["refunded_micro"] == locked - paid
    assert result["amount_paid"] == paid / 1_000_000
    assert result["escrow"]["amount_micro"] == locked


def test_vllm_cancel_on_error_refunds_in_full(market):
    snip, client = _vllm(market)
    buyer0 = me(market, "vllm-orchestrator-1")["balance_micro"]

    async def generate_with_billing_failing():
        record = await client.create_escrow("vllm-worker-1", 50, 256, "llama-3-8b-instruct")
        try:
            raise RuntimeError("engine died")  # stands in for engine.generate(...)
        except Exception:
            return record, await client.cancel_escrow(record.escrow_id)

    record, result = asyncio.run(generate_with_billing_failing())
    assert result["status"] == "cancelled" and result["gross_micro"] == 0
    assert result["refunded_micro"] == 612 and result["amount_paid"] == 0
    assert me(market, "vllm-orchestrator-1")["balance_micro"] == buyer0
    with pytest.raises(httpx.HTTPStatusError) as info:
        asyncio.run(client.release_escrow(record.escrow_id, 10))
    assert info.value.response.status_code == 409


def test_vllm_create_refuses_unknown_worker_and_release_by_the_worker(market):
    snip, client = _vllm(market)
    with pytest.raises(httpx.HTTPStatusError) as info:
        asyncio.run(client.create_escrow("0x" + "0" * 40, 10, 10, "m"))
    assert info.value.response.status_code == 404
    record = asyncio.run(client.create_escrow("vllm-worker-1", 10, 10, "m"))
    _, worker = _vllm(market, "vllm-worker-1")
    with pytest.raises(httpx.HTTPStatusError) as info:
        asyncio.run(worker.release_escrow(record.escrow_id, 10))
    assert info.value.response.status_code == 403
    asyncio.run(client.cancel_escrow(record.escrow_id))


# ---- bonuses (seed 000, worker incentive model) ----------------------------------------

def test_bonus_conditions_and_quality_score_add_the_bonuses(market):
    snip, client = _vllm(market)
    bonus = load_snippet("worker_bonus", market["base"])
    worker0 = me(market, "vllm-worker-1")["balance_micro"]

    async def flow():
        created = await bonus.create_escrow_with_bonus(client, "vllm-worker-1", 113, 512, "llama-3-8b-instruct")
        receipt = await bonus.release_with_quality(client, created["escrow_id"], 387, 0.94, tokens_per_sec=120.5)
        return created, receipt

    created, receipt = asyncio.run(flow())
    assert created["bonus_conditions"] == {"throughput_tps_min": 100, "bonus_pct": "5"}
    # base (113 + 387) x 0.000002 = 1000 micro; +5% throughput (120.5 tps > 100) +10% quality (0.94 > 0.9)
    assert receipt["base_micro"] == 1000 and receipt["bonus_micro"] == 150
    assert receipt["bonus_parts"] == {"throughput_micro": 50, "quality_micro": 100, "streak_micro": 0,
                                      "throughput_usdc": 0.00005, "quality_usdc": 0.0001, "streak_usdc": 0.0}
    assert receipt["gross_micro"] == 1150 and receipt["amount_paid"] == 0.00115
    assert receipt["refunded_micro"] == 100  # 1250 locked - 1150 paid
    assert me(market, "vllm-worker-1")["balance_micro"] == worker0 + 1150 - 12  # 1% fee, half-even


def test_no_bonus_below_the_thresholds(market):
    snip, client = _vllm(market)
    bonus = load_snippet("worker_bonus", market["base"])

    async def flow():
        created = await bonus.create_escrow_with_bonus(client, "vllm-worker-1", 113, 512, "llama-3-8b-instruct")
        return await bonus.release_with_quality(client, created["escrow_id"], 387, 0.9, tokens_per_sec=100)

    receipt = asyncio.run(flow())
    assert receipt["base_micro"] == 1000 and receipt["bonus_micro"] == 0 and receipt["gross_micro"] == 1000


def test_score_gated_release_as_written_in_the_guide(market):
    """The guide's score-gated release body carries no price: the server settles it at the price the
    escrow was sized with, amount / (prompt_tokens + max_completion_tokens)."""
    snip, client = _vllm(market)
    bonus = load_snippet("worker_bonus", market["base"])

    async def flow():
        record = await client.create_escrow("vllm-worker-1", 113, 512, "llama-3-8b-instruct")
        return record, await bonus.release_score_gated(client, record)

    record, response = asyncio.run(flow())
    assert response.status_code == 200, response.text
    receipt = response.json()
    # (113 + 387) tokens at 1250 micro / (113 + 512) tokens = 1000 micro; quality 0.94 > 0.9: +10%
    assert receipt["base_micro"] == 1000 and receipt["bonus_parts"]["quality_micro"] == 100
    assert receipt["refunded_micro"] == 1250 - 1100 and receipt["status"] == "released"


# ---- /api/me (setup.sh) and /escrow/history --------------------------------------------

def test_api_me_curl_line_returns_the_guides_fields(market):
    snip = load_snippet("setup_check", market["base"])
    env = dict(os.environ, PF_API_KEY=key(market, "hf-buyer"), ESCROW_BASE=market["base"])
    done = subprocess.run(["bash", "-c", snip.VERIFY_KEY], capture_output=True, text=True, env=env,
                          timeout=CURL_TIMEOUT_S, check=True)
    body = json.loads(done.stdout)
    assert set(snip.EXPECTED_KEYS) <= set(body)
    assert body["agent_id"] == "hf-buyer"
    assert body["referral_code"] == market["agents"]["hf-buyer"]["referral_code"]
    assert isinstance(body["balance_usdc"], float) and body["balance_usdc"] * 1_000_000 == pytest.approx(
        body["balance_micro"], abs=0.5)
    assert body["escrows_open"] == me(market, "hf-buyer")["escrows_open"] and body["escrows_open"] >= 1
    bad = subprocess.run(["bash", "-c", snip.VERIFY_KEY], capture_output=True, text=True,
                         env=dict(env, PF_API_KEY="pf_live_wrong"), timeout=CURL_TIMEOUT_S)
    assert json.loads(bad.stdout)["error"] == "unauthorized"


def test_escrow_history_lists_escrows_with_tokens_and_cost_per_model(market):
    r = httpx.get(market["base"] + "/escrow/history",
                  headers={"Authorization": f"Bearer {key(market, 'vllm-orchestrator-1')}"}, timeout=10)
    r.raise_for_status()
    history = r.json()
    rows = history["escrows"]
    assert history["count"] == len(rows) >= 10
    assert all(row["buyer"] == "vllm-orchestrator-1" for row in rows)
    created = [row["created_at_ms"] for row in rows]
    assert created == sorted(created, reverse=True)
    assert {row["status"] for row in rows} >= {"released", "cancelled"}
    llama = [s for s in history["analytics"]["spend"] if s["model"] == "llama-3-8b-instruct"][0]
    released = [row for row in rows if row["model"] == "llama-3-8b-instruct"]
    assert llama["escrows"] == len(released)
    assert llama["paid_micro"] == sum(row["paid_micro"] for row in released)
    assert llama["tokens_out"] == sum(row["tokens_out"] for row in released)
    only = httpx.get(market["base"] + "/escrow/history", params={"status": "cancelled"},
                     headers={"Authorization": f"Bearer {key(market, 'vllm-orchestrator-1')}"}, timeout=10).json()
    assert only["count"] >= 1 and {row["status"] for row in only["escrows"]} == {"cancelled"}
    assert httpx.get(market["base"] + "/escrow/history", timeout=10).status_code == 401


# ---- after all ---------------------------------------------------------------------------

def test_zz_audit_is_clean_after_all_snippets(market):
    r = httpx.get(market["base"] + "/api/audit", headers={"Authorization": f"Bearer {OPERATOR_KEY}"}, timeout=10)
    r.raise_for_status()
    report = r.json()
    assert report["ok"] is True and report["problems"] == []
    assert report["minted_micro"] == 5 * FAUCET_USDC * 1_000_000
    assert report["minted_micro"] == (report["agent_balances_micro"] + report["escrow_holdings_micro"]
                                      + report["platform_fees_micro"])
    assert httpx.get(market["base"] + "/api/audit", timeout=10).status_code == 401
    agent = httpx.get(market["base"] + "/api/audit", headers={"Authorization": f"Bearer {key(market, 'stranger')}"},
                      timeout=10)
    assert agent.status_code == 403 and "minted" not in agent.text  # an agent sees only its own figures
    assert_audit_clean(market["ledger"])
