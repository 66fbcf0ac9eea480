"""Tracking: runner reports, progress sync of IN_PROGRESS attempts, and reconciliation.

A runner reports completion or failure as it happens; polling each IN_PROGRESS attempt on its
runner is the fallback that also covers lost reports, runner restarts and attempts that outlive
their deadline. Either path ends an attempt only for the exact image reference it awaits.
"""

from __future__ import annotations

import asyncio
import datetime
import hmac
import logging

from sandbox_backup import errors
from sandbox_backup.domain import reference
from sandbox_backup.manager import attempts, completion_batch
from sandbox_backup.manager.context import ManagerContext
from sandbox_backup.runner.models import BackupReport, RunnerBackupState, SandboxInfo
from sandbox_backup.store import backups
from sandbox_backup.store.models import Backup, Runner

logger = logging.getLogger(__name__)


async def handle_report(ctx: ManagerContext, runner_id: str, token: str, report: BackupReport) -> bool:
    """Apply a runner's report; return False when it does not match the attempt the sandbox awaits.

    A completion that carries its digest, the usual case, is written with the other reports
    that arrive meanwhile, in one transaction (see completion_batch).
    """
    _check_report(report)
    if report.state == RunnerBackupState.COMPLETED and report.digest:
        if ctx.completion_batcher is None:
            ctx.completion_batcher = completion_batch.CompletionBatcher(ctx)
        if await ctx.completion_batcher.submit(runner_id, token, report):
            return True

    async with ctx.db.transaction() as session:
        runner_token, backup = await backups.find_awaited_for_runner(session, runner_id=runner_id, sandbox_id=report.sandbox_id, image_ref=report.snapshot)
    _authenticate(runner_id, runner_token, token)

    if backup is None:
        logger.info(
            "report ignored: no open attempt awaits this image reference on this runner",
            extra={"action": "report_ignored", "runner_id": runner_id, "sandbox_id": report.sandbox_id, "image_ref": report.snapshot, "state": report.state.value},
        )
        return False

    if report.state == RunnerBackupState.COMPLETED:
        # No digest in the report: the registry is asked for it outside any transaction.
        return await attempts.complete_attempt(ctx, backup, digest=report.digest, size_bytes=report.size_bytes, layer_count=report.layer_count)
    if report.state == RunnerBackupState.FAILED:
        reason = f"runner {runner_id} reported: {report.error or 'backup failed'}"
        await attempts.fail_attempt(ctx, backup, reason=reason, transient=report.recoverable)
        return True
    return False


def _authenticate(runner_id: str, expected: str | None, token: str) -> None:
    """Raise errors.ReportRejected unless `token` is the runner's."""
    if expected is None or not token or not hmac.compare_digest(expected.encode(), token.encode()):
        raise errors.ReportRejected(f"report for runner {runner_id!r} rejected: unknown runner or wrong token")


MAX_SIZE_BYTES = 2**63 - 1


def _check_report(report: BackupReport) -> None:
    """Reject a report whose values could not have come from a real backup."""
    reference.validate_sandbox_id(report.sandbox_id)
    reference.parse_reference(report.snapshot)
    if report.digest is not None and not reference.DIGEST_RE.fullmatch(report.digest):
        raise errors.InvalidInput(f"report digest {report.digest!r} is not a digest like sha256:<hex>")
    if report.size_bytes is not None and not 0 <= report.size_bytes <= MAX_SIZE_BYTES:
        raise errors.InvalidInput(f"report sizeBytes {report.size_bytes} is out of range 0..{MAX_SIZE_BYTES}")
    if report.error is not None and "\x00" in report.error:
        raise errors.InvalidInput("report error text contains a NUL character")


async def sync_progress(ctx: ManagerContext) -> int:
    """Check IN_PROGRESS attempts on their runners; return how many ended.

    Only attempts not heard of for `progress_check_after_s` are asked about: a runner reports
    each end as it happens, so polling is the fallback for lost reports and restarted runners,
    and a fleet with thousands of attempts in flight is not polled every few seconds.
    """
    quiet_since = ctx.now() - datetime.timedelta(seconds=ctx.settings.progress_check_after_s)
    async with ctx.db.transaction() as session:
        batch = await backups.in_progress_batch(session, limit=ctx.settings.progress_batch, quiet_since=quiet_since)
    results = await asyncio.gather(*(_check(ctx, backup, runner) for backup, runner in batch))
    return sum(1 for ended in results if ended)


async def _check(ctx: ManagerContext, backup: Backup, runner: Runner | None) -> bool:
    now = ctx.now()
    started = backup.started_at or backup.created_at
    age = now - started
    if runner is None:
        await attempts.fail_attempt(ctx, backup, reason=f"runner {backup.runner_id!r} is no longer registered", transient=True, outcome="lost")
        return True
    if age > datetime.timedelta(seconds=ctx.settings.attempt_deadline_s):
        reason = f"backup timed out: still in progress on runner {runner.id} after {ctx.settings.attempt_deadline_s:.0f} s"
        await attempts.fail_attempt(ctx, backup, reason=reason, transient=True, outcome="timed_out")
        return True

    info = await _ask_runner(ctx, backup, runner)
    if info is _UNKNOWN:
        await _touch(ctx, backup)
        return False
    return await _apply_info(ctx, backup, runner, info, age=age)


_UNKNOWN = object()


async def _ask_runner(ctx: ManagerContext, backup: Backup, runner: Runner) -> SandboxInfo | None | object:
    log_extra = {"sandbox_id": backup.sandbox_id, "backup_id": backup.id, "runner_id": runner.id}
    try:
        async with ctx.runner_calls:
            return await ctx.runner_client(runner).get_sandbox(backup.sandbox_id)
    except errors.RunnerUnavailable as exc:
        logger.warning("runner did not respond to the progress check; retrying at the next check", extra={"action": "progress_unreachable", "error": str(exc), **log_extra})
    except errors.RunnerError as exc:
        logger.error("runner returned an invalid response to the progress check; retrying at the next check", extra={"action": "progress_bad_answer", "error": str(exc), **log_extra})
    return _UNKNOWN


async def _apply_info(ctx: ManagerContext, backup: Backup, runner: Runner, info: SandboxInfo | None, *, age: datetime.timedelta) -> bool:
    knows_attempt = info is not None and info.backup_snapshot == backup.image_ref and info.backup_state != RunnerBackupState.NONE
    if not knows_attempt:
        if age < datetime.timedelta(seconds=ctx.settings.unknown_attempt_grace_s):
            await _touch(ctx, backup)
            return False
        reason = f"runner {runner.id} no longer knows this attempt (it may have restarted or started a newer backup)"
        await attempts.fail_attempt(ctx, backup, reason=reason, transient=True, outcome="lost")
        return True

    assert info is not None
    if info.backup_state == RunnerBackupState.COMPLETED:
        return await attempts.complete_attempt(ctx, backup, digest=info.backup_digest, size_bytes=info.backup_size_bytes, layer_count=info.backup_layer_count)
    if info.backup_state == RunnerBackupState.FAILED:
        await attempts.fail_attempt(ctx, backup, reason=f"runner {runner.id} reported: {info.backup_error or 'backup failed'}", transient=info.recoverable)
        return True

    await _touch(ctx, backup)
    return False


async def _touch(ctx: ManagerContext, backup: Backup) -> None:
    async with ctx.db.transaction() as session:
        await backups.touch_checked(session, backup.id, now=ctx.now())
