"""The response side of one HTTP/2 stream: what the core sends for its exchange becomes
HEADERS and DATA frames through h2 (the core's `ResponseSink`, one per stream).

Rules:
1. DATA never exceeds what the peer's flow-control window allows: what does not fit waits
   here, and over `BUFFER_HIGH_BYTES` the origin's connection stops being read until the
   client opens its window again (`WindowUpdated`), so a stalled reader holds back its own
   stream only.
2. A cut response ends in RST_STREAM (INTERNAL_ERROR), never in END_STREAM.
3. Field names go out lower-cased; the proxy's own fields are the same values as on
   HTTP/1.1 (`proxy.forward.fields`).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Final, Protocol

from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import H2Error

from .. import replies
from ..diagnosis import grpc
from ..diagnosis.faults import Fault, FaultInfo
from ..forward.codec import ResponseHead, ResponseSink
from ..forward.fields import proxy_status_error, server_timing

if TYPE_CHECKING:
    from ..forward.context import ForwardContext
    from ..forward.forwarder import Forwarder

BUFFER_HIGH_BYTES: Final = 256 * 1024  # response bytes held for one stream's window
BUFFER_LOW_BYTES: Final = 64 * 1024
# Response bytes a stream takes in before it sends them without waiting for the end of the
# origin's read (below it, the body and its end leave together).
EAGER_BYTES: Final = 64 * 1024


class Flags(Protocol):
    proxy_status: bool  # Proxy-Status on proxy-made replies
    server_timing: bool


class Connection(Protocol):
    """What a stream's sink needs of its connection (`H2ClientConnection`)."""

    h2: H2Connection

    @property
    def ctx(self) -> ForwardContext: ...
    @property
    def shared(self) -> Flags: ...

    @property
    def waiting(self) -> dict[int, StreamSink]: ...

    def flush(self) -> None: ...
    def exchange_of(self, stream_id: int) -> Forwarder | None: ...


def fields_of(prefix: bytes) -> list[tuple[bytes, bytes]]:
    """HTTP/2 fields for an HTTP/1.1 client's head lines (the status line skipped)."""
    out = []
    for line in prefix.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            out.append((name.strip().lower(), value.strip()))
    return out


