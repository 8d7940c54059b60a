"""Leases: one ledger hold covering many calls on one escrow, paid in batches.

A `Tab` costs every call two ledger transactions (its hold, its capture). A busy face
takes payment through `Leases` instead: the first call on a spend token holds enough of
its escrow for `lease_calls` calls' worst case (or what the escrow has free), and each
call then reserves its worst case out of that hold in memory. When the call ends its
actual cost is added to what the lease owes; a flusher thread pays what every lease owes
with one `capture_many` every `flush_ms`, or as soon as `flush_calls` calls wait to be
paid, and always when a lease ends (idle for `idle_s`, its escrow closed, `close()`).

Each flush also renews every lease that admitted work since the last one: a new hold by
the token (sized for the calls in flight plus `lease_calls` more) replaces the old one,
which is captured for what it owes and freed in the same flush. That hold is the ledger
asking again whether the token is live and the escrow open, so a revoke or a cancel stops
new calls within one flush, and no hold lives long enough to expire under its calls.

What is at risk: delivered work is paid at the next flush, so a seller process that dies
loses at most what its leases owed since the last one - at most one flush interval, and
never more than `max_unpaid` calls per lease (admission waits past that). Nothing is
ever over-charged: a call's cost is capped at the worst case it reserved, a lease never
reserves more than its hold has open, and every capture carries an idempotency key, so a
flush retried after a lost answer pays once. A call that does not fit waits for the next
flush to make room (at most `wait_s`) or is refused with the usual 402.

What it costs: an active lease makes at most two ledger calls a flush (its renewal and
its share of one `capture_many`), whatever its call rate; in exchange it keeps up to
`lease_calls` calls' worst case of the buyer's escrow held between flushes, which other
seller processes on that escrow cannot spend until the lease frees it (at the latest
`idle_s` after its last call).

Example:
    >>> leases = Till(seller).leases(lease_calls=128, flush_ms=50)
    >>> with leases.admit(token, 2_000, what="one answer") as charge:   # worst case, in memory
    ...     answer = model(prompt)
    ...     charge.finish(1_500)                                       # paid at the next flush
    >>> leases.close()                                                 # pays the rest, frees every hold
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
import time
from typing import Any

from .._exceptions import (
    EscrowError, Forbidden, InsufficientFunds, RateLimited, StateConflict, ValidationError,
)
from ..challenge import check_token
from ..money import to_usdc
from ..pricing import MAX_TOKENS_PER_CALL   # the ledger's limit on one capture's tokens; the rest waits a flush
from .till import _refused, _too_little   # a lease refuses as the till's tab does

log = logging.getLogger(__name__)

DEFAULT_LEASE_CALLS = 128
DEFAULT_FLUSH_MS = 50.0
DEFAULT_FLUSH_CALLS = 256
DEFAULT_IDLE_S = 5.0
DEFAULT_WAIT_S = 10.0
MAX_LEASES = 10_000          # escrows leased at once by one process
MAX_BATCH = 1_000            # the ledger's capture_many limit
MAX_OLD_HOLDS = 8            # replaced holds a lease may still be paying off before it renews again
MAX_GROWTH = 16              # a busy lease holds at most this many times lease_calls
MIN_ROUND_GAP_S = 0.01       # the least time between two flushes
MAX_CLOSE_ROUNDS = 50        # flushes `close` tries before it gives up on an unreachable ledger

__all__ = ["Leases", "Charge"]


class _Segment:
    """One ledger hold of a lease: what it holds, what the ledger has captured, what it owes."""

    __slots__ = ("hold_id", "amount", "captured", "owed", "owed_calls", "tokens", "sending", "flushes", "born",
                 "retiring")

    def __init__(self, hold: Any):
        self.hold_id: str = hold.id
        self.amount = hold.amount_micro
        self.captured = 0           # confirmed by the ledger
        self.owed = 0               # delivered, not yet in a capture
        self.owed_calls = 0
        self.tokens = [0, 0]        # prompt and completion tokens owed calls reported
        # A capture sent, not yet answered (key, amount, final, calls, usage): resent as it is until answered.
        self.sending: tuple[str, int, bool, int, dict] | None = None
        self.flushes = 0
        self.born = time.monotonic()
        self.retiring = False       # no new call: captured and freed at the next flush

    @property
    def unpaid(self) -> int:
        return self.owed + (self.sending[1] if self.sending else 0)

    @property
    def open(self) -> int:
        """What the hold still has for calls: neither captured nor owed."""
        return self.amount - self.captured - self.unpaid


class _Lease:
    """The calls of one spend token: its current hold, older holds being paid off, calls in flight."""

    def __init__(self, token: str):
        self.token = token
        self.escrow_id: str | None = None
        self.current: _Segment | None = None
        self.old: list[_Segment] = []      # replaced holds, paid and freed at the next flush
        self.reserved = 0                  # worst cases of the calls in flight
        self.in_flight = 0
        self.unpaid_calls = 0              # calls delivered, not yet confirmed paid
        self.largest = 1                   # the largest worst case seen: sizes renewals
        self.fresh = False                 # admitted a call since the ledger last checked the token
        self.admitted = 0                  # calls admitted since the last renewal: sizes the next one
        self.wanted = 0                    # a waiting call's worst case: renew now
        self.refusal: EscrowError | None = None   # the ledger refused the token or closed the escrow
        self.opening = False
        self.ending = False
        self.used = time.monotonic()

    def segments(self) -> list[_Segment]:
        return self.old + ([self.current] if self.current is not None else [])

    @property
    def free(self) -> int:
        return self.current.open - self.reserved if self.current is not None and not self.ending else 0

    @property
    def done(self) -> bool:
        return self.current is None and not self.old and not self.in_flight


class Charge:
    """One call admitted on a lease: `finish(cost)` once it is delivered, or `void()`.

    `hold_id` is the lease hold current when the call was admitted; `escrow_open` turns
    False once a flush or a renewal learned the escrow closed or the token revoked.
    """

    __slots__ = ("_leases", "_lease", "worst_micro", "escrow_id", "hold_id", "cost_micro", "ended")

    def __init__(self, leases: "Leases", lease: _Lease, worst_micro: int):
        self._leases, self._lease, self.worst_micro = leases, lease, worst_micro
        self.escrow_id: str = lease.escrow_id or ""
        self.hold_id: str = lease.current.hold_id if lease.current is not None else ""
        self.cost_micro = 0
        self.ended = False

    @property
    def escrow_open(self) -> bool:
        return self._lease.refusal is None

    # What a face reads of a `Tab`, so one bill serves both.
    held_micro = property(lambda self: self.worst_micro)
    captured_micro = property(lambda self: self.cost_micro)
    closed = property(lambda self: self.ended)

    def finish(self, amount_micro: int = 0, *, usage: dict | None = None) -> None:
        """The call was delivered: owe `amount_micro` (capped at its worst case), paid at the next flush.

        `usage` (``prompt_tokens``, ``completion_tokens``) is added to the escrow's token
        counts with the flush. Returns None (a `Tab` returns the capture's receipt; here
        nothing is captured yet): `cost_micro` is what it owes, 0 if its lease lost its hold.
        """
        if not isinstance(amount_micro, int) or isinstance(amount_micro, bool) or amount_micro < 0:
            raise ValidationError("a charge is a whole, non-negative number of micro-USDC")
        self._leases._end(self, min(amount_micro, self.worst_micro), _tokens(usage))

    def void(self) -> None:
        """The call failed: it costs nothing. Safe after finish and twice."""
        self._leases._end(self, 0, (0, 0))

    def __enter__(self) -> "Charge":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.void()   # a no-op after finish: an unfinished call was not delivered


class Leases:
    """A till's leases, one per spend token, and the flusher that pays them.

    Args:
        till: the seller's `Till`.
        lease_calls: a lease hold covers this many calls' worst case beyond those in flight
            (a busy lease renews for up to twice what it admitted in the last interval).
        flush_ms: the longest delivered work waits to be captured (and the token re-checked).
        flush_calls: a lease with this many calls owed flushes at once.
        max_unpaid: the most calls per lease delivered but not yet paid (admission waits).
        idle_s: a lease with no call for this long is paid off and its hold freed.
        wait_s: the longest a call waits for room before it is refused.
    """

    def __init__(self, till: Any, *, lease_calls: int = DEFAULT_LEASE_CALLS, flush_ms: float = DEFAULT_FLUSH_MS,
                 flush_calls: int = DEFAULT_FLUSH_CALLS, max_unpaid: int | None = None,
                 idle_s: float = DEFAULT_IDLE_S, wait_s: float = DEFAULT_WAIT_S, max_leases: int = MAX_LEASES):
        for name, value in (("lease_calls", lease_calls), ("flush_calls", flush_calls), ("max_leases", max_leases)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValidationError(f"{name} must be a whole number, at least 1")
        self.till = till
        self.seller = till.seller
        self.lease_calls, self.flush_s, self.flush_calls = lease_calls, check_flush_ms(flush_ms) / 1000, flush_calls
        self.max_unpaid = max_unpaid if max_unpaid is not None else 4 * flush_calls
        if not isinstance(self.max_unpaid, int) or self.max_unpaid < flush_calls:
            raise ValidationError("max_unpaid must be a whole number, at least flush_calls")
        for name, value in (("idle_s", idle_s), ("wait_s", wait_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 3_600:
                raise ValidationError(f"{name} must be between 0 and 3600 seconds")
        self.idle_s, self.wait_s, self.max_leases = idle_s, wait_s, max_leases
        self._leases: dict[str, _Lease] = {}
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)     # callers waiting for room
        self._wake = threading.Condition(self._lock)     # the flusher
        self._round = threading.Lock()                   # one flush at a time
        self._closed = False
        self.flushes = 0           # flush rounds that sent something to the ledger
        self.ledger_calls = 0      # holds and capture_many calls made
        self._thread = threading.Thread(target=self._run, name="hf-escrow-leases", daemon=True)
        self._thread.start()
        atexit.register(self.close)   # a process that exits normally pays what it owes first

    # ---- admission --------------------------------------------------------------------

    def admit(self, token: Any, worst_micro: int, *, what: str = "this call", wait: bool = True) -> Charge:
        """Reserve a call's worst case on the token's lease (holding one first if needed).

        Raises what `Till.open` raises: PaymentRequired, Forbidden, StateConflict,
        InsufficientFunds (402s, nothing reserved); RateLimited when no room came within
        `wait_s`. With `wait=False`, raises `_MustWait` instead of blocking or calling the ledger.
        """
        token = check_token(token)
        if not isinstance(worst_micro, int) or isinstance(worst_micro, bool) or worst_micro <= 0:
            raise ValidationError(f"the worst case of {what} must be a positive amount of micro-USDC")
        deadline = time.monotonic() + self.wait_s
        with self._lock:
            for _ in range(1_000_000):   # each turn waits, so this bounds nothing but a bug
                if self._closed:
                    raise StateConflict("this seller is shutting down; retry on another replica")
                lease = self._leases.get(token)
                if lease is None or lease.done and lease.ending:
                    if len(self._leases) >= self.max_leases:
                        self._wake.notify()
                        raise RateLimited(f"this seller has {self.max_leases} escrows leased; retry shortly",
                                          details={"retry_after_s": 1})
                    lease = self._leases[token] = _Lease(token)
                if lease.refusal is not None:
                    raise _fresh(lease.refusal)
                lease.largest = max(lease.largest, worst_micro)
                if lease.current is None and not lease.opening and not lease.ending:
                    if not wait:
                        raise _MustWait()   # a ledger call: not in an event loop
                    self._open(lease, worst_micro, what)
                    continue
                if lease.free >= worst_micro and lease.unpaid_calls + lease.in_flight < self.max_unpaid:
                    return self._reserve(lease, worst_micro)
                if not wait:
                    raise _MustWait()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RateLimited(f"no room on the lease of escrow {lease.escrow_id} within {self.wait_s:g} s; "
                                      "retry shortly", details={"retry_after_s": 1})
                lease.wanted = max(lease.wanted, worst_micro)
                self._wake.notify()
                self._room.wait(left)
        raise RateLimited("admission did not settle; retry shortly")

    async def admit_async(self, token: Any, worst_micro: int, *, what: str = "this call") -> Charge:
        """`admit` for asyncio: in the event loop when there is room, else in a worker thread."""
        try:
            return self.admit(token, worst_micro, what=what, wait=False)
        except _MustWait:
            return await asyncio.to_thread(self.admit, token, worst_micro, what=what)

    def _reserve(self, lease: _Lease, worst_micro: int) -> Charge:
        lease.reserved += worst_micro
        lease.in_flight += 1
        lease.fresh = True
        lease.admitted += 1
        lease.used = time.monotonic()
        return Charge(self, lease, worst_micro)

    def _open(self, lease: _Lease, worst_micro: int, what: str) -> None:
        """The lease's first hold, made by this caller (the lock released meanwhile)."""
        lease.opening = True
        self._lock.release()
        segment = refusal = None
        try:
            hold = self._hold(lease.token, max(worst_micro, self.lease_calls * worst_micro), worst_micro, what)
            segment = _Segment(hold)
        except EscrowError as error:
            refusal = error
        finally:
            self._lock.acquire()
            lease.opening = False
            self._room.notify_all()
        if refusal is not None:
            if not lease.segments() and not lease.in_flight and self._leases.get(lease.token) is lease:
                del self._leases[lease.token]
            raise refusal
        lease.escrow_id, lease.current, lease.fresh = hold.escrow_id, segment, False

    def _hold(self, token: str, amount: int, least: int, what: str) -> Any:
        """A hold of `amount`, or of what the escrow has free when that still covers `least`."""
        try:
            self._counted()
            return self.seller.hold(token, to_usdc(amount), ttl_seconds=self.till.hold_ttl_s)
        except InsufficientFunds as error:
            free = int((error.details or {}).get("remaining_micro") or 0)
            if free < least:
                raise _too_little(error, least, what) from None
        except (Forbidden, StateConflict) as error:
            raise _refused(error)
        try:
            self._counted()
            return self.seller.hold(token, to_usdc(free), ttl_seconds=self.till.hold_ttl_s)
        except InsufficientFunds as error:   # spent meanwhile by another process
            raise _too_little(error, least, what) from None
        except (Forbidden, StateConflict) as error:
            raise _refused(error)

    def _counted(self) -> None:
        with self._lock:
            self.ledger_calls += 1

    def _end(self, charge: Charge, cost: int, tokens: tuple[int, int]) -> None:
        with self._lock:
            if charge.ended:
                return
            lease = charge._lease
            charge.ended, charge.cost_micro = True, cost
            lease.reserved -= charge.worst_micro
            lease.in_flight -= 1
            if cost:
                # The in-flight reservation lives on the current hold (renewals carry it over).
                segment = lease.current
                if segment is None:   # its hold was refused a capture (expired): nothing can pay it now
                    log.error("lease of escrow %s lost its hold: a delivered call of %d micro-USDC goes unpaid",
                              lease.escrow_id, cost)
                    charge.cost_micro = 0
                    return
                if segment.open < cost:
                    raise _corrupted(f"lease of escrow {lease.escrow_id} cannot owe {cost} micro-USDC")
                segment.owed += cost
                segment.owed_calls += 1
                segment.tokens[0] += tokens[0]
                segment.tokens[1] += tokens[1]
                lease.unpaid_calls += 1
                if segment.owed_calls >= self.flush_calls:
                    self._wake.notify()
            if not lease.in_flight and (lease.refusal is not None or lease.ending):
                self._wake.notify()

    # ---- flushing ---------------------------------------------------------------------

    def flush(self) -> None:
        """One flush now, in this thread: renew, pay what is owed, end idle leases."""
        with self._round:
            self._flush_round()

    def close(self) -> None:
        """Admit nothing more, pay everything owed and free every hold (waits for calls in flight)."""
        atexit.unregister(self.close)
        with self._lock:
            if self._closed and not self._leases:
                return
            self._closed = True
            for lease in self._leases.values():
                lease.ending = True
            self._room.notify_all()
            self._wake.notify()
        for _ in range(MAX_CLOSE_ROUNDS):
            self.flush()
            with self._lock:
                if not self._leases:
                    break
                waiting_on_calls = any(lease.in_flight for lease in self._leases.values())
            if waiting_on_calls:
                time.sleep(self.flush_s)
        else:
            log.error("leases closed with %d escrow(s) still owed: their holds end at their TTL", len(self._leases))
        self._thread.join(timeout=max(1.0, 2 * self.flush_s))

    def __enter__(self) -> "Leases":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _run(self) -> None:
        last = 0.0
        while True:
            with self._lock:
                if self._closed:
                    return
                if not self._due():
                    self._wake.wait(self.flush_s)
                # A due flush goes at once, but rounds stay this far apart: a call waiting
                # for room must not spin the ledger with renewals.
                gap = last + min(self.flush_s / 8, MIN_ROUND_GAP_S) - time.monotonic()
                if gap > 0:
                    self._wake.wait(gap)
                if self._closed:
                    return
            last = time.monotonic()
            try:
                self.flush()
            except Exception:   # the flusher must outlive a bad round; what was owed is retried
                log.exception("a lease flush failed; retrying at the next one")
                time.sleep(self.flush_s)

    def _due(self) -> bool:
        return any(lease.wanted or any(s.owed_calls >= self.flush_calls for s in lease.segments())
                   for lease in self._leases.values())

    def _flush_round(self) -> None:
        with self._lock:
            now = time.monotonic()
            for lease in self._leases.values():
                if lease.current is not None and not lease.in_flight and not lease.ending and (
                        lease.refusal is not None or now - lease.used >= self.idle_s):
                    lease.ending = True
            renew = [lease for lease in self._leases.values() if self._renewal_due(lease, now)]
        for lease in renew:
            self._renew(lease)
        with self._lock:
            for lease in self._leases.values():
                if lease.ending and not lease.in_flight and lease.current is not None:
                    lease.current.retiring = True
                    lease.old.append(lease.current)
                    lease.current = None
            items = [(lease, segment) for lease in self._leases.values() for segment in lease.segments()
                     if self._freeze(segment)]
        for start in range(0, len(items), MAX_BATCH):
            self._capture(items[start:start + MAX_BATCH])
        with self._lock:
            for token in [t for t, lease in self._leases.items() if lease.done and not lease.opening]:
                del self._leases[token]
            for lease in self._leases.values():
                if lease.wanted and lease.current is not None and not lease.in_flight and lease.free < lease.wanted:
                    lease.ending = True   # a tight escrow: free this hold, the waiting call holds afresh
                lease.wanted = 0   # a call still waiting asks again when it wakes
            self._room.notify_all()
        if renew or items:
            self.flushes += 1

    def _renewal_due(self, lease: _Lease, now: float) -> bool:
        if lease.current is None or lease.refusal is not None or lease.ending or len(lease.old) >= MAX_OLD_HOLDS:
            return False   # (old holds pile up only while their captures fail: no new one meanwhile)
        aging = now - lease.current.born >= self.till.hold_ttl_s / 2
        return lease.fresh or aging or (lease.wanted > 0 and lease.free < lease.wanted)

    def _renew(self, lease: _Lease) -> None:
        """Replace the lease's hold by a new one by token: the ledger's check of the token and escrow."""
        with self._lock:
            if lease.current is None or lease.ending:
                return
            # The new hold carries the calls in flight (their worst cases) and room for more:
            # lease_calls, or twice what the last interval admitted when busier (at most
            # MAX_GROWTH times lease_calls), so a busy lease rarely waits for room.
            room = min(max(self.lease_calls, 2 * lease.admitted), MAX_GROWTH * self.lease_calls)
            lease.fresh, lease.admitted = False, 0
            size = lease.reserved + room * lease.largest
            least = lease.reserved + max(lease.wanted, lease.largest)
            aging = time.monotonic() - lease.current.born >= self.till.hold_ttl_s / 2
        try:
            segment = _Segment(self._hold(lease.token, size, least, "this lease"))
        except InsufficientFunds:
            # The token is live and the escrow open: keep the current hold while it lasts,
            # but not until it expires under its calls.
            if aging:
                with self._lock:
                    lease.ending = True
            return
        except (Forbidden, StateConflict) as error:
            with self._lock:
                lease.refusal = error
                log.info("lease of escrow %s stops admitting: %s", lease.escrow_id, error.message)
            return
        except EscrowError as error:   # the ledger unreachable: keep the hold, try again next flush
            log.warning("renewing the lease of escrow %s failed: %s", lease.escrow_id, error.message)
            return
        with self._lock:
            if lease.current is not None and not lease.ending and segment.amount >= lease.reserved:
                lease.current.retiring = True
                lease.old.append(lease.current)
                lease.current = segment
                self._room.notify_all()
                return
            segment.retiring = True   # the lease ended meanwhile: this hold is freed at once
            lease.old.append(segment)

    def _freeze(self, segment: _Segment) -> bool:
        """Fix the capture this segment sends in this flush (a resend keeps its key and amount)."""
        if segment.sending is None and (segment.owed or segment.retiring):
            segment.flushes += 1
            sent = [min(count, MAX_TOKENS_PER_CALL) for count in segment.tokens]
            segment.sending = (f"{segment.hold_id}:lease:{segment.flushes}", segment.owed, segment.retiring,
                               segment.owed_calls, {"prompt_tokens": sent[0], "completion_tokens": sent[1]})
            segment.owed = segment.owed_calls = 0
            segment.tokens = [count - part for count, part in zip(segment.tokens, sent)]
        return segment.sending is not None

    def _capture(self, items: list[tuple[_Lease, _Segment]]) -> None:
        batch = [{"hold_id": segment.hold_id, "amount": to_usdc(segment.sending[1]), "final": segment.sending[2],
                  "idempotency_key": segment.sending[0], "usage": segment.sending[4]} for _, segment in items]
        try:
            self._counted()
            results = self.seller.capture_many(batch)
        except EscrowError as error:   # nothing or all of it committed: resent as it is next flush
            log.warning("paying %d lease hold(s) failed (%s); retrying at the next flush", len(batch), error.message)
            return
        with self._lock:
            for (lease, segment), result in zip(items, results):
                self._settled(lease, segment, result)

    def _settled(self, lease: _Lease, segment: _Segment, result: Any) -> None:
        _, amount, final, calls, _ = segment.sending
        segment.sending = None
        lease.unpaid_calls -= calls
        if not result.ok:
            # Refused alone (its hold expired, say): that delivered work goes unpaid, the rest is paid.
            log.error("lease hold %s refused a capture of %d micro-USDC: %s", segment.hold_id, amount,
                      result.error.message)
            self._drop(lease, segment)
            if segment is lease.current:
                lease.refusal = result.error
            return
        receipt = result.receipt
        segment.captured += receipt.gross_micro
        if receipt.escrow.status != "active" and lease.refusal is None:
            lease.refusal = _refused(StateConflict(f"escrow {lease.escrow_id} is {receipt.escrow.status}; "
                                                   "it pays for no new call"))
        if final or (receipt.hold is not None and receipt.hold.status != "open"):
            self._drop(lease, segment)

    @staticmethod
    def _drop(lease: _Lease, segment: _Segment) -> None:
        if segment is lease.current:
            lease.current = None
            lease.ending = True
        elif segment in lease.old:
            lease.old.remove(segment)


