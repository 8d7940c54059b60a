"""Budgeted keys: API keys an agent mints for its sub-agents, spending the agent's own
money within a mandate (a budget, a cap per escrow, the sellers it may pay, an expiry).

The model keeps the ledger's double-entry and ownership rules as they are: a key is not
an agent and has no account. On an escrow it opened a key acts as its owner: the owner is
the buyer of record, the lock debits the owner's balance and every refund (cancel,
release, expiry, a hold freed after close) goes back to the owner, so a key's escrow
posts exactly the journal transactions of the owner's own. What differs is who may do what:

- A key acts as ``"@" + key_id`` (no agent id has an "@"), so it never matches a stored
  party. It is a party only to the escrows it opened (`escrows.key_id`), as their buyer;
  any other escrow answers NotFound, as to a stranger. Everything else an agent does (me,
  faucet, deposit, rotate, analytics, registering agents, minting keys) refuses it with
  `OutsideMandate`.
- Its idempotency keys are stored under its own identity: apart from its owner's.
- Budget: what its escrows locked over its life (`locked_micro`) minus what came back
  to the owner (`refunded_micro`, counted by every refund of those escrows) never exceeds
  `budget_micro`. Paid or still-locked money uses budget, a refund gives it back. The
  check is one conditional UPDATE of the key's row in the escrow's own transaction, so two
  processes racing on one key cannot both pass.
- Revoked (by the owner, at once) or past its expiry, a key authenticates no more and its
  lock is refused in the transaction; its escrows stay the owner's to cancel or release.
"""

from __future__ import annotations

import secrets
from typing import Any

from sqlalchemy import Connection, func, insert, or_, select, update

from .._exceptions import BudgetExceeded, KeyInactive, NotFound, OutsideMandate, StateConflict, ValidationError
from ..credentials import new_api_key
from ..money import format_usdc, parse_usdc
from . import rules
from .records import OPEN_STATUSES
from .schema import agent_keys, escrows

KEY_PREFIX = "@"           # a key's identity: "@" + key_id; never an agent id
KEY_ID_CHARS = 24
MAX_SELLERS = 100
MAX_KEYS_LISTED = 1_000
MAX_LABEL_CHARS = 200
MAX_CANCELLED = 1_000      # escrows cancelled by one revoke_key


def is_key_identity(agent_id: Any) -> bool:
    return isinstance(agent_id, str) and agent_id.startswith(KEY_PREFIX)


