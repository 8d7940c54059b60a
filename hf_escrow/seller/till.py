"""The seller's till: the one place where every paid face (the gateway, `gate.paid`, the
shard server) takes payment.

A buyer hands a face the escrow's *spend token* (``X-Escrow-Token``), never its API key.
For each piece of work the face opens a `Tab`: one ledger hold, made with the seller's
own client, reserving the work's worst case. The ledger does the admission: the token
must be live, the escrow active and paying this seller, its spendable remainder enough.
No check is cached, so a cancel or a revoke stops the next piece of work at once, in
every process and on every machine that sells from the same escrow.

As the work is delivered the face captures slices of the hold (``tab.capture``): a
stream is paid as it flows, so a disconnect, a cancel or a crash costs the seller at
most the last uncaptured slice. ``tab.finish`` captures the last slice and frees the
rest; ``tab.void`` frees everything when the work failed. Every capture carries an
idempotency key derived from the hold, so a retried capture never pays twice.

Example:
    >>> till = Till(hf_escrow.connect(agent="my-space"))
    >>> with till.open(request_token, 2_000, what="one answer") as tab:   # 0.002 USDC worst case
    ...     answer = model(prompt)
    ...     tab.finish(1_500)                                              # what it cost
    >>> till.pay_once(request_token, 2_000, "train-00001.parquet", scope="shard")   # once per escrow
"""

from __future__ import annotations

import hashlib
import threading
from typing import TYPE_CHECKING, Any, Mapping

from .. import challenge
from .._exceptions import (
    EscrowError, Forbidden, IdempotencyConflict, InsufficientFunds, StateConflict, ValidationError,
)
from .._models import Receipt
from ..challenge import check_token
from ..money import format_usdc, to_usdc

if TYPE_CHECKING:
    from .lease import Leases

DEFAULT_HOLD_TTL_S = 120.0
MAX_KEY_CHARS = 255          # the ledger's idempotency key limit

__all__ = ["Till", "Tab"]


def _refused(error: EscrowError) -> EscrowError:
    """A ledger refusal of a hold by token, tagged with its payment reason (other errors unchanged)."""
    if isinstance(error, Forbidden):
        return challenge.tag(error, challenge.TOKEN_REFUSED)
    if isinstance(error, StateConflict):
        return challenge.tag(error, challenge.ESCROW_CLOSED)
    return error


