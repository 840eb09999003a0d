"""What mutation testing (tests/MUTATION.md) found still unnoticed once the taxonomy,
classification, diagnosis, header and stats tests were written: each test here fails with
the mutant it names applied to the source, and passes on the source as it is."""

from __future__ import annotations

import asyncio
import errno
import time

import pytest

from proxy.diagnosis.classify import DeadlineExpired, classify
from proxy.diagnosis.faults import Fault, Source
from proxy.diagnosis.hops import (
    FAULT_BEHIND_ORIGIN,
    Evidence,
    diagnose,
    is_invalid_json_request,
    proxy_status_author,
)
from proxy.diagnosis.record import Exchange, Phase
from proxy.telemetry.breakdown import breakdown
from proxy.telemetry.histogram import Histogram
from proxy.telemetry.stats import Stats

from support import LOOPBACK, OriginConnection, Response, parse_responses

# -- classify ----------------------------------------------------------------------------------


def test_a_long_read_timeout_is_told_as_configured():
    # classify.duration_text: `ns / 1e6` -> `ns / 1000001.0` shows 1h as 3599.996s
    hour = DeadlineExpired(3600 * 10**9, "timeouts.upstream_read")
    assert classify(Phase.BODY, hour) == (
        Fault.CONNECTION_READ_TIMEOUT,
        "upstream sent nothing for 60m (timeouts.upstream_read)",
    )
    long = DeadlineExpired(1000 * 10**9, "timeouts.upstream_read")
    assert classify(Phase.BODY, long)[1] == (
        "upstream sent nothing for 1000s (timeouts.upstream_read)"
    )


def test_a_connect_failure_that_carries_no_errno_is_named_by_its_type():
    # classify._errno_name: `getattr(exc, "errno", None)` -> `getattr(exc, "errno")` raises
    assert classify(Phase.CONNECT, RuntimeError("boom")) == (
        Fault.CONNECTION_REFUSED,
        "connect failed (RuntimeError)",
    )


def test_a_connect_error_with_etimedout_is_a_timeout_whatever_its_class():
    # OSError(ETIMEDOUT) is made a TimeoutError by Python; its subclasses are not. Mutants:
    # `getattr(None, "errno", None)`, `getattr(error, "XXerrnoXX", None)`, `"ERRNO"`.
    error = ConnectionError(errno.ETIMEDOUT, "Connection timed out")
    assert not isinstance(error, TimeoutError)
    assert classify(Phase.CONNECT, error) == (
        Fault.CONNECTION_TIMEOUT,
        "TCP connect timed out (ETIMEDOUT)",
    )


# -- diagnosis ---------------------------------------------------------------------------------


def test_a_proxy_status_with_a_port_in_it_still_names_its_author():
    # OriginResponse.parse: `line.partition(b":")` -> `rpartition`: a header value holding a
    # colon (a next-hop with a port) lost its header, and the hop behind the origin with it
    head = (
        b"HTTP/1.1 502 Bad Gateway\r\n"
        b"Content-Type: text/plain\r\n"
        b'Proxy-Status: shop-gw; error=connection_refused; next-hop="10.0.0.7:8080"\r\n'
        b"\r\n"
    )
    assert diagnose(Evidence(502, head, bytearray(b"upstream down"))) == (
        "shop-gw",
        (FAULT_BEHIND_ORIGIN,),
    )


def test_an_unreadable_proxy_status_value_keeps_the_author_found_before_it():
    # proxy_status_author: `break` -> `return` threw away what the earlier values said
    assert proxy_status_author(["gw; error=connection_refused", "(not a member)"]) == "gw"
    assert proxy_status_author(["gw; error=connection_refused, (not a member)"]) == "gw"


def test_every_member_of_a_proxy_status_value_is_read_in_order():
    # proxy_status_author: `value.find(",", pos)` -> `rfind`: the middle member was skipped
    value = (
        "inner; error=connection_timeout, mid; error=http_response_timeout, "
        "edge; received-status=504"
    )
    assert proxy_status_author([value]) == "mid"


def test_valid_json_that_orjson_refuses_is_not_flagged():
    # is_invalid_json_request: the last `return False` -> `return True`. RFC 8259 allows
    # both (a number out of float range; an unpaired surrogate escape); orjson refuses them.
    assert is_invalid_json_request(b"application/json", b'{"n": 1e400}') is False
    assert is_invalid_json_request(b"application/json", b'["\\ud800"]') is False


