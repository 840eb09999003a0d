"""Slow and greedy clients: head and body deadlines (408), idle connections, the cap on
concurrent connections, header and body size limits, and 300 connections trickling one
byte a second next to a normal client. test_fault_matrix covers the plain 408s, 413s and
the 431; these are the variants a hostile client would try."""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest
from hostile_support import RecordingOrigin, raise_fd_limit, send_raw

from support import LOOPBACK, parse_responses, read_until_reset, spawn_proxy

C = b"Connection: close\r\n"


@pytest.fixture
async def origin():
    origin = await RecordingOrigin().start()
    yield origin
    await origin.close()


# -- deadlines ----------------------------------------------------------------------------------


async def test_a_trickled_head_gets_408_at_the_head_deadline_not_later(origin, proxy_factory):
    """Slowloris: progress does not extend timeouts.client_headers, which bounds the whole head."""
    proxy = await proxy_factory(origin.url, **{"timeouts.client_headers": "600ms"})
    reader, writer = await asyncio.open_connection(LOOPBACK, proxy.port)
    head = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Pad: " + b"p" * 200

    async def trickle() -> None:
        for i in range(len(head)):  # one byte every 20 ms: 4 s if never cut
            writer.write(head[i : i + 1])
            await asyncio.sleep(0.02)

    started = time.monotonic()
    trickling = asyncio.create_task(trickle())
    try:
        received, _ = await read_until_reset(reader, 5)
    finally:
        trickling.cancel()
        writer.close()
    elapsed = time.monotonic() - started
    (response,), _ = parse_responses(received)
    assert response.status == 408
    assert 0.5 < elapsed < 2.5, elapsed  # the deadline (0.6 s), not the 4 s of trickle
    record = await proxy.last_log()
    assert (record["status"], record["error"], record["layer"]) == (
        408,
        "http_request_error",
        "client",
    )
    assert origin.received_bytes() == b""


async def test_a_silent_connection_is_closed_unanswered_and_uncounted(origin, proxy_factory):
    proxy = await proxy_factory(origin.url, **{"timeouts.client_headers": "300ms"})
    reader, writer = await asyncio.open_connection(LOOPBACK, proxy.port)
    started = time.monotonic()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert data == b""  # closed, no bytes: nothing was asked, nothing is answered
    assert time.monotonic() - started < 2.5
    assert proxy.stats.total == 0 and proxy.stats.in_flight == 0
    assert origin.connections == []


