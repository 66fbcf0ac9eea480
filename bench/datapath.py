"""Data-path benchmark: the runner agent's backup and restore against the raw podman commands.

Everything runs on this machine. scripts/lib/podman.sh (through tests/fixtures/podman.py)
sets up a private Podman service, next to a private `docker-registry` on 127.0.0.1 with
deletes enabled. The real runner agent app runs under uvicorn in a thread of this process,
as in the integration tests. A busybox container writes the data: half from /dev/urandom,
half zeros.

Backup, per measured run:
  agent  POST /sandboxes/{id}/backup, until the agent's backup report arrives at a local
         stand-in for the manager (--wait report, the default), or until GET /sandboxes/{id}
         shows COMPLETED (--wait poll, every --poll-interval-s). The agent commits with
         pause, pushes, and removes the committed image before it records COMPLETED.
  raw    `podman commit --pause --format docker`, then `podman push`, on the same storage.
         The image removal afterwards is timed apart and is not part of the raw time.
  Before each run the registry's storage is deleted and the registry restarted, so every
  push uploads every blob (the registry deduplicates blobs across repositories).

Restore, per measured run, from one backup that the agent pushed:
  agent  POST /sandboxes with the registry, until its 201 response (pull, create, start).
  raw    `podman pull`, then `podman run -d`.
  Before each run the local image is removed, so every pull downloads the layers.

An untimed agent backup of an empty container comes first, so the agent has created its
engine clients before the measured runs. The order alternates per round (agent, raw, then
raw, agent, ...). The table shows medians.

Usage: .venv/bin/python bench/datapath.py [--size-mib 1024] [--repeat 3] [--wait report|poll]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import logging
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx

REPOSITORY = Path(__file__).resolve().parents[1]
# The Podman and registry helpers live in tests/fixtures, which imports as `tests.fixtures`
# only with the repository root on the path.
sys.path.insert(0, str(REPOSITORY))

from sandbox_backup.runner.client import RunnerClient  # noqa: E402
from sandbox_backup.runner.engine import SANDBOX_ID_LABEL  # noqa: E402
from sandbox_backup.runner.models import (  # noqa: E402
    CreateSandboxRequest,
    RegistryCredentials,
    RunnerBackupState,
    RunnerSandboxState,
)
from sandbox_backup.runner.settings import RunnerSettings  # noqa: E402
from tests.fixtures.podman import (  # noqa: E402
    MANAGED_LABEL,
    PodmanEngine,
    ReportReceiver,
    RunnerAgent,
    start_podman_engine,
    stop_podman_engine,
)
from tests.fixtures.registry_servers import RegistryServer, free_port, open_registry  # noqa: E402

logger = logging.getLogger("datapath")

RunT = TypeVar("RunT")

SOURCE_SANDBOX_ID = "datapath-source"
WARM_UP_SANDBOX_ID = "datapath-warm-up"
REPOSITORY_PATH = "bench/datapath"
READY_MARKER = "datapath-ready"
METRIC_PREFIX = "sandbox_backup_runner_"
# The report receiver runs in this process, so checking it costs no request.
REPORT_CHECK_INTERVAL_S = 0.01
# The registry converts a manifest to schema 1 unless the request accepts its own type.
MANIFEST_ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    )
)


@dataclasses.dataclass
class BackupRun:
    """One measured backup. `commit_s` and `push_s` come from the agent's /metrics for the agent side."""

    side: str
    seconds: float
    commit_s: float
    push_s: float
    registry_bytes: int
    manifest_type: str
    # Raw side only: `podman rmi` after the measured commands, which the agent does inside its time.
    image_removal_s: float | None = None

    @property
    def other_s(self) -> float:
        """Seconds outside commit and push: for the agent, the request, image removal, state write and report."""
        return self.seconds - self.commit_s - self.push_s


@dataclasses.dataclass
class RestoreRun:
    """One measured restore. `pull_s` is known for the raw side only."""

    side: str
    seconds: float
    pull_s: float | None = None


