"""The proxy times the garbage collector's pauses (issue 20): every collection, by
generation, in `/stats` `gc_ms` and in `/metrics` `faultline_gc_pause_seconds`."""

from __future__ import annotations

import gc

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from proxy.telemetry import gcwatch


async def _get(url: str) -> tuple[dict, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/stats") as response:
            stats = await response.json()
        async with session.get(url + "/metrics") as response:
            metrics = await response.text()
    return stats, metrics


def _counts(metrics: str) -> dict[str, float]:
    (family,) = [
        f
        for f in text_string_to_metric_families(metrics)
        if f.name.startswith("faultline_gc_pause")
    ]
    assert family.type == "histogram"
    return {s.labels["generation"]: s.value for s in family.samples if s.name.endswith("_count")}


async def test_a_collection_is_timed_in_stats_and_metrics(proxy_factory):
    proxy = await proxy_factory("http://127.0.0.1:9")
    before, metrics_before = await _get(proxy.admin_url)
    assert set(before["gc_ms"]) == {"0", "1", "2"}
    assert set(before["gc_ms"]["2"]) == {"count", "p50", "p99", "max", "total"}
    counts_before = _counts(metrics_before)

    garbage = []
    for _ in range(2000):  # cycles for the collector to find
        node: list = []
        node.append(node)
        garbage.append(node)
    del garbage, node
    assert gc.collect() >= 2000  # a full collection, generation 2
    gc.collect(0)

    after, metrics_after = await _get(proxy.admin_url)
    full = after["gc_ms"]["2"]
    assert full["count"] >= before["gc_ms"]["2"]["count"] + 1
    assert full["max"] > 0 and full["p99"] > 0 and full["total"] > 0
    assert after["gc_ms"]["0"]["count"] >= before["gc_ms"]["0"]["count"] + 1
    counts_after = _counts(metrics_after)
    assert counts_after["2"] >= counts_before["2"] + 1
    assert counts_after["0"] >= counts_before["0"] + 1
    assert counts_after["2"] == full["count"]


async def test_the_watch_is_removed_with_the_last_proxy(proxy_factory):
    installed = gcwatch.GC_PAUSES.installed
    proxy = await proxy_factory("http://127.0.0.1:9")
    other = await proxy_factory("http://127.0.0.1:9")
    assert gc.callbacks.count(gcwatch.GC_PAUSES) == 1
    assert gcwatch.GC_PAUSES.installed == installed + 2
    await other.server.close()
    assert gc.callbacks.count(gcwatch.GC_PAUSES) == 1
    await proxy.server.close()
    assert gcwatch.GC_PAUSES.installed == installed
    assert (gcwatch.GC_PAUSES in gc.callbacks) == bool(installed)
    count = sum(h.count for h in gcwatch.GC_PAUSES.by_generation)
    gc.collect()
    if not installed:
        assert sum(h.count for h in gcwatch.GC_PAUSES.by_generation) == count
