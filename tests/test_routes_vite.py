"""Routes with a real Vite dev server (issue 21): the pages and the HMR WebSocket through
the `web` route, a small HTTP API beside it under `/api/`.

tests/vite-app is a Vite project (`npm ci` there installs Vite; .ci/run does it). The test
runs its dev server on a copy (the test edits a file of it), the API as an aiohttp app, the
proxy in this process; everything on 127.0.0.1. It shows: the pages load, the HMR socket
connects and receives the update when a file changes, the API answers; with the API
stopped its route's requests get connection_refused (502, source proxy) while the pages
keep loading; `/stats` `by_route` equals the client's own tally.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from admin_support import missing_tool
from aiohttp import web

from proxy.config import load_config
from proxy.server import ProxyServer

from support import LOOPBACK, ROOT, LogCapture, free_port

APP = ROOT / "tests" / "vite-app"
VITE = APP / "node_modules" / "vite" / "bin" / "vite.js"


@pytest.fixture
async def vite(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """A Vite dev server on a copy of tests/vite-app: its URL and the copy's directory."""
    node = shutil.which("node")
    if node is None or not VITE.exists():
        missing_tool("Vite is not installed: run `npm ci` in tests/vite-app")
    assert node is not None
    copy = tmp_path / "app"
    shutil.copytree(APP, copy, ignore=shutil.ignore_patterns("node_modules"))
    (copy / "node_modules").symlink_to(APP / "node_modules")
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        node,
        str(copy / "node_modules" / "vite" / "bin" / "vite.js"),
        "--port",
        str(port),
        "--clearScreen",
        "false",
        cwd=copy,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://{LOOPBACK}:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(300):  # up to 30 s: the first start optimises dependencies
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(url + "/") as response:
                        if response.status == 200:
                            break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("the Vite dev server did not start in 30 s")
        yield url, copy
    finally:
        process.terminate()
        with contextlib.suppress(ProcessLookupError):
            await asyncio.wait_for(process.wait(), 10)


async def _start_api() -> tuple[web.AppRunner, str]:
    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"message": "hello from the API"})

    app = web.Application()
    app.router.add_get("/api/hello", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://{LOOPBACK}:{port}"


async def test_vite_pages_hmr_and_an_api_behind_one_port(vite: tuple[str, Path]) -> None:
    vite_url, app_dir = vite
    api, api_url = await _start_api()
    config = load_config(
        env={},
        flags={
            ("listen",): f"{LOOPBACK}:0",
            ("admin", "listen"): f"{LOOPBACK}:0",
            ("log", "format"): "json",
            ("routes",): [
                {"name": "api", "path_prefix": "/api/", "upstream": api_url},
                {"name": "web", "path_prefix": "/", "upstream": vite_url},
            ],
        },
    )
    server = ProxyServer(config, access_stream=LogCapture())
    await server.start()
    assert server.listen_address is not None
    proxy = f"http://{LOOPBACK}:{server.listen_address[1]}"
    tally: collections.Counter[tuple[str, int]] = collections.Counter()

    async def get(session: aiohttp.ClientSession, path: str, route: str) -> tuple[int, str]:
        async with session.get(proxy + path) as response:
            body = await response.text()
            tally[(route, response.status)] += 1
            return response.status, body

    try:
        async with aiohttp.ClientSession() as session:
            status, page = await get(session, "/", "web")
            assert status == 200 and "pages from Vite" in page and "/@vite/client" in page
            status, script = await get(session, "/src/main.js", "web")
            assert status == 200 and "style.css" in script
            status, _ = await get(session, "/src/style.css", "web")
            assert status == 200
            status, body = await get(session, "/api/hello", "api")
            assert (status, json.loads(body)) == (200, {"message": "hello from the API"})
            status, client = await get(session, "/@vite/client", "web")
            assert status == 200
            token = re.search(r'const wsToken = "([^"]+)"', client)
            assert token is not None, "no HMR token in /@vite/client"

            # The HMR socket, through the proxy, then a change to a file.
            ws_url = f"{proxy}/?token={token.group(1)}"
            async with session.ws_connect(ws_url, protocols=("vite-hmr",)) as ws:
                assert (await _message(ws))["type"] == "connected"
                (app_dir / "src" / "style.css").write_text("#app { color: teal; }\n")
                update = await _message(ws, lambda m: m["type"] in ("update", "full-reload"))
                if update["type"] == "update":
                    paths = [u["path"] for u in update["updates"]]
                    assert "/src/style.css" in paths, update
            tally[("web", 101)] += 1

            # The API goes away: its route fails alone, charged to the proxy's connect.
            await api.cleanup()
            async with session.get(proxy + "/api/hello") as response:
                assert response.status == 502
                assert "error=connection_refused" in response.headers["Proxy-Status"]
                tally[("api", 502)] += 1
            status, page = await get(session, "/", "web")
            assert status == 200 and "pages from Vite" in page

        for _ in range(100):
            if not server.telemetry.stats.in_flight:  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.05)
        server.settle()
        stats = server.telemetry.stats.snapshot(proxy={})  # type: ignore[union-attr]
        by_route = stats["by_route"]
        for route in ("api", "web"):
            ours = {str(s): n for (r, s), n in sorted(tally.items()) if r == route}
            assert by_route[route]["responses"]["by_status"] == ours, route
            assert by_route[route]["requests"]["total"] == sum(ours.values())
        assert by_route["api"]["responses"]["by_error"] == {"connection_refused": 1}
        assert by_route["api"]["responses"]["by_source"] == {"origin": 1, "proxy": 1}
        assert stats["requests"]["total"] == sum(tally.values())
    finally:
        await server.close()
        with contextlib.suppress(Exception):
            await api.cleanup()


async def _message(ws: Any, wanted: Any = None, timeout_s: float = 15.0) -> dict[str, Any]:
    """The next JSON message on Vite's HMR socket (that `wanted` accepts)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        left = deadline - asyncio.get_running_loop().time()
        message = await ws.receive(timeout=max(left, 0.01))
        assert message.type == aiohttp.WSMsgType.TEXT, message
        data = json.loads(message.data)
        if data.get("type") == "ping":
            continue
        if wanted is None or wanted(data):
            return data
