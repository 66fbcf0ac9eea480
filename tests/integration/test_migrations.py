"""The Alembic migrations build exactly the schema the models declare, on both backends."""

from __future__ import annotations

import datetime

import sqlalchemy as sa
from alembic import command
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


async def test_migration_sets_pending_runner(empty_database_url: str) -> None:
    # An attempt queued before revision 0003 has no runner. Dispatch reads PENDING attempts by
    # runner, so without its sandbox's runner the attempt would never be sent.
    engine = database.create_engine(empty_database_url)

    def upgrade_to(revision: str):  # type: ignore[no-untyped-def]
        def run(connection):  # type: ignore[no-untyped-def]
            config = database.alembic_config()
            config.attributes["connection"] = connection
            command.upgrade(config, revision)

        return run

    try:
        async with engine.begin() as connection:
            await connection.run_sync(upgrade_to("0002"))
            now = datetime.datetime(2026, 12, 5, tzinfo=datetime.timezone.utc)
            await connection.execute(
                sa.text("INSERT INTO runners (id, api_url, token, state, capacity, failed_probes, created_at, updated_at, version) VALUES ('r1', 'http://127.0.0.1:9', 't', 'READY', 100, 0, :now, :now, 1)"),
                {"now": now},
            )
            await connection.execute(
                sa.text("INSERT INTO registries (id, url, is_default, created_at, updated_at) VALUES ('main', 'http://127.0.0.1:9', true, :now, :now)"), {"now": now}
            )
            await connection.execute(
                sa.text(
                    "INSERT INTO sandboxes (id, runner_id, state, state_changed_at, backup_state, ephemeral, created_at, updated_at, version) "
                    "VALUES ('sb-1', 'r1', 'STARTED', :now, 'PENDING', false, :now, :now, 1), ('sb-2', 'r1', 'STARTED', :now, 'COMPLETED', false, :now, :now, 1)"
                ),
                {"now": now},
            )
            await connection.execute(
                sa.text(
                    "INSERT INTO backups (id, sandbox_id, runner_id, registry_id, image_ref, trigger, state, attempt, next_attempt_at, created_at, updated_at, version) "
                    "VALUES ('b-pending', 'sb-1', NULL, 'main', 'x', 'SCHEDULE', 'PENDING', 1, :now, :now, :now, 1), "
                    "('b-old', 'sb-2', NULL, 'main', 'x', 'SCHEDULE', 'ERROR', 1, :now, :now, :now, 1)"
                ),
                {"now": now},
            )
        await database.migrate(engine)

        async with engine.connect() as connection:
            rows = dict((await connection.execute(sa.text("SELECT id, runner_id FROM backups"))).all())
        # Only PENDING attempts are given a runner: an attempt that ended before dispatch keeps none.
        assert rows == {"b-pending": "r1", "b-old": None}
    finally:
        await engine.dispose()
