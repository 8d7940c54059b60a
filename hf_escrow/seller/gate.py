"""A payment gate for Gradio handlers and any callable: ``@paid(price=..., seller=...)``.

    import gradio as gr
    from hf_escrow.gate import paid

    @paid(price="0.001", seller="my-space")          # the Space's seller agent (or an EscrowClient)
    def classify(text: str) -> str:
        return model(text)

    with gr.Blocks() as demo:
        ...
        button.click(classify, inputs=text, outputs=label, api_name="classify")

A caller pays with the *spend token* of an escrow it opened for the seller
(``create_escrow(...).spend_token``), sent in the ``X-Escrow-Token`` header:
``gradio_client.Client(url, headers={"X-Escrow-Token": token})``. People using the page
paste it into one "Spend token" field instead (``fields=True``, `payment_fields`). The
buyer's API key never goes to a seller: the gate refuses one, saying to send the token.

How money moves
---------------
Every gated call is one hold on the ledger, made by the seller's till (`hf_escrow.seller.till`)
from the caller's token. The ledger admits it - the token is live, the escrow active and
paying this seller, enough of it neither spent nor held - and nothing is cached, so any
number of Space processes selling from one escrow together admit no more work than it
holds, and a cancel or a revoke stops the next call at once.

- ``per="call"``: the price is held before the handler runs (refused: the handler never
  runs). When it returns, the price is captured, and only then is the result handed out:
  if that capture fails the result is withheld. A handler that raises voids the hold and
  costs nothing. A generator handler is held before its first chunk and captured when it
  ends, or when the caller stops it after receiving output; an error costs nothing.
- ``per="chunk"`` (generator handlers): a stream holds its worst case, `max_chunks` x price,
  or as many whole chunks as the escrow has free when that is less. Delivered chunks are
  captured every `capture_every` chunks (at most 64: a crash costs the seller at most that
  slice) and at the end. The stream is cut when its hold is used up (`InsufficientFunds`
  when the escrow could not cover `max_chunks`; silently at `max_chunks`, the seller's
  declared limit) or when a capture reports the escrow closed (`StateConflict`). An error
  or a caller who stops pays the delivered chunks only. Every delivered chunk is paid: it
  was held before it left, and the ledger keeps an open hold capturable for delivered work
  during the grace after a buyer cancels.

- ``per="second"``: the price is USDC per second of the handler's own run time (or a
  `Pricing` with ``per_second`` / ``per_gpu_second`` and its ``hardware``). The call holds
  its worst case, `max_seconds` x price, before the handler runs; the gate times the
  handler itself (an integer nanosecond clock started when it is called, so Gradio's queue
  wait and the gate's own ledger calls are never billed), captures the measured seconds x
  price, rounded once by `hf_escrow.money.seconds_cost_micro`, and voids the rest. A
  generator is timed inside each step (the time its consumer takes is not its run time)
  and captured as it flows, every `capture_every` chunks; it stops once its run time
  reaches `max_seconds`, or before its next step once a capture reports the escrow closed. A handler that raises costs nothing (a stream: its delivered
  steps only). With ``gpu=True`` the gate puts ZeroGPU's ``@spaces.GPU(duration=...)``
  inside its clock, the duration being `max_seconds` (default 60 s, ZeroGPU's): the time
  spent waiting for a GPU is not billed either. `spaces` is imported only when it is
  installed (off ZeroGPU the handler runs as it is). Receipts show the seconds and the rate.

The batched path: ``Gate(seller, lease_calls=N, flush_ms=...)`` (or ``paid(..., batch=True)``)
admits ``per="call"`` handlers (not generators) on a lease of the till
(`hf_escrow.seller.lease`): one hold covers many calls of an escrow, each call reserves
its price out of it in memory, and what the calls cost is captured by the lease's flush
(one `capture_many` every `flush_ms`, and at `Gate.close`). A call then waits on no
ledger round trip, and its result is handed out before it is captured: a seller process
that dies loses at most one flush interval of calls, never charging more than was
delivered. A revoke or a cancel stops new calls within one flush. Its receipts say
``settled: false``: fee, net and remaining are known only after the flush.

``with_receipt=True`` appends a receipt output (`GateReceipt.to_dict`); a stream's chunks
carry ``{"status": "pending", ...}`` and one last output repeats the final chunk with the
receipt. Holds last `Gate(hold_ttl_s=...)` (default 120 s, the ledger caps it): a call or a
stream must finish within it, or its capture fails (a call's result is then withheld).
Outside Gradio pass ``request={"X-Escrow-Token": token}`` (a dict, or any object with
``.headers``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import logging
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

from .. import challenge
from .._exceptions import EscrowError, Forbidden, InsufficientFunds, StateConflict, Unauthorized, ValidationError
from ..money import NS_PER_SECOND, format_usdc, parse_usdc, seconds_cost_micro, to_decimal, to_usdc
from ..pricing import Pricing
from ..challenge import TOKEN_HEADER, spend_token_from
from .lease import DEFAULT_FLUSH_MS, DEFAULT_LEASE_CALLS, Charge, Leases, check_flush_ms
from .till import DEFAULT_HOLD_TTL_S, Tab, Till

__all__ = ["paid", "Gate", "GateReceipt", "seller_from_env", "trial_escrow", "payment_fields", "PaymentFields"]

log = logging.getLogger(__name__)

MAX_RECEIPTS = 1_000                 # receipts kept in memory per gate
DEFAULT_SELLER = "space-seller"
DEFAULT_MAX_CHUNKS = 64
MAX_CAPTURE_EVERY = 64               # the most chunks a crash or a cancel may leave uncaptured
OPEN_ATTEMPTS = 3                    # a stream's hold re-sized to what is free, while others spend the escrow
ZERO_GPU_DEFAULT_DURATION_S = 60     # what @spaces.GPU reserves when given no duration
HOLD_MARGIN_S = 30.0                 # a per-second hold outlives max_seconds by this, for its capture to land
BILLINGS = ("call", "chunk", "second")
MAX_SECONDS = 870                    # the ledger's default cap on a hold's life (900 s), less HOLD_MARGIN_S


@dataclass(frozen=True)
class GateReceipt:
    """What one gated call paid: one hold, captured once (a call) or in slices (a stream)."""

    receipt_id: str          # the hold's id
    escrow_id: str
    buyer: str
    seller: str
    billing: str             # "call", "chunk" or "second"
    units: int               # 1 for a call; the chunks delivered by a stream billed per chunk or second
    charged: Decimal         # gross paid out of the escrow for this call
    fee: Decimal | None      # the platform's share of `charged` (None until a batched call's flush)
    seller_net: Decimal | None   # what the seller received (idem)
    remaining: Decimal | None    # what the escrow could still spend after the last capture (idem)
    gate_ms: float           # time the gate added to the call (hold and captures)
    at: datetime
    seconds: Decimal | None = None   # per="second": the handler's measured run time (ns precision)
    rate: Decimal | None = None      # per="second": USDC per second
    settled: bool = True             # False: a batched call, captured by its lease's next flush

    def to_dict(self) -> dict:
        """A JSON-able view (amounts as exact decimal strings), as shown in a UI."""
        shown = {"receipt_id": self.receipt_id, "escrow_id": self.escrow_id, "buyer": self.buyer,
                 "seller": self.seller, "billing": self.billing, "units": self.units,
                 "charged_usdc": str(self.charged), "fee_usdc": _text(self.fee),
                 "seller_net_usdc": _text(self.seller_net), "remaining_usdc": _text(self.remaining),
                 "gate_ms": round(self.gate_ms, 3), "at": self.at.isoformat(), "settled": self.settled}
        if self.billing == "second":
            shown.update(seconds=str(self.seconds), rate_usdc_per_s=str(self.rate))
        return shown


class Gate:
    """The seller's side of paid calls: one till shared by its gated functions, and their receipts.

    Args:
        seller: the seller's `EscrowClient`, or its agent id (connected with
            `seller_from_env`, which registers it on an embedded ledger), or None for
            `$HF_ESCROW_SELLER`.
        hold_ttl_s: how long a call's hold lives; a call or stream must end within it.
        escrow_url: the escrow server its challenges name, when buyers reach it under
            another URL than the seller's client.
        lease_calls: put per-call handlers on the batched path (module docstring): a
            lease hold covers this many calls; None keeps one hold per call.
        flush_ms: the batched path's flush interval: the most delivered work at risk.

    Refusals carry the challenge of `hf_escrow.challenge` (in Gradio: a ``gr.Error``
    whose message ends with it); `discovery_routes` serves ``/.well-known/hf-escrow``.

    Example:
        >>> gate = Gate(hf_escrow.connect(agent="my-space"))
        >>> @gate.paid(price="0.002")
        ... def embed(text): ...
    """

    def __init__(self, seller: Any = None, *, hold_ttl_s: float = DEFAULT_HOLD_TTL_S, escrow_url: str | None = None,
                 lease_calls: int | None = None, flush_ms: float = DEFAULT_FLUSH_MS):
        if lease_calls is not None and (not isinstance(lease_calls, int) or isinstance(lease_calls, bool)
                                        or lease_calls < 1):
            raise ValidationError("lease_calls must be a whole number of calls, at least 1 (or None)")
        if seller is not None and not isinstance(seller, str) and not callable(getattr(seller, "hold", None)):
            raise ValidationError("seller must be an EscrowClient (hf_escrow.connect(...)) or a seller agent id")
        from ..client import AsyncEscrowClient
        if isinstance(seller, AsyncEscrowClient):
            raise ValidationError("the gate needs a synchronous EscrowClient (hf_escrow.connect), not connect_async")
        self._seller = seller
        self._client: Any = seller if seller is not None and not isinstance(seller, str) else None
        self._till: Till | None = None
        self._seller_id: str | None = None
        self.hold_ttl_s = hold_ttl_s
        self.escrow_url = escrow_url
        self._connect_lock = threading.Lock()
        self.receipts: deque[GateReceipt] = deque(maxlen=MAX_RECEIPTS)
        self._sheets: dict[str, tuple[dict, int]] = {}   # gated function -> (price sheet, smallest escrow)
        self.lease_calls, self.flush_ms = lease_calls, check_flush_ms(flush_ms)
        self._leases: Leases | None = None

    @property
    def client(self) -> Any:
        """The seller's EscrowClient (connected on first use)."""
        return self.till.seller

    @property
    def till(self) -> Till:
        """The till that opens one hold per call (connected on first use)."""
        if self._till is None:
            with self._connect_lock:
                if self._till is None:
                    self._till = Till(self._client or seller_from_env(self._seller), hold_ttl_s=self.hold_ttl_s)
        return self._till

    @property
    def leases(self) -> Leases:
        """The batched path's leases (started on first use)."""
        if self._leases is None:
            till = self.till
            with self._connect_lock:
                if self._leases is None:
                    self._leases = till.leases(lease_calls=self.lease_calls or DEFAULT_LEASE_CALLS,
                                               flush_ms=self.flush_ms)
        return self._leases

    def close(self) -> None:
        """Pay what the batched path owes and free its lease holds (at shutdown; waits for calls in flight)."""
        with self._connect_lock:
            leases, self._leases = self._leases, None
        if leases is not None:
            leases.close()

    @property
    def seller_id(self) -> str:
        """The seller's agent id: the one buyers open escrows for."""
        if self._seller_id is None:
            client = self.client
            self._seller_id = getattr(client, "agent", None) or client.me().agent_id
        return self._seller_id

    def offer(self, name: str | None = None) -> challenge.Offer:
        """The challenge facts of one gated function (by its name), or of the whole gate.

        The gate's own offer lists every gated function's prices under ``endpoints`` and
        names the cheapest as the smallest useful escrow.
        """
        if name is not None:
            sheet, minimum = self._sheets[name]
            return self.till.offer(sheet, minimum, escrow_server=self.escrow_url)
        if not self._sheets:
            raise ValidationError("this gate gates no function yet")
        first = next(iter(self._sheets.values()))[0]
        return self.till.offer(first, min(m for _, m in self._sheets.values()), escrow_server=self.escrow_url,
                               endpoints={n: sheet for n, (sheet, _) in self._sheets.items()})

    def discovery_routes(self) -> list:
        """The ``/.well-known/hf-escrow`` route, for ``demo.launch(app_kwargs={"routes": ...})``."""
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        async def discovery(request: Any) -> JSONResponse:
            try:
                return JSONResponse((await run_in_threadpool(self.offer)).document())
            except EscrowError as error:   # nothing gated yet, or the escrow server is unreachable
                return JSONResponse(error.to_dict(), status_code=404 if isinstance(error, ValidationError)
                                    else error.status_code)
        return [Route(challenge.WELL_KNOWN_PATH, discovery, methods=["GET"])]

    def balance(self, token: Any) -> Decimal:
        """What the token's escrow can still spend (a "Check balance" button).

        Checked the way a call is (a 1 micro-USDC hold, voided at once), so it refuses like
        a call would: no token, a key, a revoked token, another seller's, a closed escrow.
        """
        try:
            tab = self.till.open(token, 1, what="checking the balance")
        except InsufficientFunds as error:
            free = (error.details or {}).get("remaining_micro")
            if free is None:
                raise
            return to_usdc(int(free))
        tab.void()
        return self.client.get(tab.escrow_id).remaining

    def paid(self, price: Any, *, per: str = "call", fields: bool = False, token_field: str = "spend_token",
             with_receipt: bool = False, notify: bool = True, max_chunks: int = DEFAULT_MAX_CHUNKS,
             capture_every: int = MAX_CAPTURE_EVERY, pricing: Any = None, max_seconds: Any = None,
             gpu: bool = False, batch: bool | None = None) -> Callable[[Callable], Callable]:
        """Gate a function: see `paid` (the module function) for the arguments."""
        if per not in BILLINGS:
            raise ValidationError('per must be "call", "chunk" or "second"')
        if batch not in (None, True, False) or batch and per != "call":
            raise ValidationError('batch=True is for per="call" handlers: streams and timed calls hold each call')
        if not callable(price):
            _price_of(price, per)  # refuse a bad price when the app starts, not at the first call
        max_ns = _max_ns(per, max_seconds, gpu)
        if not isinstance(max_chunks, int) or isinstance(max_chunks, bool) or max_chunks < 1:
            raise ValidationError("max_chunks must be a whole number of chunks, at least 1")
        if not isinstance(capture_every, int) or isinstance(capture_every, bool) \
                or not 1 <= capture_every <= MAX_CAPTURE_EVERY:
            raise ValidationError(f"capture_every must be between 1 and {MAX_CAPTURE_EVERY} chunks")

        sheet, minimum = _advertised(price, per, pricing, max_ns)

        def decorate(fn: Callable) -> Callable:
            streams = inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn)
            if batch and streams:
                raise ValidationError("batch=True is for handlers that return: a generator holds each stream")
            batched = (self.lease_calls is not None if batch is None else batch) and per == "call" and not streams
            self._sheets[getattr(fn, "__name__", "call")] = (sheet, minimum)
            return _GatedFunction(self, fn, price=price, per=per, fields=fields, token_field=token_field,
                                  with_receipt=with_receipt, notify=notify, max_chunks=max_chunks,
                                  capture_every=capture_every, max_ns=max_ns, gpu=gpu, batched=batched).wrapper
        return decorate


