"""Statements in plain SQL, run on the database driver's own cursor.

On the settlement path SQLAlchemy's execute machinery (tens of microseconds a statement)
costs more than SQLite does; these statements skip it while running inside the same
SQLAlchemy transaction, so its BEGIN, savepoints, commit, rollback and retries apply.
Each is written once with `:name` parameters and `JSON(:name)` for a JSON value;
`Sql.form` gives each driver its own spelling, built once per statement.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from typing import Any, Iterable, Iterator

from sqlalchemy import Connection, exc

_PARAM = re.compile(r"(?<![:\w]):(\w+)")
_JSON_PARAM = re.compile(r"JSON\(:(\w+)\)")
MAX_DYNAMIC_STATEMENTS = 512


class Sql:
    """One statement; `pg_suffix` is PostgreSQL-only text (row locks, which SQLite does not need)."""

    def __init__(self, text: str, *, pg_suffix: str = ""):
        self.text = text
        self._forms = {
            "sqlite": _JSON_PARAM.sub(r":\1", text),
            "postgresql": _PARAM.sub(r"%(\1)s", _JSON_PARAM.sub(r"CAST(:\1 AS json)", text)) + pg_suffix,
        }

    def form(self, dialect: str) -> str:
        return self._forms[dialect]


@functools.lru_cache(maxsize=MAX_DYNAMIC_STATEMENTS)
def cached(text: str, pg_suffix: str = "") -> Sql:
    """A statement whose text depends on a batch's shape (IN lists), built once per shape."""
    return Sql(text, pg_suffix=pg_suffix)


def placeholders(name: str, count: int) -> str:
    """`:name0, :name1, ...` for an IN list of `count` values (at least one)."""
    return ", ".join(f":{name}{i}" for i in range(max(count, 1)))


def numbered(name: str, values: Iterable[Any]) -> dict:
    """Parameters for `placeholders(name, len(values))`; an empty list matches nothing."""
    params = {f"{name}{i}": value for i, value in enumerate(values)}
    return params or {f"{name}0": None}


def execute(conn: Connection, statement: Sql, params: dict | None = None) -> Any:
    """Run one statement; driver errors surface as SQLAlchemy's (IntegrityError, OperationalError).
    The caller reads the cursor and closes it (`fetched`, `first`)."""
    text = statement.form(conn.dialect.name)
    cursor = conn.connection.driver_connection.cursor()
    try:
        cursor.execute(text, params or {})
    except conn.dialect.loaded_dbapi.Error as error:
        cursor.close()
        raise _wrapped(conn, text, params, error) from error
    return cursor


def first(cursor: Any) -> tuple | None:
    """A cursor's first row; the cursor is closed after."""
    try:
        return cursor.fetchone()
    finally:
        cursor.close()


def execute_many(conn: Connection, statement: Sql, rows: list[dict]) -> int:
    """Run one statement for each parameter set; returns the rows it changed in all."""
    if not rows:
        return 0
    text = statement.form(conn.dialect.name)
    cursor = conn.connection.driver_connection.cursor()
    try:
        cursor.executemany(text, rows)
    except conn.dialect.loaded_dbapi.Error as error:
        raise _wrapped(conn, text, rows[0], error) from error
    finally:
        if conn.dialect.name == "sqlite":
            cursor.close()  # no statement left open to keep a closing connection alive
    return cursor.rowcount


@contextlib.contextmanager
def pipeline(conn: Connection) -> Iterator[None]:
    """Statements sent together (PostgreSQL pipeline mode: one round trip, run in order by
    the server); results are read after the block. On SQLite, a no-op."""
    if conn.dialect.name != "postgresql":
        yield
        return
    try:
        with conn.connection.driver_connection.pipeline():
            yield
    except conn.dialect.loaded_dbapi.Error as error:
        raise _wrapped(conn, "(pipeline)", None, error) from error


def read_all(conn: Connection, queries: list[tuple[Sql, dict, tuple]]) -> list[list[dict]]:
    """Several queries `(statement, params, json_columns)` in one round trip; their rows each."""
    cursors: list[Any] = []
    try:
        with pipeline(conn):
            for statement, params, _ in queries:
                cursors.append(execute(conn, statement, params))
    except BaseException:
        for cursor in cursors:
            cursor.close()  # an unread SELECT left open would block this connection's next commit
        raise
    return [fetched(conn, cursor, json_columns) for cursor, (_, _, json_columns) in zip(cursors, queries)]


def rows(conn: Connection, statement: Sql, params: dict | None = None, *, json_columns: tuple = ()) -> list[dict]:
    """Every row as a dict; `json_columns` decoded where the driver hands back text (SQLite)."""
    return fetched(conn, execute(conn, statement, params), json_columns)


def fetched(conn: Connection, cursor: Any, json_columns: tuple = ()) -> list[dict]:
    """Every row of a cursor, which is closed after."""
    names = [column[0] for column in cursor.description]
    try:
        found = [dict(zip(names, row)) for row in cursor.fetchall()]
    finally:
        cursor.close()
    if json_columns and conn.dialect.name == "sqlite":
        for row in found:
            for name in json_columns:
                if isinstance(row.get(name), str):
                    row[name] = json.loads(row[name])
    return found


def json_text(value: Any) -> str | None:
    """A JSON value as it is stored (SQL NULL for None, as SQLAlchemy's JSON type reads it back)."""
    return None if value is None else json.dumps(value)


def _wrapped(conn: Connection, text: str, params: Any, error: Exception) -> exc.DBAPIError:
    return exc.DBAPIError.instance(text, params, error, conn.dialect.loaded_dbapi.Error)
