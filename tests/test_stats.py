"""The aggregation at its edges: a duration exactly on a bucket bound, the recent-errors
bound, the sliding windows' first and last second, the hop-label cap. `Stats` is fed
finished exchanges as the telemetry hands them over (`record_batch`), on both of its paths
(the common pooled 2xx/3xx and every other exchange)."""

from __future__ import annotations

import pytest

from proxy.diagnosis.faults import Fault, Source
from proxy.diagnosis.record import Exchange
from proxy.telemetry.breakdown import breakdown
from proxy.telemetry.histogram import BUCKETS_S, Histogram
from proxy.telemetry.stats import Stats

# The hop label's cap, spelled out: distinct Proxy-Status names with a label of their own,
# and the label every later one shares (a changed cap must fail here).
HOP_NAMES_MAX = 16
HOP_OTHER = "other"
S = 1_000_000_000  # ns
MS = 1_000_000
T0 = 10_000 * S  # an arbitrary perf_counter origin, on a whole second


def exchange(
    status: int = 200,
    *,
    end: int = T0 + 5 * MS,
    ttfb: int = 2 * MS,
    body: int = 1 * MS,
    source: Source = Source.ORIGIN,
    fault: Fault | None = None,
    hop: str | None = None,
    path: str = "/",
    **marks: int,
) -> Exchange:
    """A finished exchange: start, request sent, head received, end (a pooled connection
    unless `marks` set t_connect, t_pool, ...)."""
    ex = Exchange(end - ttfb - body - 1 * MS, "127.0.0.1", "app:3000")
    ex.status, ex.source, ex.fault, ex.hop, ex.target = status, source, fault, hop, path
    ex.method = "GET"
    ex.t_sent = ex.t_start + 1 * MS
    ex.t_response_head = end - body if ttfb else 0
    ex.t_end = end
    for name, value in marks.items():
        setattr(ex, name, value)
    return ex


# -- histogram buckets --------------------------------------------------------------------------


def test_the_buckets_are_the_documented_ladder():
    """1-1.5-2-3-5-7 per decade from 50 µs, and 300 s last (the +Inf bucket follows): the
    `le` bounds /metrics exposes, which dashboards and alerts are written against."""
    assert (
        *(5e-05, 7e-05),
        *(0.0001, 0.00015, 0.0002, 0.0003, 0.0005, 0.0007),
        *(0.001, 0.0015, 0.002, 0.003, 0.005, 0.007),
        *(0.01, 0.015, 0.02, 0.03, 0.05, 0.07),
        *(0.1, 0.15, 0.2, 0.3, 0.5, 0.7),
        *(1.0, 1.5, 2.0, 3.0, 5.0, 7.0),
        *(10.0, 15.0, 20.0, 30.0, 50.0, 70.0),
        *(100.0, 150.0, 200.0, 300.0),
    ) == BUCKETS_S
    assert len(Histogram().counts) == len(BUCKETS_S) + 1


def bucket_of(h: Histogram) -> int:
    (index,) = [i for i, n in enumerate(h.counts) if n]
    return index


@pytest.mark.parametrize(
    ("value_ns", "bucket"),
    [
        (1 * MS, BUCKETS_S.index(0.001)),  # exactly on a bound: that bucket (le="0.001")
        (1 * MS + 1, BUCKETS_S.index(0.0015)),  # a nanosecond above: the next one
        (1 * MS - 1, BUCKETS_S.index(0.001)),
        (50_000, 0),  # the lowest bound
        (300 * S, len(BUCKETS_S) - 1),  # the highest bound
        (300 * S + 1, len(BUCKETS_S)),  # +Inf
    ],
    ids=["on-1ms", "above-1ms", "below-1ms", "on-lowest", "on-highest", "above-highest"],
)
def test_a_duration_on_a_bound_falls_in_that_bucket(value_ns, bucket):
    h = Histogram()
    h.observe_ns(value_ns)
    assert bucket_of(h) == bucket
    # the same through both of Stats' paths: the common exchange and any other one
    for status in (200, 500):
        stats = Stats()
        stats.record_batch([exchange(status, ttfb=value_ns, body=value_ns)])
        assert bucket_of(stats.ttfb) == bucket, status
        assert bucket_of(stats.body) == bucket, status
        assert stats.ttfb.count == stats.body.count == stats.total_latency().count == 1
        assert stats.ttfb.max_ns == value_ns and stats.ttfb.sum_ns == value_ns


