"""A real engine with vLLM's `AsyncLLMEngine` shape, built on transformers.

`EscrowedEngine` (`hf_escrow.buyer.vllm`) bills any engine of that shape. Where vLLM is
not installed (CPU laptops, CI, the tests) `TransformersEngine` is one: `generate` streams
cumulative `RequestOutput`s token by token, and `SamplingParams` is vLLM's own when it is
installed, else a stand-in with the fields this engine honours.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

DEFAULT_MAX_TOKENS = 16  # vLLM's own SamplingParams default

try:  # Real vLLM where it is installed, so its SamplingParams pass straight through.
    from vllm import SamplingParams  # type: ignore[import-not-found]
except Exception:  # not installed (or broken): a small stand-in with the fields used here

    @dataclass
    class SamplingParams:  # type: ignore[no-redef]
        """The subset of vLLM's `SamplingParams` that `TransformersEngine` honours.

        Example:
            >>> SamplingParams(max_tokens=32, temperature=0.7, top_p=0.9)
            SamplingParams(max_tokens=32, temperature=0.7, top_p=0.9, top_k=0, seed=None, ignore_eos=False)
        """

        max_tokens: int | None = DEFAULT_MAX_TOKENS
        temperature: float = 0.0     # 0 means greedy, as in vLLM
        top_p: float = 1.0
        top_k: int = 0               # 0 or -1: no top-k cut, as in vLLM
        seed: int | None = None
        ignore_eos: bool = False


@dataclass
class CompletionOutput:
    """vLLM's `CompletionOutput`, the fields billing and clients read."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    cumulative_logprob: float | None = None


@dataclass
class RequestOutput:
    """vLLM's `RequestOutput`: cumulative outputs, `finished` on the last one."""

    request_id: str
    prompt: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False


_END = object()


class TransformersEngine:
    """A real engine with `AsyncLLMEngine`'s shape on transformers, for CPU machines and tests.

    `generate` runs `model.generate` in a worker thread and streams every new token back
    to the event loop, so outputs grow token by token as vLLM's do; `max_concurrency`
    requests decode at once (default 1: on a CPU, parallel decodes only share the cores).
    Leaving the stream early (an error, a cancelled task) stops the worker at its next step.

    Example:
        >>> engine = TransformersEngine("path/to/model")
        >>> async def run():
        ...     async for out in engine.generate("Hello", SamplingParams(max_tokens=4), "req-1"):
        ...         print(len(out.outputs[0].token_ids), out.finished)
        >>> asyncio.run(run())  # doctest: +SKIP
        1 False
        ...
        4 True
    """

    def __init__(self, model_dir: str | Path, *, max_concurrency: int = 1, torch_dtype: Any = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.model_dir = Path(model_dir)
        self.model_name = self.model_dir.name
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, **kwargs).eval()
        self._slots = threading.BoundedSemaphore(max_concurrency)

    async def get_tokenizer(self) -> Any:
        """The tokenizer the engine feeds the model with (async, as in vLLM)."""
        return self.tokenizer

    async def generate(self, prompt: str, sampling_params: Any, request_id: str) -> AsyncIterator[RequestOutput]:
        """Yield cumulative `RequestOutput`s, one per new token, the last with `finished=True`."""
        limit = getattr(sampling_params, "max_tokens", None)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"TransformersEngine needs max_tokens >= 1, got {limit!r}")
        prompt_ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
        if prompt_ids.shape[-1] == 0:
            raise ValueError("the prompt is empty after tokenization")
        eos = None if getattr(sampling_params, "ignore_eos", False) else self.model.generation_config.eos_token_id
        stop_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def push(item: Any) -> None:
            # Called from the worker thread; after the loop closes there is nobody to tell.
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:
                stop.set()

        worker = loop.run_in_executor(None, self._decode, prompt_ids, sampling_params, limit, push, stop)
        token_ids: list[int] = []
        try:
            finished = False
            while not finished:
                # Take everything already queued, so the last token is yielded with finished=True.
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                for position, item in enumerate(items):
                    if isinstance(item, BaseException):
                        raise item
                    if item is _END:
                        # Nothing new since the last output (or no token at all): close the stream.
                        yield self._output(request_id, prompt, prompt_ids, token_ids, limit, finished=True)
                        finished = True
                        break
                    token_ids.append(item)
                    # The last token is known without waiting for the end: the limit, or a stop token.
                    last = (len(token_ids) >= limit or item in stop_ids
                            or (position + 1 < len(items) and items[position + 1] is _END))
                    # One cumulative output per token, as vLLM streams them.
                    yield self._output(request_id, prompt, prompt_ids, token_ids, limit, finished=last)
                    if last:
                        finished = True
                        break
        finally:
            stop.set()  # an early exit (error, cancellation) stops the decode at its next step
            try:
                await asyncio.shield(worker)
            except Exception:
                pass  # already reported through the queue

    def _output(self, request_id: str, prompt: str, prompt_ids: Any, token_ids: list[int], limit: int, *,
                finished: bool) -> RequestOutput:
        reason = ("length" if len(token_ids) >= limit else "stop") if finished else None
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return RequestOutput(request_id, prompt, prompt_ids[0].tolist(),
                             [CompletionOutput(0, text, list(token_ids), finish_reason=reason)], finished=finished)

    def _decode(self, prompt_ids: Any, params: Any, limit: int, push: Callable[[Any], None],
                stop: threading.Event) -> None:
        """Worker thread: one `model.generate` call, each new token pushed as it is sampled."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        class Streamer(BaseStreamer):
            prompt_seen = False

            def put(self, value: Any) -> None:
                if not self.prompt_seen:  # generate() first puts the prompt itself
                    self.prompt_seen = True
                    return
                for token in value.reshape(-1).tolist():
                    push(int(token))

            def end(self) -> None:
                pass

        class Stopped(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        try:
            with self._slots:
                if stop.is_set():
                    return
                config = copy.deepcopy(self.model.generation_config)
                config.max_new_tokens = limit
                config.max_length = None
                temperature = float(getattr(params, "temperature", 0.0) or 0.0)
                config.do_sample = temperature > 0
                if config.do_sample:
                    config.temperature = temperature
                    config.top_p = float(getattr(params, "top_p", 1.0) or 1.0)
                    top_k = int(getattr(params, "top_k", 0) or 0)
                    config.top_k = top_k if top_k > 0 else None
                else:  # greedy: unset sampling knobs so transformers does not warn about them
                    config.temperature, config.top_p, config.top_k = None, None, None
                if getattr(params, "ignore_eos", False):
                    config.eos_token_id = None
                if config.pad_token_id is None:
                    config.pad_token_id = self.tokenizer.pad_token_id
                seed = getattr(params, "seed", None)
                if seed is not None:
                    torch.manual_seed(seed)  # process-wide, like transformers' own set_seed
                with torch.no_grad():
                    self.model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                                        generation_config=config, streamer=Streamer(),
                                        stopping_criteria=StoppingCriteriaList([Stopped()]))
        except BaseException as error:  # handed to the consumer, which re-raises it
            push(error)
        finally:
            push(_END)
