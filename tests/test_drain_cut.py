"""The drain deadline cuts what is still in flight, and the record says the proxy did it
(issue 17: it was a 499 `client_closed_request`, source client, counted as a client abort).

In-process proxies, so that the counts in `/stats` and `/metrics` can be read after the
drain (the admin port closes with it); real sockets between client, proxy and origin."""

from __future__ import annotations

import asyncio

import pytest

from proxy.diagnosis.faults import Fault
from proxy.telemetry.metrics import make_registry, render

from support import LOOPBACK, OriginConnection, parse_responses, proxy_status_members

CUT = Fault.PROXY_INTERNAL_RESPONSE.value


async def _client(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def _read_all(reader: asyncio.StreamReader) -> tuple[bytes, str]:
    data = bytearray()
    try:
        async with asyncio.timeout(5):
            while chunk := await reader.read(65536):
                data += chunk
    except ConnectionResetError:
        return bytes(data), "reset"
    return bytes(data), "eof"


def _metric(server, name: str, **labels: str) -> float:
    text = render(make_registry(server.telemetry, server.ctx.pool.counts), None)[0].decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{"):
            got = ",".join(sorted(line[len(name) + 1 : line.index("}")].split(",")))
            if got == want:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture
async def slow_origin(origin_factory):
    """/slow: takes 30 s to answer; /partial: sends its head and part of the body, then stalls."""

    async def script(conn: OriginConnection) -> None:
        request = await conn.read_request()
        if request is None:
            return
        if b"/partial" in request.split(b"\r\n", 1)[0]:
            conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst-part")
            await conn.drain()
        await conn.hold(30)

    return await origin_factory(script)


async def test_a_request_waiting_for_its_response_gets_a_503_that_names_the_drain(
    slow_origin, proxy_factory
):
    proxy = await proxy_factory(
        slow_origin.url, **{"timeouts.drain": "500ms", "timeouts.shutdown_delay": "0s"}
    )
    reader, writer = await _client(proxy.port, "/slow")
    while not slow_origin.requests:
        await asyncio.sleep(0.01)
    await proxy.server.shutdown()
    data, how = await _read_all(reader)
    writer.close()
    (response,), unfinished = parse_responses(data)
    assert not unfinished and how == "eof"
    assert response.status == 503 and response.header("Connection") == "close"
    member = proxy_status_members(response.header("Proxy-Status") or "")[-1]
    assert member.startswith(f"faultline; error={CUT}"), member
    problem = response.json()
    assert (problem["error"], problem["layer"], problem["source"]) == (CUT, "proxy", "proxy")
    assert "500ms" in problem["detail"] and "timeouts.drain" in problem["detail"]
    assert "timeouts.drain" in problem["check_first"]
    assert "terminationGracePeriodSeconds" in problem["check_first"]

    (record,) = proxy.log.lines()
    assert (record["status"], record["source"], record["layer"], record["error"]) == (
        503,
        "proxy",
        "proxy",
        CUT,
    )
    counts = proxy.server.telemetry.stats.counts
    assert counts == {(503, "proxy", CUT): 1}  # not a 499, not a client abort
    ctx = proxy.server
    assert (
        _metric(
            ctx,
            "faultline_responses_total",
            code="503",
            source="proxy",
            layer="proxy",
            error=CUT,
            protocol="http/1.1",
        )
        == 1
    )
    assert (
        _metric(
            ctx,
            "faultline_responses_total",
            code="499",
            source="client",
            layer="client",
            error=Fault.CLIENT_CLOSED_REQUEST.value,
            protocol="http/1.1",
        )
        == 0
    )


async def test_a_response_already_started_is_reset_and_charged_to_the_proxy(
    slow_origin, proxy_factory
):
    proxy = await proxy_factory(
        slow_origin.url, **{"timeouts.drain": "300ms", "timeouts.shutdown_delay": "0s"}
    )
    reader, writer = await _client(proxy.port, "/partial")
    head = await asyncio.wait_for(reader.readuntil(b"first-part"), 5)
    assert head.startswith(b"HTTP/1.1 200 ")
    await proxy.server.shutdown()
    rest, how = await _read_all(reader)
    writer.close()
    assert how == "reset", (how, rest)  # a cut body never looks complete
    (record,) = proxy.log.lines()
    assert (record["status"], record["layer"], record["error"]) == (200, "proxy", CUT), record
    assert "timeouts.drain" in record["details"]
    assert proxy.server.telemetry.stats.counts == {(200, "origin", CUT): 1}


async def test_an_exchange_that_finishes_within_the_drain_is_not_cut(origin_factory, proxy_factory):
    """The near miss: a slow answer inside the drain time is the origin's, untouched."""

    async def script(conn: OriginConnection) -> None:
        if await conn.read_request() is not None:
            await asyncio.sleep(0.3)
            await conn.respond(200, b"in time")

    origin = await origin_factory(script)
    proxy = await proxy_factory(
        origin.url, **{"timeouts.drain": "3s", "timeouts.shutdown_delay": "0s"}
    )
    reader, writer = await _client(proxy.port, "/")
    while not origin.requests:
        await asyncio.sleep(0.01)
    await proxy.server.shutdown()
    data, _ = await _read_all(reader)
    writer.close()
    (response,), _ = parse_responses(data)
    assert response.status == 200 and response.body == b"in time"
    (record,) = proxy.log.lines()
    assert (record["source"], record["error"]) == ("origin", None)
    assert proxy.server.telemetry.stats.counts == {(200, "origin", None): 1}
