"""`connect()` and `connect_async()`: one escrow interface, embedded or over HTTP.

The methods are written once, in `_ClientCore`, with no I/O: each names its operation in
`hf_escrow.operations` and hands its arguments to `_call`. `EscrowClient._call` returns
the parsed result; `AsyncEscrowClient` is generated from the core, one `async def` per
method with the same signature, whose `_call` is awaited. A transport turns
``(operation, params)`` into the ledger's dict: the embedded one calls the ledger
in-process, the HTTP one (`hf_escrow.http_client`) calls a server; both are derived from
the operation table, so both clients return the same objects and raise the same errors.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

from ._exceptions import Unauthorized
from ._models import Agent, BudgetedKey, CaptureResult, Escrow, Hold, Me, Receipt
from .ledger import Ledger
from .operations import OPERATIONS, Operation

Amount = str | int | Decimal | float


class _ClientCore:
    """Every escrow operation, written once for both clients and free of I/O: each method
    checks and shapes its arguments, then returns ``self._call(operation, locals())``."""

    agent: str | None

    def _call(self, op: str, args: dict) -> Any:
        raise NotImplementedError

    def register(self, agent_id: str | None = None, referral_code: str | None = None) -> Agent:
        """Register an agent; its API key is in the result, shown only this once.

        Example:
            >>> esc = hf_escrow.connect(agent="buyer-1")
            >>> esc.register().agent_id
            'buyer-1'
        """
        agent_id = agent_id or self.agent
        return self._call("register", locals())

    def claim_faucet(self, idempotency_key: str | None = None) -> Decimal:
        """Claim free test USDC; returns the amount credited."""
        return self._call("claim_faucet", locals())

    def me(self) -> Me:
        """This agent's balance, referral code and number of open escrows."""
        return self._call("me", locals())

    def rotate_key(self) -> str:
        """A new API key for this agent, returned only this once; the old key stops working at
        once. Over HTTP this client goes on with the new key.

        Example:
            >>> new_key = esc.rotate_key()
            >>> new_key.startswith("hfe_")
            True
        """
        return self._call("rotate_key", locals())

    def create_escrow(self, seller: str, amount: Amount, ttl_seconds: float = 3600, description: str | None = None,
                      meta: dict | None = None, release_condition: dict | None = None,
                      bonus_conditions: dict | None = None, referral_code: str | None = None,
                      idempotency_key: str | None = None, *, pricing: Any = None) -> Escrow:
        """As the buyer: lock `amount` USDC for `seller` until released, cancelled or expired.

        Example:
            >>> e = esc.create_escrow("seller-1", "1.50", ttl_seconds=600, meta={"model": "gemma-3-270m"})
            >>> e.status, e.remaining
            ('active', Decimal('1.500000'))
        """
        pricing = _pricing_dict(pricing)
        return self._call("create_escrow", locals())

    def deduct(self, escrow_id: str, amount: Amount, reason: str | None = None, idempotency_key: str | None = None,
               *, usage: dict | None = None) -> Receipt:
        """As the seller: take `amount` out of the remainder for work delivered (fee applies)."""
        return self._call("deduct", locals())

    def deduct_many(self, items: list, idempotency_key: str | None = None) -> list[CaptureResult]:
        """As the seller: many deducts in one transaction; a refused item moves nothing and is
        reported alone, its neighbours go through.

        Each item is ``(escrow_id, amount)``, ``(escrow_id, amount, reason)`` or a dict with
        ``escrow_id``, ``amount`` and optional ``reason``, ``usage``, ``idempotency_key``.

        Example:
            >>> results = seller.deduct_many([(e1.id, "0.01"), (e2.id, "0.02", "batch 7")])
            >>> [r.ok for r in results], results[0].receipt.gross
            ([True, True], Decimal('0.010000'))
        """
        return self._call("deduct_many", locals())

    def release(self, escrow_id: str, amount: Amount | None = None, refund_remainder: bool = True,
                usage: dict | None = None, meta: dict | None = None, idempotency_key: str | None = None, *,
                price_per_token: Amount | None = None, quality_score: float | None = None,
                throughput_tps: float | None = None, hold_id: str | None = None) -> Receipt:
        """As the buyer: pay the seller `amount`, or `usage` x price, plus earned bonuses.

        With `refund_remainder` (the default) the rest goes back to the buyer and the
        escrow closes. Without amount and usage, the whole remainder is paid. `hold_id`:
        your own open hold on this escrow, freed in the same transaction to pay this release.

        Example:
            >>> r = esc.release(e.id, usage={"prompt_tokens": 12, "completion_tokens": 30})
            >>> r.gross == r.net + r.fee
            True
        """
        return self._call("release", locals())

    def cancel(self, escrow_id: str, reason: str | None = None, idempotency_key: str | None = None) -> Receipt:
        """As buyer or seller: refund the whole remainder to the buyer and close the escrow."""
        return self._call("cancel", locals())

    def submit_result(self, escrow_id: str, metric: str, score: float, artifact: dict | None = None,
                      idempotency_key: str | None = None, *, milestone: int | None = None) -> Receipt:
        """As the seller of a benchmark escrow: report the score (and the artifact's repo/sha256).

        On a milestone escrow: the result for `milestone` (1 = the first; default: the next due).
        """
        return self._call("submit_result", locals())

    def verify(self, escrow_id: str, score: float, idempotency_key: str | None = None) -> Receipt:
        """As the named verifier: your own score; pass releases, fail reopens until the TTL."""
        return self._call("verify", locals())

    def get(self, escrow_id: str) -> Escrow:
        """One of your escrows, with its events."""
        return self._call("get", locals())

    def history(self, status: str | None = None, limit: int = 100, *, model: str | None = None,
                role: str | None = None) -> list[Escrow]:
        """Your escrows, newest first."""
        return self._call("history", locals())

    def analytics(self) -> dict:
        """Spend and earnings per model (USDC), tokens in/out, escrow counts, referral earned."""
        return self._call("analytics", locals())

    # ---- holds and spend tokens ------------------------------------------------------

    def mint_spend_token(self, escrow_id: str) -> str:
        """As the buyer: another spend token for an open escrow (a secret: give it to the seller's faces).

        Example:
            >>> token = buyer.mint_spend_token(e.id)
            >>> token.startswith("est_")
            True
        """
        return self._call("mint_spend_token", locals())

    def revoke_spend_tokens(self, escrow_id: str) -> int:
        """As the buyer: revoke every spend token of the escrow at once; returns how many.

        Open holds stay capturable; only new holds by token are refused.
        """
        return self._call("revoke_spend_tokens", locals())

    def hold(self, target: str, amount: Amount, ttl_seconds: float = 60, idempotency_key: str | None = None) -> Hold:
        """Reserve `amount` of an escrow's remainder for one piece of work, for at most `ttl_seconds`.

        `target` is a spend token (``est_...``; you must be that escrow's seller) or an
        escrow id (you must be its buyer or seller). Refused when the remainder is too small.

        Example:
            >>> h = seller.hold(e.spend_token, "0.05", ttl_seconds=60)
            >>> h.status, h.open
            ('open', Decimal('0.050000'))
        """
        return self._call("hold", locals())

    def capture(self, hold_id: str, amount: Amount, final: bool = False, usage: dict | None = None,
                idempotency_key: str | None = None) -> Receipt:
        """As the hold's maker: pay the seller `amount` out of the hold (fee applies).

        `final` frees what is left of the hold; `amount` may then be 0.

        Example:
            >>> r = seller.capture(h.id, "0.0123", final=True)
            >>> r.gross, r.hold.status
            (Decimal('0.012300'), 'captured')
        """
        return self._call("capture", locals())

    def void(self, hold_id: str, idempotency_key: str | None = None) -> Receipt:
        """As the hold's maker: free the whole open part of the hold back to the escrow."""
        return self._call("void", locals())

    def capture_many(self, items: list, idempotency_key: str | None = None) -> list[CaptureResult]:
        """Many captures in one transaction; a refused item moves nothing and is reported alone.

        Each item is ``(hold_id, amount)``, ``(hold_id, amount, final)`` or a dict with
        ``hold_id``, ``amount`` and optional ``final``, ``usage``, ``idempotency_key``.

        Example:
            >>> results = seller.capture_many([(h1.id, "0.01", True), (h2.id, "0.02")])
            >>> [r.ok for r in results]
            [True, True]
        """
        return self._call("capture_many", locals())

    def get_hold(self, hold_id: str) -> Hold:
        """One hold, for its maker or a party of its escrow."""
        return self._call("get_hold", locals())

    def holds(self, escrow_id: str) -> list[Hold]:
        """The escrow's open holds, for either party."""
        return self._call("holds", locals())

    # ---- budgeted keys -------------------------------------------------------------

    def create_key(self, budget: Amount, sellers: list[str] | None = None, max_escrow: Amount | None = None,
                   expires_in: float | None = None, label: str | None = None,
                   idempotency_key: str | None = None) -> BudgetedKey:
        """An API key for a sub-agent that locks this agent's money only within a mandate.

        `budget`: what its escrows may lock net of refunds (paid or still-locked money uses
        it, refunds give it back); `max_escrow`: the most per escrow; `sellers`: whom it
        may pay (None: anyone); `expires_in`: seconds (None: until revoked). The key acts
        as this agent on the escrows it opens, and sees only those. `api_key` is shown
        only in this answer (a replay under the same idempotency key leaves it out).

        Example:
            >>> k = buyer.create_key(budget="1.00", sellers=["seller-1"], max_escrow="0.25", expires_in=3600)
            >>> agent = hf_escrow.connect("http://127.0.0.1:8787", api_key=k.api_key)
        """
        return self._call("create_key", locals())

    def revoke_key(self, key_id: str, cancel_escrows: bool = False) -> BudgetedKey:
        """Stop one of this agent's budgeted keys at once; with `cancel_escrows`, also cancel
        the active escrows it opened (their remainder comes back to this agent)."""
        return self._call("revoke_key", locals())

    def keys(self, limit: int = 100) -> list[BudgetedKey]:
        """This agent's budgeted keys, newest first: each mandate, what it locked, paid and got back."""
        return self._call("keys", locals())

    def mandate(self, key_id: str | None = None) -> BudgetedKey:
        """As a budgeted key: its own mandate and what is left; as an owner: the key `key_id`."""
        return self._call("mandate", locals())

    # ---- what both twins' `_call` share ----------------------------------------------

    def _params(self, op: str, args: dict) -> tuple[Operation, dict]:
        """The operation's row and its params: a method's arguments, batch items completed."""
        spec = OPERATIONS[op]
        params = {name: args[name] for name in spec.arguments}
        if spec.item:
            params["items"] = spec.batch(params["items"])
        return spec, params

    def _parse(self, spec: Operation, answer: Any) -> Any:
        result = spec.parse(answer)
        if isinstance(result, Agent):
            self._adopt(result)
        return result

    def _adopt(self, agent: Agent) -> None:
        if self.agent is None:
            self.agent = agent.agent_id
        self._transport.adopt(agent)


