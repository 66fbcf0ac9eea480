"""Key names and fixed durations of the coordination layer, kept in one place.

Every Redis key is `<key prefix><kind>:<name>`, for example
`sandbox-backup:lock:job:schedule-backups`, so two deployments with different
prefixes can share one Redis without touching each other's keys.
"""

from __future__ import annotations

DEFAULT_KEY_PREFIX = "sandbox-backup:"

LOCK_KIND = "lock"
COUNTER_KIND = "counter"

# Redis stores lock and counter expiries in milliseconds (PX, PEXPIRE), so a
# shorter TTL would round down to 0, which redis-py treats as "no expiry".
MIN_TTL_S = 0.001

# How often a blocking acquire tries again while another owner holds the lock.
LOCK_POLL_INTERVAL_S = 0.05

# hold() renews its lock after this fraction of the TTL, so two renewals can
# fail (for example during a short Redis outage) before the lock expires.
RENEW_FRACTION = 1 / 3

# A Redis that does not accept a connection or reply to a command within these
# times counts as unavailable, so a periodic job fails instead of hanging.
REDIS_CONNECT_TIMEOUT_S = 2.0
REDIS_SOCKET_TIMEOUT_S = 5.0


def lock_key(key_prefix: str, name: str) -> str:
    """Build the storage key of the lock called `name`."""
    return f"{key_prefix}{LOCK_KIND}:{name}"


def counter_key(key_prefix: str, name: str) -> str:
    """Build the storage key of the counter called `name`."""
    return f"{key_prefix}{COUNTER_KIND}:{name}"


def job_lock_name(job: str) -> str:
    """Name the lock that lets one replica at a time run the periodic job `job`."""
    return f"job:{job}"


def sandbox_lock_name(sandbox_id: str) -> str:
    """Name the lock under which one replica at a time handles the sandbox `sandbox_id`."""
    return f"sandbox:{sandbox_id}"
