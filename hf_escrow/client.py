"""`connect()` and `connect_async()`: one escrow interface, embedded or over HTTP.

One base class holds every method once; the sync `EscrowClient` and the async
`AsyncEscrowClient` differ only in `_request`, which either returns the parsed result or
a coroutine of it. A transport turns ``(operation, params)`` into the ledger's dict: the
embedded one calls the ledger in-process, the HTTP one (`hf_escrow.http_client`) calls
a server. Both clients therefore return the same objects and raise the same errors.
"""

from __future__ import annotations

import asyncio
import os
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

from ._exceptions import Unauthorized, ValidationError
from ._models import Agent, BudgetedKey, CaptureResult, Escrow, Hold, Me, Receipt
from .ledger import Ledger
from .money import to_usdc

Amount = str | int | Decimal | float

MUTATIONS = ("claim_faucet", "create_escrow", "deduct", "release", "cancel", "submit_result", "verify",
             "mint_spend_token", "revoke_spend_tokens", "hold", "capture", "void", "capture_many", "create_key",
             "revoke_key")


class _BaseClient:
    """Every escrow operation, written once for both clients."""

    agent: str | None

    def _request(self, op: str, params: dict, parse: Callable[[Any], Any]) -> Any:
        raise NotImplementedError

    def register(self, agent_id: str | None = None, referral_code: str | None = None) -> Agent:
        """Register an agent; its API key is in the result, shown only this once.

        Example:
            >>> esc = hf_escrow.connect(agent="buyer-1")
            >>> esc.register().agent_id
            'buyer-1'
        """
        agent_id = agent_id or self.agent
        return self._request("register", {"agent_id": agent_id, "referral_code": referral_code}, self._adopt)

    def claim_faucet(self, idempotency_key: str | None = None) -> Decimal:
        """Claim free test USDC; returns the amount credited."""
        return self._request("claim_faucet", {"idempotency_key": idempotency_key},
                             lambda d: to_usdc(d["amount_micro"]))

    def me(self) -> Me:
        """This agent's balance, referral code and number of open escrows."""
        return self._request("me", {}, Me.from_dict)

    def rotate_key(self) -> str:
        """A new API key for this agent, returned only this once; the old key stops working at
        once. Over HTTP this client goes on with the new key.

        Example:
            >>> new_key = esc.rotate_key()
            >>> new_key.startswith("hfe_")
            True
        """
        return self._request("rotate_key", {}, lambda d: d["api_key"])

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
        return self._request("create_escrow", dict(
            seller=seller, amount=amount, ttl_seconds=ttl_seconds, description=description, meta=meta,
            release_condition=release_condition, bonus_conditions=bonus_conditions, referral_code=referral_code,
            pricing=_pricing_dict(pricing), idempotency_key=idempotency_key), Escrow.from_dict)

    def deduct(self, escrow_id: str, amount: Amount, reason: str | None = None, idempotency_key: str | None = None,
               *, usage: dict | None = None) -> Receipt:
        """As the seller: take `amount` out of the remainder for work delivered (fee applies)."""
        return self._request("deduct", dict(escrow_id=escrow_id, amount=amount, reason=reason, usage=usage,
                                            idempotency_key=idempotency_key), Receipt.from_dict)

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
        return self._request("release", dict(
            escrow_id=escrow_id, amount=amount, refund_remainder=refund_remainder, usage=usage, meta=meta,
            price_per_token=price_per_token, quality_score=quality_score, throughput_tps=throughput_tps,
            hold_id=hold_id, idempotency_key=idempotency_key), Receipt.from_dict)

    def cancel(self, escrow_id: str, reason: str | None = None, idempotency_key: str | None = None) -> Receipt:
        """As buyer or seller: refund the whole remainder to the buyer and close the escrow."""
        return self._request("cancel", dict(escrow_id=escrow_id, reason=reason, idempotency_key=idempotency_key),
                             Receipt.from_dict)

    def submit_result(self, escrow_id: str, metric: str, score: float, artifact: dict | None = None,
                      idempotency_key: str | None = None, *, milestone: int | None = None) -> Receipt:
        """As the seller of a benchmark escrow: report the score (and the artifact's repo/sha256).

        On a milestone escrow: the result for `milestone` (1 = the first; default: the next due).
        """
        params = dict(escrow_id=escrow_id, metric=metric, score=score, artifact=artifact,
                      idempotency_key=idempotency_key)
        if milestone is not None:
            params["milestone"] = milestone
        return self._request("submit_result", params, Receipt.from_dict)

    def verify(self, escrow_id: str, score: float, idempotency_key: str | None = None) -> Receipt:
        """As the named verifier: your own score; pass releases, fail reopens until the TTL."""
        return self._request("verify", dict(escrow_id=escrow_id, score=score, idempotency_key=idempotency_key),
                             Receipt.from_dict)

    def get(self, escrow_id: str) -> Escrow:
        """One of your escrows, with its events."""
        return self._request("get", {"escrow_id": escrow_id}, Escrow.from_dict)

    def history(self, status: str | None = None, limit: int = 100, *, model: str | None = None,
                role: str | None = None) -> list[Escrow]:
        """Your escrows, newest first."""
        return self._request("history", dict(status=status, limit=limit, model=model, role=role),
                             lambda rows: [Escrow.from_dict(r) for r in rows])

    def analytics(self) -> dict:
        """Spend and earnings per model (USDC), tokens in/out, escrow counts, referral earned."""
        return self._request("analytics", {}, _analytics)

    # ---- holds and spend tokens ------------------------------------------------------

    def mint_spend_token(self, escrow_id: str) -> str:
        """As the buyer: another spend token for an open escrow (a secret: give it to the seller's faces).

        Example:
            >>> token = buyer.mint_spend_token(e.id)
            >>> token.startswith("est_")
            True
        """
        return self._request("mint_spend_token", {"escrow_id": escrow_id}, lambda d: d["spend_token"])

    def revoke_spend_tokens(self, escrow_id: str) -> int:
        """As the buyer: revoke every spend token of the escrow at once; returns how many.

        Open holds stay capturable; only new holds by token are refused.
        """
        return self._request("revoke_spend_tokens", {"escrow_id": escrow_id}, lambda d: int(d["revoked"]))

    def hold(self, target: str, amount: Amount, ttl_seconds: float = 60, idempotency_key: str | None = None) -> Hold:
        """Reserve `amount` of an escrow's remainder for one piece of work, for at most `ttl_seconds`.

        `target` is a spend token (``est_...``; you must be that escrow's seller) or an
        escrow id (you must be its buyer or seller). Refused when the remainder is too small.

        Example:
            >>> h = seller.hold(e.spend_token, "0.05", ttl_seconds=60)
            >>> h.status, h.open
            ('open', Decimal('0.050000'))
        """
        return self._request("hold", dict(target=target, amount=amount, ttl_seconds=ttl_seconds,
                                          idempotency_key=idempotency_key), Hold.from_dict)

    def capture(self, hold_id: str, amount: Amount, final: bool = False, usage: dict | None = None,
                idempotency_key: str | None = None) -> Receipt:
        """As the hold's maker: pay the seller `amount` out of the hold (fee applies).

        `final` frees what is left of the hold; `amount` may then be 0.

        Example:
            >>> r = seller.capture(h.id, "0.0123", final=True)
            >>> r.gross, r.hold.status
            (Decimal('0.012300'), 'captured')
        """
        return self._request("capture", dict(hold_id=hold_id, amount=amount, final=final, usage=usage,
                                             idempotency_key=idempotency_key), Receipt.from_dict)

    def void(self, hold_id: str, idempotency_key: str | None = None) -> Receipt:
        """As the hold's maker: free the whole open part of the hold back to the escrow."""
        return self._request("void", {"hold_id": hold_id, "idempotency_key": idempotency_key}, Receipt.from_dict)

    def capture_many(self, items: list, idempotency_key: str | None = None) -> list[CaptureResult]:
        """Many captures in one transaction; a refused item moves nothing and is reported alone.

        Each item is ``(hold_id, amount)``, ``(hold_id, amount, final)`` or a dict with
        ``hold_id``, ``amount`` and optional ``final``, ``usage``, ``idempotency_key``.

        Example:
            >>> results = seller.capture_many([(h1.id, "0.01", True), (h2.id, "0.02")])
            >>> [r.ok for r in results]
            [True, True]
        """
        if not isinstance(items, (list, tuple)):
            raise ValidationError(f"capture_many takes a list of captures, got {type(items).__name__}")
        return self._request("capture_many", {"items": [_capture_item(i, item) for i, item in enumerate(items)],
                                              "idempotency_key": idempotency_key},
                             lambda d: [CaptureResult.from_dict(r) for r in d["results"]])

    def get_hold(self, hold_id: str) -> Hold:
        """One hold, for its maker or a party of its escrow."""
        return self._request("get_hold", {"hold_id": hold_id}, Hold.from_dict)

    def holds(self, escrow_id: str) -> list[Hold]:
        """The escrow's open holds, for either party."""
        return self._request("holds", {"escrow_id": escrow_id}, lambda rows: [Hold.from_dict(r) for r in rows])

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
        return self._request("create_key", dict(budget=budget, sellers=sellers, max_escrow=max_escrow,
                                                expires_in=expires_in, label=label,
                                                idempotency_key=idempotency_key), BudgetedKey.from_dict)

    def revoke_key(self, key_id: str, cancel_escrows: bool = False) -> BudgetedKey:
        """Stop one of this agent's budgeted keys at once; with `cancel_escrows`, also cancel
        the active escrows it opened (their remainder comes back to this agent)."""
        return self._request("revoke_key", {"key_id": key_id, "cancel_escrows": cancel_escrows},
                             BudgetedKey.from_dict)

    def keys(self, limit: int = 100) -> list[BudgetedKey]:
        """This agent's budgeted keys, newest first: each mandate, what it locked, paid and got back."""
        return self._request("keys", {"limit": limit}, lambda rows: [BudgetedKey.from_dict(r) for r in rows])

    def mandate(self, key_id: str | None = None) -> BudgetedKey:
        """As a budgeted key: its own mandate and what is left; as an owner: the key `key_id`."""
        return self._request("mandate", {"key_id": key_id}, BudgetedKey.from_dict)

    def _adopt(self, data: dict) -> Agent:
        agent = Agent.from_dict(data)
        if self.agent is None:
            self.agent = agent.agent_id
        self._transport.adopt(agent)
        return agent


