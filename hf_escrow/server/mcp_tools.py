"""MCP tools over the ledger, for agents: streamable HTTP at `/mcp`, or stdio (`hf-escrow mcp`).

Over HTTP the caller's `Authorization: Bearer <key>` decides who acts, as for the REST
API; over stdio there are no headers, so the key (or, embedded, the agent) comes from the
environment of the process that the desktop agent starts.
"""

from __future__ import annotations

import functools
import os
from typing import Annotated, Any, Optional

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from pydantic import Field

from .._exceptions import EscrowError, Unauthorized, ValidationError
from ..credentials import bearer
from ..ledger import Ledger
from .bodies import Amount, Score
from .faucet import Faucet, FaucetSettings
from ..limits import client_key
from ..pricing import MAX_TOKENS_PER_CALL
from .wire import escrow_view, receipt_view, with_usdc

# Strict, as the REST bodies: a JSON `true` is never an amount, a number or a token count.
Tokens = Annotated[int, Field(strict=True, ge=0, le=MAX_TOKENS_PER_CALL)]
Flag = Annotated[bool, Field(strict=True)]


def build_mcp(ledger: Ledger, *, stdio_agent: str | None = None, faucet: Faucet | None = None) -> MCPServer:
    """An MCP server whose tools act on `ledger`.

    `stdio_agent` names who acts when a call carries no Authorization header (stdio);
    else `$HF_ESCROW_API_KEY` is used to find the agent. `faucet` (shared with the REST
    routes when served together) decides registrations and claims.
    """
    faucet = faucet or Faucet(ledger, FaucetSettings.resolve())
    server = MCPServer("hf-escrow", log_level="WARNING",
                       instructions="Escrow for pay-per-use AI work: register, claim test USDC, lock funds "
                                    "for a seller, deduct or release as work is delivered, or hold and "
                                    "capture per piece of work.")

    def caller(ctx: Context | None) -> str:
        headers = ctx.headers if ctx is not None else None
        key = bearer(headers.get("authorization")) if headers else None
        if key is not None:
            return ledger.authenticate(key)
        if headers is None:
            if stdio_agent:
                return stdio_agent
            return ledger.authenticate(os.environ.get("HF_ESCROW_API_KEY"))
        raise Unauthorized("send 'Authorization: Bearer <key>' with MCP calls (register_agent gives a key)")

    def keyed_caller(ctx: Context | None) -> str | None:
        """The agent whose key an HTTP call carries, or None without one (and over stdio)."""
        auth = ctx.headers.get("authorization") if ctx is not None and ctx.headers else None
        return caller(ctx) if auth else None

    def origin(ctx: Context | None) -> tuple[str, str | None]:
        """(client, local address) of the call, for the faucet; stdio is this machine."""
        request = getattr(ctx.request_context, "request", None) if ctx is not None else None
        if request is None or not hasattr(request, "scope"):
            return "stdio", "localhost"
        server = request.scope.get("server")
        return client_key(request.client.host if request.client else None), server[0] if server else None

    def tool(fn):
        """Run the ledger call off the event loop; escrow errors become tool errors with their message."""
        @functools.wraps(fn)
        async def wrapper(*args, **kwargs):
            try:
                return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))
            except EscrowError as error:
                raise ToolError(f"{error.code} ({error.status_code}): {error.message}") from None
        return server.tool()(wrapper)

    @tool
    def register_agent(agent_id: str, referral_code: Optional[str] = None,
                       ctx: Context | None = None) -> dict[str, Any]:
        """Register a new agent and claim its first test USDC; returns its api_key (shown once),
        wallet, referral code and the claim (or why the faucet refused it). With a key, the new
        agent is that key's agent's own."""
        client, local = origin(ctx)
        registered = faucet.register(agent_id, referral_code, owner=keyed_caller(ctx), client=client)
        try:
            claim = faucet.claim(agent_id, caller=agent_id, client=client, local_host=local)
        except EscrowError as error:
            return dict(registered, claim=None, claim_refused=f"{error.code} ({error.status_code}): {error.message}")
        return dict(registered, claim=claim)

    @tool
    def claim_faucet(agent_id: Optional[str] = None, ctx: Context | None = None) -> dict[str, Any]:
        """Credit free test USDC to you or to an agent you registered (rate-limited); an id nobody
        registered becomes yours first (its api_key is in `registered`)."""
        me = caller(ctx)
        client, local = origin(ctx)
        return faucet.claim(agent_id or me, caller=me, client=client, local_host=local)

    @tool
    def rotate_api_key(ctx: Context | None = None) -> dict[str, Any]:
        """A new API key for you (shown once); the key this call used stops working at once."""
        me = caller(ctx)
        return {"agent_id": me, "api_key": ledger.rotate_key(me)}

    @tool
    def escrow_create(seller_id: str, amount_usdc: Amount, ttl_seconds: Score = 3600,
                      description: Optional[str] = None, meta: Optional[dict[str, Any]] = None,
                      release_condition: Optional[dict[str, Any]] = None,
                      bonus_conditions: Optional[dict[str, Any]] = None, referral_code: Optional[str] = None,
                      idempotency_key: Optional[str] = None, ctx: Context | None = None) -> dict[str, Any]:
        """As the buyer: lock amount_usdc for seller_id (agent id or wallet) before work starts."""
        return escrow_view(ledger.create_escrow(
            caller(ctx), seller_id, amount_usdc, ttl_seconds=ttl_seconds, description=description, meta=meta,
            release_condition=release_condition, bonus_conditions=bonus_conditions, referral_code=referral_code,
            idempotency_key=idempotency_key))

    @tool
    def escrow_deduct(escrow_id: str, amount_usdc: Amount, reason: Optional[str] = None,
                      idempotency_key: Optional[str] = None, ctx: Context | None = None) -> dict[str, Any]:
        """As the seller: take amount_usdc out of the escrow for work delivered (1% fee)."""
        return receipt_view(ledger.deduct(caller(ctx), escrow_id, amount_usdc, reason=reason,
                                          idempotency_key=idempotency_key))

    @tool
    def escrow_release(escrow_id: str, amount_usdc: Optional[Amount] = None, refund_remainder: Flag = True,
                       prompt_tokens: Optional[Tokens] = None, completion_tokens: Optional[Tokens] = None,
                       price_per_token: Optional[Amount] = None, quality_score: Optional[Score] = None,
                       idempotency_key: Optional[str] = None, ctx: Context | None = None) -> dict[str, Any]:
        """As the buyer: pay amount_usdc (or tokens x price_per_token) and refund the rest."""
        usage = None
        if prompt_tokens is not None or completion_tokens is not None:
            usage = {"prompt_tokens": prompt_tokens or 0, "completion_tokens": completion_tokens or 0}
        return receipt_view(ledger.release(
            caller(ctx), escrow_id, amount_usdc, refund_remainder=refund_remainder, usage=usage,
            price_per_token=price_per_token, quality_score=quality_score, idempotency_key=idempotency_key))

    @tool
    def escrow_cancel(escrow_id: str, reason: Optional[str] = None, idempotency_key: Optional[str] = None,
                      ctx: Context | None = None) -> dict[str, Any]:
        """As buyer or seller: refund the whole remainder to the buyer."""
        return receipt_view(ledger.cancel(caller(ctx), escrow_id, reason=reason, idempotency_key=idempotency_key))

    @tool
    def escrow_submit_result(escrow_id: str, metric: str, score: Score, artifact: Optional[dict[str, Any]] = None,
                             milestone: Optional[Annotated[int, Field(strict=True, ge=1)]] = None,
                             idempotency_key: Optional[str] = None, ctx: Context | None = None) -> dict[str, Any]:
        """As the seller of a benchmark or milestone escrow: report the score with the artifact
        ({repo, revision, sha256}); milestone: which one (1 = the first; default: the next due)."""
        return receipt_view(ledger.submit_result(caller(ctx), escrow_id, metric=metric, score=score,
                                                 artifact=artifact, milestone=milestone,
                                                 idempotency_key=idempotency_key))

    @tool
    def escrow_verify(escrow_id: str, score: Score, idempotency_key: Optional[str] = None,
                      ctx: Context | None = None) -> dict[str, Any]:
        """As the named verifier: your own score on held-out data; a pass pays the result's share
        (a milestone's, or all), a fail leaves it open until the TTL."""
        return receipt_view(ledger.verify(caller(ctx), escrow_id, score=score, idempotency_key=idempotency_key))

    @tool
    def escrow_get(escrow_id: str, ctx: Context | None = None) -> dict[str, Any]:
        """One of your escrows with its events."""
        return escrow_view(ledger.get(caller(ctx), escrow_id))

    @tool
    def escrow_history(status: Optional[str] = None, limit: Annotated[int, Field(strict=True, ge=1, le=1000)] = 50,
                       ctx: Context | None = None) -> dict[str, Any]:
        """Your escrows, newest first."""
        rows = ledger.history(caller(ctx), status=status, limit=limit)
        return {"escrows": [escrow_view(e) for e in rows], "count": len(rows)}

    @tool
    def escrow_mint_token(escrow_id: str, ctx: Context | None = None) -> dict[str, Any]:
        """As the buyer: another spend token for an open escrow; give it to the seller's paid service."""
        return ledger.mint_spend_token(caller(ctx), escrow_id)

    @tool
    def escrow_revoke_tokens(escrow_id: str, ctx: Context | None = None) -> dict[str, Any]:
        """As the buyer: revoke every spend token of the escrow at once (open holds stay capturable)."""
        return ledger.revoke_spend_tokens(caller(ctx), escrow_id)

    @tool
    def escrow_hold(amount_usdc: Amount, spend_token: Optional[str] = None, escrow_id: Optional[str] = None,
                    ttl_seconds: Score = 60, idempotency_key: Optional[str] = None,
                    ctx: Context | None = None) -> dict[str, Any]:
        """Reserve amount_usdc of an escrow for one piece of work: by spend_token (as its seller) or by
        escrow_id (as buyer or seller). Then escrow_capture what the work cost, or escrow_void."""
        if (spend_token is None) == (escrow_id is None):
            raise ValidationError("give exactly one of spend_token or escrow_id")
        return with_usdc(ledger.hold(caller(ctx), spend_token or escrow_id, amount_usdc, ttl_seconds=ttl_seconds,
                                     idempotency_key=idempotency_key))

    @tool
    def escrow_capture(hold_id: str, amount_usdc: Amount, final: Flag = False,
                       prompt_tokens: Optional[Tokens] = None, completion_tokens: Optional[Tokens] = None,
                       idempotency_key: Optional[str] = None, ctx: Context | None = None) -> dict[str, Any]:
        """As the hold's maker: pay amount_usdc out of the hold to the seller (1% fee); final frees the rest."""
        usage = None
        if prompt_tokens is not None or completion_tokens is not None:
            usage = {"prompt_tokens": prompt_tokens or 0, "completion_tokens": completion_tokens or 0}
        return receipt_view(ledger.capture(caller(ctx), hold_id, amount_usdc, final=final, usage=usage,
                                           idempotency_key=idempotency_key))

    @tool
    def escrow_void(hold_id: str, idempotency_key: Optional[str] = None,
                    ctx: Context | None = None) -> dict[str, Any]:
        """As the hold's maker: free the hold's open part back to the escrow."""
        return receipt_view(ledger.void(caller(ctx), hold_id, idempotency_key=idempotency_key))

    @tool
    def escrow_holds(escrow_id: str, ctx: Context | None = None) -> dict[str, Any]:
        """The escrow's open holds (either party may ask)."""
        rows = ledger.holds(caller(ctx), escrow_id)
        return {"holds": [with_usdc(h) for h in rows], "count": len(rows)}

    @tool
    def key_mandate(ctx: Context | None = None) -> dict[str, Any]:
        """As a budgeted key: your mandate (budget, max per escrow, sellers, expiry) and what is left."""
        return with_usdc(ledger.key(caller(ctx)))

    @tool
    def key_create(budget_usdc: Amount, sellers: Optional[list[str]] = None, max_escrow_usdc: Optional[Amount] = None,
                   expires_in: Optional[Score] = None, label: Optional[str] = None,
                   idempotency_key: Optional[str] = None, ctx: Context | None = None) -> dict[str, Any]:
        """A key for a sub-agent (api_key shown once) that locks your money only within the mandate."""
        return with_usdc(ledger.create_key(caller(ctx), budget=budget_usdc, sellers=sellers,
                                           max_escrow=max_escrow_usdc, expires_in=expires_in, label=label,
                                           idempotency_key=idempotency_key))

    @tool
    def key_list(ctx: Context | None = None) -> dict[str, Any]:
        """Your budgeted keys with what each locked, paid, got back and has left."""
        rows = ledger.keys(caller(ctx))
        return {"keys": with_usdc(rows), "count": len(rows)}

    @tool
    def key_revoke(key_id: str, cancel_escrows: Flag = False, ctx: Context | None = None) -> dict[str, Any]:
        """Stop one of your keys at once; cancel_escrows also cancels its active escrows (refunded to you)."""
        return with_usdc(ledger.revoke_key(caller(ctx), key_id, cancel_escrows=cancel_escrows))

    # Creates the session manager that the FastAPI app mounts at /mcp; requests are
    # authenticated by bearer key, so the Host-header guard would only refuse proxies.
    server.streamable_http_app(transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False))
    return server