def _pricing_dict(pricing: Any) -> dict | None:
    from .pricing import Pricing
    sheet = Pricing.coerce(pricing)
    return sheet.to_dict() if sheet else None


class EscrowClient(_ClientCore):
    """The synchronous client. Get one from `hf_escrow.connect()`."""

    def __init__(self, transport: Any, agent: str | None = None):
        self._transport = transport
        self.agent = agent

    def _call(self, op: str, args: dict) -> Any:
        spec, params = self._params(op, args)
        return self._parse(spec, self._transport.handle(self, op, params))

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> "EscrowClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class AsyncEscrowClient(_ClientCore):
    """The asynchronous twin of `EscrowClient`: the same methods, awaited."""

    def __init__(self, transport: Any, agent: str | None = None):
        self._transport = transport
        self.agent = agent

    async def _call(self, op: str, args: dict) -> Any:
        spec, params = self._params(op, args)
        return self._parse(spec, await self._transport.handle(self, op, params))

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def __aenter__(self) -> "AsyncEscrowClient":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()


def _async_twin(name: str, method: Any) -> Any:
    """The `async def` of a core method: the same signature, docstring and hints (an async
    method's return hint is what awaiting it gives); the core's body runs first, so a bad
    argument raises when awaited, as every error of an async call does."""
    async def twin(self: AsyncEscrowClient, *args: Any, **kwargs: Any) -> Any:
        return await method(self, *args, **kwargs)
    twin.__name__, twin.__qualname__ = name, f"AsyncEscrowClient.{name}"
    twin.__doc__, twin.__module__ = method.__doc__, method.__module__
    twin.__annotations__ = dict(method.__annotations__)
    twin.__signature__ = inspect.signature(method)
    return twin


