"""The Space templates started for real (`python spaces/<name>/app.py`) on 127.0.0.1.

Called with `gradio_client` and headers like an agent, and opened in headless Chromium
like a person. The chat Space runs a tiny random chat model (HF_ESCROW_SPACE_MODEL) so
the tests stay fast; both Spaces run on one embedded ledger shared with this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

import hf_escrow
from hf_escrow.client import embedded_ledger

from .helpers import assert_audit_clean, snapshot
from .liveserver import free_port

ROOT = Path(__file__).resolve().parents[1]
SELLER = "paid-chat"
PRICE = Decimal("0.001")
STARTUP_TIMEOUT_S = 120


class Space:
    """One `python spaces/<name>/app.py` process, its URL and its log."""

    def __init__(self, name: str, home: Path, log_path: Path, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        environment = {k: v for k, v in os.environ.items()
                       if k not in ("HF_ESCROW_URL", "HF_ESCROW_API_KEY", "HF_ESCROW_DATABASE_URL", "HF_ESCROW_AGENT",
                                    "HF_ESCROW_SELLER_KEY")}
        environment.update(HF_ESCROW_HOME=str(home), GRADIO_SERVER_PORT=str(self.port),
                           GRADIO_SERVER_NAME="127.0.0.1", GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1",
                           HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1", **env)
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen([sys.executable, str(ROOT / "spaces" / name / "app.py")], cwd=ROOT,
                                        env=environment, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)

    def wait(self) -> "Space":
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the Space exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the Space did not answer within {STARTUP_TIMEOUT_S} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def answered(self) -> int:
        """How many answers the model computed (the app logs one line per answer)."""
        return self.log().count("answered with")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from .models import build_tiny_chat_model
    return build_tiny_chat_model(tmp_path_factory.mktemp("models") / "tiny-chat")


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("space-ledger")


@pytest.fixture(scope="module")
def spaces(home, tiny_model, tmp_path_factory):
    """The chat Space started twice at once on one ledger (both register the seller), and the embeddings Space."""
    logs = tmp_path_factory.mktemp("space-logs")
    env = dict(HF_ESCROW_SPACE_MODEL=str(tiny_model), HF_ESCROW_SELLER=SELLER, HF_ESCROW_PRICE=str(PRICE),
               HF_ESCROW_SPACE_MAX_TOKENS="8", HF_ESCROW_SPACE_CONCURRENCY="4")
    started = [Space("paid-chat", home, logs / "chat-a.log", **env),
               Space("paid-chat", home, logs / "chat-b.log", **env),
               Space("paid-embeddings", home, logs / "embeddings.log", HF_ESCROW_PRICE="0.0001")]
    try:
        for space in started:
            space.wait()
        yield started
    finally:
        for space in started:
            space.stop()


@pytest.fixture(scope="module")
def ledger(spaces, home):
    """The Spaces' embedded ledger, opened by this process too (after they created it)."""
    return embedded_ledger(f"sqlite:///{home / 'ledger.db'}")


_buyers = iter(range(1000))


def new_buyer(ledger, fund: str = "5"):
    name = f"buyer-{next(_buyers)}"
    key = ledger.register(name)["api_key"]
    ledger.deposit(name, fund)
    return hf_escrow.connect(agent=name, database_url=ledger.url), key


def client_for(space: Space, escrow_id: str | None = None, key: str | None = None, **options):
    from gradio_client import Client
    headers = {}
    if escrow_id:
        headers["X-Escrow-Id"] = escrow_id
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return Client(space.url, headers=headers, verbose=False, **options)


def test_started_twice_on_one_ledger_both_serve_paid_calls(spaces, ledger):
    chat_a, chat_b, _ = spaces
    buyer, key = new_buyer(ledger)
    e = buyer.create_escrow(SELLER, "0.002")
    for space in (chat_a, chat_b):
        answer, receipt = client_for(space, e.id, key).predict("hello", api_name="/chat")
        assert isinstance(answer, str) and receipt["seller"] == SELLER
    assert buyer.get(e.id).remaining == 0
    assert "already registered" not in chat_a.log() + chat_b.log()


def test_a_funded_escrow_is_charged_exactly_the_price_per_call(spaces, ledger):
    chat = spaces[0]
    buyer, key = new_buyer(ledger)
    e = buyer.create_escrow(SELLER, "0.005")
    seller_before = hf_escrow.connect(agent=SELLER, database_url=ledger.url).me().balance
    client = client_for(chat, e.id, key)
    receipts = [client.predict(f"question {i}", api_name="/chat")[1] for i in range(3)]
    assert [r["charged_usdc"] for r in receipts] == ["0.001000"] * 3
    assert [r["remaining_usdc"] for r in receipts] == ["0.004000", "0.003000", "0.002000"]
    after = buyer.get(e.id)
    assert after.remaining == Decimal("0.002") and after.paid == Decimal("0.003")
    seller_after = hf_escrow.connect(agent=SELLER, database_url=ledger.url).me().balance
    assert seller_after - seller_before == sum(Decimal(r["seller_net_usdc"]) for r in receipts)
    assert_audit_clean(ledger)