def _text(amount: Decimal | None) -> str | None:
    return None if amount is None else str(amount)


def _advertised(price: Any, per: str, pricing: Any, max_ns: int | None) -> tuple[dict, int]:
    """The price sheet a gated function advertises, and the smallest escrow that buys one unit
    (per second: one call's hold, its longest run at the rate)."""
    if pricing is not None:
        sheet = Pricing.coerce(pricing).to_dict()
        return sheet, min(parse_usdc(value, what="price") for value in sheet.values())
    if callable(price):   # priced per call: each refusal names the refused call's price (price_micro)
        return {}, 1
    if per == "second":
        rate = _price_of(price, per)
        sheet = Pricing.coerce(price).to_dict() if isinstance(price, (Pricing, Mapping)) else {"per_second": str(rate)}
        return sheet, max(seconds_cost_micro(max_ns, rate), 1)
    micro = parse_usdc(price, what="price")
    return {f"per_{per}": format_usdc(micro)}, micro


def _price_of(price: Any, per: str) -> Any:
    """A call's or chunk's price in micro-USDC; per second, the rate in USDC (exact, never rounded)."""
    if per != "second":
        if isinstance(price, (Pricing, Mapping)):
            raise ValidationError('a price sheet prices time: use it with per="second", or give a price in USDC')
        return parse_usdc(price, what="price")
    if isinstance(price, (Pricing, Mapping)):
        return Pricing.coerce(price).second_rate
    rate = to_decimal(price, what="price per second")
    if rate <= 0:
        raise ValidationError("a price per second must be more than 0")
    return rate


