"""Container discovery: the agent reports its sandboxes to the manager, for fleets with no platform.

Every container that carries the agent's label (`container_label=true`) is a sandbox whose id
is the container name. The agent sends the manager:
- a full inventory, `PUT {manager_url}/api/v1/runners/{runner_id}/sandboxes`, after each
  connect to the engine's event stream (events may have been missed while it was down) and
  every `inventory_interval_s`;
- each state change between inventories, `POST .../sandbox-events`, read from the engine's
  event stream (`GET /events`) in a worker thread.

One task sends both kinds in the order they were queued, and each inventory is listed when it
is sent, so the manager ends with the newest state. A message dropped after its retries is
covered by the next inventory. Nothing here runs in a request handler of the agent's API.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Any

import docker
import docker.errors
import httpx
import pydantic
import requests

from sandbox_backup import errors
from sandbox_backup.runner.engine import ContainerView, DockerEngine
from sandbox_backup.runner.settings import RunnerSettings

logger = logging.getLogger(__name__)

ORGANIZATION_LABEL = "sandbox-backup.organization-id"
EPHEMERAL_LABEL = "sandbox-backup.ephemeral"
# Only labels in this namespace are sent, and none whose key names a credential, so labels
# such as a registry password set by an operator never leave the runner.
REPORTED_LABEL_PREFIX = "sandbox-backup."
SECRET_KEY_WORDS = ("token", "password", "passwd", "secret", "credential", "auth", "key")

# Engine event actions that change a sandbox. Docker sends kill, die, stop and destroy;
# Podman 4.3's compatible API sends stop, die, cleanup and remove. pause and unpause are
# ignored because the agent pauses a container only for the seconds of a commit.
EVENT_ACTIONS = {"start": "started", "die": "stopped", "stop": "stopped", "destroy": "destroyed", "remove": "destroyed"}
# A rename changes the sandbox id, which only a new inventory shows completely.
INVENTORY_ACTIONS = frozenset({"rename"})

# Engine statuses (Docker's, and Podman's through its compatible API) that count as running.
RUNNING_STATUSES = frozenset({"running", "paused", "restarting"})
STOPPED_STATUSES = frozenset({"created", "configured", "exited", "stopped", "stopping", "dead"})

MAX_RECONNECT_DELAY_S = 30.0
# A stream that stayed open this long resets the reconnect delay to its first value.
STABLE_STREAM_S = 60.0
VERSION_CALL_TIMEOUT_S = 30.0
THREAD_JOIN_TIMEOUT_S = 5.0
HTTP_TIMEOUT_S = 60.0
# Events queued while the manager is slow; past this, events are dropped and an inventory is queued.
OUTBOX_SIZE = 10_000
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclasses.dataclass(frozen=True)
class SandboxMessage:
    """One sandbox as sent to the manager: an inventory entry (`state`) or an event (`event`)."""

    sandbox_id: str
    organization_id: str | None
    ephemeral: bool
    labels: dict[str, str]
    state: str | None = None
    event: str | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"sandboxId": self.sandbox_id, "ephemeral": self.ephemeral}
        if self.state is not None:
            body["state"] = self.state
        if self.event is not None:
            body["event"] = self.event
        if self.organization_id is not None:
            body["organizationId"] = self.organization_id
        if self.labels:
            body["labels"] = self.labels
        return body


class _InventoryRequest:
    """Outbox item: list the managed containers and send them all."""


_INVENTORY = _InventoryRequest()


def reported_labels(labels: dict[str, str]) -> dict[str, str]:
    """Return the labels that may be sent to the manager: sandbox-backup.* without credential-like keys."""
    reported = {}
    for key, value in labels.items():
        lowered = key.lower()
        if lowered.startswith(REPORTED_LABEL_PREFIX) and not any(word in lowered for word in SECRET_KEY_WORDS):
            reported[key] = value
    return reported


def describe(name: str, labels: dict[str, str], default_organization_id: str | None) -> SandboxMessage:
    """Build the message fields of a container from its name and labels (or event attributes)."""
    organization = labels.get(ORGANIZATION_LABEL) or default_organization_id or None
    ephemeral = labels.get(EPHEMERAL_LABEL, "").strip().lower() == "true"
    return SandboxMessage(sandbox_id=name, organization_id=organization, ephemeral=ephemeral, labels=reported_labels(labels))


def inventory_state(container: ContainerView) -> str | None:
    """Return STARTED or STOPPED for a container, or None while it is being removed or unknown."""
    if container.status in RUNNING_STATUSES:
        return "STARTED"
    if container.status in STOPPED_STATUSES:
        return "STOPPED"
    return None


class SandboxDiscovery:
    """Reporter that keeps the manager's list of this runner's sandboxes current.

    start() and aclose() must run on the agent's event loop.
    """

    def __init__(self, settings: RunnerSettings, engine: DockerEngine) -> None:
        if not settings.manager_url:
            raise ValueError("container discovery needs manager_url; set SANDBOX_BACKUP_RUNNER_MANAGER_URL")
        base = f"{settings.manager_url.rstrip('/')}/api/v1/runners/{settings.runner_id}"
        self._inventory_url = f"{base}/sandboxes"
        self._events_url = f"{base}/sandbox-events"
        self._runner_id = settings.runner_id
        self._engine = engine
        self._default_organization_id = settings.default_organization_id or None
        self._inventory_interval_s = settings.inventory_interval_s
        self._reconnect_delay_s = settings.event_reconnect_backoff_s
        self._link = _ManagerLink(settings.token, retries=settings.report_retries, backoff_s=settings.report_backoff_s)

        # Unbounded, so an inventory request always fits. _queue_event caps the number of events.
        self._outbox: asyncio.Queue[SandboxMessage | _InventoryRequest] = asyncio.Queue()
        self._inventory_queued = False
        # Last event the manager accepted per sandbox, so the die and stop events of one stop send one message.
        self._last_sent: dict[str, str] = {}
        self._warned_skips: set[str] = set()
        self._stream: _EngineEventStream | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start following the engine and sending to the manager in background tasks."""
        for name, job in (("follow-engine", self._follow_engine), ("send", self._send_loop), ("inventory-timer", self._inventory_timer)):
            task = asyncio.get_running_loop().create_task(job(), name=f"discovery:{name}")
            task.add_done_callback(_log_task_end)
            self._tasks.append(task)
        logger.info(
            "container discovery started: reporting containers labelled %s=true to %s",
            self._engine.container_label,
            self._inventory_url,
            extra={"action": "discovery_start", "runner_id": self._runner_id},
        )

    async def aclose(self) -> None:
        """Stop the tasks and the event stream. Messages not yet sent are dropped."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._stream is not None:
            await self._stream.aclose()
            self._stream = None
        await self._link.aclose()
        logger.info("container discovery stopped", extra={"action": "discovery_stop", "runner_id": self._runner_id})

    def request_inventory(self) -> None:
        """Queue one full inventory, unless one is already queued."""
        if self._inventory_queued:
            return
        self._inventory_queued = True
        self._outbox.put_nowait(_INVENTORY)

    # Engine side.

    async def _follow_engine(self) -> None:
        delay = self._reconnect_delay_s
        failures = 0
        while True:
            stream = _EngineEventStream(self._engine.docker_host, self._engine.container_label, self._on_engine_event)
            self._stream = stream
            try:
                await stream.open()
            except errors.EngineError as exc:
                failures += 1
                logger.warning(
                    "opening the engine's event stream failed (attempt %d): %s; retrying in %.1f s",
                    failures, exc, delay,
                    extra={"action": "discovery_connect", "runner_id": self._runner_id, "docker_host": self._engine.docker_host},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RECONNECT_DELAY_S)
                continue

            failures = 0
            logger.info("following the engine's container events", extra={"action": "discovery_connected", "runner_id": self._runner_id})
            self.request_inventory()
            opened_at = asyncio.get_running_loop().time()
            reason = await stream.wait_closed()
            await stream.aclose()

            if asyncio.get_running_loop().time() - opened_at >= STABLE_STREAM_S:
                delay = self._reconnect_delay_s
            logger.warning(
                "the engine's event stream ended: %s; reconnecting in %.1f s", reason, delay,
                extra={"action": "discovery_disconnected", "runner_id": self._runner_id, "docker_host": self._engine.docker_host},
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RECONNECT_DELAY_S)

    def _on_engine_event(self, event: dict[str, Any]) -> None:
        """Turn one engine event into an outbox message. Runs on the event loop."""
        action = str(event.get("Action") or event.get("status") or "")
        attributes = (event.get("Actor") or {}).get("Attributes") or {}
        name = str(attributes.get("name") or "")
        if event.get("Type", "container") != "container" or not name:
            return
        if attributes.get(self._engine.container_label) != "true":
            return  # the engine ignored the label filter

        if action in INVENTORY_ACTIONS:
            self.request_inventory()
            return
        kind = EVENT_ACTIONS.get(action)
        if kind is None:
            return
        message = dataclasses.replace(describe(name, attributes, self._default_organization_id), event=kind)
        self._queue_event(message)

    def _queue_event(self, message: SandboxMessage) -> None:
        if self._outbox.qsize() >= OUTBOX_SIZE:
            # The inventory is listed when it is sent, so it carries the state of every dropped event.
            if not self._inventory_queued:
                logger.warning(
                    "discovery outbox contains %d messages because the manager is slow or unreachable; new events "
                    "are dropped and an inventory is queued to replace them",
                    OUTBOX_SIZE,
                    extra={"action": "discovery_outbox_full", "runner_id": self._runner_id},
                )
            self.request_inventory()
            return
        self._outbox.put_nowait(message)

    async def _inventory_timer(self) -> None:
        while True:
            await asyncio.sleep(self._inventory_interval_s)
            self.request_inventory()

    # Manager side.

    async def _send_loop(self) -> None:
        while True:
            item = await self._outbox.get()
            if isinstance(item, _InventoryRequest):
                self._inventory_queued = False
                await self._send_inventory()
            else:
                await self._send_event(item)

    async def _send_inventory(self) -> None:
        extra = {"action": "discovery_inventory", "runner_id": self._runner_id}
        try:
            containers = await self._engine.list_managed()
        except errors.EngineError as exc:
            logger.warning("listing the managed containers failed: %s; the next reconnect or interval sends the inventory", exc, extra=extra)
            return

        entries = []
        for container in containers:
            state = inventory_state(container)
            if state is not None:
                entries.append(dataclasses.replace(describe(container.name, container.labels, self._default_organization_id), state=state))
        result = await self._link.send("PUT", self._inventory_url, {"sandboxes": [entry.to_json() for entry in entries]}, description="inventory", extra=extra)
        if result is None:
            return

        self._last_sent = {entry.sandbox_id: "started" if entry.state == "STARTED" else "stopped" for entry in entries}
        self._warn_skipped(result)
        logger.info("inventory of %d sandbox(es) sent to the manager", len(entries), extra={**extra, "sandboxes": len(entries)})

    async def _send_event(self, message: SandboxMessage) -> None:
        if self._last_sent.get(message.sandbox_id) == message.event:
            return
        extra = {"action": "discovery_event", "runner_id": self._runner_id, "sandbox_id": message.sandbox_id, "event": message.event}
        result = await self._link.send("POST", self._events_url, message.to_json(), description=f"{message.event} event of {message.sandbox_id}", extra=extra)
        if result is None:
            self.request_inventory()
            return

        if message.event == "destroyed":
            self._last_sent.pop(message.sandbox_id, None)
        else:
            self._last_sent[message.sandbox_id] = str(message.event)
        self._warn_skipped(result)
        logger.info("%s event of sandbox %s sent to the manager", message.event, message.sandbox_id, extra=extra)

    def _warn_skipped(self, result: dict[str, Any]) -> None:
        """Log each sandbox the manager skipped, once per sandbox id for the agent's lifetime."""
        for skipped in result.get("skipped") or []:
            sandbox_id = str(skipped.get("sandboxId", ""))
            if sandbox_id in self._warned_skips:
                continue
            self._warned_skips.add(sandbox_id)
            logger.warning(
                "the manager skipped sandbox %r: %s", sandbox_id, skipped.get("reason"),
                extra={"action": "discovery_skipped", "runner_id": self._runner_id, "sandbox_id": sandbox_id},
            )


