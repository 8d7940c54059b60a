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
        # A function, not an expression string: the page's policy refuses eval, Playwright's too.
        page.wait_for_function("() => document.getElementById('error').textContent.length > 0", timeout=10_000)
        assert "unknown API key" in page.inner_text("#error")


HOSTILE = ["<img src=x onerror=alert(1)>", "<script>alert(2)</script>", "\"><svg onload=alert(3)>",
           "</text><foreignObject><img src=x onerror=alert(4)></foreignObject>", "javascript:alert(5)",
           "'-alert(6)-'", "<iframe srcdoc='<script>alert(7)</script>'>"]


def test_hostile_data_stays_text_and_the_key_stays_in_memory(tmp_path):
    """The finding: a buyer-chosen `meta.model` went into innerHTML on the seller's dashboard,
    and the page kept the API key in sessionStorage, where that script could read it."""
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    keys = {name: ledger.register(name)["api_key"] for name in ("seller", "buyer")}
    ledger.deposit("buyer", "50")
    for i, text in enumerate(HOSTILE):
        e = ledger.create_escrow("buyer", "seller", "1", description=text, meta={"model": text, "note": text})
        ledger.deduct("seller", e["id"], f"0.0{i + 1}", reason=text,
                      usage={"prompt_tokens": i, "completion_tokens": 2 * i})
        if i % 2:
            ledger.release("buyer", e["id"], "0.1", meta={"why": text})
        elif i % 3:
            ledger.cancel("buyer", e["id"], reason=text)
    dialogs, errors = [], []
    with serve_app(create_app(ledger, sweep_interval_s=0, mcp=False)) as url, chromium_page() as page:
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("console", lambda msg: msg.type == "error" and not msg.location.get("url", "").endswith(
            "/favicon.ico") and errors.append(msg.text))
        response = page.goto(f"{url}/dashboard")
        policy = response.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "unsafe" not in policy and "default-src 'none'" in policy
        for name in ("seller", "buyer"):  # the seller is the target; the buyer's own page plots its models
            page.fill("#key", keys[name])
            page.click("button[type=submit]")
            page.wait_for_function(f"() => document.getElementById('agent').textContent === '{name}'",
                                   timeout=15_000)
            page.wait_for_selector(f"#escrows tr:nth-child({len(HOSTILE)})", timeout=15_000)
            page.wait_for_timeout(500)  # an injected handler (onerror of a broken image) fires by then
            page.screenshot(path=str(ARTIFACTS / f"dashboard-hostile-{name}.png"), full_page=True)
            table = page.inner_text("#escrows")
            assert all(text in table for text in HOSTILE), table
            assert page.locator("img, script:not([src]), iframe, foreignObject, svg svg").count() == 0
            assert dialogs == [] and errors == [], (dialogs, errors)
            stored = page.evaluate("() => [localStorage.length, sessionStorage.length, document.cookie]")
            assert stored == [0, 0, ""]
            assert keys[name] not in page.content() and page.input_value("#key") == ""
        assert page.locator("#per-model rect").count() == len(HOSTILE)
        assert HOSTILE[0][:22] in page.text_content("#per-model")  # bar labels: text, cut at 22 characters
        page.reload()
        page.wait_for_timeout(300)
        assert page.locator("#main").is_hidden()  # the key went with the page: it is asked for again
        assert page.evaluate("() => [localStorage.length, sessionStorage.length]") == [0, 0]
        assert dialogs == [] and errors == [], (dialogs, errors)
    ledger.close()
