"""Soak: concurrent clients run a random mix of normal, origin-error, upstream-fault,
client-abort and bad-request exchanges through the proxy process for a bounded time.

Afterwards: the clients' tally equals /stats exactly (every breakdown), nothing is in
flight, no proxy_internal_error, the process's open file descriptors are back at the idle
baseline and its RSS is within 1.15x of what it was after the warm-up.

    python -m pytest tests/test_soak.py -s             # ~10 s soak (CI)
    python -m pytest -m slow tests/test_soak.py -s     # 60 s soak

The figures (exchanges, req/s, RSS ratio, fd delta) are printed with -s.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections import Counter
from typing import Any

import aiohttp
import pytest
from admin_support import Key, breakdowns
from hostile_support import (
    RecordingOrigin,
    ResponseReader,
    header_of,
    open_fds,
    raise_fd_limit,
    rss_bytes,
)

from proxy.diagnosis.faults import CLIENT_CLOSED_STATUS, Fault, Source

from support import LOOPBACK, parse_responses, read_until_reset, spawn_proxy

KINDS = {  # kind: weight
    "ok": 60,  # the origin's 200, keep-alive
    "boom": 10,  # the origin's own 500
    "hangup": 10,  # the origin closes without a byte: 502 connection_terminated
    "abort": 10,  # the client leaves before the answer: 499 client_closed_request
    "bad": 10,  # a request the proxy refuses: 400 http_request_error
}
CLIENTS = 32
RSS_RATIO_MAX = 1.15
_PS_ERROR = re.compile(rb"error=([a-z0-9_]+)")
_PS_RECEIVED = re.compile(rb"received-status=(\d+)")


def key_of(status: int, proxy_status: bytes | None) -> Key:
    assert proxy_status, f"no Proxy-Status on a {status}"
    if (m := _PS_ERROR.search(proxy_status)) is not None:
        return status, Source.PROXY.value, m.group(1).decode()
    m = _PS_RECEIVED.search(proxy_status)
    assert m is not None and int(m.group(1)) == status, proxy_status
    return status, Source.ORIGIN.value, None


def respond(request: Any, conn: Any) -> bytes | None:
    target = request.target
    if target.startswith(b"/ok"):
        return b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\nhello, world!"
    if target.startswith(b"/boom"):
        return b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\nboom"
    if target.startswith(b"/hangup"):
        conn.transport.close()
    return None  # /hold: never answered (the client leaves)


class Client:
    """One client: a keep-alive connection for plain requests, fresh ones for the rest."""

    def __init__(self, port: int, seed: int, tally: Counter[Key], kinds: Counter[str]) -> None:
        self.port = port
        self.rng = random.Random(seed)
        self.tally = tally
        self.kinds = kinds
        self.conn: tuple[ResponseReader, asyncio.StreamWriter] | None = None
        self.n = 0

    async def run(self, until: float) -> None:
        names, weights = list(KINDS), list(KINDS.values())
        try:
            while time.monotonic() < until:
                kind = self.rng.choices(names, weights)[0]
                self.n += 1
                key = await getattr(self, kind if kind in ("abort", "bad") else "plain")(kind)
                self.tally[key] += 1
                self.kinds[kind] += 1
        finally:
            if self.conn is not None:
                self.conn[1].close()
                with contextlib.suppress(ConnectionError):
                    await self.conn[1].wait_closed()

    async def plain(self, kind: str) -> Key:
        if self.conn is None:
            reader, writer = await asyncio.open_connection(LOOPBACK, self.port)
            self.conn = ResponseReader(reader), writer
        responses, writer = self.conn
        writer.write(b"GET /%s/%d HTTP/1.1\r\nHost: soak.test\r\n\r\n" % (kind.encode(), self.n))
        status, headers, _ = await responses.next(timeout=10)
        if header_of(headers, b"connection") == b"close":
            writer.close()
            self.conn = None
        return key_of(status, header_of(headers, b"proxy-status"))

    async def abort(self, kind: str) -> Key:
        _, writer = await asyncio.open_connection(LOOPBACK, self.port)
        writer.write(b"GET /hold/%d HTTP/1.1\r\nHost: soak.test\r\n\r\n" % self.n)
        await writer.drain()
        await asyncio.sleep(self.rng.uniform(0.0, 0.02))
        writer.close()  # a FIN after the whole request: the proxy always sees the request
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        return CLIENT_CLOSED_STATUS, Source.CLIENT.value, Fault.CLIENT_CLOSED_REQUEST.value

    async def bad(self, kind: str) -> Key:
        reader, writer = await asyncio.open_connection(LOOPBACK, self.port)
        try:
            writer.write(
                b"POST /bad HTTP/1.1\r\nHost: s\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
            )
            data, _ = await read_until_reset(reader, 10)
        finally:
            writer.close()
        (response,), _ = parse_responses(data)
        return key_of(response.status, (response.header("Proxy-Status") or "").encode())


async def run_clients(port: int, seconds: float, seed: int) -> tuple[Counter[Key], Counter[str]]:
    tally: Counter[Key] = Counter()
    kinds: Counter[str] = Counter()
    until = time.monotonic() + seconds
    clients = [Client(port, seed * 1000 + i, tally, kinds) for i in range(CLIENTS)]
    await asyncio.gather(*(c.run(until) for c in clients))
    return tally, kinds


async def stats_when_idle(admin_url: str, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(admin_url + "/stats?limit=0") as resp:
                doc = await resp.json()
            if doc["requests"]["in_flight"] == 0 or time.monotonic() > deadline:
                return doc
            await asyncio.sleep(0.05)


async def idle_fds(pid: int, settle: float = 0.8, timeout: float = 10.0) -> int:
    """The process's fd count once it stopped changing (idle pooled connections expire
    after pool.idle_timeout, 300 ms here, checked every 250 ms)."""
    deadline = time.monotonic() + timeout
    last, stable_since = open_fds(pid), time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        now = open_fds(pid)
        if now != last:
            last, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since >= settle:
            break
    return last


async def soak(seconds: float, warmup: float) -> None:
    raise_fd_limit(4 * CLIENTS + 1024)
    origin = await RecordingOrigin(respond=respond, keep=False).start()
    proxy = spawn_proxy(origin.url, env={"FAULTLINE_POOL_IDLE_TIMEOUT": "300ms"})
    pid = proxy.proc.pid
    try:
        # Warm-up: the same mix, so every path has allocated what it keeps.
        warm_tally, _ = await run_clients(proxy.port, warmup, seed=1)
        await stats_when_idle(proxy.admin_url)
        fds_idle = await idle_fds(pid)
        rss_warm = rss_bytes(pid)

        started = time.monotonic()
        tally, kinds = await run_clients(proxy.port, seconds, seed=2)
        elapsed = time.monotonic() - started
        stats = await stats_when_idle(proxy.admin_url)
        fds_after = await idle_fds(pid)
        rss_after = rss_bytes(pid)
    finally:
        code = proxy.stop()
        await origin.close()
    stderr = proxy.proc.stderr.read().decode(errors="replace") if proxy.proc.stderr else ""

    exchanges = sum(tally.values())
    ratio = rss_after / rss_warm
    print(
        f"\n[soak] {exchanges} exchanges in {elapsed:.1f} s = {exchanges / elapsed:.0f} req/s "
        f"({CLIENTS} clients; mix {dict(kinds)}); RSS after warm-up {rss_warm / 2**20:.1f} MiB, "
        f"after soak {rss_after / 2**20:.1f} MiB (ratio {ratio:.3f}); open fds idle "
        f"{fds_idle} -> {fds_after} (delta {fds_after - fds_idle}); in_flight "
        f"{stats['requests']['in_flight']}; by_error {stats['responses']['by_error']}"
    )
    # Exact accounting: the clients' tally (warm-up and soak) equals /stats everywhere.
    everything = warm_tally + tally
    assert stats["requests"] == {"total": sum(everything.values()), "in_flight": 0}
    expected = breakdowns(everything)
    for name, counts in expected.items():
        assert stats["responses"][name] == counts, name
    assert Fault.PROXY_INTERNAL_ERROR.value not in stats["responses"]["by_error"]
    assert all(kinds[kind] > 0 for kind in KINDS), kinds
    # Nothing leaked.
    assert fds_after == fds_idle
    assert ratio <= RSS_RATIO_MAX
    assert code == 0
    assert "Traceback" not in stderr, stderr[-2000:]


async def test_soak_short():
    await soak(seconds=10, warmup=2)


@pytest.mark.slow
async def test_soak_a_minute():
    await soak(seconds=60, warmup=5)
