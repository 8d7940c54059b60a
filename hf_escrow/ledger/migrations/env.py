"""Alembic environment: migrations always run on a connection handed over by the ledger."""

from alembic import context

from hf_escrow.ledger.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
