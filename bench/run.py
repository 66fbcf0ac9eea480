"""Backup-dispatch benchmark: the real manager against a simulated runner fleet.

Each workload gets a fresh PostgreSQL database, a fresh Redis key prefix, a
`sandbox-backup serve` subprocess (through bench/manager_main.py) and a bench/fleet.py
subprocess. Runners and one registry are created through the REST API. Unless BENCH_PG_URL
names a server, the benchmark starts its own PostgreSQL with pg_stat_statements loaded
(bench/pgserver.py), so statements are counted by the server as well as by the manager.

Workloads:
  w1   every sandbox STOPPED and never backed up; registered through the API, t0 = the last
       registration call returned; ends when every sandbox has a COMPLETED backup
  w2b  every sandbox STARTED and never backed up; otherwise as w1
  w2   every sandbox STARTED, its last backup COMPLETED 2 h before t0; sandboxes and backups
       are written straight into the database in one transaction, t0 = its commit; counts the
       backups dispatched within one due-check interval of t0 and ends when all COMPLETED

Registration (w1, w2b): `--register batch` (default) uses POST /api/v1/sandboxes/batch with
1000 sandboxes per call; `--register single` uses one PUT per sandbox, 8 at a time.

Usage: .venv/bin/python bench/run.py [--small] [--workload w1|w2|w2b|all] [--register batch|single]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import math
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx

import fleet as fleet_names
from pgserver import PrivatePostgres

BENCH_DIR = Path(__file__).resolve().parent
# Set by main(): BENCH_PG_URL, or the private server the benchmark starts.
PG_ADMIN_URL = ""
# Set by main() when the benchmark runs its own server, whose CPU is then reported too.
PG_SERVER: PrivatePostgres | None = None
# Marks the benchmark's own queries, so server-side statement counts leave them out.
BENCH_QUERY_MARK = "/* bench-harness */"
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
    due_interval_s: float
    duration_max_s: float | None = None
    # Wait before the idle measurement, so it starts after the first health-probe pass, whose
    # one write per newly registered runner is not background load.
    settle_s: float = 0.0
    failure_rate: float = 0.0
    # Manager settings that differ from its defaults, as SANDBOX_BACKUP_* variables.
    manager_env: dict[str, str] = dataclasses.field(default_factory=dict)


FULL = Size(runners=100, sandboxes_per_runner=20, duration_s=2.0, timeout_s=1500.0, idle_s=30.0, settle_s=20.0, due_interval_s=60.0)
# The default due check runs every 60 s, so W2b alone would take a minute. CI uses 5 s.
SMALL = Size(
    runners=5,
    sandboxes_per_runner=4,
    duration_s=0.2,
    timeout_s=90.0,
    idle_s=2.0,
    due_interval_s=5.0,
    manager_env={"SANDBOX_BACKUP_DUE_CHECK_INTERVAL_S": "5"},
)
# Scale: 1000 runners x 100 sandboxes, 30 to 120 s backups, 1 % of sandboxes failing once.
W3 = Size(runners=1000, sandboxes_per_runner=100, duration_s=30.0, duration_max_s=120.0, failure_rate=0.01, timeout_s=3600.0, idle_s=10.0, due_interval_s=60.0)
W3_SMALL = Size(runners=10, sandboxes_per_runner=10, duration_s=0.2, duration_max_s=0.6, failure_rate=0.1, timeout_s=90.0, idle_s=2.0, due_interval_s=5.0)
WORKLOAD_STATES = {"w1": ("STOPPED", "stopped"), "w2b": ("STARTED", "started"), "w2": ("STARTED", "started"), "w3": ("MIXED", "started")}


def w3_state(sandbox_index: int) -> str:
    """70 % running, 25 % stopped, 5 % archiving, by the sandbox's index on its runner."""
    slot = sandbox_index % 20
    if slot < 14:
        return "STARTED"
    if slot < 19:
        return "STOPPED"
    return "ARCHIVING"
SEED_TAG = "seed"


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


async def pg_statement_count(admin: asyncpg.Connection, database: str) -> tuple[int, int]:
    """Return the statements the manager ran on `database`: all, and all but BEGIN/COMMIT/ROLLBACK."""
    query = (
        f"SELECT {BENCH_QUERY_MARK} coalesce(sum(s.calls), 0), "
        "coalesce(sum(s.calls) FILTER (WHERE s.query !~* '^\\s*(begin|commit|rollback|start transaction)'), 0) "
        "FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
        f"WHERE d.datname = $1 AND s.query NOT LIKE '%bench-harness%'"
    )
    row = await admin.fetchrow(query, database)
    return int(row[0]), int(row[1])


