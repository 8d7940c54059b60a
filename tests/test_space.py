"""The Space templates started for real (`python spaces/<name>/app.py`) on 127.0.0.1.

Called with `gradio_client` and the escrow's spend token like an agent, and opened in
headless Chromium like a person. The chat Space runs a tiny random chat model
(HF_ESCROW_SPACE_MODEL) so the tests stay fast. Two chat Space processes and the
embeddings Space share one embedded SQLite ledger with this process; a second pair of
chat Spaces runs on PostgreSQL for the two-process race.
"""

from __future__ import annotations

import json
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

from .conftest import PG_SKIP_REASON, fresh_pg_database
from .helpers import assert_audit_clean, snapshot
from .liveserver import free_port

ROOT = Path(__file__).resolve().parents[1]
SELLER = "paid-chat"
PRICE = Decimal("0.001")
STARTUP_TIMEOUT_S = 300   # three Spaces start at once on two busy cores


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


CHAT_ENV = dict(HF_ESCROW_SELLER=SELLER, HF_ESCROW_PRICE=str(PRICE), HF_ESCROW_SPACE_MAX_TOKENS="8",
                HF_ESCROW_SPACE_CONCURRENCY="4")


def start(spaces: list[Space]) -> list[Space]:
    try:
        for space in spaces:
            space.wait()
    except BaseException:
        for space in spaces:
            space.stop()
        raise
    return spaces


@pytest.fixture(scope="module")
def spaces(home, tiny_model, tmp_path_factory):
    """The chat Space started twice at once on one ledger (both register the seller), and the embeddings Space."""
    logs = tmp_path_factory.mktemp("space-logs")
    env = dict(CHAT_ENV, HF_ESCROW_SPACE_MODEL=str(tiny_model))
    started = start([Space("paid-chat", home, logs / "chat-a.log", HF_ESCROW_SPACE_TRIAL="1", **env),
                     Space("paid-chat", home, logs / "chat-b.log", **env),
                     Space("paid-embeddings", home, logs / "embeddings.log", HF_ESCROW_PRICE="0.0001")])
    yield started
    for space in started:
        space.stop()


@pytest.fixture(scope="module")
def ledger(spaces, home):
    """The Spaces' embedded ledger, opened by this process too (after they created it)."""
    return embedded_ledger(f"sqlite:///{home / 'ledger.db'}")


@pytest.fixture(scope="module")
def pg_pair(tiny_model, tmp_path_factory):
    """Two chat Space processes whose embedded ledger is one PostgreSQL database, and that ledger."""
    if PG_SKIP_REASON:
        pytest.skip(PG_SKIP_REASON)
    url, drop = fresh_pg_database()
    logs, home = tmp_path_factory.mktemp("pg-space-logs"), tmp_path_factory.mktemp("pg-space-home")
    env = dict(CHAT_ENV, HF_ESCROW_SPACE_MODEL=str(tiny_model), HF_ESCROW_DATABASE_URL=url)
    try:
        pair = start([Space("paid-chat", home, logs / "chat-a.log", **env),
                      Space("paid-chat", home, logs / "chat-b.log", **env)])
        try:
            yield pair, embedded_ledger(url)
        finally:
            for space in pair:
                space.stop()
    finally:
        embedded_ledger(url).close()
        drop()


_buyers = iter(range(1000))


def new_buyer(ledger, fund: str = "5"):
    name = f"buyer-{next(_buyers)}"
    key = ledger.register(name)["api_key"]
    ledger.deposit(name, fund)
    return hf_escrow.connect(agent=name, database_url=ledger.url), key


def client_for(space: Space, token: str | None = None, **options):
    from gradio_client import Client
    return Client(space.url, headers={"X-Escrow-Token": token} if token else {}, verbose=False, **options)


