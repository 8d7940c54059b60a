"""Back the ledger up while it serves, and restore it; every copy is audited.

SQLite: the online backup API copies the database in one step under a read snapshot, so
the copy is one consistent moment even with writers running (WAL lets them go on).
PostgreSQL: `pg_dump` (custom format), which reads one snapshot too; its audit restores
the dump into a scratch database, audits it there and drops it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.engine import make_url

from .._exceptions import StateConflict, ValidationError
from .audit import audit
from .storage import open_engine

PG_TOOL_TIMEOUT_S = 3600


def backup(url: str, path: str | Path) -> dict:
    """Copy the ledger at `url` to `path` (a new file; refused if it exists); the copy's audit."""
    path = Path(path)
    if path.exists():
        raise StateConflict(f"{path} exists: back up to a new file, so that no earlier backup is overwritten")
    path.parent.mkdir(parents=True, exist_ok=True)
    if _is_sqlite(url):
        if not Path(_sqlite_path(url)).is_file():
            raise ValidationError(f"no ledger at {_safe(url)}: nothing to back up")
        partial = path.with_name(path.name + ".partial")
        with closing(sqlite3.connect(_sqlite_path(url))) as source, closing(sqlite3.connect(partial)) as copy:
            source.backup(copy)  # pages=-1: one step, one snapshot
        os.replace(partial, path)
        return audit_copy(f"sqlite:///{path}")
    _pg_tool("pg_dump", "--format=custom", "--no-owner", f"--file={path}", url=url)
    return audit_pg_dump(url, path)


def restore(path: str | Path, url: str, *, replace: bool = False) -> dict:
    """Load the backup at `path` into the ledger at `url`; the restored ledger's audit.

    Refused when the backup's own audit is not clean, and, unless `replace`, when the
    target already holds a ledger with any transaction (a restore overwrites it). Stop the
    servers on that ledger first: they would otherwise keep serving what they cached.
    """
    path = Path(path)
    if not path.is_file():
        raise ValidationError(f"no backup at {path}")
    report = audit_copy(f"sqlite:///{path}") if _is_sqlite(url) else audit_pg_dump(url, path)
    if not report["ok"]:
        raise StateConflict(f"the backup at {path} does not pass its audit: {report['problems'][:3]}")
    if not replace and _has_transactions(url):
        raise StateConflict(f"the ledger at {_safe(url)} holds transactions: a restore would replace them; "
                            "say so (--replace) after stopping its servers")
    if _is_sqlite(url):
        target = Path(_sqlite_path(url))
        target.parent.mkdir(parents=True, exist_ok=True)
        with closing(sqlite3.connect(path)) as source, closing(sqlite3.connect(target)) as live:
            source.backup(live)
    else:
        _pg_tool("pg_restore", "--clean", "--if-exists", "--no-owner", "--single-transaction", str(path), url=url)
    engine = open_engine(url)  # a backup from an older release is migrated forward here
    try:
        return audit(engine)
    finally:
        engine.dispose()


def audit_copy(url: str) -> dict:
    """The audit of a copied ledger, opened as it is (not migrated: a copy is not changed)."""
    engine = create_engine(url)
    try:
        return audit(engine)
    except DBAPIError as error:  # not a database, or not a ledger's
        raise ValidationError(f"{_safe(url)} is not an hf-escrow ledger: {error.orig}") from None
    finally:
        engine.dispose()


def audit_pg_dump(url: str, dump: Path) -> dict:
    """Restore a pg_dump into a scratch database on the same server, audit it, drop it."""
    scratch = "hfe_audit_" + secrets.token_hex(6)
    admin = create_engine(make_url(url), isolation_level="AUTOCOMMIT")
    scratch_url = make_url(url).set(database=scratch).render_as_string(hide_password=False)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{scratch}"'))
        try:
            _pg_tool("pg_restore", "--no-owner", str(dump), url=scratch_url)
            return audit_copy(scratch_url)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)'))
    finally:
        admin.dispose()


def _has_transactions(url: str) -> bool:
    if _is_sqlite(url) and not Path(_sqlite_path(url)).exists():
        return False
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            try:
                return conn.execute(text("SELECT 1 FROM transactions LIMIT 1")).first() is not None
            except Exception:  # no ledger tables yet: nothing to overwrite
                return False
    finally:
        engine.dispose()


def _pg_tool(tool: str, *args: str, url: str) -> None:
    """Run a PostgreSQL client tool on `url`; its password goes by the environment, not argv."""
    if shutil.which(tool) is None:
        raise ValidationError(f"{tool} is not on PATH: install the PostgreSQL client tools (same major version "
                              "as the server) to back up or restore a PostgreSQL ledger")
    parsed = make_url(url)
    env = dict(os.environ, **({"PGPASSWORD": parsed.password} if parsed.password else {}))
    target = parsed.set(drivername="postgresql", password=None).render_as_string(hide_password=False)
    flag = "--dbname=" if tool == "pg_restore" else ""
    done = subprocess.run([tool, *args, flag + target], capture_output=True, text=True, env=env,
                          timeout=PG_TOOL_TIMEOUT_S)
    if done.returncode != 0:
        raise StateConflict(f"{tool} failed ({done.returncode}): {done.stderr.strip()[-500:]}")


def _is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def _sqlite_path(url: str) -> str:
    database = make_url(url).database
    if not database or database == ":memory:":
        raise ValidationError("an in-memory SQLite ledger cannot be backed up or restored: give a file")
    return database


def _safe(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)
