"""The fault matrix: every row scripts an origin (or a client) misbehaving byte by byte and
checks what the client got, the Proxy-Status member, who produced the status, the layer,
and the access-log line. Mid-body faults must reach the client as an aborted response."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import trustme

from support import (
    LOOPBACK,
    TIMEOUT_SETTINGS,
    OriginConnection,
    ScriptedOrigin,
    check_detail,
    free_port,
    interpreted_only,
    parse_responses,
    proxy_status_members,
    read_until_reset,
    start_proxy,
)

CLOSE = b"Connection: close\r\n"
GET = b"GET /row HTTP/1.1\r\nHost: app.test\r\n" + CLOSE + b"\r\n"


# -- origin behaviours ---------------------------------------------------------------------


def send_then(data: bytes, then: str = "close", pause: float = 0.0):
    """Read the request, send `data`, then close / reset / stall."""

    async def script(conn: OriginConnection) -> None:
        await conn.read_request()
        conn.write(data)
        await conn.drain()
        if pause:
            await asyncio.sleep(pause)
        if then == "close":
            conn.close()
        elif then == "reset":
            conn.reset()
        elif then == "stall":
            await conn.hold(10)

    return script


def mid_body(head: bytes, part: bytes, then: str):
    """A response whose head and first body bytes go out before the break."""

    async def script(conn: OriginConnection) -> None:
        await conn.read_request()
        conn.write(head + part)
        await conn.drain()
        await asyncio.sleep(0.2)  # the proxy has forwarded the head by now
        if then == "close":
            conn.close()
        elif then == "reset":
            conn.reset()
        elif then == "stall":
            await conn.hold(10)
        elif then == "garbage":
            conn.write(b"zz-not-a-chunk-size\r\n")
            await conn.drain()
            await conn.hold(2)

    return script


# -- the matrix ---------------------------------------------------------------------------------


@dataclass
class Row:
    id: str
    status: int | None  # what the client gets; None: an aborted response (no clean end)
    error: str | None  # the Proxy-Status error token and the log's error
    source: str
    layer: str
    script: Callable[[OriginConnection], Awaitable[None]] | None = None
    request: bytes = GET
    overrides: dict[str, Any] = field(default_factory=dict)
    upstream: str | None = None  # a fixed upstream instead of a scripted origin
    log_status: int | None = None  # the logged status when it differs from what was sent


OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
FAST = {"timeouts.response_headers": "300ms", "timeouts.upstream_read": "300ms"}

ROWS = [
    # -- the origin answered: its status passes through, nobody is at fault
    Row(
        "origin-200",
        200,
        None,
        "origin",
        "origin",
        send_then(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    ),
    Row(
        "origin-own-502",
        502,
        None,
        "origin",
        "origin",
        send_then(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 3\r\n\r\nbad"),
    ),
    Row(
        "origin-own-504",
        504,
        None,
        "origin",
        "origin",
        send_then(b"HTTP/1.1 504 Gateway Timeout\r\nContent-Length: 0\r\n\r\n"),
    ),
    # -- transport
    Row("connection-refused", 502, "connection_refused", "proxy", "transport", upstream="refused"),
    Row(
        "connection-timeout-full-backlog",
        504,
        "connection_timeout",
        "proxy",
        "transport",
        upstream="full-backlog",
        overrides={"timeouts.connect": "300ms"},
    ),
    Row(
        "dns-error-invalid-name",
        502,
        "dns_error",
        "proxy",
        "transport",
        upstream="http://faultline-test.invalid:80",
    ),
    # -- upstream, before any response byte
    Row(
        "closed-before-response",
        502,
        "connection_terminated",
        "proxy",
        "upstream",
        send_then(b"", "close"),
    ),
    Row(
        "reset-before-response",
        502,
        "connection_terminated",
        "proxy",
        "upstream",
        send_then(b"", "reset"),
    ),
    Row(
        "garbage-response",
        502,
        "http_protocol_error",
        "proxy",
        "upstream",
        send_then(b"SSH-2.0-OpenSSH_9.2\r\n\r\n"),
    ),
    Row(
        "bad-status-line",
        502,
        "http_protocol_error",
        "proxy",
        "upstream",
        send_then(b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n"),
    ),
    Row(
        "status-below-100",  # three digits, so llhttp takes it; RFC 9110 §15: 100..599
        502,
        "http_protocol_error",
        "proxy",
        "upstream",
        send_then(b"HTTP/1.1 099 OK\r\nContent-Length: 2\r\n\r\nok"),
    ),
    Row(
        "nul-in-header",
        502,
        "http_protocol_error",
        "proxy",
        "upstream",
        send_then(b"HTTP/1.1 200 OK\r\nX-Bad: a\x00b\r\nContent-Length: 0\r\n\r\n"),
    ),
    Row(
        "closed-inside-head",
        502,
        "http_protocol_error",
        "proxy",
        "upstream",
        send_then(b"HTTP/1.1 200 OK\r\nContent-Le", "close"),
    ),
    Row(
        "header-section-too-large",
        502,
        "http_response_header_section_size",
        "proxy",
        "upstream",
        send_then(
            b"HTTP/1.1 200 OK\r\n"
            + b"X-Big: "
            + b"a" * 4000
            + b"\r\n" * 1
            + b"Content-Length: 0\r\n\r\n"
        ),
        overrides={"limits.max_response_header_bytes": 1024},
    ),
    Row(
        "no-response-in-time",
        504,
        "http_response_timeout",
        "proxy",
        "upstream",
        send_then(b"", "stall"),
        overrides=FAST,
    ),
    # -- upstream, mid-body: the client must see an abort, never a clean end
    Row(
        "closed-mid-body-length",
        None,
        "http_response_incomplete",
        "origin",
        "upstream",
        mid_body(OK_HEAD, b"x" * 100, "close"),
        log_status=200,
    ),
    Row(
        "reset-mid-body-chunked",
        None,
        "http_response_incomplete",
        "origin",
        "upstream",
        mid_body(CHUNKED_HEAD, b"5\r\nhello\r\n", "reset"),
        log_status=200,
    ),
    Row(
        "closed-mid-body-chunked",
        None,
        "http_response_incomplete",
        "origin",
        "upstream",
        mid_body(CHUNKED_HEAD, b"5\r\nhello\r\n", "close"),
        log_status=200,
    ),
    Row(
        "stalled-mid-body",
        None,
        "connection_read_timeout",
        "origin",
        "upstream",
        mid_body(OK_HEAD, b"x" * 100, "stall"),
        overrides=FAST,
        log_status=200,
    ),
    Row(
        "bad-chunk-mid-body",
        None,
        "http_protocol_error",
        "origin",
        "upstream",
        mid_body(CHUNKED_HEAD, b"5\r\nhello\r\n", "garbage"),
        log_status=200,
    ),
    Row(
        "close-delimited-to-http10",
        200,
        None,
        "origin",
        "origin",
        send_then(b"HTTP/1.1 200 OK\r\n\r\nall of it", "close"),
        request=b"GET /row HTTP/1.0\r\n\r\n",
    ),
    # -- upgrades
    Row(
        "upgrade-101-without-upgrade-header",
        502,
        "http_upgrade_failed",
        "proxy",
        "upstream",
        send_then(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n\r\n", "stall"),
        request=b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    ),
    Row(
        "upgrade-closed-during-handshake",
        502,
        "http_upgrade_failed",
        "proxy",
        "upstream",
        send_then(b"", "close"),
        request=b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    ),
    # -- the client's own faults
    Row(
        "malformed-request-line",
        400,
        "http_request_error",
        "proxy",
        "client",
        send_then(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
        request=b"GET /a b c HTTP/1.1\r\nHost: a\r\n\r\n",
    ),
    Row(
        "content-length-and-chunked",
        400,
        "http_request_error",
        "proxy",
        "client",
        send_then(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
        request=b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    Row(
        "body-over-limit",
        413,
        "http_request_error",
        "proxy",
        "client",
        send_then(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
        request=b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n" + b"x" * 100,
        overrides={"limits.max_request_body_bytes": 10},
    ),
    Row(
        "chunked-body-over-limit",
        413,
        "http_request_error",
        "proxy",
        "client",
        send_then(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
        request=b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"20\r\n" + b"x" * 32 + b"\r\n0\r\n\r\n",
        overrides={"limits.max_request_body_bytes": 10},
    ),
    Row(
        "headers-over-limit",
        431,
        "http_request_error",
        "proxy",
        "client",
        send_then(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
        request=b"GET / HTTP/1.1\r\nHost: a\r\nCookie: " + b"c" * 3000 + b"\r\n\r\n",
        overrides={"limits.max_request_header_bytes": 1024},
    ),
]


@pytest.fixture
async def tls_material(tmp_path):
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return ca, str(ca_file)


@contextlib.contextmanager
def full_backlog_listener():
    """A loopback listener that never accepts, its backlog full: connects hang."""
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(0)
    address = listener.getsockname()
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(address)
        fillers.append(filler)
    try:
        yield f"http://{LOOPBACK}:{address[1]}"
    finally:
        for s in [*fillers, listener]:
            s.close()


async def exchange(port: int, request: bytes, timeout: float = 5.0) -> tuple[bytes, str]:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write(request)
    try:
        return await read_until_reset(reader, timeout)
    finally:
        writer.close()


def check_proxy_status(value: str | None, row: Row, status: int) -> None:
    assert value is not None
    ours = proxy_status_members(value)[-1]
    assert ours.startswith("faultline; ")
    if row.error is None:
        assert f"received-status={status}" in ours
    else:
        assert f"error={row.error}" in ours


async def upstream_of(row: Row, origin_factory, stack: contextlib.ExitStack, script=None) -> str:
    """The upstream a row scripts (`script`: its origin script, as the caller wraps it)."""
    if row.upstream == "refused":
        return f"http://{LOOPBACK}:{free_port()}"
    if row.upstream == "full-backlog":
        return stack.enter_context(full_backlog_listener())
    if row.upstream is not None:
        return row.upstream
    assert row.script is not None
    return (await origin_factory(script or row.script)).url


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
async def test_fault_matrix(row: Row, origin_factory):
    stack = contextlib.ExitStack()
    upstream = await upstream_of(row, origin_factory, stack)
    with stack:
        proxy = await start_proxy(upstream, **row.overrides)
        try:
            data, ending = await exchange(proxy.port, row.request)
            record = await proxy.last_log()
        finally:
            await proxy.server.close()
    responses, unfinished = parse_responses(data)
    if row.status is None:
        # Aborted: the head went out, then a reset; never a complete message.
        assert ending == "reset", (ending, data[:200])
        assert data.startswith(b"HTTP/1.1 200")
        assert not responses and unfinished
        status = record["status"]
    else:
        assert responses, data[:300]
        response = responses[0]
        assert response.status == row.status
        check_proxy_status(response.header("Proxy-Status"), row, row.status)
        assert response.header("Server-Timing")
        assert response.header("X-Request-Id") == record["request_id"]
        status = row.status
        if row.source == "proxy":
            assert response.header("Content-Type") == "application/problem+json"
            check_problem(row, response.json(), record)
    check_record(row, record, status)


def check_problem(row: Row, problem: dict[str, Any], record: dict[str, Any]) -> None:
    """A proxy-made answer's problem+json body, for a row (both protocols)."""
    assert problem["error"] == row.error
    assert problem["layer"] == row.layer
    assert problem["status"] == row.status
    assert problem["request_id"] == record["request_id"]
    assert problem["check_first"]
    check_detail(problem["detail"], problem["check_first"])
    assert problem["detail"][0].isupper() and problem["detail"].endswith(".")


