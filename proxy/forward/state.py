"""An exchange's state, as the core keeps it, and every way an exchange ends: a fault
(`fail`), the client leaving (`client_gone`), the drain deadline (`cut_by_drain`), and
`finish`, which runs exactly once and hands the record to the sink.

`Forwarder` (`proxy.forward.forwarder`) adds the events that drive an exchange there.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Final

from ..base.text import duration_text
from ..diagnosis import grpc
from ..diagnosis.faults import CLIENT_CLOSED_STATUS, Fault, RequestProblem, Source, info
from ..diagnosis.hops import Evidence, diagnose
from ..diagnosis.record import DONE, Exchange, Phase, perf_ns
from .codec import ClientConnection, OriginConnection, RequestHead, ResponseSink

if TYPE_CHECKING:
    from .context import ForwardContext

log: Final = logging.getLogger("faultline")

IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


class ExchangeState(Exchange):
    """The core's state of one exchange, on top of its record (an `Exchange`): one object
    per exchange on the hot path. Once `finish` has run, nothing writes it any more and the
    sinks only read its record fields."""

    __slots__ = (
        "client_held",
        "close_after",
        "connect_task",
        "ctx",
        "done",
        "down",
        "evidence",
        "grpc_expired",
        "grpc_timeout_ns",
        "grpc_timer",
        "head",
        "held",
        "idempotent",
        "may_wait",
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
        "sink",
        "started",
        "tunnel",
        "unrouted",
        "up",
    )

    def __init__(
        self, ctx: ForwardContext, down: ClientConnection, sink: ResponseSink, t_start: int
    ) -> None:
        self.ctx = ctx
        Exchange.__init__(self, t_start, down.client_ip, ctx.upstream_authority)
        self.down = down
        self.sink = sink
        self.head: RequestHead | None = None
        self.reject: tuple[RequestProblem, str] | None = None
        self.unrouted: str | None = None  # no route matches: why (a 404 when its turn comes)
        self.up: OriginConnection | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.done = False
        self.client_held = False  # the client is not taking the response (its window, its socket)
        self.started = False  # its turn came: `start` ran
        self.tunnel = False
        self.request_complete = False
        self.request_id_line = b""  # the request id as a field line, for both codecs
        self.close_after = True
        self.replay: list[bytes] | None = None  # the request body, for one replay
        self.idempotent = False
        self.may_wait = False
        self.pending: list[bytes] | None = None  # request body held until the upstream is ready
        self.pending_bytes = 0
        self.replay_bytes = 0
        self.progress = 0
        self.progress_ns = 0
        self.evidence: Evidence | None = None  # kept for origin error responses only
        self.request_sample: bytearray | None = None  # a JSON request body, to judge a 5xx
        self.held: list[bytes] | None = None  # client bytes after an Upgrade, before 101
        self.grpc_timeout_ns = 0  # the caller's grpc-timeout (0: none)
        self.grpc_timer: asyncio.TimerHandle | None = None
        self.grpc_expired = False  # it passed: the proxy ends the call DEADLINE_EXCEEDED

    def attach(
        self, head: RequestHead | None, reject: tuple[RequestProblem, str] | None = None
    ) -> None:
        """The request head is complete (head None: it never could be)."""
        self.reject = reject
        if head is None:
            return
        self.close_after = not head.keep_alive
        router = self.ctx.router
        if router is not None:  # routes: from here on, the route's context
            route = router.choose(head.host, head.target)
            if route is None:
                self.unrouted = router.not_found(head.host, head.target)
            else:
                self.ctx = route.ctx
                self.route = route.name
                self.upstream = route.ctx.upstream_authority
                if route.strip:
                    head = head.retarget(route.stripped(head.target))
        self.head = head
        if head.method in IDEMPOTENT:
            self.idempotent = True
            self.replay = []
            self.may_wait = self.ctx.upstream_wait
        elif self.ctx.pool.multiplexed:
            self.replay = []  # an HTTP/2 origin may refuse the stream unprocessed
        content_type = head.content_type
        if (
            content_type is not None
            and content_type.find(b"json") >= 0
            and head.content_encoding is None  # a compressed body cannot be judged
            and self.ctx.diagnostics
        ):
            self.request_sample = bytearray()

    # -- the end ----------------------------------------------------------------------------------

    def on_internal_error(self, exc: BaseException) -> None:
        """A defect in Faultline: traceback to the log, a plain 500 to the client."""
        log.error("internal error in exchange %s", self.request_id, exc_info=exc)
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
        self.cancel_connect()
        if self.response_started:
            # The status line is already out: the client must see a broken response.
            self.sink.abort()
            self.finish()
            return
        if fault is Fault.DNS_ERROR and params is None:
            params = {"rcode": detail}
        if problem is not None or not self.request_complete or fault is Fault.PROXY_INTERNAL_ERROR:
            self.close_after = True
        row = info(fault, problem)
        assert row.status is not None, f"{fault} has no status of its own"
        self.status = row.status
        head = self.head
        if head is not None and head.grpc:
            # A gRPC client reads the outcome from grpc-status: HTTP 200, trailers-only.
            self.status = 200
            status = grpc.status_of_fault(fault, problem)
            self.grpc_status = grpc.DEADLINE_EXCEEDED if self.grpc_expired else status
            self.grpc_message = grpc.message_of_fault(row.token, detail, self.ctx.proxy_name)
        self.source = Source.PROXY
        self.sink.send_reply(self, row, detail, params)
        self.response_started = True
        self.finish()

    def client_gone(self) -> None:
        """The client connection closed: 499 unless the response was already complete."""
        if self.done:
            return
        self.cancel_connect()
        self._drop_upstream()
        if not self.tunnel:
            self.fault = Fault.CLIENT_CLOSED_REQUEST
            self.details = (
                "client closed the connection before the response was complete"
                if self.response_started
                else "client closed the connection before the response started"
            )
            self.status = CLIENT_CLOSED_STATUS
            if self.head is not None and self.head.grpc:
                self.grpc_status = grpc.CANCELLED  # logged only: nobody reads an answer
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
        self.cancel_connect()
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

    def cancel_connect(self) -> None:
        task = self.connect_task
        if task is not None:
            self.connect_task = None
            task.cancel()
        if self.phase is Phase.POOL_WAIT:
            self.ctx.pool.forget_waiter(self)

    # -- the end ----------------------------------------------------------------------------------

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        self.phase = DONE
        self.t_end = perf_ns()
        if self.grpc_timer is not None:
            self.grpc_timer.cancel()
            self.grpc_timer = None
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
        ctx = self.ctx
        ctx.gauges.in_flight -= 1
        ctx.record(self)
        self.down.exchange_finished(self)
