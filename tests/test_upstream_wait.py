"""Dev-server restarts: with `upstream_wait`, idempotent requests are held while the
upstream refuses connections and forwarded once it listens; the wait is recorded
(`waited_ms` in the access log, the terminal line), each exchange counted once."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from proxy.diagnosis.faults import Fault
from proxy.telemetry.console import pretty_line
from proxy.telemetry.metrics import make_registry, render

from support import LOOPBACK, free_port

LATE_S = 1.0


async def start_late(port: int, delay_s: float, requests: list[bytes]) -> asyncio.AbstractServer:
    """An origin that starts listening on `port` only after `delay_s` (a dev server
    restarting); it answers every request 200 and remembers it."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                requests.append(head)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nrebuilt")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    await asyncio.sleep(delay_s)
    return await asyncio.start_server(handle, LOOPBACK, port, reuse_address=True)


async def test_a_get_is_held_until_the_upstream_listens(proxy_factory):
    port = free_port()
    proxy = await proxy_factory(f"http://{LOOPBACK}:{port}", upstream_wait="10s")
    requests: list[bytes] = []
    late = asyncio.create_task(start_late(port, LATE_S, requests))
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(proxy.url + "/page") as resp:
                assert resp.status == 200
                assert await resp.read() == b"rebuilt"
                assert "received-status=200" in resp.headers["Proxy-Status"]
        record = await proxy.last_log()
    finally:
        (await late).close()
    assert len(requests) == 1  # forwarded once
    assert proxy.stats.total == 1 and len(proxy.access_log()) == 1  # counted once
    assert (record["status"], record["source"], record["error"]) == (200, "origin", None)
    # (waited_ms is kept to the millisecond: it may round above duration_ms by less than one)
    assert LATE_S * 800 <= record["waited_ms"] <= record["duration_ms"] + 1
    assert "[held " in pretty_line(record, colour=False).decode()


async def test_concurrent_requests_all_wait_and_each_is_counted_once(proxy_factory):
    port = free_port()
    proxy = await proxy_factory(f"http://{LOOPBACK}:{port}", upstream_wait="10s")
    requests: list[bytes] = []
    late = asyncio.create_task(start_late(port, LATE_S, requests))
    try:
        async with aiohttp.ClientSession() as session:

            async def get(path: str) -> int:
                async with session.get(proxy.url + path) as resp:
                    await resp.read()
                    return resp.status

            statuses = await asyncio.gather(*(get(f"/asset/{i}") for i in range(3)))
        await proxy.settle()
    finally:
        (await late).close()
    assert statuses == [200, 200, 200]
    assert len(requests) == 3
    records = proxy.access_log()
    assert sorted(r["path"] for r in records) == ["/asset/0", "/asset/1", "/asset/2"]
    assert all(r["waited_ms"] >= LATE_S * 800 for r in records)
    assert proxy.stats.total == 3


async def test_a_post_is_never_held(proxy_factory):
    port = free_port()
    proxy = await proxy_factory(f"http://{LOOPBACK}:{port}", upstream_wait="20s")
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/orders", data=b"{}") as resp:
            assert resp.status == 502
            assert f"error={Fault.CONNECTION_REFUSED.value}" in resp.headers["Proxy-Status"]
    assert time.monotonic() - started < 10  # answered, not held for the 20 s
    record = await proxy.last_log()
    assert record["error"] == Fault.CONNECTION_REFUSED.value and "waited_ms" not in record


async def test_the_wait_ends_with_connection_refused_when_nothing_comes(proxy_factory):
    port = free_port()
    proxy = await proxy_factory(f"http://{LOOPBACK}:{port}", upstream_wait="1s")
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/") as resp:
            assert resp.status == 502
    assert time.monotonic() - started >= 0.9  # it did wait
    record = await proxy.last_log()
    assert (record["source"], record["error"]) == ("proxy", Fault.CONNECTION_REFUSED.value)
    assert proxy.stats.total == 1


async def test_off_by_default_refused_at_once(proxy_factory):
    port = free_port()
    proxy = await proxy_factory(f"http://{LOOPBACK}:{port}")
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/") as resp:
            assert resp.status == 502
    assert time.monotonic() - started < 5
    record = await proxy.last_log()
    assert record["error"] == Fault.CONNECTION_REFUSED.value and "waited_ms" not in record


# -- the wait is a phase of its own (issue 17: it was reported as TCP connect time) -----------


