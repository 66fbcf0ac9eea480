"""Reports of finished backups to the manager, sent in the background with retries.

A report only speeds the manager up: the manager also polls `GET /sandboxes/{id}`, so a
report that fails after all retries is logged and dropped, and it never delays or changes
the recorded backup result.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import httpx
import pydantic

from sandbox_backup.runner.models import BackupReport

logger = logging.getLogger(__name__)

# Statuses after which the same report can succeed later.
_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class Reporter:
    """Sends BackupReport bodies to `{manager_url}/api/v1/runners/{runner_id}/reports`."""

    def __init__(
        self,
        manager_url: str,
        runner_id: str,
        token: pydantic.SecretStr,
        *,
        retries: int,
        backoff_s: float,
        timeout_s: float = 10.0,
    ) -> None:
        self.url = f"{manager_url.rstrip('/')}/api/v1/runners/{runner_id}/reports"
        self._token = token
        self._retries = retries
        self._backoff_s = backoff_s
        self._http = httpx.AsyncClient(timeout=timeout_s)
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, report: BackupReport) -> None:
        """Start sending `report` in the background and return at once."""
        task = asyncio.get_running_loop().create_task(self._send_with_retries(report))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self, *, grace_s: float = 2.0) -> None:
        """Give pending reports `grace_s` seconds to finish, cancel the rest, close the client."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self._http.aclose()

    async def _send_with_retries(self, report: BackupReport) -> None:
        extra = {"action": "report", "sandbox_id": report.sandbox_id, "snapshot": report.snapshot}
        attempts = self._retries + 1
        delay = self._backoff_s

        for attempt in range(1, attempts + 1):
            failure = await self._send_once(report)
            if failure is None:
                logger.info("reported %s of %s to the manager", report.state.value, report.snapshot, extra=extra)
                return
            if not failure.retryable or attempt == attempts:
                logger.error(
                    "report of %s for sandbox %s dropped after %d attempt(s): %s; the manager will see the "
                    "state when it polls the runner",
                    report.snapshot,
                    report.sandbox_id,
                    attempt,
                    failure.message,
                    extra=extra,
                )
                return
            logger.warning(
                "report attempt %d of %d failed: %s; retrying in %.1f s",
                attempt,
                attempts,
                failure.message,
                delay,
                extra=extra,
            )
            await asyncio.sleep(delay)
            delay *= 2

    async def _send_once(self, report: BackupReport) -> _SendFailure | None:
        """Post the report once; return None on success."""
        headers = {"Authorization": f"Bearer {self._token.get_secret_value()}"}
        try:
            response = await self._http.post(self.url, json=report.to_json_dict(), headers=headers)
        except httpx.HTTPError as exc:
            return _SendFailure(f"POST {self.url} failed: {type(exc).__name__}: {exc}", retryable=True)

        if response.is_success:
            return None
        return _SendFailure(
            f"POST {self.url} answered {response.status_code}",
            retryable=response.status_code in _RETRY_STATUSES,
        )


@dataclasses.dataclass(frozen=True)
class _SendFailure:
    message: str
    retryable: bool
