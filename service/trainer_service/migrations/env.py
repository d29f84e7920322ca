"""Alembic's entry point: runs on the connection `trainer_service.schema` hands it."""

from alembic import context

from trainer_service.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `trainer migrate` (trainer_service.schema)")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
