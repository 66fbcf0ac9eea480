"""Simulated runner fleet: one asyncio process serves N runner agents, one loopback port each.

Each simulated runner serves the paths of the runner API that the manager calls
(`GET /agent/health`, `GET /sandboxes/{id}`, `POST /sandboxes/{id}/backup`) with the
same JSON bodies as the real agent. Only the container engine is simulated: a backup
sleeps for the configured duration and then reports to the manager exactly like the
agent (`POST {manager}/api/v1/runners/{id}/reports` with the runner token), with a
fake but well-formed digest `sha256:<64 hex>`.

The HTTP/1.1 server is a small `asyncio.start_server` implementation (keep-alive,
Content-Length bodies only). One uvicorn server per port would also fit: 100 of them in one
process started in 0.06 s with 27 MiB peak RSS on a 2-core machine, about the same as 100
`asyncio.start_server` listeners. The raw server was kept for its smaller per-request path.
NOTE: its per-request CPU has not been measured against uvicorn. It also listens on one extra port that acts as the registry and counts every
connection, so a run can show that the manager never needed the registry.

Every backup start and end is written with wall-clock times (`time.time()`, seconds)
to a JSON-lines file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import random
import re
import signal
import sys
import time
from typing import Any

import httpx

logger = logging.getLogger("bench.fleet")

_SANDBOX_PATH = re.compile(r"^/sandboxes/([A-Za-z0-9][A-Za-z0-9._-]{0,127})$")
_BACKUP_PATH = re.compile(r"^/sandboxes/([A-Za-z0-9][A-Za-z0-9._-]{0,127})/backup$")
_REASONS = {200: "OK", 201: "Created", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed"}
_MAX_BODY_BYTES = 1 << 20
_IDLE_TIMEOUT_S = 120.0


def runner_id(index: int) -> str:
    return f"bench-runner-{index:03d}"


def runner_token(index: int) -> str:
    return f"bench-token-{index:03d}-secret"


def sandbox_id(runner_index: int, sandbox_index: int) -> str:
    return f"bench-sb-{runner_index:03d}-{sandbox_index:03d}"


def fake_digest(snapshot: str) -> str:
    """Derive a stable, well-formed manifest digest from the image reference."""
    return "sha256:" + hashlib.sha256(snapshot.encode()).hexdigest()


@dataclasses.dataclass
class BackupRecord:
    snapshot: str
    state: str  # the runner API's backupState: IN_PROGRESS, COMPLETED or FAILED
    digest: str | None = None
    error: str | None = None
    recoverable: bool = False
    task: asyncio.Task[None] | None = None


@dataclasses.dataclass
class FleetConfig:
    runners: int
    sandboxes_per_runner: int
    container_state: str  # the runner API's sandbox state: "started" or "stopped"
    duration_min_s: float
    duration_max_s: float
    failure_rate: float
    # When set, a sandbox fails at most once: its retry and every later backup succeed.
    fail_once: bool
    manager_url: str
    events_path: str
    max_seconds: float
    seed: int


class SimulatedRunner:
    """State of one simulated runner agent: its sandboxes and their newest backup."""

    def __init__(self, index: int, fleet: Fleet) -> None:
        self.index = index
        self.id = runner_id(index)
        self.token = runner_token(index)
        self.fleet = fleet
        self.sandboxes = {sandbox_id(index, j) for j in range(fleet.config.sandboxes_per_runner)}
        self.records: dict[str, BackupRecord] = {}
        self.port = 0

    def sandbox_info(self, sandbox: str) -> dict[str, Any] | None:
        if sandbox not in self.sandboxes:
            return None
        body: dict[str, Any] = {"state": self.fleet.config.container_state, "backupState": "NONE", "daemonVersion": "bench-fleet"}
        record = self.records.get(sandbox)
        if record is None:
            return body
        body["backupState"] = record.state
        body["backupSnapshot"] = record.snapshot
        body["recoverable"] = record.recoverable
        if record.digest is not None:
            body["backupDigest"] = record.digest
            body["backupSizeBytes"] = 1024
            body["backupLayerCount"] = 1
        if record.error is not None:
            body["backupError"] = record.error
        return body

    def start_backup(self, sandbox: str, snapshot: str) -> None:
        # Like the agent, a newer request for the same sandbox cancels the older attempt.
        previous = self.records.get(sandbox)
        if previous is not None and previous.task is not None and not previous.task.done():
            previous.task.cancel()
        record = BackupRecord(snapshot=snapshot, state="IN_PROGRESS")
        self.records[sandbox] = record
        self.fleet.log_event("start", self, sandbox, snapshot)
        record.task = asyncio.get_running_loop().create_task(self._run_backup(sandbox, record))

    async def _run_backup(self, sandbox: str, record: BackupRecord) -> None:
        config = self.fleet.config
        await asyncio.sleep(self.fleet.random.uniform(config.duration_min_s, config.duration_max_s))
        if self.fleet.random.random() < config.failure_rate and not (config.fail_once and sandbox in self.fleet.failed):
            self.fleet.failed.add(sandbox)
            record.state = "FAILED"
            record.error = "simulated transient failure: registry push interrupted"
            record.recoverable = True
        else:
            record.state = "COMPLETED"
            record.digest = fake_digest(record.snapshot)
        self.fleet.log_event("end", self, sandbox, record.snapshot, state=record.state)
        await self.fleet.send_report(self, sandbox, record)


class ReportConnections:
    """Keep-alive HTTP/1.1 connections to the manager for reports, at most `size` in use at once.

    A few lines of asyncio streams instead of an HTTP client library: the fleet must cost far
    less CPU than the manager it measures, and it only ever sends one kind of request.
    """

    def __init__(self, host: str, port: int, *, size: int) -> None:
        self.host = host
        self.port = port
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._limit = asyncio.Semaphore(size)

    async def post(self, path: str, body: bytes, *, token: str) -> int:
        """Send one POST with a JSON body; return the response status."""
        async with self._limit:
            reader, writer = self._idle.pop() if self._idle else await asyncio.open_connection(self.host, self.port)
            try:
                head = (
                    f"POST {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\nauthorization: Bearer {token}\r\n"
                    f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
                )
                writer.write(head.encode() + body)
                status, keep_alive = await asyncio.wait_for(_read_response(reader), timeout=10.0)
            except BaseException:
                writer.close()
                raise
            if keep_alive:
                self._idle.append((reader, writer))
            else:
                writer.close()
            return status

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one HTTP/1.1 response with a content-length body; return its status and whether the connection stays open."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in head[1:] if line)}
    await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers.get("connection", "").lower() != "close"


class Fleet:
    """All simulated runners, their HTTP servers, the registry port and the event log."""

    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.random = random.Random(config.seed)
        self.runners = [SimulatedRunner(i, self) for i in range(config.runners)]
        self.registry_connections = 0
        self.failed: set[str] = set()
        self.registry_port = 0
        self.reports_failed = 0
        self._events = open(config.events_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._reports: ReportConnections | None = None
        self._pending_events: list[str] = []
        self._servers: list[asyncio.base_events.Server] = []
        self._connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self._report_limit = asyncio.Semaphore(64)

    def log_event(self, event: str, runner: SimulatedRunner, sandbox: str, snapshot: str, **fields: Any) -> None:
        line = {"event": event, "t": time.time(), "runner": runner.id, "sandbox": sandbox, "snapshot": snapshot, **fields}
        # Written in batches: a write per event costs the fleet more CPU than the event itself.
        self._pending_events.append(json.dumps(line) + "\n")
        if len(self._pending_events) >= 1000:
            self._flush_events()

    def _flush_events(self) -> None:
        self._events.writelines(self._pending_events)
        self._events.flush()
        self._pending_events.clear()

    async def start(self) -> None:
        manager = httpx.URL(self.config.manager_url)
        self._reports = ReportConnections(manager.host, manager.port or 80, size=64)
        for runner in self.runners:
            server = await asyncio.start_server(lambda r, w, runner=runner: self._serve_connection(runner, r, w), "127.0.0.1", 0)
            runner.port = server.sockets[0].getsockname()[1]
            self._servers.append(server)
        registry = await asyncio.start_server(self._count_registry_connection, "127.0.0.1", 0)
        self.registry_port = registry.sockets[0].getsockname()[1]
        self._servers.append(registry)

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        # Closing the sockets ends each handler's read, so no handler task is left for
        # asyncio.run() to cancel (Python 3.11 logs a traceback for each cancelled one).
        for writer in self._connections.values():
            writer.close()
        if self._connections:
            await asyncio.wait(set(self._connections), timeout=2.0)
        for runner in self.runners:
            for record in runner.records.values():
                if record.task is not None and not record.task.done():
                    record.task.cancel()
        if self._reports is not None:
            self._reports.close()
        self._flush_events()
        self._events.close()

    async def send_report(self, runner: SimulatedRunner, sandbox: str, record: BackupRecord) -> None:
        """Post the outcome like the agent's Reporter: three tries, then rely on the manager's poll."""
        assert self._reports is not None
        body: dict[str, Any] = {"sandboxId": sandbox, "snapshot": record.snapshot, "state": record.state, "recoverable": record.recoverable}
        if record.digest is not None:
            body.update(digest=record.digest, sizeBytes=1024, layerCount=1)
        if record.error is not None:
            body["error"] = record.error
        path = f"/api/v1/runners/{runner.id}/reports"
        delay = 0.5
        for attempt in range(1, 4):
            try:
                status = await self._reports.post(path, json.dumps(body).encode(), token=runner.token)
                if 200 <= status < 300:
                    return
                message = f"status {status}"
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:
                message = f"{type(exc).__name__}: {exc}"
            logger.warning("report of %s from %s failed (attempt %d of 3): %s", record.snapshot, runner.id, attempt, message)
            await asyncio.sleep(delay)
            delay *= 2
        self.reports_failed += 1

    async def _count_registry_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.registry_connections += 1
        logger.error("the manager connected to the registry port (connection %d)", self.registry_connections)
        writer.close()

    async def _serve_connection(self, runner: SimulatedRunner, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        try:
            while True:
                request = await asyncio.wait_for(_read_request(reader), timeout=_IDLE_TIMEOUT_S)
                if request is None:
                    break
                method, path, headers, body = request
                status, payload = self._route(runner, method, path, headers, body)
                data = json.dumps(payload).encode()
                head = (
                    f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
                    f"content-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n"
                )
                writer.write(head.encode() + data)
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        except ValueError as exc:
            logger.warning("invalid request to %s on port %d, connection closed: %s", runner.id, runner.port, exc)
        finally:
            writer.close()
            del self._connections[task]

    def _route(self, runner: SimulatedRunner, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        path = path.split("?", 1)[0]
        if method == "GET" and path == "/agent/health":
            return 200, {"status": "ok", "engineReachable": True, "engineVersion": "simulated", "runnerId": runner.id}
        if headers.get("authorization") != f"Bearer {runner.token}":
            return 401, _error(401, path, method, "missing or wrong bearer token", "UNAUTHORIZED")

        if (match := _SANDBOX_PATH.match(path)) and method == "GET":
            info = runner.sandbox_info(match.group(1))
            if info is None:
                return 404, _error(404, path, method, f"sandbox {match.group(1)!r} is not on this runner", "NOT_FOUND")
            return 200, info
        if (match := _BACKUP_PATH.match(path)) and method == "POST":
            sandbox = match.group(1)
            if sandbox not in runner.sandboxes:
                return 404, _error(404, path, method, f"sandbox {sandbox!r} is not on this runner", "NOT_FOUND")
            try:
                snapshot = json.loads(body)["snapshot"]
            except (ValueError, KeyError, TypeError):
                return 400, _error(400, path, method, "invalid body: expected JSON with a snapshot field", "BAD_REQUEST")
            runner.start_backup(sandbox, snapshot)
            return 201, "Backup started"
        return 404, _error(404, path, method, f"{method} {path} is not simulated", "NOT_FOUND")


def _error(status: int, path: str, method: str, message: str, code: str) -> dict[str, Any]:
    timestamp = datetime.datetime.now(datetime.timezone.utc).isoformat()
    return {"statusCode": status, "message": message, "path": path, "method": method, "code": code, "timestamp": timestamp}


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes] | None:
    """Read one HTTP/1.1 request, or return None when the client closed the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    if length > _MAX_BODY_BYTES:
        raise ValueError(f"request body of {length} bytes is too large")
    body = await reader.readexactly(length) if length else b""
    return method, path, headers, body


