"""The admin server: health, readiness, the token, /stats in the contract's shape, its
filters and its answers to bad queries, and where it listens. Real sockets, no mocks."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import aiohttp
import pytest
from admin_support import admin_get, fetch, require_tool, routed_origin, wait_for

from proxy.config import load_config
from proxy.diagnosis.faults import REQUEST_PROBLEMS, TAXONOMY, Fault, Source
from proxy.server import ProxyServer

from support import LOOPBACK, LogCapture, start_proxy

TOKEN = "s3cret-admin-token"
STATS_KEYS = {
    "proxy",
    "requests",
    "responses",
    "latency_ms",
    "upstream_wait",
    "windows",
    "loop_lag_ms",
    "gc_ms",
    "access_log",  # issue 20: lines a stalled stdout reader could not take
    "recent_errors",
}
BREAKDOWNS = {
    "by_source", "by_layer", "by_error", "by_status", "by_class",
    "by_protocol", "by_grpc_status",  # CONTRACT.md, "HTTP/2 and gRPC"
}  # fmt: skip
ERROR_KEYS = {
    "time", "request_id", "method", "path", "status", "source", "layer",
    "error", "details", "hop", "hints", "phases_ms",
    "route",  # issue 21: the route that served it (null without routes)
}  # fmt: skip


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


async def test_token_guards_everything_but_health(origin_factory, proxy_factory, session):
    origin = await origin_factory(routed_origin)
    proxy = await proxy_factory(origin.url, **{"admin.token": TOKEN})
    admin = proxy.admin_url
    for path in ("/healthz", "/readyz"):
        status, _, _ = await admin_get(session, admin + path)
        assert status == 200, path

    for path in ("/stats", "/metrics", "/faults", "/series", "/latency", "/dashboard", "/nope"):
        status, headers, doc = await admin_get(session, admin + path)
        assert status == 401, path
        assert headers["Content-Type"] == "application/problem+json"
        assert headers["WWW-Authenticate"].startswith("Bearer ")
        assert "invalid_token" not in headers["WWW-Authenticate"]
        assert doc["status"] == 401 and "token" in doc["detail"]

        status, headers, doc = await admin_get(session, admin + path, token="wrong")
        assert status == 401, path
        assert 'error="invalid_token"' in headers["WWW-Authenticate"]
        assert TOKEN not in str(doc)

    status, _, _ = await admin_get(session, admin + "/stats", Authorization=f"Basic {TOKEN}")
    assert status == 401
    # A token that only shares a prefix with the real one is refused.
    status, _, _ = await admin_get(session, admin + "/stats", token=TOKEN[:-1])
    assert status == 401
    status, _, _ = await admin_get(session, admin + "/stats", token=TOKEN + "x")
    assert status == 401

    for path in ("/stats", "/metrics", "/faults", "/series", "/latency", "/dashboard"):
        status, _, _ = await admin_get(session, admin + path, token=TOKEN)
        assert status == 200, path
    # The scheme name is case-insensitive (RFC 9110 §11.1).
    status, _, _ = await admin_get(session, admin + "/stats", Authorization=f"bearer {TOKEN}")
    assert status == 200

    # A browser cannot send a header when it navigates: /dashboard, and only it, takes ?token=.
    assert (await fetch(session, f"{admin}/dashboard?token={TOKEN}"))[0] == 200
    assert (await fetch(session, f"{admin}/dashboard?token=wrong"))[0] == 401
    assert (await fetch(session, f"{admin}/stats?token={TOKEN}"))[0] == 401
    # Without the token, a browser gets a small page that asks for it.
    status, headers, page = await admin_get(session, admin + "/dashboard", Accept="text/html")
    assert status == 401 and headers["Content-Type"].startswith("text/html")
    assert 'name="token"' in page


async def test_readyz_turns_503_while_draining(origin_factory, proxy_factory, session):
    origin = await origin_factory(routed_origin)
    proxy = await proxy_factory(origin.url, **{"timeouts.shutdown_delay": "1s"})
    admin = proxy.admin_url
    assert (await fetch(session, admin + "/readyz"))[0] == 200
    drain = asyncio.create_task(proxy.server.shutdown())
    try:

        async def not_ready() -> bool:
            return (await fetch(session, admin + "/readyz"))[0] == 503

        await wait_for(not_ready, timeout=5)
        # Still alive and still serving while the shutdown delay runs.
        assert (await fetch(session, admin + "/healthz"))[0] == 200
        assert (await fetch(session, proxy.url + "/ok"))[0] == 200
    finally:
        await asyncio.wait_for(drain, 10)


async def test_stats_shape_and_counts(origin_factory, proxy_factory, session):
    origin = await origin_factory(routed_origin)
    proxy = await proxy_factory(origin.url, **{"proxy_name": "edge-a"})
    for path in ("/ok", "/ok", "/boom", "/missing", "/hangup"):
        await fetch(session, proxy.url + path)
    await proxy.settle()
    status, headers, doc = await admin_get(session, proxy.admin_url + "/stats")
    assert status == 200 and headers["Content-Type"].startswith("application/json")

    assert set(doc) == STATS_KEYS
    assert set(doc["proxy"]) == {"name", "version", "upstream", "started_at", "uptime_s"}
    assert doc["proxy"]["name"] == "edge-a" and doc["proxy"]["upstream"] == origin.url
    assert doc["requests"] == {"total": 5, "in_flight": 0}
    responses = doc["responses"]
    assert set(responses) == BREAKDOWNS
    terminated = Fault.CONNECTION_TERMINATED.value
    assert responses["by_source"] == {"origin": 4, "proxy": 1}
    assert responses["by_layer"] == {
        "origin": 4,
        TAXONOMY[Fault.CONNECTION_TERMINATED].layer.value: 1,
    }
    assert responses["by_error"] == {terminated: 1}
    assert responses["by_status"] == {"200": 2, "404": 1, "500": 1, "502": 1}
    assert responses["by_class"] == {"2xx": 2, "4xx": 1, "5xx": 2}

    assert set(doc["latency_ms"]) == {"total", "ttfb", "connect", "wait"}
    assert doc["upstream_wait"] == {"held": 0, "expired": 0}
    for summary in doc["latency_ms"].values():
        assert set(summary) == {"count", "p50", "p90", "p99", "max"}
    total = doc["latency_ms"]["total"]
    assert total["count"] == 5
    assert 0 < total["p50"] <= total["p90"] <= total["p99"] <= total["max"]

    assert set(doc["windows"]) == {"60s", "300s"}
    for window in doc["windows"].values():
        assert set(window) == {"responses", "rps"}
        assert window["responses"]["total"] == 5
        assert window["responses"]["by_source"] == responses["by_source"]
        assert window["rps"] > 0

    recent = doc["recent_errors"]
    assert [(e["path"], e["status"]) for e in recent] == [
        ("/hangup", 502),
        ("/missing", 404),
        ("/boom", 500),
    ]
    for entry in recent:
        assert set(entry) == ERROR_KEYS
        assert entry["request_id"] and entry["method"] == "GET"
    assert recent[0]["source"] == "proxy" and recent[0]["error"] == terminated
    assert recent[1]["source"] == "origin" and recent[1]["error"] is None
    assert recent[1]["layer"] == "origin"


async def test_recent_error_filters(origin_factory, proxy_factory, session):
    origin = await origin_factory(routed_origin)
    proxy = await proxy_factory(origin.url)
    for path in ("/boom", "/hangup", "/missing", "/hangup", "/ok"):
        await fetch(session, proxy.url + path)
    # The origin goes away: from now on nothing listens at the upstream address.
    await origin.close()
    await asyncio.sleep(0.05)
    for _ in range(3):
        await fetch(session, proxy.url + "/gone")
    await proxy.settle()
    url = proxy.admin_url + "/stats"
    refused, terminated = Fault.CONNECTION_REFUSED.value, Fault.CONNECTION_TERMINATED.value

    _, _, doc = await admin_get(session, url)
    everything = doc["recent_errors"]
    assert [e["path"] for e in everything] == [
        "/gone", "/gone", "/gone", "/hangup", "/missing", "/hangup", "/boom",
    ]  # fmt: skip

    _, _, doc = await admin_get(session, url + "?source=proxy&error=" + refused + "&limit=2")
    assert [e["error"] for e in doc["recent_errors"]] == [refused, refused]
    assert [e["request_id"] for e in doc["recent_errors"]] == [
        e["request_id"] for e in everything[:2]
    ]
    # Filters narrow recent_errors only; the counts stay whole.
    assert doc["requests"]["total"] == 8

    _, _, doc = await admin_get(session, url + "?source=origin")
    assert [e["path"] for e in doc["recent_errors"]] == ["/missing", "/boom"]
    _, _, doc = await admin_get(session, url + "?error=" + terminated)
    assert [e["path"] for e in doc["recent_errors"]] == ["/hangup", "/hangup"]
    _, _, doc = await admin_get(session, url + "?source=origin&error=" + terminated)
    assert doc["recent_errors"] == []
    _, _, doc = await admin_get(session, url + "?source=client")
    assert doc["recent_errors"] == []
    _, _, doc = await admin_get(session, url + "?limit=0")
    assert doc["recent_errors"] == []
    _, _, doc = await admin_get(session, url + "?limit=3")
    assert doc["recent_errors"] == everything[:3]


async def test_recent_errors_keep_the_last_n(origin_factory, proxy_factory, session):
    origin = await origin_factory(routed_origin)
    proxy = await proxy_factory(origin.url, **{"stats.recent_errors": 3})
    for i in range(6):
        await fetch(session, f"{proxy.url}/missing/{i}")
    await proxy.settle()
    _, _, doc = await admin_get(session, proxy.admin_url + "/stats")
    assert [e["path"] for e in doc["recent_errors"]] == ["/missing/5", "/missing/4", "/missing/3"]
    assert doc["responses"]["by_status"] == {"404": 6}


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("source=nobody", "source"),
        ("error=not_a_fault", "error"),
        ("limit=-1", "limit"),
        ("limit=abc", "limit"),
        ("limit=1.5", "limit"),
        ("limit=", "limit"),
        ("limit=99999999999999999999", "limit"),
        ("source=origin&source=proxy", "source"),
        ("sort=time", "sort"),
    ],
)
async def test_bad_stats_query_is_a_clear_400(proxy_factory, session, query, parameter):
    proxy = await proxy_factory(f"http://{LOOPBACK}:9")
    status, headers, doc = await admin_get(session, f"{proxy.admin_url}/stats?{query}")
    assert status == 400
    assert headers["Content-Type"] == "application/problem+json"
    assert set(doc) >= {"type", "title", "status", "detail", "parameter"}
    assert doc["status"] == 400 and doc["parameter"] == parameter
    assert parameter in doc["detail"]
    if query == "source=nobody":
        assert doc["allowed"] == [s.value for s in Source]


async def test_other_bad_requests_are_problems(proxy_factory, session):
    proxy = await proxy_factory(f"http://{LOOPBACK}:9")
    admin = proxy.admin_url
    for query in ("seconds=0", "seconds=301", "seconds=x", "window=60"):
        status, headers, doc = await admin_get(session, f"{admin}/series?{query}")
        assert status == 400 and headers["Content-Type"] == "application/problem+json", query
        assert doc["parameter"] in query
    status, _, doc = await admin_get(session, admin + "/faults?lang=fr")
    assert status == 400 and doc["parameter"] == "lang"

    status, headers, doc = await admin_get(session, admin + "/no-such-page")
    assert status == 404 and headers["Content-Type"] == "application/problem+json"
    assert "/stats" in doc["endpoints"]
    async with session.post(admin + "/stats") as resp:
        assert resp.status == 405
        assert resp.headers["Content-Type"] == "application/problem+json"
        assert "GET" in resp.headers["Allow"]


async def test_faults_endpoint_is_the_taxonomy(proxy_factory, session):
    proxy = await proxy_factory(f"http://{LOOPBACK}:9")
    status, _, doc = await admin_get(session, proxy.admin_url + "/faults")
    assert status == 200
    by_token = {f["error"]: f for f in doc["faults"]}
    assert set(by_token) == {f.value for f in Fault}
    for fault, row in TAXONOMY.items():
        entry = by_token[fault.value]
        assert entry["title"] == row.title
        assert entry["meaning"] == row.meaning
        assert entry["advice"] == row.advice
        assert entry["layer"] == row.layer.value
        assert entry["status"] == row.status
        assert entry["source"] == row.source.value
    variants = by_token[Fault.HTTP_REQUEST_ERROR.value]["variants"]
    assert sorted(v["status"] for v in variants) == sorted(
        p.status for p in REQUEST_PROBLEMS.values()
    )


async def test_series_and_latency(origin_factory, proxy_factory, session):
    origin = await origin_factory(routed_origin)
    proxy = await proxy_factory(origin.url)
    for path in ("/ok", "/ok", "/ok", "/boom", "/hangup"):
        await fetch(session, proxy.url + path)
    await proxy.settle()
    _, _, series = await admin_get(session, proxy.admin_url + "/series?seconds=60")
    assert series["sources"] == [s.value for s in Source]
    for column in (*series["responses"].values(), *series["errors"].values()):
        assert len(column) == 60
    assert sum(series["responses"]["origin"]) == 4
    assert sum(series["errors"]["origin"]) == 1
    assert sum(series["responses"]["proxy"]) == sum(series["errors"]["proxy"]) == 1
    _, _, stats = await admin_get(session, proxy.admin_url + "/stats")
    assert stats["windows"]["60s"]["responses"]["total"] == sum(
        sum(c) for c in series["responses"].values()
    )

    _, _, latency = await admin_get(session, proxy.admin_url + "/latency")
    assert latency["total"] == stats["latency_ms"]["total"]
    assert latency["phases"]["ttfb"] == stats["latency_ms"]["ttfb"]
    assert set(latency["phases"]) == {"wait", "dns", "connect", "tls", "queue", "ttfb", "body"}
    assert latency["by_source"]["origin"]["count"] == 4
    assert latency["by_source"]["proxy"]["count"] == 1


def _local_non_loopback_ip() -> str | None:
    """An address of this machine that is not loopback (None when there is none)."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
        ip = s.getsockname()[0]
        if not ip.startswith("127."):
            return ip
    return None


