"""The access log: contract fields, batched writes, secrets never logged, pretty on a tty."""

from __future__ import annotations

import asyncio
import os
import pty
import subprocess

import aiohttp
import orjson
import pytest

from proxy.diagnosis.record import Exchange
from proxy.telemetry.accesslog import Clock, json_line_of, log_record, redact_target

from support import LOOPBACK, OriginConnection, free_port, read_terminal, spawn_proxy

FIELDS = {
    "time",
    "request_id",
    "method",
    "path",
    "status",
    "source",
    "layer",
    "error",
    "details",
    "upstream",
    "route",  # issue 21: the route that served it (null without routes)
    "client",
    "protocol",  # CONTRACT.md, "HTTP/2 and gRPC": http/1.1 | h2
    "bytes_in",
    "bytes_out",
    "duration_ms",
    "phases_ms",
    "reused",
    "retried",
    "hop",
    "hints",
}


async def echo_ok(conn: OriginConnection) -> None:
    while await conn.read_request():
        await conn.respond(200, b"hello")


async def test_json_line_has_every_contract_field(origin_factory, proxy_factory):
    origin = await origin_factory(echo_ok)
    proxy = await proxy_factory(origin.url)
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/items?x=1", data=b"abc") as resp:
            assert resp.status == 200
    record = await proxy.last_log()
    assert set(record) == FIELDS
    assert record["method"] == "POST" and record["path"] == "/items?x=1"
    assert (record["status"], record["source"], record["layer"]) == (200, "origin", "origin")
    assert (record["bytes_in"], record["bytes_out"]) == (3, 5)
    assert record["upstream"] == f"127.0.0.1:{origin.port}"
    assert record["client"] == "127.0.0.1"
    assert set(record["phases_ms"]) == {"wait", "dns", "connect", "tls", "queue", "ttfb", "body"}
    assert record["phases_ms"]["ttfb"] is not None and record["duration_ms"] > 0


async def test_lines_are_written_in_batches(origin_factory, proxy_factory):
    origin = await origin_factory(echo_ok)
    proxy = await proxy_factory(origin.url)
    writes = 0
    original = proxy.log.write

    def counting_write(b):
        nonlocal writes
        writes += 1
        return original(b)

    proxy.log.write = counting_write  # type: ignore[method-assign]
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            async with session.get(proxy.url + "/b") as resp:
                await resp.read()
    await proxy.settle()
    assert len(proxy.access_log()) == 200
    assert writes < 20, writes  # batches, never one write per exchange


async def test_secrets_never_reach_the_log_or_stats(origin_factory, proxy_factory):
    async def failing(conn: OriginConnection) -> None:
        while await conn.read_request():
            await conn.respond(500, b"boom", "Set-Cookie: session=SETCOOKIESECRET\r\n")

    origin = await origin_factory(failing)
    proxy = await proxy_factory(origin.url)
    headers = {"Authorization": "Bearer AUTHSECRET", "Cookie": "sid=COOKIESECRET"}
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/p?token=QUERYSECRET&page=2", headers=headers) as r:
            assert r.status == 500
    record = await proxy.last_log()
    assert record["path"] == "/p?token=REDACTED&page=2"
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.admin_url + "/stats") as r:
            stats_text = await r.text()
    logged = bytes(proxy.log.data).decode()
    for secret in ("AUTHSECRET", "COOKIESECRET", "SETCOOKIESECRET", "QUERYSECRET"):
        assert secret not in logged and secret not in stats_text


def pooled_ok_exchange(target: str) -> Exchange:
    ex = Exchange(5_000_000_000, "127.0.0.1", "127.0.0.1:8080")
    ex.request_id, ex.method, ex.target, ex.status = "abcd-00000001", "GET", target, 200
    ex.reused, ex.body_bytes_in, ex.body_bytes_out = True, 3, 12
    ex.t_sent = ex.t_start + 21_000
    ex.t_response_head = ex.t_sent + 1_234_567
    ex.t_end = ex.t_response_head + 1_000_000
    return ex


