"""Where the ledger lives: the engine for SQLite (embedded) or PostgreSQL, migrated on open.

SQLite runs in WAL mode and every write transaction starts with ``BEGIN IMMEDIATE``:
writers queue on the database lock up front (busy_timeout) instead of failing with
"database is locked" when a reader tries to upgrade mid-transaction. Readers that pass
``execution_options(readonly=True)`` start a deferred transaction and never block.
PostgreSQL runs at READ COMMITTED; the ledger takes row locks where it needs them.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, exc, text

from .._exceptions import ValidationError

_MIGRATIONS = Path(__file__).with_name("migrations")
SQLITE_BUSY_TIMEOUT_MS = 60_000
DEFAULT_POOL_SIZE = 5
MAX_POOL_SIZE = 200
# One arbitrary, fixed key: every process migrating the same PostgreSQL database waits here.
_PG_MIGRATION_LOCK = 0x6866_6573_6372


def default_home() -> Path:
    """`$HF_ESCROW_HOME`, else `~/.cache/hf-escrow`."""
    return Path(os.environ.get("HF_ESCROW_HOME") or Path.home() / ".cache" / "hf-escrow")


def default_database_url(home: Path | None = None) -> str:
    """`$HF_ESCROW_DATABASE_URL`, else the embedded SQLite file in the home folder."""
    url = os.environ.get("HF_ESCROW_DATABASE_URL")
    if url:
        return url
    home = Path(home) if home else default_home()
    return f"sqlite:///{home / 'ledger.db'}"


def open_engine(url: str) -> Engine:
    """An engine on `url`, with the schema migrated to the newest revision."""
    engine = _sqlite_engine(url) if url.startswith("sqlite") else _server_engine(url)
    migrate(engine)
    return engine


def _sqlite_engine(url: str) -> Engine:
    path = url.split("///", 1)[-1]
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        # Let SQLAlchemy's "begin" event emit BEGIN itself, so that writers can say IMMEDIATE.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        statement = "BEGIN" if conn.get_execution_options().get("readonly", False) else "BEGIN IMMEDIATE"
        # On the driver itself: SQLAlchemy's execute path costs more than the BEGIN does.
        try:
            conn.connection.driver_connection.execute(statement)
        except sqlite3.Error as error:  # raised as SQLAlchemy's, so "database is locked" is retried
            raise exc.DBAPIError.instance(statement, None, error, sqlite3.Error) from error

    return engine


def pool_size() -> int:
    """Connections each process keeps to a database server (`$HF_ESCROW_POOL_SIZE`, default 5);
    as many again open in a burst. A process's settlements use one (group commit) and its key
    lookups another; the rest serve the other routes. `serve --workers N` opens up to
    2 x N x this many in all: keep that under the server's max_connections."""
    text = os.environ.get("HF_ESCROW_POOL_SIZE", str(DEFAULT_POOL_SIZE))
    if not text.isdigit() or not 2 <= int(text) <= MAX_POOL_SIZE:
        raise ValidationError(f"HF_ESCROW_POOL_SIZE must be a whole number from 2 to {MAX_POOL_SIZE}, not {text!r}")
    return int(text)


def _server_engine(url: str) -> Engine:
    size = pool_size()
    return create_engine(url, pool_pre_ping=True, pool_size=size, max_overflow=size)


def _alembic_config(connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def _is_current(engine: Engine) -> bool:
    head = ScriptDirectory(str(_MIGRATIONS)).get_current_head()
    with engine.connect().execution_options(readonly=True) as conn:
        return MigrationContext.configure(conn).get_current_revision() == head


def migrate(engine: Engine) -> None:
    """Apply pending Alembic migrations, safely when several processes start at once."""
    if _is_current(engine):
        return
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        command.upgrade(_alembic_config(conn), "head")
