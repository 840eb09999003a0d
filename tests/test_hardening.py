"""Hardening against hostile clients: a table of ambiguous or malformed requests (RFC 9112
§2-§7, §11.2) that the proxy must refuse with the fitting 4xx and `http_request_error`,
never forwarding a byte of them and never answering 5xx; the requests it accepts in an
unusual form must reach the origin as one normalized request. Then the security rules:
smuggling past the parser, the admin port, secrets, header injection, X-Forwarded-*.

Every row checks what the client got, the access-log line and what the origin received
(raw bytes, parsed by llhttp: a parse error there means the proxy forwarded bad HTTP).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

import aiohttp
import pytest
from hostile_support import (
    LEAK_MARKERS,
    Received,
    RecordingOrigin,
    send_raw,
)

from proxy.diagnosis.faults import Fault

from support import LOOPBACK, Response, parse_responses, proxy_status_members

REQUEST_ERROR = Fault.HTTP_REQUEST_ERROR.value
# A request that ends with this makes the proxy close after answering: the client reads to EOF.
C = b"Connection: close\r\n"
TABLE_LIMITS = {"timeouts.client_headers": "1s", "timeouts.client_body": "1s"}
GENERATED_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{8}$")


@pytest.fixture
async def origin():
    origin = await RecordingOrigin().start()
    yield origin
    await origin.close()


# -- the table ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """One request as the origin must receive it (normalized by the proxy)."""

    method: bytes = b"GET"
    target: bytes = b"/"
    host: bytes = b"a"
    framing: bytes | None = None  # b"chunked", a Content-Length value, or None (no body)
    body: bytes = b""
    absent: tuple[bytes, ...] = ()  # header names that must not reach the origin


@dataclass(frozen=True)
class Case:
    id: str
    request: bytes
    statuses: tuple[int, ...]  # the responses the client gets, in order
    forwarded: tuple[Expect, ...] = ()  # what reaches the origin, in order (empty: no byte)
    xfail: str | None = None


def refused(id: str, request: bytes, status: int = 400, xfail: str | None = None) -> Case:
    return Case(id, request, (status,), (), xfail)


def forwarded(id: str, request: bytes, *expects: Expect, xfail: str | None = None) -> Case:
    return Case(id, request, (200,) * len(expects), expects, xfail)


def post(headers: bytes, body: bytes) -> bytes:
    return b"POST / HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n" + body


CHUNKED = b"Transfer-Encoding: chunked\r\n"

CASES = [
    # -- message framing (RFC 9112 §6.1-§6.3): never two ways to read a body ------------------
    refused("te-then-cl", post(CHUNKED + b"Content-Length: 3\r\n", b"0\r\n\r\n")),
    # An Upgrade with a body: llhttp origins take the body for the new protocol, others read
    # it first (found by tests/test_fuzz.py: the origin saw the chunk as a request).
    refused(
        "upgrade-with-chunked-body",
        post(b"Connection: upgrade\r\nUpgrade: websocket\r\n" + CHUNKED, b"0\r\n\r\n"),
    ),
    refused(
        "upgrade-with-length-body",
        post(b"Connection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 3\r\n", b"abc"),
    ),
    refused(
        "cl-te-smuggle",
        post(
            b"Content-Length: 6\r\n" + CHUNKED, b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n"
        ),
    ),
    refused("cl-duplicate-same", post(b"Content-Length: 3\r\nContent-Length: 3\r\n", b"abc")),
    refused("cl-duplicate-different", post(b"Content-Length: 3\r\nContent-Length: 4\r\n", b"abcd")),
    refused("cl-duplicate-zero", post(b"Content-Length: 0\r\nContent-Length: 0\r\n", b"")),
    refused("cl-list", post(b"Content-Length: 3, 3\r\n", b"abc")),
    refused("cl-plus-sign", post(b"Content-Length: +3\r\n", b"abc")),
    refused("cl-negative", post(b"Content-Length: -3\r\n", b"abc")),
    refused("cl-hex", post(b"Content-Length: 0x3\r\n", b"abc")),
    refused("cl-inner-space", post(b"Content-Length: 1 0\r\n", b"abcdefghij")),
    refused("cl-empty", post(b"Content-Length: \r\n", b"abc")),
    refused("cl-overflow", post(b"Content-Length: 99999999999999999999\r\n", b"abc")),
    refused("cl-19-digits", post(b"Content-Length: 1234567890123456789\r\n", b"abc")),
    refused("te-gzip-only", post(b"Transfer-Encoding: gzip\r\n", b"abc")),
    refused("te-identity", post(b"Transfer-Encoding: identity\r\n", b"abc")),
    refused("te-chunked-not-last", post(b"Transfer-Encoding: chunked, gzip\r\n", b"0\r\n\r\n")),
    refused(
        "te-chunked-twice-in-one", post(b"Transfer-Encoding: chunked, chunked\r\n", b"0\r\n\r\n")
    ),
    refused("te-chunked-twice-in-two", post(CHUNKED + CHUNKED, b"0\r\n\r\n")),
    refused(
        "te-chunked-then-identity", post(CHUNKED + b"Transfer-Encoding: identity\r\n", b"0\r\n\r\n")
    ),
    refused(
        "te-unknown-coding", post(b"Transfer-Encoding: xchunked\r\n", b"3\r\nabc\r\n0\r\n\r\n")
    ),
    refused(
        "te-gzip-then-chunked",  # framed, but a coding the proxy does not apply: RFC 9112 §6.1
        post(b"Transfer-Encoding: gzip, chunked\r\n" + C, b"3\r\nabc\r\n0\r\n\r\n"),
        status=501,
    ),
    refused(
        "te-in-http10",
        b"POST / HTTP/1.0\r\nHost: a\r\n" + CHUNKED + b"\r\n3\r\nabc\r\n0\r\n\r\n",
    ),
    # -- chunked bodies (RFC 9112 §7.1) ------------------------------------------------------
    refused("chunk-size-not-hex", post(CHUNKED, b"zz\r\nabc\r\n0\r\n\r\n")),
    refused("chunk-size-trailing-space", post(CHUNKED, b"3 \r\nabc\r\n0\r\n\r\n")),
    refused("chunk-size-negative", post(CHUNKED, b"-3\r\nabc\r\n0\r\n\r\n")),
    refused("chunk-size-0x", post(CHUNKED, b"0x3\r\nabc\r\n0\r\n\r\n")),
    refused("chunk-size-overflow", post(CHUNKED, b"ffffffffffffffffff\r\nabc\r\n0\r\n\r\n")),
    refused("chunk-size-bare-lf", post(CHUNKED, b"3\nabc\r\n0\r\n\r\n")),
    refused("chunk-data-overrun", post(CHUNKED, b"3\r\nabcXX\r\n0\r\n\r\n")),
    refused("chunk-ext-open-quote", post(CHUNKED, b'3;a="x\r\nabc\r\n0\r\n\r\n')),
    refused("chunk-ext-nul", post(CHUNKED, b"3;a\x00\r\nabc\r\n0\r\n\r\n")),
    refused("chunk-ext-bare-cr", post(CHUNKED, b"3;a\rb\r\nabc\r\n0\r\n\r\n")),
    refused("chunk-trailer-bare-lf", post(CHUNKED, b"3\r\nabc\r\n0\r\nX: a\nY: b\r\n\r\n")),
    # -- header syntax (RFC 9112 §2.2, §5) ----------------------------------------------------
    refused("obs-fold", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: one\r\n two\r\n\r\n"),
    refused("whitespace-before-first-header", b"GET / HTTP/1.1\r\n Host: a\r\n\r\n"),
    refused("bare-lf-everywhere", b"GET / HTTP/1.1\nHost: a\n\n"),
    refused("bare-lf-one-header", b"GET / HTTP/1.1\r\nHost: a\nX-A: 1\r\n\r\n"),
    refused("bare-cr-in-value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\rb\r\n\r\n"),
    refused("nul-in-value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n\r\n"),
    refused("del-in-value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x7fb\r\n\r\n"),
    refused("nul-in-name", b"GET / HTTP/1.1\r\nHost: a\r\nX\x00A: b\r\n\r\n"),
    refused("space-before-colon", b"GET / HTTP/1.1\r\nHost : a\r\n\r\n"),
    refused("tab-before-colon", b"GET / HTTP/1.1\r\nHost: a\r\nX-A\t: b\r\n\r\n"),
    refused("empty-name", b"GET / HTTP/1.1\r\nHost: a\r\n: b\r\n\r\n"),
    refused("line-without-colon", b"GET / HTTP/1.1\r\nHost: a\r\nNoColonHere\r\n\r\n"),
    refused("separator-in-name", b"GET / HTTP/1.1\r\nHost: a\r\nX(A): b\r\n\r\n"),
    refused("no-host-http11", b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n"),
    refused("two-hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
    # -- request line and target (RFC 9112 §3) ------------------------------------------------
    refused("target-tab", b"GET /a\tb HTTP/1.1\r\nHost: a\r\n\r\n"),
    refused("target-del", b"GET /a\x7fb HTTP/1.1\r\nHost: a\r\n\r\n"),
    refused("target-obs-text", b"GET /\xff HTTP/1.1\r\nHost: a\r\n\r\n"),
    refused("target-relative", b"GET a/b HTTP/1.1\r\nHost: a\r\n\r\n"),
    refused("target-star-not-options", b"GET * HTTP/1.1\r\nHost: a\r\n\r\n"),
    refused("authority-form-not-connect", b"GET a:443 HTTP/1.1\r\nHost: a\r\n\r\n"),
    refused("absolute-form-userinfo", b"GET http://u@b.test/x HTTP/1.1\r\nHost: a\r\n\r\n"),
    refused("absolute-form-no-authority", b"GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n"),
    refused("absolute-form-other-scheme", b"GET ftp://b.test/x HTTP/1.1\r\nHost: a\r\n\r\n"),
    refused("absolute-form-without-host", b"GET http://b.test/x HTTP/1.1\r\n\r\n"),
    refused("connect", b"CONNECT b.test:443 HTTP/1.1\r\nHost: b.test:443\r\n\r\n"),
    refused("unknown-method", b"BREW / HTTP/1.1\r\nHost: a\r\n\r\n"),
    refused("lowercase-method", b"get / HTTP/1.1\r\nHost: a\r\n\r\n"),
    refused("version-1.2", b"GET / HTTP/1.2\r\nHost: a\r\n\r\n"),
    refused("version-2.0", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n"),
    refused("version-0.9-line", b"GET / HTTP/0.9\r\nHost: a\r\n\r\n"),
    refused("version-0.9-simple-request", b"GET /\r\n\r\n"),
    refused("version-lowercase", b"GET / http/1.1\r\nHost: a\r\n\r\n"),
    refused("version-1.10", b"GET / HTTP/1.10\r\nHost: a\r\n\r\n"),
    refused("space-after-version", b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n"),
    refused("tls-client-hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40),
    # -- pipelines: nothing after a refused head is read, what came before is served ----------
    Case(
        "pipeline-good-then-duplicate-cl",
        post(b"Content-Length: 5\r\n", b"hello")
        + b"GET /second HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        (200, 400),
        (Expect(b"POST", framing=b"5", body=b"hello"),),
    ),
    Case(
        "pipeline-refused-then-good",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\nGET /next HTTP/1.1\r\nHost: a\r\n\r\n",
        (400,),
    ),
    # -- accepted in an unusual form: one normalized request reaches the origin ---------------
    forwarded(
        "absolute-form-to-origin-form",
        b"GET http://b.test/x?y=1 HTTP/1.1\r\nHost: other\r\n" + C + b"\r\n",
        Expect(target=b"/x?y=1", host=b"b.test"),
    ),
    forwarded(
        "absolute-form-no-path",
        b"GET HTTP://B.test:8080?q HTTP/1.1\r\nHost: other\r\n" + C + b"\r\n",
        Expect(target=b"/?q", host=b"B.test:8080"),
    ),
    forwarded(
        "options-star",
        b"OPTIONS * HTTP/1.1\r\nHost: a\r\n" + C + b"\r\n",
        Expect(b"OPTIONS", b"*"),
    ),
    forwarded(
        "empty-line-before-request",
        b"\r\nGET /x HTTP/1.1\r\nHost: a\r\n" + C + b"\r\n",
        Expect(target=b"/x"),
    ),
    forwarded(
        "double-space-in-request-line",
        b"GET  /x HTTP/1.1\r\nHost: a\r\n" + C + b"\r\n",
        Expect(target=b"/x"),
    ),
    forwarded(
        "http10-without-host",
        b"GET /x HTTP/1.0\r\n\r\n",
        Expect(target=b"/x", host=b"<upstream>"),
    ),
    forwarded(
        "chunked-uppercase-ext-and-trailer",
        post(b"Transfer-Encoding: CHUNKED\r\n" + C, b"3;ext=1\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n"),
        Expect(b"POST", framing=b"chunked", body=b"abc", absent=(b"x-trailer",)),
    ),
    forwarded(
        "content-length-leading-zeros",
        post(b"Content-Length: 003\r\n" + C, b"abc"),
        Expect(b"POST", framing=b"3", body=b"abc"),
    ),
    forwarded(
        "hop-by-hop-and-nominated-dropped",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\nTE: trailers\r\n"
        b"Keep-Alive: 5\r\nProxy-Connection: keep-alive\r\nProxy-Authorization: Basic eA==\r\n\r\n",
        Expect(
            absent=(b"x-hop", b"te", b"keep-alive", b"proxy-connection", b"proxy-authorization")
        ),
    ),
    forwarded(
        "content-length-trailing-ows",
        post(b"Content-Length: 3 \r\n" + C, b"abc"),
        Expect(b"POST", framing=b"3", body=b"abc"),
    ),
]


def check_proxy_made(response: Response, status: int) -> None:
    """A proxy-made refusal: our Proxy-Status member, problem+json, nothing internal."""
    assert response.status == status
    member = proxy_status_members(response.header("Proxy-Status") or "")[-1]
    assert member.startswith(f"faultline; error={REQUEST_ERROR}"), member
    assert response.header("Content-Type") == "application/problem+json"
    problem = response.json()
    assert (problem["error"], problem["layer"], problem["status"]) == (
        REQUEST_ERROR,
        "client",
        status,
    )
    # The same id in the header and the body (whether it is ever empty: see
    # test_every_refusal_carries_a_request_id).
    assert problem["request_id"] == response.header("X-Request-Id")
    for marker in LEAK_MARKERS:
        assert marker not in response.body, marker


def check_received(got: Received, want: Expect, upstream: str) -> None:
    assert (got.method, got.target, got.version) == (want.method, want.target, "1.1")
    host = upstream.encode() if want.host == b"<upstream>" else want.host
    assert got.names().count(b"host") == 1 and got.header(b"host") == host
    assert got.header(b"x-forwarded-for") == b"127.0.0.1"
    assert got.header(b"via") is not None and got.header(b"x-request-id") is not None
    te, cl = got.header(b"transfer-encoding"), got.header(b"content-length")
    if want.framing == b"chunked":
        assert (te, cl) == (b"chunked", None)
    elif want.framing is not None:
        assert (te, cl) == (None, want.framing)
    else:
        assert te is None and cl in (None, b"0")
    assert got.body == want.body
    for name in want.absent:
        assert name not in got.names(), name


def params(cases: list[Case]) -> list:
    return [
        pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)])
        if c.xfail
        else pytest.param(c, id=c.id)
        for c in cases
    ]


def test_the_table_is_large_and_ids_are_unique():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", params(CASES))
async def test_request_table(case: Case, origin: RecordingOrigin, proxy_factory):
    proxy = await proxy_factory(origin.url, **TABLE_LIMITS)
    data, _ = await send_raw(proxy.port, case.request, timeout=5)
    await proxy.settle()
    records = proxy.access_log()
    responses, unfinished = parse_responses(data)
    assert [r.status for r in responses] == list(case.statuses), data[:400]
    assert not unfinished
    # One log line per answered exchange; never a 5xx for the client's fault.
    assert [r["status"] for r in records] == list(case.statuses)
    for response, record in zip(responses, records, strict=True):
        assert response.header("X-Request-Id") == record["request_id"]
        if response.status >= 400:
            check_proxy_made(response, response.status)
            assert (record["error"], record["layer"], record["source"]) == (
                REQUEST_ERROR,
                "client",
                "proxy",
            )
        else:
            assert response.body == b"from-app!"
            assert (record["error"], record["source"]) == (None, "origin")
    # What reached the origin: nothing at all, or exactly the normalized requests.
    assert origin.parse_errors == []
    if not case.forwarded:
        assert origin.received_bytes() == b"", origin.received_bytes()[:300]
    assert len(origin.requests) == len(case.forwarded), [r.target for r in origin.requests]
    upstream = f"{LOOPBACK}:{origin.port}"
    for got, want in zip(origin.requests, case.forwarded, strict=True):
        check_received(got, want, upstream)


# -- rows that need more than bytes in, bytes out ----------------------------------------------


async def test_target_with_fragment_is_refused_or_stripped(origin, proxy_factory):
    proxy = await proxy_factory(origin.url)
    data, _ = await send_raw(proxy.port, b"GET /a#frag HTTP/1.1\r\nHost: a\r\n" + C + b"\r\n")
    (response,), _ = parse_responses(data)
    if response.status == 400:
        check_proxy_made(response, 400)
        assert origin.received_bytes() == b""
    else:
        assert [r.target for r in origin.requests] == [b"/a"]


@pytest.mark.parametrize(
    "host",
    [b"a b", b"a/b", b"u@b.test", b"a\tb", b"b.test:80:80"],
    ids=["space", "slash", "userinfo", "tab", "two-ports"],
)
async def test_invalid_host_value_is_refused(host, origin, proxy_factory):
    proxy = await proxy_factory(origin.url)
    data, _ = await send_raw(proxy.port, b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n" + C + b"\r\n")
    (response,), _ = parse_responses(data)
    check_proxy_made(response, 400)
    assert origin.received_bytes() == b""


async def test_requests_after_connection_close_are_not_counted(origin, proxy_factory):
    proxy = await proxy_factory(origin.url)
    data, _ = await send_raw(
        proxy.port,
        b"GET /x HTTP/1.1\r\nHost: a\r\n" + C + b"\r\nGET /y HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    await proxy.settle()
    responses, _ = parse_responses(data)
    assert [r.status for r in responses] == [200]
    assert [r.target for r in origin.requests] == [b"/x"]  # holds today
    assert [(r["path"], r["status"]) for r in proxy.access_log()] == [("/x", 200)]
    assert proxy.stats.total == 1


# Regression: refusals made before the head is complete carry a generated request id too.


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, id="after-head"),
        pytest.param(
            b"GET / HTTP/1.1\r\nHost: a\r\nX: \x00\r\n\r\n",
            400,
            id="parse-error-in-head",
        ),
        pytest.param(
            b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"x" * 2000 + b"\r\n\r\n",
            431,
            id="head-too-large",
        ),
        pytest.param(
            b"GET / HTTP/1.1\r\nHost: a\r\n",
            408,
            id="head-too-slow",
        ),
    ],
)
async def test_every_refusal_carries_a_request_id(request_bytes, status, origin, proxy_factory):
    proxy = await proxy_factory(
        origin.url,
        **{"limits.max_request_header_bytes": 1024, "timeouts.client_headers": "300ms"},
    )
    data, _ = await send_raw(proxy.port, request_bytes)
    (response,), _ = parse_responses(data)
    check_proxy_made(response, status)
    rid = response.header("X-Request-Id")
    assert rid and GENERATED_ID.match(rid), repr(rid)
    assert (await proxy.last_log())["request_id"] == rid


# -- smuggling past the parser: an Upgrade the origin refuses -----------------------------------

UPGRADE = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"
# Regression: bytes after an Upgrade request are held until the origin answers 101 and
# dropped if it refuses, so nothing can be smuggled past the parser.


def _reply(target: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(target), target)


async def test_bytes_after_a_refused_upgrade_never_reach_the_origin(proxy_factory):
    origin = await RecordingOrigin(respond=lambda req, conn: _reply(req.target)).start()
    try:
        proxy = await proxy_factory(origin.url)
        data, _ = await send_raw(proxy.port, UPGRADE + SMUGGLED, timeout=3)
        await proxy.settle()
    finally:
        await origin.close()
    assert parse_responses(data)[0][0].status == 200
    assert [r.target for r in origin.requests] == [b"/ws"], [
        (r.target, r.header(b"x-forwarded-for")) for r in origin.requests
    ]


async def test_a_refused_upgrade_cannot_poison_another_clients_response(proxy_factory):
    """An in-order origin (like any HTTP/1.1 server) that is slow on the smuggled request."""
    loop = asyncio.get_running_loop()
    behind: dict[int, list[bytes]] = {}

    def flush(conn) -> None:
        if not conn.transport.is_closing():
            conn.transport.write(b"".join(behind.pop(id(conn))))

    def respond(req: Received, conn) -> bytes | None:
        if id(conn) in behind:  # answers go out in request order
            behind[id(conn)].append(_reply(req.target))
            return None
        if req.target == b"/smuggled":
            behind[id(conn)] = [_reply(b"SMUGGLED-FOR-A")]
            loop.call_later(0.4, flush, conn)
            return None
        return _reply(req.target)

    origin = await RecordingOrigin(respond=respond).start()
    try:
        proxy = await proxy_factory(origin.url)
        await send_raw(proxy.port, UPGRADE + SMUGGLED, timeout=3)
        data, _ = await send_raw(proxy.port, b"GET /b HTTP/1.1\r\nHost: a\r\n" + C + b"\r\n")
    finally:
        await origin.close()
    (response,), _ = parse_responses(data)
    assert response.body == b"/b", response.body


async def test_an_accepted_upgrade_still_tunnels(proxy_factory):
    """The positive twin of the rows above: with a 101 the bytes after it are the tunnel's."""

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            self.upgraded = False

        def data_received(self, data):
            if not self.upgraded:
                self.upgraded = True
                self.transport.write(
                    b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
                    b"Upgrade: websocket\r\n\r\n"
                )
                data = data.partition(b"\r\n\r\n")[2]
            if data:
                self.transport.write(data.upper())

    server = await asyncio.get_running_loop().create_server(Echo, LOOPBACK, 0)
    try:
        proxy = await proxy_factory(f"http://{LOOPBACK}:{server.sockets[0].getsockname()[1]}")
        reader, writer = await asyncio.open_connection(LOOPBACK, proxy.port)
        writer.write(UPGRADE)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101")
        writer.write(b"tunnel bytes")
        assert await asyncio.wait_for(reader.readexactly(12), 5) == b"TUNNEL BYTES"
        writer.close()
    finally:
        server.close()


