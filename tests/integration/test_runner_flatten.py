"""Layer depth control of the runner agent on real Podman, pushed to a real registry.

A committed image with more layers than `flatten_threshold_layers` must be pushed as one
layer that keeps the image configuration and the files. The checks read the pushed
manifest and config blob from the registry itself, so they see what a restore gets.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import secrets
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import docker.errors
import httpx
import pydantic
import pytest

from sandbox_backup.domain.reference import parse_reference
from sandbox_backup.runner import flatten
from sandbox_backup.runner.engine import SANDBOX_ID_LABEL
from sandbox_backup.runner.flatten import CONTAINER_NAME_PREFIX, TEMP_FILE_PREFIX, FlattenError, import_changes
from sandbox_backup.runner.push_stream import StreamAbort
from sandbox_backup.runner.settings import RunnerSettings
from sandbox_backup.runner.state import BackupStateStore
from tests.fixtures.podman import (
    MANAGED_LABEL,
    PodmanEngine,
    RunnerAgent,
    backup_snapshot,
    read_container_file,
    wait_for_backup,
    write_container_file,
)
from tests.fixtures.registry_servers import RegistryServer, free_port

MANIFEST_TYPES = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json"
SLEEP_SCRIPT = "trap 'exit 0' TERM; sleep 3600 & wait"

# Configuration of the image that the flattened sandbox runs from: every field is set.
CONFIG_DOCKERFILE = """\
FROM {base}
ENTRYPOINT ["/bin/busybox", "sh", "-c"]
CMD ["trap 'exit 0' TERM; sleep 3600 & wait"]
ENV FLATTEN_MODE="one layer" FLATTEN_PATH=/srv/data
WORKDIR /tmp
USER 1000:1000
LABEL org.example.purpose="flatten test" org.example.owner=runner
EXPOSE 8080/tcp 5353/udp
STOPSIGNAL SIGUSR1
HEALTHCHECK --interval=30s --timeout=5s --start-period=2s --retries=3 CMD ["/bin/busybox", "true"]
SHELL ["/bin/busybox", "sh", "-c"]
VOLUME ["/data"]
"""

# Layers added on top of the mini image. The third one deletes a file of the second, so the
# flattened layer must not contain it.
LAYER_COMMANDS = (
    "mkdir -p /layers && echo one > /layers/1",
    "echo two > /layers/2 && echo removed-later > /layers/gone",
    "rm /layers/gone && echo three > /layers/3",
    "echo four > /layers/4",
)
LAYER_FILES = {"/layers/1": b"one\n", "/layers/2": b"two\n", "/layers/3": b"three\n", "/layers/4": b"four\n"}


@dataclasses.dataclass
class PushedImage:
    """Manifest and config blob of an image as the registry serves them."""

    manifest: dict[str, Any]
    config: dict[str, Any]

    @property
    def layer_count(self) -> int:
        return len(self.manifest["layers"])

    @property
    def container_config(self) -> dict[str, Any]:
        return self.config.get("config") or {}


@dataclasses.dataclass
class FlattenedBackup:
    """The same sandbox backed up twice: below the threshold (plain) and above it (flat)."""

    sandbox_id: str
    source_image: str
    marker: bytes
    plain_snapshot: str
    flat_snapshot: str
    plain_info: dict[str, Any]
    flat_info: dict[str, Any]
    plain: PushedImage
    flat: PushedImage
    flatten_records: list[logging.LogRecord]


# Helpers.


def registry_body(registry: RegistryServer) -> dict[str, Any]:
    return {"url": registry.url, "project": "runner-test", "username": registry.username, "password": registry.password}


def post_backup(agent: RunnerAgent, sandbox_id: str, registry: RegistryServer, snapshot: str) -> httpx.Response:
    return httpx.post(
        f"{agent.url}/sandboxes/{sandbox_id}/backup",
        json={"registry": registry_body(registry), "snapshot": snapshot},
        headers=agent.headers,
        timeout=30,
    )


def backup_through_agent(
    agent: RunnerAgent, sandbox_id: str, registry: RegistryServer, *, timeout_s: float = 120.0
) -> tuple[str, dict[str, Any]]:
    """Back the sandbox up to a fresh snapshot and return the snapshot and the final GET body."""
    snapshot = backup_snapshot(registry.url, sandbox_id)
    response = post_backup(agent, sandbox_id, registry, snapshot)
    assert response.status_code == 201, response.text
    return snapshot, wait_for_backup(agent, sandbox_id, timeout_s=timeout_s)


def fetch_pushed_image(registry: RegistryServer, snapshot: str) -> PushedImage:
    parsed = parse_reference(snapshot)
    auth = (registry.username or "", registry.password or "")
    with httpx.Client(base_url=registry.url, auth=auth, timeout=30) as http:
        manifest_response = http.get(
            f"/v2/{parsed.repository}/manifests/{parsed.tag}", headers={"Accept": MANIFEST_TYPES}
        )
        manifest_response.raise_for_status()
        manifest = manifest_response.json()
        config_response = http.get(f"/v2/{parsed.repository}/blobs/{manifest['config']['digest']}")
        config_response.raise_for_status()
    return PushedImage(manifest=manifest, config=config_response.json())


def image_ids(engine: PodmanEngine) -> set[str]:
    return {image.id for image in engine.client.images.list(all=True)}


def flatten_containers(engine: PodmanEngine) -> list[str]:
    containers = engine.client.containers.list(all=True, filters={"name": CONTAINER_NAME_PREFIX})
    return [container.name for container in containers]


def temp_files(agent: RunnerAgent) -> list[Path]:
    return sorted(agent.settings.state_path.parent.glob(f"{TEMP_FILE_PREFIX}*"))


def commit_layers(engine: PodmanEngine, image: str, commands: Sequence[str]) -> list[str]:
    """Run each shell command in a container of the previous image and commit it; return the image ids."""
    created = []
    for command in commands:
        container = engine.client.containers.create(
            image, ["/bin/busybox", "sh", "-c", command], network_mode="none", user="0"
        )
        try:
            container.start()
            assert container.wait(timeout=60)["StatusCode"] == 0, command
            image = str(engine.client.api.commit(container.id)["Id"])
        finally:
            container.remove(force=True)
        created.append(image)
    return created


def build_config_image(engine: PodmanEngine, base: str) -> str:
    tag = f"localhost/flatten-config:{uuid.uuid4().hex[:8]}"
    dockerfile = CONFIG_DOCKERFILE.format(base=base).encode()
    engine.client.images.build(fileobj=io.BytesIO(dockerfile), tag=tag, rm=True, network_mode="none")
    return tag


def run_sandbox(engine: PodmanEngine, image: str, sandbox_id: str) -> Any:
    """Start a managed container of `image` with the image's own entrypoint and command."""
    return engine.client.containers.run(
        image,
        name=sandbox_id,
        labels={MANAGED_LABEL: "true", SANDBOX_ID_LABEL: sandbox_id},
        detach=True,
        network_mode="none",
    )


