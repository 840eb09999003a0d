"""Routes (issue 21): several upstreams behind one port, first match wins.

Real origins on 127.0.0.1 (aiohttp apps that say who they are and what they received), the
proxy in this process, real clients:
- path prefixes on segment boundaries, Host (exact and `*.suffix`), `strip_prefix`;
- `upstream` as the default route, and without it a proxy-made 404 destination_not_found
  naming the routes;
- a route's upstream down: its requests get connection_refused with its own next-hop, the
  other routes keep answering;
- a route's own timeouts and proxy_name; a WebSocket and an HTTP/2 client follow routes.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.config import load_config
from proxy.server import ProxyServer

from support import LOOPBACK, ROOT, LogCapture, RunningProxy, curl, proxy_status_members


class Origin:
    def __init__(self, name: str, runner: web.AppRunner, port: int) -> None:
        self.name = name
        self.runner = runner
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def authority(self) -> str:
        return f"{LOOPBACK}:{self.port}"


async def _start_origin(name: str) -> Origin:
    async def who(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/ws"):
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for message in ws:
                await ws.send_str(f"{name}:{message.data}")
            return ws
        if request.path.endswith("/sse"):
            stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await stream.prepare(request)
            for n in range(3):
                await stream.write(f"data: {name} {n}\n\n".encode())
                await asyncio.sleep(0.05)
            await stream.write_eof()
            return stream
        delay = float(request.query.get("delay", "0"))
        if delay:
            await asyncio.sleep(delay)
        return web.json_response({"origin": name, "target": request.path_qs, "host": request.host})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", who)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return Origin(name, runner, port)


@pytest.fixture
async def origins() -> AsyncIterator[Callable[[str], Awaitable[Origin]]]:
    started: list[Origin] = []

    async def start(name: str) -> Origin:
        origin = await _start_origin(name)
        started.append(origin)
        return origin

    yield start
    for origin in started:
        await origin.runner.cleanup()


@pytest.fixture
async def routed() -> AsyncIterator[Callable[..., Awaitable[RunningProxy]]]:
    running: list[ProxyServer] = []

    async def start(routes: list[dict[str, Any]], upstream: str | None = None) -> RunningProxy:
        flags: dict[tuple[str, ...], Any] = {
            ("listen",): f"{LOOPBACK}:0",
            ("admin", "listen"): f"{LOOPBACK}:0",
            ("log", "format"): "json",
            ("routes",): routes,
        }
        if upstream is not None:
            flags[("upstream",)] = upstream
        capture = LogCapture()
        server = ProxyServer(load_config(env={}, flags=flags), access_stream=capture)
        await server.start()
        running.append(server)
        return RunningProxy(server, capture)

    yield start
    for server in running:
        await server.close()


async def _get(url: str, **kwargs: Any) -> tuple[int, Any, dict[str, str]]:
    async with aiohttp.ClientSession() as session, session.get(url, **kwargs) as response:
        text = await response.text()
        body = await response.json(content_type=None) if text.startswith("{") else text
        return response.status, body, dict(response.headers)


async def test_first_match_wins_on_path_segments_and_strip_prefix(origins, routed) -> None:
    api, web_, default = await origins("api"), await origins("web"), await origins("default")
    proxy = await routed(
        [
            {"name": "api", "path_prefix": "/api/", "upstream": api.url, "strip_prefix": True},
            {"name": "web", "path_prefix": "/app", "upstream": web_.url},
        ],
        upstream=default.url,
    )
    cases = {
        "/api/items?x=1": ("api", "/items?x=1"),
        "/api": ("api", "/"),
        "/api?q=2": ("api", "/?q=2"),
        "/apix": ("default", "/apix"),
        "/app/page": ("web", "/app/page"),
        "/app": ("web", "/app"),
        "/application": ("default", "/application"),
        "/": ("default", "/"),
    }
    for path, (origin, target) in cases.items():
        status, body, headers = await _get(proxy.url + path)
        assert status == 200, (path, body)
        assert (body["origin"], body["target"]) == (origin, target), path
        hop = {"api": api, "web": web_, "default": default}[origin].authority
        assert f'next-hop="{hop}"' in headers["Proxy-Status"], (path, headers["Proxy-Status"])
    await proxy.settle()
    by_route = proxy.stats.snapshot(proxy={})["by_route"]
    assert {name: r["requests"]["total"] for name, r in by_route.items()} == {
        "api": 3,
        "web": 2,
        "default": 3,
    }
    assert by_route["api"]["responses"]["by_status"] == {"200": 3}
    assert by_route["api"]["latency_ms"]["total"]["count"] == 3
    logged = [(line["path"], line["route"]) for line in proxy.access_log()]
    assert logged[:3] == [("/api/items?x=1", "api"), ("/api", "api"), ("/api?q=2", "api")]
    assert dict(logged)["/application"] == "default"
    assert dict(logged)["/app/page"] == "web"


async def test_host_routes_exact_and_wildcard(origins, routed) -> None:
    auth, tenants, web_ = await origins("auth"), await origins("tenants"), await origins("web")
    proxy = await routed(
        [
            {"name": "auth", "host": "auth.localhost", "upstream": auth.url},
            {"name": "tenants", "host": "*.tenants.test", "upstream": tenants.url},
            {"name": "web", "path_prefix": "/", "upstream": web_.url},
        ]
    )
    cases = {
        "auth.localhost": "auth",
        "AUTH.localhost:8080": "auth",
        "a.tenants.test": "tenants",
        "x.y.tenants.test:1": "tenants",
        "tenants.test": "web",
        "other.localhost": "web",
    }
    for host, origin in cases.items():
        status, body, _ = await _get(proxy.url + "/who", headers={"Host": host})
        assert (status, body["origin"]) == (200, origin), host
        assert body["host"] == host  # the client's Host goes upstream unchanged


async def test_no_route_is_a_proxy_made_404_naming_the_routes(origins, routed) -> None:
    api = await origins("api")
    proxy = await routed([{"name": "api", "path_prefix": "/api", "upstream": api.url}])
    status, body, headers = await _get(
        proxy.url + "/nowhere?x=1", headers={"Accept": "application/json"}
    )
    assert status == 404
    members = proxy_status_members(headers["Proxy-Status"])
    assert members[-1].startswith("faultline; error=destination_not_found"), members
    assert "next-hop" not in members[-1]
    assert body["error"] == "destination_not_found"
    assert body["upstream"] == ""  # no upstream was involved (not the first route's)
    assert "No route matches host 127.0.0.1 and path /nowhere" in body["detail"]
    assert "api: path /api" in body["detail"]
    line = await proxy.last_log()
    assert (line["status"], line["source"], line["layer"], line["error"]) == (
        404,
        "proxy",
        "proxy",
        "destination_not_found",
    )
    assert line["route"] is None  # no route served it
    status, body, _ = await _get(proxy.url + "/api/ok")
    assert (status, body["origin"]) == (200, "api")


async def test_a_route_whose_upstream_is_down_fails_alone(origins, routed) -> None:
    api, web_ = await origins("api"), await origins("web")
    proxy = await routed(
        [
            {"name": "api", "path_prefix": "/api/", "upstream": api.url},
            {"name": "web", "path_prefix": "/", "upstream": web_.url},
        ]
    )
    assert (await _get(proxy.url + "/api/x"))[0] == 200
    await api.runner.cleanup()
    status, _, headers = await _get(proxy.url + "/api/x")
    assert status == 502
    assert "error=connection_refused" in headers["Proxy-Status"]
    assert f'next-hop="{api.authority}"' in headers["Proxy-Status"]
    status, body, _ = await _get(proxy.url + "/page")
    assert (status, body["origin"]) == (200, "web")
    stats = proxy.stats.snapshot(proxy={})
    assert stats["responses"]["by_error"] == {"connection_refused": 1}
    api_stats, web_stats = stats["by_route"]["api"], stats["by_route"]["web"]
    assert api_stats["responses"]["by_error"] == {"connection_refused": 1}
    assert api_stats["responses"]["by_source"] == {"origin": 1, "proxy": 1}
    assert api_stats["responses"]["by_layer"] == {"origin": 1, "transport": 1}
    assert web_stats["responses"]["by_status"] == {"200": 1}
    (error,) = stats["recent_errors"]
    assert (error["route"], error["error"]) == ("api", "connection_refused")


async def test_a_route_has_its_own_timeouts_and_proxy_name(origins, routed) -> None:
    api, web_ = await origins("api"), await origins("web")
    proxy = await routed(
        [
            {
                "name": "api",
                "path_prefix": "/api/",
                "upstream": api.url,
                "timeouts": {"response_headers": "300ms"},
                "proxy_name": "api-gw",
            },
            {"name": "web", "path_prefix": "/", "upstream": web_.url},
        ]
    )
    status, _, headers = await _get(proxy.url + "/api/slow?delay=1")
    assert status == 504
    assert headers["Proxy-Status"].startswith("api-gw; error=http_response_timeout")
    assert "300ms (timeouts.response_headers)" in headers["Proxy-Status"]
    status, body, headers = await _get(proxy.url + "/slow?delay=0.5")  # web: 60s
    assert (status, body["origin"]) == (200, "web")
    assert headers["Proxy-Status"].startswith("faultline;")
    status, body, headers = await _get(proxy.url + "/api/fast")
    assert headers["Proxy-Status"].startswith("api-gw;")


async def test_websocket_and_http2_follow_the_routes(origins, routed) -> None:
    api, web_ = await origins("api"), await origins("web")
    proxy = await routed(
        [
            {"name": "api", "path_prefix": "/api/", "upstream": api.url},
            {"name": "web", "path_prefix": "/", "upstream": web_.url},
        ]
    )
    async with aiohttp.ClientSession() as session:
        for path, origin in (("/api/ws", "api"), ("/hmr/ws", "web")):
            async with session.ws_connect(proxy.url + path) as ws:
                await ws.send_str("ping")
                message = await ws.receive(timeout=5)
                assert message.data == f"{origin}:ping"
    for path, origin in (("/api/h2", "api"), ("/h2", "web")):
        code, out, err = await curl("-s", "--http2-prior-knowledge", proxy.url + path)
        assert code == 0, err
        assert f'"origin": "{origin}"' in out.decode() or f'"origin":"{origin}"' in out.decode()


async def test_sse_follows_its_route_as_a_stream(origins, routed) -> None:
    api, web_ = await origins("api"), await origins("web")
    proxy = await routed(
        [
            {"name": "api", "path_prefix": "/api/", "upstream": api.url},
            {"name": "web", "path_prefix": "/", "upstream": web_.url},
        ]
    )
    async with aiohttp.ClientSession() as session, session.get(proxy.url + "/api/sse") as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        events = []
        async for line in resp.content:  # each event as it comes, not the body at the end
            if line.startswith(b"data: "):
                events.append(line.strip().decode())
    assert events == ["data: api 0", "data: api 1", "data: api 2"]


async def test_upstream_wait_is_per_route(origins, routed) -> None:
    """A route with upstream_wait holds its requests while its upstream refuses; a route
    without fails at once."""
    from support import free_port

    late_port, dead_port = free_port(), free_port()
    proxy = await routed(
        [
            {
                "name": "api",
                "path_prefix": "/api/",
                "upstream": f"http://{LOOPBACK}:{late_port}",
                "upstream_wait": "5s",
            },
            {"name": "web", "path_prefix": "/", "upstream": f"http://{LOOPBACK}:{dead_port}"},
        ]
    )
    status, _, headers = await _get(proxy.url + "/page")
    assert status == 502 and "error=connection_refused" in headers["Proxy-Status"]

    async def start_late() -> web.AppRunner:
        await asyncio.sleep(0.5)

        async def late_answer(request: web.Request) -> web.Response:
            return web.json_response({"origin": "late"})

        app = web.Application()
        app.router.add_get("/api/x", late_answer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, LOOPBACK, late_port).start()
        return runner

    late = asyncio.ensure_future(start_late())
    try:
        status, body, _ = await _get(proxy.url + "/api/x")
        assert (status, body["origin"]) == (200, "late")
        line = await proxy.last_log()
        assert line["route"] == "api" and line["waited_ms"] >= 300
    finally:
        await (await late).cleanup()


def test_the_terminal_line_names_the_route() -> None:
    from proxy.telemetry.console import pretty_line

    record = {
        "time": "2026-12-07T10:15:02.000Z",
        "status": 502,
        "source": "proxy",
        "method": "GET",
        "path": "/api/items",
        "duration_ms": 0.8,
        "error": "connection_refused",
        "upstream": "127.0.0.1:8000",
        "details": None,
        "route": "api",
    }
    line = pretty_line(record, colour=False).decode()
    assert line.startswith("10:15:02 502 GET    /api/items [api] 0.8ms PROXY connection_refused")
    assert "[" not in pretty_line({**record, "route": None}, colour=False).decode()


def _slots_of(path: str, cls: str) -> list[str]:
    """A class's __slots__ as its source declares them (a compiled class has none)."""
    import ast

    tree = ast.parse((ROOT / path).read_text())
    (node,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls]
    for item in node.body:
        if isinstance(item, ast.Assign) and item.targets[0].id == "__slots__":  # type: ignore[attr-defined]
            return [elt.value for elt in item.value.elts]  # type: ignore[attr-defined]
    raise AssertionError(f"no __slots__ in {cls}")


