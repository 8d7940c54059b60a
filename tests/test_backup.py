"""`hf-escrow backup` under load and `hf-escrow restore`: consistent, audited copies."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import hf_escrow
from hf_escrow._exceptions import StateConflict, ValidationError
from hf_escrow.cli import app as cli
from hf_escrow.ledger import Ledger, audit
from hf_escrow.ledger.backup import backup, restore
from hf_escrow.server import create_app
from tests.conftest import PG_SKIP_REASON, fresh_pg_database
from tests.helpers import parties
from tests.liveserver import serve_app

LOAD_OPS_MAX = 400
LOAD_SECONDS_MAX = 30.0


def totals(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in ("ok", "problems")}


def load(base: str, keys: dict, stop: threading.Event, counts: dict) -> None:
    """Holds and captures over HTTP until told to stop (bounded in count and time)."""
    buyer = hf_escrow.connect(base, api_key=keys["buyer"])
    seller = hf_escrow.connect(base, api_key=keys["seller"])
    deadline = time.monotonic() + LOAD_SECONDS_MAX
    e = buyer.create_escrow("seller", "50", ttl_seconds=600)
    while not stop.is_set() and counts["ops"] < LOAD_OPS_MAX and time.monotonic() < deadline:
        h = seller.hold(e.spend_token, "0.02", ttl_seconds=60)
        seller.capture(h.id, "0.013", final=True)
        counts["ops"] += 1
        if counts["ops"] % 25 == 0:
            buyer.release(e.id, "0.01")
            e = buyer.create_escrow("seller", "50", ttl_seconds=600)


def backup_under_load(url: str, backup_path: Path) -> tuple[dict, dict, Ledger]:
    ledger = Ledger(url)
    keys = {name: r["api_key"] for name, r in parties(ledger, "buyer", "seller", fund="10000").items()}
    stop, counts = threading.Event(), {"ops": 0}
    with serve_app(create_app(ledger, sweep_interval_s=0)) as base:
        worker = threading.Thread(target=load, args=(base, keys, stop, counts), daemon=True)
        worker.start()
        deadline = time.monotonic() + LOAD_SECONDS_MAX
        while counts["ops"] < 30 and worker.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        during = backup(url, backup_path)  # writers keep going meanwhile
        ops_at_backup = counts["ops"]
        time.sleep(0.5)
        stop.set()
        worker.join(30)
    assert ops_at_backup >= 30 and counts["ops"] > ops_at_backup, counts  # the backup really ran under load
    return during, audit(ledger.engine), ledger


def test_sqlite_backup_under_load_restores_audit_clean(tmp_path):
    url = f"sqlite:///{tmp_path / 'live.db'}"
    during, live_after, ledger = backup_under_load(url, tmp_path / "during.db")
    assert during["ok"], during["problems"]
    assert 0 < during["transactions"] < live_after["transactions"]

    restored = restore(tmp_path / "during.db", f"sqlite:///{tmp_path / 'restored.db'}")
    assert restored["ok"] and totals(restored) == totals(during)

    # Quiet now: a backup through the CLI has exactly the live ledger's totals.
    result = CliRunner().invoke(cli, ["backup", str(tmp_path / "after.db"), "--database-url", url, "--json"])
    assert result.exit_code == 0, result.output
    assert totals(audit(ledger.engine)) == totals(live_after)
    result = CliRunner().invoke(cli, ["restore", str(tmp_path / "after.db"), "--database-url",
                                      f"sqlite:///{tmp_path / 'again.db'}"])
    assert result.exit_code == 0 and "clean" in result.output, result.output
    assert totals(audit(Ledger(f"sqlite:///{tmp_path / 'again.db'}").engine)) == totals(live_after)

    # A restore never silently replaces a ledger with money in it, nor overwrites a backup.
    with pytest.raises(StateConflict, match="--replace"):
        restore(tmp_path / "during.db", url)
    with pytest.raises(StateConflict, match="exists"):
        backup(url, tmp_path / "during.db")
    (tmp_path / "notes.txt").write_text("not a database " * 100)
    with pytest.raises(ValidationError, match="not an hf-escrow ledger"):
        restore(tmp_path / "notes.txt", f"sqlite:///{tmp_path / 'new.db'}")
    with pytest.raises(ValidationError, match="no ledger"):
        backup(f"sqlite:///{tmp_path / 'typo.db'}", tmp_path / "typo-backup.db")
    back_in_time = restore(tmp_path / "during.db", url, replace=True)
    assert totals(back_in_time) == totals(during)
    ledger.close()


def test_restore_refuses_a_backup_that_fails_its_audit(tmp_path):
    import sqlite3
    url = f"sqlite:///{tmp_path / 'live.db'}"
    ledger = Ledger(url)
    parties(ledger, "buyer")
    ledger.close()
    backup(url, tmp_path / "copy.db")
    with sqlite3.connect(tmp_path / "copy.db") as conn:  # someone edits a balance in the copy
        conn.execute("UPDATE accounts SET balance_micro = balance_micro + 1 WHERE account_id LIKE 'agent:%'")
    with pytest.raises(StateConflict, match="audit"):
        restore(tmp_path / "copy.db", f"sqlite:///{tmp_path / 'new.db'}")
    assert not (tmp_path / "new.db").exists()


@pytest.mark.postgres
def test_postgres_backup_under_load_restores_audit_clean(tmp_path):
    if PG_SKIP_REASON:
        pytest.skip(PG_SKIP_REASON)
    url, drop = fresh_pg_database()
    target, drop_target = fresh_pg_database()
    try:
        during, live_after, ledger = backup_under_load(url, tmp_path / "during.dump")
        ledger.close()
        assert during["ok"], during["problems"]
        assert 0 < during["transactions"] < live_after["transactions"]
        restored = restore(tmp_path / "during.dump", target)
        assert restored["ok"] and totals(restored) == totals(during)
    finally:
        drop()
        drop_target()
