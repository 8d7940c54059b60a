"""AutoPay: a buyer's client that pays hf-escrow's 402 challenges by itself, within a mandate.

An agent that meets a paid face (the gateway, a paid Space, the shard server) gets a
402 whose challenge names the seller, the prices and the escrow server
(`hf_escrow.challenge`). AutoPay answers it: it opens an escrow for that seller through
its own escrow client, sized from the price sheet and capped by the mandate, retries
the request with the escrow's spend token, reuses that escrow for later calls, opens
another when the face says it is too small, closed or revoked, and at `close()` (or the
end of a ``with`` block) cancels what is left, so the rest comes back.

The mandate says what may be spent: `budget` in all, at most `max_per_seller` with one
seller, only with `sellers` (any when None), until `expires_at`. AutoPay never locks
more than the budget: the money it has locked (escrows opened, less what their cancels
refunded) is counted under one lock before each escrow is opened, so any number of
threads and asyncio tasks sharing one AutoPay together stay within it. Escrows are the
reservation on the ledger: a face can only take what an escrow holds, so spending can
never pass what was locked. A 402 that is not hf-escrow's, that names another escrow
server than AutoPay's client, a seller outside the mandate, or arrives after the
mandate expired is handed back to the caller unchanged; AutoPay never follows it.

Example:
    >>> buyer = hf_escrow.connect("http://127.0.0.1:8787", api_key="hfe_...")
    >>> with hf_escrow.AutoPay(buyer, budget="0.05", sellers=["my-space"]) as pay:
    ...     http = httpx.Client(auth=pay.auth)                 # or httpx.AsyncClient(auth=pay.auth)
    ...     requests.get(shard_url, auth=pay.requests_auth)    # requests
    ...     http.post("http://127.0.0.1:8788/v1/chat/completions", json={...})   # 402 -> escrow -> retry
    ...     Client(space_url, headers=pay.headers_for(space_url))              # gradio_client
    ...     load_dataset(..., storage_options=pay.storage_options(shard_url))   # datasets streaming
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable, Mapping
from urllib.parse import urlsplit

import httpx

from . import challenge
from ._exceptions import EscrowError, Forbidden, StateConflict, TransportError, ValidationError
from .challenge import Challenge
from .money import format_usdc, parse_usdc

DEFAULT_CALLS_PER_ESCROW = 20      # an escrow covers this many of the refused call's worst case
DEFAULT_TTL_S = 3600.0
MAX_PAYMENTS_PER_REQUEST = 8       # challenges paid for one request (others may use up each new escrow first)
MAX_ESCROWS = 1_000                # escrows one AutoPay opens in its life
DISCOVERY_TIMEOUT_S = 10.0
MIN_TTL_S = 1.0

__all__ = ["AutoPay", "Mandate", "EscrowAuth", "RequestsAuth", "PaidClient"]


@dataclass(frozen=True)
class Mandate:
    """What an AutoPay may spend: in all, per seller, with whom, until when (micro-USDC, epoch seconds)."""

    budget_micro: int
    max_per_seller_micro: int | None = None
    sellers: frozenset[str] | None = None
    expires_at: float | None = None

    @classmethod
    def of(cls, budget: Any, *, max_per_seller: Any = None, sellers: Iterable[str] | None = None,
           expires_at: float | datetime | None = None) -> "Mandate":
        """A mandate from USDC amounts (strings, Decimals, ints), a list of sellers and a deadline."""
        if isinstance(sellers, str):
            raise ValidationError("sellers must be a list of seller ids, e.g. [\"my-space\"]")
        if isinstance(expires_at, datetime):
            expires_at = expires_at.timestamp()
        if expires_at is not None and (isinstance(expires_at, bool) or not isinstance(expires_at, (int, float))):
            raise ValidationError("expires_at must be a datetime or epoch seconds")
        return cls(budget_micro=parse_usdc(budget, what="budget"),
                   max_per_seller_micro=None if max_per_seller is None else parse_usdc(max_per_seller,
                                                                                       what="max_per_seller"),
                   sellers=None if sellers is None else frozenset(sellers),
                   expires_at=None if expires_at is None else float(expires_at))

    def refuses(self, seller: str, now: float) -> str | None:
        """Why this mandate does not pay `seller` now; None when it may."""
        if self.sellers is not None and seller not in self.sellers:
            return f"seller {seller!r} is not among the mandate's sellers {sorted(self.sellers)}"
        if self.expires_at is not None and now >= self.expires_at:
            return "the mandate has expired"
        return None


@dataclass
class _Escrow:
    seller: str
    escrow_id: str
    token: str
    amount_micro: int
    open: bool = True
    refunded_micro: int = 0


@dataclass
class _Books:
    """What the AutoPay has locked, under its lock: in all and per seller."""

    locked_micro: int = 0
    per_seller_micro: dict[str, int] = field(default_factory=dict)

    def add(self, seller: str, amount_micro: int) -> None:
        self.locked_micro += amount_micro
        self.per_seller_micro[seller] = self.per_seller_micro.get(seller, 0) + amount_micro


class AutoPay:
    """Pays 402 challenges from hf-escrow faces within a mandate (see the module docstring).

    Args:
        escrow: the buyer's synchronous `EscrowClient` (embedded or over HTTP); escrows
            are opened only through it, and only challenges naming its server are paid.
        mandate: a `Mandate`, or give `budget` (and `max_per_seller`, `sellers`, `expires_at`).
        calls_per_escrow: an escrow is sized for this many of the challenged call's price
            (at least the face's smallest useful escrow), capped by what the mandate leaves.
        ttl_seconds: the escrows' TTL (never past the mandate's expiry).
    """

    def __init__(self, escrow: Any, mandate: Mandate | None = None, *, budget: Any = None, max_per_seller: Any = None,
                 sellers: Iterable[str] | None = None, expires_at: float | datetime | None = None,
                 calls_per_escrow: int = DEFAULT_CALLS_PER_ESCROW, ttl_seconds: float = DEFAULT_TTL_S):
        from .client import AsyncEscrowClient
        if not callable(getattr(escrow, "create_escrow", None)) or isinstance(escrow, AsyncEscrowClient):
            raise ValidationError("AutoPay needs the buyer's synchronous EscrowClient (hf_escrow.connect(...))")
        if mandate is None:
            if budget is None:
                raise ValidationError("give AutoPay a mandate: budget= (and max_per_seller=, sellers=, expires_at=)")
            mandate = Mandate.of(budget, max_per_seller=max_per_seller, sellers=sellers, expires_at=expires_at)
        if isinstance(calls_per_escrow, bool) or not isinstance(calls_per_escrow, int) or calls_per_escrow < 1:
            raise ValidationError("calls_per_escrow must be a whole number, at least 1")
        self.escrow = escrow
        self.mandate = mandate
        self.server = challenge.server_id(escrow)
        self.calls_per_escrow = calls_per_escrow
        self.ttl_seconds = float(ttl_seconds)
        self._lock = threading.Lock()
        self._books = _Books()
        self._current: dict[str, _Escrow] = {}
        self._escrows: list[_Escrow] = []
        self._faces: dict[str, str] = {}          # origin -> the seller its challenge named
        self.closed = False
        self.auth = EscrowAuth(self)
        self.requests_auth = RequestsAuth(self)

    # ---- what it has done -------------------------------------------------------------

    @property
    def locked_micro(self) -> int:
        """Money locked in escrows now or spent from them (opened less refunded), in micro-USDC."""
        return self._books.locked_micro

    @property
    def escrow_ids(self) -> list[str]:
        """Every escrow this AutoPay opened, oldest first."""
        return [e.escrow_id for e in self._escrows]

    def left_micro(self, seller: str | None = None) -> int:
        """What the mandate still lets it lock, in all or with one seller."""
        left = self.mandate.budget_micro - self._books.locked_micro
        if seller is not None and self.mandate.max_per_seller_micro is not None:
            left = min(left, self.mandate.max_per_seller_micro - self._books.per_seller_micro.get(seller, 0))
        return max(left, 0)

    # ---- paying -----------------------------------------------------------------------

    def pay(self, found: Challenge, sent_token: str | None = None) -> str:
        """The spend token to retry a challenged call with; raises Forbidden when the mandate says no.

        `sent_token` is the token the refused call carried: a token another thread has put
        in its place since is returned as it is; a refused current token is retired first
        (its escrow cancelled, the refund counted back).
        """
        why = self._foreign(found)
        if why:
            raise Forbidden(f"AutoPay will not pay this challenge: {why}")
        with self._lock:
            if self.closed:
                raise StateConflict("this AutoPay is closed; open a new one")
            current = self._current.get(found.seller)
            if current is not None and current.token != sent_token:
                return current.token          # paid meanwhile by another call
            if current is not None:
                self._retire(current)
            return self._open(found).token

    def _foreign(self, found: Challenge) -> str | None:
        """Why a challenge is not AutoPay's to pay (None when it is)."""
        if found.escrow_server is None or found.escrow_server != self.server:
            return (f"it names escrow server {found.escrow_server!r}, and this AutoPay pays only through its own "
                    f"({self.server!r})")
        if found.reason not in (challenge.NO_TOKEN, challenge.TOKEN_REFUSED, challenge.ESCROW_CLOSED,
                                challenge.INSUFFICIENT):
            return f"the face refused for {found.reason!r}, which a new escrow does not mend"
        return self.mandate.refuses(found.seller, time.time())

    def _open(self, found: Challenge) -> _Escrow:
        need = max(found.price_micro or 0, found.min_escrow_micro)
        cap = self.left_micro(found.seller)
        if cap < need:
            raise Forbidden(f"the mandate leaves {format_usdc(cap)} USDC for seller {found.seller!r}, and its face "
                            f"asks for at least {format_usdc(need)} USDC")
        if len(self._escrows) >= MAX_ESCROWS:
            raise Forbidden(f"this AutoPay opened {MAX_ESCROWS} escrows already; open a new one")
        ttl = self.ttl_seconds
        if self.mandate.expires_at is not None:
            ttl = min(ttl, max(self.mandate.expires_at - time.time(), MIN_TTL_S))
        amount = min(need * self.calls_per_escrow, cap)
        # Counted before the ledger call: a create lost in transit may still have locked it.
        self._books.add(found.seller, amount)
        try:
            made = self.escrow.create_escrow(found.seller, format_usdc(amount), ttl_seconds=ttl,
                                             description="opened by AutoPay", meta={"autopay": True})
        except EscrowError as error:
            if not isinstance(error, TransportError):   # refused by the ledger: nothing was locked
                self._books.add(found.seller, -amount)
            raise
        opened = _Escrow(found.seller, made.id, made.spend_token, amount)
        self._escrows.append(opened)
        self._current[found.seller] = opened
        return opened

    def _retire(self, old: _Escrow) -> None:
        """Cancel a refused escrow: what it has left comes back and counts toward the budget again."""
        self._current.pop(old.seller, None)
        self._cancel(old)

    def _cancel(self, old: _Escrow) -> None:
        if not old.open:
            return
        old.open = False
        try:
            refunded = parse_usdc(self.escrow.cancel(old.escrow_id, reason="AutoPay closed it").refunded,
                                  allow_zero=True)
        except StateConflict:          # closed meanwhile (expired, released): its refund is not ours to count
            return
        old.refunded_micro = refunded
        self._books.add(old.seller, -refunded)

    # ---- the clients it plugs into ---------------------------------------------------

    def answer(self, url: Any, status: int, headers: Mapping[str, str], body: bytes | str | None,
               sent_token: str | None) -> str | None:
        """The token to retry a refused call with, or None to hand the answer back unchanged."""
        found = challenge.from_response(status, headers, body)
        if found is None:
            return None
        try:
            token = self.pay(found, sent_token)
        except (Forbidden, StateConflict):   # not the mandate's to pay, or closed: the caller gets the 402
            return None
        with self._lock:
            self._faces[_origin(url)] = found.seller
        return token

    def token_for(self, url: Any) -> str | None:
        """The spend token for a face this AutoPay has paid before (none yet: the first call learns it)."""
        with self._lock:
            seller = self._faces.get(_origin(url))
            current = self._current.get(seller) if seller else None
            return current.token if current else None

    def headers_for(self, url: str) -> dict[str, str]:
        """Headers that pay a face, learned from its ``/.well-known/hf-escrow`` before the first call.

        For clients that take fixed headers: ``gradio_client.Client(url, headers=...)``,
        ``InferenceClient(base_url, headers=...)``. Raises Forbidden when the face is not
        hf-escrow's or the mandate does not allow it.
        """
        token = self.token_for(url)
        if token is None:
            answer = httpx.get(_origin(url) + challenge.WELL_KNOWN_PATH, timeout=DISCOVERY_TIMEOUT_S)
            found = challenge.parse(answer.json()) if answer.status_code == 200 else None
            if found is None:
                raise Forbidden(f"{_origin(url)} publishes no hf-escrow offer at {challenge.WELL_KNOWN_PATH}")
            token = self.pay(found, None)
            with self._lock:
                self._faces[_origin(url)] = found.seller
        return {challenge.TOKEN_HEADER: token}

    def storage_options(self, url: str) -> dict:
        """``storage_options`` for `datasets` streaming from a shard server: its spend-token header."""
        return {"headers": self.headers_for(url)}

    def gradio_client(self, url: str, **options: Any) -> "PaidClient":
        """A `gradio_client.Client` for a paid Space whose calls pay with this AutoPay.

        Gradio's queue answers a refusal inside an error (`hf_escrow.challenge.from_text`):
        `predict` pays it and calls again; a refusal comes before the handler runs.
        """
        from gradio_client import Client
        from gradio_client.exceptions import AppError
        client = Client(url, headers={**options.pop("headers", {}), **self.headers_for(url)}, **options)
        return PaidClient(self, client, client.headers, AppError, lambda error: challenge.from_text(str(error)),
                          retried=("predict",))

    def inference_client(self, base_url: str, *, asynchronous: bool = False, **options: Any) -> "PaidClient":
        """A `huggingface_hub.InferenceClient` (`AsyncInferenceClient` with `asynchronous`) for a
        paid gateway whose calls pay with this AutoPay: a 402 (`HfHubHTTPError`) is paid and
        the call made again.
        """
        from huggingface_hub import AsyncInferenceClient, InferenceClient
        from huggingface_hub.errors import HfHubHTTPError
        kind = AsyncInferenceClient if asynchronous else InferenceClient
        client = kind(base_url=base_url, headers={**options.pop("headers", {}), **self.headers_for(base_url)},
                      **options)

        def found(error: Any) -> Challenge | None:
            answer = getattr(error, "response", None)
            if answer is None:
                return None
            try:
                body = answer.content
            except Exception:   # a streamed answer whose body was not read
                body = None
            return challenge.from_response(answer.status_code, answer.headers, body)
        return PaidClient(self, client, client.headers, HfHubHTTPError, found)

    # ---- closing ----------------------------------------------------------------------

    def close(self) -> dict:
        """Cancel every escrow still open: what is left comes back. Returns what was locked and refunded."""
        with self._lock:
            self.closed = True
            for opened in self._escrows:
                self._cancel(opened)
            self._current.clear()
            return {"escrows": len(self._escrows), "locked_micro": sum(e.amount_micro for e in self._escrows),
                    "refunded_micro": sum(e.refunded_micro for e in self._escrows)}

    def __enter__(self) -> "AutoPay":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    async def __aenter__(self) -> "AutoPay":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await asyncio.to_thread(self.close)


