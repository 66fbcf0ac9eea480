"""The runner agent's SQLite backup state: compare-and-set finishes, repeats and restarts."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_backup.runner.models import RunnerBackupState
from sandbox_backup.runner.state import RESTART_ERROR, BackupStateStore

SNAPSHOT_A = "127.0.0.1:5000/p/backup-sb-1:t1"
SNAPSHOT_B = "127.0.0.1:5000/p/backup-sb-1:t2"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[BackupStateStore]:
    opened = BackupStateStore(tmp_path / "nested" / "state.sqlite3")
    yield opened
    opened.close()


def test_new_store_has_no_record_and_uses_wal(store: BackupStateStore) -> None:
    assert store.get("sb-1") is None
    mode = sqlite3.connect(store.path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_begin_records_in_progress(store: BackupStateStore) -> None:
    start = store.begin_attempt("sb-1", SNAPSHOT_A, "a1")

    assert start.started is True
    assert start.replaced is None
    assert store.get("sb-1") == start.record
    assert start.record.state is RunnerBackupState.IN_PROGRESS


@pytest.mark.parametrize("finish", ["in_progress", "completed"])
def test_repeat_of_same_snapshot_starts_nothing(store: BackupStateStore, finish: str) -> None:
    store.begin_attempt("sb-1", SNAPSHOT_A, "a1")
    if finish == "completed":
        store.complete_attempt("sb-1", "a1", digest="sha256:" + "1" * 64, size_bytes=10)

    repeat = store.begin_attempt("sb-1", SNAPSHOT_A, "a2")

    assert repeat.started is False
    assert repeat.record.attempt_id == "a1"
    assert store.get("sb-1").attempt_id == "a1"


def test_failed_snapshot_can_be_retried(store: BackupStateStore) -> None:
    store.begin_attempt("sb-1", SNAPSHOT_A, "a1")
    store.fail_attempt("sb-1", "a1", error="push failed", recoverable=True)

    retry = store.begin_attempt("sb-1", SNAPSHOT_A, "a2")

    assert retry.started is True
    assert retry.replaced.state is RunnerBackupState.FAILED
    record = store.get("sb-1")
    assert (record.attempt_id, record.error, record.recoverable) == ("a2", None, False)


def test_replaced_attempt_cannot_finish(store: BackupStateStore) -> None:
    store.begin_attempt("sb-1", SNAPSHOT_A, "old")
    newer = store.begin_attempt("sb-1", SNAPSHOT_B, "new")

    assert newer.replaced.attempt_id == "old"
    assert store.complete_attempt("sb-1", "old", digest="sha256:" + "2" * 64, size_bytes=1) is False
    assert store.fail_attempt("sb-1", "old", error="late failure", recoverable=False) is False
    record = store.get("sb-1")
    assert (record.state, record.snapshot, record.attempt_id) == (RunnerBackupState.IN_PROGRESS, SNAPSHOT_B, "new")


def test_attempt_finishes_only_once(store: BackupStateStore) -> None:
    store.begin_attempt("sb-1", SNAPSHOT_A, "a1")

    assert store.complete_attempt("sb-1", "a1", digest="sha256:" + "3" * 64, size_bytes=5) is True
    assert store.fail_attempt("sb-1", "a1", error="late", recoverable=True) is False
    assert store.get("sb-1").state is RunnerBackupState.COMPLETED


def test_interrupted_attempts_fail_recoverably(store: BackupStateStore) -> None:
    store.begin_attempt("sb-1", SNAPSHOT_A, "a1")
    store.begin_attempt("sb-2", "127.0.0.1:5000/p/backup-sb-2:t1", "b1")
    store.complete_attempt("sb-2", "b1", digest=None, size_bytes=None)

    failed = store.fail_interrupted()

    assert [record.sandbox_id for record in failed] == ["sb-1"]
    assert failed[0] == store.get("sb-1")
    assert (failed[0].state, failed[0].error, failed[0].recoverable) == (RunnerBackupState.FAILED, RESTART_ERROR, True)
    assert store.get("sb-2").state is RunnerBackupState.COMPLETED
    assert store.fail_interrupted() == []


def test_records_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    first = BackupStateStore(path)
    first.begin_attempt("sb-1", SNAPSHOT_A, "a1")
    first.complete_attempt("sb-1", "a1", digest="sha256:" + "4" * 64, size_bytes=42)
    first.close()

    second = BackupStateStore(path)
    try:
        record = second.get("sb-1")
        listed = second.list_all()
    finally:
        second.close()

    assert (record.state, record.digest, record.size_bytes) == (RunnerBackupState.COMPLETED, "sha256:" + "4" * 64, 42)
    assert listed == [record]
