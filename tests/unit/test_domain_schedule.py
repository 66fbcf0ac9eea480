import dataclasses
import datetime

import pytest

from sandbox_backup.domain.schedule import DueView, backup_due, dispatch_priority
from sandbox_backup.domain.states import BackupTrigger, RunnerState, SandboxBackupState, SandboxState

NOW = datetime.datetime(2026, 12, 4, 12, 0, tzinfo=datetime.timezone.utc)
HOUR = datetime.timedelta(hours=1)


def view(**changes: object) -> DueView:
    base = DueView(
        state=SandboxState.STARTED,
        backup_state=SandboxBackupState.NONE,
        runner_state=RunnerState.READY,
        organization_id="org",
        ephemeral=False,
        desired_state=None,
        state_changed_at=NOW - 10 * HOUR,
        last_backup_at=None,
        last_backup_started_at=None,
        last_attempt_ended_at=None,
    )
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, BackupTrigger.SCHEDULE),  # running, never backed up
        # A COMPLETED state does not block the next scheduled backup.
        ({"backup_state": SandboxBackupState.COMPLETED, "last_backup_at": NOW - 2 * HOUR}, BackupTrigger.SCHEDULE),
        ({"backup_state": SandboxBackupState.COMPLETED, "last_backup_at": NOW - HOUR / 2}, None),  # fresh enough
        ({"backup_state": SandboxBackupState.PENDING}, None),  # one in flight already
        ({"backup_state": SandboxBackupState.IN_PROGRESS}, None),
        ({"ephemeral": True}, None),
        ({"organization_id": None}, None),  # warm pool
        ({"desired_state": SandboxState.DESTROYED}, None),
        ({"runner_state": RunnerState.UNRESPONSIVE}, None),
        ({"runner_state": RunnerState.NOT_READY}, None),
        ({"runner_state": RunnerState.DRAINING}, BackupTrigger.SCHEDULE),  # draining runners still answer
        ({"runner_state": None}, None),  # no runner
        # Retries exhausted: the schedule tries again only one interval after the last attempt.
        ({"backup_state": SandboxBackupState.ERROR, "last_attempt_ended_at": NOW - HOUR / 2}, None),
        ({"backup_state": SandboxBackupState.ERROR, "last_attempt_ended_at": NOW - 2 * HOUR}, BackupTrigger.SCHEDULE),
        # Stopped: due until a backup dispatched after the stop completes.
        ({"state": SandboxState.STOPPED}, BackupTrigger.STOPPED),
        ({"state": SandboxState.STOPPED, "last_backup_started_at": NOW - 11 * HOUR, "last_backup_at": NOW - 11 * HOUR}, BackupTrigger.STOPPED),
        ({"state": SandboxState.STOPPED, "last_backup_started_at": NOW - 9 * HOUR, "last_backup_at": NOW - 9 * HOUR}, None),
        ({"state": SandboxState.ARCHIVING}, BackupTrigger.ARCHIVE),
        ({"state": SandboxState.ARCHIVED}, None),
        ({"state": SandboxState.DESTROYED}, None),
    ],
)
def test_backup_due(changes: dict[str, object], expected: BackupTrigger | None) -> None:
    assert backup_due(view(**changes), now=NOW, interval=HOUR) == expected


def test_dispatch_priority_order() -> None:
    ranks = [dispatch_priority(s) for s in (SandboxState.ARCHIVING, SandboxState.STOPPED, SandboxState.STARTED)]
    assert ranks == sorted(ranks)
    assert len(set(ranks)) == 3
