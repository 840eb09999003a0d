"""The header rules of proxy/http1/headers.py as a client and an origin see them, over real
sockets on 127.0.0.1: the origin's Connection never reaches a keep-alive client, the origin's own
X-Request-Id and Via, another proxy's Via (forwarded) against our own (a loop), every
hop-by-hop name both ways with its near misses, the header-value guards at each byte
boundary, and every limit of the header path at its boundary. The pure rules (safe_value,
sf_string, ms_text, server_timing, prefers_html) are checked byte by byte without a network.

Each test here was shown to fail with a hand-made mutation of the rule it guards (flipped
comparison, dropped table member, constant off by one); mutmut's measurement of these
modules, and every mutant left alive with why, is in tests/MUTATION.md.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hostile_support import Received, RecordingOrigin, ResponseReader, send_raw

from proxy.base.text import MS_TABLE, MS_TABLE_SIZE, http_date, ms_text
from proxy.forward.fields import (
    proxy_status_error,
    safe_value,
    server_timing,
    sf_string,
    valid_request_id,
)
from proxy.http1.headers import CONNECTION_OPTIONS, HOP_BY_HOP, HeaderPolicy
from proxy.replies import prefers_html

from support import LOOPBACK, parse_responses, proxy_status_members

Headers = list[tuple[bytes, bytes]]
DATE = b"Date: Sun, 06 Nov 1994 08:49:37 GMT\r\n"
IMF_FIXDATE = re.compile(rb"^[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT$")


def values(headers: Headers, name: bytes) -> list[bytes]:
    """Every value of `name`, one per header line, in order."""
    return [v for k, v in headers if k.lower() == name]


def replying(reply: bytes | Callable[[Received], bytes], *, close: bool = False):
    """An origin `respond` that writes `reply` (bytes, or made from the request) and, with
    `close`, closes its connection after it (what an origin saying Connection: close does)."""

    def respond(request: Received, conn) -> None:
        conn.transport.write(reply(request) if callable(reply) else reply)
        if close:
            conn.transport.close()

    return respond


@pytest.fixture
async def origins():
    """Start RecordingOrigins in this test's loop; all are closed at the end."""
    started: list[RecordingOrigin] = []

    async def start(respond, **kwargs) -> RecordingOrigin:
        origin = await RecordingOrigin(respond=respond, **kwargs).start()
        started.append(origin)
        return origin

    yield start
    for origin in started:
        await origin.close()


