"""Run one or more uvicorn servers in one event loop and stop them all on SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

import uvicorn

try:
    import uvloop
except ImportError:  # uvloop has no Windows build. asyncio's own loop runs the same code, with more CPU.
    uvloop = None

logger = logging.getLogger(__name__)


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to `serve_all`, so several can share a loop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def make_server(app: object, *, host: str, port: int, http_parser: str = "auto") -> EmbeddedServer:
    """Build a uvicorn server; `http_parser` is uvicorn's `http` option (auto, httptools or h11)."""
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="on", http=http_parser)
    return EmbeddedServer(config)


def run(main: Coroutine[Any, Any, None], event_loop: str = "auto") -> None:
    """Run `main` to completion on a new event loop: uvloop for "uvloop", and for "auto" when it is installed."""
    if event_loop == "uvloop" and uvloop is None:
        main.close()
        raise RuntimeError("event_loop is uvloop but the uvloop package is not installed; install it or set event_loop to auto")
    if event_loop != "asyncio" and uvloop is not None:
        uvloop.run(main)
    else:
        asyncio.run(main)


# Reports carry the outcome of work that is already running, so a draining manager still records them.
_ALWAYS_ACCEPTED_WRITES = re.compile(r"^/api/v1/runners/[^/]+/reports$")
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class RejectWritesWhileDraining:
    """ASGI middleware that returns 503 to mutating HTTP requests while `is_draining()` is true.

    GET, HEAD and OPTIONS requests and runner reports pass through.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], is_draining: Callable[[], bool]) -> None:
        self.app = app
        self.is_draining = is_draining

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        if (
            scope["type"] != "http"
            or not self.is_draining()
            or scope["method"] in _READ_METHODS
            or _ALWAYS_ACCEPTED_WRITES.match(scope["path"])
        ):
            await self.app(scope, receive, send)
            return
        body = json.dumps({"detail": "the manager is shutting down; retry against another replica or after the restart"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"retry-after", b"5")],
            }
        )
        await send({"type": "http.response.body", "body": body})


async def serve_all(*servers: EmbeddedServer, before_exit: Callable[[], Awaitable[None]] | None = None) -> None:
    """Serve until a signal arrives or one server exits, then shut every server down.

    On the first signal `before_exit` runs while the servers still serve requests, so a
    service can drain. The servers stop when it returns. A second signal stops them at once.
    """
    loop = asyncio.get_running_loop()
    draining: asyncio.Task[None] | None = None

    def stop_servers() -> None:
        for server in servers:
            server.should_exit = True

    async def drain_then_stop() -> None:
        try:
            assert before_exit is not None
            await before_exit()
        except Exception:
            logger.exception("draining before shutdown failed; stopping the servers now", extra={"action": "shutdown_drain_failed"})
        finally:
            stop_servers()

    def request_exit(signum: int) -> None:
        nonlocal draining
        logger.info("shutting down on signal", extra={"action": "shutdown_requested", "signal": signal.Signals(signum).name})
        if before_exit is None or draining is not None:
            stop_servers()
            return
        draining = asyncio.create_task(drain_then_stop(), name="drain-before-exit")

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, request_exit, signum)
    try:
        tasks = [asyncio.create_task(server.serve()) for server in servers]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        stop_servers()
        await asyncio.gather(*tasks, return_exceptions=True)
        if draining is not None and not draining.done():
            # A second signal stopped the servers before the drain ended; the caller's own
            # close path cancels what is left.
            draining.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await draining
        for task in done:
            task.result()
        if any(not server.started for server in servers):
            raise RuntimeError("a server failed to start; see the log lines above (is its port already in use?)")
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
