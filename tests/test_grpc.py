"""gRPC through Faultline, with a real grpcio client: what the client sees when the proxy
fails a call (CONTRACT.md, "HTTP/2 and gRPC": HTTP 200, application/grpc, trailers-only,
grpc-status from the table, a grpc-message that names the fault and says the proxy made it,
Proxy-Status with the token), and what the record and the stats say.

Today every upstream is HTTP/1.1, which cannot carry a gRPC call's status (trailers): the
proxy answers such a call itself, at once, instead of letting it hang or fail obscurely.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from proxy.diagnosis.faults import Fault

from support import LOOPBACK, free_port

grpc = pytest.importorskip("grpc")

CONFIG = Fault.PROXY_CONFIGURATION_ERROR.value


def _call(port: int, method: str, payload: bytes, timeout: float = 5.0):
    """One unary call with raw bytes (no generated stubs): the RpcError it ends in."""
    with grpc.insecure_channel(f"{LOOPBACK}:{port}") as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        try:
            call(payload, timeout=timeout)
        except grpc.RpcError as error:
            return error
    raise AssertionError("the call succeeded")


async def test_a_grpc_call_towards_an_http11_upstream_is_answered_unavailable_by_the_proxy(
    origin_factory, proxy_factory
):
    reached = []

    async def origin(conn) -> None:
        reached.append(await conn.read_request())

    upstream = await origin_factory(origin)
    proxy = await proxy_factory(upstream.url)
    error = await asyncio.to_thread(_call, proxy.port, "/echo.Echo/Say", b"\x00\x00\x00\x00\x00")
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    details = error.details()
    assert CONFIG in details and "(proxy)" in details and "HTTP/1.1" in details, details
    metadata = dict(error.trailing_metadata() or ()) | dict(error.initial_metadata() or ())
    assert f"error={CONFIG}" in metadata.get("proxy-status", ""), metadata
    assert reached == []  # answered at once: the origin never saw the call
    await proxy.settle()
    assert proxy.stats.counts == {(200, "proxy", CONFIG): 1}
    responses = proxy.stats.snapshot(proxy={})["responses"]
    assert responses["by_grpc_status"] == {"14": {"proxy": 1}}
    assert responses["by_protocol"] == {"http/1.1": 0, "h2": 1}
    (recent,) = proxy.stats.snapshot(proxy={})["recent_errors"]
    assert recent["error"] == CONFIG
    (line,) = proxy.access_log()
    assert (line["protocol"], line["status"], line["source"]) == ("h2", 200, "proxy")
    assert line["grpc_status"] == 14 and CONFIG in line["grpc_message"]
    assert line["error"] == CONFIG and line["layer"] == "proxy"


# -- through to a real gRPC server (an h2c:// upstream) ---------------------------------------


@pytest.fixture
def grpc_server():
    from concurrent.futures import ThreadPoolExecutor

    server = grpc.server(ThreadPoolExecutor(max_workers=8))

    def say(request: bytes, context) -> bytes:
        return b"hello " + request

    def missing(request: bytes, context) -> bytes:
        context.abort(grpc.StatusCode.NOT_FOUND, "no such greeting: ünïcode")

    def slow(request: bytes, context) -> bytes:
        time.sleep(2)
        return b"late"

    def many(request: bytes, context):
        for i in range(10_000):
            yield b"%d" % i

    def total(requests, context) -> bytes:
        return b"%d" % sum(len(r) for r in requests)

    handler = grpc.method_handlers_generic_handler(
        "echo.Echo",
        {
            "Say": grpc.unary_unary_rpc_method_handler(say),
            "Missing": grpc.unary_unary_rpc_method_handler(missing),
            "Slow": grpc.unary_unary_rpc_method_handler(slow),
            "Many": grpc.unary_stream_rpc_method_handler(many),
            "Total": grpc.stream_unary_rpc_method_handler(total),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{LOOPBACK}:0")
    server.start()
    yield port
    server.stop(None)


def _unary(port: int, method: str, payload: bytes):
    with grpc.insecure_channel(f"{LOOPBACK}:{port}") as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        return call.with_call(payload, timeout=5)


async def test_a_unary_call_goes_through_and_is_the_origins(grpc_server, proxy_factory):
    proxy = await proxy_factory(f"h2c://{LOOPBACK}:{grpc_server}")
    reply, call = await asyncio.to_thread(_unary, proxy.port, "/echo.Echo/Say", b"world")
    assert reply == b"hello world"
    metadata = dict(call.initial_metadata())
    assert "received-status=200" in metadata["proxy-status"]
    await proxy.settle()
    assert proxy.stats.counts == {(200, "origin", None): 1}
    (line,) = proxy.access_log()
    assert (line["protocol"], line["grpc_status"], line["source"]) == ("h2", 0, "origin")
    assert proxy.stats.snapshot(proxy={})["responses"]["by_grpc_status"] == {"0": {"origin": 1}}


async def test_an_application_error_is_the_origins_with_its_message(grpc_server, proxy_factory):
    proxy = await proxy_factory(f"h2c://{LOOPBACK}:{grpc_server}")
    error = await asyncio.to_thread(_call, proxy.port, "/echo.Echo/Missing", b"x")
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "no such greeting: ünïcode"
    await proxy.settle()
    (line,) = proxy.access_log()
    assert (line["grpc_status"], line["grpc_message"]) == (5, "no such greeting: ünïcode")
    assert line["source"] == "origin" and line["error"] is None
    assert proxy.stats.snapshot(proxy={})["responses"]["by_grpc_status"] == {"5": {"origin": 1}}
    (recent,) = proxy.stats.snapshot(proxy={})["recent_errors"]  # an error, though HTTP 200
    assert recent["status"] == 200
    assert (recent["grpc_status"], recent["grpc_message"]) == (5, "no such greeting: ünïcode")


async def test_a_refused_grpc_upstream_is_unavailable_made_by_the_proxy(proxy_factory):
    proxy = await proxy_factory(f"h2c://{LOOPBACK}:{free_port()}")
    error = await asyncio.to_thread(_call, proxy.port, "/echo.Echo/Say", b"x")
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    refused = Fault.CONNECTION_REFUSED.value
    assert refused in error.details() and "(proxy)" in error.details()
    await proxy.settle()
    assert proxy.stats.counts == {(200, "proxy", refused): 1}


def _stream(port: int) -> list[bytes]:
    with grpc.insecure_channel(f"{LOOPBACK}:{port}") as channel:
        call = channel.unary_stream("/echo.Echo/Many", None, None)
        return list(call(b"", timeout=30))


def _upload(port: int, parts: int) -> bytes:
    with grpc.insecure_channel(f"{LOOPBACK}:{port}") as channel:
        call = channel.stream_unary("/echo.Echo/Total", None, None)
        return call(iter([b"x" * 1000] * parts), timeout=30)


async def test_server_streaming_of_ten_thousand_messages(grpc_server, proxy_factory):
    proxy = await proxy_factory(f"h2c://{LOOPBACK}:{grpc_server}")
    messages = await asyncio.to_thread(_stream, proxy.port)
    assert messages == [b"%d" % i for i in range(10_000)]
    await proxy.settle()
    (line,) = proxy.access_log()
    assert (line["grpc_status"], line["source"], line["status"]) == (0, "origin", 200)


async def test_client_streaming(grpc_server, proxy_factory):
    proxy = await proxy_factory(f"h2c://{LOOPBACK}:{grpc_server}")
    assert await asyncio.to_thread(_upload, proxy.port, 500) == b"500000"
    await proxy.settle()
    (line,) = proxy.access_log()
    assert line["grpc_status"] == 0 and line["bytes_in"] > 500_000


async def test_a_client_deadline_is_told_as_it_happened(grpc_server, proxy_factory):
    """The client's deadline (0.5 s, sent as grpc-timeout) passes while the server takes
    2 s. The client sees DEADLINE_EXCEEDED. Client, proxy and server all keep that deadline,
    so who ended the call is a race the record tells as it happened: the client cancelling
    first (499, CANCELLED), the proxy answering DEADLINE_EXCEEDED itself (its timer runs
    from the request's arrival), or the server's gRPC library doing so (the origin's
    answer, grpc_status 4)."""

    def call() -> grpc.RpcError:
        with grpc.insecure_channel(f"{LOOPBACK}:{proxy.port}") as channel:
            slow = channel.unary_unary("/echo.Echo/Slow", None, None)
            try:
                slow(b"", timeout=0.5)
            except grpc.RpcError as error:
                return error
        raise AssertionError("the call succeeded")

    proxy = await proxy_factory(f"h2c://{LOOPBACK}:{grpc_server}")
    error = await asyncio.to_thread(call)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await proxy.settle()
    (line,) = proxy.access_log()
    closed = Fault.CLIENT_CLOSED_REQUEST.value
    outcome = (line["source"], line["status"], line["error"], line["grpc_status"])
    by_proxy = ("proxy", 200, Fault.HTTP_RESPONSE_TIMEOUT.value, 4)
    assert outcome in (("origin", 200, None, 4), ("client", 499, closed, 1), by_proxy), outcome


# -- the caller's grpc-timeout, kept by the proxy ----------------------------------------------

GRPC_HEAD = (
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
    (b"grpc-timeout", b"300m"),
)
TIMEOUT = Fault.HTTP_RESPONSE_TIMEOUT.value


async def test_the_proxy_keeps_the_callers_grpc_timeout_before_the_head(h2_server, proxy_factory):
    """An origin that ignores grpc-timeout and holds the call 3 s: at 300 ms the proxy ends
    the call itself, DEADLINE_EXCEEDED, trailers-only, and the record says the proxy did."""
    from test_http2 import H2Client

    async def hold(conn, sid, head, body) -> None:
        await asyncio.sleep(3)
        await conn.respond(sid, 200, b"late")

    origin = await h2_server(hold)
    proxy = await proxy_factory(origin.url)
    client = await H2Client.connect(proxy.port)
    start = time.monotonic()
    sid = client.request("/echo.Echo/Slow", "POST", b"\x00\x00\x00\x00\x00", GRPC_HEAD)
    await client.send()
    await client.until(lambda: sid in client.ended)
    assert time.monotonic() - start < 2.5  # not the origin's 3 s
    head = client.heads[sid]
    assert head[b":status"] == b"200" and head[b"content-type"] == b"application/grpc"
    assert head[b"grpc-status"] == b"4"  # trailers-only: the status is in the one HEADERS
    assert b"(proxy)" in head[b"grpc-message"] and TIMEOUT.encode() in head[b"grpc-message"]
    assert b"300ms (grpc-timeout)" in head[b"grpc-message"]
    assert f"error={TIMEOUT}".encode() in head[b"proxy-status"]
    client.close()
    await proxy.settle()
    (line,) = proxy.access_log()
    outcome = (line["source"], line["status"], line["error"], line["grpc_status"])
    assert outcome == ("proxy", 200, TIMEOUT, 4)
    assert proxy.stats.snapshot(proxy={})["responses"]["by_grpc_status"] == {"4": {"proxy": 1}}
    await asyncio.sleep(0.2)
    assert origin.resets  # the origin's stream was cancelled, not left running


async def test_the_proxy_keeps_the_callers_grpc_timeout_mid_stream(h2_server, proxy_factory):
    """The origin streams one message and stalls: at 300 ms the proxy ends the stream with
    grpc-status 4 in trailers (a clean gRPC end the client can read), not a reset."""
    from test_http2 import H2Client

    async def stall(conn, sid, head, body) -> None:
        fields = [(b":status", b"200"), (b"content-type", b"application/grpc")]
        conn.h2.send_headers(sid, fields)
        conn.h2.send_data(sid, b"\x00\x00\x00\x00\x02hi")
        conn.flush()
        await asyncio.sleep(3)

    origin = await h2_server(stall)
    proxy = await proxy_factory(origin.url)
    client = await H2Client.connect(proxy.port)
    sid = client.request("/echo.Echo/Many", "POST", b"\x00\x00\x00\x00\x00", GRPC_HEAD)
    await client.send()
    trailers: list = []
    original = client._event

    def event(ev) -> None:
        if type(ev).__name__ == "TrailersReceived":
            trailers.append(dict(ev.headers))
        original(ev)

    client._event = event
    await client.until(lambda: sid in client.ended or sid in client.reset)
    assert sid in client.ended and sid not in client.reset
    assert bytes(client.bodies[sid]) == b"\x00\x00\x00\x00\x02hi"
    (fields,) = trailers
    assert fields[b"grpc-status"] == b"4" and b"(proxy)" in fields[b"grpc-message"]
    client.close()
    await proxy.settle()
    (line,) = proxy.access_log()
    outcome = (line["source"], line["status"], line["error"], line["grpc_status"])
    assert outcome == ("proxy", 200, TIMEOUT, 4)
    assert "while the response was streamed" in line["details"]


async def test_fifty_concurrent_calls_on_one_channel(grpc_server, proxy_factory):
    def calls() -> list[bytes]:
        with grpc.insecure_channel(f"{LOOPBACK}:{proxy.port}") as channel:
            say = channel.unary_unary("/echo.Echo/Say", None, None)
            futures = [say.future(b"%d" % i, timeout=10) for i in range(50)]
            return [future.result() for future in futures]

    proxy = await proxy_factory(f"h2c://{LOOPBACK}:{grpc_server}")
    assert await asyncio.to_thread(calls) == [b"hello %d" % i for i in range(50)]
    await proxy.settle()
    assert proxy.stats.counts == {(200, "origin", None): 50}
    assert proxy.stats.snapshot(proxy={})["responses"]["by_grpc_status"] == {"0": {"origin": 50}}


async def test_a_server_killed_mid_stream_is_the_upstreams_and_the_client_sees_a_cut(
    proxy_factory,
):
    """The server dies after some of its stream: the client sees the call fail (never a
    clean end), and the record names the upstream and the cut, not the client."""
    from concurrent.futures import ThreadPoolExecutor

    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    started = __import__("threading").Event()

    def many(request: bytes, context):
        for i in range(1_000_000):
            if i == 100:
                started.set()
            yield b"%d" % i
            time.sleep(0.0005)

    handler = grpc.method_handlers_generic_handler(
        "echo.Echo", {"Many": grpc.unary_stream_rpc_method_handler(many)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{LOOPBACK}:0")
    server.start()
    proxy = await proxy_factory(f"h2c://{LOOPBACK}:{port}")

    def call() -> tuple[int, grpc.RpcError | None]:
        received = 0
        with grpc.insecure_channel(f"{LOOPBACK}:{proxy.port}") as channel:
            stream = channel.unary_stream("/echo.Echo/Many", None, None)
            try:
                for _ in stream(b"", timeout=20):
                    received += 1
            except grpc.RpcError as error:
                return received, error
        return received, None

    task = asyncio.create_task(asyncio.to_thread(call))
    await asyncio.to_thread(started.wait, 10)
    server.stop(None)  # the server goes away mid-stream
    received, error = await task
    assert error is not None and received >= 100
    assert error.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE)
    await proxy.settle()
    (line,) = proxy.access_log()
    assert line["source"] == "origin" and line["layer"] == "upstream"
    assert line["error"] in ("http_response_incomplete", "connection_terminated"), line


async def test_a_non_grpc_answer_to_a_grpc_call_passes_through_with_its_hop(proxy_factory):
    """Something behind the origin (here an AWS ALB, by its Server field) answers a gRPC
    call with an HTML 502: the status passes through as received, the record carries the
    gRPC code a client makes of it (14) and the hop that made it."""
    from test_http2 import H2Origin

    page = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
    alb = [(b"server", b"awselb/2.0"), (b"content-type", b"text/html")]
    origin = await H2Origin(lambda path: (502, page, alb)).start()
    try:
        proxy = await proxy_factory(origin.url)
        error = await asyncio.to_thread(_call, proxy.port, "/echo.Echo/Say", b"x")
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "502" in error.details()
        await proxy.settle()
        (line,) = proxy.access_log()
        assert (line["status"], line["source"], line["error"]) == (502, "origin", None)
        assert line["grpc_status"] == 14 and line["hop"] == "aws-alb"
    finally:
        await origin.close()


@pytest.mark.parametrize(
    ("value", "ns"),
    [
        (b"300m", 300_000_000),
        (b" 2S", 2_000_000_000),
        (b"1H", 3_600_000_000_000),
        (b"99999999n", 99_999_999),
        (b"5u", 5_000),
        (b"123456789m", None),  # nine digits: malformed
        (b"10", None),
        (b"m", None),
        (b"-1S", None),
        (b"1s", None),  # units are case-sensitive: s is not a unit
        (b"", None),
    ],
)
def test_grpc_timeout_values(value: bytes, ns: int | None) -> None:
    from proxy.diagnosis.grpc import timeout_ns

    assert timeout_ns(value) == ns
