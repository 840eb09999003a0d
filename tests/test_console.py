"""The terminal: one readable line per exchange with the taxonomy's short hint, a summary
line after each burst, nothing a client or an origin sent reaching the terminal raw."""

from __future__ import annotations

import os
import pty
import re
import socket

from proxy.diagnosis.faults import REQUEST_PROBLEMS, TAXONOMY, Fault, Source
from proxy.diagnosis.hops import FAULT_BEHIND_ORIGIN, HINT_TEXT, ORIGIN_5XX_FOR_CLIENT_ERROR
from proxy.diagnosis.record import Exchange
from proxy.telemetry import console
from proxy.telemetry.console import TIMES, BurstSummary, install_summary, pretty_line

from support import LOOPBACK, free_port, read_terminal, spawn_proxy

ANSI = re.compile(r"\x1b\[[0-9;]*m")
UPSTREAM = "127.0.0.1:3000"


def record(**fields) -> dict:
    base = {
        "time": "2026-11-21T10:15:02.123Z",
        "request_id": "0a1b2c3d-00000001",
        "method": "GET",
        "path": "/api/items",
        "status": 200,
        "source": "origin",
        "layer": "origin",
        "error": None,
        "details": None,
        "upstream": UPSTREAM,
        "client": "127.0.0.1",
        "bytes_in": 0,
        "bytes_out": 12,
        "duration_ms": 3.25,
        "phases_ms": {},
        "reused": False,
        "retried": False,
        "hop": None,
        "hints": [],
    }
    return {**base, **fields}


def plain(line: bytes) -> str:
    text = line.decode()
    assert text.endswith("\n") and text.count("\n") == 1  # one line, always
    return text[:-1]


# -- the hints in the taxonomy ---------------------------------------------------------------------


def test_every_fault_has_a_short_hint():
    for row in [*TAXONOMY.values(), *REQUEST_PROBLEMS.values()]:
        assert row.hint, row.fault
        assert len(row.hint) <= 90, row.hint
        assert set(re.findall(r"{(\w*)}", row.hint)) <= {"upstream"}, row.hint
        assert "\n" not in row.hint
    refused = TAXONOMY[Fault.CONNECTION_REFUSED]
    assert refused.hint_for(UPSTREAM) == (
        "nothing is listening on 127.0.0.1:3000 — is the dev server running?"
    )


# -- one line per exchange ------------------------------------------------------------------------


def test_a_proxy_fault_says_who_what_and_the_hint_with_the_upstream():
    line = pretty_line(
        record(
            status=502,
            source="proxy",
            layer="transport",
            error=Fault.CONNECTION_REFUSED.value,
            details="connect to 127.0.0.1:3000 refused",
            duration_ms=0.8,
        ),
        colour=True,
    )
    assert b"\x1b[" in line
    text = ANSI.sub("", plain(line))
    assert text.startswith("10:15:02 502 GET    /api/items 0.8ms PROXY connection_refused")
    assert "nothing is listening on 127.0.0.1:3000 — is the dev server running?" in text
    assert "(connect to 127.0.0.1:3000 refused)" in text


def test_without_colour_there_is_no_escape_sequence():
    line = pretty_line(record(status=504, source="proxy", error="http_response_timeout"), False)
    assert b"\x1b" not in line
    assert "127.0.0.1:3000 did not answer in time" in plain(line)


def test_each_request_error_status_gets_its_own_hint():
    for row in REQUEST_PROBLEMS.values():
        line = plain(
            pretty_line(
                record(status=row.status, source="proxy", error=Fault.HTTP_REQUEST_ERROR.value),
                False,
            )
        )
        assert row.hint in line


