"""`servers.run` and `make_server` pick the event loop and HTTP parser the settings name."""

from __future__ import annotations

import asyncio

import pytest

from sandbox_backup import servers


def _loop_module(event_loop: str) -> str:
    seen: list[str] = []

    async def record() -> None:
        seen.append(type(asyncio.get_running_loop()).__module__)

    servers.run(record(), event_loop)
    return seen[0]


@pytest.mark.parametrize(("event_loop", "module"), [("auto", "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio")])
def test_run_uses_named_event_loop(event_loop: str, module: str) -> None:
    assert _loop_module(event_loop).split(".")[0] == module


def test_run_without_uvloop_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(servers, "uvloop", None)

    assert _loop_module("auto").split(".")[0] == "asyncio"
    with pytest.raises(RuntimeError, match="uvloop package is not installed"):
        _loop_module("uvloop")


@pytest.mark.parametrize("parser", ["auto", "httptools", "h11"])
def test_make_server_passes_http_parser(parser: str) -> None:
    server = servers.make_server(object(), host="127.0.0.1", port=1, http_parser=parser)

    assert server.config.http == parser
