"""Shared fixtures: a fresh ledger database per test on SQLite, and on PostgreSQL when reachable."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

PG_ADMIN_URL = os.environ.get("HF_ESCROW_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


class FakeClock:
    """A ledger clock that tests move by hand (TTL, faucet intervals, streak days)."""

    def __init__(self, start: float = 1_800_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _pg_unreachable_reason() -> str | None:
    try:
        import psycopg
        with psycopg.connect(PG_ADMIN_URL.replace("postgresql+psycopg", "postgresql"), connect_timeout=3):
            return None
    except Exception as error:  # any failure means: skip, and say why
        return f"PostgreSQL at {PG_ADMIN_URL} unreachable: {error}"


PG_SKIP_REASON = _pg_unreachable_reason()


def fresh_pg_database() -> tuple[str, callable]:
    """A new, empty PostgreSQL database and a function that drops it."""
    import psycopg
    name = "hfe_" + secrets.token_hex(6)
    admin = PG_ADMIN_URL.replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")

    def drop() -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name, drop


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path: Path):
    """A database URL for an empty ledger, on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    if PG_SKIP_REASON:
        pytest.skip(PG_SKIP_REASON)
    url, drop = fresh_pg_database()
    yield url
    drop()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ledger(db_url, clock):
    from hf_escrow.ledger import Ledger, LedgerConfig
    led = Ledger(db_url, config=LedgerConfig(), clock=clock)
    yield led
    led.close()


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """No test touches the user's ~/.cache/hf-escrow or a server named in the environment."""
    monkeypatch.setenv("HF_ESCROW_HOME", str(tmp_path_factory.mktemp("hf-escrow-home")))
    for name in ("HF_ESCROW_URL", "HF_ESCROW_API_KEY", "HF_ESCROW_DATABASE_URL", "HF_ESCROW_AGENT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _close_embedded_ledgers():
    """The process-wide embedded ledgers a test opened (`connect(database_url=...)`) are closed
    after it, so that a long run does not pile up SQLite descriptors from finished tests."""
    from hf_escrow import client
    before = set(client._LEDGERS)
    yield
    with client._LEDGERS_LOCK:
        opened = [client._LEDGERS.pop(url) for url in set(client._LEDGERS) - before]
    for ledger in opened:
        ledger.close()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A random 1-layer chat model, built once for the session."""
    from .models import build_tiny_chat_model
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="session")
def tiny_url(tiny_dir: Path):
    """One `transformers serve` of the tiny model for the whole session."""
    from hf_escrow.localmodel import served_model
    with served_model(tiny_dir, timeout_s=120) as url:
        yield url


@pytest.fixture(scope="session")
def gemma_dir() -> Path:
    """The real gemma-3-270m, converted once into a cache kept across runs."""
    from hf_escrow.localmodel import prepare_model
    home = os.environ.get("HF_ESCROW_TEST_MODEL_HOME") or Path.home() / ".cache" / "hf-escrow-test" / "models"
    return prepare_model(home=Path(home))


@pytest.fixture(scope="session")
def gemma_url(gemma_dir: Path):
    """One `transformers serve` of the real model for the whole session."""
    import huggingface_hub.constants
    from hf_escrow.localmodel import served_model
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        pytest.fail("HF_HUB_OFFLINE is set in the test process: InferenceClient then refuses even 127.0.0.1")
    with served_model(gemma_dir) as url:
        yield url


def pytest_report_header(config):
    return [f"PostgreSQL tests: {'SKIPPED - ' + PG_SKIP_REASON if PG_SKIP_REASON else 'enabled on ' + PG_ADMIN_URL}"]