async def write_statement_counts(admin: asyncpg.Connection, database: str, path: Path) -> None:
    """Write every statement the server counted on `database`, most called first (kept with --keep)."""
    rows = await admin.fetch(
        f"SELECT {BENCH_QUERY_MARK} s.calls, s.query FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
        "WHERE d.datname = $1 ORDER BY s.calls DESC",
        database,
    )
    path.write_text("".join(f"{row['calls']:>8}  {' '.join(row['query'].split())[:300]}\n" for row in rows))


async def put_all(http: httpx.AsyncClient, paths_and_bodies: list[tuple[str, dict[str, Any]]], concurrency: int) -> None:
    limit = asyncio.Semaphore(concurrency)

    async def put(path: str, body: dict[str, Any]) -> None:
        async with limit:
            response = await http.put(path, json=body)
            if response.status_code >= 300:
                raise RuntimeError(f"PUT {path} failed with status {response.status_code}: {response.text}")

    await asyncio.gather(*(put(path, body) for path, body in paths_and_bodies))


async def run_workload(workload: str, size: Size, workdir: Path, register: str) -> dict[str, Any]:
    sandbox_state, container_state = WORKLOAD_STATES[workload]
    total = size.runners * size.sandboxes_per_runner
    database = f"bench_{secrets.token_hex(6)}"
    database_url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{database}"
    events_path = workdir / f"{workload}-fleet-events.jsonl"
    sql_count_path = workdir / f"{workload}-sql-count"
    # The port stays bound until the manager starts: the fleet's 1000 listeners take ports from
    # the same ephemeral range and could otherwise take this one first.
    manager_port_holder = socket.socket()
    manager_port_holder.bind(("127.0.0.1", 0))
    manager_port = manager_port_holder.getsockname()[1]
    manager_url = f"http://127.0.0.1:{manager_port}"

    admin = await asyncpg.connect(PG_ADMIN_URL)
    await admin.execute(f'CREATE DATABASE "{database}"')
    manager = fleet = None
    pg_stat = "not checked"
    try:
        bench_db = await asyncpg.connect(database_url)
        try:
            pg_stat = await check_pg_stat_statements(bench_db)
        finally:
            await bench_db.close()
        if pg_stat == "loaded":
            # The counts are read over the admin connection, whose database needs the view too.
            await admin.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")

        fleet_args = [
            sys.executable, str(BENCH_DIR / "fleet.py"),
            "--runners", str(size.runners),
            "--sandboxes-per-runner", str(size.sandboxes_per_runner),
            "--container-state", container_state,
            "--duration", str(size.duration_s),
            "--duration-max", str(size.duration_max_s or size.duration_s),
            "--failure-rate", str(size.failure_rate),
            "--fail-once",
            "--manager-url", manager_url,
            "--events", str(events_path),
            "--max-seconds", str(size.timeout_s + 120),
        ]
        fleet = subprocess.Popen(fleet_args, stdout=subprocess.PIPE, stderr=open(workdir / f"{workload}-fleet.log", "wb"))
        assert fleet.stdout is not None
        ready = json.loads(fleet.stdout.readline())

        env = {
            **os.environ,
            "SANDBOX_BACKUP_DATABASE_URL": database_url,
            "SANDBOX_BACKUP_COORDINATION_URL": REDIS_URL,
            "SANDBOX_BACKUP_API_TOKEN": API_TOKEN,
            "SANDBOX_BACKUP_API_HOST": "127.0.0.1",
            "SANDBOX_BACKUP_API_PORT": str(manager_port),
            "SANDBOX_BACKUP_LOG_JSON": "true",
            "BENCH_SQL_COUNT_FILE": str(sql_count_path),
            "BENCH_REDIS_KEY_PREFIX": f"{database}:",
            **size.manager_env,
        }
        manager_port_holder.close()
        manager = subprocess.Popen(
            [sys.executable, str(BENCH_DIR / "manager_main.py")],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(workdir / f"{workload}-manager.log", "wb"),
        )
        await wait_healthy(manager_url, manager, 60.0)

        headers = {"Authorization": f"Bearer {API_TOKEN}"}
        async with httpx.AsyncClient(base_url=f"{manager_url}/api/v1", headers=headers, timeout=60.0) as http:
            # A fleet port that only counts connections, so any registry call by the manager shows up.
            registry_url = f"http://127.0.0.1:{ready['registryPort']}"
            await put_all(http, [("/registries/bench-registry", {"url": registry_url, "isDefault": True})], 1)
            runner_puts = [(f"/runners/{r['id']}", {"apiUrl": r["url"], "token": r["token"]}) for r in ready["runners"]]
            await put_all(http, runner_puts, 8)

            # Idle rates: the manager with its runners and no sandboxes.
            await asyncio.sleep(size.settle_s)
            idle = await measure(manager.pid, sql_count_path, admin, database, pg_stat, size.idle_s)

            before = await snapshot(manager.pid, fleet.pid, sql_count_path, admin, database, pg_stat)
            runner_of = {
                fleet_names.sandbox_id(r, j): ready["runners"][r]["id"] for r in range(size.runners) for j in range(size.sandboxes_per_runner)
            }
            sandbox_ids = list(runner_of)
            if workload == "w2":
                t0 = await seed_backed_up(database_url, sandbox_ids, runner_of, registry_url)
            else:
                states = {sandbox_id: w3_state(int(sandbox_id.rsplit("-", 1)[1])) if workload == "w3" else sandbox_state for sandbox_id in sandbox_ids}
                await register_sandboxes(http, sandbox_ids, runner_of, states, register)
                t0 = time.time()
            at_t0 = await snapshot(manager.pid, fleet.pid, sql_count_path, admin, database, pg_stat)

        completed_at = await wait_completed(database_url, total, size.timeout_s)
        t_end = time.time()
        backed_up_twice, attempts_by_state = await audit(database_url)
        after = await snapshot(manager.pid, fleet.pid, sql_count_path, admin, database, pg_stat)
        rss = peak_rss_mib(manager.pid)
    finally:
        manager_port_holder.close()
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
        if pg_stat == "loaded":
            await write_statement_counts(admin, database, workdir / f"{workload}-statements.txt")
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()

    events = [json.loads(line) for line in events_path.read_text().splitlines()]
    starts = {e["snapshot"]: e for e in events if e["event"] == "start"}
    ends = {e["snapshot"]: e for e in events if e["event"] == "end"}
    dispatch = [e["t"] - t0 for e in starts.values()]
    seen_after_end = [completed_at[s] - ends[s]["t"] for s in completed_at if s in ends]
    d10, d90 = percentile(dispatch, 0.10), percentile(dispatch, 0.90)
    rate = (0.8 * len(dispatch)) / (d90 - d10) if d90 > d10 else float("nan")

    def per_backup(key: str, start: dict[str, float], idle_key: str) -> float | None:
        if start.get(key) is None or after.get(key) is None:
            return None
        return (after[key] - start[key] - idle[idle_key] * (after["t"] - start["t"])) / total

    return {
        "workload": workload,
        "register": "one transaction in the database" if workload == "w2" else f"API, {register}",
        "sandboxes": total,
        "runners": size.runners,
        "completed": len(completed_at),
        "registerSeconds": t0 - before["t"],
        "makespan": max(completed_at.values()) - t0,
        "makespanFromFirstCall": max(completed_at.values()) - before["t"],
        "startedBeforeT0": sum(1 for latency in dispatch if latency < 0),
        "withinDueInterval": sum(1 for latency in dispatch if latency <= size.due_interval_s),
        "dispatch": dispatch,
        "seenAfterEnd": seen_after_end,
        "rate": rate,
        "maxInFlight": max_in_flight(events),
        "sqlPerBackup": per_backup("sql", before, "sql"),
        "sqlPerBackupFromT0": per_backup("sql", at_t0, "sql"),
        "pgPerBackup": per_backup("pg", before, "pg"),
        "pgPerBackupNoTx": per_backup("pgNoTx", before, "pgNoTx"),
        "pgPerBackupFromT0": per_backup("pg", at_t0, "pg"),
        "idle": idle,
        "pgStat": pg_stat,
        "cpu": after["cpu"] - before["cpu"],
        "cpuFromT0": after["cpu"] - at_t0["cpu"],
        "runSeconds": t_end - before["t"],
        "fleetCpu": after["fleetCpu"] - before["fleetCpu"],
        "pgCpu": None if before["pgCpu"] is None else after["pgCpu"] - before["pgCpu"],
        "rss": rss,
        "registryConnections": registry_connections,
        "attempts": len(starts),
        "backedUpTwice": backed_up_twice,
        "attemptsByState": attempts_by_state,
    }


