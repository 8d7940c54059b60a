"""One client contract, four ways: embedded sync, embedded async, HTTP sync, HTTP async.

The same scenario (agents with a referrer, faucet, create with referral, deduct, release by
usage x price_per_token, cancel, a benchmark escrow with a named verifier, history,
analytics, and the error tree) runs with each client and must give the same Decimal
amounts, statuses and exception classes. Then the HTTP client's retries: a proxy that
fails the first attempt makes the client retry with the same Idempotency-Key, and money
moves once; a closed port gives TransportError after a bounded number of tries.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import socketserver
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest

import hf_escrow
from hf_escrow import (
    EscrowError, Forbidden, IdempotencyConflict, InsufficientFunds, InvalidAmount, NotFound, RateLimited,
    StateConflict, TransportError, Unauthorized, ValidationError,
)
from hf_escrow.ledger import Ledger
from hf_escrow.server import create_app

from .helpers import assert_audit_clean, snapshot
from .liveserver import free_port, serve_app

MODES = ["embedded-sync", "embedded-async", "http-sync", "http-async"]
D = Decimal


async def call(fn, *args, **kwargs):
    """Call a client method of either flavour; sync errors and async errors surface alike."""
    result = fn(*args, **kwargs)
    if inspect.isawaitable(result):
        result = await result
    return result


async def refused(exc_class: type, fn, *args, **kwargs) -> EscrowError:
    try:
        await call(fn, *args, **kwargs)
    except EscrowError as error:
        assert type(error) is exc_class, (fn.__name__, args, kwargs, type(error), error)
        assert error.message
        return error
    raise AssertionError(f"{fn.__name__}{args} did not raise {exc_class.__name__}")


class Mode:
    """Clients of one flavour on a fresh ledger (a live server for the HTTP ones)."""

    def __init__(self, mode: str, tmp: Path):
        self.mode = mode
        self.url = f"sqlite:///{tmp / 'ledger.db'}"
        self.clients = []
        self._server = None
        self.base = None
        if mode.startswith("http"):
            self.ledger = Ledger(self.url)
            self._server = serve_app(create_app(self.ledger, sweep_interval_s=0, mcp=False))
            self.base = self._server.__enter__()
        else:
            from hf_escrow.client import embedded_ledger
            self.ledger = embedded_ledger(self.url)

    def client(self, agent: str | None = None, api_key: str | None = None):
        is_async = self.mode.endswith("async")
        connect = hf_escrow.connect_async if is_async else hf_escrow.connect
        if self.base:
            client = connect(self.base, api_key=api_key, max_retries=0)
        else:
            client = connect(agent=agent, database_url=self.url)
        self.clients.append(client)
        return client

    async def close(self) -> None:
        for client in self.clients:
            await call(client.aclose if hasattr(client, "aclose") else client.close)
        if self._server is not None:
            self._server.__exit__(None, None, None)
            self.ledger.close()


def receipt_facts(r) -> tuple:
    assert isinstance(r, hf_escrow.Receipt)
    return (r.kind, r.status, r.remaining, r.gross, r.base, r.bonus, r.net, r.fee, r.referral, r.refunded,
            r.rounded_from, r.passed, r.score, escrow_facts(r.escrow))


def escrow_facts(e) -> tuple:
    assert isinstance(e, hf_escrow.Escrow)
    assert e.amount == e.paid + e.refunded + e.held + e.remaining
    for value in (e.amount, e.remaining, e.paid, e.fees, e.referral, e.refunded, e.bonus, e.held):
        assert isinstance(value, Decimal) and value == value.quantize(D("0.000001")), value
    result = {k: v for k, v in (e.result or {}).items() if k != "submitted_at_ms"}
    return (e.buyer, e.seller, e.status, e.amount, e.remaining, e.paid, e.fees, e.referral, e.refunded, e.bonus, e.held,
            e.tokens_in, e.tokens_out, e.model, e.description, e.meta, e.verifier, e.referrer, e.release_condition,
            e.bonus_conditions, e.pricing, result, (e.expires_at - e.created_at).total_seconds(),
            e.closed_at is None, [(ev.kind, ev.actor) for ev in e.events])


TRANSCRIPTS: dict[str, list] = {}


async def scenario(m: Mode) -> list:
    """The whole contract; returns a transcript of everything observable but ids and times."""
    t: list = []
    note = t.append
    # ---- agents -------------------------------------------------------------------------
    referrer, buyer, seller, verifier = (m.client("referrer"), m.client("buyer"), m.client("seller"),
                                         m.client("verifier"))
    ref = await call(referrer.register, "referrer")
    assert ref.agent_id == "referrer" and ref.api_key.startswith("hfe_") and ref.referral_code
    b = await call(buyer.register, "buyer")
    s = await call(seller.register, "seller")
    v = await call(verifier.register, "verifier")
    note([(a.agent_id, a.referred_by, bool(a.wallet.startswith("0x"))) for a in (ref, b, s, v)])
    await refused(StateConflict, m.client("x").register, "buyer")  # taken
    await refused(ValidationError, m.client("x").register, "no spaces allowed")

    # ---- faucet ---------------------------------------------------------------------------
    credited = await call(buyer.claim_faucet)
    assert credited == D("10.000000") and isinstance(credited, Decimal)
    await refused(RateLimited, buyer.claim_faucet)
    me = await call(buyer.me)
    assert (me.agent_id, me.balance, me.escrows_open) == ("buyer", D("10.000000"), 0)
    note((credited, me.balance, me.referral_code == b.referral_code))

    # ---- create with referral, deduct, release by usage x price -----------------------------
    e1 = await call(buyer.create_escrow, "seller", "2.5", ttl_seconds=600, description="chat",
                    meta={"model": "gemma-3-270m", "prompt_tokens": 100}, referral_code=ref.referral_code)
    assert (e1.status, e1.amount, e1.remaining, e1.paid, e1.referrer) == ("active", D("2.5"), D("2.5"), 0, "referrer")
    note(escrow_facts(e1))
    r = await call(seller.deduct, e1.id, "0.1", reason="first tokens")
    assert (r.kind, r.status, r.gross, r.net, r.fee, r.referral, r.remaining) == (
        "deduct", "active", D("0.1"), D("0.099"), D("0.001"), D("0.00015"), D("2.4"))
    note(receipt_facts(r))
    r = await call(buyer.release, e1.id, usage={"prompt_tokens": 100, "completion_tokens": 400},
                   price_per_token="0.0005", meta={"note": "done"})
    assert (r.kind, r.status, r.base, r.bonus, r.gross, r.net, r.fee, r.referral, r.refunded, r.remaining) == (
        "release", "released", D("0.25"), 0, D("0.25"), D("0.2475"), D("0.0025"), D("0.000375"), D("2.15"), 0)
    assert (r.escrow.paid, r.escrow.fees, r.escrow.referral, r.escrow.tokens_in, r.escrow.tokens_out) == (
        D("0.35"), D("0.0035"), D("0.000525"), 100, 400)
    note(receipt_facts(r))

    # ---- cancel (by the buyer, and by the seller) ----------------------------------------------
    e2 = await call(buyer.create_escrow, "seller", "1")
    r = await call(buyer.cancel, e2.id, reason="changed my mind")
    assert (r.kind, r.status, r.refunded, r.gross, r.remaining) == ("cancel", "cancelled", D("1"), 0, 0)
    note(receipt_facts(r))
    e3 = await call(buyer.create_escrow, "seller", "0.75")
    r = await call(seller.cancel, e3.id)
    assert (r.status, r.refunded) == ("cancelled", D("0.75"))
    note(receipt_facts(r))

    # ---- benchmark with a named verifier ----------------------------------------------------------
    condition = {"type": "benchmark", "metric": "accuracy", "threshold": 0.85, "verifier": "verifier"}
    e4 = await call(buyer.create_escrow, "seller", "3", release_condition=condition)
    assert e4.verifier == "verifier" and e4.release_condition["threshold"] == 0.85
    artifact = {"repo": "org/lora", "revision": "abc123", "sha256": "0" * 64}
    r = await call(seller.submit_result, e4.id, metric="accuracy", score=0.91, artifact=artifact)
    assert (r.status, r.gross) == ("awaiting_verification", 0)
    note(receipt_facts(r))
    await refused(Forbidden, buyer.verify, e4.id, score=0.99)
    await refused(Forbidden, seller.verify, e4.id, score=0.99)
    r = await call(verifier.verify, e4.id, score=0.80)
    assert (r.status, r.passed, r.gross) == ("active", False, 0)
    note(receipt_facts(r))
    await call(seller.submit_result, e4.id, metric="accuracy", score=0.93, artifact=artifact)
    r = await call(verifier.verify, e4.id, score=0.9)
    assert (r.status, r.passed, r.gross, r.net, r.fee, r.referral, r.refunded) == (
        "released", True, D("3"), D("2.97"), D("0.03"), 0, 0)
    note(receipt_facts(r))
    seen_by_verifier = await call(verifier.get, e4.id)
    assert seen_by_verifier.status == "released" and seen_by_verifier.result["score"] == 0.93
    note(escrow_facts(seen_by_verifier))

    # ---- balances -------------------------------------------------------------------------------------
    balances = {name: (await call(c.me)).balance for name, c in
                (("buyer", buyer), ("seller", seller), ("referrer", referrer), ("verifier", verifier))}
    assert balances == {"buyer": D("6.65"), "seller": D("3.3165"), "referrer": D("0.000525"), "verifier": 0}
    note(balances)

    # ---- history and analytics -------------------------------------------------------------------------
    history = await call(buyer.history)
    assert [e.id for e in history] == [e4.id, e3.id, e2.id, e1.id]
    assert [e.status for e in history] == ["released", "cancelled", "cancelled", "released"]
    note([escrow_facts(e)[:12] for e in history])
    released = await call(buyer.history, status="released", limit=10)
    assert [e.id for e in released] == [e4.id, e1.id]
    assert [e.id for e in await call(buyer.history, limit=1)] == [e4.id]
    assert [e.id for e in await call(seller.history, role="seller", model="gemma-3-270m")] == [e1.id]
    assert await call(referrer.history) == [] and await call(verifier.history) == []
    one = await call(buyer.get, e1.id)
    assert [ev.kind for ev in one.events] == ["created", "deducted", "released"]
    note(escrow_facts(one))
    spend = await call(buyer.analytics)
    by_model = {row["model"]: row for row in spend["spend"]}
    assert by_model["gemma-3-270m"]["paid"] == D("0.35") and by_model["gemma-3-270m"]["tokens_out"] == 400
    assert by_model[None]["paid"] == D("3") and by_model[None]["escrows"] == 3
    assert (await call(referrer.analytics))["referral_earned"] == D("0.000525")
    note(spend)
    note(await call(seller.analytics))

    # ---- the error tree -----------------------------------------------------------------------------------
    e5 = await call(buyer.create_escrow, "seller", "1", ttl_seconds=600)
    await refused(InsufficientFunds, buyer.create_escrow, "seller", "1000")
    await refused(InsufficientFunds, seller.deduct, e5.id, "1.000001")
    await refused(InsufficientFunds, buyer.release, e5.id, "2")
    await refused(Forbidden, buyer.deduct, e5.id, "0.01")
    await refused(Forbidden, seller.release, e5.id)
    await refused(Forbidden, buyer.submit_result, e5.id, metric="accuracy", score=0.9)
    await refused(NotFound, referrer.get, e5.id)
    await refused(NotFound, referrer.cancel, e5.id)
    await refused(NotFound, buyer.get, "esc_does_not_exist")
    await refused(NotFound, buyer.create_escrow, "nobody-here", "1")
    await refused(StateConflict, buyer.release, e1.id)
    await refused(StateConflict, buyer.cancel, e2.id)
    await refused(StateConflict, seller.submit_result, e5.id, metric="accuracy", score=0.9)  # not a benchmark
    first = await call(seller.deduct, e5.id, "0.01", idempotency_key="contract-k1")
    again = await call(seller.deduct, e5.id, "0.01", idempotency_key="contract-k1")
    assert receipt_facts(first) == receipt_facts(again) and again.remaining == D("0.99")
    await refused(IdempotencyConflict, seller.deduct, e5.id, "0.02", idempotency_key="contract-k1")
    for bad in ("-1", "NaN", "Infinity", "abc", "0.0000001", "1e300", [1], {"usdc": 1}, -0.5):
        await refused(InvalidAmount, buyer.create_escrow, "seller", bad)
        await refused(InvalidAmount, seller.deduct, e5.id, bad)
    await refused(ValidationError, buyer.create_escrow, "buyer", "1")  # to oneself
    await refused(ValidationError, buyer.create_escrow, "seller", "1", ttl_seconds=-1)
    await refused(ValidationError, buyer.release, e5.id, usage={"prompt_tokens": 1, "completion_tokens": 1})
    ghost = m.client("ghost", api_key="hfe_not-a-key") if m.base else m.client("ghost")
    await refused(Unauthorized, ghost.me)
    await refused(Unauthorized, ghost.create_escrow, "seller", "1")
    r = await call(seller.deduct, e5.id, "0.0000015")
    assert (r.gross, r.rounded_from) == (D("0.000002"), "0.0000015")
    note(receipt_facts(r))
    view = await call(buyer.get, e5.id)
    assert (view.status, view.paid, view.remaining) == ("active", D("0.010002"), D("0.989998"))
    note(escrow_facts(view))
    assert (await call(buyer.me)).escrows_open == 1
    return t


@pytest.mark.parametrize("mode", MODES)
def test_the_same_contract_from_every_client(mode, tmp_path):
    async def run():
        m = Mode(mode, tmp_path)
        try:
            transcript = await scenario(m)
        finally:
            await m.close()
        return m, transcript

    m, transcript = asyncio.run(run())
    ledger = Ledger(m.url)
    assert_audit_clean(ledger)
    ledger.close()
    TRANSCRIPTS[mode] = transcript


def test_all_four_clients_told_the_same_story():
    missing = [mode for mode in MODES if mode not in TRANSCRIPTS]
    if missing:
        pytest.skip(f"not run in this session: {missing}")
    reference = TRANSCRIPTS[MODES[0]]
    for mode in MODES[1:]:
        for i, (a, b) in enumerate(zip(reference, TRANSCRIPTS[mode])):
            assert a == b, (mode, i, a, b)
        assert len(reference) == len(TRANSCRIPTS[mode])


# ---- amounts the HTTP client cannot send as they are ------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bad", [True, None, float("nan"), float("inf"), -float("inf")], ids=repr)
def test_non_amounts_raise_invalid_amount_from_every_client(mode, bad, tmp_path):

    async def run():
        m = Mode(mode, tmp_path)
        try:
            buyer, seller = m.client("buyer"), m.client("seller")
            await call(buyer.register, "buyer")
            await call(seller.register, "seller")
            await call(buyer.claim_faucet)
            escrow = await call(buyer.create_escrow, "seller", "1")
            before = snapshot(m.ledger)
            for fn, args in ((buyer.create_escrow, ("seller", bad)), (seller.deduct, (escrow.id, bad))):
                try:
                    await call(fn, *args)
                except Exception as error:  # noqa: BLE001 - the class is the point
                    assert type(error) is InvalidAmount, (fn.__name__, type(error), error)
                else:
                    raise AssertionError(f"{fn.__name__} accepted {bad!r}")
            assert snapshot(m.ledger) == before
        finally:
            await m.close()

    asyncio.run(run())


@pytest.mark.parametrize("mode", MODES)
def test_release_with_the_buyers_own_hold_from_every_client(mode, tmp_path):
    """The hold is freed and the release paid in one step; another's, a closed or a malformed hold is refused alike."""

    async def run():
        m = Mode(mode, tmp_path)
        try:
            buyer, seller = m.client("buyer"), m.client("seller")
            await call(buyer.register, "buyer")
            await call(seller.register, "seller")
            await call(buyer.claim_faucet)
            e, elsewhere = await call(buyer.create_escrow, "seller", "1"), await call(buyer.create_escrow, "seller", "1")
            mine = await call(buyer.hold, e.id, "0.4", ttl_seconds=60)
            sellers = await call(seller.hold, e.spend_token, "0.1")
            other = await call(buyer.hold, elsewhere.id, "0.1")
            before = snapshot(m.ledger)
            for error, hold_id in ((Forbidden, sellers.id), (NotFound, other.id), (ValidationError, "x" * 41)):
                await refused(error, buyer.release, e.id, "0.2", refund_remainder=False, hold_id=hold_id)
            assert snapshot(m.ledger) == before
            r = await call(buyer.release, e.id, "0.2", refund_remainder=False, hold_id=mine.id, idempotency_key="k1")
            assert (r.gross, r.hold.status, r.escrow.held, r.remaining) == (D("0.2"), "voided", D("0.1"), D("0.7"))
            again = await call(buyer.release, e.id, "0.2", refund_remainder=False, hold_id=mine.id,
                               idempotency_key="k1")
            assert (again.gross, again.escrow.paid) == (D("0.2"), D("0.2"))
            await refused(StateConflict, buyer.release, e.id, "0.2", refund_remainder=False, hold_id=mine.id)
        finally:
            await m.close()

    asyncio.run(run())
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    assert_audit_clean(ledger)
    ledger.close()


