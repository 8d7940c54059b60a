"""A metered OpenAI-compatible gateway: sellers put it in front of vLLM, TGI, TEI or
`transformers serve` and are paid from each buyer's escrow for the work delivered.

It meters every route its upstream bills: ``/v1/chat/completions`` and
``/v1/completions`` per token (as below), ``/v1/embeddings`` per vector (or, when the
price sheet sets no ``per_vector``, per input token by the server's ``usage``), and
``/embed``, the same embeddings in the shape Text Embeddings Inference and
``InferenceClient.feature_extraction`` speak. ``/v1/models`` is free and passes
through; every other route is refused (404), since it would be work nobody pays for.
A route the price sheet does not price is refused the same way.

How money moves, per generation request (chat or completion):

1. The buyer sends the escrow's spend token in ``X-Escrow-Token`` (never its API key: a
   request carrying ``Authorization: Bearer hfe_...`` and no token is refused with 402).
2. The gateway prices the worst case, prompt tokens plus the output limit at the output
   price, and opens a tab on the seller's till: one ledger hold of that amount. The ledger
   admits the request (token live, escrow active and paying this seller, enough free);
   nothing is cached, so a cancel or a revoke stops the very next request, in every
   gateway process on the same ledger. A refusal answers 402 with the machine-readable
   challenge of `hf_escrow.challenge` (why, whom to pay, the prices) and the upstream
   never sees the request.
3. The upstream is told the limit that was held (``max_tokens`` and
   ``max_completion_tokens`` both) and, for streams, to report ``usage``. Neither
   ``X-Escrow-Token`` nor ``Authorization`` is forwarded.
4. A stream is paid as it flows: every `CAPTURE_EVERY` content chunks the delivered slice
   is captured from the hold (in the background, so relaying waits on the ledger only if
   the previous capture has not landed yet), and when the stream ends the server's
   ``usage`` settles the total, never more than was held. A disconnect, a cancel or a
   crash of this process leaves at most `MAX_UNPAID_CHUNKS` delivered chunks unpaid; after
   a crash the hold expires and the rest returns to the buyer. The gateway stops relaying
   when the hold is used up or a capture reports the escrow closed. A plain answer is paid
   with its ``usage`` in one final capture.
5. An upstream error, or an unreachable upstream, voids the hold: the buyer pays nothing.

With ``lease_calls`` (`create_gateway(..., lease_calls=N, flush_ms=...)`) plain answers and
embeddings go on the batched path instead (`hf_escrow.seller.lease`): each request
reserves its worst case on a lease hold of its escrow in memory, and what it cost is
captured by the lease's next flush (one `capture_many` every `flush_ms`, and at
shutdown), so a request waits on no ledger round trip and a crash loses at most one
flush interval of delivered answers. Streams keep a hold each, paid as they flow.

An embedding request holds its exact price (inputs x ``per_vector``) or its worst case
(the inputs' UTF-8 bytes plus `EMBED_OVERHEAD_TOKENS` each, an upper bound of any
tokenizer's count; token-id inputs exactly), and captures the vectors returned (at most
one per input) or the ``usage.prompt_tokens`` the server reports, never more than held,
just after the answer leaves (the hold already reserves it, as for a finished stream).

Errors are JSON ``{"error": code, "message": ...}``, the shape the escrow server uses;
a stream cut short ends with one such ``data:`` event.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from .. import __version__, challenge
from .._exceptions import EscrowError, NotFound, PaymentRequired, StateConflict, ValidationError
from ..ops.metrics import install_ops
from ..ops.operator import admin_key
from ..pricing import Pricing
from ..tokens import TokenCounter
from ..challenge import check_token, spend_token_from
from .lease import DEFAULT_FLUSH_MS, Charge
from .till import Tab, Till

DEFAULT_MAX_TOKENS = 256
MAX_OUTPUT_TOKENS = 1_000_000
MAX_UNPAID_CHUNKS = 64         # the most content chunks a disconnect, a cancel or a crash leaves unpaid
# A capture starts every half of that, one in flight at a time: when chunk c goes out, the
# captures that landed cover at least c - MAX_UNPAID_CHUNKS.
CAPTURE_EVERY = MAX_UNPAID_CHUNKS // 2
UPSTREAM_TIMEOUT_S = 300.0
DEFAULT_HOLD_TTL_S = UPSTREAM_TIMEOUT_S  # a stream must finish inside its hold; the ledger caps it
UPSTREAM_ERROR_CHARS = 500
MAX_EMBED_INPUTS = 2048        # OpenAI's own limit on inputs per embeddings request
EMBED_OVERHEAD_TOKENS = 8      # special tokens an embedding tokenizer adds per input, at most

log = logging.getLogger(__name__)


def create_gateway(upstream: str, *, escrow: Any, pricing: Any, tokenizer: Any = None,
                   max_tokens: int = DEFAULT_MAX_TOKENS, hold_ttl_s: float = DEFAULT_HOLD_TTL_S,
                   escrow_url: str | None = None, lease_calls: int | None = None,
                   flush_ms: float = DEFAULT_FLUSH_MS) -> FastAPI:
    """The gateway app: `escrow` is the seller's EscrowClient, `upstream` ends in `/v1`.

    `max_tokens` is the output limit of requests that set none; `hold_ttl_s` how long a
    request's hold lives: a stream must end within it, and a crashed gateway's holds return
    to their buyers after it. Refusals to pay answer 402 with the challenge of
    `hf_escrow.challenge` (also at ``/.well-known/hf-escrow``); `escrow_url` is the escrow
    server it names, when buyers reach it under another URL than the seller's client.
    `lease_calls` puts plain answers and embeddings on the batched path (module
    docstring), flushed every `flush_ms`.

    Example:
        >>> import uvicorn, hf_escrow
        >>> app = create_gateway("http://127.0.0.1:8000/v1", escrow=hf_escrow.connect(agent="seller"),
        ...                      pricing={"input_per_1k": "0.0005", "output_per_1k": "0.0015"})
        >>> uvicorn.run(app, host="127.0.0.1", port=8788)  # doctest: +SKIP
    """
    sheet = Pricing.coerce(pricing)
    if sheet is None or not (sheet.sells_tokens or sheet.per_vector is not None):
        raise ValidationError("the gateway needs token prices (input_per_1k and output_per_1k) for chat and "
                              "completions, or per_vector for embeddings")
    _check_limit(max_tokens, "max_tokens")
    till = Till(escrow, hold_ttl_s=hold_ttl_s)
    leases = till.leases(lease_calls=lease_calls, flush_ms=flush_ms) if lease_calls is not None else None
    gateway = _Gateway(upstream.rstrip("/"), till, sheet, TokenCounter(tokenizer), max_tokens, leases)
    app = FastAPI(title="hf-escrow gateway", version=__version__)
    install_ops(app, ready=escrow.me, admin_key=admin_key())
    app.router.on_shutdown.append(gateway.client.aclose)
    if leases is not None:
        async def pay_what_is_owed() -> None:   # the last flush: the batched path paid, its holds freed
            await anyio.to_thread.run_sync(leases.close)
        app.router.on_shutdown.append(pay_what_is_owed)

    # The smallest useful escrow pays one short request (16 prompt tokens) at the default
    # output limit, or one vector where only embeddings are sold.
    smallest_micro = sheet.tokens_micro(16, max_tokens) if sheet.sells_tokens else sheet.unit_micro("per_vector")

    def offer() -> challenge.Offer:
        return gateway.till.offer(sheet.to_dict(), smallest_micro, escrow_server=escrow_url,
                                  max_tokens_default=max_tokens)

    @app.exception_handler(EscrowError)
    async def escrow_error(request: Request, error: EscrowError) -> JSONResponse:
        if challenge.reason_of(error):
            status, body, headers = (await anyio.to_thread.run_sync(offer)).refusal(error)
            return JSONResponse(_challenge_body(body), status_code=status, headers=headers)
        return _error(error.status_code, error.code, error.message, error.details)

    @app.get(challenge.WELL_KNOWN_PATH)
    async def discovery() -> dict:
        return (await anyio.to_thread.run_sync(offer)).document()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return _error(error.status_code, "not_found" if error.status_code == 404 else "http_error", str(error.detail))

    @app.get("/v1/models")
    async def models() -> Response:
        try:
            answer = await gateway.client.get(f"{gateway.upstream}/models")
        except httpx.HTTPError as error:
            return _unreachable(error)
        return Response(answer.content, status_code=answer.status_code, media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"ok": True, "upstream": gateway.upstream}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await gateway.generate(request, CHAT)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await gateway.generate(request, COMPLETION)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        return await gateway.embed(request, tei=False)

    @app.post("/embed")
    async def embed(request: Request) -> Response:
        return await gateway.embed(request, tei=True)

    @app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def unsold(path: str) -> Response:
        raise NotFound(f"/v1/{path[:100]} is not served here: this gateway sells /v1/chat/completions, "
                       "/v1/completions and /v1/embeddings (and /embed), and passes /v1/models through for free")

    return app


@dataclass(frozen=True)
class _Generation:
    """One generating route: where it goes upstream, how its body is checked and its prompt counted."""

    path: str
    parse: Callable[[bytes], dict]
    prompt_tokens: Callable[[TokenCounter, dict], tuple[int, bool]]
    limit_fields: tuple[str, ...]   # the output limits the upstream is told


CHAT = _Generation("chat/completions", lambda raw: _chat_body(raw),
                   lambda counter, body: counter.prompt_tokens(body["messages"]),
                   ("max_tokens", "max_completion_tokens"))
COMPLETION = _Generation("completions", lambda raw: _completion_body(raw),
                         lambda counter, body: counter.plain_prompt_tokens(body["prompt"]), ("max_tokens",))


class _Gateway:
    """Admits, forwards and bills chat, completion and embedding requests for one seller."""

    def __init__(self, upstream: str, till: Till, pricing: Pricing, counter: TokenCounter, max_tokens: int,
                 leases: Any = None):
        self.upstream, self.till, self.pricing, self.counter = upstream, till, pricing, counter
        self.leases = leases
        self.max_tokens = max_tokens
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(UPSTREAM_TIMEOUT_S, connect=10.0))

    async def generate(self, request: Request, route: _Generation) -> Response:
        token = check_token(spend_token_from(request.headers))   # refused before any work, keys included
        if not self.pricing.sells_tokens:
            raise NotFound(f"/v1/{route.path} is not sold here: the price sheet sets no token prices")
        body = route.parse(await request.body())
        limit = _output_limit(body, self.max_tokens)
        bill = await anyio.to_thread.run_sync(self._open, token, route, body, limit)
        for name in route.limit_fields:
            body[name] = limit
        try:
            if body.get("stream"):
                body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
                return await self._stream(route.path, body, bill)
            return await self._answer(route.path, body, bill)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await bill.close()
            raise

    def _open(self, token: str, route: _Generation, body: dict, limit: int) -> "_Bill":
        """Hold the request's worst case: its prompt plus `limit` output tokens."""
        prompt_tokens, exact = route.prompt_tokens(self.counter, body)
        worst = self.pricing.tokens_micro(prompt_tokens, limit)
        tab = self._open_tab(token, worst, f"this request ({prompt_tokens} prompt + up to {limit} output tokens)",
                             batched=not body.get("stream"))
        return _Bill(tab, self.pricing, self.counter, prompt_tokens, exact, limit)

    async def _answer(self, path: str, body: dict, bill: "_Bill") -> Response:
        try:
            answer = await self.client.post(f"{self.upstream}/{path}", json=body)
        except httpx.HTTPError as error:
            await bill.close()
            return _unreachable(error)
        return await _whole(answer.status_code, answer.content, bill)

    async def embed(self, request: Request, *, tei: bool) -> Response:
        """Embeddings: OpenAI's body at /v1/embeddings, or TEI's ``{"inputs": ...}`` at /embed."""
        token = check_token(spend_token_from(request.headers))
        if self.pricing.per_vector is None and not self.pricing.sells_tokens:
            raise NotFound("embeddings are not sold here: the price sheet sets neither per_vector nor input prices")
        body, inputs = _embedding_body(await request.body(), tei=tei)
        tab, bound = await anyio.to_thread.run_sync(self._open_embeddings, token, inputs)
        try:
            answer = await self.client.post(f"{self.upstream}/embeddings", json=body)
        except BaseException as error:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(tab.void)
            if isinstance(error, httpx.HTTPError):
                return _unreachable(error)
            raise
        data = _json_or_none(answer.content) if answer.status_code < 400 else None
        vectors = data.get("data") if isinstance(data, dict) else None
        if not isinstance(vectors, list) or not vectors:
            await anyio.to_thread.run_sync(tab.void)
            return _upstream_failed(answer.status_code, answer.content.decode(errors="replace"))
        # The hold already reserves the price, so the capture lands just after the answer leaves, as a
        # finished stream's does: billing adds no round trip to the ledger to the buyer's wait.
        settle = BackgroundTask(anyio.to_thread.run_sync, self._settle_embeddings, tab, len(inputs), len(vectors),
                                bound, data.get("usage"))
        if tei:
            return JSONResponse([item.get("embedding") if isinstance(item, dict) else None for item in vectors],
                                background=settle)
        return Response(answer.content, status_code=answer.status_code, media_type="application/json",
                        background=settle)

    def _open_tab(self, token: str, worst: int, what: str, *, batched: bool = True) -> Tab | Charge:
        """A hold of `worst` for one request, or its reservation on a lease (the batched path)."""
        if batched and self.leases is not None:
            return self.leases.admit(token, worst, what=what)
        return self.till.open(token, worst, what=what)

    def _open_embeddings(self, token: str, inputs: list) -> tuple[Tab | Charge, int]:
        """Hold the price of `inputs`: exact per vector, or their tokens' upper bound."""
        count = len(inputs)
        if self.pricing.per_vector is not None:
            return self._open_tab(token, self.pricing.unit_micro("per_vector", count),
                                  f"embedding {count} input(s)"), 0
        bound = sum(len(item) if isinstance(item, list) else len(item.encode()) + EMBED_OVERHEAD_TOKENS
                    for item in inputs)
        return self._open_tab(token, self.pricing.tokens_micro(bound, 0),
                              f"embedding {count} input(s) (up to {bound} tokens)"), bound

    def _settle_embeddings(self, tab: Tab | Charge, asked: int, returned: int, bound: int, usage: Any) -> None:
        """Pay the vectors returned (one per input at most), or the input tokens the server reports."""
        delivered = min(returned, asked)
        try:
            if self.pricing.per_vector is not None:
                tab.finish(self.pricing.unit_micro("per_vector", delivered))
                return
            reported = usage.get("prompt_tokens") if isinstance(usage, dict) else None
            valid = isinstance(reported, int) and not isinstance(reported, bool) and 0 <= reported
            tokens = min(reported, bound) if valid else bound
            tab.finish(min(self.pricing.tokens_micro(tokens, 0), tab.held_micro), usage={"prompt_tokens": tokens})
        except EscrowError as error:   # the answer has left: log it; an unsettled hold ends at its TTL
            log.warning("capture on hold %s refused: %s", tab.hold_id, error.message)

    async def _stream(self, path: str, body: dict, bill: "_Bill") -> Response:
        request = self.client.build_request("POST", f"{self.upstream}/{path}", json=body)
        try:
            answer = await self.client.send(request, stream=True)
        except httpx.HTTPError as error:
            await bill.close()
            return _unreachable(error)
        if answer.status_code >= 400 or not answer.headers.get("content-type", "").startswith("text/event-stream"):
            # An error, or a server that answered in one piece: billed like a plain answer.
            content = await answer.aread()
            await answer.aclose()
            return await _whole(answer.status_code, content, bill)
        # A finished stream is settled after its last byte is sent, so billing adds nothing to it.
        return StreamingResponse(bill.relay(answer), background=BackgroundTask(bill.close, answer),
                                 media_type=answer.headers.get("content-type", "text/event-stream"))


