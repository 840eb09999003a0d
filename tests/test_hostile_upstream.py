"""An upstream that behaves badly for a long time (refusing, resetting, never answering)
costs bounded connections and memory: the pool never exceeds pool.max_connections,
waiting for a slot has its own deadline and its own fault (`connection_limit_reached`),
nothing stays in flight, and the proxy process's file descriptors and RSS stay flat.
test_fault_matrix covers one request per fault; these are the long and crowded versions."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections import Counter
from typing import Any

import aiohttp
import pytest
from hostile_support import open_fds, raise_fd_limit, rss_bytes

from proxy.diagnosis.faults import Fault

from support import LOOPBACK, free_port, parse_responses, read_until_reset, spawn_proxy

POOL = 4
BURST = 40


class BadUpstream:
    """A listener on a fixed port whose behaviour can change: `refuse` (nothing listens),
    `reset` (RST as soon as the request arrives), `slow` (reads, never answers)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.mode = "refuse"
        self.server: asyncio.AbstractServer | None = None
        self.open = 0
        self.max_open = 0
        self.accepted = 0
        self.transports: set[Any] = set()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    async def set_mode(self, mode: str) -> None:
        self.mode = mode
        if mode == "refuse":
            if self.server is not None:
                self.server.close()
                self.server = None
                for transport in list(self.transports):
                    transport.abort()
            return
        if self.server is None:
            loop = asyncio.get_running_loop()
            self.server = await loop.create_server(
                lambda: _BadConn(self), LOOPBACK, self.port, reuse_address=True
            )

    async def close(self) -> None:
        await self.set_mode("refuse")


class _BadConn(asyncio.Protocol):
    def __init__(self, upstream: BadUpstream) -> None:
        self.upstream = upstream

    def connection_made(self, transport: Any) -> None:
        up = self.upstream
        self.transport = transport
        up.transports.add(transport)
        up.accepted += 1
        up.open += 1
        up.max_open = max(up.max_open, up.open)

    def connection_lost(self, exc: Exception | None) -> None:
        self.upstream.open -= 1
        self.upstream.transports.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        if self.upstream.mode == "reset":
            sock = self.transport.get_extra_info("socket")
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()
        # slow: read and say nothing


