"""What credentials look like on the wire, the same for every side: the spend token a seller
is paid with (`est_...`), the API key an agent acts with (`hfe_...`), the length past which
either is refused unread, and the key an `Authorization: Bearer` header carries.

Standard library only: the ledger mints and checks these as the HTTP faces and clients do.
"""

from __future__ import annotations

import secrets

SPEND_TOKEN_PREFIX = "est_"
API_KEY_PREFIX = "hfe_"
MAX_TOKEN_CHARS = 80       # a token or key as minted has 47 characters; anything far longer is not one
_SECRET_BYTES = 32


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)


def new_spend_token() -> str:
    return SPEND_TOKEN_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)


def bearer(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` header (scheme case-blind), else None."""
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None
