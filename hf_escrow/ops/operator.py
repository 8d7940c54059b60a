"""The operator's key: who may read ledger-wide figures, metrics and settings.

One rule for every HTTP face (the escrow server, the gateway, the shard server):
`Authorization: Bearer $HF_ESCROW_ADMIN_KEY`, compared in constant time. An agent's key
is never enough.
"""

from __future__ import annotations

import hmac
import os
from typing import Callable

from .._exceptions import Forbidden, Unauthorized, ValidationError
from ..credentials import bearer

MIN_ADMIN_KEY_CHARS = 16


def admin_key(given: str | None = None) -> str | None:
    """`given`, else `$HF_ESCROW_ADMIN_KEY`; refused when too short to be a secret."""
    key = given if given is not None else os.environ.get("HF_ESCROW_ADMIN_KEY") or None
    if key is not None and len(key) < MIN_ADMIN_KEY_CHARS:
        raise ValidationError(f"the operator key (HF_ESCROW_ADMIN_KEY) must have at least {MIN_ADMIN_KEY_CHARS} "
                              "characters")
    return key


def check_operator(authorization: str | None, key: str | None,
                   authenticate: Callable[[str | None], str] | None = None, hint: str = "") -> None:
    """Return when the header carries the operator's key; else 401 (no key, or one nobody
    knows) or 403 (an agent's key). `authenticate` tells an agent's key from a wrong one."""
    token = bearer(authorization)
    if token is not None and key is not None and hmac.compare_digest(token.encode(), key.encode()):
        return
    if authenticate is not None:
        authenticate(token)  # no key or an unknown one: 401, as everywhere
    elif token is None:
        raise Unauthorized("this is an operator route: send Authorization: Bearer <HF_ESCROW_ADMIN_KEY>")
    raise Forbidden("this is an operator route: it takes the operator's key (HF_ESCROW_ADMIN_KEY), not an "
                    "agent's" + ("" if key is not None else "; this server was started without one") + hint)
