"""Shared state of the manager's parts: settings, database, locks, clock, HTTP clients and wake-up events."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import random
import ssl
from typing import Any

import httpx

from sandbox_backup.clock import Clock
from sandbox_backup.config import Settings
from sandbox_backup.coordination.base import Coordinator
from sandbox_backup.domain.retry import RetryPolicy
from sandbox_backup.metrics import ManagerMetrics
from sandbox_backup.registry.client import RegistryClient
from sandbox_backup.runner.client import RunnerClient
from sandbox_backup.store.models import Registry, Runner
from sandbox_backup.store.transaction import Database


# Connections kept per runner: a runner runs a handful of backups at once and answers a few
# progress checks, so a small pool per runner is enough.
RUNNER_POOL_CONNECTIONS = 16


@dataclasses.dataclass
class ManagerContext:
    settings: Settings
    db: Database
    coordinator: Coordinator
    clock: Clock
    http: httpx.AsyncClient
    rng: random.Random = dataclasses.field(default_factory=random.Random)
    metrics: ManagerMetrics = dataclasses.field(default_factory=ManagerMetrics)
    # Set to run a job at once instead of at its next tick.
    wake_dispatch: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    wake_cleanup: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    wake_restore: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    wake_archive: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    runner_calls: asyncio.Semaphore = dataclasses.field(init=False)
    # When each runner last accepted a backup from this manager. Accepting one needs the agent
    # and its engine, so the health job skips runners that did so within one probe interval.
    runner_accepted_at: dict[str, datetime.datetime] = dataclasses.field(default_factory=dict)
    # One small connection pool per runner address (see runner_http).
    _runner_pools: dict[str, httpx.AsyncClient] = dataclasses.field(init=False, default_factory=dict)
    _tls: ssl.SSLContext | None = dataclasses.field(init=False, default=None)
    # The manager's CompletionBatcher, made by tracking on the first report.
    completion_batcher: Any = dataclasses.field(init=False, default=None)

    def __post_init__(self) -> None:
        self.runner_calls = asyncio.Semaphore(self.settings.runner_call_concurrency)

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.settings.retry_max_attempts,
            base_delay_s=self.settings.retry_base_delay_s,
            max_delay_s=self.settings.retry_max_delay_s,
            jitter=self.settings.retry_jitter,
        )

    @property
    def backup_interval(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.settings.backup_interval_s)

    def now(self) -> datetime.datetime:
        return self.clock.now()

    def runner_http(self, api_url: str) -> httpx.AsyncClient:
        """Return the connection pool for one runner address, creating it on first use.

        httpx scans every connection of a pool for each request, so one pool shared by a
        thousand runners costs far more CPU per call than a small pool per runner.
        """
        pool = self._runner_pools.get(api_url)
        if pool is None:
            limit = min(self.settings.runner_call_concurrency, RUNNER_POOL_CONNECTIONS)
            # One TLS context for every pool: building one costs milliseconds of CPU each time.
            if self._tls is None:
                self._tls = ssl.create_default_context()
            pool = httpx.AsyncClient(verify=self._tls, limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit))
            self._runner_pools[api_url] = pool
        return pool

    def runner_client(self, runner: Runner, *, timeout_s: float | None = None) -> RunnerClient:
        """Return a client for one runner over its connection pool; closing it leaves the pool open."""
        timeout_s = self.settings.runner_timeout_s if timeout_s is None else timeout_s
        return RunnerClient(runner.api_url, runner.token, runner_id=runner.id, timeout_s=timeout_s, http=self.runner_http(runner.api_url))

    async def close_http(self) -> None:
        """Close the registry client's pool and every runner pool."""
        pools, self._runner_pools = list(self._runner_pools.values()), {}
        for pool in [self.http, *pools]:
            await pool.aclose()

    def registry_client(self, registry: Registry) -> RegistryClient:
        return RegistryClient(
            registry.url,
            username=registry.username,
            password=registry.password,
            timeout_s=self.settings.registry_timeout_s,
            http=self.http,
        )