def _max_ns(per: str, max_seconds: Any, gpu: bool) -> int | None:
    """The longest run a per-second call may bill, in nanoseconds (ZeroGPU's whole seconds with gpu=True)."""
    if per != "second":
        if max_seconds is not None or gpu:
            raise ValidationError('max_seconds and gpu are for per="second" billing')
        return None
    if max_seconds is None:
        if not gpu:
            raise ValidationError('per="second" needs max_seconds, the longest run a call may bill (its hold)')
        max_seconds = ZERO_GPU_DEFAULT_DURATION_S
    seconds = to_decimal(max_seconds, what="max_seconds")
    if gpu:
        seconds = seconds.to_integral_value(rounding="ROUND_CEILING")  # @spaces.GPU reserves whole seconds
    if not 0 < seconds <= MAX_SECONDS:
        raise ValidationError(f"max_seconds must be more than 0 and at most {MAX_SECONDS} s (a hold's longest life, "
                              "less the time its capture needs)")
    return int(seconds * NS_PER_SECOND)


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


def paid(price: Any, seller: Any = None, *, per: str = "call", fields: bool = False, token_field: str = "spend_token",
         with_receipt: bool = False, notify: bool = True, max_chunks: int = DEFAULT_MAX_CHUNKS,
         capture_every: int = MAX_CAPTURE_EVERY, pricing: Any = None, max_seconds: Any = None,
         gpu: bool = False, batch: bool | None = None) -> Callable[[Callable], Callable]:
    """Charge the caller's escrow `price` USDC for every call of the decorated function.

    Args:
        price: USDC per call (or per chunk, or per second): a decimal string such as
            ``"0.001"``, an int, a Decimal; per second also a `Pricing` (``per_second``, or
            ``per_gpu_second`` with its ``hardware``); or a function of the handler's
            arguments returning one (e.g. a price per line of input).
        seller: the seller's `EscrowClient`, its agent id, a `Gate`, or None
            (`$HF_ESCROW_SELLER`); functions with the same seller share one `Gate`.
        per: ``"call"``; for generator handlers ``"chunk"`` (each yielded item); or
            ``"second"`` of the handler's own run time.
        fields: read the spend token from an input named `token_field` too, for people
            using the UI; a filled field wins over the header. It is added after the
            handler's own parameters (list its component last among the event's inputs;
            the API shows it as optional), unless the handler declares it itself.
        with_receipt: append the receipt (a dict, `GateReceipt.to_dict`) to the outputs.
        notify: in Gradio, show a toast with the charge and the remaining balance.
        max_chunks: per="chunk": the most chunks one stream delivers (its hold's worst case).
        capture_every: per="chunk"/"second" streams: capture the delivered chunks at least this often (1-64).
        pricing: the price sheet refusals and ``/.well-known/hf-escrow`` advertise (needed
            when `price` is a function); by default ``{"per_call": price}`` (or per_chunk, per_second).
        max_seconds: per="second": the longest run a call bills; its hold is max_seconds x price.
        gpu: per="second": run the handler under ZeroGPU's ``@spaces.GPU(duration=max_seconds)``
            when `spaces` is installed, inside the gate's clock (the GPU wait is not billed).
        batch: per="call" handlers that return: True puts them on the batched path (a
            lease, paid by its flush; see the module docstring), False holds each call;
            None follows the gate (batched when it has ``lease_calls``).

    The handler may take ``request: gr.Request`` itself; the gate adds one otherwise.
    Refusals raise before the handler runs: `PaymentRequired` (no token, or an API key),
    `Forbidden` (unknown, revoked or another seller's token), `StateConflict` (closed
    escrow), `InsufficientFunds` (too little free); as ``gr.Error`` inside Gradio.

    Example:
        >>> @paid(price="0.001", seller=hf_escrow.connect(agent="my-space"), with_receipt=True)
        ... def shout(text):
        ...     return text.upper()
        >>> shout("hi", request={"X-Escrow-Token": e.spend_token})
        ('HI', {'charged_usdc': '0.001000', 'remaining_usdc': '0.049000', ...})
    """
    return _gate_for(seller).paid(price, per=per, fields=fields, token_field=token_field, with_receipt=with_receipt,
                                  notify=notify, max_chunks=max_chunks, capture_every=capture_every, pricing=pricing,
                                  max_seconds=max_seconds, gpu=gpu, batch=batch)