def test_sum_max_and_count_add_up_over_a_batch():
    stats = Stats()
    stats.record_batch(
        [exchange(200, ttfb=3 * MS), exchange(200, ttfb=7 * MS), exchange(204, ttfb=5 * MS)]
    )
    stats.record_batch([exchange(200, ttfb=1 * MS, body=3 * MS), exchange(200, ttfb=1 * MS)])
    assert stats.body.max_ns == 3 * MS and stats.body.sum_ns == 7 * MS
    assert stats.ttfb.count == 5 and stats.ttfb.sum_ns == 17 * MS and stats.ttfb.max_ns == 7 * MS
    origin = stats.duration_by_source["origin"]
    assert origin.count == 5 and origin.max_ns == 9 * MS  # 1 ms in the proxy + ttfb + 1 ms body
    assert stats.total == 5 and stats.counts == {(200, "origin", None): 4, (204, "origin", None): 1}


def test_quantiles_interpolate_inside_the_bucket():
    h = Histogram()
    assert h.quantile_ms(0.5) is None and h.summary()["max"] is None
    for _ in range(10):
        h.observe_ns(1 * MS)  # all in (0.7 ms, 1 ms]
    assert h.quantile_ms(0.5) == 0.85  # halfway through the bucket
    assert h.quantile_ms(1.0) == 1.0
    two = Histogram()
    two.observe_ns(1 * MS)
    two.observe_ns(2 * MS)
    assert two.quantile_ms(0.5) == 1.0  # the rank ends exactly at the first bucket's top
    assert two.quantile_ms(0.75) == 1.75  # halfway through (1.5 ms, 2 ms]
    over = Histogram()
    over.observe_ns(400 * S)  # +Inf: interpolated up to the maximum seen
    assert over.quantile_ms(0.5) == 350_000.0
    assert over.summary() == {
        "count": 1,
        "p50": 350_000.0,
        "p90": 390_000.0,
        "p99": 399_000.0,
        "max": 400_000.0,
    }


def test_a_quantile_never_exceeds_the_maximum():
    h = Histogram()
    h.observe_ns(1 * MS + 1)  # in (1 ms, 1.5 ms]: interpolation alone would say 1.5 ms
    assert h.quantile_ms(0.99) == 1.0
    odd = Histogram()
    odd.observe_ns(1_234_567)  # milliseconds with three decimals, every figure
    assert odd.summary() == {"count": 1, "p50": 1.235, "p90": 1.235, "p99": 1.235, "max": 1.235}


def test_merged_histograms_add_up():
    a, b = Histogram(), Histogram()
    a.observe_ns(1 * MS)
    b.observe_ns(3 * MS)
    b.observe_ns(3 * MS)
    total = Histogram.merged([a, b])
    assert total.count == 3 and total.sum_ns == 7 * MS and total.max_ns == 3 * MS


# -- which exchanges take the common path -----------------------------------------------------


@pytest.mark.parametrize(
    ("ex", "error_entry"),
    [
        (exchange(399), False),
        (exchange(400), True),  # the first error status
        (exchange(200, fault=Fault.HTTP_RESPONSE_INCOMPLETE), True),  # a cut body
        (exchange(200, ttfb=0), False),  # no response head (e.g. a tunnel)
    ],
    ids=["399", "400", "200-with-error-token", "200-without-head"],
)
def test_an_error_is_a_status_from_400_or_an_error_token(ex, error_entry):
    stats = Stats()
    stats.record_batch([ex])
    assert len(stats.recent) == int(error_entry)
    error = None if ex.fault is None else ex.fault.value
    assert stats.counts == {(ex.status, "origin", error): 1}
    head = 1 if ex.t_response_head else 0  # no head: no ttfb, no body time
    assert (stats.ttfb.count, stats.body.count) == (head, head)


