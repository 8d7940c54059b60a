"""The escrow operations, once: who calls each, how it travels over HTTP, whether it is
keyed for retries, what it answers, and which ledger method does it.

Derived from this table: the embedded transport (`client.EmbeddedTransport`) and the HTTP
requests (`http_client.build_request`). Written by hand and checked against it
(tests/test_operations.py): the client methods (their docstrings are the API's), the REST
routes (`server.app`), the MCP tools (`server.mcp_tools`) and the CLI commands (`cli`).
The seed dialects' routes are adapters on top, listed in `ADAPTER_ROUTES`.

A new operation: the ledger method, one row here, the client method that calls it, its
route; its MCP tool and CLI command, or the reason it has none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ._exceptions import ValidationError
from ._models import Agent, BudgetedKey, CaptureResult, Escrow, Hold, Me, Receipt
from .money import to_usdc

# How a field travels over HTTP.
BODY = "body"        # in the JSON body, as given
AMOUNT = "amount"    # in the body, checked as an amount first (a Decimal as its exact text)
NUMBER = "number"    # in the body: a finite JSON number, anything else as text the server refuses
PATH = "path"        # fills {name} in the path, quoted into one segment
QUERY = "query"      # in the query string
FLAG = "flag"        # in the query string as true/false; anything but a bool is refused
ITEMS = "items"      # a batch: a list of items, each with the operation's `item` fields
TARGET = "target"    # a spend token goes in the body to `token_path`, an escrow id fills {target}
ACTING = "acting"    # no argument: the acting agent's id, in the body
IN_BODY = (BODY, AMOUNT, NUMBER, ITEMS, ACTING)


@dataclass(frozen=True)
class Field:
    """One argument of an operation. `required`: an AMOUNT refuses None, a QUERY is sent
    even when None (the server refuses it, as the ledger does); `strict`: a PATH value
    must be a string (else its text is used, and refused by the ledger as an unknown id);
    `none_segment`: what a PATH becomes for None; `default`: a batch item's, when left out."""

    name: str
    how: str = BODY
    wire: str | None = None
    required: bool = True
    strict: bool = False
    none_segment: str | None = None
    default: Any = None

    @property
    def sent_as(self) -> str:
        return self.wire or self.name


@dataclass(frozen=True)
class Exempt:
    """Why a face has no command or tool for an operation."""

    reason: str


# The reasons the faces give for leaving an operation out.
BATCH = Exempt("a batch of items is for programs; people and chat agents do one item at a time")
READ_BY_ID = Exempt("a hold is read by the face that made it; people and agents list holds per escrow")
NO_TOOL_YET = Exempt("no tool yet: the tool set (pinned by tests/test_mcp.py) shows an agent its escrows "
                     "with escrow_history")
DASHBOARD = Exempt("no command yet: people read spend per model on /dashboard")


@dataclass(frozen=True)
class Operation:
    """One row. `returns` is a model (parsed with its `from_dict`) or a function of the
    answer, applied to `answer[key]` when `key` is given and to each item when `many`.
    `keyed`: the operation takes `idempotency_key`, and over HTTP an Idempotency-Key
    (the caller's, or a fresh one per call that retries resend). `ledger`, `positional`:
    the embedded call, ``Ledger.<ledger>(agent, *positional, **the rest)``. `acts`: an
    acting agent is needed (register makes one). `resend`: False for a fresh secret each
    time, never resent once it may have reached the server. `bare`: the ledger answers only
    this field, which both faces answer as ``{agent_id, <bare>}``."""

    name: str
    role: str
    method: str
    path: str
    fields: tuple[Field, ...] = ()
    keyed: bool = False
    returns: Callable[[Any], Any] | type = dict
    key: str | None = None
    many: bool = False
    ledger: str | None = None
    positional: tuple[str, ...] = ()
    mcp: str | Exempt | None = None
    cli: str | Exempt | None = None
    acts: bool = True
    resend: bool = True
    bare: str | None = None
    token_path: str | None = None
    item: tuple[Field, ...] = ()
    item_noun: str | None = None

    @property
    def ledger_method(self) -> str:
        return self.ledger or self.name

    @property
    def arguments(self) -> list[str]:
        """The client method's parameters, in the table's names."""
        return [f.name for f in self.fields if f.how != ACTING] + (["idempotency_key"] if self.keyed else [])

    def parse(self, answer: Any) -> Any:
        if self.key is not None:
            answer = answer[self.key]
        convert = getattr(self.returns, "from_dict", self.returns)
        return [convert(row) for row in answer] if self.many else convert(answer)

    def batch(self, items: Any) -> list[dict]:
        """A batch's items as both transports send them: dicts with every item field."""
        noun = self.item_noun
        if not isinstance(items, (list, tuple)):
            raise ValidationError(f"{self.name} takes a list of {noun}s, got {type(items).__name__}")
        return [self._item(index, item) for index, item in enumerate(items)]

    def _item(self, index: int, item: Any) -> dict:
        names = [f.name for f in self.item]
        first, second, third = names[:3]
        if isinstance(item, (tuple, list)) and 2 <= len(item) <= 3:
            item = dict(zip((first, second, third), item))
        if not isinstance(item, dict) or first not in item or second not in item:
            raise ValidationError(f"{self.item_noun} {index}: give ({first}, {second}[, {third}]) or a dict with "
                                  f"{first} and {second}, got {item!r:.100}")
        unknown = set(item) - set(names)
        if unknown:
            raise ValidationError(f"{self.item_noun} {index}: unknown keys {sorted(unknown)}; known: {names}")
        return {f.name: item.get(f.name, f.default) for f in self.item}