class _EngineEventStream:
    """One connection to the engine's container events, read by a worker thread.

    `on_event` runs on the event loop for each decoded event. close() may be called at any
    time, also while open() is still connecting in its worker thread.
    """

    def __init__(self, docker_host: str, container_label: str, on_event: Callable[[dict[str, Any]], None]) -> None:
        self._docker_host = docker_host
        self._filters = {"type": "container", "label": f"{container_label}=true"}
        self._on_event = on_event
        self._guard = threading.Lock()
        self._closed = False
        self._client: docker.APIClient | None = None
        self._stream: Any = None
        self._thread: threading.Thread | None = None
        self._ended: asyncio.Future[str] | None = None

    async def open(self) -> None:
        """Connect and start the reader thread. Raise EngineError when the engine does not respond."""
        loop = asyncio.get_running_loop()
        self._ended = loop.create_future()
        try:
            await asyncio.to_thread(self._connect)
        except (docker.errors.DockerException, requests.RequestException) as exc:
            raise errors.EngineError(f"the engine at {self._docker_host} did not open its event stream: {exc}", transient=True) from exc
        self._thread = threading.Thread(target=self._read, args=(loop,), name="engine-events", daemon=True)
        self._thread.start()

    async def wait_closed(self) -> str:
        """Wait until the stream ends and return the reason."""
        assert self._ended is not None, "open() must succeed before wait_closed()"
        return await self._ended

    def close(self) -> None:
        """End the stream, which makes the reader thread end."""
        with self._guard:
            self._closed = True
            stream, self._stream = self._stream, None
        if stream is not None:
            _close_quietly(stream.close)

    async def aclose(self) -> None:
        """Close the stream and wait for the reader thread to end."""
        self.close()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, THREAD_JOIN_TIMEOUT_S)

    def _connect(self) -> None:
        client = docker.APIClient(base_url=self._docker_host, version="auto", timeout=VERSION_CALL_TIMEOUT_S)
        try:
            # docker-py 7 reads the event stream with no timeout, because it stays silent while nothing changes.
            # NOTE: so a TCP connection to a remote engine that dies silently is never noticed here.
            # Only the periodic inventory then keeps the manager current.
            stream = client.events(decode=True, filters=self._filters)
        except BaseException:
            client.close()
            raise
        with self._guard:
            if not self._closed:
                self._client, self._stream = client, stream
                return
        # close() ran while this thread was connecting, so no reader thread will use this stream.
        _close_quietly(stream.close)
        client.close()

    def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        reason = "the engine closed the stream"
        with self._guard:
            stream = self._stream
        try:
            for event in stream or ():
                loop.call_soon_threadsafe(self._on_event, event)
        # Any failure while reading ends only this connection: the follower reconnects.
        except Exception as exc:  # noqa: BLE001
            reason = f"reading failed: {type(exc).__name__}: {exc}"
        finally:
            if self._client is not None:
                self._client.close()
            if self._closed:
                reason = "closed by the agent"
            _call_soon(loop, _resolve, self._ended, reason)


