"""Docker Engine API backend of the runner agent (Docker, or Podman's compatible service).

docker-py is blocking, so every call runs in a worker thread. Short calls (inspect, start,
stop) and long transfers (commit, push, pull) have separate thread pools, so that a few
slow pushes cannot delay a status request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import logging
import pathlib
import threading
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

import docker
import docker.auth
import docker.errors
import requests

from sandbox_backup import errors
from sandbox_backup.domain.reference import parse_reference
from sandbox_backup.runner.failures import FailureKind, RegistryTransferError
from sandbox_backup.runner.flatten import (
    FlattenError,
    FlattenMethod,
    ImageFlattener,
    count_layers,
    remove_image_quietly,
)
from sandbox_backup.runner.push_stream import StreamAbort, decode_stream, read_pull_stream, read_push_stream

logger = logging.getLogger(__name__)

T = TypeVar("T")

SANDBOX_ID_LABEL = "sandbox-backup.sandbox-id"
QUICK_CALL_TIMEOUT_S = 60.0
QUICK_POOL_SIZE = 8
TRANSFER_POOL_SIZE = 8


class OperationAborted(errors.SandboxBackupError):
    """A streaming engine call ended because its StreamAbort was triggered."""


@dataclasses.dataclass(frozen=True)
class ContainerView:
    """Id, name, status and labels of one container."""

    id: str
    name: str
    status: str
    exit_code: int | None
    labels: dict[str, str]


@dataclasses.dataclass(frozen=True)
class CommittedImage:
    """Image made by a commit or a flatten. `size_bytes` is the uncompressed size that the engine reports."""

    id: str
    reference: str
    size_bytes: int | None
    layer_count: int


@dataclasses.dataclass(frozen=True)
class FlattenedImage:
    """One-layer copy of a committed image, tagged with the committed image's reference."""

    image: CommittedImage
    method: FlattenMethod


@dataclasses.dataclass(frozen=True)
class ContainerSpec:
    """Container to create for a sandbox."""

    name: str
    image: str
    labels: dict[str, str]
    entrypoint: list[str] | None = None
    environment: dict[str, str] | None = None
    network_mode: str | None = None