def test_retarget_copies_every_field_but_the_origin_cache() -> None:
    from proxy.http1.request import RequestHead

    slots = _slots_of("proxy/http1/request.py", "RequestHead")
    values: dict[str, Any] = {
        "lines": [b"x-a: 1\r\n"],
        "method": b"POST",
        "target": b"/api/t",
        "http11": False,
        "keep_alive": False,
        "host": b"h.test",
        "hosts": 2,
        "content_length": 5,
        "chunked": True,
        "te_values": [b"chunked"],
        "nominated": {b"x-a"},
        "upgrade": b"websocket",
        "xff": b"192.0.2.1",
        "xfp": b"https",
        "xfh": b"h.test",
        "via": b"1.1 other",
        "request_id": b"rid-1",
        "accept": b"text/html",
        "content_type": b"application/json",
        "content_encoding": b"gzip",
        "loop_marker": True,
        "grpc": True,
        "problem": "a problem",
        "method_name": "POST",
        "target_text": "/api/t",
        "upstream_fixed": b"cached",
    }
    assert sorted(values) == sorted(slots), "a new field: give it a value here"
    head = RequestHead()
    for name, value in values.items():
        setattr(head, name, value)
    copy = head.retarget(b"/t")
    for name in slots:
        expected = {"target": b"/t", "upstream_fixed": b""}.get(name, values[name])
        assert getattr(copy, name) == expected, name
    assert head.target == b"/api/t"  # the shared head is untouched


