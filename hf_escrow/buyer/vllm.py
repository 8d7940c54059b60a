"""vLLM billing: the vLLM guide's lock / serve / release flow, as a library.

`EscrowedEngine` wraps an engine shaped like vLLM's `AsyncLLMEngine` (an async
`generate(prompt, sampling_params, request_id)` that yields request outputs whose
`.outputs[0].token_ids` grow as tokens arrive, and `get_tokenizer()`). For each request
it follows the guide (`vllm_billing_server.py`, `worker_settlement.py`):

1. Lock: count the prompt's tokens with the engine's own tokenizer and create an escrow
   for ``(prompt_tokens + max_tokens) x price_per_token``, plus headroom for the bonuses
   the request can earn, with the guide's `metadata`, `bonus_conditions` and
   `referral_code`.
2. Serve: stream the completion, timing tokens/s from the first token to the end.
3. Release: optionally score the text with a judge, then release with the tokens actually
   generated, the price, the quality score and the measured tokens/s. The ledger pays
   ``(prompt + completion) x price`` (the base), adds the earned bonuses out of the
   remainder - throughput above ``throughput_tps_min`` adds ``bonus_pct`` % of the base, a
   quality score above 0.9 adds 10 % - and refunds the rest. If generation fails (or the
   request is cancelled) the escrow is cancelled instead: a full refund.

It runs on real vLLM where vLLM is installed. Where it is not (CPU laptops, CI, these
tests), `TransformersEngine` (`hf_escrow.buyer.transformers_engine`) is a real engine of the same
shape built on transformers.

Example:
    >>> import asyncio, hf_escrow
    >>> from hf_escrow.vllm import EscrowedEngine, SamplingParams, TransformersEngine
    >>> engine = TransformersEngine("path/to/model")          # or vllm.AsyncLLMEngine.from_engine_args(...)
    >>> billed = EscrowedEngine(engine, escrow=hf_escrow.connect(agent="vllm-orchestrator-1"),
    ...                         seller="vllm-worker-1", price_per_token="0.000002",
    ...                         bonus_conditions={"throughput_tps_min": 100, "bonus_pct": 5})
    >>> out = asyncio.run(billed.generate_with_billing("Say hi", max_tokens=32))
    >>> out.receipt.base, out.receipt.bonus, out.receipt.fee, out.receipt.refunded  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import inspect
import logging
import math
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable, Iterable

from .._exceptions import ValidationError
from .._models import Receipt
from ..money import to_decimal, to_usdc
from ..pricing import QUALITY_BONUS_PCT, STREAK_BONUS_PCT, Pricing, with_headroom_micro
from .transformers_engine import DEFAULT_MAX_TOKENS, CompletionOutput, RequestOutput, SamplingParams, TransformersEngine

# TransformersEngine and the vLLM shapes are importable from here, as they were before they had a module.
__all__ = ["EscrowedEngine", "BilledGeneration", "SamplingParams", "TransformersEngine", "RequestOutput",
           "CompletionOutput"]

logger = logging.getLogger(__name__)

# What the ledger pays on top of the base by default (pricing.QUALITY_BONUS_PCT and
# STREAK_BONUS_PCT; the vLLM guide's "+10% above 0.9" and "2% streak multiplier") size the
# headroom the adapter locks; pass `headroom_pct` when a server is configured otherwise.


@dataclass(frozen=True)
class BilledGeneration:
    """One request's completion and what it cost.

    `receipt` is the release receipt: `.base` is (prompt + completion) x price,
    `.bonus` (split in `.bonus_parts`) the earned bonuses, `.gross` = base + bonus,
    `.fee` the platform fee (seller gets `.net`), `.refunded` what went back to the buyer.
    """

    text: str
    completion_tokens: int
    prompt_tokens: int
    tokens_per_sec: float
    quality_score: float | None
    receipt: Receipt
    escrow_id: str
    request_id: str
    finish_reason: str | None = None

    @property
    def cost(self) -> Decimal:
        """What the buyer paid for this request (base + bonus, fee included)."""
        return self.receipt.gross


class EscrowedEngine:
    """Bill every request of a vLLM-shaped engine through its own escrow (the guide's flow).

    Args:
        engine: `vllm.AsyncLLMEngine` / `AsyncLLM`, `TransformersEngine`, or anything with
            ``get_tokenizer()`` (sync or async) and an async-iterator
            ``generate(prompt, sampling_params, request_id)``.
        escrow: the buyer's `EscrowClient` or `AsyncEscrowClient` (embedded or HTTP).
        seller: the worker's agent id or wallet (the guide's `worker_wallet`).
        price_per_token: USDC per token, prompt and completion alike (exact; "0.000002").
        model: recorded in the escrow metadata; defaults to the engine's model name.
        bonus_conditions: ``{"throughput_tps_min": 100, "bonus_pct": 5}`` as in the guide.
        referral_code: the referrer who earns 15 % of the fees of these escrows.
        headroom_pct: percent of the worst-case base locked on top for bonuses. None (the
            default) locks exactly what the bonuses this request can earn may cost: the
            throughput `bonus_pct`, 10 % when there is a quality judge, 2 % for the streak.
            Unearned headroom is refunded at release.
        quality_judge: ``(prompt, text) -> score in [0, 1]``, sync or async; above 0.9
            earns the quality bonus.
        ttl_seconds: how long an escrow may stay open before the ledger refunds it.

    Example:
        >>> billed = EscrowedEngine(engine, escrow=esc, seller="vllm-worker-1", price_per_token="0.000002",
        ...                         bonus_conditions={"throughput_tps_min": 100, "bonus_pct": 5},
        ...                         referral_code="ref_abc", quality_judge=my_judge)
        >>> out = await billed.generate_with_billing("Explain escrow", max_tokens=128)
        >>> out.completion_tokens, out.tokens_per_sec, out.receipt.bonus_parts  # doctest: +SKIP
    """

    def __init__(self, engine: Any, *, escrow: Any, seller: str, price_per_token: Any, model: str | None = None,
                 bonus_conditions: dict | None = None, referral_code: str | None = None,
                 headroom_pct: Any = None, quality_judge: Callable[[str, str], Any] | None = None,
                 ttl_seconds: float = 3600):
        self.engine = engine
        self.escrow = escrow
        self.seller = seller
        self.price_per_token = to_decimal(price_per_token, what="price_per_token")
        if self.price_per_token == 0:
            raise ValidationError("price_per_token must be above 0, e.g. \"0.000002\"")
        self._pricing = Pricing(per_token=self.price_per_token)
        self.model = model or _engine_model_name(engine)
        self.bonus_conditions = dict(bonus_conditions) if bonus_conditions is not None else None
        self.referral_code = referral_code
        self.headroom_pct = None if headroom_pct is None else to_decimal(headroom_pct, what="headroom_pct")
        self.quality_judge = quality_judge
        self.ttl_seconds = ttl_seconds

    # ---- sizing ---------------------------------------------------------------------

    def escrow_amount(self, prompt_tokens: int, max_tokens: int) -> Decimal:
        """USDC locked for a request: worst-case base plus headroom for its bonuses.

        Computed in integer micro-USDC with the ledger's own rounding, so each bonus the
        ledger can pay (each rounded separately from the base) fits in the headroom.

        Example:
            >>> billed.escrow_amount(prompt_tokens=1000, max_tokens=387)   # at 0.000002, 5% + 2% streak
            Decimal('0.002968')
        """
        base = self._pricing.tokens_micro(prompt_tokens, max_tokens)
        return to_usdc(with_headroom_micro(base, self._headroom_parts()))

    def _headroom_parts(self) -> list[Decimal]:
        if self.headroom_pct is not None:
            return [self.headroom_pct]
        parts = [STREAK_BONUS_PCT]  # any seller may hold a streak; the ledger decides
        if self.bonus_conditions and self.bonus_conditions.get("bonus_pct") is not None:
            parts.append(to_decimal(self.bonus_conditions["bonus_pct"], what="bonus_conditions.bonus_pct"))
        if self.quality_judge is not None:
            parts.append(QUALITY_BONUS_PCT)
        return parts

    # ---- one request ----------------------------------------------------------------

    async def generate_with_billing(self, prompt: str, sampling_params: Any = None, *, max_tokens: int | None = None,
                                    request_id: str | None = None, seller: str | None = None) -> BilledGeneration:
        """Lock, generate, judge, release; cancel (full refund) if generation fails.

        `max_tokens` overrides the one in `sampling_params` (default 16, as in vLLM);
        `seller` overrides the engine-wide worker for this request.

        Example:
            >>> out = await billed.generate_with_billing("Say hi", SamplingParams(max_tokens=32, temperature=0.7))
            >>> out.receipt.base == (out.prompt_tokens + out.completion_tokens) * Decimal("0.000002")
            True
        """
        params = _sampling_params(sampling_params, max_tokens)
        limit = params.max_tokens
        request_id = request_id or f"hfe-{uuid.uuid4().hex}"

        # Phase 1 - lock. Prompt tokens come from the engine's own tokenizer (the guide's
        # estimate); vLLM's get_tokenizer() is async in some versions and sync in others.
        tokenizer = await _maybe_await(self.engine.get_tokenizer())
        prompt_tokens = len(tokenizer.encode(prompt))
        record = await self._call("create_escrow", self.seller if seller is None else seller,
                                  self.escrow_amount(prompt_tokens, limit), ttl_seconds=self.ttl_seconds,
                                  description=f"vLLM request {request_id}"[:200],
                                  meta={"model": self.model, "prompt_tokens": prompt_tokens,
                                        "max_completion_tokens": limit, "request_id": request_id},
                                  bonus_conditions=self.bonus_conditions, referral_code=self.referral_code,
                                  pricing=self._pricing)

        # Phase 2 - serve. Anything raised here, cancellation included, means the work was
        # not delivered: cancel the escrow (full refund to the buyer) and re-raise.
        try:
            text, completion_tokens, tps, finish_reason = await self._stream(prompt, params, request_id)
        except BaseException as error:
            await self._cancel(record.id, error)
            raise

        # Phase 3 - judge and release. The work is delivered at this point, so a failing
        # judge costs the seller only the quality bonus, never the base.
        quality = await self._judge(prompt, text)
        try:
            receipt = await self._call(
                "release", record.id,
                usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
                price_per_token=str(self.price_per_token), quality_score=quality,
                throughput_tps=tps,
                meta={"request_id": request_id, "actual_completion_tokens": completion_tokens,
                      "tokens_per_sec": round(tps, 3), "finish_reason": finish_reason})
        except Exception as error:
            # Not cancelled: the seller did the work. The escrow stays open so the release can
            # be retried (or refunds itself at its TTL).
            error.add_note(f"escrow {record.id} is still open: retry the release or cancel it")
            raise
        return BilledGeneration(text=text, completion_tokens=completion_tokens, prompt_tokens=prompt_tokens,
                                tokens_per_sec=tps, quality_score=quality, receipt=receipt, escrow_id=record.id,
                                request_id=request_id, finish_reason=finish_reason)

    async def batch_generate(self, requests: Iterable[dict | str]) -> list[BilledGeneration | BaseException]:
        """The guide's `batch_inference`: every request with its own escrow, run together.

        Each request is a prompt, or a dict with `prompt` and optionally `max_tokens`,
        `sampling_params`, `request_id` and `seller` (alias `worker_wallet`). Failures come
        back in place as exceptions (their escrows already cancelled), as with
        ``asyncio.gather(..., return_exceptions=True)``.

        Example:
            >>> results = await billed.batch_generate([{"prompt": "Hi", "max_tokens": 8}, "Bye"])
            >>> [r.receipt.gross for r in results if not isinstance(r, BaseException)]  # doctest: +SKIP
        """
        tasks = []
        for request in requests:
            if isinstance(request, str):
                request = {"prompt": request}
            seller = request.get("seller", request.get("worker_wallet"))
            tasks.append(self.generate_with_billing(
                request["prompt"], request.get("sampling_params"), max_tokens=request.get("max_tokens"),
                request_id=request.get("request_id"), seller=seller))
        return list(await asyncio.gather(*tasks, return_exceptions=True))

    # ---- internals ------------------------------------------------------------------

    async def _stream(self, prompt: str, params: Any, request_id: str) -> tuple[str, int, float, str | None]:
        """Run the request; returns text, completion tokens, tokens/s and finish reason."""
        delta = _is_delta(params)
        text, token_count, finish_reason = "", 0, None
        first_token_at: float | None = None
        start = time.perf_counter()
        outputs = self.engine.generate(prompt, params, request_id)
        try:
            async for output in outputs:
                if not output.outputs:
                    continue
                completion = output.outputs[0]
                ids = len(completion.token_ids)
                if delta:  # DELTA outputs carry only the new tokens; the guide assumes cumulative
                    text, token_count = text + completion.text, token_count + ids
                else:
                    text, token_count = completion.text, ids
                if first_token_at is None and token_count:
                    first_token_at = time.perf_counter()
                finish_reason = getattr(completion, "finish_reason", None) or finish_reason
        finally:
            # Closing the stream tells the engine to stop this request (vLLM aborts it,
            # TransformersEngine stops its worker) when we leave early.
            await _aclose(outputs)
        # As the guide measures it: completion tokens over the time from the first token to
        # the end of the stream (queueing and prefill are not the worker's decode speed).
        elapsed = time.perf_counter() - (first_token_at or start)
        tps = token_count / elapsed if elapsed > 0 else 0.0
        return text, token_count, tps, finish_reason

    async def _judge(self, prompt: str, text: str) -> float | None:
        if self.quality_judge is None:
            return None
        judge = self.quality_judge
        try:
            if inspect.iscoroutinefunction(judge) or inspect.iscoroutinefunction(getattr(judge, "__call__", None)):
                score = await judge(prompt, text)
            else:  # a sync judge may be a model call: keep it off the event loop
                score = await _maybe_await(await asyncio.to_thread(judge, prompt, text))
            score = float(score)
            if not (math.isfinite(score) and 0.0 <= score <= 1.0):
                raise ValidationError(f"quality_judge must return a score in [0, 1], got {score!r}")
            return score
        except Exception:
            logger.warning("quality judge failed; releasing without a quality score (no quality bonus)",
                           exc_info=True)
            return None

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call the escrow client, async or sync; a sync one runs in a thread so a slow
        (HTTP) escrow call never stalls the other requests on the event loop."""
        from ..client import AsyncEscrowClient, EscrowClient
        fn = getattr(self.escrow, method)
        if isinstance(self.escrow, EscrowClient):
            return await asyncio.to_thread(fn, *args, **kwargs)
        if not isinstance(self.escrow, AsyncEscrowClient) and method == "create_escrow" and "pricing" in kwargs:
            # A duck-typed client may not know the keyword-only `pricing` (the price is sent at release anyway).
            if "pricing" not in inspect.signature(fn).parameters:
                kwargs.pop("pricing")
        return await _maybe_await(fn(*args, **kwargs))

    async def _cancel(self, escrow_id: str, error: BaseException) -> None:
        try:
            await self._call("cancel", escrow_id, reason=f"generation failed: {type(error).__name__}: {error}"[:500])
        except Exception as cancel_error:  # keep the original error; say the refund did not happen
            logger.error("could not cancel escrow %s after a failed generation", escrow_id, exc_info=True)
            error.add_note(f"cancelling escrow {escrow_id} also failed: {cancel_error!r}; it refunds at its TTL")


