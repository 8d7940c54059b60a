"""Paid inference: huggingface_hub's InferenceClient, billed per token from an escrow.

`PaidInferenceClient` is a drop-in `InferenceClient` (same constructor and methods, plus
`escrow=`, `seller=`, `pricing=`, `budget=`). Every call first places a ledger hold on
the escrow for its worst case (prompt + max_tokens at the output price, and the seller's
streak bonus on it) and refuses before the model is called if the escrow cannot cover it;
the hold is in the ledger, so threads and processes sharing one escrow never promise more
than it has. After the call, one release frees the call's hold and pays exactly what was
delivered (the server's `usage`, else the tokens counted with the model's tokenizer) in the
same transaction, and keeps the escrow open for the next call. A failed call voids its
hold and costs nothing.

Example:
    >>> import hf_escrow
    >>> with hf_escrow.paid_inference("http://127.0.0.1:8000/v1", escrow=hf_escrow.connect(agent="buyer"),
    ...                               seller="seller", budget="0.50",
    ...                               pricing={"input_per_1k": "0.0005", "output_per_1k": "0.0015"}) as client:
    ...     out = client.chat_completion([{"role": "user", "content": "Hi"}], max_tokens=32)
    ...     client.receipts[-1].gross
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import secrets
import time
from typing import Any

import httpx
from huggingface_hub import AsyncInferenceClient, InferenceClient

from .._exceptions import InsufficientFunds, StateConflict, ValidationError
from ..tokens import TokenCounter
from .metering import CallReceipt, Meter
from ..money import to_usdc
from ..pricing import Pricing

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
# A call's hold outlives a slow generation or a stream read slowly; the ledger caps it at
# its hold_max_ttl_s (900 s by default), and a crashed buyer's hold frees itself then.
DEFAULT_HOLD_TTL_S = 900.0
_SPECIAL = {"chat_completion", "text_generation", "feature_extraction", "text_to_image"}
_NOT_TASKS = {"close", "get_endpoint_info", "health_check"}
PER_CALL_TASKS = sorted(
    name for name, _ in inspect.getmembers(InferenceClient, inspect.isfunction)
    if not name.startswith("_") and name not in _SPECIAL | _NOT_TASKS
)


class _Plan:
    """One call's reservation (its ledger hold) and what is known before it runs."""

    def __init__(self, task: str, worst_micro: int, prompt_tokens: int = 0, units: int = 0, unit: str | None = None):
        self.task, self.worst_micro, self.prompt_tokens, self.units, self.unit = \
            task, worst_micro, prompt_tokens, units, unit
        self.hold_id: str | None = None
        self.key = "call-" + secrets.token_hex(12)   # the call's hold, release and void are retry-safe under it
        self.started = time.perf_counter()