async def audit(database_url: str) -> tuple[int, dict[str, int]]:
    """Return how many sandboxes have more than one new COMPLETED backup, and the attempts by state."""
    conn = await asyncpg.connect(database_url)
    try:
        twice = await conn.fetchval(
            f"SELECT {BENCH_QUERY_MARK} count(*) FROM (SELECT sandbox_id FROM backups WHERE state = 'COMPLETED'"
            f" AND image_ref NOT LIKE '%:{SEED_TAG}' GROUP BY sandbox_id HAVING count(*) > 1) doubles"
        )
        rows = await conn.fetch(f"SELECT {BENCH_QUERY_MARK} state, count(*) AS n FROM backups WHERE image_ref NOT LIKE '%:{SEED_TAG}' GROUP BY state")
    finally:
        await conn.close()
    return int(twice), {row["state"]: int(row["n"]) for row in rows}


async def snapshot(manager_pid: int, fleet_pid: int, sql_count_path: Path, admin: asyncpg.Connection, database: str, pg_stat: str) -> dict[str, Any]:
    """Read every counter at one moment: time, CPU of both processes, statements both ways."""
    pg, pg_no_tx = await pg_statement_count(admin, database) if pg_stat == "loaded" else (None, None)
    return {
        "t": time.time(),
        "pgCpu": PG_SERVER.cpu_seconds() if PG_SERVER is not None else None,
        "cpu": cpu_seconds(manager_pid),
        "fleetCpu": cpu_seconds(fleet_pid),
        "sql": read_count(sql_count_path),
        "pg": pg,
        "pgNoTx": pg_no_tx,
    }


