"""Coordination on Redis, shared by every replica that uses the same URL and key prefix.

Locks are redis-py's `redis.asyncio.lock.Lock`: SET NX PX to acquire, and Lua
scripts that compare the token before they delete or extend the key, so a
holder whose lock expired cannot free or extend the lock of a new owner.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# Absolute imports: this module's own name does not hide the redis-py package.
import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.lock import Lock as RedisPyLock

from sandbox_backup.coordination import keys
from sandbox_backup.coordination.base import CoordinationError, CoordinationUnavailable, Coordinator, Counter, Lock
from sandbox_backup.errors import InvalidInput

logger = logging.getLogger(__name__)

_MASK = "***"


def mask_url(url: str) -> str:
    """Return `url` with its password replaced by ***, so it can be logged.

    A password can sit in the user part (`redis://user:secret@host`) or in a
    `password` query parameter. A user part without a colon is masked whole,
    because some clients read it as a password.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"

    netloc = parts.netloc
    userinfo, at, hostinfo = netloc.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:{_MASK}@{hostinfo}" if colon else f"{_MASK}@{hostinfo}"

    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        masked = [(name, _MASK if name.lower() == "password" else value) for name, value in pairs]
        query = urlencode(masked, safe="*")

    return urlunsplit(parts._replace(netloc=netloc, query=query))


@contextlib.contextmanager
def _translate_errors(operation: str, masked_url: str) -> Iterator[None]:
    """Raise redis-py errors of `operation` as CoordinationError with the masked URL and a next step."""
    try:
        yield
    except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
        # AuthenticationError is a ConnectionError in redis-py, hence the password hint.
        raise CoordinationUnavailable(
            f"{operation} failed: Redis at {masked_url} did not respond ({exc}). "
            "Check that Redis is running and that the URL, password and TLS settings are right."
        ) from exc
    except redis_errors.RedisError as exc:
        raise CoordinationError(f"{operation} failed on Redis at {masked_url}: {exc}") from exc


class RedisLock(Lock):
    def __init__(
        self,
        client: aioredis.Redis,
        masked_url: str,
        name: str,
        key: str,
        ttl_s: float,
        on_contention: Callable[[], None],
    ) -> None:
        super().__init__(name, key, ttl_s, on_contention)
        self._masked_url = masked_url
        # thread_local=False because every task runs on the event loop's thread.
        # Separate tokens come from separate Lock objects.
        self._lock = RedisPyLock(
            client,
            key,
            timeout=ttl_s,
            sleep=keys.LOCK_POLL_INTERVAL_S,
            blocking=False,
            thread_local=False,
        )

    async def _acquire(self, *, blocking: bool, timeout_s: float | None) -> bool:
        with _translate_errors(f"acquiring lock {self.key!r}", self._masked_url):
            return bool(await self._lock.acquire(blocking=blocking, blocking_timeout=timeout_s))

    async def release(self) -> bool:
        with _translate_errors(f"releasing lock {self.key!r}", self._masked_url):
            try:
                await self._lock.release()
            except redis_errors.LockError:
                # Raised when this object never acquired the lock, or its token is no longer stored.
                return False
        return True

    async def _extend(self, ttl_s: float) -> bool:
        with _translate_errors(f"extending lock {self.key!r}", self._masked_url):
            try:
                await self._lock.extend(ttl_s, replace_ttl=True)
            except redis_errors.LockError:
                return False
        return True

    async def locked(self) -> bool:
        with _translate_errors(f"reading lock {self.key!r}", self._masked_url):
            return await self._lock.locked()

    async def owned(self) -> bool:
        with _translate_errors(f"reading lock {self.key!r}", self._masked_url):
            return await self._lock.owned()


class RedisCounter(Counter):
    def __init__(self, client: aioredis.Redis, masked_url: str, key_prefix: str) -> None:
        super().__init__(key_prefix)
        self._client = client
        self._masked_url = masked_url

    async def _incr(self, key: str, ttl_s: float | None) -> int:
        with _translate_errors(f"incrementing counter {key!r}", self._masked_url):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                if ttl_s is not None:
                    # NX sets the expiry only when the key has none, which needs Redis 7.0 or later.
                    pipe.pexpire(key, _to_milliseconds(ttl_s), nx=True)
                results = await pipe.execute()
        return int(results[0])

    async def _get(self, key: str) -> int:
        with _translate_errors(f"reading counter {key!r}", self._masked_url):
            value = await self._client.get(key)
        return 0 if value is None else int(value)

    async def _reset(self, key: str) -> None:
        with _translate_errors(f"deleting counter {key!r}", self._masked_url):
            await self._client.delete(key)


def _to_milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class RedisCoordinator(Coordinator):
    """Coordinator on the Redis at `url`. It connects at the first command, not at creation."""

    def __init__(self, url: str, *, key_prefix: str = keys.DEFAULT_KEY_PREFIX) -> None:
        super().__init__(key_prefix=key_prefix)
        self.masked_url = mask_url(url)

        try:
            self._client = aioredis.Redis.from_url(
                url,
                socket_connect_timeout=keys.REDIS_CONNECT_TIMEOUT_S,
                socket_timeout=keys.REDIS_SOCKET_TIMEOUT_S,
            )
        except ValueError as exc:
            raise InvalidInput(f"invalid Redis URL {self.masked_url!r}: {exc}") from exc

        self._counter = RedisCounter(self._client, self.masked_url, key_prefix)

    @property
    def counter(self) -> Counter:
        return self._counter

    async def ping(self) -> None:
        with _translate_errors("ping", self.masked_url):
            await self._client.ping()

    async def aclose(self) -> None:
        await self._client.aclose()
        logger.info("closed Redis connections to %s", self.masked_url, extra={"action": "coordinator_closed"})

    def _new_lock(self, name: str, key: str, ttl_s: float) -> Lock:
        return RedisLock(self._client, self.masked_url, name, key, ttl_s, self._count_contention)
