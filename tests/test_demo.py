"""`faultline demo` end to end: started as a process (`python -m proxy demo`), every route
of the demo's ROUTES table requested through the proxy and attributed as the table says
(the client's status and Proxy-Status, the access log's source, error, layer, hop and
hints), the landing page linking every route, the banner's URLs, and a clean exit on
Ctrl-C (SIGINT)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.demo import ROUTES, DemoRoute

from support import LOOPBACK, ROOT, free_port, parse_responses, proxy_status_members

PROXY_NAME = "faultline-demo"  # the demo's proxy_name


class DemoProcess:
    def __init__(self, tmp: Path) -> None:
        self.port, self.admin_port = free_port(), free_port()
        self.stdout_path, self.stderr_path = tmp / "stdout", tmp / "stderr"
        self._out = open(self.stdout_path, "wb")  # noqa: SIM115 (closed in stop)
        self._err = open(self.stderr_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "proxy",
                "demo",
                "--listen",
                f"{LOOPBACK}:{self.port}",
                "--admin",
                f"{LOOPBACK}:{self.admin_port}",
            ],
            cwd=ROOT,
            stdout=self._out,
            stderr=self._err,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    async def wait_started(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while "Ctrl-C" not in self.stderr():
            assert self.proc.poll() is None, f"demo exited: {self.stderr()}"
            assert time.monotonic() < deadline, f"demo did not start: {self.stderr()}"
            await asyncio.sleep(0.05)

    def interrupt(self, timeout: float = 10) -> int | None:
        """Ctrl-C; the exit code, or None if it did not exit within `timeout`."""
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._out.close()
        self._err.close()

    def access_log(self) -> dict[str, dict[str, Any]]:
        lines = self.stdout_path.read_bytes().splitlines()
        records = [orjson.loads(line) for line in lines if line.startswith(b"{")]
        return {r["request_id"]: r for r in records}


@pytest.fixture
async def demo():
    with tempfile.TemporaryDirectory() as tmp:
        process = DemoProcess(Path(tmp))
        try:
            await process.wait_started()
            yield process
        finally:
            process.stop()


def request_id(index: int) -> str:
    return f"demo-route-{index:02d}"


async def raw_exchange(port: int, route: DemoRoute, rid: str) -> tuple[int | None, str, bool]:
    """(status, Proxy-Status, complete) as a client sees it; None: no status line came."""
    lines = [f"{route.method} {route.path} HTTP/1.1", "Host: demo.test", f"X-Request-Id: {rid}"]
    lines += [f"{name}: {value}" for name, value in route.request_headers]
    if not route.is_websocket:
        lines.append("Connection: close")
    if route.body or route.method != "GET":
        lines.append(f"Content-Length: {len(route.body)}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + route.body
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    data = b""
    try:
        writer.write(request)
        async with asyncio.timeout(15):
            while True:
                try:
                    chunk = await reader.read(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                data += chunk
                responses, _ = parse_responses(data, eof=False)
                if responses:
                    break  # complete (a refused upgrade leaves the connection open)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    responses, _ = parse_responses(data, eof=True)
    if responses:
        response = responses[0]
        return response.status, response.header("Proxy-Status") or "", True
    match = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    status_line = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    proxy_status = re.search(r"(?im)^Proxy-Status: (.*)$", status_line)
    return (
        int(match.group(1)) if match else None,
        proxy_status.group(1) if proxy_status else "",
        False,
    )


async def websocket_exchange(url: str, route: DemoRoute, rid: str) -> tuple[int, str, bool]:
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url + route.path, headers={"X-Request-Id": rid}) as ws:
            proxy_status = ws._response.headers.get("Proxy-Status", "")
            await ws.send_str("hello through the proxy")
            message = await ws.receive(timeout=10)
            assert message.data == "hello through the proxy"
            await ws.close()
    return 101, proxy_status, True


async def test_every_route_through_the_demo_is_attributed_and_ctrl_c_exits_cleanly(demo):
    # The banner: three URLs and something to try.
    banner = demo.stderr()
    assert f"{demo.url}/" in banner and f"{demo.admin_url}/dashboard" in banner
    assert re.search(r"origin\s+http://127\.0\.0\.1:\d+/", banner)
    assert "Try this:" in banner

    # The landing page, through the proxy, links every GET route.
    async with aiohttp.ClientSession() as session:
        async with session.get(demo.url + "/", headers={"X-Request-Id": "landing"}) as resp:
            assert resp.status == 200
            page = await resp.text()
    for route in ROUTES:
        if route.method == "GET" and not route.is_websocket:
            assert f'href="{route.path}"' in page, route.path

    # Every route, all at once (the slow ones take the demo's 2 s timeouts).
    async def one(index: int, route: DemoRoute) -> tuple[int | None, str, bool]:
        rid = request_id(index)
        if route.is_websocket and route.expect_status == 101:
            return await websocket_exchange(demo.url, route, rid)
        return await raw_exchange(demo.port, route, rid)

    seen = await asyncio.gather(*(one(i, route) for i, route in enumerate(ROUTES)))

    # Every exchange is recorded before Ctrl-C (the access log is flushed at exit too).
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + 10
        while True:
            async with session.get(demo.admin_url + "/stats") as resp:
                stats = await resp.json()
            if stats["requests"]["total"] >= len(ROUTES) + 1 and not stats["requests"]["in_flight"]:
                break
            assert time.monotonic() < deadline, stats["requests"]
            await asyncio.sleep(0.1)

    started = time.monotonic()
    code = demo.interrupt(timeout=10)
    assert code == 0, f"exit code {code} after SIGINT: {demo.stderr()}"
    assert time.monotonic() - started < 10
    assert "Traceback" not in demo.stderr()

    records = demo.access_log()
    assert len(records) == len(ROUTES) + 1  # each exchange logged once
    problems = []
    for index, (route, (status, proxy_status, complete)) in enumerate(
        zip(ROUTES, seen, strict=True)
    ):
        label = f"{route.method} {route.path}"
        record = records.get(request_id(index))
        if record is None:
            problems.append(f"{label}: no access-log line")
            continue
        logged = (record["source"], record["error"], record["layer"], record["hop"])
        expected = (route.expect_source, route.expect_error, route.expect_layer, route.hop)
        if logged != expected:
            problems.append(f"{label}: logged {logged}, expected {expected}")
        if tuple(record["hints"]) != route.expect_hints:
            problems.append(f"{label}: hints {record['hints']}, expected {route.expect_hints}")
        members = proxy_status_members(proxy_status) if proxy_status else []
        ours = members[-1] if members else ""
        if route.expect_status is None:
            # The origin's status went out, then the body broke: the client must see that.
            if complete or record["status"] != status:
                problems.append(f"{label}: complete={complete}, status {status}")
            continue
        if (status, record["status"]) != (route.expect_status, route.expect_status):
            problems.append(f"{label}: client got {status}, log {record['status']}")
        if not ours.startswith(f"{PROXY_NAME};"):
            problems.append(f"{label}: Proxy-Status {proxy_status!r}")
        elif route.expect_source == "proxy":
            if f"error={route.expect_error}" not in ours:
                problems.append(f"{label}: Proxy-Status {ours!r}")
        elif f"received-status={route.expect_status}" not in ours:
            problems.append(f"{label}: Proxy-Status {ours!r}")
        if route.hop == "payments-gateway" and not members[0].startswith("payments-gateway;"):
            problems.append(f"{label}: the gateway's own member is not first: {members}")
    assert problems == []


async def test_the_demo_shows_two_routes(demo):
    """The demo routes /api/ to a small demo API and the rest to the demo origin's pages
    (issue 21): a newcomer's first clicks fill two rows of /stats by_route."""
    assert "route api, /api/" in demo.stderr()
    async with aiohttp.ClientSession() as session:
        async with session.get(demo.url + "/api/users/1") as resp:
            assert resp.status == 200
            assert (await resp.json())["name"] == "ada"
            assert "faultline-demo; received-status=200" in resp.headers["Proxy-Status"]
        async with session.get(demo.url + "/api/users/99") as resp:
            assert resp.status == 404  # the API's own 404
        async with session.get(demo.url + "/hello") as resp:
            assert resp.status == 200
        async with session.get(demo.admin_url + "/stats") as resp:
            stats = await resp.json()
    routes = stats["by_route"]
    assert set(routes) == {"api", "pages"}
    assert routes["api"]["responses"]["by_status"] == {"200": 1, "404": 1}
    assert routes["api"]["responses"]["by_source"] == {"origin": 2}
    assert routes["pages"]["requests"]["total"] == 1
    assert demo.interrupt(timeout=10) == 0
