"""Session factory around the async engine."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from sqlalchemy.ext import asyncio as sa_asyncio


class Database:
    """The engine plus a session factory; `transaction()` commits on success, rolls back on error."""

    def __init__(self, engine: sa_asyncio.AsyncEngine) -> None:
        self.engine = engine
        self.sessions = sa_asyncio.async_sessionmaker(engine, expire_on_commit=False, autoflush=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[sa_asyncio.AsyncSession]:
        async with self.sessions.begin() as session:
            yield session

    async def dispose(self) -> None:
        await self.engine.dispose()