_ITEM_KEYS = ("hold_id", "amount", "final", "usage", "idempotency_key")


def _capture_item(index: int, item: Any) -> dict:
    """One capture_many item as both transports send it: a dict with every key."""
    if isinstance(item, (tuple, list)) and 2 <= len(item) <= 3:
        item = dict(zip(("hold_id", "amount", "final"), item))
    if not isinstance(item, dict) or "hold_id" not in item or "amount" not in item:
        raise ValidationError(f"capture {index}: give (hold_id, amount[, final]) or a dict with hold_id and "
                              f"amount, got {item!r:.100}")
    unknown = set(item) - set(_ITEM_KEYS)
    if unknown:
        raise ValidationError(f"capture {index}: unknown keys {sorted(unknown)}; known: {list(_ITEM_KEYS)}")
    return {"hold_id": item["hold_id"], "amount": item["amount"], "final": item.get("final", False),
            "usage": item.get("usage"), "idempotency_key": item.get("idempotency_key")}


def _pricing_dict(pricing: Any) -> dict | None:
    from .pricing import Pricing
    sheet = Pricing.coerce(pricing)
    return sheet.to_dict() if sheet else None


def _analytics(data: dict) -> dict:
    def convert(rows: list[dict]) -> list[dict]:
        return [{k.removesuffix("_micro"): to_usdc(v) if k.endswith("_micro") else v for k, v in row.items()}
                for row in rows]
    return {"agent_id": data["agent_id"], "spend": convert(data["spend"]), "earnings": convert(data["earnings"]),
            "referral_earned": to_usdc(data["referral_earned_micro"])}