def test_an_origin_error_names_the_hop_and_the_hints():
    nginx = plain(pretty_line(record(status=502, hop="nginx", hints=[FAULT_BEHIND_ORIGIN]), False))
    assert "502" in nginx and "origin ← nginx" in nginx
    assert HINT_TEXT[FAULT_BEHIND_ORIGIN] in nginx
    gateway = plain(pretty_line(record(status=504, hop="pay-gw", hints=[FAULT_BEHIND_ORIGIN])))
    assert "pay-gw" in ANSI.sub("", gateway)
    json_500 = plain(
        pretty_line(record(status=500, method="POST", hints=[ORIGIN_5XX_FOR_CLIENT_ERROR]), False)
    )
    assert "POST" in json_500 and HINT_TEXT[ORIGIN_5XX_FOR_CLIENT_ERROR] in json_500


def test_a_cut_body_and_a_client_that_left():
    cut = plain(
        pretty_line(
            record(
                status=200,
                layer="upstream",
                error=Fault.HTTP_RESPONSE_INCOMPLETE.value,
                details="upstream closed mid-body",
            ),
            False,
        )
    )
    assert "200" in cut and "origin" in cut and "died in the middle of the body" in cut
    gone = plain(
        pretty_line(
            record(status=499, source="client", error=Fault.CLIENT_CLOSED_REQUEST.value), False
        )
    )
    assert "499" in gone and "client" in gone and "the client gave up first" in gone


def test_held_requests_and_retries_are_marked():
    line = plain(pretty_line(record(waited_ms=1432.5, retried=True), False))
    assert "[held 1.43s until the upstream accepted]" in line and "[retried]" in line
    assert "held" not in plain(pretty_line(record(), False))


def test_nothing_from_the_wire_reaches_the_terminal_raw():
    line = pretty_line(
        record(path="/a\x1b]0;pwned\x07\x1b[2J\u009b31m" + "x" * 300, method="GET"), True
    )
    text = line.decode()
    # Our own colour codes only: once they are removed, no escape is left.
    assert "\x1b" not in ANSI.sub("", text)
    assert "\x07" not in text and "\x1b]" not in text and "\x1b[2J" not in text
    assert "\u009b" not in text
    assert "…" in text and len(ANSI.sub("", text)) < 200  # long paths are shortened


def test_no_color_is_respected(monkeypatch):
    monkeypatch.setattr(console, "COLOUR", False)
    assert b"\x1b" not in pretty_line(record(status=500))


# -- the burst summary -----------------------------------------------------------------------------

S = 1_000_000_000


def exchange(at_s: float, status: int = 200, **fields) -> Exchange:
    ex = Exchange(int(at_s * S), "127.0.0.1", UPSTREAM)
    ex.t_end = int((at_s + 0.01) * S)
    ex.status = status
    for name, value in fields.items():
        setattr(ex, name, value)
    return ex


def test_one_line_after_a_burst_once_traffic_pauses():
    summary = BurstSummary(colour=False)
    for i in range(36):
        summary.observe(exchange(100 + i * 0.1))
    summary.observe(exchange(101, 404))
    summary.observe(exchange(101.5, 502, hop="nginx", hints=(FAULT_BEHIND_ORIGIN,)))
    summary.observe(exchange(102, 500, hints=(ORIGIN_5XX_FOR_CLIENT_ERROR,)))
    for t in (102.5, 103, 104):
        summary.observe(exchange(t, 502, source=Source.PROXY, fault=Fault.CONNECTION_REFUSED))
    summary.observe(exchange(104.5, source=Source.ORIGIN, fault=Fault.HTTP_RESPONSE_INCOMPLETE))
    summary.observe(exchange(104.8, 499, source=Source.CLIENT, fault=Fault.CLIENT_CLOSED_REQUEST))
    summary.observe(exchange(104.9, t_wait=int(103.5 * S), t_connect=int(104.9 * S)))
    assert summary.tick(int(105 * S)) is None  # not idle long enough yet
    line = summary.tick(int(107.6 * S))
    assert line is not None
    text = plain(line)
    assert text.startswith("── last 4.9s: 45 responses · ")
    assert "37 ok" in text and "1 origin 4xx" in text
    assert f"2 origin 5xx (behind it: nginx {TIMES}1)" in text
    assert "1 of them for invalid JSON" in text
    assert f"3 from the proxy (connection_refused {TIMES}3)" in text
    assert f"1 cut mid-body (http_response_incomplete {TIMES}1)" in text
    assert "1 abandoned by the client" in text
    assert "1 held for the upstream (up to 1.4s)" in text
    assert summary.tick(int(120 * S)) is None  # said once