class DockerEngine:
    """Async facade over docker-py for one engine endpoint such as `unix:///run/podman.sock`."""

    def __init__(self, docker_host: str, *, container_label: str, transfer_timeout_s: float) -> None:
        self.docker_host = docker_host
        self.container_label = container_label
        self._transfer_timeout_s = transfer_timeout_s

        # Two clients because docker-py applies one read timeout to every call: a push
        # stays silent until it ends, so it needs the whole backup deadline. Both are made
        # on first use, because `version="auto"` queries the engine, which may not run yet.
        self._clients: dict[str, docker.APIClient] = {}
        self._clients_guard = threading.Lock()
        self._quick_pool = concurrent.futures.ThreadPoolExecutor(QUICK_POOL_SIZE, thread_name_prefix="engine")
        self._transfer_pool = concurrent.futures.ThreadPoolExecutor(TRANSFER_POOL_SIZE, thread_name_prefix="transfer")

        # A commit tags an image and a clean-up untags it: both hold the lock of their
        # repository, so a clean-up never removes a tag that a newer commit just set.
        self._repository_locks: dict[str, threading.Lock] = {}
        self._repository_locks_guard = threading.Lock()

    def close(self) -> None:
        """Wait for running calls to end, then close the HTTP sessions."""
        self._quick_pool.shutdown(wait=True, cancel_futures=True)
        self._transfer_pool.shutdown(wait=True, cancel_futures=True)
        with self._clients_guard:
            for client in self._clients.values():
                client.close()
            self._clients.clear()

    @property
    def _quick(self) -> docker.APIClient:
        return self._client("quick", QUICK_CALL_TIMEOUT_S)

    @property
    def _transfer(self) -> docker.APIClient:
        return self._client("transfer", self._transfer_timeout_s)

    def _client(self, name: str, timeout_s: float) -> docker.APIClient:
        with self._clients_guard:
            if name not in self._clients:
                # `version="auto"` costs a GET /version, about 0.4 s on Podman 4.3; the second
                # client takes the API version the first one found.
                known = next(iter(self._clients.values()), None)
                version = known.api_version if known is not None else "auto"
                self._clients[name] = docker.APIClient(base_url=self.docker_host, timeout=timeout_s, version=version)
            return self._clients[name]

    async def version(self) -> str:
        """Return the engine version, such as `4.3.1`."""
        info = await self._run_quick(lambda: self._quick.version())
        return str(info.get("Version", ""))

    async def ping(self) -> bool:
        """Return True when the engine responds to /_ping, False on any connection failure."""
        try:
            return bool(await self._run_quick(lambda: self._quick.ping()))
        except (docker.errors.DockerException, requests.RequestException, errors.EngineError):
            return False

    async def find_container(self, name: str) -> ContainerView | None:
        """Return the managed container named exactly `name`, or None."""
        return await self._run_quick(self._find_container_blocking, name)

    async def list_managed(self) -> list[ContainerView]:
        """Return every container that carries the agent's label."""
        return await self._run_quick(self._list_managed_blocking)

    async def commit(self, container_id: str, reference: str, *, pause: bool) -> CommittedImage:
        """Commit a container into an image tagged `reference` (host/repository:tag)."""
        return await self._run_transfer(self._commit_blocking, container_id, reference, pause)

    async def flatten(
        self, image: CommittedImage, *, sandbox_id: str, temp_dir: pathlib.Path, abort: StreamAbort
    ) -> FlattenedImage:
        """Make a one-layer copy of a committed image and move the image's tag to it.

        The committed image itself stays, untagged, for the caller to remove. `temp_dir`
        receives a temporary export when the engine cannot squash (see runner.flatten).
        """
        return await self._run_transfer(self._flatten_blocking, image, sandbox_id, temp_dir, abort)

    async def push(self, reference: str, auth_config: dict[str, str] | None, abort: StreamAbort) -> str | None:
        """Push `reference` and return the manifest digest, or None if the engine did not send one.

        Raises RegistryTransferError when the push fails and OperationAborted after `abort.abort()`.
        """
        return await self._run_transfer(self._push_blocking, reference, auth_config, abort)

    async def remove_image(self, image: CommittedImage) -> None:
        """Remove a committed image; log and keep going if the engine cannot remove it."""
        await self._run_quick(self._remove_image_blocking, image)

    async def pull(self, reference: str, auth_config: dict[str, str] | None) -> None:
        """Pull `reference`; raise RegistryTransferError with the failure kind on failure."""
        await self._run_transfer(self._pull_blocking, reference, auth_config)

    async def image_exists(self, reference: str) -> bool:
        return await self._run_quick(self._image_exists_blocking, reference)

    async def create_container(self, spec: ContainerSpec, *, start: bool) -> str:
        """Create (and start, if asked) a container; return its id."""
        return await self._run_quick(self._create_container_blocking, spec, start)

    async def start_container(self, container_id: str) -> None:
        await self._run_quick(lambda: self._quick.start(container_id))

    async def stop_container(self, container_id: str, *, timeout_s: int = 10) -> None:
        """Stop a container: its stop signal (SIGTERM by default), then SIGKILL after `timeout_s` seconds."""
        await self._run_transfer(lambda: self._transfer.stop(container_id, timeout=timeout_s))

    async def remove_container(self, container_id: str) -> None:
        """Remove a container and its anonymous volumes, stopping it first if it runs."""
        await self._run_quick(self._remove_container_blocking, container_id)

    # Worker-thread side.

    async def _run_quick(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await self._run(self._quick_pool, function, *args, **kwargs)

    async def _run_transfer(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await self._run(self._transfer_pool, function, *args, **kwargs)

    async def _run(
        self, pool: concurrent.futures.Executor, function: Callable[..., T], *args: Any, **kwargs: Any
    ) -> T:
        loop = asyncio.get_running_loop()
        call = functools.partial(_translate_errors, self.docker_host, function, *args, **kwargs)
        return await loop.run_in_executor(pool, call)

    def _repository_lock(self, reference: str) -> threading.Lock:
        parsed = parse_reference(reference)
        key = f"{parsed.host}/{parsed.repository}"
        with self._repository_locks_guard:
            return self._repository_locks.setdefault(key, threading.Lock())

    def _find_container_blocking(self, name: str) -> ContainerView | None:
        try:
            attrs = self._quick.inspect_container(name)
        except docker.errors.NotFound:
            return None

        # The engine also resolves id prefixes, so check the name is the sandbox id itself.
        view = _container_view(attrs)
        if view.name != name or view.labels.get(self.container_label) != "true":
            return None
        return view

    def _list_managed_blocking(self) -> list[ContainerView]:
        summaries = self._quick.containers(all=True, filters={"label": f"{self.container_label}=true"})
        views = []
        for summary in summaries:
            try:
                views.append(_container_view(self._quick.inspect_container(summary["Id"])))
            except docker.errors.NotFound:
                continue  # removed between the list and the inspect
        return views

    def _commit_blocking(self, container_id: str, reference: str, pause: bool) -> CommittedImage:
        parsed = parse_reference(reference)
        with self._repository_lock(reference):
            try:
                result = self._transfer.commit(
                    container_id, repository=f"{parsed.host}/{parsed.repository}", tag=parsed.tag, pause=pause
                )
            except docker.errors.NotFound as exc:
                raise RegistryTransferError(
                    f"commit of container {container_id} failed: the container no longer exists",
                    kind=FailureKind.CONTAINER_NOT_FOUND,
                ) from exc

        return self._committed_image(str(result["Id"]), reference)

    def _flatten_blocking(
        self, image: CommittedImage, sandbox_id: str, temp_dir: pathlib.Path, abort: StreamAbort
    ) -> FlattenedImage:
        flattener = ImageFlattener(self._transfer, temp_dir, timeout_s=self._transfer_timeout_s)
        try:
            image_id, method = flattener.flatten(image.id, abort, sandbox_id=sandbox_id)
        except docker.errors.APIError as exc:
            raise FlattenError(
                f"flattening of image {image.id} ({image.layer_count} layers) failed: {exc.explanation or exc}",
                transient=(exc.status_code or 500) >= 500,
            ) from exc

        parsed = parse_reference(image.reference)
        try:
            with self._repository_lock(image.reference):
                self._transfer.tag(image_id, f"{parsed.host}/{parsed.repository}", parsed.tag, force=True)
            flattened = self._committed_image(image_id, image.reference)
        except BaseException:
            remove_image_quietly(self._transfer, image_id, {"action": "flatten_image", "sandbox_id": sandbox_id})
            raise
        return FlattenedImage(image=flattened, method=method)

    def _committed_image(self, image_id: str, reference: str) -> CommittedImage:
        attrs = self._transfer.inspect_image(image_id)
        size = attrs.get("Size")
        return CommittedImage(
            id=image_id,
            reference=reference,
            size_bytes=int(size) if size is not None else None,
            layer_count=count_layers(attrs),
        )

    def _push_blocking(self, reference: str, auth_config: dict[str, str] | None, abort: StreamAbort) -> str | None:
        # docker-py's push() hides the HTTP response, and only the response lets another
        # thread abort the stream, so this sends the same request itself. The auth header is
        # always set: without it docker-py would read the host user's ~/.docker/config.json.
        parsed = parse_reference(reference)
        repository = urllib.parse.quote(f"{parsed.host}/{parsed.repository}", safe="/:")
        url = f"{self._transfer.base_url}/v{self._transfer.api_version}/images/{repository}/push"
        headers = {"X-Registry-Auth": docker.auth.encode_header(auth_config or {})}

        if abort.aborted:
            raise OperationAborted(f"push of {reference} was aborted before it started")
        response = self._transfer.post(
            url, params={"tag": parsed.tag}, headers=headers, stream=True, timeout=self._transfer_timeout_s
        )
        abort.attach(response)
        try:
            _raise_for_engine_status(response, f"push of {reference}")
            return read_push_stream(decode_stream(response.iter_lines()), reference)
        except requests.RequestException as exc:
            if abort.aborted:
                raise OperationAborted(f"push of {reference} was aborted") from exc
            raise
        finally:
            abort.detach()
            response.close()

    def _pull_blocking(self, reference: str, auth_config: dict[str, str] | None) -> None:
        parsed = parse_reference(reference)
        stream = self._transfer.pull(
            f"{parsed.host}/{parsed.repository}",
            tag=parsed.digest or parsed.tag or "latest",
            stream=True,
            decode=True,
            auth_config=auth_config or {},
        )
        read_pull_stream(stream, reference)

    def _image_exists_blocking(self, reference: str) -> bool:
        try:
            self._quick.inspect_image(reference)
        except docker.errors.NotFound:
            return False
        return True

    def _remove_image_blocking(self, image: CommittedImage) -> None:
        with self._repository_lock(image.reference):
            try:
                tagged_id = self._quick.inspect_image(image.reference)["Id"]
            except docker.errors.NotFound:
                tagged_id = None

            # Untag only when the tag is still ours, then remove the image itself. The
            # engine refuses that while another tag or a container still uses the image.
            if tagged_id == image.id:
                self._remove_image_quietly(image.reference, image)
            self._remove_image_quietly(image.id, image)

    def _remove_image_quietly(self, name: str, image: CommittedImage) -> None:
        try:
            self._quick.remove_image(name)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            logger.warning(
                "committed image %s kept: the engine rejected the removal of %s: %s",
                image.id,
                name,
                exc.explanation or exc,
                extra={"action": "remove_image", "image_id": image.id, "reference": image.reference},
            )

    def _create_container_blocking(self, spec: ContainerSpec, start: bool) -> str:
        try:
            host_config = self._quick.create_host_config(network_mode=spec.network_mode) if spec.network_mode else None
            created = self._quick.create_container(
                image=spec.image,
                name=spec.name,
                entrypoint=spec.entrypoint,
                environment=spec.environment,
                labels=spec.labels,
                host_config=host_config,
            )
        except docker.errors.APIError as exc:
            if exc.status_code == 409:
                raise errors.Conflict(f"a container named {spec.name!r} already exists on this runner") from exc
            raise
        container_id = str(created["Id"])

        if start:
            self._quick.start(container_id)
        return container_id

    def _remove_container_blocking(self, container_id: str) -> None:
        try:
            self._quick.remove_container(container_id, force=True, v=True)
        except docker.errors.NotFound:
            pass  # already gone: destroy is idempotent


def _container_view(attrs: dict[str, Any]) -> ContainerView:
    state = attrs.get("State") or {}
    config = attrs.get("Config") or {}
    return ContainerView(
        id=str(attrs["Id"]),
        name=str(attrs.get("Name", "")).lstrip("/"),
        status=str(state.get("Status", "")).lower(),
        exit_code=state.get("ExitCode"),
        labels=dict(config.get("Labels") or {}),
    )


def _raise_for_engine_status(response: requests.Response, operation: str) -> None:
    if response.status_code < 400:
        return
    try:
        message = response.json().get("message") or response.text
    except ValueError:
        message = response.text
    if response.status_code == 404:
        raise errors.EngineError(f"{operation} failed: the engine has no such image: {message}")
    raise errors.EngineError(
        f"{operation} failed: the engine returned status {response.status_code}: {message}",
        transient=response.status_code >= 500,
    )


def _translate_errors(docker_host: str, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `function` and turn docker-py and connection errors into EngineError."""
    try:
        return function(*args, **kwargs)
    except errors.SandboxBackupError:
        raise
    except docker.errors.NotFound as exc:
        raise errors.NotFound(f"the engine at {docker_host} has no such object: {exc.explanation or exc}") from exc
    except docker.errors.APIError as exc:
        status = exc.status_code or 500
        raise errors.EngineError(
            f"the engine at {docker_host} failed the request: {exc.explanation or exc}", transient=status >= 500
        ) from exc
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise errors.EngineError(
            f"the engine at {docker_host} did not respond: {exc}; check that the engine runs", transient=True
        ) from exc
    except docker.errors.DockerException as exc:
        raise errors.EngineError(f"the engine at {docker_host} failed the request: {exc}", transient=True) from exc