# -- the admin port is never reachable through the proxy port ---------------------------------


async def test_admin_address_in_the_target_or_host_still_goes_to_the_origin(origin, proxy_factory):
    """test_admin covers plain paths; here the client names the admin address itself."""
    proxy = await proxy_factory(origin.url, **{"admin.token": "admin-secret"})
    admin = proxy.admin_url.removeprefix("http://").encode()
    for request in (
        b"GET http://" + admin + b"/stats HTTP/1.1\r\nHost: " + admin + b"\r\n" + C + b"\r\n",
        b"GET /stats HTTP/1.1\r\nHost: " + admin + b"\r\n" + C + b"\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: localhost:" + admin.split(b":")[1] + b"\r\n" + C + b"\r\n",
    ):
        data, _ = await send_raw(proxy.port, request)
        (response,), _ = parse_responses(data)
        assert (response.status, response.body) == (200, b"from-app!")
    assert [r.target for r in origin.requests] == [b"/stats", b"/stats", b"/metrics"]
    assert proxy.stats.total == 3


# -- secrets never reach logs, stats, metrics or the dashboard -----------------------------------

SECRETS = ("AUTHSECRET", "COOKIESECRET", "SETCOOKIESECRET", "QUERYSECRET", "SESSIONSECRET")


async def test_secrets_stay_out_of_every_record_including_proxy_made_answers(proxy_factory, caplog):
    """test_accesslog covers an origin 500; here: refused requests, upstream faults,
    absolute-form targets, a configured extra parameter, and every admin endpoint."""

    def respond(req: Received, conn) -> bytes | None:
        if req.target.startswith(b"/hangup"):
            conn.transport.close()
            return None
        return (
            b"HTTP/1.1 503 Unavailable\r\nSet-Cookie: s=SETCOOKIESECRET\r\n"
            b"Content-Length: 4\r\n\r\nnope"
        )

    origin = await RecordingOrigin(respond=respond).start()
    try:
        proxy = await proxy_factory(
            origin.url, **{"log.redact_query": "token,session", "stats.recent_errors": 50}
        )
        auth = b"Authorization: Bearer AUTHSECRET\r\nCookie: sid=COOKIESECRET\r\n"
        requests = [
            # refused after the head (two Host lines): the target is known, then refused
            b"GET /r?token=QUERYSECRET HTTP/1.1\r\nHost: a\r\nHost: b\r\n" + auth + b"\r\n",
            # refused inside the head (bad byte): nothing of it is kept
            b"GET /r?session=SESSIONSECRET HTTP/1.1\r\n" + auth + b"X: \x00\r\n\r\n",
            # absolute-form, the origin's own 503 with a Set-Cookie
            b"GET http://b.test/o?session=SESSIONSECRET&page=2 HTTP/1.1\r\nHost: a\r\n"
            + auth
            + C
            + b"\r\n",
            # an upstream fault made by the proxy
            b"GET /hangup?token=QUERYSECRET HTTP/1.1\r\nHost: a\r\n" + auth + C + b"\r\n",
        ]
        statuses = []
        for request in requests:
            data, _ = await send_raw(proxy.port, request)
            statuses.append(parse_responses(data)[0][0].status)
        assert statuses == [400, 400, 503, 502]
        await proxy.settle()
        logged = bytes(proxy.log.data).decode("latin-1") + proxy.access_log().__repr__()
        assert "/o?session=REDACTED&page=2" in logged
        admin_text = ""
        async with aiohttp.ClientSession() as session:
            for path in ("/stats", "/metrics", "/series", "/latency", "/dashboard", "/faults"):
                async with session.get(proxy.admin_url + path) as resp:
                    assert resp.status == 200, path
                    admin_text += await resp.text()
    finally:
        await origin.close()
    everything = logged + admin_text + caplog.text
    for secret in SECRETS:
        assert secret not in everything, secret