async def _whole(status: int, content: bytes, bill: "_Bill") -> Response:
    """A whole answer, paid by its usage; an error or a non-answer voids the hold."""
    data = _json_or_none(content) if status < 400 else None
    if isinstance(data, dict):
        bill.answered(data)
    await bill.close()
    if not isinstance(data, dict):
        return _upstream_failed(status, content.decode(errors="replace"))
    return Response(content, status_code=status, media_type="application/json")


class _Bill:
    """What one answer delivered and the captures that pay for it, never more than was held.

    A slice counts the delivered text with the tokenizer, but never more tokens than
    content chunks arrived (each chunk carries at least one token, and re-encoding a
    model's byte-level pieces can count more tokens than it generated), so no capture runs
    ahead of what the server's ``usage`` reports at the end.
    """

    def __init__(self, tab: Tab | Charge, pricing: Pricing, counter: TokenCounter, prompt_tokens: int,
                 prompt_exact: bool, limit: int):
        self.tab, self.pricing, self.counter = tab, pricing, counter
        self.prompt_tokens, self.prompt_exact, self.limit = prompt_tokens, prompt_exact, limit
        self.pieces: list[str] = []
        self.chunks = 0
        self.since_capture = 0
        self.usage: dict | None = None
        self.recorded = (0, 0)    # prompt and output tokens the landed captures reported
        self.cut: EscrowError | None = None
        self._pending: asyncio.Future | None = None
        self._closed = False

    # ---- delivery ---------------------------------------------------------------

    async def relay(self, answer: httpx.Response) -> AsyncIterator[bytes]:
        """The upstream's events as they come, until the hold is used up or the escrow closes."""
        finished = False
        try:
            async for raw, event in _sse_events(answer):
                self._collect()
                piece = _delta_text(event)
                if piece and not self._may_deliver():
                    yield _sse_error(self.cut)
                    break
                yield raw   # returns once the client took it: what follows counts as delivered
                self._delivered(event, piece)
                if self.since_capture >= CAPTURE_EVERY:
                    await self._capture_slice()
            finished = True
        except httpx.HTTPError as error:   # the upstream died mid-stream: what was delivered is still paid
            log.warning("upstream stream broke after %d chunks: %s", self.chunks, error)
            finished = True
        finally:
            with anyio.CancelScope(shield=True):
                await answer.aclose()
                if not finished:   # the client went away: pay what it got, free the rest
                    await self.close()

    def answered(self, data: dict) -> None:
        """A whole (non-streamed) answer: its text (words stand in for chunks) and the server's usage."""
        choices = data.get("choices") if isinstance(data.get("choices"), list) else []
        for choice in choices:
            text = _choice_text(choice.get("message") if isinstance(choice, dict) else None, choice)
            if text:
                self.pieces.append(text)
                self.chunks += max(len(text.split()), 1)
        if isinstance(data.get("usage"), dict):
            self.usage = data["usage"]

    def _may_deliver(self) -> bool:
        if self.cut is None and not self.tab.escrow_open:
            self.cut = StateConflict(f"escrow {self.tab.escrow_id} is closed; the stream stops here and what was "
                                     "delivered is paid")
        if self.cut is None and (self.chunks >= self.limit or self.tab.open_micro <= 0):
            self.cut = PaymentRequired(f"the hold for this request ({self.limit} output tokens) is used up: the "
                                       "model server sent more than it was asked for; what was delivered is paid")
        return self.cut is None

    def _delivered(self, event: dict | None, piece: str) -> None:
        if event is not None and isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        if piece:
            self.pieces.append(piece)
            self.chunks += 1
            self.since_capture += 1

    # ---- payment ----------------------------------------------------------------

    def _count(self, text: str, chunks: int) -> int:
        if not chunks:
            return 0
        counted, _ = self.counter.text_tokens(text, fallback=chunks)
        return min(counted, chunks)

    def _owed(self, tokens_in: int, tokens_out: int) -> tuple[int, dict]:
        """The cost of everything so far (capped at the hold) minus what captures paid, and its tokens."""
        total = min(self.pricing.tokens_micro(tokens_in, tokens_out), self.tab.held_micro)
        usage = {"prompt_tokens": max(tokens_in - self.recorded[0], 0),
                 "completion_tokens": max(tokens_out - self.recorded[1], 0)}
        return max(total - self.tab.captured_micro, 0), usage

    async def _capture_slice(self) -> None:
        """Count and capture the delivered slice in a worker thread; at most one capture is in flight."""
        await self._settle_pending()
        self.since_capture = 0
        self._pending = asyncio.ensure_future(anyio.to_thread.run_sync(
            self._capture_upto, "".join(self.pieces), self.chunks))

    def _capture_upto(self, text: str, chunks: int) -> tuple[int, int]:
        """Pay everything up to `chunks`; returns the prompt and output tokens paid for so far."""
        # An estimated (upper bound) prompt is billed only at the end, when usage may correct it.
        tokens = (self.prompt_tokens if self.prompt_exact else 0, self._count(text, chunks))
        amount, usage = self._owed(*tokens)
        if not amount:
            return self.recorded
        self.tab.capture(amount, usage=usage)
        return tokens

    def _collect(self) -> None:
        """Learn the result of a capture that has landed, without waiting for one."""
        if self._pending is not None and self._pending.done():
            self._take()

    async def _settle_pending(self) -> None:
        if self._pending is not None:
            await asyncio.wait([self._pending])
            self._take()

    def _take(self) -> None:
        future, self._pending = self._pending, None
        error = future.exception()
        if error is None:
            self.recorded = future.result()
            return
        if not isinstance(error, EscrowError):
            log.error("capture on hold %s failed", self.tab.hold_id, exc_info=error)
            error = EscrowError(f"the seller's ledger failed to take payment ({type(error).__name__})")
        log.warning("capture on hold %s refused, stopping the stream: %s", self.tab.hold_id, error.message)
        self.cut = error

    async def close(self, answer: httpx.Response | None = None) -> None:
        """Pay what was delivered and free the rest of the hold, once (void when nothing was)."""
        if answer is not None:
            await answer.aclose()
        if self._closed:
            return
        self._closed = True
        await self._settle_pending()
        try:
            await anyio.to_thread.run_sync(self._finish)
        except EscrowError as error:
            log.warning("final capture on hold %s refused: %s", self.tab.hold_id, error.message)

    def _finish(self) -> None:
        usage = _usage_tokens(self.usage)
        if usage is None and not self.chunks and not self.tab.captured_micro:
            self.tab.void()   # nothing was delivered: the buyer pays nothing
            return
        amount, tokens = self._owed(*(usage or (self.prompt_tokens, self._count("".join(self.pieces), self.chunks))))
        self.tab.finish(amount, usage=tokens)