def _server_timing(value: str) -> dict[str, float]:
    out = {}
    for item in value.split(", "):
        name, _, params = item.partition(";")
        out[name] = float(params.split("dur=")[1].split(";")[0])
    return out


async def test_held_then_served_the_wait_is_its_own_phase(proxy_factory):
    port = free_port()
    proxy = await proxy_factory(f"http://{LOOPBACK}:{port}", upstream_wait="10s")
    requests: list[bytes] = []
    late = asyncio.create_task(start_late(port, LATE_S, requests))
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(proxy.url + "/page") as resp:
                assert resp.status == 200
                timing = _server_timing(resp.headers["Server-Timing"])
                raw_timing = resp.headers["Server-Timing"]
        record = await proxy.last_log()
    finally:
        (await late).close()
    phases = record["phases_ms"]
    # The hold is `wait`; `connect` is the one attempt that succeeded: a loopback connect.
    assert LATE_S * 800 <= phases["wait"] <= record["duration_ms"]
    assert phases["connect"] is not None and phases["connect"] < 100, phases
    assert timing["wait"] == pytest.approx(phases["wait"], abs=1)
    assert timing["connect"] < 100, raw_timing
    assert "wait;dur=" in raw_timing and 'desc="held' in raw_timing
    line = pretty_line(record, colour=False).decode()
    assert "until the upstream accepted" in line and "never" not in line
    stats = proxy.stats.snapshot(proxy={})
    assert stats["upstream_wait"] == {"held": 1, "expired": 0}
    assert stats["latency_ms"]["wait"]["count"] == 1
    assert stats["latency_ms"]["wait"]["max"] >= LATE_S * 800
    assert stats["latency_ms"]["connect"]["max"] < 100, stats["latency_ms"]["connect"]


async def test_held_then_expired_says_the_upstream_never_accepted(proxy_factory):
    port = free_port()
    proxy = await proxy_factory(f"http://{LOOPBACK}:{port}", upstream_wait="1s")
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/", headers={"Accept": "text/html"}) as resp:
            assert resp.status == 502
            page = await resp.text()
            timing = _server_timing(resp.headers["Server-Timing"])
            proxy_status = resp.headers["Proxy-Status"]
    record = await proxy.last_log()
    assert (record["source"], record["error"]) == ("proxy", Fault.CONNECTION_REFUSED.value)
    assert record["phases_ms"]["wait"] >= 900 and record["phases_ms"]["connect"] is None
    assert record["wait_expired"] is True
    assert timing["wait"] >= 900 and "connect" not in timing
    assert "the upstream never accepted" in record["details"]
    assert "upstream_wait (1s)" in record["details"]
    assert "the upstream never accepted" in page and "Held 1" in page
    assert "the upstream never accepted" in proxy_status
    line = pretty_line(record, colour=False).decode()
    assert "the upstream never accepted]" in line and "until the upstream accepted" not in line
    stats = proxy.stats.snapshot(proxy={})
    assert stats["upstream_wait"] == {"held": 1, "expired": 1}
    registry = make_registry(proxy.server.telemetry, proxy.server.ctx.pool.counts)
    metrics = render(registry, None)[0].decode().splitlines()
    assert "faultline_held_requests_total 1.0" in metrics
    assert "faultline_held_requests_expired_total 1.0" in metrics
    assert any(
        m.startswith('faultline_upstream_phase_seconds_count{phase="wait"} 1') for m in metrics
    )
    assert stats["latency_ms"]["connect"]["count"] == 0
    assert stats["latency_ms"]["wait"]["count"] == 1


async def test_not_held_has_no_wait(proxy_factory):
    """The near miss: a request the upstream accepts at once has no `wait` anywhere."""
    requests: list[bytes] = []
    port = free_port()
    server = await start_late(port, 0, requests)
    try:
        proxy = await proxy_factory(f"http://{LOOPBACK}:{port}", upstream_wait="10s")
        async with aiohttp.ClientSession() as session:
            async with session.get(proxy.url + "/") as resp:
                assert resp.status == 200
                assert "wait;" not in resp.headers["Server-Timing"]
        record = await proxy.last_log()
    finally:
        server.close()
    assert record["phases_ms"]["wait"] is None and record["phases_ms"]["connect"] is not None
    assert "waited_ms" not in record
    assert proxy.stats.snapshot(proxy={})["upstream_wait"] == {"held": 0, "expired": 0}
