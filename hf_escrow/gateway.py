"""A metered OpenAI-compatible gateway: sellers put it in front of vLLM, TGI or
`transformers serve` and charge each buyer's escrow for exactly the tokens delivered.

A request carries the buyer's escrow (`X-Escrow-Id`, or `escrow_id` in the body) and the
buyer's key (`Authorization: Bearer`). The gateway checks that the key owns the escrow,
reserves the worst case (prompt + max_tokens at the output price; 402 and the upstream
untouched if the escrow cannot cover it), forwards the request, streams the answer back
byte for byte as it arrives, and deducts the delivered tokens x price - the upstream's
`usage`, else the tokens counted in what reached the client - when the answer ends or
the client goes away. An upstream error costs nothing.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from typing import Any

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from ._exceptions import EscrowError, Forbidden, StateConflict, ValidationError
from .metering import Meter, TokenCounter
from .money import to_usdc
from .pricing import Pricing

DEFAULT_MAX_TOKENS = 256
MAX_METERS = 10_000            # escrows tracked at once; the oldest idle ones are forgotten
IDENTITY_TTL_S = 30.0          # how long a checked (key, escrow) pair is trusted
UPSTREAM_TIMEOUT_S = 300.0


class _Gate:
    """Who may spend which escrow, and each escrow's reservations (seller side)."""

    def __init__(self, escrow: Any, pricing: Pricing):
        self.escrow = escrow
        self.pricing = pricing
        self._meters: OrderedDict[str, Meter] = OrderedDict()
        self._checked: dict[tuple[str, str], float] = {}

    def admit(self, escrow_id: str | None, key: str | None) -> Meter:
        """The meter of an escrow the caller owns, after the ownership and state checks."""
        if not escrow_id or not isinstance(escrow_id, str):
            raise ValidationError("send the buyer's escrow id in the X-Escrow-Id header (or escrow_id in the body)")
        if (key, escrow_id) not in self._checked or time.monotonic() - self._checked[(key, escrow_id)] > IDENTITY_TTL_S:
            buyer = self.escrow.identify(key)
            escrow = self.escrow.get(escrow_id)
            if escrow.buyer != buyer:
                raise Forbidden(f"escrow {escrow_id} belongs to another buyer; pay with your own escrow")
            if escrow.status != "active":
                raise StateConflict(f"escrow {escrow_id} is {escrow.status}; open a new one")
            self._checked[(key, escrow_id)] = time.monotonic()
            if escrow_id not in self._meters:
                self._meters[escrow_id] = Meter(escrow_id, self.pricing, int(escrow.remaining * 1_000_000))
            if len(self._checked) > MAX_METERS:
                self._checked.clear()
        self._meters.move_to_end(escrow_id)
        while len(self._meters) > MAX_METERS:
            self._meters.popitem(last=False)
        return self._meters[escrow_id]

    def settle(self, meter: Meter, ticket: int, tokens_in: int, tokens_out: int, how: str) -> None:
        """Deduct what was delivered (the seller's own deduction); frees the reservation."""
        cost = self.pricing.tokens_micro(tokens_in, tokens_out)
        paid = 0
        try:
            if cost:
                self.escrow.deduct(meter.escrow_id, to_usdc(cost), reason=f"tokens ({how})",
                                   usage={"prompt_tokens": tokens_in, "completion_tokens": tokens_out})
                paid = cost
        finally:
            meter.release_ticket(ticket, paid)


