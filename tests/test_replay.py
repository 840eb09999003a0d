"""Only the stale-connection race is replayed (README: "Nothing else is ever replayed").

A pooled connection is reused for the second request; the origin then fails it in each way
a reused connection can fail. Only a close or reset before any response byte is the race
the replay exists for (the origin closed an idle connection as the request went out): that
request is sent once more, on a fresh connection. Every other fault is the origin's answer
to this very request, and replaying it would run the request twice and hide the fault.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp
import pytest

from support import LOOPBACK, OriginConnection, parse_responses, read_until_reset

BIG_HEAD_LIMIT = 1024
RESPONSE_HEADERS_TIMEOUT = "300ms"


@dataclass(frozen=True)
class Row:
    name: str
    misbehave: bytes | None  # what the origin writes instead of an answer
    then: str  # "close" | "reset" | "stall" (after writing `misbehave`)
    status: int | None  # what the client gets; None: its connection is cut
    error: str
    retried: bool
    warm: bool = True  # the failing request goes out on a reused (pooled) connection


ROWS = [
    # The race the replay is for: the idle connection was closed as the request went out.
    Row("closed-before-any-byte", None, "close", 200, "", True),
    Row("reset-before-any-byte", None, "reset", 200, "", True),
    # Everything else that can happen on a reused connection is never replayed.
    Row(
        "invalid-status-line",
        b"HTTP/1.1 2x0 Oops\r\n\r\n",
        "close",
        502,
        "http_protocol_error",
        False,
    ),
    Row(
        "not-http-at-all",
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        "close",
        502,
        "http_protocol_error",
        False,
    ),
    Row(
        "head-cut-short",
        b"HTTP/1.1 200 OK\r\nContent-Len",
        "close",
        502,
        "http_protocol_error",
        False,
    ),
    Row(
        "head-cut-by-reset",
        b"HTTP/1.1 200 OK\r\nContent-Len",
        "reset",
        502,
        "http_protocol_error",
        False,
    ),
    Row(
        "oversized-head",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (2 * BIG_HEAD_LIMIT) + b"\r\n\r\n",
        "stall",
        502,
        "http_response_header_section_size",
        False,
    ),
    Row("no-answer-in-time", b"", "stall", 504, "http_response_timeout", False),
    Row(
        "body-cut-short",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfive.",
        "close",
        None,
        "http_response_incomplete",
        False,
    ),
    # A fresh connection that fails is no stale pooled connection: not replayed either.
    Row("fresh-connection-closed", None, "close", 502, "connection_terminated", False, warm=False),
]


def script_for(row: Row):
    """Connection 0 answers the warm-up request, then fails the next one as the row says;
    any later connection (a replay) answers every request with 200."""

    async def script(conn: OriginConnection) -> None:
        served = 0
        while await conn.read_request():
            if conn.index == 0 and served == (1 if row.warm else 0):
                if row.misbehave:
                    conn.write(row.misbehave)
                    await conn.drain()
                    await asyncio.sleep(0.05)  # the bytes arrive before the close
                if row.then == "close":
                    conn.close()
                elif row.then == "reset":
                    conn.reset()
                else:
                    await conn.hold(3)
                return
            await conn.respond(200, b"fresh")
            served += 1

    return script


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
async def test_only_the_stale_connection_race_is_replayed(row: Row, origin_factory, proxy_factory):
    origin = await origin_factory(script_for(row))
    proxy = await proxy_factory(
        origin.url,
        **{
            "timeouts.response_headers": RESPONSE_HEADERS_TIMEOUT,
            "limits.max_response_header_bytes": BIG_HEAD_LIMIT,
        },
    )
    async with aiohttp.ClientSession() as session:
        if row.warm:
            async with session.get(proxy.url + "/warm-up") as resp:
                assert resp.status == 200 and await resp.read() == b"fresh"
        try:
            async with session.get(proxy.url + "/again") as resp:
                status: int | None = resp.status
                proxy_status = resp.headers.get("Proxy-Status", "")
                await resp.read()
        except aiohttp.ClientError:
            status, proxy_status = None, ""
    record = await proxy.last_log()
    assert record["path"] == "/again"
    assert record["reused"] is (row.warm and not row.retried)  # a replay's connection is fresh
    assert record["retried"] is row.retried
    assert status == row.status
    sent = origin.requests.count(next(r for r in origin.requests if b" /again " in r))
    if row.retried:
        assert (record["status"], record["source"], record["error"]) == (200, "origin", None)
        assert sent == 2 and origin.connections == 2  # once more, on a fresh connection
    else:
        assert record["error"] == row.error
        assert sent == 1 and origin.connections == 1  # the origin saw the request once
        if row.status is not None:
            assert f"error={row.error}" in proxy_status
            assert (record["status"], record["source"]) == (row.status, "proxy")


async def test_a_request_whose_body_is_still_coming_is_not_replayed(origin_factory, proxy_factory):
    """The replay needs the whole request in hand: a PUT whose body is still arriving when
    the reused connection closes gets the 502, and the origin saw only its head."""

    async def script(conn: OriginConnection) -> None:
        if conn.index == 0:
            await conn.read_request()  # the warm-up
            await conn.respond(200, b"fresh")
            await conn.reader.readuntil(b"\r\n\r\n")  # the PUT's head, not its body
            conn.close()
            return
        while await conn.read_request():
            await conn.respond(200, b"fresh")

    origin = await origin_factory(script)
    proxy = await proxy_factory(origin.url)
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/warm-up") as resp:
            assert resp.status == 200 and await resp.read() == b"fresh"
    reader, writer = await asyncio.open_connection(LOOPBACK, proxy.port)
    try:
        writer.write(b"PUT /doc HTTP/1.1\r\nHost: app\r\nContent-Length: 10\r\n\r\n12345")
        await writer.drain()
        await asyncio.sleep(0.2)  # the origin hangs up meanwhile
        writer.write(b"67890")
        await writer.drain()
        data, _ = await read_until_reset(reader, timeout=5)
    finally:
        writer.close()
    (response,), _ = parse_responses(data)
    assert response.status == 502
    assert "error=connection_terminated" in (response.header("Proxy-Status") or "")
    record = await proxy.last_log()
    assert (record["path"], record["reused"], record["retried"]) == ("/doc", True, False)
    assert origin.connections == 1
