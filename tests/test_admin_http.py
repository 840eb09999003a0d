"""The admin port's HTTP/1.1 (proxy/admin/listener.py) over real sockets: HEAD, methods, bad and
oversized heads, bodies, keep-alive and pipelining, closing, deadlines, the connection cap,
a client that does not read, and a `faultline serve` process that never imports aiohttp."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import orjson
import pytest

from proxy.admin.listener import MAX_CONNECTIONS, MAX_HEAD_BYTES, AdminListener, AdminRequest

from support import LOOPBACK, ROOT, free_port

NOWHERE = f"http://{LOOPBACK}:9"  # no origin is needed to talk to the admin port


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes

    def json(self) -> dict:
        return orjson.loads(self.body)


async def read_answer(
    reader: asyncio.StreamReader, *, head_only: bool = False, timeout: float = 5.0
) -> Answer:
    """One response, framed by its Content-Length (which every admin answer must carry)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    status_line, *fields = head.decode("latin-1").split("\r\n")
    version, status, _ = status_line.split(" ", 2)
    assert version == "HTTP/1.1", status_line
    headers = {}
    for field in filter(None, fields):
        name, _, value = field.partition(":")
        headers[name.lower()] = value.strip()
    length = int(headers["content-length"])
    body = b"" if head_only else await asyncio.wait_for(reader.readexactly(length), timeout)
    return Answer(int(status), headers, body)


