"""One test set for both coordination backends: in-process and the real Redis.

The memory backend's clock is the real monotonic clock plus an offset that
tests can advance, so expiry needs no sleep there but renewals still run in
real time. On Redis, expiry takes a short real sleep.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from sandbox_backup.coordination import (
    CoordinationUnavailable,
    Coordinator,
    LockNotAcquired,
    MemoryCoordinator,
    MemoryStore,
    RedisCoordinator,
)
from sandbox_backup.coordination import keys

# Short enough to keep the Redis runs quick, long enough that scheduling jitter
# of a busy test machine stays well inside the margins below.
SHORT_TTL_S = 0.3
LONG_TTL_S = 10.0


class OffsetClock:
    """Monotonic clock that a test can move forward without sleeping."""

    def __init__(self) -> None:
        self.offset_s = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset_s

    def advance(self, seconds: float) -> None:
        self.offset_s += seconds


class Backend:
    """A coordinator under test with the test-only ways to let time pass, add replicas and break locks."""

    def __init__(self, coordinator: Coordinator, redis_url: str | None, redis_client: aioredis.Redis | None) -> None:
        self.coordinator = coordinator
        self._redis_url = redis_url
        self._redis_client = redis_client
        self._replicas: list[Coordinator] = []

    @property
    def is_memory(self) -> bool:
        return isinstance(self.coordinator, MemoryCoordinator)

    async def let_time_pass(self, seconds: float) -> None:
        """Move the backend's clock on by `seconds`: the memory clock jumps, Redis needs a real sleep."""
        if self.is_memory:
            self.coordinator.store.clock.advance(seconds)
        else:
            await asyncio.sleep(seconds)

    def replica(self, key_prefix: str | None = None) -> Coordinator:
        """Create another coordinator on the same state, as a second replica of the manager would have."""
        prefix = self.coordinator.key_prefix if key_prefix is None else key_prefix
        if self.is_memory:
            replica: Coordinator = MemoryCoordinator(key_prefix=prefix, store=self.coordinator.store)
        else:
            replica = RedisCoordinator(self._redis_url, key_prefix=prefix)
        self._replicas.append(replica)
        return replica

    async def break_lock(self, name: str) -> None:
        """Delete the lock `name` without its token, as an expiry would."""
        key = keys.lock_key(self.coordinator.key_prefix, name)
        if self.is_memory:
            del self.coordinator.store.locks[key]
        else:
            await self._redis_client.delete(key)

    async def aclose(self) -> None:
        for replica in self._replicas:
            await replica.aclose()


# Fixtures that pick a backend by its parameter are synchronous, because
# pytest-asyncio cannot set up an async fixture from inside another one.
@pytest.fixture(params=["memory", "redis"])
def coordinator(request: pytest.FixtureRequest, redis_key_prefix: str) -> Coordinator:
    """Coordinator of each backend: in-process with an OffsetClock, and on the test Redis."""
    if request.param == "memory":
        return MemoryCoordinator(key_prefix=redis_key_prefix, store=MemoryStore(clock=OffsetClock()))
    return request.getfixturevalue("redis_coordinator")


@pytest.fixture
def redis_access(request: pytest.FixtureRequest, coordinator: Coordinator) -> tuple[str | None, aioredis.Redis | None]:
    """URL and raw client of the test Redis when `coordinator` is on Redis, else (None, None)."""
    if isinstance(coordinator, MemoryCoordinator):
        return None, None
    return request.getfixturevalue("redis_url"), request.getfixturevalue("redis_client")


@pytest.fixture
async def backend(
    coordinator: Coordinator, redis_access: tuple[str | None, aioredis.Redis | None]
) -> AsyncIterator[Backend]:
    redis_url, redis_client = redis_access
    test_backend = Backend(coordinator, redis_url, redis_client)
    yield test_backend
    await test_backend.aclose()


def lock_lost_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if getattr(record, "action", None) == "lock_lost"]


async def test_second_acquire_fails_while_held(coordinator: Coordinator) -> None:
    first = coordinator.lock("job:sweep", ttl_s=LONG_TTL_S)
    second = coordinator.lock("job:sweep", ttl_s=LONG_TTL_S)

    assert await first.acquire() is True
    assert await second.acquire() is False

    assert await first.owned() is True
    assert await second.owned() is False
    assert await second.locked() is True
    assert coordinator.contention_count == 1