def test_json_too_deep_for_either_parser_is_undecidable():
    # is_invalid_json_request: `except RecursionError: return False` -> `return True`
    body = b"[" * 2000 + b"1e400" + b"]" * 2000  # valid; orjson refuses the number
    assert is_invalid_json_request(b"application/json", body) is False


def test_signature_headers_and_reason_phrases_match_whatever_their_case():
    # diagnosis._h: `re.compile(pattern, re.I | re.S)` -> no flags (or `re.I & re.S`);
    # diagnosis._re: the reason pattern's `re.I` dropped. Both only run while the module is
    # imported, so mutmut cannot see them (tests/MUTATION.md): checked by hand.
    cloudflare = b"HTTP/1.1 521 Web Server Is Down\r\nServer: CloudFlare\r\n\r\n"
    assert diagnose(Evidence(521, cloudflare))[0] == "cloudflare"
    varnish = b"HTTP/1.1 503 backend fetch failed\r\nX-Varnish: 32770\r\n\r\n"
    assert diagnose(Evidence(503, varnish)) == ("varnish", (FAULT_BEHIND_ORIGIN,))


# -- headers: the origin's response head, over real sockets --------------------------------------


async def read_responses(reader: asyncio.StreamReader, count: int) -> list[Response]:
    """`count` whole responses (llhttp, strict), or fail after 5 s."""
    data = b""
    async with asyncio.timeout(5):
        while True:
            responses, _ = parse_responses(data, eof=False)
            if len(responses) >= count:
                return responses
            chunk = await reader.read(65536)
            assert chunk, f"the proxy closed the connection after {data!r}"
            data += chunk


async def two_requests_on_one_connection(port: int) -> list[Response]:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        got = []
        for target in (b"/one", b"/two"):
            writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n")
            got += await read_responses(reader, 1)
        return got
    finally:
        writer.close()


@pytest.mark.parametrize("value", [b"close", b"keep-alive"])
@pytest.mark.parametrize("pad", [0, 300], ids=["short-head", "connection-after-300-bytes"])
async def test_a_plain_connection_as_the_last_header_line_is_dropped_cleanly(
    value, pad, origin_factory, proxy_factory
):
    # filter_response_block, the common head: `low.find(b"\r\n", start + 2)` ->
    # `low.find(b"XX\r\nXX", start + 2)` or `low.find(start + 2)` sent the status line
    # again as a header line (the client cannot parse it), or raised past byte 255.
    lines = b"X-Pad: " + b"p" * pad + b"\r\n" if pad else b""
    reply = b"HTTP/1.1 200 OK\r\n" + lines + b"Content-Length: 2\r\nConnection: " + value

    async def script(conn: OriginConnection) -> None:
        while await conn.read_request() is not None:
            conn.write(reply + b"\r\n\r\nok")
            await conn.drain()
            if value == b"close":
                return

    origin = await origin_factory(script)
    proxy = await proxy_factory(origin.url)
    for response in await two_requests_on_one_connection(proxy.port):
        assert (response.status, response.body) == (200, b"ok")
        assert response.header("connection") is None
        assert response.header("content-length") == "2"
        assert response.header("x-pad") == ("p" * pad if pad else None)


async def test_a_close_delimited_response_with_a_rare_field_is_reframed(
    origin_factory, proxy_factory
):
    # ResponseFields(): `content_length: bool = False` -> `True`: a head that goes down the
    # full scan (here for its Via) and has no framing was passed on unframed, so a
    # keep-alive client could not tell where the body ended.
    async def script(conn: OriginConnection) -> None:
        if await conn.read_request() is not None:
            conn.write(b"HTTP/1.1 200 OK\r\nVia: 1.1 backend\r\n\r\nhello")
            await conn.drain()  # then the origin closes: that ends the body

    origin = await origin_factory(script)
    proxy = await proxy_factory(origin.url)
    for response in await two_requests_on_one_connection(proxy.port):
        assert (response.status, response.body) == (200, b"hello")
        assert response.header("transfer-encoding") == "chunked"
        assert response.header("via").startswith("1.1 backend, ")


# -- stats -----------------------------------------------------------------------------------------

S = 1_000_000_000  # ns
MS = 1_000_000
T0 = 10_000 * S  # a perf_counter instant on a whole second