async def measure(manager_pid: int, sql_count_path: Path, admin: asyncpg.Connection, database: str, pg_stat: str, seconds: float) -> dict[str, float]:
    """Return the manager's idle rates per second: statements (both counts) and CPU."""
    start = await snapshot(manager_pid, manager_pid, sql_count_path, admin, database, pg_stat)
    await asyncio.sleep(seconds)
    end = await snapshot(manager_pid, manager_pid, sql_count_path, admin, database, pg_stat)
    elapsed = end["t"] - start["t"]
    rates = {"cpu": (end["cpu"] - start["cpu"]) / elapsed, "sql": (end["sql"] - start["sql"]) / elapsed}
    for key in ("pg", "pgNoTx"):
        rates[key] = (end[key] - start[key]) / elapsed if start[key] is not None else 0.0
    return rates


async def register_sandboxes(http: httpx.AsyncClient, sandbox_ids: list[str], runner_of: dict[str, str], states: dict[str, str], register: str) -> None:
    """Make the sandboxes known through the API, in batches of 1000 or one PUT each."""
    def body(sandbox_id: str) -> dict[str, Any]:
        return {"state": states[sandbox_id], "runnerId": runner_of[sandbox_id], "organizationId": "bench-org"}

    if register == "single":
        await put_all(http, [(f"/sandboxes/{sandbox_id}", body(sandbox_id)) for sandbox_id in sandbox_ids], 8)
        return
    for start in range(0, len(sandbox_ids), 1000):
        chunk = [{"id": sandbox_id, **body(sandbox_id)} for sandbox_id in sandbox_ids[start : start + 1000]]
        response = await http.post("/sandboxes/batch", json={"sandboxes": chunk})
        if response.status_code >= 300:
            raise RuntimeError(f"POST /sandboxes/batch failed with status {response.status_code}: {response.text}")