# ---- retries of the HTTP client ------------------------------------------------------------------------------------


class FlakyProxy:
    """A TCP proxy in front of the escrow server that spoils attempts on purpose.

    `plan` is consumed one action per request: "pass" forwards; "503-after" forwards, then
    answers 503 (the server did the work, the answer was lost); "503" answers 503 without
    forwarding; "drop-after" forwards, then closes the connection without a word.
    Every request's method, path and Idempotency-Key is recorded.
    """

    def __init__(self, upstream_port: int, plan: list[str]):
        self.upstream_port, self.plan, self.seen = upstream_port, list(plan), []
        self.lock = threading.Lock()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                self.request.settimeout(10)
                raw = proxy._read_request(self.request)
                if raw is None:
                    return
                head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
                headers = {line.split(":", 1)[0].strip().lower(): line.split(":", 1)[1].strip()
                           for line in head[1:] if ":" in line}
                with proxy.lock:
                    action = proxy.plan.pop(0) if proxy.plan else "pass"
                    proxy.seen.append((head[0].split(" ")[0], head[0].split(" ")[1],
                                       headers.get("idempotency-key"), action))
                if action == "503":
                    self.request.sendall(_canned(503))
                    return
                answer = proxy._forward(raw)
                if action == "503-after":
                    self.request.sendall(_canned(503))
                elif action == "drop-after":
                    self.request.shutdown(socket.SHUT_RDWR)
                else:
                    self.request.sendall(answer)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "FlakyProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    @staticmethod
    def _read_request(sock: socket.socket) -> bytes | None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")]
        return b"\r\n".join(lines + [b"Connection: close"]) + b"\r\n\r\n" + body

    def _forward(self, raw: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10) as upstream:
            upstream.sendall(raw)
            chunks = []
            while True:
                chunk = upstream.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks)