async def test_release_by_non_holder_fails(coordinator: Coordinator) -> None:
    holder = coordinator.lock("sandbox:a", ttl_s=LONG_TTL_S)
    other = coordinator.lock("sandbox:a", ttl_s=LONG_TTL_S)
    assert await holder.acquire()

    assert await other.release() is False
    assert await holder.owned() is True
    assert await other.locked() is True

    assert await holder.release() is True
    assert await holder.locked() is False
    assert await holder.release() is False


async def test_expired_lock_taken_by_other(backend: Backend) -> None:
    old = backend.coordinator.lock("sandbox:b", ttl_s=SHORT_TTL_S)
    new = backend.coordinator.lock("sandbox:b", ttl_s=LONG_TTL_S)
    assert await old.acquire()

    await backend.let_time_pass(SHORT_TTL_S + 0.1)

    assert await old.owned() is False
    assert await new.acquire() is True
    assert await old.release() is False
    assert await old.extend(LONG_TTL_S) is False
    assert await new.owned() is True
    assert await new.locked() is True


async def test_extend_keeps_lock_alive(backend: Backend) -> None:
    holder = backend.coordinator.lock("sandbox:c", ttl_s=SHORT_TTL_S)
    other = backend.coordinator.lock("sandbox:c", ttl_s=SHORT_TTL_S)
    assert await holder.acquire()

    await backend.let_time_pass(0.2)
    assert await holder.extend(SHORT_TTL_S) is True

    # 0.1 s past the first expiry and 0.1 s before the extended one.
    await backend.let_time_pass(0.2)
    assert await holder.owned() is True
    assert await other.acquire() is False


async def test_blocking_acquire_waits_for_release(coordinator: Coordinator) -> None:
    holder = coordinator.lock("job:waits", ttl_s=LONG_TTL_S)
    waiter = coordinator.lock("job:waits", ttl_s=LONG_TTL_S)
    assert await holder.acquire()

    started = time.monotonic()
    waiting = asyncio.create_task(waiter.acquire(blocking=True, timeout_s=5.0))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    assert await holder.release()

    assert await waiting is True
    assert time.monotonic() - started < 2.0
    assert await waiter.owned() is True
    assert coordinator.contention_count == 0


async def test_blocking_acquire_times_out(coordinator: Coordinator) -> None:
    holder = coordinator.lock("job:busy", ttl_s=LONG_TTL_S)
    waiter = coordinator.lock("job:busy", ttl_s=LONG_TTL_S)
    assert await holder.acquire()

    started = time.monotonic()
    acquired = await waiter.acquire(blocking=True, timeout_s=0.2)
    elapsed_s = time.monotonic() - started

    assert acquired is False
    assert elapsed_s >= 0.1
    assert elapsed_s < 2.0
    assert coordinator.contention_count == 0


async def test_with_block_raises_when_held(coordinator: Coordinator) -> None:
    holder = coordinator.lock("job:with", ttl_s=LONG_TTL_S)
    other = coordinator.lock("job:with", ttl_s=LONG_TTL_S)

    async with holder:
        assert await holder.owned() is True
        with pytest.raises(LockNotAcquired) as raised:
            async with other:
                pytest.fail("entered a lock held by another owner")
        assert raised.value.lock_name == "job:with"

    assert await holder.locked() is False
    assert coordinator.contention_count == 1


async def test_counter_concurrent_increments(coordinator: Coordinator) -> None:
    values = await asyncio.gather(*(coordinator.counter.incr("pushes") for _ in range(100)))

    assert sorted(values) == list(range(1, 101))
    assert await coordinator.counter.get("pushes") == 100


async def test_counter_reset(coordinator: Coordinator) -> None:
    await coordinator.counter.incr("failures")
    await coordinator.counter.incr("failures")

    await coordinator.counter.reset("failures")

    assert await coordinator.counter.get("failures") == 0
    assert await coordinator.counter.get("never-used") == 0
    assert await coordinator.counter.incr("failures") == 1


async def test_counter_ttl_starts_at_first_increment(backend: Backend) -> None:
    counter = backend.coordinator.counter
    assert await counter.incr("window", ttl_s=SHORT_TTL_S) == 1

    await backend.let_time_pass(0.2)
    # The second increment must not move the expiry set by the first.
    assert await counter.incr("window", ttl_s=SHORT_TTL_S) == 2

    await backend.let_time_pass(0.2)
    assert await counter.get("window") == 0
    assert await counter.incr("window", ttl_s=SHORT_TTL_S) == 1


