"""Restore a sandbox from the newest backup that still verifies in the registry.

Candidates are the sandbox's COMPLETED backups that are neither broken nor deleted, newest first
(or the one backup the caller named). Each is checked in the registry before use:
- the manifest is gone, or its digest is not the one recorded at completion: the backup is
  marked broken and the next older candidate is tried;
- the registry could not tell (timeout, 5xx, auth failure): the restore waits and tries again
  with back-off, and never falls back to older data because of it; when the registry stays
  unreachable the restore fails and says so;
- the runner cannot pull it (manifest present, a layer missing): marked broken, next candidate.
A restore is a row in `restores`, leased to one worker at a time, so a manager that restarts
picks it up where it stopped.
"""

from __future__ import annotations

import datetime
import enum
import logging
import uuid

from sqlalchemy import exc as sa_exc

from sandbox_backup import errors
from sandbox_backup.domain import reference
from sandbox_backup.domain.states import RestorePurpose, RestoreState, RunnerState, SandboxState
from sandbox_backup.manager.context import ManagerContext
from sandbox_backup.runner.client import RunnerClient
from sandbox_backup.runner.models import CreateSandboxRequest, RegistryCredentials
from sandbox_backup.store import backups, fleet, restores, sandboxes
from sandbox_backup.store.models import Backup, Registry, Restore, Runner, Sandbox

logger = logging.getLogger(__name__)

# A worker keeps a restore this long beyond the runner call's own timeout before another may take it over.
LEASE_MARGIN_S = 300.0
PULL_FAILURE_CODES = {"MANIFEST_UNKNOWN", "BLOB_UNKNOWN"}


class RegistryCheck(enum.Enum):
    VERIFIED = "verified"
    MISSING = "missing"
    UNKNOWN = "unknown"


async def request_restore(
    ctx: ManagerContext,
    sandbox_id: str,
    *,
    backup_id: str | None = None,
    runner_id: str | None = None,
    purpose: RestorePurpose = RestorePurpose.RESTORE,
) -> Restore:
    """Validate a restore request and record it; the restore job carries it out.

    Raises NotFound for an unknown sandbox, backup or runner, InvalidInput for a backup of another
    sandbox, and Conflict for a state that does not allow it; nothing is written then.
    """
    try:
        return await _record_request(ctx, sandbox_id, backup_id=backup_id, runner_id=runner_id, purpose=purpose)
    except sa_exc.IntegrityError:
        # A concurrent request opened a restore first; the database's unique index kept it single.
        async with ctx.db.transaction() as session:
            existing = await restores.open_for_sandbox(session, sandbox_id, purposes=(purpose,))
        if existing is None:
            raise errors.Conflict(f"sandbox {sandbox_id!r} already has a restore in progress; wait for it to end") from None
        return existing


async def _record_request(
    ctx: ManagerContext, sandbox_id: str, *, backup_id: str | None, runner_id: str | None, purpose: RestorePurpose
) -> Restore:
    async with ctx.db.transaction() as session:
        sandbox = await sandboxes.get_sandbox(session, sandbox_id)
        if sandbox is None:
            raise errors.NotFound(f"sandbox {sandbox_id!r} is not known to the manager")
        await _check_request(session, sandbox, backup_id=backup_id, runner_id=runner_id, purpose=purpose)

        existing = await restores.open_for_sandbox(session, sandbox_id, purposes=(purpose,))
        if existing is not None:
            return existing
        if purpose != RestorePurpose.DRILL and await restores.open_for_sandbox(session, sandbox_id) is not None:
            raise errors.Conflict(f"sandbox {sandbox_id!r} already has a restore in progress; wait for it to end")

        restore = await restores.create(
            session,
            sandbox_id=sandbox_id,
            purpose=purpose,
            target_sandbox_id=_target_id(sandbox_id, purpose),
            previous_runner_id=sandbox.runner_id,
            requested_backup_id=backup_id,
            requested_runner_id=runner_id,
            now=ctx.now(),
        )
        if purpose == RestorePurpose.RESTORE and not await sandboxes.set_state(session, sandbox, SandboxState.RESTORING, now=ctx.now()):
            raise errors.Conflict(f"sandbox {sandbox_id!r} changed while the restore was requested; send it again")

    logger.info(
        "restore requested",
        extra={"action": "restore_requested", "restore_id": restore.id, "sandbox_id": sandbox_id, "purpose": purpose.value, "backup_id": backup_id, "runner_id": runner_id},
    )
    ctx.wake_restore.set()
    return restore


