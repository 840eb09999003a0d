"""Shared fixtures: uvloop for every async test (the product's loop), the proxy, origins."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvloop
from h2_origin import Answer, H2Server
from hostile_support import RecordingOrigin

from support import RunningProxy, Script, ScriptedOrigin, start_proxy


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Any]:
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
async def proxy_factory() -> AsyncIterator[Callable[..., Awaitable[RunningProxy]]]:
    """Start proxies in this test's loop; all are closed at the end."""
    started: list[RunningProxy] = []

    async def factory(upstream: str, **overrides: Any) -> RunningProxy:
        proxy = await start_proxy(upstream, **overrides)
        started.append(proxy)
        return proxy

    yield factory
    for proxy in started:
        await proxy.server.close()


@pytest.fixture
async def origin_factory() -> AsyncIterator[Callable[[Script], Awaitable[ScriptedOrigin]]]:
    """Start byte-level scripted origins; all are closed at the end."""
    started: list[ScriptedOrigin] = []

    async def factory(script: Script) -> ScriptedOrigin:
        origin = await ScriptedOrigin(script).start()
        started.append(origin)
        return origin

    yield factory
    for origin in started:
        await origin.close()


@pytest.fixture
async def h2_server() -> AsyncIterator[Callable[..., Awaitable[H2Server]]]:
    """Start scripted HTTP/2 origins (`h2_origin.H2Server`); all are closed at the end."""
    started: list[H2Server] = []

    async def factory(answer: Answer, max_streams: int | None = None, **options) -> H2Server:
        server = await H2Server(answer, max_streams, **options).start()
        started.append(server)
        return server

    yield factory
    for server in started:
        await server.close()


@pytest.fixture
async def recording() -> AsyncIterator[RecordingOrigin]:
    """An origin that records every byte and answers 200 `from-app!` (hostile_support)."""
    origin = await RecordingOrigin().start()
    yield origin
    await origin.close()