def _check_config(path: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=20,
    )


def test_routes_from_the_command_line_and_check_config(tmp_path) -> None:
    config = tmp_path / "routes.yaml"
    config.write_text(
        "routes:\n"
        "  - {name: api, path_prefix: /api/, upstream: http://127.0.0.1:8000}\n"
        "  - {name: web, host: web.localhost, upstream: http://127.0.0.1:5173}\n"
    )
    done = _check_config(config)
    assert done.returncode == 0, done.stderr
    assert "# routes, first match wins:" in done.stdout
    table = [line.split() for line in done.stdout.splitlines() if line.startswith("#   ")]
    assert table == [
        ["#", "api", "path", "/api/", "->", "http://127.0.0.1:8000"],
        ["#", "web", "host", "web.localhost", "->", "http://127.0.0.1:5173"],
        ["#", "(none)", "every", "other", "request", "->", "404", "destination_not_found"],
    ]
    config.write_text(
        "routes:\n"
        "  - {name: web, path_prefix: /, upstream: http://127.0.0.1:5173}\n"
        "  - {name: api, path_prefix: /api/, upstream: http://127.0.0.1:8000}\n"
    )
    done = _check_config(config)
    assert done.returncode == 2
    assert "routes[1] (api) can never match: routes[0] (web, path /)" in done.stderr
    flags = load_config(
        env={},
        flags={("routes",): [{"name": "api", "path_prefix": "/api/", "upstream": "http://a:1"}]},
    )
    assert flags.upstream == ""  # routes and no upstream: no default route


