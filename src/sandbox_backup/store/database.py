"""Engine creation and schema migration (Alembic, applied at start)."""

from __future__ import annotations

import logging
import pathlib

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.ext import asyncio as sa_asyncio

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = pathlib.Path(__file__).with_name("migrations")


# Loggers whose DEBUG records print SQL parameters or result rows, which hold runner tokens and
# registry passwords: SQLAlchemy's result rows, and aiosqlite's repr of each call it executes.
_SECRET_BEARING_DEBUG_LOGGERS = ("sqlalchemy.engine.Engine", "aiosqlite")


class _DropDebugRecords(logging.Filter):
    """Drop DEBUG records, whatever level the logger is set to."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.DEBUG


_DROP_DEBUG_RECORDS = _DropDebugRecords()


def create_engine(url: str, *, echo: bool = False, pre_ping: bool = False) -> sa_asyncio.AsyncEngine:
    """Create the async engine; SQLite gets WAL, foreign keys and one serialised writer.

    SQL parameters are hidden in SQLAlchemy's logs and error messages, because they hold secrets.
    """
    for name in _SECRET_BEARING_DEBUG_LOGGERS:
        if _DROP_DEBUG_RECORDS not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_DROP_DEBUG_RECORDS)
    if url.startswith("sqlite"):
        return _create_sqlite_engine(url, echo=echo)
    # Without pre_ping a connection broken by a server restart fails one operation; SQLAlchemy then
    # replaces every pooled connection, and the next tick or request works.
    return sa_asyncio.create_async_engine(url, echo=echo, hide_parameters=True, pool_size=10, max_overflow=10, pool_pre_ping=pre_ping)


def _create_sqlite_engine(url: str, *, echo: bool) -> sa_asyncio.AsyncEngine:
    path = sa.engine.make_url(url).database
    if path and path != ":memory:":
        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)

    # A pool of one connection: SQLite has a single writer anyway, and handing the one connection
    # to one session at a time makes every transaction of this process serial, so the
    # read-then-write steps of a claim cannot interleave.
    engine = sa_asyncio.create_async_engine(
        url, echo=echo, hide_parameters=True, pool_size=1, max_overflow=0, pool_timeout=120, connect_args={"timeout": 30}
    )

    @event.listens_for(engine.sync_engine, "connect")
    def _configure(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        # The sqlite3 module's own transaction handling breaks SAVEPOINT; emit BEGIN ourselves.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(connection):  # type: ignore[no-untyped-def]
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


async def migrate(engine: sa_asyncio.AsyncEngine) -> None:
    """Bring the schema to the newest revision; a no-op when it is there already."""
    async with engine.begin() as connection:
        await connection.run_sync(_upgrade)
    logger.info("database schema is current", extra={"action": "schema_migrated", "dialect": engine.dialect.name})


def _upgrade(connection: sa.Connection) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
