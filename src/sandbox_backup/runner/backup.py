"""Backup jobs of the runner agent: commit a sandbox container, push it, remove the image.

Each request starts an attempt with its own id. The attempt runs in the background and
writes its result with a compare-and-set on that id (see runner.state), so an attempt
that a newer request replaced records nothing and reports nothing. A committed image with
more layers than the flatten threshold is flattened into one layer before the push (see
runner.flatten). The committed and flattened images are removed in every case:
completed, failed, timed out or replaced.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Awaitable
from typing import TypeVar

from sandbox_backup import errors
from sandbox_backup.runner.engine import CommittedImage, DockerEngine, OperationAborted
from sandbox_backup.runner.failures import ContainerNotFound
from sandbox_backup.runner.flatten import remove_stale_temp_files
from sandbox_backup.runner.manifest_digest import resolve_manifest_digest
from sandbox_backup.runner.metrics import RunnerMetrics
from sandbox_backup.runner.models import BackupReport, CreateBackupRequest, RunnerBackupState
from sandbox_backup.runner.push_stream import StreamAbort
from sandbox_backup.runner.reporter import Reporter
from sandbox_backup.runner.snapshot_target import validate_snapshot_target
from sandbox_backup.runner.state import BackupRecord, BackupStateStore

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Time that shutdown gives aborted attempts to end and remove their images.
SHUTDOWN_GRACE_S = 30.0


class AgentShuttingDown(errors.SandboxBackupError):
    """The agent is shutting down and starts no new backup."""


class _AttemptStopped(Exception):
    """The attempt was replaced by a newer request or stopped by shutdown: record nothing."""


class _AttemptTimedOut(Exception):
    """The attempt passed its deadline."""


@dataclasses.dataclass(frozen=True)
class _Outcome:
    state: RunnerBackupState
    digest: str | None = None
    size_bytes: int | None = None
    layer_count: int | None = None
    error: str | None = None
    recoverable: bool = False


class _Attempt:
    """One backup attempt: its ids, deadline and the handles that stop it."""

    def __init__(self, sandbox_id: str, container_id: str, request: CreateBackupRequest, deadline: float) -> None:
        self.id = uuid.uuid4().hex
        self.sandbox_id = sandbox_id
        self.container_id = container_id
        self.request = request
        self.deadline = deadline
        self.abort = StreamAbort()
        self.stop_reason: str | None = None
        self.timed_out = False
        self.task: asyncio.Task[None] | None = None
        # The attempt this one replaced, whose task must end before this one commits.
        self.replaces: asyncio.Task[None] | None = None

    @property
    def log_extra(self) -> dict[str, str]:
        return {"sandbox_id": self.sandbox_id, "snapshot": self.request.snapshot, "attempt_id": self.id}

    def stop(self, reason: str) -> None:
        """Abort the running engine call; the attempt then cleans up and records nothing."""
        self.stop_reason = reason
        self.abort.abort()

    async def wait(self, awaitable: Awaitable[T]) -> T:
        """Await one engine call, stopping it at the deadline.

        The engine call runs in a thread that cannot be cancelled, so after an abort this
        still waits for the call to end: a commit that finishes late returns the image
        that the caller must remove.
        """
        future = asyncio.ensure_future(awaitable)
        remaining = max(0.0, self.deadline - asyncio.get_running_loop().time())
        done, _ = await asyncio.wait({future}, timeout=remaining)
        if not done:
            self.timed_out = True
            self.abort.abort()
            await asyncio.wait({future})
        return future.result()

    def raise_if_stopped(self) -> None:
        if self.stop_reason is not None:
            raise _AttemptStopped(self.stop_reason)
        if self.timed_out:
            raise _AttemptTimedOut()


class BackupJobs:
    """Starts, replaces and finishes the backup attempts of all sandboxes on this runner."""

    def __init__(
        self,
        engine: DockerEngine,
        store: BackupStateStore,
        reporter: Reporter | None,
        *,
        pause_on_commit: bool,
        timeout_s: float,
        flatten_threshold_layers: int,
        metrics: RunnerMetrics | None = None,
        shutdown_grace_s: float = 30.0,
    ) -> None:
        self._metrics = metrics or RunnerMetrics()
        self._shutdown_grace_s = shutdown_grace_s
        self._draining = False
        self._engine = engine
        self._store = store
        self._reporter = reporter
        self._pause_on_commit = pause_on_commit
        self._timeout_s = timeout_s
        self._flatten_threshold_layers = flatten_threshold_layers
        # Export files of a flatten go next to the state file, on the agent's own disk.
        self._temp_dir = store.path.parent
        self._running: dict[str, _Attempt] = {}

    async def request_backup(self, sandbox_id: str, request: CreateBackupRequest) -> BackupRecord:
        """Start a backup of the sandbox's container to `request.snapshot` and return its record.

        A repeat of a snapshot that is in progress or completed returns the existing record
        and starts nothing. A new snapshot replaces a running attempt of the sandbox.
        Raises InvalidInput for a bad snapshot and ContainerNotFound when no container exists.
        """
        validate_snapshot_target(request.snapshot, request.registry.url, for_push=True)
        if self._draining:
            raise AgentShuttingDown(
                f"the runner agent is shutting down and starts no backup of {sandbox_id!r}; retry after it restarts"
            )
        existing = self._store.get(sandbox_id)
        if existing is not None and _is_repeat(existing, request.snapshot):
            return self._log_repeat(existing)

        container = await self._engine.find_container(sandbox_id)
        if container is None:
            raise ContainerNotFound(
                f"no container managed by this runner is named {sandbox_id!r}; create the sandbox first"
            )

        # No await from here on: the store row and the running attempt change together.
        deadline = asyncio.get_running_loop().time() + self._timeout_s
        attempt = _Attempt(sandbox_id, container.id, request, deadline)
        start = self._store.begin_attempt(sandbox_id, request.snapshot, attempt.id)
        if not start.started:
            return self._log_repeat(start.record)

        previous = self._running.get(sandbox_id)
        if previous is not None:
            previous.stop(f"replaced by a backup request for {request.snapshot}")
            attempt.replaces = previous.task
            logger.info(
                "backup attempt for %s replaced by a request for %s",
                previous.request.snapshot,
                request.snapshot,
                extra={"action": "backup_replace", **previous.log_extra},
            )
        attempt.task = asyncio.get_running_loop().create_task(self._run(attempt))
        self._running[sandbox_id] = attempt
        logger.info(
            "backup of sandbox %s to %s started",
            sandbox_id,
            request.snapshot,
            extra={"action": "backup_start", **attempt.log_extra},
        )
        return start.record

    def recover_interrupted(self) -> list[BackupRecord]:
        """Mark attempts left IN_PROGRESS by an earlier process FAILED and report them.

        Also deletes the export files of flattens that the earlier process left behind.
        """
        for path in remove_stale_temp_files(self._temp_dir):
            logger.warning(
                "deleted %s: a flatten of an earlier agent process left it behind",
                path,
                extra={"action": "flatten_cleanup"},
            )
        records = self._store.fail_interrupted()
        for record in records:
            logger.warning(
                "backup of sandbox %s to %s marked FAILED: the runner agent restarted during the backup",
                record.sandbox_id,
                record.snapshot,
                extra={"action": "backup_recover", "sandbox_id": record.sandbox_id, "snapshot": record.snapshot},
            )
            self._report(record)
        return records

    async def drain(self) -> None:
        """Reject new backups and wait up to `shutdown_grace_s` for running attempts to finish.

        Attempts that finish in time record and report their outcome as usual. Only the
        first call waits, so aclose() after a drain on a signal stops what is left at once.
        """
        if self._draining:
            return
        self._draining = True
        tasks = [attempt.task for attempt in self._running.values() if attempt.task is not None]
        if not tasks:
            return
        logger.info(
            "runner agent stopping: waiting up to %.0f s for %d running backup(s)",
            self._shutdown_grace_s,
            len(tasks),
            extra={"action": "backup_drain", "running": len(tasks)},
        )
        await asyncio.wait(tasks, timeout=self._shutdown_grace_s)

    async def aclose(self) -> None:
        """Drain, then stop the attempts still running and wait for them to remove their images.

        A stopped attempt stays IN_PROGRESS in the store, as after a crash, and the next
        start marks it FAILED and reports it.
        """
        await self.drain()
        attempts = list(self._running.values())
        for attempt in attempts:
            attempt.stop("the runner agent is shutting down")
        tasks = [attempt.task for attempt in attempts if attempt.task is not None]
        if not tasks:
            return

        _, pending = await asyncio.wait(tasks, timeout=SHUTDOWN_GRACE_S)
        for task in pending:
            task.cancel()
        if pending:
            logger.error(
                "%d backup attempt(s) did not end within %.0f s of shutdown; their committed images may remain",
                len(pending),
                SHUTDOWN_GRACE_S,
                extra={"action": "backup_shutdown"},
            )

    async def _run(self, attempt: _Attempt) -> None:
        try:
            outcome = await self._commit_and_push(attempt)
        finally:
            if self._running.get(attempt.sandbox_id) is attempt:
                del self._running[attempt.sandbox_id]

        if outcome is None:
            return
        record = self._record_outcome(attempt, outcome)
        if record is not None:
            self._report(record)

    async def _commit_and_push(self, attempt: _Attempt) -> _Outcome | None:
        """Run the attempt's engine steps; return its outcome, or None when it was stopped."""
        extra = {"action": "backup", **attempt.log_extra}
        snapshot = attempt.request.snapshot
        images: list[CommittedImage] = []
        try:
            if attempt.replaces is not None:
                # The replaced attempt removes its committed image as it stops. Podman 4.3 failed
                # a commit of the same container made during that removal ("layer not known").
                await attempt.wait(asyncio.wait({attempt.replaces}))
                attempt.raise_if_stopped()
            with self._metrics.commit_duration.time():
                image = await attempt.wait(
                    self._engine.commit(attempt.container_id, snapshot, pause=self._pause_on_commit)
                )
            images.append(image)
            attempt.raise_if_stopped()

            if image.layer_count > self._flatten_threshold_layers:
                image = await self._flatten(attempt, image, images, extra)

            try:
                with self._metrics.push_duration.time():
                    digest = await attempt.wait(
                        self._engine.push(snapshot, attempt.request.registry.auth_config(), attempt.abort)
                    )
            except OperationAborted:
                attempt.raise_if_stopped()
                raise
            attempt.raise_if_stopped()

            if digest is None:
                digest = await resolve_manifest_digest(snapshot, attempt.request.registry)
            return _Outcome(
                RunnerBackupState.COMPLETED, digest=digest, size_bytes=image.size_bytes, layer_count=image.layer_count
            )

        except _AttemptStopped as stopped:
            logger.info("backup to %s stopped: %s", snapshot, stopped, extra=extra)
            return None
        except _AttemptTimedOut:
            message = f"backup to {snapshot} timed out after {self._timeout_s:.0f} s"
            logger.warning(message, extra=extra)
            return _Outcome(RunnerBackupState.FAILED, error=message, recoverable=True)
        except (errors.EngineError, errors.NotFound) as exc:
            logger.warning("backup to %s failed: %s", snapshot, exc, extra=extra)
            return _Outcome(RunnerBackupState.FAILED, error=str(exc), recoverable=exc.transient)
        except Exception as exc:  # noqa: BLE001 - any failure must end as FAILED, never IN_PROGRESS forever
            logger.exception("backup to %s failed with an unexpected error", snapshot, extra=extra)
            return _Outcome(RunnerBackupState.FAILED, error=f"unexpected error: {exc}", recoverable=True)
        finally:
            for leftover in reversed(images):
                await self._remove_image(leftover, extra)

    async def _flatten(
        self, attempt: _Attempt, image: CommittedImage, images: list[CommittedImage], extra: dict[str, str]
    ) -> CommittedImage:
        """Flatten the committed image, remove it, and return the one-layer image that replaces it."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            flattened = await attempt.wait(
                self._engine.flatten(
                    image, sandbox_id=attempt.sandbox_id, temp_dir=self._temp_dir, abort=attempt.abort
                )
            )
        except errors.EngineError:
            attempt.raise_if_stopped()
            raise
        images.append(flattened.image)
        self._metrics.flattens.inc()
        attempt.raise_if_stopped()

        seconds = loop.time() - started
        logger.info(
            "image of sandbox %s flattened from %d layers to %d in %.1f s (%s)",
            attempt.sandbox_id,
            image.layer_count,
            flattened.image.layer_count,
            seconds,
            flattened.method.value,
            extra={
                **attempt.log_extra,
                "action": "image_flattened",
                "layers_before": image.layer_count,
                "layers_after": flattened.image.layer_count,
                "seconds": round(seconds, 3),
                "method": flattened.method.value,
            },
        )

        # The deep image is not pushed: remove it now, so its space is free during the push.
        await self._remove_image(image, extra)
        images.remove(image)
        return flattened.image

    async def _remove_image(self, image: CommittedImage, extra: dict[str, str]) -> None:
        try:
            await self._engine.remove_image(image)
        except errors.EngineError as exc:
            logger.error("committed image %s could not be removed: %s", image.id, exc, extra=extra)

    def _record_outcome(self, attempt: _Attempt, outcome: _Outcome) -> BackupRecord | None:
        """Write the outcome if the attempt is still the sandbox's current one; return the new row."""
        if outcome.state is RunnerBackupState.COMPLETED:
            written = self._store.complete_attempt(
                attempt.sandbox_id,
                attempt.id,
                digest=outcome.digest,
                size_bytes=outcome.size_bytes,
                layer_count=outcome.layer_count,
            )
        else:
            written = self._store.fail_attempt(
                attempt.sandbox_id, attempt.id, error=outcome.error or "", recoverable=outcome.recoverable
            )

        extra = {"action": "backup_finish", "state": outcome.state.value, **attempt.log_extra}
        if not written:
            logger.info(
                "backup result for %s discarded: a newer attempt replaced it", attempt.request.snapshot, extra=extra
            )
            return None
        logger.info("backup to %s finished: %s", attempt.request.snapshot, outcome.state.value, extra=extra)
        self._metrics.backups.labels(outcome.state.value.lower()).inc()
        return self._store.get(attempt.sandbox_id)

    def _report(self, record: BackupRecord) -> None:
        if self._reporter is None:
            return
        self._reporter.submit(
            BackupReport(
                sandbox_id=record.sandbox_id,
                snapshot=record.snapshot,
                state=record.state,
                digest=record.digest,
                size_bytes=record.size_bytes,
                error=record.error,
                recoverable=record.recoverable,
                layer_count=record.layer_count,
            )
        )

    def _log_repeat(self, record: BackupRecord) -> BackupRecord:
        logger.info(
            "backup of sandbox %s to %s is already %s; nothing started",
            record.sandbox_id,
            record.snapshot,
            record.state.value,
            extra={"action": "backup_repeat", "sandbox_id": record.sandbox_id, "snapshot": record.snapshot},
        )
        return record


def _is_repeat(record: BackupRecord, snapshot: str) -> bool:
    return record.snapshot == snapshot and record.state in (RunnerBackupState.IN_PROGRESS, RunnerBackupState.COMPLETED)