# -- header injection: nothing odd a peer sends is reflected ------------------------------------

ODD_REQUEST_IDS = [
    b"<script>alert(1)</script>",
    b"a b",
    b"a\tb",
    b"\xff\xfe-obs-text",
    b"x" * 201,
    b"id,other",
    b'"quoted"',
    b"id;param=1",
    b"",
]


@pytest.mark.parametrize("odd", ODD_REQUEST_IDS, ids=range(len(ODD_REQUEST_IDS)))
async def test_odd_request_id_is_replaced_not_reflected(odd, origin, proxy_factory):
    proxy = await proxy_factory(origin.url)
    data, _ = await send_raw(
        proxy.port, b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: " + odd + b"\r\n" + C + b"\r\n"
    )
    (response,), _ = parse_responses(data)
    assert response.status == 200
    rid = response.header("X-Request-Id")
    assert rid is not None and GENERATED_ID.match(rid), rid
    if odd:
        assert odd not in data
    (got,) = origin.requests
    assert got.header(b"x-request-id") == rid.encode()
    assert (await proxy.last_log())["request_id"] == rid


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nX-A: a\rInjected: 1\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-A: a\nInjected: 1\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-A: a\r\n Injected: 1\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-A\r\nInjected: 1\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-A: 1\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 20\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nok",
    ],
    ids=[
        "bare-cr",
        "bare-lf",
        "obs-fold",
        "no-colon",
        "lf-hidden-te",
        "two-content-lengths",
        "cl-and-te",
    ],
)
async def test_origin_header_bytes_are_validated_before_they_reach_the_client(head, proxy_factory):
    origin = await RecordingOrigin(respond=lambda req, conn: head).start()
    try:
        proxy = await proxy_factory(origin.url)
        data, _ = await send_raw(proxy.port, b"GET / HTTP/1.1\r\nHost: a\r\n" + C + b"\r\n")
        record = await proxy.last_log()
    finally:
        await origin.close()
    (response,), _ = parse_responses(data)
    assert response.status == 502
    assert b"Injected" not in data and b"ok" not in data.partition(b"\r\n\r\n")[2][:2]
    assert "error=http_protocol_error" in (response.header("Proxy-Status") or "")
    assert (record["error"], record["layer"]) == ("http_protocol_error", "upstream")


