"""Objects that the request handlers of one agent app share."""

from __future__ import annotations

import dataclasses

import fastapi

from sandbox_backup.runner.backup import BackupJobs
from sandbox_backup.runner.engine import DockerEngine
from sandbox_backup.runner.settings import RunnerSettings
from sandbox_backup.runner.state import BackupStateStore


@dataclasses.dataclass
class RunnerContext:
    settings: RunnerSettings
    engine: DockerEngine
    store: BackupStateStore
    jobs: BackupJobs


def runner_context(request: fastapi.Request) -> RunnerContext:
    """Return the context that the app's lifespan stored on `app.state.runner`."""
    return request.app.state.runner
