"""The per-exchange record: what was asked, what happened, and when.

Rules: timing marks are `perf_counter_ns()` readings set once each (0 = never reached);
durations are derived from them, never stored twice. The protocol code writes the record
while the exchange runs; once its phase is DONE it is handed to the sinks (stats,
metrics, access log) and never written again.
"""

from __future__ import annotations

import time
from enum import IntEnum
from typing import Final

from .faults import Fault, Layer, RequestProblem, Source, info

perf_ns: Final = time.perf_counter_ns


class Phase(IntEnum):
    """Where an exchange is. A failure is classified from the phase it happened in."""

    REQUEST_HEAD = 0  # reading the client's request head
    QUEUED = 1  # pipelined behind an earlier exchange on the same connection
    POOL_WAIT = 2  # waiting for a free upstream connection slot
    DNS = 3  # resolving the upstream name
    CONNECT = 4  # TCP connect to the upstream
    TLS = 5  # TLS handshake with the upstream
    SEND = 6  # request head sent; request body streaming upstream
    AWAIT_HEAD = 7  # request complete; waiting for the upstream's response head
    BODY = 8  # streaming the response body to the client
    TUNNEL = 9  # upgraded (WebSocket): bytes flow both ways
    DONE = 10


# The members as module names for the hot path: a member looked up on its class goes through
# EnumType's __getattr__ hook (~70 ns each on 3.11, never cached); a global is ~15 ns, and a
# Final one a C static when compiled.
REQUEST_HEAD: Final = Phase.REQUEST_HEAD
QUEUED: Final = Phase.QUEUED
POOL_WAIT: Final = Phase.POOL_WAIT
DNS: Final = Phase.DNS
CONNECT: Final = Phase.CONNECT
TLS: Final = Phase.TLS
SEND: Final = Phase.SEND
AWAIT_HEAD: Final = Phase.AWAIT_HEAD
BODY: Final = Phase.BODY
TUNNEL: Final = Phase.TUNNEL
DONE: Final = Phase.DONE


_ORIGIN: Final = Source.ORIGIN