def check_record(row: Row, record: dict[str, Any], status: int) -> None:
    """A row's access-log record: status, fault, who and where (both protocols)."""
    if record["details"]:
        check_detail(record["details"])
    setting = TIMEOUT_SETTINGS.get(row.error or "")
    if setting in row.overrides:
        # The fact names the configured value and its key: "... 300ms (timeouts.connect)".
        assert f"{row.overrides[setting]} ({setting})" in record["details"], record["details"]
    assert record["status"] == (row.log_status or status)
    assert record["error"] == row.error
    assert record["source"] == row.source
    assert record["layer"] == row.layer


# -- rows that need more than a script ------------------------------------------------------------


async def test_dns_error_carries_the_rcode():
    proxy = await start_proxy("http://faultline-test.invalid:80")
    try:
        data, _ = await exchange(proxy.port, GET)
    finally:
        await proxy.server.close()
    (response,), _ = parse_responses(data)
    assert 'rcode="NXDOMAIN"' in response.header("Proxy-Status")


async def test_tls_upstream_with_a_trusted_ca_is_served(tls_material, origin_factory):
    ca, ca_file = tls_material
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    origin = await ScriptedOrigin(
        send_then(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"), ssl=server_context
    ).start()
    proxy = await start_proxy(origin.url, **{"tls.ca_file": ca_file})
    try:
        data, _ = await exchange(proxy.port, GET)
        record = await proxy.last_log()
    finally:
        await proxy.server.close()
        await origin.close()
    (response,), _ = parse_responses(data)
    assert response.status == 200 and response.body == b"ok"
    assert record["phases_ms"]["tls"] is not None


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("untrusted-ca", "tls_certificate_error"),
        ("wrong-name", "tls_certificate_error"),
        ("not-tls", "tls_protocol_error"),
    ],
)
async def test_tls_faults(case, error, tls_material):
    ca, ca_file = tls_material
    overrides: dict[str, Any] = {"tls.ca_file": ca_file}
    server_context: ssl.SSLContext | None = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    assert server_context is not None
    if case == "untrusted-ca":
        trustme.CA().issue_cert("127.0.0.1").configure_cert(server_context)
    elif case == "wrong-name":
        ca.issue_cert("other.test").configure_cert(server_context)
    else:
        server_context = None

    async def plain_http(conn: OriginConnection) -> None:
        await conn.reader.read(100)  # a ClientHello, not a request: answer like HTTP would
        conn.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await conn.drain()
        conn.close()

    script = plain_http if server_context is None else send_then(b"HTTP/1.1 200 OK\r\n\r\n")
    origin = await ScriptedOrigin(script, ssl=server_context).start()
    upstream = origin.url.replace("http://", "https://")
    proxy = await start_proxy(upstream, **overrides)
    try:
        data, _ = await exchange(proxy.port, GET)
        record = await proxy.last_log()
    finally:
        await proxy.server.close()
        await origin.close()
    (response,), _ = parse_responses(data)
    assert response.status == 502
    assert f"error={error}" in response.header("Proxy-Status")
    assert (record["error"], record["layer"], record["source"]) == (error, "transport", "proxy")