# ---- one call's bill ------------------------------------------------------------------


class _Bill:
    """One gated call's tab and what it owes: a call's price, `unit_micro` per delivered chunk, or its run time.

    Its I/O methods (`flush`, `settle`, `abandon`) block on the ledger; the async wrappers
    run them in a worker thread.
    """

    def __init__(self, gate: Gate, tab: Tab | Charge, *, billing: str, unit_micro: int, units_held: int, capped: bool,
                 capture_every: int, spent_s: float, rate: Decimal | None = None, max_ns: int | None = None):
        self.gate, self.tab, self.billing = gate, tab, billing
        self.unit_micro, self.units_held, self.capped = unit_micro, units_held, capped
        self.capture_every = capture_every
        self.rate, self.max_ns = rate, max_ns
        self.ran_ns = 0                   # per="second": the handler's own run time, of delivered work only
        self.units = 0                    # chunks that left the gate
        self.fee = self.net = Decimal(0)
        self.remaining: Decimal | None = None
        self.buyer = ""
        self.spent_s = spent_s

    @property
    def owed_micro(self) -> int:
        if self.billing == "second":
            return min(seconds_cost_micro(self.ran_ns, self.rate), self.tab.held_micro)
        return self.units * self.unit_micro if self.billing == "chunk" else self.unit_micro

    def ran(self, elapsed_ns: int) -> None:
        """Add a measured run (a call, or one step of a stream) to what the call owes."""
        self.ran_ns += elapsed_ns

    def may_run(self) -> bool:
        """per="second": may the stream run another step? Not past max_seconds; raises once the escrow closed.

        Asked before the step runs, since its time is what it costs; other billings ask
        `admit_chunk` about the chunk once it is made.
        """
        if self.billing != "second":
            return True
        if not self.tab.escrow_open:
            raise StateConflict(f"escrow {self.tab.escrow_id} was closed: the stream stopped after {self.units} "
                                "paid chunk(s)")
        if self.ran_ns < self.max_ns:
            return True
        log.warning("a stream ran max_seconds=%g and was cut; raise max_seconds to run longer",
                    self.max_ns / NS_PER_SECOND)
        return False

    def admit_chunk(self) -> bool:
        """May one more chunk leave? False at `max_chunks`; raises when the escrow cannot pay for it."""
        if self.billing == "call":
            return True
        if not self.tab.escrow_open:
            raise StateConflict(f"escrow {self.tab.escrow_id} was closed: the stream stopped after {self.units} "
                                "paid chunk(s)")
        if self.billing == "second" or self.units < self.units_held:
            return True
        if self.capped:
            raise InsufficientFunds(
                f"escrow {self.tab.escrow_id} cannot pay for more: the stream stopped after {self.units} paid "
                f"chunk(s) of {format_usdc(self.unit_micro)} USDC; open a new escrow for seller "
                f"{self.gate.seller_id!r}")
        log.warning("a stream reached max_chunks=%d and was cut; raise max_chunks to deliver more", self.units_held)
        return False

    def delivered(self) -> bool:
        """Count a chunk about to leave; True when its slice is due for capture."""
        self.units += 1
        if self.billing == "second":
            return self.units % self.capture_every == 0
        uncaptured = self.owed_micro - self.tab.captured_micro
        return self.billing == "chunk" and uncaptured >= self.capture_every * self.unit_micro

    def pending(self) -> dict:
        shown = {"status": "pending", "units": self.units}
        if self.billing == "second":
            shown["seconds"] = str(self.seconds)
        return {**shown, "owed_usdc": str(to_usdc(self.owed_micro))} if self.billing != "call" else shown

    @property
    def seconds(self) -> Decimal:
        return Decimal(self.ran_ns) / NS_PER_SECOND

    def flush(self) -> None:
        self._timed(self.tab.capture, self.owed_micro - self.tab.captured_micro)

    def settle(self) -> GateReceipt:
        """The work ended well: pay what it owes, free the rest of the hold."""
        self._timed(self.tab.finish, self.owed_micro - self.tab.captured_micro)
        settled = isinstance(self.tab, Tab)   # else a lease charge: captured at its lease's next flush
        receipt = GateReceipt(
            receipt_id=self.tab.hold_id, escrow_id=self.tab.escrow_id, buyer=self.buyer, seller=self.gate.seller_id,
            billing=self.billing, units=self.units if self.billing != "call" else 1,
            charged=to_usdc(self.tab.captured_micro), fee=self.fee if settled else None,
            seller_net=self.net if settled else None,
            remaining=(self.remaining if self.remaining is not None else Decimal(0)) if settled else None,
            gate_ms=self.spent_s * 1000, at=datetime.now(timezone.utc),
            seconds=self.seconds if self.billing == "second" else None, rate=self.rate, settled=settled)
        self.gate.receipts.append(receipt)
        return receipt

    def abandon(self, failed: bool) -> None:
        """The work stopped early: delivered chunks (or a call whose output left) are paid, the rest freed.

        Never raises: it runs while another error, or a caller who left, is being handled;
        an unsettled hold still ends by itself at its TTL.
        """
        if self.tab.closed:
            return
        owed = 0 if self.billing == "call" and (failed or not self.units) else self.owed_micro
        try:
            if owed or self.tab.captured_micro:
                self._timed(self.tab.finish, owed - self.tab.captured_micro)
            else:
                self.tab.void()
        except EscrowError as error:
            log.warning("could not settle hold %s (%s); it ends at its TTL", self.tab.hold_id, error.message)

    def _timed(self, capture: Callable, amount_micro: int) -> None:
        started = time.perf_counter()
        try:
            receipt = capture(max(amount_micro, 0))
        finally:
            self.spent_s += time.perf_counter() - started
        if receipt is not None:
            self.fee += receipt.fee
            self.net += receipt.net
            self.remaining, self.buyer = receipt.remaining, receipt.escrow.buyer


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
    __slots__ = ("args", "kwargs", "token", "price", "in_gradio")