async def _check_request(session, sandbox: Sandbox, *, backup_id: str | None, runner_id: str | None, purpose: RestorePurpose) -> None:  # type: ignore[no-untyped-def]
    if sandbox.state == SandboxState.DESTROYED or sandbox.desired_state == SandboxState.DESTROYED:
        raise errors.Conflict(f"sandbox {sandbox.id!r} is destroyed; it cannot be restored")
    if purpose == RestorePurpose.RESTORE and sandbox.state in (SandboxState.ARCHIVING, SandboxState.RESTORING):
        raise errors.Conflict(f"sandbox {sandbox.id!r} is {sandbox.state.value}; restore it after that ends")

    if backup_id is not None:
        backup = await backups.get_backup(session, backup_id)
        if backup is None:
            raise errors.NotFound(f"backup {backup_id!r} does not exist")
        if backup.sandbox_id != sandbox.id:
            raise errors.InvalidInput(f"backup {backup_id!r} belongs to sandbox {backup.sandbox_id!r}, not {sandbox.id!r}")
        if backup.state.value != "COMPLETED" or backup.deleted_at is not None:
            raise errors.Conflict(f"backup {backup_id!r} is {backup.state.value}{' and deleted' if backup.deleted_at else ''}; only a kept COMPLETED backup can be restored")
        if backup.broken_at is not None:
            raise errors.Conflict(f"backup {backup_id!r} is broken ({backup.broken_reason}); choose another backup")

    if runner_id is not None:
        runner = await fleet.get_runner(session, runner_id)
        if runner is None:
            raise errors.NotFound(f"runner {runner_id!r} is not registered")
        if runner.state != RunnerState.READY:
            raise errors.Conflict(f"runner {runner_id!r} is {runner.state.value}; a restore needs a READY runner")
        if runner_id == sandbox.runner_id and purpose != RestorePurpose.DRILL and sandbox.state != SandboxState.ARCHIVED:
            raise errors.Conflict(f"runner {runner_id!r} already holds sandbox {sandbox.id!r}; choose another runner")


def _target_id(sandbox_id: str, purpose: RestorePurpose) -> str:
    if purpose != RestorePurpose.DRILL:
        return sandbox_id
    suffix = f"-drill-{uuid.uuid4().hex[:8]}"
    return reference.validate_sandbox_id(sandbox_id[: reference.MAX_SANDBOX_ID_LENGTH - len(suffix)].rstrip("-._") + suffix)


async def run_due_restores(ctx: ManagerContext) -> int:
    """Carry out open restores whose lease expired or whose back-off ended; return how many finished."""
    now = ctx.now()
    async with ctx.db.transaction() as session:
        due = await restores.due(session, now=now, limit=ctx.settings.restore_batch)
    finished = 0
    for restore in due:
        async with ctx.db.transaction() as session:
            lease_s = ctx.settings.restore_timeout_s + LEASE_MARGIN_S
            taken = await restores.lease(session, restore, until=now + datetime.timedelta(seconds=lease_s), now=now)
        if taken and await _run(ctx, restore.id):
            finished += 1
    return finished


async def _run(ctx: ManagerContext, restore_id: str) -> bool:
    async with ctx.db.transaction() as session:
        restore = await restores.get(session, restore_id)
        sandbox = await sandboxes.get_sandbox(session, restore.sandbox_id) if restore else None
        candidates = await _candidates(session, restore) if restore else []
    if restore is None or sandbox is None:
        return False
    changed = _sandbox_moved_on(restore, sandbox)
    if changed:
        return await _fail(ctx, restore, changed)
    if not candidates:
        return await _fail(ctx, restore, "no verified backup exists for this sandbox", no_backup=True)

    runner = await _target_runner(ctx, restore, sandbox)
    if runner is None:
        return await _postpone(ctx, restore, "no READY runner with free capacity in the sandbox's region")

    for backup in candidates:
        outcome = await _try_candidate(ctx, restore, sandbox, runner, backup)
        if outcome is not None:
            return outcome
    return await _fail(ctx, restore, "no verified backup exists for this sandbox: every candidate was missing or broken in the registry", no_backup=True)


def _sandbox_moved_on(restore: Restore, sandbox: Sandbox) -> str | None:
    """Return why the restore no longer fits the sandbox (destroyed, started, archived...), or None."""
    if sandbox.state == SandboxState.DESTROYED or sandbox.desired_state == SandboxState.DESTROYED:
        return "the sandbox was destroyed while the restore ran"
    if restore.purpose == RestorePurpose.RESTORE.value and sandbox.state != SandboxState.RESTORING:
        return f"the sandbox became {sandbox.state.value} while the restore ran"
    if restore.purpose == RestorePurpose.MOVE.value and (sandbox.state != SandboxState.STOPPED or sandbox.runner_id != restore.previous_runner_id):
        return f"the sandbox became {sandbox.state.value} on runner {sandbox.runner_id!r}; a move applies only to a stopped sandbox on its draining runner"
    return None


