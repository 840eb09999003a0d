"""The response side of the HTTP/1.1 client codec: every byte a client connection is sent
(the core's `ResponseSink`).

Rules:
1. One writer per client connection, writing for its current exchange only; what one
   origin read produced leaves in one write (`flush`, through the outbox).
2. A response is framed here, chosen once per response: as the origin framed it
   (Content-Length), re-chunked for an HTTP/1.1 client when its length is unknown or
   the origin chunked it, or delimited by closing the connection for an HTTP/1.0 one.
3. A cut response ends in a reset (`abort`), never in a clean end.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from typing import TYPE_CHECKING, Any, Final

from .. import replies
from ..base.text import MS_TABLE, MS_TABLE_SIZE, http_date
from ..diagnosis.faults import Fault, FaultInfo
from ..forward.codec import ResponseSink
from ..forward.context import ForwardContext
from ..forward.fields import ST_PROXY_DESC, ST_TTFB_DESC
from .headers import CONTENT_LENGTH_FIELDS, HeaderPolicy, OriginHead, filter_response_block

if TYPE_CHECKING:
    from ..forward.forwarder import Forwarder

_LINGER_RST: Final = struct.pack("ii", 1, 0)
_NO_BODY_STATUSES: Final = frozenset({204, 304})
# The common Server-Timing line (a pooled connection), in pieces around the two durations.
_ST_TTFB_TO_PROXY: Final = ST_TTFB_DESC + b", proxy;dur="
_ST_PROXY_END: Final = ST_PROXY_DESC + b"\r\n"
_HEAD_LINES_BYTES: Final = 512  # what send_head adds to the prefix, at most (for the outbox)


def abort_with_rst(transport: Any) -> None:
    """Close so the peer sees a reset, never a clean end of a (cut) message."""
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    transport.abort()


class ResponseWriter(ResponseSink):
    """Writes the current exchange's response to one client connection."""

    __slots__ = ("chunked", "ctx", "headers", "out", "out_bytes", "transport")

    def __init__(self, ctx: ForwardContext, headers: HeaderPolicy) -> None:
        self.ctx = ctx
        self.headers = headers
        self.transport: Any = None
        self.out: list[bytes] = []  # response bytes, written once per upstream read
        self.out_bytes = 0
        self.chunked = False  # the current response's body goes out chunked

    def send_interim(self, ex: Forwarder, status: int, head: OriginHead) -> None:
        """A 1xx (not 101): relayed to HTTP/1.1 clients, then the real response follows."""
        request = ex.head
        if request is None or not request.http11:
            return  # RFC 9110 §15.2: no 1xx to an HTTP/1.0 client
        raw = head.raw
        line_end = raw.find(b"\r\n") + 2
        block = filter_response_block(raw, line_end)[0] if status != 100 else b""
        data = b"HTTP/1.1 " + raw[9:line_end] + block + b"\r\n"
        self.out.append(data)
        self.out_bytes += len(data)

    def send_head(self, ex: Forwarder, status: int, head: OriginHead, now: int) -> None:
        """The origin's response head, with what the proxy adds: Proxy-Status and Via (in
        the memoised prefix), framing, Server-Timing, the request id, Connection."""
        request = ex.head
        assert request is not None
        hp = self.headers
        prefix = head.prefix
        fields = head.fields
        out = self.out
        out.append(prefix)
        self.chunked = False
        if fields is not CONTENT_LENGTH_FIELDS:
            if status == 101:
                out.append(b"Connection: upgrade\r\nUpgrade: " + fields.upgrade + b"\r\n")
            elif request.method == b"HEAD" or status in _NO_BODY_STATUSES:
                pass
            elif fields.chunked or not fields.content_length or fields.codings:
                if request.http11:
                    self.chunked = True
                    codings = fields.codings
                    out.append(
                        b"Transfer-Encoding: " + codings + b", chunked\r\n"
                        if codings
                        else b"Transfer-Encoding: chunked\r\n"
                    )
                else:
                    ex.close_after = True  # HTTP/1.0: the body ends when we close
        if hp.server_timing:
            if ex.t_connect or ex.t_pool:
                out.append(hp.timing(ex.connect_ns(), ex.ttfb_ns(), ex.own_ns(now), ex.wait_ns()))
            else:  # a pooled connection: the proxy's own time is everything before sending
                t_sent = ex.t_sent
                ttfb_us = (now - t_sent) // 1000
                own_us = (t_sent - ex.t_start) // 1000
                if ttfb_us < MS_TABLE_SIZE and own_us < MS_TABLE_SIZE:
                    out += (
                        b"Server-Timing: ttfb;dur=",
                        MS_TABLE[ttfb_us],
                        _ST_TTFB_TO_PROXY,
                        MS_TABLE[own_us],
                        _ST_PROXY_END,
                    )
                else:
                    out.append(hp.timing(0, now - t_sent, t_sent - ex.t_start))
        out.append(ex.request_id_line)
        if ex.close_after:
            out.append(b"Connection: close\r\n\r\n")
        elif not request.http11:
            out.append(b"Connection: keep-alive\r\n\r\n")
        else:
            out.append(b"\r\n")
        self.out_bytes += len(prefix) + _HEAD_LINES_BYTES

    def send_data(self, data: bytes) -> None:
        size = len(data)
        if self.chunked:
            self.out += (b"%x\r\n" % size, data, b"\r\n")
        else:
            self.out.append(data)
        self.out_bytes += size

    def send_end(self) -> None:
        out = self.out
        if self.chunked:
            self.chunked = False
            out.append(b"0\r\n\r\n")
        if out:  # flush(), inlined: once per exchange
            self.out = []
            self.ctx.outbox.send(self.transport, out, self.out_bytes)
            self.out_bytes = 0

    def flush(self) -> None:
        out = self.out
        if out:
            self.out = []
            self.ctx.outbox.send(self.transport, out, self.out_bytes)
            self.out_bytes = 0

    def send_raw(self, data: bytes) -> None:
        self.ctx.outbox.send(self.transport, [data], len(data))

    def abort(self) -> None:
        self.out = []
        self.out_bytes = 0
        self.chunked = False
        abort_with_rst(self.transport)

    def send_reply(
        self, ex: Forwarder, row: FaultInfo, detail: str | None, params: dict[str, str] | None
    ) -> None:
        """The whole response (head and body) for a fault the proxy answers itself."""
        ctx = ex.ctx  # a route's, when routes chose one: its upstream, next-hop, proxy_name
        hp = self.headers
        request = ex.head
        assert row.status is not None
        head_only = request is not None and request.method == b"HEAD"
        accept = request.accept if request is not None and not head_only else None
        body, content_type = replies.body(
            row, ex.request_id, detail, ctx.upstream, ctx.proxy_name, accept
        )
        lines = [
            b"HTTP/1.1 %d %s\r\n" % (row.status, replies.reason(row.status).encode()),
            b"Date: " + http_date() + b"\r\n",
            b"Content-Type: " + content_type + b"\r\n",
            b"Content-Length: %d\r\n" % len(body),
            b"Cache-Control: no-store\r\n",
        ]
        if hp.proxy_status:
            next_hop = (
                ctx.upstream_authority if row.layer.value in ("transport", "upstream") else None
            )
            lines.append(hp.error_status(row.token, detail, next_hop, params, ctx.proxy_name))
        if hp.server_timing:
            lines.append(hp.timing(ex.connect_ns(), ex.ttfb_ns(), ex.own_ns(0), ex.wait_ns()))
        lines.append(b"X-Request-Id: " + ex.request_id.encode() + b"\r\n")
        if row.token == Fault.CONNECTION_LIMIT_REACHED.value:
            lines.append(b"Retry-After: %d\r\n" % replies.RETRY_AFTER_S)
        if ex.close_after:
            lines.append(b"Connection: close\r\n")
        elif request is not None and not request.http11:
            lines.append(b"Connection: keep-alive\r\n")
        lines.append(b"\r\n")
        if not head_only:
            lines.append(body)
        reply = b"".join(lines)
        # After what is queued already: an interim response of this exchange (a 100
        # Continue before a 502 is valid HTTP) never follows the reply.
        self.out.append(reply)
        self.out_bytes += len(reply)
        self.flush()
