"""The upstream side: one HTTP/1.1 connection per `UpstreamConnection`, and the bounded pool.

Rules:
1. The connection parses with httptools and reports events to its current handler (the
   exchange's `Forwarder`): head, body, completion, failure. It never decides a fault.
2. Completion is delivered after `feed_data` returns, never from inside a parser callback,
   so a connection is released (and possibly handed to the next exchange) only when the
   parser is at rest.
3. Connections are counted once in `UpstreamPool.open` from the moment a connect starts
   until `connection_lost` (or a failed connect); the pool never exceeds `max_connections`.
4. A response to HEAD has no body whatever its headers say; httptools cannot be told, so
   the parser is replaced after such a response.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
from collections import deque
from typing import TYPE_CHECKING, Any, Final

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpResponseParser,
)

from .classify import ResponseHeadersTooLarge, UpstreamError, UpstreamProtocolError
from .exchange import Phase, perf_ns

if TYPE_CHECKING:
    from .config import Config
    from .forward import Forwarder
    from .outbox import Outbox

# Connect failures that mean "nothing is listening yet" (a dev server restarting).
_NOT_LISTENING: Final = (ConnectionRefusedError,)
_RETRY_WAIT_S: Final = 0.1


def parser_error_text(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.removeprefix("HPE_")


class UpstreamConnection(asyncio.Protocol):
    """One connection to the origin; serves one exchange at a time."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: Any = None
        self.parser = HttpResponseParser(self)
        self.handler: Forwarder | None = None
        self.closed = False
        self.idle_since_ns = 0
        self.tunnel = False
        # Per-response state
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

    # -- life cycle ----------------------------------------------------------------------

    def begin(self, handler: Forwarder, head_only: bool) -> None:
        """Attach to an exchange before its request is written (per-response state reset)."""
        self.handler = handler
        self.head_only = head_only
        self.bytes_seen = self.message_done = self.close_delimited = False
        self.in_head = True

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        handler = self.handler
        self.handler = None
        self.pool.on_closed(self, busy=handler is not None)
        if handler is None:
            return
        if self.tunnel:
            handler.on_upstream_tunnel_closed(exc)
        elif self.close_delimited and exc is None and not self.message_done:
            handler.on_upstream_complete(reusable=False)
        else:
            handler.on_upstream_failed(exc)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.pool.outbox.flush()  # bytes queued for this connection go out before the FIN
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

    # -- bytes in --------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        handler = self.handler
        if handler is None:
            # An idle connection must be silent; anything else makes it unusable.
            self.close()
            return
        try:
            self._received(handler, data)
        except Exception as exc:  # a defect: never let it kill the transport silently
            handler.on_internal_error(exc)

    def _received(self, handler: Forwarder, data: bytes) -> None:
        self.bytes_seen = True
        if self.tunnel:
            handler.on_upstream_tunnel_data(data)
            return
        if self.in_head:
            # Keep the raw head: headers are passed on as the origin wrote them, filtered
            # in one regex pass, instead of one Python callback per header.
            self.head_buf = self.head_buf + data if self.head_buf else data
            if len(self.head_buf) - self.head_start > self.pool.max_response_header_bytes:
                limit = self.pool.max_response_header_bytes
                if self.head_buf.find(b"\r\n\r\n", self.head_start, self.head_start + limit) < 0:
                    handler.on_upstream_failed(
                        ResponseHeadersTooLarge(f"response header section over {limit} bytes")
                    )
                    return
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self.tunnel = True
            rest = data[exc.args[0] :]
            handler.on_upstream_tunnel_open(rest)
            return
        except HttpParserCallbackError as exc:
            cause = exc.__context__
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
            handler.on_upstream_complete(reusable)
        else:
            handler.flush()

    # -- httptools callbacks ---------------------------------------------------------------

    def on_headers_complete(self) -> None:
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
        if end + 4 - start > self.pool.max_response_header_bytes:
            raise ResponseHeadersTooLarge(
                f"response header section over {self.pool.max_response_header_bytes} bytes"
            )
        head = buf[start : end + 2]
        status = self.parser.get_status_code()
        if status < 200:
            if status < 100:  # llhttp takes any three digits; RFC 9110 §15 starts at 100
                raise UpstreamProtocolError(f"invalid status code {status:03d}")
            if status != 101:
                self.interim = True
                self.head_start = end + 4
                handler.on_upstream_interim(status, head)
                return
        self.in_head = False
        self.head_buf = b""
        self.head_start = 0
        handler.on_upstream_head(status, head)
        if self.head_only and status != 101:
            self.keep_alive = self.parser.should_keep_alive()
            self.message_done = True
            self.replace_parser = True

    def on_body(self, body: bytes) -> None:
        if self.message_done:
            self.stray_bytes = True
            return
        handler = self.handler
        if handler is not None:
            handler.on_upstream_body(body)

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


