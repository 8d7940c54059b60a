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

`AsyncPaidInferenceClient` is its twin over `AsyncInferenceClient`: the same constructor and
methods, awaited. Both are thin shells over one I/O-free core (`_PaidCore`): each paid call
is a generator of `_Step`s (a ledger call, a model call, a GET), and a shell's `_drive`
performs them, the sync shell by calling, the async one by awaiting. The billing rules
exist once; tests/test_inference_twins.py fails when the shells drift.

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
import contextvars
import functools
import inspect
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generator

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
# Set while the base client performs a model call: huggingface_hub re-enters `self.text_generation`
# after some 400s (a parameter the model does not take), and that re-entry is the same piece of
# work the outer call already holds for, so it goes straight to the base method, unbilled.
_IN_BASE_CALL: contextvars.ContextVar[bool] = contextvars.ContextVar("hf_escrow_in_base_call", default=False)

PAID_METHODS = ("chat_completion", "text_generation", "feature_extraction", "text_to_image", "finish")
_NOT_TASKS = {"close", "get_endpoint_info", "health_check"}
PER_CALL_TASKS = sorted(
    name for name, _ in inspect.getmembers(InferenceClient, inspect.isfunction)
    if not name.startswith("_") and name not in set(PAID_METHODS) | _NOT_TASKS
)


@dataclass(frozen=True)
class _Step:
    """One piece of I/O a paid call needs; the core yields it, a shell performs it and sends back the result."""

    on: str        # "escrow": a method of the escrow client; "model": of the base InferenceClient; "get": a URL
    name: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


Steps = Generator[_Step, Any, Any]


def _one(step: _Step) -> Steps:
    return (yield step)


class _Plan:
    """One call's reservation (its ledger hold) and what is known before it runs."""

    def __init__(self, task: str, worst_micro: int, prompt_tokens: int = 0, units: int = 0, unit: str | None = None):
        self.task, self.worst_micro, self.prompt_tokens, self.units, self.unit = \
            task, worst_micro, prompt_tokens, units, unit
        self.hold_id: str | None = None
        self.key = "call-" + secrets.token_hex(12)   # the call's hold, release and void are retry-safe under it
        self.started = time.perf_counter()


class _ChatTally:
    """What a chat stream delivered so far: the server's usage if it sent one, the text, the chunks."""

    def __init__(self) -> None:
        self.usage, self.text, self.chunks = None, [], 0

    def add(self, chunk: Any) -> Any:
        """Count one chunk; returns what the caller is handed."""
        self.usage = getattr(chunk, "usage", None) or self.usage
        choices = getattr(chunk, "choices", None) or []
        delta = getattr(choices[0], "delta", None) if choices else None
        piece = getattr(delta, "content", None) or ""
        if piece:
            self.text.append(piece)
            self.chunks += 1
        return chunk


class _TextTally(_ChatTally):
    """A text_generation stream, read with details (to count tokens) and handed out as the caller asked."""

    def __init__(self, details: bool) -> None:
        super().__init__()
        self.details = details

    def add(self, chunk: Any) -> Any:
        text = chunk.token.text if hasattr(chunk, "token") else str(chunk)
        self.text.append(text)
        self.chunks += 1
        return chunk if self.details else (chunk.token.text if hasattr(chunk, "token") else chunk)


def _vectors(result: Any) -> int:
    shape = getattr(result, "shape", None)
    return int(shape[0]) if shape is not None and len(shape) > 1 else 1


def _one_unit(result: Any) -> int:
    return 1


