"""Accounting: every finished exchange is counted exactly once, whatever its ending.

A concurrent mix of 1,200 exchanges (normal, the origin's own errors, proxy-made replies for
upstream faults and for bad requests, clients that abort, bodies cut mid-way) runs through
the proxy while /stats, /metrics and /series are read continuously. Afterwards /stats (every
breakdown) and /metrics (the joint counter) equal the tally the clients kept of what they
saw, and in_flight is back to 0. Real sockets, no mocks.
"""

from __future__ import annotations

import asyncio
import random
import re
import socket
import struct
from collections import Counter
from typing import Any

import aiohttp
import orjson
from admin_support import Key, answer_by_path, breakdowns, wait_for
from prometheus_client.parser import text_string_to_metric_families

from proxy.diagnosis.faults import CLIENT_CLOSED_STATUS, TAXONOMY, Fault, Layer, Source
from proxy.telemetry.stats import layer_of

from support import LOOPBACK, OriginConnection, parse_responses, read_until_reset

MIX = {
    "ok": 600,  # 200 from the origin, over keep-alive connections
    "boom": 100,  # the origin's own 500
    "missing": 100,  # the origin's own 404
    "hangup": 150,  # the origin closes before answering: 502 made by the proxy
    "bad_request": 100,  # a request the proxy refuses: 400 made by the proxy
    "abort": 75,  # the client leaves while the origin is still working: 499
    "truncated": 75,  # the origin dies mid-body: the client's body is cut
}
CONCURRENCY = 48
_PS_ERROR = re.compile(r"error=([a-z0-9_]+)")
_PS_RECEIVED = re.compile(r"received-status=(\d+)")


def key_from_proxy_status(status: int, proxy_status: str | None) -> Key:
    """Who made the response, as the client reads it from our Proxy-Status member."""
    assert proxy_status, f"no Proxy-Status on a {status}"
    # The test origin sends no Proxy-Status of its own: the header is our member alone.
    if (m := _PS_ERROR.search(proxy_status)) is not None:
        return status, Source.PROXY.value, m.group(1)
    m = _PS_RECEIVED.search(proxy_status)
    assert m is not None and int(m.group(1)) == status, proxy_status
    return status, Source.ORIGIN.value, None


class Origin:
    """A byte-level origin that signals when each request has arrived."""

    def __init__(self) -> None:
        self.arrived: dict[str, asyncio.Event] = {}

    def arrival(self, request_id: str) -> asyncio.Event:
        return self.arrived.setdefault(request_id, asyncio.Event())

    async def script(self, conn: OriginConnection) -> None:
        while (request := await conn.read_request(timeout=30)) is not None:
            m = re.search(rb"(?i)x-request-id: *([^\r]+)", request)
            if m is not None:
                self.arrival(m.group(1).decode()).set()
            if not await answer_by_path(conn, request):
                return


class Client:
    def __init__(self, proxy_port: int, origin: Origin, session: aiohttp.ClientSession):
        self.port = proxy_port
        self.origin = origin
        self.session = session
        self.sem = asyncio.Semaphore(CONCURRENCY)

    async def run(self, kind: str, i: int) -> Key:
        async with self.sem:
            if kind in ("ok", "boom", "missing", "hangup"):
                return await self.keep_alive(f"/{kind}/{i}")
            return await getattr(self, kind)(i)

    async def keep_alive(self, path: str) -> Key:
        url = f"http://{LOOPBACK}:{self.port}{path}"
        async with self.session.get(url) as resp:
            await resp.read()
            return key_from_proxy_status(resp.status, resp.headers.get("Proxy-Status"))

    async def bad_request(self, i: int) -> Key:
        if i % 2:
            data = b"GET /no-host HTTP/1.1\r\nX-Request-Id: bad-%d\r\n\r\n" % i
        else:
            data = b"\x16\x03\x01\x02\x00 this is not HTTP\r\n\r\n"
        reader, writer = await asyncio.open_connection(LOOPBACK, self.port)
        try:
            writer.write(data)
            received, _ = await read_until_reset(reader, timeout=10)
        finally:
            writer.close()
        responses, _ = parse_responses(received)
        assert len(responses) == 1, received[:200]
        resp = responses[0]
        return key_from_proxy_status(resp.status, resp.header("Proxy-Status"))

    async def abort(self, i: int) -> Key:
        request_id = f"abort-{i}"
        arrived = self.origin.arrival(request_id)
        _, writer = await asyncio.open_connection(LOOPBACK, self.port)
        writer.write(
            f"GET /slow/{i} HTTP/1.1\r\nHost: t\r\nX-Request-Id: {request_id}\r\n\r\n".encode()
        )
        # Leave only once the proxy has forwarded the request (the origin holds it 0.5 s).
        await asyncio.wait_for(arrived.wait(), 10)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        return CLIENT_CLOSED_STATUS, Source.CLIENT.value, Fault.CLIENT_CLOSED_REQUEST.value

    async def truncated(self, i: int) -> Key:
        reader, writer = await asyncio.open_connection(LOOPBACK, self.port)
        try:
            writer.write(f"GET /truncated/{i} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            received, ending = await read_until_reset(reader, timeout=10)
        finally:
            writer.close()
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), received[:200]
        assert ending in ("reset", "eof") and len(body) < 1000  # never a complete message
        _, source, error = key_from_proxy_status(200, _header(head, b"proxy-status"))
        assert (source, error) == (Source.ORIGIN.value, None)  # the head said: from the origin
        # ... and then the body broke: the client knows the exchange ended in a fault.
        return 200, Source.ORIGIN.value, Fault.HTTP_RESPONSE_INCOMPLETE.value