def test_recent_errors_keep_a_hundred_by_default():
    stats = Stats()
    stats.record_batch([exchange(500, path=f"/{i}") for i in range(101)])
    entries = stats.recent_errors()
    assert len(entries) == 100 and entries[0]["path"] == "/100" and entries[-1]["path"] == "/1"


def test_the_rarer_phases_are_counted_whatever_the_status():
    stats = Stats()
    fresh = exchange(
        200, t_connect=T0, t_connected=T0 + 2 * MS, t_dns=T0 - 3 * MS, t_tls_done=T0 + 6 * MS
    )
    queued = exchange(200, t_pool=T0 - MS)
    replayed = exchange(200)
    replayed.retried = True
    held = exchange(200, t_wait=T0 - 5 * MS, t_connect=T0, t_connected=T0 + MS)
    held.wait_expired = True
    served = exchange(200, t_wait=T0 - 2 * MS, t_connect=T0, t_connected=T0 + MS)
    refused = exchange(502, source=Source.PROXY, fault=Fault.CONNECTION_REFUSED, t_connect=T0)
    refused.t_response_head = 0  # the connect failed: no connected time, no response
    stats.record_batch([fresh, queued, replayed, held, served, refused])
    assert stats.phases["connect"].count == 3 and stats.phases["connect"].max_ns == 2 * MS
    assert stats.phases["dns"].count == 1 and stats.phases["dns"].sum_ns == 3 * MS
    assert stats.phases["queue"].count == 1 and stats.phases["wait"].sum_ns == 7 * MS
    assert stats.phases["queue"].sum_ns == queued.t_sent - queued.t_pool == 3 * MS
    assert (stats.retries, stats.held, stats.held_expired) == (1, 2, 1)
    assert stats.phases["tls"].count == 1 and stats.phases["tls"].sum_ns == 4 * MS
    assert stats.ttfb.count == 5


# -- recent errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3])
def test_recent_errors_keep_the_last_n_newest_first(n):
    stats = Stats(recent_errors=n)
    stats.record_batch([exchange(500, path=f"/{i}") for i in range(n)])
    assert [e["path"] for e in stats.recent_errors()] == [f"/{i}" for i in reversed(range(n))]
    stats.record_batch([exchange(502, path=f"/{n}")])  # the (N+1)th pushes the oldest out
    paths = [e["path"] for e in stats.recent_errors()]
    assert paths == [f"/{i}" for i in reversed(range(1, n + 1))]


def test_recent_errors_filter_and_limit():
    stats = Stats()
    stats.record_batch(
        [
            exchange(502, source=Source.PROXY, fault=Fault.CONNECTION_REFUSED, path="/a"),
            exchange(500, path="/b"),
            exchange(504, source=Source.PROXY, fault=Fault.HTTP_RESPONSE_TIMEOUT, path="/c"),
        ]
    )
    paths = lambda entries: [e["path"] for e in entries]  # noqa: E731
    assert paths(stats.recent_errors()) == ["/c", "/b", "/a"]
    assert paths(stats.recent_errors(limit=0)) == []
    assert paths(stats.recent_errors(limit=-1)) == []
    assert paths(stats.recent_errors(limit=1)) == ["/c"]
    assert paths(stats.recent_errors(limit=2)) == ["/c", "/b"]
    assert paths(stats.recent_errors(source="proxy")) == ["/c", "/a"]
    assert paths(stats.recent_errors(error="connection_refused")) == ["/a"]
    assert paths(stats.recent_errors(source="proxy", limit=1)) == ["/c"]
    entry = stats.recent_errors(error="connection_refused")[0]
    assert (entry["status"], entry["source"], entry["layer"]) == (502, "proxy", "transport")


