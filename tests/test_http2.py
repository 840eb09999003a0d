"""HTTP/2 with prior knowledge (h2c) on the listen port, towards an HTTP/1.1 origin: real
clients (curl --http2-prior-knowledge, the h2 library over a socket) and a real origin on
127.0.0.1. Each stream is one exchange: the same Proxy-Status, Server-Timing, X-Request-Id,
record and stats as on HTTP/1.1, with `protocol` "h2" in the record.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
)

from proxy.diagnosis.faults import Fault

from support import LOOPBACK, OriginConnection, curl, free_port, parse_responses, raw_request

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


class H2Client:
    """A plain HTTP/2 client over one socket, driven by the h2 library."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.heads: dict[int, dict[bytes, bytes]] = {}
        self.bodies: dict[int, bytearray] = {}
        self.ended: set[int] = set()
        self.reset: dict[int, int] = {}
        self.goaway: int | None = None
        self.outgoing: dict[int, bytes] = {}  # request bodies still to send, by stream
        self.ending: set[int] = set()  # streams whose body ends with what is in `outgoing`

    @classmethod
    async def connect(cls, port: int, lax: bool = False) -> H2Client:
        """`lax`: h2 sends what it is given (malformed heads included), as written."""
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        client = cls(reader, writer)
        if lax:
            client.h2 = H2Connection(
                H2Configuration(
                    client_side=True,
                    header_encoding=None,
                    validate_outbound_headers=False,
                    normalize_outbound_headers=False,
                )
            )
        client.h2.initiate_connection()
        await client.send()
        return client

    async def send(self) -> None:
        self.writer.write(self.h2.data_to_send())
        await self.writer.drain()

    def request(
        self, path: str, method: str = "GET", body: bytes = b"", headers: tuple = ()
    ) -> int:
        stream_id = self.h2.get_next_available_stream_id()
        fields = [
            (b":method", method.encode()),
            (b":scheme", b"http"),
            (b":authority", b"app.test"),
            (b":path", path.encode()),
            *headers,
        ]
        self.h2.send_headers(stream_id, fields, end_stream=not body)
        if body:
            self.h2.send_data(stream_id, body, end_stream=True)
        self.bodies[stream_id] = bytearray()
        return stream_id

    async def until(self, done, timeout: float = 10.0) -> None:
        async def loop() -> None:
            while not done():
                data = await self.reader.read(65536)
                if not data:
                    return
                for event in self.h2.receive_data(data):
                    self._event(event)
                self.push()
                await self.send()

        await asyncio.wait_for(loop(), timeout)

    def push(self) -> None:
        """Send what the proxy's windows allow of each body in `outgoing` (and END_STREAM
        after the last of it, for the streams in `ending`)."""
        for sid, rest in list(self.outgoing.items()):
            size = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
            while rest and size > 0:
                self.h2.send_data(sid, rest[:size])
                rest = rest[size:]
                size = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
            self.outgoing[sid] = rest
            if not rest and sid in self.ending:
                self.ending.discard(sid)
                del self.outgoing[sid]
                self.h2.end_stream(sid)

    def _event(self, event) -> None:
        if isinstance(event, ResponseReceived):
            self.heads[event.stream_id] = dict(event.headers)
        elif isinstance(event, DataReceived):
            self.bodies.setdefault(event.stream_id, bytearray()).extend(event.data)
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, StreamEnded):
            self.ended.add(event.stream_id)
        elif isinstance(event, StreamReset):
            self.reset[event.stream_id] = event.error_code
        elif isinstance(event, ConnectionTerminated):
            self.goaway = event.error_code

    def close(self) -> None:
        self.writer.close()


async def test_curl_with_prior_knowledge_gets_the_origins_answer_tagged(recording, proxy_factory):
    proxy = await proxy_factory(recording.url)
    code, out, err = await curl(
        "--http2-prior-knowledge", "-i", f"http://{LOOPBACK}:{proxy.port}/hello?x=1"
    )
    assert code == 0, err
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/2 200"), head
    assert body == b"from-app!"
    lowered = head.lower()
    assert b"proxy-status: faultline; received-status=200" in lowered
    assert b"server-timing: " in lowered and b"ttfb;dur=" in lowered
    assert b"x-request-id: " in lowered
    sent = recording.received_bytes()
    assert sent.startswith(b"GET /hello?x=1 HTTP/1.1\r\nHost: app.test\r\n") or sent.startswith(
        b"GET /hello?x=1 HTTP/1.1\r\nHost: " + f"{LOOPBACK}:{proxy.port}".encode()
    ), sent
    await proxy.settle()
    assert proxy.stats.counts == {(200, "origin", None): 1}
    (line,) = proxy.access_log()
    assert (line["method"], line["path"], line["status"]) == ("GET", "/hello?x=1", 200)
    assert line["protocol"] == "h2"