def test_unfunded_or_foreign_escrows_are_refused_before_the_model_runs(spaces, ledger):
    from gradio_client.exceptions import AppError
    chat = spaces[0]
    buyer, key = new_buyer(ledger)
    stranger, stranger_key = new_buyer(ledger)
    small = buyer.create_escrow(SELLER, "0.0005")
    foreign = stranger.create_escrow(SELLER, "0.005")
    ledger.register("someone-else")
    elsewhere = buyer.create_escrow("someone-else", "0.005")
    cases = [
        ((None, None), "send your escrow id in the X-Escrow-Id header"),
        ((small.id, None), "send the API key of the escrow's buyer"),
        ((small.id, key), "has 0.000500 USDC left; this costs 0.001000 USDC"),
        ((foreign.id, key), "belongs to another buyer"),
        ((elsewhere.id, key), f"open one with seller '{SELLER}'"),
        ((small.id, "hfe_forged"), "not a key of this ledger"),
    ]
    answered, before = chat.answered(), snapshot(ledger)
    for (escrow_id, api_key), message in cases:
        with pytest.raises(AppError) as refused:
            client_for(chat, escrow_id, api_key).predict("hello", api_name="/chat")
        assert message in str(refused.value)
    assert snapshot(ledger) == before            # nothing moved
    assert chat.answered() == answered           # the model never ran


def test_a_handler_error_costs_nothing(spaces, ledger):
    from gradio_client.exceptions import AppError
    chat = spaces[0]
    buyer, key = new_buyer(ledger)
    e = buyer.create_escrow(SELLER, "0.001")
    before = snapshot(ledger)
    client = client_for(chat, e.id, key)
    for bad in ("", "x" * 2001):
        with pytest.raises(AppError, match=r"\(not charged\)"):
            client.predict(bad, api_name="/chat")
    assert snapshot(ledger) == before
    assert client.predict("now a real question", api_name="/chat")[1]["remaining_usdc"] == "0.000000"


def test_64_concurrent_callers_against_an_escrow_for_n_calls(spaces, ledger):
    from gradio_client.exceptions import AppError
    chat = spaces[0]
    calls = 10
    buyer, key = new_buyer(ledger)
    e = buyer.create_escrow(SELLER, str(PRICE * calls))
    client = client_for(chat, e.id, key, max_workers=64)
    answered = chat.answered()
    jobs = [client.submit(f"caller {i}", api_name="/chat") for i in range(64)]
    succeeded, refused = 0, 0
    for job in jobs:
        try:
            job.result(timeout=120)
            succeeded += 1
        except AppError as error:
            assert "USDC left" in str(error), error
            refused += 1
    assert (succeeded, refused) == (calls, 64 - calls)
    after = buyer.get(e.id)
    assert after.remaining == 0 and after.paid == PRICE * calls and after.refunded == 0
    assert chat.answered() - answered == calls
    assert_audit_clean(ledger)


def test_embeddings_space_bills_per_vector(spaces, ledger):
    from gradio_client.exceptions import AppError
    embeddings = spaces[2]
    buyer, key = new_buyer(ledger)
    e = buyer.create_escrow("paid-embeddings", "0.0005")
    client = client_for(embeddings, e.id, key)
    result, receipt = client.predict("an escrow pays the seller\nthe buyer gets the rest\nhello", api_name="/embed")
    assert result["count"] == 3 and result["dim"] == 384 and len(result["vectors"]) == 3
    norms = [sum(x * x for x in v) for v in result["vectors"]]
    assert all(abs(n - 1) < 1e-4 for n in norms)
    assert receipt["charged_usdc"] == "0.000300" and receipt["remaining_usdc"] == "0.000200"
    with pytest.raises(AppError, match="0.000200 USDC left; this costs 0.000300"):
        client.predict("one\ntwo\nthree", api_name="/embed")
    assert buyer.get(e.id).paid == Decimal("0.0003")


@pytest.mark.browser
def test_a_person_pays_in_the_browser(spaces, ledger):
    from .browser import ARTIFACTS, chromium_page
    chat = spaces[0]
    buyer, key = new_buyer(ledger)
    e = buyer.create_escrow(SELLER, "0.005")
    with chromium_page() as page:
        page.goto(chat.url, wait_until="domcontentloaded")
        page.get_by_text("Every answer costs").wait_for(timeout=30_000)
        assert page.get_by_label("Price").input_value() == "0.001000 USDC per answer"
        page.get_by_label("Escrow id").fill(e.id)
        page.get_by_label("API key").fill(key)
        balance = page.get_by_label("Remaining balance")
        page.get_by_role("button", name="Check balance").click()
        page.wait_for_function("el => el.value === '0.005000 USDC'", arg=balance.element_handle(), timeout=20_000)
        message = page.get_by_role("textbox", name="Message", exact=True)
        message.fill("Say hi in French")
        page.get_by_role("button", name="Send").click()
        page.wait_for_function("el => el.value === '0.004000 USDC'", arg=balance.element_handle(), timeout=30_000)
        page.get_by_test_id("user").get_by_text("Say hi in French").wait_for(timeout=10_000)   # in the chat,
        page.get_by_test_id("bot").first.wait_for(timeout=10_000)                             # and its answer
        assert "0.001000" in page.inner_text("body")                           # the receipt shows the charge
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "space-paid-chat.png"), full_page=True)
        assert buyer.get(e.id).remaining == Decimal("0.004")

        page.get_by_role("button", name="Get a test escrow (embedded ledger)").click()   # a visitor with nothing
        page.wait_for_function("el => el.value === '0.010000 USDC'", arg=balance.element_handle(), timeout=20_000)
        assert page.get_by_label("Escrow id").input_value().startswith("esc_")
        message.fill("hello again")
        message.press("Enter")
        page.wait_for_function("el => el.value === '0.009000 USDC'", arg=balance.element_handle(), timeout=30_000)
    assert_audit_clean(ledger)