def test_a_recent_error_says_what_the_contract_lists():
    stats = Stats()
    ex = exchange(502, hop="nginx", path="/orders")
    ex.request_id, ex.target, ex.details = "r-1", "/orders?id=7", None
    ex.hints = ("fault_behind_origin",)
    stats.record_batch([ex])
    (entry,) = stats.recent_errors()
    assert isinstance(entry.pop("time"), float)
    assert entry == {
        "request_id": "r-1",
        "method": "GET",
        "path": "/orders",
        "status": 502,
        "source": "origin",
        "layer": "origin",
        "error": None,
        "details": None,
        "hop": "nginx",
        "hints": ["fault_behind_origin"],
        "phases_ms": ex.phases_ms(),
        "route": None,  # the route that served it (issue 21); None without routes
    }


# -- sliding windows ----------------------------------------------------------------------------


def test_a_window_holds_exactly_its_last_seconds():
    stats = Stats()
    stats.started_ns -= 10_000 * S  # up long enough: rps is over the whole window
    now = T0 + 400 * S
    seconds = [  # seconds before `now`'s second, one exchange each
        0,
        59,  # the 60 s window's oldest second
        60,  # just outside it
        299,  # the 300 s window's oldest second
        300,  # just outside it
    ]
    stats.record_batch([exchange(200, end=now - ago * S) for ago in sorted(seconds, reverse=True)])
    one, five = stats.window(60, now), stats.window(300, now)
    assert one["responses"]["total"] == 2 and five["responses"]["total"] == 4
    assert one["responses"]["by_source"] == {"origin": 2}
    assert five["responses"]["by_status"] == {"200": 4}
    assert one["rps"] == round(2 / 60, 3) and five["rps"] == round(4 / 300, 3)
    assert stats.total == 5  # the totals keep everything
    assert list(stats.snapshot(proxy={})["windows"]) == ["60s", "300s"]