async def test_admin_listens_on_loopback_by_default():
    defaults = load_config(
        env={}, flags={("upstream",): f"http://{LOOPBACK}:9", ("log", "format"): "json"}
    )
    assert defaults.admin.listen == ("127.0.0.1", 9901)
    assert defaults.admin.token is None
    # Run with the default host (only the port changed to one the kernel picks).
    config = load_config(
        env={},
        flags={
            ("upstream",): f"http://{LOOPBACK}:9",
            ("log", "format"): "json",
            ("listen",): (LOOPBACK, 0),
            ("admin", "listen"): (defaults.admin.listen[0], 0),
        },
    )
    server = ProxyServer(config, access_stream=LogCapture())
    await server.start()
    try:
        assert server.admin_address is not None
        host, port = server.admin_address
        assert host == "127.0.0.1"
        _, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.close()
        other = _local_non_loopback_ip()
        if other is not None:
            with pytest.raises(OSError):
                await asyncio.wait_for(asyncio.open_connection(other, port), 2)
    finally:
        await server.close()


async def test_admin_is_not_reachable_through_the_proxy_port(origin_factory, proxy_factory,
                                                             session):  # fmt: skip
    origin = await origin_factory(routed_origin)
    proxy = await proxy_factory(origin.url)
    for path in ("/stats", "/metrics", "/healthz", "/dashboard"):
        status, body = await fetch(session, proxy.url + path)
        assert (status, body) == (200, b"ok"), path  # the origin answered, not the admin app
    assert [r.split(b" ")[1] for r in origin.requests] == [
        b"/stats", b"/metrics", b"/healthz", b"/dashboard",
    ]  # fmt: skip


async def test_two_servers_keep_separate_numbers(origin_factory, session):
    origin = await origin_factory(routed_origin)
    first = await start_proxy(origin.url)
    second = await start_proxy(origin.url)
    try:
        await fetch(session, first.url + "/ok")
        await first.settle()
        _, _, one = await admin_get(session, first.admin_url + "/stats")
        _, _, two = await admin_get(session, second.admin_url + "/stats")
        assert one["requests"]["total"] == 1 and two["requests"]["total"] == 0
    finally:
        await first.server.close()
        await second.server.close()


def test_a_missing_tool_skips_unless_tools_are_required(monkeypatch):
    monkeypatch.delenv("FAULTLINE_REQUIRE_TOOLS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        require_tool("/nonexistent/faultline-test-tool")
    monkeypatch.setenv("FAULTLINE_REQUIRE_TOOLS", "1")
    with pytest.raises(pytest.fail.Exception, match="FAULTLINE_REQUIRE_TOOLS=1"):
        require_tool("/nonexistent/faultline-test-tool")
    assert require_tool("/bin/sh").endswith("sh")
