"""The dashboard in headless Chromium: an agent sees its escrows and a plot, never another's."""

import hf_escrow
from hf_escrow.ledger import Ledger
from hf_escrow.server import create_app

from .browser import ARTIFACTS, chromium_page
from .liveserver import serve_app

import pytest

pytestmark = pytest.mark.browser


def test_dashboard_shows_my_escrows_and_plots_but_not_others(tmp_path):
    db = f"sqlite:///{tmp_path / 'l.db'}"
    ledger = Ledger(db)
    key = ledger.register("buyer")["api_key"]
    for name in ("seller", "stranger", "stranger-seller"):
        ledger.register(name)
    for name in ("buyer", "stranger"):
        ledger.deposit(name, "5")
    buyer = hf_escrow.connect(agent="buyer", database_url=db)
    seller = hf_escrow.connect(agent="seller", database_url=db)
    mine = [buyer.create_escrow("seller", "1", meta={"model": model}) for model in ("gemma-3-270m", "minilm", "gemma-3-270m")]
    seller.deduct(mine[0].id, "0.25", usage={"prompt_tokens": 40, "completion_tokens": 60})
    buyer.release(mine[1].id, "0.5")
    theirs = hf_escrow.connect(agent="stranger", database_url=db).create_escrow("stranger-seller", "2")
    with serve_app(create_app(ledger, sweep_interval_s=0, mcp=False)) as url, chromium_page() as page:
        page.goto(f"{url}/dashboard")
        page.fill("#key", key)
        page.click("button[type=submit]")
        page.wait_for_selector("#escrows tr", timeout=15_000)
        page.wait_for_selector("#per-model rect", timeout=15_000)
        text = page.inner_text("#escrows")
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        assert all(e.id in text for e in mine)
        assert theirs.id not in page.content()
        assert page.inner_text("#agent") == "buyer"
        assert page.inner_text("#balance") == str(buyer.me().balance)
        assert page.locator("#per-model rect").count() == 2   # two models with spend
        assert page.locator("#over-time polyline").count() == 1
        page.fill("#key", "hfe_wrong")
        page.click("button[type=submit]")
        page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=10_000)
        assert "unknown API key" in page.inner_text("#error")
