"""A per-call payment gate for Gradio handlers and any callable: ``@paid(price=..., seller=...)``.

    import gradio as gr
    from hf_escrow.gate import paid

    @paid(price="0.001", seller="my-space")          # the Space's seller agent (or an EscrowClient)
    def classify(text: str) -> str:
        return model(text)

    with gr.Blocks() as demo:
        ...
        button.click(classify, inputs=text, outputs=label, api_name="classify")

A caller pays with an escrow it opened for the seller: the escrow id in the
``X-Escrow-Id`` header and its API key in ``Authorization: Bearer <key>`` (or
``X-Escrow-Key``), e.g. ``gradio_client.Client(url, headers={...})``. People using the UI
type them into two fields instead (``fields=True``). The gate checks that the key's
agent is the escrow's buyer (cached for `identity_ttl_s`), charges `price` per call (or
per yielded chunk of a streaming handler, ``per="chunk"``) and reports what was charged
and what is left (``with_receipt=True`` appends a receipt output; in Gradio also a toast).

How money moves, and why a failing handler costs nothing
--------------------------------------------------------
The ledger has no operation that gives a seller's deduction back, and every movement
must be a ledger transaction, so the gate never takes money it might have to return:

1. Before the handler runs, the gate *holds* the price against the escrow: the ledger's
   remainder (an upper bound, read at admission and lowered by every deduction's
   receipt) minus the holds of calls in progress must cover it, under one lock. A call
   the escrow cannot cover is refused here, and the handler never runs. Concurrent
   calls in this process can therefore never promise more than the escrow holds: with
   64 callers and an escrow worth N calls, exactly N are admitted.
2. The handler runs. If it raises, the hold is dropped: nothing moved, nothing to refund.
3. If it returns, the gate deducts the price (one atomic, idempotent ledger deduction,
   which refuses an overdraw by itself) and only then hands the result back. A result
   therefore never leaves the gate unpaid: if the deduction is refused - the buyer
   cancelled the escrow during the call, it expired, or another replica of the Space
   spent it - the result is withheld and the caller gets `PaymentFailed`.

So, in effect, the price is taken atomically before the result exists for the caller and
"refunded" when the handler raises, with exact money and one journal transaction per
paid call. What it costs: a handler whose result is withheld (3.) ran for nothing. The
holds live in this process; replicas of one Space sharing one escrow are still never
overdrawn (the ledger refuses), but may each run a call the escrow cannot pay for.

Streaming handlers (generator functions, sync or async):

- ``per="call"``: the price is held before the first chunk and deducted when the
  generator finishes; an error in the handler costs nothing, a caller that stops the
  stream after receiving output pays the call. The chunks are out before the deduction,
  so a buyer who cancels the escrow mid-stream gets that one stream unpaid.
- ``per="chunk"``: each chunk's price is held before the handler is asked for it and
  deducted before the chunk is yielded: every delivered chunk is paid, a failing or
  stopped handler costs only what was delivered, and a stream the escrow cannot pay
  for further stops with `InsufficientFunds` (the unpaid chunk is withheld).

Works with Gradio's queue and any ``concurrency_limit``: the holds are thread-safe and
shared by every gated function of one seller (`Gate`). Outside Gradio, pass the headers
as ``request={"X-Escrow-Id": ..., "Authorization": "Bearer ..."}`` (a dict, or any object
with ``.headers``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import inspect
import os
import threading
import time
import typing
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Callable, Mapping

from ._exceptions import (
    EscrowError, Forbidden, InsufficientFunds, NotFound, StateConflict, Unauthorized, ValidationError,
)
from .money import format_usdc, parse_usdc, to_usdc

__all__ = ["paid", "Gate", "GateReceipt", "PaymentRequired", "PaymentFailed", "seller_from_env",
           "trial_escrow", "payment_fields", "PaymentFields", "HEADER_ESCROW", "HEADER_KEY"]

HEADER_ESCROW = "x-escrow-id"
HEADER_KEY = "x-escrow-key"          # an alternative to `Authorization: Bearer` behind proxies that take it
IDENTITY_TTL_S = 30.0                # how long a checked (key, escrow) pair is trusted
MAX_TABS = 10_000                    # escrows tracked at once; the oldest idle ones are forgotten
MAX_RECEIPTS = 1_000                 # receipts kept in memory per gate
MAX_ESCROW_ID_CHARS = 128
DEFAULT_SELLER = "space-seller"


class PaymentRequired(EscrowError):
    """The call came without an escrow id or key: nothing was checked, nothing ran."""

    status_code = 402
    code = "payment_required"


class PaymentFailed(EscrowError):
    """The deduction after a successful call was refused: the result was withheld, nothing charged."""

    status_code = 402
    code = "payment_failed"


@dataclass(frozen=True)
class GateReceipt:
    """One deduction the gate made: what it took, what the seller got, what is left.

    For ``per="chunk"`` streams `units` counts the chunks paid so far in the stream and
    `total` their price; for a call both describe the call (1 unit, `total == charged`).
    """

    receipt_id: str          # the deduction's idempotency key
    escrow_id: str
    buyer: str
    seller: str
    billing: str             # "call" or "chunk"
    units: int
    charged: Decimal         # gross taken from the escrow by this deduction
    fee: Decimal             # the platform's share of `charged`
    seller_net: Decimal      # what the seller received
    total: Decimal           # charged so far in this call (streams per chunk)
    remaining: Decimal       # the escrow's remainder after this deduction
    gate_ms: float           # time the gate added to the call (checks, holds, deductions)
    at: datetime

    def to_dict(self) -> dict:
        """A JSON-able view (amounts as exact decimal strings), as shown in a UI."""
        return {"receipt_id": self.receipt_id, "escrow_id": self.escrow_id, "buyer": self.buyer,
                "seller": self.seller, "billing": self.billing, "units": self.units,
                "charged_usdc": str(self.charged), "fee_usdc": str(self.fee), "seller_net_usdc": str(self.seller_net),
                "total_usdc": str(self.total), "remaining_usdc": str(self.remaining),
                "gate_ms": round(self.gate_ms, 3), "at": self.at.isoformat()}


class _Tab:
    """What the gate knows about one escrow: its buyer, an upper bound of its remainder, the holds."""

    __slots__ = ("escrow_id", "buyer", "remaining", "held", "keys")

    def __init__(self, escrow_id: str, buyer: str, remaining: int):
        self.escrow_id = escrow_id
        self.buyer = buyer
        self.remaining = remaining
        self.held = 0
        self.keys: dict[str, float] = {}   # sha256 of a key that owns the escrow -> trusted until


class _Hold:
    """Part of an escrow's remainder set aside for one call (or one chunk) in progress."""

    __slots__ = ("tab", "amount", "open", "gate_s")

    def __init__(self, tab: _Tab, amount: int, gate_s: float = 0.0):
        self.tab = tab
        self.amount = amount
        self.open = True
        self.gate_s = gate_s