class _PaidMixin:
    """The billing logic shared by the sync and async clients (no I/O here)."""

    _meter: Meter
    _counter: TokenCounter

    def _setup(self, escrow: Any, pricing: Any, tokenizer: Any, max_tokens: int, hold_ttl_seconds: float) -> Pricing:
        sheet = Pricing.coerce(pricing)
        if sheet is None:
            raise ValidationError("paid inference needs pricing, e.g. {\"input_per_1k\": \"0.0005\", "
                                  "\"output_per_1k\": \"0.0015\"}")
        self.escrow = escrow
        self._counter = TokenCounter(tokenizer)
        self.default_max_tokens = max_tokens
        self.hold_ttl_seconds = hold_ttl_seconds
        return sheet

    @property
    def escrow_id(self) -> str:
        return self._meter.escrow_id

    @property
    def receipts(self) -> list[CallReceipt]:
        """One receipt per paid call, oldest first."""
        return self._meter.receipts

    @property
    def remaining(self):
        """USDC free in the escrow as the ledger last reported it (other callers' holds aside)."""
        return self._meter.remaining

    def _plan_chat(self, messages: list[dict], max_tokens: int) -> _Plan:
        prompt_tokens, _ = self._counter.prompt_tokens(messages)
        worst = self._meter.worst_chat_micro(prompt_tokens, max_tokens)
        return _Plan("chat_completion", worst, prompt_tokens=prompt_tokens)

    def _plan_text(self, prompt: str, max_tokens: int) -> _Plan:
        prompt_tokens, _ = self._counter.prompt_tokens([{"role": "user", "content": prompt}])
        worst = self._meter.worst_chat_micro(prompt_tokens, max_tokens)
        return _Plan("text_generation", worst, prompt_tokens=prompt_tokens)

    def _plan_units(self, task: str, unit: str, count: int) -> _Plan:
        return _Plan(task, self._meter.unit_micro(task, unit, count), units=count, unit=unit)

    def _hold_args(self, plan: _Plan) -> dict | None:
        """The call's hold on the escrow (None when it can cost nothing)."""
        if plan.worst_micro == 0:
            return None
        return dict(target=self.escrow_id, amount=to_usdc(self._meter.hold_micro(plan.worst_micro)),
                    ttl_seconds=self.hold_ttl_seconds, idempotency_key=plan.key + "-hold")

    @staticmethod
    def _held(plan: _Plan, hold: Any) -> None:
        plan.hold_id = hold.id
        plan.started = time.perf_counter()  # the call's latency is the model's; the hold is billing time

    def _void_args(self, plan: _Plan) -> dict:
        return dict(hold_id=plan.hold_id, idempotency_key=plan.key + "-void")

    @staticmethod
    def _void_failed(plan: _Plan, error: Exception) -> None:
        # The call's own error is the one to raise; the hold frees itself at its TTL.
        logger.warning("could not void hold %s (it frees itself at its TTL): %s", plan.hold_id, error)

    @staticmethod
    def _hold_gone(plan: _Plan, error: StateConflict) -> bool:
        """The call's hold expired (a stream outlived its TTL): what was delivered is still owed."""
        return plan.hold_id is not None and error.details.get("hold_id") == plan.hold_id \
            and error.details.get("hold_status") == "expired"

    def _cost(self, plan: _Plan, tokens_in: int, tokens_out: int, units: int) -> int:
        if plan.unit is not None:
            return self._meter.pricing.unit_micro(plan.unit, units)
        return self._meter.pricing.tokens_micro(tokens_in, tokens_out)

    def _release_args(self, plan: _Plan, tokens_in: int, tokens_out: int, cost_micro: int,
                      hold_id: str | None, key: str) -> dict:
        return dict(amount=to_usdc(cost_micro), refund_remainder=False, hold_id=hold_id, idempotency_key=key,
                    usage={"prompt_tokens": tokens_in, "completion_tokens": tokens_out}, meta={"task": plan.task})

    def _receipt(self, plan: _Plan, tokens_in: int, tokens_out: int, units: int, cost_micro: int,
                 counted_by: str, settled: Any, billing_started: float) -> CallReceipt:
        return self._meter.record(CallReceipt(
            escrow_id=self.escrow_id, task=plan.task, tokens_in=tokens_in, tokens_out=tokens_out, units=units,
            # What the ledger took, bonuses included (a streak adds to the release).
            gross=settled.gross if settled else to_usdc(0), fee=settled.fee if settled else to_usdc(0),
            net=settled.net if settled else to_usdc(0), bonus=settled.bonus if settled else to_usdc(0),
            latency_ms=(billing_started - plan.started) * 1000,
            billing_ms=(time.perf_counter() - billing_started) * 1000, counted_by=counted_by,
            pricing=self._meter.pricing.to_dict()), settled.remaining if settled else None)

    def _stream_tokens(self, plan: _Plan, usage: Any, text: str, chunks: int) -> tuple[int, int, str]:
        """Tokens delivered by a stream: the server's usage, else counted from the text received."""
        if usage is not None and getattr(usage, "completion_tokens", None) is not None:
            return usage.prompt_tokens, usage.completion_tokens, "usage"
        if not text and chunks == 0:
            return 0, 0, "usage"  # nothing delivered: nothing to pay
        tokens_out, how = self._counter.text_tokens(text, fallback=chunks)
        return plan.prompt_tokens, tokens_out, how

    def _served_model(self, model: str | None) -> str | None:
        """OpenAI-style servers need the served model's name in the body; a URL is not one."""
        if model is not None or not (self.model or "").startswith(("http://", "https://")):
            return model
        if getattr(self, "_served_model_id", None) is None:
            listing = httpx.get(self.model.rstrip("/") + "/models", headers=self.headers, timeout=30).json()
            self._served_model_id = listing["data"][0]["id"]
        return self._served_model_id