async def run_fleet(config: FleetConfig) -> None:
    fleet = Fleet(config)
    await fleet.start()
    ready = {
        "runners": [{"id": r.id, "url": f"http://127.0.0.1:{r.port}", "token": r.token} for r in fleet.runners],
        "registryPort": fleet.registry_port,
    }
    print(json.dumps(ready), flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=config.max_seconds)
    if not stop.is_set():
        logger.warning("fleet stops after --max-seconds %.0f s", config.max_seconds)

    print(json.dumps({"registryConnections": fleet.registry_connections, "reportsFailed": fleet.reports_failed}), flush=True)
    await fleet.close()


def parse_args(argv: list[str] | None = None) -> FleetConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runners", type=int, default=100, help="number of simulated runners (one port each)")
    parser.add_argument("--sandboxes-per-runner", type=int, default=20, help="sandboxes on each runner")
    parser.add_argument("--container-state", choices=("started", "stopped"), default="stopped", help="container state every sandbox reports")
    parser.add_argument("--duration", type=float, default=2.0, help="backup duration in seconds (the minimum when --duration-max is set)")
    parser.add_argument("--duration-max", type=float, default=None, help="maximum backup duration in seconds (durations are then uniform in [--duration, --duration-max])")
    parser.add_argument("--failure-rate", type=float, default=0.0, help="fraction of backups that end FAILED (recoverable), 0 to 1")
    parser.add_argument("--fail-once", action="store_true", help="let each sandbox fail at most once")
    parser.add_argument("--manager-url", required=True, help="base URL of the manager, for reports")
    parser.add_argument("--events", required=True, help="JSON-lines file that receives every backup start and end")
    parser.add_argument("--max-seconds", type=float, default=1800.0, help="the fleet exits after this many seconds at the latest")
    parser.add_argument("--seed", type=int, default=1, help="seed of the durations and failures")
    args = parser.parse_args(argv)
    if not 0.0 <= args.failure_rate <= 1.0:
        parser.error(f"--failure-rate {args.failure_rate} is invalid: expected a fraction from 0 to 1")
    duration_max = args.duration if args.duration_max is None else args.duration_max
    if duration_max < args.duration:
        parser.error(f"--duration-max {duration_max} is below --duration {args.duration}")
    return FleetConfig(
        runners=args.runners,
        sandboxes_per_runner=args.sandboxes_per_runner,
        container_state=args.container_state,
        duration_min_s=args.duration,
        duration_max_s=duration_max,
        failure_rate=args.failure_rate,
        fail_once=args.fail_once,
        manager_url=args.manager_url,
        events_path=args.events,
        max_seconds=args.max_seconds,
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s fleet %(levelname)s %(message)s")
    # httpx logs every request at INFO, which would be one line per report.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    asyncio.run(run_fleet(parse_args(argv)))


if __name__ == "__main__":
    main()
