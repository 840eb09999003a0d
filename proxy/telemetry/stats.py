"""Aggregation of finished exchanges: counters, fixed-bucket histograms, sliding windows.

Rules:
1. Finished exchanges arrive in batches (`record_batch`, from `Telemetry.settle`): per
   exchange a dict increment, a few histogram bucket increments, a window slot; nothing
   is sorted, nothing is allocated for a successful exchange beyond its counter key.
   Readers settle the telemetry first, so what they see is exact.
2. All breakdowns (by source, layer, error, status, class) are derived from one counter
   keyed by (status, source, error) when read, so they can never disagree.
3. Percentiles are interpolated from the fixed buckets when `/stats` is read.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import deque
from typing import TYPE_CHECKING, Any, Final

from ..base.gauges import Gauges
from ..diagnosis.faults import Source
from ..diagnosis.hops import HOP_NAMES_MAX, HOP_OTHER, HOPS
from .breakdown import CounterKey, RouteStats, breakdown, layer_of
from .gcwatch import GC_PAUSES
from .histogram import BUCKETS_NS, Histogram
from .looplag import LoopLag

if TYPE_CHECKING:
    from ..diagnosis.record import Exchange

_ORIGIN: Final = Source.ORIGIN._value_
_HTTP11: Final = "http/1.1"  # Exchange.protocol of an HTTP/1.1 client
PHASES: Final = ("wait", "dns", "connect", "tls", "queue", "ttfb", "body")
WINDOWS_S: Final = (60, 300)


# A duration's bucket: compiled, a native scan from the smallest bound costs a third of a
# call into `bisect` (~1,000 instructions, 3 per exchange); interpreted, `bisect` is cheaper.
COMPILED: Final = not __file__.endswith(".py")
_BOUNDS: Final = BUCKETS_NS
_N_BOUNDS: Final = len(BUCKETS_NS)


def _bucket(value: int) -> int:
    """`bisect_left(BUCKETS_NS, value)`."""
    i = 0
    while i < _N_BOUNDS and _BOUNDS[i] < value:
        i += 1
    return i


class Stats:
    """Everything `/stats` and `/metrics` report, updated in place."""

    def __init__(self, recent_errors: int = 100, gauges: Gauges | None = None) -> None:
        self.started_at = time.time()
        self.started_ns = time.perf_counter_ns()
        # What the forwarding core counts live (in flight; connections refused unread over
        # limits.max_connections), shared with it by the server.
        self.gauges = gauges or Gauges()
        self.loop_lag = LoopLag()  # sampled by the server's LoopWatch
        self.gc = GC_PAUSES  # this process's collector pauses (a supervisor: its workers')
        self.total = 0
        self.retries = 0
        self.held = 0  # requests held by upstream_wait while the upstream refused
        self.held_expired = 0  # ... of which the upstream never accepted in time
        self.log_dropped = 0  # access-log lines a stalled stdout reader could not take
        self.h2 = 0  # exchanges of clients speaking HTTP/2 (the rest spoke HTTP/1.1)
        self.grpc_counts: dict[tuple[str, int], int] = {}  # (source, grpc-status)
        self.hop_counts: dict[tuple[str, int], int] = {}  # (hop behind origin, status)
        self._hop_names: set[str] = set()
        self.counts: dict[CounterKey, int] = {}
        self.duration_by_source: dict[str, Histogram] = {s.value: Histogram() for s in Source}
        self.phases: dict[str, Histogram] = {p: Histogram() for p in PHASES}
        self.ttfb = self.phases["ttfb"]
        self.body = self.phases["body"]
        # Per-second slots for the sliding windows: deque of [second, {key: n}].
        self._slots: deque[list[Any]] = deque()
        self._slot_second = -1
        self._slot_counts: dict[CounterKey, int] = {}
        self.recent: deque[dict[str, Any]] = deque(maxlen=recent_errors)
        self.routes: dict[str, RouteStats] = {}  # by route name, when there are routes

    @property
    def in_flight(self) -> int:
        return self.gauges.in_flight

    @property
    def refused_connections(self) -> int:
        return self.gauges.refused_connections

    # -- hot path ------------------------------------------------------------------------------

    def record_batch(self, batch: list[Exchange]) -> None:
        """Finished exchanges, already counted out of `in_flight` (`Forwarder.finish`).

        The common exchange (the origin answered below 400 on a pooled connection, no
        fault) is aggregated in locals: counts per status, histogram sums and maxima,
        merged once per batch and second. Every other one goes through `_record_one`.
        """
        self.total += len(batch)
        bounds = BUCKETS_NS
        scan = COMPILED  # a local: one load per use when interpreted
        origin = self.duration_by_source[_ORIGIN]
        ttfb = self.ttfb
        body = self.body
        d_counts, t_counts, b_counts = origin.counts, ttfb.counts, body.counts
        d_sum = t_sum = b_sum = d_max = t_max = b_max = 0
        ok: dict[int, int] = {}  # status -> exchanges, in the current second
        second = self._slot_second
        for ex in batch:
            t_end = ex.t_end
            if t_end // 1_000_000_000 != second:
                self._count_ok(ok)
                ok = {}
                second = t_end // 1_000_000_000
                self._new_slot(second)
            status = ex.status
            t_head = ex.t_response_head
            t_sent = ex.t_sent
            if (
                status >= 400
                or not t_head
                or not t_sent
                or ex.fault is not None
                or ex.t_connect
                or ex.t_pool
                or ex.retried
                or ex.protocol != _HTTP11
            ):
                self._record_one(ex)
                continue
            ok[status] = ok.get(status, 0) + 1
            value = t_end - ex.t_start
            i = _bucket(value) if scan else bisect_left(bounds, value)
            d_counts[i] += 1
            d_sum += value
            if value > d_max:
                d_max = value
            if ex.route is not None:  # routes: its route's share, with the same bucket
                self.route(ex.route).ok(status, i, value)
            value = t_head - t_sent
            t_counts[_bucket(value) if scan else bisect_left(bounds, value)] += 1
            t_sum += value
            if value > t_max:
                t_max = value
            value = t_end - t_head
            b_counts[_bucket(value) if scan else bisect_left(bounds, value)] += 1
            b_sum += value
            if value > b_max:
                b_max = value
        self._count_ok(ok)
        origin.sum_ns += d_sum
        ttfb.sum_ns += t_sum
        body.sum_ns += b_sum
        origin.max_ns = max(origin.max_ns, d_max)
        ttfb.max_ns = max(ttfb.max_ns, t_max)
        body.max_ns = max(body.max_ns, b_max)

    def route(self, name: str) -> RouteStats:
        route = self.routes.get(name)
        if route is None:
            route = self.routes[name] = RouteStats()
        return route

    def _count_ok(self, ok: dict[int, int]) -> None:
        """Counts of common exchanges by status into the totals and the current second."""
        counts = self.counts
        window = self._slot_counts
        for status, n in ok.items():
            key = (status, _ORIGIN, None)
            counts[key] = counts.get(key, 0) + n
            window[key] = window.get(key, 0) + n

    def _record_one(self, ex: Exchange) -> None:
        """Any exchange, in full (its second's slot is current)."""
        if ex.protocol != _HTTP11:
            self.h2 += 1
        grpc_status = ex.grpc_status
        if grpc_status is not None:
            grpc_key = (ex.source._value_, grpc_status)
            self.grpc_counts[grpc_key] = self.grpc_counts.get(grpc_key, 0) + 1
        fault = ex.fault
        error = None if fault is None else fault._value_
        source = ex.source._value_
        status = ex.status
        key = (status, source, error)
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
        window = self._slot_counts
        window[key] = window.get(key, 0) + 1
        t_end = ex.t_end
        self.duration_by_source[source].observe_ns(t_end - ex.t_start)
        if ex.route is not None:
            self.route(ex.route).record(key, source, t_end - ex.t_start)
        t_response_head = ex.t_response_head
        if t_response_head:
            if ex.t_sent:
                self.ttfb.observe_ns(t_response_head - ex.t_sent)
            self.body.observe_ns(t_end - t_response_head)
        if ex.t_connect or ex.t_pool or ex.retried:
            self._record_setup(ex)
        if error is not None or status >= 400 or (grpc_status is not None and grpc_status != 0):
            self.recent.appendleft(self._error_entry(ex, error))
            if ex.hop is not None:
                self._count_hop(ex.hop, ex.upstream_status or status)

    def _count_hop(self, hop: str, status: int) -> None:
        """Origin error responses by the hop behind the origin that made them (labels stay
        bounded: product names are a fixed set; other Proxy-Status names are capped)."""
        if hop not in HOPS and hop not in self._hop_names:
            if len(self._hop_names) < HOP_NAMES_MAX:
                self._hop_names.add(hop)
            else:
                hop = HOP_OTHER
        key = (hop, status)
        self.hop_counts[key] = self.hop_counts.get(key, 0) + 1

    def total_latency(self) -> Histogram:
        """All exchanges, whoever produced them (the per-source histograms merged)."""
        return Histogram.merged(list(self.duration_by_source.values()))

    def _record_setup(self, ex: Exchange) -> None:
        """The rarer phases: a new connection (dns, connect, tls), a pool wait, a retry."""
        phases = self.phases
        t_wait = ex.t_wait
        if t_wait:
            self.held += 1
            if ex.wait_expired:
                self.held_expired += 1
            phases["wait"].observe_ns(ex.t_connect - t_wait)
        if ex.t_connect and ex.t_connected:
            phases["connect"].observe_ns(ex.t_connected - ex.t_connect)
            if ex.t_dns:
                phases["dns"].observe_ns((t_wait or ex.t_connect) - ex.t_dns)
            if ex.t_tls_done:
                phases["tls"].observe_ns(ex.t_tls_done - ex.t_connected)
        if ex.t_pool:
            phases["queue"].observe_ns(
                (ex.t_dns or t_wait or ex.t_connect or ex.t_sent or ex.t_end) - ex.t_pool
            )
        if ex.retried:
            self.retries += 1

    def _new_slot(self, second: int) -> None:
        slots = self._slots
        self._slot_second = second
        self._slot_counts = {}
        slots.append([second, self._slot_counts])
        horizon = second - WINDOWS_S[-1]
        while slots[0][0] <= horizon:
            slots.popleft()

    @staticmethod
    def _error_entry(ex: Exchange, error: str | None) -> dict[str, Any]:
        entry = {
            "time": time.time(),
            "request_id": ex.request_id,
            "method": ex.method,
            "path": ex.path,
            "status": ex.status,
            "source": ex.source.value,
            "layer": layer_of(error),
            "error": error,
            "details": ex.details,
            "hop": ex.hop,
            "hints": list(ex.hints),
            "phases_ms": ex.phases_ms(),
            "route": ex.route,
        }
        if ex.grpc_status is not None:  # a gRPC call's outcome (an error, though HTTP 200)
            entry["grpc_status"] = ex.grpc_status
            entry["grpc_message"] = ex.grpc_message
        return entry

    # -- reading -------------------------------------------------------------------------------

    def window(self, seconds: int, now_ns: int | None = None) -> dict[str, Any]:
        now_s = (now_ns or time.perf_counter_ns()) // 1_000_000_000
        merged: dict[CounterKey, int] = {}
        for second, counts in self._slots:
            if second > now_s - seconds:
                for key, n in counts.items():
                    merged[key] = merged.get(key, 0) + n
        uptime_s = max((time.perf_counter_ns() - self.started_ns) / 1e9, 1e-9)
        span = min(float(seconds), uptime_s)
        responses = breakdown(merged)
        total = sum(merged.values())
        return {
            "responses": {"total": total, **responses},
            "rps": round(total / span, 3),
        }

    def series(self, seconds: int = WINDOWS_S[-1], now_ns: int | None = None) -> dict[str, Any]:
        """Responses per second by source over the last `seconds` (at most the longest
        window), oldest first, seconds without traffic as zeros: the dashboard's chart.

        Columns, not rows: `responses[source][i]` and `errors[source][i]` belong to the
        second starting at `start + i` (wall clock); an error is a status >= 400 or an
        exchange that carries an error token (a body cut mid-way).
        """
        seconds = max(1, min(seconds, WINDOWS_S[-1]))
        now_ns = now_ns or time.perf_counter_ns()
        now_s = now_ns // 1_000_000_000
        first = now_s - seconds + 1
        sources = [s.value for s in Source]
        responses = {s: [0] * seconds for s in sources}
        errors = {s: [0] * seconds for s in sources}
        for second, counts in self._slots:
            i = second - first
            if 0 <= i < seconds:
                for (status, source, error), n in counts.items():
                    responses[source][i] += n
                    if error is not None or status >= 400:
                        errors[source][i] += n
        wall_offset_s = time.time() - now_ns / 1e9
        return {
            "start": first + wall_offset_s,
            "step_s": 1,
            "sources": sources,
            "responses": responses,
            "errors": errors,
        }

    def latency(self) -> dict[str, Any]:
        """Summaries of every histogram: total, each upstream phase, each source (ms)."""
        return {
            "total": self.total_latency().summary(),
            "phases": {name: h.summary() for name, h in self.phases.items()},
            "by_source": {name: h.summary() for name, h in self.duration_by_source.items()},
        }

    def recent_errors(
        self, source: str | None = None, error: str | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if limit is not None and limit <= 0:
            return out
        for entry in self.recent:
            if source is not None and entry["source"] != source:
                continue
            if error is not None and entry["error"] != error:
                continue
            out.append(entry)
            if limit is not None and len(out) >= limit:
                break
        return out

    def by_grpc_status(self) -> dict[str, dict[str, int]]:
        """gRPC calls by grpc-status (as text), each by who produced it."""
        out: dict[str, dict[str, int]] = {}
        for (source, status), n in sorted(self.grpc_counts.items(), key=lambda kv: kv[0][1]):
            out.setdefault(str(status), {})[source] = n
        return out

    def snapshot(
        self,
        *,
        proxy: dict[str, Any],
        source: str | None = None,
        error: str | None = None,
        limit: int | None = None,
    ) -> dict[str, Any]:
        """The `/stats` document of CONTRACT.md."""
        now_ns = time.perf_counter_ns()
        return {
            "proxy": {
                **proxy,
                "started_at": self.started_at,
                "uptime_s": round((now_ns - self.started_ns) / 1e9, 3),
            },
            "requests": {"total": self.total, "in_flight": self.in_flight},
            "responses": {
                **breakdown(self.counts),
                "by_protocol": {"http/1.1": self.total - self.h2, "h2": self.h2},
                "by_grpc_status": self.by_grpc_status(),
            },
            "latency_ms": {
                "total": self.total_latency().summary(),
                "ttfb": self.phases["ttfb"].summary(),
                "connect": self.phases["connect"].summary(),
                "wait": self.phases["wait"].summary(),
            },
            "upstream_wait": {"held": self.held, "expired": self.held_expired},
            "windows": {f"{s}s": self.window(s, now_ns) for s in WINDOWS_S},
            "loop_lag_ms": self.loop_lag.summary(now_ns),
            "gc_ms": self.gc.summary(),
            "access_log": {"dropped_lines": self.log_dropped},
            "recent_errors": self.recent_errors(source, error, limit),
            **self._by_route(),
        }

    def _by_route(self) -> dict[str, Any]:
        if not self.routes:
            return {}
        return {"by_route": {name: route.document() for name, route in self.routes.items()}}
