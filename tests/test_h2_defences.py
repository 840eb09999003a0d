"""HTTP/2 requests and clients the proxy must refuse without hurting anyone else: a body that
disagrees with its content-length (RFC 9113 §8.1.1) is a stream error on that stream only.

Real sockets, a real origin on 127.0.0.1; hostile frames come from h2 told not to check
what it sends."""

from __future__ import annotations

import asyncio

import pytest
from h2.errors import ErrorCodes
from hostile_support import RecordingOrigin
from test_http2 import H2Client

from proxy.diagnosis.faults import Fault

REQUEST_ERROR = Fault.HTTP_REQUEST_ERROR.value


@pytest.fixture
async def recording():
    origin = await RecordingOrigin().start()
    yield origin
    await origin.close()


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
