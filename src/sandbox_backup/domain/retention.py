"""Retention of one sandbox's backups: keep-last and calendar-bucket rules, and a verified floor.

The rules work like the `--keep-*` options of `restic forget` (restic 0.16 manual, rustic docs):
- `keep_last` keeps the N newest backups.
- `keep_hourly`, `keep_daily`, `keep_weekly` and `keep_monthly` each keep the newest backup of
  the N most recent calendar buckets (UTC hour, day, ISO week, month) that contain a backup.
  Buckets count back from the newest backup, not from "now", so a sandbox that stopped being
  backed up keeps its last backups however long it stays stopped.
- Rules are additive: a backup is kept when any rule keeps it.
- When every rule count is zero, the policy keeps everything.
Unlike restic 0.17, the oldest backup is not kept when there are fewer backups than buckets.

Decisions beyond restic:
- A broken backup cannot be restored, so it fills no slot of any rule and is deleted unless a
  restore uses it. Its row stays in the database as history, with its `broken_reason`.
- A completed backup that is not verified yet counts for the rules like a verified one. The
  newest backup is usually not verified yet, and it must not lose its rule slots.
- `min_verified` is a floor: the newest N verified, unbroken backups are kept even when no rule
  keeps them, so a run of unverified backups never leaves a sandbox without a proven one.
- Protected backups (used by a restore in progress) are always kept, broken or not.
- Ties in `completed_at` are ordered by id, so a plan is the same on every replica.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pydantic

from sandbox_backup import errors

# Upper bound of every count: far above any useful policy, low enough to catch a typo.
MAX_COUNT = 100_000

# Reasons a backup is kept, besides the numbered rule reasons such as `latest-1` or `daily-3`.
KEEP_ALL = "keep-all"
FLOOR = "floor"
PROTECTED = "protected"

# Fields whose counts are zero in a policy that keeps everything (the floor is not a rule).
RULE_FIELDS = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly")


class RetentionPolicy(pydantic.BaseModel):
    """Counts of backups, or of calendar buckets, that one sandbox keeps."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    keep_last: int = pydantic.Field(10, ge=0, le=MAX_COUNT, strict=True, description="Newest backups kept.")
    keep_hourly: int = pydantic.Field(48, ge=0, le=MAX_COUNT, strict=True, description="Most recent UTC hours with a backup whose newest backup is kept.")
    keep_daily: int = pydantic.Field(7, ge=0, le=MAX_COUNT, strict=True, description="Most recent UTC days with a backup whose newest backup is kept.")
    keep_weekly: int = pydantic.Field(4, ge=0, le=MAX_COUNT, strict=True, description="Most recent ISO weeks with a backup whose newest backup is kept.")
    keep_monthly: int = pydantic.Field(24, ge=0, le=MAX_COUNT, strict=True, description="Most recent UTC months with a backup whose newest backup is kept.")
    min_verified: int = pydantic.Field(3, ge=0, le=MAX_COUNT, strict=True, description="Newest verified, unbroken backups that are never deleted.")

    @property
    def keeps_everything(self) -> bool:
        return all(getattr(self, name) == 0 for name in RULE_FIELDS)


@dataclasses.dataclass(frozen=True)
class BackupView:
    """The facts about one COMPLETED, not deleted backup that retention looks at."""

    id: str
    completed_at: datetime.datetime
    verified: bool
    broken: bool


@dataclasses.dataclass(frozen=True)
class RetentionPlan:
    """The outcome of a policy: kept ids with every reason each is kept, and ids to delete.

    `delete` is ordered newest first.
    """

    keep: Mapping[str, tuple[str, ...]]
    delete: tuple[str, ...]
    evaluated_at: datetime.datetime

    def reasons(self, backup_id: str) -> tuple[str, ...]:
        """Return why `backup_id` is kept, or () when it is deleted or unknown."""
        return self.keep.get(backup_id, ())


BucketKey = Callable[[datetime.datetime], tuple[int, ...]]


def _hour(moment: datetime.datetime) -> tuple[int, ...]:
    return (moment.year, moment.month, moment.day, moment.hour)


def _day(moment: datetime.datetime) -> tuple[int, ...]:
    return (moment.year, moment.month, moment.day)


def _iso_week(moment: datetime.datetime) -> tuple[int, ...]:
    # The ISO year, not the calendar year: 2027-01-01 belongs to week 53 of 2026.
    calendar = moment.isocalendar()
    return (calendar.year, calendar.week)


def _month(moment: datetime.datetime) -> tuple[int, ...]:
    return (moment.year, moment.month)


# (reason prefix, policy field, bucket of a UTC time), in the order reasons are listed.
BUCKET_RULES: tuple[tuple[str, str, BucketKey], ...] = (
    ("hourly", "keep_hourly", _hour),
    ("daily", "keep_daily", _day),
    ("weekly", "keep_weekly", _iso_week),
    ("monthly", "keep_monthly", _month),
)


