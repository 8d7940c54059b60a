"""The HTTP face of the ledger: both seed dialects, the faucet, MCP and health, on one app.

Most endpoints are plain `def`s: FastAPI runs them in its thread pool, and the ledger's
transactions are short and blocking by design. The settlement routes (hold, capture,
void, deduct), the hot path, are `async`: the event loop hands the operation to the
ledger's group committer and awaits its commit, with no trip to the thread pool, and
answers with the JSON it built (`_json`), so that FastAPI's response validation is not
run again over a dict the ledger built.
"""


import contextlib
import os
from pathlib import Path
from typing import Annotated, Optional

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .._exceptions import EscrowError, ValidationError
from ..ledger import Ledger, audit
from ..ledger.totals import ping, totals as ledger_totals
from ..pricing import per_token_price
from . import bodies
from .faucet import Faucet, FaucetSettings
from ..limits import client_key
from .limits import DEFAULT_MAX_BODY_BYTES, BodyLimitMiddleware
from ..ops.metrics import install_ops
from ..ops.operator import admin_key as resolve_admin_key, bearer, check_operator
from .wire import escrow_view, receipt_view, with_usdc

_HERE = Path(__file__).parent
# The dashboard runs only its own script and style, talks only to this server, and cannot be framed.
DASHBOARD_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
                 "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
KeyHeader = Annotated[Optional[str], Header(alias="Idempotency-Key", description="Retry-safe key for this mutation.")]


def create_app(ledger: Ledger | None = None, *, database_url: str | None = None, sweep_interval_s: float = 1.0,
               mcp: bool = True, faucet: FaucetSettings | None = None, admin_key: str | None = None,
               max_body_bytes: int | None = None) -> FastAPI:
    """The escrow server on `ledger` (or a ledger opened on `database_url` / the default).

    `faucet` (default: from the environment, see `FaucetSettings.resolve`) says when the
    faucet pays and how often; `admin_key` (default `$HF_ESCROW_ADMIN_KEY`) is the
    operator's key for audit, deposits and faucet settings; bodies over `max_body_bytes`
    (default `$HF_ESCROW_MAX_BODY_BYTES`, else 1 MiB) are refused with 413.

    Example:
        >>> import uvicorn
        >>> uvicorn.run(create_app(), host="127.0.0.1", port=8787)  # doctest: +SKIP
    """
    ledger = ledger or Ledger(database_url)
    taps = Faucet(ledger, FaucetSettings.resolve(faucet))
    mcp_server = None
    if mcp:
        from .mcp_tools import build_mcp
        mcp_server = build_mcp(ledger, faucet=taps)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        stop_sweeper = ledger.start_sweeper(sweep_interval_s) if sweep_interval_s > 0 else None
        async with contextlib.AsyncExitStack() as stack:
            if mcp_server is not None:
                await stack.enter_async_context(mcp_server.session_manager.run())
            yield
        if stop_sweeper:
            stop_sweeper()

    app = FastAPI(title="hf-escrow", version=__version__, lifespan=lifespan,
                  description="Escrow-backed pay-per-use for Hugging Face workloads. Amounts are USDC; every "
                              "`*_usdc` field has an exact integer `*_micro` twin.")
    app.state.ledger = ledger
    operator_key = resolve_admin_key(admin_key)
    install_ops(app, ready=lambda: ping(ledger.engine), totals=lambda: ledger_totals(ledger.engine),
                admin_key=operator_key, authenticate=ledger.authenticate)
    app.add_middleware(_JsonBodyMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=_max_body_bytes(max_body_bytes))
    _install_error_handlers(app)

    async def agent(authorization: Annotated[Optional[str], Header()] = None) -> str:
        # On the event loop: one indexed read on a kept connection costs less than a trip to
        # the thread pool and back; it is read afresh each request, so a revoked key stops at once.
        return ledger.authenticate(bearer(authorization))

    Agent = Annotated[str, Depends(agent)]
    app.include_router(_hf_routes(ledger, Agent))
    app.include_router(_hold_routes(ledger, Agent))
    app.include_router(_key_routes(ledger, Agent))
    app.include_router(_vllm_routes(ledger, Agent))
    app.include_router(_faucet_routes(ledger, taps, Agent))
    app.include_router(_operator_routes(ledger, taps, operator_key))
    app.include_router(_dashboard_routes())

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict:
        return {"ok": True}

    if mcp_server is not None:
        from mcp.server.streamable_http_manager import StreamableHTTPASGIApp
        from starlette.routing import Route
        app.router.routes.append(Route("/mcp", endpoint=StreamableHTTPASGIApp(mcp_server.session_manager)))
    return app


