"""Run one or more uvicorn servers in one event loop and stop them all on SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator

import uvicorn

logger = logging.getLogger(__name__)


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to `serve_all`, so several can share a loop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def make_server(app: object, *, host: str, port: int) -> EmbeddedServer:
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="on")
    return EmbeddedServer(config)


async def serve_all(*servers: EmbeddedServer) -> None:
    """Serve until a signal arrives or one server exits, then shut every server down."""
    loop = asyncio.get_running_loop()

    def request_exit(signum: int) -> None:
        logger.info("shutting down on signal", extra={"action": "shutdown_requested", "signal": signal.Signals(signum).name})
        for server in servers:
            server.should_exit = True

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, request_exit, signum)
    try:
        tasks = [asyncio.create_task(server.serve()) for server in servers]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for server in servers:
            server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            task.result()
        if any(not server.started for server in servers):
            raise RuntimeError("a server failed to start; see the log lines above (is its port already in use?)")
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
