"""`hf-escrow demo`: every step moves exact money through the embedded ledger and the
audit stays clean. The steps run their real parts: a shard server on 127.0.0.1 streamed
with `datasets`, a Gradio app called with gradio_client, the served gemma, a LoRA job;
the dashboard then shows the demo's escrows in headless Chromium."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from decimal import Decimal

import pytest
from rich.console import Console

import hf_escrow
from hf_escrow.client import embedded_ledger
from hf_escrow.demo import run_demo
from hf_escrow.ledger import Ledger
from hf_escrow.server import create_app

from .browser import ARTIFACTS, chromium_page
from .helpers import assert_audit_clean
from .liveserver import serve_app

D = Decimal
FEE_BPS = 100  # the default 1% fee


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One demo without the slow steps, on its own embedded ledger."""
    home = tmp_path_factory.mktemp("demo-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_ESCROW_HOME", str(home))
        out = io.StringIO()
        result = run_demo(chat=False, finetune=False, console=Console(file=out, width=200))
        yield result, out.getvalue(), embedded_ledger()


@pytest.mark.slow
def test_demo_streams_shards_and_calls_gradio_for_exact_money(demo_run, monkeypatch):
    result, text, ledger = demo_run
    assert result["ok"], result["audit"]["problems"]
    buyer = hf_escrow.connect(agent=result["agents"]["buyer"], database_url=ledger.url)
    shards, calls = (buyer.get(escrow_id) for escrow_id in result["escrow_ids"])
    # 4 shards at 0.002 each, 3 calls at 0.001 each; the rest of each 0.01 budget refunded
    assert (shards.status, shards.paid, shards.refunded) == ("cancelled", D("0.008"), D("0.002"))
    assert (calls.status, calls.paid, calls.refunded) == ("cancelled", D("0.003"), D("0.007"))
    # each call and each shard paid by one hold captured in full; nothing left held
    assert [e.data.get("captured_micro") for e in calls.events if e.kind == "hold_closed"] == [1000] * 3
    assert [e.data.get("captured_micro") for e in shards.events if e.kind == "hold_closed"] == [2000] * 4
    assert shards.held == calls.held == 0
    seller = hf_escrow.connect(agent=result["agents"]["seller"], database_url=ledger.url).me()
    assert seller.balance == D("0.011") * (10_000 - FEE_BPS) / 10_000
    assert buyer.me().balance == D("10") - D("0.011")
    assert "streamed 1000 rows from 4 shards" in text and "'pay' -> 'PAY'" in text and "audit clean" in text
    assert_audit_clean(ledger)


@pytest.mark.slow
@pytest.mark.browser
def test_dashboard_shows_the_demos_escrows(demo_run):
    result, _, ledger = demo_run
    with serve_app(create_app(ledger, sweep_interval_s=0, mcp=False)) as url, chromium_page() as page:
        page.goto(f"{url}/dashboard")
        page.fill("#key", result["buyer_key"])
        page.click("button[type=submit]")
        page.wait_for_selector("#escrows tr", timeout=15_000)
        page.wait_for_selector("#over-time polyline", timeout=15_000)
        page.screenshot(path=str(ARTIFACTS / "dashboard-demo.png"), full_page=True)
        text = page.inner_text("#escrows")
        assert all(escrow_id in text for escrow_id in result["escrow_ids"])
        assert page.inner_text("#agent") == result["agents"]["buyer"]


@pytest.mark.slow
@pytest.mark.model
def test_demo_command_runs_every_step(gemma_url, gemma_dir, tmp_path):
    """The README's first command, with the session's served gemma in place of a fresh one."""
    env = dict(os.environ, HF_ESCROW_HOME=str(tmp_path), COLUMNS="200")
    done = subprocess.run([sys.executable, "-m", "hf_escrow.cli", "demo", "--model-url", gemma_url,
                           "--model-dir", str(gemma_dir)], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "counted by usage" in done.stdout or "counted by tokenizer" in done.stdout, done.stdout
    assert "passed: escrow released to the seller" in done.stdout and "audit clean" in done.stdout
    ledger = Ledger(f"sqlite:///{tmp_path}/ledger.db")
    try:
        assert_audit_clean(ledger)
        assert len(ledger.history(_buyer_of(done.stdout), limit=10)) == 4
    finally:
        ledger.close()


def _buyer_of(stdout: str) -> str:
    return next(word for word in stdout.split() if word.startswith("demo-buyer-"))
