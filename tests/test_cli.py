"""`hf-escrow` through typer's CliRunner: on the embedded ledger ($HF_ESCROW_HOME, set per
test by conftest) and with --url against a live server. Tables for people, --json for
scripts, exit 2 with the message on an escrow error."""

from __future__ import annotations

import json
import os
import time
from decimal import Decimal

import pytest
from sqlalchemy import update
from typer.testing import CliRunner

from rich.console import Console

from hf_escrow import cli as cli_module
from hf_escrow.cli import app
from hf_escrow.ledger import Ledger
from hf_escrow.ledger.schema import accounts
from hf_escrow.server import create_app

from .helpers import assert_audit_clean
from .liveserver import serve_app

runner = CliRunner()


def cli(*args: str, code: int = 0):
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == code, (args, result.exit_code, result.output)
    return result


def cli_json(*args: str):
    return json.loads(cli(*args, "--json").stdout)


def flat(text: str) -> str:
    """Rich wraps long lines at the console width: compare text with whitespace collapsed."""
    return " ".join(text.split())


@pytest.fixture
def wide(monkeypatch):
    """A 200-column console: at the default 80 columns rich ellipsizes the escrow table's ids,
    statuses and amounts ("esc_8…", "cance…", "1.500…")."""
    monkeypatch.setattr(cli_module, "console", Console(width=200))


def embedded_db() -> str:
    return f"sqlite:///{os.environ['HF_ESCROW_HOME']}/ledger.db"


def test_embedded_lifecycle_tables_and_json(wide):
    out = cli("register", "buyer").stdout
    assert "registered buyer" in out and "api_key: hfe_" in out and "wallet: 0x" in out
    seller = cli_json("register", "seller")
    assert seller["agent_id"] == "seller" and seller["api_key"].startswith("hfe_") and seller["referred_by"] is None

    assert "credited 10.000000 USDC" in cli("claim", "--agent", "buyer").stdout
    balance = flat(cli("balance", "--agent", "buyer").stdout)
    assert "buyer: 10.000000 USDC, 0 open escrows" in balance and "referral code ref_" in balance
    me = cli_json("balance", "--agent", "buyer")
    assert (me["agent_id"], me["balance"], me["escrows_open"]) == ("buyer", "10.000000", 0)

    e = cli_json("create", "seller", "1.5", "--agent", "buyer", "--meta", '{"model": "gemma-3-270m"}',
                 "--description", "chat batch", "--ttl", "600")
    assert (e["status"], e["buyer"], e["seller"], e["amount"], e["remaining"]) == \
        ("active", "buyer", "seller", "1.500000", "1.500000")
    assert e["model"] == "gemma-3-270m" and e["description"] == "chat batch"
    table = cli("create", seller["wallet"], "0.5", "--agent", "buyer").stdout  # seller named by wallet
    assert "escrow esc_" in table and "active" in table and "│ seller │" in table and "0.500000" in table

    receipt = flat(cli("deduct", e["id"], "0.25", "--agent", "seller", "--reason", "batch 1").stdout)
    assert "deduct receipt for" in receipt and "status: active" in receipt
    for row in ("gross │ 0.250000", "fee │ 0.002500", "net │ 0.247500", "remaining │ 1.250000"):
        assert row in receipt, receipt
    d = cli_json("deduct", e["id"], "0.0000015", "--agent", "seller")  # 1.5 micro: half-even to 2
    assert (d["gross"], d["rounded_from"], d["remaining"]) == ("0.000002", "0.0000015", "1.249998")
    assert "rounded half-even" in cli("deduct", e["id"], "0.0000025", "--agent", "seller").stdout  # -> 2 micro

    r = cli_json("release", e["id"], "0.5", "--agent", "buyer")
    assert (r["kind"], r["status"], r["gross"], r["net"], r["fee"]) == \
        ("release", "released", "0.500000", "0.495000", "0.005000")
    assert r["refunded"] == "0.749996" and r["escrow"]["paid"] == "0.750004"
    assert Decimal(r["escrow"]["amount"]) == sum(Decimal(r["escrow"][k]) for k in ("paid", "refunded", "remaining"))

    kept = cli_json("create", "seller", "1", "--agent", "buyer")
    partial = cli_json("release", kept["id"], "0.1", "--keep-open", "--agent", "buyer")
    assert (partial["status"], partial["remaining"], partial["refunded"]) == ("active", "0.900000", "0.000000")
    rest = cli_json("release", kept["id"], "--agent", "buyer")  # no amount: the whole remainder
    assert (rest["gross"], rest["status"]) == ("0.900000", "released")

    c = cli_json("create", "seller", "2", "--agent", "buyer")
    cancel = flat(cli("cancel", c["id"], "--agent", "seller", "--reason", "no capacity").stdout)
    assert "cancel receipt for" in cancel and "refunded │ 2.000000" in cancel and "status: cancelled" in cancel

    got = cli_json("get", e["id"], "--agent", "seller")
    assert got["status"] == "released" and [ev["kind"] for ev in got["events"]] == \
        ["created", "deducted", "deducted", "deducted", "released"]
    assert got["events"][1]["data"]["reason"] == "batch 1"
    shown = flat(cli("get", e["id"], "--agent", "buyer").stdout)
    assert "released" in shown and "events" in shown and "deducted" in shown

    rows = cli_json("history", "--agent", "buyer")
    assert len(rows) == 4 and rows[-1]["id"] == e["id"]
    assert [row["status"] for row in rows] == ["cancelled", "released", "active", "released"]
    assert [row["id"] for row in cli_json("history", "--agent", "buyer", "--status", "cancelled")] == [c["id"]]
    assert len(cli_json("history", "--agent", "seller", "--limit", "2")) == 2
    table = cli("history", "--agent", "buyer").stdout
    assert "escrows" in table and all(row["id"] in table for row in rows)
    for word in ("cancelled", "released", "active", "0.750004", "0.749996", "gemma-3-270m"):
        assert word in table

    me = cli_json("balance", "--agent", "buyer")
    assert me["escrows_open"] == 1
    # 10 - 0.750004 paid - 0.9 paid - 0.1 paid - 0.5 locked in the open escrow
    assert me["balance"] == "7.749996"

    audit = cli("audit")
    assert "clean: every transaction balances" in audit.stdout
    text = flat(audit.stdout)
    assert "minted (USDC) │ 10.000000" in text and "escrows released │ 2" in text and "escrows active │ 1" in text
    report = json.loads(cli("audit", "--json").stdout)
    assert report["ok"] is True and report["minted_micro"] == 10_000_000
    assert report["platform_fees_micro"] == 2_500 + 0 + 0 + 5_000 + 1_000 + 9_000  # 1% of each payout, half-even


