"""Guarded (compare-and-set) updates: the fence every state change goes through."""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

logger = logging.getLogger(__name__)


async def guarded_update(
    session: AsyncSession,
    model: Any,
    row_id: str,
    *,
    expected: dict[str, Any],
    values: dict[str, Any],
    action: str,
) -> bool:
    """Update one row only if its columns still hold `expected`; bump its version.

    Returns False, and changes nothing, when another writer got there first. A value in `expected`
    that is a tuple, list or set matches any of its members.
    """
    conditions = [model.id == row_id]
    for column, value in expected.items():
        attribute = getattr(model, column)
        if isinstance(value, (tuple, list, set, frozenset)):
            conditions.append(attribute.in_(list(value)))
        elif value is None:
            conditions.append(attribute.is_(None))
        else:
            conditions.append(attribute == value)

    statement = sa.update(model).where(*conditions).values(**values, version=model.version + 1)
    result = await session.execute(statement, execution_options={"synchronize_session": False})
    if result.rowcount == 1:
        return True

    logger.debug(
        "guarded update lost a race; nothing changed",
        extra={"action": "lost_race", "table": model.__tablename__, "row_id": row_id, "update": action},
    )
    return False
