"""Locks and counters shared by the manager's replicas, on Redis or in process.

Use `create_coordinator(url)` to get a Coordinator, `coordinator.lock(name, ttl_s=...)`
for a lock object and `coordinator.hold(name, ttl_s=...)` to hold a lock for
the length of a long job.
"""

from sandbox_backup.coordination.base import (
    CoordinationError,
    CoordinationUnavailable,
    Coordinator,
    Counter,
    Hold,
    Lock,
    LockNotAcquired,
)
from sandbox_backup.coordination.factory import create_coordinator
from sandbox_backup.coordination.memory import MemoryCoordinator, MemoryStore
from sandbox_backup.coordination.redis import RedisCoordinator, mask_url

__all__ = [
    "CoordinationError",
    "CoordinationUnavailable",
    "Coordinator",
    "Counter",
    "Hold",
    "Lock",
    "LockNotAcquired",
    "MemoryCoordinator",
    "MemoryStore",
    "RedisCoordinator",
    "create_coordinator",
    "mask_url",
]