def refused_everywhere(spaces: list[Space], headers: dict, message: str, *, api_name: str = "/chat") -> None:
    """Each Space refuses the call with `message`, before its model runs."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    for space in spaces:
        answered = space.answered()
        with pytest.raises(AppError) as refused:
            Client(space.url, headers=headers, verbose=False).predict("hello", api_name=api_name)
        assert message in str(refused.value)
        assert space.answered() == answered


def test_started_twice_on_one_ledger_both_serve_paid_calls(spaces, ledger):
    chat_a, chat_b, _ = spaces
    buyer, _ = new_buyer(ledger)
    e = buyer.create_escrow(SELLER, "0.002")
    for space in (chat_a, chat_b):
        answer, receipt = client_for(space, e.spend_token).predict("hello", api_name="/chat")
        assert isinstance(answer, str) and receipt["seller"] == SELLER and receipt["escrow_id"] == e.id
    assert buyer.get(e.id).remaining == 0
    assert "already registered" not in chat_a.log() + chat_b.log()
    assert e.spend_token not in chat_a.log() + chat_b.log()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_two_space_processes_on_one_escrow_never_admit_more_than_it_holds(backend, request):
    """Regression: each process trusted its own memory, so together they admitted (and computed) more."""
    from gradio_client.exceptions import AppError
    if backend == "sqlite":
        pair, ledger = request.getfixturevalue("spaces")[:2], request.getfixturevalue("ledger")
    else:
        pair, ledger = request.getfixturevalue("pg_pair")
    covered, asked = 6, 24
    buyer, _ = new_buyer(ledger)
    e = buyer.create_escrow(SELLER, str(PRICE * covered + Decimal("0.0005")))   # 6.5 answers
    seller = hf_escrow.connect(agent=SELLER, database_url=ledger.url)
    seller_before, answered = seller.me().balance, [s.answered() for s in pair]
    clients = [client_for(s, e.spend_token, max_workers=asked) for s in pair]
    jobs = [clients[i % 2].submit(f"caller {i}", api_name="/chat") for i in range(asked)]
    receipts, refused = [], 0
    for job in jobs:
        try:
            receipts.append(job.result(timeout=120)[1])
        except AppError as error:
            assert "USDC free" in str(error), error
            refused += 1
    after = buyer.get(e.id)
    computed = sum(s.answered() - before for s, before in zip(pair, answered))
    assert (len(receipts), refused) == (covered, asked - covered)
    assert computed == covered                                   # no answer computed that was not paid
    assert after.paid == PRICE * covered == sum(Decimal(r["charged_usdc"]) for r in receipts)
    assert after.held == 0 and after.remaining == Decimal("0.0005") and after.status == "active"
    assert seller.me().balance - seller_before == sum(Decimal(r["seller_net_usdc"]) for r in receipts)
    assert_audit_clean(ledger)


def test_a_funded_escrow_is_charged_exactly_the_price_per_call(spaces, ledger):
    chat = spaces[0]
    buyer, _ = new_buyer(ledger)
    e = buyer.create_escrow(SELLER, "0.005")
    seller_before = hf_escrow.connect(agent=SELLER, database_url=ledger.url).me().balance
    client = client_for(chat, e.spend_token)
    receipts = [client.predict(f"question {i}", api_name="/chat")[1] for i in range(3)]
    assert [r["charged_usdc"] for r in receipts] == ["0.001000"] * 3
    assert [r["remaining_usdc"] for r in receipts] == ["0.004000", "0.003000", "0.002000"]
    after = buyer.get(e.id)
    assert after.remaining == Decimal("0.002") and after.paid == Decimal("0.003")
    seller_after = hf_escrow.connect(agent=SELLER, database_url=ledger.url).me().balance
    assert seller_after - seller_before == sum(Decimal(r["seller_net_usdc"]) for r in receipts)
    assert_audit_clean(ledger)


def test_unfunded_closed_or_missing_tokens_are_refused_before_the_model_runs(spaces, ledger):
    chat_a, chat_b, _ = spaces
    buyer, _ = new_buyer(ledger)
    small = buyer.create_escrow(SELLER, "0.0005")
    closed = buyer.create_escrow(SELLER, "0.005")
    buyer.cancel(closed.id)
    before = snapshot(ledger)
    refused_everywhere([chat_a, chat_b], {}, "send the escrow's spend token in the X-Escrow-Token header")
    refused_everywhere([chat_a, chat_b], {"X-Escrow-Token": small.spend_token},
                       "may cost up to 0.001000 USDC; the escrow has 0.000500 USDC free")
    refused_everywhere([chat_a, chat_b], {"X-Escrow-Token": closed.spend_token}, "cancelled")
    refused_everywhere([chat_a, chat_b], {"X-Escrow-Token": "est_" + "0" * 43}, "unknown or was revoked")
    refused_everywhere([chat_a], {"X-Escrow-Id": small.id}, "X-Escrow-Token")   # the old header pays nothing
    assert snapshot(ledger) == before


def test_a_buyer_api_key_is_refused(spaces, ledger):
    """Regression: the Space asked for the buyer's account-wide key, which lets a seller spend it all."""
    from gradio_client.exceptions import AppError
    chat_a, chat_b, embeddings = spaces
    buyer, key = new_buyer(ledger)
    e = buyer.create_escrow(SELLER, "0.005")
    before = snapshot(ledger)
    for headers in ({"X-Escrow-Token": key}, {"Authorization": f"Bearer {key}"},
                    {"X-Escrow-Id": e.id, "Authorization": f"Bearer {key}"}):
        refused_everywhere([chat_a, chat_b], headers, "that is a buyer API key: never send it to a seller")
    refused_everywhere([embeddings], {"Authorization": f"Bearer {key}"}, "that is a buyer API key",
                       api_name="/embed")
    answered = chat_a.answered()
    with pytest.raises(AppError, match="buyer API key"):                          # typed into the field
        client_for(chat_a).predict("hello", key, api_name="/chat")
    assert chat_a.answered() == answered and snapshot(ledger) == before


