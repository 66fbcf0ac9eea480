"""Verification: check that a COMPLETED backup is still whole in its registry.

A backup verifies when its tag still resolves to the manifest digest recorded at completion, and
every blob that manifest needs is present. Those are the config blob and each layer blob, and for
an index each child manifest with its own blobs. A definite failure marks the backup broken, which is
final: restore and retention skip it from then on. When the registry cannot tell (unreachable,
5xx, credentials refused, or an answer that breaks the spec), nothing is written.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import logging

from sandbox_backup import errors
from sandbox_backup.domain import reference
from sandbox_backup.domain.states import BackupState
from sandbox_backup.manager.context import ManagerContext
from sandbox_backup.registry.client import RegistryClient
from sandbox_backup.registry.manifests import Manifest
from sandbox_backup.store import backups, fleet, retention_queries
from sandbox_backup.store.models import Backup, Registry

logger = logging.getLogger(__name__)

# Max nesting of indexes. Backups are single images, so the limit only stops a malformed loop.
MAX_INDEX_DEPTH = 3
# Problems named in a broken reason. The rest are only counted.
MAX_PROBLEMS_NAMED = 5


class VerifyOutcome(str, enum.Enum):
    VERIFIED = "VERIFIED"
    BROKEN = "BROKEN"
    UNKNOWN = "UNKNOWN"


@dataclasses.dataclass
class _Inspection:
    """Findings of a walk over a manifest: missing parts, and the layers with their sizes."""

    problems: list[str] = dataclasses.field(default_factory=list)
    layer_sizes: dict[str, int | None] = dataclasses.field(default_factory=dict)
    layer_count: int = 0
    checked_blobs: set[str] = dataclasses.field(default_factory=set)

    @property
    def size_bytes(self) -> int | None:
        """Bytes of the distinct layer blobs as the descriptors state them, or None if one has no size."""
        sizes = list(self.layer_sizes.values())
        if any(size is None for size in sizes):
            return None
        return sum(size for size in sizes if size is not None)


@dataclasses.dataclass(frozen=True)
class _Result:
    outcome: VerifyOutcome
    # True when the registry could not be reached, rejected the credentials or is no longer
    # registered, so the rest of a pass skips its backups.
    registry_unreachable: bool = False


async def verify_backup(ctx: ManagerContext, backup_id: str) -> VerifyOutcome:
    """Check one COMPLETED backup in its registry and record the outcome.

    VERIFIED sets `verified_at`, `size_bytes` (the layer blobs' total compressed size) and
    `layer_count`. BROKEN sets `broken_at` and `broken_reason`. UNKNOWN writes nothing. A backup
    already marked broken returns BROKEN without a registry call. The outcome is returned even
    when the write lost a race (the row was deleted or changed meanwhile) and so changed nothing.
    Raises NotFound for an unknown id and Conflict for a backup that is not COMPLETED or is deleted.
    """
    async with ctx.db.transaction() as session:
        backup = await backups.get_backup(session, backup_id)
    if backup is None:
        raise errors.NotFound(f"backup {backup_id!r} does not exist")
    if backup.state != BackupState.COMPLETED:
        raise errors.Conflict(f"backup {backup_id!r} is {backup.state.value}: only COMPLETED backups can be verified")
    if backup.deleted_at is not None:
        raise errors.Conflict(f"backup {backup_id!r} was deleted at {backup.deleted_at.isoformat()}: there is nothing left to verify")
    if backup.broken_at is not None:
        return VerifyOutcome.BROKEN

    result = await _verify(ctx, backup)
    ctx.metrics.record_verification(backup.registry_id, result.outcome.value, registry_answered=not result.registry_unreachable)
    return result.outcome


async def verify_due(ctx: ManagerContext) -> int:
    """Verify up to `verify_batch` backups due for a check; return how many got a definite outcome.

    Due are live, unbroken backups never verified or last verified more than `verify_max_age_s`
    ago. Once a registry is unreachable, the pass skips its backups and picks others instead,
    so one registry outage does not starve the rest.
    """
    settings = ctx.settings
    verified_before = ctx.now() - datetime.timedelta(seconds=settings.verify_max_age_s)
    tried: set[str] = set()
    unreachable: set[str] = set()
    outcomes = {outcome: 0 for outcome in VerifyOutcome}

    while len(tried) < settings.verify_batch:
        async with ctx.db.transaction() as session:
            due = await retention_queries.due_for_verification(
                session, verified_before=verified_before, limit=settings.verify_batch - len(tried), skip_ids=tried, skip_registry_ids=unreachable
            )
        if not due:
            break

        for backup in due:
            if backup.registry_id in unreachable:
                continue
            tried.add(backup.id)
            result = await _verify(ctx, backup)
            outcomes[result.outcome] += 1
            ctx.metrics.record_verification(backup.registry_id, result.outcome.value, registry_answered=not result.registry_unreachable)
            if result.registry_unreachable:
                unreachable.add(backup.registry_id)

    if tried:
        logger.info(
            "verification pass finished",
            extra={"action": "verify_pass", **{outcome.value.lower(): count for outcome, count in outcomes.items()}, "unreachable_registries": sorted(unreachable)},
        )
    return outcomes[VerifyOutcome.VERIFIED] + outcomes[VerifyOutcome.BROKEN]


async def _verify(ctx: ManagerContext, backup: Backup) -> _Result:
    async with ctx.db.transaction() as session:
        registry = await fleet.get_registry(session, backup.registry_id)
    if registry is None:
        _log_unknown(backup, f"registry {backup.registry_id!r} of the backup is no longer registered; register it again")
        return _Result(VerifyOutcome.UNKNOWN, registry_unreachable=True)

    problem = _reference_problem(backup)
    if problem is not None:
        return await _record_broken(ctx, backup, problem)

    try:
        inspection = await _inspect(ctx, registry, backup)
    except (errors.RegistryUnavailable, errors.RegistryAuthError) as exc:
        _log_unknown(backup, str(exc))
        return _Result(VerifyOutcome.UNKNOWN, registry_unreachable=True)
    except (errors.RegistryProtocolError, errors.InvalidReference) as exc:
        # InvalidReference here comes from a header the registry sent (e.g. a digest algorithm
        # the client does not know), not from the recorded reference, which was checked above.
        _log_unknown(backup, str(exc))
        return _Result(VerifyOutcome.UNKNOWN)

    if inspection.problems:
        return await _record_broken(ctx, backup, _join_problems(inspection.problems))
    return await _record_verified(ctx, backup, inspection)


def _reference_problem(backup: Backup) -> str | None:
    """Return why the recorded reference or digest cannot be checked, or None when both are usable."""
    if not backup.manifest_digest:
        return "no manifest digest was recorded when the backup completed, so the tag's content cannot be checked"
    try:
        parsed = reference.parse_reference(backup.image_ref)
    except errors.InvalidReference as exc:
        return f"the recorded image reference is invalid: {exc}"
    if not parsed.tag:
        return f"the recorded image reference {backup.image_ref!r} has no tag"
    return None


async def _inspect(ctx: ManagerContext, registry: Registry, backup: Backup) -> _Inspection:
    """Fetch the backup's tag and walk its manifest. Raises RegistryError when the registry cannot tell."""
    parsed = reference.parse_reference(backup.image_ref)
    repository, tag = parsed.repository, parsed.tag or ""
    inspection = _Inspection()

    async with ctx.registry_client(registry) as client:
        manifest = await client.get_manifest(repository, tag)
        if manifest is None:
            inspection.problems.append(f"manifest deleted from the registry: {repository}:{tag} is not found")
            return inspection
        if manifest.digest != backup.manifest_digest:
            inspection.problems.append(f"tag {tag} now points at {manifest.digest} instead of the recorded {backup.manifest_digest}")
            return inspection

        try:
            await _walk(client, repository, manifest, inspection, depth=0)
        except errors.InvalidReference as exc:
            # A manifest that names a blob by an invalid digest can never be pulled.
            inspection.problems.append(f"manifest {manifest.digest} names an invalid digest: {exc}")
    return inspection


async def _walk(client: RegistryClient, repository: str, manifest: Manifest, inspection: _Inspection, *, depth: int) -> None:
    if not manifest.is_index:
        await _check_image(client, repository, manifest, inspection)
        return

    if depth >= MAX_INDEX_DEPTH:
        inspection.problems.append(f"index {manifest.digest} nests indexes deeper than {MAX_INDEX_DEPTH} levels")
        return

    for child_digest in manifest.child_digests:
        child = await client.get_manifest(repository, child_digest)
        if child is None:
            inspection.problems.append(f"child manifest {child_digest} of index {manifest.digest} is missing from the registry")
            continue
        await _walk(client, repository, child, inspection, depth=depth + 1)


async def _check_image(client: RegistryClient, repository: str, manifest: Manifest, inspection: _Inspection) -> None:
    config_digest = manifest.config_digest
    if config_digest is not None:
        await _check_blob(client, repository, config_digest, "config", inspection)

    for descriptor in manifest.content.get("layers") or []:
        digest = descriptor["digest"]
        inspection.layer_count += 1
        inspection.layer_sizes[digest] = _descriptor_size(descriptor)
        await _check_blob(client, repository, digest, "layer", inspection)


async def _check_blob(client: RegistryClient, repository: str, digest: str, kind: str, inspection: _Inspection) -> None:
    # Images of one index often share blobs, and one HEAD request per blob is enough.
    if digest in inspection.checked_blobs:
        return
    inspection.checked_blobs.add(digest)
    if not await client.blob_exists(repository, digest):
        inspection.problems.append(f"{kind} blob {digest} is missing from the registry")


def _descriptor_size(descriptor: dict[str, object]) -> int | None:
    size = descriptor.get("size")
    if isinstance(size, int) and not isinstance(size, bool) and size >= 0:
        return size
    return None


def _join_problems(problems: list[str]) -> str:
    named = "; ".join(problems[:MAX_PROBLEMS_NAMED])
    hidden = len(problems) - MAX_PROBLEMS_NAMED
    return named if hidden <= 0 else f"{named}; and {hidden} more"


async def _record_verified(ctx: ManagerContext, backup: Backup, inspection: _Inspection) -> _Result:
    async with ctx.db.transaction() as session:
        written = await retention_queries.record_verified(
            session, backup, size_bytes=inspection.size_bytes, layer_count=inspection.layer_count, now=ctx.now()
        )

    logger.info(
        "backup verified in the registry",
        extra={"action": "backup_verified", "backup_id": backup.id, "sandbox_id": backup.sandbox_id, "registry_id": backup.registry_id, "digest": backup.manifest_digest, "size_bytes": inspection.size_bytes, "layer_count": inspection.layer_count, "recorded": written},
    )
    return _Result(VerifyOutcome.VERIFIED)


async def _record_broken(ctx: ManagerContext, backup: Backup, reason: str) -> _Result:
    async with ctx.db.transaction() as session:
        written = await retention_queries.record_broken(session, backup, reason=reason, now=ctx.now())

    logger.warning(
        "backup is broken: restore will skip it",
        extra={"action": "backup_broken", "backup_id": backup.id, "sandbox_id": backup.sandbox_id, "registry_id": backup.registry_id, "image_ref": backup.image_ref, "digest": backup.manifest_digest, "reason": reason, "recorded": written},
    )
    return _Result(VerifyOutcome.BROKEN)


def _log_unknown(backup: Backup, error: str) -> None:
    logger.warning(
        "could not verify the backup because the registry could not tell; the next pass tries again",
        extra={"action": "verify_unknown", "backup_id": backup.id, "sandbox_id": backup.sandbox_id, "registry_id": backup.registry_id, "error": error},
    )