class _GatedFunction:
    """Builds the wrapper of one gated function, with the signature Gradio reads.

    One core (`open`, `admit`, `flush`, `settle`, `abandon`, `output`) and four thin
    wrappers, because Gradio tells a stream or a coroutine by the wrapper's own kind.
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
        self.token_field = token_field if fields else None
        self.with_receipt, self.notify = with_receipt, notify
        self.max_chunks, self.capture_every = max_chunks, capture_every
        self.gr = _gradio()
        self.is_async_gen = inspect.isasyncgenfunction(fn)
        self.is_gen = inspect.isgeneratorfunction(fn)
        if per == "chunk" and not (self.is_gen or self.is_async_gen):
            raise ValidationError('per="chunk" needs a generator handler (one that yields); use per="call"')
        self.static_price = None if callable(price) else _price_of(price, per)
        self.run = _timed(fn, self.is_gen, self.is_async_gen, max_ns if gpu else None) if per == "second" else fn
        self._build_signatures()
        self.wrapper = self._build()
        functools.update_wrapper(self.wrapper, fn)
        self.wrapper.__signature__ = self.wrapper_signature
        self.wrapper.__annotations__ = self.annotations
        self.wrapper.gate = gate
        self.wrapper.receipts = gate.receipts

    def _build_signatures(self) -> None:
        self.signature = inspect.signature(self.fn)
        try:
            hints = typing.get_type_hints(self.fn)
        except Exception:  # unresolvable string annotations: keep none rather than fail
            hints = {}
        # the handler's own request parameter: annotated gr.Request, or simply named `request`
        request_types = (self.gr.Request, typing.Optional[self.gr.Request]) if self.gr is not None else ()
        self.request_name = next((name for name, hint in hints.items()
                                  if name != "return" and hint in request_types), None)
        if self.request_name is None and "request" in self.signature.parameters:
            self.request_name = "request"
        owns_field = self.token_field is not None and self.token_field not in self.signature.parameters
        self.owned_field = self.token_field if owns_field else None

        params = list(self.signature.parameters.values())
        cut = next((i for i, p in enumerate(params) if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)),
                   len(params))
        # default None: Gradio's API then lists the field as optional, so API callers may send the header only
        added = [inspect.Parameter(self.owned_field, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                   annotation=typing.Optional[str])] if self.owned_field else []
        if self.request_name is None:
            added.append(inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                           annotation=self.gr.Request if self.gr is not None else Any))
        wrapper_params = params[:cut] + added + params[cut:]
        self.wrapper_signature = self.signature.replace(parameters=wrapper_params)
        request_param = self.request_name or "request"
        self.call_signature = self.wrapper_signature.replace(
            parameters=[p for p in wrapper_params if p.name != request_param])
        self.annotations = dict(hints)
        if self.owned_field:
            self.annotations[self.owned_field] = typing.Optional[str]
        if self.gr is not None:
            self.annotations[request_param] = self.gr.Request

    # -- per call: arguments, token, price --

    def prepare(self, args: tuple, kwargs: dict) -> _Call:
        call = _Call()
        args, kwargs = list(args), dict(kwargs)
        request = kwargs.pop(self.request_name or "request", None)
        if request is None and self.gr is not None:
            for i, value in enumerate(args):
                if isinstance(value, self.gr.Request):
                    request = args.pop(i)
                    break
        call.in_gradio = self.gr is not None and isinstance(request, self.gr.Request)
        bound = self.call_signature.bind(*args, **kwargs)
        typed = bound.arguments.get(self.token_field) if self.token_field else None
        try:
            call.token = typed.strip() if isinstance(typed, str) and typed.strip() else spend_token_from(
                _headers(request))
        except EscrowError as error:
            raise self.refused(error, call) from None
        arguments = OrderedDict((k, v) for k, v in bound.arguments.items() if k != self.owned_field)
        if self.request_name is not None:
            arguments[self.request_name] = request
        handler_bound = inspect.BoundArguments(self.signature, arguments)
        call.args, call.kwargs = handler_bound.args, handler_bound.kwargs
        call.price = self.static_price
        if call.price is None:
            try:
                call.price = _price_of(self.price(*call.args, **call.kwargs), self.per)
            except EscrowError as error:
                raise self.refused(error, call) from None
        return call

    def step(self, bill: _Bill, produced: Any) -> Any:
        """The handler's output; per second, unpacked from its measured run time."""
        if self.per != "second":
            return produced
        item, elapsed_ns = produced
        bill.ran(elapsed_ns)
        if not (self.is_gen or self.is_async_gen):
            bill.units = 1
        return item

    # -- the core: holds and captures, as the caller sees them --

    def open(self, call: _Call) -> _Bill:
        """Hold the call's worst case; refused: nothing held, and the handler must not run."""
        started = time.perf_counter()
        try:
            if self.per == "chunk":
                tab, chunks = self._open_stream(call)
            elif self.per == "second":
                tab, chunks = self._open_timed(call), 1
            elif self.batched:   # a lease charge: reserved in memory, paid by the lease's next flush
                tab, chunks = self.gate.leases.admit(call.token, call.price, what="this call"), 1
            else:
                tab, chunks = self.gate.till.open(call.token, call.price, what="this call"), 1
        except EscrowError as error:
            raise self.refused(error, call) from None
        rate = call.price if self.per == "second" else None
        return _Bill(self.gate, tab, billing=self.per, unit_micro=0 if rate else call.price, units_held=chunks,
                     capped=chunks < self.max_chunks, capture_every=self.capture_every,
                     spent_s=time.perf_counter() - started, rate=rate, max_ns=self.max_ns)

    def _open_timed(self, call: _Call) -> Tab:
        """Hold the worst case of a per-second call: max_seconds at its rate."""
        worst = seconds_cost_micro(self.max_ns, call.price)
        seconds = self.max_ns / NS_PER_SECOND
        if worst < 1:
            raise ValidationError(f"{seconds:g} s at {call.price} USDC/s rounds to 0 micro-USDC: raise the price "
                                  "or max_seconds")
        return self.gate.till.open(call.token, worst, ttl_seconds=max(self.gate.hold_ttl_s, seconds + HOLD_MARGIN_S),
                                   what=f"this call (up to {seconds:g} s at {call.price} USDC/s)")

    def _open_stream(self, call: _Call) -> tuple[Tab, int]:
        """A hold for `max_chunks`, or for as many whole chunks as the escrow has free."""
        chunks = self.max_chunks
        for _ in range(OPEN_ATTEMPTS):
            try:
                return self.gate.till.open(call.token, chunks * call.price,
                                           what=f"a stream of up to {chunks} chunk(s)"), chunks
            except InsufficientFunds as error:
                free = (error.details or {}).get("remaining_micro")
                fits = min(self.max_chunks, int(free) // call.price) if free is not None else 0
                if fits < 1:
                    free_text = f"; the escrow has {format_usdc(int(free))} USDC free" if free is not None else ""
                    raise InsufficientFunds(f"one chunk costs {format_usdc(call.price)} USDC{free_text}: the buyer "
                                            "must fund a new escrow", details=error.details) from None
                chunks = fits
        raise InsufficientFunds("the escrow's free amount kept changing while this stream asked for a hold; "
                                "try again")

    def may_run(self, bill: _Bill, call: _Call) -> bool:
        try:
            return bill.may_run()
        except EscrowError as error:
            raise self.refused(error, call) from None

    def admit(self, bill: _Bill, call: _Call) -> bool:
        try:
            return bill.admit_chunk()
        except EscrowError as error:
            raise self.refused(error, call) from None

    def flush(self, bill: _Bill, call: _Call) -> None:
        try:
            bill.flush()
        except EscrowError as error:
            _rethrow(self.refused(error, call), error)

    def settle(self, bill: _Bill, call: _Call) -> GateReceipt:
        """Pay the call; a refused payment withholds the result (and frees the hold)."""
        try:
            return bill.settle()
        except EscrowError as error:
            if self.per == "call" and not (self.is_gen or self.is_async_gen):
                with contextlib.suppress(EscrowError):
                    bill.tab.void()
                withheld = type(error)(f"payment for this call failed ({error.message}): the result was withheld",
                                       details=error.details)
                _rethrow(self.refused(withheld, call), error)
            _rethrow(self.refused(error, call), error)

    def deliver(self, result: Any, receipt: GateReceipt, call: _Call) -> Any:
        self.toast(receipt, call)
        return self.output(result, receipt)

    def refused(self, error: EscrowError, call: _Call) -> BaseException:
        """A payment error, as a gr.Error inside Gradio (so its message reaches the caller).

        A refusal to pay carries the challenge (`hf_escrow.challenge`) behind its message.
        """
        if getattr(call, "price", None) and challenge.reason_of(error):
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

    def failed(self, error: BaseException, call: _Call) -> BaseException:
        """A handler error: the caller learns what it was charged."""
        if not call.in_gradio or not isinstance(error, Exception):
            return error
        streamed = self.is_gen or self.is_async_gen
        note = "not charged" if self.per == "call" or not streamed else "charged for the delivered chunks only"
        if isinstance(error, self.gr.Error):
            error.message = f"{error.message} ({note})"
            return error
        return self.gr.Error(f"the call failed ({type(error).__name__}); you were {note}", title="Call failed")

    def output(self, result: Any, shown: GateReceipt | dict) -> Any:
        if not self.with_receipt:
            return result
        shown = shown.to_dict() if isinstance(shown, GateReceipt) else shown
        return (*result, shown) if isinstance(result, tuple) else (result, shown)

    def toast(self, receipt: GateReceipt, call: _Call) -> None:
        if self.notify and call.in_gradio:
            try:
                note = (f"{receipt.remaining} USDC left in escrow {receipt.escrow_id}" if receipt.settled
                        else f"captured from escrow {receipt.escrow_id} at the next flush")
                self.gr.Info(f"Paid {receipt.charged} USDC; {note}", duration=4)
            except Exception:  # a toast is a nicety: never fail a paid call over it
                pass

    # -- the four kinds of handler: thin twins around the core --

    def _build(self) -> Callable:
        if self.is_async_gen:
            return self._async_stream()
        if self.is_gen:
            return self._sync_stream()
        if inspect.iscoroutinefunction(self.fn):
            return self._async_call()
        return self._sync_call()

    def _sync_call(self) -> Callable:
        def gated(*args: Any, **kwargs: Any) -> Any:
            call = self.prepare(args, kwargs)
            bill = self.open(call)
            try:
                result = self.step(bill, self.run(*call.args, **call.kwargs))
            except BaseException as error:
                bill.abandon(failed=True)
                _rethrow(self.failed(error, call), error)
            return self.deliver(result, self.settle(bill, call), call)
        return gated

    def _async_call(self) -> Callable:
        async def gated(*args: Any, **kwargs: Any) -> Any:
            call = self.prepare(args, kwargs)
            bill = await _blocking(self.open, call)
            try:
                result = self.step(bill, await self.run(*call.args, **call.kwargs))
            except BaseException as error:
                await _blocking(bill.abandon, True)
                _rethrow(self.failed(error, call), error)
            return self.deliver(result, await _blocking(self.settle, bill, call), call)
        return gated

    def _sync_stream(self) -> Callable:
        def gated(*args: Any, **kwargs: Any) -> Any:
            call = self.prepare(args, kwargs)
            bill = self.open(call)
            failed, last = False, None
            stream = self.run(*call.args, **call.kwargs)
            try:
                while self.may_run(bill, call):
                    try:
                        item = self.step(bill, next(stream))
                    except StopIteration:
                        break
                    except BaseException as error:
                        failed = True
                        _rethrow(self.failed(error, call), error)
                    if not self.admit(bill, call):
                        break
                    if bill.delivered():
                        self.flush(bill, call)
                    yield self.output(item, bill.pending())
                    last = item
                receipt = self.settle(bill, call)
                self.toast(receipt, call)
                if self.with_receipt:
                    yield self.output(last, receipt)
            finally:
                stream.close()
                bill.abandon(failed)
        return gated

    def _async_stream(self) -> Callable:
        async def gated(*args: Any, **kwargs: Any) -> Any:
            call = self.prepare(args, kwargs)
            bill = await _blocking(self.open, call)
            failed, last = False, None
            stream = self.run(*call.args, **call.kwargs)
            try:
                while self.may_run(bill, call):
                    try:
                        item = self.step(bill, await stream.__anext__())
                    except StopAsyncIteration:
                        break
                    except BaseException as error:
                        failed = True
                        _rethrow(self.failed(error, call), error)
                    if not self.admit(bill, call):
                        break
                    if bill.delivered():
                        await _blocking(self.flush, bill, call)
                    yield self.output(item, bill.pending())
                    last = item
                receipt = await _blocking(self.settle, bill, call)
                self.toast(receipt, call)
                if self.with_receipt:
                    yield self.output(last, receipt)
            finally:
                await _shielded(stream.aclose)
                await _blocking(bill.abandon, failed)
        return gated


def _timed(fn: Callable, is_gen: bool, is_async_gen: bool, gpu_ns: int | None) -> Callable:
    """`fn`, returning (or yielding) each output with the nanoseconds it took to make it.

    The clock runs inside the function, so under ``@spaces.GPU`` (`gpu_ns`: its duration)
    the GPU wait is outside it, and the time travels back with the result from ZeroGPU's
    worker process.
    """
    clock = time.perf_counter_ns
    if is_async_gen:
        async def timed(*args: Any, **kwargs: Any) -> Any:
            stream = fn(*args, **kwargs)
            try:
                while True:
                    started = clock()
                    try:
                        item = await stream.__anext__()
                    except StopAsyncIteration:
                        return
                    yield item, clock() - started
            finally:
                await stream.aclose()
    elif is_gen:
        def timed(*args: Any, **kwargs: Any) -> Any:
            stream = fn(*args, **kwargs)
            try:
                while True:
                    started = clock()
                    try:
                        item = next(stream)
                    except StopIteration:
                        return
                    yield item, clock() - started
            finally:
                stream.close()
    elif inspect.iscoroutinefunction(fn):
        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = clock()
            result = await fn(*args, **kwargs)
            return result, clock() - started
    else:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = clock()
            result = fn(*args, **kwargs)
            return result, clock() - started
    functools.update_wrapper(timed, fn)
    if gpu_ns is None:
        return timed
    gpu = _spaces_gpu()
    return timed if gpu is None else gpu(duration=gpu_ns // NS_PER_SECOND)(timed)


def _spaces_gpu() -> Callable | None:
    """ZeroGPU's ``spaces.GPU`` when the `spaces` package is installed, else None (imported on first use)."""
    import sys
    module = sys.modules.get("spaces")
    if module is None:
        if importlib.util.find_spec("spaces") is None:
            return None
        import spaces as module
    gpu = getattr(module, "GPU", None)   # a folder named spaces/ (Space templates) is no ZeroGPU package
    return gpu if callable(gpu) else None


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


def _headers(request: Any) -> dict[str, str]:
    """Headers from a gr.Request, a starlette Request, or a plain mapping."""
    headers = getattr(request, "headers", request) if request is not None else None
    if headers is None:
        return {}
    items = headers.items() if isinstance(headers, Mapping) or hasattr(headers, "items") else ()
    return {str(k): str(v) for k, v in items}


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
    from ..client import connect
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

    token: Any       # gr.Textbox: the escrow's spend token (a password field)
    balance: Any     # gr.Textbox: what the escrow can still spend, read-only

    @property
    def inputs(self) -> list:
        """The input to list after a gated handler's own (``@paid(..., fields=True)``)."""
        return [self.token]

    def show(self, receipt: dict | None) -> str:
        """The balance text for a receipt (`GateReceipt.to_dict`)."""
        return f"{receipt['remaining_usdc']} USDC" if receipt and "remaining_usdc" in receipt else ""


def payment_fields(gate: Gate, *, price: str, trial_amount: Any = None, trial_per_client: int = 3,
                   trial_overall: int = 100, trial_window_s: float = 3600) -> PaymentFields:
    """A spend token field, the price, the remaining balance and a "Check balance" button.

    Call it inside ``gr.Blocks``. With `trial_amount` (embedded ledger only; the Space's
    owner turns it on) a "Get a test escrow" button fills the token of a fresh escrow of
    that many USDC, at most `trial_per_client` times per client (IP) and `trial_overall`
    times in all per `trial_window_s`: a private event is still callable by a script. The
    buttons' events are private: they are not part of the Space's API.

    Example:
        >>> with gr.Blocks() as demo:
        ...     pay = payment_fields(gate, price="0.001 USDC per answer")
        ...     button.click(answer, [message, *pay.inputs], [output, receipt])
    """
    gr = _gradio()
    if gr is None:
        raise ValidationError("payment_fields needs gradio (pip install gradio)")

    def check(token: str) -> str:
        try:
            return f"{gate.balance(token)} USDC"
        except EscrowError as error:
            raise gr.Error(error.message, title="Escrow", print_exception=False) from None

    from ..limits import WindowLimiter, client_key
    trials = WindowLimiter("test escrows", per_client=trial_per_client, overall=trial_overall,
                           window_s=trial_window_s)

    def trial(request: gr.Request) -> tuple[str, str]:
        try:
            trials.take(client_key(getattr(getattr(request, "client", None), "host", None)))
            _, token = trial_escrow(gate.seller_id, trial_amount)
        except EscrowError as error:
            raise gr.Error(error.message, title="Test escrow", print_exception=False) from None
        return token, f"{to_usdc(parse_usdc(trial_amount))} USDC"

    with gr.Row():
        token = gr.Textbox(label="Spend token", type="password", placeholder="est_...", scale=3,
                           info=f"the escrow's spend token (sent by code as the {TOKEN_HEADER} header); "
                                "never your API key")
        gr.Textbox(label="Price", value=price, interactive=False, scale=1)
        balance = gr.Textbox(label="Remaining balance", value="", interactive=False, scale=1)
    with gr.Row():
        check_button = gr.Button("Check balance", size="sm")
        check_button.click(check, token, balance, api_visibility="private")
        if trial_amount is not None:
            trial_button = gr.Button("Get a test escrow (embedded ledger)", size="sm")
            trial_button.click(trial, None, [token, balance], api_visibility="private")
    return PaymentFields(token, balance)


def trial_escrow(seller: str, amount: Any, *, ttl_seconds: float = 3600) -> tuple[str, str]:
    """On an embedded ledger only: a new test buyer, funded from the faucet, with an escrow for `seller`.

    Returns ``(escrow_id, spend_token)``. For local demos of a paid Space (the "try it"
    button); against a real escrow server, buyers open their own escrows.

    Example:
        >>> escrow_id, token = trial_escrow("paid-chat", "0.02")
    """
    from ..client import connect
    if os.environ.get("HF_ESCROW_URL"):
        raise Forbidden("trial escrows exist on the embedded ledger only; open an escrow on the escrow server")
    name = "visitor-" + uuid.uuid4().hex[:10]
    buyer = connect(agent=name)
    buyer.register(name)
    buyer.claim_faucet()
    escrow = buyer.create_escrow(seller, amount, ttl_seconds=ttl_seconds, description="trial escrow (demo)")
    return escrow.id, escrow.spend_token