def create_gateway(upstream: str, *, escrow: Any, pricing: Any, tokenizer: Any = None,
                   max_tokens: int = DEFAULT_MAX_TOKENS) -> FastAPI:
    """The gateway app: `escrow` is the seller's EscrowClient, `upstream` ends in `/v1`.

    Example:
        >>> import uvicorn, hf_escrow
        >>> app = create_gateway("http://127.0.0.1:8000/v1", escrow=hf_escrow.connect(agent="seller"),
        ...                      pricing={"input_per_1k": "0.0005", "output_per_1k": "0.0015"})
        >>> uvicorn.run(app, host="127.0.0.1", port=8788)  # doctest: +SKIP
    """
    sheet = Pricing.coerce(pricing)
    if sheet is None or not sheet.sells_tokens:
        raise ValidationError("the gateway needs token prices, e.g. input_per_1k and output_per_1k")
    gate = _Gate(escrow, sheet)
    counter = TokenCounter(tokenizer)
    upstream = upstream.rstrip("/")
    app = FastAPI(title="hf-escrow gateway", version="0.1.0")
    client = httpx.AsyncClient(timeout=httpx.Timeout(UPSTREAM_TIMEOUT_S, connect=10.0))
    app.router.on_shutdown.append(client.aclose)

    @app.exception_handler(EscrowError)
    async def escrow_error(request: Request, error: EscrowError) -> JSONResponse:
        return JSONResponse({"error": {"type": error.code, "message": error.message}}, status_code=error.status_code)

    @app.get("/v1/models")
    async def models() -> Response:
        answer = await client.get(f"{upstream}/models")
        return Response(answer.content, status_code=answer.status_code, media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"ok": True, "upstream": upstream}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise ValidationError("the request body must be JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            raise ValidationError("a chat request needs a JSON body with a messages list")
        escrow_id = request.headers.get("x-escrow-id") or body.pop("escrow_id", None)
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        meter = await anyio.to_thread.run_sync(gate.admit, escrow_id, key)
        body["max_tokens"] = _max_tokens(body, max_tokens)
        prompt_tokens, _ = counter.prompt_tokens(body["messages"])
        ticket = meter.reserve(meter.worst_chat_micro(prompt_tokens, body["max_tokens"]))
        headers = {"Content-Type": "application/json"}
        try:
            if body.get("stream"):
                upstream_request = client.build_request("POST", f"{upstream}/chat/completions", json=body,
                                                        headers=headers)
                answer = await client.send(upstream_request, stream=True)
            else:
                answer = await client.post(f"{upstream}/chat/completions", json=body, headers=headers)
        except httpx.HTTPError as error:
            meter.release_ticket(ticket, 0)
            return JSONResponse({"error": {"type": "upstream_unreachable", "message": str(error)}}, status_code=502)
        if answer.status_code >= 400:
            meter.release_ticket(ticket, 0)
            content = await answer.aread()
            await answer.aclose()
            return Response(content, status_code=answer.status_code, media_type="application/json")
        if not body.get("stream"):
            usage = answer.json().get("usage") or {}
            await anyio.to_thread.run_sync(gate.settle, meter, ticket, usage.get("prompt_tokens", prompt_tokens),
                                           usage.get("completion_tokens", 0), "usage")
            return Response(answer.content, status_code=answer.status_code, media_type="application/json")
        delivery = _Delivery(gate, meter, ticket, counter, prompt_tokens)
        # A finished stream settles after its last byte is sent, so billing adds nothing to it.
        return StreamingResponse(_relay(answer, delivery), background=BackgroundTask(delivery.settle),
                                 media_type=answer.headers.get("content-type", "text/event-stream"))

    return app


def _max_tokens(body: dict, default: int) -> int:
    value = body.get("max_tokens", body.get("max_completion_tokens"))
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1_000_000:
        raise ValidationError("max_tokens must be a whole number from 1 to 1000000")
    return value


class _Delivery:
    """What a stream delivered so far, settled once: after the last byte, or on a disconnect."""

    def __init__(self, gate: _Gate, meter: Meter, ticket: int, counter: TokenCounter, prompt_tokens: int):
        self.gate, self.meter, self.ticket, self.counter = gate, meter, ticket, counter
        self.prompt_tokens = prompt_tokens
        self.text: list[str] = []
        self.chunks = 0
        self.usage: dict | None = None
        self.settled = False

    def add(self, line: bytes) -> None:
        event = _sse_json(line)
        if event is None:
            return
        self.usage = event.get("usage") or self.usage
        piece = _delta_text(event)
        if piece:
            self.text.append(piece)
            self.chunks += 1

    async def settle(self) -> None:
        if self.settled:
            return
        self.settled = True
        if self.usage and self.usage.get("completion_tokens") is not None:
            tokens_in = self.usage.get("prompt_tokens", self.prompt_tokens)
            tokens_out, how = self.usage["completion_tokens"], "usage"
        elif self.chunks:
            tokens_out, how = self.counter.text_tokens("".join(self.text), fallback=self.chunks)
            tokens_in = self.prompt_tokens
        else:
            self.meter.release_ticket(self.ticket, 0)  # nothing delivered, nothing to pay
            return
        await anyio.to_thread.run_sync(self.gate.settle, self.meter, self.ticket, tokens_in, tokens_out, how)


async def _relay(answer: httpx.Response, delivery: _Delivery):
    """Pass the upstream's bytes through as they come; count what reached the client."""
    pending = b""
    finished = False
    try:
        async for raw in answer.aiter_raw():
            yield raw  # returns only once the client took it: what follows counts as delivered
            pending += raw
            *lines, pending = pending.split(b"\n")
            for line in lines:
                delivery.add(line)
        finished = True
    finally:
        with anyio.CancelScope(shield=True):  # a client that went away still pays what it got
            await answer.aclose()
            if not finished:
                await delivery.settle()


def _sse_json(line: bytes) -> dict | None:
    line = line.strip()
    if not line.startswith(b"data:"):
        return None
    payload = line[5:].strip()
    if not payload or payload == b"[DONE]":
        return None
    try:
        event = json.loads(payload)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def _delta_text(event: dict) -> str:
    choices = event.get("choices") or []
    delta = choices[0].get("delta") if choices and isinstance(choices[0], dict) else None
    return (delta or {}).get("content") or ""