class Till:
    """Opens one hold per piece of work on behalf of a seller.

    Args:
        seller: the seller's synchronous `EscrowClient` (embedded or over HTTP).
        hold_ttl_s: how long a hold lives; the ledger caps it (15 minutes by default).
    """

    def __init__(self, seller: Any, *, hold_ttl_s: float = DEFAULT_HOLD_TTL_S):
        if not callable(getattr(seller, "hold", None)):
            raise ValidationError("the till needs the seller's EscrowClient (hf_escrow.connect(...))")
        self.seller = seller
        self.hold_ttl_s = hold_ttl_s
        self._seller_id: str | None = None

    @property
    def seller_id(self) -> str:
        """The seller's agent id (asked of the ledger once when the client does not know it)."""
        if self._seller_id is None:
            self._seller_id = getattr(self.seller, "agent", None) or self.seller.me().agent_id
        return self._seller_id

    def offer(self, pricing: Mapping[str, str], min_escrow_micro: int, *, escrow_server: str | None = None,
              **extra: Any) -> challenge.Offer:
        """What this till's face sells: the facts of its 402s and its discovery document.

        `escrow_server` is the server's public URL when buyers reach it under another name
        than the seller's client does.
        """
        server = challenge.normalize_server(escrow_server) if escrow_server else challenge.server_id(self.seller)
        return challenge.Offer(seller=self.seller_id, escrow_server=server, pricing=dict(pricing),
                               min_escrow_micro=min_escrow_micro, extra=extra)

    def open(self, token: Any, amount_micro: int, *, ttl_seconds: float | None = None,
             what: str = "this work") -> "Tab":
        """Hold `amount_micro` of the token's escrow for one piece of work.

        Raises PaymentRequired (no token, or a key), Forbidden (token unknown, revoked or for
        another seller), StateConflict (escrow closed), InsufficientFunds (too little left,
        with the price in the message); nothing is reserved then.
        """
        token = check_token(token)
        if not isinstance(amount_micro, int) or amount_micro <= 0:
            raise ValidationError(f"the worst case of {what} must be a positive amount of micro-USDC")
        try:
            hold = self.seller.hold(token, to_usdc(amount_micro), ttl_seconds=ttl_seconds or self.hold_ttl_s)
        except InsufficientFunds as error:
            raise _too_little(error, amount_micro, what) from None
        except (Forbidden, StateConflict) as error:
            raise _refused(error)
        return Tab(self.seller, hold)

    def leases(self, **options: Any) -> "Leases":
        """Leases for a busy face: one hold covers many calls, paid in batches (`hf_escrow.seller.lease`)."""
        from .lease import Leases
        return Leases(self, **options)

    def pay_once(self, token: Any, amount_micro: int, item: str, *, scope: str, ttl_seconds: float | None = None,
                 what: str = "this item") -> tuple[str, Receipt | None]:
        """Pay `amount_micro` for `item` once per escrow, whichever process, token or retry asks.

        One hold captured in full at once; both carry keys every process of this seller
        derives alike, so the ledger remembers what was paid: the hold's key names the
        token and the item (asking again returns the stored hold, which names the escrow
        without reserving anything new), the capture's key names the escrow and the item (a
        second hold for an item the escrow already paid is refused as a key reuse, and
        voided). Returns (escrow id, the capture's receipt, or None when it was paid before).
        """
        token = check_token(token)
        key = once_hold_key(scope, token, item, amount_micro)
        try:
            hold = self._hold_once(token, amount_micro, key, ttl_seconds, what)
        except IdempotencyConflict:   # the stored hold was made under another TTL: hold afresh
            key = None
            hold = self._hold_once(token, amount_micro, key, ttl_seconds, what)
        try:
            receipt = self._capture_once(hold, amount_micro, scope, item)
        except StateConflict:
            if key is None:
                raise
            # The stored hold was never captured (its process died in between) and has expired.
            hold = self._hold_once(token, amount_micro, None, ttl_seconds, what)
            receipt = self._capture_once(hold, amount_micro, scope, item)
        return hold.escrow_id, receipt

    def _hold_once(self, token: str, amount_micro: int, key: str | None, ttl_seconds: float | None,
                   what: str) -> Any:
        try:
            return self.seller.hold(token, to_usdc(amount_micro), ttl_seconds=ttl_seconds or self.hold_ttl_s,
                                    idempotency_key=key)
        except InsufficientFunds as error:
            raise _too_little(error, amount_micro, what, "costs") from None
        except (Forbidden, StateConflict) as error:
            raise _refused(error)

    def _capture_once(self, hold: Any, amount_micro: int, scope: str, item: str) -> Receipt | None:
        try:
            return self.seller.capture(hold.id, to_usdc(amount_micro), final=True,
                                       idempotency_key=once_capture_key(scope, hold.escrow_id, item))
        except IdempotencyConflict:   # paid by another hold (or at another price): paid is paid
            try:
                self.seller.void(hold.id, idempotency_key=f"{hold.id}:void")
            except StateConflict:     # voided or expired already: nothing is held
                pass
            return None


def once_hold_key(scope: str, token: str, item: str, amount_micro: int) -> str:
    """The idempotency key of the hold that pays `item` once with `token` (no secret in it)."""
    # Domain-separated, so the key is not the ledger's own stored hash of the token.
    digest = hashlib.sha256(f"hf-escrow {scope} hold:{token}".encode()).hexdigest()[:32]
    return _bounded_key(f"{scope}-hold:{digest}:{amount_micro}:", item)