def test_slots_older_than_the_longest_window_are_dropped():
    stats = Stats()
    longest = 300
    stats.record_batch([exchange(200, end=T0)])
    stats.record_batch([exchange(200, end=T0 + (longest - 1) * S)])
    assert [slot[0] for slot in stats._slots] == [T0 // S, T0 // S + longest - 1]
    stats.record_batch([exchange(200, end=T0 + longest * S)])
    assert [slot[0] for slot in stats._slots] == [T0 // S + longest - 1, T0 // S + longest]


def test_a_series_has_one_column_per_second_oldest_first():
    stats = Stats()
    now = T0 + 400 * S
    stats.record_batch(
        [
            exchange(200, end=now - 10 * S),  # outside a 10 s series
            exchange(400, end=now - 9 * S),  # its first column; 400 is an error
            exchange(399, end=now - 8 * S),  # 399 is not
            exchange(200, end=now),  # its last column
            exchange(200, end=now),
            exchange(200, fault=Fault.HTTP_RESPONSE_INCOMPLETE, end=now),  # an error
        ]
    )
    series = stats.series(10, now)
    assert series["responses"]["origin"] == [1, 1] + [0] * 7 + [3]
    assert series["errors"]["origin"] == [1, 0] + [0] * 7 + [1]
    assert (series["step_s"], series["sources"]) == (1, ["origin", "proxy", "client"])
    assert isinstance(series["start"], float)
    assert len(stats.series(0, now)["responses"]["origin"]) == 1  # at least one second
    assert len(stats.series()["responses"]["origin"]) == 300  # the longest window by default
    assert len(stats.series(10_000, now)["responses"]["origin"]) == 300  # the longest window


def test_latency_summarises_every_histogram():
    stats = Stats()
    stats.record_batch([exchange(200, ttfb=2 * MS)])
    latency = stats.latency()
    assert latency["total"]["count"] == 1 and latency["phases"]["ttfb"]["max"] == 2.0
    assert set(latency["phases"]) == {"wait", "dns", "connect", "tls", "queue", "ttfb", "body"}
    assert latency["by_source"]["origin"]["count"] == 1 and set(latency["by_source"]) == {
        "origin",
        "proxy",
        "client",
    }


def test_the_stats_document_has_the_contracts_shape():
    stats = Stats()
    assert (stats.total, stats.in_flight, stats.retries, stats.refused_connections) == (0, 0, 0, 0)
    stats.started_ns -= 1_234_567_891  # up 1.2345... s: the document says it in milliseconds
    stats.gauges.in_flight = 2  # what the core counts (Forwarder), the stats report
    stats.record_batch([exchange(200), exchange(502, hop="nginx", path="/x")])
    doc = stats.snapshot(proxy={"name": "edge"})
    assert list(doc) == [
        "proxy",
        "requests",
        "responses",
        "latency_ms",
        "upstream_wait",
        "windows",
        "loop_lag_ms",
        "gc_ms",
        "access_log",
        "recent_errors",
    ]
    assert (
        set(doc["proxy"]) == {"name", "started_at", "uptime_s"} and doc["proxy"]["name"] == "edge"
    )
    assert doc["access_log"] == {"dropped_lines": 0}
    assert doc["proxy"]["started_at"] == stats.started_at
    assert doc["proxy"]["uptime_s"] == round(doc["proxy"]["uptime_s"], 3) >= 1.234
    assert doc["requests"] == {"total": 2, "in_flight": 2}
    assert doc["responses"] == {
        **breakdown(stats.counts),
        "by_protocol": {"http/1.1": 2, "h2": 0},
        "by_grpc_status": {},
    }
    assert set(doc["latency_ms"]) == {"total", "ttfb", "connect", "wait"}
    assert doc["latency_ms"]["total"]["count"] == 2 and doc["latency_ms"]["ttfb"]["count"] == 2
    assert doc["latency_ms"]["connect"]["count"] == doc["latency_ms"]["wait"]["count"] == 0
    assert doc["upstream_wait"] == {"held": 0, "expired": 0}
    assert list(doc["windows"]) == ["60s", "300s"]
    assert [e["path"] for e in doc["recent_errors"]] == ["/x"]


def test_breakdowns_derive_from_one_counter():
    counts = {
        (502, "proxy", "connection_refused"): 2,
        (200, "origin", None): 5,
        (499, "client", "client_closed_request"): 1,
        (404, "origin", None): 1,
    }
    assert breakdown(counts) == {
        "by_source": {"proxy": 2, "origin": 6, "client": 1},
        "by_layer": {"transport": 2, "origin": 6, "client": 1},
        "by_error": {"connection_refused": 2, "client_closed_request": 1},
        "by_status": {"200": 5, "404": 1, "499": 1, "502": 2},
        "by_class": {"2xx": 5, "4xx": 2, "5xx": 2},
    }


# -- the hop label's cap ------------------------------------------------------------------------


def test_hop_names_get_a_label_of_their_own_up_to_the_cap():
    stats = Stats()

    def record(hop: str, status: int = 502) -> None:
        stats.record_batch([exchange(status, hop=hop)])

    for i in range(HOP_NAMES_MAX):
        record(f"gw-{i}")
    assert HOP_OTHER not in {hop for hop, _ in stats.hop_counts}  # N names: all their own
    record("gw-late")  # the (N+1)th
    assert ("gw-late", 502) not in stats.hop_counts and stats.hop_counts[HOP_OTHER, 502] == 1
    stats.record_batch([exchange(503)])  # no hop: no label at all
    assert sum(stats.hop_counts.values()) == HOP_NAMES_MAX + 1
    record("gw-0", 504)  # a name seen before the cap keeps its label
    record("envoy")  # a product is always its own label
    assert stats.hop_counts["gw-0", 504] == 1 and stats.hop_counts["envoy", 502] == 1
    ex = exchange(502, hop="nginx")
    ex.upstream_status = 503  # the origin's status, not what the client got
    stats.record_batch([ex])
    assert stats.hop_counts["nginx", 503] == 1


def test_the_compiled_bucket_scan_is_bisect():
    """`_bucket` (what a compiled record_batch uses) puts every value where bisect does:
    each bound, one either side, zero and beyond the last."""
    from bisect import bisect_left

    from proxy.telemetry.histogram import BUCKETS_NS
    from proxy.telemetry.stats import _bucket

    values = {0, 1, 10**15}
    for bound in BUCKETS_NS:
        values |= {bound - 1, bound, bound + 1}
    for value in sorted(values):
        assert _bucket(value) == bisect_left(BUCKETS_NS, value), value
