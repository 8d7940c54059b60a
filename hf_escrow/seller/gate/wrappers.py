"""The wrapper of one gated function: one I/O-free script per call, run by a sync or an async shell.

Gradio tells a stream or a coroutine by the wrapper's own kind, so a gated function gets a
wrapper of its handler's kind: a function, a coroutine function, a generator or an async
generator. Each is a thin shell over one script (`GatedFunction.calling` for a call,
`streaming` for a stream): a generator that yields what it needs done - a blocking
ledger call, the handler's result, a stream's next item or its close, an output for the
caller - and is sent the answer. The sync shell does each directly; the async shell runs
ledger calls in a worker thread, shielded from cancellation so no hold is left dangling.
The same shells time a handler billed per second (`timed`).
"""

from __future__ import annotations

import functools
import inspect
import time
import typing
from typing import TYPE_CHECKING, Any, Callable, Generator

from ... import challenge
from ..._exceptions import EscrowError, ValidationError
from ...challenge import spend_token_from
from ...money import NS_PER_SECOND
from .billing import Bill, GateReceipt, open_bill, price_of
from .signature import Call, GradioSignature, headers_of
from .space import gradio_module, spaces_gpu

if TYPE_CHECKING:
    from . import Gate

# What a script asks of its shell: (LEDGER, fn, *args) a blocking call; (AWAIT, value) a
# handler's result (a coroutine under the async shell); (NEXT, stream) its next item, or
# END; (CLOSE, stream); (OUT, value) an output for the caller.
LEDGER, AWAIT, NEXT, CLOSE, OUT = "ledger", "await", "next", "close", "out"
END = object()
Script = Generator[tuple, Any, None]