async def keep_alive_exchange(
    port: int, requests: list[bytes], then: bytes | None = b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n"
) -> list[tuple[int, Headers, bytes]]:
    """Send `requests` pipelined in one write and read their responses; then, on the same
    connection, send `then` and read its response too (the connection must have stayed
    open). Every response is parsed by llhttp, strictly."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        responses = ResponseReader(reader)
        writer.write(b"".join(requests))
        got = [await responses.next(5) for _ in requests]
        if then is not None:
            writer.write(then)
            got.append(await responses.next(5))
        return got
    finally:
        writer.close()


def get(target: bytes = b"/", extra: bytes = b"") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n" + extra + b"\r\n"


# -- the origin's Connection never reaches a keep-alive client --------------------------------


@dataclass(frozen=True)
class ConnectionCase:
    id: str
    head: bytes  # the origin's header lines, after the status line
    body: bytes = b"ok"
    closes: bool = False  # the origin closes its connection after answering
    chunked: bool = False
    dropped: tuple[bytes, ...] = ()  # more names the client must not get
    kept: tuple[tuple[bytes, bytes], ...] = ((b"x-after", b"1"),)
    xfail: str | None = None


CONNECTION_CASES = [
    # The common head (only Content-Length and one plain Connection): the fast path.
    ConnectionCase(
        "close", b"Content-Length: 2\r\nConnection: close\r\nX-After: 1\r\n", closes=True
    ),
    ConnectionCase(
        "close-lower-case",
        b"content-length: 2\r\nconnection: close\r\nX-After: 1\r\n",
        closes=True,
    ),
    ConnectionCase(
        "close-first-line", b"Connection: close\r\nContent-Length: 2\r\nX-After: 1\r\n", closes=True
    ),
    ConnectionCase(
        "close-no-space", b"Content-Length: 2\r\nConnection:close\r\nX-After: 1\r\n", closes=True
    ),
    ConnectionCase("keep-alive", b"Content-Length: 2\r\nConnection: keep-alive\r\nX-After: 1\r\n"),
    ConnectionCase(
        "keep-alive-then-close",
        b"Connection: keep-alive\r\nContent-Length: 2\r\nConnection: close\r\nX-After: 1\r\n",
        closes=True,
    ),
    # Not the common head: the full scan.
    ConnectionCase(
        "close-chunked",
        b"Transfer-Encoding: chunked\r\nConnection: close\r\nX-After: 1\r\n",
        body=b"2\r\nok\r\n0\r\n\r\n",
        closes=True,
        chunked=True,
    ),
    ConnectionCase(
        "close-beside-via",
        b"Content-Length: 2\r\nVia: 1.1 origin-proxy\r\nConnection: close\r\nX-After: 1\r\n",
        closes=True,
    ),
    ConnectionCase(
        "close-nominating",
        b"Content-Length: 2\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\nX-After: 1\r\n",
        closes=True,
        dropped=(b"x-hop",),
    ),
    ConnectionCase(
        "two-nominating-lines",
        b"X-A: 1\r\nConnection: X-A\r\nContent-Length: 2\r\nConnection: x-b\r\nX-B: 2\r\n"
        b"X-After: 1\r\n",
        dropped=(b"x-a", b"x-b"),
    ),
    ConnectionCase(
        "nominating-list-without-spaces",
        b"Content-Length: 2\r\nConnection: X-A,X-B\r\nX-A: 1\r\nX-B: 2\r\nX-After: 1\r\n",
        dropped=(b"x-a", b"x-b"),
    ),
    ConnectionCase(
        "nominated-value-with-colons",
        b"Content-Length: 2\r\nConnection: X-Hop\r\nX-Hop: http://a:1/\r\nX-After: 1\r\n",
        dropped=(b"x-hop",),
    ),
    ConnectionCase(
        "nominating-beside-via",
        b"Via: 1.0 a\r\nContent-Length: 2\r\nConnection: X-Hop\r\nX-Hop: 1\r\nX-After: 1\r\n",
        dropped=(b"x-hop",),
    ),
    # Near misses of the name: end-to-end fields that must pass as the origin wrote them.
    ConnectionCase(
        "connection-near-miss",
        b"Content-Length: 2\r\nConnection-Info: 1\r\nX-After: 1\r\n",
        kept=((b"connection-info", b"1"), (b"x-after", b"1")),
    ),
    ConnectionCase(
        "connection-near-miss-valued-close",
        b"Content-Length: 2\r\nConnection-Info: close\r\nX-After: 1\r\n",
        kept=((b"connection-info", b"close"), (b"x-after", b"1")),
    ),
]


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)])
        if c.xfail
        else pytest.param(c, id=c.id)
        for c in CONNECTION_CASES
    ],
)
async def test_origin_connection_never_reaches_a_pipelining_client(case, origins, proxy_factory):
    reply = b"HTTP/1.1 200 OK\r\n" + DATE + case.head + b"\r\n" + case.body
    origin = await origins(replying(reply, close=case.closes))
    proxy = await proxy_factory(origin.url)
    got = await keep_alive_exchange(proxy.port, [get(b"/1"), get(b"/2")])
    assert [status for status, _, _ in got] == [200, 200, 200]
    for _, headers, body in got:
        names = [k.lower() for k, _ in headers]
        assert b"connection" not in names, headers
        for name in case.dropped:
            assert name not in names, (name, headers)
        for name, value in case.kept:
            assert values(headers, name) == [value], (name, headers)
        assert body == b"ok"
        if case.chunked:
            assert (values(headers, b"transfer-encoding"), b"content-length" in names) == (
                [b"chunked"],
                False,
            )
        else:  # a Content-Length response keeps its length, never re-chunked
            assert values(headers, b"content-length") == [b"2"], headers
            assert b"transfer-encoding" not in names
    assert origin.accepted == (3 if case.closes else 1)


# -- the origin's own X-Request-Id, Via and Proxy-Status --------------------------------------

ORIGIN_OWN = {
    "request-id-first": (b"X-Request-Id: origin-123\r\nContent-Length: 2\r\n", None),
    "request-id-after-length": (b"Content-Length: 2\r\nX-Request-Id: origin-123\r\n", None),
    "via-first": (b"Via: 1.1 origin-proxy\r\nContent-Length: 2\r\n", b"1.1 origin-proxy"),
    "both-after-length": (
        b"Content-Length: 2\r\nVia: 1.1 origin-proxy\r\nX-Request-Id: origin-123\r\nX-After: 1\r\n",
        b"1.1 origin-proxy",
    ),
    "two-via-lines": (
        b"Via: 1.0 a\r\nContent-Length: 2\r\nX-Request-Id: origin-123\r\nVia: 1.1 b\r\n",
        b"1.0 a, 1.1 b",
    ),
}


@pytest.mark.parametrize(("lines", "origin_via"), ORIGIN_OWN.values(), ids=ORIGIN_OWN.keys())
@pytest.mark.parametrize("client_id", [b"client-7", None], ids=["client-id", "made-id"])
async def test_origin_request_id_and_via(lines, origin_via, client_id, origins, proxy_factory):
    """The client gets exactly one X-Request-Id (the exchange's, never the origin's) and one
    Via: the origin's chain with ours appended."""
    origin = await origins(replying(b"HTTP/1.1 200 OK\r\n" + DATE + lines + b"\r\nok"))
    proxy = await proxy_factory(origin.url)
    extra = b"X-Request-Id: " + client_id + b"\r\n" if client_id else b""
    ((status, headers, body),) = await keep_alive_exchange(proxy.port, [get(extra=extra)], None)
    record = await proxy.last_log()
    assert (status, body) == (200, b"ok")
    assert values(headers, b"x-request-id") == [record["request_id"].encode()]
    if client_id:
        assert record["request_id"] == client_id.decode()
    want_via = origin_via + b", 1.1 faultline" if origin_via else b"1.1 faultline"
    assert values(headers, b"via") == [want_via]
    assert values(headers, b"content-length") == [b"2"]
    assert b"transfer-encoding" not in [k.lower() for k, _ in headers]
    if b"X-After" in lines:
        assert values(headers, b"x-after") == [b"1"]