class _PaidCore:
    """The billing shared by the sync and async clients, with no I/O: a paid call is a generator of steps.

    A shell (a subclass that also derives from an InferenceClient) supplies `_begin` (when the
    escrow opens), `_drive` (performs the steps) and `_metered` (wraps a stream).
    """

    _meter: Meter | None = None

    def __init__(self, model: str | None = None, *, escrow: Any, pricing: Any, seller: str | None = None,
                 budget: Any = None, escrow_id: str | None = None, tokenizer: Any = None,
                 max_tokens: int = DEFAULT_MAX_TOKENS, ttl_seconds: float = 3600,
                 hold_ttl_seconds: float = DEFAULT_HOLD_TTL_S, **kwargs: Any):
        super().__init__(model, **kwargs)
        sheet = Pricing.coerce(pricing)
        if sheet is None:
            raise ValidationError("paid inference needs pricing, e.g. {\"input_per_1k\": \"0.0005\", "
                                  "\"output_per_1k\": \"0.0015\"}")
        if escrow_id is None and (seller is None or budget is None):
            raise ValidationError("give seller= and budget= to open an escrow, or escrow_id= to use one")
        self.escrow = escrow
        self._counter = TokenCounter(tokenizer)
        self.default_max_tokens = max_tokens
        self.hold_ttl_seconds = hold_ttl_seconds
        self._begin(functools.partial(self._open, sheet, str(model), seller, budget, escrow_id, ttl_seconds))

    def _open(self, sheet: Pricing, model: str, seller: str | None, budget: Any, escrow_id: str | None,
              ttl_seconds: float) -> Steps:
        if escrow_id is None:
            opened = yield _Step("escrow", "create_escrow", (seller, budget), dict(
                ttl_seconds=ttl_seconds, pricing=sheet, meta={"model": model, "kind": "inference"}))
        else:
            opened = yield _Step("escrow", "get", (escrow_id,))
        self._meter = Meter(opened.id, sheet, opened.remaining)

    @property
    def _opened(self) -> Meter:
        if self._meter is None:
            raise StateConflict("the escrow opens with the client's first call (or `async with client`); "
                                "none has run yet")
        return self._meter

    @property
    def escrow_id(self) -> str:
        return self._opened.escrow_id

    @property
    def receipts(self) -> list[CallReceipt]:
        """One receipt per paid call, oldest first."""
        return self._opened.receipts

    @property
    def remaining(self):
        """USDC free in the escrow as the ledger last reported it (other callers' holds aside)."""
        return self._opened.remaining

    # ---- the paid calls: the shells expose each under its name without the underscore ----

    def _chat_completion(self, messages: list, *, model: str | None = None, stream: bool = False,
                         max_tokens: int | None = None, **kwargs: Any) -> Any:
        """`InferenceClient.chat_completion`, paid: usage x price is released after the answer."""
        max_tokens = max_tokens or self.default_max_tokens
        plan = yield from self._reserve(self._plan_tokens("chat_completion", messages, max_tokens))
        result = yield from self._guarded(plan, self._chat_call(messages, model, stream, max_tokens, kwargs))
        if stream:
            return self._metered(plan, result, _ChatTally())
        yield from self._settle(plan, result.usage.prompt_tokens, result.usage.completion_tokens, 0, "usage")
        return result

    def _text_generation(self, prompt: str, *, stream: bool = False, details: bool = False,
                         max_new_tokens: int | None = None, **kwargs: Any) -> Any:
        """`InferenceClient.text_generation`, paid per token (details, else the tokenizer)."""
        max_new_tokens = max_new_tokens or self.default_max_tokens
        plan = yield from self._reserve(self._plan_tokens(
            "text_generation", [{"role": "user", "content": prompt}], max_new_tokens))
        result = yield from self._guarded(plan, _one(_Step("model", "text_generation", (prompt,), dict(
            stream=stream, details=True, max_new_tokens=max_new_tokens, **kwargs))))
        if stream:
            return self._metered(plan, result, _TextTally(details))
        if isinstance(result, str):   # huggingface_hub drops `details` once it finds the server is not TGI
            tokens_out, how = self._counter.text_tokens(result, fallback=min(max_new_tokens, len(result.encode())))
            yield from self._settle(plan, plan.prompt_tokens, tokens_out, 0, how if how == "tokenizer" else "bytes")
            return result
        yield from self._settle(plan, plan.prompt_tokens, result.details.generated_tokens, 0, "usage")
        return result if details else result.generated_text

    def _feature_extraction(self, text: str, **kwargs: Any) -> Any:
        """`InferenceClient.feature_extraction`, paid per vector returned."""
        return (yield from self._units("feature_extraction", "per_vector", _vectors,
                                       _Step("model", "feature_extraction", (text,), kwargs)))

    def _text_to_image(self, prompt: str, **kwargs: Any) -> Any:
        """`InferenceClient.text_to_image`, paid per image."""
        return (yield from self._units("text_to_image", "per_image", _one_unit,
                                       _Step("model", "text_to_image", (prompt,), kwargs)))

    def _finish(self) -> Any:
        """Close the escrow: what was used is already paid; the rest goes back to the buyer."""
        return (yield _Step("escrow", "release", (self.escrow_id,), dict(
            amount="0", refund_remainder=True, idempotency_key=f"finish-{self.escrow_id}")))

    def _units(self, task: str, unit: str, count: Callable[[Any], int], call: _Step) -> Steps:
        """Reserve one unit, make the call, settle the units it returned."""
        plan = yield from self._reserve(_Plan(task, self._opened.unit_micro(task, unit, 1), units=1, unit=unit))
        result = yield from self._guarded(plan, _one(call))
        yield from self._settle(plan, 0, 0, count(result), "units")
        return result

    # ---- the steps every call shares ----

    def _plan_tokens(self, task: str, messages: list[dict], max_tokens: int) -> _Plan:
        prompt_tokens, _ = self._counter.prompt_tokens(messages)
        return _Plan(task, self._opened.worst_chat_micro(prompt_tokens, max_tokens), prompt_tokens=prompt_tokens)

    def _chat_call(self, messages: list, model: str | None, stream: bool, max_tokens: int, kwargs: dict) -> Steps:
        served = yield from self._served_model(model)
        return (yield _Step("model", "chat_completion", (messages,), dict(
            model=served, stream=stream, max_tokens=max_tokens, **kwargs)))

    def _served_model(self, model: str | None) -> Steps:
        """OpenAI-style servers need the served model's name in the body; a URL is not one."""
        if model is not None or not (self.model or "").startswith(("http://", "https://")):
            return model
        if getattr(self, "_served_model_id", None) is None:
            listing = yield _Step("get", self.model.rstrip("/") + "/models")
            self._served_model_id = listing["data"][0]["id"]
        return self._served_model_id

    def _reserve(self, plan: _Plan) -> Steps:
        """Hold the call's worst case on the escrow (none when it can cost nothing), or refuse before the
        model is called."""
        if plan.worst_micro == 0:
            return plan
        meter = self._opened
        try:
            hold = yield _Step("escrow", "hold", kwargs=dict(
                target=meter.escrow_id, amount=to_usdc(meter.hold_micro(plan.worst_micro)),
                ttl_seconds=self.hold_ttl_seconds, idempotency_key=plan.key + "-hold"))
        except InsufficientFunds as error:
            raise meter.refusal(plan.worst_micro, error) from None
        plan.hold_id = hold.id
        plan.started = time.perf_counter()  # the call's latency is the model's; the hold is billing time
        return plan

    def _guarded(self, plan: _Plan, steps: Steps) -> Steps:
        """Run `steps`; if they fail, void the call's hold and raise their error."""
        try:
            return (yield from steps)
        except BaseException:
            yield from self._void(plan)
            raise

    def _void(self, plan: _Plan) -> Steps:
        if plan.hold_id is None:
            return
        try:
            yield _Step("escrow", "void", kwargs=dict(hold_id=plan.hold_id, idempotency_key=plan.key + "-void"))
        except Exception as error:
            # The call's own error is the one to raise; the hold frees itself at its TTL.
            logger.warning("could not void hold %s (it frees itself at its TTL): %s", plan.hold_id, error)

    def _settle(self, plan: _Plan, tokens_in: int, tokens_out: int, units: int, counted_by: str) -> Steps:
        billing_started = time.perf_counter()
        pricing = self._opened.pricing
        cost = pricing.unit_micro(plan.unit, units) if plan.unit is not None else \
            pricing.tokens_micro(tokens_in, tokens_out)
        settled = None
        if cost or tokens_in or tokens_out:
            settled = yield from self._guarded(plan, self._release(plan, tokens_in, tokens_out, cost))
        else:
            yield from self._void(plan)
        return self._receipt(plan, tokens_in, tokens_out, units, counted_by, settled, billing_started)

    def _release(self, plan: _Plan, tokens_in: int, tokens_out: int, cost: int) -> Steps:
        """One release frees the call's hold and pays what was delivered, in one ledger transaction."""
        try:
            return (yield self._release_step(plan, tokens_in, tokens_out, cost, plan.hold_id, "-release"))
        except StateConflict as error:
            # The call's hold expired (a stream outlived its TTL): what was delivered is still owed.
            if plan.hold_id is None or error.details.get("hold_id") != plan.hold_id \
                    or error.details.get("hold_status") != "expired":
                raise
        return (yield self._release_step(plan, tokens_in, tokens_out, cost, None, "-late"))

    def _release_step(self, plan: _Plan, tokens_in: int, tokens_out: int, cost_micro: int,
                      hold_id: str | None, suffix: str) -> _Step:
        return _Step("escrow", "release", (self.escrow_id,), dict(
            amount=to_usdc(cost_micro), refund_remainder=False, hold_id=hold_id, idempotency_key=plan.key + suffix,
            usage={"prompt_tokens": tokens_in, "completion_tokens": tokens_out}, meta={"task": plan.task}))

    def _receipt(self, plan: _Plan, tokens_in: int, tokens_out: int, units: int, counted_by: str,
                 settled: Any, billing_started: float) -> CallReceipt:
        meter = self._opened
        return meter.record(CallReceipt(
            escrow_id=meter.escrow_id, task=plan.task, tokens_in=tokens_in, tokens_out=tokens_out, units=units,
            # What the ledger took, bonuses included (a streak adds to the release).
            gross=settled.gross if settled else to_usdc(0), fee=settled.fee if settled else to_usdc(0),
            net=settled.net if settled else to_usdc(0), bonus=settled.bonus if settled else to_usdc(0),
            latency_ms=(billing_started - plan.started) * 1000,
            billing_ms=(time.perf_counter() - billing_started) * 1000, counted_by=counted_by,
            pricing=meter.pricing.to_dict()), settled.remaining if settled else None)

    def _settle_stream(self, plan: _Plan, tally: _ChatTally) -> Steps:
        """Pay what a stream delivered: the server's usage, else the tokens of the text received."""
        usage = tally.usage
        if usage is not None and getattr(usage, "completion_tokens", None) is not None:
            tokens_in, tokens_out, how = usage.prompt_tokens, usage.completion_tokens, "usage"
        elif not tally.text and tally.chunks == 0:
            tokens_in, tokens_out, how = 0, 0, "usage"  # nothing delivered: nothing to pay
        else:
            tokens_in = plan.prompt_tokens
            tokens_out, how = self._counter.text_tokens("".join(tally.text), fallback=tally.chunks)
        return (yield from self._settle(plan, tokens_in, tokens_out, 0, how))


