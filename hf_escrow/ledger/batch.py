"""The settlement path: holds, captures, voids and deducts, many in one database transaction.

One `Batch` locks every escrow its operations touch (once, in escrow-id order), reads
their holds, spend tokens and idempotency records in one statement each, then decides
each operation in turn against that locked state held in memory: an operation that is
refused changes nothing, its neighbours go on. What the accepted ones did is written at
the end with one statement per table (`executemany`): one UPDATE per escrow and per
account however many operations touched it, so a batch costs time linear in its size.
Each payout is still its own balanced journal transaction, and the stored balances the
database returns are checked against the ones decided here before anything commits.

A single hold, capture or deduct is a batch of one; the group committer runs the
operations of many callers as one batch.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Connection

from .._exceptions import EscrowError, Forbidden, InsufficientFunds, NotFound, StateConflict
from ..credentials import MAX_TOKEN_CHARS, SPEND_TOKEN_PREFIX
from ..money import format_usdc, split_over_life
from . import idempotency, rules, sql
from .journal import MAX_ENTRIES_PER_TX, MINT, PLATFORM, agent_account, escrow_account
from .keys import is_key_identity
from .records import OPEN_STATUSES, LedgerCorrupted, escrow_dict, hold_dict, receipt_dict, split_data

ESCROW_JSON = ("meta", "release_condition", "bonus_conditions", "pricing", "result")
MAX_OPERATIONS = 1_000
HOLD_ID_CHARS = 40

_SELECT_ESCROWS = ("SELECT e.*, a.balance_micro AS balance_micro FROM escrows e "
                   "JOIN accounts a ON a.account_id = 'escrow:' || e.escrow_id WHERE ")
_APPLY = sql.Sql("UPDATE accounts SET balance_micro = balance_micro + :delta "
                 "WHERE account_id = :aid AND balance_micro + :delta >= 0 RETURNING balance_micro")
_ESCROW_AMOUNTS = sql.Sql(
    "UPDATE escrows SET paid_micro = :paid_micro, fees_micro = :fees_micro, referral_micro = :referral_micro, "
    "refunded_micro = :refunded_micro, held_micro = :held_micro, tokens_in = :tokens_in, tokens_out = :tokens_out "
    "WHERE escrow_id = :escrow_id")
_HOLD_STATE = sql.Sql("UPDATE holds SET captured_micro = :captured_micro, captures = :captures, status = :status, "
                      "closed_at_ms = :closed_at_ms WHERE hold_id = :hold_id")
_INSERT_HOLD = sql.Sql(
    "INSERT INTO holds (hold_id, escrow_id, holder, status, amount_micro, captured_micro, captures, created_at_ms, "
    "expires_at_ms) VALUES (:hold_id, :escrow_id, :holder, 'open', :amount_micro, 0, 0, :created_at_ms, "
    ":expires_at_ms)")
_INSERT_TX = sql.Sql("INSERT INTO transactions (tx_id, kind, escrow_id, agent_id, at_ms) "
                     "VALUES (:tx_id, :kind, :escrow_id, :agent_id, :at_ms)")
_INSERT_ENTRY = sql.Sql("INSERT INTO entries (tx_id, account_id, role, amount_micro) "
                        "VALUES (:tx_id, :account_id, :role, :amount_micro)")
_INSERT_EVENT = sql.Sql("INSERT INTO escrow_events (escrow_id, kind, actor, at_ms, data) "
                        "VALUES (:escrow_id, :kind, :actor, :at_ms, JSON(:data))")
_INSERT_KEY = sql.Sql("INSERT INTO idempotency_keys (agent_id, key, request_hash, response, created_at_ms) "
                      "VALUES (:agent_id, :key, :request_hash, JSON(:response), :created_at_ms)")
_NEXT_TX_SQLITE = sql.Sql("SELECT coalesce(max(tx_id), 0) FROM transactions")
_NEXT_TX_PG = sql.Sql("SELECT nextval(pg_get_serial_sequence('transactions', 'tx_id')) AS tx_id "
                      "FROM generate_series(1, :count)")


@dataclass
class Operation:
    """One hold, capture, void or deduct as a batch runs it; `result` or `error` says how it went."""

    kind: str                 # "hold" | "capture" | "void" | "deduct"
    agent_id: str
    request: dict             # as hashed for its idempotency key
    key: str | None
    digest: str | None  # the request's hash, for its idempotency key (None without one)
    target: str | None = None  # a hold's spend token or escrow id; an operation's hold or escrow id
    rounded_from: str | None = None
    result: dict | None = None
    error: Exception | None = None  # an EscrowError, or rules.Expired to settle after the commit


@dataclass
class _Tx:
    kind: str
    escrow_id: str
    agent_id: str
    legs: list  # (account_id, role, amount_micro)


class Batch:
    """One run of operations inside one database transaction (`Ledger._run` retries it whole)."""

    def __init__(self, ledger: Any, conn: Connection, now_ms: int):
        self.ledger, self.conn, self.now_ms = ledger, conn, now_ms
        self.config = ledger.config
        self.escrows: dict[str, SimpleNamespace] = {}
        self.holds: dict[str, SimpleNamespace] = {}
        self.tokens: dict[str, SimpleNamespace] = {}
        self.stored: dict[tuple[str, str], tuple[str, dict]] = {}
        self.new_holds: list[dict] = []
        self.txs: list[_Tx] = []
        self.events: list[dict] = []
        self.keys: list[dict] = []
        self.key_refunds: dict[str, int] = {}   # budgeted key -> what came back of its escrows
        self.dirty_escrows: set[str] = set()
        self.dirty_holds: set[str] = set()
        self.tx_ids: list[int] = []

    def run(self, operations: list[Operation]) -> list[Operation]:
        if not 1 <= len(operations) <= MAX_OPERATIONS:
            raise LedgerCorrupted(f"a batch runs 1 to {MAX_OPERATIONS} operations, not {len(operations)}")
        self._load(operations)
        for op in operations:
            op.result = op.error = None
            self._decide(op)
        self._write()
        return operations

    # ---- reading, once per batch ---------------------------------------------------

    def _load(self, operations: list[Operation]) -> None:
        hold_ids = sorted({op.target for op in operations if op.kind in ("capture", "void")
                           and rules.is_key_text(op.target, HOLD_ID_CHARS)})
        token_hashes = sorted({rules.hash_secret(op.target) for op in operations if op.kind == "hold"
                               and _is_token(op.target) and rules.is_key_text(op.target, MAX_TOKEN_CHARS)})
        escrow_ids = sorted({op.target for op in operations if op.kind in ("hold", "deduct")
                             and not _is_token(op.target) and rules.is_key_text(op.target, HOLD_ID_CHARS)})
        where = []
        if hold_ids:
            where.append(f"e.escrow_id IN (SELECT escrow_id FROM holds WHERE hold_id IN "
                         f"({sql.placeholders('h', len(hold_ids))}))")
        if token_hashes:
            where.append(f"e.escrow_id IN (SELECT escrow_id FROM spend_tokens WHERE token_hash IN "
                         f"({sql.placeholders('t', len(token_hashes))}))")
        if escrow_ids:
            where.append(f"e.escrow_id IN ({sql.placeholders('e', len(escrow_ids))})")
        queries: list[tuple] = []
        if where:
            # Every writer locks escrows first, and in escrow-id order here: no deadlocks.
            # The reads after it run once the locks are held (in order, even when pipelined):
            # every writer of a hold or spend token holds its escrow's lock.
            queries.append(("escrows", sql.cached(_SELECT_ESCROWS + " OR ".join(where) + " ORDER BY e.escrow_id",
                                                  " FOR UPDATE"),
                            {**sql.numbered("h", hold_ids), **sql.numbered("t", token_hashes),
                             **sql.numbered("e", escrow_ids)}, ESCROW_JSON))
        if hold_ids:
            queries.append(("holds", sql.cached(f"SELECT * FROM holds WHERE hold_id IN "
                                                f"({sql.placeholders('h', len(hold_ids))})"),
                            sql.numbered("h", hold_ids), ()))
        if token_hashes:
            queries.append(("tokens", sql.cached("SELECT token_hash, escrow_id, revoked_at_ms FROM spend_tokens "
                                                 f"WHERE token_hash IN ({sql.placeholders('t', len(token_hashes))})"),
                            sql.numbered("t", token_hashes), ()))
        keyed = sorted({(op.agent_id, op.key) for op in operations if op.key is not None})
        if keyed:
            # Looked up after the locks: a twin that committed while this waited is seen here.
            pairs = ", ".join(f"(:a{i}, :k{i})" for i in range(len(keyed)))
            queries.append(("keys", sql.cached("SELECT agent_id, key, request_hash, response FROM idempotency_keys "
                                               f"WHERE (agent_id, key) IN ({pairs})"),
                            {**sql.numbered("a", [a for a, _ in keyed]), **sql.numbered("k", [k for _, k in keyed])},
                            ("response",)))
        most_txs = sum(2 if op.kind in ("capture", "void") else 1 for op in operations if op.kind != "hold")
        if most_txs and self.conn.dialect.name == "postgresql":
            # Ids for every journal transaction this batch may post (a payout and a refund per
            # capture); the unused ones are gaps in the sequence, as rolled-back inserts leave.
            queries.append(("tx_ids", _NEXT_TX_PG, {"count": most_txs}, ()))
        found = dict(zip([name for name, *_ in queries],
                         sql.read_all(self.conn, [query for _, *query in queries])))
        for row in found.get("escrows", ()):
            self.escrows[row["escrow_id"]] = SimpleNamespace(**row)
        for row in found.get("holds", ()):
            self.holds[row["hold_id"]] = SimpleNamespace(**row)
        for row in found.get("tokens", ()):
            self.tokens[row["token_hash"]] = SimpleNamespace(**row)
        for row in found.get("keys", ()):
            self.stored[(row["agent_id"], row["key"])] = (row["request_hash"], row["response"])
        self.tx_ids = [row["tx_id"] for row in found.get("tx_ids", ())]

    # ---- deciding, one operation at a time ----------------------------------------

    def _decide(self, op: Operation) -> None:
        if is_key_identity(op.agent_id):
            try:
                self.ledger._active_key(self.conn, op.agent_id, self.now_ms)  # revoked or expired: stops at once
            except EscrowError as error:
                op.error = error
                return
        if op.key is not None:
            stored = self.stored.get((op.agent_id, op.key))
            if stored is not None:
                if stored[0] != op.digest:
                    op.error = idempotency.conflict(op.key)
                else:
                    op.result = stored[1]
                return
        try:
            if op.kind == "hold":
                op.result = self._hold(op)
            elif op.kind == "deduct":
                op.result = self._deduct(op)
            else:
                op.result = self._capture(op)
        except (EscrowError, rules.Expired) as error:
            op.error = error
            return
        if op.key is not None:
            self.stored[(op.agent_id, op.key)] = (op.digest, op.result)
            self.keys.append({"agent_id": op.agent_id, "key": op.key, "request_hash": op.digest,
                              "response": sql.json_text(op.result), "created_at_ms": self.now_ms})

    def _not_found(self, agent_id: str, message: str) -> NotFound:
        if not is_key_identity(agent_id):
            self.ledger._agent(self.conn, agent_id)  # an unknown agent hears Unauthorized first
        return NotFound(message)

    def _acting(self, row: SimpleNamespace, agent_id: str) -> str:
        return self.ledger._acting(row, agent_id)  # a budgeted key acts as its owner on its own escrows

    def _visible(self, escrow_id: Any, agent_id: str) -> SimpleNamespace:
        row = self.escrows.get(escrow_id) if isinstance(escrow_id, str) else None
        if row is None or self._acting(row, agent_id) not in (row.buyer, row.seller, row.verifier):
            # A non-party learns nothing, not even that the escrow exists.
            raise self._not_found(agent_id, f"escrow {escrow_id!r} not found among your escrows")
        return row

    def _locked(self, escrow_id: Any, agent_id: str, role: str) -> SimpleNamespace:
        row = self._visible(escrow_id, agent_id)
        allowed = (row.buyer, row.seller) if role == "party" else (row.seller,)
        if self._acting(row, agent_id) not in allowed:
            raise Forbidden(f"only the {'buyer or seller' if role == 'party' else role} of escrow {escrow_id} "
                            f"may do this; you are {agent_id!r}")
        rules.check_state(row, self.now_ms, ("active",))
        return row

    def _token_escrow(self, token: str, agent_id: str) -> SimpleNamespace:
        found = self.tokens.get(rules.hash_secret(token)) if rules.is_key_text(token, MAX_TOKEN_CHARS) else None
        if found is None or found.revoked_at_ms is not None:
            self.ledger._agent(self.conn, agent_id)
            raise Forbidden("this spend token is unknown or was revoked by the buyer; ask the buyer for a new one "
                            "(mint_spend_token) or a new escrow")
        row = self.escrows[found.escrow_id]
        if row.seller != agent_id:
            self.ledger._agent(self.conn, agent_id)
            raise Forbidden("this spend token pays another seller; only the escrow's seller can take payment "
                            "with it")
        return row

    def _hold(self, op: Operation) -> dict:
        agent_id, amount_micro = op.agent_id, op.request["amount_micro"]
        if _is_token(op.target):
            row = self._token_escrow(op.target, agent_id)
        else:
            row = self._locked(op.target, agent_id, "party")
        rules.check_state(row, self.now_ms, ("active",))
        if row.release_condition is not None and agent_id == row.seller:
            # As with deduct: a seller paid piecemeal would be paid for a result that has not passed.
            raise StateConflict(f"escrow {row.escrow_id} pays its seller on a passing benchmark result "
                                "(submit_result, then verify), not through holds")
        remaining = _remaining(row)
        if amount_micro > remaining:
            raise InsufficientFunds(
                f"escrow {row.escrow_id} has {format_usdc(remaining)} USDC free, cannot hold "
                f"{format_usdc(amount_micro)}; ask for less or have the buyer fund a new escrow",
                details={"remaining_micro": remaining, "needed_micro": amount_micro})
        hold = SimpleNamespace(
            hold_id="hold_" + secrets.token_hex(12), escrow_id=row.escrow_id, holder=self._acting(row, agent_id),
            status="open",
            amount_micro=amount_micro, captured_micro=0, captures=0, created_at_ms=self.now_ms, closed_at_ms=None,
            expires_at_ms=min(self.now_ms + op.request["ttl_ms"], row.expires_at_ms + self.config.hold_grace_s * 1000))
        self.holds[hold.hold_id] = hold
        self.new_holds.append({name: getattr(hold, name) for name in (
            "hold_id", "escrow_id", "holder", "amount_micro", "created_at_ms", "expires_at_ms")})
        row.held_micro += amount_micro
        self.dirty_escrows.add(row.escrow_id)
        return self._hold_view(hold)

    def _deduct(self, op: Operation) -> dict:
        escrow_id, amount_micro = op.target, op.request["amount_micro"]
        row = self._locked(escrow_id, op.agent_id, "seller")
        if row.release_condition is not None:
            # Paying a gated escrow piecemeal would pay for a result that has not passed.
            raise StateConflict(f"escrow {escrow_id} pays on a passing benchmark result "
                                "(submit_result, then verify), not by deduct")
        remaining = _remaining(row)
        if amount_micro > remaining:
            raise InsufficientFunds(
                f"escrow {escrow_id} has {format_usdc(remaining)} USDC left, cannot deduct "
                f"{format_usdc(amount_micro)}; the buyer must fund a new escrow",
                details={"remaining_micro": remaining})
        split = self._payout(row, amount_micro, "deduct")
        tokens_in, tokens_out = op.request["usage"]
        row.tokens_in += tokens_in
        row.tokens_out += tokens_out
        self.dirty_escrows.add(row.escrow_id)
        self._event(row.escrow_id, "deducted", op.agent_id, reason=op.request["reason"], rounded_from=op.rounded_from,
                    tokens_in=tokens_in, tokens_out=tokens_out, **split_data(split))
        return receipt_dict("deduct", self._escrow_view(row), base_micro=amount_micro, bonus_micro=0,
                            refunded_micro=0, rounded_from=op.rounded_from, **split_data(split))

    def _capture(self, op: Operation) -> dict:
        agent_id, hold_id = op.agent_id, op.target
        hold = self.holds.get(hold_id) if isinstance(hold_id, str) else None
        row = self.escrows.get(hold.escrow_id) if hold is not None else None
        acting = self._acting(row, agent_id) if row is not None else agent_id
        if row is None or acting not in (row.buyer, row.seller):
            raise self._not_found(agent_id, f"hold {hold_id!r} not found among your holds")
        if hold.holder != acting:
            raise Forbidden(f"hold {hold_id} was made by {hold.holder!r}; only its maker may capture or void it")
        if hold.status != "open":
            raise StateConflict(f"hold {hold_id} is {hold.status}; make a new hold for new work")
        if hold.expires_at_ms <= self.now_ms:
            raise rules.Expired(hold_id=hold_id)
        if row.status in OPEN_STATUSES and row.expires_at_ms <= self.now_ms:
            row = self._settle_expiry(row)
            hold = self.holds[hold_id]
        open_micro = hold.amount_micro - hold.captured_micro
        amount_micro, final = op.request["amount_micro"], op.request["final"]
        if amount_micro > open_micro:
            raise InsufficientFunds(
                f"hold {hold_id} has {format_usdc(open_micro)} USDC left, cannot capture "
                f"{format_usdc(amount_micro)}; make another hold for more work",
                details={"hold_open_micro": open_micro, "needed_micro": amount_micro})
        split = self._payout(row, amount_micro, "capture") if amount_micro else None
        tokens_in, tokens_out = op.request["usage"]
        row.tokens_in += tokens_in
        row.tokens_out += tokens_out
        hold.captured_micro += amount_micro
        hold.captures += 1
        row.held_micro -= amount_micro
        refunded = 0
        if final or amount_micro == open_micro:
            freed = open_micro - amount_micro
            hold.status, hold.closed_at_ms = ("voided" if op.kind == "void" else "captured"), self.now_ms
            row.held_micro -= freed
            if row.status not in OPEN_STATUSES and freed:
                # Once the escrow is closed, what a hold frees goes back to the buyer.
                self._post("refund", row, row.buyer, [(escrow_account(row.escrow_id), "refund", -freed),
                                                      (agent_account(row.buyer), "refund", freed)])
                row.refunded_micro += freed
                refunded = freed
                if row.key_id is not None:
                    self.key_refunds[row.key_id] = self.key_refunds.get(row.key_id, 0) + freed
            self._event(row.escrow_id, "hold_closed", agent_id, hold_id=hold_id,
                        captured_micro=hold.captured_micro, freed_micro=freed)
        self.dirty_holds.add(hold_id)
        self.dirty_escrows.add(row.escrow_id)
        return receipt_dict(op.kind, self._escrow_view(row), base_micro=amount_micro, bonus_micro=0,
                            refunded_micro=refunded, hold=self._hold_view(hold), **split_data(split))

    def _settle_expiry(self, row: SimpleNamespace) -> SimpleNamespace:
        """An open escrow past its TTL is expired first (the ledger's own path), then re-read.

        Nothing of this batch is pending on it: every operation on it before this one was
        refused (a deduct or hold on an expired escrow) or would have settled it already.
        """
        if row.escrow_id in self.dirty_escrows:
            raise LedgerCorrupted(f"escrow {row.escrow_id} expired with this batch's writes pending")
        self.ledger._settle_escrow_expiry(self.conn, row, self.now_ms)
        statement = sql.cached(_SELECT_ESCROWS + "e.escrow_id = :e0")
        fresh = SimpleNamespace(**sql.rows(self.conn, statement, {"e0": row.escrow_id}, json_columns=ESCROW_JSON)[0])
        self.escrows[row.escrow_id] = fresh
        ids = [hold_id for hold_id, hold in self.holds.items() if hold.escrow_id == row.escrow_id]
        statement = sql.cached(f"SELECT * FROM holds WHERE hold_id IN ({sql.placeholders('h', len(ids))})")
        for found in sql.rows(self.conn, statement, sql.numbered("h", ids)):
            self.holds[found["hold_id"]] = SimpleNamespace(**found)
        return fresh

    def _payout(self, row: SimpleNamespace, gross_micro: int, kind: str):
        """Pay `gross_micro` from the escrow: seller net, platform fee, referral share (as `Ledger._payout`)."""
        split = split_over_life(gross_micro, paid_before_micro=row.paid_micro, fees_before_micro=row.fees_micro,
                                referral_before_micro=row.referral_micro, fee_bps=self.config.fee_bps,
                                referral_bps=self.config.referral_bps, has_referrer=row.referrer is not None)
        legs = [(escrow_account(row.escrow_id), "payout", -gross_micro),
                (agent_account(row.seller), "seller", split.net_micro), (PLATFORM, "fee", split.platform_micro)]
        if row.referrer is not None:
            legs.append((agent_account(row.referrer), "referral", split.referral_micro))
        self._post(kind, row, row.seller, legs)
        row.paid_micro += gross_micro
        row.fees_micro += split.fee_micro
        row.referral_micro += split.referral_micro
        return split

    def _post(self, kind: str, row: SimpleNamespace, agent_id: str, legs: list) -> None:
        """One balanced journal transaction, debiting only this escrow's account (checked here)."""
        legs = [leg for leg in legs if leg[2] != 0]
        if not 2 <= len(legs) <= MAX_ENTRIES_PER_TX or sum(leg[2] for leg in legs) != 0:
            raise LedgerCorrupted(f"unbalanced transaction {kind}: {legs}")
        debit = -sum(leg[2] for leg in legs if leg[0] == escrow_account(row.escrow_id))
        if any(leg[2] < 0 and leg[0] != escrow_account(row.escrow_id) for leg in legs) or debit > row.balance_micro:
            raise InsufficientFunds(f"escrow:{row.escrow_id} cannot cover {debit} micro-USDC",
                                    details={"account": escrow_account(row.escrow_id), "needed_micro": debit})
        row.balance_micro -= debit
        self.dirty_escrows.add(row.escrow_id)
        self.txs.append(_Tx(kind, row.escrow_id, agent_id, legs))

    def _event(self, escrow_id: str, kind: str, actor: str | None, **data: Any) -> None:
        self.events.append({"escrow_id": escrow_id, "kind": kind, "actor": actor, "at_ms": self.now_ms,
                            "data": sql.json_text({k: v for k, v in data.items() if v is not None})})

    def _escrow_view(self, row: SimpleNamespace) -> dict:
        return escrow_dict(row, _remaining(row))

    def _hold_view(self, hold: SimpleNamespace) -> dict:
        row = self.escrows[hold.escrow_id]
        return hold_dict(SimpleNamespace(**vars(hold), escrow_status=row.status,
                                         escrow_remaining_micro=_remaining(row)))

    # ---- writing, once per table ---------------------------------------------------

    def _write(self) -> None:
        conn = self.conn
        tx_ids = self._tx_ids()
        new = {hold["hold_id"] for hold in self.new_holds}
        applied: list[tuple[str, Any]] = []
        try:
            with sql.pipeline(conn):  # on PostgreSQL, every write below in one round trip
                sql.execute_many(conn, _INSERT_HOLD, self.new_holds)
                if self.txs:
                    self._write_journal(tx_ids, applied)
                sql.execute_many(conn, _ESCROW_AMOUNTS, [
                    {name: getattr(self.escrows[escrow_id], name) for name in (
                        "escrow_id", "paid_micro", "fees_micro", "referral_micro", "refunded_micro", "held_micro",
                        "tokens_in", "tokens_out")} for escrow_id in sorted(self.dirty_escrows)])
                sql.execute_many(conn, _HOLD_STATE, [
                    {name: getattr(self.holds[hold_id], name) for name in (
                        "hold_id", "captured_micro", "captures", "status", "closed_at_ms")}
                    for hold_id in sorted(self.dirty_holds - new)])
                sql.execute_many(conn, _INSERT_EVENT, self.events)
                sql.execute_many(conn, _INSERT_KEY, self.keys)
        except BaseException:
            for _, cursor in applied:
                cursor.close()  # an unread statement left open would block this connection's next commit
            raise
        for account_id, cursor in applied:
            found = sql.first(cursor)
            expected = self._expected_balance(account_id)
            if found is None or (expected is not None and found[0] != expected):
                raise LedgerCorrupted(f"{account_id} stores {found and found[0]} after this batch, "
                                      f"but the batch decided {expected}")
        for key_id in sorted(self.key_refunds):  # after the accounts, as every writer orders them
            self.ledger._count_refund(conn, key_id, self.key_refunds[key_id])

    def _tx_ids(self) -> list[int]:
        if not self.txs:
            return []
        if self.conn.dialect.name == "postgresql":
            tx_ids = self.tx_ids[:len(self.txs)]
        else:
            # The write lock (BEGIN IMMEDIATE) is held: nobody else takes ids meanwhile.
            first = sql.first(sql.execute(self.conn, _NEXT_TX_SQLITE))[0] + 1
            tx_ids = list(range(first, first + len(self.txs)))
        if len(tx_ids) != len(self.txs):
            raise LedgerCorrupted(f"{len(self.txs)} journal transactions but {len(tx_ids)} ids for them")
        return tx_ids

    def _write_journal(self, tx_ids: list[int], applied: list[tuple[str, Any]]) -> None:
        """Transactions and entries; one conditional UPDATE per account, in account-id order
        (no deadlocks between processes). Each UPDATE's cursor goes to `applied`, read once sent."""
        conn = self.conn
        deltas: dict[str, int] = {}
        entries = []
        for tx_id, tx in zip(tx_ids, self.txs):
            for account_id, role, amount_micro in tx.legs:
                entries.append({"tx_id": tx_id, "account_id": account_id, "role": role, "amount_micro": amount_micro})
                if account_id not in (MINT, PLATFORM):
                    deltas[account_id] = deltas.get(account_id, 0) + amount_micro
        sql.execute_many(conn, _INSERT_TX, [
            {"tx_id": tx_id, "kind": tx.kind, "escrow_id": tx.escrow_id, "agent_id": tx.agent_id,
             "at_ms": self.now_ms} for tx_id, tx in zip(tx_ids, self.txs)])
        sql.execute_many(conn, _INSERT_ENTRY, entries)
        for account_id in sorted(deltas):
            if deltas[account_id] != 0:
                applied.append((account_id, sql.execute(conn, _APPLY, {"aid": account_id,
                                                                       "delta": deltas[account_id]})))

    def _expected_balance(self, account_id: str) -> int | None:
        if account_id.startswith("escrow:"):
            return self.escrows[account_id.removeprefix("escrow:")].balance_micro
        return None


def _remaining(row: SimpleNamespace) -> int:
    return int(row.balance_micro) - int(row.held_micro)


def _is_token(target: Any) -> bool:
    return isinstance(target, str) and target.startswith(SPEND_TOKEN_PREFIX)


def refused(error: EscrowError) -> dict:
    """A refused batch item as it is reported."""
    return {"ok": False, "error": error.code, "status": error.status_code, "message": error.message}