def _tokens(usage: Any) -> tuple[int, int]:
    """A call's (prompt, completion) tokens, checked now: a bad count must not fail its whole flush."""
    if usage is None:
        return 0, 0
    counts = []
    for name in ("prompt_tokens", "completion_tokens"):
        value = usage.get(name, 0) if isinstance(usage, dict) else None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKENS_PER_CALL:
            raise ValidationError(f"usage.{name} must be a whole number of tokens, got {value!r}")
        counts.append(value)
    return counts[0], counts[1]


def check_flush_ms(flush_ms: Any) -> float:
    """A flush interval in milliseconds, refused unless more than 0 and at most an hour."""
    if isinstance(flush_ms, bool) or not isinstance(flush_ms, (int, float)) or not 0 < flush_ms <= 3_600_000:
        raise ValidationError("flush_ms must be more than 0 and at most an hour (3600000)")
    return float(flush_ms)


def _fresh(error: EscrowError) -> EscrowError:
    """A copy of a lease's refusal for one caller: faces add their own details to what they raise."""
    try:
        return type(error)(error.message, details=dict(error.details or {}))
    except TypeError:   # an error class built otherwise: raised as it is
        return error


class _MustWait(Exception):
    """`admit(wait=False)` found no room now."""


def _corrupted(message: str) -> EscrowError:
    from ..ledger.records import LedgerCorrupted
    return LedgerCorrupted(message)
