"""Alembic's entry point: runs on the connection `stepstream_service.store.schema` hands it."""

from alembic import context

from stepstream_service.store.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `trainer migrate` (stepstream_service.store.schema)")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