async def _candidates(session, restore: Restore) -> list[Backup]:  # type: ignore[no-untyped-def]
    if restore.requested_backup_id is None:
        return await restores.restore_candidates(session, restore.sandbox_id)
    backup = await backups.get_backup(session, restore.requested_backup_id)
    return [backup] if backup is not None and backup.broken_at is None and backup.deleted_at is None else []


async def _try_candidate(ctx: ManagerContext, restore: Restore, sandbox: Sandbox, runner: Runner, backup: Backup) -> bool | None:
    """Return True/False when the restore ended with this candidate, None to try the next one."""
    async with ctx.db.transaction() as session:
        registry = await fleet.get_registry(session, backup.registry_id)
    if registry is None:
        return await _postpone(ctx, restore, f"registry {backup.registry_id!r} of backup {backup.id} is not registered")
    log_extra = {"restore_id": restore.id, "sandbox_id": sandbox.id, "backup_id": backup.id, "runner_id": runner.id}
    if not _inside_own_repository(backup, registry, sandbox.id):
        await _mark_broken(ctx, backup, f"image reference {backup.image_ref} is outside the repository of sandbox {sandbox.id}")
        return None

    check, detail = await check_in_registry(ctx, registry, backup)
    ctx.metrics.registry_up.labels(registry.id).set(0 if check == RegistryCheck.UNKNOWN else 1)
    if check == RegistryCheck.UNKNOWN:
        return await _postpone(ctx, restore, f"registry {registry.url} could not tell whether backup {backup.id} exists: {detail}")
    if check == RegistryCheck.MISSING:
        await _mark_broken(ctx, backup, detail)
        return None

    async with ctx.db.transaction() as session:
        await restores.update(session, restore.id, now=ctx.now(), backup_id=backup.id, runner_id=runner.id, error_reason=None)
    logger.info("restoring from a verified backup", extra={"action": "restore_candidate", "image_ref": backup.image_ref, **log_extra})

    try:
        await _create_on_runner(ctx, restore, sandbox, registry, runner, backup)
    except errors.RunnerRejected as exc:
        if exc.code in PULL_FAILURE_CODES:
            await _mark_broken(ctx, backup, f"runner {runner.id} could not pull it: {exc}")
            return None
        if exc.status_code == 409 and await _copy_exists(ctx, runner, restore):
            # An earlier try created the copy but its response was lost, so the copy is ours.
            logger.info("the restored copy already exists on the runner; using it", extra={"action": "restore_copy_found", **log_extra})
        else:
            return await _fail(ctx, restore, f"runner {runner.id} rejected the restore: {exc}")
    except errors.RunnerError as exc:
        return await _postpone(ctx, restore, f"runner {runner.id} did not answer: {exc}")

    return await _succeed(ctx, restore, sandbox, runner, backup)


async def _copy_exists(ctx: ManagerContext, runner: Runner, restore: Restore) -> bool:
    try:
        info = await ctx.runner_client(runner).get_sandbox(restore.target_sandbox_id)
    except errors.RunnerError:
        return False
    return info is not None and info.state.value != "destroyed"


def _inside_own_repository(backup: Backup, registry: Registry, sandbox_id: str) -> bool:
    """Tell whether the reference names the sandbox's own repository (`.../backup-{id}`) on the backup's registry.

    The project prefix is not compared: an operator may change a registry's project, and the
    backups taken before keep their old path.
    """
    try:
        parsed = reference.parse_reference(backup.image_ref)
        own_name = reference.REPOSITORY_PREFIX + reference.validate_sandbox_id(sandbox_id)
        return parsed.host == reference.registry_host(registry.url) and parsed.repository.rsplit("/", 1)[-1] == own_name
    except errors.InvalidInput:
        return False


