import collections
import datetime
import types

import pytest

from sandbox_backup import errors
from sandbox_backup.config import ConfigError, Settings, load_settings
from sandbox_backup.domain.retention import BackupView, RetentionPolicy, evaluate, parse_policy
from sandbox_backup.manager.retention import default_policy, policy_for

UTC = datetime.timezone.utc
NOW = datetime.datetime(2026, 12, 4, 12, 0, tzinfo=UTC)  # a Friday in ISO week 49
HOUR = datetime.timedelta(hours=1)

# Every rule off, no floor: a case turns on only the rule it tests.
NOTHING = {"keep_last": 0, "keep_hourly": 0, "keep_daily": 0, "keep_weekly": 0, "keep_monthly": 0, "min_verified": 0}


def policy(**counts: int) -> RetentionPolicy:
    return RetentionPolicy(**{**NOTHING, **counts})


def at(text: str) -> datetime.datetime:
    """Parse `2026-12-04T10:15` as UTC, or keep the offset given in the text."""
    moment = datetime.datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def b(backup_id: str, when: str, *, verified: bool = True, broken: bool = False) -> BackupView:
    return BackupView(id=backup_id, completed_at=at(when), verified=verified, broken=broken)


CASES = [
    # Empty history: nothing to keep, nothing to delete.
    (policy(keep_last=3), [], set(), {}, ()),
    # keep_last only: the two newest stay.
    (
        policy(keep_last=2),
        [b("a", "2026-12-04T08:00"), b("b", "2026-12-04T09:00"), b("c", "2026-12-04T10:00"), b("d", "2026-12-04T11:00")],
        set(),
        {"d": ("latest-1",), "c": ("latest-2",)},
        ("b", "a"),
    ),
    # Every rule count zero keeps everything, broken backups included.
    (
        policy(min_verified=5),
        [b("a", "2026-10-01T00:00"), b("b", "2026-12-04T09:00", broken=True)],
        set(),
        {"b": ("keep-all",), "a": ("keep-all",)},
        (),
    ),
    # The floor keeps the newest verified backups that no rule keeps.
    (
        policy(keep_last=1, min_verified=2),
        [b("a", "2026-12-04T08:00"), b("b", "2026-12-04T09:00"), b("c", "2026-12-04T10:00"), b("d", "2026-12-04T11:00", verified=False)],
        set(),
        {"d": ("latest-1",), "c": ("floor",), "b": ("floor",)},
        ("a",),
    ),
    # The floor skips broken backups even when they were verified before they broke.
    (
        policy(min_verified=1, keep_last=1),
        [b("a", "2026-12-04T08:00"), b("b", "2026-12-04T09:00", broken=True), b("c", "2026-12-04T10:00", verified=False)],
        set(),
        {"c": ("latest-1",), "a": ("floor",)},
        ("b",),
    ),
    # A backup a restore uses is kept although no rule keeps it.
    (
        policy(keep_last=1),
        [b("a", "2026-12-04T08:00"), b("b", "2026-12-04T09:00"), b("c", "2026-12-04T10:00")],
        {"a"},
        {"c": ("latest-1",), "a": ("protected",)},
        ("b",),
    ),
    # A broken backup is kept while a restore uses it.
    (
        policy(keep_last=1),
        [b("a", "2026-12-04T08:00", broken=True), b("b", "2026-12-04T09:00")],
        {"a"},
        {"b": ("latest-1",), "a": ("protected",)},
        (),
    ),
    # Protected ids that are not in the history change nothing.
    (policy(keep_last=1), [b("a", "2026-12-04T08:00"), b("b", "2026-12-04T09:00")], {"gone"}, {"b": ("latest-1",)}, ("a",)),
    # Completed but unverified backups fill rule slots like verified ones.
    (
        policy(keep_last=2),
        [b("a", "2026-12-04T08:00"), b("b", "2026-12-04T09:00", verified=False), b("c", "2026-12-04T10:00", verified=False)],
        set(),
        {"c": ("latest-1",), "b": ("latest-2",)},
        ("a",),
    ),
    # Broken backups fill no keep_last slot and are deleted, even the newest.
    (
        policy(keep_last=2),
        [b("a", "2026-12-04T08:00"), b("b", "2026-12-04T09:00"), b("c", "2026-12-04T10:00"), b("d", "2026-12-04T11:00", broken=True)],
        set(),
        {"c": ("latest-1",), "b": ("latest-2",)},
        ("d", "a"),
    ),
    # Broken backups fill no bucket: the day's newest usable backup takes the slot.
    (
        policy(keep_daily=1),
        [b("a", "2026-12-04T08:00"), b("b", "2026-12-04T09:00", broken=True)],
        set(),
        {"a": ("daily-1",)},
        ("b",),
    ),
    # Several backups in one hour: only the newest of that hour is kept.
    (
        policy(keep_hourly=2),
        [b("a", "2026-12-04T09:50"), b("b", "2026-12-04T10:05"), b("c", "2026-12-04T10:40"), b("d", "2026-12-04T10:59")],
        set(),
        {"d": ("hourly-1",), "a": ("hourly-2",)},
        ("c", "b"),
    ),
    # Hours without a backup are skipped: the two most recent hours that have one count.
    (
        policy(keep_hourly=2),
        [b("a", "2026-12-04T05:10"), b("b", "2026-12-04T07:10"), b("c", "2026-12-04T10:10")],
        set(),
        {"c": ("hourly-1",), "b": ("hourly-2",)},
        ("a",),
    ),
    # Equal completion times are ordered by id, so the larger id counts as newer.
    (
        policy(keep_last=1),
        [b("x1", "2026-12-04T10:00"), b("x2", "2026-12-04T10:00")],
        set(),
        {"x2": ("latest-1",)},
        ("x1",),
    ),
    # Month boundary: 23:59 on the 30th and 00:00 on the 1st fall in different months.
    (
        policy(keep_monthly=2),
        [b("oct", "2026-10-15T12:00"), b("nov-end", "2026-11-30T23:59"), b("nov-mid", "2026-11-15T00:00"), b("dec-start", "2026-12-01T00:00")],
        set(),
        {"dec-start": ("monthly-1",), "nov-end": ("monthly-2",)},
        ("nov-mid", "oct"),
    ),
    # Buckets are UTC: 01:30 at +02:00 on December 1st is still November 30th in UTC.
    (
        policy(keep_monthly=1),
        [b("utc-nov", "2026-12-01T01:30+02:00"), b("older", "2026-11-20T00:00")],
        set(),
        {"utc-nov": ("monthly-1",)},
        ("older",),
    ),
    # ISO weeks run Monday to Sunday: Sunday 23:59 and the next Monday 00:00 differ.
    (
        policy(keep_weekly=2),
        [b("sat", "2026-11-28T12:00"), b("sun", "2026-11-29T23:59"), b("mon", "2026-11-30T00:00")],
        set(),
        {"mon": ("weekly-1",), "sun": ("weekly-2",)},
        ("sat",),
    ),
    # ISO week 53 of 2026 spans the new year: December 28th and January 1st share a week.
    (
        policy(keep_weekly=2),
        [b("dec-28", "2026-12-28T09:00"), b("jan-01", "2027-01-01T09:00"), b("jan-04", "2027-01-04T09:00")],
        set(),
        {"jan-04": ("weekly-1",), "jan-01": ("weekly-2",)},
        ("dec-28",),
    ),
    # Rules are additive: one backup collects the reasons of every rule that keeps it.
    (
        policy(keep_last=1, keep_hourly=1, keep_daily=2, keep_weekly=1, keep_monthly=1, min_verified=1),
        [b("yesterday", "2026-12-03T20:00"), b("today", "2026-12-04T10:00")],
        set(),
        {"today": ("latest-1", "hourly-1", "daily-1", "weekly-1", "monthly-1", "floor"), "yesterday": ("daily-2",)},
        (),
    ),
    # More slots than backups: everything is kept.
    (policy(keep_last=10), [b("a", "2026-12-04T08:00"), b("b", "2026-12-04T09:00")], set(), {"b": ("latest-1",), "a": ("latest-2",)}, ()),
]


