"""The faucet at the server: when it pays, who may claim for whom, and how often.

A claim needs a key: the claimant's own, or that of the agent that registered it (a
registration that carries a key makes the new agent that key's agent's own). A keyed claim
for an id nobody registered registers it as the caller's own first: the vLLM guide claims
for a worker it never registered. Registrations and claims are limited per client (IP)
and in all, over a sliding window, in each server process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from typing import Mapping

from .._exceptions import EscrowError, Forbidden, StateConflict, ValidationError
from ..ledger import Ledger
from ..ledger.idempotency import check_key
from ..limits import WindowLimiter, is_loopback
from .wire import with_usdc



def faucet_switch(value: str | None) -> bool | None:
    """HF_ESCROW_FAUCET as the operator said it: True (on), False (off), None (not said)."""
    value = (value or "").strip().lower()
    if value in ("0", "false", "off", "no"):
        return False
    return True if value in ("1", "true", "on", "yes") else None


@dataclass(frozen=True)
class FaucetSettings:
    """`enabled` None: the faucet pays only connections that arrive on a loopback address,
    which is all of them when the server binds only to loopback."""

    enabled: bool | None = None
    per_client: int = 10
    overall: int = 500
    window_s: int = 3600

    def __post_init__(self):
        if self.per_client < 1 or self.overall < 1 or self.window_s < 1:
            raise ValidationError("faucet limits and their window must be at least 1")

    @classmethod
    def resolve(cls, given: "FaucetSettings | None" = None,
                env: Mapping[str, str] = os.environ) -> "FaucetSettings":
        """`given`, or the environment's: HF_ESCROW_FAUCET (1 turns it on; 0 switches it off,
        and wins over everything, `given` included), HF_ESCROW_FAUCET_PER_CLIENT and
        HF_ESCROW_FAUCET_GLOBAL (registrations, and claims, per HF_ESCROW_FAUCET_WINDOW_S)."""
        switch = faucet_switch(env.get("HF_ESCROW_FAUCET"))
        if given is None:
            try:
                given = cls(enabled=switch,
                            per_client=int(env.get("HF_ESCROW_FAUCET_PER_CLIENT", cls.per_client)),
                            overall=int(env.get("HF_ESCROW_FAUCET_GLOBAL", cls.overall)),
                            window_s=int(env.get("HF_ESCROW_FAUCET_WINDOW_S", cls.window_s)))
            except ValueError as error:
                raise ValidationError(f"bad faucet setting in the environment: {error}") from None
        return dataclasses.replace(given, enabled=False) if switch is False else given


class Faucet:
    """Registration and claims with the server's rules, shared by REST and MCP."""

    def __init__(self, ledger: Ledger, settings: FaucetSettings):
        self.ledger = ledger
        self.settings = settings
        limits = {"per_client": settings.per_client, "overall": settings.overall, "window_s": settings.window_s}
        self.registrations = WindowLimiter("registrations", **limits)
        self.claims = WindowLimiter("claims", **limits)

    def view(self) -> dict:
        """The settings, for the operator."""
        enabled = self.settings.enabled
        return with_usdc({
            "enabled": "loopback only" if enabled is None else enabled, "per_client": self.settings.per_client,
            "global": self.settings.overall, "window_s": self.settings.window_s,
            "amount_micro": self.ledger.config.faucet_amount_micro,
            "interval_s": self.ledger.config.faucet_interval_s})

    def register(self, agent_id: str, referral_code: str | None, *, owner: str | None, client: str) -> dict:
        """Register an agent (`owner`'s own when given); its API key is in the answer, once."""
        self.registrations.take(client)
        return self.ledger.register(agent_id, referral_code, owner=owner)

    def claim(self, agent_id: str, *, caller: str, client: str, local_host: str | None,
              idempotency_key: str | None = None) -> dict:
        """Credit test USDC to `agent_id`, claimed by `caller` (itself or its owner)."""
        if not (self.settings.enabled if self.settings.enabled is not None else is_loopback(local_host)) \
                or not self.ledger.config.faucet_enabled:
            raise Forbidden("the faucet is off on this server: it is on by default only on a server bound to "
                            "loopback; its operator turns it on with HF_ESCROW_FAUCET=1 (hf-escrow serve --faucet)")
        key = check_key(idempotency_key)
        self.claims.take(client)
        registered = self._owned(agent_id, caller, client)
        if agent_id != caller and key is not None:
            # The owner's keys live in a namespace of their own, never among the agent's.
            key = f"claim-by-{caller}-{hashlib.sha256(key.encode('utf-8')).hexdigest()[:40]}"
        try:
            result = with_usdc(self.ledger.claim_faucet(agent_id, idempotency_key=key))
        except EscrowError as error:
            if registered:  # the new agent exists now: its key must not be lost with the refusal
                error.details = {**error.details, "registered": registered}
            raise
        return dict(result, registered=registered) if registered else result

    def _owned(self, agent_id: str, caller: str, client: str) -> dict | None:
        """Refuse a claim for another's agent; an id nobody registered becomes the caller's
        own first (its registration, with its key, is returned to the caller)."""
        if agent_id == caller or self.ledger.owner_of(agent_id) == caller:
            return None
        self.registrations.take(client)
        try:
            return self.ledger.register(agent_id, owner=caller)
        except StateConflict:  # registered before: by another, or by a twin of this request
            if self.ledger.owner_of(agent_id) == caller:
                return None
            raise Forbidden(f"only {agent_id!r} itself, or the agent that registered it, may claim for it; "
                            "send that agent's key") from None