async def check_in_registry(ctx: ManagerContext, registry: Registry, backup: Backup) -> tuple[RegistryCheck, str]:
    """Ask the registry whether the backup's tag still resolves to the digest recorded at completion."""
    parsed = reference.parse_reference(backup.image_ref)
    try:
        async with ctx.registry_client(registry) as client:
            manifest = await client.head_manifest(parsed.repository, parsed.tag or "")
    except (errors.RegistryError, errors.InvalidReference) as exc:
        # InvalidReference here comes from what the registry sent (a digest the client cannot
        # read); the recorded reference itself was parsed above.
        return RegistryCheck.UNKNOWN, str(exc)

    if manifest is None:
        return RegistryCheck.MISSING, f"manifest {backup.image_ref} not found in the registry"
    if backup.manifest_digest and manifest.digest != backup.manifest_digest:
        return RegistryCheck.MISSING, f"tag {backup.image_ref} now points at {manifest.digest} instead of the recorded {backup.manifest_digest}"
    return RegistryCheck.VERIFIED, manifest.digest


async def _target_runner(ctx: ManagerContext, restore: Restore, sandbox: Sandbox) -> Runner | None:
    """The runner asked for (it must still be READY), else a fresh choice at every try."""
    async with ctx.db.transaction() as session:
        if restore.requested_runner_id is not None:
            runner = await fleet.get_runner(session, restore.requested_runner_id)
            return runner if runner is not None and runner.state == RunnerState.READY else None
        exclude = set()
        if restore.purpose != RestorePurpose.DRILL.value:
            exclude = {runner_id for runner_id in (sandbox.runner_id, restore.previous_runner_id) if runner_id}
        return await fleet.choose_restore_runner(session, region=sandbox.region, exclude=exclude, ignore_restore_id=restore.id)


async def _create_on_runner(ctx: ManagerContext, restore: Restore, sandbox: Sandbox, registry: Registry, runner: Runner, backup: Backup) -> None:
    credentials = RegistryCredentials(url=registry.url, project=registry.project, username=registry.username, password=registry.password)
    request = CreateSandboxRequest(
        id=restore.target_sandbox_id,
        os_user="root",
        snapshot=backup.image_ref,
        user_id=sandbox.organization_id or "sandbox-backup",
        registry=credentials,
        skip_start=restore.purpose == RestorePurpose.MOVE.value,
        organization_id=sandbox.organization_id,
        region_id=sandbox.region,
        # A drill copy is thrown away: an agent that reports its containers marks it ephemeral.
        metadata={"sandbox-backup.ephemeral": "true"} if restore.purpose == RestorePurpose.DRILL.value else None,
    )
    client = ctx.runner_client(runner, timeout_s=ctx.settings.restore_timeout_s)
    await client.create_sandbox(request)
    if restore.purpose == RestorePurpose.DRILL.value:
        await _finish_drill(ctx, client, restore)


async def _finish_drill(ctx: ManagerContext, client: RunnerClient, restore: Restore) -> None:
    """Check that the drill copy runs, then remove it; a copy that does not run fails the drill."""
    try:
        info = await client.get_sandbox(restore.target_sandbox_id)
        if info is None or info.state.value != "started":
            state = info.state.value if info else "missing"
            raise errors.RunnerRejected(f"the drill copy {restore.target_sandbox_id} is {state}, not started", runner_id=client.runner_id)
    finally:
        await client.destroy_sandbox(restore.target_sandbox_id)


async def _succeed(ctx: ManagerContext, restore: Restore, sandbox: Sandbox, runner: Runner, backup: Backup) -> bool:
    now = ctx.now()
    try:
        async with ctx.db.transaction() as session:
            if restore.purpose == RestorePurpose.DRILL.value:
                finished = await restores.finish(session, restore.id, state=RestoreState.COMPLETED, now=now)
                if finished:
                    await restores.record_verified(session, backup, now=now)
            else:
                finished = await _place_sandbox(session, restore, runner, now=now)
    except _LostRestore:
        finished = False

    if not finished:
        return await _discard(ctx, restore, runner)
    ctx.metrics.record_restore_end(restore.purpose, "completed", duration_s=(now - restore.created_at).total_seconds())

    logger.info(
        "restore completed",
        extra={"action": "restore_completed", "restore_id": restore.id, "purpose": restore.purpose, "sandbox_id": sandbox.id, "backup_id": backup.id, "runner_id": runner.id},
    )
    if restore.purpose != RestorePurpose.DRILL.value and restore.previous_runner_id and restore.previous_runner_id != runner.id:
        await destroy_copy(ctx, restore.previous_runner_id, sandbox.id)
    return True