async def test_proxy_loop_is_detected():
    port = free_port()
    proxy = await start_proxy(f"http://{LOOPBACK}:{port}", listen=f"{LOOPBACK}:{port}")
    try:
        data, _ = await exchange(proxy.port, GET)
        await proxy.settle()
        records = proxy.access_log()
    finally:
        await proxy.server.close()
    (response,), _ = parse_responses(data)
    assert response.status == 502
    members = proxy_status_members(response.header("Proxy-Status"))
    # The inner hop (closest to the "origin") found the loop; the outer one relayed it.
    assert "error=proxy_loop_detected" in members[0]
    assert "received-status=502" in members[-1]
    inner = next(r for r in records if r["error"] == "proxy_loop_detected")
    assert (inner["source"], inner["layer"], inner["status"]) == ("proxy", "proxy", 502)


async def test_in_flight_limit_answers_503_with_retry_after(origin_factory):
    origin = await origin_factory(send_then(b"", "stall"))
    proxy = await start_proxy(origin.url, **{"limits.max_in_flight": 1})
    try:
        _reader, writer = await asyncio.open_connection(LOOPBACK, proxy.port)
        writer.write(GET)
        await asyncio.sleep(0.2)  # the first exchange now holds the only slot
        data, _ = await exchange(proxy.port, GET)
        writer.close()
        await proxy.settle()
        records = proxy.access_log()
    finally:
        await proxy.server.close()
    (response,), _ = parse_responses(data)
    assert response.status == 503
    assert response.header("Retry-After") == "1"
    assert "error=connection_limit_reached" in response.header("Proxy-Status")
    limited = [r for r in records if r["error"] == "connection_limit_reached"]
    assert limited and limited[0]["layer"] == "proxy"


