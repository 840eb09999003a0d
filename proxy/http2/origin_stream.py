"""One exchange on a shared HTTP/2 origin connection: the core's `OriginConnection` for
that exchange, as httpcore's pool hands out a stream of its HTTP/2 connection.

Rules:
1. A stream is opened by its connection (`H2OriginConnection.open_stream`) and lives for
   one exchange. `closed` is True until `begin` (a stream handed to an exchange that had
   already ended goes straight back), False while the exchange runs, True again once the
   response ended or the core let it go: the pool never keeps a stream for reuse.
2. The request goes out as HEADERS and DATA within the origin's window for this stream; a
   request with a known length (or none) is ended here, one of unknown length by the core.
3. Reading a stream is paused by holding back its WINDOW_UPDATE: a slow client holds its own
   stream, never the connection's others (their window is far above the streams' sum).
4. A stream the core lets go before its end is reset (CANCEL): the connection goes on.
5. An RST_STREAM REFUSED_STREAM, or a GOAWAY below the stream's id, means the origin never
   processed the request: the failure says so (`unprocessed`), and the core may send it
   again (RFC 9113 §8.7).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol

from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import H2Error
from h2.stream import StreamState

from ..diagnosis.classify import StreamReset as ResetByPeer
from ..diagnosis.classify import UpstreamProtocolError
from ..forward.codec import RequestHead
from ..forward.forwarder import PENDING_HIGH_BYTES, Forwarder
from ..forward.heads import OriginHead
from .graceful import acknowledge


class Side(Protocol):
    """What a stream needs of the codec's shared part (`H2OriginSide`)."""

    def request_fields(
        self, head: RequestHead, handler: Forwarder, host: str
    ) -> list[tuple[bytes, bytes]]: ...
    def head(self, headers: list[tuple[bytes, bytes]]) -> OriginHead: ...


class Pool(Protocol):
    @property
    def host(self) -> str: ...
    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...


class Connection(Protocol):
    """What a stream needs of its connection (`H2OriginConnection`)."""

    @property
    def h2(self) -> H2Connection: ...
    @property
    def side(self) -> Side: ...
    @property
    def pool(self) -> Pool: ...
    @property
    def transport(self) -> Any: ...
    @property
    def closed(self) -> bool: ...
    @property
    def streams(self) -> dict[int, H2OriginStream]: ...

    def flush(self) -> None: ...
    def stream_released(self) -> None: ...