def _chunk_text(chunk: Any) -> str:
    choices = getattr(chunk, "choices", None) or []
    delta = getattr(choices[0], "delta", None) if choices else None
    return getattr(delta, "content", None) or ""


def _vectors(result: Any) -> int:
    shape = getattr(result, "shape", None)
    return int(shape[0]) if shape is not None and len(shape) > 1 else 1


class PaidInferenceClient(_PaidMixin, InferenceClient):
    """`InferenceClient`, billed per call from an escrow the buyer holds.

    Args:
        model: as for InferenceClient (a model id, or the URL of an OpenAI-compatible server).
        escrow: an `EscrowClient` acting as the buyer.
        pricing: a `Pricing`, a dict of its keys, or a TOML path.
        seller, budget: open a new escrow of `budget` USDC for `seller`; or
        escrow_id: bill an escrow the buyer already holds.
        tokenizer: a tokenizer or local path, to count prompts and streams that end without usage.
        max_tokens: the bound reserved for calls that give no max_tokens.
        hold_ttl_seconds: how long a call's hold may last (the ledger caps it at its maximum).

    Example:
        >>> client = PaidInferenceClient("http://127.0.0.1:8000/v1", escrow=esc, seller="seller",
        ...                              budget="0.10", pricing={"input_per_1k": "0.0005", "output_per_1k": "0.0015"})
        >>> client.chat_completion([{"role": "user", "content": "Hello"}], max_tokens=16).usage.completion_tokens
        16
        >>> client.finish()  # refunds what is left
    """

    def __init__(self, model: str | None = None, *, escrow: Any, pricing: Any, seller: str | None = None,
                 budget: Any = None, escrow_id: str | None = None, tokenizer: Any = None,
                 max_tokens: int = DEFAULT_MAX_TOKENS, ttl_seconds: float = 3600,
                 hold_ttl_seconds: float = DEFAULT_HOLD_TTL_S, **kwargs: Any):
        super().__init__(model, **kwargs)
        sheet = self._setup(escrow, pricing, tokenizer, max_tokens, hold_ttl_seconds)
        if escrow_id is None:
            if seller is None or budget is None:
                raise ValidationError("give seller= and budget= to open an escrow, or escrow_id= to use one")
            opened = escrow.create_escrow(seller, budget, ttl_seconds=ttl_seconds, pricing=sheet,
                                          meta={"model": str(model), "kind": "inference"})
        else:
            opened = escrow.get(escrow_id)
        self._meter = Meter(opened.id, sheet, opened.remaining)

    def chat_completion(self, messages: list, *, model: str | None = None, stream: bool = False,
                        max_tokens: int | None = None, **kwargs: Any) -> Any:
        """`InferenceClient.chat_completion`, paid: usage x price is released after the answer."""
        max_tokens = max_tokens or self.default_max_tokens
        plan = self._reserve(self._plan_chat(messages, max_tokens))
        try:
            result = super().chat_completion(messages, model=self._served_model(model), stream=stream,
                                             max_tokens=max_tokens, **kwargs)
        except BaseException:
            self._void(plan)
            raise
        if stream:
            return self._metered_stream(plan, result)
        self._settle(plan, result.usage.prompt_tokens, result.usage.completion_tokens, 0, "usage")
        return result

    def text_generation(self, prompt: str, *, stream: bool = False, details: bool = False,
                        max_new_tokens: int | None = None, **kwargs: Any) -> Any:
        """`InferenceClient.text_generation`, paid per token (details, else the tokenizer)."""
        max_new_tokens = max_new_tokens or self.default_max_tokens
        plan = self._reserve(self._plan_text(prompt, max_new_tokens))
        try:
            result = super().text_generation(prompt, stream=stream, details=True, max_new_tokens=max_new_tokens,
                                             **kwargs)
        except BaseException:
            self._void(plan)
            raise
        if stream:
            return self._metered_text_stream(plan, result, details)
        self._settle(plan, plan.prompt_tokens, result.details.generated_tokens, 0, "usage")
        return result if details else result.generated_text

    def feature_extraction(self, text: str, **kwargs: Any) -> Any:
        """`InferenceClient.feature_extraction`, paid per vector returned."""
        return self._unit_call("feature_extraction", "per_vector", 1, _vectors,
                               lambda: super(PaidInferenceClient, self).feature_extraction(text, **kwargs))

    def text_to_image(self, prompt: str, **kwargs: Any) -> Any:
        """`InferenceClient.text_to_image`, paid per image."""
        return self._unit_call("text_to_image", "per_image", 1, lambda image: 1,
                               lambda: super(PaidInferenceClient, self).text_to_image(prompt, **kwargs))

    def _unit_call(self, task: str, unit: str, worst_units: int, count, call) -> Any:
        plan = self._reserve(self._plan_units(task, unit, worst_units))
        try:
            result = call()
        except BaseException:
            self._void(plan)
            raise
        self._settle(plan, 0, 0, count(result), "units")
        return result

    def _metered_stream(self, plan: _Plan, stream: Any):
        usage, text, chunks = None, [], 0
        try:
            for chunk in stream:
                usage = getattr(chunk, "usage", None) or usage
                piece = _chunk_text(chunk)
                if piece:
                    text.append(piece)
                    chunks += 1
                yield chunk
        finally:
            # Normal end, an abandoned generator (close/GC) and a broken stream all land here.
            tokens_in, tokens_out, how = self._stream_tokens(plan, usage, "".join(text), chunks)
            self._settle(plan, tokens_in, tokens_out, 0, how)

    def _metered_text_stream(self, plan: _Plan, stream: Any, details: bool):
        text, chunks = [], 0
        try:
            for chunk in stream:
                text.append(chunk.token.text if hasattr(chunk, "token") else str(chunk))
                chunks += 1
                yield chunk if details else (chunk.token.text if hasattr(chunk, "token") else chunk)
        finally:
            tokens_in, tokens_out, how = self._stream_tokens(plan, None, "".join(text), chunks)
            self._settle(plan, tokens_in, tokens_out, 0, how)

    def _reserve(self, plan: _Plan) -> _Plan:
        """Hold the call's worst case on the escrow, or refuse before the model is called."""
        args = self._hold_args(plan)
        if args is not None:
            try:
                self._held(plan, self.escrow.hold(**args))
            except InsufficientFunds as error:
                raise self._meter.refusal(plan.worst_micro, error) from None
        return plan

    def _void(self, plan: _Plan) -> None:
        if plan.hold_id is not None:
            try:
                self.escrow.void(**self._void_args(plan))
            except Exception as error:
                self._void_failed(plan, error)

    def _settle(self, plan: _Plan, tokens_in: int, tokens_out: int, units: int, counted_by: str) -> CallReceipt:
        billing_started = time.perf_counter()
        cost = self._cost(plan, tokens_in, tokens_out, units)
        settled = None
        if cost or tokens_in or tokens_out:
            try:
                settled = self._release(plan, tokens_in, tokens_out, cost)
            except BaseException:
                self._void(plan)
                raise
        else:
            self._void(plan)
        return self._receipt(plan, tokens_in, tokens_out, units, cost, counted_by, settled, billing_started)

    def _release(self, plan: _Plan, tokens_in: int, tokens_out: int, cost: int) -> Any:
        """One release frees the call's hold and pays what was delivered, in one ledger transaction."""
        try:
            return self.escrow.release(self.escrow_id, **self._release_args(
                plan, tokens_in, tokens_out, cost, plan.hold_id, plan.key + "-release"))
        except StateConflict as error:
            if not self._hold_gone(plan, error):
                raise
        return self.escrow.release(self.escrow_id, **self._release_args(
            plan, tokens_in, tokens_out, cost, None, plan.key + "-late"))

    def finish(self) -> Any:
        """Close the escrow: what was used is already paid; the rest goes back to the buyer."""
        return self.escrow.release(self.escrow_id, amount="0", refund_remainder=True,
                                   idempotency_key=f"finish-{self.escrow_id}")