def test_embedded_errors_exit_2_with_the_message():
    cli("register", "buyer")
    cli("register", "seller")
    cli("claim", "--agent", "buyer")
    e = cli_json("create", "seller", "1", "--agent", "buyer")

    def fails(*args: str, status: int, words: str):
        result = cli(*args, code=2)
        assert f"({status} " in result.stderr and words in flat(result.stderr), result.output
        as_json = json.loads(cli(*args, "--json", code=2).stdout)
        assert as_json["status"] == status and words in as_json["message"]

    fails("deduct", e["id"], "5", "--agent", "seller", status=402, words="cannot deduct 5.000000")
    fails("deduct", e["id"], "0.1", "--agent", "buyer", status=403, words="only the seller")
    fails("release", e["id"], "--agent", "seller", status=403, words="only the buyer")
    fails("get", "esc_unknown", "--agent", "buyer", status=404, words="not found")
    fails("create", "seller", "abc", "--agent", "buyer", status=422, words="must be a number")
    fails("create", "seller", "0.0000004", "--agent", "buyer", status=422, words="rounds to 0")
    fails("create", "nobody", "1", "--agent", "buyer", status=404, words="not a registered agent")
    fails("create", "seller", "100", "--agent", "buyer", status=402, words="cannot lock 100.000000")
    fails("claim", "--agent", "buyer", status=429, words="already claimed")
    fails("balance", status=401, words="acts for no agent")
    fails("register", "buyer", status=409, words="already registered")
    fails("history", "--agent", "buyer", "--status", "bogus", status=422, words="unknown status")
    cli("release", e["id"], "--agent", "buyer")
    fails("cancel", e["id"], "--agent", "buyer", status=409, words="is released")
    bad = cli("create", "seller", "1", "--agent", "buyer", "--meta", "{not json", code=2)
    assert "--meta must be JSON" in flat(bad.stderr)
    assert_audit_clean(Ledger(embedded_db()))