async def test_origin_via_and_proxy_status_pass_alone_when_ours_are_off(origins, proxy_factory):
    """headers.via and headers.proxy_status off: the origin's own lines still reach the
    client, as one list each, and nothing of ours is added."""
    origin = await origins(
        replying(
            b"HTTP/1.1 200 OK\r\n" + DATE + b"Proxy-Status: edge; error=dns_timeout\r\n"
            b"Via: 1.0 a\r\nContent-Length: 2\r\nProxy-Status: lb; received-status=200\r\n"
            b"Via: 1.1 b\r\n\r\nok"
        )
    )
    proxy = await proxy_factory(origin.url, **{"headers.via": False, "headers.proxy_status": False})
    ((status, headers, _),) = await keep_alive_exchange(proxy.port, [get()], None)
    assert status == 200
    assert values(headers, b"via") == [b"1.0 a, 1.1 b"]
    assert values(headers, b"proxy-status") == [
        b"edge; error=dns_timeout",
        b"lb; received-status=200",
    ]


async def test_nothing_of_ours_is_added_when_via_and_proxy_status_are_off(origins, proxy_factory):
    origin = await origins(replying(b"HTTP/1.1 200 OK\r\n" + DATE + b"Content-Length: 2\r\n\r\nok"))
    proxy = await proxy_factory(
        origin.url,
        **{"headers.via": False, "headers.proxy_status": False, "headers.server_timing": False},
    )
    ((status, headers, body),) = await keep_alive_exchange(proxy.port, [get()], None)
    assert (status, body) == (200, b"ok")
    assert [k for k, _ in headers] == [b"Date", b"Content-Length", b"X-Request-Id"]


async def test_origin_proxy_status_members_come_before_ours(origins, proxy_factory):
    origin = await origins(
        replying(
            b"HTTP/1.1 200 OK\r\n" + DATE + b"Proxy-Status: edge; error=dns_timeout\r\n"
            b"Content-Length: 2\r\nProxy-Status: lb; received-status=200\r\n\r\nok"
        )
    )
    proxy = await proxy_factory(origin.url)
    ((status, headers, _),) = await keep_alive_exchange(proxy.port, [get()], None)
    assert status == 200
    (line,) = values(headers, b"proxy-status")
    assert proxy_status_members(line.decode()) == [
        "edge; error=dns_timeout",
        "lb; received-status=200",
        f'faultline; received-status=200; next-hop="{LOOPBACK}:{origin.port}"',
    ]


# -- another proxy's Via is forwarded; only our own token is a loop -------------------------


