"""States of sandboxes, backups and runners, and the backup state machine."""

from __future__ import annotations

import enum


class SandboxState(str, enum.Enum):
    STARTED = "STARTED"
    STOPPED = "STOPPED"
    ARCHIVING = "ARCHIVING"
    ARCHIVED = "ARCHIVED"
    RESTORING = "RESTORING"
    DESTROYED = "DESTROYED"
    ERROR = "ERROR"


class BackupState(str, enum.Enum):
    """State of one backup attempt (one row of the backups table)."""

    PENDING = "PENDING"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    ERROR = "ERROR"


class SandboxBackupState(str, enum.Enum):
    """Backup state shown on the sandbox: NONE before the first attempt, else its current attempt's."""

    NONE = "NONE"
    PENDING = "PENDING"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    ERROR = "ERROR"


class RunnerState(str, enum.Enum):
    READY = "READY"
    NOT_READY = "NOT_READY"
    DRAINING = "DRAINING"
    UNRESPONSIVE = "UNRESPONSIVE"


class BackupTrigger(str, enum.Enum):
    """Why an attempt was queued; also decides its dispatch priority."""

    SCHEDULE = "SCHEDULE"
    STOPPED = "STOPPED"
    ARCHIVE = "ARCHIVE"
    REQUESTED = "REQUESTED"
    DRAIN = "DRAIN"


# Runner states whose sandboxes are scheduled for backup: the runner answers.
SCHEDULABLE_RUNNER_STATES = frozenset({RunnerState.READY, RunnerState.DRAINING})

# Sandbox states from which a backup can be taken: the container exists on a runner.
BACKUP_SOURCE_STATES = frozenset({SandboxState.STARTED, SandboxState.STOPPED, SandboxState.ARCHIVING})

# Allowed transitions of one attempt. ERROR is final for the attempt: a retry is a new
# PENDING attempt row, so the history keeps every failure.
BACKUP_TRANSITIONS: dict[BackupState, frozenset[BackupState]] = {
    BackupState.PENDING: frozenset({BackupState.IN_PROGRESS, BackupState.ERROR, BackupState.COMPLETED}),
    BackupState.IN_PROGRESS: frozenset({BackupState.COMPLETED, BackupState.ERROR, BackupState.PENDING}),
    BackupState.COMPLETED: frozenset(),
    BackupState.ERROR: frozenset(),
}


def can_transition(current: BackupState, target: BackupState) -> bool:
    """Tell whether an attempt in `current` may move to `target`."""
    return target in BACKUP_TRANSITIONS[current]


class RestoreState(str, enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


class RestorePurpose(str, enum.Enum):
    """RESTORE brings a sandbox up on a runner; MOVE relocates a stopped one off a draining runner;
    DRILL recreates it under a throwaway id to prove the backup works, then removes it."""

    RESTORE = "RESTORE"
    MOVE = "MOVE"
    DRILL = "DRILL"


OPEN_RESTORE_STATES = frozenset({RestoreState.PENDING, RestoreState.RUNNING})
