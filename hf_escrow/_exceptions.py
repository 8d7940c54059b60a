"""The one error tree of hf-escrow, raised the same by the embedded and the HTTP client.

    EscrowError                      base; `.status_code` is the HTTP status it maps to
    ├── ValidationError      (422)   a request that can never succeed as written
    │   └── InvalidAmount    (422)   an amount that is not a positive, finite USDC value
    ├── Unauthorized         (401)   no key, or a key that matches no agent
    │   └── KeyInactive      (401)   a budgeted key its owner revoked, or past its expiry
    ├── Forbidden            (403)   a party acting outside its role
    │   ├── OutsideMandate   (403)   a budgeted key asked for what its mandate does not allow
    │   └── Declined         (403)   AutoPay will not pay a 402 (not its to pay, or outside its mandate)
    ├── NotFound             (404)   unknown escrow or agent (or not visible to the caller)
    ├── InsufficientFunds    (402)   balance, escrow remainder or hold too small; nothing moved
    │   └── BudgetExceeded   (402)   a budgeted key's budget has too little left
    ├── PaymentRequired      (402)   a paid face got no spend token (or a key instead of one)
    ├── StateConflict        (409)   the escrow's state forbids the operation
    ├── IdempotencyConflict  (409)   a key reused with a different request
    ├── RateLimited          (429)   faucet claimed too often
    ├── JobError             (422)   a fine-tuning job spec, its data or its run is unusable as asked
    │   └── ArtifactMismatch (422)   a submitted adapter is missing, unsafe or not the sha256 submitted
    ├── ArtifactError        (422)   an adapter folder is missing, unsafe to load or not what was submitted
    ├── ModelServerError     (503)   the local model server exited or never became healthy (also a RuntimeError)
    └── TransportError       (503)   the server could not be reached (HTTP client only)

Every error carries a message a person can act on; errors raised by the HTTP client
also carry the `response` they were built from. Each class has its own `code`: a server
answers ``{"error": code, "message": ..., "details": ...}`` (the gateway: OpenAI's
``{"error": {"type": code, "message": ...}}``) and `error_for_status` rebuilds the same class.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "EscrowError",
    "ValidationError",
    "InvalidAmount",
    "Unauthorized",
    "KeyInactive",
    "Forbidden",
    "OutsideMandate",
    "Declined",
    "NotFound",
    "InsufficientFunds",
    "BudgetExceeded",
    "PaymentRequired",
    "StateConflict",
    "IdempotencyConflict",
    "RateLimited",
    "JobError",
    "ArtifactMismatch",
    "ArtifactError",
    "ModelServerError",
    "TransportError",
    "error_for_status",
]


class EscrowError(Exception):
    """Base of every hf-escrow error."""

    status_code: int = 500
    code: str = "escrow_error"

    def __init__(self, message: str, *, response: Any = None, details: dict | None = None):
        super().__init__(message)
        self.message = message
        self.response = response
        self.details = details or {}

    def to_dict(self) -> dict:
        return {"error": self.code, "message": self.message, **({"details": self.details} if self.details else {})}


class ValidationError(EscrowError):
    status_code = 422
    code = "validation_error"


class InvalidAmount(ValidationError):
    code = "invalid_amount"


class Unauthorized(EscrowError):
    status_code = 401
    code = "unauthorized"


class KeyInactive(Unauthorized):
    """A budgeted key that its owner revoked or that is past its expiry: it can do nothing more."""

    code = "key_inactive"


class Forbidden(EscrowError):
    status_code = 403
    code = "forbidden"


class OutsideMandate(Forbidden):
    """A budgeted key asked for a seller, an amount or an operation its mandate does not allow."""

    code = "outside_mandate"


class Declined(Forbidden):
    """AutoPay will not pay this challenge (not hf-escrow's, another escrow server, outside
    its mandate): the caller gets the 402 as the face sent it."""

    code = "autopay_declined"


class NotFound(EscrowError):
    status_code = 404
    code = "not_found"


class InsufficientFunds(EscrowError):
    status_code = 402
    code = "insufficient_funds"


class BudgetExceeded(InsufficientFunds):
    """A budgeted key would lock more than its budget has left; nothing moved."""

    code = "budget_exceeded"


class PaymentRequired(EscrowError):
    """A paid face was called without a spend token: nothing was checked, nothing ran."""

    status_code = 402
    code = "payment_required"


class StateConflict(EscrowError):
    status_code = 409
    code = "state_conflict"


class IdempotencyConflict(EscrowError):
    status_code = 409
    code = "idempotency_conflict"


class RateLimited(EscrowError):
    status_code = 429
    code = "rate_limited"


class JobError(EscrowError):
    """A job spec, its data or its run is not usable as asked; the message says how to fix it."""

    status_code = 422
    code = "job_error"


class ArtifactMismatch(JobError):
    """The submitted adapter is missing, unsafe, or does not hash to the submitted sha256.

    The verifier then records a failing verdict (the escrow goes back to active until its
    TTL refunds it, unless the seller submits a sound artifact); `verdict` says what it did
    (`hf_escrow.finetune.Verdict`, None when rebuilt from a server's answer).
    """

    code = "artifact_mismatch"

    def __init__(self, message: str, verdict: Any = None, *, response: Any = None, details: dict | None = None):
        super().__init__(message, response=response, details=details)
        self.verdict = verdict


class ArtifactError(EscrowError):
    """The adapter folder is missing, unsafe to load, or not what was submitted."""

    status_code = 422
    code = "artifact_error"


class ModelServerError(EscrowError, RuntimeError):
    """The local model server exited, or did not become healthy in time."""

    status_code = 503
    code = "model_server_error"


class TransportError(EscrowError):
    status_code = 503
    code = "transport_error"


_BY_CODE = {
    cls.code: cls
    for cls in (
        ValidationError, InvalidAmount, Unauthorized, KeyInactive, Forbidden, OutsideMandate, Declined,
        NotFound, InsufficientFunds, BudgetExceeded, PaymentRequired, StateConflict, IdempotencyConflict, RateLimited,
        JobError, ArtifactMismatch, ArtifactError, ModelServerError, TransportError,
    )
}
_BY_STATUS = {401: Unauthorized, 403: Forbidden, 404: NotFound, 402: InsufficientFunds,
              409: StateConflict, 422: ValidationError, 400: ValidationError, 429: RateLimited}


def error_for_status(status_code: int, body: Any, *, response: Any = None) -> EscrowError:
    """Rebuild the error a server sent: by its `error` code, else by the HTTP status.

    Reads our own body (`{"error": code, "message": ...}`) and OpenAI's, which the gateway
    answers in (`{"error": {"type": code, "code": ..., "message": ...}}`); anything else falls
    back to the status.
    """
    fields = body if isinstance(body, dict) else {}
    if isinstance(fields.get("error"), dict):
        fields = fields["error"]
    message = fields.get("message")
    if not isinstance(message, str) or not message:
        message = f"server answered HTTP {status_code}: {str(body)[:200]}"
    # Ours names the class in `error`; the gateway's OpenAI shape in `type` (its `code` is a
    # 402's payment reason); another OpenAI-shaped server may put one of our codes in `code`.
    codes = [fields.get(name) for name in ("error", "type", "code")]
    cls = next((_BY_CODE[code] for code in codes if isinstance(code, str) and code in _BY_CODE), None) \
        or _BY_STATUS.get(status_code, EscrowError)
    details = fields.get("details")
    return cls(message, response=response, details=details if isinstance(details, dict) else None)