def test_a_lone_request_gets_no_summary_and_a_busy_stream_one_a_minute():
    summary = BurstSummary(colour=False)
    summary.observe(exchange(10))
    assert summary.tick(int(20 * S)) is None
    assert summary.count == 0
    for i in range(130):  # a request every half second, never a pause
        summary.observe(exchange(30 + i * 0.5))
        line = summary.tick(int((30 + i * 0.5 + 0.02) * S))
        if line is not None:
            break
    assert line is not None and "responses" in plain(line)
    assert 59 <= i * 0.5 <= 61


async def test_json_logs_get_no_summary(origin_factory, proxy_factory):
    async def ok(conn):
        while await conn.read_request():
            await conn.respond(200)

    origin = await origin_factory(ok)
    proxy = await proxy_factory(origin.url)  # JSON lines
    observers = proxy.server.telemetry.observers
    before = list(observers)
    assert install_summary(proxy.server.telemetry) is None
    assert observers == before


# -- on a real terminal ----------------------------------------------------------------------------


def _get(port: int, path: str) -> None:
    with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: dev\r\nConnection: close\r\n\r\n".encode())
        while sock.recv(65536):
            pass


def test_terminal_lines_and_the_summary_after_the_burst():
    """`faultline serve` with stdout on a pseudo terminal, upstream down: one line per
    request with the hint, then, once the burst is over, one summary line."""
    master, slave = pty.openpty()
    dead = free_port()
    proxy = spawn_proxy(f"http://{LOOPBACK}:{dead}", stdout=slave)
    os.close(slave)
    output = b""
    try:
        for path in ("/", "/app.js", "/favicon.ico"):
            _get(proxy.port, path)
        output = read_terminal(master, lambda out: b"last " in out and out.endswith(b"\n"), 10)
    finally:
        proxy.stop()
        os.close(master)
    text = ANSI.sub("", output.decode(errors="replace")).replace("\r\n", "\n")
    lines = [line for line in text.splitlines() if line.strip()]
    requests = [line for line in lines if " GET " in line]
    assert len(requests) == 3, text
    for line, path in zip(requests, ("/", "/app.js", "/favicon.ico"), strict=True):
        assert f" 502 GET    {path} " in line and " PROXY connection_refused" in line
        assert f"nothing is listening on 127.0.0.1:{dead} — is the dev server running?" in line
    (summary,) = [line for line in lines if line.startswith("── last ")]
    assert "3 responses" in summary and f"3 from the proxy (connection_refused {TIMES}3)" in summary
    assert lines.index(summary) > lines.index(requests[-1])


def test_a_grpc_call_shows_its_status_and_the_origins_message():
    """A gRPC error is HTTP 200: the line must show the gRPC outcome, or it reads as fine."""
    app_error = plain(
        pretty_line(
            record(path="/echo.Echo/Missing", grpc_status=5, grpc_message="no such greeting"),
            False,
        )
    )
    assert app_error.endswith("origin grpc 5 NOT_FOUND (no such greeting)"), app_error
    ok = plain(pretty_line(record(grpc_status=0, grpc_message=None), False))
    assert ok.endswith("origin grpc 0 OK")
    by_proxy = plain(
        pretty_line(
            record(
                source="proxy",
                error="connection_refused",
                grpc_status=14,
                grpc_message="faultline (proxy) answered: connection_refused",
            ),
            False,
        )
    )
    assert "grpc 14 UNAVAILABLE" in by_proxy and "(proxy) answered" not in by_proxy
