"""Backup-dispatch benchmark: the real manager against a simulated runner fleet.

Each workload gets a fresh PostgreSQL database, a fresh Redis key prefix, a
`sandbox-backup serve` subprocess (through bench/manager_main.py) and a bench/fleet.py
subprocess. Runners, one registry and the sandboxes are created through the REST API.
t0 is the moment the last sandbox PUT returned. A workload ends when every sandbox has a
COMPLETED backup in the database.

Workloads:
  w1   every sandbox STOPPED and never backed up
  w2b  every sandbox STARTED and never backed up

Usage: .venv/bin/python bench/run.py [--small] [--workload w1|w2b|both]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx

BENCH_DIR = Path(__file__).resolve().parent
PG_ADMIN_URL = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
API_TOKEN = "bench-admin-token-" + secrets.token_hex(8)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass
class Size:
    runners: int
    sandboxes_per_runner: int
    duration_s: float
    timeout_s: float
    idle_s: float
    # Manager settings that differ from its defaults, as SANDBOX_BACKUP_* variables.
    manager_env: dict[str, str] = dataclasses.field(default_factory=dict)


FULL = Size(runners=100, sandboxes_per_runner=20, duration_s=2.0, timeout_s=1500.0, idle_s=10.0)
# The default due check runs every 60 s, so W2b alone would take a minute. CI uses 5 s.
SMALL = Size(
    runners=5,
    sandboxes_per_runner=4,
    duration_s=0.2,
    timeout_s=90.0,
    idle_s=2.0,
    manager_env={"SANDBOX_BACKUP_DUE_CHECK_INTERVAL_S": "5"},
)
WORKLOAD_STATES = {"w1": ("STOPPED", "stopped"), "w2b": ("STARTED", "started")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of a non-empty list (`fraction` 1.0 is the maximum)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of proc(5); fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def read_count(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


async def wait_healthy(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=2.0) as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the manager exited with status {process.returncode} before it became healthy")
            try:
                if (await http.get(f"{url}/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"the manager at {url} was not healthy after {timeout_s:.0f} s")


async def check_pg_stat_statements(conn: asyncpg.Connection) -> str:
    preload = await conn.fetchval("SHOW shared_preload_libraries")
    if "pg_stat_statements" not in preload:
        return f"not loaded (shared_preload_libraries = {preload!r})"
    await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    return "loaded"


async def pg_statement_count(admin: asyncpg.Connection, database: str) -> int:
    query = "SELECT coalesce(sum(s.calls), 0) FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = $1"
    return int(await admin.fetchval(query, database))


async def put_all(http: httpx.AsyncClient, paths_and_bodies: list[tuple[str, dict[str, Any]]], concurrency: int) -> None:
    limit = asyncio.Semaphore(concurrency)

    async def put(path: str, body: dict[str, Any]) -> None:
        async with limit:
            response = await http.put(path, json=body)
            if response.status_code >= 300:
                raise RuntimeError(f"PUT {path} failed with status {response.status_code}: {response.text}")

    await asyncio.gather(*(put(path, body) for path, body in paths_and_bodies))


async def run_workload(workload: str, size: Size, workdir: Path) -> dict[str, Any]:
    sandbox_state, container_state = WORKLOAD_STATES[workload]
    total = size.runners * size.sandboxes_per_runner
    database = f"bench_{secrets.token_hex(6)}"
    events_path = workdir / f"{workload}-fleet-events.jsonl"
    sql_count_path = workdir / f"{workload}-sql-count"
    manager_port = free_port()
    manager_url = f"http://127.0.0.1:{manager_port}"

    admin = await asyncpg.connect(PG_ADMIN_URL)
    await admin.execute(f'CREATE DATABASE "{database}"')
    manager = fleet = None
    try:
        bench_db = await asyncpg.connect(PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{database}")
        try:
            pg_stat = await check_pg_stat_statements(bench_db)
        finally:
            await bench_db.close()

        fleet_args = [
            sys.executable, str(BENCH_DIR / "fleet.py"),
            "--runners", str(size.runners),
            "--sandboxes-per-runner", str(size.sandboxes_per_runner),
            "--container-state", container_state,
            "--duration", str(size.duration_s),
            "--manager-url", manager_url,
            "--events", str(events_path),
            "--max-seconds", str(size.timeout_s + 120),
        ]
        fleet = subprocess.Popen(fleet_args, stdout=subprocess.PIPE, stderr=open(workdir / f"{workload}-fleet.log", "wb"))
        assert fleet.stdout is not None
        ready = json.loads(fleet.stdout.readline())

        env = {
            **os.environ,
            "SANDBOX_BACKUP_DATABASE_URL": PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{database}",
            "SANDBOX_BACKUP_COORDINATION_URL": REDIS_URL,
            "SANDBOX_BACKUP_API_TOKEN": API_TOKEN,
            "SANDBOX_BACKUP_API_HOST": "127.0.0.1",
            "SANDBOX_BACKUP_API_PORT": str(manager_port),
            "SANDBOX_BACKUP_LOG_JSON": "true",
            "BENCH_SQL_COUNT_FILE": str(sql_count_path),
            "BENCH_REDIS_KEY_PREFIX": f"{database}:",
            **size.manager_env,
        }
        manager = subprocess.Popen(
            [sys.executable, str(BENCH_DIR / "manager_main.py")],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(workdir / f"{workload}-manager.log", "wb"),
        )
        await wait_healthy(manager_url, manager, 60.0)

        headers = {"Authorization": f"Bearer {API_TOKEN}"}
        async with httpx.AsyncClient(base_url=f"{manager_url}/api/v1", headers=headers, timeout=30.0) as http:
            # A fleet port that only counts connections, so any registry call by the manager shows up.
            registry = {"url": f"http://127.0.0.1:{ready['registryPort']}", "isDefault": True}
            await put_all(http, [("/registries/bench-registry", registry)], 1)
            runner_puts = [(f"/runners/{r['id']}", {"apiUrl": r["url"], "token": r["token"]}) for r in ready["runners"]]
            await put_all(http, runner_puts, 8)

            # Idle SQL rate: the manager with runners and no sandboxes.
            idle_start_count, idle_start = read_count(sql_count_path), time.monotonic()
            await asyncio.sleep(size.idle_s)
            idle_rate = (read_count(sql_count_path) - idle_start_count) / (time.monotonic() - idle_start)

            sql_before = read_count(sql_count_path)
            pg_before = await pg_statement_count(admin, database) if pg_stat == "loaded" else None
            cpu_before = cpu_seconds(manager.pid)
            fleet_cpu_before = cpu_seconds(fleet.pid)
            sandbox_puts = []
            for runner_index, runner in enumerate(ready["runners"]):
                for j in range(size.sandboxes_per_runner):
                    body = {"state": sandbox_state, "runnerId": runner["id"], "organizationId": "bench-org"}
                    sandbox_puts.append((f"/sandboxes/bench-sb-{runner_index:03d}-{j:03d}", body))
            put_started = time.time()
            await put_all(http, sandbox_puts, 8)
            t0 = time.time()

        completed_at = await wait_completed(admin, database, total, size.timeout_s)
        t_end = time.time()
        cpu_used = cpu_seconds(manager.pid) - cpu_before
        fleet_cpu_used = cpu_seconds(fleet.pid) - fleet_cpu_before
        rss = peak_rss_mib(manager.pid)
        # CPU and SQL counts start before the first sandbox PUT, so idle time is subtracted from there too.
        workload_s = t_end - put_started
        sql_used = read_count(sql_count_path) - sql_before
        pg_used = (await pg_statement_count(admin, database) - pg_before) if pg_before is not None else None
    finally:
        for process in (manager, fleet):
            if process is not None and process.poll() is None:
                process.terminate()
        registry_connections = None
        for process in (manager, fleet):
            if process is not None:
                try:
                    process.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        if fleet is not None and fleet.stdout is not None:
            tail = fleet.stdout.read().decode().strip().splitlines()
            if tail:
                registry_connections = json.loads(tail[-1]).get("registryConnections")
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()

    events = [json.loads(line) for line in events_path.read_text().splitlines()]
    starts = {e["snapshot"]: e for e in events if e["event"] == "start"}
    ends = {e["snapshot"]: e for e in events if e["event"] == "end"}
    dispatch = [e["t"] - t0 for e in starts.values()]
    seen_after_end = [completed_at[s] - ends[s]["t"] for s in completed_at if s in ends]
    d10, d90 = percentile(dispatch, 0.10), percentile(dispatch, 0.90)
    rate = (0.8 * len(dispatch)) / (d90 - d10) if d90 > d10 else float("nan")

    return {
        "workload": workload,
        "sandboxes": total,
        "runners": size.runners,
        "completed": len(completed_at),
        "putSeconds": t0 - put_started,
        "makespan": max(completed_at.values()) - t0,
        "makespanFromFirstPut": max(completed_at.values()) - put_started,
        "startedBeforeT0": sum(1 for latency in dispatch if latency < 0),
        "dispatch": dispatch,
        "seenAfterEnd": seen_after_end,
        "rate": rate,
        "maxInFlight": max_in_flight(events),
        "sqlPerBackup": (sql_used - idle_rate * workload_s) / total,
        "sqlIdleRate": idle_rate,
        "pgStat": pg_stat,
        "pgPerBackup": None if pg_used is None else pg_used / total,
        "cpu": cpu_used,
        "fleetCpu": fleet_cpu_used,
        "rss": rss,
        "registryConnections": registry_connections,
        "attempts": len(starts),
    }


async def wait_completed(admin: asyncpg.Connection, database: str, total: int, timeout_s: float) -> dict[str, float]:
    """Poll the benchmark database until `total` backups are COMPLETED; return completed_at by image ref."""
    conn = await asyncpg.connect(PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{database}")
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            done = await conn.fetchval("SELECT count(*) FROM backups WHERE state = 'COMPLETED'")
            if done >= total:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout_s:.0f} s with {done} of {total} backups COMPLETED")
            await asyncio.sleep(0.5)
        rows = await conn.fetch("SELECT image_ref, completed_at FROM backups WHERE state = 'COMPLETED'")
    finally:
        await conn.close()
    return {row["image_ref"]: row["completed_at"].timestamp() for row in rows}


def max_in_flight(events: list[dict[str, Any]]) -> int:
    """Return the maximum number of backups running at once on one runner, from the fleet's events."""
    running: dict[str, int] = {}
    peak = 0
    for event in sorted(events, key=lambda e: (e["t"], e["event"] == "start")):
        running[event["runner"]] = running.get(event["runner"], 0) + (1 if event["event"] == "start" else -1)
        peak = max(peak, running[event["runner"]])
    return peak


