"""Bookkeeping never stands in front of a request: finished exchanges reach the stats, the
access log and the observers in slices of at most `SLICE_MAX`, however many finish at
once (issue 20). Counted in exchanges per slice, not in wall time; and nothing is lost or
counted twice on the way."""

from __future__ import annotations

import asyncio

import aiohttp
from hostile_support import RecordingOrigin

from proxy.telemetry.sink import SLICE_MAX

REQUESTS = 2000
CONCURRENCY = 50


async def test_finished_exchanges_are_settled_in_bounded_slices(proxy_factory):
    origin = await RecordingOrigin(keep=False).start()
    try:
        proxy = await proxy_factory(origin.url)
        telemetry = proxy.server.telemetry
        async with aiohttp.ClientSession() as session:

            async def client(n: int) -> None:
                for _ in range(n):
                    async with session.get(proxy.url + "/item") as response:
                        assert response.status == 200
                        await response.read()

            await asyncio.gather(*(client(REQUESTS // CONCURRENCY) for _ in range(CONCURRENCY)))
        await proxy.settle()
        assert proxy.stats.counts == {(200, "origin", None): REQUESTS}
        assert len(proxy.access_log()) == REQUESTS
        # Before: one batch of up to 512 exchanges (about 1.3 ms of the loop, interpreted).
        assert 0 < telemetry.largest_slice <= SLICE_MAX
    finally:
        await origin.close()