def pull_snapshot(engine: PodmanEngine, registry: RegistryServer, snapshot: str) -> None:
    parsed = parse_reference(snapshot)
    auth = {"username": registry.username, "password": registry.password}
    engine.client.images.pull(f"{parsed.host}/{parsed.repository}", tag=parsed.tag, auth_config=auth)


def read_snapshot_files(engine: PodmanEngine, snapshot: str, paths: Sequence[str]) -> dict[str, bytes | None]:
    """Return the content of each path in a container of `snapshot`, or None where it is missing."""
    container = engine.client.containers.create(snapshot, ["/bin/busybox", "true"], network_mode="none")
    try:
        contents: dict[str, bytes | None] = {}
        for path in paths:
            try:
                contents[path] = read_container_file(container, path)
            except docker.errors.NotFound:
                contents[path] = None
        return contents
    finally:
        container.remove(force=True)


def remove_images(engine: PodmanEngine, names: Sequence[str]) -> None:
    for name in names:
        try:
            engine.client.images.remove(name, force=True)
        except docker.errors.NotFound:
            pass


def start_agent(engine: PodmanEngine, state_dir: Path, **overrides: Any) -> RunnerAgent:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": free_port(),
        "token": secrets.token_urlsafe(24),
        "runner_id": f"runner-{uuid.uuid4().hex[:8]}",
        "docker_host": engine.docker_host,
        "state_path": state_dir / f"runner-state-{uuid.uuid4().hex[:8]}.sqlite3",
        "backup_timeout_s": 300.0,
        "network_mode": "none",
        **overrides,
    }
    agent = RunnerAgent(RunnerSettings(**values))
    agent.start()
    return agent