@pytest.mark.parametrize(
    "target",
    ["/", "/a?token=s3cret&page=2", '/q"uo\\te', "/caf\xe9", "/x?page=1"],
    ids=["root", "redacted", "quote-backslash", "latin1", "query"],
)
def test_the_common_line_is_the_contract_object(target):
    """The pooled, fault-free exchange's line is formatted directly, not via a dict: it must
    be the same JSON object `log_record` describes, and the shortcut must have been taken."""
    ex = pooled_ok_exchange(target)
    clock, secrets = Clock(), frozenset({"token"})
    line = json_line_of(ex, clock, secrets)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert orjson.loads(line) == log_record(ex, clock, secrets)
    assert b'"body":1.000}' in line  # %.3f, not orjson's "1.0": the shortcut was taken
    ex.hints = ("fault_behind_origin",)  # anything unusual takes the general path
    assert orjson.loads(json_line_of(ex, clock, secrets))["hints"] == ["fault_behind_origin"]


def test_the_remembered_middle_of_the_common_line_changes_with_what_it_depends_on():
    """The middle of the common line (method to client) is remembered per request: a repeat
    must still log its own id, bytes and times, and another redaction list, status, client
    or upstream must not reuse a line made for different ones. Over-long targets are not
    remembered but logged the same."""
    clock = Clock()
    for target in ("/m?token=one&page=2", "/long?" + "a=1&" * 400 + "token=x"):
        first, again = pooled_ok_exchange(target), pooled_ok_exchange(target)
        again.request_id, again.body_bytes_in, again.body_bytes_out = "abcd-00000002", 7, 99
        again.t_end += 2_000_000
        variants = [first, again]
        for field, value in (("status", 201), ("client", "10.0.0.9"), ("upstream", "up:81")):
            other = pooled_ok_exchange(target)
            setattr(other, field, value)
            variants.append(other)
        for secrets in (frozenset({"token"}), frozenset(), frozenset({"page"})):
            for ex in variants * 2:  # the second round is served from the memo
                line = json_line_of(ex, clock, secrets)
                assert orjson.loads(line) == log_record(ex, clock, secrets), (target, secrets)
    assert b"one" not in json_line_of(
        pooled_ok_exchange("/m?token=one"), clock, frozenset({"token"})
    )


def test_redaction_keeps_other_parameters():
    secrets = frozenset({"token", "api_key"})
    assert redact_target("/a?x=1&API_KEY=k&y=2", secrets) == "/a?x=1&API_KEY=REDACTED&y=2"
    assert redact_target("/a?x=1", secrets) == "/a?x=1"
    assert redact_target("/a", secrets) == "/a"


def test_terminal_gets_one_readable_coloured_line_with_the_fault_and_its_hint():
    """The proxy as a process with stdout on a pseudo-terminal: `log.format: auto`."""
    master, slave = pty.openpty()
    dead_port = free_port()
    proxy = spawn_proxy(f"http://{LOOPBACK}:{dead_port}", stdout=slave)
    os.close(slave)
    try:
        subprocess.run(
            ["curl", "-s", "-o", "/dev/null", f"{proxy.url}/dev/page"], timeout=10, check=False
        )
        output = read_terminal(
            master, lambda out: b"\n" in out.partition(b"connection_refused")[2], 5
        )
    finally:
        proxy.stop()
        os.close(master)
    text = output.decode(errors="replace")
    assert "\x1b[" in text  # coloured
    line = next(line for line in text.splitlines() if "/dev/page" in line)
    assert "502" in line and "GET" in line and "PROXY" in line and "connection_refused" in line
    assert not line.lstrip().startswith("{")  # not JSON
    assert "is the upstream process running" in text or "listening" in text  # the hint


async def test_quiet_writes_no_access_log(origin_factory):
    origin = await origin_factory(echo_ok)
    read_fd, write_fd = os.pipe()
    proxy = spawn_proxy(origin.url, "--quiet", stdout=write_fd)
    os.close(write_fd)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(proxy.url + "/q") as resp:
                assert resp.status == 200
        await asyncio.sleep(0.5)
    finally:
        proxy.stop()
    with os.fdopen(read_fd, "rb") as pipe:
        assert pipe.read() == b""
