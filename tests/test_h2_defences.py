"""HTTP/2 requests and clients the proxy must refuse without hurting anyone else (issue 19).

- A body that disagrees with its content-length (RFC 9113 §8.1.1) is a stream error on
  that stream only.
- Each defence against one hostile connection, in-process for exact counts: rapid reset
  (CVE-2023-44487), PING and SETTINGS floods, an HPACK bomb, a CONTINUATION flood, more
  streams than MAX_CONCURRENT_STREAMS, a reused stream id, windows never opened. Each
  ends in GOAWAY or a reset stream and is counted once, as the client's.
- The same attacks, big (thousands of resets, hundreds of connections) and bounded in
  time, against the proxy as a process: its RSS (VmRSS) may not grow by 20 MB, another
  client gets 200s all along, and /stats charges nothing to the proxy or the upstream.

Real sockets, a real origin on 127.0.0.1; hostile frames come from hyperframe and hpack
(h2's own), or from h2 told not to check what it sends."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import ResponseReceived, StreamReset
from h2.settings import SettingCodes
from hostile_support import raise_fd_limit, vm_rss
from hpack import Encoder
from hyperframe.frame import ContinuationFrame, HeadersFrame, RstStreamFrame
from test_http2 import H2Client

from proxy.diagnosis.faults import Fault

from support import (
    LOOPBACK,
    OriginConnection,
    ProxyProcess,
    ScriptedOrigin,
    parse_responses,
    raw_request,
    spawn_proxy,
)

REQUEST_ERROR = Fault.HTTP_REQUEST_ERROR.value


# -- RFC 9113 §8.1.1: content-length against the DATA sent --------------------------------------

BODIES = {
    "too-much": [b"hel", b"lo, and more"],  # content-length 5
    "too-little": [b"hel", b"l"],
}


@pytest.mark.parametrize("case", sorted(BODIES))
async def test_data_that_disagrees_with_content_length_is_a_stream_error(
    case, recording, proxy_factory
):
    """The first DATA frame is forwarded; the one that breaks the content-length is not,
    and the stream ends in a 400 (or RST_STREAM PROTOCOL_ERROR): recorded once, as the
    client's http_request_error. A good stream beside it is answered, no GOAWAY, and the
    origin never gets a complete request for the bad one."""
    proxy = await proxy_factory(recording.url)
    client = await H2Client.connect(proxy.port, lax=True)
    bad = client.h2.get_next_available_stream_id()
    fields = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"a")]
    client.h2.send_headers(bad, [*fields, (b":path", b"/bad"), (b"content-length", b"5")])
    client.bodies[bad] = bytearray()
    first, last = BODIES[case]
    client.h2.send_data(bad, first)
    await client.send()
    await asyncio.sleep(0.2)  # the first part reaches the origin
    client.h2.send_data(bad, last, end_stream=True)
    good = client.request("/good")
    await client.send()
    await client.until(lambda: {bad, good} <= client.ended | set(client.reset))
    if bad in client.heads:
        assert client.heads[bad][b":status"] == b"400"
        assert f"error={REQUEST_ERROR}".encode() in client.heads[bad][b"proxy-status"]
        assert b"content-length 5" in bytes(client.bodies[bad])
    else:
        assert client.reset[bad] == ErrorCodes.PROTOCOL_ERROR
    assert client.heads[good][b":status"] == b"200" and bytes(client.bodies[good]) == b"from-app!"
    assert client.goaway is None
    client.close()
    assert [request.target for request in recording.requests] == [b"/good"]
    assert b"hel" in recording.received_bytes()  # the bad stream's first part went out
    await proxy.settle()
    assert proxy.stats.counts == {(400, "proxy", REQUEST_ERROR): 1, (200, "origin", None): 1}
    lines = {line["path"]: line for line in proxy.access_log()}
    assert len(lines) == 2 and lines["/bad"]["layer"] == "client"
    assert "content-length 5" in lines["/bad"]["details"]


async def test_content_length_with_no_data_is_a_400(recording, proxy_factory):
    """HEADERS with END_STREAM and content-length 5: nothing follows, nothing is forwarded."""
    proxy = await proxy_factory(recording.url)
    client = await H2Client.connect(proxy.port, lax=True)
    bad = client.request("/bad", "POST", headers=((b"content-length", b"5"),))
    good = client.request("/good")
    await client.send()
    await client.until(lambda: {bad, good} <= client.ended)
    assert client.heads[bad][b":status"] == b"400"
    assert client.heads[good][b":status"] == b"200"
    client.close()
    assert b"/bad" not in recording.received_bytes()
    await proxy.settle()
    assert proxy.stats.counts == {(400, "proxy", REQUEST_ERROR): 1, (200, "origin", None): 1}


# -- defences, one hostile connection (in-process: exact counts) --------------------------------

REQUEST_FIELDS = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a")]
CLIENT_CLOSED = Fault.CLIENT_CLOSED_REQUEST.value


def _request_block(encoder: Encoder, path: bytes = b"/slow") -> bytes:
    return encoder.encode([*REQUEST_FIELDS, (b":path", path)])


def _headers(stream_id: int, block: bytes, end_headers: bool = True, end_stream: bool = True):
    frame = HeadersFrame(stream_id)
    frame.data = block
    if end_stream:
        frame.flags.add("END_STREAM")
    if end_headers:
        frame.flags.add("END_HEADERS")
    return frame


def _frames(*frames) -> bytes:
    return b"".join(frame.serialize() for frame in frames)


def _preface() -> bytes:
    conn = H2Connection(H2Configuration(client_side=True))
    conn.initiate_connection()
    return conn.data_to_send()


def _goaway(frames) -> int | None:
    codes = [int.from_bytes(body[4:8], "big") for kind, _, _, body in frames if kind == 7]
    return codes[-1] if codes else None


def _resets(frames) -> dict[int, int]:
    return {sid: int.from_bytes(body[:4], "big") for kind, _, sid, body in frames if kind == 3}


async def _served_meanwhile(port: int) -> bytes:
    """A second, well-behaved client: its answer while the other one attacks."""
    client = await H2Client.connect(port)
    sid = client.request("/ok")
    await client.send()
    await client.until(lambda: sid in client.ended)
    client.close()
    return bytes(client.bodies[sid])


async def test_rapid_reset_ends_the_connection_with_enhance_your_calm(
    origin_factory, proxy_factory
):
    """CVE-2023-44487: open a stream, reset it, again and again. Over the budget the proxy
    ends the connection with GOAWAY ENHANCE_YOUR_CALM; every exchange is counted once, as
    the client's, and the connection once more for the flood; another client is served."""

    async def slow(conn: OriginConnection) -> None:
        while (request := await conn.read_request(timeout=30)) is not None:
            if b" /ok " in request:
                await conn.respond(200, b"from-app!")
            else:
                await asyncio.sleep(5)

    origin = await origin_factory(slow)
    proxy = await proxy_factory(origin.url)
    attacker = await H2Client.connect(proxy.port)
    opened = 0
    for _ in range(30):  # 300 opened and reset, 10 per write
        for _ in range(10):
            sid = attacker.request("/x")
            attacker.h2.reset_stream(sid)
            opened += 1
        await attacker.send()
    await attacker.until(lambda: attacker.goaway is not None)
    assert attacker.goaway == ErrorCodes.ENHANCE_YOUR_CALM
    attacker.close()
    assert await _served_meanwhile(proxy.port) == b"from-app!"
    await proxy.settle()
    counts = proxy.stats.counts
    assert counts.pop((200, "origin", None)) == 1  # the other client
    assert counts.pop((400, "proxy", REQUEST_ERROR)) == 1  # the flood
    assert set(counts) == {(499, "client", CLIENT_CLOSED)}
    assert 200 < counts[(499, "client", CLIENT_CLOSED)] <= opened
    assert not origin.requests or {r.split(b" ")[1] for r in origin.requests} == {b"/ok"}
    flood = [line for line in proxy.access_log() if line["status"] == 400]
    assert "reset flood" in flood[0]["details"] and flood[0]["layer"] == "client"


