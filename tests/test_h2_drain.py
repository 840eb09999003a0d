"""Draining HTTP/2 connections (RFC 9113 §6.8): GOAWAY with the last stream id 2^31-1
first, then, a round trip later (a PING), GOAWAY with the real last stream id; the streams
in flight finish and their responses complete; a stream opened after the last GOAWAY is
refused (RST_STREAM REFUSED_STREAM, never forwarded, never an exchange); the connection
closes once its streams are done, or when `timeouts.drain` passes, and then the cut is the
proxy's, as on HTTP/1.1 (tests/test_drain_cut.py).

In-process proxies (the drain is `ProxyServer.shutdown`, what SIGTERM runs), so `/stats`
and the log can be read after it; real sockets between client, proxy and origin."""

from __future__ import annotations

import asyncio

from h2.connection import ConnectionInputs, H2ConnectionStateMachine
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, PingReceived
from test_http2 import H2Client

from proxy.diagnosis.faults import Fault

from support import OriginConnection

CUT = Fault.PROXY_INTERNAL_RESPONSE.value
MAX_STREAM_ID = 2**31 - 1


class _KeepsOpen(H2ConnectionStateMachine):
    """h2's connection state machine, except that a GOAWAY received leaves it open: h2
    closes on any GOAWAY (python-hyper/h2#1181), where RFC 9113 §6.8 lets the streams in
    flight finish (and a client may still open streams up to the last stream id)."""

    def process_input(self, input_):
        if input_ is ConnectionInputs.RECV_GOAWAY:
            return []
        return super().process_input(input_)


class DrainWatcher(H2Client):
    """An h2 client that reads on after GOAWAY and keeps every GOAWAY (its code and last
    stream id) and PING it receives."""

    def __init__(self, reader, writer) -> None:
        super().__init__(reader, writer)
        self.goaways: list[tuple[int, int]] = []  # (error code, last stream id)
        self.pings = 0
        self.closed = False

    @classmethod
    async def connect(cls, port: int, lax: bool = False) -> DrainWatcher:
        client = await super().connect(port, lax)
        machine = _KeepsOpen()
        machine.state = client.h2.state_machine.state
        client.h2.state_machine = machine
        return client  # type: ignore[return-value]

    def _event(self, event) -> None:
        super()._event(event)
        if isinstance(event, ConnectionTerminated):
            self.goaways.append((event.error_code, event.last_stream_id))
        elif isinstance(event, PingReceived):
            self.pings += 1

    async def until(self, done, timeout: float = 10.0) -> None:
        """Read (h2 answers PINGs) until `done()` or the proxy closes."""

        async def loop() -> None:
            while not done():
                data = await self.reader.read(65536)
                if not data:
                    self.closed = True
                    return
                for event in self.h2.receive_data(data):
                    self._event(event)
                self.writer.write(self.h2.data_to_send())

        await asyncio.wait_for(loop(), timeout)


async def test_a_stream_in_flight_completes_and_the_connection_closes(
    origin_factory, proxy_factory
):
    """The origin holds its answer ~1 s; the drain starts meanwhile. The client sees
    GOAWAY (2^31-1, then the real last stream id), the origin's 200 on its stream, and
    the connection closes; the exchange is counted once, as the origin's."""

    async def held(conn: OriginConnection) -> None:
        while await conn.read_request() is not None:
            await asyncio.sleep(1.0)
            await conn.respond(200, b"held answer")

    origin = await origin_factory(held)
    proxy = await proxy_factory(
        origin.url, **{"timeouts.drain": "5s", "timeouts.shutdown_delay": "0s"}
    )
    client = await DrainWatcher.connect(proxy.port)
    sid = client.request("/held")
    await client.send()
    while not origin.requests:
        await asyncio.sleep(0.01)
    shutdown = asyncio.create_task(proxy.server.shutdown())
    await client.until(lambda: False)
    assert client.closed
    await asyncio.wait_for(shutdown, 10)
    assert client.goaways[0] == (ErrorCodes.NO_ERROR, MAX_STREAM_ID), client.goaways
    assert client.goaways[-1] == (ErrorCodes.NO_ERROR, sid), client.goaways
    assert client.pings >= 1  # the round trip between the two
    assert sid in client.ended and sid not in client.reset
    assert client.heads[sid][b":status"] == b"200"
    assert bytes(client.bodies[sid]) == b"held answer"
    assert proxy.server.telemetry.stats.counts == {(200, "origin", None): 1}
    assert len(proxy.log.lines()) == 1