def _header(head: bytes, name: bytes) -> str | None:
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == name:
            return v.strip().decode("latin-1")
    return None


def metrics_tally(text: str) -> Counter[Key]:
    tally: Counter[Key] = Counter()
    for family in text_string_to_metric_families(text):
        if family.name != "faultline_responses":
            continue
        for sample in family.samples:
            if sample.name != "faultline_responses_total" or not sample.value:
                continue
            labels = sample.labels
            error = labels["error"] or None
            assert labels["layer"] == layer_of(error)
            tally[int(labels["code"]), labels["source"], error] += int(sample.value)
    return tally


class Reader:
    """Reads the admin endpoints in a loop during the load, checking their invariants."""

    def __init__(self, admin_url: str, session: aiohttp.ClientSession) -> None:
        self.admin = admin_url
        self.session = session
        self.reads = 0
        self.stop = asyncio.Event()

    async def run(self) -> None:
        while not self.stop.is_set():
            async with self.session.get(self.admin + "/stats?limit=5") as resp:
                assert resp.status == 200
                doc = orjson.loads(await resp.read())
            total = doc["requests"]["total"]
            assert doc["requests"]["in_flight"] >= 0
            for name, counts in doc["responses"].items():
                # by_error counts errors only, by_grpc_status gRPC calls only (by source)
                if name not in ("by_error", "by_grpc_status"):
                    assert sum(counts.values()) == total, (name, counts, total)
            assert doc["windows"]["60s"]["responses"]["total"] <= total
            async with self.session.get(self.admin + "/metrics") as resp:
                assert resp.status == 200
                await resp.read()
            async with self.session.get(self.admin + "/series") as resp:
                assert resp.status == 200
            self.reads += 1
            await asyncio.sleep(0.02)


async def test_every_exchange_is_counted_exactly_once(origin_factory, proxy_factory):
    origin = Origin()
    scripted = await origin_factory(origin.script)
    proxy = await proxy_factory(scripted.url, **{"stats.recent_errors": 50})
    kinds = [kind for kind, n in MIX.items() for _ in range(n)]
    random.Random(4).shuffle(kinds)
    assert len(kinds) >= 1000

    connector = aiohttp.TCPConnector(limit=CONCURRENCY, force_close=False)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        aiohttp.ClientSession() as admin_session,
    ):
        client = Client(proxy.port, origin, session)
        reader = Reader(proxy.admin_url, admin_session)
        reading = asyncio.create_task(reader.run())
        try:
            keys = await asyncio.wait_for(
                asyncio.gather(*(client.run(kind, i) for i, kind in enumerate(kinds))), 60
            )
        finally:
            reader.stop.set()
            await asyncio.wait_for(reading, 10)
        assert reader.reads > 0
        tally: Counter[Key] = Counter(keys)

        async def settled() -> dict[str, Any] | None:
            async with admin_session.get(proxy.admin_url + "/stats?limit=0") as resp:
                doc = orjson.loads(await resp.read())
            return doc if doc["requests"]["in_flight"] == 0 else None

        stats = await wait_for(settled, timeout=15)
        async with admin_session.get(proxy.admin_url + "/metrics") as resp:
            metrics = await resp.text()

    # What the clients saw, kind by kind.
    proxy_made = Source.PROXY.value
    assert tally[200, Source.ORIGIN.value, None] == MIX["ok"]
    assert tally[500, Source.ORIGIN.value, None] == MIX["boom"]
    assert tally[404, Source.ORIGIN.value, None] == MIX["missing"]
    terminated = TAXONOMY[Fault.CONNECTION_TERMINATED]
    assert tally[terminated.status, proxy_made, terminated.token] == MIX["hangup"]
    assert tally[400, proxy_made, Fault.HTTP_REQUEST_ERROR.value] == MIX["bad_request"]

    # /stats equals that tally exactly, in every breakdown, and nothing is still in flight.
    assert stats["requests"] == {"total": len(kinds), "in_flight": 0}
    expected = breakdowns(tally)
    for name, counts in expected.items():
        assert stats["responses"][name] == counts, name
    assert stats["responses"]["by_layer"][Layer.CLIENT.value] == MIX["bad_request"] + MIX["abort"]
    assert stats["windows"]["60s"]["responses"]["total"] == len(kinds)
    assert stats["windows"]["300s"]["responses"]["by_source"] == expected["by_source"]
    assert stats["latency_ms"]["total"]["count"] == len(kinds)

    # /metrics holds the joint counter: it equals the tally key by key.
    assert metrics_tally(metrics) == tally

    # One access-log line per exchange, too.
    assert len(proxy.access_log()) == len(kinds)