async def test_waiting_for_a_pool_slot_has_its_own_timeout(origin_factory):
    origin = await origin_factory(send_then(b"", "stall"))
    proxy = await start_proxy(
        origin.url, **{"pool.max_connections": 1, "timeouts.pool_wait": "200ms"}
    )
    try:
        _reader, writer = await asyncio.open_connection(LOOPBACK, proxy.port)
        writer.write(GET)
        await asyncio.sleep(0.2)
        data, _ = await exchange(proxy.port, GET)
        writer.close()
    finally:
        await proxy.server.close()
    (response,), _ = parse_responses(data)
    assert response.status == 503
    assert "error=connection_limit_reached" in response.header("Proxy-Status")
    detail = response.json()["detail"]
    check_detail(detail)
    assert "200ms (timeouts.pool_wait)" in detail, detail


@interpreted_only
async def test_internal_defect_is_a_500_with_the_traceback_only_in_the_log(
    origin_factory, monkeypatch, caplog
):
    """Fault injection into our own code: a header builder that raises stands for any
    defect; the client gets a plain 500, the log gets the traceback."""
    from proxy.http1.headers import HeaderPolicy

    def defect(self, *args):
        raise RuntimeError("deliberate defect /secret/path")

    monkeypatch.setattr(HeaderPolicy, "received_status", defect)
    origin = await origin_factory(send_then(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
    proxy = await start_proxy(origin.url)
    try:
        data, _ = await exchange(proxy.port, GET)
        record = await proxy.last_log()
        # The proxy keeps serving afterwards.
        monkeypatch.undo()
        again, _ = await exchange(proxy.port, GET)
    finally:
        await proxy.server.close()
    (response,), _ = parse_responses(data)
    assert response.status == 500
    assert b"deliberate" not in data and b"/secret/path" not in data and b"Traceback" not in data
    assert "error=proxy_internal_error" in response.header("Proxy-Status")
    assert (record["error"], record["layer"]) == ("proxy_internal_error", "proxy")
    assert any("deliberate defect" in str(r.exc_info) for r in caplog.records if r.exc_info)
    assert parse_responses(again)[0][0].status == 200


async def test_a_defect_in_one_sink_spares_the_others_and_the_proxy(
    origin_factory, monkeypatch, caplog
):
    """Finished exchanges are settled into stats, log and observers in batches: a defect in
    the stats must not cost the access log its lines, nor stop the proxy serving."""
    from proxy.telemetry.stats import Stats

    def defect(self, batch):
        raise RuntimeError("deliberate defect in the stats")

    monkeypatch.setattr(Stats, "record_batch", defect)
    origin = await origin_factory(send_then(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
    proxy = await start_proxy(origin.url)
    try:
        data, _ = await exchange(proxy.port, GET)
        record = await proxy.last_log()  # settles: the stats sink fails, the log still writes
        again, _ = await exchange(proxy.port, GET)
    finally:
        await proxy.server.close()
    assert parse_responses(data)[0][0].status == 200 and record["status"] == 200
    assert parse_responses(again)[0][0].status == 200
    assert any("deliberate defect in the stats" in str(r.exc_info) for r in caplog.records)


async def test_slow_client_headers_get_408(origin_factory):
    origin = await origin_factory(send_then(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
    proxy = await start_proxy(origin.url, **{"timeouts.client_headers": "300ms"})
    try:
        data, _ = await exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: a\r\n", timeout=5)
        record = await proxy.last_log()
    finally:
        await proxy.server.close()
    (response,), _ = parse_responses(data)
    assert response.status == 408
    assert (record["status"], record["error"], record["layer"]) == (
        408,
        "http_request_error",
        "client",
    )
    assert origin.connections == 0
    check_detail(response.json()["detail"])
    assert "300ms (timeouts.client_headers)" in record["details"], record["details"]


async def test_slow_client_body_gets_408(origin_factory):
    async def script(conn: OriginConnection) -> None:
        await conn.hold(10)

    origin = await origin_factory(script)
    proxy = await start_proxy(origin.url, **{"timeouts.client_body": "300ms"})
    try:
        data, _ = await exchange(
            proxy.port, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc"
        )
        record = await proxy.last_log()
    finally:
        await proxy.server.close()
    (response,), _ = parse_responses(data)
    assert response.status == 408
    assert (record["status"], record["error"]) == (408, "http_request_error")
    check_detail(response.json()["detail"])
    assert "300ms (timeouts.client_body)" in record["details"], record["details"]


async def test_client_that_leaves_is_logged_as_499(origin_factory):
    origin = await origin_factory(send_then(b"", "stall"))
    proxy = await start_proxy(origin.url)
    try:
        _reader, writer = await asyncio.open_connection(LOOPBACK, proxy.port)
        writer.write(GET)
        await asyncio.sleep(0.2)
        writer.close()
        record = await proxy.last_log()
    finally:
        await proxy.server.close()
    assert (record["status"], record["source"], record["layer"], record["error"]) == (
        499,
        "client",
        "client",
        "client_closed_request",
    )


async def test_origin_proxy_status_is_kept_and_ours_appended_last(origin_factory):
    origin = await origin_factory(
        send_then(
            b"HTTP/1.1 502 Bad Gateway\r\nProxy-Status: envoy; error=connection_refused\r\n"
            b"Content-Length: 0\r\n\r\n"
        )
    )
    proxy = await start_proxy(origin.url)
    try:
        data, _ = await exchange(proxy.port, GET)
        record = await proxy.last_log()
    finally:
        await proxy.server.close()
    (response,), _ = parse_responses(data)
    members = proxy_status_members(response.header("Proxy-Status"))
    assert members[0] == "envoy; error=connection_refused"
    assert members[-1].startswith("faultline; received-status=502")
    assert (record["source"], record["error"]) == ("origin", None)


async def test_browser_gets_an_html_page_that_explains_the_fault():
    proxy = await start_proxy(f"http://{LOOPBACK}:{free_port()}")
    try:
        data, _ = await exchange(
            proxy.port,
            b"GET / HTTP/1.1\r\nHost: a\r\nAccept: text/html,application/xhtml+xml,*/*;q=0.8\r\n"
            + CLOSE
            + b"\r\n",
        )
    finally:
        await proxy.server.close()
    (response,), _ = parse_responses(data)
    assert response.status == 502
    assert response.header("Content-Type").startswith("text/html")
    page = response.body.decode()
    assert "made by the proxy" in page
    assert "connection_refused" in page and "Check first" in page
    assert "Traceback" not in page
