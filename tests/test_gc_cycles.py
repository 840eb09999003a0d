"""Connection churn leaves nothing for the cyclic garbage collector (issue 20).

A connection that closes must be freed by reference counting alone: every object of the
proxy's that only `gc.collect()` can free waits for the next collection, and under
churn (a new connection per request) those collections came every ~1,300 connections
and held the loop for 10-27 ms. Each test churns connections through an in-process proxy
with the collector off, then collects with `gc.DEBUG_SAVEALL` and counts what it found
of the proxy's own objects (and of httptools', h2's and uvloop's objects that the proxy
made). Objects from before the churn are frozen out; the collector's state is restored.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import socket
from collections.abc import Awaitable, Callable, Iterator

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import ResponseReceived, StreamEnded
from h2_origin import H2Server

from support import LOOPBACK, free_port

CONNECTIONS = 500
# Modules whose objects the proxy makes for a connection (the test's own clients and
# origins are asyncio streams, sockets and h2.connection.H2Connection, not counted).
PROXY_MODULES = ("proxy.", "httptools.", "uvloop.")
PROXY_TYPES = ("GracefulH2Connection", "H2ServerConnection")


class Origin(asyncio.Protocol):
    """A trivial HTTP/1.1 origin: 200 "ok" to every request head; with `close`, it closes
    after each response (the proxy's origin connections churn too)."""

    close = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport | None = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None and b"\r\n\r\n" in self.buffer:
            self.buffer = self.buffer.partition(b"\r\n\r\n")[2]
            if self.close:
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n")
                self.transport.write(b"Connection: close\r\n\r\nok")
                self.transport.close()
                self.transport = None
            else:
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class ClosingOrigin(Origin):
    close = True


async def http1_once(port: int) -> bytes:
    """One connection, one request (Connection: close), everything until the proxy closes."""
    loop = asyncio.get_running_loop()
    with socket.socket() as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, (LOOPBACK, port))
        await loop.sock_sendall(sock, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received = b""
        while chunk := await loop.sock_recv(sock, 65536):
            received += chunk
    return received.partition(b"\r\n")[0]


async def h2_once(port: int) -> bytes:
    """One HTTP/2 connection with prior knowledge, one request, then GOAWAY and close."""
    loop = asyncio.get_running_loop()
    h2 = H2Connection(H2Configuration(client_side=True))
    h2.initiate_connection()
    fields = [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "x")]
    h2.send_headers(1, fields, end_stream=True)
    status = b""
    with socket.socket() as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, (LOOPBACK, port))
        await loop.sock_sendall(sock, h2.data_to_send())
        ended = False
        while not ended and (chunk := await loop.sock_recv(sock, 65536)):
            for event in h2.receive_data(chunk):
                if isinstance(event, ResponseReceived):
                    status = dict(event.headers)[b":status"]
                ended = ended or isinstance(event, StreamEnded)
            await loop.sock_sendall(sock, h2.data_to_send())
        h2.close_connection()
        await loop.sock_sendall(sock, h2.data_to_send())
    return b"HTTP/2 " + status


@pytest.fixture
def collector() -> Iterator[Callable[[], collections.Counter[str]]]:
    """The collector off and everything older frozen; `found()` collects and counts the
    proxy's objects among what it freed. Its state is restored afterwards."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.freeze()
    gc.disable()

    def found() -> collections.Counter[str]:
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            counts = collections.Counter(
                f"{type(o).__module__}.{type(o).__qualname__}"
                for o in gc.garbage
                if type(o).__module__.startswith(PROXY_MODULES)
                or type(o).__qualname__ in PROXY_TYPES
            )
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        return counts

    try:
        yield found
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.unfreeze()
        if was_enabled:
            gc.enable()


async def churn(port: int, once: Callable[[int], Awaitable[bytes]], expect: bytes) -> None:
    for _ in range(CONNECTIONS):
        status = await once(port)
        assert expect in status, status


async def settled(proxy) -> None:  # type: ignore[no-untyped-def]
    await proxy.settle()
    await asyncio.sleep(0.05)  # the last connection_lost callbacks run
    proxy.server.settle()


def leaked(counts: collections.Counter[str]) -> str:
    return ", ".join(f"{n} {name}" for name, n in counts.most_common())


@pytest.mark.parametrize(
    ("origin", "overrides"),
    [(Origin, {}), (ClosingOrigin, {}), (Origin, {"pool.max_idle": 0})],
    ids=["keepalive-origin", "closing", "pool-max-idle-0"],
)
async def test_closed_http1_connections_are_freed_without_the_collector(
    proxy_factory, collector, origin, overrides
):
    """pool-max-idle-0: the proxy closes every origin connection after its exchange."""
    server = await asyncio.get_running_loop().create_server(origin, LOOPBACK, free_port())
    port = server.sockets[0].getsockname()[1]
    try:
        proxy = await proxy_factory(f"http://{LOOPBACK}:{port}", **overrides)
        await churn(proxy.port, http1_once, b" 200 ")
        await settled(proxy)
        counts = collector()
        assert sum(counts.values()) < CONNECTIONS // 10, leaked(counts)
    finally:
        server.close()


@pytest.mark.parametrize("scheme", ["http", "h2c"])
async def test_failed_connects_leave_nothing_for_the_collector(proxy_factory, collector, scheme):
    proxy = await proxy_factory(f"{scheme}://{LOOPBACK}:{free_port()}")  # nobody listens
    await churn(proxy.port, http1_once, b" 502 ")
    await settled(proxy)
    counts = collector()
    assert sum(counts.values()) < CONNECTIONS // 10, leaked(counts)


async def test_http2_clients_and_h2c_origin_churn_leave_nothing_for_the_collector(
    proxy_factory, collector
):
    async def answer(conn, stream_id, head, body):  # type: ignore[no-untyped-def]
        await conn.respond(stream_id, 200, b"ok")
        conn.h2.close_connection()
        conn.flush()
        conn.writer.close()

    origin = await H2Server(answer).start()
    try:
        proxy = await proxy_factory(origin.url)
        await churn(proxy.port, h2_once, b"HTTP/2 200")
        await settled(proxy)
        counts = collector()
        assert sum(counts.values()) < CONNECTIONS // 10, leaked(counts)
        assert len(origin.connections) >= CONNECTIONS  # the origin side churned too
    finally:
        await origin.close()