async def test_hold_renews_beyond_ttl(backend: Backend) -> None:
    coordinator = backend.coordinator
    other = coordinator.lock("job:long", ttl_s=SHORT_TTL_S)

    async with coordinator.hold("job:long", ttl_s=SHORT_TTL_S) as hold:
        # Real time on both backends, because the renewal task runs on the event loop's clock.
        await asyncio.sleep(SHORT_TTL_S * 2.5)
        assert await hold.lock.owned() is True
        assert await other.acquire() is False
        assert hold.lost is False

    assert hold.lost is False
    assert await other.locked() is False
    assert await other.acquire() is True


async def test_hold_sets_lost_flag(backend: Backend, caplog: pytest.LogCaptureFixture) -> None:
    coordinator = backend.coordinator
    taker = backend.replica().lock("job:lost", ttl_s=LONG_TTL_S)

    async with coordinator.hold("job:lost", ttl_s=SHORT_TTL_S) as hold:
        await backend.break_lock("job:lost")
        assert await taker.acquire() is True

        # The first renewal runs after TTL/3 = 0.1 s.
        await asyncio.sleep(SHORT_TTL_S * 0.7)
        assert hold.lost is True

    assert len(lock_lost_records(caplog)) == 1
    assert await taker.owned() is True


async def test_hold_raises_when_held(coordinator: Coordinator) -> None:
    holder = coordinator.lock("job:taken", ttl_s=LONG_TTL_S)
    assert await holder.acquire()

    with pytest.raises(LockNotAcquired):
        async with coordinator.hold("job:taken", ttl_s=LONG_TTL_S):
            pytest.fail("entered a hold on a lock held by another owner")

    assert await holder.owned() is True
    assert coordinator.contention_count == 1


async def test_replicas_exclude_each_other(backend: Backend) -> None:
    first = backend.coordinator.lock("job:schedule", ttl_s=LONG_TTL_S)
    second = backend.replica().lock("job:schedule", ttl_s=LONG_TTL_S)

    assert await first.acquire() is True
    assert await second.acquire() is False

    assert await first.release() is True
    assert await second.acquire() is True


async def test_key_prefix_separates_deployments(backend: Backend) -> None:
    ours = backend.coordinator.lock("job:schedule", ttl_s=LONG_TTL_S)
    other_deployment = backend.replica(key_prefix=backend.coordinator.key_prefix + "other:")
    theirs = other_deployment.lock("job:schedule", ttl_s=LONG_TTL_S)

    assert await ours.acquire() is True
    assert await theirs.acquire() is True


async def test_ping_succeeds(coordinator: Coordinator) -> None:
    await coordinator.ping()


async def test_redis_keys_carry_prefix(redis_coordinator: RedisCoordinator, redis_client: aioredis.Redis) -> None:
    prefix = redis_coordinator.key_prefix
    lock = redis_coordinator.lock("job:keys", ttl_s=LONG_TTL_S)
    assert await lock.acquire()
    await redis_coordinator.counter.incr("events", ttl_s=LONG_TTL_S)

    stored = sorted([key.decode() async for key in redis_client.scan_iter(match=f"{prefix}*")])

    assert stored == [f"{prefix}counter:events", f"{prefix}lock:job:keys"]
    assert 0 < await redis_client.pttl(f"{prefix}lock:job:keys") <= LONG_TTL_S * 1000
    assert 0 < await redis_client.pttl(f"{prefix}counter:events") <= LONG_TTL_S * 1000


def free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_ping_fails_on_closed_port() -> None:
    port = free_local_port()
    coordinator = RedisCoordinator(f"redis://:s3cret@127.0.0.1:{port}/0")

    try:
        with pytest.raises(CoordinationUnavailable) as raised:
            await coordinator.ping()
    finally:
        await coordinator.aclose()

    message = str(raised.value)
    assert f"redis://:***@127.0.0.1:{port}/0" in message
    assert "s3cret" not in message
    assert raised.value.transient is True


async def test_operations_fail_on_closed_port() -> None:
    coordinator = RedisCoordinator(f"redis://127.0.0.1:{free_local_port()}/0")

    try:
        with pytest.raises(CoordinationUnavailable):
            await coordinator.lock("job:down", ttl_s=LONG_TTL_S).acquire()
        with pytest.raises(CoordinationUnavailable):
            await coordinator.counter.incr("events")
    finally:
        await coordinator.aclose()