async def test_another_proxys_via_is_forwarded_and_only_our_own_is_a_loop(origins, proxy_factory):
    origin = await origins(replying(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    proxy = await proxy_factory(origin.url)
    # No Via, another proxy's, another Faultline instance's: all forwarded.
    others = [
        b"",
        b"Via: 1.1 other-proxy\r\n",
        b"Via: 1.0 a\r\nVia: 1.1 faultline (faultline 0123456789abcdef)\r\n",
    ]
    got = await keep_alive_exchange(proxy.port, [get(b"/%d" % i, v) for i, v in enumerate(others)])
    assert [status for status, _, _ in got] == [200] * 4
    (ours,) = {r.header(b"via") for r in origin.requests[:1]}
    assert re.fullmatch(rb"1\.1 faultline \(faultline [0-9a-f]{8,}\)", ours), ours
    assert [r.header(b"via") for r in origin.requests[1:3]] == [
        b"1.1 other-proxy, " + ours,
        b"1.0 a, 1.1 faultline (faultline 0123456789abcdef), " + ours,
    ]
    # Our own token, alone or after another proxy's: a loop, never forwarded.
    forwarded = len(origin.requests)
    for via in (ours, b"1.1 other-proxy, " + ours):
        data, _ = await send_raw(
            proxy.port, get(extra=b"Via: " + via + b"\r\nConnection: close\r\n")
        )
        (response,), _ = parse_responses(data)
        assert response.status == 502
        assert "error=proxy_loop_detected" in response.header("Proxy-Status")
    assert len(origin.requests) == forwarded
    record = await proxy.last_log()
    assert (record["error"], record["source"]) == ("proxy_loop_detected", "proxy")


@pytest.mark.parametrize("trusted", [False, True], ids=["untrusted", "trusted"])
async def test_forwarded_fields_when_the_client_sends_none(trusted, origins, proxy_factory):
    """A client (trusted or not) without X-Forwarded-*: the origin gets the proxy's view."""
    origin = await origins(replying(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    proxy = await proxy_factory(
        origin.url, trusted_proxies=["127.0.0.1"] if trusted else ["10.0.0.0/8"]
    )
    await keep_alive_exchange(proxy.port, [get()], None)
    (received,) = origin.requests
    assert received.header(b"x-forwarded-for") == b"127.0.0.1"
    assert received.header(b"x-forwarded-proto") == b"http"
    assert received.header(b"x-forwarded-host") == b"a"


# -- every hop-by-hop name, both ways, and its near misses ------------------------------------

# RFC 9110 §7.6.1 (Connection, Proxy-Connection, Keep-Alive, TE, Transfer-Encoding, Upgrade)
# plus the fields the module documents as one hop's: Trailer, Proxy-Authorization and
# Proxy-Authenticate.
EXPECTED_HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"proxy-authorization",
    b"proxy-authenticate",
}


def test_the_hop_by_hop_table_is_exactly_the_rfc_set():
    assert set(HOP_BY_HOP) == EXPECTED_HOP_BY_HOP
    assert set(CONNECTION_OPTIONS) == {b"close", b"keep-alive", b"upgrade"}


# One line per name as a client would send it (a name added to HOP_BY_HOP without a row here
# fails below, by KeyError).
REQUEST_LINES = {
    b"connection": b"Connection: Keep-Alive\r\n",
    b"keep-alive": b"Keep-Alive: timeout=5\r\n",
    b"proxy-connection": b"Proxy-Connection: keep-alive\r\n",
    b"te": b"TE: trailers\r\n",
    b"trailer": b"Trailer: X-Checksum\r\n",
    b"transfer-encoding": b"Transfer-Encoding: Chunked\r\n",  # with a chunked body
    b"upgrade": b"Upgrade: websocket\r\n",  # not nominated by Connection: no upgrade
    b"proxy-authorization": b"Proxy-Authorization: Basic eA==\r\n",
    b"proxy-authenticate": b"Proxy-Authenticate: Basic\r\n",
}
RESPONSE_LINES = {
    b"connection": b"Connection: close\r\n",
    b"keep-alive": b"Keep-Alive: timeout=5, max=100\r\n",
    b"proxy-connection": b"Proxy-Connection: keep-alive\r\n",
    b"te": b"TE: trailers\r\n",
    b"trailer": b"Trailer: X-Checksum\r\n",
    b"transfer-encoding": b"Transfer-Encoding: Chunked\r\n",  # with a chunked body
    b"upgrade": b"Upgrade: h2c\r\n",  # on a 200: an offer, for this hop only
    b"proxy-authorization": b"Proxy-Authorization: Basic eA==\r\n",
    b"proxy-authenticate": b"Proxy-Authenticate: Basic realm=x\r\n",
}
NEAR_MISSES = [
    b"X-Keep-Alive: 1",
    b"Keep-Alives: 1",
    b"Trailers-Foo: 1",
    b"Te-Extra: 1",
    b"Tea: 1",
    b"Connection-Info: 1",
    b"X-Connection: close",
    b"Upgrade-Insecure-Requests: 1",
    b"Proxy-Authorization-Hint: 1",
    b"Proxy-Connections: 1",
    b"Transfer-Encodings: 1",
]


# Both the table and the literal set: a name dropped from HOP_BY_HOP is still sent (and
# reaches the other side), a name added to it has no line here (KeyError).
HOP_NAMES = sorted(HOP_BY_HOP | EXPECTED_HOP_BY_HOP)


@pytest.mark.parametrize("name", HOP_NAMES, ids=lambda n: n.decode())
async def test_each_hop_by_hop_request_field_is_dropped(name, origins, proxy_factory):
    origin = await origins(replying(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    proxy = await proxy_factory(origin.url)
    line = REQUEST_LINES[name]
    if name == b"transfer-encoding":
        request = b"POST / HTTP/1.1\r\nHost: a\r\n" + line + b"\r\n2\r\nhi\r\n0\r\n\r\n"
    else:
        request = get(extra=line + b"X-After: 1\r\n")
    ((status, _, _),) = await keep_alive_exchange(proxy.port, [request], None)
    assert status == 200
    assert origin.parse_errors == []
    (received,) = origin.requests
    sent = origin.received_bytes()
    assert line not in sent, sent  # the client's own line never reaches the origin
    if name == b"transfer-encoding":  # the proxy frames the body itself, once
        assert (received.header(b"transfer-encoding"), received.body) == (b"chunked", b"hi")
        assert received.names().count(b"transfer-encoding") == 1
    else:
        assert name not in received.names(), received.headers
        assert received.header(b"x-after") == b"1"


@pytest.mark.parametrize("name", HOP_NAMES, ids=lambda n: n.decode())
async def test_each_hop_by_hop_response_field_is_dropped(name, origins, proxy_factory):
    """The field first (right after the status line), then framing, then an end-to-end
    field that must arrive intact."""
    line = RESPONSE_LINES[name]
    if name == b"transfer-encoding":
        reply = b"HTTP/1.1 200 OK\r\n" + line + b"X-After: 1\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    else:
        reply = b"HTTP/1.1 200 OK\r\n" + line + b"Content-Length: 2\r\nX-After: 1\r\n\r\nok"
    origin = await origins(replying(reply, close=name == b"connection"))
    proxy = await proxy_factory(origin.url)
    got = await keep_alive_exchange(proxy.port, [get(), get()])
    for status, headers, body in got:
        assert (status, body) == (200, b"ok")
        assert values(headers, b"x-after") == [b"1"]
        if name == b"transfer-encoding":  # re-chunked by the proxy: one line, its own
            assert values(headers, b"transfer-encoding") == [b"chunked"], headers
        else:
            assert name not in [k.lower() for k, _ in headers], headers
    # A chunked response is still delimited by its framing: the origin connection is reused.
    assert origin.accepted == (3 if name == b"connection" else 1)


@pytest.mark.parametrize(
    ("codings", "sent", "reused"),
    [
        (b"gzip, br, chunked", b"gzip, br, chunked", True),
        (b"gzip,chunked", b"gzip, chunked", True),
        (b"gzip", b"gzip, chunked", False),  # no chunked: the body ends when the origin closes
        (None, b"chunked", False),  # no framing at all: the same, on the common-head path
    ],
    ids=["two-codings-chunked", "no-space-chunked", "close-delimited", "no-framing"],
)
async def test_transfer_codings_the_origin_applied_reach_the_client(
    codings, sent, reused, origins, proxy_factory
):
    framed = codings is not None and codings.endswith(b"chunked")
    body = b"2\r\nzz\r\n0\r\n\r\n" if framed else b"zz"
    te = b"Transfer-Encoding: " + codings + b"\r\n" if codings else b""
    reply = b"HTTP/1.1 200 OK\r\n" + DATE + te + b"\r\n" + body
    origin = await origins(replying(reply, close=not framed))
    proxy = await proxy_factory(origin.url)
    got = await keep_alive_exchange(proxy.port, [get(), get()])
    for status, headers, got_body in got:
        assert (status, got_body) == (200, b"zz")
        assert values(headers, b"transfer-encoding") == [sent]
    assert origin.accepted == (1 if reused else 3)


async def test_near_miss_names_pass_both_ways(origins, proxy_factory):
    lines = b"".join(m + b"\r\n" for m in NEAR_MISSES)
    origin = await origins(
        replying(b"HTTP/1.1 200 OK\r\n" + lines + b"Content-Length: 2\r\n" + lines + b"\r\nok")
    )
    proxy = await proxy_factory(origin.url)
    ((status, headers, _),) = await keep_alive_exchange(proxy.port, [get(extra=lines)], None)
    assert status == 200
    (received,) = origin.requests
    for miss in NEAR_MISSES:
        name, _, value = miss.partition(b": ")
        assert received.header(name) == value, miss
        assert values(headers, name.lower()) == [value, value], miss


# -- the header-value guards, byte by byte ----------------------------------------------------

# The bytes no value Faultline writes may hold: C0 controls but TAB, and DEL.
CONTROL = set(range(0x00, 0x09)) | set(range(0x0A, 0x20)) | {0x7F}


def test_safe_value_refuses_exactly_the_control_bytes():
    refused = set()
    for byte in range(256):
        value = b"a" + bytes([byte]) + b"b"
        try:
            assert safe_value(value) == value
        except ValueError:
            refused.add(byte)
    assert refused == CONTROL
    with pytest.raises(ValueError, match="control characters"):
        safe_value(b"a\nb")
    # The named boundaries, for the reader: LF, CR, NUL and DEL refused; TAB, SP, ~, 0x80 pass.
    assert {0x0A, 0x0D, 0x00, 0x7F} <= refused and not {0x09, 0x20, 0x7E, 0x80} & refused


def test_sf_string_keeps_printable_ascii_and_escapes_the_rest():
    for code in range(256):
        text = "a" + chr(code) + "b"
        want = text if 0x20 <= code <= 0x7E else "a?b"
        want = want.replace("\\", "\\\\").replace('"', '\\"')
        assert sf_string(text) == '"' + want + '"', hex(code)
    assert sf_string('say "\\n"') == '"say \\"\\\\n\\""'


def test_a_proxy_status_member_is_built_and_capped():
    member = proxy_status_error(
        "faultline", "dns_error", "x" * 299 + "yz", "db:5432", {"rcode": "NXDOMAIN"}
    )
    assert member == (
        b'faultline; error=dns_error; next-hop="db:5432"; rcode="NXDOMAIN"; details="'
        + b"x" * 299
        + b'y"'
    )
    assert proxy_status_error("p", "t", None, None) == b"p; error=t"
    assert proxy_status_error("p", "t", "", "") == b"p; error=t"


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        pytest.param(b"a" * 200, True, id="200-chars"),
        pytest.param(b"a" * 201, False, id="201-chars"),
        pytest.param(b"", False, id="empty"),
        pytest.param(b"Az09._:@/+=-", True, id="every-allowed-kind"),
        *(
            pytest.param(b"a" + bytes([c]) + b"b", False, id=f"byte-{c:02x}")
            for c in b" ,;\"'<>\\\t\x7f\x80"
        ),
    ],
)
def test_request_id_validity_at_its_boundaries(value, valid):
    assert valid_request_id(value) is valid


# The reason-phrase bytes llhttp lets through and the proxy must not pass on (LF and CR end
# the line and never reach it).
REASON_CONTROL = sorted(CONTROL - {0x0A, 0x0D})
REASON_PLAIN = [0x09, 0x20, 0x7E, 0x80, 0xFF]


async def test_control_bytes_in_a_reason_phrase_never_reach_the_client(origins, proxy_factory):
    def reply(request: Received) -> bytes:
        byte = bytes([int(request.target[1:], 16)])
        return b"HTTP/1.1 200 O" + byte + b"K\r\n" + DATE + b"Content-Length: 2\r\n\r\nok"

    origin = await origins(replying(reply))
    proxy = await proxy_factory(origin.url)
    reader, writer = await asyncio.open_connection(LOOPBACK, proxy.port)
    try:
        for code in REASON_CONTROL + REASON_PLAIN:
            writer.write(get(b"/%02x" % code))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert await reader.readexactly(2) == b"ok"
            status_line = head.partition(b"\r\n")[0]
            if code in CONTROL:
                assert status_line == b"HTTP/1.1 200 Faultline-Sanitised", hex(code)
            else:
                assert status_line == b"HTTP/1.1 200 O" + bytes([code]) + b"K", hex(code)
    finally:
        writer.close()


def test_the_reason_phrase_guard_byte_by_byte():
    policy = HeaderPolicy(
        proxy_name="faultline",
        instance_id="0123456789abcdef",
        upstream_authority="127.0.0.1:1",
        proxy_status=False,
        server_timing=False,
        forwarded=True,
        via=False,
    )
    sanitised = set()
    for code in set(range(256)) - {0x0A, 0x0D}:
        head = b"HTTP/1.1 404 N" + bytes([code]) + b"t\r\n" + DATE
        prefix = policy.origin_head(head, 404).prefix
        if prefix.startswith(b"HTTP/1.1 404 Faultline-Sanitised\r\nDate: "):
            sanitised.add(code)
        else:
            assert prefix.startswith(head), hex(code)
    assert sanitised == CONTROL - {0x0A, 0x0D}


@pytest.mark.parametrize(
    ("line", "forwarded"),
    [
        (b"a\tb ~\x80\xff", True),
        (b"a\x00b", False),
        (b"a\x7fb", False),
        (b"a\x01b", False),
        (b"a\x1fb", False),
    ],
    ids=["tab-space-tilde-obs-text", "nul", "del", "soh", "us"],
)
async def test_origin_header_values_are_guarded_at_the_byte_boundary(
    line, forwarded, origins, proxy_factory
):
    origin = await origins(
        replying(b"HTTP/1.1 200 OK\r\nX-V: " + line + b"\r\nContent-Length: 2\r\n\r\nok")
    )
    proxy = await proxy_factory(origin.url)
    data, _ = await send_raw(proxy.port, get(extra=b"X-V: " + line + b"\r\nConnection: close\r\n"))
    (response,), _ = parse_responses(data)
    if forwarded:  # both ways, unchanged
        assert response.status == 200
        assert response.header("X-V") == line.decode("latin-1")
        assert origin.requests[0].header(b"x-v") == line
    else:  # the client's request is refused, nothing of it forwarded
        assert response.status == 400
        assert origin.requests == []
        data, _ = await send_raw(proxy.port, get(extra=b"Connection: close\r\n"))
        (response,), _ = parse_responses(data)  # the origin's response is refused
        assert response.status == 502
        member = f'faultline; error=http_protocol_error; next-hop="{LOOPBACK}:{origin.port}"'
        assert response.header("Proxy-Status").startswith(member + '; details="'), response
        assert line not in data


# -- a status line without a reason phrase ----------------------------------------------------


@pytest.mark.parametrize(
    "status_line",
    [b"HTTP/1.1 200", b"HTTP/1.1 200 ", b"HTTP/1.1 502 ", b"HTTP/1.1 502", b"HTTP/1.0 204"],
    ids=["200-bare", "200-space", "502-space", "502-bare", "204-http10"],
)
async def test_a_status_line_without_a_reason_passes_through(status_line, origins, proxy_factory):
    status = int(status_line[9:12])
    body = b"" if status == 204 else b"ok"
    reply = status_line + b"\r\n" + DATE + b"Content-Length: %d\r\n\r\n" % len(body) + body
    origin = await origins(replying(reply))
    proxy = await proxy_factory(origin.url)
    got = await keep_alive_exchange(proxy.port, [get(b"/1"), get(b"/2")], None)
    record = await proxy.last_log()
    for got_status, headers, got_body in got:
        assert (got_status, got_body) == (status, body)
        assert values(headers, b"content-length") == [b"%d" % len(body)]
    data, _ = await send_raw(proxy.port, get(extra=b"Connection: close\r\n"))
    assert data.startswith(b"HTTP/1.1 " + status_line[9:] + b"\r\n"), data[:40]
    assert (record["status"], record["source"], record["error"]) == (status, "origin", None)


# -- limits at their boundaries ------------------------------------------------------------------


def _padded_request(size: int) -> bytes:
    """A request whose head counts exactly `size` bytes as the proxy counts them: the target,
    and each header's name and value plus 4 (": " and CRLF)."""
    fixed = len(b"/") + len(b"Host") + len(b"a") + 4 + len(b"X-Pad") + 4
    return get(extra=b"X-Pad: " + b"p" * (size - fixed) + b"\r\n")


@pytest.mark.parametrize(("size", "status"), [(1024, 200), (1025, 431)], ids=["at", "over"])
async def test_max_request_header_bytes_at_and_over(size, status, origins, proxy_factory):
    origin = await origins(replying(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    proxy = await proxy_factory(origin.url, **{"limits.max_request_header_bytes": 1024})
    reader, writer = await asyncio.open_connection(LOOPBACK, proxy.port)
    try:
        writer.write(_padded_request(size))
        (got,) = [await ResponseReader(reader).next(5)]
    finally:
        writer.close()
    assert got[0] == status
    assert len(origin.requests) == (status == 200)


@pytest.mark.parametrize(("size", "status"), [(512, 200), (513, 431)], ids=["at", "over"])
async def test_a_request_target_at_and_over_the_header_limit(size, status, origins, proxy_factory):
    """HTTP/1.0 without Host: the target is all the head counts."""
    origin = await origins(replying(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    proxy = await proxy_factory(origin.url, **{"limits.max_request_header_bytes": 512})
    target = b"/" + b"t" * (size - 1)
    data, _ = await send_raw(proxy.port, b"GET " + target + b" HTTP/1.0\r\n\r\n")
    (response,), _ = parse_responses(data)
    assert response.status == status
    assert [r.target for r in origin.requests] == ([target] if status == 200 else [])


async def test_an_unfinished_head_is_cut_one_byte_over_the_limit(origins, proxy_factory):
    """A head that never ends: every byte read after its first read counts while it is
    unfinished. Exactly the limit: still waiting; one more byte: 431."""
    origin = await origins(replying(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    proxy = await proxy_factory(origin.url, **{"limits.max_request_header_bytes": 1024})
    reader, writer = await asyncio.open_connection(LOOPBACK, proxy.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\n")
        await asyncio.sleep(0.05)
        writer.write(b"X-Endless: " + b"e" * (1024 - len(b"X-Endless: ")))
        with pytest.raises(TimeoutError):  # at the limit: nothing said yet
            await asyncio.wait_for(reader.read(1), 0.3)
        writer.write(b"e")
        status, _, _ = await ResponseReader(reader).next(5)
    finally:
        writer.close()
    assert status == 431
    assert origin.requests == []


def _origin_head(size: int) -> bytes:
    """A response head (status line to the empty line) of exactly `size` bytes."""
    start = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Pad: "
    return start + b"p" * (size - len(start) - 4) + b"\r\n\r\n"


@pytest.mark.parametrize(("size", "status"), [(1024, 200), (1025, 502)], ids=["at", "over"])
@pytest.mark.parametrize("blank_lines", [0, 2], ids=["plain", "after-blank-lines"])
async def test_max_response_header_bytes_at_and_over(
    size, status, blank_lines, origins, proxy_factory
):
    """The head arrives with its body in one write (the buffered bytes pass the limit while
    the head itself does not); llhttp skips blank lines before a status line, and so
    does the count."""
    reply = b"\r\n" * blank_lines + _origin_head(size) + b"ok"
    origin = await origins(replying(reply))
    proxy = await proxy_factory(origin.url, **{"limits.max_response_header_bytes": 1024})
    data, _ = await send_raw(proxy.port, get(extra=b"Connection: close\r\n"))
    (response,), _ = parse_responses(data)
    record = await proxy.last_log()
    assert response.status == status
    if status == 200:
        assert response.body == b"ok" and record["error"] is None
    else:
        assert record["error"] == "http_response_header_section_size"


@pytest.mark.parametrize(("size", "kept"), [(2048, True), (2049, False)], ids=["at", "over"])
async def test_response_heads_are_remembered_up_to_2_kib(size, kept, origins, proxy_factory):
    """The memo of origin heads keeps a head of 2048 bytes and never one of 2049; a
    remembered head gives the client exactly what the first one did."""
    start = b"HTTP/1.1 200 OK\r\n" + DATE + b"Content-Length: 2\r\nX-Pad: "
    head = start + b"p" * (size - len(start) - 2) + b"\r\n"
    assert len(head) == size
    origin = await origins(replying(head + b"\r\nok"))
    proxy = await proxy_factory(origin.url, **{"headers.server_timing": False})
    got = await keep_alive_exchange(proxy.port, [get(), get()], None)
    memo = proxy.server.headers.origin_heads
    assert (head in memo) is kept
    if kept:
        assert memo[head].prefix.startswith(b"HTTP/1.1 200 OK\r\n" + DATE)
    first, second = ([(k, v) for k, v in h if k.lower() != b"x-request-id"] for _, h, _ in got)
    assert first == second and got[0][2] == got[1][2] == b"ok"


def test_response_heads_memo_holds_256_and_then_starts_again():
    policy = HeaderPolicy(
        proxy_name="faultline",
        instance_id="0123456789abcdef",
        upstream_authority="127.0.0.1:1",
        proxy_status=True,
        server_timing=True,
        forwarded=True,
        via=True,
    )
    heads = [b"HTTP/1.1 200 OK\r\n" + DATE + b"X-N: %d\r\n" % n for n in range(257)]
    for head in heads[:256]:
        policy.origin_head(head, 200)
    assert len(policy.origin_heads) == 256
    policy.origin_head(heads[256], 200)
    assert list(policy.origin_heads) == [heads[256]]


# -- the pure formatting rules ------------------------------------------------------------------


def test_ms_text_is_the_same_on_both_sides_of_the_table():
    assert len(MS_TABLE) == MS_TABLE_SIZE
    for us in [*range(2 * MS_TABLE_SIZE), 999_999, 1_000_000, 123_456_789]:
        assert ms_text(us) == b"%d.%03d" % (us // 1000, us % 1000), us
    assert (ms_text(4095), ms_text(4096), ms_text(4097)) == (b"4.095", b"4.096", b"4.097")


def test_server_timing_orders_and_formats_every_phase():
    assert server_timing(0, 0, 1_500_999) == b'proxy;dur=1.500;desc="in proxy"'
    assert server_timing(0, 0, -5) == b'proxy;dur=0.000;desc="in proxy"'
    assert server_timing(0, 0, 0, 1_000_000) == (
        b'wait;dur=1.000;desc="held: upstream refused", proxy;dur=0.000;desc="in proxy"'
    )
    assert server_timing(2_000_000, 30_000_000, 4_096_000, 7_000_000_000) == (
        b'wait;dur=7000.000;desc="held: upstream refused", '
        b'connect;dur=2.000;desc="upstream connect", '
        b'ttfb;dur=30.000;desc="upstream first byte", '
        b'proxy;dur=4.096;desc="in proxy"'
    )


@pytest.mark.parametrize("delay_s", [0, 0.1], ids=["fast-origin", "slow-origin"])
async def test_server_timing_on_the_wire_matches_its_format(delay_s, origins, proxy_factory):
    """A fresh connection, then a pooled one: the pooled fast path (two table lookups, under
    4.096 ms) and the general one (a slow origin) write the same form, each phase in its
    place: the origin's delay is in ttfb, never in connect or proxy."""
    reply = b"HTTP/1.1 200 OK\r\n" + DATE + b"Content-Length: 2\r\n\r\nok"

    def respond(request: Received, conn) -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(delay_s, lambda: conn.transport.is_closing() or conn.transport.write(reply))

    origin = await origins(respond)
    proxy = await proxy_factory(origin.url)
    got = await keep_alive_exchange(proxy.port, [get()], get())
    metric = rb'(\d+\.\d{3});desc="'
    first = rb"connect;dur=" + metric + rb'upstream connect", ttfb;dur='
    pooled = rb"ttfb;dur="
    tail = metric + rb'upstream first byte", proxy;dur=' + metric + rb'in proxy"'
    (fresh,), (reused,) = (values(h, b"server-timing") for _, h, _ in got)
    fresh_match = re.fullmatch(first + tail, fresh)
    reused_match = re.fullmatch(pooled + tail, reused)
    assert fresh_match and reused_match, (fresh, reused)
    connect, fresh_ttfb, fresh_proxy = (float(v) for v in fresh_match.groups())
    reused_ttfb, reused_proxy = (float(v) for v in reused_match.groups())
    half_delay_ms = delay_s * 1000 / 2  # timers may fire a little early, and CI is slow
    assert min(fresh_ttfb, reused_ttfb) >= half_delay_ms
    assert min(fresh_proxy, reused_proxy) > 0
    if delay_s:
        assert max(connect, fresh_proxy, reused_proxy) < half_delay_ms


def test_http_date_is_an_imf_fixdate():
    assert IMF_FIXDATE.match(http_date()), http_date()
    assert http_date() is http_date() or http_date() == http_date()


@pytest.mark.parametrize(
    ("accept", "html"),
    [
        (None, False),
        (b"", False),
        (b"text/html", True),
        (b"TEXT/HTML", True),
        (b"text/htm", False),
        (b"application/json", False),
        (b"text/html, application/json", True),
        (b"application/json, text/html", False),
        (b"json, text/html", False),
        (b"application/problem+json;q=0.1, text/html", False),
        (b"*/*", False),
        (b"text/html, application/json, text/html;q=0.1", True),
        (b"application/json, text/html, application/problem+json", False),
    ],
    ids=[
        "none",
        "empty",
        "html",
        "html-upper-case",
        "htm",
        "json",
        "html-then-json",
        "json-then-html",
        "bare-json-then-html",
        "problem-json-then-html",
        "any",
        "html-json-html",
        "json-html-json",
    ],
)
def test_prefers_html(accept, html):
    assert prefers_html(accept) is html