def _analytics(data: dict) -> dict:
    def convert(rows: list[dict]) -> list[dict]:
        return [{k.removesuffix("_micro"): to_usdc(v) if k.endswith("_micro") else v for k, v in row.items()}
                for row in rows]
    return {"agent_id": data["agent_id"], "spend": convert(data["spend"]), "earnings": convert(data["earnings"]),
            "referral_earned": to_usdc(data["referral_earned_micro"])}


_ESCROW_ID = Field("escrow_id", PATH)
_HOLD_ID = Field("hold_id", PATH, strict=True)
_USAGE = Field("usage")
_OPTIONAL = {"required": False}

OPERATIONS: dict[str, Operation] = {op.name: op for op in (
    # ---- agents ----------------------------------------------------------------------------------
    Operation("register", "anyone", "POST", "/register", (Field("agent_id"), Field("referral_code")),
              returns=Agent, positional=("agent_id", "referral_code"), mcp="register_agent", cli="register",
              acts=False, resend=False),
    Operation("claim_faucet", "agent", "POST", "/claim", (Field("agent_id", ACTING),), keyed=True,
              returns=to_usdc, key="amount_micro", mcp="claim_faucet", cli="claim"),
    Operation("me", "agent", "GET", "/api/me", returns=Me, mcp=NO_TOOL_YET, cli="balance"),
    Operation("rotate_key", "agent", "POST", "/api/me/key", returns=str, key="api_key", bare="api_key",
              mcp="rotate_api_key", cli="rotate-key", resend=False),
    Operation("analytics", "agent", "GET", "/api/analytics", returns=_analytics, mcp=NO_TOOL_YET,
              cli=DASHBOARD),
    # ---- escrows ---------------------------------------------------------------------------------
    Operation("create_escrow", "buyer", "POST", "/api/escrow", (
        Field("seller", wire="seller_id"), Field("amount", AMOUNT, "amount_usdc"), Field("ttl_seconds"),
        Field("description"), Field("meta"), Field("release_condition"), Field("bonus_conditions"),
        Field("referral_code"), Field("pricing")), keyed=True, returns=Escrow, positional=("seller", "amount"),
        mcp="escrow_create", cli="create"),
    Operation("deduct", "seller", "POST", "/api/escrow/{escrow_id}/deduct", (
        _ESCROW_ID, Field("amount", AMOUNT, "amount_usdc"), Field("reason"), _USAGE), keyed=True,
        returns=Receipt, positional=("escrow_id",), mcp="escrow_deduct", cli="deduct"),
    Operation("deduct_many", "seller", "POST", "/api/escrow/deduct", (Field("items", ITEMS),), keyed=True,
              returns=CaptureResult, key="results", many=True, positional=("items",), mcp=BATCH, cli=BATCH,
              item=(Field("escrow_id"), Field("amount", AMOUNT, "amount_usdc"), Field("reason"), _USAGE,
                    Field("idempotency_key")), item_noun="deduct"),
    Operation("release", "buyer", "POST", "/api/escrow/{escrow_id}/release", (
        _ESCROW_ID, Field("amount", AMOUNT, "amount_usdc", **_OPTIONAL), Field("refund_remainder"), _USAGE,
        Field("meta"), Field("price_per_token", AMOUNT, **_OPTIONAL), Field("quality_score"),
        Field("throughput_tps"), Field("hold_id")), keyed=True, returns=Receipt, positional=("escrow_id",),
        mcp="escrow_release", cli="release"),
    Operation("cancel", "buyer or seller", "POST", "/api/escrow/{escrow_id}/cancel", (_ESCROW_ID, Field("reason")),
              keyed=True, returns=Receipt, positional=("escrow_id",), mcp="escrow_cancel", cli="cancel"),
    Operation("submit_result", "seller", "POST", "/api/escrow/{escrow_id}/submit-result", (
        _ESCROW_ID, Field("metric"), Field("score"), Field("artifact"), Field("milestone")), keyed=True,
        returns=Receipt, positional=("escrow_id",), mcp="escrow_submit_result", cli="jobs run"),
    Operation("verify", "verifier", "POST", "/api/escrow/{escrow_id}/verify", (_ESCROW_ID, Field("score")),
              keyed=True, returns=Receipt, positional=("escrow_id",), mcp="escrow_verify", cli="jobs verify"),
    Operation("get", "party", "GET", "/api/escrow/{escrow_id}", (_ESCROW_ID,), returns=Escrow,
              positional=("escrow_id",), mcp="escrow_get", cli="get"),
    Operation("history", "agent", "GET", "/api/escrow", tuple(
        Field(name, QUERY, required=False) for name in ("status", "limit", "model", "role")),
        returns=Escrow, many=True, mcp="escrow_history", cli="history"),
    # ---- spend tokens and holds ------------------------------------------------------------------
    Operation("mint_spend_token", "buyer", "POST", "/api/escrow/{escrow_id}/tokens",
              (Field("escrow_id", PATH, strict=True),), returns=str, key="spend_token",
              positional=("escrow_id",), mcp="escrow_mint_token", cli="tokens mint"),
    Operation("revoke_spend_tokens", "buyer", "DELETE", "/api/escrow/{escrow_id}/tokens",
              (Field("escrow_id", PATH, strict=True),), returns=int, key="revoked",
              positional=("escrow_id",), mcp="escrow_revoke_tokens", cli="tokens revoke"),
    Operation("hold", "buyer or seller", "POST", "/api/escrow/{target}/holds", (
        Field("target", TARGET, strict=True), Field("amount", AMOUNT, "amount_usdc"),
        Field("ttl_seconds", NUMBER)),
        keyed=True, returns=Hold, positional=("target", "amount"), token_path="/api/holds",
        mcp="escrow_hold", cli="hold"),
    Operation("capture", "hold maker", "POST", "/api/holds/{hold_id}/capture", (
        _HOLD_ID, Field("amount", AMOUNT, "amount_usdc"), Field("final"), _USAGE), keyed=True,
        returns=Receipt, positional=("hold_id", "amount"), mcp="escrow_capture", cli="capture"),
    Operation("void", "hold maker", "POST", "/api/holds/{hold_id}/void", (_HOLD_ID,), keyed=True,
              returns=Receipt, positional=("hold_id",), mcp="escrow_void", cli="void"),
    Operation("capture_many", "hold maker", "POST", "/api/holds/capture", (Field("items", ITEMS),), keyed=True,
              returns=CaptureResult, key="results", many=True, positional=("items",), mcp=BATCH, cli=BATCH,
              item=(Field("hold_id"), Field("amount", AMOUNT, "amount_usdc"), Field("final", default=False),
                    _USAGE, Field("idempotency_key")), item_noun="capture"),
    Operation("get_hold", "hold maker or party", "GET", "/api/holds/{hold_id}", (_HOLD_ID,), returns=Hold,
              positional=("hold_id",), mcp=READ_BY_ID, cli=READ_BY_ID),
    Operation("holds", "party", "GET", "/api/escrow/{escrow_id}/holds", (Field("escrow_id", PATH, strict=True),),
              returns=Hold, many=True, positional=("escrow_id",), mcp="escrow_holds", cli="holds"),
    # ---- budgeted keys ---------------------------------------------------------------------------
    Operation("create_key", "owner", "POST", "/api/keys", (
        Field("budget", AMOUNT, "budget_usdc"), Field("sellers"),
        Field("max_escrow", AMOUNT, "max_escrow_usdc", **_OPTIONAL), Field("expires_in", NUMBER),
        Field("label")), keyed=True, returns=BudgetedKey, mcp="key_create", cli="keys create"),
    Operation("revoke_key", "owner", "DELETE", "/api/keys/{key_id}", (
        Field("key_id", PATH, strict=True), Field("cancel_escrows", FLAG)), returns=BudgetedKey,
        positional=("key_id",), mcp="key_revoke", cli="keys revoke"),
    Operation("keys", "owner", "GET", "/api/keys", (Field("limit", QUERY),), returns=BudgetedKey, many=True,
              mcp="key_list", cli="keys list"),
    Operation("mandate", "owner or key", "GET", "/api/keys/{key_id}",
              (Field("key_id", PATH, strict=True, none_segment="me"),), returns=BudgetedKey, ledger="key",
              positional=("key_id",), mcp="key_mandate", cli="keys show"),
)}

# Routes of our HTTP faces that are no client operation: the seed dialects' adapters (each
# on the operation it adapts) and the operator's routes (the operator key, never an agent's).
ADAPTER_ROUTES: dict[str, str] = {
    "POST /escrow/create": "create_escrow", "POST /escrow/release": "release",
    "POST /escrow/cancel": "cancel", "GET /escrow/history": "history",
}
OPERATOR_ROUTES: dict[str, str] = {
    "GET /api/audit": "the ledger's invariant check and totals",
    "POST /api/admin/deposit": "money from the mint",
    "GET /api/admin/faucet": "the faucet's settings",
}
