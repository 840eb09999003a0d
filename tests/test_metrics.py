"""/metrics: the Prometheus families of the contract, rendered at scrape time from the proxy's
own counters, checked by parsing the exposition and by a real Prometheus scraping it."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections import Counter
from typing import Any

import aiohttp
import orjson
from admin_support import PROMETHEUS, admin_get, fetch, require_tool, routed_origin, wait_for
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from proxy import __version__
from proxy.diagnosis.faults import Fault, Source
from proxy.telemetry.stats import PHASES, layer_of

from support import LOOPBACK, curl, free_port, raw_request

TOKEN = "metrics-token"
FAMILIES = {
    "faultline_build_info": "gauge",
    "faultline_responses": "counter",
    "faultline_request_duration_seconds": "histogram",
    "faultline_upstream_phase_seconds": "histogram",
    "faultline_event_loop_lag_seconds": "histogram",
    "faultline_gc_pause_seconds": "histogram",
    "faultline_in_flight_requests": "gauge",
    "faultline_retries": "counter",
    "faultline_refused_connections": "counter",
    "faultline_access_log_dropped_lines": "counter",
    "faultline_held_requests": "counter",
    "faultline_held_requests_expired": "counter",
    "faultline_upstream_pool_connections": "gauge",
    "faultline_grpc_responses": "counter",
}
BAD_REQUEST = b"GET /no-host HTTP/1.1\r\n\r\n"


async def make_traffic(proxy_url: str, proxy_port: int) -> None:
    """4 x 200, 1 x 500, 1 x 404 from the origin; 2 x connection_terminated and 1 bad
    request answered by the proxy; 1 body cut mid-way; one path with an id in it."""
    async with aiohttp.ClientSession() as session:
        for path in ("/ok", "/ok", "/ok/order/12345", "/boom", "/missing", "/hangup", "/hangup"):
            await fetch(session, proxy_url + path)
        with contextlib.suppress(aiohttp.ClientPayloadError):
            await fetch(session, proxy_url + "/truncated")
        await fetch(session, proxy_url + "/ok")  # leaves an idle upstream connection
    await raw_request(proxy_port, BAD_REQUEST, timeout=5)


def samples(text: str) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        out.setdefault(family.name, []).extend(family.samples)
    return out


async def test_exposition_matches_stats(origin_factory, proxy_factory):
    origin = await origin_factory(routed_origin)
    proxy = await proxy_factory(origin.url)
    await make_traffic(proxy.url, proxy.port)
    await proxy.settle()
    async with aiohttp.ClientSession() as session:
        _, _, stats = await admin_get(session, proxy.admin_url + "/stats")
        async with session.get(proxy.admin_url + "/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await resp.text()

    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert families == FAMILIES
    by_name = samples(text)

    (build,) = by_name["faultline_build_info"]
    assert build.labels == {"version": __version__} and build.value == 1

    responses: Counter[tuple[str, str, str, str]] = Counter()
    for s in by_name["faultline_responses"]:
        assert s.name == "faultline_responses_total"
        assert set(s.labels) == {"code", "source", "layer", "error", "protocol"}
        assert s.labels["layer"] == layer_of(s.labels["error"] or None)
        assert s.labels["protocol"] == "http/1.1"  # all of this traffic spoke HTTP/1.1
        responses[s.labels["code"], s.labels["source"], s.labels["layer"], s.labels["error"]] += (
            int(s.value)
        )
    by_source = Counter({k: 0 for k in stats["responses"]["by_source"]})
    for (_, source, _, _), n in responses.items():
        by_source[source] += n
    assert dict(by_source) == stats["responses"]["by_source"]
    assert sum(responses.values()) == stats["requests"]["total"] == 10
    terminated, incomplete = Fault.CONNECTION_TERMINATED.value, Fault.HTTP_RESPONSE_INCOMPLETE
    assert responses["502", "proxy", "upstream", terminated] == 2
    assert responses["200", "origin", "upstream", incomplete.value] == 1
    assert responses["200", "origin", "origin", ""] == 4  # no error: the empty string
    assert responses["400", "proxy", "client", Fault.HTTP_REQUEST_ERROR.value] == 1

    # Bounded label values: never a path or an id.
    for family in by_name.values():
        for s in family:
            for label, value in s.labels.items():
                if label == "protocol":
                    assert value in ("http/1.1", "h2"), s
                    continue
                assert "/" not in value and "12345" not in value, s

    histograms = {"faultline_request_duration_seconds": "source"}
    histograms["faultline_upstream_phase_seconds"] = "phase"
    for name, label in histograms.items():
        series: dict[str, dict[str, float]] = {}
        for s in by_name[name]:
            if s.labels.get("protocol") == "h2":  # no HTTP/2 traffic here: all zero
                assert s.value == 0, s
                continue
            series.setdefault(s.labels[label], {})[
                s.name.removeprefix(name) + s.labels.get("le", "")
            ] = s.value
        expected_keys = [src.value for src in Source] if label == "source" else list(PHASES)
        assert sorted(series) == sorted(expected_keys)
        for key, values in series.items():
            buckets = [(float(k[len("_bucket") :]), v) for k, v in values.items() if "_bucket" in k]
            counts = [v for _, v in sorted(buckets)]
            assert counts == sorted(counts), f"{name}{{{label}={key}}} is not cumulative"
            assert values["_bucket+Inf"] == values["_count"]
            if label == "source":
                assert values["_count"] == stats["responses"]["by_source"].get(key, 0)
        if label == "phase":
            assert series["ttfb"]["_count"] == stats["latency_ms"]["ttfb"]["count"]
            assert series["connect"]["_count"] == stats["latency_ms"]["connect"]["count"]

    (in_flight,) = by_name["faultline_in_flight_requests"]
    assert in_flight.value == 0
    pool = {s.labels["state"]: s.value for s in by_name["faultline_upstream_pool_connections"]}
    assert pool["busy"] == 0 and pool["idle"] >= 1

    # A private registry: the process-wide default one knows nothing of the proxy.
    assert b"faultline_" not in generate_latest(REGISTRY)


async def test_openmetrics_when_asked(origin_factory, proxy_factory):
    origin = await origin_factory(routed_origin)
    proxy = await proxy_factory(origin.url)
    await make_traffic(proxy.url, proxy.port)
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.admin_url + "/metrics", headers={"Accept": accept}) as resp:
            assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
            text = await resp.text()
    assert text.endswith("# EOF\n")
    names = {f.name for f in openmetrics_families(text)}
    assert {"faultline_build", "faultline_responses", "faultline_in_flight_requests"} <= names


async def test_gauges_while_a_request_is_in_flight(origin_factory, proxy_factory):
    origin = await origin_factory(routed_origin)
    proxy = await proxy_factory(origin.url)
    async with aiohttp.ClientSession() as session:
        slow = asyncio.create_task(fetch(session, proxy.url + "/slow"))

        async def busy() -> dict[str, float] | None:
            async with session.get(proxy.admin_url + "/metrics") as resp:
                by_name = samples(await resp.text())
            pool = by_name["faultline_upstream_pool_connections"]
            gauges = {s.labels["state"]: s.value for s in pool}
            gauges["in_flight"] = by_name["faultline_in_flight_requests"][0].value
            # (busy once the upstream connection is up; the origin holds the request 0.5 s)
            return gauges if gauges["in_flight"] == 1 and gauges["busy"] == 1 else None

        try:
            await wait_for(busy, timeout=5, interval=0.02)
        finally:
            assert (await slow)[0] == 200
        async with session.get(proxy.admin_url + "/metrics") as resp:
            by_name = samples(await resp.text())
        assert by_name["faultline_in_flight_requests"][0].value == 0
        pool = {s.labels["state"]: s.value for s in by_name["faultline_upstream_pool_connections"]}
        assert pool == {"idle": 1, "busy": 0}


# -- a real Prometheus ------------------------------------------------------------------------


PROMETHEUS_CONFIG = """\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: faultline
    metrics_path: /metrics
    authorization:
      type: Bearer
      credentials: {token}
    static_configs:
      - targets: ["{target}"]