async def rest(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """Everything until the server closes (a reset counts as a close)."""
    received = bytearray()
    with contextlib.suppress(ConnectionResetError):
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                received += chunk
    return bytes(received)


def get(path: str, *extra: str, method: str = "GET", version: str = "1.1") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: admin", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@contextlib.asynccontextmanager
async def connection(port: int):
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        yield reader, writer
    finally:
        writer.close()


@pytest.fixture
async def admin_port(proxy_factory) -> int:
    proxy = await proxy_factory(NOWHERE)
    return proxy.server.admin_address[1]


async def test_head_is_get_without_the_body(admin_port):
    async with connection(admin_port) as (reader, writer):
        for path in ("/healthz", "/faults", "/dashboard", "/faults?lang=fr"):
            writer.write(get(path, method="HEAD") + get(path))
            head = await read_answer(reader, head_only=True)
            # The GET's status line must follow the HEAD's blank line at once.
            full = await read_answer(reader)
            assert head.status == full.status and full.body, path
            assert head.headers["content-length"] == str(len(full.body)), path
            assert head.headers["content-type"] == full.headers["content-type"], path
            assert head.headers["date"].endswith(" GMT"), path


async def test_content_types(admin_port):
    async with connection(admin_port) as (reader, writer):
        expected = {
            "/healthz": "text/plain; charset=utf-8",
            "/stats": "application/json",
            "/dashboard": "text/html; charset=utf-8",
            "/metrics": "text/plain; version=0.0.4; charset=utf-8",
            "/nope": "application/problem+json",
        }
        for path, content_type in expected.items():
            writer.write(get(path))
            answer = await read_answer(reader)
            assert answer.headers["content-type"] == content_type, path
        writer.write(get("/"))
        answer = await read_answer(reader)
        assert (answer.status, answer.headers["location"]) == (302, "/dashboard")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
async def test_other_methods_get_405_with_allow(admin_port, method):
    async with connection(admin_port) as (reader, writer):
        writer.write(get("/stats", "Content-Length: 0", method=method) + get("/healthz"))
        answer = await read_answer(reader)
        assert answer.status == 405
        assert answer.headers["allow"] == "GET, HEAD"
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.json()["detail"] == f"{method} /stats: method not allowed"
        assert "connection" not in answer.headers
        assert (await read_answer(reader)).body == b"ok\n"  # the connection stays usable


@pytest.mark.parametrize(
    "bad",
    [
        b"GARBAGE / HTTP/1.1\r\nHost: admin\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: admin\r\nBad Header: x\r\n\r\n",
        b"GET /healthz\r\n\r\n",  # HTTP/0.9
        b"CONNECT admin:443 HTTP/1.1\r\nHost: admin\r\n\r\n",
    ],
    ids=["request-line", "no-host", "two-hosts", "header-name", "http09", "connect"],
)
async def test_a_malformed_request_is_400_after_the_good_ones_then_close(admin_port, bad):
    async with connection(admin_port) as (reader, writer):
        writer.write(get("/healthz") + bad + get("/readyz"))
        assert (await read_answer(reader)).body == b"ok\n"
        answer = await read_answer(reader)
        assert answer.status == 400
        assert answer.headers["connection"] == "close"
        assert answer.json()["type"] == "urn:faultline:admin:bad-request"
        assert await rest(reader) == b""  # nothing after a broken head is answered


async def test_an_oversized_head_is_431_then_close(admin_port):
    big = "X-Big: " + "a" * MAX_HEAD_BYTES
    async with connection(admin_port) as (reader, writer):
        writer.write(get("/healthz", big) + get("/readyz"))
        answer = await read_answer(reader)
        assert answer.status == 431 and answer.headers["connection"] == "close"
        assert await rest(reader) == b""
    async with connection(admin_port) as (reader, writer):
        writer.write(get("/" + "a" * MAX_HEAD_BYTES))
        assert (await read_answer(reader)).status == 431


async def test_a_head_trickled_past_the_limit_is_431(admin_port):
    """One header value that never ends, a KiB a read: the parser holds it unfinished, so
    only the bytes read count against the limit."""
    async with connection(admin_port) as (reader, writer):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: admin\r\nX-Endless: ")
        await asyncio.sleep(0.05)
        for _ in range(MAX_HEAD_BYTES // 1024 + 1):
            writer.write(b"a" * 1024)
            await writer.drain()
            await asyncio.sleep(0.01)
        answer = await read_answer(reader)
        assert answer.status == 431
        assert await rest(reader) == b""


@pytest.mark.parametrize(
    ("method", "framing"),
    [("POST", "Content-Length"), ("POST", "Transfer-Encoding"), ("GET", "Content-Length")],
    ids=["content-length", "chunked", "get-with-body"],
)
async def test_a_request_with_a_body_is_413_then_close(admin_port, method, framing):
    # The body is itself a request: it must never be answered.
    smuggled = get("/readyz")
    value = str(len(smuggled)) if framing == "Content-Length" else "chunked"
    async with connection(admin_port) as (reader, writer):
        writer.write(get("/healthz", f"{framing}: {value}", method=method) + smuggled)
        answer = await read_answer(reader)
        assert answer.status == 413
        assert answer.headers["connection"] == "close"
        assert answer.headers["content-type"] == "application/problem+json"
        assert await rest(reader) == b""


async def test_keep_alive_and_pipelining(admin_port):
    async with connection(admin_port) as (reader, writer):
        writer.write(get("/healthz"))
        first = await read_answer(reader)
        writer.write(get("/readyz"))
        second = await read_answer(reader)
        assert (first.body, second.body) == (b"ok\n", b"ready\n")
        assert "connection" not in first.headers and "connection" not in second.headers
        # Pipelined in one write: answered in order.
        writer.write(get("/readyz") + get("/nope") + get("/healthz") + get("/faults?x=1"))
        answers = [await read_answer(reader) for _ in range(4)]
        assert [a.status for a in answers] == [200, 404, 200, 400]
        assert [answers[0].body, answers[2].body] == [b"ready\n", b"ok\n"]


async def test_connection_close_is_honoured(admin_port):
    async with connection(admin_port) as (reader, writer):
        writer.write(get("/healthz", "Connection: close") + get("/readyz"))
        answer = await read_answer(reader)
        assert answer.body == b"ok\n" and answer.headers["connection"] == "close"
        assert await rest(reader) == b""


async def test_http10_closes_unless_asked_to_keep_alive(admin_port):
    async with connection(admin_port) as (reader, writer):
        writer.write(get("/healthz", version="1.0"))
        answer = await read_answer(reader)
        assert answer.body == b"ok\n" and answer.headers["connection"] == "close"
        assert await rest(reader) == b""
    async with connection(admin_port) as (reader, writer):
        writer.write(get("/healthz", "Connection: keep-alive", version="1.0"))
        answer = await read_answer(reader)
        assert answer.headers["connection"] == "keep-alive"
        writer.write(get("/readyz", version="1.0"))
        assert (await read_answer(reader)).body == b"ready\n"
        assert await rest(reader) == b""


async def test_a_client_that_half_closes_still_gets_its_answers(admin_port):
    async with connection(admin_port) as (reader, writer):
        writer.write(get("/healthz") + get("/faults") * 200 + get("/readyz"))
        writer.write_eof()
        await asyncio.sleep(0.2)
        assert (await read_answer(reader)).body == b"ok\n"
        assert len({(await read_answer(reader)).body for _ in range(200)}) == 1
        assert (await read_answer(reader)).body == b"ready\n"
        assert await rest(reader) == b""


async def test_a_slow_head_gets_408_and_an_idle_connection_is_closed(proxy_factory):
    proxy = await proxy_factory(
        NOWHERE, **{"timeouts.client_headers": "300ms", "timeouts.keepalive": "600ms"}
    )
    port = proxy.server.admin_address[1]
    async with connection(port) as (reader, writer):
        started = time.monotonic()
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: adm")
        answer = await read_answer(reader, timeout=3)
        assert answer.status == 408 and answer.headers["connection"] == "close"
        assert await rest(reader, timeout=3) == b""
        assert 0.25 < time.monotonic() - started < 2.5
    # Connected and silent: closed after client_headers, with nothing to answer.
    async with connection(port) as (reader, _):
        started = time.monotonic()
        assert await rest(reader, timeout=3) == b""
        assert 0.25 < time.monotonic() - started < 2.5
    # Idle between requests: closed after keepalive, not client_headers.
    async with connection(port) as (reader, writer):
        writer.write(get("/healthz"))
        await read_answer(reader)
        answered = time.monotonic()
        assert await rest(reader, timeout=3) == b""
        assert 0.5 < time.monotonic() - answered < 2.5


async def test_connections_over_the_cap_are_dropped_unread(admin_port):
    held = []
    try:
        for _ in range(MAX_CONNECTIONS):
            reader, writer = await asyncio.open_connection(LOOPBACK, admin_port)
            held.append(writer)
            writer.write(get("/healthz"))
            assert (await read_answer(reader)).status == 200
        async with connection(admin_port) as (reader, writer):
            writer.write(get("/healthz"))
            assert await rest(reader, timeout=3) == b""
        held.pop().close()
        await asyncio.sleep(0.1)
        async with connection(admin_port) as (reader, writer):
            writer.write(get("/healthz"))
            assert (await read_answer(reader)).body == b"ok\n"
    finally:
        for writer in held:
            writer.close()


async def test_a_client_that_does_not_read_stops_being_read(proxy_factory):
    """Thousands of pipelined requests for a 10 KB document, and no reading: the server
    holds at most about a write buffer of answers, not all of them."""
    proxy = await proxy_factory(NOWHERE)
    port = proxy.server.admin_address[1]
    count = 3000  # ~30 MB of answers
    async with connection(port) as (reader, writer):
        writer.write(b"".join(get("/faults" if i % 2 else "/healthz") for i in range(count)))
        await asyncio.sleep(0.5)
        (conn,) = proxy.server._admin.connections
        assert conn.pending, "every request was answered at once: nothing held back"
        assert conn.transport.get_write_buffer_size() < 512 * 1024
        answers = [await read_answer(reader) for _ in range(count)]
        assert [a.body == b"ok\n" for a in answers] == [i % 2 == 0 for i in range(count)]
        assert len({a.body for a in answers[1::2]}) == 1


async def test_cleanup_closes_the_listener_and_every_connection(proxy_factory):
    proxy = await proxy_factory(NOWHERE)
    port = proxy.server.admin_address[1]
    async with connection(port) as (reader, writer):
        writer.write(get("/healthz"))
        await read_answer(reader)
        await proxy.server.close()
        assert await rest(reader, timeout=3) == b""
    with pytest.raises(OSError):
        await asyncio.open_connection(LOOPBACK, port)


async def test_a_defect_in_the_handler_is_a_500_problem(caplog):
    def handler(request: AdminRequest):
        raise RuntimeError(f"defect on {request.path}")

    listener = AdminListener(handler, client_headers_s=5, keepalive_s=5)
    _, port = await listener.listen(LOOPBACK, 0)
    try:
        with caplog.at_level(logging.ERROR, logger="faultline"):
            async with connection(port) as (reader, writer):
                writer.write(get("/boom") + get("/boom", "Connection: close"))
                answer = await read_answer(reader)
                assert answer.status == 500 and "connection" not in answer.headers
                assert answer.json()["type"] == "urn:faultline:admin:internal-error"
                assert "defect" not in answer.body.decode()  # the log has it, not the client
                # Handlers share no state with the connection: it stays usable.
                assert (await read_answer(reader)).status == 500
                assert await rest(reader) == b""
        assert "defect on /boom" in caplog.text
    finally:
        await listener.cleanup()


# -- no aiohttp in the serving process --------------------------------------------------------

# `faultline serve` as `proxy.cli.main` in a fresh interpreter that notes every module
# imported from the start; it reports them when it exits after SIGTERM.
WATCHED_SERVE = """
import atexit, json, sys

class Watch:
    imported = []

    def find_spec(self, name, path=None, target=None):
        Watch.imported.append(name)
        return None

sys.meta_path.insert(0, Watch())

def report():
    print(json.dumps({"imported": Watch.imported, "modules": sorted(sys.modules)}),
          file=sys.stderr)

atexit.register(report)
from proxy.cli import main
sys.exit(main(sys.argv[1:]))
"""


async def test_faultline_serve_never_imports_aiohttp():
    port, admin = free_port(), free_port()
    args = ["serve", "--upstream", NOWHERE, "--listen", f"{LOOPBACK}:{port}"]
    args += ["--admin", f"{LOOPBACK}:{admin}", "--log-format", "json"]
    proc = subprocess.Popen(
        [sys.executable, "-c", WATCHED_SERVE, *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, "faultline serve exited early"
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, admin), 0.2):
                break
            assert time.monotonic() < deadline, "faultline serve did not start"
            await asyncio.sleep(0.05)
        # Every endpoint answers, so whatever each one imports has been imported.
        async with connection(admin) as (reader, writer):
            for path in ("/healthz", "/readyz", "/stats", "/metrics", "/faults", "/series",
                         "/latency", "/dashboard", "/nope"):  # fmt: skip
                writer.write(get(path))
                assert (await read_answer(reader)).status in (200, 404), path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.to_thread(proc.communicate, timeout=15)
    assert proc.returncode == 0, stderr.decode()
    report = json.loads(stderr.decode().strip().splitlines()[-1])
    # The watch saw the serving process import its own modules and its parser...
    assert {"proxy.server", "proxy.admin", "proxy.admin.listener", "httptools"} <= set(
        report["imported"]
    )
    # ...and never aiohttp, nor anything aiohttp is built on.
    foreign = ("aiohttp", "yarl", "multidict", "aiosignal", "frozenlist")
    assert [m for m in report["imported"] if m.split(".")[0] in foreign] == []
    assert [m for m in report["modules"] if m.split(".")[0] in foreign] == []