class Exchange:
    """One request and its response, from the first request byte to the last response byte.

    Every field is a slot set in `__init__` (no class-level defaults: an attribute that
    shadows a class attribute is never specialised by CPython 3.11's attribute cache).
    """

    __slots__ = (
        "body_bytes_in",
        "body_bytes_out",
        "client",
        "details",
        "fault",
        "grpc_message",
        "grpc_status",
        "hints",
        "hop",
        "method",
        "phase",
        "problem",
        "protocol",
        "request_id",
        "response_started",
        "retried",
        "reused",
        "route",
        "source",
        "status",
        "t_connect",
        "t_connected",
        "t_dns",
        "t_end",
        "t_pool",
        "t_response_head",
        "t_sent",
        "t_start",
        "t_tls_done",
        "t_wait",
        "target",
        "upstream",
        "upstream_status",
        "wait_expired",
    )

    def __init__(self, t_start: int, client: str, upstream: str) -> None:
        self.request_id = ""
        self.protocol = "http/1.1"  # or "h2": what the client spoke
        self.grpc_status: int | None = None  # a gRPC call's outcome (None: not gRPC, or none came)
        self.grpc_message: str | None = None
        self.method = ""
        self.target = ""
        self.phase = REQUEST_HEAD
        self.status = 0
        self.upstream_status = 0
        self.source = _ORIGIN
        self.fault: Fault | None = None
        self.problem: RequestProblem | None = None
        self.details: str | None = None
        self.body_bytes_in = 0
        self.body_bytes_out = 0
        self.reused = False
        self.retried = False
        self.response_started = False
        self.hop: str | None = None
        self.hints: tuple[str, ...] = ()
        self.wait_expired = False  # held by upstream_wait, and the upstream never accepted
        self.client = client
        self.upstream = upstream
        self.route: str | None = None  # the route that served it (`routes`; None: none)
        # Timing marks (perf_counter_ns, 0 = not reached)
        self.t_start = t_start
        self.t_pool = 0
        self.t_dns = 0
        self.t_wait = 0  # the first connect attempt, when upstream_wait held the request
        self.t_connect = 0  # the last connect attempt (the successful one, if any)
        self.t_connected = 0
        self.t_tls_done = 0
        self.t_sent = 0
        self.t_response_head = 0
        self.t_end = 0

    # -- derived facts ---------------------------------------------------------------------

    @property
    def layer(self) -> Layer:
        if self.fault is not None:
            return info(self.fault, self.problem).layer
        return Layer.ORIGIN

    @property
    def path(self) -> str:
        """The request target's path, without the query string."""
        target = self.target
        q = target.find("?")
        return target if q < 0 else target[:q]

    def wait_ns(self) -> int:
        """Time held by `upstream_wait` while the upstream refused (0 when not held): from
        the first connect attempt to the start of the last one (or to giving up)."""
        if self.t_wait:
            return self.t_connect - self.t_wait
        return 0

    def connect_ns(self) -> int:
        """TCP connect time of the successful attempt (0 when a pooled connection was
        reused, or no attempt succeeded)."""
        if self.t_connect and self.t_connected:
            return self.t_connected - self.t_connect
        return 0

    def ttfb_ns(self) -> int:
        """Request head sent upstream -> upstream response head complete."""
        if self.t_sent and self.t_response_head:
            return self.t_response_head - self.t_sent
        return 0

    def own_ns(self, now: int) -> int:
        """Time spent inside the proxy so far: elapsed minus upstream connect and wait."""
        now = now or perf_ns()
        elapsed = now - self.t_start
        waited = self.ttfb_ns()
        if self.t_pool or self.t_dns or self.t_connect:
            begin = self.t_pool or self.t_dns or self.t_wait or self.t_connect
            end = self.t_tls_done or self.t_connected or self.t_sent or now
            waited += end - begin
        return max(elapsed - waited, 0)

    def phases_ms(self) -> dict[str, float | None]:
        """Durations of each phase, in milliseconds (None: the phase did not happen)."""
        t_sent = self.t_sent
        t_head = self.t_response_head
        t_end = self.t_end
        ttfb = (t_head - t_sent) // 1000 / 1000 if t_sent and t_head else None
        body = (t_end - t_head) // 1000 / 1000 if t_head and t_end else None
        t_connect = self.t_connect
        t_pool = self.t_pool
        if not t_connect and not t_pool:  # a pooled connection: the common exchange
            return {
                "wait": None,
                "dns": None,
                "connect": None,
                "tls": None,
                "queue": None,
                "ttfb": ttfb,
                "body": body,
            }
        wait = dns = connect = tls = None
        t_dns = self.t_dns
        if t_connect:
            t_connected = self.t_connected
            t_tls = self.t_tls_done
            t_wait = self.t_wait
            wait = (t_connect - t_wait) // 1000 / 1000 if t_wait else None
            dns = ((t_wait or t_connect) - t_dns) // 1000 / 1000 if t_dns else None
            connect = (t_connected - t_connect) // 1000 / 1000 if t_connected else None
            tls = (t_tls - t_connected) // 1000 / 1000 if t_tls and t_connected else None
        queue_end = t_dns or self.t_wait or t_connect or t_sent
        queue = (queue_end - t_pool) // 1000 / 1000 if t_pool and queue_end else None
        return {
            "wait": wait,
            "dns": dns,
            "connect": connect,
            "tls": tls,
            "queue": queue,
            "ttfb": ttfb,
            "body": body,
        }

    def __repr__(self) -> str:
        return (
            f"<Exchange {self.request_id} {self.method} {self.target} phase={self.phase.name} "
            f"status={self.status} fault={self.fault}>"
        )