class _Run:
    """A core generator being driven: `step` is what it asks for next, None once it returned `result`."""

    def __init__(self, steps: Steps):
        self._steps, self.step, self.result = steps, None, None
        self.answer(None)

    def answer(self, value: Any) -> None:
        self._resume(self._steps.send, value)

    def fail(self, error: BaseException) -> None:
        self._resume(self._steps.throw, error)

    def _resume(self, how: Callable, value: Any) -> None:
        try:
            self.step = how(value)
        except StopIteration as done:
            self.step, self.result = None, done.value


class PaidInferenceClient(_PaidCore, InferenceClient):
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

    def _begin(self, opening: Callable[[], Steps]) -> None:
        self._drive(opening())  # the escrow opens in the constructor

    def _drive(self, steps: Steps) -> Any:
        run = _Run(steps)
        while run.step is not None:
            try:
                value = self._perform(run.step)
            except BaseException as error:
                run.fail(error)
            else:
                run.answer(value)
        return run.result

    def _perform(self, step: _Step) -> Any:
        if step.on == "escrow":
            return getattr(self.escrow, step.name)(*step.args, **step.kwargs)
        if step.on == "model":
            entered = _IN_BASE_CALL.set(True)
            try:
                return getattr(InferenceClient, step.name)(self, *step.args, **step.kwargs)
            finally:
                _IN_BASE_CALL.reset(entered)
        return httpx.get(step.name, headers=self.headers, timeout=30).json()

    def _metered(self, plan: _Plan, stream: Any, tally: _ChatTally):
        try:
            for chunk in stream:
                yield tally.add(chunk)
        finally:
            # Normal end, an abandoned generator (close/GC) and a broken stream all land here.
            self._drive(self._settle_stream(plan, tally))


