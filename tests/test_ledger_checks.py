"""Money invariants the database itself enforces, and the ledger's checks under `python -O`."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import exc, text, update

from hf_escrow.ledger import Ledger
from hf_escrow.ledger import journal
from hf_escrow.ledger.records import LedgerCorrupted
from hf_escrow.ledger.schema import accounts, agent_keys, escrows, metadata
from hf_escrow.ledger.storage import _alembic_config

ROOT = Path(__file__).resolve().parents[1]
MIGRATION = ROOT / "hf_escrow" / "ledger" / "migrations" / "versions" / "0006_money_checks.py"


def _migration():
    spec = importlib.util.spec_from_file_location("money_checks", MIGRATION)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_migration_adds_the_checks_the_schema_declares():
    declared = {c.name: str(c.sqltext) for table in metadata.tables.values() for c in table.constraints
                if c.__class__.__name__ == "CheckConstraint"}
    for table, name, condition in _migration().CHECKS:
        assert declared.get(name) == condition, name
        assert name in {c.name for c in metadata.tables[table].constraints}


def _funded_escrow(ledger: Ledger) -> str:
    for name in ("buyer", "seller"):
        ledger.register(name)
    ledger.deposit("buyer", "1")
    escrow = ledger.create_escrow("buyer", "seller", "0.5")
    ledger.deduct("seller", escrow["id"], "0.1")
    return escrow["id"]


# Each write breaks one invariant that no operation of the ledger can break.
BREAKS = [
    ("ck_escrows_split", lambda eid: update(escrows).where(escrows.c.escrow_id == eid)
     .values(fees_micro=escrows.c.paid_micro + 1)),
    ("ck_escrows_split", lambda eid: update(escrows).where(escrows.c.escrow_id == eid)
     .values(referral_micro=escrows.c.fees_micro + 1)),
    ("ck_escrows_split", lambda eid: update(escrows).where(escrows.c.escrow_id == eid).values(bonus_micro=-1)),
    ("ck_escrows_tokens_nonnegative", lambda eid: update(escrows).where(escrows.c.escrow_id == eid)
     .values(tokens_out=-1)),
    ("ck_escrows_conservation", lambda eid: update(escrows).where(escrows.c.escrow_id == eid)
     .values(refunded_micro=escrows.c.amount_micro)),
    ("ck_escrows_held_nonnegative", lambda eid: update(escrows).where(escrows.c.escrow_id == eid)
     .values(held_micro=-1)),
    ("ck_accounts_nonnegative", lambda eid: update(accounts).where(accounts.c.account_id == f"escrow:{eid}")
     .values(balance_micro=-1)),
]


@pytest.mark.parametrize("name, write", BREAKS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BREAKS)])
def test_the_database_refuses_a_write_that_breaks_a_money_invariant(db_url, name, write):
    ledger = Ledger(db_url)
    try:
        escrow_id = _funded_escrow(ledger)
        with pytest.raises(exc.IntegrityError, match=name):
            with ledger.engine.begin() as conn:
                conn.execute(write(escrow_id))
        ledger.deduct("seller", escrow_id, "0.1")
        assert ledger.get("buyer", escrow_id)["paid_micro"] == 200_000    # the real writes still pass
    finally:
        ledger.close()


def test_a_budgeted_key_cannot_be_written_with_a_negative_lock(db_url):
    ledger = Ledger(db_url)
    try:
        ledger.register("owner")
        ledger.deposit("owner", "1")
        key = ledger.create_key("owner", budget="0.5", max_escrow="0.1")
        with pytest.raises(exc.IntegrityError, match="ck_agent_keys_locked"):
            with ledger.engine.begin() as conn:
                conn.execute(update(agent_keys).where(agent_keys.c.key_id == key["key_id"]).values(max_escrow_micro=0))
    finally:
        ledger.close()


def test_the_checks_come_off_and_back_on_with_the_migration(db_url):
    ledger = Ledger(db_url)
    try:
        escrow_id = _funded_escrow(ledger)
        with ledger.engine.begin() as conn:
            command.downgrade(_alembic_config(conn), "0005")
        with ledger.engine.begin() as conn:
            conn.execute(update(escrows).where(escrows.c.escrow_id == escrow_id).values(tokens_in=-1))
            conn.execute(update(escrows).where(escrows.c.escrow_id == escrow_id).values(tokens_in=0))
            command.upgrade(_alembic_config(conn), "head")
        with pytest.raises(exc.IntegrityError, match="ck_escrows_tokens_nonnegative"):
            with ledger.engine.begin() as conn:
                conn.execute(update(escrows).where(escrows.c.escrow_id == escrow_id).values(tokens_in=-1))
        with ledger.engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0006"
    finally:
        ledger.close()


# ---- checks that raise, so `python -O` keeps them --------------------------------------

def test_an_account_of_no_known_kind_raises_not_asserts(tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    try:
        with ledger.engine.begin() as conn:
            with pytest.raises(LedgerCorrupted, match="unknown kind"):
                journal.open_account(conn, "odd:1", "odd")
    finally:
        ledger.close()


def test_no_bare_assert_guards_money_in_the_ledger_or_money():
    import ast
    package = ROOT / "hf_escrow"
    found = [f"{path.relative_to(ROOT)}:{node.lineno}"
             for path in [package / "money.py", package / "pricing.py", *sorted((package / "ledger").rglob("*.py"))]
             for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Assert)]
    assert found == [], f"raise instead (asserts vanish under python -O): {found}"


def test_the_stateful_ledger_suite_passes_under_python_O():
    """The model-based suite, run with asserts stripped from hf_escrow: every invariant it
    relies on in the library is a check that raises (the suite's own checks are pytest's)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-O", "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         str(ROOT / "tests" / "test_ledger_stateful.py"), "-k", "SQLite"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "failed" not in done.stdout
    check = subprocess.run([sys.executable, "-O", "-c", "import sys; assert False; print(sys.flags.optimize)"],
                           capture_output=True, text=True, env=env, timeout=60)
    assert check.stdout.strip() == "1"       # -O really strips asserts in that interpreter