class Gate:
    """The seller's side of paid calls: admission, holds and deductions, shared by its gated functions.

    Args:
        seller: the seller's `EscrowClient`, or its agent id (connected with
            `seller_from_env`, which registers it on an embedded ledger), or None for
            `$HF_ESCROW_SELLER`.
        identity_ttl_s: how long a checked (key, escrow) pair is trusted without asking the ledger.

    Example:
        >>> gate = Gate(hf_escrow.connect(agent="my-space"))
        >>> @gate.paid(price="0.002")
        ... def embed(text): ...
    """

    def __init__(self, seller: Any = None, *, identity_ttl_s: float = IDENTITY_TTL_S):
        if seller is not None and not isinstance(seller, str) and not callable(getattr(seller, "deduct", None)):
            raise ValidationError("seller must be an EscrowClient (hf_escrow.connect(...)) or a seller agent id")
        from .client import AsyncEscrowClient
        if isinstance(seller, AsyncEscrowClient):
            raise ValidationError("the gate needs a synchronous EscrowClient (hf_escrow.connect), not connect_async")
        self._seller = seller
        self._client: Any = seller if seller is not None and not isinstance(seller, str) else None
        self._seller_id: str | None = None
        self.identity_ttl_s = identity_ttl_s
        self._lock = threading.Lock()
        self._connect_lock = threading.Lock()
        self._tabs: OrderedDict[str, _Tab] = OrderedDict()
        self.receipts: deque[GateReceipt] = deque(maxlen=MAX_RECEIPTS)

    # ---- the seller ---------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The seller's EscrowClient (connected on first use)."""
        if self._client is None:
            with self._connect_lock:
                if self._client is None:
                    self._client = seller_from_env(self._seller)
        return self._client

    @property
    def seller_id(self) -> str:
        """The seller's agent id: the one buyers open escrows for."""
        if self._seller_id is None:
            client = self.client
            self._seller_id = getattr(client, "agent", None) or client.me().agent_id
        return self._seller_id

    def balance(self, escrow_id: Any, key: Any) -> Decimal:
        """The remainder of an escrow that `key` owns, as the ledger has it now (a "check balance" button).

        Refuses like a call would (unknown key, another buyer's escrow, a closed escrow).
        """
        tab = self._admit(escrow_id, key)
        remaining = self.client.get(tab.escrow_id).remaining
        with self._lock:
            tab.remaining = min(tab.remaining, int(remaining * 1_000_000))
        return remaining

    # ---- admission, holds, deductions -----------------------------------------------

    def hold(self, escrow_id: Any, key: Any, amount_micro: int) -> _Hold:
        """Check that `key` owns `escrow_id`, an active escrow for this seller, and hold `amount_micro` of it.

        Raises PaymentRequired, Unauthorized, NotFound, Forbidden, StateConflict or
        InsufficientFunds with a message the caller can act on; nothing moves either way.
        """
        started = time.perf_counter()
        tab = self._admit(escrow_id, key)
        held = self._reserve(tab, amount_micro)
        held.gate_s += time.perf_counter() - started
        return held

    def hold_more(self, previous: _Hold, amount_micro: int) -> _Hold:
        """Hold the next unit of a call already admitted (chunks of a stream)."""
        started = time.perf_counter()
        held = self._reserve(previous.tab, amount_micro)
        held.gate_s += time.perf_counter() - started
        return held

    def release(self, held: _Hold | None) -> None:
        """Drop a hold: the call failed or was not needed; nothing moves."""
        if held is None:
            return
        with self._lock:
            if held.open:
                held.open = False
                held.tab.held -= held.amount

    def capture(self, held: _Hold, *, reason: str, billing: str = "call", units: int = 1,
                total_micro: int | None = None, gate_s: float = 0.0) -> GateReceipt:
        """Deduct what `held` set aside (the seller's own deduction) and return the receipt.

        Raises PaymentFailed when the ledger refuses; the hold is dropped either way.
        """
        started = time.perf_counter()
        receipt_id = "gate-" + uuid.uuid4().hex
        tab = held.tab
        try:
            result = self.client.deduct(tab.escrow_id, to_usdc(held.amount), reason=reason,
                                        idempotency_key=receipt_id)
        except EscrowError as error:
            self.release(held)
            self._forget(tab)
            raise PaymentFailed(f"payment for this call was refused: {error.message} - the result was withheld "
                                "and nothing was charged", details={"escrow_id": tab.escrow_id}) from error
        except BaseException:
            # e.g. a transport failure that left the deduction unknown: the idempotency key makes it safe to retry
            self.release(held)
            self._forget(tab)
            raise
        remaining = int(result.remaining * 1_000_000)
        with self._lock:
            if held.open:
                held.open = False
                tab.held -= held.amount
            tab.remaining = min(tab.remaining - held.amount, remaining)
        spent_s = held.gate_s + gate_s + time.perf_counter() - started
        receipt = GateReceipt(
            receipt_id=receipt_id, escrow_id=tab.escrow_id, buyer=tab.buyer, seller=self.seller_id,
            billing=billing, units=units, charged=result.gross, fee=result.fee, seller_net=result.net,
            total=to_usdc(total_micro if total_micro is not None else held.amount), remaining=result.remaining,
            gate_ms=spent_s * 1000, at=datetime.now(timezone.utc))
        self.receipts.append(receipt)
        return receipt

    def _admit(self, escrow_id: Any, key: Any) -> _Tab:
        if not isinstance(escrow_id, str) or not escrow_id.strip():
            raise PaymentRequired(
                f"this is a paid endpoint: send your escrow id in the X-Escrow-Id header (or fill in the escrow "
                f"field), for an escrow you opened for seller {self.seller_id!r}")
        escrow_id = escrow_id.strip()
        if len(escrow_id) > MAX_ESCROW_ID_CHARS:
            raise ValidationError("the escrow id is too long; it looks like esc_0123...")
        if not isinstance(key, str) or not key.strip():
            raise PaymentRequired("send the API key of the escrow's buyer: 'Authorization: Bearer <key>' "
                                  "(or X-Escrow-Key, or the key field)")
        digest = hashlib.sha256(key.strip().encode()).hexdigest()
        now = time.monotonic()
        with self._lock:
            tab = self._tabs.get(escrow_id)
            if tab is not None and tab.keys.get(digest, 0.0) > now:
                self._tabs.move_to_end(escrow_id)
                return tab
        buyer, escrow = self._check(escrow_id, key.strip())
        with self._lock:
            tab = self._tabs.get(escrow_id)
            if tab is None or tab.buyer != buyer:
                tab = self._tabs[escrow_id] = _Tab(escrow_id, buyer, int(escrow.remaining * 1_000_000))
            else:
                tab.remaining = min(tab.remaining, int(escrow.remaining * 1_000_000))
            tab.keys = {d: t for d, t in tab.keys.items() if t > now}
            tab.keys[digest] = now + self.identity_ttl_s
            self._tabs.move_to_end(escrow_id)
            self._evict()
            return tab

    def _check(self, escrow_id: str, key: str) -> tuple[str, Any]:
        """Ask the ledger who owns `key` and whether `escrow_id` is theirs, active and for this seller."""
        try:
            buyer = self.client.identify(key)
        except Unauthorized:
            raise Unauthorized("the API key sent is not a key of this ledger; send the key of the agent that "
                               "opened the escrow ('Authorization: Bearer <key>')") from None
        try:
            escrow = self.client.get(escrow_id)
        except NotFound:
            raise NotFound(f"escrow {escrow_id!r} is not an escrow for this endpoint; open one with "
                           f"seller {self.seller_id!r}") from None
        if escrow.seller != self.seller_id:
            raise NotFound(f"escrow {escrow_id!r} pays {escrow.seller!r}, not this endpoint; open one with "
                           f"seller {self.seller_id!r}")
        if escrow.buyer != buyer:
            raise Forbidden(f"escrow {escrow_id!r} belongs to another buyer; pay with an escrow you opened "
                            "(the key must be its buyer's)")
        if escrow.status != "active":
            raise StateConflict(f"escrow {escrow_id!r} is {escrow.status}; open a new escrow for seller "
                                f"{self.seller_id!r}")
        return buyer, escrow

    def _reserve(self, tab: _Tab, amount_micro: int) -> _Hold:
        with self._lock:
            free = tab.remaining - tab.held
            if amount_micro > free:
                busy = f", {format_usdc(tab.held)} of it held by calls in progress" if tab.held else ""
                raise InsufficientFunds(
                    f"escrow {tab.escrow_id} has {format_usdc(max(tab.remaining, 0))} USDC left{busy}; this costs "
                    f"{format_usdc(amount_micro)} USDC. Open a new escrow for seller {self.seller_id!r}",
                    details={"remaining_micro": tab.remaining, "held_micro": tab.held, "price_micro": amount_micro})
            tab.held += amount_micro
            return _Hold(tab, amount_micro)

    def _forget(self, tab: _Tab) -> None:
        """After a refused deduction: check the escrow with the ledger again on the next call."""
        with self._lock:
            tab.keys.clear()

    def _evict(self) -> None:
        while len(self._tabs) > MAX_TABS:
            idle = next((eid for eid, t in self._tabs.items() if t.held == 0), None)
            if idle is None:
                return
            del self._tabs[idle]

    # ---- the decorator --------------------------------------------------------------

    def paid(self, price: Any, *, per: str = "call", reason: str | None = None, fields: bool = False,
             escrow_field: str = "escrow_id", key_field: str = "api_key", with_receipt: bool = False,
             notify: bool = True) -> Callable[[Callable], Callable]:
        """Gate a function: see `paid` (the module function) for the arguments."""
        if per not in ("call", "chunk"):
            raise ValidationError('per must be "call" or "chunk"')
        if not callable(price):
            parse_usdc(price, what="price")  # refuse a bad price when the app starts, not at the first call

        def decorate(fn: Callable) -> Callable:
            return _GatedFunction(self, fn, price=price, per=per, reason=reason, fields=fields,
                                  escrow_field=escrow_field, key_field=key_field, with_receipt=with_receipt,
                                  notify=notify).wrapper
        return decorate