for _name, _method in vars(_ClientCore).items():
    if not _name.startswith("_") and inspect.isfunction(_method):
        setattr(AsyncEscrowClient, _name, _async_twin(_name, _method))


class EmbeddedTransport:
    """Calls the ledger in this process; the client's `agent` is the acting identity."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger

    def handle(self, client: _ClientCore, op: str, params: dict) -> Any:
        spec = OPERATIONS[op]
        agent = ()
        if not spec.acts:  # register: nobody acts yet, the new agent is named
            if not params["agent_id"]:
                raise Unauthorized("name the agent: connect(agent=...) or register(agent_id)")
        elif client.agent is None:
            raise Unauthorized("this client acts for no agent: connect(agent=\"name\") or register one first")
        else:
            agent = (client.agent,)
        rest = {k: v for k, v in params.items() if k not in spec.positional}
        result = getattr(self.ledger, spec.ledger_method)(*agent, *(params[name] for name in spec.positional), **rest)
        return {"agent_id": client.agent, spec.bare: result} if spec.bare else result

    def adopt(self, agent: Agent) -> None:
        """Embedded, identity is the client's `agent`; there is no key to take up."""

    def close(self) -> None:
        """The ledger is shared by every embedded client on the same database; it stays open."""


class AsyncEmbeddedTransport:
    """The embedded transport for the async client: ledger calls run in a worker thread."""

    def __init__(self, ledger: Ledger):
        self._sync = EmbeddedTransport(ledger)

    async def handle(self, client: _ClientCore, op: str, params: dict) -> Any:
        return await asyncio.to_thread(self._sync.handle, client, op, params)

    def adopt(self, agent: Agent) -> None:
        self._sync.adopt(agent)

    async def aclose(self) -> None:
        self._sync.close()