async def test_metrics_carry_the_route(origins, routed) -> None:
    """With routes, the request families carry a `route` label: each route's samples add up
    to its own exchanges, per protocol, and the unmatched ones are route=""."""
    from proxy.telemetry.metrics import make_registry, render

    api, web_ = await origins("api"), await origins("web")
    proxy = await routed(
        [
            {"name": "api", "path_prefix": "/api/", "upstream": api.url},
            {"name": "web", "host": "web.localhost", "upstream": web_.url},
        ]
    )
    for path in ("/api/a", "/api/b", "/api/c"):
        assert (await _get(proxy.url + path))[0] == 200
    assert (await _get(proxy.url + "/", headers={"Host": "web.localhost"}))[0] == 200
    assert (await _get(proxy.url + "/nowhere"))[0] == 404
    code, _, err = await curl("-s", "--http2-prior-knowledge", proxy.url + "/api/h2")
    assert code == 0, err
    await proxy.settle()
    server = proxy.server
    text = render(make_registry(server.telemetry, server.pool_counts), None)[0].decode()

    def total(name: str, *needles: str) -> float:
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + "{") and all(n in line for n in needles)
        )

    assert total("faultline_responses_total", 'route="api"') == 4
    assert total("faultline_responses_total", 'route="api"', 'protocol="h2"') == 1
    assert total("faultline_responses_total", 'route="web"') == 1
    assert total("faultline_responses_total", 'route=""', 'code="404"') == 1
    assert total("faultline_responses_total") == 6
    assert total("faultline_request_duration_seconds_count", 'route="api"') == 4
    assert total("faultline_request_duration_seconds_count", 'route=""') == 1
    assert total("faultline_request_duration_seconds_count") == 6


