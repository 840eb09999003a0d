"""The dashboard in a real headless Chromium (Debian's /usr/bin/chromium through Playwright):
after injected faults the page shows them in words from the taxonomy, its numbers match
/stats, it updates without a reload, it handles the admin token, and it loads nothing from
outside the admin server, and every panel's tables fit their panel at the usual screen sizes.
A screenshot is saved to test-artifacts/dashboard.png."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Any

import aiohttp
import pytest
from admin_support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    admin_get,
    require_module,
    require_tool,
    wait_for,
)

from proxy.demo import start_demo_origin
from proxy.diagnosis.faults import TAXONOMY, Fault
from proxy.telemetry.histogram import BUCKETS_S
from proxy.telemetry.stats import PHASES

from support import LOOPBACK, ROOT, held_in_io_callback, raw_request

TOKEN = "dash-token-42"
ARTIFACTS = ROOT / "test-artifacts"
NORMAL = ("/hello", "/api/items", "/hello", "/hello", "/api/items", "/hello")
FAULTY = (
    "/status/500",
    "/status/404",
    "/hangup",
    "/garbage",
    "/huge-headers",
    "/truncated",
    "/nginx-502",
    "/status/503",
)
BAD_REQUEST = b"GET /no-host HTTP/1.1\r\n\r\n"


async def _get(session: aiohttp.ClientSession, url: str) -> None:
    with contextlib.suppress(aiohttp.ClientError):
        async with session.get(url) as resp:
            await resp.read()


async def _client_abort(port: int) -> None:
    """A client that leaves while the origin is still working on its request (499)."""
    _, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write(b"GET /slow?ms=400 HTTP/1.1\r\nHost: demo\r\n\r\n")
    await asyncio.sleep(0.1)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def traffic(proxy_url: str, port: int, seconds: float) -> None:
    """A few seconds of mostly healthy traffic with every kind of fault mixed in."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    tick = 0
    async with aiohttp.ClientSession() as session:
        while loop.time() < end or tick < len(FAULTY):  # every fault at least once
            jobs = [_get(session, proxy_url + path) for path in NORMAL * (2 + tick % 3)]
            jobs.append(_get(session, proxy_url + FAULTY[tick % len(FAULTY)]))
            if tick % 4 == 0:
                jobs.append(_client_abort(port))
            if tick % 5 == 2:
                jobs.append(raw_request(port, BAD_REQUEST, timeout=5))
            await asyncio.gather(*jobs)
            tick += 1
            await asyncio.sleep(0.08)


@pytest.fixture
async def demo_proxy(proxy_factory):
    origin = await start_demo_origin()
    try:
        proxy = await proxy_factory(
            origin.url,
            **{
                "admin.token": TOKEN,
                "proxy_name": "shop-edge",
                "timeouts.response_headers": "2s",
                "timeouts.upstream_read": "2s",
            },
        )
        yield proxy
    finally:
        await origin.close()


@pytest.fixture
async def browser():
    require_tool(CHROMIUM)
    playwright = require_module("playwright.async_api")

    async with playwright.async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


def _count(text: str) -> int:
    return int(text.replace(",", ""))


async def _rows(page: Any, body_id: str) -> dict[str, int]:
    return await page.eval_on_selector_all(
        f"#{body_id} tr[data-key]",
        "rows => Object.fromEntries(rows.map(r => "
        "[r.dataset.key, Number(r.querySelector('.count').textContent.replace(/,/g, ''))]))",
    )


