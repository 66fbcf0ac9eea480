"""The agent's local record of the current backup attempt of each sandbox (stdlib sqlite3).

One row per sandbox contains its latest attempt. Each attempt has its own `attempt_id`, and
an attempt finishes with a compare-and-set update that matches that id, so an attempt
that a newer request replaced can never write over the newer attempt's row.

The calls are synchronous: each is one short transaction on a local file in WAL mode,
which takes well under a millisecond to a few milliseconds, so the event loop calls them
directly. A lock serialises them because the connection is shared between threads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import pathlib
import sqlite3
import threading
from collections.abc import Iterator

from sandbox_backup.runner.models import RunnerBackupState

RESTART_ERROR = "runner agent restarted during the backup"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sandbox_backup (
    sandbox_id  TEXT PRIMARY KEY,
    state       TEXT NOT NULL,
    snapshot    TEXT NOT NULL,
    attempt_id  TEXT NOT NULL,
    error       TEXT,
    recoverable INTEGER NOT NULL DEFAULT 0,
    digest      TEXT,
    size_bytes  INTEGER,
    updated_at  TEXT NOT NULL,
    layer_count INTEGER
)
"""

# Columns added after the first release, with their types: opening an older state file adds them.
_ADDED_COLUMNS = {"layer_count": "INTEGER"}

_COLUMNS = "sandbox_id, state, snapshot, attempt_id, error, recoverable, digest, size_bytes, updated_at, layer_count"


@dataclasses.dataclass(frozen=True)
class BackupRecord:
    """The latest backup attempt of one sandbox as stored."""

    sandbox_id: str
    state: RunnerBackupState
    snapshot: str
    attempt_id: str
    error: str | None
    recoverable: bool
    digest: str | None
    size_bytes: int | None
    updated_at: str
    # Number of layers of the pushed image, for a COMPLETED attempt.
    layer_count: int | None = None


@dataclasses.dataclass(frozen=True)
class AttemptStart:
    """Outcome of `BackupStateStore.begin_attempt`."""

    started: bool
    record: BackupRecord
    replaced: BackupRecord | None