def print_table(results: list[dict[str, Any]]) -> None:
    rows = [
        ("sandboxes COMPLETED", lambda r: f"{r['completed']} of {r['sandboxes']}"),
        ("runner backups started", lambda r: str(r["attempts"])),
        ("sandbox PUTs (s before t0)", lambda r: f"{r['putSeconds']:.1f}"),
        ("makespan from t0 (s)", lambda r: f"{r['makespan']:.1f}"),
        ("makespan from first sandbox PUT (s)", lambda r: f"{r['makespanFromFirstPut']:.1f}"),
        ("backups started before t0", lambda r: str(r["startedBeforeT0"])),
        ("dispatch latency p50/p90/p99/max (s)", lambda r: "/".join(f"{percentile(r['dispatch'], q):.1f}" for q in (0.5, 0.9, 0.99, 1.0))),
        ("completion seen after runner end p50/p99/max (s)", lambda r: "/".join(f"{percentile(r['seenAfterEnd'], q):.2f}" for q in (0.5, 0.99, 1.0))),
        ("steady dispatch rate (backups/s, p10-p90)", lambda r: f"{r['rate']:.1f}"),
        ("max in flight on one runner", lambda r: str(r["maxInFlight"])),
        ("SQL statements per backup, pg_stat_statements", lambda r: "n/a" if r["pgPerBackup"] is None else f"{r['pgPerBackup']:.1f}"),
        ("SQL statements per backup incl. its PUT, manager-side", lambda r: f"{r['sqlPerBackup']:.1f} (idle {r['sqlIdleRate']:.1f}/s)"),
        ("manager CPU from first sandbox PUT to end (s)", lambda r: f"{r['cpu']:.1f}"),
        ("fleet CPU from first sandbox PUT to end (s)", lambda r: f"{r['fleetCpu']:.1f}"),
        ("manager peak RSS (MiB)", lambda r: f"{r['rss']:.0f}"),
        ("registry connections", lambda r: str(r["registryConnections"])),
    ]
    width = max(len(name) for name, _ in rows)
    header = f"{'metric':<{width}} | " + " | ".join(f"{r['workload']:>22}" for r in results)
    print(header)
    print("-" * len(header))
    for name, cell in rows:
        print(f"{name:<{width}} | " + " | ".join(f"{cell(r):>22}" for r in results))
    for r in results:
        print(f"pg_stat_statements ({r['workload']}): {r['pgStat']}")
    print("t0 = the moment the last sandbox PUT returned (sandboxes created through the REST API, 8 at a time).")


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the backup-dispatch benchmark against a simulated fleet.")
    parser.add_argument("--small", action="store_true", help="5 runners x 4 sandboxes, 0.2 s backups (for CI)")
    parser.add_argument("--workload", choices=("w1", "w2b", "both"), default="both", help="workload to run")
    parser.add_argument("--keep", metavar="DIR", help="write the fleet event logs and manager logs to DIR and keep them")
    args = parser.parse_args()

    size = SMALL if args.small else FULL
    workloads = ["w1", "w2b"] if args.workload == "both" else [args.workload]
    overrides = ", ".join(f"{name}={value}" for name, value in size.manager_env.items()) or "none"
    print(f"runners {size.runners} x sandboxes {size.sandboxes_per_runner}, backups {size.duration_s} s, no failures")
    print(f"manager settings other than the defaults: {overrides}")

    with tempfile.TemporaryDirectory(prefix="sandbox-backup-bench-") as tmp:
        workdir = Path(args.keep) if args.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        results = [asyncio.run(run_workload(w, size, workdir)) for w in workloads]
    print_table(results)
    incomplete = [r["workload"] for r in results if r["completed"] != r["sandboxes"]]
    if incomplete:
        print(f"not every backup COMPLETED in: {', '.join(incomplete)}", file=sys.stderr)
        sys.exit(1)
    print("every backup COMPLETED")


if __name__ == "__main__":
    main()