async def test_dashboard_shows_the_faults_and_matches_stats(demo_proxy, browser):
    proxy = demo_proxy
    admin = proxy.admin_url
    await traffic(proxy.url, proxy.port, seconds=2.0)

    page = await browser.new_page(viewport={"width": 1440, "height": 1000})
    problems: list[str] = []
    requests: list[Any] = []
    page.on("pageerror", lambda exc: problems.append(f"pageerror: {exc}"))
    page.on(
        "console",
        lambda msg: (
            problems.append(f"console {msg.type}: {msg.text}")
            if msg.type in ("error", "warning")
            else None
        ),
    )
    page.on("request", lambda request: requests.append(request))
    await page.goto(f"{admin}/dashboard?token={TOKEN}")
    await page.wait_for_selector("#recent tr[data-request-id]", timeout=10_000)
    await page.evaluate("window.__loadedOnce = true")

    # More traffic and new faults while the page is open: it follows without a reload. The
    # loop is held for 120 ms (as a slow callback would): a stall, held by its own work.
    await held_in_io_callback(0.12)
    await traffic(proxy.url, proxy.port, seconds=1.5)
    async with aiohttp.ClientSession() as session:
        await _get(session, proxy.url + "/garbage")  # the newest error: a proxy fault
    await proxy.settle(timeout=10)
    async with aiohttp.ClientSession() as session:
        _, _, stats = await admin_get(session, admin + "/stats?limit=20", token=TOKEN)
    total = stats["requests"]["total"]
    await page.wait_for_function(
        f"() => document.body.dataset.total === '{total}'", timeout=10_000, polling=100
    )
    assert await page.evaluate("window.__loadedOnce") is True  # never reloaded

    # The numbers on the page are those of /stats.
    assert _count(await page.inner_text("#total")) == total
    assert await page.inner_text("#in-flight") == "0"
    assert (await page.inner_text("#lag-max")).endswith(" ms")  # the loop watching itself
    stalls = stats["loop_lag_ms"]["stalls"]  # 1, unless the box stalled the loop too
    assert stalls["count"] >= 1
    assert _count(await page.inner_text("#stall-count")) == stalls["count"]
    last = stalls["recent"][0]
    cause = "starved of CPU" if last["cpu_wait_ms"] * 2 >= last["ms"] else "held by its own work"
    assert (await page.inner_text("#stall-last")).endswith(cause)
    assert await page.inner_text("#log-dropped") == "0"  # the access log kept up
    responses = stats["responses"]
    assert await _rows(page, "by-source") == responses["by_source"]
    assert await _rows(page, "by-error") == responses["by_error"]
    assert await _rows(page, "by-status") == responses["by_status"]
    assert await _rows(page, "by-layer") == responses["by_layer"]
    latency = await _rows(page, "latency")
    assert latency["total"] == stats["latency_ms"]["total"]["count"]
    assert latency["ttfb"] == stats["latency_ms"]["ttfb"]["count"]
    shown_ids = await page.eval_on_selector_all(
        "#recent tr[data-request-id]", "rows => rows.map(r => r.dataset.requestId)"
    )
    assert shown_ids == [e["request_id"] for e in stats["recent_errors"]]
    assert 0 < len(shown_ids) <= 20  # the page shows the last 20 by default

    # Each fault is explained in the taxonomy's words.
    newest = page.locator("#recent tr[data-request-id]").first
    protocol_error = TAXONOMY[Fault.HTTP_PROTOCOL_ERROR]
    assert await newest.get_attribute("data-error") == protocol_error.token
    text = await newest.inner_text()
    for words in (protocol_error.title, protocol_error.meaning, protocol_error.advice):
        assert words in text
    assert "502" in text and "proxy" in text
    for token in responses["by_error"]:
        assert TAXONOMY[Fault(token)].title in await page.inner_text("#by-error")
    for error in {e["error"] for e in stats["recent_errors"] if e["error"]}:
        row = page.locator(f'#recent tr[data-error="{error}"]').first
        assert TAXONOMY[Fault(error)].advice in await row.inner_text()

    # The filters go through /stats?source=...&error=...
    await page.select_option("#filter-source", "proxy")
    await page.wait_for_function(
        "() => [...document.querySelectorAll('#recent tr[data-request-id]')]"
        ".every(r => r.dataset.source === 'proxy')",
        timeout=5_000,
    )
    await page.select_option("#filter-source", "")

    # Zoom the chart to the last minute (the whole test's traffic), then keep a picture.
    await page.click("#chart-span button[data-seconds='60']")
    await page.wait_for_function(
        "() => document.getElementById('chart-hint').textContent.includes('minute')",
        timeout=5_000,
    )
    await asyncio.sleep(1.2)  # one more refresh with the new span
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000

    # Offline-ready: nothing but the admin server was ever asked for anything, and the
    # token went as a bearer header, never in a data endpoint's query string.
    assert problems == []
    urls = [r.url for r in requests]
    assert all(u.startswith(admin + "/") for u in urls), urls
    data = [r for r in requests if not r.url.startswith(admin + "/dashboard")]
    assert {u.split("?")[0].removeprefix(admin) for u in (r.url for r in data)} >= {
        "/stats", "/series", "/latency", "/faults",
    }  # fmt: skip
    for request in data:
        assert "token=" not in request.url
        assert (await request.all_headers()).get("authorization") == f"Bearer {TOKEN}"


async def test_dashboard_asks_for_the_token(demo_proxy, browser):
    admin = demo_proxy.admin_url
    page = await browser.new_page()
    response = await page.goto(f"{admin}/dashboard")
    assert response is not None and response.status == 401
    assert await page.locator("input[name=token]").count() == 1
    # Entering the token in the form opens the dashboard, which then goes live.
    await page.fill("input[name=token]", TOKEN)
    await page.click("button[type=submit]")
    await page.wait_for_function(
        "() => document.getElementById('live-text').textContent.startsWith('live')",
        timeout=10_000,
    )
    assert await page.locator("#banner").is_hidden()

    response = await page.goto(f"{admin}/dashboard?token=wrong")
    assert response is not None and response.status == 401


