"""The helpers every side shares: one bearer-header parser, one retry policy type, one
token-count limit and one shape for spend tokens and keys; and none of them copied back."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hf_escrow import challenge, http_client
from hf_escrow.buyer import datasets
from hf_escrow.credentials import (API_KEY_PREFIX, MAX_TOKEN_CHARS, SPEND_TOKEN_PREFIX, bearer, new_api_key,
                                   new_spend_token)
from hf_escrow.ledger import core
from hf_escrow.pricing import MAX_TOKENS_PER_CALL
from hf_escrow.retries import Backoff

PACKAGE = Path(__file__).resolve().parents[1] / "hf_escrow"


@pytest.mark.parametrize("header, key", [
    ("Bearer hfe_abc", "hfe_abc"), ("bearer  hfe_abc ", "hfe_abc"), ("BEARER x", "x"), ("Bearer ", ""),
    (None, None), ("", None), ("Basic dXNlcjpwdw==", None), ("Bearerhfe_abc", None), ("hfe_abc", None),
])
def test_bearer_reads_the_key_of_an_authorization_header(header, key):
    assert bearer(header) == key


def test_a_buyer_key_sent_as_a_bearer_to_a_seller_is_refused_and_nothing_else_is():
    with pytest.raises(Exception, match="key"):
        challenge.spend_token_from({"authorization": f"Bearer {new_api_key()}"})
    assert challenge.spend_token_from({"Authorization": "Bearer someone-elses-token"}) is None
    assert challenge.spend_token_from({"X-Escrow-Token": "est_x", "Authorization": "Bearer hfe_y"}) == "est_x"


def test_minted_credentials_have_the_shapes_every_side_checks():
    token, key = new_spend_token(), new_api_key()
    assert token.startswith(SPEND_TOKEN_PREFIX) and key.startswith(API_KEY_PREFIX)
    assert len(token) <= MAX_TOKEN_CHARS and len(key) <= MAX_TOKEN_CHARS and token != new_spend_token()
    assert challenge.check_token(token) == token


def test_the_three_retry_loops_wait_as_they_always_did():
    ledger, pay, http = core.LOCK_BACKOFF, datasets.PAY_BACKOFF, http_client.BACKOFF
    assert [ledger.delay_s(n) for n in range(7)] == pytest.approx([0.005 * (n + 1) for n in range(7)])
    assert core.MAX_ATTEMPTS == ledger.tries == 8 and ledger.last(7) and not ledger.last(6)
    assert [pay.delay_s(n) for n in range(2)] == pytest.approx([0.2, 0.4]) and pay.tries == 3
    for attempt in range(8):
        full = min(3.0, 0.2 * 2 ** attempt)
        waits = {http.delay_s(attempt) for _ in range(50)}
        assert all(full / 2 <= wait <= full for wait in waits) and len(waits) > 1   # jittered, never past the cap
    assert not http.last(100)   # the HTTP client counts its own tries (max_retries)
    assert Backoff(1.0, exponential=True).delay_s(3) == 8.0


def _code(path: Path) -> str:
    """The file's lines but its doctest examples (they show what a caller sees, not a definition)."""
    return "\n".join(line for line in path.read_text().splitlines() if ">>>" not in line)


def test_each_limit_and_shape_is_written_once():
    sources = {path.relative_to(PACKAGE).as_posix(): _code(path) for path in PACKAGE.rglob("*.py")}
    written = {
        "token-count limit": (re.compile(r"\ble=10_000_000\b|^\w+ = 10_000_000\s*(#.*)?$", re.M), {"pricing.py"}),
        "spend token prefix": (re.compile(r"[\"']est_[\"']"), {"credentials.py"}),
        "API key prefix": (re.compile(r"[\"']hfe_[\"'] \+|= [\"']hfe_[\"']"), {"credentials.py"}),
        "token length bound": (re.compile(r"^MAX_TOKEN_CHARS = ", re.M), {"credentials.py"}),
        "bearer parsing": (re.compile(r"startswith\([\"']bearer "), {"credentials.py"}),
    }
    for what, (pattern, allowed) in written.items():
        found = {name for name, text in sources.items() if pattern.search(text)}
        assert found == allowed, f"the {what} is written in {sorted(found)}; import it from {sorted(allowed)}"
    assert MAX_TOKENS_PER_CALL == 10_000_000