async def _place_sandbox(session, restore: Restore, runner: Runner, *, now: datetime.datetime) -> bool:  # type: ignore[no-untyped-def]
    """Record the sandbox on its new runner and finish the restore, in one transaction, or neither."""
    expected_state = SandboxState.RESTORING if restore.purpose == RestorePurpose.RESTORE.value else SandboxState.STOPPED
    moved = await sandboxes.move_to_runner(
        session, restore.sandbox_id, runner_id=runner.id, started=restore.purpose == RestorePurpose.RESTORE.value, now=now, expected_state=expected_state
    )
    if not moved:
        return False
    if not await restores.finish(session, restore.id, state=RestoreState.COMPLETED, now=now):
        raise _LostRestore(restore.id)
    return True


class _LostRestore(errors.Conflict):
    """Another worker finished the restore first; the transaction is rolled back."""


async def _discard(ctx: ManagerContext, restore: Restore, runner: Runner) -> bool:
    """Remove a copy that cannot become the sandbox and fail the restore, unless another worker
    already finished it. The sandbox may have been destroyed, started or archived meanwhile."""
    async with ctx.db.transaction() as session:
        current = await restores.get(session, restore.id)
        sandbox = await sandboxes.get_sandbox(session, restore.sandbox_id)
    if current is None or current.state not in (RestoreState.PENDING.value, RestoreState.RUNNING.value):
        logger.info("another worker finished this restore", extra={"action": "lost_race", "restore_id": restore.id})
        return False

    # The copy is not the sandbox's: remove it before failing the restore.
    await destroy_copy(ctx, runner.id, restore.target_sandbox_id)
    reason = (_sandbox_moved_on(restore, sandbox) if sandbox else "the sandbox is gone") or "the sandbox changed while the restore ran"
    return await _fail(ctx, restore, reason)


async def destroy_copy(ctx: ManagerContext, runner_id: str, sandbox_id: str) -> bool:
    """Remove a sandbox's container from a runner; False when the runner cannot be reached."""
    async with ctx.db.transaction() as session:
        runner = await fleet.get_runner(session, runner_id)
    if runner is None:
        return False
    try:
        await ctx.runner_client(runner).destroy_sandbox(sandbox_id)
    except errors.RunnerError as exc:
        logger.warning(
            "could not remove the old copy of the sandbox; remove it by hand when the runner is back",
            extra={"action": "old_copy_left", "sandbox_id": sandbox_id, "runner_id": runner_id, "error": str(exc)},
        )
        return False
    logger.info("old copy of the sandbox removed", extra={"action": "old_copy_removed", "sandbox_id": sandbox_id, "runner_id": runner_id})
    return True


async def _mark_broken(ctx: ManagerContext, backup: Backup, reason: str) -> None:
    async with ctx.db.transaction() as session:
        await restores.mark_broken(session, backup, reason=reason, now=ctx.now())
    logger.warning("backup is broken; trying an older one", extra={"action": "backup_broken", "sandbox_id": backup.sandbox_id, "backup_id": backup.id, "reason": reason})


async def _postpone(ctx: ManagerContext, restore: Restore, reason: str) -> bool:
    attempts = restore.registry_attempts + 1
    if attempts >= ctx.settings.restore_max_attempts:
        return await _fail(ctx, restore, f"{reason}; gave up after {attempts} tries and did not fall back to an older backup")

    delay = ctx.retry_policy.delay_s(attempts, rng=ctx.rng)
    async with ctx.db.transaction() as session:
        # The runner is chosen again at the next try, so a full runner is not kept.
        await restores.update(
            session, restore.id, now=ctx.now(), registry_attempts=attempts, error_reason=reason, runner_id=None,
            next_attempt_at=ctx.now() + datetime.timedelta(seconds=delay),
        )
    logger.warning("restore waits and tries again", extra={"action": "restore_retry", "restore_id": restore.id, "sandbox_id": restore.sandbox_id, "attempt": attempts, "delay_s": round(delay, 1), "reason": reason})
    return False


async def _fail(ctx: ManagerContext, restore: Restore, reason: str, *, no_backup: bool = False) -> bool:
    now = ctx.now()
    async with ctx.db.transaction() as session:
        finished = await restores.finish(session, restore.id, state=RestoreState.FAILED, now=now, error_reason=reason)
        if finished and restore.purpose == RestorePurpose.RESTORE.value:
            await sandboxes.mark_error(session, restore.sandbox_id, reason=f"restore failed: {reason}", now=now)
    if finished:
        ctx.metrics.record_restore_end(restore.purpose, "failed", duration_s=(now - restore.created_at).total_seconds())
    logger.error(
        "restore failed",
        extra={"action": "restore_failed", "restore_id": restore.id, "purpose": restore.purpose, "sandbox_id": restore.sandbox_id, "reason": reason, "no_verified_backup": no_backup},
    )
    return finished