def _hf_routes(ledger: Ledger, Agent) -> APIRouter:
    router = APIRouter(prefix="/api", tags=["escrow (HuggingFace guide)"])

    @router.post("/escrow", status_code=201)
    def create(body: bodies.CreateEscrow, agent_id: Agent, idempotency_key: KeyHeader = None) -> dict:
        """Lock `amount_usdc` from your balance for `seller_id`."""
        return escrow_view(ledger.create_escrow(
            agent_id, body.seller_id, body.amount_usdc, ttl_seconds=body.ttl_seconds, description=body.description,
            meta=body.meta, release_condition=body.release_condition, bonus_conditions=body.bonus_conditions,
            referral_code=body.referral_code, pricing=body.pricing, idempotency_key=idempotency_key))

    @router.get("/escrow")
    def list_escrows(agent_id: Agent, status: Optional[str] = None, model: Optional[str] = None,
                     role: Optional[str] = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict]:
        """Your escrows, newest first."""
        return [escrow_view(e) for e in ledger.history(agent_id, status=status, model=model, role=role, limit=limit)]

    @router.get("/escrow/{escrow_id}")
    def get(escrow_id: str, agent_id: Agent) -> dict:
        return escrow_view(ledger.get(agent_id, escrow_id))

    # One request, one ledger transaction: a refused item moves nothing, its neighbours go through.
    @router.post("/escrow/deduct")
    def deduct_many(body: bodies.DeductMany, agent_id: Agent, idempotency_key: KeyHeader = None) -> dict:
        """As the seller: many deducts in one transaction; each item answers alone (`ok`, or its error and status)."""
        items = [{"escrow_id": item.escrow_id, "amount": item.amount_usdc, "reason": item.reason,
                  "usage": _usage(item.usage), "idempotency_key": item.idempotency_key} for item in body.items]
        return _batch_view(ledger.deduct_many(agent_id, items, idempotency_key=idempotency_key))

    @router.post("/escrow/{escrow_id}/deduct")
    async def deduct(escrow_id: str, body: bodies.Deduct, agent_id: Agent, idempotency_key: KeyHeader = None) -> dict:
        """As the seller: take `amount_usdc` for work delivered."""
        return _json(receipt_view(await ledger.settle_async(ledger.deduct_operation(
            agent_id, escrow_id, body.amount_usdc, reason=body.reason, usage=_usage(body.usage),
            idempotency_key=idempotency_key))))

    @router.post("/escrow/{escrow_id}/release")
    def release(escrow_id: str, body: bodies.Release, agent_id: Agent, idempotency_key: KeyHeader = None) -> dict:
        """As the buyer: pay the seller; by default refund the rest and close."""
        return receipt_view(ledger.release(
            agent_id, escrow_id, body.amount_usdc, refund_remainder=body.refund_remainder, usage=_usage(body.usage),
            price_per_token=body.price_per_token, quality_score=body.quality_score,
            throughput_tps=body.throughput_tps, meta=body.meta, hold_id=body.hold_id,
            idempotency_key=idempotency_key))

    @router.post("/escrow/{escrow_id}/cancel")
    def cancel(escrow_id: str, agent_id: Agent, body: bodies.Cancel | None = None,
               idempotency_key: KeyHeader = None) -> dict:
        return receipt_view(ledger.cancel(agent_id, escrow_id, reason=body.reason if body else None,
                                          idempotency_key=idempotency_key))

    @router.post("/escrow/{escrow_id}/submit-result")
    def submit_result(escrow_id: str, body: bodies.SubmitResult, agent_id: Agent,
                      idempotency_key: KeyHeader = None) -> dict:
        """As the seller of a benchmark escrow: report the score."""
        artifact = dict(body.artifact or {})
        if body.model_repo:
            artifact.setdefault("repo", body.model_repo)
        return receipt_view(ledger.submit_result(agent_id, escrow_id, metric=body.metric, score=body.score,
                                                 artifact=artifact or None, milestone=body.milestone,
                                                 idempotency_key=idempotency_key))

    @router.post("/escrow/{escrow_id}/verify")
    def verify(escrow_id: str, body: bodies.Verify, agent_id: Agent, idempotency_key: KeyHeader = None) -> dict:
        """As the named verifier: your own score; pass releases, fail reopens."""
        return receipt_view(ledger.verify(agent_id, escrow_id, score=body.score, idempotency_key=idempotency_key))

    @router.get("/me")
    def me(agent_id: Agent) -> dict:
        return with_usdc(ledger.me(agent_id))

    # No Idempotency-Key: a key is never stored to be replayed. The old key stops at once.
    @router.post("/me/key")
    def rotate_key(agent_id: Agent) -> dict:
        """A new API key for you (shown once); the key this request carried stops working."""
        return {"agent_id": agent_id, "api_key": ledger.rotate_key(agent_id)}

    @router.get("/analytics")
    def analytics(agent_id: Agent) -> dict:
        return with_usdc(ledger.analytics(agent_id))

    return router