def finished(
    status: int = 200,
    *,
    start: int = T0,
    sent: int = T0 + 1 * MS,
    head: int = T0 + 3 * MS,
    end: int = T0 + 4 * MS,
    source: Source = Source.ORIGIN,
    fault: Fault | None = None,
    **marks: int | bool,
) -> Exchange:
    """A finished exchange with its timing marks (a pooled connection unless `marks` say)."""
    ex = Exchange(start, "127.0.0.1", "app:3000")
    ex.status, ex.source, ex.fault, ex.method, ex.target = status, source, fault, "GET", "/"
    ex.t_sent, ex.t_response_head, ex.t_end = sent, head, end
    for name, value in marks.items():
        setattr(ex, name, value)
    return ex


def test_every_histogram_adds_up_over_batches_of_common_exchanges():
    # record_batch, the common path: `d_sum += value` -> `=` or `-=`, `b_counts[...] += 1`
    # -> `= 1`, `origin.sum_ns += d_sum` -> `=` or `-=`
    stats = Stats()
    stats.record_batch([finished(), finished(start=T0 - 2 * MS)])  # 4 ms and 6 ms
    stats.record_batch([finished(start=T0 - 1 * MS)])  # 5 ms
    origin, ttfb, body = stats.duration_by_source["origin"], stats.ttfb, stats.body
    assert (origin.count, origin.sum_ns, origin.max_ns) == (3, 15 * MS, 6 * MS)
    assert (ttfb.count, ttfb.sum_ns, ttfb.max_ns) == (3, 6 * MS, 2 * MS)
    assert (body.count, body.sum_ns, body.max_ns) == (3, 3 * MS, 1 * MS)
    assert max(body.counts) == 3  # one bucket holds all three 1 ms bodies


def test_a_response_the_proxy_made_is_timed_from_its_start():
    # _record_one: `t_end - ex.t_start` -> `t_end + ex.t_start`
    stats = Stats()
    refused = finished(
        502,
        source=Source.PROXY,
        fault=Fault.CONNECTION_REFUSED,
        sent=0,
        head=0,
        end=T0 + 3 * MS,
        t_connect=T0 + 1 * MS,
    )
    stats.record_batch([refused])
    proxy = stats.duration_by_source["proxy"]
    assert (proxy.count, proxy.sum_ns) == (1, 3 * MS)


def test_holds_that_expired_and_retries_are_each_counted():
    # _record_setup: `self.held_expired += 1` -> `= 1`, `self.retries += 1` -> `= 1`
    stats = Stats()
    held = {"t_wait": T0 + 1 * MS, "t_connect": T0 + 2 * MS, "wait_expired": True}
    retried = {"t_connect": T0 + 1 * MS, "t_connected": T0 + 2 * MS, "retried": True}
    stats.record_batch([finished(502, **held), finished(502, **held)])
    stats.record_batch([finished(**retried), finished(**retried), finished(**retried)])
    assert (stats.held, stats.held_expired, stats.retries) == (2, 2, 3)


@pytest.mark.parametrize(
    ("marks", "queued"),
    [
        # waited for a pool slot, then resolved the name: the queue ends at the DNS start
        ({"t_pool": T0 + 1 * MS, "t_dns": T0 + 3 * MS, "t_connect": T0 + 4 * MS}, 2 * MS),
        # waited for a pool slot, then was held by upstream_wait: it ends at the hold
        ({"t_pool": T0 + 1 * MS, "t_wait": T0 + 2 * MS, "t_connect": T0 + 5 * MS}, 1 * MS),
    ],
    ids=["then-dns", "then-held"],
)
def test_the_queue_phase_ends_where_the_next_phase_starts(marks, queued):
    # _record_setup: `ex.t_dns or t_wait or ...` -> `ex.t_dns and t_wait or ...`, or
    # `ex.t_dns or t_wait and ex.t_connect or ...`
    stats = Stats()
    stats.record_batch([finished(sent=T0 + 6 * MS, head=T0 + 7 * MS, end=T0 + 8 * MS, **marks)])
    assert (stats.phases["queue"].count, stats.phases["queue"].sum_ns) == (1, queued)


def test_an_error_token_is_counted_over_all_its_statuses():
    # breakdown: `by_error.get(error, 0)` -> `by_error.get(None, 0)`
    counts = {(400, "proxy", "http_request_error"): 2, (408, "proxy", "http_request_error"): 3}
    assert breakdown(counts)["by_error"] == {"http_request_error": 5}


