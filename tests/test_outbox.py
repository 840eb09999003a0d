"""The outbox: data-plane writes wait for the end of the loop turn, keep their order per
transport, go out before a close, and are dropped (quietly) for a transport already gone.

Real loopback connections on the product's loop (uvloop); the outbox is the proxy's own.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from proxy.forward.outbox import COALESCE_MAX_BYTES, Outbox


async def pair() -> tuple[asyncio.Transport, socket.socket, asyncio.Server]:
    """A server-side transport (what the proxy writes to) and the peer's raw socket."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[asyncio.Transport] = loop.create_future()

    class Accept(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted.set_result(transport)  # type: ignore[arg-type]

    server = await loop.create_server(Accept, "127.0.0.1", 0)
    peer = socket.create_connection(server.sockets[0].getsockname()[:2])
    peer.setblocking(False)
    return await asyncio.wait_for(accepted, 5), peer, server


async def read_all(peer: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(5):
        while len(data) < size:
            chunk = await loop.sock_recv(peer, 65536)
            if not chunk:
                break
            data += chunk
    return data


def nothing_readable(peer: socket.socket) -> bool:
    try:
        peer.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    return False


async def test_writes_wait_for_the_end_of_the_turn() -> None:
    outbox = Outbox(asyncio.get_running_loop())
    transport, peer, server = await pair()
    try:
        outbox.send(transport, [b"later"], 5)
        # Loopback delivers at once: had send() written, the bytes would be readable now.
        assert nothing_readable(peer)
        await asyncio.sleep(0)  # the turn ends
        assert await read_all(peer, 5) == b"later"
        outbox.send(transport, [b"now"], 3)
        outbox.flush()  # what a close does first
        assert await read_all(peer, 3) == b"now"
    finally:
        transport.close()
        peer.close()
        server.close()


async def test_bytes_keep_their_order_per_transport() -> None:
    outbox = Outbox(asyncio.get_running_loop())
    (t1, p1, s1), (t2, p2, s2) = await pair(), await pair()
    try:
        outbox.send(t1, [b"one ", b"two "], 8)
        outbox.send(t2, [b"other"], 5)
        outbox.send(t1, [b"three"], 5)
        big = [b"x" * COALESCE_MAX_BYTES, b"y" * 10]  # over the coalescing size: writelines
        outbox.send(t2, big, COALESCE_MAX_BYTES + 10)
        await asyncio.sleep(0)
        assert await read_all(p1, 13) == b"one two three"
        assert await read_all(p2, 5 + COALESCE_MAX_BYTES + 10) == b"other" + b"".join(big)
    finally:
        for t, p, s in ((t1, p1, s1), (t2, p2, s2)):
            t.close()
            p.close()
            s.close()


async def test_bytes_for_an_aborted_transport_are_dropped_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outbox = Outbox(asyncio.get_running_loop())
    (gone, p1, s1), (alive, p2, s2) = await pair(), await pair()
    try:
        outbox.send(gone, [b"never"], 5)
        outbox.send(alive, [b"still"], 5)
        gone.abort()
        await asyncio.sleep(0)  # connection_lost: the transport is closed
        with caplog.at_level(logging.ERROR, logger="faultline"):
            outbox.flush()
        assert await read_all(p2, 5) == b"still"
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        alive.close()
        for p, s in ((p1, s1), (p2, s2)):
            p.close()
            s.close()
