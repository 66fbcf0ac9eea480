"""Prometheus metrics of one runner agent, served at GET /metrics on the agent."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

PREFIX = "sandbox_backup_runner_"
# The text format that `generate_latest` writes, as prometheus_client names it.
CONTENT_TYPE = CONTENT_TYPE_LATEST

# Seconds, from a quick commit up to 4 h for a very large push.
DURATION_BUCKETS_S = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)


class RunnerMetrics:
    """The agent's metrics, on a registry per app so several agents in one process stay apart."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.backups = Counter(
            PREFIX + "backups",
            "Backup attempts whose outcome this agent recorded, by outcome (replaced attempts are not counted).",
            ["outcome"],
            registry=self.registry,
        )
        self.commit_duration = Histogram(
            PREFIX + "commit_duration_seconds", "Time to commit a sandbox container to an image.", buckets=DURATION_BUCKETS_S, registry=self.registry
        )
        self.push_duration = Histogram(
            PREFIX + "push_duration_seconds", "Time to push a backup image to its registry.", buckets=DURATION_BUCKETS_S, registry=self.registry
        )
        self.flattens = Counter(
            PREFIX + "flattens", "Backup images flattened to one layer because they had too many layers.", registry=self.registry
        )
        for outcome in ("completed", "failed"):
            self.backups.labels(outcome)

    def render(self) -> bytes:
        """Return the registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)
