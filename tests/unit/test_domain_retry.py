import datetime
import random

import pytest

from sandbox_backup.domain.retry import RetryPolicy

NOW = datetime.datetime(2026, 12, 4, tzinfo=datetime.timezone.utc)


@pytest.mark.parametrize(
    ("attempt", "expected_delay_s"),
    [
        (1, 30),  # first retry waits the base delay
        (2, 60),
        (3, 120),
        (8, 3600),  # capped at max_delay_s
    ],
)
def test_delay_doubles_until_cap(attempt: int, expected_delay_s: float) -> None:
    policy = RetryPolicy(max_attempts=20, base_delay_s=30, max_delay_s=3600, jitter=0)
    decision = policy.decide(attempt=attempt, transient=True, now=NOW)
    assert decision.retry
    assert decision.next_attempt_at == NOW + datetime.timedelta(seconds=expected_delay_s)


def test_permanent_error_not_retried() -> None:
    decision = RetryPolicy().decide(attempt=1, transient=False, now=NOW)
    assert not decision.retry
    assert decision.reason == "permanent error"


def test_attempts_exhausted_not_retried() -> None:
    decision = RetryPolicy(max_attempts=3).decide(attempt=3, transient=True, now=NOW)
    assert not decision.retry
    assert "3 attempts" in decision.reason


def test_jitter_stays_within_fraction() -> None:
    policy = RetryPolicy(base_delay_s=100, max_delay_s=1000, jitter=0.2)
    rng = random.Random(1)
    delays = [policy.delay_s(1, rng=rng) for _ in range(500)]
    assert min(delays) >= 80
    assert max(delays) <= 120
    assert max(delays) - min(delays) > 20  # the jitter really spreads retries