class RecordCollector(logging.Handler):
    """Log handler that keeps the `image_flattened` records of the agent thread."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "action", None) == "image_flattened":
            self.records.append(record)


@pytest.fixture
def flatten_records() -> Iterator[list[logging.LogRecord]]:
    collector = RecordCollector()
    backup_logger = logging.getLogger("sandbox_backup.runner.backup")
    previous_level = backup_logger.level
    backup_logger.setLevel(logging.INFO)
    backup_logger.addHandler(collector)
    yield collector.records
    backup_logger.removeHandler(collector)
    backup_logger.setLevel(previous_level)


@pytest.fixture(scope="module")
def deep_image(podman_engine: PodmanEngine) -> Iterator[str]:
    """The mini image plus four layers: five layers in all, with the config of CONFIG_DOCKERFILE."""
    layer_ids = commit_layers(podman_engine, podman_engine.mini_image, LAYER_COMMANDS)
    tag = build_config_image(podman_engine, layer_ids[-1])
    yield tag
    # Removing the tag also prunes the untagged layer images, and Podman 4.3 responds to the
    # removal of a missing bare id with status 500, so only the remaining ones are removed.
    remove_images(podman_engine, [tag])
    remaining = image_ids(podman_engine)
    remove_images(podman_engine, [image for image in reversed(layer_ids) if f"sha256:{image}" in remaining])


@pytest.fixture
def sandbox_of(podman_engine: PodmanEngine) -> Iterator[Callable[[str], Any]]:
    """Return a factory of running managed containers of a given image."""
    names: list[str] = []

    def create(image: str) -> Any:
        sandbox_id = f"sb-{uuid.uuid4().hex[:12]}"
        names.append(sandbox_id)
        return run_sandbox(podman_engine, image, sandbox_id)

    yield create
    for name in names:
        try:
            podman_engine.client.api.remove_container(name, force=True)
        except docker.errors.NotFound:
            pass


@pytest.fixture(scope="module")
def flattened_backup(
    podman_engine: PodmanEngine,
    registry_server: RegistryServer,
    deep_image: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[FlattenedBackup]:
    """Back one sandbox of the deep image up with the default threshold, then with threshold 3."""
    state_dir = tmp_path_factory.mktemp("runner-flatten")
    sandbox_id = f"sb-{uuid.uuid4().hex[:12]}"
    container = run_sandbox(podman_engine, deep_image, sandbox_id)
    marker = secrets.token_hex(16).encode()
    write_container_file(container, "/marker", marker)

    collector = RecordCollector()
    backup_logger = logging.getLogger("sandbox_backup.runner.backup")
    backup_logger.setLevel(logging.INFO)
    backup_logger.addHandler(collector)
    agent = start_agent(podman_engine, state_dir)
    try:
        plain_snapshot, plain_info = backup_through_agent(agent, sandbox_id, registry_server)
        agent.restart(flatten_threshold_layers=3)
        flat_snapshot, flat_info = backup_through_agent(agent, sandbox_id, registry_server)
    finally:
        agent.stop()
        backup_logger.removeHandler(collector)
        container.remove(force=True)

    yield FlattenedBackup(
        sandbox_id=sandbox_id,
        source_image=deep_image,
        marker=marker,
        plain_snapshot=plain_snapshot,
        flat_snapshot=flat_snapshot,
        plain_info=plain_info,
        flat_info=flat_info,
        plain=fetch_pushed_image(registry_server, plain_snapshot),
        flat=fetch_pushed_image(registry_server, flat_snapshot),
        flatten_records=collector.records,
    )
    remove_images(podman_engine, [plain_snapshot, flat_snapshot])


# Flattening above the threshold.


def test_deep_image_pushed_as_one_layer(flattened_backup: FlattenedBackup) -> None:
    assert flattened_backup.plain_info["backupState"] == "COMPLETED", flattened_backup.plain_info
    assert flattened_backup.flat_info["backupState"] == "COMPLETED", flattened_backup.flat_info

    # Five layers of the image plus the commit's own: below the default threshold of 100.
    assert flattened_backup.plain.layer_count == 6
    assert flattened_backup.plain_info["backupLayerCount"] == 6
    assert flattened_backup.flat.layer_count == 1
    assert flattened_backup.flat_info["backupLayerCount"] == 1
    assert len(flattened_backup.flat.config["rootfs"]["diff_ids"]) == 1


def test_flatten_logs_layer_counts(flattened_backup: FlattenedBackup) -> None:
    assert len(flattened_backup.flatten_records) == 1
    record = flattened_backup.flatten_records[0]
    assert record.sandbox_id == flattened_backup.sandbox_id
    assert record.layers_before == 6
    assert record.layers_after == 1
    assert record.seconds >= 0
    assert record.method == "squash"


def test_flattened_image_keeps_files(
    flattened_backup: FlattenedBackup, podman_engine: PodmanEngine, registry_server: RegistryServer
) -> None:
    snapshot = flattened_backup.flat_snapshot
    pull_snapshot(podman_engine, registry_server, snapshot)

    paths = [*LAYER_FILES, "/marker", "/layers/gone", "/bin/busybox"]
    contents = read_snapshot_files(podman_engine, snapshot, paths)

    for path, expected in LAYER_FILES.items():
        assert contents[path] == expected, path
    assert contents["/marker"] == flattened_backup.marker
    assert contents["/layers/gone"] is None
    assert contents["/bin/busybox"] is not None
    assert len(contents["/bin/busybox"] or b"") > 100_000


# One test per configuration field: the flattened image has the value that the Dockerfile
# set, and the same value as the unflattened backup of the same container.
FIELD_CASES = [
    ("Entrypoint", ["/bin/busybox", "sh", "-c"]),
    ("Cmd", [SLEEP_SCRIPT]),
    ("WorkingDir", "/tmp"),
    ("User", "1000:1000"),
    ("ExposedPorts", {"8080/tcp": {}, "5353/udp": {}}),
    ("StopSignal", "SIGUSR1"),
    ("Volumes", {"/data": {}}),
    ("Shell", ["/bin/busybox", "sh", "-c"]),
    (
        "Healthcheck",
        {
            "Test": ["CMD", "/bin/busybox", "true"],
            "Interval": 30_000_000_000,
            "Timeout": 5_000_000_000,
            "StartPeriod": 2_000_000_000,
            "Retries": 3,
        },
    ),
]


@pytest.mark.parametrize(("field", "expected"), FIELD_CASES, ids=[case[0] for case in FIELD_CASES])
def test_flattened_image_keeps_config_field(flattened_backup: FlattenedBackup, field: str, expected: Any) -> None:
    plain = flattened_backup.plain.container_config
    flat = flattened_backup.flat.container_config

    assert plain.get(field) == expected
    assert flat.get(field) == expected


def test_flattened_image_keeps_env(flattened_backup: FlattenedBackup) -> None:
    plain_env = flattened_backup.plain.container_config["Env"]
    flat_env = flattened_backup.flat.container_config["Env"]

    assert "FLATTEN_MODE=one layer" in flat_env
    assert "FLATTEN_PATH=/srv/data" in flat_env
    assert sorted(flat_env) == sorted(plain_env)
    assert len(flat_env) == len(set(flat_env))


def test_flattened_image_keeps_labels(flattened_backup: FlattenedBackup) -> None:
    plain_labels = flattened_backup.plain.container_config["Labels"]
    flat_labels = flattened_backup.flat.container_config["Labels"]

    assert flat_labels["org.example.purpose"] == "flatten test"
    assert flat_labels["org.example.owner"] == "runner"
    assert flat_labels[SANDBOX_ID_LABEL] == flattened_backup.sandbox_id
    assert flat_labels == plain_labels


def test_flattened_image_has_same_config_as_plain(flattened_backup: FlattenedBackup) -> None:
    plain = dict(flattened_backup.plain.container_config)
    flat = dict(flattened_backup.flat.container_config)

    # "Image" names the image that the committed container was created from: the sandbox's
    # image for the plain backup, the committed deep image for the flattened one.
    assert plain.pop("Image") == flattened_backup.source_image
    assert flat.pop("Image") == flattened_backup.flat_snapshot
    plain["Env"] = sorted(plain.get("Env") or [])
    flat["Env"] = sorted(flat.get("Env") or [])
    assert flat == plain


# Below the threshold.


def test_image_below_threshold_is_not_flattened(
    runner_agent_factory: Any,
    report_receiver: Any,
    sandbox_container: Any,
    podman_engine: PodmanEngine,
    registry_server: RegistryServer,
    flatten_records: list[logging.LogRecord],
) -> None:
    agent = runner_agent_factory(manager_url=report_receiver.url, flatten_threshold_layers=3)
    container = sandbox_container()
    images_before = image_ids(podman_engine)

    snapshot, info = backup_through_agent(agent, container.name, registry_server)

    # The mini image has one layer and the commit adds one: 2 is not above 3.
    assert info["backupState"] == "COMPLETED", info
    assert info["backupLayerCount"] == 2
    assert fetch_pushed_image(registry_server, snapshot).layer_count == 2
    assert flatten_records == []
    assert image_ids(podman_engine) == images_before

    reports = report_receiver.wait_for_accepted(1)
    assert reports[0]["body"]["layerCount"] == 2
    assert reports[0]["body"]["state"] == "COMPLETED"


def test_image_at_threshold_is_not_flattened(
    runner_agent_factory: Any,
    sandbox_container: Any,
    registry_server: RegistryServer,
    flatten_records: list[logging.LogRecord],
) -> None:
    agent = runner_agent_factory(flatten_threshold_layers=2)
    container = sandbox_container()

    snapshot, info = backup_through_agent(agent, container.name, registry_server)

    assert info["backupState"] == "COMPLETED", info
    assert info["backupLayerCount"] == 2
    assert fetch_pushed_image(registry_server, snapshot).layer_count == 2
    assert flatten_records == []


def test_layer_count_survives_restart(
    runner_agent_factory: Any, sandbox_container: Any, registry_server: RegistryServer
) -> None:
    agent = runner_agent_factory()
    container = sandbox_container()
    _, info = backup_through_agent(agent, container.name, registry_server)
    assert info["backupLayerCount"] == 2

    agent.restart()

    after = httpx.get(f"{agent.url}/sandboxes/{container.name}", headers=agent.headers, timeout=10).json()
    assert after["backupLayerCount"] == 2
    assert after == info


def test_old_state_file_gains_layer_count(tmp_path: Path) -> None:
    path = tmp_path / "old-state.sqlite3"
    with sqlite3.connect(path) as connection:
        connection.execute(
            "CREATE TABLE sandbox_backup (sandbox_id TEXT PRIMARY KEY, state TEXT NOT NULL, snapshot TEXT NOT NULL,"
            " attempt_id TEXT NOT NULL, error TEXT, recoverable INTEGER NOT NULL DEFAULT 0, digest TEXT,"
            " size_bytes INTEGER, updated_at TEXT NOT NULL)"
        )
        connection.execute(
            "INSERT INTO sandbox_backup VALUES ('sb-old', 'COMPLETED', 'host/r:t', 'a0', NULL, 0, NULL, 7, 'then')"
        )
    connection.close()

    store = BackupStateStore(path)
    try:
        old = store.get("sb-old")
        store.begin_attempt("sb-new", "host/r:t2", "a1")
        assert store.complete_attempt("sb-new", "a1", digest=None, size_bytes=1, layer_count=4) is True
        new = store.get("sb-new")
    finally:
        store.close()

    assert old is not None
    assert old.size_bytes == 7
    assert old.layer_count is None
    assert new is not None
    assert new.layer_count == 4


@pytest.mark.parametrize("threshold", [1, 126])
def test_threshold_outside_range_is_rejected(threshold: int) -> None:
    with pytest.raises(pydantic.ValidationError, match="flatten_threshold_layers"):
        RunnerSettings(token="secret-token", flatten_threshold_layers=threshold)


# Failures and the export-and-import method.


def test_failure_after_squash_cleans_up(
    runner_agent_factory: Any,
    sandbox_of: Callable[[str], Any],
    podman_engine: PodmanEngine,
    registry_server: RegistryServer,
    deep_image: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    agent = runner_agent_factory(flatten_threshold_layers=3)
    container = sandbox_of(deep_image)
    images_before = image_ids(podman_engine)
    squashed: list[str] = []
    real_squash = flatten.ImageFlattener._squash_commit

    def squash_then_fail_inspect(self: Any, container_id: str) -> str:
        squashed.append(real_squash(self, container_id))
        monkeypatch.setattr(flatten, "count_layers", fail_inspect)
        return squashed[-1]

    def fail_inspect(attrs: dict[str, Any]) -> int:
        raise docker.errors.APIError("injected failure: inspect of the squashed image failed")

    monkeypatch.setattr(flatten.ImageFlattener, "_squash_commit", squash_then_fail_inspect)
    snapshot, info = backup_through_agent(agent, container.name, registry_server)

    assert info["backupState"] == "FAILED", info
    assert "flattening of image" in info["backupError"]
    assert "injected failure" in info["backupError"]
    assert "backupLayerCount" not in info
    assert len(squashed) == 1
    assert squashed[0] not in image_ids(podman_engine)
    assert image_ids(podman_engine) == images_before
    assert flatten_containers(podman_engine) == []
    assert temp_files(agent) == []
    container.reload()
    assert container.status == "running"


def commit_without_squash(self: Any, container_id: str) -> str:
    """Stand-in for an engine that ignores squash=true, as Docker Engine does."""
    return str(self._api.commit(container_id)["Id"])


def test_ignored_squash_uses_export_import(
    runner_agent_factory: Any,
    sandbox_of: Callable[[str], Any],
    podman_engine: PodmanEngine,
    registry_server: RegistryServer,
    deep_image: str,
    monkeypatch: pytest.MonkeyPatch,
    flatten_records: list[logging.LogRecord],
) -> None:
    agent = runner_agent_factory(flatten_threshold_layers=3)
    container = sandbox_of(deep_image)
    marker = secrets.token_hex(16).encode()
    write_container_file(container, "/marker", marker)
    images_before = image_ids(podman_engine)
    monkeypatch.setattr(flatten.ImageFlattener, "_squash_commit", commit_without_squash)

    snapshot, info = backup_through_agent(agent, container.name, registry_server)

    assert info["backupState"] == "COMPLETED", info
    assert info["backupLayerCount"] == 1
    assert [record.method for record in flatten_records] == ["export-import"]
    assert image_ids(podman_engine) == images_before
    assert flatten_containers(podman_engine) == []
    assert temp_files(agent) == []

    pushed = fetch_pushed_image(registry_server, snapshot)
    config = pushed.container_config
    assert pushed.layer_count == 1
    assert config["Entrypoint"] == ["/bin/busybox", "sh", "-c"]
    assert config["Cmd"] == [SLEEP_SCRIPT]
    assert "FLATTEN_MODE=one layer" in config["Env"]
    assert config["WorkingDir"] == "/tmp"
    assert config["User"] == "1000:1000"
    assert config["Labels"]["org.example.purpose"] == "flatten test"
    assert config["ExposedPorts"] == {"8080/tcp": {}, "5353/udp": {}}
    # Podman's import stores the signal as its number: SIGUSR1 is 10 on Linux.
    assert config["StopSignal"] in ("SIGUSR1", "10")
    assert config["Volumes"] == {"/data": {}}

    pull_snapshot(podman_engine, registry_server, snapshot)
    try:
        contents = read_snapshot_files(podman_engine, snapshot, [*LAYER_FILES, "/marker", "/layers/gone"])
    finally:
        remove_images(podman_engine, [snapshot])
    for path, expected in LAYER_FILES.items():
        assert contents[path] == expected, path
    assert contents["/marker"] == marker
    assert contents["/layers/gone"] is None


def test_failed_import_cleans_up(
    runner_agent_factory: Any,
    sandbox_of: Callable[[str], Any],
    podman_engine: PodmanEngine,
    registry_server: RegistryServer,
    deep_image: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    agent = runner_agent_factory(flatten_threshold_layers=3)
    container = sandbox_of(deep_image)
    images_before = image_ids(podman_engine)
    exported_sizes: list[int] = []

    def fail_import(api: Any, path: Path, changes: list[str]) -> str:
        exported_sizes.append(path.stat().st_size)
        assert path.parent == agent.settings.state_path.parent
        raise FlattenError("injected failure: import rejected")

    monkeypatch.setattr(flatten.ImageFlattener, "_squash_commit", commit_without_squash)
    monkeypatch.setattr(flatten, "_import_file", fail_import)
    snapshot, info = backup_through_agent(agent, container.name, registry_server)

    assert info["backupState"] == "FAILED", info
    assert "injected failure: import rejected" in info["backupError"]
    assert len(exported_sizes) == 1
    assert exported_sizes[0] > 100_000
    assert image_ids(podman_engine) == images_before
    assert flatten_containers(podman_engine) == []
    assert temp_files(agent) == []


def test_rejected_import_removes_temp_file(
    podman_engine: PodmanEngine, deep_image: str, tmp_path: Path
) -> None:
    api = podman_engine.client.api
    container_id = api.create_container(deep_image, host_config=api.create_host_config(network_mode="none"))["Id"]
    images_before = image_ids(podman_engine)
    # Podman 4.3 rejects HEALTHCHECK as an import change, so the import itself fails.
    config = {"Cmd": ["true"], "Healthcheck": {"Test": ["CMD", "/bin/busybox", "true"], "Retries": 2}}

    try:
        with pytest.raises(FlattenError, match="HEALTHCHECK"):
            flatten.export_and_import(api, container_id, config, tmp_path, StreamAbort())
    finally:
        api.remove_container(container_id, force=True, v=True)

    assert list(tmp_path.iterdir()) == []
    assert image_ids(podman_engine) == images_before


def test_aborted_export_removes_temp_file(podman_engine: PodmanEngine, deep_image: str, tmp_path: Path) -> None:
    api = podman_engine.client.api
    container_id = api.create_container(deep_image, host_config=api.create_host_config(network_mode="none"))["Id"]
    abort = StreamAbort()
    abort.abort()

    try:
        with pytest.raises(FlattenError, match="aborted"):
            flatten.export_and_import(api, container_id, {"Cmd": ["true"]}, tmp_path, abort)
    finally:
        api.remove_container(container_id, force=True, v=True)

    assert list(tmp_path.iterdir()) == []


def test_stale_temp_files_removed_on_start(runner_agent_factory: Any, tmp_path: Path) -> None:
    stale = tmp_path / f"{TEMP_FILE_PREFIX}left-behind.tar"
    stale.write_bytes(b"partial export")
    unrelated = tmp_path / "keep-me.tar"
    unrelated.write_bytes(b"not ours")

    runner_agent_factory(state_path=tmp_path / "runner-state.sqlite3")

    assert not stale.exists()
    assert unrelated.exists()


# Dockerfile instructions of the export-and-import method (no engine needed).


def test_import_changes_cover_config() -> None:
    config = {
        "Entrypoint": ["/bin/sh", "-c"],
        "Cmd": ["echo hi"],
        "Env": ["PATH=/usr/bin:/bin", "GREETING=hello world", "PRICE=$5 \"net\""],
        "WorkingDir": "/srv/app",
        "User": "app:app",
        "Labels": {"b.label": "two words", "a.label": "x"},
        "ExposedPorts": {"8080/tcp": {}, "53/udp": {}},
        "StopSignal": "SIGTERM",
        "Volumes": {"/data": {}, "/cache": {}},
        "OnBuild": ["RUN echo child"],
        "Healthcheck": {"Test": ["CMD", "curl", "-f", "http://localhost/"], "Interval": 30_000_000_000, "Retries": 3},
    }

    assert import_changes(config) == [
        'ENTRYPOINT ["/bin/sh", "-c"]',
        'CMD ["echo hi"]',
        'ENV PATH="/usr/bin:/bin"',
        'ENV GREETING="hello world"',
        'ENV PRICE="\\$5 \\"net\\""',
        "WORKDIR /srv/app",
        "USER app:app",
        'LABEL "a.label"="x"',
        'LABEL "b.label"="two words"',
        "EXPOSE 53/udp",
        "EXPOSE 8080/tcp",
        "STOPSIGNAL SIGTERM",
        'VOLUME ["/cache", "/data"]',
        "ONBUILD RUN echo child",
        'HEALTHCHECK --interval=30000000000ns --retries=3 CMD ["curl", "-f", "http://localhost/"]',
    ]


@pytest.mark.parametrize(
    ("healthcheck", "instruction"),
    [
        ({"Test": ["NONE"]}, "HEALTHCHECK NONE"),
        ({"Test": ["CMD-SHELL", "curl -f http://localhost/"]}, "HEALTHCHECK CMD curl -f http://localhost/"),
        (
            {"Test": ["CMD", "true"], "Timeout": 5_000_000_000, "StartPeriod": 1_000_000_000},
            'HEALTHCHECK --timeout=5000000000ns --start-period=1000000000ns CMD ["true"]',
        ),
    ],
)
def test_import_changes_healthcheck_forms(healthcheck: dict[str, Any], instruction: str) -> None:
    assert import_changes({"Healthcheck": healthcheck}) == [instruction]


def test_import_changes_quote_unusual_words() -> None:
    changes = import_changes({"WorkingDir": "/srv/my app", "User": "1000"})

    assert changes == ['WORKDIR "/srv/my app"', "USER 1000"]


def test_import_changes_reject_newline_in_value() -> None:
    with pytest.raises(FlattenError, match="newline"):
        import_changes({"Env": ["MULTI=line one\nline two"]})


# Many backup-and-restore cycles.


@dataclasses.dataclass
class CycleTiming:
    backup_s: float
    restore_s: float
    layer_count: int


def restore_through_agent(agent: RunnerAgent, sandbox_id: str, registry: RegistryServer, snapshot: str) -> None:
    destroyed = httpx.post(f"{agent.url}/sandboxes/{sandbox_id}/destroy", headers=agent.headers, timeout=60)
    assert destroyed.status_code == 200, destroyed.text
    body = {
        "id": sandbox_id,
        "osUser": "root",
        "snapshot": snapshot,
        "userId": "user-1",
        "registry": registry_body(registry),
    }
    created = httpx.post(f"{agent.url}/sandboxes", json=body, headers=agent.headers, timeout=300)
    assert created.status_code == 201, created.text


@pytest.mark.slow
def test_backup_restore_cycles_stay_shallow(
    runner_agent_factory: Any,
    podman_engine: PodmanEngine,
    registry_server: RegistryServer,
    flatten_records: list[logging.LogRecord],
) -> None:
    cycles = 110
    agent = runner_agent_factory(backup_timeout_s=300.0)
    sandbox_id = f"sb-{uuid.uuid4().hex[:12]}"
    snapshots: list[str] = []
    timings: list[CycleTiming] = []
    created = httpx.post(
        f"{agent.url}/sandboxes",
        json={
            "id": sandbox_id,
            "osUser": "root",
            "snapshot": podman_engine.mini_image,
            "userId": "user-1",
            "entrypoint": ["/bin/busybox", "sh", "-c", SLEEP_SCRIPT],
        },
        headers=agent.headers,
        timeout=60,
    )
    assert created.status_code == 201, created.text

    started = time.monotonic()
    try:
        for cycle in range(1, cycles + 1):
            container = podman_engine.client.containers.get(sandbox_id)
            write_container_file(container, f"/cycle-{cycle}", str(cycle).encode())

            backup_started = time.monotonic()
            snapshot, info = backup_through_agent(agent, sandbox_id, registry_server, timeout_s=300)
            snapshots.append(snapshot)
            assert info["backupState"] == "COMPLETED", (cycle, info)
            backup_s = time.monotonic() - backup_started

            restore_started = time.monotonic()
            restore_through_agent(agent, sandbox_id, registry_server, snapshot)
            timings.append(CycleTiming(backup_s, time.monotonic() - restore_started, info["backupLayerCount"]))
        total_s = time.monotonic() - started

        final = podman_engine.client.containers.get(sandbox_id)
        assert final.status == "running"
        for cycle in range(1, cycles + 1):
            assert read_container_file(final, f"/cycle-{cycle}") == str(cycle).encode(), cycle
    finally:
        httpx.post(f"{agent.url}/sandboxes/{sandbox_id}/destroy", headers=agent.headers, timeout=60)
        remove_images(podman_engine, snapshots)

    # The mini image has one layer and each cycle adds one. Cycle 100 commits 101 layers,
    # which is above the default threshold of 100, so it pushes one layer, and the count
    # grows again from there.
    expected_counts = [cycle + 1 for cycle in range(1, 100)] + [1] + [cycle - 99 for cycle in range(101, cycles + 1)]
    assert [timing.layer_count for timing in timings] == expected_counts
    assert [(record.layers_before, record.layers_after) for record in flatten_records] == [(101, 1)]
    report_cycle_timings(timings, total_s, flatten_records[0].seconds)


def report_cycle_timings(timings: list[CycleTiming], total_s: float, flatten_s: float) -> None:
    """Print the run time per block of ten cycles; pytest shows it with -s."""
    print(f"\n{len(timings)} backup-and-restore cycles in {total_s:.1f} s ({total_s / len(timings):.2f} s per cycle)")
    print(f"the flatten of 101 layers took {flatten_s:.2f} s")
    for start in range(0, len(timings), 10):
        block = timings[start : start + 10]
        backup_s = sum(timing.backup_s for timing in block) / len(block)
        restore_s = sum(timing.restore_s for timing in block) / len(block)
        cycles = f"{start + 1:3d}-{start + len(block):3d}"
        layers = f"{block[0].layer_count:3d}-{block[-1].layer_count:3d}"
        print(f"cycles {cycles}: layers {layers}, backup {backup_s:.2f} s, restore {restore_s:.2f} s per cycle")