class EscrowClient(_BaseClient):
    """The synchronous client. Get one from `hf_escrow.connect()`."""

    def __init__(self, transport: Any, agent: str | None = None):
        self._transport = transport
        self.agent = agent

    def _request(self, op: str, params: dict, parse: Callable[[Any], Any]) -> Any:
        return parse(self._transport.handle(self, op, params))

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> "EscrowClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class AsyncEscrowClient(_BaseClient):
    """The asynchronous twin of `EscrowClient`: the same methods, awaited."""

    def __init__(self, transport: Any, agent: str | None = None):
        self._transport = transport
        self.agent = agent

    async def _request(self, op: str, params: dict, parse: Callable[[Any], Any]) -> Any:
        return parse(await self._transport.handle(self, op, params))

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def __aenter__(self) -> "AsyncEscrowClient":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()


# The ledger method of each remaining operation (same name) and its positional parameters.
_POSITIONAL = {
    "deduct": ("escrow_id",), "release": ("escrow_id",), "cancel": ("escrow_id",),
    "submit_result": ("escrow_id",), "verify": ("escrow_id",),
    "mint_spend_token": ("escrow_id",), "revoke_spend_tokens": ("escrow_id",), "holds": ("escrow_id",),
    "hold": ("target", "amount"), "capture": ("hold_id", "amount"), "void": ("hold_id",),
    "get_hold": ("hold_id",), "capture_many": ("items",), "revoke_key": ("key_id",),
}


