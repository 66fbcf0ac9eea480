"""Interfaces of the coordination layer: locks, counters, the coordinator and hold().

The manager runs as several replicas. A lock lets one replica at a time run a
periodic job or handle a sandbox, and a counter counts events across replicas.
Both only reduce duplicate work. Correctness rests on guarded database updates,
so a lock that expires too early costs repeated work, not a wrong state.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import math
from collections.abc import Callable
from types import TracebackType

from sandbox_backup.coordination import keys
from sandbox_backup.errors import InvalidInput, SandboxBackupError

logger = logging.getLogger(__name__)


class CoordinationError(SandboxBackupError):
    """A lock or counter operation failed."""


class CoordinationUnavailable(CoordinationError):
    """The coordination backend did not respond: connection error or timeout."""

    transient = True


class LockNotAcquired(CoordinationError):
    """Another owner holds the lock, so an `async with` block could not start."""

    def __init__(self, message: str, *, lock_name: str) -> None:
        super().__init__(message)
        self.lock_name = lock_name


def check_name(name: object, kind: str) -> str:
    """Return `name` if it can name a lock or counter, else raise InvalidInput."""
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"invalid {kind} name {name!r}: expected a non-empty string")
    return name


def check_ttl(ttl_s: object, parameter: str = "ttl_s") -> float:
    """Return `ttl_s` as float seconds if it is a usable TTL, else raise InvalidInput."""
    is_number = isinstance(ttl_s, (int, float)) and not isinstance(ttl_s, bool)
    if not is_number or not math.isfinite(ttl_s) or ttl_s < keys.MIN_TTL_S:
        raise InvalidInput(
            f"invalid {parameter} {ttl_s!r}: expected a finite number of seconds of at least {keys.MIN_TTL_S}"
        )
    return float(ttl_s)


def _check_wait(blocking: bool, timeout_s: float | None) -> None:
    if timeout_s is None:
        return

    if not blocking:
        raise InvalidInput(f"invalid timeout_s {timeout_s!r} for a non-blocking acquire: pass blocking=True to wait")

    is_number = isinstance(timeout_s, (int, float)) and not isinstance(timeout_s, bool)
    if not is_number or not math.isfinite(timeout_s) or timeout_s < 0:
        raise InvalidInput(
            f"invalid timeout_s {timeout_s!r}: expected a finite number of seconds >= 0, or None to wait without limit"
        )


class Lock(abc.ABC):
    """A lock that expires after `ttl_s` seconds, owned by a random token that only its holder stores.

    Each Lock object is one would-be holder with its own token, so every task
    that competes for a name needs its own object from `Coordinator.lock`.
    `async with lock:` makes one non-blocking attempt and raises LockNotAcquired
    when another owner holds the lock.
    """

    def __init__(self, name: str, key: str, ttl_s: float, on_contention: Callable[[], None]) -> None:
        self.name = name
        self.key = key
        self.ttl_s = ttl_s
        self._on_contention = on_contention

    async def acquire(self, *, blocking: bool = False, timeout_s: float | None = None) -> bool:
        """Take the lock for `ttl_s` seconds and return whether this object now holds it.

        With blocking=False one attempt is made. With blocking=True the call waits
        until the lock is free, for at most `timeout_s` seconds unless that is None.
        """
        _check_wait(blocking, timeout_s)

        acquired = await self._acquire(blocking=blocking, timeout_s=timeout_s)

        log_extra = {"lock_name": self.name}
        if acquired:
            logger.debug("acquired lock %r", self.name, extra={"action": "lock_acquired", **log_extra})
        elif blocking:
            logger.debug(
                "timed out after %s s waiting for lock %r",
                timeout_s,
                self.name,
                extra={"action": "lock_wait_timeout", **log_extra},
            )
        else:
            self._on_contention()
            logger.debug("lock %r is held by another owner", self.name, extra={"action": "lock_busy", **log_extra})
        return acquired

    async def extend(self, ttl_s: float) -> bool:
        """Set the remaining lifetime of the lock to `ttl_s` seconds if this object still holds it.

        Returns False, and changes nothing, when the lock expired or another owner took it.
        """
        return await self._extend(check_ttl(ttl_s))

    @abc.abstractmethod
    async def release(self) -> bool:
        """Delete the lock if this object holds it, and return False if it no longer does.

        A lock that expired and was taken by another owner stays with that owner.
        """

    @abc.abstractmethod
    async def locked(self) -> bool:
        """Return whether any owner holds the lock now."""

    @abc.abstractmethod
    async def owned(self) -> bool:
        """Return whether this object holds the lock now: its token is stored and has not expired."""

    @abc.abstractmethod
    async def _acquire(self, *, blocking: bool, timeout_s: float | None) -> bool: ...

    @abc.abstractmethod
    async def _extend(self, ttl_s: float) -> bool: ...

    async def __aenter__(self) -> Lock:
        if not await self.acquire():
            raise LockNotAcquired(
                f"lock {self.name!r} is held by another owner: skip this run, "
                f"or try again within its TTL of {self.ttl_s} s",
                lock_name=self.name,
            )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        released = await release_at_exit(self)
        if released is False:
            log_lock_lost(self.name, "at release")


async def release_at_exit(lock: Lock) -> bool | None:
    """Release `lock` when a with block ends, and return None if the backend did not respond.

    A failed release is logged, not raised: the work under the lock is done,
    and the TTL frees the lock anyway.
    """
    try:
        return await lock.release()
    except CoordinationUnavailable as exc:
        logger.warning(
            "could not release lock %r, so it stays held until its TTL of %s s ends: %s",
            lock.name,
            lock.ttl_s,
            exc,
            extra={"action": "lock_release_failed", "lock_name": lock.name},
        )
        return None


def log_lock_lost(lock_name: str, when: str) -> None:
    logger.warning(
        "lock %r expired or was taken by another owner (found %s), so another replica may have done the same work",
        lock_name,
        when,
        extra={"action": "lock_lost", "lock_name": lock_name},
    )


class Counter(abc.ABC):
    """Named integer counters shared by every replica of one deployment. A missing counter reads 0."""

    def __init__(self, key_prefix: str) -> None:
        self.key_prefix = key_prefix

    async def incr(self, name: str, *, ttl_s: float | None = None) -> int:
        """Add 1 to the counter `name` atomically and return the new value.

        When `ttl_s` is given and the counter has no expiry yet (normally at its
        first increment), the counter expires `ttl_s` seconds later. Later
        increments keep that expiry, so the counter covers a fixed window.
        """
        ttl = None if ttl_s is None else check_ttl(ttl_s)
        return await self._incr(self._key(name), ttl)

    async def get(self, name: str) -> int:
        """Return the value of the counter `name`, or 0 if it does not exist or expired."""
        return await self._get(self._key(name))

    async def reset(self, name: str) -> None:
        """Delete the counter `name`, so it reads 0 again."""
        await self._reset(self._key(name))

    def _key(self, name: str) -> str:
        return keys.counter_key(self.key_prefix, check_name(name, "counter"))

    @abc.abstractmethod
    async def _incr(self, key: str, ttl_s: float | None) -> int: ...

    @abc.abstractmethod
    async def _get(self, key: str) -> int: ...

    @abc.abstractmethod
    async def _reset(self, key: str) -> None: ...


class Coordinator(abc.ABC):
    """Factory of locks and counters for one deployment, named by `key_prefix`.

    `contention_count` counts non-blocking acquires that found the lock held by
    another owner, on every lock this coordinator created.
    """

    def __init__(self, *, key_prefix: str = keys.DEFAULT_KEY_PREFIX) -> None:
        if not isinstance(key_prefix, str):
            raise InvalidInput(
                f"invalid key_prefix {key_prefix!r}: expected a string such as {keys.DEFAULT_KEY_PREFIX!r}"
            )

        self.key_prefix = key_prefix
        self.contention_count = 0

    def lock(self, name: str, *, ttl_s: float) -> Lock:
        """Create a lock object for `name`. It is not acquired until `acquire` or `async with`."""
        check_name(name, "lock")
        ttl = check_ttl(ttl_s)
        return self._new_lock(name, keys.lock_key(self.key_prefix, name), ttl)

    def hold(
        self,
        name: str,
        *,
        ttl_s: float,
        renew: bool = True,
        blocking: bool = False,
        timeout_s: float | None = None,
    ) -> Hold:
        """Create an async context manager that holds the lock `name` while its body runs.

        See Hold for the renewal and for what happens when the lock is lost.
        """
        _check_wait(blocking, timeout_s)
        return Hold(self.lock(name, ttl_s=ttl_s), renew=renew, blocking=blocking, timeout_s=timeout_s)

    @property
    @abc.abstractmethod
    def counter(self) -> Counter:
        """Counters of this deployment."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Send a ping to the backend, and raise CoordinationUnavailable if it does not respond."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close connections to the backend."""

    @abc.abstractmethod
    def _new_lock(self, name: str, key: str, ttl_s: float) -> Lock: ...

    def _count_contention(self) -> None:
        self.contention_count += 1

    async def __aenter__(self) -> Coordinator:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.aclose()


class Hold:
    """Async context manager that acquires a lock, renews it while the body runs and releases it at exit.

    Entering raises LockNotAcquired if the lock cannot be taken. With renew=True
    a background task sets the lock's remaining lifetime back to its TTL every
    TTL/3. When a renewal or the final release finds the lock gone, `lost` turns
    True and a WARNING with action `lock_lost` is logged. A long body should check
    `lost` between steps and stop, because another replica may be doing the same work.
    """

    def __init__(self, lock: Lock, *, renew: bool, blocking: bool, timeout_s: float | None) -> None:
        self.lock = lock
        self.lost = False
        self._renew = renew
        self._blocking = blocking
        self._timeout_s = timeout_s
        self._renewal: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Hold:
        if not await self.lock.acquire(blocking=self._blocking, timeout_s=self._timeout_s):
            raise LockNotAcquired(
                f"lock {self.lock.name!r} is held by another owner: skip this run, "
                "or pass blocking=True to wait for it",
                lock_name=self.lock.name,
            )

        if self._renew:
            self._renewal = asyncio.create_task(self._renew_until_lost(), name=f"renew lock {self.lock.name}")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        try:
            await self._stop_renewal()
        finally:
            released = await release_at_exit(self.lock)
            if released is False and not self.lost:
                self.lost = True
                log_lock_lost(self.lock.name, "at release")

    async def _renew_until_lost(self) -> None:
        interval_s = self.lock.ttl_s * keys.RENEW_FRACTION
        while True:
            await asyncio.sleep(interval_s)

            try:
                renewed = await self.lock.extend(self.lock.ttl_s)
            except CoordinationUnavailable as exc:
                # The lock stays valid until its TTL ends, so the next renewal may still keep it.
                logger.warning(
                    "could not renew lock %r, will try again in %.3f s: %s",
                    self.lock.name,
                    interval_s,
                    exc,
                    extra={"action": "lock_renew_failed", "lock_name": self.lock.name},
                )
                continue

            if not renewed:
                self.lost = True
                log_lock_lost(self.lock.name, "while renewing")
                return

    async def _stop_renewal(self) -> None:
        task = self._renewal
        if task is None:
            return

        task.cancel()
        # asyncio.wait returns instead of raising the task's CancelledError, so a
        # cancellation of the task running this exit still reaches it.
        await asyncio.wait([task])
        if task.cancelled():
            return

        # Anything but CoordinationUnavailable ends the renewal loop, and it surfaces here.
        failure = task.exception()
        if failure is not None:
            raise failure