async def test_dashboard_without_a_token_and_a_lost_admin(origin_factory, proxy_factory, browser):
    async def ok(conn: Any) -> None:
        while await conn.read_request():
            await conn.respond(200, b"ok")

    origin = await origin_factory(ok)
    proxy = await proxy_factory(origin.url)
    page = await browser.new_page()
    await page.goto(proxy.admin_url + "/dashboard")
    await page.wait_for_function(
        "() => document.getElementById('live-text').textContent.startsWith('live')",
        timeout=10_000,
    )
    assert "No errors yet" in await page.inner_text("#recent")
    # The admin server goes away: the page says so instead of freezing on old numbers.
    await proxy.server.close()

    async def says_disconnected() -> bool:
        return await page.inner_text("#live-text") == "disconnected"

    await wait_for(says_disconnected, timeout=10, interval=0.1)
    assert "Lost contact" in await page.inner_text("#banner")


# -- layout: every table fits its panel ----------------------------------------------------------

# One unbroken word each: the worst case for a table cell.
LONG_PATH = "/" + "a-very-long-path-segment-" * 16  # the demo origin answers 404
LONG_CODING = b"x-" + b"long-transfer-coding-" * 12  # echoed in the 501's details

# Per table inside a shown .card: its width and where its last column's cells end, against
# the panel's content box (client width less padding). `scroller` is the box that may scroll
# the table on a narrow screen (the table itself when nothing wraps it). The routes panel is
# hidden without routes.
MEASURE = """() => [...document.querySelectorAll('.card:not([hidden]) table')].map((table) => {
  const card = table.closest('.card');
  const cs = getComputedStyle(card);
  const padL = parseFloat(cs.paddingLeft), padR = parseFloat(cs.paddingRight);
  const box = card.getBoundingClientRect();
  const inner = { left: box.left + card.clientLeft + padL,
                  right: box.left + card.clientLeft + card.clientWidth - padR };
  const wrapped = table.parentElement.classList.contains('table-scroll');
  const scroller = wrapped ? table.parentElement : table;
  const cells = [...table.rows].map((r) => r.cells[r.cells.length - 1]).filter((c) => c);
  const last = table.rows.length ? table.rows[0].cells[table.rows[0].cells.length - 1] : null;
  const clipped = [...table.querySelectorAll('td.num, th.num')]
    .filter((c) => c.scrollWidth > c.clientWidth + 1).map((c) => c.textContent);
  return {
    id: table.querySelector('tbody').id,
    rows: table.rows.length,
    lastHeader: last ? last.textContent.trim() : '',
    tableWidth: Math.max(table.scrollWidth, table.getBoundingClientRect().width),
    panelWidth: card.clientWidth - padL - padR,
    left: table.getBoundingClientRect().left, right: table.getBoundingClientRect().right,
    lastRight: Math.max(...cells.map((c) => c.getBoundingClientRect().right)),
    scrollerLeft: scroller.getBoundingClientRect().left,
    scrollerRight: scroller.getBoundingClientRect().right,
    scrollerScrolls: scroller.scrollWidth > scroller.clientWidth + 1,
    clipped,
    inner,
  };
})"""


def _bounds_text() -> str:
    """BUCKETS_S as the note on the page says them: mantissas per decade, lowest, highest."""
    lowest, highest = BUCKETS_S[0], BUCKETS_S[-1]
    decade = [b for b in BUCKETS_S if 1e-3 <= b < 1e-2]
    mantissas = ", ".join(f"{b * 1e3:g}" for b in decade)
    return f"{mantissas} \u00d7 10\u207f, {lowest * 1e6:g} \u00b5s to {highest:g} s"