class GatedFunction:
    """Builds the wrapper of one gated function, with the signature Gradio reads.

    The core (`prepare`, `open`, `admit`, `flush`, `settle`, `output`, the refusals) is
    shared by every kind of handler; the scripts say in which order a call runs it.
    """

    def __init__(self, gate: Gate, fn: Callable, *, price: Any, per: str, fields: bool, token_field: str,
                 with_receipt: bool, notify: bool, max_chunks: int, capture_every: int, max_ns: int | None,
                 gpu: bool, batched: bool = False):
        if not callable(fn):
            raise ValidationError("@paid decorates a function")
        self.gate, self.fn, self.price, self.per = gate, fn, price, per
        self.batched = batched
        self.name = getattr(fn, "__name__", "call")
        self.max_ns = max_ns
        self.with_receipt, self.notify = with_receipt, notify
        self.max_chunks, self.capture_every = max_chunks, capture_every
        self.gr = gradio_module()
        self.streamed = inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn)
        if per == "chunk" and not self.streamed:
            raise ValidationError('per="chunk" needs a generator handler (one that yields); use per="call"')
        self.static_price = None if callable(price) else price_of(price, per)
        self.run = timed(fn, max_ns if gpu else None) if per == "second" else fn
        self.signature = GradioSignature(fn, token_field if fields else None, self.gr)
        self.wrapper = shell(self.streaming if self.streamed else self.calling, fn)
        functools.update_wrapper(self.wrapper, fn)
        self.signature.apply(self.wrapper)
        self.wrapper.gate = gate
        self.wrapper.receipts = gate.receipts

    # -- the scripts: what one call does, in order --

    def calling(self, *args: Any, **kwargs: Any) -> Script:
        call = self.prepare(args, kwargs)
        bill = yield LEDGER, self.open, call
        try:
            result = self.step(bill, (yield AWAIT, self.run(*call.args, **call.kwargs)))
        except BaseException as error:
            yield LEDGER, bill.abandon, True
            _rethrow(self.failed(error, call), error)
        receipt = yield LEDGER, self.settle, bill, call
        self.toast(receipt, call)
        yield OUT, self.output(result, receipt)

    def streaming(self, *args: Any, **kwargs: Any) -> Script:
        call = self.prepare(args, kwargs)
        bill = yield LEDGER, self.open, call
        failed, last = False, None
        stream = self.run(*call.args, **call.kwargs)
        try:
            while self.may_run(bill, call):
                try:
                    item = yield NEXT, stream
                    if item is END:
                        break
                    item = self.step(bill, item)
                except BaseException as error:
                    failed = True
                    _rethrow(self.failed(error, call), error)
                if not self.admit(bill, call):
                    break
                if bill.delivered():
                    yield LEDGER, self.flush, bill, call
                yield OUT, self.output(item, bill.pending())
                last = item
            receipt = yield LEDGER, self.settle, bill, call
            self.toast(receipt, call)
            if self.with_receipt:
                yield OUT, self.output(last, receipt)
        finally:
            yield CLOSE, stream
            yield LEDGER, bill.abandon, failed

    # -- per call: arguments, token, price --

    def prepare(self, args: tuple, kwargs: dict) -> Call:
        call = self.signature.bind(args, kwargs)
        try:
            call.token = call.typed_token or spend_token_from(headers_of(call.request))
        except EscrowError as error:
            raise self.refused(error, call) from None
        call.price = self.static_price
        if call.price is None:
            try:
                call.price = price_of(self.price(*call.args, **call.kwargs), self.per)
            except EscrowError as error:
                raise self.refused(error, call) from None
        return call

    def step(self, bill: Bill, produced: Any) -> Any:
        """The handler's output; per second, unpacked from its measured run time."""
        if self.per != "second":
            return produced
        item, elapsed_ns = produced
        bill.ran(elapsed_ns)
        if not self.streamed:
            bill.units = 1
        return item

    # -- the core: holds and captures, as the caller sees them --

    def open(self, call: Call) -> Bill:
        try:
            return open_bill(self.gate, call.token, call.price, per=self.per, max_chunks=self.max_chunks,
                             capture_every=self.capture_every, max_ns=self.max_ns, batched=self.batched)
        except EscrowError as error:
            raise self.refused(error, call) from None

    def may_run(self, bill: Bill, call: Call) -> bool:
        try:
            return bill.may_run()
        except EscrowError as error:
            raise self.refused(error, call) from None

    def admit(self, bill: Bill, call: Call) -> bool:
        try:
            return bill.admit_chunk()
        except EscrowError as error:
            raise self.refused(error, call) from None

    def flush(self, bill: Bill, call: Call) -> None:
        try:
            bill.flush()
        except EscrowError as error:
            _rethrow(self.refused(error, call), error)

    def settle(self, bill: Bill, call: Call) -> GateReceipt:
        """Pay the call; a refused payment withholds the result (and frees the hold)."""
        try:
            return bill.settle()
        except EscrowError as error:
            if self.per == "call" and not self.streamed:
                try:
                    bill.tab.void()
                except EscrowError:
                    pass  # the hold ends at its TTL; the caller learns why the result was withheld
                withheld = type(error)(f"payment for this call failed ({error.message}): the result was withheld",
                                       details=error.details)
                _rethrow(self.refused(withheld, call), error)
            _rethrow(self.refused(error, call), error)

    def refused(self, error: EscrowError, call: Call) -> BaseException:
        """A payment error, as a gr.Error inside Gradio (so its message reaches the caller).

        A refusal to pay carries the challenge (`hf_escrow.challenge`) behind its message.
        """
        if call.price and challenge.reason_of(error):
            error.details = {"price_micro": call.price, **error.details}
        if not call.in_gradio:
            return error
        title = {"payment_required": "Payment required", "insufficient_funds": "Escrow too small",
                 "state_conflict": "Escrow closed", "forbidden": "Spend token refused"}.get(error.code,
                                                                                           "Payment refused")
        message = error.message
        if challenge.reason_of(error):
            message = self.gate.offer(self.name).gradio_message(error)
        return self.gr.Error(message, title=title, print_exception=False)

    def failed(self, error: BaseException, call: Call) -> BaseException:
        """A handler error: the caller learns what it was charged."""
        if not call.in_gradio or not isinstance(error, Exception):
            return error
        note = "not charged" if self.per == "call" or not self.streamed else "charged for the delivered chunks only"
        if isinstance(error, self.gr.Error):
            error.message = f"{error.message} ({note})"
            return error
        return self.gr.Error(f"the call failed ({type(error).__name__}); you were {note}", title="Call failed")

    def output(self, result: Any, shown: GateReceipt | dict) -> Any:
        if not self.with_receipt:
            return result
        shown = shown.to_dict() if isinstance(shown, GateReceipt) else shown
        return (*result, shown) if isinstance(result, tuple) else (result, shown)

    def toast(self, receipt: GateReceipt, call: Call) -> None:
        if self.notify and call.in_gradio:
            try:
                note = (f"{receipt.remaining} USDC left in escrow {receipt.escrow_id}" if receipt.settled
                        else f"captured from escrow {receipt.escrow_id} at the next flush")
                self.gr.Info(f"Paid {receipt.charged} USDC; {note}", duration=4)
            except Exception:  # a toast is a nicety: never fail a paid call over it
                pass