@pytest.mark.parametrize("kind", ["ping", "settings"])
async def test_a_ping_or_settings_flood_ends_the_connection(kind, recording, proxy_factory):
    proxy = await proxy_factory(recording.url)
    attacker = await H2Client.connect(proxy.port)
    for i in range(300):
        if kind == "ping":
            attacker.h2.ping(i.to_bytes(8, "big"))
        else:
            attacker.h2.update_settings({SettingCodes.MAX_FRAME_SIZE: 16384 + i})
    await attacker.send()
    await attacker.until(lambda: attacker.goaway is not None)
    assert attacker.goaway == ErrorCodes.ENHANCE_YOUR_CALM
    attacker.close()
    assert await _served_meanwhile(proxy.port) == b"from-app!"
    await proxy.settle()
    assert proxy.stats.counts == {(400, "proxy", REQUEST_ERROR): 1, (200, "origin", None): 1}
    (flood,) = [line for line in proxy.access_log() if line["status"] == 400]
    assert f"{kind} flood" in flood["details"] and flood["protocol"] == "h2"


async def test_an_hpack_bomb_ends_the_connection(recording, proxy_factory):
    """A header block of 4 KiB that decodes to 800 KiB (one value, referenced 200 times
    from the dynamic table): over limits.max_request_header_bytes once decoded."""
    proxy = await proxy_factory(recording.url)
    block = Encoder().encode([*REQUEST_FIELDS, (b":path", b"/")] + [(b"x-a", b"v" * 4000)] * 200)
    assert len(block) < 8192
    frames = await _hostile(proxy.port, _frames(_headers(1, block)))
    assert _goaway(frames) == ErrorCodes.ENHANCE_YOUR_CALM
    assert await _served_meanwhile(proxy.port) == b"from-app!"
    assert recording.received_bytes().count(b" HTTP/1.1\r\n") == 1  # only the good client
    await proxy.settle()
    assert proxy.stats.counts == {(431, "proxy", REQUEST_ERROR): 1, (200, "origin", None): 1}


