"""Prometheus metrics of the manager, served at GET /metrics.

Every manager has its own CollectorRegistry, so tests and several managers in one process never
share a counter. Counters and histograms of events (attempts ended, verifications, restores, job
runs) count what this replica did: sum them across replicas. The gauges of database state
(queues per runner, runner states, backup ages, deletions owed) are read from the database at
each scrape by `DatabaseStateCollector`, so every replica reports the same fleet-wide values:
take max() across replicas, not sum().
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import exc as sa_exc

from sandbox_backup.store import metrics_queries
from sandbox_backup.store.metrics_queries import FleetSnapshot
from sandbox_backup.store.transaction import Database

logger = logging.getLogger(__name__)

PREFIX = "sandbox_backup_"

ATTEMPT_OUTCOMES = ("completed", "failed_transient", "failed_permanent", "timed_out", "lost")
VERIFICATION_OUTCOMES = ("verified", "broken", "unknown")
RESTORE_PURPOSES = ("RESTORE", "MOVE", "DRILL")
RESTORE_OUTCOMES = ("completed", "failed")
RUNNER_STATES = ("READY", "NOT_READY", "DRAINING", "UNRESPONSIVE")

# Seconds, from a quick commit up to 4 h for a very large push.
DURATION_BUCKETS_S = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)
# Bytes: 1 MiB to 256 GiB in steps of 4x.
SIZE_BUCKETS_BYTES = tuple(float(2**20 * 4**step) for step in range(10))
# Seconds since the newest completed backup: 15 min to 7 days, around the 1 h default interval.
BACKUP_AGE_BUCKETS_S = (900, 1800, 3600, 5400, 7200, 14400, 28800, 86400, 259200, 604800)
# Seconds of one run of a periodic job body.
JOB_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

# The text format that `generate_latest` writes, as prometheus_client names it.
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ManagerMetrics:
    """The metrics of one manager, on their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry

        self.attempts_started = Counter(
            PREFIX + "attempts_started", "Backup attempts claimed and sent to a runner.", registry=registry
        )
        self.attempts = Counter(
            PREFIX + "attempts", "Backup attempts that ended, by outcome.", ["outcome"], registry=registry
        )
        self.attempt_duration = Histogram(
            PREFIX + "attempt_duration_seconds",
            "Time from dispatch to the end of a backup attempt, by outcome.",
            ["outcome"],
            buckets=DURATION_BUCKETS_S,
            registry=registry,
        )
        self.backup_size = Histogram(
            PREFIX + "backup_size_bytes",
            "Size of completed backups as the runner or registry reported it.",
            buckets=SIZE_BUCKETS_BYTES,
            registry=registry,
        )
        self.verifications = Counter(
            PREFIX + "verifications", "Registry checks of kept backups, by outcome.", ["outcome"], registry=registry
        )
        self.restores = Counter(
            PREFIX + "restores", "Restores, moves and drills that ended, by purpose and outcome.", ["purpose", "outcome"], registry=registry
        )
        self.restore_duration = Histogram(
            PREFIX + "restore_duration_seconds",
            "Time from a restore request to its end, by purpose and outcome.",
            ["purpose", "outcome"],
            buckets=DURATION_BUCKETS_S,
            registry=registry,
        )
        self.registry_up = Gauge(
            PREFIX + "registry_up",
            "1 when the last registry call of a verification or restore got an answer, 0 when the registry could not tell.",
            ["registry"],
            registry=registry,
        )
        self.runner_probes = Counter(
            PREFIX + "runner_probes", "Runner health probes, by whether the runner answered.", ["runner", "result"], registry=registry
        )
        self.job_duration = Histogram(
            PREFIX + "job_duration_seconds",
            "Wall time of one run of a periodic job body on this replica.",
            ["periodic_job"],
            buckets=JOB_BUCKETS_S,
            registry=registry,
        )
        self.job_skipped = Counter(
            PREFIX + "job_skipped", "Ticks of a periodic job skipped because another replica held its lock.", ["periodic_job"], registry=registry
        )
        self.job_failures = Counter(
            PREFIX + "job_failures", "Runs of a periodic job that raised an error.", ["periodic_job"], registry=registry
        )
        self.database = DatabaseStateCollector()
        registry.register(self.database)

        # Known label values start at 0, so rate() and ratios exist before the first event.
        for outcome in ATTEMPT_OUTCOMES:
            self.attempts.labels(outcome)
        for outcome in VERIFICATION_OUTCOMES:
            self.verifications.labels(outcome)
        for purpose in RESTORE_PURPOSES:
            for outcome in RESTORE_OUTCOMES:
                self.restores.labels(purpose, outcome)

    def record_attempt_end(self, outcome: str, *, duration_s: float | None, size_bytes: int | None = None) -> None:
        self.attempts.labels(outcome).inc()
        if duration_s is not None:
            self.attempt_duration.labels(outcome).observe(max(0.0, duration_s))
        if size_bytes is not None:
            self.backup_size.observe(size_bytes)

    def record_verification(self, registry_id: str, outcome: str, *, registry_answered: bool) -> None:
        self.verifications.labels(outcome.lower()).inc()
        self.registry_up.labels(registry_id).set(1 if registry_answered else 0)

    def record_restore_end(self, purpose: str, outcome: str, *, duration_s: float) -> None:
        self.restores.labels(purpose, outcome).inc()
        self.restore_duration.labels(purpose, outcome).observe(max(0.0, duration_s))

    async def refresh(self, db: Database, *, now: datetime.datetime, contention_count: int) -> None:
        """Read the database gauges for the next scrape. A failed read is logged, and the gauges are left out."""
        self.database.contention_count = contention_count
        try:
            async with db.transaction() as session:
                self.database.snapshot = await metrics_queries.fleet_snapshot(session, now=now)
            self.database.database_up = True
        except (sa_exc.SQLAlchemyError, OSError) as exc:
            # The scrape still serves the event metrics, and database_up shows that the rest is missing.
            logger.warning("could not read the database for /metrics: %s", exc, extra={"action": "metrics_database_failed", "error": str(exc)})
            self.database.snapshot = None
            self.database.database_up = False

    def render(self) -> bytes:
        """Return the registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)


# eq=False keeps the object hashable, as CollectorRegistry needs.
@dataclasses.dataclass(eq=False)
class DatabaseStateCollector(Collector):
    """Gauges read from the database at each scrape, plus the coordinator's lock contention count."""

    snapshot: FleetSnapshot | None = None
    database_up: bool = True
    contention_count: int = 0

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(PREFIX + "database_up", "1 when the last /metrics scrape could read the database, else 0.", value=int(self.database_up))
        yield CounterMetricFamily(
            PREFIX + "lock_contention",
            "Non-blocking lock acquires of this replica that found the lock held by another owner.",
            value=self.contention_count,
        )
        snapshot = self.snapshot
        if snapshot is None:
            return

        pending = GaugeMetricFamily(PREFIX + "attempts_pending", "PENDING backup attempts, by the runner of their sandbox.", labels=["runner"])
        for runner, count in sorted(snapshot.pending_by_runner.items()):
            pending.add_metric([runner], count)
        yield pending

        in_progress = GaugeMetricFamily(PREFIX + "attempts_in_progress", "IN_PROGRESS backup attempts, by runner.", labels=["runner"])
        for runner, count in sorted(snapshot.in_progress_by_runner.items()):
            in_progress.add_metric([runner], count)
        yield in_progress

        yield _runner_state_family(snapshot)
        yield GaugeMetricFamily(PREFIX + "deletions_owed", "Registry deletions queued and not yet done.", value=snapshot.deletions_owed)
        yield from _backup_age_families(snapshot)


