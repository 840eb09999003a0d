"""One exchange end to end: request upstream, response downstream, the record tagged.

Rules:
1. A `Forwarder` is driven by events from both sides (the client's `DownstreamProtocol`
   and the origin's `UpstreamConnection`) and advances `self.phase`; it never blocks and
   makes no task in the common case (a pooled connection is ready).
2. Every failure goes through `on_upstream_failed` -> `classify` -> `fail`; `fail` sends a
   proxy-made reply while nothing has been sent, and aborts the client connection (RST)
   once the response has started, so a cut body can never look complete.
3. `finish` runs exactly once per exchange and hands the record to the telemetry.
4. A request is replayed at most once, only when a reused connection failed before any
   response byte, the method is idempotent and the whole body is still in hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from typing import TYPE_CHECKING, Any, Final

from . import replies
from .classify import DeadlineExpired, UpgradeBroken, classify, duration_text
from .diagnosis import BODY_SAMPLE_BYTES, REQUEST_SAMPLE_BYTES, Evidence, diagnose
from .exchange import AWAIT_HEAD, BODY, DONE, SEND, Exchange, Phase, perf_ns
from .faults import STALE_CONNECTION_FAULTS, Fault, RequestProblem, Source, info
from .headers import (
    CONTENT_LENGTH_FIELDS,
    MS_TABLE,
    MS_TABLE_SIZE,
    ST_PROXY_DESC,
    ST_TTFB_DESC,
    ResponseFields,
    filter_response_block,
)

if TYPE_CHECKING:
    from .downstream import DownstreamProtocol, RequestHead
    from .upstream import UpstreamConnection

log: Final = logging.getLogger("faultline")

IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
REPLAY_MAX_BYTES: Final = 64 * 1024  # request bodies up to this size are kept for a replay
PENDING_HIGH_BYTES: Final = 256 * 1024  # request body buffered before the upstream is ready
_LINGER_RST: Final = struct.pack("ii", 1, 0)

_NO_BODY_STATUSES: Final = frozenset({204, 304})
# The common Server-Timing line (a pooled connection), in pieces around the two durations.
_ST_TTFB_TO_PROXY: Final = ST_TTFB_DESC + b", proxy;dur="
_ST_PROXY_END: Final = ST_PROXY_DESC + b"\r\n"


def abort_with_rst(transport: Any) -> None:
    """Close so the peer sees a reset, never a clean end of a (cut) message."""
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    transport.abort()


class Forwarder(Exchange):
    """Drives one exchange; the DownstreamProtocol owns it, the upstream reports to it.

    It is also the exchange's record (an `Exchange`): one object per exchange on the hot
    path. Once `finish` has run, nothing writes it any more and the sinks only read its
    record fields.
    """

    __slots__ = (
        "chunked_in",
        "chunked_out",
        "close_after",
        "connect_task",
        "ctx",
        "done",
        "down",
        "evidence",
        "head",
        "held",
        "may_wait",
        "out",
        "out_bytes",
        "pending",
        "pending_bytes",
        "progress",
        "progress_ns",
        "reject",
        "replay",
        "replay_bytes",
        "request_complete",
        "request_id_line",
        "request_sample",
        "tunnel",
        "up",
        "up_out",
        "upstream_head",
    )

    def __init__(self, down: DownstreamProtocol, t_start: int) -> None:
        ctx = self.ctx = down.ctx
        Exchange.__init__(self, t_start, down.client_ip, ctx.upstream_authority)
        self.down = down
        self.head: RequestHead | None = None
        self.reject: tuple[RequestProblem, str] | None = None
        self.up: UpstreamConnection | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.done = False
        self.tunnel = False
        self.request_complete = False
        self.request_id_line = b""
        self.chunked_in = False
        self.close_after = True
        self.replay: list[bytes] | None = None  # an idempotent request's body, for one replay
        self.may_wait = False
        self.pending: list[bytes] | None = None  # request body held until the upstream is ready
        self.pending_bytes = 0
        self.out: list[bytes] = []  # response bytes, written once per upstream read
        self.out_bytes = 0
        self.up_out: list[bytes] = []  # request bytes, written once per client read
        self.upstream_head = b""
        self.chunked_out = False
        self.replay_bytes = 0
        self.progress = 0
        self.progress_ns = 0
        self.evidence: Evidence | None = None  # kept for origin error responses only
        self.request_sample: bytearray | None = None  # a JSON request body, to judge a 5xx
        self.held: list[bytes] | None = None  # client bytes after an Upgrade, before 101

    def attach(
        self, head: RequestHead | None, reject: tuple[RequestProblem, str] | None = None
    ) -> None:
        """The request head is complete (head None: it never could be)."""
        self.reject = reject
        if head is None:
            return
        self.head = head
        self.chunked_in = head.chunked
        self.close_after = not head.keep_alive
        if head.method in IDEMPOTENT:
            self.replay = []
            self.may_wait = self.ctx.upstream_wait
        content_type = head.content_type
        if (
            content_type is not None
            and content_type.find(b"json") >= 0
            and head.content_encoding is None  # a compressed body cannot be judged
            and self.ctx.diagnostics
        ):
            self.request_sample = bytearray()

    # -- start -------------------------------------------------------------------------------

    def start(self) -> None:
        """This exchange's turn on its connection: reject it or send it upstream."""
        ctx = self.ctx
        if self.reject is not None:
            problem, detail = self.reject
            self.fail(Fault.HTTP_REQUEST_ERROR, detail, problem)
            return
        head = self.head
        assert head is not None
        if head.loop_marker:
            self.fail(Fault.PROXY_LOOP_DETECTED, "this request already passed through this proxy")
            return
        if ctx.stats.in_flight > ctx.max_in_flight:
            self.fail(Fault.CONNECTION_LIMIT_REACHED, "limits.max_in_flight reached")
            return
        self.upstream_head = ctx.headers.request_head(
            head, self.down.client_ip_b, self.down.trusted, self.request_id_line
        )
        conn = ctx.pool.acquire(self)
        if conn is not None:
            self.on_upstream_connected(conn, True)  # reused (positional: the hot call)

    # -- request side -------------------------------------------------------------------------

    def on_upstream_connected(self, conn: UpstreamConnection, reused: bool) -> None:
        if self.done:
            self.ctx.pool.release(conn, reusable=True)
            return
        self.up = conn
        self.reused = reused
        conn.begin(self, self.head.method == b"HEAD")  # type: ignore[union-attr]
        down = self.down
        if down.write_paused:
            conn.transport.pause_reading()
        self.phase = SEND
        self.t_sent = perf_ns()
        self.up_out.append(self.upstream_head)
        if self.pending:
            self.up_out.extend(self.pending)
            self.pending = None
            self.pending_bytes = 0
            down.resume_reading(down.PAUSE_BUFFER)
        if self.request_complete:
            self.phase = AWAIT_HEAD
            self.progress_ns = self.t_sent
        if not down.in_feed:
            self.flush_upstream()

    def on_request_body(self, data: bytes) -> None:
        """Request body bytes from the client (a Content-Length body was checked against
        the limit with its head; a chunked one is checked as it comes)."""
        self.body_bytes_in += len(data)
        sample = self.request_sample
        if sample is not None and len(sample) < REQUEST_SAMPLE_BYTES:
            sample += data[: REQUEST_SAMPLE_BYTES - len(sample)]
        if not self.chunked_in:
            self._send([data], len(data))
            return
        limit = self.ctx.max_request_body_bytes
        if limit and self.body_bytes_in > limit:
            self.on_request_error(RequestProblem.BODY_TOO_LARGE, f"request body over {limit} bytes")
            return
        self._send([b"%x\r\n" % len(data), data, b"\r\n"], len(data))

    def on_request_complete(self) -> None:
        self.request_complete = True
        if self.chunked_in:
            self._send([b"0\r\n\r\n"], 0)
        if self.up is not None and self.phase is SEND:
            # The whole request is on its way: the response_headers timeout starts now.
            self.phase = AWAIT_HEAD
            self.progress_ns = perf_ns()

    def _send(self, frame: list[bytes], size: int) -> None:
        """Frame(s) for the upstream: written now, or kept until the connection is ready."""
        replay = self.replay
        if replay is not None:
            self.replay_bytes += size
            if self.replay_bytes > REPLAY_MAX_BYTES:
                self.replay = None
            else:
                replay.extend(frame)
        if self.done:
            return
        if self.up is not None and self.phase >= SEND:
            self.up_out.extend(frame)
            if not self.down.in_feed:
                self.flush_upstream()
        else:
            if self.pending is None:
                self.pending = []
            self.pending.extend(frame)
            self.pending_bytes += size
            if self.pending_bytes > PENDING_HIGH_BYTES:
                self.down.pause_reading(self.down.PAUSE_BUFFER)

    def flush_upstream(self) -> None:
        up_out = self.up_out
        if up_out and self.up is not None:
            self.up_out = []
            size = 0 if len(up_out) == 1 else sum(map(len, up_out))
            self.ctx.outbox.send(self.up.transport, up_out, size)

    def on_request_error(self, problem: RequestProblem, detail: str) -> None:
        """The client's request turned out bad after its head (body framing, size)."""
        if self.done:
            return
        self.close_after = True
        if self.down.current is not self:
            self.reject = (problem, detail)  # answered in turn
            return
        up = self.up
        if up is not None:
            self.up = None
            self.ctx.pool.release(up, reusable=False)
        self._cancel_connect()
        self.fail(Fault.HTTP_REQUEST_ERROR, detail, problem)

    # -- response side -------------------------------------------------------------------------

    def on_upstream_interim(self, status: int, head: bytes) -> None:
        """A 1xx (not 101) response: relayed to HTTP/1.1 clients, then the real one follows."""
        request = self.head
        if request is None or not request.http11:
            return  # RFC 9110 §15.2: no 1xx to an HTTP/1.0 client
        line_end = head.find(b"\r\n") + 2
        block = filter_response_block(head, line_end)[0] if status != 100 else b""
        self._queue_out(b"HTTP/1.1 " + head[9:line_end] + block + b"\r\n")

    def on_upstream_head(self, status: int, head: bytes) -> None:
        """The origin's response head (status line and header lines, raw)."""
        request = self.head
        assert request is not None
        ctx = self.ctx
        now = perf_ns()
        if status == 101 and not request.upgrade:
            raise UpgradeBroken("upstream answered 101 to a request without Upgrade")
        hp = ctx.headers
        prefix, fields = hp.response_prefixes.get(head) or hp.response_prefix(head, status)
        if status == 101 and not fields.upgrade:
            raise UpgradeBroken("upstream answered 101 without an Upgrade header")
        # From here on the head is accepted: the response has started.
        self.t_response_head = self.progress_ns = now
        self.status = self.upstream_status = status
        self.phase = BODY
        if (request.upgrade and status != 101) or (ctx.draining and not self.down.queue):
            self.close_after = True  # a refused upgrade leaves the connection unusable
        out = self.out
        out.append(prefix)
        if fields is not CONTENT_LENGTH_FIELDS:
            self._framing(status, request, fields)
        if hp.server_timing:
            if self.t_connect or self.t_pool:
                out.append(
                    hp.timing(self.connect_ns(), self.ttfb_ns(), self.own_ns(now), self.wait_ns())
                )
            else:  # a pooled connection: the proxy's own time is everything before sending
                t_sent = self.t_sent
                ttfb_us = (now - t_sent) // 1000
                own_us = (t_sent - self.t_start) // 1000
                if ttfb_us < MS_TABLE_SIZE and own_us < MS_TABLE_SIZE:
                    out += (
                        b"Server-Timing: ttfb;dur=",
                        MS_TABLE[ttfb_us],
                        _ST_TTFB_TO_PROXY,
                        MS_TABLE[own_us],
                        _ST_PROXY_END,
                    )
                else:
                    out.append(hp.timing(0, now - t_sent, t_sent - self.t_start))
        out.append(self.request_id_line)
        if self.close_after:
            out.append(b"Connection: close\r\n\r\n")
        elif not request.http11:
            out.append(b"Connection: keep-alive\r\n\r\n")
        else:
            out.append(b"\r\n")
        self.out_bytes += len(prefix) + 512  # the lines added here are small
        self.response_started = True  # only now: a defect above still gets a clean 500
        if status >= 400 and ctx.diagnostics:
            self.evidence = Evidence(status, head)

    def _framing(self, status: int, request: RequestHead, fields: ResponseFields) -> None:
        """Framing lines for a response that is not plainly Content-Length delimited."""
        if status == 101:
            self.out.append(b"Connection: upgrade\r\nUpgrade: " + fields.upgrade + b"\r\n")
            self.tunnel = True
        elif request.method == b"HEAD" or status in _NO_BODY_STATUSES:
            pass
        elif fields.chunked or not fields.content_length or fields.codings:
            if not fields.chunked:
                self.up.close_delimited = True  # type: ignore[union-attr]
            if request.http11:
                self.chunked_out = True
                codings = fields.codings
                self.out.append(
                    b"Transfer-Encoding: " + codings + b", chunked\r\n"
                    if codings
                    else b"Transfer-Encoding: chunked\r\n"
                )
            else:
                self.close_after = True

    def on_upstream_body(self, data: bytes) -> None:
        size = len(data)
        self.body_bytes_out += size
        evidence = self.evidence
        if evidence is not None and len(evidence.body) < BODY_SAMPLE_BYTES:
            evidence.body += data[: BODY_SAMPLE_BYTES - len(evidence.body)]
        out = self.out
        if self.chunked_out:
            out.append(b"%x\r\n" % size)
            out.append(data)
            out.append(b"\r\n")
        else:
            out.append(data)
        self.out_bytes += size

    def on_upstream_complete(self, reusable: bool) -> None:
        if self.done:
            return
        if self.chunked_out:
            self.out.append(b"0\r\n\r\n")
        self.flush()
        up = self.up
        self.up = None
        if up is not None:
            reusable = (
                reusable
                and self.request_complete
                and not up.close_delimited
                and (self.head is None or self.head.upgrade is None)  # never after Upgrade
            )
            self.ctx.pool.release(up, reusable)
        if not self.request_complete:
            self.close_after = True  # the rest of the request body cannot be framed any more
        self.finish()

    def _queue_out(self, data: bytes) -> None:
        self.out.append(data)
        self.out_bytes += len(data)

    def flush(self) -> None:
        out = self.out
        if out:
            self.out = []
            self.ctx.outbox.send(self.down.transport, out, self.out_bytes)
            self.out_bytes = 0

    # -- tunnel (Upgrade) -----------------------------------------------------------------------

    def on_upstream_tunnel_open(self, rest: bytes) -> None:
        """The upstream switched protocols: from now on bytes flow both ways untouched."""
        self.phase = Phase.TUNNEL
        self.flush()
        held = self.held
        if held:
            self.held = None
            self.ctx.outbox.send(self.up.transport, held, sum(map(len, held)))  # type: ignore[union-attr]
            self.down.resume_reading(self.down.PAUSE_BUFFER)
        if rest:
            self.on_upstream_tunnel_data(rest)

    def on_client_tunnel_data(self, data: bytes) -> None:
        """Client bytes after an Upgrade request: held until the upstream answers 101."""
        self.body_bytes_in += len(data)
        if self.tunnel and self.up is not None:
            self.ctx.outbox.send(self.up.transport, [data], len(data))
            return
        if self.done or self.phase is Phase.BODY:
            return  # the upgrade was refused: these bytes are never forwarded
        held = self.held
        if held is None:
            held = self.held = []
        held.append(data)
        if sum(map(len, held)) > PENDING_HIGH_BYTES:
            self.down.pause_reading(self.down.PAUSE_BUFFER)

    def on_upstream_tunnel_data(self, data: bytes) -> None:
        self.body_bytes_out += len(data)
        self.ctx.outbox.send(self.down.transport, [data], len(data))

    def on_upstream_tunnel_closed(self, exc: BaseException | None) -> None:
        self.up = None
        if not self.done:
            self.down.close()
            self.finish()

    # -- back-pressure --------------------------------------------------------------------------

    def upstream_write_paused(self) -> None:
        self.down.pause_reading(self.down.PAUSE_UPLOAD)

    def upstream_write_resumed(self) -> None:
        self.down.resume_reading(self.down.PAUSE_UPLOAD)

    # -- failures ---------------------------------------------------------------------------------

    def on_upstream_failed(self, error: BaseException | None) -> None:
        if self.done:
            return
        up = self.up
        bytes_seen = up.bytes_seen if up is not None else False
        if up is not None:
            self.up = None
            if not up.closed:
                self.ctx.pool.release(up, reusable=False)
        head = self.head
        fault, detail = classify(
            self.phase,
            error,
            response_bytes_seen=bytes_seen,
            upgrade=head is not None and head.upgrade is not None,
        )
        if (
            fault in STALE_CONNECTION_FAULTS
            and self.reused
            and not self.retried
            and not self.response_started
            and self.replay is not None
            and self.request_complete
        ):
            self._retry()
            return
        if self.wait_expired:
            detail = (
                f"held {duration_text(self.wait_ns())}; the upstream never accepted within "
                f"upstream_wait ({duration_text(self.ctx.upstream_wait_ns)}): {detail}"
            )
        self.fail(fault, detail)

    def _retry(self) -> None:
        """Replay once on a fresh connection (the reused one was stale)."""
        self.retried = True
        self.t_sent = 0
        self.pending = list(self.replay or ())
        self.pending_bytes = 0
        self.up_out = []
        conn = self.ctx.pool.acquire(self, fresh=True)
        if conn is not None:
            self.on_upstream_connected(conn, reused=False)

    def on_internal_error(self, exc: BaseException) -> None:
        """A defect in Faultline: traceback to the log, a plain 500 to the client."""
        log.error(
            "internal error in exchange %s",
            self.request_id,
            exc_info=exc,
        )
        up = self.up
        if up is not None:
            self.up = None
            self.ctx.pool.release(up, reusable=False)
        self.fail(Fault.PROXY_INTERNAL_ERROR, "internal error; see the proxy log")

    def fail(
        self,
        fault: Fault,
        detail: str,
        problem: RequestProblem | None = None,
        params: dict[str, str] | None = None,
    ) -> None:
        """End the exchange on a fault: a proxy-made reply, or an abort once started."""
        if self.done:
            return
        self.fault = fault
        self.problem = problem
        self.details = detail
        self._cancel_connect()
        if self.response_started:
            # The status line is already out: the client must see a broken response.
            self.out = []
            abort_with_rst(self.down.transport)
            self.finish()
            return
        if fault is Fault.DNS_ERROR and params is None:
            params = {"rcode": detail}
        if problem is not None or not self.request_complete or fault is Fault.PROXY_INTERNAL_ERROR:
            self.close_after = True
        reply = replies.render(
            self.ctx, self, self.head, fault, problem, detail, params, close=self.close_after
        )
        self.source = Source.PROXY
        self.response_started = True
        self.out = []
        self.ctx.outbox.send(self.down.transport, [reply], len(reply))
        self.finish()

    def client_gone(self) -> None:
        """The client connection closed: 499 unless the response was already complete."""
        if self.done:
            return
        self._cancel_connect()
        self._drop_upstream()
        if not self.tunnel:
            self.fault = Fault.CLIENT_CLOSED_REQUEST
            self.details = (
                "client closed the connection before the response was complete"
                if self.response_started
                else "client closed the connection before the response started"
            )
            self.status = replies.CLIENT_CLOSED_STATUS
            self.source = Source.CLIENT
        self.finish()

    def cut_by_drain(self, answer: bool) -> None:
        """The drain deadline passed with this exchange unfinished: the proxy ends it, and
        the record says so. `answer`: this exchange is its connection's current one (a
        503 with Connection: close if no response has started, else a reset); an exchange
        queued behind it or still being read is recorded, never answered."""
        if self.done:
            return
        self._drop_upstream()
        drain = duration_text(self.ctx.drain_ns)
        state = "its response was being sent" if self.response_started else "it was in flight"
        detail = f"the drain deadline ({drain}, timeouts.drain) passed while {state}"
        if answer:
            self.close_after = True
            self.fail(Fault.PROXY_INTERNAL_RESPONSE, detail)
            return
        self._cancel_connect()
        self.fault = Fault.PROXY_INTERNAL_RESPONSE
        self.details = "the drain deadline closed the connection before this request's turn"
        self.status = info(Fault.PROXY_INTERNAL_RESPONSE).status or 0
        self.source = Source.PROXY
        self.finish()

    def _drop_upstream(self) -> None:
        """The exchange ends early: its upstream connection is not reused (a tunnel's is
        closed both ways)."""
        up = self.up
        if up is not None:
            self.up = None
            if self.tunnel:
                up.close()
            self.ctx.pool.release(up, reusable=False)

    def _cancel_connect(self) -> None:
        task = self.connect_task
        if task is not None:
            self.connect_task = None
            task.cancel()
        if self.phase is Phase.POOL_WAIT:
            self.ctx.pool.forget_waiter(self)

    # -- deadlines ------------------------------------------------------------------------------

    def check_deadline(self, now: int) -> None:
        """Called by the server's sweep; fires the timeout of the current phase if due."""
        phase = self.phase
        ctx = self.ctx
        if phase is Phase.AWAIT_HEAD:
            if now - self.progress_ns > ctx.response_headers_ns:
                self.on_upstream_failed(
                    DeadlineExpired(ctx.response_headers_ns, "timeouts.response_headers")
                )
        elif phase is Phase.BODY:
            if self.down.write_paused:
                self.progress_ns = now  # the client is slow, not the upstream
            elif self.body_bytes_out != self.progress:
                self.progress = self.body_bytes_out
                self.progress_ns = now
            elif now - self.progress_ns > ctx.upstream_read_ns:
                self.on_upstream_failed(
                    DeadlineExpired(ctx.upstream_read_ns, "timeouts.upstream_read")
                )
        elif phase is Phase.SEND:
            if self.request_complete or self.down.read_pauses:
                self.progress_ns = now
            elif self.body_bytes_in != self.progress:
                self.progress = self.body_bytes_in
                self.progress_ns = now
            elif self.progress_ns and now - self.progress_ns > ctx.client_body_ns:
                self.on_request_error(
                    RequestProblem.TIMEOUT,
                    f"client sent no body bytes for {duration_text(ctx.client_body_ns)} "
                    "(timeouts.client_body)",
                )
            elif not self.progress_ns:
                self.progress_ns = now
        elif phase is Phase.DNS:
            if now - self.t_dns > ctx.dns_ns:
                self._cancel_connect()
                self.on_upstream_failed(DeadlineExpired(ctx.dns_ns, "timeouts.dns"))
        elif phase is Phase.CONNECT or phase is Phase.TLS:
            if self.may_wait:
                limit = ctx.connect_ns + ctx.upstream_wait_ns
                setting = "timeouts.connect + upstream_wait"
            else:
                limit = ctx.connect_ns
                setting = "timeouts.connect"
            if now - (self.t_wait or self.t_connect) > limit:
                self._cancel_connect()
                self.on_upstream_failed(DeadlineExpired(limit, setting))
        elif phase is Phase.POOL_WAIT and now - self.t_pool > ctx.pool_wait_ns:
            self.ctx.pool.forget_waiter(self)
            self.on_upstream_failed(DeadlineExpired(ctx.pool_wait_ns, "timeouts.pool_wait"))

    # -- the end ----------------------------------------------------------------------------------

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        self.phase = DONE
        self.t_end = perf_ns()
        evidence = self.evidence
        if evidence is not None:
            head = self.head
            evidence.request_content_type = head.content_type if head is not None else None
            if self.request_sample is not None:
                evidence.request_body = bytes(self.request_sample)
            try:
                self.hop, self.hints = diagnose(evidence)
            except Exception:  # diagnosis must never cost an exchange its record
                log.exception("diagnosis failed for exchange %s", self.request_id)
        self.ctx.telemetry.record(self)
        self.down.exchange_finished(self)
