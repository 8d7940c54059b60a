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

import inspect
import threading
from collections import deque
from decimal import Decimal
from typing import Any, Callable

from ... import challenge
from ..._exceptions import InsufficientFunds, ValidationError
from ...money import to_usdc
from ..lease import DEFAULT_FLUSH_MS, DEFAULT_LEASE_CALLS, Leases, check_flush_ms
from ..till import DEFAULT_HOLD_TTL_S, Till
from .billing import (BILLINGS, DEFAULT_MAX_CHUNKS, MAX_CAPTURE_EVERY, GateReceipt, advertised, check_limits, max_ns_of,
                      price_of)
from .space import PaymentFields, discovery_routes, payment_fields, seller_from_env, spaces_gpu, trial_escrow
from .wrappers import GatedFunction

__all__ = ["paid", "Gate", "GateReceipt", "seller_from_env", "trial_escrow", "payment_fields", "PaymentFields"]

_spaces_gpu = spaces_gpu   # the name tests and Space templates have imported from hf_escrow.gate

MAX_RECEIPTS = 1_000                 # receipts kept in memory per gate


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
        from ...client import AsyncEscrowClient
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
        return discovery_routes(self)

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
            price_of(price, per)  # refuse a bad price when the app starts, not at the first call
        max_ns = max_ns_of(per, max_seconds, gpu)
        check_limits(max_chunks, capture_every)
        sheet, minimum = advertised(price, per, pricing, max_ns)

        def decorate(fn: Callable) -> Callable:
            streams = inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn)
            if batch and streams:
                raise ValidationError("batch=True is for handlers that return: a generator holds each stream")
            batched = (self.lease_calls is not None if batch is None else batch) and per == "call" and not streams
            self._sheets[getattr(fn, "__name__", "call")] = (sheet, minimum)
            return GatedFunction(self, fn, price=price, per=per, fields=fields, token_field=token_field,
                                 with_receipt=with_receipt, notify=notify, max_chunks=max_chunks,
                                 capture_every=capture_every, max_ns=max_ns, gpu=gpu, batched=batched).wrapper
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