def test_the_prefix_table_chooses_as_the_routes_in_order_would() -> None:
    """Without host routes the router looks the path's segment prefixes up in a table; for
    every table config_routes accepts, that is the first route that matches, in order."""
    from proxy.config_routes import parse_routes
    from proxy.forward.context import Route, Router
    from proxy.server import build_context
    from proxy.telemetry.sink import Telemetry
    from proxy.telemetry.stats import Stats

    loop = asyncio.new_event_loop()  # a real context (the compiled Route checks its type)
    ctx, _, _ = build_context(load_config(env={}), loop, Telemetry(Stats(), None), "0" * 16)
    loop.close()

    tables = [
        [("api", "/api/"), ("web", "/")],
        [("v2", "/api/v2"), ("api", "/api"), ("r", "/r/")],
        [("a", "/a"), ("b", "/b/c"), ("all", None)],
        [("x", "/x")],
    ]
    paths = [b"/", b"/api", b"/api/", b"/api/v2", b"/api/v2/x?q=1", b"/apix", b"/a/b"]
    paths += [b"/b/c?q", b"/b/cd", b"/b", b"/x/y/z", b"*", b"http://h/api/q", b"/r/", b"//"]
    for table in tables:
        given = [{"name": n, "upstream": "http://127.0.0.1:9", "path_prefix": p} for n, p in table]
        routes = [Route(r.name, ctx, r.host, r.prefix, False, "") for r in parse_routes(given)]
        fast, in_order = Router(routes), Router(routes)
        assert fast.by_prefix is not None
        in_order.by_prefix = None
        for path in paths:
            chosen, expected = fast.choose(None, path), in_order.choose(None, path)
            assert (chosen and chosen.name) == (expected and expected.name), (table, path)
