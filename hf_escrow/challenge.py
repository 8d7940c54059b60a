"""The payment challenge every paid face answers: one machine-readable 402.

A program that meets a paid face for the first time learns from its answer how to pay:
the scheme (``hf-escrow``), the escrow server that holds the money, the seller to open
an escrow for, the price sheet, the smallest useful escrow and the header that carries
the spend token. A refusal also says why, as one of `REASONS`. The same facts travel
three ways, so that any client can read them:

- the JSON body of the 402: the face's error shape (``{error, message, details}``; the
  gateway's OpenAI ``{error: {message, type, code}}``, `code` the reason) plus the facts;
- the ``X-Escrow-Challenge`` response header (the body's facts as base64url JSON), for
  clients that hand their caller only headers and a status;
- the discovery document at ``/.well-known/hf-escrow`` on every face, to learn the price
  before the first call.

Gradio's queue cannot answer 402, so a gated handler raises ``gr.Error`` whose message
ends with `GRADIO_MARK` followed by the same JSON (`from_text` reads it back).

Everything here is pure: faces build an `Offer` once and render refusals with it.

Example:
    >>> offer = Offer(seller="my-space", escrow_server="http://127.0.0.1:8787",
    ...               pricing={"per_call": "0.001"}, min_escrow_micro=1_000)
    >>> status, body, headers = offer.refusal(PaymentRequired("send a token", details={"reason": NO_TOKEN}))
    >>> status, body["reason"], body["seller"], body["token_header"]
    (402, 'no_token', 'my-space', 'X-Escrow-Token')
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from ._exceptions import EscrowError, PaymentRequired, ValidationError
from .credentials import API_KEY_PREFIX, MAX_TOKEN_CHARS, SPEND_TOKEN_PREFIX, bearer
from .money import format_usdc

SCHEME = "hf-escrow"
VERSION = 1
TOKEN_HEADER = "X-Escrow-Token"
CHALLENGE_HEADER = "X-Escrow-Challenge"
WELL_KNOWN_PATH = "/.well-known/hf-escrow"
GRADIO_MARK = "hf-escrow-402:"
MAX_CHALLENGE_CHARS = 16_384       # a challenge is a few hundred bytes; refuse to parse a flood

NO_TOKEN = "no_token"                            # nothing in X-Escrow-Token
API_KEY_SENT = "api_key_sent"                    # a buyer API key instead of a spend token
TOKEN_MALFORMED = "token_malformed"              # not a spend token at all
TOKEN_REFUSED = "token_unknown_or_revoked"       # unknown, revoked, or paying another seller
ESCROW_CLOSED = "escrow_closed"                  # released, cancelled, expired (or takes no holds)
INSUFFICIENT = "insufficient_remaining"          # too little left for this work
REASONS = (NO_TOKEN, API_KEY_SENT, TOKEN_MALFORMED, TOKEN_REFUSED, ESCROW_CLOSED, INSUFFICIENT)

__all__ = ["Offer", "Challenge", "REASONS", "TOKEN_HEADER", "CHALLENGE_HEADER", "WELL_KNOWN_PATH", "GRADIO_MARK",
           "tag", "reason_of", "server_id", "from_response", "from_text", "parse"]


def tag(error: EscrowError, reason: str) -> EscrowError:
    """Mark a refusal at admission with its reason (the face then answers it as a challenge)."""
    if reason not in REASONS:
        raise ValueError(f"unknown payment reason {reason!r}")
    error.details = {**(error.details or {}), "reason": reason}
    return error


def reason_of(error: BaseException) -> str | None:
    """The payment reason of a refusal `tag` marked, else None (an error that is not about paying)."""
    details = getattr(error, "details", None)
    reason = details.get("reason") if isinstance(details, dict) else None
    return reason if reason in REASONS else None


def server_id(client: Any) -> str | None:
    """Who holds the money for an escrow client: its server's URL, or a name for an embedded ledger.

    Two clients on the same embedded database get the same name (a digest of the database
    URL with any password hidden), so a face and its buyers on one machine recognise each
    other; nothing else about the database is shown.
    """
    transport = getattr(client, "_transport", None)
    transport = getattr(transport, "_sync", transport)
    base_url = getattr(transport, "base_url", None)
    if isinstance(base_url, str):
        return normalize_server(base_url)
    engine = getattr(getattr(transport, "ledger", None), "engine", None)
    if engine is not None:
        # SQLAlchemy's str(URL) masks the password.
        return "embedded:" + hashlib.sha256(str(engine.url).encode()).hexdigest()[:16]
    return None


def normalize_server(url: str) -> str:
    """A server URL in the one spelling compared: scheme and host lower-cased, no trailing slash."""
    url = url.strip().rstrip("/")
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    host, slash, path = rest.partition("/")
    return f"{scheme.lower()}://{host.lower()}{slash}{path}"


@dataclass(frozen=True)
class Offer:
    """What a face sells and how to pay for it; renders refusals and the discovery document.

    Args:
        seller: the agent id buyers open escrows for.
        escrow_server: the escrow server buyers must use (`server_id` of the seller's client).
        pricing: the price sheet (`Pricing.to_dict()`, or e.g. ``{"per_call": "0.001"}``).
        min_escrow_micro: the smallest escrow that buys one unit of work.
    """

    seller: str
    escrow_server: str | None
    pricing: Mapping[str, str]
    min_escrow_micro: int
    extra: Mapping[str, Any] = field(default_factory=dict)   # face-specific facts (e.g. max_tokens)

    def document(self) -> dict:
        """The discovery document served at ``/.well-known/hf-escrow``."""
        return {"scheme": SCHEME, "version": VERSION, "escrow_server": self.escrow_server, "seller": self.seller,
                "currency": "USDC", "pricing": dict(self.pricing), "min_escrow_micro": self.min_escrow_micro,
                "min_escrow_usdc": format_usdc(self.min_escrow_micro), "token_header": TOKEN_HEADER,
                "discovery": WELL_KNOWN_PATH, **dict(self.extra)}

    def challenge(self, error: EscrowError) -> dict:
        """The refusal's body: the face's error shape, its reason and the offer's facts."""
        details = dict(error.details or {})
        reason = details.pop("reason", None) or NO_TOKEN
        body = {"error": error.code, "message": error.message, "reason": reason, **self.document()}
        for name in ("price_micro", "remaining_micro"):
            if isinstance(details.get(name), int):
                body[name] = details[name]
        if details:
            body["details"] = details
        return body

    def refusal(self, error: EscrowError) -> tuple[int, dict, dict[str, str]]:
        """(402, body, headers) for a payment refusal."""
        body = self.challenge(error)
        return 402, body, {CHALLENGE_HEADER: encode_header(body)}

    def gradio_message(self, error: EscrowError) -> str:
        """A gr.Error message: the human text, then `GRADIO_MARK` and the challenge's JSON."""
        return f"{error.message} {GRADIO_MARK}{json.dumps(self.challenge(error), separators=(',', ':'))}"


def encode_header(body: Mapping[str, Any]) -> str:
    """The challenge's facts (not its human message) as one header value, base64url JSON."""
    facts = {k: v for k, v in body.items() if k not in ("message", "details")}
    return base64.urlsafe_b64encode(json.dumps(facts, separators=(",", ":")).encode()).decode()


# ---- the buyer's side: reading a challenge ------------------------------------------------


@dataclass(frozen=True)
class Challenge:
    """A challenge as a payer reads it (only hf-escrow challenges parse)."""

    reason: str
    seller: str
    escrow_server: str | None
    pricing: Mapping[str, str]
    min_escrow_micro: int
    price_micro: int | None       # the refused work's worst case, when the face knew it
    raw: Mapping[str, Any]


def parse(data: Any) -> Challenge | None:
    """A `Challenge` from a decoded body, header or document; None when it is not hf-escrow's."""
    if not isinstance(data, Mapping) or data.get("scheme") != SCHEME or data.get("version") != VERSION:
        return None
    seller, minimum = data.get("seller"), data.get("min_escrow_micro")
    pricing, price = data.get("pricing"), data.get("price_micro")
    server = data.get("escrow_server")
    if not isinstance(seller, str) or not seller or not _whole(minimum) or minimum <= 0 \
            or not isinstance(pricing, Mapping) or (server is not None and not isinstance(server, str)):
        return None
    reason = data.get("reason", NO_TOKEN)
    return Challenge(reason=reason if reason in REASONS else "unknown", seller=seller,
                     escrow_server=normalize_server(server) if server else None, pricing=dict(pricing),
                     min_escrow_micro=minimum, price_micro=price if _whole(price) and price > 0 else None, raw=data)


def from_response(status: int, headers: Mapping[str, str], body: bytes | str | None) -> Challenge | None:
    """The challenge of a 402 answer (its JSON body, else its header); None for any other answer."""
    if status != 402:
        return None
    if body:
        found = parse(_json(body))
        if found is not None:
            return found
    header = next((v for k, v in headers.items() if k.lower() == CHALLENGE_HEADER.lower()), None)
    if header and len(header) <= MAX_CHALLENGE_CHARS:
        try:
            return parse(_json(base64.urlsafe_b64decode(header.encode())))
        except (binascii.Error, ValueError):
            return None
    return None


def from_text(text: str) -> Challenge | None:
    """The challenge inside an error message (a Gradio ``gr.Error``), if it carries one."""
    if not isinstance(text, str) or GRADIO_MARK not in text:
        return None
    tail = text.split(GRADIO_MARK, 1)[1].strip()[:MAX_CHALLENGE_CHARS]
    try:   # Gradio may append to the message: read the one JSON object that follows the mark
        return parse(json.JSONDecoder().raw_decode(tail)[0])
    except ValueError:
        return None


def _json(raw: bytes | str) -> Any:
    if len(raw) > MAX_CHALLENGE_CHARS:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---- the spend token a request carries ----------------------------------------------

def spend_token_from(headers: Mapping[str, str] | None) -> str | None:
    """The spend token a request carries in ``X-Escrow-Token`` (headers matched case-blind).

    A buyer API key sent instead (as the token, or as ``Authorization: Bearer hfe_...``
    with no token) is refused: keys never belong with a seller.
    """
    lowered = {str(k).lower(): str(v) for k, v in (headers or {}).items()}
    token = lowered.get(TOKEN_HEADER.lower(), "").strip()
    if not token and (bearer(lowered.get("authorization")) or "").startswith(API_KEY_PREFIX):
        raise _key_sent()
    return token or None


def check_token(token: Any) -> str:
    """A spend token as given, or PaymentRequired saying what to send instead."""
    if token is None or (isinstance(token, str) and not token.strip()):
        raise tag(PaymentRequired(
            f"this is a paid endpoint: send the escrow's spend token in the {TOKEN_HEADER} header (create_escrow "
            "returns it as spend_token; mint_spend_token makes more)"), NO_TOKEN)
    if not isinstance(token, str) or len(token.strip()) > MAX_TOKEN_CHARS:
        raise _malformed(f"{TOKEN_HEADER} must be a spend token such as est_...")
    token = token.strip()
    if token.startswith(API_KEY_PREFIX):
        raise _key_sent()
    if not token.startswith(SPEND_TOKEN_PREFIX):
        raise _malformed(f"{TOKEN_HEADER} must be a spend token (est_...), the secret create_escrow returned")
    return token


def _malformed(message: str) -> ValidationError:
    return tag(ValidationError(message), TOKEN_MALFORMED)


def _key_sent() -> PaymentRequired:
    return tag(PaymentRequired(
        f"that is a buyer API key: never send it to a seller. Send the escrow's spend token (est_..., returned by "
        f"create_escrow as spend_token) in the {TOKEN_HEADER} header"), API_KEY_SENT)
