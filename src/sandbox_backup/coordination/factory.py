"""Choice of the coordination backend from a URL."""

from __future__ import annotations

import logging

from sandbox_backup.coordination import keys
from sandbox_backup.coordination.base import Coordinator
from sandbox_backup.coordination.memory import MemoryCoordinator
from sandbox_backup.coordination.redis import RedisCoordinator, mask_url
from sandbox_backup.errors import InvalidInput

logger = logging.getLogger(__name__)

MEMORY_URL = "memory://"
REDIS_SCHEMES = ("redis", "rediss")


def create_coordinator(url: str | None, *, key_prefix: str = keys.DEFAULT_KEY_PREFIX) -> Coordinator:
    """Create the coordinator for `url`: None, "" or memory:// in-process, redis:// or rediss:// on Redis.

    An in-process coordinator suits a single replica only, because its locks do
    not reach other processes. A Redis coordinator connects at its first command,
    so call `ping()` to check the server at start-up.
    """
    # An empty URL counts as unset, because an empty environment variable arrives as "".
    if not url or url == MEMORY_URL:
        logger.info(
            "coordination is in-process: locks exclude tasks of this replica only",
            extra={"action": "coordinator_created", "backend": "memory"},
        )
        return MemoryCoordinator(key_prefix=key_prefix)

    scheme, separator, _ = url.partition("://")
    if separator and scheme.lower() in REDIS_SCHEMES:
        coordinator = RedisCoordinator(url, key_prefix=key_prefix)
        logger.info(
            "coordination uses Redis at %s with key prefix %r",
            coordinator.masked_url,
            key_prefix,
            extra={"action": "coordinator_created", "backend": "redis"},
        )
        return coordinator

    raise InvalidInput(
        f"invalid coordination URL {mask_url(url)!r}: expected redis://HOST[:PORT][/DB], "
        f"rediss://HOST[:PORT][/DB] or {MEMORY_URL}, or an empty URL for a single replica"
    )
