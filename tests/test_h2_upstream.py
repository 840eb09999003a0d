"""Towards an HTTP/2 origin (`h2c://`): exchanges share one multiplexed connection within
the origin's SETTINGS_MAX_CONCURRENT_STREAMS, a graceful GOAWAY lets streams in flight
finish, streams the origin never processed (above a GOAWAY's last stream id, or refused)
are sent again once and the record says `retried`, and a slow client holds its own stream
only. The origin is a real HTTP/2 server on the h2 library, scripted per request."""

from __future__ import annotations

import asyncio
import contextlib
import ssl

import pytest
import trustme
from h2.errors import ErrorCodes
from h2_origin import OriginConn

from support import LOOPBACK, parse_responses, raw_request


def get(path: str, method: str = "GET", body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: app\r\nConnection: close\r\n"
    if body or method == "POST":
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


async def fetch(port: int, path: str, method: str = "GET", body: bytes = b""):
    data = await raw_request(port, get(path, method, body))
    (response,), _ = parse_responses(data)
    return response


async def hold_then_answer(conn: OriginConn, sid: int, head, body: bytes) -> None:
    await asyncio.sleep(float(head[b":path"].rpartition(b"/")[2] or 0))
    await conn.respond(sid, 200, b"ok " + head[b":path"] + b" " + body)


async def test_fifty_exchanges_share_one_origin_connection(h2_server, proxy_factory):
    origin = await h2_server(hold_then_answer)
    proxy = await proxy_factory(origin.url)
    responses = await asyncio.gather(*(fetch(proxy.port, "/hold/0.3") for _ in range(50)))
    assert [r.status for r in responses] == [200] * 50
    assert len(origin.connections) == 1  # one connection, fifty streams on it at once
    assert origin.peak == 50
    await proxy.settle()
    assert proxy.stats.counts == {(200, "origin", None): 50}
    assert proxy.pool.counts() == (1, 0)  # kept, idle, for the next exchanges
    assert proxy.pool.busy == 0 and proxy.pool.open == 1


async def test_a_shared_connection_counts_once_as_busy(h2_server, proxy_factory):
    origin = await h2_server(hold_then_answer)
    proxy = await proxy_factory(origin.url)
    calls = [asyncio.create_task(fetch(proxy.port, "/hold/0.5")) for _ in range(5)]
    for _ in range(100):
        await asyncio.sleep(0.02)
        if proxy.pool.busy == 5:
            break
    assert proxy.pool.counts() == (0, 1)  # one connection carrying five streams
    await asyncio.gather(*calls)
    await proxy.settle()
    assert proxy.pool.counts() == (1, 0)


async def test_the_origins_stream_limit_is_honoured(h2_server, proxy_factory):
    origin = await h2_server(hold_then_answer, max_streams=4)
    proxy = await proxy_factory(origin.url)
    responses = await asyncio.gather(*(fetch(proxy.port, "/hold/0.2") for _ in range(24)))
    assert [r.status for r in responses] == [200] * 24
    assert origin.peak <= 4  # never a stream beyond SETTINGS_MAX_CONCURRENT_STREAMS
    assert not origin.resets and len(origin.requests) == 24  # none refused, none twice
    assert 1 <= len(origin.connections) <= 6
    await proxy.settle()
    assert proxy.stats.counts == {(200, "origin", None): 24}


async def test_with_one_connection_allowed_exchanges_wait_for_a_free_stream(
    h2_server, proxy_factory
):
    origin = await h2_server(hold_then_answer, max_streams=2)
    proxy = await proxy_factory(origin.url, **{"pool.max_connections": 1})
    responses = await asyncio.gather(*(fetch(proxy.port, "/hold/0.1") for _ in range(8)))
    assert [r.status for r in responses] == [200] * 8
    assert len(origin.connections) == 1 and origin.peak == 2
    await proxy.settle()
    assert proxy.stats.counts == {(200, "origin", None): 8}


async def test_a_graceful_goaway_lets_the_streams_in_flight_finish(h2_server, proxy_factory):
    """Before: h2 closed its state on any GOAWAY and the streams in flight were cut."""
    started: list[int] = []

    async def answer(conn: OriginConn, sid: int, head, body: bytes) -> None:
        started.append(sid)
        if len(started) == 3:
            conn.goaway(last_stream_id=max(started))  # graceful: all three will finish
        await asyncio.sleep(0.3)
        await conn.respond(sid, 200, b"finished")

    origin = await h2_server(answer)
    proxy = await proxy_factory(origin.url)
    first = [asyncio.create_task(fetch(proxy.port, f"/{i}")) for i in range(3)]
    responses = await asyncio.gather(*first)
    assert [(r.status, r.body) for r in responses] == [(200, b"finished")] * 3
    # No new stream goes to a connection that is going away: the next one opens another.
    after = await fetch(proxy.port, "/after")
    assert after.status == 200 and len(origin.connections) == 2
    await proxy.settle()
    assert proxy.stats.counts == {(200, "origin", None): 4}
    assert not any(line.get("retried") for line in proxy.access_log())


async def test_streams_above_the_goaways_last_id_are_sent_again_once(h2_server, proxy_factory):
    """RFC 9113 §8.7: what the origin did not process may go again, even a POST."""
    seen: list[int] = []

    async def answer(conn: OriginConn, sid: int, head, body: bytes) -> None:
        seen.append(sid)
        if conn is conn.server.connections[0]:
            if len(seen) == 4:  # keep the first, refuse the three above it
                conn.goaway(last_stream_id=min(seen))
            await asyncio.sleep(0.3)
            if sid == min(seen):
                await conn.respond(sid, 200, b"first " + body)
            return
        await conn.respond(sid, 201, b"again " + body)

    origin = await h2_server(answer)
    proxy = await proxy_factory(origin.url)
    posts = [fetch(proxy.port, f"/p{i}", "POST", b"body%d" % i) for i in range(4)]
    responses = await asyncio.gather(*posts)
    statuses = sorted((r.status, r.body[:5]) for r in responses)
    assert statuses == [(200, b"first")] + [(201, b"again")] * 3
    assert len(origin.connections) == 2
    await proxy.settle()
    lines = proxy.access_log()
    assert sorted(bool(line.get("retried")) for line in lines) == [False, True, True, True]
    assert proxy.stats.counts == {(200, "origin", None): 1, (201, "origin", None): 3}


async def test_a_refused_stream_is_sent_again_and_the_record_says_so(h2_server, proxy_factory):
    refused: list[int] = []

    async def answer(conn: OriginConn, sid: int, head, body: bytes) -> None:
        if not refused:
            refused.append(sid)
            conn.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            conn.flush()
            return
        await conn.respond(sid, 200, b"second try " + body)

    origin = await h2_server(answer)
    proxy = await proxy_factory(origin.url)
    response = await fetch(proxy.port, "/once", "POST", b"payload")
    assert (response.status, response.body) == (200, b"second try payload")
    assert len(origin.requests) == 2 and len(origin.connections) == 1
    line = await proxy.last_log()
    assert line["retried"] is True and line["status"] == 200


async def test_an_error_goaway_cuts_the_streams_it_processed(h2_server, proxy_factory):
    async def answer(conn: OriginConn, sid: int, head, body: bytes) -> None:
        conn.goaway(last_stream_id=sid, code=ErrorCodes.INTERNAL_ERROR)

    origin = await h2_server(answer)
    proxy = await proxy_factory(origin.url)
    data = await raw_request(proxy.port, get("/x"))
    (response,), _ = parse_responses(data)
    assert response.status == 502
    assert b"error=connection_terminated" in data and b"GOAWAY INTERNAL_ERROR" in data
    line = await proxy.last_log()
    assert not line.get("retried")  # processed: never sent twice


async def test_an_http11_server_behind_h2c_is_named_in_the_detail(origin_factory, proxy_factory):
    async def script(conn) -> None:
        await conn.reader.read(24)  # the HTTP/2 preface, which it does not understand
        conn.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await conn.drain()
        conn.close()

    origin = await origin_factory(script)
    proxy = await proxy_factory(f"h2c://{LOOPBACK}:{origin.port}")
    data = await raw_request(proxy.port, get("/x"))
    (response,), _ = parse_responses(data)
    assert response.status == 502
    assert b"error=http_protocol_error" in data and b"answered in HTTP/1.x" in data
    line = await proxy.last_log()
    assert line["layer"] == "upstream" and line["source"] == "proxy"


async def test_a_slow_client_holds_its_own_stream_not_the_shared_connection(
    h2_server, proxy_factory
):
    big = b"x" * (8 * 1024 * 1024)

    async def answer(conn: OriginConn, sid: int, head, body: bytes) -> None:
        await conn.respond(sid, 200, big if head[b":path"] == b"/big" else b"small")

    origin = await h2_server(answer)
    proxy = await proxy_factory(origin.url)
    # A client that asks for 8 MiB and reads none of it.
    reader, writer = await asyncio.open_connection(LOOPBACK, proxy.port)
    writer.write(get("/big"))
    await writer.drain()
    await asyncio.sleep(0.5)
    loop = asyncio.get_running_loop()
    start = loop.time()
    small = await fetch(proxy.port, "/small")
    assert small.status == 200 and small.body == b"small"
    assert loop.time() - start < 2.0  # the same origin connection, not blocked
    assert len(origin.connections) == 1
    # The stalled stream holds at most its window plus what the sockets buffer.
    got = bytearray()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(10):
            while chunk := await reader.read(1 << 20):
                got += chunk
    writer.close()
    assert got.endswith(big[-100:]) and len(got) > len(big)
    await proxy.settle()
    assert proxy.stats.counts == {(200, "origin", None): 2}


# -- https:// upstreams: ALPN chooses h2, then http/1.1 --------------------------------------


@pytest.fixture
def tls(tmp_path):
    """A CA the proxy trusts (its file), and server contexts for 127.0.0.1 offering ALPN."""
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert = ca.issue_cert("127.0.0.1")

    def server_context(*alpn: str) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(context)
        context.set_alpn_protocols(list(alpn))
        return context

    return str(ca_file), server_context, cert


async def test_an_https_origin_that_chooses_h2_gets_streams_on_one_connection(
    h2_server, proxy_factory, tls
):
    ca_file, server_context, _ = tls

    async def answer(conn: OriginConn, sid: int, head, body: bytes) -> None:
        await asyncio.sleep(0.05)
        await conn.respond(sid, 200, b"over " + head[b":scheme"])

    origin = await h2_server(answer, ssl=server_context("h2", "http/1.1"))
    proxy = await proxy_factory(origin.url, **{"tls.ca_file": ca_file})
    first = await fetch(proxy.port, "/first")
    assert (first.status, first.body) == (200, b"over https")
    responses = await asyncio.gather(*(fetch(proxy.port, "/n") for _ in range(20)))
    assert [r.status for r in responses] == [200] * 20
    assert len(origin.connections) == 1 and origin.peak == 20
    await proxy.settle()
    assert proxy.stats.counts == {(200, "origin", None): 21}
    first_line, *others = proxy.access_log()
    assert first_line["phases_ms"]["tls"] is not None and not first_line["reused"]
    assert all(line["reused"] and line["phases_ms"]["tls"] is None for line in others)


async def test_grpc_through_an_https_origin_that_chooses_h2(proxy_factory, tls):
    """A real grpcio server over TLS: the call goes through, its status is the origin's."""
    from concurrent.futures import ThreadPoolExecutor

    grpc = pytest.importorskip("grpc")
    ca_file, _, cert = tls
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    handler = grpc.method_handlers_generic_handler(
        "echo.Echo",
        {"Say": grpc.unary_unary_rpc_method_handler(lambda request, context: b"tls " + request)},
    )
    server.add_generic_rpc_handlers((handler,))
    key = cert.private_key_pem.bytes()
    chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
    port = server.add_secure_port(f"{LOOPBACK}:0", grpc.ssl_server_credentials([(key, chain)]))
    server.start()
    try:
        proxy = await proxy_factory(f"https://{LOOPBACK}:{port}", **{"tls.ca_file": ca_file})

        def call() -> bytes:
            with grpc.insecure_channel(f"{LOOPBACK}:{proxy.port}") as channel:
                say = channel.unary_unary("/echo.Echo/Say", None, None)
                return say(b"hello", timeout=5)

        assert await asyncio.to_thread(call) == b"tls hello"
        line = await proxy.last_log()
        assert (line["grpc_status"], line["source"], line["status"]) == (0, "origin", 200)
    finally:
        server.stop(None)


async def test_an_https_origin_that_chooses_http11_serves_http11_and_refuses_grpc(
    origin_factory, proxy_factory, tls
):
    ca_file, server_context, _ = tls
    context = server_context("http/1.1")

    async def script(conn) -> None:
        while await conn.read_request() is not None:
            await conn.respond(200, b"one-one")

    from support import ScriptedOrigin

    origin = await ScriptedOrigin(script, ssl=context).start()
    try:
        proxy = await proxy_factory(origin.url, **{"tls.ca_file": ca_file})
        response = await fetch(proxy.port, "/plain")
        assert (response.status, response.body) == (200, b"one-one")
        from test_http2 import H2Client

        client = await H2Client.connect(proxy.port)
        grpc_head = ((b"content-type", b"application/grpc"), (b"te", b"trailers"))
        sid = client.request("/echo.Echo/Say", "POST", b"\0\0\0\0\0", grpc_head)
        await client.send()
        await client.until(lambda: sid in client.ended)
        head = client.heads[sid]
        assert head[b"grpc-status"] == b"14"
        assert b"proxy_configuration_error" in head[b"grpc-message"]
        assert b"chose HTTP/1.1 (ALPN)" in head[b"grpc-message"]
        client.close()
        await proxy.settle()
        config_error = "proxy_configuration_error"
        assert proxy.stats.counts == {(200, "origin", None): 1, (200, "proxy", config_error): 1}
    finally:
        await origin.close()


@pytest.mark.parametrize("scheme", ["h2c", "http"])
async def test_an_origin_that_takes_no_upload_holds_it_bounded_then_times_out(
    scheme, h2_server, origin_factory, proxy_factory
):
    """The origin never opens its window (HTTP/2), or stops reading its socket (HTTP/1.1):
    the proxy keeps at most its buffer of the upload (the client is paused, the proxy's
    memory does not grow), and after timeouts.upstream_read without a byte taken it answers
    504, charged to the upstream. Before, the exchange waited for ever."""

    async def never(conn: OriginConn, sid: int, head, body: bytes) -> None:
        raise AssertionError("the upload can never end")

    async def reads_the_head_only(conn) -> None:
        await conn.reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(30)  # its stream reader stops taking bytes at 128 KiB

    if scheme == "h2c":
        url = (await h2_server(never, ack_data=False)).url
    else:
        url = (await origin_factory(reads_the_head_only)).url
    proxy = await proxy_factory(url, **{"timeouts.upstream_read": "1s"})
    size = 64 * 1024 * 1024
    reader, writer = await asyncio.open_connection(LOOPBACK, proxy.port)
    writer.write(f"PUT /up HTTP/1.1\r\nHost: app\r\nContent-Length: {size}\r\n\r\n".encode())

    async def upload() -> None:
        chunk = b"u" * (1 << 20)
        with contextlib.suppress(ConnectionError):
            for _ in range(size // len(chunk)):
                writer.write(chunk)
                await writer.drain()

    sender = asyncio.create_task(upload())
    data = bytearray()
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(10):
            while chunk := await reader.read(65536):
                data += chunk
    sender.cancel()
    writer.close()
    (response,), _ = parse_responses(bytes(data))
    assert response.status == 504
    assert b"error=http_response_timeout" in data and b"took no request body bytes" in data
    line = await proxy.last_log()
    assert (line["source"], line["layer"]) == ("proxy", "upstream")
    # Of 64 MiB offered: the proxy's buffer, plus what the sockets to the origin hold.
    assert line["bytes_in"] < 24 * 1024 * 1024, line["bytes_in"]


@pytest.mark.parametrize(
    ("overrides", "present", "absent"),
    [
        ({}, [b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"via"], []),
        ({"headers.forwarded": False}, [b"via"], [b"x-forwarded-for", b"x-forwarded-host"]),
        ({"headers.via": False}, [b"x-forwarded-for"], [b"via"]),
    ],
)
async def test_the_header_switches_hold_towards_an_h2_origin(
    overrides, present, absent, h2_server, proxy_factory
):
    """headers.forwarded and headers.via apply to an HTTP/2 origin as to an HTTP/1.1 one
    (before, the HTTP/2 origin always got X-Forwarded-For and Via, and no -Host)."""
    origin = await h2_server(hold_then_answer)
    proxy = await proxy_factory(origin.url, **overrides)
    assert (await fetch(proxy.port, "/h/0")).status == 200
    (seen,) = origin.requests
    assert all(name in seen for name in present), seen
    assert not any(name in seen for name in absent), seen
    if b"x-forwarded-host" in seen:
        assert (seen[b"x-forwarded-host"], seen[b"x-forwarded-proto"]) == (b"app", b"http")


async def test_an_origin_reset_after_the_head_cuts_the_response_and_names_the_code(
    h2_server, proxy_factory
):
    """RST_STREAM after the head and part of the body: the client's response is cut (a
    reset, never a clean end), and the record names the upstream and the frame's code."""

    async def cut(conn: OriginConn, sid: int, head, body: bytes) -> None:
        conn.h2.send_headers(sid, [(b":status", b"200"), (b"content-length", b"100")])
        conn.h2.send_data(sid, b"x" * 40)
        conn.flush()
        await asyncio.sleep(0.1)
        conn.h2.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)
        conn.flush()

    origin = await h2_server(cut)
    proxy = await proxy_factory(origin.url)
    data = await raw_request(proxy.port, get("/cut"))
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"x" * 40)  # 40 of 100
    line = await proxy.last_log()
    assert (line["source"], line["layer"], line["error"]) == (
        "origin",
        "upstream",
        "http_response_incomplete",
    )
    assert "RST_STREAM INTERNAL_ERROR" in line["details"]
    assert proxy.pool.counts() == (1, 0)  # the connection outlives its stream


async def test_exchanges_waiting_for_a_connect_that_fails_each_learn_why(proxy_factory):
    """Ten exchanges, one connect in flight to an h2c origin whose connects hang: when it
    times out, the nine that waited for it must not wait their turn one by one until the
    pool's own deadline names the wrong fault; each gets its connect and its fault."""
    from test_fault_matrix import full_backlog_listener

    with full_backlog_listener() as url:
        upstream = url.replace("http://", "h2c://")
        proxy = await proxy_factory(
            upstream, **{"timeouts.connect": "300ms", "timeouts.pool_wait": "1s"}
        )
        responses = await asyncio.gather(*(fetch(proxy.port, f"/{i}") for i in range(10)))
    assert [r.status for r in responses] == [504] * 10
    await proxy.settle()
    assert proxy.stats.counts == {(504, "proxy", "connection_timeout"): 10}