def _hold_routes(ledger: Ledger, Agent) -> APIRouter:
    """Holds and spend tokens: how a seller reserves part of an escrow, then is paid out of it."""
    router = APIRouter(prefix="/api", tags=["holds and spend tokens"])
    # Ids are `:path` parameters: an id with a '/' in it reaches the ledger, which refuses it
    # as it does for the embedded client, instead of falling through to another route.

    # Minting and revoking take no Idempotency-Key: a token is never stored to be replayed,
    # a lost answer's token is simply never used, and revoking twice revokes nothing more.
    @router.post("/escrow/{escrow_id:path}/tokens", status_code=201)
    def mint_token(escrow_id: str, agent_id: Agent) -> dict:
        """As the buyer: another spend token for the escrow (shown once)."""
        return ledger.mint_spend_token(agent_id, escrow_id)

    @router.delete("/escrow/{escrow_id:path}/tokens")
    def revoke_tokens(escrow_id: str, agent_id: Agent) -> dict:
        """As the buyer: revoke every spend token of the escrow at once."""
        return ledger.revoke_spend_tokens(agent_id, escrow_id)

    async def hold(agent_id: str, target: str, body: bodies.HoldByEscrow, idempotency_key: str | None) -> Response:
        return _json(with_usdc(await ledger.settle_async(ledger.hold_operation(
            agent_id, target, body.amount_usdc, ttl_seconds=body.ttl_seconds, idempotency_key=idempotency_key))),
            status_code=201)

    @router.post("/holds", status_code=201)
    async def hold_by_token(body: bodies.HoldByToken, agent_id: Agent, idempotency_key: KeyHeader = None) -> dict:
        """As the escrow's seller: reserve `amount_usdc` of the escrow the spend token opens."""
        return await hold(agent_id, body.spend_token, body, idempotency_key)

    @router.post("/escrow/{escrow_id:path}/holds", status_code=201)
    async def hold_by_escrow(escrow_id: str, body: bodies.HoldByEscrow, agent_id: Agent,
                             idempotency_key: KeyHeader = None) -> dict:
        """As buyer or seller: reserve `amount_usdc` of the escrow's remainder."""
        return await hold(agent_id, escrow_id, body, idempotency_key)

    @router.get("/escrow/{escrow_id:path}/holds")
    def escrow_holds(escrow_id: str, agent_id: Agent) -> list[dict]:
        """The escrow's open holds, for either party."""
        return [with_usdc(h) for h in ledger.holds(agent_id, escrow_id)]

    # Declared before the /holds/{hold_id:path} routes: the batch's fixed path comes first.
    @router.post("/holds/capture")
    def capture_many(body: bodies.CaptureMany, agent_id: Agent, idempotency_key: KeyHeader = None) -> dict:
        """Many captures in one transaction; each item answers alone (`ok`, or its error and status)."""
        items = [{"hold_id": item.hold_id, "amount": item.amount_usdc, "final": item.final,
                  "usage": _usage(item.usage), "idempotency_key": item.idempotency_key} for item in body.items]
        return _batch_view(ledger.capture_many(agent_id, items, idempotency_key=idempotency_key))

    @router.get("/holds/{hold_id:path}")
    def get_hold(hold_id: str, agent_id: Agent) -> dict:
        return with_usdc(ledger.get_hold(agent_id, hold_id))

    @router.post("/holds/{hold_id:path}/capture")
    async def capture(hold_id: str, body: bodies.Capture, agent_id: Agent, idempotency_key: KeyHeader = None) -> dict:
        """As the hold's maker: pay the seller `amount_usdc` out of the hold; `final` frees the rest."""
        return _json(receipt_view(await ledger.settle_async(ledger.capture_operation(
            agent_id, hold_id, body.amount_usdc, final=body.final, usage=_usage(body.usage),
            idempotency_key=idempotency_key))))

    @router.post("/holds/{hold_id:path}/void")
    async def void(hold_id: str, agent_id: Agent, idempotency_key: KeyHeader = None) -> dict:
        """As the hold's maker: free the hold's open part back to the escrow."""
        return _json(receipt_view(await ledger.settle_async(ledger.void_operation(
            agent_id, hold_id, idempotency_key=idempotency_key))))

    return router


