"""Reading of the JSON progress stream that the engine returns for a push or a pull.

docker-py does not raise when a push or pull fails: the engine responds with status 200 and reports
the failure as an `{"error": ..., "errorDetail": {"message": ...}}` item in the stream.
The pushed manifest digest comes as `{"aux": {"Digest": ...}}` from Docker, and only as
the status text `TAG: digest: sha256:... size: N` from Podman (checked on Podman 4.3).
"""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import requests

from sandbox_backup.runner.failures import FailureKind, RegistryTransferError, classify_registry_message

_STATUS_DIGEST_RE = re.compile(r"digest: (sha256:[0-9a-f]{64})")


def decode_stream(lines: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """Yield each JSON object of a newline-delimited engine stream; skip blank lines."""
    for line in lines:
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RegistryTransferError(
                f"the engine sent a progress line that is not JSON: {line[:200]!r}", kind=FailureKind.UNKNOWN
            ) from exc
        if isinstance(item, dict):
            yield item


def stream_error(item: dict[str, Any]) -> str | None:
    """Return the error message of a stream item, or None for a progress item."""
    detail = item.get("errorDetail")
    if isinstance(detail, dict) and detail.get("message"):
        return str(detail["message"])
    if item.get("error"):
        return str(item["error"])
    return None


def stream_digest(item: dict[str, Any]) -> str | None:
    """Return the manifest digest that a push stream item announces, or None."""
    aux = item.get("aux")
    if isinstance(aux, dict) and aux.get("Digest"):
        return str(aux["Digest"])
    match = _STATUS_DIGEST_RE.search(str(item.get("status") or ""))
    return match.group(1) if match else None


def read_push_stream(items: Iterable[dict[str, Any]], reference: str) -> str | None:
    """Consume a push stream and return the pushed digest, or None if the engine sent none.

    Raises RegistryTransferError on the first error item.
    """
    digest = None
    for item in items:
        message = stream_error(item)
        if message is not None:
            kind = classify_registry_message(message)
            raise RegistryTransferError(f"push of {reference} failed: {message}", kind=kind)
        digest = stream_digest(item) or digest
    return digest


def read_pull_stream(items: Iterable[dict[str, Any]], reference: str) -> None:
    """Consume a pull stream; raise RegistryTransferError on the first error item."""
    for item in items:
        message = stream_error(item)
        if message is not None:
            kind = classify_registry_message(message)
            raise RegistryTransferError(f"pull of {reference} failed: {message}", kind=kind)


class StreamAbort:
    """Abort handle for one streaming engine request, safe to call from another thread.

    `abort()` shuts the request's socket down, which wakes the thread that is blocked
    reading the stream and makes the engine drop the push (Podman 4.3 does not finish a
    push whose client went away). An abort before the request starts is kept and applied
    as soon as the response is attached.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._response: requests.Response | None = None
        self._aborted = False

    @property
    def aborted(self) -> bool:
        return self._aborted

    def attach(self, response: requests.Response) -> None:
        with self._lock:
            self._response = response
            if self._aborted:
                _shut_down(response)

    def detach(self) -> None:
        with self._lock:
            self._response = None

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            if self._response is not None:
                _shut_down(self._response)


def _shut_down(response: requests.Response) -> None:
    # urllib3 2 exposes the connection of a streaming response; its `sock` is the unix or
    # TCP socket to the engine. shutdown() wakes a blocked recv(), unlike close().
    connection = getattr(response.raw, "connection", None)
    sock = getattr(connection, "sock", None)
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by the reading thread