async def test_a_continuation_flood_ends_the_connection(recording, proxy_factory):
    proxy = await proxy_factory(recording.url)
    flood = [_headers(1, _request_block(Encoder())[:4], end_headers=False)]
    for _ in range(200):
        frame = ContinuationFrame(1)
        frame.data = b"\x00" * 16000
        flood.append(frame)
    frames = await _hostile(proxy.port, _frames(*flood))
    # h2 keeps at most 64 CONTINUATION frames (1 MiB), then GOAWAY and close; the close
    # comes while the client is still writing, so its GOAWAY may be lost to the reset.
    assert _goaway(frames) in (None, ErrorCodes.PROTOCOL_ERROR)
    assert not proxy.server.ctx.connections  # ended, not waiting for END_HEADERS
    assert await _served_meanwhile(proxy.port) == b"from-app!"
    await proxy.settle()
    assert proxy.stats.counts == {(400, "proxy", REQUEST_ERROR): 1, (200, "origin", None): 1}


async def test_more_streams_than_allowed_end_the_connection(origin_factory, proxy_factory):
    """MAX_CONCURRENT_STREAMS is 100: stream 101 while 100 are open ends the connection, and
    the 100 exchanges it carried are counted once each, as the client's."""

    async def never(conn: OriginConnection) -> None:
        await conn.read_request(timeout=30)
        await asyncio.sleep(30)

    origin = await origin_factory(never)
    proxy = await proxy_factory(origin.url)
    encoder = Encoder()
    opened = [_headers(1 + 2 * i, _request_block(encoder)) for i in range(101)]
    frames = await _hostile(proxy.port, _frames(*opened[:100]), _frames(opened[100]), pause=0.3)
    assert _goaway(frames) == ErrorCodes.PROTOCOL_ERROR
    await proxy.settle()
    counts = {(499, "client", CLIENT_CLOSED): 100, (400, "proxy", REQUEST_ERROR): 1}
    assert proxy.stats.counts == counts