_GATES: dict[Any, Gate] = {}
_GATES_LOCK = threading.Lock()


def _gate_for(seller: Any) -> Gate:
    if isinstance(seller, Gate):
        return seller
    key = seller if seller is None or isinstance(seller, str) else ("client", id(seller))
    with _GATES_LOCK:
        gate = _GATES.get(key)
        if gate is None or (not isinstance(key, (str, type(None))) and gate._client is not seller):
            gate = _GATES[key] = Gate(seller)
        return gate


def paid(price: Any, seller: Any = None, *, per: str = "call", reason: str | None = None, fields: bool = False,
         escrow_field: str = "escrow_id", key_field: str = "api_key", with_receipt: bool = False,
         notify: bool = True) -> Callable[[Callable], Callable]:
    """Charge the caller's escrow `price` USDC for every call of the decorated function.

    Args:
        price: USDC per call (or per chunk): a decimal string such as ``"0.001"``, an int,
            a Decimal; or a function of the handler's arguments returning one (e.g. a
            price per line of input).
        seller: the seller's `EscrowClient`, its agent id, a `Gate`, or None
            (`$HF_ESCROW_SELLER`); functions with the same seller share one `Gate`.
        per: ``"call"``, or for generator handlers ``"chunk"`` (each yielded item).
        reason: the deduction's reason on the ledger (default: ``"<function> call"``).
        fields: read the escrow id and key from two inputs, `escrow_field` and
            `key_field`, for people using the UI; a filled field wins over a header. They
            are added after the handler's own parameters (list their components last
            among the event's inputs; the API shows them as optional), unless the handler
            declares parameters of those names itself, which then receive them.
        with_receipt: append the receipt (a dict, `GateReceipt.to_dict`) to the outputs.
        notify: in Gradio, show a toast with the charge and the remaining balance.

    The handler may take ``request: gr.Request`` itself; the gate adds one otherwise.
    Refusals raise before the handler runs: `PaymentRequired`, `Unauthorized`, `NotFound`,
    `Forbidden`, `StateConflict`, `InsufficientFunds` (as ``gr.Error`` inside Gradio).

    Example:
        >>> @paid(price="0.001", seller=hf_escrow.connect(agent="my-space"), with_receipt=True)
        ... def shout(text):
        ...     return text.upper()
        >>> shout("hi", request={"X-Escrow-Id": e.id, "Authorization": f"Bearer {buyer_key}"})
        ('HI', {'charged_usdc': '0.001000', 'remaining_usdc': '0.049000', ...})
    """
    return _gate_for(seller).paid(price, per=per, reason=reason, fields=fields, escrow_field=escrow_field,
                                  key_field=key_field, with_receipt=with_receipt, notify=notify)