class BackupStateStore:
    """SQLite table of backup attempts, one row per sandbox."""

    def __init__(self, path: pathlib.Path | str) -> None:
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._connection = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.execute("PRAGMA synchronous=NORMAL")
        self._connection.execute(_SCHEMA)
        self._add_missing_columns()

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    def get(self, sandbox_id: str) -> BackupRecord | None:
        with self._lock:
            row = self._connection.execute(
                f"SELECT {_COLUMNS} FROM sandbox_backup WHERE sandbox_id = ?", (sandbox_id,)
            ).fetchone()
        return _record(row) if row else None

    def list_all(self) -> list[BackupRecord]:
        with self._lock:
            rows = self._connection.execute(f"SELECT {_COLUMNS} FROM sandbox_backup ORDER BY sandbox_id").fetchall()
        return [_record(row) for row in rows]

    def begin_attempt(self, sandbox_id: str, snapshot: str, attempt_id: str) -> AttemptStart:
        """Record a new IN_PROGRESS attempt, unless the same snapshot is in progress or completed.

        Returns `started=False` with the existing row for such a repeat, else the new row
        and the row it replaced (whose attempt the caller must cancel if it still runs).
        """
        with self._lock, _transaction(self._connection):
            row = self._connection.execute(
                f"SELECT {_COLUMNS} FROM sandbox_backup WHERE sandbox_id = ?", (sandbox_id,)
            ).fetchone()
            current = _record(row) if row else None
            repeat_states = (RunnerBackupState.IN_PROGRESS, RunnerBackupState.COMPLETED)
            if current is not None and current.snapshot == snapshot and current.state in repeat_states:
                return AttemptStart(started=False, record=current, replaced=None)

            now = _now()
            self._connection.execute(
                "INSERT INTO sandbox_backup (sandbox_id, state, snapshot, attempt_id, error, recoverable, digest,"
                " size_bytes, updated_at) VALUES (?, ?, ?, ?, NULL, 0, NULL, NULL, ?)"
                " ON CONFLICT (sandbox_id) DO UPDATE SET state = excluded.state, snapshot = excluded.snapshot,"
                " attempt_id = excluded.attempt_id, error = NULL, recoverable = 0, digest = NULL,"
                " size_bytes = NULL, updated_at = excluded.updated_at, layer_count = NULL",
                (sandbox_id, RunnerBackupState.IN_PROGRESS.value, snapshot, attempt_id, now),
            )
        record = BackupRecord(
            sandbox_id=sandbox_id,
            state=RunnerBackupState.IN_PROGRESS,
            snapshot=snapshot,
            attempt_id=attempt_id,
            error=None,
            recoverable=False,
            digest=None,
            size_bytes=None,
            updated_at=now,
        )
        return AttemptStart(started=True, record=record, replaced=current)

    def complete_attempt(
        self,
        sandbox_id: str,
        attempt_id: str,
        *,
        digest: str | None,
        size_bytes: int | None,
        layer_count: int | None = None,
    ) -> bool:
        """Mark the attempt COMPLETED; return False when a newer attempt replaced it."""
        return self._finish(
            sandbox_id,
            attempt_id,
            RunnerBackupState.COMPLETED,
            error=None,
            recoverable=False,
            digest=digest,
            size_bytes=size_bytes,
            layer_count=layer_count,
        )

    def fail_attempt(self, sandbox_id: str, attempt_id: str, *, error: str, recoverable: bool) -> bool:
        """Mark the attempt FAILED; return False when a newer attempt replaced it."""
        return self._finish(
            sandbox_id,
            attempt_id,
            RunnerBackupState.FAILED,
            error=error,
            recoverable=recoverable,
            digest=None,
            size_bytes=None,
            layer_count=None,
        )

    def fail_interrupted(self) -> list[BackupRecord]:
        """Mark every IN_PROGRESS attempt FAILED (recoverable) and return the changed rows.

        Called on agent start: no attempt survives the process that ran it.
        """
        now = _now()
        with self._lock, _transaction(self._connection):
            rows = self._connection.execute(
                f"SELECT {_COLUMNS} FROM sandbox_backup WHERE state = ?", (RunnerBackupState.IN_PROGRESS.value,)
            ).fetchall()
            self._connection.execute(
                "UPDATE sandbox_backup SET state = ?, error = ?, recoverable = 1, updated_at = ? WHERE state = ?",
                (RunnerBackupState.FAILED.value, RESTART_ERROR, now, RunnerBackupState.IN_PROGRESS.value),
            )
        return [
            dataclasses.replace(
                _record(row), state=RunnerBackupState.FAILED, error=RESTART_ERROR, recoverable=True, updated_at=now
            )
            for row in rows
        ]

    def _finish(
        self,
        sandbox_id: str,
        attempt_id: str,
        state: RunnerBackupState,
        *,
        error: str | None,
        recoverable: bool,
        digest: str | None,
        size_bytes: int | None,
        layer_count: int | None,
    ) -> bool:
        with self._lock:
            cursor = self._connection.execute(
                "UPDATE sandbox_backup SET state = ?, error = ?, recoverable = ?, digest = ?, size_bytes = ?,"
                " layer_count = ?, updated_at = ? WHERE sandbox_id = ? AND attempt_id = ? AND state = ?",
                (
                    state.value,
                    error,
                    int(recoverable),
                    digest,
                    size_bytes,
                    layer_count,
                    _now(),
                    sandbox_id,
                    attempt_id,
                    RunnerBackupState.IN_PROGRESS.value,
                ),
            )
        return cursor.rowcount == 1

    def _add_missing_columns(self) -> None:
        with self._lock:
            present = {row[1] for row in self._connection.execute("PRAGMA table_info(sandbox_backup)")}
            for name, column_type in _ADDED_COLUMNS.items():
                if name not in present:
                    self._connection.execute(f"ALTER TABLE sandbox_backup ADD COLUMN {name} {column_type}")


@contextlib.contextmanager
def _transaction(connection: sqlite3.Connection) -> Iterator[None]:
    """Run the block in BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on an exception."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def _record(row: tuple) -> BackupRecord:
    sandbox_id, state, snapshot, attempt_id, error, recoverable, digest, size_bytes, updated_at, layer_count = row
    return BackupRecord(
        sandbox_id=sandbox_id,
        state=RunnerBackupState(state),
        snapshot=snapshot,
        attempt_id=attempt_id,
        error=error,
        recoverable=bool(recoverable),
        digest=digest,
        size_bytes=size_bytes,
        updated_at=updated_at,
        layer_count=layer_count,
    )


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")