class StreamSink(ResponseSink):
    """Writes one stream's response through its connection's h2 state machine."""

    __slots__ = (
        "buffered", "chunks", "conn", "ended", "head", "holding", "stream_id", "trailers",
    )  # fmt: skip

    def __init__(self, conn: Connection, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.chunks: list[bytes] = []  # DATA waiting for the peer's window
        self.buffered = 0
        self.ended = False  # END_STREAM is due once the chunks are out
        self.holding: Forwarder | None = None  # the exchange whose origin reads are paused
        self.trailers: list[tuple[bytes, bytes]] | None = None  # sent as the end, if any
        self.head: list[tuple[bytes, bytes]] | None = None  # the response head, not sent yet

    def send_interim(self, ex: Forwarder, status: int, head: ResponseHead) -> None:
        pass  # 1xx are not relayed on HTTP/2 streams (the final response follows)

    def send_head(self, ex: Forwarder, status: int, head: ResponseHead, now: int) -> None:
        fields = [(b":status", b"%d" % status), *fields_of(head.prefix)]
        if self.conn.shared.server_timing:
            timing = server_timing(ex.connect_ns(), ex.ttfb_ns(), ex.own_ns(now), ex.wait_ns())
            fields.append((b"server-timing", timing))
        fields.append((b"x-request-id", ex.request_id.encode()))
        # Held until DATA, a flush or the end: a response that ends with its head (gRPC's
        # trailers-only) must go out as one HEADERS frame with END_STREAM.
        self.head = fields

    def send_data(self, data: bytes) -> None:
        if data:
            self.chunks.append(data)
            self.buffered += len(data)
            if self.buffered > EAGER_BYTES:
                self.pump()
            # else it goes at the end of this origin read (`flush`), or with the end: a body
            # that ends in the same read carries END_STREAM on its last DATA frame

    def send_end(self) -> None:
        self.ended = True
        self.pump()
        self.conn.flush()

    def flush(self) -> None:
        if self.head is not None or self.chunks:
            self.pump()  # the head goes out now (a slow body must not hold it back)
        self.conn.flush()

    def send_trailers(self, fields: list[tuple[bytes, bytes]]) -> None:
        self.trailers = fields  # END_STREAM comes with them, after the last DATA

    def send_reply(
        self, ex: Forwarder, row: FaultInfo, detail: str | None, params: dict[str, str] | None
    ) -> None:
        conn = self.conn
        shared = conn.shared
        ctx = ex.ctx  # a route's, when routes chose one
        request = ex.head
        if ex.grpc_status is not None:
            self._grpc_reply(ex, row, detail, params)
            return
        head_only = request is not None and request.method == b"HEAD"
        accept = request.accept if request is not None and not head_only else None
        body, content_type = replies.body(
            row, ex.request_id, detail, ctx.upstream, ctx.proxy_name, accept
        )
        assert row.status is not None
        fields = [
            (b":status", b"%d" % row.status),
            (b"content-type", content_type),
            (b"content-length", b"%d" % len(body)),
            (b"cache-control", b"no-store"),
        ]
        if shared.proxy_status:
            next_hop = (
                ctx.upstream_authority if row.layer.value in ("transport", "upstream") else None
            )
            value = proxy_status_error(ctx.proxy_name, row.token, detail, next_hop, params)
            fields.append((b"proxy-status", value))
        if shared.server_timing:
            timing = server_timing(ex.connect_ns(), ex.ttfb_ns(), ex.own_ns(0), ex.wait_ns())
            fields.append((b"server-timing", timing))
        fields.append((b"x-request-id", ex.request_id.encode()))
        if row.token == Fault.CONNECTION_LIMIT_REACHED.value:
            fields.append((b"retry-after", b"%d" % replies.RETRY_AFTER_S))
        if head_only or not body:
            self._headers(fields, end=True)
        else:
            self._headers(fields, end=False)
            self.send_data(body)
            self.ended = True
            self.pump()
        conn.flush()

    def _grpc_reply(
        self, ex: Forwarder, row: FaultInfo, detail: str | None, params: dict[str, str] | None
    ) -> None:
        """A failed gRPC call as gRPC clients expect it: HTTP 200, application/grpc,
        trailers-only (one HEADERS with END_STREAM), grpc-status and a grpc-message that
        says the proxy made it; Proxy-Status carries the token as on any reply."""
        conn = self.conn
        ctx = ex.ctx  # a route's, when routes chose one
        fields = [
            (b":status", b"200"),
            (b"content-type", b"application/grpc"),
            (b"grpc-status", b"%d" % (ex.grpc_status or 0)),
            (b"grpc-message", grpc.percent_encode(ex.grpc_message or row.token)),
        ]
        if conn.shared.proxy_status:
            next_hop = (
                ctx.upstream_authority if row.layer.value in ("transport", "upstream") else None
            )
            value = proxy_status_error(ctx.proxy_name, row.token, detail, next_hop, params)
            fields.append((b"proxy-status", value))
        fields.append((b"x-request-id", ex.request_id.encode()))
        self._headers(fields, end=True)
        conn.flush()

    def send_raw(self, data: bytes) -> None:
        self.abort()  # no tunnels on an HTTP/2 stream (no Upgrade is ever forwarded)

    def abort(self) -> None:
        self.head = None
        self.chunks = []
        self.buffered = 0
        self.ended = False
        self.conn.waiting.pop(self.stream_id, None)
        with contextlib.suppress(H2Error):  # the stream is closed already
            self.conn.h2.reset_stream(self.stream_id, ErrorCodes.INTERNAL_ERROR)
        self.conn.flush()

    # -- flow control ------------------------------------------------------------------------

    def pump(self) -> None:
        """Send what the peer's window allows; END_STREAM after the last chunk."""
        h2 = self.conn.h2
        stream_id = self.stream_id
        chunks = self.chunks
        try:
            head = self.head
            if head is not None:
                self.head = None
                ends = self.ended and not chunks and self.trailers is None
                if ends:
                    self.ended = False
                h2.send_headers(stream_id, head, end_stream=ends)
            while chunks:
                window = min(h2.local_flow_control_window(stream_id), h2.max_outbound_frame_size)
                if window <= 0:
                    break
                chunk = chunks[0]
                if len(chunk) > window:
                    chunks[0] = chunk[window:]
                    chunk = chunk[:window]
                else:
                    chunks.pop(0)
                self.buffered -= len(chunk)
                last = self.ended and not chunks and self.trailers is None
                if last:
                    self.ended = False  # END_STREAM on the last DATA, not an empty frame
                h2.send_data(stream_id, chunk, end_stream=last)
            if self.ended and not chunks:
                self.ended = False
                if self.trailers is not None:
                    h2.send_headers(stream_id, self.trailers, end_stream=True)
                else:
                    h2.end_stream(stream_id)
        except H2Error:
            chunks.clear()  # the client reset the stream: StreamReset ends the exchange
            self.buffered = 0
            self.ended = False
        if chunks or self.ended:
            self.conn.waiting[stream_id] = self  # WindowUpdated pumps it again
        else:
            self.conn.waiting.pop(stream_id, None)
        self._back_pressure()

    def _back_pressure(self) -> None:
        holding = self.holding
        if holding is None and self.buffered > BUFFER_HIGH_BYTES:
            fw = self.conn.exchange_of(self.stream_id)
            if fw is not None:
                self.holding = fw
                fw.client_write_paused(True)
        elif holding is not None and self.buffered < BUFFER_LOW_BYTES:
            self.holding = None
            holding.client_write_paused(False)

    def _headers(self, fields: list[tuple[bytes, bytes]], end: bool) -> None:
        with contextlib.suppress(
            H2Error
        ):  # the client reset the stream: StreamReset ends the exchange
            self.conn.h2.send_headers(self.stream_id, fields, end_stream=end)