# -- X-Forwarded-*: trusted only from trusted_proxies -------------------------------------------

SPOOF = (
    b"X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-For: 7.7.7.7\r\n"
    b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: spoofed.test\r\n"
)


@pytest.mark.parametrize("trusted", [False, True], ids=["untrusted-replaced", "trusted-appended"])
async def test_x_forwarded_for_is_trusted_only_from_trusted_proxies(trusted, origin, proxy_factory):
    overrides = (
        {"trusted_proxies": ["127.0.0.1"]} if trusted else {"trusted_proxies": ["10.0.0.0/8"]}
    )
    proxy = await proxy_factory(origin.url, **overrides)
    data, _ = await send_raw(
        proxy.port, b"GET / HTTP/1.1\r\nHost: app.test\r\n" + SPOOF + C + b"\r\n"
    )
    assert parse_responses(data)[0][0].status == 200
    (got,) = origin.requests
    assert got.names().count(b"x-forwarded-for") == 1
    if trusted:
        assert got.header(b"x-forwarded-for") == b"6.6.6.6, 7.7.7.7, 127.0.0.1"
        assert got.header(b"x-forwarded-proto") == b"https"
        assert got.header(b"x-forwarded-host") == b"spoofed.test"
    else:
        assert got.header(b"x-forwarded-for") == b"127.0.0.1"
        assert got.header(b"x-forwarded-proto") == b"http"
        assert got.header(b"x-forwarded-host") == b"app.test"
    assert b"6.6.6.6" not in data  # nothing of it is echoed to the client


async def test_proxy_made_bodies_never_leak_internals(proxy_factory):
    """Every kind of proxy-made answer a hostile peer can provoke, JSON and HTML."""

    def respond(req: Received, conn) -> bytes | None:
        if req.target == b"/garbage":
            return b"\x00\x01 not http at all\r\n\r\n"
        conn.transport.abort()
        return None

    origin = await RecordingOrigin(respond=respond).start()
    try:
        proxy = await proxy_factory(origin.url, **{"limits.max_request_header_bytes": 512})
        html = b"Accept: text/html\r\n"
        requests = [
            b"GET /garbage HTTP/1.1\r\nHost: a\r\n" + C + b"\r\n",
            b"GET /reset HTTP/1.1\r\nHost: a\r\n" + html + C + b"\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"x" * 1000 + b"\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n" + html + b"X: \x00\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\n" + html + CHUNKED + b"\r\nzz\r\n",
        ]
        for request in requests:
            data, _ = await send_raw(proxy.port, request)
            (response,), _ = parse_responses(data)
            assert 400 <= response.status < 600 and response.status != 500
            for marker in LEAK_MARKERS:
                assert marker not in response.body, (marker, response.body[:200])
    finally:
        await origin.close()
