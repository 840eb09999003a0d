"""The client side of the HTTP/1.1 codec: parse requests with httptools, answer them in
order on one connection (a `ClientConnection` and `ServedConnection` of
`proxy.forward.codec`; its responses are written by its `ResponseWriter`).

Rules:
1. One exchange is answered at a time (`current`); pipelined requests wait in `queue`
   with reading paused, so a client cannot make the proxy buffer more than one read.
2. Heads are built and judged by the `RequestReader`; a refused one is answered in turn.
3. Reading is paused for several independent reasons (a bit each) and resumes only when
   none is left.
4. Bytes for the upstream produced while parsing one read are written in one go after
   `feed_data` returns (`in_feed`), so a head and a small body leave in one syscall.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpRequestParser,
)

from ..base.memo import Memo
from ..base.text import duration_text
from ..diagnosis.faults import RequestProblem
from ..diagnosis.record import Phase, perf_ns
from ..forward.codec import PAUSE_BUFFER, PAUSE_CODEC, PAUSE_UPLOAD
from ..forward.context import ForwardContext
from ..forward.deadlines import check_deadline
from ..forward.forwarder import Forwarder
from .errors import parse_error_detail
from .headers import HeaderPolicy
from .reader import Discard, RequestReader, StopParsing
from .request import RequestHead, RequestRejected
from .respond import ResponseWriter

log: Final = logging.getLogger("faultline")

HTTP2_PREFACE_LINE: Final = b"PRI * HTTP/2.0\r\n"  # prior knowledge (RFC 9113 §3.4)


class DownstreamProtocol(asyncio.Protocol):
    """One client connection."""

    # Why reading is paused, besides the core's reasons (PAUSE_BUFFER, PAUSE_UPLOAD):
    PAUSE_PIPELINE = PAUSE_CODEC  # an earlier exchange is still being answered
    PAUSE_BROKEN = PAUSE_CODEC << 1  # the request stream is unparseable; nothing more is read

    def __init__(
        self,
        ctx: ForwardContext,
        headers: HeaderPolicy,
        known_heads: Memo[bytes, RequestHead],
        switch: Callable[[DownstreamProtocol, bytes], None] | None = None,
    ) -> None:
        self.ctx = ctx
        # Called with the first read when it opens with the HTTP/2 preface (prior
        # knowledge): another codec takes the connection over (wired by the server).
        self.switch = switch
        self.fresh = True  # nothing read yet
        self.failure: Exception | None = None  # raised by a parser callback (`failed`)
        self.headers = headers
        # Reads that were one whole bodiless request head -> that head, parsed and
        # validated under this configuration (`data_received`): shared by every
        # connection, so a client that repeats a head skips parsing it.
        self.known_heads = known_heads
        self.transport: Any = None
        self.writer = ResponseWriter(ctx, headers)
        self.reader = RequestReader(self)
        self.parser = HttpRequestParser(self.reader)
        self.client_ip = ""
        self.client_ip_b = b""
        self.trusted = False
        # Per-connection state
        self.current: Forwarder | None = None  # the exchange being answered
        self.receiving: Forwarder | None = None  # the exchange whose body is being read
        self.queue: deque[Forwarder] = deque()
        self.read_pauses = 0
        self.write_paused = False
        self.in_feed = False
        self.raw = False  # after an Upgrade request: bytes go through unparsed
        self.upgrading: Forwarder | None = None  # the exchange that asked to upgrade
        self.closed = False
        self.idle_since_ns = 0
        self.served = 0
        # Per-request (parsing) state
        self.parsing: Forwarder | None = None  # the exchange whose head is being read

    # -- connection life cycle --------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = self.writer.transport = transport
        ctx = self.ctx
        if len(ctx.connections) >= ctx.max_connections:
            # Over limits.max_connections: refuse before reading a byte (no exchange).
            ctx.gauges.refused_connections += 1
            self.closed = True
            transport.abort()
            return
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else ""
        self.client_ip_b = self.client_ip.encode()
        self.trusted = self.ctx.is_trusted(self.client_ip)
        self.idle_since_ns = perf_ns()
        self.ctx.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.reader.detach()  # no cycle left for the garbage collector (issue 20)
        if self.closed and self not in self.ctx.connections:
            return  # refused in connection_made
        self.closed = True
        self.ctx.connections.discard(self)
        if self.parsing is not None:
            # A request whose head never completed: the client left in the middle of it.
            self.parsing.client_gone()
            self.parsing = None
        pending = [fw for fw in (self.current, *self.queue, self.receiving) if fw is not None]
        self.current = self.receiving = None
        self.queue.clear()
        for fw in dict.fromkeys(pending):
            fw.client_gone()

    def drain(self) -> None:
        """Draining: an idle connection closes now, a busy one after its exchange, a tunnel
        (it never ends by itself) now, its 101 still the origin's."""
        if self.raw:
            fw = self.upgrading
            if fw is not None and not fw.done:
                fw.details = "tunnel closed by the proxy's shutdown"
            self.close()
        elif self.current is None and self.parsing is None:
            self.close()

    def cut_by_drain(self) -> None:
        """The drain deadline passed: every exchange still open on this connection is cut
        by the proxy (Forwarder.cut_by_drain), then the connection closes."""
        current = self.current
        behind = [fw for fw in (*self.queue, self.receiving, self.parsing) if fw is not None]
        self.queue.clear()
        self.receiving = self.parsing = None
        for fw in dict.fromkeys(behind):
            if fw is not current:
                fw.cut_by_drain(answer=False)
        if current is not None:
            current.cut_by_drain(answer=True)  # closes the connection (Connection: close)
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.ctx.outbox.flush()  # bytes queued for this client go out before the FIN
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def has_queued(self) -> bool:
        return bool(self.queue)

    def pause_reading(self, reason: int) -> None:
        if not self.read_pauses and not self.closed:
            self.transport.pause_reading()
        self.read_pauses |= reason

    def resume_reading(self, reason: int) -> None:
        if self.read_pauses & reason:
            self.read_pauses &= ~reason
            if not self.read_pauses and not self.closed:
                self.transport.resume_reading()

    def pause_writing(self) -> None:
        self.write_paused = True
        fw = self.current
        if fw is not None:
            fw.client_write_paused(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        fw = self.current
        if fw is not None:
            fw.client_write_paused(False)

    # -- bytes in ---------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.fresh:
            self.fresh = False
            if self.switch is not None and data.startswith(HTTP2_PREFACE_LINE):
                self.connection_lost(None)  # this protocol object is done; the transport goes on
                self.switch(self, data)
                return
        if self.raw:
            fw = self.upgrading
            if fw is not None:
                try:
                    fw.on_client_tunnel_data(data)
                except Exception as exc:
                    fw.on_internal_error(exc)
            return
        at_boundary = self.parsing is None and self.receiving is None and not self.read_pauses
        known_heads = self.known_heads
        if at_boundary and len(data) <= known_heads.max_key_len:  # no hashing a long read
            head = known_heads.get(data)
            if head is not None:
                self.in_feed = True
                try:
                    self._known_head(head)
                except Exception as exc:
                    self._defect(exc)
                finally:
                    self.in_feed = False
                self._flush_upstream()
                return
        reader = self.reader
        reader.heads_in_feed = 0
        self.in_feed = True
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            # Whatever follows an Upgrade request is held until the origin switches
            # protocols; if it refuses, those bytes are never forwarded (no smuggling).
            self.raw = True
            rest = data[exc.args[0] :]
            if rest and self.upgrading is not None:
                self.upgrading.on_client_tunnel_data(rest)
        except HttpParserCallbackError as exc:
            cause = self.failure or exc.__context__
            self.failure = None
            if isinstance(cause, RequestRejected):
                self._broken(cause.problem, cause.detail)
            elif isinstance(cause, StopParsing):
                self.parser = HttpRequestParser(Discard())
            else:
                self._defect(cause or exc)
        except HttpParserError as exc:
            receiving = self.receiving
            in_trailers = (
                self.parsing is None
                and receiving is not None
                and receiving.head is not None
                and receiving.head.chunked
            )
            self._broken(RequestProblem.MALFORMED, parse_error_detail(exc, in_trailers))
        except Exception as exc:  # a defect in our callbacks outside the parser's wrapping
            self._defect(exc)
        else:
            if (
                reader.repeatable is not None
                and at_boundary
                and reader.heads_in_feed == 1
                and self.parsing is None
                and self.receiving is None
                and data.endswith(b"\r\n\r\n")
            ):
                # Exactly one whole bodiless head, from a parser at rest to a parser at
                # rest: the same bytes will always parse to the same head.
                known_heads.remember(data, reader.repeatable)
        finally:
            self.in_feed = False
        if self.parsing is not None:
            # The head is still incomplete: everything read since it began counts.
            if reader.head_fed < 0:
                reader.head_fed = 0
            else:
                reader.head_fed += len(data)
                if reader.head_fed > self.ctx.max_request_header_bytes:
                    self._broken(
                        RequestProblem.HEADERS_TOO_LARGE,
                        f"request head over {self.ctx.max_request_header_bytes} bytes",
                    )
        self._flush_upstream()

    def _flush_upstream(self) -> None:
        """Bytes for the upstream produced while handling one read leave in one write."""
        try:
            current = self.current
            if current is not None and current.up is not None:
                current.up.flush()
            receiving = self.receiving
            if receiving is not None and receiving is not current and receiving.up is not None:
                receiving.up.flush()
        except Exception as exc:
            self._defect(exc)

    def eof_received(self) -> bool:
        return False  # like nginx: a client that half-closes has given up (499)

    # -- what the reader made ---------------------------------------------------------------

    def head_parsed(
        self, fw: Forwarder, head: RequestHead, refusal: tuple[RequestProblem, str] | None
    ) -> None:
        """A whole request head (`RequestReader`): forwarded, or refused in turn."""
        if refusal is None:
            self._head_complete(fw, head)
            return
        self._identify(fw, head)
        self.receiving = fw
        fw.attach(head, refusal)
        # Nothing after a refused head can be trusted to be framed right.
        self.pause_reading(self.PAUSE_BROKEN)
        self._enqueue(fw)
        raise self.failed(StopParsing())

    def failed(self, error: Exception) -> Exception:
        """`error`, kept before a callback raises it: httptools passes it on only as the
        implicit __context__ of its error, another exception if one is being handled."""
        self.failure = error
        return error

    def _identify(self, fw: Forwarder, head: RequestHead) -> None:
        """The exchange's method, target and request id (the client's, or a new one)."""
        fw.method = head.method_name
        fw.target = head.target_text
        request_id = head.request_id or self.ctx.new_request_id()
        fw.request_id_line = b"X-Request-Id: " + request_id + b"\r\n"
        fw.request_id = request_id.decode("latin-1")

    def _head_complete(self, fw: Forwarder, head: RequestHead) -> None:
        """A head that may be forwarded: the exchange is answered now or in turn."""
        self._identify(fw, head)
        self.receiving = fw
        fw.attach(head)
        if head.upgrade is not None:
            self.upgrading = fw
        if self.current is None:
            self.current = fw
            fw.start()
        else:
            self._enqueue(fw)

    def new_exchange(self) -> Forwarder:
        fw = Forwarder(self.ctx, self, self.writer, perf_ns())
        self.ctx.gauges.in_flight += 1
        return fw

    def _known_head(self, head: RequestHead) -> None:
        """`data` repeats a bodiless request head already parsed and validated on this
        proxy: the exchange starts from that head, as the parser would have made it."""
        fw = Forwarder(self.ctx, self, self.writer, perf_ns())  # new_exchange, inlined
        self.ctx.gauges.in_flight += 1
        self._head_complete(fw, head)
        self.receiving = None
        fw.on_request_complete()

    # -- answering in order ------------------------------------------------------------------

    def _enqueue(self, fw: Forwarder) -> None:
        if self.current is None:
            self.current = fw
            fw.start()
        else:
            fw.phase = Phase.QUEUED
            self.queue.append(fw)
            self.pause_reading(self.PAUSE_PIPELINE)

    def exchange_finished(self, fw: Forwarder) -> None:
        if fw is not self.current:
            return
        self.current = None
        self.served += 1
        if self.read_pauses:
            self.resume_reading(PAUSE_UPLOAD | PAUSE_BUFFER)
        if self.closed:
            return
        if fw.close_after or (self.ctx.draining and not self.queue):
            # Draining: requests already read and queued are still answered first.
            self.close()
            return
        if self.queue:
            nxt = self.queue.popleft()
            self.current = nxt
            if not self.queue:
                self.resume_reading(self.PAUSE_PIPELINE)
            # Not called directly: a long pipeline must not recurse.
            asyncio.get_running_loop().call_soon(self._start_queued, nxt)
        else:
            self.idle_since_ns = fw.t_end

    def _start_queued(self, fw: Forwarder) -> None:
        if self.current is fw and not fw.done and not self.closed:
            fw.start()

    # -- bad input ---------------------------------------------------------------------------

    def _broken(self, problem: RequestProblem, detail: str) -> None:
        """The request stream cannot be parsed any further: answer in turn, then close."""
        self.pause_reading(self.PAUSE_BROKEN)
        self.parser = HttpRequestParser(Discard())
        fw = self.parsing
        if fw is not None:
            self.parsing = None
        elif self.receiving is not None:
            fw, self.receiving = self.receiving, None
            fw.on_request_error(problem, detail)
            return
        else:
            last = self.queue[-1] if self.queue else self.current
            if last is not None and (last.reject is not None or last.close_after):
                # Already refused (the same bad stream), or bytes after a request that
                # closes the connection: nobody will read an answer, no exchange is made up.
                return
            fw = self.new_exchange()
        fw.request_id = self.ctx.new_request_id().decode()
        fw.attach(None, (problem, detail))
        self._enqueue(fw)

    def _defect(self, exc: BaseException) -> None:
        """A defect in our own code while handling this connection's bytes."""
        self.pause_reading(self.PAUSE_BROKEN)
        self.parser = HttpRequestParser(Discard())
        fw = self.current or self.receiving
        if fw is None and self.parsing is not None:
            fw = self.current = self.parsing
            self.parsing = None
        if fw is None:
            log.error("internal error on a client connection", exc_info=exc)
            self.transport.abort()
            return
        fw.on_internal_error(exc)

    # -- deadlines -----------------------------------------------------------------------------

    def check_deadline(self, now: int) -> None:
        fw = self.current
        if fw is not None:
            check_deadline(fw, now)
            return
        ctx = self.ctx
        parsing = self.parsing
        if parsing is not None:
            if now - parsing.t_start > ctx.client_headers_ns:
                self._broken(
                    RequestProblem.TIMEOUT,
                    "client did not finish its request head within "
                    f"{duration_text(ctx.client_headers_ns)} (timeouts.client_headers)",
                )
        elif self.served:
            if now - self.idle_since_ns > ctx.keepalive_ns:
                self.close()
        elif now - self.idle_since_ns > ctx.client_headers_ns:
            self.close()