class KeyOperations:
    """Minting, revoking and reading budgeted keys; mixed into `hf_escrow.ledger.Ledger`."""

    def create_key(self, owner: str, *, budget: Any, sellers: Any = None, max_escrow: Any = None,
                   expires_in: Any = None, label: str | None = None, idempotency_key: str | None = None) -> dict:
        """A new budgeted key for `owner`'s sub-agent; its `api_key` is shown only this once.

        `budget`: USDC its escrows may have locked at once net of refunds; `max_escrow`:
        the most one escrow may lock; `sellers`: the agents (ids or wallets) it may pay,
        None for any; `expires_in`: seconds until it stops, None for never (until revoked).
        A replay under the same idempotency key answers the same key without its secret.
        """
        budget_micro = parse_usdc(budget)
        max_escrow_micro = None if max_escrow is None else parse_usdc(max_escrow)
        if max_escrow_micro is not None and max_escrow_micro > budget_micro:
            raise ValidationError(f"max_escrow ({format_usdc(max_escrow_micro)} USDC) cannot be more than the "
                                  f"budget ({format_usdc(budget_micro)} USDC)")
        expires_ms = None if expires_in is None else rules.check_ttl(expires_in)
        seller_names = _check_sellers(sellers)
        request = {"budget_micro": budget_micro, "max_escrow_micro": max_escrow_micro, "sellers": seller_names,
                   "expires_ms": expires_ms, "label": rules.check_text(label, "label", MAX_LABEL_CHARS)}
        api_key = new_api_key()

        def fn(conn: Connection, now_ms: int) -> dict:
            self._agent(conn, owner)  # a key cannot mint keys: it is no agent
            allowed = None
            if seller_names is not None:
                allowed = sorted({self._resolve(conn, name, "seller") for name in seller_names})
                if owner in allowed:
                    raise ValidationError("a key cannot pay its own owner; leave the owner out of sellers")
            key_id = "key_" + secrets.token_hex(8)
            conn.execute(insert(agent_keys).values(
                key_id=key_id, key_hash=rules.hash_secret(api_key), owner=owner, label=request["label"],
                budget_micro=budget_micro, max_escrow_micro=max_escrow_micro, sellers=allowed, locked_micro=0,
                refunded_micro=0,
                created_at_ms=now_ms, expires_at_ms=None if expires_ms is None else now_ms + expires_ms))
            return {**self._key_views(conn, [key_id], now_ms)[0], "api_key": api_key}

        return self._mutate(owner, "create_key", request, idempotency_key, fn)

    def revoke_key(self, owner: str, key_id: str, *, cancel_escrows: bool = False) -> dict:
        """Stop one of `owner`'s keys at once; with `cancel_escrows`, also cancel the active
        escrows it opened (their remainder refunded to the owner). Revoking twice is no error."""
        if not isinstance(cancel_escrows, bool):
            raise ValidationError("cancel_escrows must be true or false")

        def fn(conn: Connection, now_ms: int) -> list[str]:
            self._owned_key(conn, owner, key_id)
            conn.execute(update(agent_keys).where(agent_keys.c.key_id == key_id, agent_keys.c.revoked_at_ms.is_(None))
                         .values(revoked_at_ms=now_ms))
            return list(conn.scalars(select(escrows.c.escrow_id).where(
                escrows.c.key_id == key_id, escrows.c.status == "active")
                .order_by(escrows.c.created_at_ms).limit(MAX_CANCELLED))) if cancel_escrows else []

        cancelled = []
        for escrow_id in self._run(fn):
            try:
                cancelled.append(self.cancel(owner, escrow_id, reason=f"budgeted key {key_id} revoked")["escrow_id"])
            except StateConflict:
                pass  # closed (or awaiting its verifier) meanwhile: not the key's to settle any more
        return {**self.key(owner, key_id), "cancelled": cancelled}

    def keys(self, owner: str, *, limit: int = 100) -> list[dict]:
        """`owner`'s keys, newest first, each with its mandate and spend."""
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_KEYS_LISTED:
            raise ValidationError(f"limit must be between 1 and {MAX_KEYS_LISTED}")

        def fn(conn: Connection, now_ms: int) -> list[dict]:
            self._agent(conn, owner)
            ids = list(conn.scalars(select(agent_keys.c.key_id).where(agent_keys.c.owner == owner)
                                    .order_by(agent_keys.c.created_at_ms.desc(), agent_keys.c.key_id).limit(limit)))
            return self._key_views(conn, ids, now_ms)
        return self._read(fn)

    def key(self, agent_id: str, key_id: str | None = None) -> dict:
        """One key with its mandate and spend: the caller's own (as a key), or, for an
        owner, the key `key_id`."""
        def fn(conn: Connection, now_ms: int) -> dict:
            if is_key_identity(agent_id):
                own = self._active_key(conn, agent_id, now_ms).key_id
                if key_id is not None and key_id != own:
                    raise OutsideMandate("a budgeted key reads only its own mandate")
                return self._key_views(conn, [own], now_ms)[0]
            if key_id is None:
                self._agent(conn, agent_id)
                raise ValidationError("name the key: key_id (your keys are listed by keys())")
            return self._key_views(conn, [self._owned_key(conn, agent_id, key_id).key_id], now_ms)[0]
        return self._read(fn)

    def authenticate_key(self, api_key: str) -> str | None:
        """The identity ("@key_...") of a budgeted key, None if `api_key` is no such key."""
        def fn(conn: Connection, now_ms: int) -> str | None:
            row = conn.execute(select(agent_keys).where(agent_keys.c.key_hash == rules.hash_secret(api_key))).first()
            if row is None:
                return None
            _check_active(row, now_ms)
            return KEY_PREFIX + row.key_id
        return self._read(fn)

    # ---- inside a transaction -----------------------------------------------------

    def _active_key(self, conn: Connection, identity: str, now_ms: int) -> Any:
        """The key row behind a key identity, refused if revoked or expired."""
        key_id = identity[len(KEY_PREFIX):]
        row = conn.execute(select(agent_keys).where(agent_keys.c.key_id == key_id)).first() \
            if rules.is_key_text(key_id, KEY_ID_CHARS) else None
        if row is None:
            raise KeyInactive(f"no budgeted key {key_id!r}; ask its owner for a key")
        _check_active(row, now_ms)
        return row

    def _owned_key(self, conn: Connection, owner: str, key_id: Any) -> Any:
        self._agent(conn, owner)
        row = conn.execute(select(agent_keys).where(agent_keys.c.key_id == key_id, agent_keys.c.owner == owner)
                           ).first() if rules.is_key_text(key_id, KEY_ID_CHARS) else None
        if row is None:
            raise NotFound(f"key {key_id!r} not found among your keys")
        return row

    @staticmethod
    def _check_mandate(key: Any, seller: str, amount_micro: int) -> None:
        """The parts of a key's mandate that never change: whom it pays, how much per escrow."""
        if key.sellers is not None and seller not in key.sellers:
            raise OutsideMandate(f"budgeted key {key.key_id} may not pay {seller!r}; it may pay "
                                 f"{', '.join(key.sellers)}", details={"sellers": key.sellers})
        if key.max_escrow_micro is not None and amount_micro > key.max_escrow_micro:
            raise OutsideMandate(f"budgeted key {key.key_id} may lock at most {format_usdc(key.max_escrow_micro)} "
                                 f"USDC per escrow, not {format_usdc(amount_micro)}",
                                 details={"max_escrow_micro": int(key.max_escrow_micro)})

    def _spend_budget(self, conn: Connection, key: Any, amount_micro: int, now_ms: int) -> None:
        """Count `amount_micro` against the key's budget, in the escrow's transaction: one
        conditional UPDATE, so that of two racing locks at most the ones that fit pass."""
        counted = conn.execute(update(agent_keys).where(
            agent_keys.c.key_id == key.key_id, agent_keys.c.revoked_at_ms.is_(None),
            or_(agent_keys.c.expires_at_ms.is_(None), agent_keys.c.expires_at_ms > now_ms),
            agent_keys.c.locked_micro + amount_micro <= agent_keys.c.budget_micro + agent_keys.c.refunded_micro,
        ).values(locked_micro=agent_keys.c.locked_micro + amount_micro)).rowcount
        if counted != 1:
            key = conn.execute(select(agent_keys).where(agent_keys.c.key_id == key.key_id)).first()
            _check_active(key, now_ms)  # revoked meanwhile
            left = _left_micro(key)
            raise BudgetExceeded(f"budgeted key {key.key_id} has {format_usdc(left)} USDC of its "
                                 f"{format_usdc(key.budget_micro)} USDC budget left, cannot lock "
                                 f"{format_usdc(amount_micro)}; close an escrow it opened or ask its owner",
                                 details={"left_micro": left, "budget_micro": int(key.budget_micro)})

    def _count_refund(self, conn: Connection, key_id: str, amount_micro: int) -> None:
        """What came back of a key's escrow gives its budget back."""
        conn.execute(update(agent_keys).where(agent_keys.c.key_id == key_id).values(
            refunded_micro=agent_keys.c.refunded_micro + amount_micro))

    def _key_views(self, conn: Connection, key_ids: list[str], now_ms: int) -> list[dict]:
        """Keys as their owner sees them: the mandate, what it locked, paid and got back."""
        if not key_ids:
            return []
        rows = {r.key_id: r for r in conn.execute(select(agent_keys).where(agent_keys.c.key_id.in_(key_ids)))}
        spend = {r.key_id: r for r in conn.execute(select(
            escrows.c.key_id, func.count().label("escrows"),
            func.coalesce(func.sum(escrows.c.paid_micro), 0).label("paid"),
            func.count().filter(escrows.c.status.in_(OPEN_STATUSES)).label("open"),
        ).where(escrows.c.key_id.in_(key_ids)).group_by(escrows.c.key_id))}
        views = []
        for key_id in key_ids:
            row, used = rows[key_id], spend.get(key_id)
            refunded, paid = int(row.refunded_micro), int(used.paid) if used else 0
            views.append({
                "key_id": key_id, "owner": row.owner, "label": row.label, "budget_micro": int(row.budget_micro),
                "max_escrow_micro": None if row.max_escrow_micro is None else int(row.max_escrow_micro),
                "sellers": row.sellers, "locked_micro": int(row.locked_micro), "paid_micro": paid,
                "refunded_micro": refunded, "in_escrow_micro": int(row.locked_micro) - paid - refunded,
                "left_micro": _left_micro(row), "escrows": int(used.escrows) if used else 0,
                "escrows_open": int(used.open) if used else 0, "created_at_ms": int(row.created_at_ms),
                "expires_at_ms": None if row.expires_at_ms is None else int(row.expires_at_ms),
                "revoked_at_ms": None if row.revoked_at_ms is None else int(row.revoked_at_ms),
                "active": _inactive_reason(row, now_ms) is None})
        return views


def _left_micro(row: Any) -> int:
    return int(row.budget_micro) - (int(row.locked_micro) - int(row.refunded_micro))


def _inactive_reason(row: Any, now_ms: int) -> str | None:
    if row.revoked_at_ms is not None:
        return f"budgeted key {row.key_id} was revoked by its owner"
    if row.expires_at_ms is not None and row.expires_at_ms <= now_ms:
        return f"budgeted key {row.key_id} has expired"
    return None


def _check_active(row: Any, now_ms: int) -> None:
    reason = _inactive_reason(row, now_ms)
    if reason is not None:
        raise KeyInactive(reason + "; ask its owner for a new key")


def _check_sellers(sellers: Any) -> list[str] | None:
    if sellers is None:
        return None
    if isinstance(sellers, str) or not isinstance(sellers, (list, tuple)) or not 1 <= len(sellers) <= MAX_SELLERS:
        raise ValidationError(f"sellers must be a list of 1 to {MAX_SELLERS} agent ids or wallets (or null for "
                              "any seller)")
    for name in sellers:
        if not rules.is_key_text(name, 64):
            raise ValidationError(f"sellers must be agent ids or wallet addresses, got {name!r:.80}")
    return sorted(set(sellers))