def _chat_body(raw: bytes) -> dict:
    body = _json_or_none(raw)
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"] \
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in body["messages"]):
        raise ValidationError("a chat request needs a JSON body with a non-empty messages list of "
                              "{\"role\": ..., \"content\": ...} objects")
    if body.get("n", 1) != 1 or body.get("best_of", 1) != 1:
        raise ValidationError("the gateway sells one choice per request: leave n (and best_of) at 1")
    if not isinstance(body.get("stream_options") or {}, dict):
        raise ValidationError("stream_options must be an object, such as {\"include_usage\": true}")
    return body


def _completion_body(raw: bytes) -> dict:
    body = _json_or_none(raw)
    if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
        raise ValidationError("a completion request needs a JSON body with a prompt string (one prompt per request)")
    if body.get("n", 1) != 1 or body.get("best_of", 1) != 1:
        raise ValidationError("the gateway sells one choice per request: leave n (and best_of) at 1")
    if body.get("echo"):
        raise ValidationError("echo is not sold: the prompt is already yours")
    if not isinstance(body.get("stream_options") or {}, dict):
        raise ValidationError("stream_options must be an object, such as {\"include_usage\": true}")
    return body


def _embedding_body(raw: bytes, *, tei: bool) -> tuple[dict, list]:
    """The upstream's OpenAI embeddings body, and the inputs (strings, or lists of token ids) it embeds."""
    body = _json_or_none(raw)
    field = "inputs" if tei else "input"
    if not isinstance(body, dict) or field not in body:
        raise ValidationError(f"an embeddings request needs a JSON body with {field}: a string or a list of them")
    given = body[field]
    if isinstance(given, str) or (isinstance(given, list) and given and all(_is_token_id(t) for t in given)):
        inputs = [given]
    elif isinstance(given, list) and given and (all(isinstance(t, str) for t in given) or all(
            isinstance(t, list) and t and all(_is_token_id(i) for i in t) for t in given)):
        inputs = list(given)
    else:
        raise ValidationError(f"{field} must be a string, a non-empty list of strings, or token ids (a list of "
                              "integers, or a list of such lists)")
    if len(inputs) > MAX_EMBED_INPUTS:
        raise ValidationError(f"at most {MAX_EMBED_INPUTS} inputs per request, got {len(inputs)}")
    if not tei:
        return body, inputs
    upstream = {"input": given, "encoding_format": "float"}
    for name in ("model", "dimensions"):
        if body.get(name) is not None:
            upstream[name] = body[name]
    return upstream, inputs


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _output_limit(body: dict, default: int) -> int:
    """The output limit the buyer asked for; vLLM-style servers obey max_completion_tokens first."""
    for name in ("max_completion_tokens", "max_tokens"):
        if body.get(name) is not None:
            _check_limit(body[name], name)
    value = body.get("max_completion_tokens")
    return value if value is not None else body.get("max_tokens") or default