class AsyncPaidInferenceClient(_PaidCore, AsyncInferenceClient):
    """The async twin of `PaidInferenceClient`: the same constructor and methods, awaited.

    `escrow` may be an async or a sync escrow client. The constructor does no I/O, so the
    escrow opens with the first call (or `async with client`); `escrow_id`, `receipts` and
    `remaining` are there from then on. `async with paid_inference(...)` also closes it.
    """

    def _begin(self, opening: Callable[[], Steps]) -> None:
        self._opening: Callable[[], Steps] | None = opening
        self._opening_lock = asyncio.Lock()   # concurrent first calls open one escrow

    async def __aenter__(self) -> AsyncPaidInferenceClient:
        await self._open_once()
        return self

    async def _open_once(self) -> None:
        async with self._opening_lock:
            if self._opening is not None:
                await self._run(self._opening())
                self._opening = None

    async def _drive(self, steps: Steps) -> Any:
        if self._opening is not None:
            await self._open_once()
        return await self._run(steps)

    async def _run(self, steps: Steps) -> Any:
        run = _Run(steps)
        while run.step is not None:
            try:
                value = await self._perform(run.step)
            except BaseException as error:
                run.fail(error)
            else:
                run.answer(value)
        return run.result

    async def _perform(self, step: _Step) -> Any:
        if step.on == "escrow":
            value = getattr(self.escrow, step.name)(*step.args, **step.kwargs)
            return await value if inspect.isawaitable(value) else value
        if step.on == "model":
            entered = _IN_BASE_CALL.set(True)
            try:
                return await getattr(AsyncInferenceClient, step.name)(self, *step.args, **step.kwargs)
            finally:
                _IN_BASE_CALL.reset(entered)
        async with httpx.AsyncClient(timeout=30) as http:
            return (await http.get(step.name, headers=self.headers)).json()

    async def _metered(self, plan: _Plan, stream: Any, tally: _ChatTally):
        try:
            async for chunk in stream:
                yield tally.add(chunk)
        finally:
            await self._drive(self._settle_stream(plan, tally))


