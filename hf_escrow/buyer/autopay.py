"""AutoPay: a buyer's client that pays hf-escrow's 402 challenges by itself, within a mandate.

An agent that meets a paid face (the gateway, a paid Space, the shard server) gets a
402 whose challenge names the seller, the prices and the escrow server
(`hf_escrow.challenge`). AutoPay answers it: it opens an escrow for that seller through
its own escrow client, sized from the price sheet and capped by the mandate, retries
the request with the escrow's spend token, reuses that escrow for later calls, opens
another when the face says it is too small, closed or revoked, and at `close()` (or the
end of a ``with`` block) cancels what is left, so the rest comes back.

The mandate says what may be spent: `budget` in all, at most `max_per_seller` with one
seller and `max_escrow` in one escrow, only with `sellers` (any when None), until
`expires_at`. AutoPay never locks more than the budget: the money it has locked (escrows
opened, less what their cancels refunded) is counted under one lock before each escrow
is opened, so any number of threads and asyncio tasks sharing one AutoPay together stay
within it. Escrows are the
reservation on the ledger: a face can only take what an escrow holds, so spending can
never pass what was locked. A 402 that is not hf-escrow's, that names another escrow
server than AutoPay's client, a seller outside the mandate, or arrives after the
mandate expired is handed back to the caller unchanged; AutoPay never follows it.

When the money runs out, the call raises rather than answer 402, from whichever client
made it: `BudgetExceeded` when the mandate has too little left for the face's smallest
useful escrow, so the caller learns that its money, not the face, stopped the work. A
face the mandate could never pay (outside it, or dearer than it allows in one escrow)
gets its 402 back unchanged (`pay` raises `Declined`).

On a budgeted key (`AutoPay.from_key(agent)` takes the key's own mandate) the ledger
holds every process on the key to one budget. When the ledger refuses an escrow
AutoPay's own mandate allowed (another process spent the key's budget, the seller is off
the key's list, the key was revoked or expired), that refusal is raised as it came,
`BudgetExceeded`, `OutsideMandate` or `KeyInactive`; on `BudgetExceeded` AutoPay first
tries again with what the key has left when that still pays for the refused call.

Example:
    >>> buyer = hf_escrow.connect("http://127.0.0.1:8787", api_key="hfe_...")
    >>> with hf_escrow.AutoPay(buyer, budget="0.05", sellers=["my-space"]) as pay:
    ...     http = httpx.Client(auth=pay.auth)                 # or httpx.AsyncClient(auth=pay.auth)
    ...     requests.get(shard_url, auth=pay.requests_auth)    # requests
    ...     http.post("http://127.0.0.1:8788/v1/chat/completions", json={...})   # 402 -> escrow -> retry
    ...     Client(space_url, headers=pay.headers_for(space_url))              # gradio_client
    ...     load_dataset(..., storage_options=pay.storage_options(shard_url))   # datasets streaming
    >>> agent = hf_escrow.connect("http://127.0.0.1:8787", api_key=budgeted_key.api_key)
    >>> with hf_escrow.AutoPay.from_key(agent) as pay:   # the key's budget, sellers, cap and expiry
    ...     httpx.get(shard_url, auth=pay.auth)
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

from .. import challenge
from .._exceptions import (
    BudgetExceeded, Declined, EscrowError, KeyInactive, StateConflict, TransportError, ValidationError,
)
from ..challenge import Challenge
from ..money import format_usdc, parse_usdc

DEFAULT_CALLS_PER_ESCROW = 20      # an escrow covers this many of the refused call's worst case
DEFAULT_TTL_S = 3600.0
MAX_PAYMENTS_PER_REQUEST = 8       # challenges paid for one request (others may use up each new escrow first)
MAX_ESCROWS = 1_000                # escrows one AutoPay opens in its life
DISCOVERY_TIMEOUT_S = 10.0
MIN_TTL_S = 1.0
LEDGER_TRIES = 3                   # escrows tried per payment when the key's budget shrinks under it

__all__ = ["AutoPay", "Mandate", "Declined", "EscrowAuth", "RequestsAuth", "PaidClient"]


@dataclass(frozen=True)
class Mandate:
    """What an AutoPay may spend: in all, per seller, per escrow, with whom, until when
    (micro-USDC, epoch seconds)."""

    budget_micro: int
    max_per_seller_micro: int | None = None
    sellers: frozenset[str] | None = None
    expires_at: float | None = None
    max_escrow_micro: int | None = None

    @classmethod
    def of(cls, budget: Any, *, max_per_seller: Any = None, sellers: Iterable[str] | None = None,
           expires_at: float | datetime | None = None, max_escrow: Any = None) -> "Mandate":
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
                   expires_at=None if expires_at is None else float(expires_at),
                   max_escrow_micro=None if max_escrow is None else parse_usdc(max_escrow, what="max_escrow"))

    @classmethod
    def of_key(cls, key: Any) -> "Mandate":
        """A budgeted key's mandate (a `BudgetedKey`, as `client.mandate()` answers): what it
        has left now, its sellers, its cap per escrow and its expiry."""
        if not key.active:
            raise ValidationError(f"budgeted key {key.key_id} is no longer active (revoked or expired)")
        if key.left_micro <= 0:
            raise BudgetExceeded(f"budgeted key {key.key_id} has nothing of its {key.budget} USDC budget left",
                                 details={"left_micro": 0, "budget_micro": key.budget_micro})
        return cls(budget_micro=key.left_micro,
                   sellers=None if key.sellers is None else frozenset(key.sellers),
                   expires_at=None if key.expires_at is None else key.expires_at.timestamp(),
                   max_escrow_micro=key.max_escrow_micro)

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
        mandate: a `Mandate`, or give `budget` (and `max_per_seller`, `sellers`, `expires_at`,
            `max_escrow`); `AutoPay.from_key` takes a budgeted key's own.
        calls_per_escrow: an escrow is sized for this many of the challenged call's price
            (at least the face's smallest useful escrow), capped by what the mandate leaves.
        ttl_seconds: the escrows' TTL (never past the mandate's expiry).
    """

    def __init__(self, escrow: Any, mandate: Mandate | None = None, *, budget: Any = None, max_per_seller: Any = None,
                 sellers: Iterable[str] | None = None, expires_at: float | datetime | None = None,
                 max_escrow: Any = None, calls_per_escrow: int = DEFAULT_CALLS_PER_ESCROW,
                 ttl_seconds: float = DEFAULT_TTL_S):
        from ..client import AsyncEscrowClient
        if not callable(getattr(escrow, "create_escrow", None)) or isinstance(escrow, AsyncEscrowClient):
            raise ValidationError("AutoPay needs the buyer's synchronous EscrowClient (hf_escrow.connect(...))")
        if mandate is None:
            if budget is None:
                raise ValidationError("give AutoPay a mandate: budget= (and max_per_seller=, sellers=, expires_at=), "
                                      "or AutoPay.from_key(client) on a budgeted key")
            mandate = Mandate.of(budget, max_per_seller=max_per_seller, sellers=sellers, expires_at=expires_at,
                                 max_escrow=max_escrow)
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

    @classmethod
    def from_key(cls, escrow: Any, **options: Any) -> "AutoPay":
        """An AutoPay whose mandate is its client's budgeted key's own (`escrow.mandate()`):
        the budget it has left now, its sellers, its cap per escrow, its expiry. The
        ledger holds every process on the key to the same budget; `options` as for AutoPay."""
        mandate = getattr(escrow, "mandate", None)
        if not callable(mandate):
            raise ValidationError("AutoPay.from_key needs the sub-agent's EscrowClient, connected with its "
                                  "budgeted key")
        return cls(escrow, Mandate.of_key(mandate()), **options)

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
        """The spend token to retry a challenged call with; raises `Declined` when the mandate
        does not pay this face, `BudgetExceeded` when it has too little left, and the
        ledger's refusal (`BudgetExceeded`, `OutsideMandate`, `KeyInactive`) as it came.

        `sent_token` is the token the refused call carried: a token another thread has put
        in its place since is returned as it is; a refused current token is retired first
        (its escrow cancelled, the refund counted back).
        """
        why = self._foreign(found)
        if why:
            raise Declined(f"AutoPay will not pay this challenge: {why}")
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
        ceiling = min(x for x in (self.mandate.budget_micro, self.mandate.max_per_seller_micro,
                                  self.mandate.max_escrow_micro) if x is not None)
        if ceiling < need:   # too dear for this mandate, spent or not: the face's 402 is the caller's answer
            raise Declined(f"the mandate allows at most {format_usdc(ceiling)} USDC in one escrow with seller "
                           f"{found.seller!r}, and its face asks for at least {format_usdc(need)} USDC")
        cap = self.left_micro(found.seller)
        if self.mandate.max_escrow_micro is not None:
            cap = min(cap, self.mandate.max_escrow_micro)
        if cap < need:
            raise BudgetExceeded(f"AutoPay's mandate has {format_usdc(cap)} USDC left for seller {found.seller!r} "
                                 f"and the face asks for at least {format_usdc(need)} USDC; what escrows left "
                                 f"unspent comes back at close()", details={
                                     "left_micro": cap, "budget_micro": self.mandate.budget_micro})
        if len(self._escrows) >= MAX_ESCROWS:
            raise Declined(f"this AutoPay opened {MAX_ESCROWS} escrows already; open a new one")
        ttl = self.ttl_seconds
        if self.mandate.expires_at is not None:
            ttl = min(ttl, max(self.mandate.expires_at - time.time(), MIN_TTL_S))
        amount = min(need * self.calls_per_escrow, cap)
        tries = 1
        while True:
            try:
                return self._lock_escrow(found.seller, amount, ttl)
            except BudgetExceeded as refusal:
                # Other holders of the key spent part of its budget: what is left may still pay this call.
                left = refusal.details.get("left_micro")
                if tries >= LEDGER_TRIES or isinstance(left, bool) or not isinstance(left, int) or left < need:
                    raise
                amount, tries = min(amount, left), tries + 1

    def _lock_escrow(self, seller: str, amount: int, ttl: float) -> _Escrow:
        """Open one escrow through the ledger, counted in the books first."""
        # Counted before the ledger call: a create lost in transit may still have locked it.
        self._books.add(seller, amount)
        try:
            made = self.escrow.create_escrow(seller, format_usdc(amount), ttl_seconds=ttl,
                                             description="opened by AutoPay", meta={"autopay": True})
        except EscrowError as error:
            if not isinstance(error, TransportError):   # refused by the ledger: nothing was locked
                self._books.add(seller, -amount)
            raise
        opened = _Escrow(seller, made.id, made.spend_token, amount)
        self._escrows.append(opened)
        self._current[seller] = opened
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
            refunded = self.escrow.cancel(old.escrow_id, reason="AutoPay closed it").refunded_micro
        except StateConflict:          # closed meanwhile (expired, released): its refund is not ours to count
            return
        except KeyInactive:            # the key was revoked: its escrows are its owner's to cancel now
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
        except (Declined, StateConflict):   # not the mandate's to pay, or closed: the caller gets the 402
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
        ``InferenceClient(base_url, headers=...)``. Raises `Declined` when the face is not
        hf-escrow's or the mandate does not allow it, and the ledger's refusal as it came.
        """
        token = self.token_for(url)
        if token is None:
            answer = httpx.get(_origin(url) + challenge.WELL_KNOWN_PATH, timeout=DISCOVERY_TIMEOUT_S)
            found = challenge.parse(answer.json()) if answer.status_code == 200 else None
            if found is None:
                raise Declined(f"{_origin(url)} publishes no hf-escrow offer at {challenge.WELL_KNOWN_PATH}")
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
        except (Declined, StateConflict):
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

