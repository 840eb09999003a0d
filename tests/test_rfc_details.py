"""RFC details found by REDbot and byte-level probes, each over real sockets:

- RFC 9110 §6.6.1: a recipient with a clock adds `Date` to a response that has none;
- RFC 9112 §6.1 / §6.3: a request with a transfer coding the proxy does not implement,
  chunked last, is answered 501; chunked that is not the final coding stays 400; both close;
- RFC 9112 §7.1.2: a `Content-Length` among chunked trailers is refused, and the detail says
  it was in the trailers;
- W3C Server-Timing: every metric carries a short `desc`.
"""

from __future__ import annotations

import asyncio
import re
import time
from email.utils import parsedate_to_datetime

import aiohttp
import pytest
from hostile_support import RecordingOrigin, send_raw

from proxy.diagnosis.faults import Fault

from support import OriginConnection, parse_responses

REQUEST_ERROR = Fault.HTTP_REQUEST_ERROR.value


# -- Date -------------------------------------------------------------------------------------


def _dates(data: bytes) -> list[str]:
    return [m.decode() for m in re.findall(rb"(?im)^date: ([^\r\n]*)\r$", data)]


async def test_a_response_without_date_gets_one_and_it_is_current(origin_factory, proxy_factory):
    """Twice, more than a second apart: the Date is now, never one remembered from before."""

    async def no_date(conn: OriginConnection) -> None:
        while await conn.read_request() is not None:
            await conn.respond(200, b"undated")

    origin = await origin_factory(no_date)
    proxy = await proxy_factory(origin.url)
    seen = []
    for _ in range(2):
        before = int(time.time())
        data, _ = await send_raw(
            proxy.port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        after = time.time()
        (response,), _ = parse_responses(data)
        assert response.status == 200 and response.body == b"undated"
        dates = _dates(data)
        assert len(dates) == 1, data[:500]
        assert re.fullmatch(r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT", dates[0]), dates
        assert before <= parsedate_to_datetime(dates[0]).timestamp() <= after
        seen.append(dates[0])
        await asyncio.sleep(1.1)
    assert seen[0] != seen[1], seen


async def test_the_origins_own_date_passes_unchanged(origin_factory, proxy_factory):
    stamp = "Tue, 01 Dec 2026 10:00:00 GMT"

    async def dated(conn: OriginConnection) -> None:
        while await conn.read_request() is not None:
            await conn.respond(200, b"dated", headers=f"date: {stamp}\r\n")

    origin = await origin_factory(dated)
    proxy = await proxy_factory(origin.url)
    for _ in range(2):  # the second one from the remembered head
        data, _ = await send_raw(
            proxy.port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        assert _dates(data) == [stamp], data[:500]


# -- transfer codings of requests ---------------------------------------------------------------


def _post(codings: bytes, body: bytes = b"3\r\nabc\r\n0\r\n\r\n") -> bytes:
    return b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: " + codings + b"\r\n\r\n" + body


@pytest.mark.parametrize(
    ("codings", "status"),
    [
        pytest.param(b"identity, chunked", 501, id="identity-then-chunked"),
        pytest.param(b"gzip, chunked", 501, id="gzip-then-chunked"),
        pytest.param(b"GZIP,chunked", 501, id="gzip-upper-no-space"),
        pytest.param(b"deflate, br, chunked", 501, id="two-codings-then-chunked"),
        pytest.param(b"chunked, gzip", 400, id="chunked-not-last"),
        pytest.param(b"gzip, chunked, chunked", 400, id="chunked-twice-last"),
        pytest.param(b"chunked, chunked", 400, id="chunked-twice"),
        pytest.param(b"gzip", 400, id="gzip-alone"),
    ],
)
async def test_transfer_codings_the_proxy_does_not_apply(
    codings: bytes, status: int, recording: RecordingOrigin, proxy_factory
):
    """501 for a coding it does not implement (chunked last: the body is framed), 400 when
    the framing itself cannot be known; either way Connection: close, the connection
    closed (the client is not asked to keep going), nothing forwarded."""
    proxy = await proxy_factory(recording.url)
    data, how = await send_raw(proxy.port, _post(codings))
    assert how == "eof", (how, data[:300])
    responses, unfinished = parse_responses(data)
    assert [r.status for r in responses] == [status] and not unfinished, data[:400]
    response = responses[0]
    assert response.header("Connection") == "close"
    assert f"error={REQUEST_ERROR}" in (response.header("Proxy-Status") or "")
    problem = response.json()
    assert (problem["status"], problem["error"], problem["layer"]) == (
        status,
        REQUEST_ERROR,
        "client",
    )
    if status == 501:
        assert "not implemented" in problem["detail"], problem
        assert problem["title"] == "Transfer coding not implemented", problem
    await proxy.settle()
    (record,) = proxy.access_log()
    assert (record["status"], record["error"], record["source"]) == (status, REQUEST_ERROR, "proxy")
    assert recording.received_bytes() == b""
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.admin_url + "/stats") as resp:
            stats = await resp.json()
    assert stats["responses"]["by_status"] == {str(status): 1}


async def test_content_length_in_chunked_trailers_is_named_as_such(recording, proxy_factory):
    proxy = await proxy_factory(recording.url)
    request = _post(b"chunked", b"3\r\nabc\r\n0\r\nContent-Length: 3\r\n\r\n")
    data, _ = await send_raw(proxy.port, request)
    responses, _ = parse_responses(data)
    assert [r.status for r in responses] == [400], data[:400]
    detail = responses[0].json()["detail"]
    assert "trailer" in detail, detail
    assert "with Transfer-Encoding" not in detail, detail
    await proxy.settle()
    (record,) = proxy.access_log()
    assert record["status"] == 400 and "trailer" in record["details"], record


async def test_content_length_beside_transfer_encoding_in_the_head_keeps_its_words(
    recording, proxy_factory
):
    """The near miss: the same conflict in the head is not a trailer problem."""
    proxy = await proxy_factory(recording.url)
    request = (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    data, _ = await send_raw(proxy.port, request + b"3\r\nabc\r\n0\r\n\r\n")
    responses, _ = parse_responses(data)
    assert [r.status for r in responses] == [400], data[:400]
    assert "trailer" not in responses[0].json()["detail"]


# -- Server-Timing -----------------------------------------------------------------------------

METRIC = re.compile(r'^(?P<name>[a-z]+);dur=\d+\.\d{3};desc="(?P<desc>[^"]+)"$')


def _metrics(value: str | None) -> dict[str, str]:
    assert value, "no Server-Timing"
    out = {}
    for item in value.split(", "):
        m = METRIC.match(item)
        assert m, f'{item!r} is not name;dur=...;desc="..."'
        out[m["name"]] = m["desc"]
    return out


async def test_every_server_timing_metric_has_a_desc(recording, proxy_factory):
    """The first exchange (a fresh connection: connect, ttfb, proxy), the second (pooled:
    ttfb, proxy), and a proxy-made reply (proxy only)."""
    proxy = await proxy_factory(recording.url)
    two = (
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
        + b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    data, _ = await send_raw(proxy.port, two)
    first, second = parse_responses(data)[0]
    assert set(_metrics(first.header("Server-Timing"))) == {"connect", "ttfb", "proxy"}
    assert set(_metrics(second.header("Server-Timing"))) == {"ttfb", "proxy"}
    descs = _metrics(first.header("Server-Timing")) | _metrics(second.header("Server-Timing"))
    assert all(0 < len(d) <= 32 for d in descs.values()), descs

    await recording.close()  # nothing listens any more: a proxy-made 502
    data, _ = await send_raw(proxy.port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    (refused,), _ = parse_responses(data)
    assert refused.status == 502
    assert "proxy" in _metrics(refused.header("Server-Timing"))
