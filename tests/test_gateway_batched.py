"""The gateway on the batched path (`create_gateway(..., lease_calls=N)`): plain answers and
embeddings reserve on a lease and are paid by its flush; streams keep a hold each.

The same tiny model server and relay as tests/test_gateway.py, on a real ledger.
"""

from __future__ import annotations

from .helpers import assert_audit_clean
from .test_gateway import SHEET, _escrow, _market, counter, prompt, tiny  # noqa: F401 - fixtures

NEVER_MS = 3_600_000     # flushes come from running out of room, and from the gateway's shutdown


def test_plain_answers_are_paid_by_the_lease_streams_by_their_own_hold(tmp_path, tiny, prompt):  # noqa: F811
    market_run = _market(tmp_path, tiny, lease_calls=4, flush_ms=NEVER_MS)
    market = next(market_run)
    escrow = _escrow(market.db, amount="0.05")
    for _ in range(6):   # more than one lease hold's worth: a renewal mid-way
        answer = market.post(escrow.spend_token, max_tokens=5)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 5
    streamed = market.stream(escrow.spend_token, 5)
    assert streamed["pieces"]
    next(market_run, None)          # the gateway shuts down: its leases pay and free everything
    view = market.ledger.get("buyer", escrow.id)
    stream_paid = view["paid_micro"] - 6 * SHEET.tokens_micro(prompt, 5)
    assert stream_paid > 0 and view["held_micro"] == 0
    assert view["tokens_out"] >= 6 * 5
    assert_audit_clean(market.ledger)


def test_a_revoked_token_stops_plain_answers_after_one_flush(tmp_path, tiny, prompt):  # noqa: F811
    market_run = _market(tmp_path, tiny, lease_calls=4, flush_ms=20)
    market = next(market_run)
    import hf_escrow
    escrow = _escrow(market.db, amount="0.05")
    assert market.post(escrow.spend_token, max_tokens=5).status_code == 200
    hf_escrow.connect(agent="buyer", database_url=market.db).revoke_spend_tokens(escrow.id)
    # Admitted until the lease's next flush (every 20 ms) renews its hold by token and is refused.
    admitted = 0
    for _ in range(500):
        answer = market.post(escrow.spend_token, max_tokens=5)
        if answer.status_code == 402:
            break
        assert answer.status_code == 200
        admitted += 1
    assert answer.status_code == 402 and answer.json()["reason"] == "token_unknown_or_revoked"
    assert [market.post(escrow.spend_token, max_tokens=5).status_code for _ in range(3)] == [402] * 3
    next(market_run, None)
    view = market.ledger.get("buyer", escrow.id)
    assert view["paid_micro"] == (1 + admitted) * SHEET.tokens_micro(prompt, 5) and view["held_micro"] == 0
    assert_audit_clean(market.ledger)
