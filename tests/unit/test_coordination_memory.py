"""Memory coordinator on a manual clock, input checks, URL masking and backend choice.

The behaviour both backends share is tested in tests/integration/test_coordination.py.
"""

from __future__ import annotations

import asyncio
import logging
import math

import pytest

from sandbox_backup.coordination import (
    LockNotAcquired,
    MemoryCoordinator,
    MemoryStore,
    RedisCoordinator,
    create_coordinator,
    keys,
    mask_url,
)
from sandbox_backup.errors import InvalidInput, SandboxBackupError


class ManualClock:
    """Clock that does not move until a test advances it."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def coordinator(clock: ManualClock) -> MemoryCoordinator:
    return MemoryCoordinator(store=MemoryStore(clock=clock))


def actions(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [getattr(record, "action", "") for record in caplog.records]


async def test_lock_expires_exactly_at_ttl(coordinator: MemoryCoordinator, clock: ManualClock) -> None:
    lock = coordinator.lock("sandbox:a", ttl_s=5.0)
    assert await lock.acquire()

    clock.advance(4.999)
    assert await lock.owned() is True

    clock.advance(0.001)
    assert await lock.owned() is False
    assert await lock.locked() is False


async def test_extend_counts_from_now(coordinator: MemoryCoordinator, clock: ManualClock) -> None:
    lock = coordinator.lock("sandbox:a", ttl_s=5.0)
    assert await lock.acquire()

    clock.advance(4.0)
    assert await lock.extend(2.0) is True

    clock.advance(1.9)
    assert await lock.owned() is True
    clock.advance(0.1)
    assert await lock.owned() is False


async def test_release_twice_returns_false(coordinator: MemoryCoordinator) -> None:
    lock = coordinator.lock("job:a", ttl_s=5.0)
    assert await lock.acquire()

    assert await lock.release() is True
    assert await lock.release() is False


async def test_unacquired_lock_cannot_extend(coordinator: MemoryCoordinator) -> None:
    lock = coordinator.lock("job:a", ttl_s=5.0)

    assert await lock.extend(5.0) is False
    assert await lock.release() is False
    assert await lock.owned() is False


async def test_each_acquire_gets_new_token(coordinator: MemoryCoordinator, clock: ManualClock) -> None:
    lock = coordinator.lock("job:a", ttl_s=5.0)
    assert await lock.acquire()
    first_token = coordinator.store.locks[lock.key][0]

    clock.advance(5.0)
    assert await lock.acquire()
    second_token = coordinator.store.locks[lock.key][0]

    assert first_token != second_token
    assert len(second_token) == 32


async def test_contention_counts_only_failed_nonblocking(coordinator: MemoryCoordinator) -> None:
    holder = coordinator.lock("job:a", ttl_s=5.0)
    other = coordinator.lock("job:a", ttl_s=5.0)

    assert await holder.acquire()
    assert coordinator.contention_count == 0

    assert await other.acquire() is False
    assert await other.acquire() is False
    assert await other.acquire(blocking=True, timeout_s=0.0) is False

    assert coordinator.contention_count == 2


async def test_with_block_releases_on_error(coordinator: MemoryCoordinator) -> None:
    lock = coordinator.lock("job:a", ttl_s=5.0)

    with pytest.raises(RuntimeError):
        async with lock:
            raise RuntimeError("job failed")

    assert await lock.locked() is False


async def test_with_block_logs_expired_lock(
    coordinator: MemoryCoordinator, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    lock = coordinator.lock("job:a", ttl_s=5.0)

    async with lock:
        clock.advance(6.0)

    assert actions(caplog).count("lock_lost") == 1


async def test_lock_not_acquired_is_project_error(coordinator: MemoryCoordinator) -> None:
    holder = coordinator.lock("job:a", ttl_s=5.0)
    assert await holder.acquire()

    with pytest.raises(SandboxBackupError) as raised:
        async with coordinator.lock("job:a", ttl_s=5.0):
            pass

    assert isinstance(raised.value, LockNotAcquired)
    assert "'job:a'" in str(raised.value)


async def test_hold_without_renewal_is_lost(caplog: pytest.LogCaptureFixture) -> None:
    coordinator = MemoryCoordinator()

    async with coordinator.hold("job:a", ttl_s=0.05, renew=False) as hold:
        await asyncio.sleep(0.1)
        assert hold.lost is False

    assert hold.lost is True
    assert actions(caplog).count("lock_lost") == 1


async def test_hold_blocking_waits_for_holder() -> None:
    coordinator = MemoryCoordinator()
    holder = coordinator.lock("job:a", ttl_s=5.0)
    assert await holder.acquire()

    async def release_soon() -> bool:
        await asyncio.sleep(0.05)
        return await holder.release()

    releasing = asyncio.create_task(release_soon())
    async with coordinator.hold("job:a", ttl_s=5.0, blocking=True, timeout_s=2.0) as hold:
        assert await hold.lock.owned() is True

    assert await releasing is True
    assert await holder.locked() is False


async def test_hold_stops_renewal_at_exit() -> None:
    coordinator = MemoryCoordinator()

    async with coordinator.hold("job:a", ttl_s=0.03) as hold:
        renewal = hold._renewal
        assert renewal is not None
        await asyncio.sleep(0.05)

    assert renewal.cancelled() is True
    assert hold.lost is False


async def test_counter_ttl_on_manual_clock(coordinator: MemoryCoordinator, clock: ManualClock) -> None:
    counter = coordinator.counter
    assert await counter.incr("events", ttl_s=10.0) == 1

    clock.advance(9.0)
    assert await counter.incr("events", ttl_s=10.0) == 2

    clock.advance(1.0)
    assert await counter.get("events") == 0


async def test_counter_gets_ttl_later(coordinator: MemoryCoordinator, clock: ManualClock) -> None:
    counter = coordinator.counter
    assert await counter.incr("events") == 1
    clock.advance(100.0)

    assert await counter.incr("events", ttl_s=10.0) == 2

    clock.advance(10.0)
    assert await counter.get("events") == 0


@pytest.mark.parametrize("ttl_s", [0, -1.0, 0.0005, math.nan, math.inf, True, None, "5"])
def test_lock_rejects_bad_ttl(coordinator: MemoryCoordinator, ttl_s: object) -> None:
    with pytest.raises(InvalidInput, match="invalid ttl_s"):
        coordinator.lock("job:a", ttl_s=ttl_s)


@pytest.mark.parametrize("name", ["", None, 5])
def test_lock_rejects_bad_name(coordinator: MemoryCoordinator, name: object) -> None:
    with pytest.raises(InvalidInput, match="invalid lock name"):
        coordinator.lock(name, ttl_s=5.0)


async def test_extend_rejects_bad_ttl(coordinator: MemoryCoordinator) -> None:
    lock = coordinator.lock("job:a", ttl_s=5.0)

    with pytest.raises(InvalidInput, match="invalid ttl_s"):
        await lock.extend(0)


async def test_acquire_rejects_bad_timeout(coordinator: MemoryCoordinator) -> None:
    lock = coordinator.lock("job:a", ttl_s=5.0)

    with pytest.raises(InvalidInput, match="pass blocking=True"):
        await lock.acquire(timeout_s=1.0)
    with pytest.raises(InvalidInput, match="invalid timeout_s"):
        await lock.acquire(blocking=True, timeout_s=-1.0)


async def test_counter_rejects_bad_input(coordinator: MemoryCoordinator) -> None:
    with pytest.raises(InvalidInput, match="invalid counter name"):
        await coordinator.counter.incr("")
    with pytest.raises(InvalidInput, match="invalid ttl_s"):
        await coordinator.counter.incr("events", ttl_s=-1)


def test_coordinator_rejects_bad_prefix() -> None:
    with pytest.raises(InvalidInput, match="invalid key_prefix"):
        MemoryCoordinator(key_prefix=None)


def test_key_names() -> None:
    assert keys.lock_key("sandbox-backup:", keys.job_lock_name("sweep")) == "sandbox-backup:lock:job:sweep"
    assert keys.lock_key("p:", keys.sandbox_lock_name("sb-1")) == "p:lock:sandbox:sb-1"
    assert keys.counter_key("p:", "events") == "p:counter:events"


async def test_default_prefix_applies(coordinator: MemoryCoordinator) -> None:
    lock = coordinator.lock("job:a", ttl_s=5.0)
    await coordinator.counter.incr("events")

    assert lock.key == "sandbox-backup:lock:job:a"
    assert list(coordinator.store.counters) == ["sandbox-backup:counter:events"]


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:secret@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://user:secret@host/1", "rediss://user:***@host/1"),
        ("redis://secret@host", "redis://***@host"),
        ("redis://host/0?password=secret&ssl_cert_reqs=none", "redis://host/0?password=***&ssl_cert_reqs=none"),
        ("redis://[::1", "<unparsable URL>"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


@pytest.mark.parametrize("url", [None, "", "memory://"])
async def test_factory_creates_memory(url: str | None) -> None:
    coordinator = create_coordinator(url, key_prefix="test:")

    assert isinstance(coordinator, MemoryCoordinator)
    assert coordinator.key_prefix == "test:"
    await coordinator.ping()


@pytest.mark.parametrize("url", ["redis://:secret@127.0.0.1:6379/0", "rediss://127.0.0.1:6380", "REDIS://127.0.0.1"])
async def test_factory_creates_redis_lazily(url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sandbox_backup.coordination")

    coordinator = create_coordinator(url)
    await coordinator.aclose()

    assert isinstance(coordinator, RedisCoordinator)
    assert coordinator.key_prefix == keys.DEFAULT_KEY_PREFIX
    assert "secret" not in caplog.text


@pytest.mark.parametrize("url", ["http://:secret@host", "memory://other", "127.0.0.1:6379", " "])
def test_factory_rejects_unknown_url(url: str) -> None:
    with pytest.raises(InvalidInput, match="invalid coordination URL") as raised:
        create_coordinator(url)

    assert "secret" not in str(raised.value)


def test_redis_coordinator_rejects_bad_port() -> None:
    with pytest.raises(InvalidInput, match="invalid Redis URL") as raised:
        RedisCoordinator("redis://:secret@host:notaport/0")

    assert "secret" not in str(raised.value)
