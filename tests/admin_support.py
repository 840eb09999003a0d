"""Helpers for the admin-server tests: a routed byte-level origin, admin GETs, external tools.

Fault tokens are never spelled here: they come from `proxy.faults`.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import shutil
from collections import Counter
from typing import Any, NoReturn

import aiohttp
import orjson
import pytest

from proxy.telemetry.stats import layer_of

from support import OriginConnection

CHROMIUM = "/usr/bin/chromium"
PROMETHEUS = "/usr/bin/prometheus"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def missing_tool(reason: str) -> NoReturn:
    """Skip the test, or fail it when FAULTLINE_REQUIRE_TOOLS=1 (CI must run everything)."""
    if os.environ.get("FAULTLINE_REQUIRE_TOOLS") == "1":
        pytest.fail(f"{reason} (FAULTLINE_REQUIRE_TOOLS=1)")
    pytest.skip(reason)


def require_tool(path: str) -> str:
    """The tool's path (or the same name on PATH); else skip or fail, see `missing_tool`."""
    if os.access(path, os.X_OK):
        return path
    found = shutil.which(os.path.basename(path))
    if found:
        return found
    missing_tool(f"{path} is not installed")


def require_module(name: str) -> Any:
    """Import a Python module a test needs; else skip or fail, see `missing_tool`."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing_tool(f"Python module {name} is not installed ({exc})")


async def answer_by_path(conn: OriginConnection, request: bytes) -> bool:
    """Answer one request by its path; False when the connection was closed instead:
    /ok... 200; /boom 500; /missing 404; /hangup closes without a byte;
    /slow sleeps 0.5 s then answers; /truncated promises 1000 bytes, sends 100 and closes."""
    path = request.split(b" ", 2)[1]
    if path.startswith(b"/hangup"):
        conn.close()
        return False
    if path.startswith(b"/truncated"):
        conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)
        await conn.drain()
        await asyncio.sleep(0.05)
        conn.close()
        return False
    if path.startswith(b"/slow"):
        await asyncio.sleep(0.5)
        await conn.respond(200, b"slow")
    elif path.startswith(b"/boom"):
        await conn.respond(500, b"boom")
    elif path.startswith(b"/missing"):
        await conn.respond(404, b"missing")
    else:
        await conn.respond(200, b"ok")
    return True


async def routed_origin(conn: OriginConnection) -> None:
    """An origin that behaves by path (see `answer_by_path`), keep-alive."""
    while (request := await conn.read_request()) is not None:
        if not await answer_by_path(conn, request):
            return


async def admin_get(
    session: aiohttp.ClientSession, url: str, token: str | None = None, **headers: str
) -> tuple[int, dict[str, str], Any]:
    """GET an admin URL: (status, headers, JSON body or text)."""
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with session.get(url, headers=headers) as resp:
        body = await resp.read()
        ctype = resp.headers.get("Content-Type", "")
        doc: Any = orjson.loads(body) if "json" in ctype else body.decode()
        return resp.status, dict(resp.headers), doc


async def fetch(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, bytes]:
    async with session.get(url, **kwargs) as resp:
        return resp.status, await resp.read()


async def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll an async predicate until it returns something truthy (bounded)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await predicate()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s (last: {result!r})")
        await asyncio.sleep(interval)


Key = tuple[int, str, str | None]  # (status, source, error token) as the client saw it


def breakdowns(tally: Counter[Key]) -> dict[str, dict[str, int]]:
    """What /stats must say, computed from a client-side tally on its own (the oracle)."""
    out: dict[str, Counter[str]] = {
        name: Counter() for name in ("by_source", "by_layer", "by_error", "by_status", "by_class")
    }
    for (status, source, error), n in tally.items():
        out["by_source"][source] += n
        out["by_layer"][layer_of(error)] += n
        if error is not None:
            out["by_error"][error] += n
        out["by_status"][str(status)] += n
        out["by_class"][f"{status // 100}xx"] += n
    return {name: dict(c) for name, c in out.items()}
