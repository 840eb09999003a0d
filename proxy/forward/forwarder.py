"""One exchange end to end, whatever the protocols: request upstream, response downstream,
the record tagged.

Rules:
1. A `Forwarder` is driven by events from both codecs (the client side's `on_request_*`,
   the origin side's `on_response_*`) and advances `self.phase`; it never blocks and
   makes no task in the common case (a pooled connection is ready). It writes no byte
   itself: the codecs frame and write (`proxy.forward.codec`).
2. Every failure goes through `fail`: upstream ones through `on_upstream_failed` ->
   `classify` first. `fail` has the client codec send a proxy-made reply while nothing
   has been sent, and abort the client connection (a reset) once the response has
   started, so a cut body can never look complete.
3. `finish` runs exactly once per exchange and hands the record to the sink it was given.
4. A request is replayed at most once, only when the whole body is still in hand, no
   response byte came, and either the origin said it never processed it (an HTTP/2
   REFUSED_STREAM or GOAWAY: any method) or a reused connection failed under an
   idempotent one.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import unquote

from ..base.text import duration_text
from ..diagnosis import grpc
from ..diagnosis.classify import DeadlineExpired, StreamReset, classify
from ..diagnosis.faults import STALE_CONNECTION_FAULTS, Fault, RequestProblem, Source
from ..diagnosis.hops import BODY_SAMPLE_BYTES, REQUEST_SAMPLE_BYTES, Evidence
from ..diagnosis.record import AWAIT_HEAD, BODY, SEND, Phase, perf_ns
from .codec import PAUSE_BUFFER, PAUSE_UPLOAD, OriginConnection, ResponseHead
from .state import ExchangeState

REPLAY_MAX_BYTES: Final = 64 * 1024  # request bodies up to this size are kept for a replay
PENDING_HIGH_BYTES: Final = 256 * 1024  # request body buffered before the upstream is ready


class Forwarder(ExchangeState):
    """Drives one exchange; the client codec makes it, the origin codec reports to it."""

    __slots__ = ()

    # -- start -------------------------------------------------------------------------------

    def start(self) -> None:
        """This exchange's turn on its connection: reject it or send it upstream."""
        ctx = self.ctx
        self.started = True
        if self.reject is not None:
            problem, detail = self.reject
            self.fail(Fault.HTTP_REQUEST_ERROR, detail, problem)
            return
        head = self.head
        assert head is not None
        if head.loop_marker:
            self.fail(Fault.PROXY_LOOP_DETECTED, "this request already passed through this proxy")
            return
        if self.unrouted is not None:
            self.upstream = ""
            self.fail(Fault.DESTINATION_NOT_FOUND, self.unrouted)
            return
        if ctx.gauges.in_flight > ctx.max_in_flight:
            self.fail(Fault.CONNECTION_LIMIT_REACHED, "limits.max_in_flight reached")
            return
        if head.grpc:
            if not ctx.pool.trailers:
                self._no_trailers()
                return
            self._arm_grpc_deadline(head.lines)
        conn = ctx.pool.acquire(self)
        if conn is not None:
            self.on_upstream_connected(conn, True)  # reused (positional: the hot call)

    def _no_trailers(self) -> None:
        upstream = self.ctx.upstream
        spoken = "chose HTTP/1.1 (ALPN)" if upstream.startswith("https") else "is HTTP/1.1"
        self.fail(
            Fault.PROXY_CONFIGURATION_ERROR,
            f"a gRPC call needs an HTTP/2 upstream; upstream {upstream} {spoken}",
        )

    def _arm_grpc_deadline(self, lines: list[bytes]) -> None:
        """The caller's grpc-timeout bounds the upstream phases, from the request's arrival:
        one timer for such a call (the sweep's granularity is too coarse for it)."""
        for line in lines:
            if line[:13].lower() == b"grpc-timeout:":
                limit = grpc.timeout_ns(line[13:])
                if limit is not None:
                    self.grpc_timeout_ns = limit
                    delay = max(self.t_start + limit - perf_ns(), 0) / 1e9
                    loop = self.ctx.pool.loop
                    self.grpc_timer = loop.call_later(delay, self.on_grpc_deadline)
                return

    def on_grpc_deadline(self) -> None:
        """The caller's grpc-timeout passed: the proxy ends the call DEADLINE_EXCEEDED, and
        the record says the proxy did."""
        self.grpc_timer = None
        if self.done:
            return
        self.grpc_expired = True
        limit = self.grpc_timeout_ns
        if not self.response_started:
            self.cancel_connect()
            self.on_upstream_failed(DeadlineExpired(limit, "grpc-timeout"))
            return
        # The response is streaming: it ends with the status a gRPC client reads, in
        # trailers, and the origin's stream is cancelled.
        self._drop_upstream()
        fault = Fault.HTTP_RESPONSE_TIMEOUT
        self.fault = fault
        self.details = (
            f"the caller's grpc-timeout ({duration_text(limit)}) passed while the response "
            "was streamed"
        )
        self.source = Source.PROXY
        self.grpc_status = grpc.DEADLINE_EXCEEDED
        message = grpc.message_of_fault(fault.value, self.details, self.ctx.proxy_name)
        self.grpc_message = message
        self.sink.send_trailers(
            [(b"grpc-status", b"4"), (b"grpc-message", grpc.percent_encode(message))]
        )
        self.sink.send_end()
        self.finish()

    # -- request side -------------------------------------------------------------------------

    def on_upstream_connected(self, conn: OriginConnection, reused: bool) -> None:
        if self.done:
            self.ctx.pool.release(conn, reusable=True)
            return
        head = self.head
        assert head is not None
        if head.grpc and not self.ctx.pool.trailers:  # ALPN chose HTTP/1.1 on the way
            self.ctx.pool.release(conn, reusable=True)
            self._no_trailers()
            return
        self.up = conn
        self.reused = reused
        conn.begin(self, head)
        down = self.down
        if down.write_paused:
            self.client_held = True
            conn.pause_reading()
        self.phase = SEND
        self.t_sent = perf_ns()
        pending = self.pending
        if pending:
            self.pending = None
            self.pending_bytes = 0
            for data in pending:
                conn.send_data(data)
            down.resume_reading(PAUSE_BUFFER)
        if self.request_complete:
            if head.chunked:
                conn.send_end()
            self.phase = AWAIT_HEAD
            self.progress_ns = self.t_sent
        if not down.in_feed:
            conn.flush()

    def on_request_body(self, data: bytes) -> None:
        """Request body bytes from the client (a Content-Length body was checked against
        the limit with its head; one of unknown length is checked as it comes)."""
        size = len(data)
        self.body_bytes_in += size
        sample = self.request_sample
        if sample is not None and len(sample) < REQUEST_SAMPLE_BYTES:
            sample += data[: REQUEST_SAMPLE_BYTES - len(sample)]
        head = self.head
        if head is not None and head.chunked:
            limit = self.ctx.max_request_body_bytes
            if limit and self.body_bytes_in > limit:
                self.on_request_error(
                    RequestProblem.BODY_TOO_LARGE, f"request body over {limit} bytes"
                )
                return
        replay = self.replay
        if replay is not None:
            self.replay_bytes += size
            if self.replay_bytes > REPLAY_MAX_BYTES:
                self.replay = None
            else:
                replay.append(data)
        if self.done:
            return
        up = self.up
        if up is not None and self.phase >= SEND:
            up.send_data(data)
            if not self.down.in_feed:
                up.flush()
            return
        if self.pending is None:
            self.pending = []
        self.pending.append(data)
        self.pending_bytes += size
        if self.pending_bytes > PENDING_HIGH_BYTES:
            self.down.pause_reading(PAUSE_BUFFER)

    def on_request_complete(self) -> None:
        self.request_complete = True
        up = self.up
        if self.done or up is None or self.phase < SEND:
            return  # the end is sent with the rest when the upstream is ready
        head = self.head
        if head is not None and head.chunked:  # a known length ends by itself (codec.py)
            up.send_end()
            if not self.down.in_feed:
                up.flush()
        if self.phase is SEND:
            # The whole request is on its way: the response_headers timeout starts now.
            self.phase = AWAIT_HEAD
            self.progress_ns = perf_ns()

    def flush_upstream(self) -> None:
        """The client codec finished a read: what it produced for the upstream leaves."""
        up = self.up
        if up is not None:
            up.flush()

    def on_request_error(self, problem: RequestProblem, detail: str) -> None:
        """The client's request turned out bad after its head (body framing, size)."""
        if self.done:
            return
        self.close_after = True
        if not self.started:
            self.reject = (problem, detail)  # answered in turn
            return
        up = self.up
        if up is not None:
            self.up = None
            self.ctx.pool.release(up, reusable=False)
        self.cancel_connect()
        self.fail(Fault.HTTP_REQUEST_ERROR, detail, problem)

    # -- response side -------------------------------------------------------------------------

    def on_response_interim(self, status: int, head: ResponseHead) -> None:
        """A 1xx (not 101) response: the client codec relays it if its client can take it."""
        self.sink.send_interim(self, status, head)

    def on_response_head(self, status: int, head: ResponseHead) -> None:
        """The origin's response head (already checked by the origin codec)."""
        request = self.head
        assert request is not None
        now = perf_ns()
        self.t_response_head = self.progress_ns = now
        self.status = self.upstream_status = status
        self.phase = BODY
        if status == 101:
            self.tunnel = True
        elif request.upgrade is not None:
            self.close_after = True  # a refused upgrade leaves the connection unusable
        if self.ctx.draining and not self.down.has_queued():
            self.close_after = True
        self.sink.send_head(self, status, head, now)
        self.response_started = True  # only now: a defect above still gets a clean 500
        if status >= 400 and self.ctx.diagnostics:
            self.evidence = Evidence(status, head.raw)

    def on_response_data(self, data: bytes) -> None:
        self.body_bytes_out += len(data)
        evidence = self.evidence
        if evidence is not None and len(evidence.body) < BODY_SAMPLE_BYTES:
            evidence.body += data[: BODY_SAMPLE_BYTES - len(evidence.body)]
        self.sink.send_data(data)

    def on_response_trailers(self, fields: list[tuple[bytes, bytes]]) -> None:
        """The origin's trailers (HTTP/2): recorded (a gRPC call's status), then sent on."""
        self.note_trailers(fields)
        self.sink.send_trailers(fields)

    def note_trailers(self, fields: list[tuple[bytes, bytes]]) -> None:
        """A gRPC call's outcome from the origin's trailers (or its trailers-only head)."""
        head = self.head
        if head is None or not head.grpc:
            return
        for name, value in fields:
            if name == b"grpc-status":
                self.grpc_status = int(value) if value.isdigit() else grpc.UNKNOWN
            elif name == b"grpc-message":
                self.grpc_message = unquote(value.decode("latin-1"))

    def flush(self) -> None:
        """The origin codec finished a read: what it produced for the client leaves."""
        self.sink.flush()

    def on_response_end(self, reusable: bool) -> None:
        if self.done:
            return
        self.sink.send_end()
        up = self.up
        self.up = None
        if up is not None:
            if self.client_held:
                up.resume_reading()  # the next exchange on it must not find it paused
            reusable = (
                reusable
                and self.request_complete
                and not up.close_delimited
                and (self.head is None or self.head.upgrade is None)  # never after Upgrade
            )
            self.ctx.pool.release(up, reusable)
        if not self.request_complete:
            self.close_after = True  # the rest of the request body cannot be framed any more
        head = self.head
        if head is not None and head.grpc and self.grpc_status is None:
            # No grpc-status came: a non-gRPC answer (a load balancer's 502 page); the
            # record says what a gRPC client makes of it.
            self.grpc_status = grpc.status_of_http(self.status)
        self.finish()

    # -- tunnel (Upgrade) -----------------------------------------------------------------------

    def on_tunnel_open(self, rest: bytes) -> None:
        """The upstream switched protocols: from now on bytes flow both ways untouched."""
        self.phase = Phase.TUNNEL
        self.sink.flush()
        held = self.held
        if held:
            self.held = None
            self.up.send_raw(held)  # type: ignore[union-attr]
            self.down.resume_reading(PAUSE_BUFFER)
        if rest:
            self.on_tunnel_data(rest)

    def on_client_tunnel_data(self, data: bytes) -> None:
        """Client bytes after an Upgrade request: held until the upstream answers 101."""
        self.body_bytes_in += len(data)
        if self.tunnel and self.up is not None:
            self.up.send_raw([data])
            return
        if self.done or self.phase is Phase.BODY:
            return  # the upgrade was refused: these bytes are never forwarded
        held = self.held
        if held is None:
            held = self.held = []
        held.append(data)
        if sum(map(len, held)) > PENDING_HIGH_BYTES:
            self.down.pause_reading(PAUSE_BUFFER)

    def on_tunnel_data(self, data: bytes) -> None:
        self.body_bytes_out += len(data)
        self.sink.send_raw(data)

    def on_tunnel_closed(self) -> None:
        self.up = None
        if not self.done:
            self.down.close()
            self.finish()

    # -- back-pressure --------------------------------------------------------------------------

    def upstream_write_paused(self) -> None:
        self.down.pause_reading(PAUSE_UPLOAD)

    def upstream_write_resumed(self) -> None:
        self.down.resume_reading(PAUSE_UPLOAD)

    def client_write_paused(self, paused: bool) -> None:
        """The client stopped (or resumed) reading: so does the origin's connection."""
        self.client_held = paused
        up = self.up
        if up is not None:
            if paused:
                up.pause_reading()
            else:
                up.resume_reading()

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
            not self.retried
            and not self.response_started
            and self.replay is not None
            and self.request_complete
            and (
                (isinstance(error, StreamReset) and error.unprocessed)
                or (fault in STALE_CONNECTION_FAULTS and self.reused and self.idempotent)
            )
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
        conn = self.ctx.pool.acquire(self, fresh=True)
        if conn is not None:
            self.on_upstream_connected(conn, reused=False)