def _per_call(name: str):
    original = getattr(InferenceClient, name)

    @functools.wraps(original)
    def method(self: PaidInferenceClient, *args: Any, **kwargs: Any) -> Any:
        return self._unit_call(name, "per_call", 1, lambda result: 1, lambda: original(self, *args, **kwargs))
    return method


for _name in PER_CALL_TASKS:
    setattr(PaidInferenceClient, _name, _per_call(_name))


class AsyncPaidInferenceClient(_PaidMixin, AsyncInferenceClient):
    """The async twin of `PaidInferenceClient` (escrow: an async or a sync escrow client).

    Create it with `await AsyncPaidInferenceClient.open(...)` (it opens the escrow), or
    `async with paid_inference(...)`.
    """

    def __init__(self, model: str | None = None, *, escrow: Any, pricing: Any, escrow_id: str,
                 remaining: Any, tokenizer: Any = None, max_tokens: int = DEFAULT_MAX_TOKENS,
                 hold_ttl_seconds: float = DEFAULT_HOLD_TTL_S, **kwargs: Any):
        super().__init__(model, **kwargs)
        sheet = self._setup(escrow, pricing, tokenizer, max_tokens, hold_ttl_seconds)
        self._meter = Meter(escrow_id, sheet, remaining)

    @classmethod
    async def open(cls, model: str | None = None, *, escrow: Any, pricing: Any, seller: str | None = None,
                   budget: Any = None, escrow_id: str | None = None, ttl_seconds: float = 3600,
                   **kwargs: Any) -> "AsyncPaidInferenceClient":
        sheet = Pricing.coerce(pricing)
        if escrow_id is None:
            if seller is None or budget is None:
                raise ValidationError("give seller= and budget= to open an escrow, or escrow_id= to use one")
            opened = await _maybe_await(escrow.create_escrow(seller, budget, ttl_seconds=ttl_seconds, pricing=sheet,
                                                             meta={"model": str(model), "kind": "inference"}))
        else:
            opened = await _maybe_await(escrow.get(escrow_id))
        return cls(model, escrow=escrow, pricing=sheet, escrow_id=opened.id, remaining=opened.remaining, **kwargs)

    async def chat_completion(self, messages: list, *, model: str | None = None, stream: bool = False,
                              max_tokens: int | None = None, **kwargs: Any) -> Any:
        """`AsyncInferenceClient.chat_completion`, paid."""
        max_tokens = max_tokens or self.default_max_tokens
        plan = await self._reserve(self._plan_chat(messages, max_tokens))
        try:
            served = await asyncio.to_thread(self._served_model, model)
            result = await super().chat_completion(messages, model=served, stream=stream, max_tokens=max_tokens,
                                                   **kwargs)
        except BaseException:
            await self._void(plan)
            raise
        if stream:
            return self._metered_stream(plan, result)
        await self._settle(plan, result.usage.prompt_tokens, result.usage.completion_tokens, 0, "usage")
        return result

    async def feature_extraction(self, text: str, **kwargs: Any) -> Any:
        """`AsyncInferenceClient.feature_extraction`, paid per vector."""
        return await self._unit_call("feature_extraction", "per_vector", _vectors,
                                     super().feature_extraction(text, **kwargs))

    async def text_to_image(self, prompt: str, **kwargs: Any) -> Any:
        """`AsyncInferenceClient.text_to_image`, paid per image."""
        return await self._unit_call("text_to_image", "per_image", lambda image: 1,
                                     super().text_to_image(prompt, **kwargs))

    async def _unit_call(self, task: str, unit: str, count, call) -> Any:
        """Reserve one unit, await `call` (a coroutine not started yet), settle the units it returned."""
        try:
            plan = await self._reserve(self._plan_units(task, unit, 1))
        except BaseException:
            call.close()
            raise
        try:
            result = await call
        except BaseException:
            await self._void(plan)
            raise
        await self._settle(plan, 0, 0, count(result), "units")
        return result

    async def _metered_stream(self, plan: _Plan, stream: Any):
        usage, text, chunks = None, [], 0
        try:
            async for chunk in stream:
                usage = getattr(chunk, "usage", None) or usage
                piece = _chunk_text(chunk)
                if piece:
                    text.append(piece)
                    chunks += 1
                yield chunk
        finally:
            tokens_in, tokens_out, how = self._stream_tokens(plan, usage, "".join(text), chunks)
            await self._settle(plan, tokens_in, tokens_out, 0, how)

    async def _reserve(self, plan: _Plan) -> _Plan:
        """Hold the call's worst case on the escrow, or refuse before the model is called."""
        args = self._hold_args(plan)
        if args is not None:
            try:
                self._held(plan, await _maybe_await(self.escrow.hold(**args)))
            except InsufficientFunds as error:
                raise self._meter.refusal(plan.worst_micro, error) from None
        return plan

    async def _void(self, plan: _Plan) -> None:
        if plan.hold_id is not None:
            try:
                await _maybe_await(self.escrow.void(**self._void_args(plan)))
            except Exception as error:
                self._void_failed(plan, error)

    async def _settle(self, plan: _Plan, tokens_in: int, tokens_out: int, units: int, counted_by: str) -> CallReceipt:
        billing_started = time.perf_counter()
        cost = self._cost(plan, tokens_in, tokens_out, units)
        settled = None
        if cost or tokens_in or tokens_out:
            try:
                settled = await self._release(plan, tokens_in, tokens_out, cost)
            except BaseException:
                await self._void(plan)
                raise
        else:
            await self._void(plan)
        return self._receipt(plan, tokens_in, tokens_out, units, cost, counted_by, settled, billing_started)

    async def _release(self, plan: _Plan, tokens_in: int, tokens_out: int, cost: int) -> Any:
        """One release frees the call's hold and pays what was delivered, in one ledger transaction."""
        try:
            return await _maybe_await(self.escrow.release(self.escrow_id, **self._release_args(
                plan, tokens_in, tokens_out, cost, plan.hold_id, plan.key + "-release")))
        except StateConflict as error:
            if not self._hold_gone(plan, error):
                raise
        return await _maybe_await(self.escrow.release(self.escrow_id, **self._release_args(
            plan, tokens_in, tokens_out, cost, None, plan.key + "-late")))

    async def finish(self) -> Any:
        """Close the escrow and refund what is left to the buyer."""
        return await _maybe_await(self.escrow.release(self.escrow_id, amount="0", refund_remainder=True,
                                                      idempotency_key=f"finish-{self.escrow_id}"))


    async def text_generation(self, prompt: str, **kwargs: Any) -> Any:
        """Not billed by the async client: use `chat_completion` (or the sync client)."""
        raise ValidationError("AsyncPaidInferenceClient bills chat_completion, feature_extraction, text_to_image and "
                              "per-call tasks; text_generation is billed by PaidInferenceClient only")


