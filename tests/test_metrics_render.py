"""/metrics written by `proxy.telemetry.exposition` (issue 20: a scrape runs on the data
plane's loop, so it must be cheap): byte for byte what prometheus-client's own encoders
write for the same data, in every format `render` negotiates, and its work counted: a
scrape does work per label set, never per bucket, and builds none of the library's
per-sample objects."""

from __future__ import annotations

import contextlib
import cProfile
import gc
import pstats
from collections.abc import Iterator

import aiohttp
import pytest
from admin_support import fetch, require_tool, routed_origin
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from proxy.diagnosis.faults import Fault
from proxy.telemetry.histogram import Histogram
from proxy.telemetry.metrics import ProtocolSplit, make_registry, render
from proxy.telemetry.sink import Telemetry
from proxy.telemetry.stats import RouteStats, Stats

from support import curl

# What scrapers send: none (text 0.0.4), Prometheus 2's and 3's lists, and every escaping.
ACCEPTS = [
    None,
    "text/plain;version=0.0.4",
    "application/openmetrics-text;version=1.0.0;q=0.5,"
    "application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
    "application/openmetrics-text",
    *(
        f"{kind};version=1.0.0;escaping={escaping}"
        for kind in ("application/openmetrics-text", "text/plain")
        for escaping in ("allow-utf-8", "underscores", "dots", "values")
    ),
]


@contextlib.contextmanager
def no_collection() -> Iterator[None]:
    """The collector's pauses are a family: none may happen between two renders compared."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def assert_as_the_library_writes(registry) -> None:
    """`render` equals the negotiated encoder run over the registry's library families."""
    with no_collection():
        for accept in ACCEPTS:
            encoder, content_type = choose_encoder(accept or "")
            expected = encoder(registry)  # collect(): prometheus-client's Metric objects
            assert render(registry, accept) == (expected, content_type), accept
    # ... and it was written by the exposition, not by the library (else this proves nothing).
    assert registry.exposition.formats and None not in registry.exposition.formats.values()


async def traffic(proxy, paths: list[str], h2_paths: list[str]) -> None:
    async with aiohttp.ClientSession() as session:
        for path in paths:
            with contextlib.suppress(aiohttp.ClientPayloadError):
                await fetch(session, proxy.url + path)
    for path in h2_paths:  # one connection each (curl 7.88 fails a reused h2c connection)
        code, _, err = await curl(
            "-s", "-o", "/dev/null", "--http2-prior-knowledge", proxy.url + path
        )
        assert code == 0, err
    await proxy.settle()


PATHS = ["/ok", "/ok", "/boom", "/missing", "/hangup", "/truncated", "/api/ok", "/api/boom"]


async def routed_proxy(origin_factory, proxy_factory):
    origin = await origin_factory(routed_origin)
    routes = [{"name": "api", "path_prefix": "/api/", "upstream": origin.url}]
    return await proxy_factory(origin.url, routes=routes)


async def test_after_real_traffic_every_format_is_the_librarys(origin_factory, proxy_factory):
    """HTTP/1.1 and h2 clients, faults, two routes: every negotiated format is what the
    library writes, from a cold cache, a warm one, and after new label sets arrive."""
    require_tool("/usr/bin/curl")
    proxy = await routed_proxy(origin_factory, proxy_factory)
    registry = make_registry(proxy.server.telemetry, proxy.server.pool_counts)
    await traffic(proxy, PATHS, ["/ok", "/api/ok", "/hangup"])
    assert_as_the_library_writes(registry)
    assert_as_the_library_writes(registry)  # cached heads, rows unchanged
    await traffic(proxy, ["/ok", "/api/missing", "/api/hangup"], ["/boom", "/api/boom"])
    assert_as_the_library_writes(registry)  # rows changed, new label sets
    text = render(registry, None)[0].decode()
    assert 'route="api"' in text and 'protocol="h2"' in text and "connection_terminated" in text


class WorkersLike:
    """Another collector in the registry, as a supervisor registers its workers' families."""

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("faultline_workers", "Workers.", value=2)
        yield CounterMetricFamily("faultline_worker_restarts_total", "Restarts.", value=1)


