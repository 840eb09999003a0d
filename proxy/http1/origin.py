"""The origin side of the HTTP/1.1 codec: one connection to the origin per
`UpstreamConnection` (an `OriginConnection` of `proxy.forward.codec`).

Rules:
1. The connection writes the exchange's request (head, body framed as its head says) and
   parses the response with httptools, reporting events to its current handler (the
   exchange's `Forwarder`): head, body, completion, failure. It never decides a fault.
2. Completion is delivered after `feed_data` returns, never from inside a parser callback,
   so a connection is released (and possibly handed to the next exchange) only when the
   parser is at rest.
3. A response head is checked here before the core sees it (a 101 must answer an Upgrade
   request and name the protocol), and filtered once per distinct head
   (`HeaderPolicy.origin_head`); the core passes it on to the client codec as it is.
4. A response to HEAD has no body whatever its headers say; httptools cannot be told, so
   the parser is replaced after such a response.
5. Bytes for the origin produced during one client read leave in one write (`flush`).
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpResponseParser,
)

from ..diagnosis.classify import (
    ResponseHeadersTooLarge,
    UpgradeBroken,
    UpstreamError,
    UpstreamProtocolError,
)
from ..forward.codec import RequestHead
from ..forward.forwarder import Forwarder
from ..forward.outbox import Outbox
from ..forward.pool import UpstreamPool
from .errors import parser_error_text
from .headers import HeaderPolicy, OriginHead, ResponseFields

_NO_BODY_STATUSES: Final = frozenset({204, 304})
# A parser with no callbacks, shared: what a connection holds in place of its own before
# it connects and once it has closed. Its own parser holds bound methods of it, a cycle
# that only the garbage collector freed (~9 objects a connection, issue 20).
_NO_PARSER: Final = HttpResponseParser(object())


class OriginSide:
    """What every origin connection shares; called with the pool, it makes one (the pool's
    `OriginFactory`)."""

    def __init__(self, headers: HeaderPolicy, outbox: Outbox, max_header_bytes: int) -> None:
        self.headers = headers
        self.outbox = outbox
        self.max_header_bytes = max_header_bytes

    def __call__(self, pool: UpstreamPool) -> UpstreamConnection:
        return UpstreamConnection(pool, self)


class UpstreamConnection(asyncio.Protocol):
    """One connection to the origin; serves one exchange at a time."""

    def __init__(self, pool: UpstreamPool, side: OriginSide) -> None:
        self.pool = pool
        self.headers = side.headers
        self.outbox = side.outbox
        self.max_header_bytes = side.max_header_bytes
        self.transport: Any = None
        self.parser = _NO_PARSER  # its own from connection_made to connection_lost
        self.handler: Forwarder | None = None
        self.closed = False
        self.idle_since_ns = 0
        self.tunnel = False
        self.out: list[bytes] = []  # request bytes, written once per client read
        # Per-exchange state
        self.chunked = False  # the request body goes out chunked
        self.upgrade = False  # the request asks to switch protocols
        self.bytes_seen = False
        self.head_buf = b""  # the bytes read while the response head is incomplete
        self.head_start = 0  # where the current head starts in head_buf
        self.in_head = True
        self.interim = False
        self.head_only = False
        self.message_done = False
        self.replace_parser = False
        self.stray_bytes = False
        self.close_delimited = False
        self.keep_alive = True
        self.failure: Exception | None = None  # raised by a parser callback

    # -- life cycle ----------------------------------------------------------------------

    def begin(self, handler: Forwarder, head: RequestHead) -> None:
        """Serve an exchange: per-exchange state reset, its request head queued."""
        self.handler = handler
        self.head_only = head.method == b"HEAD"
        self.chunked = head.chunked
        self.upgrade = head.upgrade is not None
        self.bytes_seen = self.message_done = self.close_delimited = False
        self.in_head = True
        down = handler.down
        self.out.append(
            self.headers.request_head(head, down.client_ip_b, down.trusted, handler.request_id_line)
        )

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.parser = HttpResponseParser(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.parser = _NO_PARSER
        handler = self.handler
        self.handler = None
        self.out = []
        self.pool.on_closed(self, busy=handler is not None)
        if handler is None:
            return
        if self.tunnel:
            handler.on_tunnel_closed()
        elif self.close_delimited and exc is None and not self.message_done:
            handler.on_response_end(reusable=False)
        else:
            handler.on_upstream_failed(exc)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.outbox.flush()  # bytes queued for this connection go out before the FIN
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost reports it

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.upstream_write_paused()

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.upstream_write_resumed()

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    # -- bytes out -------------------------------------------------------------------------

    def send_data(self, data: bytes) -> None:
        if not data:
            return  # an empty chunk would be the last one (an HTTP/2 DATA can be empty)
        if self.chunked:
            self.out += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            self.out.append(data)

    def send_end(self) -> None:
        self.out.append(b"0\r\n\r\n")  # the last chunk: called for chunked requests only

    def flush(self) -> None:
        out = self.out
        if out:
            self.out = []
            self.outbox.send(self.transport, out, 0 if len(out) == 1 else sum(map(len, out)))

    def send_raw(self, chunks: list[bytes]) -> None:
        self.outbox.send(self.transport, chunks, sum(map(len, chunks)))

    # -- bytes in --------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        handler = self.handler
        if handler is None:
            # An idle connection must be silent; anything else makes it unusable.
            self.close()
            return
        # One call per read: the handling is inlined here, inside the guard (issue 20).
        try:
            self.bytes_seen = True
            if self.tunnel:
                handler.on_tunnel_data(data)
                return
            if self.in_head:
                # Keep the raw head: headers are passed on as the origin wrote them, filtered
                # in one regex pass, instead of one Python callback per header.
                self.head_buf = self.head_buf + data if self.head_buf else data
                if len(self.head_buf) - self.head_start > self.max_header_bytes:
                    limit = self.max_header_bytes
                    if (
                        self.head_buf.find(b"\r\n\r\n", self.head_start, self.head_start + limit)
                        < 0
                    ):
                        handler.on_upstream_failed(
                            ResponseHeadersTooLarge(f"response header section over {limit} bytes")
                        )
                        return
            try:
                self.parser.feed_data(data)
            except HttpParserUpgrade as exc:
                self.tunnel = True
                rest = data[exc.args[0] :]
                handler.on_tunnel_open(rest)
                return
            except HttpParserCallbackError as exc:
                # The callback's own exception, kept (httptools passes it on only as the implicit
                # __context__, another exception when one is being handled around the call).
                cause = self.failure or exc.__context__
                self.failure = None
                if isinstance(cause, UpstreamError):
                    handler.on_upstream_failed(cause)
                else:
                    handler.on_internal_error(cause or exc)
                return
            except HttpParserError as exc:
                handler.on_upstream_failed(UpstreamProtocolError(parser_error_text(exc)))
                return
            if self.replace_parser:
                self.replace_parser = False
                self.parser = HttpResponseParser(self)
            if self.message_done:
                reusable = not self.stray_bytes and self.keep_alive
                self.stray_bytes = False
                handler.on_response_end(reusable)
            else:
                handler.flush()
        except Exception as exc:  # a defect: never let it kill the transport silently
            handler.on_internal_error(exc)

    # -- httptools callbacks ---------------------------------------------------------------

    def on_headers_complete(self) -> None:
        try:
            handler = self.handler
            if handler is None or self.message_done:
                self.stray_bytes = True
                return
            buf = self.head_buf
            start = self.head_start
            if buf[start : start + 5] != b"HTTP/":
                # llhttp skips empty lines before a status line (RFC 9112 §2.2): so do we.
                start = buf.find(b"HTTP/", start)
            end = buf.find(b"\r\n\r\n", start)
            if end < 0:  # llhttp accepted a head that does not end in CRLF CRLF
                raise UpstreamProtocolError("response head not terminated by CRLF CRLF")
            if end + 4 - start > self.max_header_bytes:
                raise ResponseHeadersTooLarge(
                    f"response header section over {self.max_header_bytes} bytes"
                )
            head = buf[start : end + 2]
            headers = self.headers
            entry = headers.origin_heads.get(head)
            # A head seen before states the status llhttp read from it then (only final heads
            # and 101s are remembered): no call into the parser for it.
            status = entry.status if entry is not None else self.parser.get_status_code()
            if status < 200:
                if status < 100:  # llhttp takes any three digits; RFC 9110 §15 starts at 100
                    raise UpstreamProtocolError(f"invalid status code {status:03d}")
                if status != 101:
                    self.interim = True
                    self.head_start = end + 4
                    handler.on_response_interim(status, OriginHead(head, b"", ResponseFields()))
                    return
                if not self.upgrade:
                    raise UpgradeBroken("upstream answered 101 to a request without Upgrade")
            if entry is None:
                entry = headers.origin_head(head, status)
            fields = entry.fields
            if status == 101:
                if not fields.upgrade:
                    raise UpgradeBroken("upstream answered 101 without an Upgrade header")
            elif (
                not fields.chunked
                and (fields.codings or not fields.content_length)
                and not self.head_only
                and status not in _NO_BODY_STATUSES
            ):
                self.close_delimited = True  # the body ends when the origin closes
            self.in_head = False
            self.head_buf = b""
            self.head_start = 0
            handler.on_response_head(status, entry)
            if self.head_only and status != 101:
                self.keep_alive = self.parser.should_keep_alive()
                self.message_done = True
                self.replace_parser = True
        except UpstreamError as exc:
            self.failure = exc  # kept: httptools passes on only its own error
            raise

    def on_body(self, body: bytes) -> None:
        if self.message_done:
            self.stray_bytes = True
            return
        handler = self.handler
        if handler is not None:
            handler.on_response_data(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if self.message_done:
            if not self.replace_parser:
                self.stray_bytes = True
            return
        # llhttp forgets the keep-alive flag once the message is complete: read it now.
        self.keep_alive = self.parser.should_keep_alive()
        self.message_done = True
