"""`bench/run.py --small`: the real manager on PostgreSQL and Redis against the simulated fleet."""

from __future__ import annotations

import os

from tests.fixtures.bench_scripts import run_bench_script, table_row


def test_bench_small_completes_every_backup() -> None:
    # Without BENCH_PG_URL the script starts its own PostgreSQL with pg_stat_statements, as a full run does.
    env = {name: value for name, value in os.environ.items() if name != "BENCH_PG_URL"}
    env["BENCH_REDIS_URL"] = os.environ.get("SANDBOX_BACKUP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

    result, output = run_bench_script("run.py", "--small", env=env)

    assert result.returncode == 0, output
    assert "makespan from t0 (s)" in result.stdout, output
    assert "dispatch latency p50/p90/p99/max (s)" in result.stdout, output
    # 5 runners x 4 sandboxes, for each of the three workloads.
    completed_row = next(line for line in result.stdout.splitlines() if line.startswith("sandboxes COMPLETED"))
    assert completed_row.count("20 of 20") == 3, output
    pg_row = next(line for line in result.stdout.splitlines() if line.startswith("SQL per backup above idle, pg_stat_statements"))
    assert "n/a" not in pg_row, output
    # The fleet reports the digest, so the manager never needs the registry.
    assert table_row(result.stdout, "registry connections")[1:] == ["0", "0", "0"], output
    assert "every backup COMPLETED" in result.stdout, output