async def test_a_reused_stream_id_ends_the_connection(recording, proxy_factory):
    """HEADERS again on stream 1, which both sides closed: a connection error (RFC 9113
    §5.1, STREAM_CLOSED); the first request was answered, the second never forwarded."""
    proxy = await proxy_factory(recording.url)
    encoder = Encoder()
    again = [_headers(1, _request_block(encoder, b"/")) for _ in range(2)]
    frames = await _hostile(proxy.port, _frames(again[0]), _frames(again[1]), pause=0.3)
    assert _goaway(frames) == ErrorCodes.STREAM_CLOSED, frames
    assert recording.received_bytes().count(b" HTTP/1.1\r\n") == 1
    assert await _served_meanwhile(proxy.port) == b"from-app!"
    await proxy.settle()
    assert proxy.stats.counts == {(400, "proxy", REQUEST_ERROR): 1, (200, "origin", None): 2}


# -- a client that never opens its window ---------------------------------------------------------


async def _shut_window_client(port: int, streams: int) -> H2Client:
    """`streams` GETs of /big whose windows the client never opens again."""
    client = await H2Client.connect(port)
    for _ in range(streams):
        client.request("/big")
    await client.send()
    return client


async def _read_unacknowledged(client: H2Client, seconds: float) -> None:
    """Read (never acknowledging DATA: the windows stay shut) for `seconds`."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while data := await client.reader.read(65536):
                for event in client.h2.receive_data(data):
                    if isinstance(event, StreamReset):
                        client.reset[event.stream_id] = event.error_code
                    elif isinstance(event, ResponseReceived):
                        client.heads[event.stream_id] = dict(event.headers)


def _held(proxy) -> int:
    """Response bytes the proxy holds for its HTTP/2 clients' windows."""
    return sum(
        sink.buffered
        for conn in proxy.server.ctx.connections
        for sink in getattr(conn, "waiting", {}).values()
    )


async def test_a_client_that_shuts_its_window_is_not_charged_to_the_upstream(
    hostile_origin, proxy_factory
):
    """The client never opens its window again: the stream waits for it (the origin's reads
    pause), and upstream_read never fires against the origin, which did nothing wrong."""
    proxy = await proxy_factory(hostile_origin.url, **{"timeouts.upstream_read": "300ms"})
    client = await _shut_window_client(proxy.port, 1)
    await _read_unacknowledged(client, 1.0)  # three upstream_read periods
    stats = proxy.stats
    assert stats.counts == {} and stats.in_flight == 1  # still waiting for the client
    client.close()
    await proxy.settle()
    assert proxy.stats.counts == {(499, "client", CLIENT_CLOSED): 1}


async def test_a_stalled_window_is_cut_after_client_body_and_charged_to_the_client(
    hostile_origin, proxy_factory
):
    """Past timeouts.client_body with its window shut, the stream is reset (CANCEL) and its
    record is the client's (http_request_error, a timeout); the origin was never blamed
    and another client is served meanwhile."""
    proxy = await proxy_factory(
        hostile_origin.url,
        **{"timeouts.client_body": "500ms", "timeouts.upstream_read": "300ms"},
    )
    client = await _shut_window_client(proxy.port, 3)
    await _read_unacknowledged(client, 0.3)
    assert proxy.stats.in_flight == 3
    assert await _served_meanwhile(proxy.port) == b"from-app!"
    await _read_unacknowledged(client, 1.5)
    assert client.reset == {1: ErrorCodes.CANCEL, 3: ErrorCodes.CANCEL, 5: ErrorCodes.CANCEL}
    assert client.goaway is None
    await proxy.settle()
    assert proxy.stats.counts == {(200, "origin", REQUEST_ERROR): 3, (200, "origin", None): 1}
    stalled = [line for line in proxy.access_log() if line["error"] == REQUEST_ERROR]
    assert len(stalled) == 3 and all(line["layer"] == "client" for line in stalled)
    assert "timeouts.client_body" in stalled[0]["details"]
    assert _held(proxy) == 0
    client.close()