_LEDGERS: dict[str, Ledger] = {}
_LEDGERS_LOCK = threading.Lock()


def embedded_ledger(database_url: str | None = None, home: str | Path | None = None) -> Ledger:
    """The process-wide ledger for a database (opened and migrated once)."""
    from .ledger.storage import default_database_url
    url = database_url or default_database_url(Path(home) if home else None)
    with _LEDGERS_LOCK:
        if url not in _LEDGERS:
            _LEDGERS[url] = Ledger(url)
        return _LEDGERS[url]


def connect(url: str | None = None, *, agent: str | None = None, api_key: str | None = None,
            home: str | Path | None = None, database_url: str | None = None, timeout: float = 30.0,
            max_retries: int = 3) -> EscrowClient:
    """An escrow client: over HTTP when given a server URL, else on the embedded ledger.

    Embedded, the ledger is the SQLite file in `$HF_ESCROW_HOME` (or `database_url`, or
    `$HF_ESCROW_DATABASE_URL`), and `agent` names who acts. Over HTTP the API key decides.

    Example:
        >>> esc = hf_escrow.connect(agent="buyer-1")                              # embedded
        >>> esc = hf_escrow.connect("http://127.0.0.1:8787", api_key="hfe_...")   # a server
    """
    return _connect(EscrowClient, "HTTPTransport", EmbeddedTransport, url, agent, api_key, home, database_url,
                    timeout, max_retries)


def connect_async(url: str | None = None, *, agent: str | None = None, api_key: str | None = None,
                  home: str | Path | None = None, database_url: str | None = None, timeout: float = 30.0,
                  max_retries: int = 3) -> AsyncEscrowClient:
    """The async twin of `connect`: the same arguments, a client whose methods are awaited."""
    return _connect(AsyncEscrowClient, "AsyncHTTPTransport", AsyncEmbeddedTransport, url, agent, api_key, home,
                    database_url, timeout, max_retries)


def _connect(client: type, http_transport: str, embedded_transport: type, url: str | None, agent: str | None,
             api_key: str | None, home: str | Path | None, database_url: str | None, timeout: float,
             max_retries: int) -> Any:
    """Both `connect`s: over HTTP when given (or told by the environment) a server URL, else embedded."""
    url = url or (None if agent or database_url or home else os.environ.get("HF_ESCROW_URL"))
    if url:
        from . import http_client   # httpx only when a server is named
        transport = getattr(http_client, http_transport)
        return client(transport(url, api_key=api_key or os.environ.get("HF_ESCROW_API_KEY"), timeout=timeout,
                                max_retries=max_retries))
    ledger = embedded_ledger(database_url, home)
    return client(embedded_transport(ledger), agent=_embedded_agent(ledger, agent, api_key))


def _embedded_agent(ledger: Ledger, agent: str | None, api_key: str | None) -> str | None:
    """Who acts on an embedded ledger: `agent`, else the owner of an explicit `api_key` (a
    budgeted key's one acts as that key), else `$HF_ESCROW_AGENT`."""
    if agent is None and api_key is not None:
        return ledger.authenticate(api_key)
    return agent or os.environ.get("HF_ESCROW_AGENT")