def _canned(status: int) -> bytes:
    body = b'{"error": "unavailable", "message": "try again"}'
    return (f"HTTP/1.1 {status} Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


@pytest.fixture
def market(tmp_path):
    """A live server with a funded buyer, a seller and an open escrow."""
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    keys = {name: ledger.register(name)["api_key"] for name in ("buyer", "seller", "late")}
    ledger.deposit("buyer", "10")
    escrow_id = ledger.create_escrow("buyer", "seller", "5")["id"]
    port = free_port()
    with serve_app(create_app(ledger, sweep_interval_s=0, mcp=False), port=port):
        yield ledger, keys, escrow_id, port
    assert_audit_clean(ledger)
    ledger.close()


def _deducts(ledger: Ledger, escrow_id: str) -> list:
    return [e for e in ledger.get("buyer", escrow_id)["events"] if e["kind"] == "deducted"]


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize("plan", [["503-after"], ["503"], ["503-after", "503-after"], ["503", "503-after"]])
def test_retry_after_503_reuses_the_key_and_moves_money_once(market, flavour, plan):
    ledger, keys, escrow_id, port = market
    with FlakyProxy(port, plan) as proxy:
        if flavour == "sync":
            with hf_escrow.connect(proxy.url, api_key=keys["seller"], max_retries=3) as seller:
                receipt = seller.deduct(escrow_id, "0.25")
        else:
            async def run():
                async with hf_escrow.connect_async(proxy.url, api_key=keys["seller"], max_retries=3) as client:
                    return await client.deduct(escrow_id, "0.25")
            receipt = asyncio.run(run())
    assert receipt.gross == D("0.25") and receipt.remaining == D("4.75")
    attempts = [s for s in proxy.seen if s[1].endswith("/deduct")]
    assert len(attempts) == len(plan) + 1, proxy.seen
    keys_sent = {key for _, _, key, _ in attempts}
    assert len(keys_sent) == 1 and None not in keys_sent, attempts  # one key, generated by the client
    assert len(_deducts(ledger, escrow_id)) == 1
    assert ledger.get("buyer", escrow_id)["paid_micro"] == 250_000


@pytest.mark.parametrize("plan", [["503-after"], ["drop-after"], ["503", "503-after"]])
def test_retried_hold_and_capture_reserve_and_pay_once(market, plan):
    """A hold, a capture and a batch whose answers were lost: resent under one key, each moves money once."""
    ledger, keys, escrow_id, port = market
    lost_then_answered = plan + ["pass"]
    with FlakyProxy(port, lost_then_answered * 3) as proxy:  # hold, capture, batch: each answer lost, then given
        with hf_escrow.connect(proxy.url, api_key=keys["seller"], max_retries=3) as seller:
            token = ledger.mint_spend_token("buyer", escrow_id)["spend_token"]
            h = seller.hold(token, "1")
            receipt = seller.capture(h.id, "0.25")
            results = seller.capture_many([(h.id, "0.5", True)])
    assert (h.amount, receipt.gross, receipt.hold.open, results[0].receipt.gross) == (D("1"), D("0.25"), D("0.75"),
                                                                                     D("0.5"))
    for path in ("/api/holds", f"/api/holds/{h.id}/capture", "/api/holds/capture"):
        attempts = [s for s in proxy.seen if s[1] == path]
        assert len(attempts) == len(plan) + 1 and len({key for _, _, key, _ in attempts}) == 1, proxy.seen
    escrow = ledger.get("buyer", escrow_id)
    assert (escrow["paid_micro"], escrow["held_micro"], escrow["remaining_micro"]) == (750_000, 0, 4_250_000)
    assert [e["kind"] for e in escrow["events"]].count("hold_closed") == 1


def test_retry_keeps_the_callers_own_key_and_a_faucet_claim_counts_once(market):
    ledger, keys, escrow_id, port = market
    with FlakyProxy(port, ["pass", "503-after", "503-after"]) as proxy:  # /api/me, then /claim twice
        with hf_escrow.connect(proxy.url, api_key=keys["late"], max_retries=3) as late:
            assert late.claim_faucet(idempotency_key="my-claim-1") == D("10")
    claims = [s for s in proxy.seen if s[1] == "/claim"]
    assert [key for _, _, key, _ in claims] == ["my-claim-1"] * 3, proxy.seen
    assert ledger.me("late")["balance_micro"] == 10_000_000


def test_retry_after_a_dropped_connection_moves_money_once(market):
    """The server did the work, then the connection died before the answer: the client
    (per its docstring: retries after connection errors) must resend under the same key."""
    ledger, keys, escrow_id, port = market
    with FlakyProxy(port, ["drop-after"]) as proxy:
        with hf_escrow.connect(proxy.url, api_key=keys["seller"], max_retries=3) as seller:
            try:
                receipt = seller.deduct(escrow_id, "0.25")
            except TransportError as error:
                receipt = error
    # The money moved exactly once, and the client got the stored receipt on its retry.
    assert not isinstance(receipt, TransportError), receipt
    assert len(_deducts(ledger, escrow_id)) == 1
    assert ledger.get("buyer", escrow_id)["paid_micro"] == 250_000
    attempts = [s for s in proxy.seen if s[1].endswith("/deduct")]
    assert receipt.gross == D("0.25") and len(attempts) == 2
    assert attempts[0][2] == attempts[1][2]


def test_register_is_not_retried_after_a_503(market):
    """Registering is not idempotent (a fresh key each time): only connection failures are retried."""
    ledger, keys, escrow_id, port = market
    with FlakyProxy(port, ["503"]) as proxy:
        with hf_escrow.connect(proxy.url, max_retries=3) as client:
            with pytest.raises(EscrowError) as info:
                client.register("newcomer")
    assert info.value.response is not None and info.value.response.status_code == 503
    assert len(proxy.seen) == 1


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_closed_port_gives_transport_error_after_bounded_retries(flavour):
    port = free_port()  # bound and released at once: nothing listens there
    started = time.monotonic()
    with pytest.raises(TransportError) as info:
        if flavour == "sync":
            with hf_escrow.connect(f"http://127.0.0.1:{port}", api_key="hfe_x", max_retries=2, timeout=2) as c:
                c.deduct("esc_x", "0.1")
        else:
            async def run():
                async with hf_escrow.connect_async(f"http://127.0.0.1:{port}", api_key="hfe_x", max_retries=2,
                                                   timeout=2) as c:
                    await c.deduct("esc_x", "0.1")
            asyncio.run(run())
    elapsed = time.monotonic() - started
    assert elapsed < 10, elapsed
    assert "3 tries" in str(info.value) and f"127.0.0.1:{port}" in str(info.value)
    assert isinstance(info.value, EscrowError)


def test_max_retries_is_bounded_even_when_asked_for_more():
    port = free_port()
    started = time.monotonic()
    client = hf_escrow.connect(f"http://127.0.0.1:{port}", api_key="hfe_x", max_retries=1000, timeout=1)
    assert client._transport.max_retries <= 10
    client.close()
    assert time.monotonic() - started < 5