class _ManagerLink:
    """HTTP client for the discovery endpoints, with the runner token and retries."""

    def __init__(self, token: pydantic.SecretStr, *, retries: int, backoff_s: float) -> None:
        self._token = token
        self._retries = retries
        self._backoff_s = backoff_s
        self._http = httpx.AsyncClient(timeout=HTTP_TIMEOUT_S)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def send(self, method: str, url: str, body: dict[str, Any], *, description: str, extra: dict[str, Any]) -> dict[str, Any] | None:
        """Send `body` and retry transient failures. Return the response body, or None once dropped."""
        attempts = self._retries + 1
        delay = self._backoff_s
        for attempt in range(1, attempts + 1):
            outcome = await self._send_once(method, url, body)
            if isinstance(outcome, dict):
                return outcome

            message, retryable = outcome
            if not retryable or attempt == attempts:
                logger.error("%s dropped after %d attempt(s): %s; the next inventory carries the state", description, attempt, message, extra=extra)
                return None
            logger.warning("%s: attempt %d of %d failed: %s; retrying in %.1f s", description, attempt, attempts, message, delay, extra=extra)
            await asyncio.sleep(delay)
            delay *= 2
        return None

    async def _send_once(self, method: str, url: str, body: dict[str, Any]) -> dict[str, Any] | tuple[str, bool]:
        """Return the response body on success, else the failure message and whether to retry."""
        headers = {"Authorization": f"Bearer {self._token.get_secret_value()}"}
        try:
            response = await self._http.request(method, url, json=body, headers=headers)
        except httpx.HTTPError as exc:
            return f"{method} {url} failed: {type(exc).__name__}: {exc}", True

        if response.status_code == 401:
            return f"{method} {url} answered 401: the manager does not know this runner's token; register the runner with it", False
        if not response.is_success:
            return f"{method} {url} answered {response.status_code}: {response.text[:300]}", response.status_code in RETRY_STATUSES
        try:
            parsed = response.json()
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}


def _close_quietly(close: Callable[[], None]) -> None:
    try:
        close()
    except (OSError, docker.errors.DockerException, AttributeError) as exc:
        # The socket is already closed, so there is nothing left to close.
        logger.debug("closing the engine event stream failed: %s", exc, extra={"action": "discovery_close"})


def _resolve(future: asyncio.Future[str] | None, reason: str) -> None:
    if future is not None and not future.done():
        future.set_result(reason)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass  # the loop is closed, so no coroutine waits for this stream any more


def _log_task_end(task: asyncio.Task[Any]) -> None:
    if task.cancelled() or task.exception() is None:
        return
    logger.error(
        "container discovery task %s failed; discovery stops until the agent restarts",
        task.get_name(),
        exc_info=task.exception(),
        extra={"action": "discovery_task_failed"},
    )