def evaluate(
    backups: Iterable[BackupView],
    *,
    policy: RetentionPolicy,
    now: datetime.datetime,
    protected_ids: Iterable[str] = (),
) -> RetentionPlan:
    """Decide which backups of one sandbox to keep and which to delete under `policy`.

    `now` is recorded in the plan; the rules count back from the newest backup, not from `now`.
    Raises ValueError for a naive `completed_at` or `now`, because calendar buckets need UTC.
    """
    _require_aware(now, "now")
    ordered = sorted(backups, key=_newest_first_key, reverse=True)
    reasons: dict[str, list[str]] = {backup.id: [] for backup in ordered}

    if policy.keeps_everything:
        for backup in ordered:
            reasons[backup.id].append(KEEP_ALL)
    else:
        _apply_rules(ordered, policy, reasons)

    protected = set(protected_ids)
    for backup in ordered:
        if backup.id in protected:
            reasons[backup.id].append(PROTECTED)

    keep = {backup_id: tuple(kept_for) for backup_id, kept_for in reasons.items() if kept_for}
    delete = tuple(backup.id for backup in ordered if backup.id not in keep)
    return RetentionPlan(keep=keep, delete=delete, evaluated_at=now)


def _apply_rules(ordered: list[BackupView], policy: RetentionPolicy, reasons: dict[str, list[str]]) -> None:
    # Broken backups cannot be restored, so no rule spends a slot on them.
    usable = [backup for backup in ordered if not backup.broken]

    for position, backup in enumerate(usable[: policy.keep_last], start=1):
        reasons[backup.id].append(f"latest-{position}")

    for prefix, field, bucket_of in BUCKET_RULES:
        _keep_newest_per_bucket(usable, getattr(policy, field), prefix, bucket_of, reasons)

    verified = [backup for backup in usable if backup.verified]
    for backup in verified[: policy.min_verified]:
        reasons[backup.id].append(FLOOR)


def _keep_newest_per_bucket(
    usable: list[BackupView], count: int, prefix: str, bucket_of: BucketKey, reasons: dict[str, list[str]]
) -> None:
    """Keep the first (newest) backup of each new bucket, until `count` buckets are filled."""
    seen: set[tuple[int, ...]] = set()
    for backup in usable:
        if len(seen) >= count:
            return

        bucket = bucket_of(_utc(backup.completed_at))
        if bucket in seen:
            continue

        seen.add(bucket)
        reasons[backup.id].append(f"{prefix}-{len(seen)}")


def _newest_first_key(backup: BackupView) -> tuple[datetime.datetime, str]:
    return (_utc(backup.completed_at), backup.id)


def _utc(moment: datetime.datetime) -> datetime.datetime:
    _require_aware(moment, "completed_at")
    return moment.astimezone(datetime.timezone.utc)


def _require_aware(moment: datetime.datetime, name: str) -> None:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{name} {moment!r} is a naive datetime: pass an aware UTC datetime so that calendar buckets are in UTC")


def parse_policy(text: str | None, *, defaults: RetentionPolicy | None = None) -> RetentionPolicy:
    """Parse a sandbox's JSON policy. Fields it leaves out take their value from `defaults`.

    Empty text or JSON `null` returns `defaults` (the class defaults when None). Raises
    InvalidInput naming the field and the allowed range for unknown fields, values that are
    not whole numbers, and counts out of range.
    """
    base = defaults or RetentionPolicy()
    if text is None or not text.strip():
        return base

    try:
        overrides = json.loads(text)
    except ValueError as exc:
        raise errors.InvalidInput(f"retention policy {text[:200]!r} is not valid JSON ({exc}): send an object such as {{\"keep_last\": 5}}") from exc

    if overrides is None:
        return base
    if not isinstance(overrides, dict):
        raise errors.InvalidInput(f"retention policy {text[:200]!r} is not a JSON object: send an object such as {{\"keep_last\": 5}}")
    return policy_with_overrides(base, overrides)


def policy_with_overrides(base: RetentionPolicy, overrides: Mapping[str, Any]) -> RetentionPolicy:
    """Return `base` with the fields in `overrides` replaced, validated like a new policy."""
    try:
        return RetentionPolicy.model_validate({**base.model_dump(), **overrides})
    except pydantic.ValidationError as exc:
        raise errors.InvalidInput(_describe_validation_error(exc)) from exc


def _describe_validation_error(exc: pydantic.ValidationError) -> str:
    problems = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "policy"
        if error["type"] == "extra_forbidden":
            problems.append(f"{field!r} is not a retention field; use {', '.join(RetentionPolicy.model_fields)}")
        else:
            problems.append(f"{field} = {error['input']!r} is invalid: {error['msg']}; use a whole number from 0 to {MAX_COUNT}")
    return "retention policy is invalid: " + "; ".join(problems)
