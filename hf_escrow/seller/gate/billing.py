"""What a gated call costs and owes: its price, the hold it opens, what it captures, its receipt.

No Gradio and no wrappers here: `open_bill` holds a call's worst case through the gate's
till (or, on the batched path, reserves it on a lease of the till), and `Bill` counts what the call owes as it runs and settles it. Its I/O methods
(`flush`, `settle`, `abandon`) block on the ledger; the async shells run them in a worker
thread.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..._exceptions import EscrowError, InsufficientFunds, StateConflict, ValidationError
from ...money import NS_PER_SECOND, format_usdc, parse_usdc, seconds_cost_micro, to_decimal, to_usdc
from ...pricing import Pricing
from ..lease import Charge
from ..till import Tab

if TYPE_CHECKING:
    from . import Gate

log = logging.getLogger("hf_escrow.seller.gate")

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


# ---- prices, checked when the app starts -------------------------------------------------


def _text(amount: Decimal | None) -> str | None:
    return None if amount is None else str(amount)


def check_limits(max_chunks: Any, capture_every: Any) -> None:
    if not isinstance(max_chunks, int) or isinstance(max_chunks, bool) or max_chunks < 1:
        raise ValidationError("max_chunks must be a whole number of chunks, at least 1")
    if not isinstance(capture_every, int) or isinstance(capture_every, bool) \
            or not 1 <= capture_every <= MAX_CAPTURE_EVERY:
        raise ValidationError(f"capture_every must be between 1 and {MAX_CAPTURE_EVERY} chunks")


def advertised(price: Any, per: str, pricing: Any, max_ns: int | None) -> tuple[dict, int]:
    """The price sheet a gated function advertises, and the smallest escrow that buys one unit
    (per second: one call's hold, its longest run at the rate)."""
    if pricing is not None:
        sheet = Pricing.coerce(pricing).to_dict()
        return sheet, min(parse_usdc(value, what="price") for value in sheet.values())
    if callable(price):   # priced per call: each refusal names the refused call's price (price_micro)
        return {}, 1
    if per == "second":
        rate = price_of(price, per)
        sheet = Pricing.coerce(price).to_dict() if isinstance(price, (Pricing, Mapping)) else {"per_second": str(rate)}
        return sheet, max(seconds_cost_micro(max_ns, rate), 1)
    micro = parse_usdc(price, what="price")
    return {f"per_{per}": format_usdc(micro)}, micro


def price_of(price: Any, per: str) -> Any:
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


def max_ns_of(per: str, max_seconds: Any, gpu: bool) -> int | None:
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


# ---- the hold a call opens -----------------------------------------------------------------


def open_bill(gate: Gate, token: str, price: Any, *, per: str, max_chunks: int, capture_every: int,
              max_ns: int | None, batched: bool = False) -> Bill:
    """Hold a call's worst case (refused: nothing is held, and the handler must not run)."""
    started = time.perf_counter()
    if per == "chunk":
        tab, chunks = _open_stream(gate, token, price, max_chunks)
    elif per == "second":
        tab, chunks = _open_timed(gate, token, price, max_ns), 1
    elif batched:   # a lease charge: reserved in memory, captured by the lease's next flush
        tab, chunks = gate.leases.admit(token, price, what="this call"), 1
    else:
        tab, chunks = gate.till.open(token, price, what="this call"), 1
    rate = price if per == "second" else None
    return Bill(gate, tab, billing=per, unit_micro=0 if rate else price, units_held=chunks,
                capped=chunks < max_chunks, capture_every=capture_every,
                spent_s=time.perf_counter() - started, rate=rate, max_ns=max_ns)


def _open_timed(gate: Gate, token: str, rate: Decimal, max_ns: int) -> Tab:
    """Hold the worst case of a per-second call: max_seconds at its rate."""
    worst = seconds_cost_micro(max_ns, rate)
    seconds = max_ns / NS_PER_SECOND
    if worst < 1:
        raise ValidationError(f"{seconds:g} s at {rate} USDC/s rounds to 0 micro-USDC: raise the price "
                              "or max_seconds")
    return gate.till.open(token, worst, ttl_seconds=max(gate.hold_ttl_s, seconds + HOLD_MARGIN_S),
                          what=f"this call (up to {seconds:g} s at {rate} USDC/s)")


def _open_stream(gate: Gate, token: str, price: int, max_chunks: int) -> tuple[Tab, int]:
    """A hold for `max_chunks`, or for as many whole chunks as the escrow has free."""
    chunks = max_chunks
    for _ in range(OPEN_ATTEMPTS):
        try:
            return gate.till.open(token, chunks * price, what=f"a stream of up to {chunks} chunk(s)"), chunks
        except InsufficientFunds as error:
            free = (error.details or {}).get("remaining_micro")
            fits = min(max_chunks, int(free) // price) if free is not None else 0
            if fits < 1:
                free_text = f"; the escrow has {format_usdc(int(free))} USDC free" if free is not None else ""
                raise InsufficientFunds(f"one chunk costs {format_usdc(price)} USDC{free_text}: the buyer "
                                        "must fund a new escrow", details=error.details) from None
            chunks = fits
    raise InsufficientFunds("the escrow's free amount kept changing while this stream asked for a hold; "
                            "try again")


# ---- one call's bill ------------------------------------------------------------------------


class Bill:
    """One gated call's tab and what it owes: a call's price, `unit_micro` per delivered chunk, or its run time."""

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
        self._check_open()
        if self.ran_ns < self.max_ns:
            return True
        log.warning("a stream ran max_seconds=%g and was cut; raise max_seconds to run longer",
                    self.max_ns / NS_PER_SECOND)
        return False

    def admit_chunk(self) -> bool:
        """May one more chunk leave? False at `max_chunks`; raises when the escrow cannot pay for it."""
        if self.billing == "call":
            return True
        self._check_open()
        if self.billing == "second" or self.units < self.units_held:
            return True
        if self.capped:
            raise InsufficientFunds(
                f"escrow {self.tab.escrow_id} cannot pay for more: the stream stopped after {self.units} paid "
                f"chunk(s) of {format_usdc(self.unit_micro)} USDC; open a new escrow for seller "
                f"{self.gate.seller_id!r}")
        log.warning("a stream reached max_chunks=%d and was cut; raise max_chunks to deliver more", self.units_held)
        return False

    def _check_open(self) -> None:
        if not self.tab.escrow_open:
            raise StateConflict(f"escrow {self.tab.escrow_id} was closed: the stream stopped after {self.units} "
                                "paid chunk(s)")

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
        settled = isinstance(self.tab, Tab)   # else a lease charge: its fee and net are known at the flush
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
