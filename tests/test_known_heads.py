"""Repeated request heads: a read that was exactly one bodiless head is remembered, and the
same bytes later skip parsing. What the origin receives, what the client gets and what the
stats count must be exactly what a fresh parse gives."""

from __future__ import annotations

import asyncio

import pytest
from hostile_support import RecordingOrigin

from proxy.base.memo import Memo
from proxy.http1.client import DownstreamProtocol

from support import LOOPBACK, interpreted_only, parse_responses, start_proxy

GET = b"GET /items?page=2 HTTP/1.1\r\nHost: shop.example\r\nAccept: application/json\r\n\r\n"


@pytest.fixture
def remembered(monkeypatch) -> list[bytes]:
    """The targets of exchanges started from a remembered head (the parser skipped)."""
    started: list[bytes] = []
    original = DownstreamProtocol._known_head

    def counting(self, head):
        started.append(head.target)
        return original(self, head)

    monkeypatch.setattr(DownstreamProtocol, "_known_head", counting)
    return started


@pytest.fixture
async def origin():
    origin = await RecordingOrigin().start()
    yield origin
    await origin.close()


async def one_by_one(port: int, requests: list[bytes]) -> list:
    """Each request in its own write, its response read before the next is sent."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    responses = []
    try:
        for request in requests:
            writer.write(request)
            data = b""
            while True:
                data += await asyncio.wait_for(reader.read(65536), 5)
                parsed, partial = parse_responses(data, eof=False)
                if parsed and not partial:
                    break
            responses += parsed
    finally:
        writer.close()
    return responses


@interpreted_only
async def test_a_repeated_head_is_forwarded_exactly_as_the_first(origin, remembered):
    proxy = await start_proxy(origin.url)
    try:
        responses = await one_by_one(proxy.port, [GET] * 5)
        known = dict(proxy.server.known_heads)
        stats = proxy.stats
    finally:
        await proxy.server.close()
    assert GET in known  # remembered after the first parse
    assert remembered == [b"/items?page=2"] * 4  # and the next four skipped the parser
    assert [r.status for r in responses] == [200] * 5
    first, *rest = origin.requests
    assert len(rest) == 4
    ids = {r.header(b"x-request-id") for r in origin.requests}
    assert len(ids) == 5  # a new id per exchange, even from a remembered head
    ids_sent = {r.header("X-Request-Id") for r in responses}
    assert ids_sent == {i.decode() for i in ids}
    for later in rest:
        assert (later.method, later.target, later.body) == (first.method, first.target, b"")
        same = [(k, v) for k, v in later.headers if k.lower() != b"x-request-id"]
        assert same == [(k, v) for k, v in first.headers if k.lower() != b"x-request-id"]
    assert stats.total == 5 and stats.counts == {(200, "origin", None): 5}


@pytest.mark.parametrize(
    "request_bytes",
    [
        # Bodies that end like a head: only the framing check keeps them out.
        b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\n\r\n\r\n",
        b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",  # closes the connection
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n",  # two heads
        b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",  # refused
        b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    ],
    ids=["length-body", "chunked-body", "close", "pipelined", "refused", "upgrade"],
)
async def test_only_one_whole_bodiless_keep_alive_head_is_remembered(origin, request_bytes):
    proxy = await start_proxy(origin.url)
    try:
        _reader, writer = await asyncio.open_connection(LOOPBACK, proxy.port)
        writer.write(request_bytes)
        await asyncio.sleep(0.3)
        writer.close()
        await proxy.settle()
        known = dict(proxy.server.known_heads)
    finally:
        await proxy.server.close()
    assert known == {}


async def test_a_refused_head_stays_refused_every_time(origin):
    bad = b"GET /a#frag HTTP/1.1\r\nHost: a\r\n\r\n"
    proxy = await start_proxy(origin.url)
    try:
        for _ in range(3):
            reader, writer = await asyncio.open_connection(LOOPBACK, proxy.port)
            writer.write(bad)
            data = await asyncio.wait_for(reader.read(65536), 5)
            writer.close()
            (response,), _ = parse_responses(data)
            assert response.status == 400
        known = dict(proxy.server.known_heads)
    finally:
        await proxy.server.close()
    assert known == {} and origin.requests == []


@interpreted_only
async def test_a_remembered_head_still_meets_the_in_flight_limit(remembered):
    """Per-exchange checks run for remembered heads too: with one exchange in flight (the
    origin holds it), the same head from another client is over limits.max_in_flight."""
    holding = await RecordingOrigin(hold=True).start()
    proxy = await start_proxy(holding.url, **{"limits.max_in_flight": 1})
    try:
        _first_reader, first = await asyncio.open_connection(LOOPBACK, proxy.port)
        first.write(GET)
        await asyncio.sleep(0.2)
        assert GET in proxy.server.known_heads  # parsed once, remembered
        reader, second = await asyncio.open_connection(LOOPBACK, proxy.port)
        second.write(GET)
        data = await asyncio.wait_for(reader.read(65536), 5)
        first.close()
        second.close()
    finally:
        await proxy.server.close()
        await holding.close()
    (response,), _ = parse_responses(data)
    assert response.status == 503
    assert "error=connection_limit_reached" in response.header("Proxy-Status")
    assert remembered == [b"/items?page=2"]  # the refused one started from the memo
    assert holding.max_open == 1  # only the first exchange reached the origin


def test_a_memo_forgets_everything_when_full_and_never_keeps_long_keys():
    memo: Memo[bytes, int] = Memo(max_entries=2, max_key_len=4)
    memo.remember(b"a", 1)
    memo.remember(b"toolong", 2)
    memo.remember(b"b", 3)
    assert memo == {b"a": 1, b"b": 3}
    memo.remember(b"c", 4)
    assert memo == {b"c": 4}