def _key_routes(ledger: Ledger, Agent) -> APIRouter:
    """Budgeted keys: an agent's keys for its sub-agents, which lock its money within a mandate."""
    router = APIRouter(prefix="/api/keys", tags=["budgeted keys"])

    @router.post("", status_code=201)
    def create_key(body: bodies.CreateKey, agent_id: Agent, idempotency_key: KeyHeader = None) -> dict:
        """A key for a sub-agent (its `api_key` shown once): it locks your money only within the
        budget, per-escrow cap, sellers and expiry given, and sees only the escrows it opens."""
        return with_usdc(ledger.create_key(
            agent_id, budget=body.budget_usdc, sellers=body.sellers, max_escrow=body.max_escrow_usdc,
            expires_in=body.expires_in, label=body.label, idempotency_key=idempotency_key))

    @router.get("")
    def list_keys(agent_id: Agent, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict]:
        """Your keys, newest first: mandate, locked, paid, refunded, left, expiry, revocation."""
        return with_usdc(ledger.keys(agent_id, limit=limit))

    # Declared before /{key_id}: "me" is no key id.
    @router.get("/me")
    def own_mandate(agent_id: Agent) -> dict:
        """As a budgeted key: your mandate and what is left of it."""
        return with_usdc(ledger.key(agent_id))

    @router.get("/{key_id:path}")
    def get_key(key_id: str, agent_id: Agent) -> dict:
        return with_usdc(ledger.key(agent_id, key_id))

    # No Idempotency-Key: revoking twice revokes nothing more, and cancels are idempotent.
    @router.delete("/{key_id:path}")
    def revoke_key(key_id: str, agent_id: Agent, cancel_escrows: bool = False) -> dict:
        """Stop the key at once; `cancel_escrows` also cancels its active escrows (refunded to you)."""
        return with_usdc(ledger.revoke_key(agent_id, key_id, cancel_escrows=cancel_escrows))

    return router