class PaidClient:
    """A client with fixed headers (gradio_client, InferenceClient) whose refused calls AutoPay pays.

    Every attribute is the wrapped client's; its calls (those named in `retried`, or all)
    are made again with a new spend token when they fail with a challenge AutoPay pays.
    """

    def __init__(self, pay: AutoPay, client: Any, headers: dict, error_type: type, challenge_of: Any, *,
                 retried: tuple[str, ...] | None = None):
        self._pay, self._client, self._headers = pay, client, headers
        self._error_type, self._challenge_of, self._retried = error_type, challenge_of, retried

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._client, name)
        if not callable(value) or name.startswith("_") or (self._retried is not None and name not in self._retried):
            return value

        if inspect.iscoroutinefunction(value):
            async def paying_async(*args: Any, **kwargs: Any) -> Any:
                for _ in range(MAX_PAYMENTS_PER_REQUEST):
                    sent = self._headers.get(challenge.TOKEN_HEADER)
                    try:
                        return await value(*args, **kwargs)
                    except self._error_type as error:
                        await asyncio.to_thread(self._paid, error, sent)   # the ledger blocks: off the loop
                return await value(*args, **kwargs)
            return paying_async

        def paying(*args: Any, **kwargs: Any) -> Any:
            for _ in range(MAX_PAYMENTS_PER_REQUEST):
                sent = self._headers.get(challenge.TOKEN_HEADER)
                try:
                    return value(*args, **kwargs)
                except self._error_type as error:
                    self._paid(error, sent)
            return value(*args, **kwargs)
        return paying

    def _paid(self, error: BaseException, sent: str | None) -> None:
        """Pay the challenge a call failed with and take up its token; else raise the failure as it came."""
        found = self._challenge_of(error)
        if found is None:
            raise error
        try:
            self._headers[challenge.TOKEN_HEADER] = self._pay.pay(found, sent)
        except (Forbidden, StateConflict):
            raise error from None


