"""The runner agent's HTTP API on real Podman: auth, validation, sandbox lifecycle, response shapes."""

from __future__ import annotations

import datetime
import json
import secrets
import uuid
from pathlib import Path
from typing import Any

import docker.errors
import httpx
import jsonschema
import pytest

from tests.fixtures.podman import (
    MINI_IMAGE,
    PodmanEngine,
    RunnerAgent,
    backup_snapshot,
    read_container_file,
    wait_for_backup,
    write_container_file,
)
from tests.fixtures.registry_servers import RegistryServer, free_port

COMPAT_SCHEMA = json.loads((Path(__file__).parents[1] / "data" / "runner-api-compat.json").read_text())
# sh as PID 1 exits on SIGTERM only through a trap, so `stop` takes no 10 s grace period.
SLEEP_ENTRYPOINT = ["/bin/busybox", "sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]


def assert_compatible(body: Any, definition: str) -> None:
    """Validate `body` against one definition of tests/data/runner-api-compat.json."""
    jsonschema.validate(body, {"$ref": f"#/$defs/{definition}", "$defs": COMPAT_SCHEMA["$defs"]})


def assert_error_body(response: httpx.Response, status_code: int) -> dict[str, Any]:
    assert response.status_code == status_code, response.text
    body = response.json()
    assert_compatible(body, "ErrorResponse")
    assert body["statusCode"] == status_code
    assert body["path"] == response.request.url.path
    assert body["method"] == response.request.method
    assert datetime.datetime.fromisoformat(body["timestamp"]).tzinfo is not None
    return body


def registry_json(registry: RegistryServer, *, url: str | None = None, password: str | None = None) -> dict[str, Any]:
    return {
        "url": url or registry.url,
        "project": "runner-test",
        "username": registry.username,
        "password": password if password is not None else registry.password,
    }


def create_body(sandbox_id: str, snapshot: str, **fields: Any) -> dict[str, Any]:
    return {"id": sandbox_id, "osUser": "root", "snapshot": snapshot, "userId": "user-1", **fields}


def new_sandbox_id() -> str:
    return f"sb-{uuid.uuid4().hex[:12]}"


def call(agent: RunnerAgent, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{agent.url}{path}", headers=agent.headers, timeout=60, **kwargs)


@pytest.fixture
def restored_ids(podman_engine: PodmanEngine) -> Any:
    """Collect sandbox ids created through the API, and remove their containers afterwards."""
    ids: list[str] = []
    yield ids
    for sandbox_id in ids:
        try:
            podman_engine.client.api.remove_container(sandbox_id, force=True)
        except docker.errors.NotFound:
            pass


PROTECTED_CALLS = [
    ("GET", "/sandboxes/sb-any"),
    ("POST", "/sandboxes/sb-any/backup"),
    ("POST", "/sandboxes"),
    ("POST", "/sandboxes/sb-any/destroy"),
    ("POST", "/sandboxes/sb-any/stop"),
    ("POST", "/sandboxes/sb-any/start"),
    ("GET", "/agent/sandboxes"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED_CALLS)
def test_every_path_requires_token(runner_agent: RunnerAgent, method: str, path: str) -> None:
    url = f"{runner_agent.url}{path}"

    missing = httpx.request(method, url, json={}, timeout=10)
    wrong = httpx.request(method, url, json={}, headers={"Authorization": "Bearer wrong-token"}, timeout=10)
    basic = httpx.request(method, url, json={}, headers={"Authorization": f"Basic {runner_agent.token}"}, timeout=10)

    assert "missing bearer token" in assert_error_body(missing, 401)["message"]
    assert "invalid bearer token" in assert_error_body(wrong, 401)["message"]
    assert_error_body(basic, 401)


def test_health_needs_no_token(runner_agent: RunnerAgent) -> None:
    response = httpx.get(f"{runner_agent.url}/agent/health", timeout=10)

    assert response.status_code == 200
    body = response.json()
    assert body["engineReachable"] is True
    assert body["engineVersion"]
    assert body["runnerId"] == runner_agent.settings.runner_id


def test_health_reports_unreachable_engine(runner_agent_factory: Any, tmp_path: Path) -> None:
    agent = runner_agent_factory(docker_host=f"unix://{tmp_path}/no-engine.sock")

    response = httpx.get(f"{agent.url}/agent/health", timeout=10)

    assert response.status_code == 503
    assert response.json()["engineReachable"] is False


@pytest.mark.parametrize("sandbox_id", ["Upper-Case", "-leading-dash", "double..dot", "under_"])
@pytest.mark.parametrize(
    ("method", "suffix"), [("GET", ""), ("POST", "/backup"), ("POST", "/stop"), ("POST", "/destroy")]
)
def test_invalid_sandbox_id_is_400(runner_agent: RunnerAgent, sandbox_id: str, method: str, suffix: str) -> None:
    body = {"registry": {"url": "http://127.0.0.1:1"}, "snapshot": "127.0.0.1:1/runner-test/x:t"}

    response = call(runner_agent, method, f"/sandboxes/{sandbox_id}{suffix}", json=body)

    assert "cannot form an image reference" in assert_error_body(response, 400)["message"]


def test_unknown_sandbox_is_404(runner_agent: RunnerAgent) -> None:
    assert_error_body(call(runner_agent, "GET", "/sandboxes/sb-unknown"), 404)
    assert_error_body(call(runner_agent, "POST", "/sandboxes/sb-unknown/stop"), 404)
    assert_error_body(call(runner_agent, "POST", "/sandboxes/sb-unknown/start"), 404)


def test_unknown_path_has_error_body(runner_agent: RunnerAgent) -> None:
    assert_error_body(call(runner_agent, "GET", "/no-such-path"), 404)


def test_backup_body_without_snapshot_is_400(runner_agent: RunnerAgent, sandbox_container: Any) -> None:
    container = sandbox_container()

    response = call(runner_agent, "POST", f"/sandboxes/{container.name}/backup", json={"registry": {}})

    message = assert_error_body(response, 400)["message"]
    assert "snapshot" in message
    assert "registry.url" in message


def test_sandbox_info_matches_daytona_fields(
    runner_agent: RunnerAgent, sandbox_container: Any, registry_server: RegistryServer
) -> None:
    container = sandbox_container()
    before = call(runner_agent, "GET", f"/sandboxes/{container.name}").json()
    snapshot = backup_snapshot(registry_server.url, container.name)
    started = call(
        runner_agent,
        "POST",
        f"/sandboxes/{container.name}/backup",
        json={"registry": registry_json(registry_server), "snapshot": snapshot},
    )
    after = wait_for_backup(runner_agent, container.name)

    assert_compatible(before, "SandboxInfoResponse")
    assert before == {
        "state": "started",
        "backupState": "NONE",
        "recoverable": False,
        "daemonVersion": before["daemonVersion"],
    }
    assert started.status_code == 201
    assert_compatible(started.json(), "MessageResponse")
    assert_compatible(after, "SandboxInfoResponse")


def test_list_managed_sandboxes(runner_agent: RunnerAgent, sandbox_container: Any) -> None:
    managed = sandbox_container()
    unmanaged = sandbox_container(managed=False)

    response = call(runner_agent, "GET", "/agent/sandboxes")

    assert response.status_code == 200
    listed = {entry["id"]: entry for entry in response.json()}
    assert listed[managed.name] == {"id": managed.name, "state": "started", "backupState": "NONE"}
    assert unmanaged.name not in listed


def test_create_from_backup_then_stop_start_destroy(
    runner_agent: RunnerAgent,
    sandbox_container: Any,
    podman_engine: PodmanEngine,
    registry_server: RegistryServer,
    restored_ids: list[str],
) -> None:
    source = sandbox_container()
    marker = secrets.token_hex(16)
    write_container_file(source, "/backup-marker", marker.encode())
    snapshot = backup_snapshot(registry_server.url, source.name)
    backup_body = {"registry": registry_json(registry_server), "snapshot": snapshot}
    call(runner_agent, "POST", f"/sandboxes/{source.name}/backup", json=backup_body)
    assert wait_for_backup(runner_agent, source.name)["backupState"] == "COMPLETED"
    restored_id = new_sandbox_id()
    restored_ids.append(restored_id)

    try:
        created = call(
            runner_agent,
            "POST",
            "/sandboxes",
            json=create_body(
                restored_id,
                snapshot,
                registry=registry_json(registry_server),
                entrypoint=SLEEP_ENTRYPOINT,
                env={"RESTORED": "yes"},
                organizationId="org-1",
                cpuQuota=1,
                volumes=[],
            ),
        )
        assert created.status_code == 201, created.text
        assert_compatible(created.json(), "CreateSandboxResponse")

        info = call(runner_agent, "GET", f"/sandboxes/{restored_id}").json()
        assert info["state"] == "started"
        assert info["backupState"] == "NONE"
        restored = podman_engine.client.containers.get(restored_id)
        assert restored.labels["sandbox-backup.managed"] == "true"
        assert restored.labels["sandbox-backup.sandbox-id"] == restored_id
        assert read_container_file(restored, "/backup-marker") == marker.encode()
        assert "RESTORED=yes" in restored.attrs["Config"]["Env"]
        assert restored.attrs["HostConfig"]["NetworkMode"] == "none"

        stopped = call(runner_agent, "POST", f"/sandboxes/{restored_id}/stop")
        assert (stopped.status_code, stopped.json()) == (200, "Sandbox stopped")
        assert call(runner_agent, "GET", f"/sandboxes/{restored_id}").json()["state"] == "stopped"

        started = call(runner_agent, "POST", f"/sandboxes/{restored_id}/start")
        assert (started.status_code, started.json()) == (200, "Sandbox started")
        assert call(runner_agent, "GET", f"/sandboxes/{restored_id}").json()["state"] == "started"

        destroyed = call(runner_agent, "POST", f"/sandboxes/{restored_id}/destroy")
        assert (destroyed.status_code, destroyed.json()) == (200, "Sandbox destroyed")
        assert_error_body(call(runner_agent, "GET", f"/sandboxes/{restored_id}"), 404)
        assert call(runner_agent, "POST", f"/sandboxes/{restored_id}/destroy").status_code == 200
        assert_error_body(call(runner_agent, "POST", f"/sandboxes/{restored_id}/start"), 404)
    finally:
        try:
            podman_engine.client.images.remove(snapshot, force=True)
        except docker.errors.ImageNotFound:
            pass


def test_create_from_backup_digest(
    runner_agent: RunnerAgent,
    sandbox_container: Any,
    podman_engine: PodmanEngine,
    registry_server: RegistryServer,
    restored_ids: list[str],
) -> None:
    source = sandbox_container()
    snapshot = backup_snapshot(registry_server.url, source.name)
    backup_body = {"registry": registry_json(registry_server), "snapshot": snapshot}
    call(runner_agent, "POST", f"/sandboxes/{source.name}/backup", json=backup_body)
    digest = wait_for_backup(runner_agent, source.name)["backupDigest"]
    by_digest = f"{snapshot.rsplit(':', 1)[0]}@{digest}"
    restored_id = new_sandbox_id()
    restored_ids.append(restored_id)

    try:
        response = call(
            runner_agent,
            "POST",
            "/sandboxes",
            json=create_body(
                restored_id, by_digest, registry=registry_json(registry_server), entrypoint=SLEEP_ENTRYPOINT
            ),
        )
        assert response.status_code == 201, response.text
        assert call(runner_agent, "GET", f"/sandboxes/{restored_id}").json()["state"] == "started"
    finally:
        podman_engine.client.api.remove_container(restored_id, force=True)
        try:
            podman_engine.client.images.remove(by_digest, force=True)
        except docker.errors.ImageNotFound:
            pass


def test_create_from_local_image_without_start(
    runner_agent: RunnerAgent, podman_engine: PodmanEngine, restored_ids: list[str]
) -> None:
    sandbox_id = new_sandbox_id()
    restored_ids.append(sandbox_id)

    response = call(
        runner_agent,
        "POST",
        "/sandboxes",
        json=create_body(sandbox_id, MINI_IMAGE, skipStart=True, entrypoint=SLEEP_ENTRYPOINT),
    )

    assert response.status_code == 201, response.text
    assert call(runner_agent, "GET", f"/sandboxes/{sandbox_id}").json()["state"] == "stopped"
    assert podman_engine.client.containers.get(sandbox_id).status == "created"


def test_create_existing_name_is_409(runner_agent: RunnerAgent, sandbox_container: Any) -> None:
    container = sandbox_container()

    response = call(runner_agent, "POST", "/sandboxes", json=create_body(container.name, MINI_IMAGE))

    assert container.name in assert_error_body(response, 409)["message"]


def test_create_without_required_fields_is_400(runner_agent: RunnerAgent) -> None:
    response = call(runner_agent, "POST", "/sandboxes", json={"id": new_sandbox_id()})

    message = assert_error_body(response, 400)["message"]
    for field in ("osUser", "snapshot", "userId"):
        assert field in message


def test_create_from_missing_tag_is_404_manifest_unknown(
    runner_agent: RunnerAgent, registry_server: RegistryServer
) -> None:
    snapshot = f"{registry_server.host}/runner-test/backup-none:missing"

    response = call(
        runner_agent,
        "POST",
        "/sandboxes",
        json=create_body(new_sandbox_id(), snapshot, registry=registry_json(registry_server)),
    )

    body = assert_error_body(response, 404)
    assert body["code"] == "MANIFEST_UNKNOWN"
    assert "manifest unknown" in body["message"]


def test_create_with_wrong_password_is_400(runner_agent: RunnerAgent, registry_server: RegistryServer) -> None:
    snapshot = f"{registry_server.host}/runner-test/backup-none:missing"
    wrong_password = "wrong-" + secrets.token_hex(6)

    response = call(
        runner_agent,
        "POST",
        "/sandboxes",
        json=create_body(new_sandbox_id(), snapshot, registry=registry_json(registry_server, password=wrong_password)),
    )

    body = assert_error_body(response, 400)
    assert body["code"] == "REGISTRY_AUTH_DENIED"
    assert wrong_password not in response.text


def test_create_from_unreachable_registry_is_502(runner_agent: RunnerAgent) -> None:
    closed_url = f"http://127.0.0.1:{free_port()}"
    snapshot = f"{closed_url.removeprefix('http://')}/runner-test/backup-none:t1"

    response = call(
        runner_agent,
        "POST",
        "/sandboxes",
        json=create_body(new_sandbox_id(), snapshot, registry={"url": closed_url, "username": "u", "password": "p"}),
    )

    assert assert_error_body(response, 502)["code"] == "REGISTRY_UNREACHABLE"


def test_create_with_snapshot_on_other_host_is_400(runner_agent: RunnerAgent, registry_server: RegistryServer) -> None:
    snapshot = "127.0.0.1:1/runner-test/backup-none:t1"

    response = call(
        runner_agent,
        "POST",
        "/sandboxes",
        json=create_body(new_sandbox_id(), snapshot, registry=registry_json(registry_server)),
    )

    assert "credentials are only sent" in assert_error_body(response, 400)["message"]
