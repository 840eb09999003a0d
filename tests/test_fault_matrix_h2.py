"""The fault matrix's HTTP/2 twins (issue 19): every row of `test_fault_matrix.ROWS` again,
with the same origin fault (the row's own script or upstream, imported, never copied), but
the client speaks HTTP/2 with prior knowledge (h2c, the `h2` library over a socket).

Each twin asserts what the HTTP/1.1 row asserts, in HTTP/2 terms: the stream's `:status`,
the Proxy-Status member, `Server-Timing`, `X-Request-Id`, the problem document of a
proxy-made reply; and in the record and the log line the same status, `source`, `layer`
and token, plus `protocol` "h2". Where the HTTP/1.1 row expects an aborted response (a
connection reset after the head), the twin expects RST_STREAM (INTERNAL_ERROR) on that
stream, never a clean END_STREAM. Every twin then opens a second stream on the same
connection and gets a complete answer: one stream's fault never costs the connection.

The row's HTTP/1.1 request bytes are read with httptools and sent as the same request on
a stream (method, target, fields, body; `Host` as `:authority`; a chunked body as DATA of
no declared length). Rows added to the matrix get a twin automatically; a row that cannot
have one is named in `NO_TWIN` with its reason, and the test below fails on a `NO_TWIN`
entry that names no row or that this docstring does not list.

Rows with no twin (inherently HTTP/1.1 on the client's side):
- upgrade-101-without-upgrade-header, upgrade-closed-during-handshake: an HTTP/1.1
  Upgrade handshake (WebSocket). HTTP/2 has no Upgrade: `upgrade` and `connection` are
  connection-specific fields, a malformed request on a stream (test_http2).
- malformed-request-line: HTTP/1.1 request-line bytes; HPACK-coded pseudo-fields have no
  request line to break (malformed HTTP/2 heads are test_http2's).
- content-length-and-chunked: request smuggling through HTTP/1.1 framing; HTTP/2 frames
  its bodies itself and `transfer-encoding` is a connection-specific field (test_http2).
- headers-over-limit: on HTTP/2, a header list over `limits.max_request_header_bytes` is
  refused by h2's HPACK decoder (advertised as SETTINGS_MAX_HEADER_LIST_SIZE) as a
  connection error, GOAWAY, before any stream exists to answer 431 on; that defence is
  test_http2's (the HPACK bomb).
"""

from __future__ import annotations

import contextlib
import re

import httptools
import orjson
import pytest
from h2.errors import ErrorCodes
from test_fault_matrix import (
    ROWS,
    Row,
    check_problem,
    check_proxy_status,
    check_record,
    upstream_of,
)
from test_http2 import H2Client

from support import (
    OriginConnection,
    start_proxy,
)

NO_TWIN = {
    "upgrade-101-without-upgrade-header": "an HTTP/1.1 Upgrade handshake; HTTP/2 has none",
    "upgrade-closed-during-handshake": "an HTTP/1.1 Upgrade handshake; HTTP/2 has none",
    "malformed-request-line": "HTTP/1.1 request-line bytes; HTTP/2 has no request line",
    "content-length-and-chunked": "smuggling through HTTP/1.1 framing (Transfer-Encoding)",
    "headers-over-limit": "an oversized header list is a connection error (GOAWAY) on HTTP/2",
}

# Twins that fail because of a defect in a module this test does not own: row id -> the
# defect. They run (strict xfail): the day the defect is fixed, they fail until removed.
KNOWN_DEFECTS: dict[str, str] = {}

# Connection-specific fields of HTTP/1.1 that an HTTP/2 request may not carry.
_HOP_BY_HOP = frozenset({b"host", b"connection", b"keep-alive", b"transfer-encoding", b"upgrade"})


class _Request:
    """An HTTP/1.1 request's parts, as httptools reads them."""

    def __init__(self) -> None:
        self.target = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.body = bytearray()

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self.body += body