def test_one_window_slot_per_second_however_many_batches():
    # record_batch: `second = self._slot_second` -> `None`, `t_end // 1e9` -> `t_end / 1e9`;
    # _new_slot: `self._slot_second = second` -> `None`. Each kept a slot per batch (or per
    # exchange) for 300 s: the same figures, memory growing with the request rate.
    stats = Stats()
    for _ in range(3):
        stats.record_batch([finished(), finished(502)])
    stats.record_batch([finished(start=T0 + S, sent=T0 + S, head=T0 + S, end=T0 + S + 1)])
    assert [second for second, _ in stats._slots] == [T0 // S, T0 // S + 1]
    assert stats.window(60, T0 + S)["responses"]["total"] == 7


def test_a_young_proxys_rate_is_over_its_uptime():
    # window: the uptime `(perf_counter_ns() - started_ns) / 1e9` -> `* 1e9`, `+ started_ns`;
    # its floor `1e-9` -> `1.000000001`
    for uptime_s, exchanges in ((10, 20), (0.5, 1)):
        stats = Stats()
        stats.started_ns = time.perf_counter_ns() - int(uptime_s * S)
        now = time.perf_counter_ns()
        stats.record_batch(
            [finished(start=now - 4 * MS, sent=now - 3 * MS, head=now - MS, end=now)]
        )
        stats.record_batch([finished(start=now, sent=now, head=now, end=now)] * (exchanges - 1))
        assert stats.window(60)["rps"] == pytest.approx(exchanges / uptime_s, rel=0.25)


def test_a_series_counts_every_error_and_starts_on_the_wall_clock():
    # series: `errors[source][i] += n` -> `= n`; the start `first + wall_offset_s` with
    # `time.time() - now_ns / 1e9` -> `+`, `* 1e9`, or `first - wall_offset_s`
    stats = Stats()
    now = time.perf_counter_ns()
    made = {"source": Source.PROXY, "fault": Fault.CONNECTION_REFUSED, "sent": 0, "head": 0}
    stats.record_batch([finished(502, start=now, end=now, **made)] * 2)
    timeout = {**made, "fault": Fault.CONNECTION_TIMEOUT}
    stats.record_batch([finished(504, start=now, end=now, **timeout)] * 3)
    series = stats.series(60, now)
    assert series["errors"]["proxy"][-1] == series["responses"]["proxy"][-1] == 5
    assert time.time() - 61 <= series["start"] <= time.time() - 58


def test_the_stats_document_tells_the_start_the_uptime_and_each_window():
    # Stats(): `self.started_at = time.time()` -> `None`; snapshot: `uptime_s` ->
    # `round(3)`, `* 1e9`, `now_ns + started_ns`; `self.window(s, now_ns)` -> `window(now_ns)`
    before = time.time()
    stats = Stats()
    stats.started_ns -= 1_234_567_891
    now = time.perf_counter_ns()
    old = now - 90 * S  # in the 300 s window, not in the 60 s one
    stats.record_batch([finished(start=old - 4 * MS, sent=old - 3 * MS, head=old - MS, end=old)])
    stats.record_batch([finished(start=now - 4 * MS, sent=now - 3 * MS, head=now - MS, end=now)])
    doc = stats.snapshot(proxy={"name": "edge"})
    assert before <= doc["proxy"]["started_at"] <= time.time()
    assert doc["proxy"]["uptime_s"] == pytest.approx(1.235, abs=0.2)
    assert doc["windows"]["60s"]["responses"]["total"] == 1
    assert doc["windows"]["300s"]["responses"]["total"] == 2


def test_quantiles_interpolate_in_the_first_and_the_last_bucket():
    # quantile_ms: `lower = 0.0` -> `1.0` (the first bucket starts at 0); the +Inf bucket's
    # upper bound `self.max_ns / 1e9` -> `/ 1000000001.0`
    first = Histogram()
    for _ in range(10):
        first.observe_ns(40_000)  # 40 µs: under the first bound, 50 µs
    assert first.quantile_ms(0.5) == 0.025  # halfway through 0..50 µs
    last = Histogram()
    last.observe_ns(1000 * S)  # 1000 s: past the last bound, 300 s
    assert last.quantile_ms(0.99) == 993_000.0  # 300 s + 0.99 x (1000 s - 300 s)
