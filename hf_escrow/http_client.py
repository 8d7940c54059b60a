"""HTTP transports for `connect(url)` / `connect_async(url)`, on httpx.

Each call becomes one request to the server's `/api` routes, built as its row in
`hf_escrow.operations` says. Every keyed operation carries an `Idempotency-Key` (the
caller's, or a fresh one per call); retries after connection errors, timeouts and 5xx
answers resend the same key, so a retry never moves money twice.
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
from .operations import ACTING, AMOUNT, FLAG, IN_BODY, ITEMS, NUMBER, OPERATIONS, PATH, QUERY, TARGET, Field, Operation
from .retries import Backoff

RETRY_STATUSES = (502, 503, 504)
BACKOFF = Backoff(0.2, exponential=True, cap_s=3.0, jitter=True)   # tries: max_retries + 1
_LOST = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


def _amount(value: Any, *, required: bool = True) -> Any:
    """An amount as it travels: checked here first, so that NaN, inf, bools and None raise
    the same `InvalidAmount` as the embedded client; Decimals go as exact strings."""
    if value is None and not required:
        return None
    to_decimal(value)
    return value if isinstance(value, (int, float, str)) else str(value)


def build_request(op: str, params: dict, agent: str | None) -> tuple[str, str, dict | None, dict | None]:
    """(method, path, json body, query) for one client operation, as its row in
    `hf_escrow.operations` says each field travels."""
    spec = OPERATIONS[op]
    path, body, query = spec.path, {}, {}
    for field in spec.fields:
        value = agent if field.how == ACTING else params[field.name]
        if field.how in (PATH, TARGET):
            if field.how == TARGET and isinstance(value, str) and value.startswith(SPEND_TOKEN_PREFIX):
                # The token travels in the body, never in a URL that proxies and access logs keep.
                path, body["spend_token"] = spec.token_path, value
                continue
            segment = field.none_segment if value is None and field.none_segment else \
                _segment(value, "hold target" if field.how == TARGET else field.name, strict=field.strict)
            path = path.replace("{" + field.name + "}", segment)
        elif field.how == QUERY:
            if value is not None or field.required:
                query[field.sent_as] = value
        elif field.how == FLAG:
            if not isinstance(value, bool):
                raise ValidationError(f"{field.name} must be true or false")
            query[field.sent_as] = "true" if value else "false"
        else:
            body[field.sent_as] = _wire_value(field, value, spec)
    return spec.method, path, body if any(f.how in IN_BODY for f in spec.fields) else None, query or None


def _wire_value(field: Field, value: Any, spec: Operation) -> Any:
    if field.how == AMOUNT:
        return _amount(value, required=field.required)
    if field.how == NUMBER:
        return _number(value)
    if field.how == ITEMS:
        return [{f.sent_as: _item_value(spec.item_noun, index, f, item[f.name]) for f in spec.item}
                for index, item in enumerate(value)]
    return value


def _segment(value: Any, what: str, *, strict: bool = True) -> str:
    """An id as it travels in a path: quoted, so that '?' or '#' in it stay part of it (the
    server's routes take '/' too), and the ledger refuses it as it does embedded. Strict: a
    string or a ValidationError; else any value as its text (an unknown id to the ledger)."""
    if not isinstance(value, str):
        if strict:
            raise ValidationError(f"{what} must be a string, got {type(value).__name__}")
        value = str(value)
    return quote(value, safe="")


def _number(value: Any) -> Any:
    """A number as JSON carries it; anything else (NaN, a Decimal) as text, which the server
    refuses with the same ValidationError the embedded ledger raises."""
    if value is None or isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
        return value
    return str(value)


def _item_value(noun: str, index: int, field: Field, value: Any) -> Any:
    """A batch item's field; a bad amount refuses the whole batch (as the ledger does), with its index."""
    try:
        return _wire_value(field, value, None)
    except InvalidAmount as error:
        raise InvalidAmount(f"{noun} {index}: {error.message}") from None


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
        spec = OPERATIONS[op]
        if spec.keyed:
            headers["Idempotency-Key"] = params.get("idempotency_key") or f"hfe-{uuid.uuid4()}"
        request = {"method": method, "url": self.base_url + path, "json": body, "params": query, "headers": headers}
        return request, {"retry_on_connect_only": not spec.resend}

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
