"""Time sources. Policies take "now" as a parameter; loops ask a Clock for it."""

from __future__ import annotations

import datetime
from typing import Protocol


def utcnow() -> datetime.datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.datetime.now(datetime.timezone.utc)


class Clock(Protocol):
    def now(self) -> datetime.datetime:
        """Return the current time as an aware UTC datetime."""
        ...


class SystemClock:
    """The wall clock."""

    def now(self) -> datetime.datetime:
        return utcnow()


class ManualClock:
    """A clock that moves only when told to, so tests never sleep through an interval."""

    def __init__(self, start: datetime.datetime | None = None) -> None:
        self._now = start or utcnow()

    def now(self) -> datetime.datetime:
        return self._now

    def advance(self, seconds: float) -> datetime.datetime:
        """Move the clock forward by `seconds` and return the new time."""
        self._now += datetime.timedelta(seconds=seconds)
        return self._now

    def set(self, moment: datetime.datetime) -> None:
        self._now = moment