def timed(fn: Callable, gpu_ns: int | None) -> Callable:
    """`fn`, returning (or yielding) each output with the nanoseconds it took to make it.

    The clock runs inside the function, so under ``@spaces.GPU`` (`gpu_ns`: its duration)
    the GPU wait is outside it, and the time travels back with the result from ZeroGPU's
    worker process. A stream is timed inside each step: its consumer's time is not its own.
    """
    clock = time.perf_counter_ns

    def timing_call(*args: Any, **kwargs: Any) -> Script:
        started = clock()
        result = yield AWAIT, fn(*args, **kwargs)
        yield OUT, (result, clock() - started)

    def timing_stream(*args: Any, **kwargs: Any) -> Script:
        stream = fn(*args, **kwargs)
        try:
            while True:
                started = clock()
                item = yield NEXT, stream
                if item is END:
                    return
                yield OUT, (item, clock() - started)
        finally:
            yield CLOSE, stream

    streamed = inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn)
    measured = shell(timing_stream if streamed else timing_call, fn)
    functools.update_wrapper(measured, fn)
    if gpu_ns is None:
        return measured
    gpu = spaces_gpu()
    return measured if gpu is None else gpu(duration=gpu_ns // NS_PER_SECOND)(measured)


# ---- the shells -----------------------------------------------------------------------------


def shell(script: Callable[..., Script], handler: Callable) -> Callable:
    """A function of `handler`'s kind (plain, coroutine, generator, async generator) that runs `script`."""
    if inspect.isasyncgenfunction(handler):
        async def run_async_stream(*args: Any, **kwargs: Any) -> Any:
            outputs = _drive_async(script(*args, **kwargs))
            try:
                async for output in outputs:
                    yield output
            finally:
                await _shielded(outputs.aclose)
        return run_async_stream
    if inspect.isgeneratorfunction(handler):
        def run_stream(*args: Any, **kwargs: Any) -> Any:
            yield from _drive(script(*args, **kwargs))
        return run_stream
    if inspect.iscoroutinefunction(handler):
        async def run_async_call(*args: Any, **kwargs: Any) -> Any:
            return [output async for output in _drive_async(script(*args, **kwargs))][0]
        return run_async_call

    def run_call(*args: Any, **kwargs: Any) -> Any:
        (result,) = _drive(script(*args, **kwargs))
        return result
    return run_call


class _Requests:
    """A script's requests, each sent the answer to the one before, or thrown its error.

    Used as a context around answering one request: what that raises (the caller leaving
    included) is kept, to be thrown into the script at its next request.
    """

    def __init__(self, script: Script):
        self.script, self.answer, self.error = script, None, None

    def __iter__(self) -> _Requests:
        return self

    def __next__(self) -> tuple:
        answer, error, self.answer, self.error = self.answer, self.error, None, None
        return self.script.throw(error) if error is not None else self.script.send(answer)

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, error: BaseException | None, traceback: Any) -> bool:
        self.error = error
        return True


def _drive(script: Script) -> Any:
    """Run a script synchronously, yielding its outputs."""
    requests = _Requests(script)
    for kind, *what in requests:
        with requests:
            requests.answer = (yield what[0]) if kind == OUT else _do(kind, *what)


async def _drive_async(script: Script) -> Any:
    """Run a script on an event loop, yielding its outputs: ledger calls in a worker thread, the handler awaited."""
    requests = _Requests(script)
    for kind, *what in requests:
        with requests:
            requests.answer = (yield what[0]) if kind == OUT else await _do_async(kind, *what)


def _do(kind: str, subject: Any, *args: Any) -> Any:
    if kind == LEDGER:
        return subject(*args)
    if kind == NEXT:
        return next(subject, END)
    if kind == CLOSE:
        return subject.close()
    return subject


async def _do_async(kind: str, subject: Any, *args: Any) -> Any:
    if kind == LEDGER:
        return await _blocking(subject, *args)
    if kind == NEXT:
        return await anext(subject, END)
    if kind == CLOSE:
        return await _shielded(subject.aclose)
    return await subject


async def _blocking(fn: Callable, *args: Any) -> Any:
    """Run a ledger call in a worker thread, to its end even if the caller is cancelled (no hold left dangling)."""
    import anyio
    with anyio.CancelScope(shield=True):
        return await anyio.to_thread.run_sync(functools.partial(fn, *args))


async def _shielded(close: Callable) -> None:
    import anyio
    with anyio.CancelScope(shield=True):
        await close()


def _rethrow(shown: BaseException, error: BaseException) -> typing.NoReturn:
    """Raise `shown` in place of `error`, chained to it; or `error` itself, unchanged."""
    if shown is error:
        raise error
    raise shown from error