def as_h2(raw: bytes) -> tuple[str, str, bytes, tuple[tuple[bytes, bytes], ...]]:
    """The row's HTTP/1.1 request as (method, path, body, fields) for one HTTP/2 stream."""
    parts = _Request()
    parser = httptools.HttpRequestParser(parts)
    parser.feed_data(raw)
    method = parser.get_method().decode()
    fields = tuple((k, v) for k, v in parts.fields if k not in _HOP_BY_HOP)
    return method, parts.target.decode(), bytes(parts.body), fields


def twinned_rows() -> list:
    params = []
    for row in ROWS:
        if row.id in NO_TWIN:
            continue
        marks = []
        if row.id in KNOWN_DEFECTS:
            marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_DEFECTS[row.id]))
        params.append(pytest.param(row, id=row.id, marks=marks))
    return params


def test_every_row_is_twinned_or_says_why_not():
    ids = {row.id for row in ROWS}
    assert set(NO_TWIN) <= ids, f"NO_TWIN names rows the matrix no longer has: {set(NO_TWIN) - ids}"
    assert set(KNOWN_DEFECTS) <= ids - set(NO_TWIN)
    listed = re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)+", __doc__.partition("Rows with no twin")[2])
    for row_id in NO_TWIN:
        assert row_id in listed, f"{row_id}: not listed in the module docstring"
    assert len(twinned_rows()) + len(NO_TWIN) == len(ROWS)


def second_connection_answers(script):
    """The row's fault on the origin's first connection; any later one answers 200 "ok"
    (the second stream's upstream, after the fault cost the first connection)."""

    async def twin(conn: OriginConnection) -> None:
        if conn.index == 0:
            await script(conn)
            return
        while await conn.read_request() is not None:
            await conn.respond(200, b"ok")

    return twin


@pytest.mark.parametrize("row", twinned_rows())
async def test_fault_matrix_h2(row: Row, origin_factory):
    stack = contextlib.ExitStack()
    script = second_connection_answers(row.script) if row.script is not None else None
    upstream = await upstream_of(row, origin_factory, stack, script)
    method, path, body, fields = as_h2(row.request)
    with stack:
        proxy = await start_proxy(upstream, **row.overrides)
        client = await H2Client.connect(proxy.port)
        try:
            sid = client.request(path, method, body, fields)
            await client.send()
            await client.until(lambda: sid in client.ended or sid in client.reset)
            record = await proxy.last_log()
            # The same connection serves another stream afterwards.
            after = client.request("/after")
            await client.send()
            await client.until(lambda: after in client.ended or after in client.reset)
            await proxy.settle()
            records = proxy.access_log()
        finally:
            client.close()
            await proxy.server.close()
    assert client.goaway is None, f"GOAWAY {client.goaway!r}: the connection ended"
    assert after in client.ended and after not in client.reset
    expected_after = 200 if row.script is not None else row.status
    assert client.heads[after][b":status"] == b"%d" % expected_after
    assert len(records) == 2 and records[-1]["request_id"] != record["request_id"]

    head = {k.decode(): v.decode() for k, v in client.heads.get(sid, {}).items()}
    if row.status is None:
        # Aborted: the head went out, then RST_STREAM; never END_STREAM.
        assert sid in client.reset and sid not in client.ended, (client.reset, client.ended)
        assert client.reset[sid] == ErrorCodes.INTERNAL_ERROR, client.reset[sid]
        assert head[":status"] == "200"
        status = record["status"]
    else:
        assert sid in client.ended and sid not in client.reset, client.reset.get(sid)
        assert int(head[":status"]) == row.status
        check_proxy_status(head.get("proxy-status"), row, row.status)
        assert head.get("server-timing")
        assert head.get("x-request-id") == record["request_id"]
        status = row.status
        if row.source == "proxy":
            assert head["content-type"] == "application/problem+json"
            check_problem(row, orjson.loads(bytes(client.bodies[sid])), record)
    assert record["protocol"] == "h2"
    check_record(row, record, status)
    assert (record["method"], record["path"]) == (method, path)
