"""RunnerClient error mapping against a fake runner on 127.0.0.1 that returns what each test sets."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import fastapi
import pytest

from sandbox_backup import errors
from sandbox_backup.runner.client import RunnerClient
from sandbox_backup.runner.models import CreateSandboxRequest, RegistryCredentials
from tests.fixtures.podman import UvicornThread
from tests.fixtures.registry_servers import free_port

TOKEN = "fake-runner-token"


class FakeRunner:
    """Responds to every request with `status` and the raw `body`, and records each request."""

    def __init__(self) -> None:
        self.status = 200
        self.body = b"{}"
        self.received: list[dict[str, Any]] = []
        app = fastapi.FastAPI()

        @app.api_route("/{path:path}", methods=["GET", "POST"])
        async def answer(path: str, request: fastapi.Request) -> fastapi.Response:
            self.received.append(
                {
                    "method": request.method,
                    "path": "/" + path,
                    "headers": dict(request.headers),
                    "body": await request.body(),
                }
            )
            return fastapi.Response(content=self.body, status_code=self.status, media_type="application/json")

        self.server = UvicornThread(app, free_port())
        self.url = self.server.url


@pytest.fixture(scope="module")
def fake_runner() -> Iterator[FakeRunner]:
    runner = FakeRunner()
    runner.server.start()
    yield runner
    runner.server.stop()


@pytest.fixture
def runner(fake_runner: FakeRunner) -> FakeRunner:
    fake_runner.status = 200
    fake_runner.body = b"{}"
    fake_runner.received.clear()
    return fake_runner


@pytest.mark.parametrize(
    "body",
    [
        b'{"state": "started", "backupState": "HALF_DONE"}',
        b'{"state": "hibernating", "backupState": "NONE"}',
        b'{"backupState": "NONE"}',
        b"not json at all",
        b"",
        b'["state", "started"]',
    ],
)
async def test_malformed_sandbox_info_is_protocol_error(runner: FakeRunner, body: bytes) -> None:
    runner.body = body

    async with RunnerClient(runner.url, TOKEN, runner_id="runner-1") as client:
        with pytest.raises(errors.RunnerProtocolError) as raised:
            await client.get_sandbox("sb-1")

    assert raised.value.runner_id == "runner-1"
    assert "SandboxInfo" in str(raised.value)


async def test_valid_sandbox_info_is_parsed(runner: FakeRunner) -> None:
    runner.body = (
        b'{"state": "stopped", "backupState": "FAILED", "backupSnapshot": "h:1/r:t", "backupError": "boom",'
        b' "recoverable": true, "daemonVersion": "0.1.0", "somethingNew": 1}'
    )

    async with RunnerClient(runner.url, TOKEN) as client:
        info = await client.get_sandbox("sb-1")

    assert info is not None
    assert info.backup_error == "boom"
    assert info.recoverable is True
    assert runner.received[0]["headers"]["authorization"] == f"Bearer {TOKEN}"


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_server_errors_are_unavailable(runner: FakeRunner, status: int) -> None:
    runner.status = status
    runner.body = b'{"message": "engine down", "path": "/x", "statusCode": 503, "timestamp": "t"}'

    async with RunnerClient(runner.url, TOKEN) as client:
        with pytest.raises(errors.RunnerUnavailable) as raised:
            await client.stop_sandbox("sb-1")

    assert raised.value.status_code == status
    assert "engine down" in str(raised.value)


@pytest.mark.parametrize("status", [400, 401, 404, 409, 418])
async def test_client_errors_are_rejected_with_message(runner: FakeRunner, status: int) -> None:
    runner.status = status
    runner.body = b'{"message": "no such thing", "path": "/x", "statusCode": 400, "timestamp": "t"}'

    async with RunnerClient(runner.url, TOKEN) as client:
        with pytest.raises(errors.RunnerRejected) as raised:
            await client.start_sandbox("sb-1")

    assert raised.value.status_code == status
    assert "no such thing" in str(raised.value)


async def test_rejection_with_other_body_quotes_its_start(runner: FakeRunner) -> None:
    runner.status = 400
    runner.body = b"<html>bad request</html>"

    async with RunnerClient(runner.url, TOKEN) as client:
        with pytest.raises(errors.RunnerRejected, match="bad request"):
            await client.destroy_sandbox("sb-1")


async def test_get_sandbox_404_returns_none(runner: FakeRunner) -> None:
    runner.status = 404

    async with RunnerClient(runner.url, TOKEN) as client:
        assert await client.get_sandbox("sb-1") is None


async def test_request_bodies_carry_real_password(runner: FakeRunner) -> None:
    runner.status = 201
    runner.body = b'"Backup started"'
    registry = RegistryCredentials(url="http://127.0.0.1:5000", project="p", username="u", password="pw-real")
    sandbox = CreateSandboxRequest(
        id="sb-2", os_user="root", snapshot="127.0.0.1:5000/p/x:t", user_id="u1", registry=registry
    )

    async with RunnerClient(runner.url, TOKEN) as client:
        await client.create_backup("sb-1", registry, "127.0.0.1:5000/p/backup-sb-1:t")
        await client.create_sandbox(sandbox)

    backup_request, create_request = runner.received
    assert backup_request["path"] == "/sandboxes/sb-1/backup"
    assert b'"password":"pw-real"' in backup_request["body"]
    assert create_request["path"] == "/sandboxes"
    assert b'"osUser":"root"' in create_request["body"]
    assert b'"password":"pw-real"' in create_request["body"]


async def test_connection_refused_is_unavailable_without_token() -> None:
    url = f"http://127.0.0.1:{free_port()}"

    async with RunnerClient(url, TOKEN, timeout_s=2.0) as client:
        with pytest.raises(errors.RunnerUnavailable) as raised:
            await client.get_sandbox("sb-1")
        healthy = await client.health()

    assert TOKEN not in str(raised.value)
    assert healthy is False


async def test_invalid_sandbox_id_raises_before_request(runner: FakeRunner) -> None:
    async with RunnerClient(runner.url, TOKEN) as client:
        with pytest.raises(errors.InvalidReference):
            await client.get_sandbox("../agent/health")

    assert runner.received == []
