"""`/metrics`: the proxy's own counters in Prometheus form, rendered at scrape time.

Rules:
1. Nothing here runs on the hot path. `Stats` keeps plain counters and fixed-bucket
   histograms; this collector reads them when Prometheus scrapes and builds the families
   then, as plain data (`exposition.Family`). `render` writes them into the format the
   scraper negotiated without the library's per-sample objects (`exposition`: the same
   bytes, a fraction of the time; the scrape runs on the data plane's loop), and the
   library's own families (`collect`) stay there for any other reader of the registry.
2. Label values are bounded: a status code, a source, a layer, a fault token, a phase name.
   Never a path, a request id or a client address. `error` is "" when there is none.
3. One private `CollectorRegistry` per server: two proxies in one process (tests) never see
   each other's numbers, and the process-wide default registry stays untouched.
4. `protocol` (`http/1.1` | `h2`) on the request families: `ProtocolSplit`, an observer of
   finished exchanges, counts the HTTP/2 ones only (an HTTP/1.1 exchange costs it one
   comparison); the HTTP/1.1 series are the stats' totals less those. Nothing on the data
   plane changes, and the two can never disagree on a total.
5. `faultline_origin_hop_responses_total{hop,code}` counts origin responses made by an
   intermediary behind the origin (diagnosis.py). Its `hop` is a product from the fixed
   signature table, or a Proxy-Status member name: at most `HOP_NAMES_MAX` of those get
   their own label value, the rest are counted as "other". The family appears once there
   is a sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from operator import sub
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .. import __version__
from ..diagnosis.faults import Source
from .breakdown import CounterKey, layer_of
from .exposition import COUNTER, GAUGE, HISTOGRAM, INFO, Encoder, Exposition, Family
from .gcwatch import GENERATIONS
from .histogram import BUCKETS_S, Histogram

if TYPE_CHECKING:
    from ..diagnosis.record import Exchange
    from .sink import Telemetry

HTTP11: Final = "http/1.1"  # the values of the `protocol` label: Exchange.protocol
H2: Final = "h2"


# The `le` label of every bucket (the last one +Inf), formatted once.
LES: Final = (*(floatToGoString(bound) for bound in BUCKETS_S), "+Inf")


def _histogram(name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> Family:
    return Family(name, documentation, HISTOGRAM, labelnames, LES)


def _less(whole: Histogram, part: Histogram) -> Histogram:
    """The observations of `whole` that are not in `part` (a subset of them): `whole`
    itself when `part` is empty (the common case: most label sets see no traffic)."""
    if not any(part.counts):
        return whole
    rest = Histogram()
    counts = list(map(sub, whole.counts, part.counts))
    rest.counts = counts if min(counts) >= 0 else [max(n, 0) for n in counts]
    rest.sum_ns = max(whole.sum_ns - part.sum_ns, 0)
    return rest


def _add_split(family: Family, labels: list[str], n: int, h2: int, *route: str) -> None:
    """`n` exchanges of which `h2` spoke HTTP/2: a sample per protocol (HTTP/1.1's always,
    HTTP/2's when there is one)."""
    if n > h2 or not h2:
        family.add([*labels, HTTP11, *route], max(n - h2, 0))
    if h2:
        family.add([*labels, H2, *route], h2)


def _add_durations(
    family: Family, source: str, whole: Histogram, h2: Histogram, *route: str
) -> None:
    h1 = _less(whole, h2)
    family.add_histogram([source, HTTP11, *route], h1.counts, h1.sum_s)
    family.add_histogram([source, H2, *route], h2.counts, h2.sum_s)


class ProtocolSplit:
    """The HTTP/2 share of what `Stats` counts: exchanges by (status, source, error) and
    their durations by source, the same keys and values `Stats` records; with routes, also
    by route (`Stats.routes` holds each route's share of both protocols)."""

    __slots__ = ("counts", "durations", "route_counts", "route_durations")

    def __init__(self) -> None:
        self.counts: dict[CounterKey, int] = {}
        self.durations: dict[str, Histogram] = {s.value: Histogram() for s in Source}
        self.route_counts: dict[tuple[str, CounterKey], int] = {}
        self.route_durations: dict[tuple[str, str], Histogram] = {}  # (route, source)

    def observe(self, ex: Exchange) -> None:
        if ex.protocol == HTTP11:
            return
        fault = ex.fault
        source = ex.source._value_
        key = (ex.status, source, None if fault is None else fault._value_)
        self.counts[key] = self.counts.get(key, 0) + 1
        duration = ex.t_end - ex.t_start
        self.durations[source].observe_ns(duration)
        route = ex.route
        if route is not None:
            self.route_counts[(route, key)] = self.route_counts.get((route, key), 0) + 1
            h = self.route_durations.get((route, source))
            if h is None:
                h = self.route_durations[(route, source)] = Histogram()
            h.observe_ns(duration)

    @classmethod
    def of(cls, telemetry: Telemetry) -> ProtocolSplit:
        """The split observing `telemetry`, made and registered on first use (a second
        registry over the same telemetry must not count twice)."""
        for observer in telemetry.observers:
            split = getattr(observer, "__self__", None)
            if isinstance(split, cls):
                return split
        split = cls()
        telemetry.observers.append(split.observe)
        return split


class FaultlineCollector:
    """Every `faultline_*` family from the live `Stats` and the upstream pool: as plain
    `Family` data (`families`, what a scrape renders) or as the library's (`collect`)."""

    def __init__(self, telemetry: Telemetry, pool_counts: Callable[[], tuple[int, int]]) -> None:
        self.telemetry = telemetry
        self.pool_counts = pool_counts
        self.split = ProtocolSplit.of(telemetry)

    def collect(self) -> Iterator[Metric]:
        return (family.metric() for family in self.families())

    def families(self) -> list[Family]:
        self.telemetry.settle()
        stats = self.telemetry.stats

        build = Family("faultline_build", "Faultline build information.", INFO, ("version",))
        build.add([__version__], 1)

        split = self.split
        routes = stats.routes  # with routes, the request families carry a `route` label
        route_label = ("route",) if routes else ()
        no_route = ("",) * len(route_label)
        responses = Family(
            "faultline_responses",
            "Finished exchanges by status sent (499: the client left), who produced it "
            "(origin, proxy, client), the layer at fault, the RFC 9209 error token "
            '("" when none), the protocol the client spoke (http/1.1, h2) and, with routes, '
            'the route that served it ("" when none matched).',
            COUNTER,
            ("code", "source", "layer", "error", "protocol", *route_label),
        )
        for key, n in list(stats.counts.items()):
            status, source, error = key
            labels = [str(status), source, layer_of(error), error or ""]
            h2 = split.counts.get(key, 0)
            for name, route in routes.items():
                in_route = route.counts.get(key, 0)
                if in_route:
                    h2_in_route = split.route_counts.get((name, key), 0)
                    _add_split(responses, labels, in_route, h2_in_route, name)
                    n, h2 = n - in_route, h2 - h2_in_route
            if n or not routes:
                _add_split(responses, labels, n, h2, *no_route)

        duration = _histogram(
            "faultline_request_duration_seconds",
            "Time from the first request byte to the last response byte, by source, the "
            "protocol the client spoke and, with routes, the route.",
            ("source", "protocol", *route_label),
        )
        for source, whole in stats.duration_by_source.items():
            h2_part = split.durations[source]
            for name, route in routes.items():
                of_route = route.durations[source]
                h2_of_route = split.route_durations.get((name, source)) or Histogram()
                _add_durations(duration, source, of_route, h2_of_route, name)
                whole, h2_part = _less(whole, of_route), _less(h2_part, h2_of_route)
            _add_durations(duration, source, whole, h2_part, *no_route)

        lag = _histogram(
            "faultline_event_loop_lag_seconds",
            "How late the event loop got to an I/O event that was due, sampled every 20 ms: "
            "what every request waits for besides its own work.",
        )
        lag_total = stats.loop_lag.total
        lag.add_histogram([], lag_total.counts, lag_total.sum_s)

        gc_pauses = _histogram(
            "faultline_gc_pause_seconds",
            "How long each cyclic garbage collection held the process (and its event "
            "loop), by generation.",
            ("generation",),
        )
        for generation, h in zip(GENERATIONS, stats.gc.by_generation, strict=True):
            gc_pauses.add_histogram([generation], h.counts, h.sum_s)

        phases = _histogram(
            "faultline_upstream_phase_seconds",
            "Duration of each upstream phase: wait (held by upstream_wait while the upstream "
            "refused), dns, connect (the successful TCP attempt), tls, queue (waiting for a "
            "pool slot), ttfb (request sent to response head), body (response head to end).",
            ("phase",),
        )
        for phase, h in stats.phases.items():
            phases.add_histogram([phase], h.counts, h.sum_s)

        families = [build, responses, duration, lag, gc_pauses, phases]
        for name, doc, kind, value in (
            (
                "faultline_in_flight_requests",
                "Exchanges started and not finished yet.",
                GAUGE,
                stats.in_flight,
            ),
            (
                "faultline_retries",
                "Requests replayed once on a fresh upstream connection after a reused one "
                "failed before any response byte.",
                COUNTER,
                stats.retries,
            ),
            (
                "faultline_held_requests",
                "Requests held by upstream_wait while the upstream refused connections.",
                COUNTER,
                stats.held,
            ),
            (
                "faultline_held_requests_expired",
                "Held requests whose upstream_wait ran out: the upstream never accepted.",
                COUNTER,
                stats.held_expired,
            ),
            (
                "faultline_access_log_dropped_lines",
                "Access-log lines dropped because stdout's reader fell behind by more than "
                "the proxy keeps waiting (the proxy never waits for it).",
                COUNTER,
                stats.log_dropped,
            ),
            (
                "faultline_refused_connections",
                "Client connections closed unread because limits.max_connections was reached.",
                COUNTER,
                stats.refused_connections,
            ),
        ):
            family = Family(name, doc, kind)
            family.add([], value)
            families.append(family)

        grpc_calls = Family(
            "faultline_grpc_responses",
            "Finished gRPC calls by their grpc-status and who produced it (a proxy-made "
            "answer carries the status of CONTRACT.md's table).",
            COUNTER,
            ("source", "grpc_status"),
        )
        for (source, grpc_status), n in list(stats.grpc_counts.items()):
            grpc_calls.add([source, str(grpc_status)], n)
        families.append(grpc_calls)

        if stats.hop_counts:
            hops = Family(
                "faultline_origin_hop_responses",
                "Origin responses made by an intermediary behind the origin (its Proxy-Status, "
                "or a known product's error page or headers), by that hop and the status.",
                COUNTER,
                ("hop", "code"),
            )
            for (hop, status), n in list(stats.hop_counts.items()):
                hops.add([hop, str(status)], n)
            families.append(hops)

        idle, busy = self.pool_counts()
        connections = Family(
            "faultline_upstream_pool_connections",
            "Upstream connections: idle (kept for reuse) and busy (serving an exchange).",
            GAUGE,
            ("state",),
        )
        connections.add(["idle"], idle)
        connections.add(["busy"], busy)
        families.append(connections)
        return families


class FaultlineRegistry(CollectorRegistry):
    """A server's own registry (not the process-wide default one): the faultline families
    first, then whatever else is registered (a supervisor's worker families). `render`
    writes the faultline families itself (`exposition`) and lets the library encode the
    rest."""

    def __init__(self, collector: FaultlineCollector) -> None:
        super().__init__(auto_describe=False)
        super().register(collector)
        self.faultline = collector
        self.others: list[Collector] = []
        self.exposition = Exposition()

    def register(self, collector: Collector) -> None:
        super().register(collector)
        self.others.append(collector)

    def unregister(self, collector: Collector) -> None:
        super().unregister(collector)
        self.others.remove(collector)

    def render(self, encoder: Encoder) -> bytes | None:
        """What `encoder(self)` returns, or None when `exposition` cannot write it."""
        if self.exposition.format(encoder) is None:
            return None
        ours = self.exposition.render(self.faultline.families(), encoder)
        if ours is None:
            return None
        others = _Others(self.others)
        return ours.encode("utf-8") + encoder(others)


class _Others:
    def __init__(self, collectors: list[Collector]) -> None:
        self.collectors = collectors

    def collect(self) -> Iterator[Metric]:
        for collector in self.collectors:
            yield from collector.collect()


def make_registry(
    telemetry: Telemetry, pool_counts: Callable[[], tuple[int, int]]
) -> FaultlineRegistry:
    """A registry of this server's own; `pool_counts` gives the upstream pool's idle and
    busy connections."""
    return FaultlineRegistry(FaultlineCollector(telemetry, pool_counts))


def render(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The exposition body and its Content-Type, negotiated from the scraper's Accept
    (Prometheus text format 0.0.4 by default, OpenMetrics when asked for)."""
    encoder, content_type = choose_encoder(accept or "")
    if isinstance(registry, FaultlineRegistry):
        body = registry.render(encoder)
        if body is not None:
            return body, content_type
    return encoder(registry), content_type
