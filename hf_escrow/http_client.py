"""HTTP transports for `connect(url)` / `connect_async(url)`, on httpx.

Each call becomes one request to the server's `/api` routes. Every mutation carries an
`Idempotency-Key` (the caller's, or a fresh one per call); retries after connection
errors, timeouts and 5xx answers resend the same key, so a retry never moves money twice.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from typing import Any
from urllib.parse import quote

import httpx

from ._exceptions import InvalidAmount, TransportError, ValidationError, error_for_status
from ._models import Agent
from .credentials import SPEND_TOKEN_PREFIX
from .money import to_decimal
from .retries import Backoff

RETRY_STATUSES = (502, 503, 504)
BACKOFF = Backoff(0.2, exponential=True, cap_s=3.0, jitter=True)   # tries: max_retries + 1
_LOST = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
_MUTATIONS = {"claim_faucet", "create_escrow", "deduct", "release", "cancel", "submit_result", "verify",
              "mint_spend_token", "revoke_spend_tokens", "hold", "capture", "void", "capture_many", "create_key"}


def _amount(value: Any, *, required: bool = True) -> Any:
    """An amount as it travels: checked here first, so that NaN, inf, bools and None raise
    the same `InvalidAmount` as the embedded client; Decimals go as exact strings."""
    if value is None and not required:
        return None
    to_decimal(value)
    return value if isinstance(value, (int, float, str)) else str(value)


def build_request(op: str, params: dict, agent: str | None) -> tuple[str, str, dict | None, dict | None]:
    """(method, path, json body, query) for one client operation."""
    p = dict(params)
    escrow_id = p.pop("escrow_id", None)
    p.pop("idempotency_key", None)
    if op == "register":
        return "POST", "/register", {"agent_id": p["agent_id"], "referral_code": p["referral_code"]}, None
    if op == "claim_faucet":
        return "POST", "/claim", {"agent_id": agent}, None
    if op == "me":
        return "GET", "/api/me", None, None
    if op == "rotate_key":
        return "POST", "/api/me/key", None, None
    if op == "analytics":
        return "GET", "/api/analytics", None, None
    if op == "history":
        return "GET", "/api/escrow", None, {k: v for k, v in p.items() if v is not None}
    if op == "get":
        return "GET", f"/api/escrow/{escrow_id}", None, None
    if op == "create_escrow":
        body = dict(p, seller_id=p.pop("seller"), amount_usdc=_amount(p.pop("amount")))
        return "POST", "/api/escrow", body, None
    if op in ("deduct", "release"):
        body = dict(p, amount_usdc=_amount(p.pop("amount"), required=op == "deduct"))
        if "price_per_token" in body:
            body["price_per_token"] = _amount(body["price_per_token"], required=False)
        return "POST", f"/api/escrow/{escrow_id}/{op}", body, None
    if op in _HOLD_OPS:
        return _hold_request(op, p, escrow_id)
    if op in _KEY_OPS:
        return _key_request(op, p)
    path = {"cancel": "cancel", "submit_result": "submit-result", "verify": "verify"}[op]
    return "POST", f"/api/escrow/{escrow_id}/{path}", p, None


_HOLD_OPS = {"mint_spend_token", "revoke_spend_tokens", "hold", "capture", "void", "capture_many", "get_hold",
             "holds"}


def _segment(value: Any, what: str) -> str:
    """An id as it travels in a path: quoted, so that '?' or '#' in it stay part of it (the
    server's routes take '/' too), and the ledger refuses it as it does embedded."""
    if not isinstance(value, str):
        raise ValidationError(f"{what} must be a string, got {type(value).__name__}")
    return quote(value, safe="")


def _number(value: Any) -> Any:
    """A number as JSON carries it; anything else (NaN, a Decimal) as text, which the server
    refuses with the same ValidationError the embedded ledger raises."""
    if value is None or isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
        return value
    return str(value)


def _item_amount(index: int, value: Any) -> Any:
    """A batch item's amount, refused (the whole batch, as the ledger does) with its index."""
    try:
        return _amount(value)
    except InvalidAmount as error:
        raise InvalidAmount(f"capture {index}: {error.message}") from None


def _hold_request(op: str, p: dict, escrow_id: Any) -> tuple[str, str, dict | None, dict | None]:
    """Requests of the holds and spend-token routes (see `hf_escrow.server.app`)."""
    if op in ("mint_spend_token", "revoke_spend_tokens"):
        return ("POST" if op == "mint_spend_token" else "DELETE"), \
            f"/api/escrow/{_segment(escrow_id, 'escrow_id')}/tokens", None, None
    if op == "holds":
        return "GET", f"/api/escrow/{_segment(escrow_id, 'escrow_id')}/holds", None, None
    if op == "hold":
        target = p["target"]
        body = {"amount_usdc": _amount(p["amount"]), "ttl_seconds": _number(p["ttl_seconds"])}
        if isinstance(target, str) and target.startswith(SPEND_TOKEN_PREFIX):
            # The token travels in the body, never in a URL that proxies and access logs keep.
            return "POST", "/api/holds", dict(body, spend_token=target), None
        return "POST", f"/api/escrow/{_segment(target, 'hold target')}/holds", body, None
    if op == "capture_many":
        items = [{"hold_id": item["hold_id"], "amount_usdc": _item_amount(index, item["amount"]),
                  "final": item["final"], "usage": item["usage"], "idempotency_key": item["idempotency_key"]}
                 for index, item in enumerate(p["items"])]
        return "POST", "/api/holds/capture", {"items": items}, None
    hold_id = _segment(p["hold_id"], "hold_id")
    if op == "get_hold":
        return "GET", f"/api/holds/{hold_id}", None, None
    if op == "capture":
        body = {"amount_usdc": _amount(p["amount"]), "final": p["final"], "usage": p["usage"]}
        return "POST", f"/api/holds/{hold_id}/capture", body, None
    return "POST", f"/api/holds/{hold_id}/void", None, None


_KEY_OPS = {"create_key", "revoke_key", "keys", "mandate"}


def _key_request(op: str, p: dict) -> tuple[str, str, dict | None, dict | None]:
    """Requests of the budgeted-key routes (see `hf_escrow.server.app`)."""
    if op == "create_key":
        body = {"budget_usdc": _amount(p["budget"]), "max_escrow_usdc": _amount(p["max_escrow"], required=False),
                "sellers": p["sellers"], "expires_in": _number(p["expires_in"]), "label": p["label"]}
        return "POST", "/api/keys", body, None
    if op == "keys":
        return "GET", "/api/keys", None, {"limit": p["limit"]}
    if op == "mandate":
        key_id = p["key_id"]
        return "GET", "/api/keys/" + ("me" if key_id is None else _segment(key_id, "key_id")), None, None
    if not isinstance(p["cancel_escrows"], bool):
        raise ValidationError("cancel_escrows must be true or false")
    return "DELETE", f"/api/keys/{_segment(p['key_id'], 'key_id')}", None, \
        {"cancel_escrows": "true" if p["cancel_escrows"] else "false"}


def _drop_usdc(data: Any) -> Any:
    """The client reads the exact `*_micro` integers; the `*_usdc` numbers are for people."""
    if isinstance(data, list):
        return [_drop_usdc(item) for item in data]
    if isinstance(data, dict):
        return {k: _drop_usdc(v) for k, v in data.items() if not k.endswith("_usdc")}
    return data


class _Base:
    def __init__(self, base_url: str, *, api_key: str | None, timeout: float, max_retries: int):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.max_retries = max(0, min(max_retries, 10))
        self.agent_id: str | None = None

    def adopt(self, agent: Agent) -> None:
        if self.api_key is None and agent.api_key:
            self.api_key = agent.api_key

    def _prepare(self, op: str, params: dict, agent: str | None) -> tuple[dict, dict]:
        method, path, body, query = build_request(op, params, agent or self.agent_id)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        if op in _MUTATIONS:
            headers["Idempotency-Key"] = params.get("idempotency_key") or f"hfe-{uuid.uuid4()}"
        request = {"method": method, "url": self.base_url + path, "json": body, "params": query, "headers": headers}
        # A fresh key each time: neither is resent once it may have reached the server.
        return request, {"retry_on_connect_only": op in ("register", "rotate_key")}

    def _backoff(self, attempt: int) -> float:
        return BACKOFF.delay_s(attempt)

    def _retryable(self, error: Exception | None, response: httpx.Response | None, connect_only: bool) -> bool:
        if error is not None:
            # A request that reached the server may have done its work; only a keyed or a
            # read-only request may go again, and register (fresh key each time) may not.
            return isinstance(error, httpx.ConnectError) or (not connect_only and isinstance(error, _LOST))
        return not connect_only and response is not None and response.status_code in RETRY_STATUSES

    def _result(self, op: str, response: httpx.Response) -> Any:
        try:
            body = response.json()
        except ValueError:
            body = {"message": response.text[:300]}
        if response.status_code >= 400:
            raise error_for_status(response.status_code, body, response=response)
        if op == "me":
            self.agent_id = body.get("agent_id")
        if op == "rotate_key":
            self.api_key = body["api_key"]  # the old key stopped with this answer
        return _drop_usdc(body)

    def _unreachable(self, error: Exception, tries: int) -> TransportError:
        times = "1 try" if tries == 1 else f"{tries} tries"
        return TransportError(f"escrow server {self.base_url} unreachable after {times}: "
                              f"{type(error).__name__}: {error}")


class HTTPTransport(_Base):
    """Blocking transport for `EscrowClient`."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 30.0, max_retries: int = 3):
        super().__init__(base_url, api_key=api_key, timeout=timeout, max_retries=max_retries)
        self._http = httpx.Client(timeout=timeout)

    def handle(self, client: Any, op: str, params: dict) -> Any:
        if op == "claim_faucet" and self.agent_id is None:
            self._result("me", self._http.get(self.base_url + "/api/me", headers=self._prepare("me", {}, None)[0]["headers"]))
        request, opts = self._prepare(op, params, client.agent)
        for attempt in range(self.max_retries + 1):
            error = response = None
            try:
                response = self._http.request(**request)
            except httpx.TransportError as exc:
                error = exc
            if attempt < self.max_retries and self._retryable(error, response, opts["retry_on_connect_only"]):
                time.sleep(self._backoff(attempt))
                continue
            if error is not None:
                raise self._unreachable(error, attempt + 1) from error
            return self._result(op, response)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._http.close()


class AsyncHTTPTransport(_Base):
    """Async transport for `AsyncEscrowClient`: the same requests, awaited."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 30.0, max_retries: int = 3):
        super().__init__(base_url, api_key=api_key, timeout=timeout, max_retries=max_retries)
        self._http = httpx.AsyncClient(timeout=timeout)

    async def handle(self, client: Any, op: str, params: dict) -> Any:
        if op == "claim_faucet" and self.agent_id is None:
            me = await self._http.get(self.base_url + "/api/me", headers=self._prepare("me", {}, None)[0]["headers"])
            self._result("me", me)
        request, opts = self._prepare(op, params, client.agent)
        for attempt in range(self.max_retries + 1):
            error = response = None
            try:
                response = await self._http.request(**request)
            except httpx.TransportError as exc:
                error = exc
            if attempt < self.max_retries and self._retryable(error, response, opts["retry_on_connect_only"]):
                await asyncio.sleep(self._backoff(attempt))
                continue
            if error is not None:
                raise self._unreachable(error, attempt + 1) from error
            return self._result(op, response)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await self._http.aclose()
