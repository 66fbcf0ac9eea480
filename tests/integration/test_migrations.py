"""The Alembic migrations build exactly the schema the models declare, on both backends."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from sandbox_backup.store import database
from sandbox_backup.store.models import Base


async def test_migrations_match_models(db) -> None:  # type: ignore[no-untyped-def]
    def diff(connection):  # type: ignore[no-untyped-def]
        context = MigrationContext.configure(connection, opts={"compare_type": False})
        return compare_metadata(context, Base.metadata)

    async with db.engine.connect() as connection:
        differences = await connection.run_sync(diff)
    assert differences == []


async def test_migrate_twice_is_a_no_op(db) -> None:  # type: ignore[no-untyped-def]
    await database.migrate(db.engine)
    await database.migrate(db.engine)