def odd_stats() -> Telemetry:
    """Counts past where `n.0` is how floatToGoString writes them (10**6 and up), label
    values a template or an escaper could trip on, every family with rows."""
    stats = Stats()
    telemetry = Telemetry(stats, None)
    split = ProtocolSplit.of(telemetry)
    terminated = Fault.CONNECTION_TERMINATED.value
    stats.counts = {
        (200, "origin", None): 3_000_000,
        (502, "proxy", terminated): 7,
        (404, "origin", None): 10**17,
    }
    stats.total = sum(stats.counts.values())
    split.counts = {(200, "origin", None): 1_000_000, (502, "proxy", terminated): 7}
    big = stats.duration_by_source["origin"]
    big.counts[3] = 999_999
    big.counts[7] = 2_000_001
    big.counts[-1] = 5
    big.sum_ns = 123_456_789_012_345
    stats.duration_by_source["proxy"].observe_ns(1_500_000)
    stats.phases["ttfb"].observe_ns(700_000)
    stats.loop_lag.total.observe_ns(30_000)
    odd = ['a"b', "back\\slash", "new\nline", "100%", "%d%s%%", "é ü", "x y"]
    for name in odd:
        route = stats.routes[name] = RouteStats()
        route.counts[(200, "origin", None)] = 1
        route.durations["origin"].observe_ns(2_000_000)
        split.route_counts[(name, (200, "origin", None))] = 1
        split.route_durations[(name, "origin")] = Histogram()
        split.route_durations[(name, "origin")].observe_ns(2_000_000)
    stats.hop_counts = {(name, 502): i + 1 for i, name in enumerate(odd)}
    stats.hop_counts[("nginx", 504)] = 1_234_567
    stats.grpc_counts = {("origin", 0): 12, ("proxy", 14): 3}
    stats.retries, stats.held, stats.held_expired = 10**6, 999_999, 2**53 + 1
    stats.gauges.in_flight = 42
    return telemetry


def test_edge_values_and_other_collectors_are_written_as_the_library_does():
    telemetry = odd_stats()
    registry = make_registry(telemetry, lambda: (10**7, 0))
    registry.register(WorkersLike())
    assert_as_the_library_writes(registry)
    assert_as_the_library_writes(registry)
    om = render(registry, "application/openmetrics-text")[0]
    assert om.endswith(b"faultline_worker_restarts_total 1.0\n# EOF\n")
    assert om.count(b"# EOF") == 1
    telemetry.stats.duration_by_source["origin"].observe_ns(40_000)  # a row changes
    telemetry.stats.counts[(418, "origin", None)] = 1  # a new label set
    assert_as_the_library_writes(registry)


def calls_of(fn) -> pstats.Stats:
    profile = cProfile.Profile()
    profile.enable()
    fn()
    profile.disable()
    return pstats.Stats(profile)


def count(stats: pstats.Stats, where: str, name: str | None = None) -> int:
    return sum(
        calls
        for (filename, _, function), (_, calls, *_rest) in stats.stats.items()  # type: ignore[attr-defined]
        if filename.endswith(where) and (name is None or function == name)
    )


async def test_a_scrape_works_per_label_set_not_per_bucket(origin_factory, proxy_factory):
    """A warm scrape (label sets seen before, counts changed) builds none of the library's
    Metric or Sample objects, formats one float per histogram row (its sum) and makes a
    bounded number of calls per label set, whatever the number of buckets (43 each)."""
    proxy = await routed_proxy(origin_factory, proxy_factory)
    registry = make_registry(proxy.server.telemetry, proxy.server.pool_counts)
    await traffic(proxy, PATHS, [])
    render(registry, None)  # the first scrape cuts the heads
    await traffic(proxy, PATHS, [])  # the same label sets, new counts

    with no_collection():
        stats = calls_of(lambda: render(registry, None))
        text = render(registry, None)[0].decode()
    histogram_rows = text.count("_count{") + text.count("_count ")
    rows = sum(1 for line in text.splitlines() if line and not line.startswith("#")) - (
        histogram_rows * 44  # a histogram row's 43 buckets and its count: one row with its sum
    )
    assert histogram_rows >= 20 and rows > histogram_rows
    assert count(stats, "metrics_core.py") == 0, "Metric objects built per scrape"
    assert count(stats, "samples.py") == 0, "Sample objects built per scrape"
    assert count(stats, "utils.py", "floatToGoString") <= histogram_rows
    total = sum(calls for (_, calls, *_rest) in stats.stats.values())  # type: ignore[attr-defined]
    assert total <= 30 * rows + 300, (total, rows)
    # Nothing was cut again: the label sets were all seen by the first scrape.
    built = registry.exposition.formats
    before = sum(f.built for f in built.values() if f is not None)
    render(registry, None)
    assert sum(f.built for f in built.values() if f is not None) == before


@pytest.mark.parametrize("accept", [None, "application/openmetrics-text"])
async def test_the_admin_port_serves_the_written_exposition(origin_factory, proxy_factory, accept):
    """Over the admin port: what the server's own registry writes, unchanged."""
    proxy = await routed_proxy(origin_factory, proxy_factory)
    await traffic(proxy, PATHS, [])
    headers = {"Accept": accept} if accept else {}
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.admin_url + "/metrics", headers=headers) as resp:
            served = await resp.read()
            content_type = resp.headers["Content-Type"]
    registry = make_registry(proxy.server.telemetry, proxy.server.pool_counts)
    with no_collection():
        body, expected_type = render(registry, accept)
        encoder, _ = choose_encoder(accept or "")
        assert body == encoder(registry)
    assert content_type == expected_type
    # Everything but the loop's own lag and the pool (they move between two reads) is equal.
    moving = (b"faultline_event_loop_lag", b"faultline_gc_pause", b"faultline_upstream_pool")
    assert [line for line in served.splitlines() if not line.startswith(moving)] == [
        line for line in body.splitlines() if not line.startswith(moving)
    ]
