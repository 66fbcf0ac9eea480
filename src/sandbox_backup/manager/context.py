"""Shared state of the manager's parts: settings, database, locks, clock, HTTP clients and wake-up events."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import random

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

    def runner_client(self, runner: Runner) -> RunnerClient:
        """Return a client for one runner over the shared connection pool; closing it leaves the pool open."""
        return RunnerClient(runner.api_url, runner.token, runner_id=runner.id, timeout_s=self.settings.runner_timeout_s, http=self.http)

    def registry_client(self, registry: Registry) -> RegistryClient:
        return RegistryClient(
            registry.url,
            username=registry.username,
            password=registry.password,
            timeout_s=self.settings.registry_timeout_s,
            http=self.http,
        )