# ---- how a gated function is called ----------------------------------------------------


def _gradio() -> Any:
    """The gradio module when it is installed (imported on first use), else None."""
    import sys
    if "gradio" in sys.modules:
        return sys.modules["gradio"]
    if importlib.util.find_spec("gradio") is None:
        return None
    import gradio
    return gradio


class _Call:
    __slots__ = ("args", "kwargs", "escrow_id", "key", "price", "in_gradio")


class _GatedFunction:
    """Builds the wrapper of one gated function, with the signature Gradio reads."""

    def __init__(self, gate: Gate, fn: Callable, *, price: Any, per: str, reason: str | None, fields: bool,
                 escrow_field: str, key_field: str, with_receipt: bool, notify: bool):
        if not callable(fn):
            raise ValidationError("@paid decorates a function")
        self.gate, self.fn, self.price, self.per = gate, fn, price, per
        self.reason = reason or f"{getattr(fn, '__name__', 'call')} {per}"
        self.escrow_field, self.key_field = escrow_field, key_field
        self.with_receipt, self.notify = with_receipt, notify
        self.gr = _gradio()
        self.is_async_gen = inspect.isasyncgenfunction(fn)
        self.is_gen = inspect.isgeneratorfunction(fn)
        if per == "chunk" and not (self.is_gen or self.is_async_gen):
            raise ValidationError('per="chunk" needs a generator handler (one that yields); use per="call"')
        self.static_price = None if callable(price) else parse_usdc(price, what="price")

        self.signature = inspect.signature(fn)
        try:
            hints = typing.get_type_hints(fn)
        except Exception:  # unresolvable string annotations: keep none rather than fail
            hints = {}
        # the handler's own request parameter: annotated gr.Request, or simply named `request`
        # (string annotations that cannot be resolved here still count by name)
        request_types = self._request_types()
        self.request_name = next((name for name, hint in hints.items()
                                  if name != "return" and hint in request_types), None)
        if self.request_name is None and "request" in self.signature.parameters:
            self.request_name = "request"
        names = set(self.signature.parameters)
        self.owned_fields = [f for f in (escrow_field, key_field) if fields and f not in names]
        # with fields=True, a handler that declares `escrow_id` / `api_key` itself gets them and they are read
        # too; without it such parameters are the handler's own business (an `api_key` for something else)
        self.read_fields = [f for f in (escrow_field, key_field) if fields]

        params = list(self.signature.parameters.values())
        cut = next((i for i, p in enumerate(params) if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)),
                   len(params))
        # default None: Gradio's API then lists them as optional, so API callers may send headers only
        added = [inspect.Parameter(f, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                   annotation=typing.Optional[str]) for f in self.owned_fields]
        gr_request = self.gr.Request if self.gr is not None else Any
        if self.request_name is None:
            added.append(inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                           annotation=gr_request))
        wrapper_params = params[:cut] + added + params[cut:]
        self.wrapper_signature = self.signature.replace(parameters=wrapper_params)
        request_param = self.request_name or "request"
        self.call_signature = self.wrapper_signature.replace(
            parameters=[p for p in wrapper_params if p.name != request_param])
        self.wrapper = self._build()
        functools.update_wrapper(self.wrapper, fn)
        self.wrapper.__signature__ = self.wrapper_signature
        annotations = dict(hints)
        annotations.update({f: typing.Optional[str] for f in self.owned_fields})
        if self.gr is not None:
            annotations[self.request_name or "request"] = self.gr.Request
        self.wrapper.__annotations__ = annotations
        self.wrapper.gate = gate
        self.wrapper.receipts = gate.receipts

    def _request_types(self) -> tuple:
        if self.gr is None:
            return ()
        return (self.gr.Request, typing.Optional[self.gr.Request])

    # -- per call: arguments, credentials, price --

    def prepare(self, args: tuple, kwargs: dict) -> _Call:
        call = _Call()
        args = list(args)
        kwargs = dict(kwargs)
        request_name = self.request_name or "request"
        request = kwargs.pop(request_name, None)
        if request is None and self.gr is not None:
            for i, value in enumerate(args):
                if isinstance(value, self.gr.Request):
                    request = args.pop(i)
                    break
        bound = self.call_signature.bind(*args, **kwargs)
        headers = _headers(request)
        escrow_id = bound.arguments.get(self.escrow_field) if self.escrow_field in self.read_fields else None
        key = bound.arguments.get(self.key_field) if self.key_field in self.read_fields else None
        auth = headers.get("authorization", "")
        header_key = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        call.escrow_id = _filled(escrow_id) or headers.get(HEADER_ESCROW, "")
        call.key = _filled(key) or header_key or headers.get(HEADER_KEY, "")
        call.in_gradio = self.gr is not None and isinstance(request, self.gr.Request)
        arguments = OrderedDict((k, v) for k, v in bound.arguments.items() if k not in self.owned_fields)
        if self.request_name is not None:
            arguments[self.request_name] = request
        handler_bound = inspect.BoundArguments(self.signature, arguments)
        call.args, call.kwargs = handler_bound.args, handler_bound.kwargs
        call.price = self.static_price
        if call.price is None:
            try:
                call.price = parse_usdc(self.price(*call.args, **call.kwargs), what="price")
            except EscrowError as error:
                raise self.refused(error, call) from None
        return call

    # -- what the caller sees --

    def refused(self, error: EscrowError, call: _Call) -> BaseException:
        """A payment error, as a gr.Error inside Gradio (so its message reaches the caller)."""
        if not call.in_gradio:
            return error
        title = {"payment_required": "Payment required", "payment_failed": "Payment failed",
                 "insufficient_funds": "Escrow too small"}.get(error.code, "Payment refused")
        return self.gr.Error(error.message, title=title, print_exception=False)

    def failed(self, error: BaseException, call: _Call) -> BaseException:
        """A handler error: the caller learns it was not charged."""
        if not call.in_gradio or not isinstance(error, Exception):
            return error
        if isinstance(error, self.gr.Error):
            error.message = f"{error.message} (not charged)"
            return error
        return self.gr.Error(f"the call failed ({type(error).__name__}); you were not charged",
                             title="Call failed")

    def output(self, result: Any, receipt: GateReceipt | None, pending: bool = False) -> Any:
        if not self.with_receipt:
            return result
        shown = receipt.to_dict() if receipt is not None else {"status": "pending" if pending else "not charged"}
        return (*result, shown) if isinstance(result, tuple) else (result, shown)

    def toast(self, receipt: GateReceipt, call: _Call) -> None:
        if self.notify and call.in_gradio:
            try:
                self.gr.Info(f"Paid {receipt.total} USDC; {receipt.remaining} USDC left in escrow "
                             f"{receipt.escrow_id}", duration=4)
            except Exception:  # a toast is a nicety: never fail a paid call over it
                pass

    # -- the four kinds of handler --

    def _build(self) -> Callable:
        if self.is_async_gen:
            return self._async_gen_chunk() if self.per == "chunk" else self._async_gen_call()
        if self.is_gen:
            return self._gen_chunk() if self.per == "chunk" else self._gen_call()
        if inspect.iscoroutinefunction(self.fn):
            return self._async_call()
        return self._sync_call()

    def _open(self, call: _Call) -> _Hold:
        try:
            return self.gate.hold(call.escrow_id, call.key, call.price)
        except EscrowError as error:
            raise self.refused(error, call) from None

    def _capture(self, held: _Hold, call: _Call, **kw: Any) -> GateReceipt:
        try:
            return self.gate.capture(held, reason=self.reason, **kw)
        except EscrowError as error:
            _rethrow(self.refused(error, call), error)

    def _sync_call(self) -> Callable:
        def gated(*args: Any, **kwargs: Any) -> Any:
            call = self.prepare(args, kwargs)
            held = self._open(call)
            try:
                result = self.fn(*call.args, **call.kwargs)
            except BaseException as error:
                self.gate.release(held)
                _rethrow(self.failed(error, call), error)
            receipt = self._capture(held, call)
            self.toast(receipt, call)
            return self.output(result, receipt)
        return gated

    def _async_call(self) -> Callable:
        import anyio

        async def gated(*args: Any, **kwargs: Any) -> Any:
            call = self.prepare(args, kwargs)
            held = await anyio.to_thread.run_sync(self._open, call)
            try:
                result = await self.fn(*call.args, **call.kwargs)
            except BaseException as error:
                self.gate.release(held)
                _rethrow(self.failed(error, call), error)
            with anyio.CancelScope(shield=True):
                receipt = await anyio.to_thread.run_sync(functools.partial(self._capture, held, call))
            self.toast(receipt, call)
            return self.output(result, receipt)
        return gated

    def _gen_call(self) -> Callable:
        def gated(*args: Any, **kwargs: Any) -> Any:
            call = self.prepare(args, kwargs)
            held = self._open(call)
            delivered, last = 0, None
            try:
                stream = self.fn(*call.args, **call.kwargs)
                while True:
                    try:
                        item = next(stream)
                    except StopIteration:
                        break
                    except BaseException as error:
                        self.gate.release(held)
                        _rethrow(self.failed(error, call), error)
                    delivered, last = delivered + 1, item
                    try:
                        yield self.output(item, None, pending=True)
                    except GeneratorExit:
                        stream.close()
                        if delivered:  # the caller stopped a stream it received: the call is paid
                            with contextlib.suppress(EscrowError):  # nobody is left to tell
                                self.gate.capture(held, reason=self.reason)
                        raise
                receipt = self._capture(held, call)
                self.toast(receipt, call)
                if self.with_receipt:
                    yield self.output(last, receipt)
            finally:
                self.gate.release(held)
        return gated

    def _gen_chunk(self) -> Callable:
        def gated(*args: Any, **kwargs: Any) -> Any:
            call = self.prepare(args, kwargs)
            held: _Hold | None = self._open(call)
            first, units, total, receipt = held, 0, 0, None
            try:
                stream = self.fn(*call.args, **call.kwargs)
                while True:
                    if held is None:
                        try:
                            held = self.gate.hold_more(first, call.price)
                        except InsufficientFunds:
                            held = None   # ask anyway: a stream that has ended owes nothing more
                    try:
                        item = next(stream)
                    except StopIteration:
                        break
                    except BaseException as error:
                        _rethrow(self.failed(error, call), error)
                    if held is None:
                        stream.close()
                        raise self.refused(InsufficientFunds(
                            f"escrow {call.escrow_id} cannot pay for more: the stream stopped after {units} "
                            f"paid chunk(s) of {format_usdc(call.price)} USDC; open a new escrow for seller "
                            f"{self.gate.seller_id!r}"), call)
                    units, total = units + 1, total + call.price
                    try:
                        receipt = self._capture(held, call, billing="chunk", units=units, total_micro=total)
                    except BaseException:
                        stream.close()
                        raise
                    held = None
                    try:
                        yield self.output(item, receipt)
                    except GeneratorExit:
                        stream.close()
                        raise
                if receipt is not None:
                    self.toast(receipt, call)
            finally:
                self.gate.release(held)
        return gated

    def _async_gen_call(self) -> Callable:
        import anyio

        async def gated(*args: Any, **kwargs: Any) -> Any:
            call = self.prepare(args, kwargs)
            held = await anyio.to_thread.run_sync(self._open, call)
            delivered, last = 0, None
            try:
                stream = self.fn(*call.args, **call.kwargs)
                while True:
                    try:
                        item = await stream.__anext__()
                    except StopAsyncIteration:
                        break
                    except BaseException as error:
                        self.gate.release(held)
                        _rethrow(self.failed(error, call), error)
                    delivered, last = delivered + 1, item
                    try:
                        yield self.output(item, None, pending=True)
                    except GeneratorExit:
                        with anyio.CancelScope(shield=True):
                            await stream.aclose()
                            if delivered:
                                with contextlib.suppress(EscrowError):
                                    await anyio.to_thread.run_sync(functools.partial(
                                        self.gate.capture, held, reason=self.reason))
                        raise
                with anyio.CancelScope(shield=True):
                    receipt = await anyio.to_thread.run_sync(functools.partial(self._capture, held, call))
                self.toast(receipt, call)
                if self.with_receipt:
                    yield self.output(last, receipt)
            finally:
                self.gate.release(held)
        return gated

    def _async_gen_chunk(self) -> Callable:
        import anyio

        async def gated(*args: Any, **kwargs: Any) -> Any:
            call = self.prepare(args, kwargs)
            held: _Hold | None = await anyio.to_thread.run_sync(self._open, call)
            first, units, total, receipt = held, 0, 0, None
            try:
                stream = self.fn(*call.args, **call.kwargs)
                while True:
                    if held is None:
                        try:
                            held = self.gate.hold_more(first, call.price)  # in memory: no I/O
                        except InsufficientFunds:
                            held = None
                    try:
                        item = await stream.__anext__()
                    except StopAsyncIteration:
                        break
                    except BaseException as error:
                        _rethrow(self.failed(error, call), error)
                    if held is None:
                        await stream.aclose()
                        raise self.refused(InsufficientFunds(
                            f"escrow {call.escrow_id} cannot pay for more: the stream stopped after {units} "
                            f"paid chunk(s) of {format_usdc(call.price)} USDC; open a new escrow for seller "
                            f"{self.gate.seller_id!r}"), call)
                    units, total = units + 1, total + call.price
                    try:
                        with anyio.CancelScope(shield=True):
                            receipt = await anyio.to_thread.run_sync(functools.partial(
                                self._capture, held, call, billing="chunk", units=units, total_micro=total))
                    except BaseException:
                        await stream.aclose()
                        raise
                    held = None
                    try:
                        yield self.output(item, receipt)
                    except GeneratorExit:
                        with anyio.CancelScope(shield=True):
                            await stream.aclose()
                        raise
                if receipt is not None:
                    self.toast(receipt, call)
            finally:
                self.gate.release(held)
        return gated