"""


async def query(session: aiohttp.ClientSession, base: str, promql: str) -> list[dict[str, Any]]:
    async with session.get(base + "/api/v1/query", params={"query": promql}) as resp:
        doc = orjson.loads(await resp.read())
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


def by_label(result: list[dict[str, Any]], label: str) -> dict[str, float]:
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in result}


async def test_real_prometheus_scrapes_the_counts(origin_factory, proxy_factory, tmp_path):
    prometheus = require_tool(PROMETHEUS)
    origin = await origin_factory(routed_origin)
    proxy = await proxy_factory(origin.url, **{"admin.token": TOKEN})
    await make_traffic(proxy.url, proxy.port)
    await proxy.settle()

    target = proxy.admin_url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(PROMETHEUS_CONFIG.format(token=TOKEN, target=target))
    port = free_port()
    base = f"http://{LOOPBACK}:{port}"
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address={LOOPBACK}:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        async with aiohttp.ClientSession() as session:

            async def ready() -> bool:
                assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(base + "/-/ready") as resp:
                        return resp.status == 200
                return False

            await wait_for(ready, timeout=30, interval=0.1)

            async def scraped() -> list[dict[str, Any]]:
                return await query(session, base, 'up{job="faultline"} == 1')

            # Prometheus 2.x hands new targets to the scraper ~5 s after start.
            await wait_for(scraped, timeout=30, interval=0.2)

            per_source = by_label(
                await query(session, base, "sum by (source) (faultline_responses_total)"), "source"
            )
            assert per_source == {"origin": 7.0, "proxy": 3.0}
            per_fault = by_label(
                await query(session, base, 'sum by (error) (faultline_responses_total{error!=""})'),
                "error",
            )
            assert per_fault == {
                Fault.CONNECTION_TERMINATED.value: 2.0,
                Fault.HTTP_REQUEST_ERROR.value: 1.0,
                Fault.HTTP_RESPONSE_INCOMPLETE.value: 1.0,
            }
            per_code = by_label(
                await query(
                    session, base, 'sum by (code) (faultline_responses_total{source="origin"})'
                ),
                "code",
            )
            assert per_code == {"200": 5.0, "404": 1.0, "500": 1.0}
            durations = by_label(
                await query(
                    session, base, "sum by (source) (faultline_request_duration_seconds_count)"
                ),
                "source",
            )
            assert durations == {"origin": 7.0, "proxy": 3.0, "client": 0.0}
            build = await query(session, base, "faultline_build_info")
            assert [r["metric"]["version"] for r in build] == [__version__]
            in_flight = await query(session, base, "faultline_in_flight_requests")
            assert [float(r["value"][1]) for r in in_flight] == [0.0]
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


# -- the protocol the client spoke -------------------------------------------------------------


async def test_request_metrics_say_which_protocol_the_client_spoke(origin_factory, proxy_factory):
    """`protocol` on faultline_responses_total and faultline_request_duration_seconds: real
    HTTP/1.1 requests (aiohttp) and real h2c ones (curl --http2-prior-knowledge) through one
    proxy; each series counts its own, the two add up to /stats, and promtool takes it."""
    require_tool("/usr/bin/curl")
    origin = await origin_factory(routed_origin)
    proxy = await proxy_factory(origin.url)
    async with aiohttp.ClientSession() as session:
        for path in ("/ok", "/boom", "/hangup"):
            await fetch(session, proxy.url + path)
    for path in ("/ok", "/ok", "/hangup"):
        # One connection each (curl 7.88 fails a second request on a reused h2c connection).
        code, out, err = await curl(
            "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_version}", proxy.url + path
        )
        assert (code, out) == (0, b"2"), err
    await proxy.settle()
    async with aiohttp.ClientSession() as session:
        _, _, stats = await admin_get(session, proxy.admin_url + "/stats")
        async with session.get(proxy.admin_url + "/metrics") as resp:
            text = await resp.text()
    assert stats["responses"]["by_protocol"] == {"http/1.1": 3, "h2": 3}

    by_name = samples(text)
    responses = {
        tuple(s.labels[k] for k in ("code", "source", "error", "protocol")): s.value
        for s in by_name["faultline_responses"]
    }
    terminated = Fault.CONNECTION_TERMINATED.value
    assert responses == {
        ("200", "origin", "", "http/1.1"): 1,
        ("200", "origin", "", "h2"): 2,
        ("500", "origin", "", "http/1.1"): 1,
        ("502", "proxy", terminated, "http/1.1"): 1,
        ("502", "proxy", terminated, "h2"): 1,
    }
    counts = {
        (s.labels["source"], s.labels["protocol"]): s.value
        for s in by_name["faultline_request_duration_seconds"]
        if s.name.endswith("_count")
    }
    assert counts == {
        ("origin", "http/1.1"): 2,
        ("origin", "h2"): 2,
        ("proxy", "http/1.1"): 1,
        ("proxy", "h2"): 1,
        ("client", "http/1.1"): 0,
        ("client", "h2"): 0,
    }
    for s in by_name["faultline_request_duration_seconds"]:
        if s.name.endswith("_sum"):
            assert s.value >= 0, s
            assert (s.value > 0) == (counts[s.labels["source"], s.labels["protocol"]] > 0), s

    promtool = require_tool("/usr/bin/promtool")
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