def test_a_token_cannot_be_used_for_another_sellers_space(spaces, ledger):
    chat_a, chat_b, embeddings = spaces
    buyer, _ = new_buyer(ledger)
    for_embeddings = buyer.create_escrow("paid-embeddings", "0.005")
    for_chat = buyer.create_escrow(SELLER, "0.005")
    before = snapshot(ledger)
    refused_everywhere([chat_a, chat_b], {"X-Escrow-Token": for_embeddings.spend_token}, "pays another seller")
    refused_everywhere([embeddings], {"X-Escrow-Token": for_chat.spend_token}, "pays another seller",
                       api_name="/embed")
    assert snapshot(ledger) == before and buyer.holds(for_chat.id) == []


def test_revoke_or_cancel_stops_the_next_call_at_once_in_every_process(spaces, ledger):
    """Regression: a checked key was trusted for 30 s, so calls went on after a cancel."""
    chat_a, chat_b, _ = spaces
    buyer, _ = new_buyer(ledger)
    e = buyer.create_escrow(SELLER, "0.010")
    for space in (chat_a, chat_b):
        client_for(space, e.spend_token).predict("first", api_name="/chat")
    buyer.revoke_spend_tokens(e.id)
    refused_everywhere([chat_a, chat_b], {"X-Escrow-Token": e.spend_token}, "unknown or was revoked")
    fresh = buyer.mint_spend_token(e.id)
    client_for(chat_b, fresh).predict("again", api_name="/chat")
    buyer.cancel(e.id)
    refused_everywhere([chat_a, chat_b], {"X-Escrow-Token": fresh}, "cancelled")
    after = buyer.get(e.id)
    assert after.paid == 3 * PRICE and after.refunded == after.amount - after.paid
    assert_audit_clean(ledger)


def test_a_handler_error_costs_nothing(spaces, ledger):
    from gradio_client.exceptions import AppError
    chat = spaces[0]
    buyer, _ = new_buyer(ledger)
    e = buyer.create_escrow(SELLER, "0.001")
    before = snapshot(ledger)
    client = client_for(chat, e.spend_token)
    for bad in ("", "x" * 2001):
        with pytest.raises(AppError, match=r"\(not charged\)"):
            client.predict(bad, api_name="/chat")
    assert snapshot(ledger) == before and buyer.holds(e.id) == []
    assert client.predict("now a real question", api_name="/chat")[1]["remaining_usdc"] == "0.000000"


def test_64_concurrent_callers_against_an_escrow_for_n_calls(spaces, ledger):
    from gradio_client.exceptions import AppError
    chat = spaces[0]
    calls = 10
    buyer, _ = new_buyer(ledger)
    e = buyer.create_escrow(SELLER, str(PRICE * calls))
    client = client_for(chat, e.spend_token, max_workers=64)
    answered = chat.answered()
    jobs = [client.submit(f"caller {i}", api_name="/chat") for i in range(64)]
    succeeded, refused = 0, 0
    for job in jobs:
        try:
            job.result(timeout=120)
            succeeded += 1
        except AppError as error:
            assert "USDC free" in str(error), error
            refused += 1
    assert (succeeded, refused) == (calls, 64 - calls)
    after = buyer.get(e.id)
    assert after.remaining == 0 and after.paid == PRICE * calls and after.refunded == 0 and after.held == 0
    assert chat.answered() - answered == calls
    assert_audit_clean(ledger)


def test_embeddings_space_bills_per_vector(spaces, ledger):
    from gradio_client.exceptions import AppError
    embeddings = spaces[2]
    buyer, _ = new_buyer(ledger)
    e = buyer.create_escrow("paid-embeddings", "0.0005")
    client = client_for(embeddings, e.spend_token)
    result, receipt = client.predict("an escrow pays the seller\nthe buyer gets the rest\nhello", api_name="/embed")
    assert result["count"] == 3 and result["dim"] == 384 and len(result["vectors"]) == 3
    norms = [sum(x * x for x in v) for v in result["vectors"]]
    assert all(abs(n - 1) < 1e-4 for n in norms)
    assert receipt["charged_usdc"] == "0.000300" and receipt["remaining_usdc"] == "0.000200"
    with pytest.raises(AppError, match="may cost up to 0.000300 USDC; the escrow has 0.000200 USDC free"):
        client.predict("one\ntwo\nthree", api_name="/embed")
    assert buyer.get(e.id).paid == Decimal("0.0003")