def _vllm_routes(ledger: Ledger, Agent) -> APIRouter:
    router = APIRouter(prefix="/escrow", tags=["escrow (vLLM guide)"])

    @router.post("/create", status_code=201)
    def create(body: bodies.VllmCreate, agent_id: Agent, idempotency_key: KeyHeader = None) -> dict:
        """Lock the estimated cost; `recipient_wallet` names the worker (agent id or wallet)."""
        return escrow_view(ledger.create_escrow(
            agent_id, body.recipient_wallet, body.amount_usdc, ttl_seconds=body.ttl_seconds,
            description=body.description, meta=body.metadata, bonus_conditions=body.bonus_conditions,
            referral_code=body.referral_code, idempotency_key=idempotency_key))

    @router.post("/release")
    def release(body: bodies.VllmRelease, agent_id: Agent, idempotency_key: KeyHeader = None) -> dict:
        """Pay (metadata.prompt_tokens + actual_completion_tokens) x price_per_token, plus bonuses; refund the rest.

        Without `price_per_token` (the guide's score-gated release), the price is the one
        the escrow was sized with: amount / (prompt_tokens + max_completion_tokens).
        """
        usage, price = None, body.price_per_token
        if body.actual_completion_tokens is not None:
            escrow = ledger.get(agent_id, body.escrow_id)
            meta = escrow["meta"] or {}
            prompt_tokens = _meta_tokens(meta, "prompt_tokens")
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": body.actual_completion_tokens}
            if price is None and body.amount_usdc is None:
                price = per_token_price(escrow["amount_micro"], prompt_tokens + _meta_tokens(meta, "max_completion_tokens"))
        return receipt_view(ledger.release(
            agent_id, body.escrow_id, body.amount_usdc, usage=usage, price_per_token=price,
            quality_score=body.quality_score, throughput_tps=body.throughput_tps, idempotency_key=idempotency_key))

    @router.post("/cancel")
    def cancel(body: bodies.VllmCancel, agent_id: Agent, idempotency_key: KeyHeader = None) -> dict:
        return receipt_view(ledger.cancel(agent_id, body.escrow_id, reason=body.reason,
                                          idempotency_key=idempotency_key))

    @router.get("/history")
    def history(agent_id: Agent, status: Optional[str] = None, model: Optional[str] = None,
                limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict:
        """Your escrows with prompt/completion tokens and cost per model."""
        rows = [escrow_view(e) for e in ledger.history(agent_id, status=status, model=model, limit=limit)]
        return {"escrows": rows, "count": len(rows), "analytics": with_usdc(ledger.analytics(agent_id))}

    return router


def _faucet_routes(ledger: Ledger, faucet: Faucet, Agent) -> APIRouter:
    router = APIRouter(tags=["faucet"])

    @router.post("/register", status_code=201)
    def register(body: bodies.Register, request: Request,
                 authorization: Annotated[Optional[str], Header()] = None) -> dict:
        """Register an agent: returns its API key (once), wallet and referral code. With a key,
        the new agent is that key's agent's own: that agent may claim the faucet for it."""
        token = bearer(authorization)
        owner = ledger.authenticate(token) if token is not None else None
        return faucet.register(body.agent_id, body.referral_code, owner=owner, client=_client(request))

    @router.post("/claim")
    def claim(body: bodies.Claim, agent_id: Agent, request: Request, idempotency_key: KeyHeader = None) -> dict:
        """Credit free test USDC to `agent_id`: you, an agent you registered, or an id nobody
        registered, which becomes yours first (its key is in `registered`)."""
        server = request.scope.get("server")
        return faucet.claim(body.agent_id, caller=agent_id, client=_client(request),
                            local_host=server[0] if server else None, idempotency_key=idempotency_key)

    return router


def _operator_routes(ledger: Ledger, faucet: Faucet, admin_key: str | None) -> APIRouter:
    """Ledger-wide figures and money from the mint: the operator's key only, never an agent's."""
    router = APIRouter(tags=["operator"])

    def operator(authorization: Annotated[Optional[str], Header()] = None) -> None:
        check_operator(authorization, admin_key, ledger.authenticate,
                       hint="; your own figures are at /api/me and /api/analytics")

    Operator = Depends(operator)

    @router.get("/api/audit", dependencies=[Operator])
    def audit_report() -> dict:
        """The ledger's invariant check and totals."""
        return audit(ledger.engine)

    @router.post("/api/admin/deposit", dependencies=[Operator])
    def deposit(body: bodies.Deposit, idempotency_key: KeyHeader = None) -> dict:
        """Credit `agent_id` with `amount_usdc` from the mint."""
        # The operator's keys live apart from the agent's own, in the same table.
        key = None if idempotency_key is None else "operator-deposit:" + idempotency_key
        return with_usdc(ledger.deposit(body.agent_id, body.amount_usdc, idempotency_key=key))

    @router.get("/api/admin/faucet", dependencies=[Operator])
    def faucet_settings() -> dict:
        """When the faucet pays, how much, and its limits per client and in all."""
        return faucet.view()

    return router


def _dashboard_routes() -> APIRouter:
    """The page, its script and its style: separate files, so that the page's policy can
    refuse every inline script (an injected one included)."""
    router = APIRouter(include_in_schema=False)
    headers = {"Content-Security-Policy": DASHBOARD_CSP, "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "no-referrer", "Cache-Control": "no-store", "X-Frame-Options": "DENY"}
    files = {name: (_HERE / name).read_bytes() for name in ("dashboard.html", "dashboard.js", "dashboard.css")}

    def served(name: str, media_type: str) -> Response:
        return Response(files[name], media_type=media_type, headers=headers)

    @router.get("/dashboard")
    def dashboard() -> Response:
        """The agent's escrows, spend per model and over time; the page asks for the API key."""
        return served("dashboard.html", "text/html; charset=utf-8")

    @router.get("/dashboard.js")
    def dashboard_js() -> Response:
        return served("dashboard.js", "text/javascript; charset=utf-8")

    @router.get("/dashboard.css")
    def dashboard_css() -> Response:
        return served("dashboard.css", "text/css; charset=utf-8")

    return router


def _client(request: Request) -> str:
    return client_key(request.client.host if request.client else None)


def _max_body_bytes(given: int | None) -> int:
    if given is None:
        try:
            given = int(os.environ.get("HF_ESCROW_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES))
        except ValueError:
            raise ValidationError("HF_ESCROW_MAX_BODY_BYTES must be a whole number of bytes") from None
    if given < 1:
        raise ValidationError("the request body limit must be at least 1 byte")
    return given


def _meta_tokens(meta: dict, name: str) -> int:
    value = meta.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValidationError(f"escrow metadata.{name} must be a whole number of tokens")
    return value


def _batch_view(result: dict) -> dict:
    """A batch's answer: each item's receipt as a single call's, or its error alone."""
    return {"results": [dict(r, receipt=receipt_view(r["receipt"])) if r.get("ok") else r for r in result["results"]]}


def _json(data: dict, status_code: int = 200) -> JSONResponse:
    """`data` as FastAPI would answer it from the route (the same encoder), less its validation pass."""
    return JSONResponse(data, status_code=status_code)


def _usage(usage: bodies.Usage | None) -> dict | None:
    return usage.model_dump() if usage else None


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(EscrowError)
    async def escrow_error(request: Request, error: EscrowError) -> JSONResponse:
        retry_after = (error.details or {}).get("retry_after_s")
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return JSONResponse(error.to_dict(), status_code=error.status_code, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        # Framework answers (unknown route, wrong method, a body that is not UTF-8) in the
        # API's own error shape; a body that cannot be read is bad input like any other: 422.
        code, hint = _HTTP_ERRORS.get(error.status_code, ("http_error", None))
        hint = hint or str(error.detail)
        status = 422 if error.status_code == 400 else error.status_code
        return JSONResponse({"error": code, "message": f"{hint} ({request.method} {request.url.path})"},
                            status_code=status, headers=getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = []
        for item in error.errors()[:10]:
            where = ".".join(str(part) for part in item.get("loc", ()) if part != "body") or "body"
            problems.append(f"{where}: {item.get('msg')}")
        message = "invalid request: " + "; ".join(problems) if problems else "invalid request body"
        return JSONResponse({"error": "validation_error", "message": message, "details": {"problems": problems}},
                            status_code=422)


_HTTP_ERRORS = {
    400: ("validation_error", "the request body could not be read: send UTF-8 JSON"),
    404: ("not_found", "no such endpoint; the routes are listed at /docs"),
    405: ("method_not_allowed", "this endpoint does not take that method; see /docs"),
    413: ("payload_too_large", None),  # the limit, in the refusal's own words
}


class _JsonBodyMiddleware:
    """Read request bodies as JSON whatever their Content-Type: the seeds' curl lines send
    JSON with curl's default form type. MCP and other mounted apps are left alone."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH") \
                and not scope["path"].startswith(("/mcp", "/ui", "/gradio")):
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = dict(scope, headers=headers + [(b"content-type", b"application/json")])
        await self.app(scope, receive, send)