def _check_limit(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_OUTPUT_TOKENS:
        raise ValidationError(f"{name} must be a whole number from 1 to {MAX_OUTPUT_TOKENS}, got {value!r}")


def _usage_tokens(usage: dict | None) -> tuple[int, int] | None:
    if not isinstance(usage, dict):
        return None
    tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_OUTPUT_TOKENS * 10 for n in tokens):
        return tokens
    return None


async def _sse_events(answer: httpx.Response) -> AsyncIterator[tuple[bytes, dict | None]]:
    """(raw bytes, parsed data) per server-sent event, blank-line separated."""
    lines: list[str] = []
    async for line in answer.aiter_lines():
        if line:
            lines.append(line)
            continue
        if lines:
            yield ("\n".join(lines) + "\n\n").encode(), _event_json(lines)
            lines = []
    if lines:
        yield ("\n".join(lines) + "\n\n").encode(), _event_json(lines)


def _event_json(lines: list[str]) -> dict | None:
    payload = "".join(line[5:].strip() for line in lines if line.startswith("data:"))
    if not payload or payload == "[DONE]":
        return None
    event = _json_or_none(payload)
    return event if isinstance(event, dict) else None


def _delta_text(event: dict | None) -> str:
    """What an event delivers: content, reasoning or tool-call text all cost output tokens."""
    choices = (event or {}).get("choices")
    first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
    return _choice_text(first.get("delta"), first) if first is not None else ""