def _sampling_params(sampling_params: Any, max_tokens: int | None) -> Any:
    """A copy of the caller's params (never mutated) with a usable, bounded max_tokens."""
    if sampling_params is None:
        params = SamplingParams(max_tokens=DEFAULT_MAX_TOKENS)
    else:  # vLLM's SamplingParams has clone(); anything else is copied shallowly
        clone = getattr(sampling_params, "clone", None)
        params = clone() if callable(clone) else copy.copy(sampling_params)
    if max_tokens is not None:
        if dataclasses.is_dataclass(params):
            params = dataclasses.replace(params, max_tokens=max_tokens)
        else:
            params.max_tokens = max_tokens
    limit = getattr(params, "max_tokens", None)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        # vLLM allows max_tokens=None (up to the context length); an escrow needs a bound.
        raise ValidationError(f"max_tokens must be a whole number >= 1 to size the escrow, got {limit!r}")
    if getattr(params, "n", 1) != 1:
        raise ValidationError("one completion per billed request (n=1); send several requests with batch_generate")
    return params


def _is_delta(params: Any) -> bool:
    kind = getattr(params, "output_kind", None)
    return getattr(kind, "name", None) == "DELTA"


def _engine_model_name(engine: Any) -> str:
    name = getattr(engine, "model_name", None) or getattr(getattr(engine, "model_config", None), "model", None)
    return str(name) if name else "unknown"


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def _aclose(stream: Any) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
