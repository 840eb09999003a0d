"""The forwarding core end to end: keep-alive, pooling, framing, streaming, upgrades,
pipelining, stale-connection replay and header rules. Real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import time

import aiohttp
import pytest

from proxy.demo import start_demo_origin

from support import (
    LOOPBACK,
    OriginConnection,
    parse_responses,
    raw_request,
)


@pytest.fixture
async def demo():
    origin = await start_demo_origin()
    yield origin
    await origin.close()


async def serve_ok(conn: OriginConnection) -> None:
    while await conn.read_request():
        await conn.respond(200, b"hello")


# -- keep-alive and the pool --------------------------------------------------------------------


async def test_keepalive_both_sides_reuses_one_upstream_connection(origin_factory, proxy_factory):
    origin = await origin_factory(serve_ok)
    proxy = await proxy_factory(origin.url)
    reader, writer = await asyncio.open_connection(LOOPBACK, proxy.port)
    for _ in range(20):
        writer.write(b"GET /k HTTP/1.1\r\nHost: a\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert await reader.readexactly(5) == b"hello"
    writer.close()
    await proxy.settle()
    records = proxy.access_log()
    assert len(records) == 20
    assert origin.connections == 1
    assert [r["reused"] for r in records] == [False] + [True] * 19


async def test_pool_is_bounded_and_requests_wait_for_a_slot(origin_factory, proxy_factory):
    active = 0
    peak = 0

    async def slow(conn: OriginConnection) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            while await conn.read_request():
                await asyncio.sleep(0.1)
                await conn.respond(200, b"slow")
        finally:
            active -= 1

    origin = await origin_factory(slow)
    proxy = await proxy_factory(origin.url, **{"pool.max_connections": 2})
    async with aiohttp.ClientSession() as session:

        async def one() -> int:
            async with session.get(proxy.url + "/p") as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(one() for _ in range(8)))
    assert statuses == [200] * 8
    assert peak <= 2
    assert origin.connections <= 2
    await proxy.settle()
    assert proxy.pool.open <= 2


# -- HTTP/1.0 ---------------------------------------------------------------------------------


async def test_http10_client_gets_a_close_delimited_answer(demo, proxy_factory):
    proxy = await proxy_factory(demo.url)
    # /stream is chunked at the origin: an HTTP/1.0 client must get it close-delimited.
    data = await raw_request(proxy.port, b"GET /stream HTTP/1.0\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in head.lower()
    assert b"connection: close" in head.lower()
    assert body.count(b"chunk ") == 10


async def test_http10_keepalive_client_keeps_its_connection(origin_factory, proxy_factory):
    origin = await origin_factory(serve_ok)
    proxy = await proxy_factory(origin.url)
    reader, writer = await asyncio.open_connection(LOOPBACK, proxy.port)
    for _ in range(2):
        writer.write(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"connection: keep-alive" in head.lower()
        assert await reader.readexactly(5) == b"hello"
    writer.close()


# -- bodies, both ways --------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_request_body_streams_to_the_origin(demo, proxy_factory, chunked):
    proxy = await proxy_factory(demo.url)
    payload = bytes(range(256)) * 4096  # 1 MiB

    async def gen():
        for i in range(0, len(payload), 65536):
            yield payload[i : i + 65536]

    async with aiohttp.ClientSession() as session:
        body = gen() if chunked else payload
        async with session.post(proxy.url + "/echo", data=body) as resp:
            echo = await resp.json()
    assert echo["body_bytes"] == len(payload)
    assert echo["body_sha256"] == hashlib.sha256(payload).hexdigest()
    headers = {k.lower(): v for k, v in echo["headers"]}
    if chunked:
        assert headers["transfer-encoding"] == "chunked"
    else:
        assert headers["content-length"] == str(len(payload))


async def test_response_bodies_stream_back_chunked_and_sized(demo, proxy_factory):
    proxy = await proxy_factory(demo.url)
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/bytes/3000000") as resp:
            body = await resp.read()
            assert resp.headers["Content-Length"] == "3000000"
        assert body == (bytes(range(256)) * 256 * 46)[:3000000]
        async with session.get(proxy.url + "/stream") as resp:
            assert resp.headers["Transfer-Encoding"] == "chunked"
            text = await resp.text()
        assert text.count("chunk ") == 10


# -- framing: HEAD, 204, 304, 1xx ---------------------------------------------------------------


async def test_head_response_has_no_body_and_the_connection_stays_usable(
    origin_factory, proxy_factory
):
    async def script(conn: OriginConnection) -> None:
        while request := await conn.read_request():
            if request.startswith(b"HEAD"):
                # Headers that promise a body: a HEAD response still has none.
                conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            else:
                conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nget")
            await conn.drain()

    origin = await origin_factory(script)
    proxy = await proxy_factory(origin.url)
    data = await raw_request(
        proxy.port,
        b"HEAD /a HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /b HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    head_resp, _, rest = data.partition(b"\r\n\r\n")
    assert head_resp.startswith(b"HTTP/1.1 200")
    assert b"content-length: 1000" in head_resp.lower()
    assert rest.startswith(b"HTTP/1.1 200")  # nothing between the HEAD response and the next
    assert rest.endswith(b"\r\n\r\nget")
    assert origin.connections == 1  # the upstream connection was reused after HEAD


@pytest.mark.parametrize("status", [204, 304])
async def test_bodyless_statuses_are_framed_without_a_body(origin_factory, proxy_factory, status):
    async def script(conn: OriginConnection) -> None:
        while await conn.read_request():
            conn.write(f'HTTP/1.1 {status} X\r\nETag: "v1"\r\n\r\n'.encode())
            await conn.drain()

    origin = await origin_factory(script)
    proxy = await proxy_factory(origin.url)
    data = await raw_request(
        proxy.port,
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    responses, unfinished = parse_responses(data)
    assert [r.status for r in responses] == [status, status]
    assert not unfinished
    for response in responses:
        assert response.body == b""
        assert response.header("Transfer-Encoding") is None


async def test_expect_100_continue_is_relayed_before_the_body(origin_factory, proxy_factory):
    async def script(conn: OriginConnection) -> None:
        head = await conn.reader.readuntil(b"\r\n\r\n")
        assert b"expect: 100-continue" in head.lower()
        conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await conn.drain()
        body = await conn.reader.readexactly(5)
        await conn.respond(200, b"got " + body)

    origin = await origin_factory(script)
    proxy = await proxy_factory(origin.url)
    reader, writer = await asyncio.open_connection(LOOPBACK, proxy.port)
    writer.write(
        b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hello")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    assert await reader.readexactly(9) == b"got hello"
    writer.close()


async def test_pipelined_requests_are_answered_in_order(origin_factory, proxy_factory):
    async def script(conn: OriginConnection) -> None:
        while request := await conn.read_request():
            path = request.split(b" ")[1]
            if path == b"/1":
                await asyncio.sleep(0.2)  # the first answer is the slowest
            await conn.respond(200, path)

    origin = await origin_factory(script)
    proxy = await proxy_factory(origin.url)
    pipeline = b"".join(
        b"GET /%d HTTP/1.1\r\nHost: a\r\n%s\r\n" % (i, b"Connection: close\r\n" if i == 4 else b"")
        for i in range(1, 5)
    )
    data = await raw_request(proxy.port, pipeline)
    responses, _ = parse_responses(data)
    assert [r.body for r in responses] == [b"/1", b"/2", b"/3", b"/4"]


# -- upgrades and long streams ---------------------------------------------------------------------


async def test_websocket_is_tunnelled_both_ways(demo, proxy_factory):
    proxy = await proxy_factory(demo.url)
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(proxy.url + "/ws") as ws:
            for text in ("one", "two", "x" * 100_000):
                await ws.send_str(text)
                assert (await ws.receive(timeout=5)).data == text
            await ws.send_bytes(b"\x00\x01")
            assert (await ws.receive(timeout=5)).data == b"\x00\x01"
    record = await proxy.last_log()
    assert record["status"] == 101 and record["error"] is None


async def test_server_sent_events_are_flushed_as_they_arrive(demo, proxy_factory):
    proxy = await proxy_factory(demo.url)
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        async with session.get(proxy.url + "/sse") as resp:
            first = await resp.content.readuntil(b"\n\n")
            first_at = time.monotonic() - started
            rest = await resp.read()
            end_at = time.monotonic() - started
    assert b"id: 1" in first
    assert rest.count(b"event: tick") == 4
    # Five events 200 ms apart: the first must arrive long before the stream ends.
    assert end_at - first_at > 0.5


# -- stale pooled connections --------------------------------------------------------------------


def closes_on_second_request(conn: OriginConnection):
    async def script(conn: OriginConnection) -> None:
        served = 0
        while await conn.read_request():
            if conn.index == 0 and served == 1:
                conn.close()  # the stale-connection race: closed, no response byte
                return
            await conn.respond(200, b"fresh")
            served += 1

    return script(conn)


async def test_stale_pooled_connection_is_replayed_once_for_idempotent_requests(
    origin_factory, proxy_factory
):
    origin = await origin_factory(closes_on_second_request)
    proxy = await proxy_factory(origin.url)
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.get(proxy.url + "/r") as resp:
                assert resp.status == 200
                assert await resp.read() == b"fresh"
    await proxy.settle()
    records = proxy.access_log()
    assert records[-1]["retried"] is True and records[-1]["error"] is None
    assert origin.connections == 2
    assert len(origin.requests) == 3  # the second request reached the origin twice


async def test_non_idempotent_request_is_never_replayed(origin_factory, proxy_factory):
    origin = await origin_factory(closes_on_second_request)
    proxy = await proxy_factory(origin.url)
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/w", data=b"a") as resp:
            assert resp.status == 200
        async with session.post(proxy.url + "/w", data=b"b") as resp:
            assert resp.status == 502
            assert "error=connection_terminated" in resp.headers["Proxy-Status"]
    await proxy.settle()
    assert proxy.access_log()[-1]["retried"] is False
    assert len(origin.requests) == 2


# -- header rules ---------------------------------------------------------------------------


async def test_hop_by_hop_headers_are_dropped_both_ways(origin_factory, proxy_factory):
    seen: list[bytes] = []

    async def script(conn: OriginConnection) -> None:
        request = await conn.read_request()
        assert request is not None
        seen.append(request)
        conn.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: X-Secret-Hop\r\n"
            b"X-Secret-Hop: 1\r\nKeep-Alive: timeout=5\r\nX-End-To-End: yes\r\n"
            b"Proxy-Authenticate: Basic\r\n\r\nok"
        )
        await conn.drain()

    origin = await origin_factory(script)
    proxy = await proxy_factory(origin.url)
    data = await raw_request(
        proxy.port,
        b"GET /h HTTP/1.1\r\nHost: app.test\r\nConnection: close, X-Client-Hop\r\n"
        b"X-Client-Hop: 1\r\nKeep-Alive: 300\r\nTE: trailers\r\nProxy-Authorization: x\r\n"
        b"X-Request-Id: abc-123\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-"
        b"b7ad6b7169203331-01\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n",
    )
    upstream = seen[0].lower()
    for name in (b"x-client-hop", b"keep-alive", b"te:", b"proxy-authorization", b"6.6.6.6"):
        assert name not in upstream, name
    assert b"connection: close" not in upstream
    assert b"x-forwarded-for: 127.0.0.1\r\n" in upstream  # untrusted client: replaced
    assert b"x-forwarded-proto: http\r\n" in upstream
    assert b"x-forwarded-host: app.test\r\n" in upstream
    assert b"via: 1.1 faultline" in upstream
    assert b"x-request-id: abc-123\r\n" in upstream
    assert b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n" in upstream
    (response,), _ = parse_responses(data)
    assert response.header("X-Secret-Hop") is None
    assert response.header("Keep-Alive") is None
    assert response.header("Proxy-Authenticate") is None
    assert response.header("X-End-To-End") == "yes"
    assert response.header("X-Request-Id") == "abc-123"
    assert response.header("Via") == "1.1 faultline"


async def test_request_id_is_made_when_absent_and_sent_both_ways(origin_factory, proxy_factory):
    seen: list[bytes] = []

    async def script(conn: OriginConnection) -> None:
        while request := await conn.read_request():
            seen.append(request)
            await conn.respond(200, b"ok")

    origin = await origin_factory(script)
    proxy = await proxy_factory(origin.url)
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/id") as resp:
            rid = resp.headers["X-Request-Id"]
    assert rid and f"x-request-id: {rid}".encode() in seen[0].lower()
    record = await proxy.last_log()
    assert record["request_id"] == rid


async def test_every_response_carries_proxy_status_and_server_timing(demo, proxy_factory):
    proxy = await proxy_factory(demo.url)
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/status/503") as resp:
            assert resp.status == 503
            assert resp.headers["Proxy-Status"] == (
                f'faultline; received-status=503; next-hop="127.0.0.1:{demo.port}"'
            )
            timing = resp.headers["Server-Timing"]
            assert "ttfb;dur=" in timing and "proxy;dur=" in timing
        async with session.get(proxy.url + "/hangup") as resp:
            assert resp.status == 502
            assert resp.headers["Proxy-Status"].startswith("faultline; error=connection_terminated")
            assert "proxy;dur=" in resp.headers["Server-Timing"]


async def test_diagnostic_headers_can_be_switched_off(demo, proxy_factory):
    proxy = await proxy_factory(
        demo.url,
        **{
            "headers.proxy_status": False,
            "headers.server_timing": False,
            "headers.via": False,
            "headers.forwarded": False,
        },
    )
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/echo", data=b"x") as resp:
            echo = await resp.json()
            assert "Proxy-Status" not in resp.headers
            assert "Server-Timing" not in resp.headers
            assert "Via" not in resp.headers
    names = {k.lower() for k, _ in echo["headers"]}
    assert not names & {"via", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"}
