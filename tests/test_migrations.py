"""The Alembic migrations build exactly the schema the code declares, on each backend."""

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from hf_escrow.ledger import Ledger
from hf_escrow.ledger.schema import metadata


def test_migrated_database_matches_the_declared_schema(db_url):
    ledger = Ledger(db_url)  # migrates to head on open
    try:
        with ledger.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
        assert diff == [], diff
    finally:
        ledger.close()