async def seed_backed_up(database_url: str, sandbox_ids: list[str], runner_of: dict[str, str], registry_url: str) -> float:
    """Write running sandboxes whose last backup COMPLETED 2 h ago, in one transaction; return its commit time."""
    host = registry_url.removeprefix("http://")
    conn = await asyncpg.connect(database_url)
    try:
        two_hours_ago = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=2)
        backup_ids = {sandbox_id: str(uuid.uuid4()) for sandbox_id in sandbox_ids}
        async with conn.transaction():
            await conn.executemany(
                f"INSERT {BENCH_QUERY_MARK} INTO sandboxes (id, organization_id, runner_id, state, state_changed_at, backup_state, current_backup_id,"
                " backup_registry_id, last_backup_at, last_backup_started_at, last_attempt_ended_at, ephemeral, created_at, updated_at, version)"
                " VALUES ($1, 'bench-org', $2, 'STARTED', $3, 'COMPLETED', $4, 'bench-registry', $3, $3, $3, false, $3, $3, 1)",
                [(sandbox_id, runner_of[sandbox_id], two_hours_ago, backup_ids[sandbox_id]) for sandbox_id in sandbox_ids],
            )
            await conn.executemany(
                f"INSERT {BENCH_QUERY_MARK} INTO backups (id, sandbox_id, runner_id, registry_id, image_ref, trigger, state, attempt, next_attempt_at,"
                " manifest_digest, created_at, started_at, completed_at, updated_at, version)"
                " VALUES ($1, $2, $3, 'bench-registry', $4, 'SCHEDULE', 'COMPLETED', 1, $5, $6, $5, $5, $5, $5, 1)",
                [
                    (backup_ids[sandbox_id], sandbox_id, runner_of[sandbox_id], f"{host}/backup-{sandbox_id}:{SEED_TAG}", two_hours_ago, "sha256:" + "0" * 64)
                    for sandbox_id in sandbox_ids
                ],
            )
        return time.time()
    finally:
        await conn.close()


async def wait_completed(database_url: str, total: int, timeout_s: float) -> dict[str, float]:
    """Poll the benchmark database until `total` new backups are COMPLETED; return completed_at by image ref."""
    conn = await asyncpg.connect(database_url)
    new_completed = f"FROM backups WHERE state = 'COMPLETED' AND image_ref NOT LIKE '%:{SEED_TAG}'"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            done = await conn.fetchval(f"SELECT {BENCH_QUERY_MARK} count(*) {new_completed}")
            if done >= total:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout_s:.0f} s with {done} of {total} backups COMPLETED")
            await asyncio.sleep(0.5 if total <= 10_000 else 2.0)
        rows = await conn.fetch(f"SELECT {BENCH_QUERY_MARK} image_ref, completed_at {new_completed}")
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


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def print_table(results: list[dict[str, Any]], size: Size) -> None:
    rows = [
        ("sandboxes made known", lambda r: r["register"]),
        ("sandboxes COMPLETED", lambda r: f"{r['completed']} of {r['sandboxes']}"),
        ("runner backups started", lambda r: str(r["attempts"])),
        ("making them known (s before t0)", lambda r: f"{r['registerSeconds']:.1f}"),
        ("makespan from t0 (s)", lambda r: f"{r['makespan']:.1f}"),
        ("makespan from the first call (s)", lambda r: f"{r['makespanFromFirstCall']:.1f}"),
        ("backups started before t0", lambda r: str(r["startedBeforeT0"])),
        (f"dispatched within one due-check interval ({size.due_interval_s:.0f} s)", lambda r: str(r["withinDueInterval"])),
        ("dispatch latency p50/p90/p99/max (s)", lambda r: "/".join(f"{percentile(r['dispatch'], q):.1f}" for q in (0.5, 0.9, 0.99, 1.0))),
        ("completion seen after runner end p50/p99/max (s)", lambda r: "/".join(f"{percentile(r['seenAfterEnd'], q):.2f}" for q in (0.5, 0.99, 1.0))),
        ("steady dispatch rate (backups/s, p10-p90)", lambda r: f"{r['rate']:.1f}"),
        ("max in flight on one runner", lambda r: str(r["maxInFlight"])),
        ("SQL per backup above idle, pg_stat_statements", lambda r: _fmt(r["pgPerBackup"])),
        ("  same without BEGIN/COMMIT", lambda r: _fmt(r["pgPerBackupNoTx"])),
        ("  same counted from t0 only", lambda r: _fmt(r["pgPerBackupFromT0"])),
        ("SQL per backup above idle, manager-side count", lambda r: _fmt(r["sqlPerBackup"])),
        ("idle statements/s, pg_stat_statements", lambda r: _fmt(r["idle"]["pg"])),
        ("idle statements/s, manager-side count", lambda r: _fmt(r["idle"]["sql"])),
        ("manager idle CPU (% of a core)", lambda r: f"{100 * r['idle']['cpu']:.1f}"),
        ("manager CPU from the first call to end (s)", lambda r: f"{r['cpu']:.1f}"),
        ("manager CPU average (cores)", lambda r: f"{r['cpu'] / r['runSeconds']:.2f}"),
        ("fleet CPU from the first call to end (s)", lambda r: f"{r['fleetCpu']:.1f}"),
        ("PostgreSQL CPU from the first call to end (s)", lambda r: _fmt(r["pgCpu"])),
        ("manager peak RSS (MiB)", lambda r: f"{r['rss']:.0f}"),
        ("registry connections", lambda r: str(r["registryConnections"])),
        ("sandboxes with two new COMPLETED backups", lambda r: str(r["backedUpTwice"])),
        ("attempts by end state", lambda r: " ".join(f"{k}={v}" for k, v in sorted(r["attemptsByState"].items()))),
    ]
    width = max(len(name) for name, _ in rows)
    header = f"{'metric':<{width}} | " + " | ".join(f"{r['workload']:>26}" for r in results)
    print(header)
    print("-" * len(header))
    for name, cell in rows:
        print(f"{name:<{width}} | " + " | ".join(f"{cell(r):>26}" for r in results))
    for r in results:
        print(f"pg_stat_statements ({r['workload']}): {r['pgStat']}")
    print("t0: w1/w2b the last registration call returned; w2 the seeding transaction committed.")


