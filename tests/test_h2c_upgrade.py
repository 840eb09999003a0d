"""`Upgrade: h2c` on an HTTP/1.1 request is neither honoured nor forwarded (CONTRACT.md,
"HTTP/2 and gRPC"): an origin that switched protocols would carry every HTTP/2 request of
the connection past the proxy's checks, log and stats ("h2c smuggling"). The request itself
is answered over HTTP/1.1, its `HTTP2-Settings` dropped (WebSocket upgrades keep working:
tests/test_forwarding.py).
"""

from __future__ import annotations

import pytest
from hostile_support import send_raw

from support import parse_responses

H2C_REQUEST = (
    b"GET /api HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nAccept: */*\r\n\r\n"
)


@pytest.mark.parametrize("upgrade", [b"h2c", b"H2C", b"websocket, h2c"])
async def test_an_h2c_upgrade_is_answered_as_http11_and_never_reaches_the_origin(
    upgrade, recording, proxy_factory
):
    proxy = await proxy_factory(recording.url)
    request = H2C_REQUEST.replace(b"Upgrade: h2c", b"Upgrade: " + upgrade)
    data, _ = await send_raw(proxy.port, request)
    (response,), _ = parse_responses(data)
    assert response.status == 200 and response.body == b"from-app!"
    assert b"\r\nconnection: close\r\n" in data.lower()  # the parser took it as upgraded
    assert b"101" not in data.split(b"\r\n", 1)[0]
    sent = recording.received_bytes().lower()
    assert sent.startswith(b"get /api http/1.1\r\n")
    assert b"upgrade" not in sent and b"http2-settings" not in sent, sent
    assert recording.parse_errors == []
    await proxy.settle()
    assert proxy.stats.counts == {(200, "origin", None): 1}


async def test_bytes_after_a_refused_h2c_upgrade_are_never_forwarded(recording, proxy_factory):
    """A client that starts speaking HTTP/2 right after its upgrade request (the preface)
    gets its HTTP/1.1 answer and a closed connection; the origin sees one request only."""
    proxy = await proxy_factory(recording.url)
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    data, how = await send_raw(proxy.port, H2C_REQUEST + preface)
    (response,), _ = parse_responses(data)
    assert response.status == 200 and how == "eof"
    assert recording.received_bytes().lower().count(b"http/1.1\r\n") == 1
    assert b"PRI" not in recording.received_bytes()