async def test_what_a_connection_holds_for_shut_windows_is_bounded(hostile_origin, proxy_factory):
    """30 streams of 1 MiB, windows never opened. Each stream alone would hold its 256 KiB
    and the origin read that crossed it (~14 MiB here); past 2 MiB the connection stops
    the origin of every stream holding bytes, so it holds 2 MiB and at most one origin
    read per stream more (~5 MiB). A stream opened beside them is still answered."""
    proxy = await proxy_factory(hostile_origin.url)
    client = await _shut_window_client(proxy.port, 30)
    await _read_unacknowledged(client, 1.5)
    held = _held(proxy)
    assert 2 * 1024 * 1024 < held < 30 * 256 * 1024, held
    assert await _served_meanwhile(proxy.port) == b"from-app!"
    client.close()


# -- defences against a proxy process: each attack big, bounded in time, memory bounded ------

RSS_GROWTH_LIMIT = 20 * 2**20
BIG = 1024 * 1024  # /big's body, written 64 KiB at a time as the proxy takes it
CHUNK = b"b" * 65536


async def _answer(conn: OriginConnection) -> None:
    """/slow: never answered; /big: 1 MiB; anything else: 200 `from-app!`."""
    while (request := await conn.read_request(timeout=60)) is not None:
        path = request.split(b" ", 2)[1]
        if path == b"/slow":
            await conn.hold(60)
            return
        if path == b"/big":
            conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG)
            for _ in range(BIG // len(CHUNK)):
                conn.write(CHUNK)
                await conn.drain()
        else:
            await conn.respond(200, b"from-app!")


@pytest.fixture
async def hostile_origin():
    origin = await ScriptedOrigin(_answer).start()
    yield origin
    await origin.close()


async def _hostile(
    port: int, *payloads: bytes, pause: float = 0.0, read_s: float = 5.0, until=None
):
    """One hostile connection: the client preface, then each payload (`pause` s apart);
    the frames the proxy sent back until it closed, or `read_s` passed, or `until(frames)`
    says so: (type, flags, stream id, payload)."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    data = bytearray()

    async def read() -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                data.extend(chunk)
                if until is not None and until(_parsed(data)):
                    return

    reading = asyncio.create_task(read())
    try:
        writer.write(_preface())
        for payload in payloads:
            writer.write(payload)
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(reading), read_s)
    except ConnectionError:
        pass
    finally:
        reading.cancel()
        writer.close()
    return _parsed(data)


def _parsed(data: bytearray) -> list[tuple[int, int, int, bytes]]:
    frames = []
    view = memoryview(data)
    while len(view) >= 9:
        length = int.from_bytes(view[:3], "big")
        sid = int.from_bytes(view[5:9], "big") & 0x7FFFFFFF
        frames.append((view[3], view[4], sid, bytes(view[9 : 9 + length])))
        view = view[9 + length :]
    return frames


async def _admin_stats(proxy: ProxyProcess) -> dict:
    data = await raw_request(
        proxy.admin_port, b"GET /stats?limit=0 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    (response,), _ = parse_responses(data)
    return response.json()


async def _settled(proxy: ProxyProcess, timeout: float = 5.0) -> dict:
    """/stats once nothing is in flight and the total has stopped moving for 0.2 s: a
    stream whose frames the proxy had not read yet is not in flight, but will count."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        stats = await _admin_stats(proxy)
        total = stats["requests"]["total"]
        quiet = stats["requests"]["in_flight"] == 0 and total == last
        if quiet or time.monotonic() > deadline:
            return stats
        last = total if stats["requests"]["in_flight"] == 0 else None
        await asyncio.sleep(0.2)


class GoodClient:
    """The other client: GET /ok over HTTP/2, again and again, while the attack runs."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.answers: list[int] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        client = await H2Client.connect(self.port)
        try:
            while not self.stop.is_set():
                sid = client.request("/ok")
                await client.send()
                await client.until(lambda sid=sid: sid in client.ended, timeout=8)
                self.answers.append(int(client.heads[sid][b":status"]))
                await asyncio.sleep(0.02)
        finally:
            client.close()


async def _under_attack(
    proxy: ProxyProcess, attack, seconds: float = 3.0, first_requests: int = 0
) -> dict:
    """A warm-up round of `attack`, then rounds for `seconds` while a good client is
    served; the proxy's RSS before and after (VmRSS) must not grow by 20 MB. Returns what
    /stats counted during the rounds (`first_requests`: the origin's 200s per round that
    the attack itself asked for)."""
    pid = proxy.proc.pid
    await attack()  # warm-up: every path once, caches filled
    before_stats = await _settled(proxy)
    await asyncio.sleep(0.2)
    before = vm_rss(pid)
    good = GoodClient(proxy.port)
    serving = asyncio.create_task(good.run())
    peak, rounds = before, 0
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        await attack()
        rounds += 1
        peak = max(peak, vm_rss(pid))
    elapsed = time.monotonic() - started
    good.stop.set()
    await asyncio.wait_for(serving, 10)
    after_stats = await _settled(proxy)
    await asyncio.sleep(0.2)  # the last connections close
    after = vm_rss(pid)
    mib = 2**20
    print(
        f"\n[{attack.__name__}] {rounds} rounds in {elapsed:.1f} s; RSS {before / mib:.1f} -> "
        f"peak {peak / mib:.1f} -> {after / mib:.1f} MiB; good client {len(good.answers)} x 200"
    )
    assert good.answers and set(good.answers) == {200}, good.answers[-5:]
    assert after - before < RSS_GROWTH_LIMIT, (before, after)
    assert after_stats["requests"]["in_flight"] == 0
    counted = {}
    for key in ("by_error", "by_layer"):
        was = before_stats["responses"][key]
        now = after_stats["responses"][key]
        counted[key] = {k: n - was.get(k, 0) for k, n in now.items() if n != was.get(k, 0)}
    counted["rounds"] = rounds
    print(f"counted during the attack: {counted}")
    # Every attack is the client's: nothing charged to the proxy, the upstream or the origin
    # (the good client's 200s are the only other responses).
    assert set(counted["by_error"]) <= {CLIENT_CLOSED, REQUEST_ERROR}, counted
    assert set(counted["by_layer"]) <= {"client", "origin"}, counted
    origin = len(good.answers) + first_requests * rounds
    assert counted["by_layer"].get("origin", 0) == origin, counted
    return counted


@pytest.fixture
def proxy_process(hostile_origin):
    raise_fd_limit(4096)
    proxy = spawn_proxy(
        hostile_origin.url,
        env={"FAULTLINE_LOG_ACCESS": "false", "FAULTLINE_TIMEOUTS_CLIENT_BODY": "1s"},
    )
    yield proxy
    proxy.stop()


CONNECTIONS = 20  # hostile connections at a time


async def _all(count: int, make) -> list:
    return await asyncio.gather(*(make() for _ in range(count)))


async def test_rapid_reset_over_many_connections(proxy_process):
    """CVE-2023-44487: 20 connections at a time open and reset streams, 50 to a write, 300
    each, for 3 s: tens of thousands of resets. Half send each HEADERS with its RST_STREAM
    (never forwarded), half a batch of HEADERS, then its RST_STREAMs (forwarded, then
    cancelled). Each connection ends in GOAWAY ENHANCE_YOUR_CALM."""
    codes: list[int | None] = []
    sent = 0

    async def one(paired: bool) -> None:
        nonlocal sent
        encoder = Encoder()
        writes = []
        for batch in range(6):
            ids = [1 + 2 * (batch * 50 + i) for i in range(50)]
            heads = [_headers(sid, _request_block(encoder)) for sid in ids]
            resets = [RstStreamFrame(sid, error_code=ErrorCodes.CANCEL) for sid in ids]
            if paired:
                writes.append(
                    _frames(*(f for pair in zip(heads, resets, strict=True) for f in pair))
                )
            else:
                writes += [_frames(*heads), _frames(*resets)]
        sent += 300
        codes.append(_goaway(await _hostile(proxy_process.port, *writes, pause=0.005)))

    async def rapid_reset() -> None:
        await asyncio.gather(*(one(i % 2 == 0) for i in range(CONNECTIONS)))

    counted = await _under_attack(proxy_process, rapid_reset)
    assert set(codes) == {ErrorCodes.ENHANCE_YOUR_CALM}, codes
    assert counted["by_error"][CLIENT_CLOSED] > 5000, counted
    assert counted["by_error"][REQUEST_ERROR] == CONNECTIONS * counted["rounds"]


async def test_ping_and_settings_floods_over_many_connections(proxy_process):
    """20 connections at a time, each 1,000 PINGs or 1,000 SETTINGS in one write: each
    ends in GOAWAY ENHANCE_YOUR_CALM and is counted once, as the client's."""
    codes: list[int | None] = []

    async def one(kind: str) -> None:
        conn = H2Connection(H2Configuration(client_side=True))
        for i in range(1000):
            if kind == "ping":
                conn.ping(i.to_bytes(8, "big"))
            else:
                conn.update_settings({SettingCodes.MAX_FRAME_SIZE: 16384 + i})
        codes.append(_goaway(await _hostile(proxy_process.port, conn.data_to_send())))

    async def floods() -> None:
        await asyncio.gather(*(one(("ping", "settings")[i % 2]) for i in range(CONNECTIONS)))

    counted = await _under_attack(proxy_process, floods)
    assert set(codes) == {ErrorCodes.ENHANCE_YOUR_CALM}, codes
    assert counted["by_error"] == {REQUEST_ERROR: CONNECTIONS * counted["rounds"]}


async def test_hpack_bombs_over_many_connections(proxy_process):
    """20 connections at a time, each a 4 KiB header block that decodes to 800 KiB: GOAWAY
    ENHANCE_YOUR_CALM as soon as the decoded list passes the limit, counted as a 431."""
    block = Encoder().encode([*REQUEST_FIELDS, (b":path", b"/")] + [(b"x-a", b"v" * 4000)] * 200)
    codes: list[int | None] = []

    async def one() -> None:
        codes.append(_goaway(await _hostile(proxy_process.port, _frames(_headers(1, block)))))

    async def hpack_bombs() -> None:
        await _all(CONNECTIONS, one)

    counted = await _under_attack(proxy_process, hpack_bombs)
    assert set(codes) == {ErrorCodes.ENHANCE_YOUR_CALM}, codes
    assert counted["by_error"] == {REQUEST_ERROR: CONNECTIONS * counted["rounds"]}


async def test_continuation_floods_over_many_connections(proxy_process):
    """20 connections at a time, each a HEADERS without END_HEADERS and 80 CONTINUATION
    frames of 16,000 bytes: h2 keeps 64 of them, then the connection ends."""
    flood = [_headers(1, _request_block(Encoder())[:4], end_headers=False)]
    for _ in range(80):
        frame = ContinuationFrame(1)
        frame.data = b"\x00" * 16000
        flood.append(frame)
    payload = _frames(*flood)
    codes: list[int | None] = []

    async def one() -> None:
        codes.append(_goaway(await _hostile(proxy_process.port, payload)))

    async def continuation_floods() -> None:
        await _all(CONNECTIONS, one)

    counted = await _under_attack(proxy_process, continuation_floods)
    # The close may come while the client still writes: its GOAWAY can be lost to the reset.
    assert set(codes) <= {None, ErrorCodes.PROTOCOL_ERROR} and ErrorCodes.PROTOCOL_ERROR in codes
    assert counted["by_error"] == {REQUEST_ERROR: CONNECTIONS * counted["rounds"]}


async def test_shut_windows_over_many_connections(proxy_process):
    """5 connections at a time, each 50 streams of 1 MiB whose windows it never opens:
    what the proxy holds is bounded per connection, and past timeouts.client_body (1 s)
    every stream is cut with RST_STREAM CANCEL and charged to the client."""
    resets: list[dict[int, int]] = []

    async def one() -> None:
        encoder = Encoder()
        heads = [_headers(1 + 2 * i, _request_block(encoder, b"/big")) for i in range(50)]
        frames = await _hostile(
            proxy_process.port, _frames(*heads), read_s=5, until=lambda f: len(_resets(f)) == 50
        )
        resets.append(_resets(frames))

    async def shut_windows() -> None:
        await _all(5, one)

    counted = await _under_attack(proxy_process, shut_windows, seconds=1.0)
    for cut in resets:
        assert cut == dict.fromkeys(range(1, 100, 2), ErrorCodes.CANCEL), cut
    assert counted["by_error"] == {REQUEST_ERROR: 5 * 50 * counted["rounds"]}


async def test_too_many_streams_over_many_connections(proxy_process):
    """4 connections at a time, each 100 streams the origin never answers, then one more:
    GOAWAY PROTOCOL_ERROR; the 100 are the client's, and the connection once more. (400
    streams: under pool.max_connections, 512. Past it, exchanges wait for the pool, and
    forward/pool.py can leak the slot of a connect cancelled before its task first runs:
    288 slots at 8 connections, in 2 runs of 3.)"""
    codes: list[int | None] = []

    async def one() -> None:
        encoder = Encoder()
        heads = [_headers(1 + 2 * i, _request_block(encoder)) for i in range(101)]
        frames = await _hostile(
            proxy_process.port, _frames(*heads[:100]), _frames(heads[100]), pause=0.2
        )
        codes.append(_goaway(frames))

    async def too_many_streams() -> None:
        await _all(4, one)

    counted = await _under_attack(proxy_process, too_many_streams)
    assert set(codes) == {ErrorCodes.PROTOCOL_ERROR}, codes
    rounds = counted["rounds"]
    assert counted["by_error"][REQUEST_ERROR] == 4 * rounds
    # A stream whose HEADERS came in the read that broke the limit (the two writes can
    # arrive as one) was never an exchange: h2 raised before it told of it.
    assert 0 < counted["by_error"][CLIENT_CLOSED] <= 400 * rounds


async def test_stream_id_reuse_over_many_connections(proxy_process):
    """20 connections at a time: half send HEADERS on stream 1 twice (STREAM_CLOSED), half
    stream 3 then stream 1 (PROTOCOL_ERROR: ids only go up); the first request of each
    is answered, the second never forwarded."""
    codes: list[int | None] = []

    async def one(first: int) -> None:
        encoder = Encoder()
        frames = await _hostile(
            proxy_process.port,
            _frames(_headers(first, _request_block(encoder, b"/"))),
            _frames(_headers(1, _request_block(encoder, b"/"))),
            pause=0.1,
        )
        codes.append(_goaway(frames))

    async def stream_id_reuse() -> None:
        await asyncio.gather(*(one(1 + 2 * (i % 2)) for i in range(CONNECTIONS)))

    counted = await _under_attack(proxy_process, stream_id_reuse, first_requests=CONNECTIONS)
    assert set(codes) == {ErrorCodes.STREAM_CLOSED, ErrorCodes.PROTOCOL_ERROR}, codes
    assert counted["by_error"] == {REQUEST_ERROR: CONNECTIONS * counted["rounds"]}


async def test_connects_cancelled_before_they_start_give_their_pool_slots_back(
    origin_factory, proxy_factory
):
    """Eight connections each open 100 streams, then a 101st: the GOAWAY ends 800
    exchanges whose upstream connects were scheduled in the same loop turn and never ran.
    Before, each such task kept its pool slot for good (`open` 100, `connecting` 100 after
    a round, in two runs of three), until the pool refused everyone."""
    origin = await origin_factory(_answer)
    proxy = await proxy_factory(origin.url)
    pool = proxy.pool

    async def one() -> int | None:
        encoder = Encoder()
        heads = [_headers(1 + 2 * i, _request_block(encoder)) for i in range(101)]
        frames = await _hostile(proxy.port, _frames(*heads[:100]), _frames(heads[100]), pause=0.2)
        return _goaway(frames)

    for _ in range(3):
        codes = await asyncio.gather(*(one() for _ in range(8)))
        assert set(codes) == {ErrorCodes.PROTOCOL_ERROR}
        await asyncio.sleep(0.3)
        await proxy.settle()
        assert (pool.connecting, pool.busy, len(pool.waiters)) == (0, 0, 0)
        assert pool.open == sum(pool.counts())  # every slot is a live connection