class UpstreamPool:
    """A bounded set of connections to the one origin: idle ones reused newest first."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop, outbox: Outbox) -> None:
        self.loop = loop
        self.outbox = outbox
        self.host = config.upstream_host
        self.port = config.upstream_port
        self.max_connections = config.pool.max_connections
        self.max_idle = config.pool.max_idle
        self.idle_timeout_ns = int(config.pool.idle_timeout * 1e9)
        self.max_response_header_bytes = config.limits.max_response_header_bytes
        self.upstream_wait_s = config.upstream_wait
        self.ssl_context: ssl.SSLContext | None = None
        self.server_hostname: str | None = None
        if config.upstream_scheme == "https":
            self.ssl_context = make_ssl_context(config)
            self.server_hostname = config.tls.server_name or self.host
        try:
            ipaddress.ip_address(self.host)
            self.host_is_ip = True
        except ValueError:
            self.host_is_ip = False
        self.idle: list[UpstreamConnection] = []
        self.open = 0  # connecting + idle + busy
        self.busy = 0
        self.waiters: deque[Forwarder] = deque()

    # -- acquiring and releasing ------------------------------------------------------------

    def acquire(self, forwarder: Forwarder, fresh: bool = False) -> UpstreamConnection | None:
        """A ready idle connection, or None when one is being connected or waited for."""
        if not fresh:
            idle = self.idle
            while idle:
                conn = idle.pop()
                if not conn.closed:
                    self.busy += 1
                    return conn
        if self.open < self.max_connections:
            self._start_connect(forwarder)
        else:
            forwarder.phase = Phase.POOL_WAIT
            forwarder.t_pool = perf_ns()
            self.waiters.append(forwarder)
        return None

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        """The exchange is done with `conn`; keep it for the next one or close it."""
        self.busy -= 1
        conn.handler = None
        if not reusable or conn.closed:
            conn.close()
            return
        waiter = self._next_waiter() if self.waiters else None
        if waiter is not None:
            self.busy += 1
            waiter.on_upstream_connected(conn, reused=True)
        elif len(self.idle) < self.max_idle:
            conn.idle_since_ns = perf_ns()
            self.idle.append(conn)
        else:
            conn.close()

    def forget_waiter(self, forwarder: Forwarder) -> None:
        with contextlib.suppress(ValueError):
            self.waiters.remove(forwarder)

    def on_closed(self, conn: UpstreamConnection, busy: bool) -> None:
        """`connection_lost` of a connection: its slot (and busy mark) is freed here."""
        self.open -= 1
        if busy:
            self.busy -= 1
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)
        waiter = self._next_waiter()
        if waiter is not None:
            self._start_connect(waiter)

    def sweep(self, now_ns: int) -> None:
        """Close idle connections older than the pool's idle timeout."""
        limit = now_ns - self.idle_timeout_ns
        for conn in [c for c in self.idle if c.idle_since_ns < limit]:
            self.idle.remove(conn)
            conn.close()

    def close_idle(self) -> None:
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()

    def _next_waiter(self) -> Forwarder | None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done:
                return waiter
        return None

    # -- connecting ---------------------------------------------------------------------------

    def _start_connect(self, forwarder: Forwarder) -> None:
        # The slot taken here belongs to the attempt until TCP connects, then to the
        # connection (released by its connection_lost).
        self.open += 1
        forwarder.connect_task = self.loop.create_task(self._connect(forwarder))

    async def _connect(self, forwarder: Forwarder) -> None:
        attempt = _Attempt()
        try:
            conn = await self._open(forwarder, attempt)
        except asyncio.CancelledError:
            # The exchange gave up (deadline or client gone) and has already reported it.
            self._give_up(attempt)
            return
        except Exception as exc:
            forwarder.connect_task = None
            self._give_up(attempt)
            forwarder.on_upstream_failed(exc)
            return
        forwarder.connect_task = None
        self.busy += 1
        conn.handler = forwarder
        forwarder.on_upstream_connected(conn, reused=False)

    def _give_up(self, attempt: _Attempt) -> None:
        if attempt.conn is not None:
            attempt.conn.abort()  # its connection_lost frees the slot
            return
        self.open -= 1
        waiter = self._next_waiter()
        if waiter is not None:
            self._start_connect(waiter)

    async def _open(self, forwarder: Forwarder, attempt: _Attempt) -> UpstreamConnection:
        """DNS, TCP connect (every address in turn), then TLS; marks and phases on the way."""
        ex = forwarder
        loop = self.loop
        if self.host_is_ip:
            addresses = [self.host]
        else:
            ex.phase = Phase.DNS
            ex.t_dns = perf_ns()
            infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        ex.phase = Phase.CONNECT
        ex.t_connect = perf_ns()
        wait_until = ex.t_start + int(self.upstream_wait_s * 1e9) if forwarder.may_wait else 0
        while True:
            try:
                conn = await self._connect_any(addresses)
                break
            except _NOT_LISTENING:
                if not wait_until:
                    raise
                # upstream_wait holds the request: the hold is the `wait` phase, and
                # `connect` stays the one attempt that succeeds (none, if it never does).
                if not ex.t_wait:
                    ex.t_wait = ex.t_connect
                now = perf_ns()
                if now >= wait_until:
                    ex.t_connect = now
                    ex.wait_expired = True
                    raise
                await asyncio.sleep(_RETRY_WAIT_S)
                ex.t_connect = perf_ns()
        attempt.conn = conn
        ex.t_connected = perf_ns()
        if self.ssl_context is not None:
            ex.phase = Phase.TLS
            conn.transport = await loop.start_tls(
                conn.transport, conn, self.ssl_context, server_hostname=self.server_hostname
            )
            ex.t_tls_done = perf_ns()
        return conn

    async def _connect_any(self, addresses: list[str]) -> UpstreamConnection:
        error: BaseException | None = None
        for address in addresses:
            conn = UpstreamConnection(self)
            try:
                # The factory runs inside this call, before the loop moves on.
                await self.loop.create_connection(lambda: conn, address, self.port)  # noqa: B023
                return conn
            except OSError as exc:
                error = exc
        assert error is not None
        raise error


class _Attempt:
    """What a connect attempt holds: the connection once TCP is up."""

    __slots__ = ("conn",)

    def __init__(self) -> None:
        self.conn: UpstreamConnection | None = None


def make_ssl_context(config: Config) -> ssl.SSLContext:
    tls = config.tls
    context = ssl.create_default_context(cafile=tls.ca_file)
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context