def _runner_state_family(snapshot: FleetSnapshot) -> GaugeMetricFamily:
    family = GaugeMetricFamily(PREFIX + "runner_state", "1 for the runner's current state, 0 for the others.", labels=["runner", "state"])
    for runner, current in sorted(snapshot.runner_states.items()):
        for state in RUNNER_STATES:
            family.add_metric([runner, state], 1 if state == current else 0)
    return family


def _backup_age_families(snapshot: FleetSnapshot) -> Iterator[Metric]:
    ages = snapshot.newest_backup_ages_s
    cumulative = [(str(float(bound)), sum(1 for age in ages if age <= bound)) for bound in BACKUP_AGE_BUCKETS_S]
    cumulative.append(("+Inf", len(ages)))
    yield HistogramMetricFamily(
        PREFIX + "newest_backup_age_seconds",
        "Running sandboxes by the age of their newest COMPLETED backup (since the sandbox was recorded when it has none).",
        buckets=cumulative,
        sum_value=sum(ages),
    )
    yield GaugeMetricFamily(
        PREFIX + "newest_backup_age_max_seconds",
        "Max over running sandboxes of the age of the newest COMPLETED backup; 0 with no running sandbox.",
        value=max(ages, default=0.0),
    )
    yield GaugeMetricFamily(PREFIX + "sandboxes_never_backed_up", "Running sandboxes with no COMPLETED backup yet.", value=snapshot.never_backed_up)