async def test_a_stream_opened_after_the_last_goaway_is_refused(origin_factory, proxy_factory):
    """Stream 3 leaves the client before it read the first GOAWAY: it is taken and
    answered, and the last GOAWAY names it. Stream 5, opened after that GOAWAY, is refused
    (REFUSED_STREAM): the origin never sees it and it is no exchange."""

    async def held(conn: OriginConnection) -> None:
        while await conn.read_request() is not None:
            await asyncio.sleep(0.5)
            await conn.respond(200, b"held answer")

    origin = await origin_factory(held)
    proxy = await proxy_factory(
        origin.url, **{"timeouts.drain": "5s", "timeouts.shutdown_delay": "0s"}
    )
    client = await DrainWatcher.connect(proxy.port)
    first = client.request("/first")
    await client.send()
    while not origin.requests:
        await asyncio.sleep(0.01)
    shutdown = asyncio.create_task(proxy.server.shutdown())
    await asyncio.sleep(0)  # the drain has begun: its first GOAWAY is on its way
    second = client.request("/second")
    await client.send()
    await client.until(lambda: len(client.goaways) == 2)
    assert client.goaways == [(ErrorCodes.NO_ERROR, MAX_STREAM_ID), (ErrorCodes.NO_ERROR, second)]
    late = client.request("/late")
    await client.send()
    await client.until(lambda: False)
    await asyncio.wait_for(shutdown, 10)
    assert client.closed
    assert client.reset == {late: ErrorCodes.REFUSED_STREAM}
    for sid in (first, second):
        assert client.heads[sid][b":status"] == b"200"
        assert bytes(client.bodies[sid]) == b"held answer"
    paths = sorted(request.split(b" ")[1] for request in origin.requests)
    assert paths == [b"/first", b"/second"]
    assert proxy.server.telemetry.stats.counts == {(200, "origin", None): 2}
    assert len(proxy.log.lines()) == 2


async def test_an_idle_connection_gets_goaway_and_closes_at_once(origin_factory, proxy_factory):
    async def quick(conn: OriginConnection) -> None:
        while await conn.read_request() is not None:
            await conn.respond(200, b"quick")

    origin = await origin_factory(quick)
    proxy = await proxy_factory(
        origin.url, **{"timeouts.drain": "20s", "timeouts.shutdown_delay": "0s"}
    )
    client = await DrainWatcher.connect(proxy.port)
    sid = client.request("/")
    await client.send()
    await client.until(lambda: sid in client.ended)
    loop = asyncio.get_running_loop()
    started = loop.time()
    shutdown = asyncio.create_task(proxy.server.shutdown())
    await client.until(lambda: False, timeout=5)
    await asyncio.wait_for(shutdown, 5)
    assert client.closed and client.goaways == [(ErrorCodes.NO_ERROR, sid)]
    assert loop.time() - started < 5  # not the 20 s drain time
    assert proxy.server.telemetry.stats.counts == {(200, "origin", None): 1}


async def test_the_drain_deadline_cuts_the_streams_in_flight_as_the_proxys(
    origin_factory, proxy_factory
):
    """Past timeouts.drain: a stream still waiting for its response gets a 503 that names
    the drain; one whose response had started is reset. Both are recorded once, as cut by
    the proxy (proxy_internal_response), never as the client's."""

    async def stuck(conn: OriginConnection) -> None:
        request = await conn.read_request()
        if request is not None and b" /partial " in request:
            conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst-part")
            await conn.drain()
        await conn.hold(30)

    origin = await origin_factory(stuck)
    proxy = await proxy_factory(
        origin.url, **{"timeouts.drain": "500ms", "timeouts.shutdown_delay": "0s"}
    )
    client = await DrainWatcher.connect(proxy.port)
    slow = client.request("/slow")
    partial = client.request("/partial")
    await client.send()
    await client.until(lambda: bytes(client.bodies[partial]) == b"first-part")
    shutdown = asyncio.create_task(proxy.server.shutdown())
    await client.until(lambda: False)
    await asyncio.wait_for(shutdown, 10)
    head = client.heads[slow]
    assert head[b":status"] == b"503" and f"error={CUT}".encode() in head[b"proxy-status"]
    assert b"timeouts.drain" in bytes(client.bodies[slow])
    assert partial in client.reset and partial not in client.ended
    counts = proxy.server.telemetry.stats.counts
    assert counts == {(503, "proxy", CUT): 1, (200, "origin", CUT): 1}
    records = {line["path"]: line for line in proxy.log.lines()}
    assert records["/slow"]["layer"] == "proxy" and records["/partial"]["layer"] == "proxy"


async def test_a_clients_graceful_goaway_still_gets_its_responses(h2_server, proxy_factory):
    """The client says GOAWAY (NO_ERROR: it opens no more streams) with a stream in flight:
    the response still comes, then the proxy closes. Before, h2 closed its state machine
    on the GOAWAY (python-hyper/h2#1181) and the response was dropped."""
    from hyperframe.frame import GoAwayFrame

    async def slow(conn, sid, head, body) -> None:
        await asyncio.sleep(0.3)
        await conn.respond(sid, 200, b"still here")

    origin = await h2_server(slow)
    proxy = await proxy_factory(origin.url)
    client = await H2Client.connect(proxy.port)
    sid = client.request("/slow")
    await client.send()
    await asyncio.sleep(0.05)
    client.writer.write(GoAwayFrame(0, last_stream_id=0, error_code=0).serialize())
    await client.writer.drain()
    await client.until(lambda: sid in client.ended)
    assert client.heads[sid][b":status"] == b"200" and bytes(client.bodies[sid]) == b"still here"
    assert await asyncio.wait_for(client.reader.read(), 5) == b""  # then the proxy closes
    client.close()
    await proxy.settle()
    assert proxy.stats.counts == {(200, "origin", None): 1}