def _async_per_call(name: str):
    original = getattr(AsyncInferenceClient, name)

    @functools.wraps(original)
    async def method(self: AsyncPaidInferenceClient, *args: Any, **kwargs: Any) -> Any:
        return await self._unit_call(name, "per_call", lambda result: 1, original(self, *args, **kwargs))
    return method


for _name in PER_CALL_TASKS:
    setattr(AsyncPaidInferenceClient, _name, _async_per_call(_name))


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class paid_inference:  # noqa: N801 - used like a function: `with paid_inference(...) as client`
    """Open one escrow, yield a paid client, and on exit refund what was not used.

    Works with `with` (a `PaidInferenceClient`) and `async with` (an
    `AsyncPaidInferenceClient`). The escrow is closed also when the body raises.
    """

    def __init__(self, model: str | None = None, *, escrow: Any, seller: str, budget: Any, pricing: Any,
                 **kwargs: Any):
        self._args = dict(escrow=escrow, seller=seller, budget=budget, pricing=pricing, **kwargs)
        self._model = model
        self._client: Any = None

    def __enter__(self) -> PaidInferenceClient:
        self._client = PaidInferenceClient(self._model, **self._args)
        return self._client

    def __exit__(self, *exc_info: Any) -> None:
        self._client.finish()

    async def __aenter__(self) -> AsyncPaidInferenceClient:
        self._client = await AsyncPaidInferenceClient.open(self._model, **self._args)
        return self._client

    async def __aexit__(self, *exc_info: Any) -> None:
        await self._client.finish()

