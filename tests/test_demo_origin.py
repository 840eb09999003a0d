"""The demo origin, exercised directly over real sockets (no proxy in front).

Rules:
- One origin per test on 127.0.0.1 port 0; every read has a deadline, so a misbehaving
  route can fail a test but never hang it.
- Byte-level routes are read with raw `asyncio.open_connection` and checked byte for byte;
  the normal ones go through aiohttp's client (HTTP, WebSocket, SSE).
- `test_every_route_does_what_its_expectations_say` replays every `ROUTES` entry and reads
  the answer the way a proxy with the demo's settings would (2 s for the response head,
  2 s idle gap in the body, 64 KiB header limit), then checks the verdict against the
  entry's expectations: ROUTES is what the end-to-end tests trust.
- The deliberate misbehaviour must not make aiohttp or asyncio log an error or traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import html
import json
import logging
import socket
import time
from dataclasses import dataclass, field

import aiohttp
import httptools
import pytest

from proxy.demo import ROUTES, DemoOrigin, DemoRoute, make_demo_app, start_demo_origin
from proxy.diagnosis.hops import Evidence, diagnose

# The proxy settings the demo's expectations assume.
RESPONSE_HEADERS_TIMEOUT_S = 2.0
UPSTREAM_READ_TIMEOUT_S = 2.0
MAX_RESPONSE_HEADER_BYTES = 65536

# Status the proxy sends for each fault it answers itself (the CONTRACT's fault table).
PROXY_FAULT_STATUS = {
    "connection_terminated": 502,
    "http_protocol_error": 502,
    "http_response_header_section_size": 502,
    "http_response_timeout": 504,
    "http_upgrade_failed": 502,
}
MID_BODY_FAULTS = {"http_response_incomplete", "connection_read_timeout", "http_protocol_error"}

# The routes the demo must offer (path patterns as the brief names them).
REQUIRED_PATHS = {
    "/",
    "/hello",
    "/api/items",
    "/echo",
    "/stream",
    "/sse",
    "/ws",
    "/bytes/{n}",
    "/status/{code}",
    "/origin-502",
    "/origin-504",
    "/nginx-502",
    "/json",
    "/slow",
    "/hang",
    "/hangup",
    "/reset",
    "/garbage",
    "/bad-header",
    "/huge-headers",
    "/truncated",
    "/stall",
    "/bad-chunk",
}


@pytest.fixture
async def origin(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    demo = await start_demo_origin("127.0.0.1", 0)
    try:
        yield demo
    finally:
        await demo.close()
    # caplog.records would hold only this teardown's records: look at every phase.
    records = [*caplog.get_records("setup"), *caplog.get_records("call"), *caplog.records]
    noisy = [
        record
        for record in records
        if record.name.startswith(("aiohttp", "asyncio"))
        and (record.levelno >= logging.WARNING or record.exc_info)
    ]
    assert not noisy, [record.getMessage() for record in noisy]


# --------------------------------------------------------------------------------------
# Raw socket helpers
# --------------------------------------------------------------------------------------


def raw_request(
    path: str,
    method: str = "GET",
    headers: tuple[tuple[str, str], ...] = (),
    body: bytes = b"",
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: demo.test"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class RawAnswer:
    data: bytes = b""
    ending: str = ""  # "eof", "reset" or "silence" (the deadline passed, still open)
    first_byte_at: float | None = None
    ended_at: float = 0.0


async def raw_exchange(
    demo: DemoOrigin, request: bytes, *, idle_s: float = 2.0, total_s: float = 5.0
) -> RawAnswer:
    """Send `request`, read until EOF, reset, `idle_s` of silence or `total_s` overall."""
    reader, writer = await asyncio.open_connection(demo.host, demo.port)
    answer = RawAnswer()
    started = time.monotonic()
    try:
        writer.write(request)
        await writer.drain()
        while True:
            budget = min(idle_s, total_s - (time.monotonic() - started))
            if budget <= 0:
                answer.ending = "silence"
                break
            try:
                chunk = await asyncio.wait_for(reader.read(65536), budget)
            except TimeoutError:
                answer.ending = "silence"
                break
            except ConnectionResetError:
                answer.ending = "reset"
                break
            if not chunk:
                answer.ending = "eof"
                break
            if answer.first_byte_at is None:
                answer.first_byte_at = time.monotonic() - started
            answer.data += chunk
    finally:
        answer.ended_at = time.monotonic() - started
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return answer


def split_head(data: bytes) -> tuple[bytes, bytes]:
    head, separator, body = data.partition(b"\r\n\r\n")
    assert separator, f"no complete header section in {data[:200]!r}"
    return head, body


def head_fields(head: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        fields[name.decode("latin-1").strip().lower()] = value.decode("latin-1").strip()
    return fields


@dataclass
class ParsedResponse:
    """An HTTP/1.1 response fed through httptools (the proxy's parser)."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    head_complete: bool = False
    complete: bool = False
    error: str | None = None

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.head_complete = True

    def on_body(self, chunk: bytes) -> None:
        self.body += chunk

    def on_message_complete(self) -> None:
        self.complete = True


def parse_response(data: bytes) -> ParsedResponse:
    parsed = ParsedResponse()
    parser = httptools.HttpResponseParser(parsed)
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError as exc:
        parsed.error = str(exc)
    if parsed.head_complete:
        parsed.status = parser.get_status_code()
    return parsed


# --------------------------------------------------------------------------------------
# ROUTES: complete and consistent
# --------------------------------------------------------------------------------------


def _path_only(route: DemoRoute) -> str:
    return route.path.partition("?")[0]


def test_routes_cover_every_served_route_and_nothing_else():
    app = make_demo_app()
    resources = [resource.get_info() for resource in app.router.resources()]

    def matches(info: dict, path: str) -> bool:
        if "path" in info:
            return info["path"] == path
        return info["pattern"].fullmatch(path) is not None

    served = {info.get("path") or info["formatter"] for info in resources}
    assert served >= REQUIRED_PATHS
    for info in resources:
        described = [route for route in ROUTES if matches(info, _path_only(route))]
        assert described, f"{info} is served but has no ROUTES entry"
    for route in ROUTES:
        assert any(matches(info, _path_only(route)) for info in resources), route.path


@pytest.mark.parametrize("route", ROUTES, ids=lambda route: f"{route.method} {route.path}")
def test_route_expectations_are_consistent(route: DemoRoute):
    assert route.path.startswith("/")
    assert route.method in {"GET", "POST", "PUT", "DELETE", "PATCH"}
    assert route.title and route.section
    assert route.expect_source in {"origin", "proxy", "client"}
    assert route.expect_layer in {"origin", "upstream", "transport", "proxy", "client"}
    if route.expect_status is None:
        # Only a fault after the origin's status went out leaves no status to send.
        assert route.expect_error in MID_BODY_FAULTS
        assert (route.expect_source, route.expect_layer) == ("origin", "upstream")
    elif route.expect_source == "origin":
        assert route.expect_error is None
        assert route.expect_layer == "origin"
    if route.expect_error in {"http_response_incomplete", "connection_read_timeout"}:
        assert route.expect_status is None
    if route.expect_source == "proxy":
        assert route.expect_status == PROXY_FAULT_STATUS[route.expect_error]
        assert route.expect_layer == "upstream"
    if route.hop is not None:
        assert route.expect_source == "origin"
    if route.body:
        assert route.method != "GET"


def test_routes_are_distinct():
    keys = [(route.method, route.path, route.body) for route in ROUTES]
    assert len(keys) == len(set(keys))


async def what_a_proxy_would_report(
    demo: DemoOrigin, route: DemoRoute
) -> tuple[int | None, str, str | None, str, str | None]:
    """(status, source, error, layer, hop) for `route`, judged like the demo's proxy."""
    reader, writer = await asyncio.open_connection(demo.host, demo.port)
    parsed = ParsedResponse()
    parser = httptools.HttpResponseParser(parsed)
    received = b""
    ending = ""
    started = time.monotonic()
    try:
        writer.write(raw_request(route.path, route.method, route.request_headers, route.body))
        while not parsed.complete:
            if parsed.head_complete:
                budget = UPSTREAM_READ_TIMEOUT_S
            else:
                budget = RESPONSE_HEADERS_TIMEOUT_S - (time.monotonic() - started)
            try:
                chunk = await asyncio.wait_for(reader.read(65536), max(budget, 0.0))
            except TimeoutError:
                ending = "silence"
                break
            except ConnectionResetError:
                ending = "reset"
                break
            if not chunk:
                ending = "eof"
                break
            received += chunk
            if not parsed.head_complete and b"\r\n\r\n" not in received:
                if len(received) > MAX_RESPONSE_HEADER_BYTES:
                    return 502, "proxy", "http_response_header_section_size", "upstream", None
                continue
            if not parsed.head_complete:
                head_size = received.index(b"\r\n\r\n") + 4
                if head_size > MAX_RESPONSE_HEADER_BYTES:
                    return 502, "proxy", "http_response_header_section_size", "upstream", None
            try:
                parser.feed_data(chunk if parsed.head_complete else received)
            except httptools.HttpParserUpgrade:
                break
            except httptools.HttpParserError:
                if parsed.head_complete and parser.get_status_code() != 101:
                    return None, "origin", "http_protocol_error", "upstream", None
                if not parsed.head_complete:
                    return 502, "proxy", "http_protocol_error", "upstream", None
                break  # a 101: judged below
            if parsed.head_complete and parser.get_status_code() == 101:
                break
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    if not parsed.head_complete:
        if ending == "silence":
            return 504, "proxy", "http_response_timeout", "upstream", None
        if received:
            return 502, "proxy", "http_protocol_error", "upstream", None
        return 502, "proxy", "connection_terminated", "upstream", None
    status = parser.get_status_code()
    if status == 101:
        if parsed.headers.get("upgrade", "").lower() != "websocket":
            return 502, "proxy", "http_upgrade_failed", "upstream", None
        return 101, "origin", None, "origin", None
    if not parsed.complete:
        error = "connection_read_timeout" if ending == "silence" else "http_response_incomplete"
        return None, "origin", error, "upstream", None
    hop = None
    if status >= 400:  # who made it, judged as the proxy judges it (proxy/diagnosis.py)
        head = received[: received.index(b"\r\n\r\n") + 2]
        hop, _ = diagnose(Evidence(status, head, bytearray(parsed.body)))
    return status, "origin", None, "origin", hop


async def test_every_route_does_what_its_expectations_say(origin: DemoOrigin):
    verdicts = await asyncio.gather(*(what_a_proxy_would_report(origin, route) for route in ROUTES))
    for route, verdict in zip(ROUTES, verdicts, strict=True):
        expected = (
            route.expect_status,
            route.expect_source,
            route.expect_error,
            route.expect_layer,
            route.hop,
        )
        assert verdict == expected, f"{route.method} {route.path}"


# --------------------------------------------------------------------------------------
# Lifecycle
# --------------------------------------------------------------------------------------


async def test_binds_an_ephemeral_port_and_reports_its_url(origin: DemoOrigin):
    assert origin.host == "127.0.0.1"
    assert origin.port > 0
    assert origin.url == f"http://127.0.0.1:{origin.port}"


async def test_close_releases_held_connections_at_once():
    demo = await start_demo_origin()
    held = [
        asyncio.create_task(raw_exchange(demo, raw_request(path), idle_s=5.0))
        for path in ("/hang", "/stall", "/slow?ms=30000")
    ]
    await asyncio.sleep(0.3)
    started = time.monotonic()
    await demo.close()
    assert time.monotonic() - started < 1.0
    answers = await asyncio.gather(*held)
    assert all(answer.ending in ("eof", "reset") for answer in answers)
    await demo.close()  # closing twice is harmless


# --------------------------------------------------------------------------------------
# Normal traffic
# --------------------------------------------------------------------------------------


async def test_landing_page_links_every_route_and_loads_nothing_external(origin: DemoOrigin):
    async with aiohttp.ClientSession() as session, session.get(origin.url + "/") as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        page = await response.text()
    for route in ROUTES:
        assert f'data-path="{route.path.replace("&", "&amp;")}"' in page
        assert html.escape(route.title) in page
    for route in ROUTES:
        if route.method == "GET" and not route.is_websocket:
            assert f'href="{route.path}"' in page
    for external in ('src="http', "src='http", 'href="http', "@import", "url(http"):
        assert external not in page


async def test_hello_and_items(origin: DemoOrigin):
    async with aiohttp.ClientSession(origin.url) as session:
        async with session.get("/hello") as response:
            assert response.status == 200
            assert response.content_type == "text/plain"
            assert "Hello" in await response.text()
        async with session.get("/api/items") as response:
            assert response.status == 200
            items = await response.json()
            assert items["count"] == len(items["items"]) > 0


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH"])
async def test_echo_returns_method_headers_and_body(origin: DemoOrigin, method: str):
    body = b"" if method in ("GET", "DELETE") else b"payload \xe2\x9c\x93"
    async with (
        aiohttp.ClientSession(origin.url) as session,
        session.request(
            method, "/echo?x=1", data=body, headers={"X-Demo-Probe": "yes"}
        ) as response,
    ):
        assert response.status == 200
        echoed = await response.json()
    assert echoed["method"] == method
    assert echoed["path"] == "/echo"
    assert echoed["query"] == "x=1"
    assert ["X-Demo-Probe", "yes"] in echoed["headers"]
    assert echoed["body"] == body.decode()
    assert echoed["body_bytes"] == len(body)
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_echo_hashes_large_bodies_without_showing_them_whole(origin: DemoOrigin):
    body = bytes(range(256)) * 4096  # 1 MiB
    async with (
        aiohttp.ClientSession(origin.url) as session,
        session.post("/echo", data=body) as response,
    ):
        echoed = await response.json()
    assert echoed["body_bytes"] == len(body)
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert echoed["body_truncated"] is True


async def test_stream_is_chunked_and_spread_over_a_second(origin: DemoOrigin):
    arrivals: list[float] = []
    async with aiohttp.ClientSession(origin.url) as session, session.get("/stream") as response:
        assert response.status == 200
        assert response.headers["Transfer-Encoding"] == "chunked"
        started = time.monotonic()
        text = b""
        async for chunk in response.content.iter_any():
            arrivals.append(time.monotonic() - started)
            text += chunk
    assert text.decode().splitlines() == [f"chunk {n}/10" for n in range(1, 11)]
    assert arrivals[-1] - arrivals[0] >= 0.7


async def test_sse_events_arrive_one_by_one(origin: DemoOrigin):
    events: list[tuple[float, dict]] = []
    async with aiohttp.ClientSession(origin.url) as session, session.get("/sse") as response:
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        started = time.monotonic()
        async for line in response.content:
            if line.startswith(b"data: "):
                events.append((time.monotonic() - started, json.loads(line[6:])))
        ended = time.monotonic() - started
    assert [event["event"] for _, event in events] == [1, 2, 3, 4, 5]
    first_arrival = events[0][0]
    assert first_arrival < ended - 0.5, "the first event must not wait for the stream's end"
    assert ended >= 0.7


async def test_websocket_echoes_text_and_binary(origin: DemoOrigin):
    async with aiohttp.ClientSession(origin.url) as session, session.ws_connect("/ws") as ws:
        await ws.send_str("hello")
        assert (await ws.receive(timeout=2)).data == "hello"
        await ws.send_bytes(b"\x00\x01\x02")
        assert (await ws.receive(timeout=2)).data == b"\x00\x01\x02"


async def test_websocket_route_refuses_plain_http(origin: DemoOrigin):
    async with aiohttp.ClientSession(origin.url) as session, session.get("/ws") as response:
        assert response.status == 426


async def test_bytes_streams_exactly_n_predictable_bytes(origin: DemoOrigin):
    size = 200_000
    async with (
        aiohttp.ClientSession(origin.url) as session,
        session.get(f"/bytes/{size}") as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Length"] == str(size)
        data = await response.read()
    assert data == (bytes(range(256)) * (size // 256 + 1))[:size]


async def test_bytes_is_capped_at_100_mib(origin: DemoOrigin):
    # Read only the head, then leave: the origin must take the early exit quietly.
    async with (
        aiohttp.ClientSession(origin.url) as session,
        session.get("/bytes/999999999999") as response,
    ):
        assert response.headers["Content-Length"] == str(100 * 1024 * 1024)
        assert response.headers["X-Demo-Capped-To"] == str(100 * 1024 * 1024)
        await response.content.read(1000)
        response.close()
    await asyncio.sleep(0.1)


# --------------------------------------------------------------------------------------
# The origin's own errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [400, 401, 404, 418, 429, 500, 502, 503, 504, 599])
async def test_status_answers_any_error_code_with_json(origin: DemoOrigin, code: int):
    async with (
        aiohttp.ClientSession(origin.url) as session,
        session.get(f"/status/{code}") as response,
    ):
        assert response.status == code
        assert (await response.json())["status"] == code
        if code in (429, 503):
            assert response.headers["Retry-After"] == "5"


async def test_status_refuses_non_error_codes(origin: DemoOrigin):
    async with aiohttp.ClientSession(origin.url) as session, session.get("/status/200") as response:
        assert response.status == 400


@pytest.mark.parametrize(("path", "status"), [("/origin-502", 502), ("/origin-504", 504)])
async def test_the_apps_own_gateway_errors(origin: DemoOrigin, path: str, status: int):
    async with aiohttp.ClientSession(origin.url) as session, session.get(path) as response:
        assert response.status == status
        assert response.content_type == "application/json"
        assert not response.headers["Server"].startswith("nginx")


async def test_nginx_502_looks_like_nginx(origin: DemoOrigin):
    async with aiohttp.ClientSession(origin.url) as session, session.get("/nginx-502") as response:
        assert response.status == 502
        assert response.headers["Server"] == "nginx"
        assert response.content_type == "text/html"
        page = await response.text()
    assert "<title>502 Bad Gateway</title>" in page
    assert "<hr><center>nginx</center>" in page


async def test_json_accepts_good_json(origin: DemoOrigin):
    async with (
        aiohttp.ClientSession(origin.url) as session,
        session.post("/json", json={"a": [1, 2]}) as response,
    ):
        assert response.status == 200
        assert (await response.json())["received"] == {"a": [1, 2]}


@pytest.mark.parametrize(
    "body",
    [b'{"item": "teapot",', b"", b"\xff\xfe not utf-8"],
    ids=["unterminated", "empty", "not-utf-8"],
)
async def test_json_answers_malformed_json_with_a_500_stack_trace(origin: DemoOrigin, body):
    async with (
        aiohttp.ClientSession(origin.url) as session,
        session.post("/json", data=body, headers={"Content-Type": "application/json"}) as response,
    ):
        assert response.status == 500
        text = await response.text()
    assert text.startswith("Traceback (most recent call last):")
    assert "Error" in text.splitlines()[-1]


# --------------------------------------------------------------------------------------
# Slow answers
# --------------------------------------------------------------------------------------


async def test_slow_answers_after_the_requested_delay(origin: DemoOrigin):
    async with aiohttp.ClientSession(origin.url) as session:
        started = time.monotonic()
        async with session.get("/slow?ms=300") as response:
            assert response.status == 200
            assert (await response.json())["slept_ms"] == 300
        assert 0.28 <= time.monotonic() - started < 1.5
        async with session.get("/slow?ms=soon") as response:
            assert response.status == 400


async def test_slow_caps_the_delay_at_30_seconds():
    # Asking for an hour is held only until the origin closes; what it promised is capped.
    demo = await start_demo_origin()
    async with aiohttp.ClientSession(demo.url) as session:
        request = asyncio.create_task(session.get("/slow?ms=3600000"))
        await asyncio.sleep(0.2)
        await demo.close()
        response = await request
        assert (await response.json())["slept_ms"] == 30_000


async def test_hang_sends_nothing(origin: DemoOrigin):
    answer = await raw_exchange(origin, raw_request("/hang"), idle_s=0.3)
    assert answer.data == b""
    assert answer.ending == "silence"


# --------------------------------------------------------------------------------------
# Byte-level misbehaviour
# --------------------------------------------------------------------------------------


async def test_hangup_closes_without_a_byte(origin: DemoOrigin):
    answer = await raw_exchange(origin, raw_request("/hangup"))
    assert answer.data == b""
    assert answer.ending == "eof"


async def test_reset_sends_rst_without_a_byte(origin: DemoOrigin):
    answer = await raw_exchange(origin, raw_request("/reset"))
    assert answer.data == b""
    assert answer.ending in ("reset", "eof")


async def test_reset_is_a_real_rst():
    # Blocking socket in a thread: recv() on a reset connection raises ECONNRESET.
    demo = await start_demo_origin()
    try:

        def exchange() -> BaseException | bytes:
            with socket.create_connection((demo.host, demo.port), timeout=3) as sock:
                sock.sendall(raw_request("/reset"))
                try:
                    return sock.recv(100)
                except OSError as exc:
                    return exc

        outcome = await asyncio.to_thread(exchange)
        assert isinstance(outcome, ConnectionResetError), outcome
    finally:
        await demo.close()


async def test_garbage_is_not_http(origin: DemoOrigin):
    answer = await raw_exchange(origin, raw_request("/garbage"))
    assert answer.data
    assert not answer.data.startswith(b"HTTP/")
    assert answer.ending == "eof"
    assert parse_response(answer.data).error is not None


async def test_bad_header_carries_an_invalid_byte(origin: DemoOrigin):
    answer = await raw_exchange(origin, raw_request("/bad-header"))
    head, _ = split_head(answer.data)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"\x00" in head
    parsed = parse_response(answer.data)
    assert not parsed.head_complete
    assert parsed.error is not None


async def test_huge_headers_exceed_the_proxys_limit(origin: DemoOrigin):
    answer = await raw_exchange(origin, raw_request("/huge-headers"))
    head, body = split_head(answer.data)
    assert MAX_RESPONSE_HEADER_BYTES < len(head) < 128 * 1024
    parsed = parse_response(answer.data)
    assert parsed.complete and parsed.status == 200
    assert body == b"ok\n"


async def test_bad_upgrade_answers_a_101_without_upgrade(origin: DemoOrigin):
    handshake = (
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
    )
    answer = await raw_exchange(origin, raw_request("/bad-upgrade", headers=handshake))
    head, _ = split_head(answer.data)
    assert head.startswith(b"HTTP/1.1 101 ")
    assert "upgrade" not in head_fields(head)
    assert answer.ending == "eof"
    async with (
        aiohttp.ClientSession(origin.url) as session,
        session.get("/bad-upgrade") as response,
    ):
        assert response.status == 426


async def test_truncated_sends_less_than_promised_then_eof(origin: DemoOrigin):
    answer = await raw_exchange(origin, raw_request("/truncated"))
    head, body = split_head(answer.data)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert head_fields(head)["content-length"] == "100000"
    assert len(body) == 1000
    assert answer.ending == "eof"
    # The head went out well before the close: the break is mid-body, not before the head.
    assert answer.first_byte_at is not None
    assert answer.ended_at - answer.first_byte_at >= 0.15


async def test_stall_sends_part_of_the_body_then_nothing(origin: DemoOrigin):
    answer = await raw_exchange(origin, raw_request("/stall"), idle_s=0.5)
    head, body = split_head(answer.data)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert int(head_fields(head)["content-length"]) > len(body) > 0
    assert answer.ending == "silence"


async def test_bad_chunk_breaks_the_chunked_framing_after_data(origin: DemoOrigin):
    answer = await raw_exchange(origin, raw_request("/bad-chunk"))
    head, _ = split_head(answer.data)
    assert head_fields(head)["transfer-encoding"] == "chunked"
    parsed = parse_response(answer.data)
    assert parsed.status == 200
    assert parsed.body.startswith(b"The first chunks of this body are fine.")
    assert not parsed.complete
    assert parsed.error is not None
    assert answer.ending == "eof"
    assert answer.first_byte_at is not None
    assert answer.ended_at - answer.first_byte_at >= 0.15
