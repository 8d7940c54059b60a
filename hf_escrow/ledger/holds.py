"""Holds and spend tokens: how a seller reserves part of an escrow for work, then is paid.

A hold is a reservation row, not a transfer: the money stays in the escrow's account and
`escrows.held_micro` (the sum of the open holds' `amount - captured`) takes it out of
the spendable remainder. A capture pays the seller out of a hold with the usual fee and
referral split (one journal transaction, like a deduct); `final` or `void` frees the
rest. Once the escrow is closed, whatever a hold frees goes straight back to the buyer.
A buyer's own hold (a buyer-side reservation) may also be freed by the release that pays
for its work (`Ledger.release(hold_id=...)`), as a void frees it, in that same transaction.

Every hold expires: at most `hold_max_ttl_s` after it was made, `hold_grace_s` after its
escrow closed, and `hold_grace_s` after its escrow's own expiry. An expired hold is
freed exactly once, by whichever of the sweeper or a late capture locks it first.

A spend token ("est_...") lets its bearer do one thing: have the escrow's seller hold on
that escrow. It is stored as a SHA-256 only; revoking it or closing the escrow stops it.
These operations are mixed into `Ledger` and use its transaction helpers.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import Connection, select, update

from .._exceptions import Forbidden, NotFound, StateConflict, ValidationError
from ..credentials import SPEND_TOKEN_PREFIX
from ..money import parse_usdc
from . import idempotency, rules
from .batch import HOLD_ID_CHARS, Batch, Operation, refused
from .queries import ESCROW, ESCROW_FOR_UPDATE, HELD, HOLD, HOLD_BY_ID, HOLD_ESCROW_ID, HOLD_ROW_FOR_UPDATE
from .records import OPEN_STATUSES, hold_dict
from .schema import holds, spend_tokens

MAX_BATCH_ITEMS = 1_000
DEFAULT_HOLD_TTL_S = 60.0



class HoldOperations:
    """Holds, captures, voids and spend tokens; mixed into `hf_escrow.ledger.Ledger`."""

    # ---- spend tokens -------------------------------------------------------------

    def mint_spend_token(self, agent_id: str, escrow_id: str) -> dict:
        """As the buyer of an active escrow: a new spend token for it (shown only this once)."""
        def fn(conn: Connection, now_ms: int) -> dict:
            self._locked(conn, escrow_id, agent_id, now_ms, role="buyer", states=("active",))
            return {"escrow_id": escrow_id, "spend_token": self._new_spend_token(conn, escrow_id, now_ms)}
        return self._mutate(agent_id, "mint_spend_token", {"escrow_id": escrow_id}, None, fn)

    def revoke_spend_tokens(self, agent_id: str, escrow_id: str) -> dict:
        """As the buyer: every spend token of the escrow stops working at once."""
        def fn(conn: Connection, now_ms: int) -> dict:
            row = self._visible(conn, escrow_id, agent_id, lock=True)
            if self._acting(row, agent_id) != row.buyer:
                raise Forbidden(f"only the buyer of escrow {escrow_id} may revoke its spend tokens")
            revoked = conn.execute(update(spend_tokens).where(
                spend_tokens.c.escrow_id == escrow_id, spend_tokens.c.revoked_at_ms.is_(None)).values(
                revoked_at_ms=now_ms)).rowcount
            if revoked:
                self._event(conn, escrow_id, "tokens_revoked", agent_id, now_ms, revoked=revoked)
            return {"escrow_id": escrow_id, "revoked": int(revoked)}
        return self._run(fn)

    # ---- holds --------------------------------------------------------------------

    def hold(self, agent_id: str, target: Any, amount: Any, *, ttl_seconds: Any = DEFAULT_HOLD_TTL_S,
             idempotency_key: str | None = None) -> dict:
        """Reserve `amount` of an escrow's remainder for one piece of work.

        `target` is a spend token (the caller must be that escrow's seller) or an escrow id
        (the caller must be its buyer or seller). Refused, with nothing reserved, when the
        escrow is not active or its spendable remainder is smaller than `amount`.
        """
        return self._settle_one(self.hold_operation(agent_id, target, amount, ttl_seconds=ttl_seconds,
                                                    idempotency_key=idempotency_key))

    def hold_operation(self, agent_id: str, target: Any, amount: Any, *, ttl_seconds: Any = DEFAULT_HOLD_TTL_S,
                       idempotency_key: str | None = None) -> Operation:
        """`hold`'s arguments checked into an operation, for `settle_async`."""
        amount_micro = parse_usdc(amount)
        ttl_ms = rules.check_hold_ttl(ttl_seconds, self.config.hold_max_ttl_s)
        by_token = isinstance(target, str) and target.startswith(SPEND_TOKEN_PREFIX)
        if not by_token and not rules.is_key_text(target, HOLD_ID_CHARS):
            raise ValidationError("hold needs a spend token (est_...) or an escrow id (esc_...)")
        # The request is keyed by the token's hash: a token never reaches a stored row.
        request = {"target": rules.hash_secret(target) if by_token else target, "amount_micro": amount_micro,
                   "ttl_ms": ttl_ms}
        return self._operation("hold", agent_id, request, idempotency_key, target)

    def capture(self, agent_id: str, hold_id: str, amount: Any, *, final: bool = False, usage: dict | None = None,
                idempotency_key: str | None = None) -> dict:
        """As the hold's maker: pay `amount` of it to the escrow's seller (fee applies).

        `final` frees what is left of the hold. A closed escrow's open hold still captures
        (work already delivered) until the hold expires.
        """
        return self._settle_one(self.capture_operation(agent_id, hold_id, amount, final=final, usage=usage,
                                                       idempotency_key=idempotency_key))

    def capture_operation(self, agent_id: str, hold_id: str, amount: Any, *, final: bool = False,
                          usage: dict | None = None, idempotency_key: str | None = None) -> Operation:
        """`capture`'s arguments checked into an operation, for `settle_async`."""
        request = _capture_request(hold_id, amount, final, usage)
        return self._operation("capture", agent_id, request, idempotency_key, hold_id)

    def void(self, agent_id: str, hold_id: str, *, idempotency_key: str | None = None) -> dict:
        """As the hold's maker: free all of it (the work failed or was not needed)."""
        return self._settle_one(self.void_operation(agent_id, hold_id, idempotency_key=idempotency_key))

    def void_operation(self, agent_id: str, hold_id: str, *, idempotency_key: str | None = None) -> Operation:
        """`void`'s arguments checked into an operation, for `settle_async`."""
        request = {"hold_id": hold_id, "amount_micro": 0, "final": True, "usage": [0, 0], "kind": "void"}
        return self._operation("void", agent_id, request, idempotency_key, hold_id)

    def capture_many(self, agent_id: str, items: Any, *, idempotency_key: str | None = None) -> dict:
        """Many captures in one database transaction; a refused item moves nothing and is reported alone.

        `items`: dicts ``{"hold_id", "amount", "final", "usage", "idempotency_key"}`` or
        tuples ``(hold_id, amount, final)``; at most 1,000. The batch is idempotent under
        its key, each item under its own.
        """
        batch = _batch_requests(items)
        # An item's key answers as a single capture's would: the same request hash.
        operations = [self._operation("capture", agent_id, request, key, request["hold_id"]) for request, key in batch]
        return self._settle_many(agent_id, "capture_many", operations, idempotency_key)

    # ---- the settlement path ------------------------------------------------------

    def _operation(self, kind: str, agent_id: str, request: dict, key: str | None, target: Any,
                   rounded_from: str | None = None) -> Operation:
        key = idempotency.check_key(key)
        digest = idempotency.request_hash(kind, request) if key is not None else None  # hashed only to be kept
        return Operation(kind, agent_id, request, key, digest, target=target, rounded_from=rounded_from)

    def _settle_one(self, op: Operation) -> dict:
        """One operation, committed in one transaction with those of concurrent callers."""
        self._group.submit(op)
        if isinstance(op.error, rules.Expired):
            raise self._expired_now(op.error)
        return _outcome(op)

    async def settle_async(self, op: Operation) -> dict:
        """A hold, capture, void or deduct operation (`*_operation`) settled for an event loop's
        caller, as the blocking call would settle it: the loop awaits its commit, and never
        waits on the database itself (an escrow found expired is settled in a worker thread)."""
        await self._group.settle_async(op)
        if isinstance(op.error, rules.Expired):
            raise await asyncio.to_thread(self._expired_now, op.error)
        return _outcome(op)

    def _settle_many(self, agent_id: str, op: str, operations: list[Operation], key: str | None) -> dict:
        """A caller's batch in one transaction of its own, idempotent under `key` as a whole."""
        def fn(conn: Connection, now_ms: int) -> dict:
            Batch(self, conn, now_ms).run(operations)
            return {"results": [_item_result(op) for op in operations]}

        digest_items = [dict(op.request, key=op.key) for op in operations]
        result = self._mutate(agent_id, op, {"items": digest_items}, key, fn)
        self._settle_expired(operations)
        return result

    def _settle(self, operations: list[Operation]) -> None:
        self._run(lambda conn, now_ms: Batch(self, conn, now_ms).run(operations), self._writer.begin)

    def _settle_expired(self, operations: list[Operation]) -> None:
        """What refused operations found past its TTL, settled each in a transaction of its own."""
        for op in operations:
            if isinstance(op.error, rules.Expired):
                self._expired_now(op.error)

    def get_hold(self, agent_id: str, hold_id: str) -> dict:
        """One hold, for its maker or a party of its escrow."""
        def fn(conn: Connection, now_ms: int) -> dict:
            row = conn.execute(HOLD_BY_ID, {"hid": hold_id}).first() if rules.is_key_text(hold_id, 40) else None
            if row is not None:
                try:
                    self._visible(conn, row.escrow_id, agent_id)
                    return hold_dict(row)
                except NotFound:
                    pass  # a stranger hears what an unknown hold id gets, not the escrow's id
            self._agent(conn, agent_id)
            raise NotFound(f"hold {hold_id!r} not found among your holds")
        return self._read(fn)

    def holds(self, agent_id: str, escrow_id: str) -> list[dict]:
        """The escrow's open holds, for its buyer, seller or verifier."""
        def fn(conn: Connection, now_ms: int) -> list[dict]:
            self._visible(conn, escrow_id, agent_id)
            rows = conn.execute(HOLD.where(holds.c.escrow_id == escrow_id, holds.c.status == "open")
                                .order_by(holds.c.created_at_ms, holds.c.hold_id).limit(MAX_BATCH_ITEMS))
            return [hold_dict(row) for row in rows]
        return self._read(fn)

    # ---- expiry -------------------------------------------------------------------

    def expire_hold(self, hold_id: str) -> bool:
        """Free a hold past its TTL; True if this call did it (exactly one caller does)."""
        def fn(conn: Connection, now_ms: int) -> bool:
            escrow_id = conn.scalar(HOLD_ESCROW_ID, {"hid": hold_id})
            if escrow_id is None:
                return False
            row = conn.execute(ESCROW_FOR_UPDATE, {"eid": escrow_id}).first()
            hold = conn.execute(HOLD_ROW_FOR_UPDATE, {"hid": hold_id}).first()
            if hold.status != "open" or hold.expires_at_ms > now_ms:
                return False
            row = self._settle_escrow_expiry(conn, row, now_ms)
            freed = int(hold.amount_micro - hold.captured_micro)
            self._free(conn, row, hold, freed, "expired", now_ms)
            self._event(conn, escrow_id, "hold_expired", None, now_ms, hold_id=hold_id,
                        captured_micro=int(hold.captured_micro), freed_micro=freed)
            return True
        return self._run(fn)

    def expire_due_holds(self, limit: int) -> int:
        """The sweeper's step for holds: free up to `limit` holds past their TTL."""
        due = self._read(lambda conn, now_ms: list(conn.scalars(
            select(holds.c.hold_id).where(holds.c.status == "open", holds.c.expires_at_ms <= now_ms)
            .order_by(holds.c.expires_at_ms).limit(limit))))
        return sum(1 for hold_id in due if self.expire_hold(hold_id))

    # ---- inside a transaction -----------------------------------------------------

    def _free(self, conn: Connection, row: Any, hold: Any, freed_micro: int, status: str, now_ms: int) -> int:
        """Close a hold; what it frees returns to the remainder, or to the buyer if the escrow closed."""
        conn.execute(update(holds).where(holds.c.hold_id == hold.hold_id).values(status=status, closed_at_ms=now_ms))
        conn.execute(HELD, {"eid": row.escrow_id, "delta": -freed_micro})
        if row.status in OPEN_STATUSES:
            return 0
        self._refund(conn, row, freed_micro, now_ms)
        return freed_micro

    def _void_own_hold(self, conn: Connection, row: Any, agent_id: str, hold_id: str, now_ms: int) -> tuple[Any, dict]:
        """Free the caller's own open hold on this (locked) escrow as a void frees it.

        Returns the escrow row as it is now and the hold as it was left. Another party's
        hold, another escrow's, a closed or an expired one is refused: nothing is freed.
        """
        hold = conn.execute(HOLD_ROW_FOR_UPDATE, {"hid": hold_id}).first()
        if hold is None or hold.escrow_id != row.escrow_id:
            raise NotFound(f"hold {hold_id!r} not found among your holds on escrow {row.escrow_id}")
        if hold.holder != self._acting(row, agent_id):
            raise Forbidden(f"hold {hold_id} was made by {hold.holder!r}; only its maker may free it")
        if hold.status != "open":
            raise StateConflict(f"hold {hold_id} is {hold.status}; release without it, or hold again",
                                details={"hold_id": hold_id, "hold_status": hold.status})
        if hold.expires_at_ms <= now_ms:
            raise rules.Expired(hold_id=hold_id)
        freed = int(hold.amount_micro - hold.captured_micro)
        self._free(conn, row, hold, freed, "voided", now_ms)
        self._event(conn, row.escrow_id, "hold_closed", agent_id, now_ms, hold_id=hold_id,
                    captured_micro=int(hold.captured_micro), freed_micro=freed)
        return conn.execute(ESCROW, {"eid": row.escrow_id}).first(), hold_dict(conn.execute(
            HOLD_BY_ID, {"hid": hold_id}).first())

    def _settle_escrow_expiry(self, conn: Connection, row: Any, now_ms: int) -> Any:
        """An open escrow past its TTL is expired here (its holds keep their grace); the row as it is now."""
        if row.status in OPEN_STATUSES and row.expires_at_ms <= now_ms:
            refunded = self._close(conn, row, "expired", now_ms)
            self._event(conn, row.escrow_id, "expired", None, now_ms, refunded_micro=refunded)
            return conn.execute(ESCROW, {"eid": row.escrow_id}).first()
        return row


def check_hold_id(hold_id: Any, *, optional: bool = False) -> None:
    if hold_id is None and optional:
        return
    if not rules.is_key_text(hold_id, HOLD_ID_CHARS):
        raise ValidationError("hold_id must be the id of a hold, such as hold_0123...")


def _capture_request(hold_id: Any, amount: Any, final: Any, usage: Any) -> dict:
    if not isinstance(final, bool):
        raise ValidationError("final must be true or false")
    amount_micro = parse_usdc(amount, allow_zero=True)
    if amount_micro == 0 and not final:
        raise ValidationError("a capture of 0 pays nothing: give an amount, or final=true to free the rest")
    check_hold_id(hold_id)
    return {"hold_id": hold_id, "amount_micro": amount_micro, "final": final,
            "usage": list(rules.usage_tokens(usage))}


def _batch_requests(items: Any) -> list[tuple[dict, str | None]]:
    if not isinstance(items, (list, tuple)) or not 1 <= len(items) <= MAX_BATCH_ITEMS:
        raise ValidationError(f"capture_many takes a list of 1 to {MAX_BATCH_ITEMS} captures")
    requests = []
    for index, item in enumerate(items):
        if isinstance(item, (list, tuple)) and len(item) in (2, 3):
            item = {"hold_id": item[0], "amount": item[1], "final": item[2] if len(item) == 3 else False}
        if not isinstance(item, dict):
            raise ValidationError(f"capture {index}: give {{hold_id, amount, final}} or (hold_id, amount, final)")
        try:
            requests.append((_capture_request(item.get("hold_id"), item.get("amount"), item.get("final", False),
                                              item.get("usage")), idempotency.check_key(item.get("idempotency_key"))))
        except ValidationError as error:
            raise type(error)(f"capture {index}: {error.message}") from None
    return requests


def _item_result(op: Operation) -> dict:
    """A batch item as it is reported: its receipt, or its error alone."""
    if isinstance(op.error, rules.Expired):
        return refused(rules.expired_error(op.error))
    if op.error is not None:
        return refused(op.error)
    return {"ok": True, "receipt": op.result}


def _outcome(op: Operation) -> dict:
    if op.error is not None:
        raise op.error
    return op.result
