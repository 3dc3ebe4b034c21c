"""Alembic environment: runs on the connection :func:`trioproxy.store.engine.migrate` passes in
``config.attributes["connection"]`` (inside its transaction), or renders SQL offline for the
dialect named in ``config.attributes["dialect_name"]`` (used by a test for PostgreSQL)."""

from __future__ import annotations

from alembic import context

from trioproxy.store.schema import metadata

config = context.config
connection = config.attributes.get("connection")

if connection is not None:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    dialect_name = config.attributes.get("dialect_name", "sqlite")
    context.configure(dialect_name=dialect_name, target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