class RequestsAuth:
    """The `requests` side of an AutoPay (``requests.get(url, auth=pay.requests_auth)``).

    Like `EscrowAuth`: a face already paid gets its token; a 402 challenge is paid and the
    request sent again on the same connection adapter, the 402 kept in ``history``.
    """

    def __init__(self, pay: AutoPay):
        self.pay = pay

    def __call__(self, request: Any) -> Any:
        token = self.pay.token_for(request.url)
        if token is not None:
            request.headers[challenge.TOKEN_HEADER] = token
        request.register_hook("response", self._answered)
        return request

    def _answered(self, response: Any, **send_options: Any) -> Any:
        sent = response.request.headers.get(challenge.TOKEN_HEADER)
        for _ in range(MAX_PAYMENTS_PER_REQUEST):
            if response.status_code != 402:
                return response
            token = self.pay.answer(response.request.url, 402, response.headers, response.content, sent)
            if token is None:
                return response
            retry = response.request.copy()
            retry.hooks = {"response": []}    # this loop answers the retry's 402, not a nested hook
            retry.headers[challenge.TOKEN_HEADER] = sent = token
            response.close()
            again = response.connection.send(retry, **send_options)
            again.history.append(response)
            again.request = retry
            response = again
        return response


class EscrowAuth(httpx.Auth):
    """The httpx side of an AutoPay (``httpx.Client(auth=pay.auth)``, sync and async).

    A call to a face already paid carries its spend token; a 402 challenge is paid and
    the call sent again, at most `MAX_PAYMENTS_PER_REQUEST` times; any other answer, or a
    challenge AutoPay will not pay, reaches the caller as it came. Streamed answers stay
    streamed: only a 402's body is read.
    """

    def __init__(self, pay: AutoPay):
        self.pay = pay

    def sync_auth_flow(self, request: httpx.Request):
        sent = self._attach(request, self.pay.token_for(request.url))
        response = yield request
        for _ in range(MAX_PAYMENTS_PER_REQUEST):
            if response.status_code != 402:
                return
            response.read()
            sent = self._attach(request, self.pay.answer(request.url, 402, response.headers, response.content, sent))
            if sent is None:
                return
            response = yield request

    async def async_auth_flow(self, request: httpx.Request):
        sent = self._attach(request, self.pay.token_for(request.url))
        response = yield request
        for _ in range(MAX_PAYMENTS_PER_REQUEST):
            if response.status_code != 402:
                return
            await response.aread()
            # Opening an escrow blocks on the ledger: off the event loop.
            token = await asyncio.to_thread(self.pay.answer, request.url, 402, response.headers, response.content,
                                            sent)
            sent = self._attach(request, token)
            if sent is None:
                return
            response = yield request

    @staticmethod
    def _attach(request: httpx.Request, token: str | None) -> str | None:
        if token is not None:
            request.headers[challenge.TOKEN_HEADER] = token
        return token


def _origin(url: Any) -> str:
    parts = urlsplit(str(url))
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"

