"""The sweep never holds the loop for long (issue 20: periodic work never stands in front
of a request; `proxy.forward.sweep`): it checks the client connections' deadlines at most
`SWEEP_SLICE` in one loop turn, and still checks every one of them. Counted in connections
per turn, not in wall time.

Real sockets: the proxy in this process, 1,000 connections that open and say nothing.
"""

from __future__ import annotations

import asyncio
import time

from hostile_support import raise_fd_limit

from proxy.forward.sweep import SWEEP_SLICE

from support import LOOPBACK

CONNECTIONS = 1000


async def test_the_sweep_checks_every_connection_a_slice_at_a_time(proxy_factory):
    raise_fd_limit(4 * CONNECTIONS)
    # A silent connection is closed once it has not sent a request head for this long.
    proxy = await proxy_factory("http://127.0.0.1:9", **{"timeouts.client_headers": "1s"})
    sweep = proxy.server.sweep
    ctx = proxy.server.ctx
    streams = []
    try:
        for _ in range(CONNECTIONS):
            streams.append(await asyncio.open_connection(LOOPBACK, proxy.port))
        deadline = time.monotonic() + 5
        while len(ctx.connections) < CONNECTIONS and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert len(ctx.connections) == CONNECTIONS
        rounds = sweep.rounds
        while sweep.rounds < rounds + 2:  # two whole sweeps over all of them
            await asyncio.sleep(0.01)
        # Before: one turn checked all 1,000 (10,000 idle connections: ~6.5 ms a sweep).
        assert 0 < sweep.largest_slice <= SWEEP_SLICE
        assert all(not reader.at_eof() for reader, _ in streams)  # none is due yet

        # Every connection is still checked: each one's head timeout closes it.
        closed = await asyncio.wait_for(
            asyncio.gather(*(reader.read() for reader, _ in streams)), timeout=10
        )
        assert len(closed) == CONNECTIONS
        assert not ctx.connections
        assert sweep.largest_slice <= SWEEP_SLICE
    finally:
        for _, writer in streams:
            writer.close()