class H2OriginStream:
    """The origin side of one exchange on an HTTP/2 connection."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.transport: Any = conn.transport
        self.handler: Forwarder | None = None
        self.closed = True  # until `begin`
        self.released = False
        self.idle_since_ns = 0
        self.bytes_seen = False
        self.close_delimited = False
        self.stream_id = 0
        self.remaining: int | None = None  # request bytes still due (known length)
        self.chunks: list[bytes] = []  # request DATA waiting for the origin's window
        self.buffered = 0  # bytes in `chunks`: above PENDING_HIGH_BYTES the client pauses
        self.upload_paused = False
        self.ending = False  # END_STREAM is due after the chunks
        self.done = False  # the response ended or failed: no more events for the core
        self.paused = False
        self.unacked = 0  # response bytes taken while paused, their WINDOW_UPDATE held back

    # -- request -------------------------------------------------------------------------

    def begin(self, handler: Forwarder, head: RequestHead) -> None:
        conn = self.conn
        self.handler = handler
        self.closed = False
        fields = conn.side.request_fields(head, handler, conn.pool.host)
        bodiless = not head.chunked and not head.content_length
        self.remaining = None if head.chunked else (head.content_length or 0)
        try:
            self.stream_id = conn.h2.get_next_available_stream_id()
            conn.h2.send_headers(self.stream_id, fields, end_stream=bodiless)
        except H2Error as exc:
            # The connection cannot take this stream after all (it is going away): the
            # request never left, so it may go again. Reported after `begin` returns.
            error = ResetByPeer(f"stream not opened: {exc}", unprocessed=True)
            conn.pool.loop.call_soon(self.fail, error)
            return
        conn.streams[self.stream_id] = self

    def send_data(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        if self.remaining is not None:
            self.remaining -= len(data)
            if self.remaining <= 0:
                self.ending = True
        self.pump()
        handler = self.handler
        if self.buffered > PENDING_HIGH_BYTES and not self.upload_paused and handler is not None:
            self.upload_paused = True  # the origin's window is shut: the client waits
            handler.upstream_write_paused()

    def send_end(self) -> None:
        self.ending = True
        self.pump()

    def flush(self) -> None:
        self.conn.flush()

    def send_raw(self, chunks: list[bytes]) -> None:
        raise UpstreamProtocolError("no tunnel over an HTTP/2 upstream")

    def pump(self) -> None:
        """Request DATA within the origin's windows, then END_STREAM when it is due."""
        sid = self.stream_id
        if not sid or sid not in self.conn.streams:
            return
        h2 = self.conn.h2
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
                self.buffered -= len(chunk)
            if self.ending and not chunks:
                self.ending = False
                h2.end_stream(sid)
        handler = self.handler
        if self.upload_paused and self.buffered <= PENDING_HIGH_BYTES // 4 and handler is not None:
            self.upload_paused = False
            handler.upstream_write_resumed()

    # -- back-pressure -------------------------------------------------------------------

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False
        if self.unacked:
            size, self.unacked = self.unacked, 0
            self._ack(size)
            self.conn.flush()

    def _ack(self, size: int) -> None:
        acknowledge(self.conn.h2, self.stream_id, size)

    # -- response (called by the connection for this stream's events) --------------------

    def on_head(self, status: int, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        handler = self.handler
        if handler is None or self.done:
            return
        self.bytes_seen = True
        if status < 200:
            return  # 1xx: the final response follows
        handler.on_response_head(status, self.conn.side.head(headers))
        if ended:  # trailers-only (a gRPC error, typically)
            handler.note_trailers(headers)

    def on_data(self, data: bytes, flow_length: int) -> None:
        handler = self.handler
        if handler is None or self.done:
            self._ack(flow_length)
            return
        if self.paused:
            self.unacked += flow_length
        else:
            self._ack(flow_length)
        self.bytes_seen = True
        handler.on_response_data(data)

    def on_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        handler = self.handler
        if handler is not None and not self.done:
            self.bytes_seen = True
            handler.on_response_trailers(headers)

    def on_end(self) -> None:
        handler = self.handler
        if handler is None or self.done:
            return
        self.done = True
        self.closed = True  # never kept for reuse; the core's release lets it go
        handler.on_response_end(True)

    def on_reset(self, code: int | None) -> None:
        name = code_name(code)
        unprocessed = code == ErrorCodes.REFUSED_STREAM
        self.fail(ResetByPeer(f"RST_STREAM {name}", unprocessed=unprocessed))

    def fail(self, error: BaseException | None) -> None:
        handler = self.handler
        if handler is None or self.done:
            return
        self.done = True
        handler.on_upstream_failed(error)

    # -- letting go ------------------------------------------------------------------------

    def close(self) -> None:
        """The core is done with this stream: reset it if it is still open, free its slot."""
        if self.released:
            return
        self.released = True
        self.closed = True
        self.handler = None
        conn = self.conn
        sid = self.stream_id
        if sid and conn.streams.pop(sid, None) is not None and not conn.closed:
            if self.unacked:  # the connection's share of the window comes back
                size, self.unacked = self.unacked, 0
                self._ack(size)
            stream = conn.h2.streams.get(sid)
            if stream is not None and stream.state_machine.state is not StreamState.CLOSED:
                with contextlib.suppress(H2Error):
                    conn.h2.reset_stream(sid, ErrorCodes.CANCEL)
                conn.flush()
        conn.stream_released()

    def abort(self) -> None:
        self.close()


def code_name(code: int | None) -> str:
    try:
        return ErrorCodes(code or 0).name
    except ValueError:
        return str(code)