async def get(port: int, path: bytes, timeout: float = 5.0) -> tuple[int, str | None]:
    """(status, Proxy-Status error token) of one request on its own connection."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        data, _ = await read_until_reset(reader, timeout)
    finally:
        writer.close()
    responses, _ = parse_responses(data)
    assert responses, data[:200]
    response = responses[0]
    proxy_status = response.header("Proxy-Status") or ""
    token = proxy_status.split("error=", 1)[1].split(";")[0] if "error=" in proxy_status else None
    return response.status, token


EXPECTED = {
    "refuse": {Fault.CONNECTION_REFUSED, Fault.CONNECTION_LIMIT_REACHED},
    "reset": {Fault.CONNECTION_TERMINATED, Fault.CONNECTION_LIMIT_REACHED},
    "slow": {Fault.HTTP_RESPONSE_TIMEOUT, Fault.CONNECTION_LIMIT_REACHED},
}


@pytest.mark.parametrize("mode", ["refuse", "reset", "slow"])
async def test_a_crowd_against_a_bad_upstream_never_exceeds_the_pool(mode, proxy_factory):
    upstream = BadUpstream()
    await upstream.set_mode(mode)
    proxy = await proxy_factory(
        upstream.url,
        **{
            "pool.max_connections": POOL,
            "timeouts.pool_wait": "300ms",
            "timeouts.response_headers": "400ms",
            "timeouts.connect": "1s",
        },
    )
    pool = proxy.pool
    peak = 0
    sampling = True

    async def sample() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, pool.open)
            await asyncio.sleep(0.001)

    sampler = asyncio.create_task(sample())
    try:
        results: list[tuple[int, str | None]] = []
        for wave in range(2):
            results += await asyncio.gather(
                *(get(proxy.port, b"/w%d/%d" % (wave, i)) for i in range(BURST))
            )
        await proxy.settle(5)
    finally:
        sampling = False
        await sampler
        await upstream.close()
    tally = Counter(results)
    print(f"\n[bad upstream: {mode}] {dict(tally)}; pool peak {peak}/{POOL}")
    assert peak <= POOL and upstream.max_open <= POOL
    allowed = {(f.value, status) for f in EXPECTED[mode] for status in (502, 503, 504)}
    for status, token in tally:
        assert (token, status) in allowed, (status, token)
    if mode == "slow":
        # 80 requests, 4 slots held 400 ms each, 300 ms of patience: most wait in vain, with
        # their own fault, and the pool slots were used by the ones that got one.
        assert tally[503, Fault.CONNECTION_LIMIT_REACHED.value] > BURST
        assert tally[504, Fault.HTTP_RESPONSE_TIMEOUT.value] >= POOL
    assert proxy.stats.in_flight == 0
    assert not pool.waiters
    await asyncio.sleep(0.2)
    assert pool.open == 0 and pool.busy == 0
    records = proxy.access_log()
    assert len(records) == 2 * BURST
    assert not [r for r in records if r["error"] == Fault.PROXY_INTERNAL_ERROR.value]


# -- a long run against a proxy process ----------------------------------------------------------

CLIENTS = 24
PROCESS_POOL = 8


async def _run_phases(
    upstream: BadUpstream, port: int, cycles: int, phase_s: float, tally: Counter[Any]
) -> None:
    """`CLIENTS` clients in a loop while the upstream cycles refuse -> reset -> slow."""
    stop = asyncio.Event()

    async def client(i: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                tally[await get(port, b"/c%d/%d" % (i, n))] += 1
            except (ConnectionError, AssertionError, TimeoutError):
                tally["client-error"] += 1

    tasks = [asyncio.create_task(client(i)) for i in range(CLIENTS)]
    try:
        for _ in range(cycles):
            for mode in ("refuse", "reset", "slow"):
                await upstream.set_mode(mode)
                await asyncio.sleep(phase_s)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await upstream.set_mode("refuse")


async def _wait_for_fds(pid: int, target: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while (n := open_fds(pid)) > target and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return n


async def _stats(admin_url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.get(admin_url + "/stats?limit=0") as resp:
            return await resp.json()


async def _long_bad_upstream(cycles: int, phase_s: float) -> None:
    raise_fd_limit(4096)
    upstream = BadUpstream()
    env = {
        "FAULTLINE_POOL_MAX_CONNECTIONS": str(PROCESS_POOL),
        "FAULTLINE_TIMEOUTS_POOL_WAIT": "200ms",
        "FAULTLINE_TIMEOUTS_RESPONSE_HEADERS": "300ms",
        "FAULTLINE_TIMEOUTS_CONNECT": "1s",
    }
    proxy = spawn_proxy(upstream.url, env=env)
    pid = proxy.proc.pid
    tally: Counter[Any] = Counter()
    try:
        idle_fds = open_fds(pid)
        await _run_phases(upstream, proxy.port, 1, 0.5, tally)  # warm-up: every path once
        await _wait_for_fds(pid, idle_fds)
        rss_warm = rss_bytes(pid)
        warm_fds = open_fds(pid)
        peak_fds = 0

        async def watch() -> None:
            nonlocal peak_fds
            while True:
                peak_fds = max(peak_fds, open_fds(pid))
                await asyncio.sleep(0.05)

        watching = asyncio.create_task(watch())
        started = time.monotonic()
        try:
            await _run_phases(upstream, proxy.port, cycles, phase_s, tally)
        finally:
            watching.cancel()
        elapsed = time.monotonic() - started
        end_fds = await _wait_for_fds(pid, warm_fds)
        rss_end = rss_bytes(pid)
        stats = await _stats(proxy.admin_url)
    finally:
        proxy.stop()
        await upstream.close()
    answered = sum(n for key, n in tally.items() if key != "client-error")
    ratio = rss_end / rss_warm
    print(
        f"\n[long bad upstream] {elapsed:.1f} s, {answered} answers "
        f"({answered / elapsed:.0f}/s), {dict(tally)}; fds idle {warm_fds} peak {peak_fds} "
        f"end {end_fds}; RSS {rss_warm / 2**20:.1f} -> {rss_end / 2**20:.1f} MiB ({ratio:.3f}x)"
    )
    assert tally["client-error"] == 0
    allowed = {f.value for faults in EXPECTED.values() for f in faults}
    for key in tally:
        if key != "client-error":
            status, token = key
            assert status in (502, 503, 504) and token in allowed, key
    assert stats["requests"]["in_flight"] == 0
    assert Fault.PROXY_INTERNAL_ERROR.value not in stats["responses"]["by_error"]
    # Bounded connections: the clients' sockets, the pool's, and a few to spare.
    assert peak_fds <= warm_fds + CLIENTS + PROCESS_POOL + 16
    assert end_fds == warm_fds
    assert ratio <= 1.15


async def test_a_long_bad_upstream_costs_bounded_fds_and_memory():
    await _long_bad_upstream(cycles=2, phase_s=0.6)


@pytest.mark.slow
async def test_a_long_bad_upstream_costs_bounded_fds_and_memory_for_a_minute():
    await _long_bad_upstream(cycles=20, phase_s=1.0)