class EmbeddedTransport:
    """Calls the ledger in this process; the client's `agent` is the acting identity."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger

    def handle(self, client: _BaseClient, op: str, params: dict) -> Any:
        if op == "register":
            if not params["agent_id"]:
                raise Unauthorized("name the agent: connect(agent=...) or register(agent_id)")
            return self.ledger.register(params["agent_id"], params["referral_code"])
        if client.agent is None:
            raise Unauthorized("this client acts for no agent: connect(agent=\"name\") or register one first")
        if op == "me":
            return self.ledger.me(client.agent)
        if op == "rotate_key":
            return {"agent_id": client.agent, "api_key": self.ledger.rotate_key(client.agent)}
        if op == "analytics":
            return self.ledger.analytics(client.agent)
        if op == "get":
            return self.ledger.get(client.agent, params["escrow_id"])
        if op == "history":
            return self.ledger.history(client.agent, **params)
        if op == "create_escrow":
            params = dict(params)
            return self.ledger.create_escrow(client.agent, params.pop("seller"), params.pop("amount"), **params)
        if op == "claim_faucet":
            return self.ledger.claim_faucet(client.agent, **params)
        if op in ("create_key", "keys"):
            return getattr(self.ledger, op)(client.agent, **params)
        if op == "mandate":
            return self.ledger.key(client.agent, params["key_id"])
        positional = _POSITIONAL[op]
        rest = {k: v for k, v in params.items() if k not in positional}
        return getattr(self.ledger, op)(client.agent, *(params[name] for name in positional), **rest)

    def adopt(self, agent: Agent) -> None:
        """Embedded, identity is the client's `agent`; there is no key to take up."""

    def close(self) -> None:
        """The ledger is shared by every embedded client on the same database; it stays open."""


class AsyncEmbeddedTransport:
    """The embedded transport for the async client: ledger calls run in a worker thread."""

    def __init__(self, ledger: Ledger):
        self._sync = EmbeddedTransport(ledger)

    async def handle(self, client: _BaseClient, op: str, params: dict) -> Any:
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
    url = url or (None if agent or database_url or home else os.environ.get("HF_ESCROW_URL"))
    if url:
        from .http_client import HTTPTransport
        return EscrowClient(HTTPTransport(url, api_key=api_key or os.environ.get("HF_ESCROW_API_KEY"),
                                          timeout=timeout, max_retries=max_retries))
    ledger = embedded_ledger(database_url, home)
    return EscrowClient(EmbeddedTransport(ledger), agent=_embedded_agent(ledger, agent, api_key))


def connect_async(url: str | None = None, *, agent: str | None = None, api_key: str | None = None,
                  home: str | Path | None = None, database_url: str | None = None, timeout: float = 30.0,
                  max_retries: int = 3) -> AsyncEscrowClient:
    """The async twin of `connect`: the same arguments, a client whose methods are awaited."""
    url = url or (None if agent or database_url or home else os.environ.get("HF_ESCROW_URL"))
    if url:
        from .http_client import AsyncHTTPTransport
        return AsyncEscrowClient(AsyncHTTPTransport(url, api_key=api_key or os.environ.get("HF_ESCROW_API_KEY"),
                                                    timeout=timeout, max_retries=max_retries))
    ledger = embedded_ledger(database_url, home)
    return AsyncEscrowClient(AsyncEmbeddedTransport(ledger), agent=_embedded_agent(ledger, agent, api_key))


def _embedded_agent(ledger: Ledger, agent: str | None, api_key: str | None) -> str | None:
    """Who acts on an embedded ledger: `agent`, else the owner of an explicit `api_key` (a
    budgeted key's one acts as that key), else `$HF_ESCROW_AGENT`."""
    if agent is None and api_key is not None:
        return ledger.authenticate(api_key)
    return agent or os.environ.get("HF_ESCROW_AGENT")