@pytest.mark.parametrize(
    ("width", "height"), [(1280, 900), (1920, 1080), (700, 900)], ids=lambda v: str(v)
)
async def test_every_table_fits_its_panel(demo_proxy, browser, width, height):
    """At 1280x900 and 1920x1080 each panel's table is no wider than the panel and its
    last column (the latency table's MAX) ends inside it, with long paths and long error
    details among the recent errors; on a narrow screen a table may scroll inside its panel
    but the page never scrolls sideways. The latency panel shows every phase /latency
    carries, each with a label, and says that its percentiles are estimates from buckets."""
    proxy = demo_proxy
    await traffic(proxy.url, proxy.port, seconds=0.5)
    async with aiohttp.ClientSession() as session:
        await _get(session, proxy.url + LONG_PATH)
    await raw_request(
        proxy.port,
        b"POST /upload HTTP/1.1\r\nHost: demo\r\nTransfer-Encoding: "
        + LONG_CODING
        + b", chunked\r\n\r\n0\r\n\r\n",
        timeout=5,
    )
    await proxy.settle(timeout=10)
    async with aiohttp.ClientSession() as session:
        _, _, stats = await admin_get(session, proxy.admin_url + "/stats?limit=20", token=TOKEN)
        _, _, latency = await admin_get(session, proxy.admin_url + "/latency", token=TOKEN)
    assert any(e["path"] == LONG_PATH for e in stats["recent_errors"])
    assert any(LONG_CODING.decode() in (e["details"] or "") for e in stats["recent_errors"])

    page = await browser.new_page(viewport={"width": width, "height": height})
    await page.goto(f"{proxy.admin_url}/dashboard?token={TOKEN}")
    total = stats["requests"]["total"]
    await page.wait_for_function(
        f"() => document.body.dataset.total === '{total}'", timeout=10_000, polling=100
    )
    tables = {t["id"]: t for t in await page.evaluate(MEASURE)}
    assert set(tables) == {"latency", "by-source", "by-layer", "by-status", "by-error", "recent"}
    assert tables["latency"]["lastHeader"].lower().startswith("max")
    assert tables["recent"]["rows"] > 5 and tables["latency"]["rows"] > 5
    page_width = await page.evaluate("document.documentElement.scrollWidth")
    wide = await page.evaluate(
        f"() => [...document.querySelectorAll('body *')]"
        f".filter((e) => e.getBoundingClientRect().right > {width} + 0.5)"
        ".map((e) => e.tagName + '.' + e.className)"
    )
    assert page_width <= width, f"the page scrolls sideways: {page_width} > {width}: {wide}"
    for table in tables.values():
        inner = table["inner"]
        if width >= 1280:
            # scrollWidth is a whole number of pixels: one of rounding is allowed.
            assert table["tableWidth"] <= table["panelWidth"] + 1, table
            assert inner["left"] - 0.5 <= table["left"] and table["right"] <= inner["right"] + 0.5
            assert table["lastRight"] <= inner["right"] + 0.5, table
            assert not table["scrollerScrolls"], table
            assert table["clipped"] == [], table
        else:  # narrow: the table may scroll, inside its panel
            assert inner["left"] - 0.5 <= table["scrollerLeft"], table
            assert table["scrollerRight"] <= inner["right"] + 0.5, table

    # Every phase /latency carries is a row, with a label of its own for the known ones.
    keys = await page.eval_on_selector_all(
        "#latency tr[data-key]", "rows => rows.map(r => r.dataset.key)"
    )
    assert keys == ["total", *latency["phases"]]
    assert set(PHASES) <= set(latency["phases"])
    labels = dict(
        zip(
            keys,
            await page.eval_on_selector_all(
                "#latency tr[data-key] .phase-name", "cells => cells.map(c => c.textContent)"
            ),
            strict=True,
        )
    )
    assert labels["connect"] == "TCP connect" and labels["ttfb"] == "first byte"
    if "wait" in labels:
        assert labels["wait"] == "held (upstream_wait)"
    for key in PHASES:
        assert labels[key] and labels[key] != "undefined", labels

    # Percentiles come from fixed buckets: the panel says so, with the bounds.
    note = page.locator("#latency-note")
    assert await note.is_visible()
    text = await note.inner_text()
    assert "estimated from histogram buckets" in text and _bounds_text() in text, text
    assert "≈" in await page.inner_text("#latency-head")


async def test_the_dashboard_groups_by_route(proxy_factory, browser):
    """With routes, a "By route" panel lists each route with its counts from /stats
    by_route; without routes it stays hidden (issue 21)."""
    from proxy.demo import start_demo_api

    origin = await start_demo_origin()
    api = await start_demo_api()
    try:
        proxy = await proxy_factory(
            origin.url, routes=[{"name": "api", "path_prefix": "/api/", "upstream": api.url}]
        )
        async with aiohttp.ClientSession() as session:
            for path in ("/api/users", "/api/users/7", "/api/items", "/hello", "/hangup"):
                await _get(session, proxy.url + path)
        await proxy.settle(timeout=10)
        async with aiohttp.ClientSession() as session:
            _, _, stats = await admin_get(session, proxy.admin_url + "/stats")
        page = await browser.new_page(viewport={"width": 1440, "height": 1000})
        await page.goto(f"{proxy.admin_url}/dashboard")
        await page.wait_for_selector("#by-route tr[data-key]", timeout=10_000)
        assert await page.is_visible("#routes-card")
        shown = await _rows(page, "by-route")
        assert shown == {name: r["requests"]["total"] for name, r in stats["by_route"].items()}
        assert shown == {"api": 3, "default": 2}
        assert await page.inner_text("#upstream") == "2 routes"
        default_row = await page.inner_text('#by-route tr[data-key="default"]')
        assert TAXONOMY[Fault.CONNECTION_TERMINATED].title in default_row  # its top fault
        assert "route: default" in await page.inner_text("#recent")
        await page.close()
    finally:
        await api.close()
        await origin.close()
