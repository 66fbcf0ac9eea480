"""Alembic environment: migrations run on a connection handed over by `store.database.migrate`."""

from __future__ import annotations

from alembic import context

from sandbox_backup.store import models

config = context.config
target_metadata = models.Base.metadata


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("run migrations through sandbox_backup.store.database.migrate, which passes a connection")
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("offline migrations are not supported; run them against a database")
run_migrations_online()
