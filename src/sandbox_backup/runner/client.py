"""The manager's async HTTP client for one runner agent.

Failures map onto the errors module. A connection error, a timeout or a 5xx response is
RunnerUnavailable (transient), and a 4xx response is RunnerRejected with the runner's
message. A body that does not match the API is RunnerProtocolError. A sandbox id outside the OCI grammar raises
InvalidReference before any request. No message contains the token or a password,
because the messages quote only URLs, statuses and the runner's own error text.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any, TypeVar

import httpx
import pydantic

from sandbox_backup import errors
from sandbox_backup.domain.reference import validate_sandbox_id
from sandbox_backup.runner.models import (
    CreateBackupRequest,
    CreateSandboxRequest,
    ErrorResponse,
    RegistryCredentials,
    SandboxInfo,
)

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=pydantic.BaseModel)


class RunnerClient:
    """Calls one runner agent at `base_url` with its bearer token."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        runner_id: str | None = None,
        timeout_s: float = 30.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.runner_id = runner_id
        self._headers = {"Authorization": f"Bearer {token}"}
        self._timeout_s = timeout_s
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(timeout=timeout_s)

    async def __aenter__(self) -> RunnerClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client, unless the caller passed it in."""
        if self._owns_http:
            await self._http.aclose()

    async def get_sandbox(self, sandbox_id: str) -> SandboxInfo | None:
        """Return the sandbox's state and backup state, or None when the runner has neither."""
        validate_sandbox_id(sandbox_id)
        response = await self._request("GET", f"/sandboxes/{sandbox_id}", allow_not_found=True)
        if response is None:
            return None
        return self._parse(response, SandboxInfo)

    async def create_backup(self, sandbox_id: str, registry: RegistryCredentials, snapshot: str) -> None:
        """Ask the runner to back the sandbox up to `snapshot`; the result shows in get_sandbox."""
        validate_sandbox_id(sandbox_id)
        body = CreateBackupRequest(registry=registry, snapshot=snapshot).to_request_body()
        await self._request("POST", f"/sandboxes/{sandbox_id}/backup", body=body)

    async def create_sandbox(self, request: CreateSandboxRequest) -> None:
        """Ask the runner to pull the snapshot and create (and start) the sandbox's container."""
        validate_sandbox_id(request.id)
        await self._request("POST", "/sandboxes", body=request.to_request_body())

    async def destroy_sandbox(self, sandbox_id: str) -> None:
        validate_sandbox_id(sandbox_id)
        await self._request("POST", f"/sandboxes/{sandbox_id}/destroy")

    async def stop_sandbox(self, sandbox_id: str) -> None:
        validate_sandbox_id(sandbox_id)
        await self._request("POST", f"/sandboxes/{sandbox_id}/stop")

    async def start_sandbox(self, sandbox_id: str) -> None:
        validate_sandbox_id(sandbox_id)
        await self._request("POST", f"/sandboxes/{sandbox_id}/start")

    async def health(self) -> bool:
        """Return True when the agent responds and reaches its engine, else False. Never raises."""
        try:
            response = await self._http.get(f"{self.base_url}/agent/health", timeout=self._timeout_s)
        except httpx.HTTPError as exc:
            logger.info(
                "runner %s health check failed: %s",
                self._name,
                type(exc).__name__,
                extra={"action": "runner_health", "runner_id": self.runner_id},
            )
            return False
        if response.status_code != 200:
            return False
        try:
            return bool(response.json().get("engineReachable"))
        except (ValueError, AttributeError):
            return False

    @property
    def _name(self) -> str:
        return self.runner_id or self.base_url

    async def _request(
        self, method: str, path: str, *, body: dict[str, Any] | None = None, allow_not_found: bool = False
    ) -> httpx.Response | None:
        url = f"{self.base_url}{path}"
        try:
            response = await self._http.request(method, url, json=body, headers=self._headers)
        except httpx.TimeoutException as exc:
            raise errors.RunnerUnavailable(
                f"{method} {url} timed out after {self._timeout_s:.0f} s; the runner may be overloaded or down",
                runner_id=self.runner_id,
            ) from exc
        except httpx.HTTPError as exc:
            raise errors.RunnerUnavailable(
                f"{method} {url} failed: {type(exc).__name__}: {exc}; check that the runner agent runs",
                runner_id=self.runner_id,
            ) from exc

        if allow_not_found and response.status_code == 404:
            return None
        if response.status_code >= 500:
            raise errors.RunnerUnavailable(
                f"{method} {url} failed with status {response.status_code}: {_error_message(response)}",
                runner_id=self.runner_id,
                status_code=response.status_code,
            )
        if response.status_code >= 400:
            raise errors.RunnerRejected(
                f"{method} {url} was rejected with {response.status_code}: {_error_message(response)}",
                runner_id=self.runner_id,
                status_code=response.status_code,
                code=_error_code(response),
            )
        if not response.is_success:
            raise errors.RunnerProtocolError(
                f"{method} {url} returned the unexpected status {response.status_code}",
                runner_id=self.runner_id,
                status_code=response.status_code,
            )
        return response

    def _parse(self, response: httpx.Response, model: type[ModelT]) -> ModelT:
        try:
            return model.model_validate_json(response.content)
        except pydantic.ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in problem['loc']) or 'body'}: {problem['msg']}"
                for problem in exc.errors(include_input=False)
            )
            raise errors.RunnerProtocolError(
                f"{response.request.method} {response.request.url} returned a body that is not a "
                f"{model.__name__}: {problems}",
                runner_id=self.runner_id,
                status_code=response.status_code,
            ) from exc


def _error_code(response: httpx.Response) -> str | None:
    try:
        return ErrorResponse.model_validate(response.json()).code
    except (ValueError, pydantic.ValidationError):
        return None


def _error_message(response: httpx.Response) -> str:
    """Return the `message` of an ErrorResponse body, or the start of a body of another shape."""
    try:
        return ErrorResponse.model_validate(response.json()).message
    except (ValueError, pydantic.ValidationError):
        pass
    text = response.text.strip()
    return text[:300] if text else "(empty body)"