def _driven(core: Callable[..., Steps], like: Callable, base: Callable | None) -> Callable:
    """A sync paid method: the core's steps for the call, performed now (`base` when re-entered)."""
    @functools.wraps(like)
    def method(self: PaidInferenceClient, *args: Any, **kwargs: Any) -> Any:
        if base is not None and _IN_BASE_CALL.get():
            return base(self, *args, **kwargs)
        return self._drive(core(self, *args, **kwargs))
    return method


def _awaited(core: Callable[..., Steps], like: Callable, base: Callable | None) -> Callable:
    """Its async twin: the same steps, awaited."""
    @functools.wraps(like)
    async def method(self: AsyncPaidInferenceClient, *args: Any, **kwargs: Any) -> Any:
        if base is not None and _IN_BASE_CALL.get():
            return await base(self, *args, **kwargs)
        return await self._drive(core(self, *args, **kwargs))
    return method


def _per_call(task: str) -> Callable[..., Steps]:
    def steps(self: _PaidCore, *args: Any, **kwargs: Any) -> Steps:
        return self._units(task, "per_call", _one_unit, _Step("model", task, args, kwargs))
    return steps


def _install(shell: type, wrap: Callable, base: type) -> None:
    """Give a shell every paid method: the paid calls with the core's signatures, and every other task
    of `base` (billed per call) with base's signature."""
    methods = {name: wrap(getattr(_PaidCore, "_" + name), getattr(_PaidCore, "_" + name), getattr(base, name, None))
               for name in PAID_METHODS}
    methods.update({name: wrap(_per_call(name), getattr(base, name), getattr(base, name)) for name in PER_CALL_TASKS})
    for name, method in methods.items():
        method.__name__, method.__qualname__ = name, f"{shell.__name__}.{name}"
        setattr(shell, name, method)


_install(PaidInferenceClient, _driven, InferenceClient)
_install(AsyncPaidInferenceClient, _awaited, AsyncInferenceClient)


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
        client = AsyncPaidInferenceClient(self._model, **self._args)
        await client._open_once()
        self._client = client
        return client

    async def __aexit__(self, *exc_info: Any) -> None:
        await self._client.finish()
