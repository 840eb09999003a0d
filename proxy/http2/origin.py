"""The origin side of the HTTP/2 codec: an `h2c://` upstream (HTTP/2 with prior knowledge),
one exchange at a time per connection (an `OriginConnection` of `proxy.forward.codec`; the
pool keeps several). Multiplexing many exchanges on one connection is still to come.

Rules:
1. The request goes out as HEADERS (the head's HTTP/1.1-style lines as fields, pseudo-fields
   first) and DATA within the origin's window; a request with a known length (or none) is
   ended here, one of unknown length by the core (`send_end`).
2. The response head reaches the client codec as an `OriginHead` (`proxy.forward.heads`):
   the head in HTTP/1.1 form (`raw`, `prefix`), for an HTTP/1.1 client and for the
   diagnosis, with the proxy's Proxy-Status and Via added.
3. Trailers (gRPC's status) go to the core (`on_response_trailers`).
4. RST_STREAM and GOAWAY from the origin are failures of the exchange, classified by the
   phase they came in like any reset.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Final

from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import H2Error, ProtocolError

from .. import replies
from ..base.text import http_date
from ..diagnosis.classify import StreamReset as ResetByPeer
from ..diagnosis.classify import UpstreamProtocolError
from ..forward.codec import RequestHead
from ..forward.fields import proxy_status_received
from ..forward.forwarder import Forwarder
from ..forward.heads import OriginHead, ResponseFields
from ..forward.outbox import Outbox
from ..forward.pool import UpstreamPool

_CONNECTION_SPECIFIC: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te"}
)
_OWN_RESPONSE: Final = frozenset({b"proxy-status", b"via"})


class H2OriginSide:
    """What every HTTP/2 origin connection shares; called with the pool, it makes one."""

    def __init__(
        self, outbox: Outbox, proxy_name: str, authority: str, proxy_status: bool, instance: str
    ) -> None:
        self.outbox = outbox
        self.proxy_status = proxy_status
        self.ps_prefix, self.ps_suffix = proxy_status_received(proxy_name, authority)
        self.via = b"2 " + proxy_name.encode()
        # The comment carries this process's id: seeing it come back means a loop.
        self.via_request = self.via + b" (faultline " + instance.encode() + b")"

    def __call__(self, pool: UpstreamPool) -> H2OriginConnection:
        return H2OriginConnection(pool, self)


class H2OriginConnection(asyncio.Protocol):
    """One HTTP/2 connection to the origin, one stream (exchange) at a time."""

    def __init__(self, pool: UpstreamPool, side: H2OriginSide) -> None:
        self.pool = pool
        self.side = side
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.transport: Any = None
        self.handler: Forwarder | None = None
        self.closed = False
        self.idle_since_ns = 0
        self.bytes_seen = False
        self.close_delimited = False
        self.stream_id = 0
        self.remaining: int | None = None  # request bytes still due (known length)
        self.chunks: list[bytes] = []  # request DATA waiting for the origin's window
        self.ending = False  # END_STREAM is due after the chunks
        self.done = True  # the current response ended (the connection may be reused)

    # -- life cycle ----------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.h2.initiate_connection()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        handler = self.handler
        self.handler = None
        self.pool.on_closed(self, busy=handler is not None)
        if handler is not None and not self.done:
            handler.on_upstream_failed(exc)

    def begin(self, handler: Forwarder, head: RequestHead) -> None:
        self.handler = handler
        self.bytes_seen = False
        self.done = False
        self.chunks = []
        self.stream_id = self.h2.get_next_available_stream_id()
        fields = [
            (b":method", head.method),
            (b":scheme", b"http"),
            (b":authority", head.host or self.pool.host.encode()),
            (b":path", head.target),
        ]
        for line in head.lines:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name not in _CONNECTION_SPECIFIC and name != b"host":
                fields.append((name, value.strip()))
        down = handler.down
        xff = head.xff + b", " + down.client_ip_b if head.xff and down.trusted else down.client_ip_b
        fields.append((b"x-forwarded-for", xff))
        fields.append((b"x-forwarded-proto", b"http"))
        request_id = handler.request_id_line.partition(b":")[2].strip()
        fields.append((b"x-request-id", request_id))
        if head.content_length is not None:
            fields.append((b"content-length", b"%d" % head.content_length))
        if head.grpc:
            fields.append((b"te", b"trailers"))  # gRPC servers require it (PROTOCOL-HTTP2.md)
        via = self.side.via_request
        fields.append((b"via", head.via + b", " + via if head.via else via))
        bodiless = not head.chunked and not head.content_length
        self.remaining = None if head.chunked else (head.content_length or 0)
        self.ending = False
        self.h2.send_headers(self.stream_id, fields, end_stream=bodiless)

    def send_data(self, data: bytes) -> None:
        self.chunks.append(data)
        if self.remaining is not None:
            self.remaining -= len(data)
            if self.remaining <= 0:
                self.ending = True
        self._pump()

    def send_end(self) -> None:
        self.ending = True
        self._pump()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.closed:
            self.side.outbox.send(self.transport, [data], len(data))

    def send_raw(self, chunks: list[bytes]) -> None:
        raise UpstreamProtocolError("no tunnel over an HTTP/2 upstream")

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            with contextlib.suppress(H2Error):
                self.h2.close_connection()
            self.flush()
            self.side.outbox.flush()
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def _pump(self) -> None:
        h2 = self.h2
        sid = self.stream_id
        chunks = self.chunks
        with contextlib.suppress(H2Error):
            while chunks:
                window = min(h2.local_flow_control_window(sid), h2.max_outbound_frame_size)
                if window <= 0:
                    break
                chunk = chunks[0]
                if len(chunk) > window:
                    chunks[0], chunk = chunk[window:], chunk[:window]
                else:
                    chunks.pop(0)
                h2.send_data(sid, chunk)
            if self.ending and not chunks:
                self.ending = False
                h2.end_stream(sid)

    # -- bytes in --------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        handler = self.handler
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:
            self.flush()
            if handler is not None and not self.done:
                if self.h2.state_machine.state is ConnectionState.CLOSED:
                    # A GOAWAY came first in this read (h2 refuses what follows it): the
                    # origin went away, it did not break the protocol.
                    handler.on_upstream_failed(ResetByPeer("GOAWAY"))
                else:
                    handler.on_upstream_failed(UpstreamProtocolError(f"HTTP/2: {exc}"))
            self.abort()
            return
        try:
            for event in events:
                self._event(event)
        except Exception as exc:  # a defect: never let it kill the transport silently
            if handler is not None:
                handler.on_internal_error(exc)
        self.flush()
        handler = self.handler
        if handler is not None and not self.done:
            handler.flush()

    def _event(self, event: object) -> None:
        handler = self.handler
        if isinstance(event, WindowUpdated):
            self._pump()
            return
        if isinstance(event, ConnectionTerminated):
            if handler is not None and not self.done:
                name = _code_name(event.error_code)
                handler.on_upstream_failed(ResetByPeer(f"GOAWAY {name}"))
            self.abort()
            return
        if handler is None or getattr(event, "stream_id", None) != self.stream_id:
            return
        if not isinstance(event, StreamReset):
            self.bytes_seen = True
        if isinstance(event, ResponseReceived):
            head = self._head(event.headers)
            status = int(_pseudo(event.headers, b":status") or b"0")
            if status < 200:
                return  # 1xx: the final response follows
            handler.on_response_head(status, head)
            if event.stream_ended is not None:  # trailers-only (a gRPC error, typically)
                handler.note_trailers(list(event.headers))
        elif isinstance(event, DataReceived):
            with contextlib.suppress(H2Error):
                self.h2.acknowledge_received_data(event.flow_controlled_length, self.stream_id)
            handler.on_response_data(event.data)
        elif isinstance(event, TrailersReceived):
            handler.on_response_trailers(list(event.headers))
        elif isinstance(event, StreamEnded):
            self.done = True
            handler.on_response_end(True)
        elif isinstance(event, StreamReset):
            self.done = True
            name = _code_name(event.error_code)
            handler.on_upstream_failed(ResetByPeer(f"RST_STREAM {name}"))

    def _head(self, headers: list[tuple[bytes, bytes]]) -> OriginHead:
        side = self.side
        status = _pseudo(headers, b":status") or b"502"
        kept = [(n, v) for n, v in headers if n[:1] != b":" and n not in _OWN_RESPONSE]
        upstream_ps = [v for n, v in headers if n == b"proxy-status"]
        via = [v for n, v in headers if n == b"via"]
        lines = [n + b": " + v + b"\r\n" for n, v in kept]
        phrase = replies.reason(int(status)).encode() if status.isdigit() else b""
        raw = b"HTTP/1.1 " + status + b" " + phrase + b"\r\n" + b"".join(lines)
        member = side.ps_prefix + status + side.ps_suffix
        extra = []
        if side.proxy_status:
            extra.append(b"Proxy-Status: " + b", ".join([*upstream_ps, member]) + b"\r\n")
        extra.append(b"Via: " + b", ".join([*via, side.via]) + b"\r\n")
        if not any(n == b"date" for n, _ in kept):
            extra.append(b"Date: " + http_date() + b"\r\n")
        prefix = raw + b"".join(extra)
        length = any(n == b"content-length" for n, _ in kept)
        return OriginHead(raw, prefix, ResponseFields(content_length=length))


def _pseudo(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for n, v in headers:
        if n == name:
            return v
    return None


def _code_name(code: int | None) -> str:
    try:
        return ErrorCodes(code or 0).name
    except ValueError:
        return str(code)