@pytest.mark.parametrize(("retention", "backups", "protected", "expected_keep", "expected_delete"), CASES)
def test_evaluate_cases(
    retention: RetentionPolicy,
    backups: list[BackupView],
    protected: set[str],
    expected_keep: dict[str, tuple[str, ...]],
    expected_delete: tuple[str, ...],
) -> None:
    plan = evaluate(backups, policy=retention, now=NOW, protected_ids=protected)
    assert dict(plan.keep) == expected_keep
    assert plan.delete == expected_delete
    assert plan.evaluated_at == NOW


def _hourly_history(days: int) -> list[BackupView]:
    """One verified backup at half past every hour, the newest at 11:30 on NOW's day."""
    newest = NOW - HOUR / 2
    return [
        BackupView(id=(newest - step * HOUR).strftime("%Y-%m-%dT%H:%M"), completed_at=newest - step * HOUR, verified=True, broken=False)
        for step in range(days * 24)
    ]


def test_default_policy_over_three_months() -> None:
    history = _hourly_history(90)

    plan = evaluate(history, policy=RetentionPolicy(), now=NOW)

    per_rule = collections.Counter(reason.split("-")[0] for reasons in plan.keep.values() for reason in reasons)
    assert per_rule["latest"] == 10
    assert per_rule["hourly"] == 48
    assert per_rule["daily"] == 7
    assert per_rule["weekly"] == 4
    assert per_rule["monthly"] == 4  # September to December: only four months hold a backup
    assert per_rule["floor"] == 3
    # 48 hours, plus 4 days before them, plus 2 weeks and 2 months that the days do not cover.
    assert len(plan.keep) == 56
    assert len(plan.delete) == len(history) - 56