def once_capture_key(scope: str, escrow_id: str, item: str) -> str:
    """The idempotency key of the capture that pays `item` once for `escrow_id`."""
    return _bounded_key(f"{scope}:{escrow_id}:", item)


def _bounded_key(prefix: str, item: str) -> str:
    key = prefix + item
    return key if len(key) <= MAX_KEY_CHARS else prefix + "sha256:" + hashlib.sha256(item.encode()).hexdigest()


def _too_little(error: InsufficientFunds, amount_micro: int, what: str,
                costs: str = "may cost up to") -> InsufficientFunds:
    left = (error.details or {}).get("remaining_micro")
    left_text = f"; the escrow has {format_usdc(int(left))} USDC free" if left is not None else ""
    return challenge.tag(InsufficientFunds(f"{what} {costs} {format_usdc(amount_micro)} USDC{left_text}: the buyer "
                                           "must fund a new escrow (or ask for less)",
                                           details={**(error.details or {}), "price_micro": amount_micro}),
                         challenge.INSUFFICIENT)


class Tab:
    """One hold for one piece of work: capture as it is delivered, finish or void once.

    Thread-safe; `escrow_open` turns False once a capture reports the escrow closed, and a
    face then delivers no new work (what was already delivered is still captured).
    """

    def __init__(self, seller: Any, hold: Any):
        self._seller = seller
        self.hold_id: str = hold.id
        self.escrow_id: str = hold.escrow_id
        self.held_micro: int = hold.amount_micro
        self.captured_micro = 0
        self.escrow_open = hold.escrow_status == "active"
        self.closed = False
        self.last_receipt: Receipt | None = None
        self._captures = 0
        self._lock = threading.Lock()

    @property
    def open_micro(self) -> int:
        """What is still reserved for this work."""
        return 0 if self.closed else self.held_micro - self.captured_micro

    def capture(self, amount_micro: int, *, usage: dict | None = None) -> Receipt | None:
        """Pay a delivered slice; None when there is nothing to pay. Never more than was held."""
        return self._capture(amount_micro, final=False, usage=usage)

    def finish(self, amount_micro: int = 0, *, usage: dict | None = None) -> Receipt | None:
        """Pay the last slice and free the rest of the hold (idempotent)."""
        return self._capture(amount_micro, final=True, usage=usage)

    def void(self) -> None:
        """Free the whole hold: nothing more is paid. Safe after finish and twice."""
        with self._lock:
            if self.closed:
                return
            self._seller.void(self.hold_id, idempotency_key=f"{self.hold_id}:void")
            self.closed = True

    def __enter__(self) -> "Tab":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        elif self.captured_micro:
            self.finish()   # delivered slices stay paid; the rest is freed
        else:
            self.void()

    def _capture(self, amount_micro: int, *, final: bool, usage: dict | None) -> Receipt | None:
        if not isinstance(amount_micro, int) or amount_micro < 0:
            raise ValidationError("a capture is a whole, non-negative number of micro-USDC")
        with self._lock:
            if self.closed:
                if amount_micro:
                    raise EscrowError(f"hold {self.hold_id} is already closed; open a new tab for new work")
                return None
            amount_micro = min(amount_micro, self.held_micro - self.captured_micro)
            if not amount_micro and not final:
                return None
            self._captures += 1
            key = f"{self.hold_id}:{'final' if final else self._captures}"
            receipt = self._seller.capture(self.hold_id, to_usdc(amount_micro), final=final, usage=usage,
                                           idempotency_key=key)
            self.captured_micro += receipt.gross_micro
            self.escrow_open = receipt.escrow.status == "active"
            self.closed = final or (receipt.hold is not None and receipt.hold.status != "open")
            self.last_receipt = receipt
            return receipt