def size_for(workload: str, small: bool) -> Size:
    if workload == "w3":
        return W3_SMALL if small else W3
    return SMALL if small else FULL


def _interrupt(signum: int, _frame: object) -> None:
    # Turns SIGTERM into KeyboardInterrupt, so the finally blocks stop the servers this run started.
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    global PG_ADMIN_URL, PG_SERVER
    signal.signal(signal.SIGTERM, _interrupt)
    parser = argparse.ArgumentParser(description="Run the backup-dispatch benchmark against a simulated fleet.")
    parser.add_argument("--small", action="store_true", help="5 runners x 4 sandboxes, 0.2 s backups (for CI)")
    parser.add_argument("--workload", choices=("w1", "w2", "w2b", "w3", "all"), default="all", help="workload to run (all = w1, w2b, w2)")
    parser.add_argument("--register", choices=("batch", "single"), default="batch", help="how w1 and w2b make sandboxes known")
    parser.add_argument("--keep", metavar="DIR", help="write the fleet event logs and manager logs to DIR and keep them")
    parser.add_argument(
        "--manager-setting", action="append", default=[], metavar="NAME=VALUE", help="a manager setting for this run, e.g. event_loop=asyncio (repeatable)"
    )
    args = parser.parse_args()
    extra_env = {}
    for item in args.manager_setting:
        name, separator, value = item.partition("=")
        if not separator or not name:
            parser.error(f"--manager-setting {item!r}: expected NAME=VALUE, e.g. event_loop=asyncio")
        extra_env[f"SANDBOX_BACKUP_{name.upper()}"] = value

    workloads = ["w1", "w2b", "w2"] if args.workload == "all" else [args.workload]
    sizes = {workload: size_for(workload, args.small) for workload in workloads}
    for size in sizes.values():
        size.manager_env.update(extra_env)
    for workload in workloads:
        size = sizes[workload]
        durations = f"{size.duration_s}" if size.duration_max_s is None else f"{size.duration_s} to {size.duration_max_s}"
        overrides = ", ".join(f"{name}={value}" for name, value in size.manager_env.items()) or "none"
        print(
            f"{workload}: runners {size.runners} x sandboxes {size.sandboxes_per_runner}, backups {durations} s, "
            f"failing once: {size.failure_rate:.0%} of sandboxes; manager settings other than the defaults: {overrides}"
        )

    with tempfile.TemporaryDirectory(prefix="sandbox-backup-bench-") as tmp:
        workdir = Path(args.keep) if args.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        server = None
        if os.environ.get("BENCH_PG_URL"):
            PG_ADMIN_URL = os.environ["BENCH_PG_URL"]
        else:
            server = PG_SERVER = PrivatePostgres(free_port())
            server.start()
            PG_ADMIN_URL = server.url
            print(f"PostgreSQL: a private server on 127.0.0.1:{server.port} with pg_stat_statements")
        try:
            results = [asyncio.run(run_workload(w, sizes[w], workdir, args.register)) for w in workloads]
        finally:
            if server is not None:
                server.stop()
    print_table(results, size_for(workloads[0], args.small))
    incomplete = [r["workload"] for r in results if r["completed"] != r["sandboxes"]]
    if incomplete:
        print(f"not every backup COMPLETED in: {', '.join(incomplete)}", file=sys.stderr)
        sys.exit(1)
    print("every backup COMPLETED")


if __name__ == "__main__":
    main()