def _choice_text(message: Any, choice: Any) -> str:
    """A chat choice's message (or delta) text, or a completion choice's ``text``."""
    if isinstance(message, dict):
        return _message_text(message)
    text = choice.get("text") if isinstance(choice, dict) else None
    return text if isinstance(text, str) else ""


def _message_text(message: dict) -> str:
    parts = [message.get("content"), message.get("reasoning_content")]
    for call in message.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            parts += [function.get("name"), function.get("arguments")]
    return "".join(part for part in parts if isinstance(part, str))


def _json_or_none(raw: bytes | str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _sse_error(error: EscrowError) -> bytes:
    body = _error_body(error.code, error.message, reason=challenge.reason_of(error))
    return f"data: {json.dumps(body)}\n\n".encode()


def _error_body(code: str, message: str, details: dict | None = None, *, reason: str | None = None) -> dict:
    """OpenAI's error shape, so that OpenAI clients show the message: `type` is hf-escrow's
    error code (what `error_for_status` rebuilds the class from), `code` a refusal's payment
    reason (`hf_escrow.challenge.REASONS`), else the error code again."""
    error = {"message": message, "type": code, "code": reason or code, "param": None}
    if details:
        error["details"] = details
    return {"error": error}


def _challenge_body(body: dict) -> dict:
    """A 402's challenge in OpenAI's shape: its facts stay at the top (where `challenge.parse`
    and AutoPay read them, as in the ``X-Escrow-Challenge`` header); its error moves inside."""
    facts = {k: v for k, v in body.items() if k not in ("error", "message", "details")}
    return {**facts, **_error_body(body["error"], body["message"], body.get("details"), reason=body["reason"])}


def _error(status: int, code: str, message: str, details: dict | None = None) -> JSONResponse:
    return JSONResponse(_error_body(code, message, details), status_code=status)


def _unreachable(error: httpx.HTTPError) -> JSONResponse:
    return _error(502, "upstream_unreachable", f"the model server could not be reached ({type(error).__name__}: "
                                               f"{error}); nothing was charged")


def _upstream_failed(status: int, text: str) -> JSONResponse:
    return _error(status if status >= 400 else 502, "upstream_error",
                  f"the model server answered HTTP {status}: {text[:UPSTREAM_ERROR_CHARS]}; nothing was charged")