def _rethrow(shown: BaseException, error: BaseException) -> typing.NoReturn:
    """Raise `shown` in place of `error`, chained to it; or `error` itself, unchanged."""
    if shown is error:
        raise error
    raise shown from error


def _filled(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _headers(request: Any) -> dict[str, str]:
    """Lower-cased headers from a gr.Request, a starlette Request, or a plain mapping."""
    if request is None:
        return {}
    headers = getattr(request, "headers", request)
    if headers is None:
        return {}
    items = headers.items() if isinstance(headers, Mapping) or hasattr(headers, "items") else ()
    return {str(k).lower(): str(v) for k, v in items}


# ---- helpers for Spaces ----------------------------------------------------------------


def seller_from_env(agent: str | None = None, *, register: bool = True) -> Any:
    """The seller's EscrowClient, configured the way a Space is (environment / Space secrets).

    - ``HF_ESCROW_URL`` set: an HTTP client with the seller's key from
      ``HF_ESCROW_SELLER_KEY`` (or ``HF_ESCROW_API_KEY``); if ``HF_ESCROW_SELLER`` (or
      `agent`) is set too, the key must belong to that agent.
    - otherwise the embedded ledger (``$HF_ESCROW_HOME``, or ``HF_ESCROW_DATABASE_URL``)
      acting as `agent` / ``HF_ESCROW_SELLER`` (default ``space-seller``), registered on
      first start when `register` (starting again finds it registered).

    Example:
        >>> seller = seller_from_env("paid-chat")      # embedded: registers once
        >>> seller.agent
        'paid-chat'
    """
    from .client import connect
    env = os.environ
    agent = agent or env.get("HF_ESCROW_SELLER") or None
    url = env.get("HF_ESCROW_URL")
    if url:
        key = env.get("HF_ESCROW_SELLER_KEY") or env.get("HF_ESCROW_API_KEY")
        if not key:
            raise Unauthorized("HF_ESCROW_URL is set, so the seller's API key is needed: set the Space secret "
                               "HF_ESCROW_SELLER_KEY (from `POST /register` on the escrow server)")
        client = connect(url, api_key=key)
        me = client.me()
        if agent and me.agent_id != agent:
            raise Forbidden(f"HF_ESCROW_SELLER_KEY belongs to agent {me.agent_id!r}, not to HF_ESCROW_SELLER="
                            f"{agent!r}")
        client.agent = me.agent_id
        return client
    agent = agent or env.get("HF_ESCROW_AGENT") or DEFAULT_SELLER
    client = connect(agent=agent)
    if register:
        try:
            client.register(agent)
        except StateConflict:
            pass  # registered by an earlier start (or a twin process starting at the same time)
    return client


@dataclass(frozen=True)
class PaymentFields:
    """The payment widgets of a paid Gradio page (see `payment_fields`)."""

    escrow: Any      # gr.Textbox: the escrow id
    key: Any         # gr.Textbox: the buyer's API key (a password field)
    balance: Any     # gr.Textbox: the remaining balance, read-only

    @property
    def inputs(self) -> list:
        """The two inputs to list after a gated handler's own (``@paid(..., fields=True)``)."""
        return [self.escrow, self.key]

    def show(self, receipt: dict | None) -> str:
        """The balance text for a receipt (`GateReceipt.to_dict`)."""
        return f"{receipt['remaining_usdc']} USDC" if receipt and "remaining_usdc" in receipt else ""


def payment_fields(gate: Gate, *, price: str, trial_amount: Any = None) -> PaymentFields:
    """Escrow id and key fields, the price, the remaining balance and a "Check balance" button.

    Call it inside ``gr.Blocks``. With `trial_amount` (embedded ledger only) a "Get a test
    escrow" button fills the fields with a fresh escrow of that many USDC. The buttons'
    events are private: they are not part of the Space's API.

    Example:
        >>> with gr.Blocks() as demo:
        ...     pay = payment_fields(gate, price="0.001 USDC per answer")
        ...     button.click(answer, [message, *pay.inputs], [output, receipt])
    """
    gr = _gradio()
    if gr is None:
        raise ValidationError("payment_fields needs gradio (pip install gradio)")

    def check(escrow_id: str, api_key: str) -> str:
        try:
            return f"{gate.balance(escrow_id, api_key)} USDC"
        except EscrowError as error:
            raise gr.Error(error.message, title="Escrow", print_exception=False) from None

    def trial() -> tuple[str, str, str]:
        try:
            escrow_id, key = trial_escrow(gate.seller_id, trial_amount)
        except EscrowError as error:
            raise gr.Error(error.message, title="Test escrow", print_exception=False) from None
        return escrow_id, key, f"{to_usdc(parse_usdc(trial_amount))} USDC"

    with gr.Row():
        escrow = gr.Textbox(label="Escrow id", placeholder="esc_...", scale=2)
        key = gr.Textbox(label="API key", type="password", placeholder="hfe_...", scale=2)
        gr.Textbox(label="Price", value=price, interactive=False, scale=1)
        balance = gr.Textbox(label="Remaining balance", value="", interactive=False, scale=1)
    with gr.Row():
        check_button = gr.Button("Check balance", size="sm")
        check_button.click(check, [escrow, key], balance, api_visibility="private")
        if trial_amount is not None:
            trial_button = gr.Button("Get a test escrow (embedded ledger)", size="sm")
            trial_button.click(trial, None, [escrow, key, balance], api_visibility="private")
    return PaymentFields(escrow, key, balance)


def trial_escrow(seller: str, amount: Any, *, ttl_seconds: float = 3600) -> tuple[str, str]:
    """On an embedded ledger only: a new test buyer, funded from the faucet, with an escrow for `seller`.

    Returns ``(escrow_id, api_key)``. For local demos of a paid Space (the "try it" button);
    against a real escrow server, buyers open their own escrows.

    Example:
        >>> escrow_id, key = trial_escrow("paid-chat", "0.02")
    """
    from .client import connect
    if os.environ.get("HF_ESCROW_URL"):
        raise Forbidden("trial escrows exist on the embedded ledger only; open an escrow on the escrow server")
    name = "visitor-" + uuid.uuid4().hex[:10]
    buyer = connect(agent=name)
    agent = buyer.register(name)
    buyer.claim_faucet()
    escrow = buyer.create_escrow(seller, amount, ttl_seconds=ttl_seconds, description="trial escrow (demo)")
    return escrow.id, agent.api_key
