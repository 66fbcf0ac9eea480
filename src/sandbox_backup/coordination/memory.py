"""In-process coordination for a single replica and for tests.

Locks and counters live in a MemoryStore, so they exclude only tasks of one
process. Coordinators that share one store behave like replicas on one Redis.
Expiry follows the store's clock, which tests replace to expire locks without
sleeping. Every operation runs without an `await` in between its read and its
write, so it is atomic on the event loop.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable

from sandbox_backup.coordination import keys
from sandbox_backup.coordination.base import Coordinator, Counter, Lock


class MemoryStore:
    """Lock and counter state of in-process coordinators, with expiry times on `clock` (seconds, monotonic)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.locks: dict[str, tuple[str, float]] = {}
        self.counters: dict[str, tuple[int, float | None]] = {}

    def lock_token(self, key: str) -> str | None:
        """Return the token that holds the lock `key`, or None if it is free or expired."""
        entry = self.locks.get(key)
        if entry is None:
            return None

        token, expires_at = entry
        if self.clock() >= expires_at:
            del self.locks[key]
            return None
        return token

    def counter_entry(self, key: str) -> tuple[int, float | None]:
        """Return the value and expiry time of the counter `key`, or (0, None) if it is missing or expired."""
        entry = self.counters.get(key)
        if entry is None:
            return 0, None

        value, expires_at = entry
        if expires_at is not None and self.clock() >= expires_at:
            del self.counters[key]
            return 0, None
        return value, expires_at


class MemoryLock(Lock):
    def __init__(
        self, store: MemoryStore, name: str, key: str, ttl_s: float, on_contention: Callable[[], None]
    ) -> None:
        super().__init__(name, key, ttl_s, on_contention)
        self._store = store
        self._token: str | None = None

    async def _acquire(self, *, blocking: bool, timeout_s: float | None) -> bool:
        # The wait uses the event loop's clock because it passes in real time.
        # The store's clock decides only when a lock expires.
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s

        while True:
            if self._try_take():
                return True
            if not blocking:
                return False

            delay_s = keys.LOCK_POLL_INTERVAL_S
            if deadline is not None:
                remaining_s = deadline - loop.time()
                if remaining_s <= 0:
                    return False
                delay_s = min(delay_s, remaining_s)
            await asyncio.sleep(delay_s)

    def _try_take(self) -> bool:
        if self._store.lock_token(self.key) is not None:
            return False

        token = secrets.token_hex(16)
        self._store.locks[self.key] = (token, self._store.clock() + self.ttl_s)
        self._token = token
        return True

    async def release(self) -> bool:
        if not self._holds():
            self._token = None
            return False

        del self._store.locks[self.key]
        self._token = None
        return True

    async def _extend(self, ttl_s: float) -> bool:
        if not self._holds():
            return False

        self._store.locks[self.key] = (self._token, self._store.clock() + ttl_s)
        return True

    async def locked(self) -> bool:
        return self._store.lock_token(self.key) is not None

    async def owned(self) -> bool:
        return self._holds()

    def _holds(self) -> bool:
        return self._token is not None and self._store.lock_token(self.key) == self._token


class MemoryCounter(Counter):
    def __init__(self, store: MemoryStore, key_prefix: str) -> None:
        super().__init__(key_prefix)
        self._store = store

    async def _incr(self, key: str, ttl_s: float | None) -> int:
        value, expires_at = self._store.counter_entry(key)

        value += 1
        # Like Redis EXPIRE NX: set the expiry only if the counter has none yet.
        if expires_at is None and ttl_s is not None:
            expires_at = self._store.clock() + ttl_s

        self._store.counters[key] = (value, expires_at)
        return value

    async def _get(self, key: str) -> int:
        value, _ = self._store.counter_entry(key)
        return value

    async def _reset(self, key: str) -> None:
        self._store.counters.pop(key, None)


class MemoryCoordinator(Coordinator):
    """Coordinator whose locks exclude only the tasks of this process (or of coordinators sharing `store`)."""

    def __init__(self, *, key_prefix: str = keys.DEFAULT_KEY_PREFIX, store: MemoryStore | None = None) -> None:
        super().__init__(key_prefix=key_prefix)
        self.store = store if store is not None else MemoryStore()
        self._counter = MemoryCounter(self.store, key_prefix)

    @property
    def counter(self) -> Counter:
        return self._counter

    async def ping(self) -> None:
        """Return at once: the state is in this process."""

    async def aclose(self) -> None:
        """Return at once: there is no connection to close, and the state stays in `store`."""

    def _new_lock(self, name: str, key: str, ttl_s: float) -> Lock:
        return MemoryLock(self.store, name, key, ttl_s, self._count_contention)