def test_sweep_refunds_expired_escrows_and_deposit():
    cli("register", "buyer")
    cli("register", "seller")
    assert "+3.000000 USDC, balance 3.000000" in flat(cli("deposit", "buyer", "3").stdout)
    e = cli_json("create", "seller", "1", "--agent", "buyer", "--ttl", "1")
    assert "expired 0 escrows" in cli("sweep").stdout
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if "expired 1 escrows" in cli("sweep").stdout:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the escrow did not expire within 5 s of a 1 s TTL")
    assert "expired 0 escrows" in cli("sweep").stdout  # exactly once
    got = cli_json("get", e["id"], "--agent", "buyer")
    assert (got["status"], got["refunded"], got["remaining"]) == ("expired", "1.000000", "0.000000")
    assert cli_json("balance", "--agent", "buyer")["balance"] == "3.000000"
    assert cli("audit").exit_code == 0


def test_audit_exits_1_on_a_tampered_ledger(tmp_path):
    url = f"sqlite:///{tmp_path / 'tampered.db'}"
    cli("register", "buyer", "--database-url", url)
    cli("deposit", "buyer", "5", "--database-url", url)
    ledger = Ledger(url)
    with ledger.engine.begin() as conn:
        conn.execute(update(accounts).where(accounts.c.account_id.like("agent:%")).values(balance_micro=6_000_000))
    ledger.close()
    result = cli("audit", "--database-url", url, code=1)
    assert "NOT clean" in result.stdout and "stores 6000000 but its entries sum to 5000000" in flat(result.stderr)
    assert json.loads(cli("audit", "--database-url", url, "--json", code=1).stdout)["ok"] is False


def test_cli_against_a_live_server(tmp_path):
    db = f"sqlite:///{tmp_path / 'server.db'}"
    ledger = Ledger(db)
    with serve_app(create_app(ledger, sweep_interval_s=0, mcp=False)) as base:
        buyer = cli_json("register", "http-buyer", "--url", base)
        seller = cli_json("register", "http-seller", "--url", base, "--referral-code", buyer["referral_code"])
        assert seller["referred_by"] == "http-buyer"
        b = ("--url", base, "--api-key", buyer["api_key"])
        s = ("--url", base, "--api-key", seller["api_key"])
        assert "credited 10.000000 USDC" in cli("claim", *b).stdout
        me = cli_json("balance", *b)
        assert (me["agent_id"], me["balance"], me["escrows_open"]) == ("http-buyer", "10.000000", 0)
        assert "http-buyer: 10.000000 USDC" in flat(cli("balance", *b).stdout)

        e = cli_json("create", "http-seller", "2", *b, "--meta", '{"model": "m"}')
        assert (e["status"], e["amount"], e["model"]) == ("active", "2.000000", "m")
        d = cli_json("deduct", e["id"], "0.5", *s, "--idempotency-key", "batch-1")
        again = cli_json("deduct", e["id"], "0.5", *s, "--idempotency-key", "batch-1")  # a retry moves nothing
        assert d["remaining"] == again["remaining"] == "1.500000" and d["net"] == "0.495000"
        r = cli_json("release", e["id"], "1", *b)
        assert (r["status"], r["gross"], r["refunded"]) == ("released", "1.000000", "0.500000")
        c = cli_json("create", "http-seller", "1", *b)
        assert "status: cancelled" in flat(cli("cancel", c["id"], *b).stdout)
        got = cli_json("get", e["id"], *s)
        assert (got["paid"], got["refunded"], got["referrer"]) == ("1.500000", "0.500000", "http-buyer")
        assert [row["id"] for row in cli_json("history", *b)] == [c["id"], e["id"]]
        assert cli("history", *s).stdout.count("esc_") == 2

        result = cli("deduct", e["id"], "0.1", *s, code=2)
        assert "(409 state_conflict)" in result.stderr and "is released" in flat(result.stderr)
        bad = json.loads(cli("balance", "--url", base, "--api-key", "hfe_wrong", "--json", code=2).stdout)
        assert bad["status"] == 401 and "unknown API key" in bad["message"]
        assert json.loads(cli("get", e["id"], "--url", base, "--json", code=2).stdout)["status"] == 401
        assert json.loads(cli("deduct", c["id"], "0.1", *b, "--json", code=2).stdout)["status"] == 403

        # The buyer's referral share: 15% of the 1% fee on 1.5 USDC paid to its referee.
        assert cli_json("balance", *b)["balance"] == "8.502250"  # 10 - 1.5 paid + 0.00225
        assert "clean" in cli("audit", "--database-url", db).stdout
        assert cli("sweep", "--database-url", db).stdout.strip() == "expired 0 escrows"
    assert_audit_clean(ledger)
    ledger.close()
