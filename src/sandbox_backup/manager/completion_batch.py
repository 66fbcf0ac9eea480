"""Group commit of completion reports: the reports that arrive while one transaction runs form the next.

Runners that start backups together also finish them together, and a manager that wrote each
report in its own transaction would answer the last report of such a wave seconds late. Here a
report waits for at most one transaction in progress, then is written with every report that
came meanwhile, in a handful of statements for the whole group. A runner still gets its answer
only after its report is committed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging

from sandbox_backup import errors
from sandbox_backup.manager import attempts
from sandbox_backup.manager.context import ManagerContext
from sandbox_backup.runner.models import BackupReport
from sandbox_backup.store import completions

logger = logging.getLogger(__name__)

# Reports written in one transaction at most; a larger wave takes several.
MAX_GROUP = 500


@dataclasses.dataclass
class _Waiting:
    runner_id: str
    token: str
    report: BackupReport
    # True: completed here; False: no open attempt awaits it (the caller looks closer).
    outcome: asyncio.Future[bool]


class CompletionBatcher:
    """Writes COMPLETED reports that carry a digest, in groups; one per manager."""

    def __init__(self, ctx: ManagerContext) -> None:
        self.ctx = ctx
        self._waiting: list[_Waiting] = []
        self._writer: asyncio.Task[None] | None = None

    async def submit(self, runner_id: str, token: str, report: BackupReport) -> bool:
        """Write one report with the next group; return whether it completed an open attempt.

        Raises errors.ReportRejected for a wrong token, and the database's error when the group's
        transaction failed (nothing of the group was written then).
        """
        waiting = _Waiting(runner_id, token, report, asyncio.get_running_loop().create_future())
        self._waiting.append(waiting)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_groups(), name="completion-batch")
        return await waiting.outcome

    async def _write_groups(self) -> None:
        while self._waiting:
            group, self._waiting = self._waiting[:MAX_GROUP], self._waiting[MAX_GROUP:]
            try:
                await self._write(group)
            except Exception as exc:  # the submitters answer the runners with this error
                logger.error("writing a group of completion reports failed", extra={"action": "report_group_failed", "reports": len(group), "error": str(exc)})
                for waiting in group:
                    if not waiting.outcome.done():
                        waiting.outcome.set_exception(exc)

    async def _write(self, group: list[_Waiting]) -> None:
        ctx = self.ctx
        now = ctx.now()
        async with ctx.db.transaction() as session:
            tokens = await completions.runner_tokens(session, [w.runner_id for w in group])
            accepted = []
            for waiting in group:
                expected = tokens.get(waiting.runner_id)
                if expected is None or not waiting.token or not hmac.compare_digest(expected.encode(), waiting.token.encode()):
                    waiting.outcome.set_exception(errors.ReportRejected(f"report for runner {waiting.runner_id!r} rejected: unknown runner or wrong token"))
                else:
                    accepted.append(waiting)
            reports = [
                completions.ReportedCompletion(w.runner_id, w.report.sandbox_id, w.report.snapshot, w.report.digest or "", w.report.size_bytes, w.report.layer_count)
                for w in accepted
            ]
            done = await completions.complete_many(session, reports, now=now)

        # After the commit, so the dispatcher these wake sees the free slots.
        for waiting in accepted:
            written = done.get(waiting.report.snapshot)
            if written is not None:
                backup, completed = written
                attempts.record_completion(ctx, backup, completed, digest=waiting.report.digest, size_bytes=waiting.report.size_bytes, now=now)
            waiting.outcome.set_result(written is not None)
