"""The escrow engine: every lifecycle operation as one atomic, idempotent transaction.

Each mutation runs in `_mutate`: one database transaction that (1) returns the stored
result if the idempotency key was seen with the same request, (2) locks the escrow row,
(3) checks role and state, (4) posts one balanced journal transaction, (5) stores the
result under the key. Any error rolls all of it back: nothing moved.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, ContextManager

from sqlalchemy import Connection, exc, false, func, insert, literal, select, update

from .._exceptions import (
    Forbidden, InsufficientFunds, NotFound, OutsideMandate, RateLimited, StateConflict, Unauthorized,
    ValidationError,
)
from ..credentials import new_api_key, new_spend_token
from ..money import format_usdc, parse_usdc, split_over_life, to_decimal, was_rounded
from ..pricing import Pricing, capped, earned_bonus
from ..retries import Backoff
from . import idempotency, journal, rules, sql
from .config import LedgerConfig
from .journal import Leg, agent_account, escrow_account
from .group import GroupCommitter
from .batch import Operation
from .holds import MAX_BATCH_ITEMS, HoldOperations, check_hold_id
from .keys import KEY_PREFIX, KeyOperations, is_key_identity
from .milestones import MilestoneOperations, check_number
from .records import OPEN_STATUSES, escrow_dict, event_dict, receipt_dict, split_data
from .queries import ESCROW, ESCROW_FOR_UPDATE, INSERT_EVENT, PAYOUT
from .schema import agents, escrow_events, escrows, holds, spend_tokens, transactions
from .storage import default_database_url, open_engine
from .kept import KeptConnection

AGENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
WALLET = re.compile(r"^0x[0-9a-f]{40}$")
MAX_MODEL_CHARS = 200
LOCK_BACKOFF = Backoff(0.005, tries=8)   # lock conflicts: 5, 10, ... 35 ms between tries
MAX_ATTEMPTS = LOCK_BACKOFF.tries
MAX_HISTORY = 1_000
MAX_EVENTS = 500
SWEEP_BATCH = 500
_PG_RETRYABLE = ("40001", "40P01")  # serialization failure, deadlock detected
SECRET_FIELDS = ("spend_token", "api_key")   # shown once: never stored with an idempotent result
_AGENT_BY_KEY = sql.Sql("SELECT agent_id FROM agents WHERE api_key_hash = :h")



class Ledger(HoldOperations, KeyOperations, MilestoneOperations):
    """The ledger on one database: SQLite file (embedded default) or PostgreSQL.

    Identities: an agent id, or a budgeted key's "@key_..." (see `hf_escrow.ledger.keys`),
    which acts as its owner, within its mandate, on the escrows it opened and nowhere else.

    Example:
        >>> ledger = Ledger("sqlite:///:memory:")  # doctest: +SKIP
        >>> ledger.register("buyer")["api_key"].startswith("hfe_")  # doctest: +SKIP
        True
    """

    def __init__(self, url: str | None = None, *, home: Path | None = None, config: LedgerConfig | None = None,
                 clock: Callable[[], float] = time.time):
        self.url = url or default_database_url(home)
        self.engine = open_engine(self.url)
        self.config = config or LedgerConfig.from_env()
        self.clock = clock
        # Holds, captures, voids and deducts of concurrent callers share transactions.
        self._writer = KeptConnection(self.engine)
        # Key lookups: one statement each, so on PostgreSQL no BEGIN/COMMIT round trips around it.
        self._reader = KeptConnection(self.engine.execution_options(
            **({"readonly": True} if self.engine.dialect.name == "sqlite" else {"isolation_level": "AUTOCOMMIT"})))
        self._group = GroupCommitter(self._settle)
        self._run(lambda conn, now: journal.ensure_system_accounts(conn))

    def close(self) -> None:
        self._writer.close()
        self._reader.close()
        self.engine.dispose()

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    # ---- transactions -------------------------------------------------------------

    def _run(self, fn: Callable[[Connection, int], Any],
             begin: Callable[[], ContextManager[Connection]] | None = None) -> Any:
        """Run `fn` in one write transaction, retrying lock conflicts a bounded number of times.

        `begin` opens the transaction (default: a pooled connection's)."""
        begin = begin or self.engine.begin
        for attempt in range(MAX_ATTEMPTS):
            try:
                with begin() as conn:
                    return fn(conn, self.now_ms())
            except exc.IntegrityError:
                # A concurrent twin committed first (same idempotency key, same agent id):
                # the retry sees its row and answers from it.
                if attempt == MAX_ATTEMPTS - 1:
                    raise
            except exc.OperationalError as error:
                if not _retryable(error) or attempt == MAX_ATTEMPTS - 1:
                    raise
                time.sleep(LOCK_BACKOFF.delay_s(attempt))
        raise AssertionError("unreachable")

    def _read(self, fn: Callable[[Connection, int], Any]) -> Any:
        with self.engine.connect().execution_options(readonly=True) as conn, conn.begin():
            return fn(conn, self.now_ms())

    def _mutate(self, agent_id: str, op: str, request: dict, key: str | None,
                fn: Callable[[Connection, int], dict]) -> dict:
        key = idempotency.check_key(key)
        digest = idempotency.request_hash(op, request) if key is not None else None  # hashed only to be kept

        def transaction(conn: Connection, now_ms: int) -> dict:
            if key is not None:
                stored = idempotency.lookup(conn, agent_id, key, digest)
                if stored is not None:
                    return stored
            result = fn(conn, now_ms)
            if key is not None:
                idempotency.store(conn, agent_id, key, digest, _without_secrets(result), now_ms)
            return result

        try:
            return self._run(transaction)
        except rules.Expired as expired:
            raise self._expired_now(expired) from None
        except (StateConflict, InsufficientFunds):
            # Under READ COMMITTED a concurrent twin with this key may have committed while
            # this one waited on the escrow row lock: its stored result is the answer.
            stored = key and self._read(lambda conn, now: idempotency.lookup(conn, agent_id, key, digest))
            if stored:
                return stored
            raise

    # ---- agents -------------------------------------------------------------------

    def register(self, agent_id: str, referral_code: str | None = None, *, owner: str | None = None) -> dict:
        """Create an agent with its account; returns its API key, shown only this once.

        `owner`: the registered agent on whose behalf (with whose key) it is created; the
        owner may claim the faucet for it (an orchestrator for its workers).
        """
        if not isinstance(agent_id, str) or not AGENT_ID.fullmatch(agent_id):
            raise ValidationError("agent_id must be 1-64 characters of letters, digits, '_', '-' or '.', "
                                  f"starting with a letter or digit; got {agent_id!r}")
        if WALLET.fullmatch(agent_id.lower()):
            raise ValidationError(f"agent_id {agent_id!r} looks like a wallet address; pick a name")
        api_key = new_api_key()

        def fn(conn: Connection, now_ms: int) -> dict:
            if conn.scalar(select(agents.c.agent_id).where(agents.c.agent_id == agent_id)):
                raise StateConflict(f"agent {agent_id!r} is already registered; pick another agent_id")
            referrer = self._agent_by_code(conn, referral_code) if referral_code else None
            if owner is not None:
                self._agent(conn, owner)
            row = {"agent_id": agent_id, "api_key_hash": hash_key(api_key), "owner": owner,
                   "wallet": "0x" + hashlib.sha256(f"{agent_id}:{secrets.token_hex(16)}".encode()).hexdigest()[:40],
                   "referral_code": "ref_" + secrets.token_hex(6), "referred_by": referrer,
                   "created_at_ms": now_ms}
            conn.execute(insert(agents).values(**row))
            journal.open_account(conn, agent_account(agent_id), "agent")
            return {"agent_id": agent_id, "api_key": api_key, "wallet": row["wallet"],
                    "referral_code": row["referral_code"], "referred_by": referrer, "owner": owner}

        return self._run(fn)

    def owner_of(self, agent_id: str) -> str | None:
        """The agent that registered `agent_id` with its own key, if any (NotFound-free: None)."""
        return self._read(lambda conn, now: conn.scalar(select(agents.c.owner).where(agents.c.agent_id == agent_id))
                          if rules.is_key_text(agent_id, 64) else None)

    def authenticate(self, api_key: str | None) -> str:
        """The agent id that owns `api_key`, or the identity ("@key_...") of a budgeted key."""
        if not api_key or not isinstance(api_key, str):
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' (register to get one)")
        # Read afresh on every call (one indexed statement on a kept connection, no cache):
        # a key rotated or revoked by any process stops at once.
        with self._reader.begin() as conn:
            found = sql.first(sql.execute(conn, _AGENT_BY_KEY, {"h": hash_key(api_key)}))
        agent_id = found[0] if found else None
        if agent_id is None:
            agent_id = self.authenticate_key(api_key)
        if agent_id is None:
            raise Unauthorized("unknown API key; check HF_ESCROW_API_KEY or register a new agent")
        return agent_id

    def me(self, agent_id: str) -> dict:
        def fn(conn: Connection, now_ms: int) -> dict:
            agent = self._agent(conn, agent_id)
            open_count = conn.scalar(select(func.count()).select_from(escrows).where(
                (escrows.c.buyer == agent_id) | (escrows.c.seller == agent_id), escrows.c.status.in_(OPEN_STATUSES)))
            return {"agent_id": agent_id, "wallet": agent.wallet, "referral_code": agent.referral_code,
                    "referred_by": agent.referred_by,
                    "balance_micro": journal.balance_micro(conn, agent_account(agent_id)),
                    "escrows_open": int(open_count)}
        return self._read(fn)

    def claim_faucet(self, agent_id: str, idempotency_key: str | None = None) -> dict:
        """Credit free test USDC from the mint, at most once per faucet interval."""
        if not self.config.faucet_enabled:
            raise Forbidden("the faucet is switched off on this ledger; fund the agent with a deposit")

        def fn(conn: Connection, now_ms: int) -> dict:
            self._agent(conn, agent_id)
            since = now_ms - self.config.faucet_interval_s * 1000
            last = conn.scalar(select(func.max(transactions.c.at_ms)).where(
                transactions.c.agent_id == agent_id, transactions.c.kind == "faucet", transactions.c.at_ms > since))
            if last is not None:
                # Rounded up: waiting exactly this long is always enough.
                wait_s = -(-(last + self.config.faucet_interval_s * 1000 - now_ms) // 1000)
                raise RateLimited(f"agent {agent_id!r} already claimed the faucet; try again in {wait_s} s",
                                  details={"retry_after_s": wait_s})
            return self._credit(conn, agent_id, self.config.faucet_amount_micro, "faucet", now_ms)

        return self._mutate(agent_id, "claim_faucet", {}, idempotency_key, fn)

    def deposit(self, agent_id: str, amount: Any, idempotency_key: str | None = None) -> dict:
        """Credit an agent from the mint (an operator's top-up; not exposed to agents)."""
        amount_micro = parse_usdc(amount)
        return self._mutate(agent_id, "deposit", {"amount_micro": amount_micro}, idempotency_key,
                            lambda conn, now_ms: self._credit(conn, agent_id, amount_micro, "deposit", now_ms))

    def _expired_now(self, expired: rules.Expired) -> StateConflict:
        """Settle what a refused operation found past its TTL (in its own transaction)."""
        if expired.hold_id is not None:
            self.expire_hold(expired.hold_id)
        else:
            self.expire(expired.escrow_id)
        return rules.expired_error(expired)

    def _credit(self, conn: Connection, agent_id: str, amount_micro: int, kind: str, now_ms: int) -> dict:
        self._agent(conn, agent_id)
        journal.post(conn, kind, [Leg(journal.MINT, "mint", -amount_micro),
                                  Leg(agent_account(agent_id), kind, amount_micro)],
                     at_ms=now_ms, agent_id=agent_id)
        return {"agent_id": agent_id, "amount_micro": amount_micro,
                "balance_micro": journal.balance_micro(conn, agent_account(agent_id))}

    # ---- escrow lifecycle ---------------------------------------------------------

    def create_escrow(self, buyer: str, seller: str, amount: Any, *, ttl_seconds: Any = 3600,
                      description: str | None = None, meta: dict | None = None,
                      release_condition: dict | None = None, bonus_conditions: dict | None = None,
                      referral_code: str | None = None, pricing: Any = None,
                      idempotency_key: str | None = None) -> dict:
        """Lock `amount` from the buyer's balance in a new escrow for `seller`.

        `buyer` may be a budgeted key's identity: then its owner's balance pays and its
        owner is the buyer, within the key's mandate (`hf_escrow.ledger.keys`).
        """
        amount_micro = parse_usdc(amount)
        ttl_ms = rules.check_ttl(ttl_seconds)
        condition = rules.check_release_condition(release_condition)
        if rules.is_milestones(condition):
            rules.check_milestone_amounts(condition, amount_micro)
        bonus = rules.check_bonus_conditions(bonus_conditions)
        if isinstance(pricing, (str, Path)):
            # A price sheet file is read by the caller: a ledger (behind a server) reads no paths it is sent.
            raise ValidationError("pricing must be a price sheet (a mapping or Pricing), not a file path")
        price_sheet = Pricing.coerce(pricing)
        request = {"seller": seller, "amount_micro": amount_micro, "ttl_ms": ttl_ms,
                   "description": rules.check_text(description, "description"), "meta": _check_meta(meta),
                   "release_condition": condition, "bonus_conditions": bonus, "referral_code": referral_code,
                   "pricing": price_sheet.to_dict() if price_sheet else None}

        def fn(conn: Connection, now_ms: int) -> dict:
            # A budgeted key locks its owner's money, within its mandate: the owner is the buyer.
            key = self._active_key(conn, buyer, now_ms) if is_key_identity(buyer) else None
            buyer_id = key.owner if key is not None else self._agent(conn, buyer).agent_id
            seller_id = self._resolve(conn, seller, "seller")
            if seller_id == buyer_id:
                raise ValidationError("the seller must be another agent than the buyer")
            if key is not None:
                self._check_mandate(key, seller_id, amount_micro)
            verifier = self._verifier(conn, condition, buyer_id, seller_id)
            referrer = self._referrer(conn, referral_code, buyer_id, seller_id)
            escrow_id = "esc_" + secrets.token_hex(12)
            model = (request["meta"] or {}).get("model")
            conn.execute(insert(escrows).values(
                escrow_id=escrow_id, buyer=buyer_id, seller=seller_id, verifier=verifier, referrer=referrer,
                status="active", amount_micro=amount_micro, paid_micro=0, bonus_micro=0, fees_micro=0,
                referral_micro=0, refunded_micro=0, tokens_in=0, tokens_out=0,
                model=model if isinstance(model, str) else None, description=request["description"],
                meta=request["meta"], release_condition=condition, bonus_conditions=bonus,
                pricing=request["pricing"], created_at_ms=now_ms, expires_at_ms=now_ms + ttl_ms,
                key_id=key.key_id if key is not None else None))
            journal.open_account(conn, escrow_account(escrow_id), "escrow")
            try:
                journal.post(conn, "lock", [Leg(agent_account(buyer_id), "lock", -amount_micro),
                                            Leg(escrow_account(escrow_id), "lock", amount_micro)],
                             at_ms=now_ms, escrow_id=escrow_id, agent_id=buyer_id)
            except InsufficientFunds:
                have = journal.balance_micro(conn, agent_account(buyer_id))
                raise InsufficientFunds(
                    f"balance {format_usdc(have)} USDC cannot lock {format_usdc(amount_micro)} USDC; "
                    "claim the faucet or deposit first", details={"balance_micro": have}) from None
            if key is not None:
                # After the owner's balance, as refunds lock them: one order, no deadlock.
                self._spend_budget(conn, key, amount_micro, now_ms)
            self._event(conn, escrow_id, "created", buyer, now_ms, amount_micro=amount_micro,
                        rounded_from=_rounded(amount))
            return {**self._escrow(conn, escrow_id), "spend_token": self._new_spend_token(conn, escrow_id, now_ms)}

        return self._mutate(buyer, "create_escrow", request, idempotency_key, fn)

    def deduct(self, agent_id: str, escrow_id: str, amount: Any, *, reason: str | None = None,
               usage: dict | None = None, idempotency_key: str | None = None) -> dict:
        """The seller takes `amount` out of the remainder for work delivered; fee applies."""
        return self._settle_one(self._deduct_operation(agent_id, escrow_id, amount, reason, usage, idempotency_key))

    def deduct_operation(self, agent_id: str, escrow_id: str, amount: Any, *, reason: str | None = None,
                         usage: dict | None = None, idempotency_key: str | None = None) -> Operation:
        """`deduct`'s arguments checked into an operation, for `settle_async`."""
        return self._deduct_operation(agent_id, escrow_id, amount, reason, usage, idempotency_key)

    def deduct_many(self, agent_id: str, items: Any, *, idempotency_key: str | None = None) -> dict:
        """Many deducts in one database transaction; a refused item moves nothing and is reported alone.

        `items`: dicts ``{"escrow_id", "amount", "reason", "usage", "idempotency_key"}`` or
        tuples ``(escrow_id, amount)``; at most 1,000. The batch is idempotent under its
        key, each item under its own (the same key a single deduct would use).
        """
        if not isinstance(items, (list, tuple)) or not 1 <= len(items) <= MAX_BATCH_ITEMS:
            raise ValidationError(f"deduct_many takes a list of 1 to {MAX_BATCH_ITEMS} deducts")
        operations = []
        for index, item in enumerate(items):
            if isinstance(item, (list, tuple)) and len(item) == 2:
                item = {"escrow_id": item[0], "amount": item[1]}
            if not isinstance(item, dict):
                raise ValidationError(f"deduct {index}: give {{escrow_id, amount}} or (escrow_id, amount)")
            try:
                operations.append(self._deduct_operation(agent_id, item.get("escrow_id"), item.get("amount"),
                                                         item.get("reason"), item.get("usage"),
                                                         item.get("idempotency_key")))
            except ValidationError as error:
                raise type(error)(f"deduct {index}: {error.message}") from None
        return self._settle_many(agent_id, "deduct_many", operations, idempotency_key)

    def _deduct_operation(self, agent_id: str, escrow_id: Any, amount: Any, reason: Any, usage: Any,
                          key: str | None) -> Operation:
        amount_micro = parse_usdc(amount)
        tokens_in, tokens_out = rules.usage_tokens(usage)
        request = {"escrow_id": escrow_id, "amount_micro": amount_micro,
                   "reason": rules.check_text(reason, "reason"), "usage": [tokens_in, tokens_out]}
        return self._operation("deduct", agent_id, request, key, escrow_id, rounded_from=_rounded(amount))

    def release(self, agent_id: str, escrow_id: str, amount: Any = None, *, refund_remainder: bool = True,
                usage: dict | None = None, price_per_token: Any = None, quality_score: Any = None,
                throughput_tps: Any = None, meta: dict | None = None, hold_id: str | None = None,
                idempotency_key: str | None = None) -> dict:
        """The buyer pays the seller (an amount, or usage x price, plus earned bonuses).

        Without `amount` or `usage`, the whole remainder is paid. A usage-priced amount is
        capped at the remainder; an explicit amount above it is refused.

        `hold_id`: the buyer's own open hold on this escrow (the call's reservation), freed
        as a void frees it in the same transaction, just before the payment: what it
        reserved pays this release, and no other caller can take it in between.
        """
        if not isinstance(refund_remainder, bool):
            raise ValidationError("refund_remainder must be true or false")
        check_hold_id(hold_id, optional=True)
        amount_micro = None if amount is None else parse_usdc(amount, allow_zero=True)
        tokens_in, tokens_out = rules.usage_tokens(usage)
        price = None if price_per_token is None else to_decimal(price_per_token, what="price_per_token")
        quality = None if quality_score is None else rules.check_score(quality_score, "quality_score")
        tps = None if throughput_tps is None else rules.check_score(throughput_tps, "throughput_tps")
        request = {"escrow_id": escrow_id, "amount_micro": amount_micro, "refund_remainder": refund_remainder,
                   "usage": None if usage is None else [tokens_in, tokens_out],
                   "price_per_token": None if price is None else str(price), "quality_score": quality,
                   "throughput_tps": tps, "meta": _check_meta(meta)}
        if hold_id is not None:
            request["hold_id"] = hold_id  # absent otherwise: keys stored before it answer as they did

        def fn(conn: Connection, now_ms: int) -> dict:
            row = self._locked(conn, escrow_id, agent_id, now_ms, role="buyer", states=OPEN_STATUSES)
            freed_hold = None
            if hold_id is not None:
                row, freed_hold = self._void_own_hold(conn, row, agent_id, hold_id, now_ms)
            remaining = int(row.remaining_micro)
            base = self._release_base(row, remaining, amount_micro, usage, tokens_in, tokens_out, price)
            bonus = capped(earned_bonus(
                base, row.bonus_conditions, throughput_tps=tps, quality_score=quality,
                streak=self._streak(conn, row.seller, now_ms),
                quality_pct=self.config.quality_bonus_pct, streak_pct=self.config.streak_bonus_pct),
                remaining - base)
            split = self._payout(conn, row, base + bonus.total_micro, bonus.total_micro, "release", now_ms)
            self._add_tokens(conn, escrow_id, tokens_in, tokens_out)
            refunded = self._close(conn, row, "released", now_ms) if refund_remainder else 0
            amounts = dict(base_micro=base, bonus_micro=bonus.total_micro,
                           bonus_parts={"throughput_micro": bonus.throughput_micro,
                                        "quality_micro": bonus.quality_micro, "streak_micro": bonus.streak_micro},
                           refunded_micro=refunded, rounded_from=_rounded(amount), **split_data(split))
            self._event(conn, escrow_id, "released", agent_id, now_ms, meta=request["meta"],
                        tokens_in=tokens_in, tokens_out=tokens_out, hold_id=hold_id, **amounts)
            if freed_hold is not None:
                amounts["hold"] = freed_hold
            return receipt_dict("release", self._escrow(conn, escrow_id), **amounts)

        return self._mutate(agent_id, "release", request, idempotency_key, fn)

    def cancel(self, agent_id: str, escrow_id: str, *, reason: str | None = None,
               idempotency_key: str | None = None) -> dict:
        """Buyer or seller: refund the whole remainder to the buyer and close the escrow."""
        request = {"escrow_id": escrow_id, "reason": rules.check_text(reason, "reason")}

        def fn(conn: Connection, now_ms: int) -> dict:
            # Not while a result awaits its verifier: the buyer would keep the seller's work
            # and its money; the verifier's verdict or the TTL decides.
            row = self._locked(conn, escrow_id, agent_id, now_ms, role="party", states=("active",))
            refunded = self._close(conn, row, "cancelled", now_ms)
            self._event(conn, escrow_id, "cancelled", agent_id, now_ms, reason=request["reason"],
                        refunded_micro=refunded)
            return receipt_dict("cancel", self._escrow(conn, escrow_id), refunded_micro=refunded,
                                **split_data(None))

        return self._mutate(agent_id, "cancel", request, idempotency_key, fn)

    def submit_result(self, agent_id: str, escrow_id: str, *, metric: str, score: Any,
                      artifact: dict | None = None, milestone: int | None = None,
                      idempotency_key: str | None = None) -> dict:
        """The seller reports a benchmark score; with verifier "self" it settles at once.

        On a milestone escrow the result is for `milestone` (1 = the first; default: the next
        one due) and must carry its artifact; it then awaits the verifier.
        """
        value = rules.check_score(score, "score")
        if not rules.is_key_text(metric, 64):
            raise ValidationError("metric must name the benchmark's metric, e.g. \"accuracy\"")
        request = {"escrow_id": escrow_id, "metric": metric, "score": value, "artifact": _check_meta(artifact),
                   "milestone": check_number(milestone)}

        def fn(conn: Connection, now_ms: int) -> dict:
            row = self._locked(conn, escrow_id, agent_id, now_ms, role="seller", states=("active",))
            condition = row.release_condition
            if condition is None:
                raise StateConflict(f"escrow {escrow_id} has no benchmark release_condition; the buyer releases it")
            if metric != condition["metric"]:
                raise ValidationError(f"this escrow is gated on {condition['metric']!r}, not {metric!r}")
            if rules.is_milestones(condition):
                return self._submit_milestone(conn, row, agent_id, metric, value, request["artifact"],
                                              request["milestone"], now_ms)
            if request["milestone"] is not None:
                raise ValidationError(f"escrow {escrow_id} has a single threshold, no milestones; leave milestone out")
            result = {"metric": metric, "score": value, "artifact": request["artifact"], "submitted_at_ms": now_ms}
            conn.execute(update(escrows).where(escrows.c.escrow_id == escrow_id).values(result=result))
            self._event(conn, escrow_id, "result_submitted", agent_id, now_ms, metric=metric, score=value,
                        artifact=request["artifact"])
            if row.verifier is not None:
                conn.execute(update(escrows).where(escrows.c.escrow_id == escrow_id)
                             .values(status="awaiting_verification"))
                return receipt_dict("submit_result", self._escrow(conn, escrow_id), **split_data(None))
            return self._judge(conn, row, value, agent_id, now_ms, "submit_result")

        return self._mutate(agent_id, "submit_result", request, idempotency_key, fn)

    def verify(self, agent_id: str, escrow_id: str, *, score: Any, idempotency_key: str | None = None) -> dict:
        """The named verifier's own score: pass releases to the seller, fail reopens until TTL."""
        value = rules.check_score(score, "score")
        request = {"escrow_id": escrow_id, "score": value}

        def fn(conn: Connection, now_ms: int) -> dict:
            row = self._locked(conn, escrow_id, agent_id, now_ms, role="verifier", states=("awaiting_verification",))
            judge = self._judge_milestone if rules.is_milestones(row.release_condition) else self._judge
            return judge(conn, row, value, agent_id, now_ms, "verify")

        return self._mutate(agent_id, "verify", request, idempotency_key, fn)

    def expire(self, escrow_id: str) -> bool:
        """Refund an escrow past its TTL; True if this call did it (exactly one caller does)."""
        def fn(conn: Connection, now_ms: int) -> bool:
            row = conn.execute(select(escrows).where(escrows.c.escrow_id == escrow_id).with_for_update()).first()
            if row is None or row.status not in OPEN_STATUSES or row.expires_at_ms > now_ms:
                return False
            refunded = self._close(conn, row, "expired", now_ms)
            self._event(conn, escrow_id, "expired", None, now_ms, refunded_micro=refunded)
            return True
        return self._run(fn)

    def expire_due(self, limit: int = SWEEP_BATCH) -> int:
        """The sweeper's step: expire up to `limit` escrows past their TTL; returns how many."""
        due = self._read(lambda conn, now_ms: list(conn.scalars(
            select(escrows.c.escrow_id).where(escrows.c.status.in_(OPEN_STATUSES), escrows.c.expires_at_ms <= now_ms)
            .order_by(escrows.c.expires_at_ms).limit(limit))))
        expired = sum(1 for escrow_id in due if self.expire(escrow_id))
        expired += self.expire_due_holds(limit)
        self._run(lambda conn, now_ms: idempotency.purge(conn, now_ms))
        return expired

    def start_sweeper(self, interval_s: float = 1.0) -> Callable[[], None]:
        """Expire due escrows in a daemon thread every `interval_s`; returns a stop function."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(interval_s):
                self.expire_due()

        thread = threading.Thread(target=loop, name="hf-escrow-sweeper", daemon=True)
        thread.start()

        def stopper() -> None:
            stop.set()
            thread.join(timeout=interval_s + 30)
        return stopper

    # ---- reads --------------------------------------------------------------------

    def get(self, agent_id: str, escrow_id: str, *, events_limit: int = MAX_EVENTS) -> dict:
        """An escrow with its newest events; only its parties (and verifier) may read it."""
        row = self._read(lambda conn, now_ms: self._visible(conn, escrow_id, agent_id))
        if row.status in OPEN_STATUSES and row.expires_at_ms <= self.now_ms():
            self.expire(escrow_id)
        return self._read(lambda conn, now_ms: self._escrow(conn, escrow_id, events_limit=events_limit))

    def history(self, agent_id: str, *, status: str | None = None, model: str | None = None,
                role: str | None = None, since_ms: int | None = None, until_ms: int | None = None,
                limit: int = 100) -> list[dict]:
        """The agent's escrows (as buyer or seller), newest first, filtered."""
        if not isinstance(limit, int) or not 1 <= limit <= MAX_HISTORY:
            raise ValidationError(f"limit must be between 1 and {MAX_HISTORY}")
        if status is not None and status not in ("active", "awaiting_verification", "released", "cancelled",
                                                 "expired"):
            raise ValidationError(f"unknown status {status!r}")
        if role not in (None, "buyer", "seller"):
            raise ValidationError("role must be buyer or seller")
        model = rules.check_text(model, "model", MAX_MODEL_CHARS)
        since_ms, until_ms = rules.check_time_ms(since_ms, "since_ms"), rules.check_time_ms(until_ms, "until_ms")

        def fn(conn: Connection, now_ms: int) -> list[dict]:
            if is_key_identity(agent_id):
                # A budgeted key sees the escrows it opened, as their buyer, and no others.
                key_id = self._active_key(conn, agent_id, now_ms).key_id
                party = {"buyer": escrows.c.key_id == key_id, "seller": false()}
            else:
                self._agent(conn, agent_id)
                party = {"buyer": escrows.c.buyer == agent_id, "seller": escrows.c.seller == agent_id}
            query = select(escrows.c.escrow_id).where(
                party[role] if role else (party["buyer"] | party["seller"]))
            for column, value, cmp in ((escrows.c.status, status, "eq"), (escrows.c.model, model, "eq"),
                                       (escrows.c.created_at_ms, since_ms, "ge"),
                                       (escrows.c.created_at_ms, until_ms, "lt")):
                if value is not None:
                    query = query.where(column == value if cmp == "eq" else column >= value if cmp == "ge"
                                        else column < value)
            ids = conn.scalars(query.order_by(escrows.c.created_at_ms.desc(), escrows.c.escrow_id.desc())
                               .limit(limit))
            return [self._escrow(conn, escrow_id) for escrow_id in ids]

        return self._read(fn)

    def analytics(self, agent_id: str) -> dict:
        """Spend (as buyer) and earnings (as seller) per model, with tokens and counts."""
        def rollup(conn: Connection, column) -> list[dict]:
            rows = conn.execute(select(
                escrows.c.model, func.count().label("escrows"), func.sum(escrows.c.paid_micro).label("paid"),
                func.sum(escrows.c.fees_micro).label("fees"), func.sum(escrows.c.refunded_micro).label("refunded"),
                func.sum(escrows.c.tokens_in).label("tin"), func.sum(escrows.c.tokens_out).label("tout"),
            ).where(column == agent_id).group_by(escrows.c.model).order_by(escrows.c.model))
            return [{"model": r.model, "escrows": int(r.escrows), "paid_micro": int(r.paid or 0),
                     "fees_micro": int(r.fees or 0), "refunded_micro": int(r.refunded or 0),
                     "tokens_in": int(r.tin or 0), "tokens_out": int(r.tout or 0)} for r in rows]

        def fn(conn: Connection, now_ms: int) -> dict:
            self._agent(conn, agent_id)
            referral = conn.scalar(select(func.coalesce(func.sum(journal.entries.c.amount_micro), 0)).where(
                journal.entries.c.account_id == agent_account(agent_id), journal.entries.c.role == "referral"))
            return {"agent_id": agent_id, "spend": rollup(conn, escrows.c.buyer),
                    "earnings": rollup(conn, escrows.c.seller), "referral_earned_micro": int(referral)}

        return self._read(fn)

    # ---- helpers (inside a transaction) -------------------------------------------

    def _agent(self, conn: Connection, agent_id: str) -> Any:
        if is_key_identity(agent_id):
            raise OutsideMandate(f"a budgeted key ({agent_id[1:]}) may only open escrows within its mandate and "
                                 "read, settle, hold on and cancel the escrows it opened; its owner does the rest")
        row = None
        if rules.is_key_text(agent_id, 64):
            row = conn.execute(select(agents).where(agents.c.agent_id == agent_id)).first()
        if row is None:
            raise Unauthorized(f"agent {agent_id!r} is not registered; register it first")
        return row

    def _resolve(self, conn: Connection, name: Any, what: str) -> str:
        if not isinstance(name, str) or not name:
            raise ValidationError(f"{what} must be an agent id or wallet address")
        agent_id = None
        if rules.is_key_text(name, 64):
            column = agents.c.wallet if WALLET.fullmatch(name) else agents.c.agent_id
            agent_id = conn.scalar(select(agents.c.agent_id).where(column == name))
        if agent_id is None:
            raise NotFound(f"{what} {name!r} is not a registered agent or wallet; it must register first")
        return agent_id

    def _agent_by_code(self, conn: Connection, code: Any) -> str:
        if not isinstance(code, str):
            raise ValidationError("referral_code must be text such as \"ref_0123abcd\"")
        agent_id = None
        if rules.is_key_text(code, 32):
            agent_id = conn.scalar(select(agents.c.agent_id).where(agents.c.referral_code == code))
        if agent_id is None:
            raise ValidationError(f"unknown referral code {code!r}")
        return agent_id

    def _verifier(self, conn: Connection, condition: dict | None, buyer: str, seller: str) -> str | None:
        if condition is None or condition["verifier"] == "self":
            return None
        verifier = buyer if condition["verifier"] == "buyer" else self._resolve(conn, condition["verifier"], "verifier")
        if verifier == seller:
            raise ValidationError("the seller cannot verify its own result; name the buyer or another agent "
                                  "(or \"self\" to release on the submitted score)")
        return verifier

    def _referrer(self, conn: Connection, code: str | None, buyer: str, seller: str) -> str | None:
        if code is None:
            return conn.scalar(select(agents.c.referred_by).where(agents.c.agent_id == seller))
        referrer = self._agent_by_code(conn, code)
        if referrer in (buyer, seller):
            raise ValidationError("a party cannot refer its own escrow; leave referral_code out")
        return referrer

    def _visible(self, conn: Connection, escrow_id: Any, agent_id: str, *, lock: bool = False) -> Any:
        """The escrow row (with `remaining_micro`) if `agent_id` is a party to it."""
        row = None
        if is_key_identity(agent_id):
            self._active_key(conn, agent_id, self.now_ms())
        if rules.is_key_text(escrow_id, 40):
            row = conn.execute(ESCROW_FOR_UPDATE if lock else ESCROW, {"eid": escrow_id}).first()
        if row is None or self._acting(row, agent_id) not in (row.buyer, row.seller, row.verifier):
            if not is_key_identity(agent_id):
                self._agent(conn, agent_id)
            # A non-party learns nothing, not even that the escrow exists.
            raise NotFound(f"escrow {escrow_id!r} not found among your escrows")
        return row

    @staticmethod
    def _acting(row: Any, agent_id: str) -> str:
        """Whom `agent_id` acts as on this escrow: a budgeted key, on an escrow it opened, as
        its owner (the buyer); anyone else as itself."""
        if row.key_id is not None and agent_id == KEY_PREFIX + row.key_id:
            return row.buyer
        return agent_id

    def _locked(self, conn: Connection, escrow_id: str, agent_id: str, now_ms: int, *, role: str,
                states: tuple[str, ...]) -> Any:
        """The escrow row, locked for update, after role, state and TTL checks."""
        row = self._visible(conn, escrow_id, agent_id, lock=True)
        allowed = {"buyer": (row.buyer,), "seller": (row.seller,), "verifier": (row.verifier,),
                   "party": (row.buyer, row.seller)}[role]
        if self._acting(row, agent_id) not in allowed:
            raise Forbidden(f"only the {'buyer or seller' if role == 'party' else role} of escrow {escrow_id} "
                            f"may do this; you are {agent_id!r}")
        rules.check_state(row, now_ms, states)
        return row

    def _release_base(self, row: Any, remaining: int, amount_micro: int | None, usage: dict | None,
                      tokens_in: int, tokens_out: int, price: Decimal | None) -> int:
        if amount_micro is not None:
            if amount_micro > remaining:
                raise InsufficientFunds(f"escrow {row.escrow_id} has {format_usdc(remaining)} USDC left, cannot "
                                        f"release {format_usdc(amount_micro)}", details={"remaining_micro": remaining})
            return amount_micro
        if usage is None:
            return remaining
        if price is not None:
            sheet = Pricing(per_token=price)
        elif row.pricing:
            sheet = Pricing.coerce(row.pricing)
        else:
            raise ValidationError("usage needs a price: give price_per_token, or create the escrow with pricing")
        return min(sheet.tokens_micro(tokens_in, tokens_out), remaining)

    def _payout(self, conn: Connection, row: Any, gross_micro: int, bonus_micro: int, kind: str, now_ms: int):
        """Pay `gross_micro` from the escrow: seller net, platform fee, referral share."""
        # Fees exact over the escrow's life: splitting a payment into many small ones pays the same fee.
        split = split_over_life(gross_micro, paid_before_micro=int(row.paid_micro),
                                fees_before_micro=int(row.fees_micro), referral_before_micro=int(row.referral_micro),
                                fee_bps=self.config.fee_bps, referral_bps=self.config.referral_bps,
                                has_referrer=row.referrer is not None)
        if gross_micro == 0:
            return split
        legs = [Leg(escrow_account(row.escrow_id), "payout", -gross_micro),
                Leg(agent_account(row.seller), "seller", split.net_micro),
                Leg(journal.PLATFORM, "fee", split.platform_micro)]
        if row.referrer is not None:
            legs.append(Leg(agent_account(row.referrer), "referral", split.referral_micro))
        journal.post(conn, kind, legs, at_ms=now_ms, escrow_id=row.escrow_id, agent_id=row.seller)
        conn.execute(PAYOUT, {"eid": row.escrow_id, "gross": gross_micro, "bonus": bonus_micro,
                               "fee": split.fee_micro, "ref": split.referral_micro})
        return split

    def _close(self, conn: Connection, row: Any, status: str, now_ms: int) -> int:
        """Refund the spendable remainder to the buyer and close the escrow; returns the refund.

        Open holds stay open for work already delivered: each may still capture until
        min(its TTL, now + the hold grace); the sweeper frees and refunds the rest then.
        """
        remaining = self._remaining(conn, row.escrow_id)
        self._refund(conn, row, remaining, now_ms)
        conn.execute(update(escrows).where(escrows.c.escrow_id == row.escrow_id).values(
            status=status, closed_at_ms=now_ms))
        grace_end = now_ms + self.config.hold_grace_s * 1000
        conn.execute(update(holds).where(holds.c.escrow_id == row.escrow_id, holds.c.status == "open",
                                         holds.c.expires_at_ms > grace_end).values(expires_at_ms=grace_end))
        return remaining

    def _refund(self, conn: Connection, row: Any, amount_micro: int, now_ms: int) -> None:
        if amount_micro:
            journal.post(conn, "refund", [Leg(escrow_account(row.escrow_id), "refund", -amount_micro),
                                          Leg(agent_account(row.buyer), "refund", amount_micro)],
                         at_ms=now_ms, escrow_id=row.escrow_id, agent_id=row.buyer)
            conn.execute(update(escrows).where(escrows.c.escrow_id == row.escrow_id).values(
                refunded_micro=escrows.c.refunded_micro + amount_micro))
            if row.key_id is not None:
                self._count_refund(conn, row.key_id, amount_micro)

    def _remaining(self, conn: Connection, escrow_id: str) -> int:
        """The spendable remainder as it is now inside this transaction."""
        return int(conn.execute(ESCROW, {"eid": escrow_id}).first().remaining_micro)

    def _new_spend_token(self, conn: Connection, escrow_id: str, now_ms: int) -> str:
        token = new_spend_token()
        conn.execute(insert(spend_tokens).values(token_hash=hash_key(token), escrow_id=escrow_id,
                                                 created_at_ms=now_ms))
        return token

    def _judge(self, conn: Connection, row: Any, score: float, actor: str, now_ms: int, kind: str) -> dict:
        """Settle a benchmark escrow on `score`: pass pays the remainder, fail reopens it."""
        if not rules.benchmark_passes(row.release_condition, score):
            conn.execute(update(escrows).where(escrows.c.escrow_id == row.escrow_id).values(status="active"))
            self._event(conn, row.escrow_id, "benchmark_failed", actor, now_ms, score=score,
                        threshold=row.release_condition["threshold"])
            return receipt_dict(kind, self._escrow(conn, row.escrow_id), passed=False, score=score,
                                **split_data(None))
        remaining = self._remaining(conn, row.escrow_id)
        split = self._payout(conn, row, remaining, 0, "release", now_ms)
        self._close(conn, row, "released", now_ms)
        self._event(conn, row.escrow_id, "benchmark_passed", actor, now_ms, score=score, **split_data(split))
        return receipt_dict(kind, self._escrow(conn, row.escrow_id), passed=True, score=score,
                            base_micro=remaining, bonus_micro=0, refunded_micro=0, **split_data(split))

    def _streak(self, conn: Connection, seller: str, now_ms: int) -> bool:
        days = self.config.streak_days
        if days <= 0 or self.config.streak_bonus_pct <= 0:
            return False
        today = now_ms // rules.DAY_MS
        window_start = (today - days) * rules.DAY_MS
        # Two bounded reads on (seller, closed_at_ms): however many escrows a seller closes
        # a day, this costs at most `days` rows and one probe.
        recent = (escrows.c.seller == seller) & (escrows.c.closed_at_ms >= window_start)
        # Only the seller's own cancel breaks its streak: a buyer could reset it for free.
        own_cancel = (select(literal(1)).select_from(escrows.join(
            escrow_events, (escrow_events.c.escrow_id == escrows.c.escrow_id) & (escrow_events.c.kind == "cancelled")
            & (escrow_events.c.actor == seller))).where(recent, escrows.c.status == "cancelled").limit(1))
        if conn.scalar(own_cancel):
            return False
        day = escrows.c.closed_at_ms // rules.DAY_MS
        paid_days = set(conn.scalars(select(day).distinct().where(
            recent, escrows.c.closed_at_ms < today * rules.DAY_MS, escrows.c.status == "released").limit(days)))
        return rules.streak_holds(paid_days, today=today, days=days, cancelled=False)

    def _add_tokens(self, conn: Connection, escrow_id: str, tokens_in: int, tokens_out: int) -> None:
        if tokens_in or tokens_out:
            conn.execute(update(escrows).where(escrows.c.escrow_id == escrow_id).values(
                tokens_in=escrows.c.tokens_in + tokens_in, tokens_out=escrows.c.tokens_out + tokens_out))

    def _event(self, conn: Connection, escrow_id: str, kind: str, actor: str | None, now_ms: int, **data: Any) -> None:
        conn.execute(INSERT_EVENT, {"escrow_id": escrow_id, "kind": kind, "actor": actor, "at_ms": now_ms,
                                     "data": {key: value for key, value in data.items() if value is not None}})

    def _escrow(self, conn: Connection, escrow_id: str, *, events_limit: int | None = None) -> dict:
        row = conn.execute(ESCROW, {"eid": escrow_id}).first()
        events = None
        if events_limit is not None:
            rows = conn.execute(select(escrow_events).where(escrow_events.c.escrow_id == escrow_id)
                                .order_by(escrow_events.c.event_id.desc()).limit(events_limit)).all()
            events = [event_dict(r) for r in reversed(rows)]
        return escrow_dict(row, int(row.remaining_micro), events)

    def rotate_key(self, agent_id: str) -> str:
        """A new API key for `agent_id` (shown only this once); the old key stops at once."""
        api_key = new_api_key()

        def fn(conn: Connection, now_ms: int) -> str:
            self._agent(conn, agent_id)
            conn.execute(update(agents).where(agents.c.agent_id == agent_id).values(api_key_hash=hash_key(api_key)))
            return api_key

        return self._run(fn)


def _without_secrets(result: Any) -> Any:
    if isinstance(result, dict) and any(name in result for name in SECRET_FIELDS):
        return {k: v for k, v in result.items() if k not in SECRET_FIELDS}
    return result


hash_key = rules.hash_secret


def _retryable(error: exc.OperationalError) -> bool:
    code = getattr(error.orig, "sqlstate", None)
    return code in _PG_RETRYABLE or "database is locked" in str(error.orig)


def _rounded(amount: Any) -> str | None:
    """The amount as given, when it had more than six decimals (shown in the receipt)."""
    if amount is None or isinstance(amount, int):
        return None
    return str(amount) if was_rounded(amount) else None


def _check_meta(meta: Any) -> dict | None:
    if meta is None:
        return None
    if not isinstance(meta, dict):
        raise ValidationError("meta must be a JSON object")
    rules.check_json(meta, "meta")
    try:
        text = json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValidationError(f"meta must be plain JSON: {error}") from None
    if len(text) > rules.MAX_JSON_CHARS:
        raise ValidationError(f"meta is larger than {rules.MAX_JSON_CHARS} characters of JSON")
    if "\\u0000" in text:
        raise ValidationError("meta must not contain NUL characters")
    if isinstance(meta.get("model"), str):
        rules.check_text(meta["model"], "meta.model", MAX_MODEL_CHARS)
    return json.loads(text)


__all__ = ["Ledger", "hash_key"]