@dataclasses.dataclass
class Bench:
    """The services of one benchmark run and the limits derived from the data size."""

    size_mib: int
    wait: str
    poll_interval_s: float
    engine: PodmanEngine
    registry: RegistryServer
    agent: RunnerAgent
    reports: ReportReceiver
    # Maximum time of one podman command or one agent operation.
    timeout_s: float

    def reference(self, tag: str) -> str:
        return f"{self.registry.host}/{REPOSITORY_PATH}:{tag}"

    def credentials(self) -> RegistryCredentials:
        return RegistryCredentials(url=self.registry.url)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time the runner agent's backup and restore against podman commit/push and pull/run."
    )
    parser.add_argument(
        "--size-mib", type=int, default=1024, help="data written into the container, in MiB: half random, half zeros"
    )
    parser.add_argument("--repeat", type=int, default=3, help="measured runs of each operation on each side")
    parser.add_argument(
        "--wait",
        choices=("report", "poll"),
        default="report",
        help=(
            "how the end of an agent backup is detected: the agent's report to a local receiver, "
            "or GET /sandboxes/{id} requests, which cost the engine CPU time during the push"
        ),
    )
    parser.add_argument(
        "--poll-interval-s",
        type=float,
        default=0.05,
        help="seconds between two GET /sandboxes/{id} requests with --wait poll",
    )
    args = parser.parse_args(argv)

    if args.size_mib < 2:
        parser.error(f"--size-mib must be at least 2 (one MiB random, one MiB zeros), got {args.size_mib}")
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    if args.poll_interval_s <= 0:
        parser.error(f"--poll-interval-s must be above 0, got {args.poll_interval_s}")
    return args


# Podman CLI and registry helpers.


