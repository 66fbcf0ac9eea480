"""Due rules for sandbox backups and the dispatch order of attempts."""

from __future__ import annotations

import dataclasses
import datetime

from sandbox_backup.domain.states import (
    SCHEDULABLE_RUNNER_STATES,
    BackupTrigger,
    RunnerState,
    SandboxBackupState,
    SandboxState,
)

IN_FLIGHT = frozenset({SandboxBackupState.PENDING, SandboxBackupState.IN_PROGRESS})

# Lower runs first: a sandbox about to leave its node, then one that stopped, then a running one.
STATE_PRIORITY = {SandboxState.ARCHIVING: 0, SandboxState.STOPPED: 1, SandboxState.STARTED: 2}


@dataclasses.dataclass(frozen=True)
class DueView:
    """The facts about one sandbox that decide whether a backup is due."""

    state: SandboxState
    backup_state: SandboxBackupState
    runner_state: RunnerState | None
    organization_id: str | None
    ephemeral: bool
    desired_state: SandboxState | None
    state_changed_at: datetime.datetime
    last_backup_at: datetime.datetime | None
    last_backup_started_at: datetime.datetime | None
    last_attempt_ended_at: datetime.datetime | None


def never_backed_up_reason(view: DueView) -> str | None:
    """Return why a sandbox is never backed up, or None when it may be."""
    if view.ephemeral:
        return "ephemeral sandbox"
    if view.organization_id is None:
        return "warm-pool sandbox not yet given to an organization"
    if view.desired_state == SandboxState.DESTROYED:
        return "sandbox is being destroyed"
    return None


def backup_due(view: DueView, *, now: datetime.datetime, interval: datetime.timedelta) -> BackupTrigger | None:
    """Return the trigger when a backup of this sandbox is due now, else None.

    - a running sandbox is due when its newest completed backup is older than `interval`, whatever
      state its last attempt ended in (COMPLETED does not block the next scheduled backup);
    - a stopped or archiving sandbox is due until a backup dispatched after it stopped completes;
    - an attempt that ended in ERROR is tried again by the schedule only after `interval`, so a
      sandbox whose retries are exhausted is not hammered every tick.
    """
    if never_backed_up_reason(view) or view.runner_state not in SCHEDULABLE_RUNNER_STATES:
        return None
    if view.backup_state in IN_FLIGHT:
        return None
    if view.backup_state == SandboxBackupState.ERROR and view.last_attempt_ended_at is not None:
        if now - view.last_attempt_ended_at < interval:
            return None

    if view.state == SandboxState.STARTED:
        if view.last_backup_at is None or now - view.last_backup_at >= interval:
            return BackupTrigger.SCHEDULE
        return None

    if view.state in (SandboxState.STOPPED, SandboxState.ARCHIVING):
        # NOTE: both times come from manager clocks. A replica whose clock runs ahead of the one
        # that recorded the stop can make an attempt dispatched before the stop look newer; keep
        # replica clocks in sync (NTP) well within the time between a stop and its backup.
        covered = view.last_backup_started_at is not None and view.last_backup_started_at > view.state_changed_at
        if covered:
            return None
        return BackupTrigger.ARCHIVE if view.state == SandboxState.ARCHIVING else BackupTrigger.STOPPED

    return None


def dispatch_priority(state: SandboxState) -> int:
    """Return the dispatch rank of a sandbox state; lower is sent first."""
    return STATE_PRIORITY.get(state, len(STATE_PRIORITY))
