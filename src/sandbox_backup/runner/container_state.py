"""Mapping of Docker Engine container status to the sandbox state of the runner API."""

from __future__ import annotations

from sandbox_backup.runner.models import RunnerSandboxState

# Exit codes of a container stopped on purpose: 0, or killed by SIGKILL (128+9) or SIGTERM (128+15).
_CLEAN_EXIT_CODES = frozenset({0, 137, 143})

_STATUS_TO_STATE = {
    "created": RunnerSandboxState.STOPPED,
    "configured": RunnerSandboxState.STOPPED,
    "running": RunnerSandboxState.STARTED,
    # NOTE: a paused container is reported as started, because this agent pauses a
    # container only for the few seconds of a commit, and the sandbox is running again after.
    "paused": RunnerSandboxState.STARTED,
    "restarting": RunnerSandboxState.STARTING,
    "stopping": RunnerSandboxState.STOPPING,
    "removing": RunnerSandboxState.DESTROYING,
    "dead": RunnerSandboxState.ERROR,
}


def sandbox_state(status: str, exit_code: int | None) -> RunnerSandboxState:
    """Return the runner API state for an engine status such as `running` or `exited`."""
    if status == "exited":
        if exit_code in _CLEAN_EXIT_CODES:
            return RunnerSandboxState.STOPPED
        return RunnerSandboxState.ERROR
    return _STATUS_TO_STATE.get(status, RunnerSandboxState.UNKNOWN)