def run_podman(bench: Bench, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the podman CLI on the engine's private storage. With `check`, a failure raises with its output."""
    engine = bench.engine
    command = ["podman", "--root", str(engine.dir / "storage"), "--runroot", str(engine.dir / "run"), *args]
    completed = subprocess.run(
        command, env=engine.env, capture_output=True, text=True, timeout=bench.timeout_s, check=False
    )
    if check and completed.returncode != 0:
        raise RuntimeError(
            f"podman {' '.join(args)} failed with exit code {completed.returncode}:\n{completed.stdout}{completed.stderr}"
        )
    return completed


def remove_image_if_present(bench: Bench, reference: str) -> None:
    # `podman image exists` exits with 1 when the image is missing.
    if run_podman(bench, "image", "exists", reference, check=False).returncode == 0:
        run_podman(bench, "rmi", "--force", reference)


def reset_registry(registry: RegistryServer) -> None:
    """Delete every blob and manifest: stop the registry, empty its storage, start it again."""
    registry.stop()
    shutil.rmtree(registry.root_dir)
    registry.root_dir.mkdir()
    registry.start()


def registry_blob_bytes(registry: RegistryServer) -> int:
    """Return the bytes of all blobs (layers, configs, manifests) in the registry's storage."""
    blobs = registry.root_dir / "docker" / "registry" / "v2" / "blobs"
    return sum(path.stat().st_size for path in blobs.rglob("data") if path.is_file())


def manifest_type(registry: RegistryServer, reference: str) -> str:
    tag = reference.rsplit(":", 1)[1]
    response = httpx.get(
        f"{registry.url}/v2/{REPOSITORY_PATH}/manifests/{tag}",
        headers={"Accept": MANIFEST_ACCEPT},
        timeout=10,
        trust_env=False,
    )
    response.raise_for_status()
    return response.headers.get("Content-Type", "unknown")


# Data set-up.


def data_script(size_mib: int) -> str:
    """Return the container's shell command: write the data once, print the file sizes, sleep.

    A restored container finds /data/ready and skips the writes, so its start costs the
    same on both sides, and its log line shows that the data came back.
    """
    random_mib = size_mib // 2
    zero_mib = size_mib - random_mib
    busybox = "/bin/busybox"
    return (
        "set -e; "
        "if [ ! -f /data/ready ]; then "
        f"{busybox} mkdir -p /data; "
        f"{busybox} dd if=/dev/urandom of=/data/random.bin bs=1048576 count={random_mib} iflag=fullblock 2>/dev/null; "
        f"{busybox} dd if=/dev/zero of=/data/zeros.bin bs=1048576 count={zero_mib} 2>/dev/null; "
        f"{busybox} touch /data/ready; "
        "fi; "
        f'echo "{READY_MARKER} $({busybox} stat -c %s /data/random.bin) $({busybox} stat -c %s /data/zeros.bin)"; '
        f"exec {busybox} sleep 86400"
    )


def expected_ready_line(size_mib: int) -> str:
    random_mib = size_mib // 2
    return f"{READY_MARKER} {random_mib * 1024 * 1024} {(size_mib - random_mib) * 1024 * 1024}"


def wait_for_data(bench: Bench, container_name: str, timeout_s: float) -> None:
    """Wait until the container logs its ready line with the expected file sizes."""
    expected = expected_ready_line(bench.size_mib)
    deadline = time.monotonic() + timeout_s
    while True:
        container = bench.engine.client.containers.get(container_name)
        log = container.logs().decode(errors="replace")
        if expected in log:
            return
        if READY_MARKER in log:
            raise RuntimeError(f"container {container_name} has files of the wrong size: {log.strip()!r}, expected {expected!r}")
        if container.status not in ("created", "running"):
            raise RuntimeError(f"container {container_name} stopped with status {container.status!r}. Its log: {log!r}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"container {container_name} did not log {expected!r} within {timeout_s:.0f} s. Its log: {log!r}")
        time.sleep(0.2)


def create_source_container(bench: Bench) -> None:
    """Run the managed busybox container that writes the data, and wait until the data is on disk."""
    labels = {MANAGED_LABEL: "true", SANDBOX_ID_LABEL: SOURCE_SANDBOX_ID}
    bench.engine.client.containers.run(
        bench.engine.mini_image,
        ["/bin/busybox", "sh", "-c", data_script(bench.size_mib)],
        name=SOURCE_SANDBOX_ID,
        labels=labels,
        detach=True,
        stop_signal="SIGKILL",
        network_mode="none",
    )
    wait_for_data(bench, SOURCE_SANDBOX_ID, bench.timeout_s)

    # Write the dirty pages back now, so their writeback does not slow the first measured run.
    os.sync()


# Backup runs.


def agent_metric_sums(agent: RunnerAgent) -> dict[str, float]:
    """Return the `_sum` samples of the agent's duration histograms, by metric name without the prefix."""
    response = httpx.get(f"{agent.url}/metrics", timeout=10, trust_env=False)
    response.raise_for_status()
    sums = {}
    for match in re.finditer(rf"^{METRIC_PREFIX}(\w+)_sum (\S+)$", response.text, re.MULTILINE):
        sums[match.group(1)] = float(match.group(2))
    return sums


async def wait_for_agent_backup(bench: Bench, reference: str, sandbox_id: str = SOURCE_SANDBOX_ID) -> float:
    """Request a backup of the sandbox and return the seconds until the agent shows it COMPLETED."""
    async with bench.agent.client(timeout_s=bench.timeout_s) as client:
        started = time.monotonic()
        await client.create_backup(sandbox_id, bench.credentials(), reference)
        if bench.wait == "report":
            await wait_for_report(bench, reference, started)
        else:
            await poll_backup_state(bench, client, sandbox_id, reference, started)
        elapsed = time.monotonic() - started

        # The report is sent after the agent wrote the outcome, so the state must already show it.
        info = await client.get_sandbox(sandbox_id)
        if info is None or info.backup_snapshot != reference or info.backup_state is not RunnerBackupState.COMPLETED:
            raise RuntimeError(f"agent backup to {reference} is not COMPLETED after it ended: {info}")
        return elapsed


async def wait_for_report(bench: Bench, reference: str, started: float) -> None:
    """Wait until the agent's report for `reference` arrives. Raise if it reports FAILED."""
    while True:
        reports = [request["body"] for request in bench.reports.accepted if request["body"]["snapshot"] == reference]
        if reports:
            report = reports[-1]
            if report["state"] != RunnerBackupState.COMPLETED.value:
                raise RuntimeError(f"agent backup to {reference} failed with state {report['state']}: {report.get('error')}")
            return
        if time.monotonic() - started > bench.timeout_s:
            raise RuntimeError(f"agent backup to {reference} sent no report within {bench.timeout_s:.0f} s")
        await asyncio.sleep(REPORT_CHECK_INTERVAL_S)


async def poll_backup_state(
    bench: Bench, client: RunnerClient, sandbox_id: str, reference: str, started: float
) -> None:
    """Poll GET /sandboxes/{id} until the backup to `reference` is COMPLETED. Raise if it FAILED."""
    while True:
        info = await client.get_sandbox(sandbox_id)
        if info is not None and info.backup_snapshot == reference:
            if info.backup_state is RunnerBackupState.COMPLETED:
                return
            if info.backup_state is RunnerBackupState.FAILED:
                raise RuntimeError(f"agent backup to {reference} failed: {info.backup_error}")
        if time.monotonic() - started > bench.timeout_s:
            raise RuntimeError(f"agent backup to {reference} did not complete within {bench.timeout_s:.0f} s: {info}")
        await asyncio.sleep(bench.poll_interval_s)


def warm_up_agent(bench: Bench) -> float:
    """Back up an empty managed container through the agent and return the seconds it took.

    The agent creates its two engine clients on first use, and each creation sends
    GET /version, which took about 0.4 s on Podman 4.3.1 on a 2-core machine. Without this
    step the first measured agent backup would include that start-up cost.
    """
    labels = {MANAGED_LABEL: "true", SANDBOX_ID_LABEL: WARM_UP_SANDBOX_ID}
    bench.engine.client.containers.run(
        bench.engine.mini_image,
        ["/bin/busybox", "sleep", "86400"],
        name=WARM_UP_SANDBOX_ID,
        labels=labels,
        detach=True,
        stop_signal="SIGKILL",
        network_mode="none",
    )
    try:
        return asyncio.run(wait_for_agent_backup(bench, bench.reference("warm-up"), WARM_UP_SANDBOX_ID))
    finally:
        run_podman(bench, "rm", "--force", "--time", "0", WARM_UP_SANDBOX_ID)


def run_agent_backup(bench: Bench, tag: str) -> BackupRun:
    reference = bench.reference(tag)
    reset_registry(bench.registry)
    before = agent_metric_sums(bench.agent)

    seconds = asyncio.run(wait_for_agent_backup(bench, reference))

    after = agent_metric_sums(bench.agent)
    return BackupRun(
        side="agent",
        seconds=seconds,
        commit_s=after["commit_duration_seconds"] - before["commit_duration_seconds"],
        push_s=after["push_duration_seconds"] - before["push_duration_seconds"],
        registry_bytes=registry_blob_bytes(bench.registry),
        manifest_type=manifest_type(bench.registry, reference),
    )


def run_raw_backup(bench: Bench, tag: str) -> BackupRun:
    reference = bench.reference(tag)
    reset_registry(bench.registry)

    # --pause because the agent pauses by default (pause_on_commit), and --format docker
    # because Podman's Docker-compatible /commit writes a Docker image.
    started = time.monotonic()
    run_podman(bench, "commit", "--pause", "--format", "docker", "--quiet", SOURCE_SANDBOX_ID, reference)
    committed = time.monotonic()
    run_podman(bench, "push", "--quiet", reference)
    pushed = time.monotonic()

    run_podman(bench, "rmi", reference)
    removed = time.monotonic()
    return BackupRun(
        side="raw",
        seconds=pushed - started,
        commit_s=committed - started,
        push_s=pushed - committed,
        registry_bytes=registry_blob_bytes(bench.registry),
        manifest_type=manifest_type(bench.registry, reference),
        image_removal_s=removed - pushed,
    )


# Restore runs.


async def create_agent_sandbox(bench: Bench, sandbox_id: str, reference: str) -> float:
    """Create the sandbox through the agent and return the seconds until its 201 response."""
    request = CreateSandboxRequest(
        id=sandbox_id, os_user="root", user_id="bench", snapshot=reference, registry=bench.credentials()
    )
    async with bench.agent.client(timeout_s=bench.timeout_s) as client:
        started = time.monotonic()
        await client.create_sandbox(request)
        seconds = time.monotonic() - started

        info = await client.get_sandbox(sandbox_id)
        if info is None or info.state is not RunnerSandboxState.STARTED:
            raise RuntimeError(f"sandbox {sandbox_id} restored by the agent is not started: {info}")
        return seconds


def run_agent_restore(bench: Bench, round_number: int, reference: str) -> RestoreRun:
    sandbox_id = f"restore-agent-{round_number}"
    remove_image_if_present(bench, reference)

    seconds = asyncio.run(create_agent_sandbox(bench, sandbox_id, reference))

    wait_for_data(bench, sandbox_id, timeout_s=60)
    run_podman(bench, "rm", "--force", "--time", "0", sandbox_id)
    return RestoreRun(side="agent", seconds=seconds)


def run_raw_restore(bench: Bench, round_number: int, reference: str) -> RestoreRun:
    name = f"restore-raw-{round_number}"
    remove_image_if_present(bench, reference)

    started = time.monotonic()
    run_podman(bench, "pull", "--quiet", reference)
    pulled = time.monotonic()
    run_podman(bench, "run", "--detach", "--name", name, reference)
    finished = time.monotonic()

    wait_for_data(bench, name, timeout_s=60)
    run_podman(bench, "rm", "--force", "--time", "0", name)
    return RestoreRun(side="raw", seconds=finished - started, pull_s=pulled - started)


# Rounds.


def alternate(round_number: int, agent: Callable[[], RunT], raw: Callable[[], RunT]) -> list[RunT]:
    """Run agent then raw in odd rounds, raw then agent in even rounds. Return the results in run order."""
    steps = (agent, raw) if round_number % 2 == 1 else (raw, agent)
    return [step() for step in steps]


def measure_backups(bench: Bench, repeat: int) -> list[BackupRun]:
    runs: list[BackupRun] = []
    for round_number in range(1, repeat + 1):
        results = alternate(
            round_number,
            functools.partial(run_agent_backup, bench, f"agent-{round_number}"),
            functools.partial(run_raw_backup, bench, f"raw-{round_number}"),
        )
        for run in results:
            logger.info("backup round %d %s: %.2f s", round_number, run.side, run.seconds)
            runs.append(run)
    return runs


def measure_restores(bench: Bench, repeat: int) -> list[RestoreRun]:
    # One backup that the agent pushed is the source of every restore on both sides.
    reference = bench.reference("restore-source")
    reset_registry(bench.registry)
    asyncio.run(wait_for_agent_backup(bench, reference))

    runs: list[RestoreRun] = []
    for round_number in range(1, repeat + 1):
        results = alternate(
            round_number,
            functools.partial(run_agent_restore, bench, round_number, reference),
            functools.partial(run_raw_restore, bench, round_number, reference),
        )
        for run in results:
            logger.info("restore round %d %s: %.2f s", round_number, run.side, run.seconds)
            runs.append(run)
    return runs


# Output.


def median_of(runs: list[BackupRun] | list[RestoreRun], side: str, field: str = "seconds") -> float:
    values = [getattr(run, field) for run in runs if run.side == side]
    return statistics.median(values)


def format_row(cells: list[str], widths: list[int]) -> str:
    """Join the cells with " | ": the first left-aligned, the numbers right-aligned."""
    padded = [cells[0].ljust(widths[0])]
    for cell, width in zip(cells[1:], widths[1:]):
        padded.append(cell.rjust(width))
    return " | ".join(padded)


def print_table(
    backups: list[BackupRun], restores: list[RestoreRun], facts: dict[str, str], warm_up_s: float
) -> None:
    header = ["operation", "agent median s", "raw median s", "ratio", "runs"]
    rows = [header]
    for operation, runs in (("backup (commit + push)", backups), ("restore (pull + run)", restores)):
        agent = median_of(runs, "agent")
        raw = median_of(runs, "raw")
        count = sum(1 for run in runs if run.side == "agent")
        rows.append([operation, f"{agent:.2f}", f"{raw:.2f}", f"{agent / raw:.3f}", str(count)])
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]

    print(" | ".join(f"{name} {value}" for name, value in facts.items()))
    print(format_row(rows[0], widths))
    print("-+-".join("-" * width for width in widths))
    for row in rows[1:]:
        print(format_row(row, widths))
    print()
    print_details(backups, restores, warm_up_s)


def print_details(backups: list[BackupRun], restores: list[RestoreRun], warm_up_s: float) -> None:
    print(f"agent warm-up backup of an empty container before the measured runs: {warm_up_s:.2f} s")
    print(
        f"agent backup medians: commit {median_of(backups, 'agent', 'commit_s'):.2f} s, "
        f"push {median_of(backups, 'agent', 'push_s'):.2f} s (from the agent's /metrics), "
        f"other {median_of(backups, 'agent', 'other_s'):.2f} s (request, image removal, state write, report or poll)"
    )
    raw_removals = [run.image_removal_s for run in backups if run.image_removal_s is not None]
    print(
        f"raw backup medians: commit {median_of(backups, 'raw', 'commit_s'):.2f} s, "
        f"push {median_of(backups, 'raw', 'push_s'):.2f} s; "
        f"podman rmi afterwards {statistics.median(raw_removals):.2f} s (not in the raw time)"
    )
    print(f"raw restore median: pull {median_of(restores, 'raw', 'pull_s'):.2f} s, run -d the rest")

    print("backup runs in order (side, seconds, commit s, push s, other s, registry blob bytes, manifest type):")
    for run in backups:
        print(
            f"  {run.side:<5} {run.seconds:8.2f} {run.commit_s:8.2f} {run.push_s:8.2f} {run.other_s:8.2f}"
            f"  {run.registry_bytes:>12}  {run.manifest_type}"
        )
    print("restore runs in order (side, seconds):")
    for run in restores:
        print(f"  {run.side:<5} {run.seconds:8.2f}")


def machine_facts(bench: Bench) -> dict[str, str]:
    podman_version = run_podman(bench, "version", "--format", "{{.Client.Version}}").stdout.strip()
    registry_version = subprocess.run(
        ["docker-registry", "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout.split()[-1]
    random_mib = bench.size_mib // 2
    return {
        "cores": str(os.cpu_count()),
        "podman": podman_version,
        "docker-registry": registry_version,
        "size": f"{bench.size_mib} MiB ({random_mib} MiB random, {bench.size_mib - random_mib} MiB zeros)",
        "agent backup end": "report" if bench.wait == "report" else f"GET every {bench.poll_interval_s} s",
    }


# Set-up and tear-down.


def start_agent(engine: PodmanEngine, reports: ReportReceiver, directory: Path, timeout_s: float) -> RunnerAgent:
    directory.mkdir()
    settings = RunnerSettings(
        host="127.0.0.1",
        port=free_port(),
        token=secrets.token_urlsafe(24),
        runner_id="datapath-bench",
        docker_host=engine.docker_host,
        state_path=directory / "runner-state.sqlite3",
        backup_timeout_s=timeout_s,
        manager_url=reports.url,
        # The receiver only serves the report path, so container discovery stays off.
        report_containers=False,
        # The engine's default network would add a bridge and firewall rules to the host.
        network_mode="none",
    )
    agent = RunnerAgent(settings)
    agent.start()
    return agent


def run_benchmark(args: argparse.Namespace, workdir: Path) -> None:
    # A loose limit that only catches a hung step: it allows 2 MiB/s per step plus start-up.
    timeout_s = 120.0 + args.size_mib * 0.5
    registry = open_registry(workdir / "registry")
    reports: ReportReceiver | None = None
    engine: PodmanEngine | None = None
    agent: RunnerAgent | None = None
    try:
        registry.start()
        reports = ReportReceiver()
        reports.start()
        engine = start_podman_engine(workdir / "podman", [registry.host])
        agent = start_agent(engine, reports, workdir / "agent", timeout_s)
        bench = Bench(
            size_mib=args.size_mib,
            wait=args.wait,
            poll_interval_s=args.poll_interval_s,
            engine=engine,
            registry=registry,
            agent=agent,
            reports=reports,
            timeout_s=timeout_s,
        )

        logger.info("writing %d MiB into container %s", args.size_mib, SOURCE_SANDBOX_ID)
        create_source_container(bench)
        facts = machine_facts(bench)
        warm_up_s = warm_up_agent(bench)
        backups = measure_backups(bench, args.repeat)
        restores = measure_restores(bench, args.repeat)
        print_table(backups, restores, facts, warm_up_s)
    finally:
        if agent is not None:
            agent.stop()
        if engine is not None:
            stop_podman_engine(engine)
        if reports is not None:
            reports.stop()
        registry.stop()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    logger.setLevel(logging.INFO)

    # A short path under /tmp keeps the Podman socket below the 108-byte limit of unix sockets.
    workdir = Path(tempfile.mkdtemp(prefix="datapath-", dir="/tmp"))
    logger.info("work directory %s (deleted at exit)", workdir)
    try:
        run_benchmark(args, workdir)
    finally:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
