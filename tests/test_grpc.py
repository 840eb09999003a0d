"""gRPC through Faultline, with a real grpcio client: what the client sees when the proxy
fails a call (CONTRACT.md, "HTTP/2 and gRPC": HTTP 200, application/grpc, trailers-only,
grpc-status from the table, a grpc-message that names the fault and says the proxy made it,
Proxy-Status with the token), and what the record and the stats say.

Today every upstream is HTTP/1.1, which cannot carry a gRPC call's status (trailers): the
proxy answers such a call itself, at once, instead of letting it hang or fail obscurely.
"""

from __future__ import annotations

import asyncio

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

    handler = grpc.method_handlers_generic_handler(
        "echo.Echo",
        {
            "Say": grpc.unary_unary_rpc_method_handler(say),
            "Missing": grpc.unary_unary_rpc_method_handler(missing),
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


async def test_a_refused_grpc_upstream_is_unavailable_made_by_the_proxy(proxy_factory):
    proxy = await proxy_factory(f"h2c://{LOOPBACK}:{free_port()}")
    error = await asyncio.to_thread(_call, proxy.port, "/echo.Echo/Say", b"x")
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    refused = Fault.CONNECTION_REFUSED.value
    assert refused in error.details() and "(proxy)" in error.details()
    await proxy.settle()
    assert proxy.stats.counts == {(200, "proxy", refused): 1}