async def test_an_idle_keepalive_connection_is_closed_after_the_keepalive_timeout(
    origin, proxy_factory
):
    proxy = await proxy_factory(origin.url, **{"timeouts.keepalive": "400ms"})
    reader, writer = await asyncio.open_connection(LOOPBACK, proxy.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"from-app!"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert 0.3 < time.monotonic() - started < 2.5
    assert proxy.stats.total == 1


async def test_a_body_trickled_within_the_idle_gap_is_not_cut(origin, proxy_factory):
    """timeouts.client_body is an idle gap: a slow but steady upload completes."""
    proxy = await proxy_factory(origin.url, **{"timeouts.client_body": "400ms"})
    reader, writer = await asyncio.open_connection(LOOPBACK, proxy.port)
    writer.write(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 8\r\n" + C + b"\r\n")
    for byte in b"12345678":  # 8 x 150 ms = 1.2 s in all, three times the gap
        await asyncio.sleep(0.15)
        writer.write(bytes([byte]))
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    (response,), _ = parse_responses(data)
    assert response.status == 200
    assert [r.body for r in origin.requests] == [b"12345678"]


# -- the cap on concurrent connections ------------------------------------------------------------


async def test_connections_over_the_cap_are_closed_before_a_byte_is_read(origin, proxy_factory):
    proxy = await proxy_factory(origin.url, **{"limits.max_connections": 4})
    held = [await asyncio.open_connection(LOOPBACK, proxy.port) for _ in range(4)]
    await asyncio.sleep(0.1)
    # The fifth: its request is never read, never forwarded, never counted as an exchange.
    data, ending = await send_raw(proxy.port, b"GET /over HTTP/1.1\r\nHost: a\r\n\r\n", 3)
    assert data == b"" and ending in ("eof", "reset")
    assert proxy.stats.refused_connections == 1
    assert proxy.stats.total == 0 and origin.requests == []
    # Those under the cap are served normally.
    reader, writer = held[0]
    writer.write(b"GET /under HTTP/1.1\r\nHost: a\r\n" + C + b"\r\n")
    (response,), _ = parse_responses(await asyncio.wait_for(reader.read(), 5))
    assert response.status == 200
    for _, w in held:
        w.close()
    await asyncio.sleep(0.1)
    # A slot freed is a slot usable again.
    data, _ = await send_raw(proxy.port, b"GET /again HTTP/1.1\r\nHost: a\r\n" + C + b"\r\n")
    assert parse_responses(data)[0][0].status == 200
    assert [r.target for r in origin.requests] == [b"/under", b"/again"]
    assert proxy.stats.refused_connections == 1


# -- size limits --------------------------------------------------------------------------------


async def _refused_431(proxy, origin, pieces: list[bytes], pause: float = 0.0) -> None:
    reader, writer = await asyncio.open_connection(LOOPBACK, proxy.port)

    async def send() -> None:
        for piece in pieces:
            if writer.transport.is_closing():
                return  # refused already: the rest would only be reset
            writer.write(piece)
            await asyncio.sleep(pause)

    sending = asyncio.create_task(send())
    try:
        data, _ = await read_until_reset(reader, 5)
    finally:
        sending.cancel()
        writer.close()
    (response,), _ = parse_responses(data)
    assert response.status == 431
    assert origin.received_bytes() == b""


async def test_head_size_limit_counts_the_target_the_fields_and_split_reads(origin, proxy_factory):
    proxy = await proxy_factory(origin.url, **{"limits.max_request_header_bytes": 1024})
    # A request target alone over the limit.
    await _refused_431(proxy, origin, [b"GET /" + b"t" * 2000 + b" HTTP/1.1\r\nHost: a\r\n\r\n"])
    # Many small fields, none large.
    await _refused_431(
        proxy, origin, [b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Small: s\r\n" * 200 + b"\r\n"]
    )
    # One field value arriving in many small reads (never a complete field to measure).
    await _refused_431(
        proxy,
        origin,
        [b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: "] + [b"v" * 100] * 20 + [b"\r\n\r\n"],
        pause=0.01,
    )
    # Just under the limit still passes.
    data, _ = await send_raw(
        proxy.port, b"GET / HTTP/1.1\r\nHost: a\r\nX-Fits: " + b"f" * 800 + b"\r\n" + C + b"\r\n"
    )
    assert parse_responses(data)[0][0].status == 200
    records = proxy.access_log()
    assert [r["status"] for r in records] == [431, 431, 431, 200]


async def test_body_size_limit_at_the_edge_and_for_a_streamed_chunked_body(origin, proxy_factory):
    proxy = await proxy_factory(origin.url, **{"limits.max_request_body_bytes": 100})
    data, _ = await send_raw(
        proxy.port,
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n" + C + b"\r\n" + b"b" * 100,
    )
    assert parse_responses(data)[0][0].status == 200
    # A chunked body that crosses the limit in its third chunk, sent as three writes.
    reader, writer = await asyncio.open_connection(LOOPBACK, proxy.port)
    writer.write(b"POST /big HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(3):
        await asyncio.sleep(0.05)
        writer.write(b"28\r\n" + b"c" * 40 + b"\r\n")
    try:
        data = await asyncio.wait_for(reader.read(), 5)
    except ConnectionError:
        data = b""
    writer.close()
    (response,), _ = parse_responses(data)
    assert response.status == 413
    record = await proxy.last_log()
    assert (record["status"], record["error"]) == (413, "http_request_error")
    # The origin never got a complete request out of it (it may have seen the start).
    assert [r.target for r in origin.requests] == [b"/"]
    assert origin.parse_errors == []
    assert b"c" * 81 not in origin.received_bytes().replace(b"\r\n28\r\n", b"")


# -- 300 trickling connections next to a normal client -----------------------------------------

TRICKLERS = 300
NORMAL_REQUESTS = 40
# Bound for the normal client's median latency while the tricklers run. On loopback a
# request through the proxy takes about 1 ms; a proxy that let slow clients hold it up
# (a blocking read, a worker per connection, a sweep that grows with idle connections)
# would cost about a second per trickled byte. 250 ms leaves a wide margin for 2 shared
# cores and still catches that.
P50_CAP_S = 0.25


async def _timed_get(port: int, i: int) -> float:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(b"GET /normal/%d HTTP/1.1\r\nHost: a\r\n" % i + C + b"\r\n")
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    elapsed = time.perf_counter() - started
    (response,), _ = parse_responses(data)
    assert response.status == 200 and response.body == b"from-app!"
    return elapsed


async def _normal_client(port: int, spacing: float) -> list[float]:
    latencies = []
    for i in range(NORMAL_REQUESTS):
        latencies.append(await _timed_get(port, i))
        await asyncio.sleep(spacing)
    return latencies


async def test_300_trickling_connections_do_not_slow_a_normal_client(origin):
    raise_fd_limit(4 * TRICKLERS + 256)
    proxy = spawn_proxy(origin.url, env={"FAULTLINE_LOG_ACCESS": "false"})
    tricklers: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        baseline = await _normal_client(proxy.port, 0.0)
        for _ in range(TRICKLERS):
            tricklers.append(await asyncio.open_connection(LOOPBACK, proxy.port))
        head = b"GET /slowloris HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"p" * 64

        async def trickle() -> int:
            sent = 0
            while sent < len(head):  # one byte a second on every connection
                for _, writer in tricklers:
                    writer.write(head[sent : sent + 1])
                sent += 1
                await asyncio.sleep(1.0)
            return sent

        trickling = asyncio.create_task(trickle())
        await asyncio.sleep(0.2)
        loaded = await _normal_client(proxy.port, 0.075)  # spread over about 3 s
        trickling.cancel()
        # The tricklers were all still connected: the load was real for the whole run.
        assert not any(reader.at_eof() for reader, _ in tricklers)
    finally:
        for _, writer in tricklers:
            writer.close()
        # Let the closes reach the proxy before stop() blocks this loop (else the drain
        # waits for the tricklers' unfinished heads until timeouts.client_headers).
        await asyncio.gather(*(w.wait_closed() for _, w in tricklers), return_exceptions=True)
        await asyncio.sleep(0.1)
        proxy.stop()
    p50_base, p50_loaded = statistics.median(baseline), statistics.median(loaded)
    print(
        f"\n[slow clients] {TRICKLERS} trickling connections: normal client p50 "
        f"{p50_base * 1e3:.2f} ms alone, {p50_loaded * 1e3:.2f} ms beside them "
        f"(max {max(loaded) * 1e3:.1f} ms); cap {P50_CAP_S * 1e3:.0f} ms"
    )
    assert len(loaded) == NORMAL_REQUESTS
    assert p50_loaded < P50_CAP_S
    assert len(origin.requests) == 2 * NORMAL_REQUESTS  # nothing of the tricklers reached it