@pytest.mark.browser
def test_a_person_pays_in_the_browser(spaces, ledger):
    from .browser import ARTIFACTS, chromium_page
    chat = spaces[0]
    buyer, _ = new_buyer(ledger)
    e = buyer.create_escrow(SELLER, "0.005")
    with chromium_page() as page:
        page.goto(chat.url, wait_until="domcontentloaded")
        page.get_by_text("Every answer costs").wait_for(timeout=30_000)
        assert page.get_by_label("Price").input_value() == "0.001000 USDC per answer"
        page.get_by_label("Spend token").fill(e.spend_token)
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
        assert e.spend_token not in page.inner_text("body")                    # a password field
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "space-paid-chat.png"), full_page=True)
        assert buyer.get(e.id).remaining == Decimal("0.004")

        page.get_by_role("button", name="Get a test escrow (embedded ledger)").click()   # a visitor with nothing
        page.wait_for_function("el => el.value === '0.010000 USDC'", arg=balance.element_handle(), timeout=20_000)
        assert page.get_by_label("Spend token").input_value().startswith("est_")
        message.fill("hello again")
        message.press("Enter")
        page.wait_for_function("el => el.value === '0.009000 USDC'", arg=balance.element_handle(), timeout=30_000)
    assert_audit_clean(ledger)


def test_the_test_escrow_button_is_off_unless_the_owner_turns_it_on(spaces):
    """It mints test money, and a private event is still callable by a script: chat-b and the
    embeddings Space were not told HF_ESCROW_SPACE_TRIAL=1, chat-a was."""
    configs = [json.dumps(httpx.get(f"{space.url}/config", timeout=30).json()) for space in spaces]
    assert ["Get a test escrow" in config for config in configs] == [True, False, False]


def test_test_escrows_are_limited_per_client_and_in_all():
    from hf_escrow import RateLimited
    from hf_escrow.limits import WindowLimiter
    now = [0.0]
    limiter = WindowLimiter("test escrows", per_client=3, overall=5, window_s=3600, clock=lambda: now[0])
    for _ in range(3):
        limiter.take("10.0.0.1")
    with pytest.raises(RateLimited) as refused:
        limiter.take("10.0.0.1")
    assert refused.value.details["retry_after_s"] == 3600
    limiter.take("10.0.0.2")
    limiter.take("10.0.0.3")
    with pytest.raises(RateLimited, match="5 test escrows from all clients"):
        limiter.take("10.0.0.4")
    now[0] = 3601
    limiter.take("10.0.0.1")


def test_both_templates_publish_their_offer_and_autopay_pays_them(spaces, ledger):
    """`/.well-known/hf-escrow` on each template; an agent with AutoPay and no escrow gets its answers."""
    from hf_escrow import challenge
    chat_a, chat_b, embeddings = spaces
    chat_doc = httpx.get(chat_a.url + "/.well-known/hf-escrow").json()
    assert chat_doc["seller"] == SELLER and chat_doc["pricing"] == {"per_call": "0.001000"}
    assert chat_doc["escrow_server"] == httpx.get(chat_b.url + "/.well-known/hf-escrow").json()["escrow_server"]
    embed_doc = httpx.get(embeddings.url + "/.well-known/hf-escrow").json()
    assert embed_doc["seller"] == "paid-embeddings" and embed_doc["pricing"] == {"per_vector": "0.0001"}
    buyer, _ = new_buyer(ledger)
    assert challenge.server_id(buyer) == chat_doc["escrow_server"]
    start = buyer.me().balance
    with hf_escrow.AutoPay(buyer, budget="0.01", sellers=[SELLER, "paid-embeddings"], calls_per_escrow=3) as pay:
        for space in (chat_a, chat_b):
            answer, receipt = pay.gradio_client(space.url, verbose=False).predict("hello", api_name="/chat")
            assert answer and Decimal(receipt["charged_usdc"]) == PRICE
        result, _ = pay.gradio_client(embeddings.url, verbose=False).predict("one\ntwo", api_name="/embed")
        assert result["count"] == 2
        escrows = [buyer.get(i) for i in pay.escrow_ids]
    assert [e.seller for e in escrows] == [SELLER, "paid-embeddings"]       # one escrow per seller, reused
    assert buyer.me().balance == start - 2 * PRICE - Decimal("0.0002")      # exactly the listed prices
    assert all(buyer.get(e.id).status == "cancelled" for e in escrows)