@pytest.mark.parametrize(
    ("backup_id", "reasons"),
    [
        ("2026-12-04T11:30", ("latest-1", "hourly-1", "daily-1", "weekly-1", "monthly-1", "floor")),
        ("2026-12-02T12:30", ("hourly-48",)),  # the oldest hour kept
        ("2026-12-02T11:30", ()),  # one hour older: deleted
        ("2026-11-30T23:30", ("daily-5", "monthly-2")),  # last backup of November
        ("2026-11-29T23:30", ("daily-6", "weekly-2")),  # Sunday closes ISO week 48
        ("2026-11-28T23:30", ("daily-7",)),
        ("2026-11-22T23:30", ("weekly-3",)),
        ("2026-11-15T23:30", ("weekly-4",)),
        ("2026-10-31T23:30", ("monthly-3",)),
        ("2026-09-30T23:30", ("monthly-4",)),
        ("2026-09-05T12:30", ()),  # the oldest backup of all
    ],
)
def test_default_policy_reasons(backup_id: str, reasons: tuple[str, ...]) -> None:
    plan = evaluate(_hourly_history(90), policy=RetentionPolicy(), now=NOW)
    assert plan.reasons(backup_id) == reasons


def test_evaluate_rejects_naive_time() -> None:
    naive = BackupView(id="a", completed_at=datetime.datetime(2026, 12, 4, 10, 0), verified=True, broken=False)
    with pytest.raises(ValueError, match="naive"):
        evaluate([naive], policy=policy(keep_last=1), now=NOW)


def test_policy_defaults() -> None:
    assert RetentionPolicy() == RetentionPolicy(keep_last=10, keep_hourly=48, keep_daily=7, keep_weekly=4, keep_monthly=24, min_verified=3)
    assert not RetentionPolicy().keeps_everything
    assert policy(min_verified=3).keeps_everything


@pytest.mark.parametrize("field", ["keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "min_verified"])
def test_policy_rejects_negative_count(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RetentionPolicy(**{field: -1})


BASE = RetentionPolicy(keep_last=4, keep_hourly=0, keep_daily=14, keep_weekly=0, keep_monthly=6, min_verified=2)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, BASE),  # no policy stored: the global default
        ("", BASE),
        ("null", BASE),
        ("{}", BASE),
        ('{"keep_last": 1}', BASE.model_copy(update={"keep_last": 1})),  # only the given field changes
        ('{"keep_daily": 0, "min_verified": 9}', BASE.model_copy(update={"keep_daily": 0, "min_verified": 9})),
    ],
)
def test_parse_policy_overrides_defaults(text: str | None, expected: RetentionPolicy) -> None:
    assert parse_policy(text, defaults=BASE) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{keep_last: 1}", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"keep_yearly": 2}', "'keep_yearly' is not a retention field"),
        ('{"keep_last": -1}', "keep_last = -1 is invalid"),
        ('{"keep_daily": 1.5}', "keep_daily = 1.5 is invalid"),
        ('{"keep_daily": "7"}', "keep_daily = '7' is invalid"),
        ('{"min_verified": true}', "min_verified = True is invalid"),
        ('{"keep_monthly": 100001}', "keep_monthly = 100001 is invalid"),
    ],
)
def test_parse_policy_rejects(text: str, message: str) -> None:
    with pytest.raises(errors.InvalidInput) as caught:
        parse_policy(text, defaults=BASE)
    assert message in str(caught.value)


def test_parse_policy_class_defaults() -> None:
    assert parse_policy('{"keep_last": 2}') == RetentionPolicy(keep_last=2)


def test_policy_for_merges_sandbox_json() -> None:
    settings = Settings(retention_keep_last=4, retention_keep_daily=14)
    sandbox = types.SimpleNamespace(id="sb-1", retention_policy='{"keep_daily": 2}')

    assert default_policy(settings) == RetentionPolicy(keep_last=4, keep_daily=14)
    assert policy_for(settings, sandbox) == RetentionPolicy(keep_last=4, keep_daily=2)


def test_policy_for_names_sandbox_and_field() -> None:
    sandbox = types.SimpleNamespace(id="sb-1", retention_policy='{"keep_daily": -2}')

    with pytest.raises(errors.InvalidInput) as caught:
        policy_for(Settings(), sandbox)

    assert "sb-1" in str(caught.value)
    assert "keep_daily = -2" in str(caught.value)


@pytest.mark.parametrize(("key", "value"), [("retention_keep_last", -1), ("verify_batch", 0), ("verify_max_age_s", 1.0), ("retention_interval_s", 0)])
def test_settings_reject_out_of_range(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=key):
        load_settings(**{key: value})