async def test_fifty_streams_on_one_connection_each_get_their_own_answer(
    origin_factory, proxy_factory
):
    async def echo(conn: OriginConnection) -> None:
        while (request := await conn.read_request()) is not None:
            path = request.split(b" ", 2)[1]
            body = request.partition(b"\r\n\r\n")[2]
            await conn.respond(200, path + b"|" + body)

    origin = await origin_factory(echo)
    proxy = await proxy_factory(origin.url)
    client = await H2Client.connect(proxy.port)
    streams = {}
    for i in range(50):
        body = b"x" * i if i % 2 else b""
        sid = client.request(f"/s/{i}", "POST" if body else "GET", body)
        streams[sid] = f"/s/{i}|".encode() + body
    await client.send()
    await client.until(lambda: client.ended >= set(streams))
    for sid, expected in streams.items():
        assert client.heads[sid][b":status"] == b"200"
        assert bytes(client.bodies[sid]) == expected, sid
    client.close()
    await proxy.settle()
    assert proxy.stats.counts == {(200, "origin", None): 50}


async def test_http11_and_h2c_on_the_same_port(recording, proxy_factory):
    proxy = await proxy_factory(recording.url)
    data = await raw_request(
        proxy.port, b"GET /one HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    (response,), _ = parse_responses(data)
    assert response.status == 200 and response.body == b"from-app!"
    client = await H2Client.connect(proxy.port)
    sid = client.request("/two")
    await client.send()
    await client.until(lambda: sid in client.ended)
    assert client.heads[sid][b":status"] == b"200" and bytes(client.bodies[sid]) == b"from-app!"
    client.close()
    await proxy.settle()
    assert proxy.stats.counts == {(200, "origin", None): 2}
    by_protocol = proxy.stats.snapshot(proxy={})["responses"]["by_protocol"]
    assert by_protocol == {"http/1.1": 1, "h2": 1}
    protocols = sorted(line["protocol"] for line in proxy.access_log())
    assert protocols == ["h2", "http/1.1"]


async def test_an_upstream_refused_is_a_proxy_made_502_on_the_stream(proxy_factory):
    dead = free_port()
    proxy = await proxy_factory(f"http://{LOOPBACK}:{dead}")
    client = await H2Client.connect(proxy.port)
    sid = client.request("/x", headers=((b"accept", b"application/json"),))
    ok = client.request("/y")
    await client.send()
    await client.until(lambda: {sid, ok} <= client.ended)
    head = client.heads[sid]
    assert head[b":status"] == b"502"
    assert head[b"content-type"] == b"application/problem+json"
    assert b"error=connection_refused" in head[b"proxy-status"]
    assert b'"error":"connection_refused"' in bytes(client.bodies[sid])
    client.close()
    await proxy.settle()
    refused = Fault.CONNECTION_REFUSED.value
    assert proxy.stats.counts == {(502, "proxy", refused): 2}


async def test_a_large_response_respects_the_clients_window(origin_factory, proxy_factory):
    """4 MiB through a client whose window is the default 64 KiB: the proxy sends only what
    the window allows and the whole body arrives intact."""
    payload = bytes(range(256)) * (4 * 4096)

    async def big(conn: OriginConnection) -> None:
        while await conn.read_request() is not None:
            await conn.respond(200, payload)

    origin = await origin_factory(big)
    proxy = await proxy_factory(origin.url)
    client = await H2Client.connect(proxy.port)
    sid = client.request("/big")
    await client.send()
    await client.until(lambda: sid in client.ended, timeout=30)
    assert bytes(client.bodies[sid]) == payload
    client.close()
    await proxy.settle()
    assert proxy.stats.counts == {(200, "origin", None): 1}


async def test_a_stream_the_client_resets_is_499_and_the_others_go_on(
    origin_factory, proxy_factory
):
    release = asyncio.Event()

    async def slow_then_fast(conn: OriginConnection) -> None:
        while (request := await conn.read_request()) is not None:
            if b" /slow " in request:
                await release.wait()
            await conn.respond(200, b"done")

    origin = await origin_factory(slow_then_fast)
    proxy = await proxy_factory(origin.url)
    client = await H2Client.connect(proxy.port)
    slow = client.request("/slow")
    await client.send()
    await asyncio.sleep(0.2)
    client.h2.reset_stream(slow)
    fast = client.request("/fast")
    await client.send()
    await client.until(lambda: fast in client.ended)
    assert bytes(client.bodies[fast]) == b"done"
    release.set()
    client.close()
    await proxy.settle()
    closed = Fault.CLIENT_CLOSED_REQUEST.value
    assert proxy.stats.counts == {(200, "origin", None): 1, (499, "client", closed): 1}


async def test_a_broken_preface_is_a_goaway_and_the_proxy_keeps_serving(recording, proxy_factory):
    proxy = await proxy_factory(recording.url)
    # The preface, then a DATA frame on stream 0 instead of SETTINGS: a connection error.
    data = await raw_request(proxy.port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00" * 9)
    frames = []
    while data:
        length = int.from_bytes(data[:3], "big")
        frames.append((data[3], data[9 : 9 + length]))
        data = data[9 + length :]
    # Our SETTINGS and the connection's WINDOW_UPDATE, then one GOAWAY.
    assert [kind for kind, _ in frames] == [4, 8, 7]
    assert int.from_bytes(frames[-1][1][4:8], "big") == 1  # PROTOCOL_ERROR
    data = await raw_request(proxy.port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    (response,), _ = parse_responses(data)
    assert response.status == 200 and response.body == b"from-app!"


# -- RFC 9113 §8: a malformed request is refused on its stream, the connection goes on --------

MALFORMED = {
    "uppercase-name": [(b"X-Up", b"1")],
    "connection": [(b"connection", b"keep-alive")],
    "transfer-encoding": [(b"transfer-encoding", b"chunked")],
    "upgrade": [(b"upgrade", b"websocket")],
    "te-gzip": [(b"te", b"gzip")],
    "crlf-in-value": [(b"x-a", b"one\r\nx-injected: two")],
    "nul-in-value": [(b"x-a", b"a\x00b")],
    "edge-blank": [(b"x-a", b" padded")],
    "status-pseudo": [(b":status", b"200")],
    "late-pseudo": [(b"x-a", b"1"), (b":protocol", b"x")],
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_a_malformed_request_is_a_400_on_its_stream_and_the_connection_goes_on(
    case, recording, proxy_factory
):
    proxy = await proxy_factory(recording.url)
    client = await H2Client.connect(proxy.port, lax=True)
    bad = client.request("/bad", headers=tuple(MALFORMED[case]))
    good = client.request("/good")
    await client.send()
    await client.until(lambda: {bad, good} <= client.ended | set(client.reset))
    assert client.heads[bad][b":status"] == b"400", client.heads
    assert b"error=http_request_error" in client.heads[bad][b"proxy-status"]
    assert client.heads[good][b":status"] == b"200" and bytes(client.bodies[good]) == b"from-app!"
    assert client.goaway is None
    client.close()
    sent = recording.received_bytes()
    assert sent.count(b" HTTP/1.1\r\n") == 1 and b"/bad" not in sent  # only the good one
    await proxy.settle()
    error = Fault.HTTP_REQUEST_ERROR.value
    assert proxy.stats.counts == {(400, "proxy", error): 1, (200, "origin", None): 1}


async def test_a_held_upload_holds_its_own_stream_only(proxy_factory):
    """Stream A uploads 4 MiB with PUT while the upstream refuses (upstream_wait holds the
    request): the core buffers 256 KiB and pauses A, which on HTTP/2 means A's window stays
    shut. Stream B on the same connection is still read and answered at once (here a 400
    the proxy makes itself); pausing the whole connection would hold B until A gave up."""
    proxy = await proxy_factory(f"http://{LOOPBACK}:{free_port()}", upstream_wait="3s")
    client = await H2Client.connect(proxy.port, lax=True)
    held = client.h2.get_next_available_stream_id()
    client.h2.send_headers(
        held,
        [(b":method", b"PUT"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/a")],
    )
    client.bodies[held] = bytearray()
    total = 4 * 1024 * 1024
    client.outgoing[held] = b"z" * total
    client.push()
    await client.send()
    with contextlib.suppress(TimeoutError):  # A's window shuts
        await client.until(lambda: False, timeout=0.5)
    sent = total - len(client.outgoing[held])
    assert sent < 1024 * 1024  # 256 KiB taken by the core, plus at most A's window
    loop = asyncio.get_running_loop()
    started = loop.time()
    bad = client.request("/b", headers=((b"X-Upper", b"1"),))
    await client.send()
    await client.until(lambda: bad in client.ended, timeout=5)
    assert client.heads[bad][b":status"] == b"400"
    assert loop.time() - started < 1.0  # not after A's 3 s hold
    client.close()


# -- accounting: every stream exactly once, under a mixed load with resets -----------------------

MIXED_KINDS = (
    "get",  # 200 from the origin
    "post",  # a body echoed: 200
    "reset-at-once",  # HEADERS and RST_STREAM in one write: 499
    "reset-later",  # reset while the origin thinks: 499
    "reset-in-body",  # reset at the first DATA of a 512 KiB answer: 499
    "reset-upload",  # reset halfway through a 200 KiB upload: 499
    "origin-500",  # the origin's own 500
    "origin-cut",  # the origin closes halfway through its body: http_response_incomplete
    "origin-drop",  # the origin closes without answering: a proxy-made 502
)
MIXED_PATHS = {
    "get": "/ok",
    "post": "/echo",
    "reset-at-once": "/slow",
    "reset-later": "/slow",
    "reset-in-body": "/big",
    "reset-upload": "/echo",
    "origin-500": "/500",
    "origin-cut": "/cut",
    "origin-drop": "/drop",
}


async def _mixed_origin(conn: OriginConnection) -> None:
    while (request := await conn.read_request(timeout=10)) is not None:
        path = request.split(b" ", 2)[1]
        if path == b"/slow":
            await conn.hold(10)
            return
        if path == b"/drop":
            return
        if path == b"/cut":
            conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial")
            await conn.drain()
            return
        if path == b"/big":
            conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 524288\r\n\r\n")
            for _ in range(8):
                conn.write(b"b" * 65536)
                await conn.drain()
        elif path == b"/500":
            await conn.respond(500, b"origin says no")
        elif path == b"/echo":
            await conn.respond(200, request.partition(b"\r\n\r\n")[2])
        else:
            await conn.respond(200, b"ok")


class MixedClient(H2Client):
    """An h2 client that resets the streams in `reset_on_data` at their first DATA."""

    def __init__(self, reader, writer) -> None:
        super().__init__(reader, writer)
        self.reset_on_data: set[int] = set()
        self.resets_sent: set[int] = set()

    def _event(self, event) -> None:
        super()._event(event)  # (DATA is acknowledged: the connection's window stays open)
        if isinstance(event, DataReceived) and event.stream_id in self.reset_on_data:
            self.reset_on_data.discard(event.stream_id)
            self.reset_now(event.stream_id)

    def reset_now(self, stream_id: int) -> None:
        self.outgoing.pop(stream_id, None)
        self.ending.discard(stream_id)
        with contextlib.suppress(Exception):  # the stream may have closed meanwhile
            self.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
            self.resets_sent.add(stream_id)


async def _mixed_connection(port: int, kinds: list[str], rng) -> dict[int, str]:
    """One connection: `kinds` as streams, ten at a time; each stream's kind, by id."""
    client = await MixedClient.connect(port)
    opened: dict[int, str] = {}
    try:
        for at in range(0, len(kinds), 10):
            batch: dict[int, str] = {}
            later: list[int] = []
            for kind in kinds[at : at + 10]:
                path = MIXED_PATHS[kind]
                if kind in ("post", "reset-upload"):  # sent as the windows allow
                    sid = client.h2.get_next_available_stream_id()
                    fields = [(b":method", b"POST"), (b":scheme", b"http")]
                    fields += [(b":authority", b"a"), (b":path", path.encode())]
                    client.h2.send_headers(sid, fields)
                    client.bodies[sid] = bytearray()
                    size = rng.randrange(1, 20000) if kind == "post" else 200_000
                    client.outgoing[sid] = bytes(size)
                    client.ending.add(sid)
                    client.push()
                    if kind == "reset-upload":
                        later.append(sid)
                else:
                    sid = client.request(path)
                batch[sid] = kind
                if kind == "reset-at-once":
                    client.reset_now(sid)
                elif kind == "reset-later":
                    later.append(sid)
                elif kind == "reset-in-body":
                    client.reset_on_data.add(sid)
            await client.send()
            opened.update(batch)
            await asyncio.sleep(rng.uniform(0.01, 0.1))
            for sid in later:
                client.reset_now(sid)
            await client.send()

            def done(batch=batch) -> bool:
                return all(
                    sid in client.ended or sid in client.reset or sid in client.resets_sent
                    for sid in batch
                )

            await client.until(done, timeout=10)
    finally:
        client.close()
    return opened


async def test_every_stream_is_counted_exactly_once_under_a_mixed_load(
    origin_factory, proxy_factory
):
    """20 connections x 50 streams: GETs, POSTs with bodies, client resets at random points
    (with the HEADERS, while the origin thinks, in the response body, in the upload) and
    origin faults (a 500, a cut body, a dropped connection). /stats counts
    exactly the streams opened, by_protocol h2 too, and the log has one line per stream,
    each with the outcome its kind must have."""
    import random

    rng = random.Random(19)
    origin = await origin_factory(_mixed_origin)
    proxy = await proxy_factory(origin.url)
    plans = [[rng.choice(MIXED_KINDS) for _ in range(50)] for _ in range(20)]
    results = await asyncio.gather(
        *(_mixed_connection(proxy.port, plan, random.Random(i)) for i, plan in enumerate(plans))
    )
    opened = sum(len(streams) for streams in results)
    assert opened == 1000
    await proxy.settle(timeout=10)
    snapshot = proxy.stats.snapshot(proxy={})
    assert snapshot["requests"] == {"total": opened, "in_flight": 0}
    assert snapshot["responses"]["by_protocol"] == {"http/1.1": 0, "h2": opened}
    assert sum(proxy.stats.counts.values()) == opened
    lines = proxy.access_log()
    assert len(lines) == opened
    assert len({line["request_id"] for line in lines}) == opened
    expected = {
        "/ok": {(200, "origin", None)},
        "/echo": {(200, "origin", None), (499, "client", Fault.CLIENT_CLOSED_REQUEST.value)},
        "/slow": {(499, "client", Fault.CLIENT_CLOSED_REQUEST.value)},
        # The origin's 512 KiB may all be read before the reset comes: the exchange ended
        # then, its tail held for the client's window, as bytes in a socket's buffer are.
        "/big": {(499, "client", Fault.CLIENT_CLOSED_REQUEST.value), (200, "origin", None)},
        "/500": {(500, "origin", None)},
        "/cut": {(200, "origin", Fault.HTTP_RESPONSE_INCOMPLETE.value)},
        "/drop": {(502, "proxy", Fault.CONNECTION_TERMINATED.value)},
    }
    seen: dict[str, int] = {}
    for line in lines:
        outcome = (line["status"], line["source"], line["error"])
        assert line["protocol"] == "h2"
        assert outcome in expected[line["path"]], line
        seen[line["path"]] = seen.get(line["path"], 0) + 1
    kinds = [kind for streams in results for kind in streams.values()]
    for path in expected:
        assert seen.get(path, 0) == sum(MIXED_PATHS[k] == path for k in kinds), path
    resets = sum(k.startswith("reset") for k in kinds)
    ended_first = sum(line["path"] == "/big" and line["status"] == 200 for line in lines)
    client_closed = (499, "client", Fault.CLIENT_CLOSED_REQUEST.value)
    assert proxy.stats.counts[client_closed] + ended_first == resets


# -- towards an HTTP/2 origin (h2c://) --------------------------------------------------------


class H2Origin:
    """A plain HTTP/2 origin with prior knowledge, on the h2 library: each request answered
    by `answer(path)`: (status, body[, extra fields]), or None to reset the stream before
    any head."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.server: asyncio.AbstractServer | None = None
        self.requests: list[dict[bytes, bytes]] = []

    async def start(self) -> H2Origin:
        self.server = await asyncio.start_server(self._serve, LOOPBACK, 0)
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"h2c://{LOOPBACK}:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        heads: dict[int, dict[bytes, bytes]] = {}
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, RequestReceived):
                        heads[event.stream_id] = dict(event.headers)
                    elif isinstance(event, DataReceived):
                        conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, StreamEnded) and event.stream_id in heads:
                        head = heads.pop(event.stream_id)
                        self.requests.append(head)
                        reply = self.answer(head[b":path"].decode())
                        if reply is None:
                            conn.reset_stream(event.stream_id, ErrorCodes.REFUSED_STREAM)
                            continue
                        status, body, *extra = reply
                        fields = [
                            (b":status", b"%d" % status),
                            (b"content-length", b"%d" % len(body)),
                        ]
                        conn.send_headers(event.stream_id, fields + (extra[0] if extra else []))
                        conn.send_data(event.stream_id, body, end_stream=True)
                writer.write(conn.data_to_send())
        writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def h2_origin():
    origin = await H2Origin(
        lambda path: None if path == "/reset" else (200, b"h2-" + path.encode())
    ).start()
    yield origin
    await origin.close()


async def test_an_http11_client_through_to_an_h2c_origin(h2_origin, proxy_factory):
    proxy = await proxy_factory(h2_origin.url)
    data = await raw_request(
        proxy.port, b"GET /one HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"
    )
    (response,), _ = parse_responses(data)
    assert response.status == 200 and response.body == b"h2-/one"
    assert b"faultline; received-status=200" in data and b"\r\nVia: 2 faultline\r\n" in data
    (seen,) = h2_origin.requests
    assert seen[b":method"] == b"GET" and seen[b":authority"] == b"app"
    assert b"(faultline " in seen[b"via"] and seen[b"x-forwarded-for"] == b"127.0.0.1"
    await proxy.settle()
    assert proxy.stats.counts == {(200, "origin", None): 1}


async def test_an_h2_client_through_to_an_h2c_origin_reuses_the_connection(
    h2_origin, proxy_factory
):
    proxy = await proxy_factory(h2_origin.url)
    client = await H2Client.connect(proxy.port)
    for i in range(3):
        sid = client.request(f"/n{i}")
        await client.send()
        await client.until(lambda sid=sid: sid in client.ended)
        assert bytes(client.bodies[sid]) == f"h2-/n{i}".encode()
    client.close()
    await proxy.settle()
    assert proxy.stats.counts == {(200, "origin", None): 3}
    assert proxy.pool.open == 1  # one connection to the origin, used in turn


async def test_an_origin_stream_reset_is_connection_terminated_with_its_code(
    h2_origin, proxy_factory
):
    proxy = await proxy_factory(h2_origin.url)
    data = await raw_request(
        proxy.port, b"GET /reset HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    (response,), _ = parse_responses(data)
    assert response.status == 502
    assert b"error=connection_terminated" in data and b"(RST_STREAM REFUSED_STREAM)" in data
    await proxy.settle()
    terminated = Fault.CONNECTION_TERMINATED.value
    assert proxy.stats.counts == {(502, "proxy", terminated): 1}


async def test_a_body_that_ends_with_an_empty_data_frame_is_framed_once(recording, proxy_factory):
    """Browsers and curl end an upload with an empty DATA frame (END_STREAM). Towards an
    HTTP/1.1 origin the body is chunked: an empty chunk is its last one, so writing the
    empty DATA as a chunk ended the body early and left a stray `0\\r\\n\\r\\n` on the
    kept-alive connection."""
    proxy = await proxy_factory(recording.url)
    client = await H2Client.connect(proxy.port)
    for path in ("/first", "/second"):
        sid = client.h2.get_next_available_stream_id()
        fields = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"a")]
        client.h2.send_headers(sid, [*fields, (b":path", path.encode())])
        client.h2.send_data(sid, b"hello ")
        client.h2.send_data(sid, b"world")
        client.h2.send_data(sid, b"", end_stream=True)
        client.bodies[sid] = bytearray()
        await client.send()
        await client.until(lambda sid=sid: sid in client.ended)
        assert client.heads[sid][b":status"] == b"200"
    client.close()
    assert [r.body for r in recording.requests] == [b"hello world"] * 2
    assert recording.parse_errors == []
    assert len(recording.connections) == 1  # the connection stayed good for the second
