"""Real parts for the tests: a byte-level scripted origin, the proxy in-process or as a
process, and a raw HTTP client. Everything listens on 127.0.0.1, port 0.

Rules: no mocks of the network; every wait is bounded; processes are stopped by PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
import orjson
import pytest

from proxy.cli import compiled
from proxy.config import load_config
from proxy.server import ProxyServer

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"


# -- the proxy --------------------------------------------------------------------------------


class LogCapture(io.RawIOBase):
    """A binary stream that keeps what the access log writes."""

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.data += bytes(b)
        return len(b)

    def lines(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in bytes(self.data).splitlines() if line.strip()]


# For the few tests that patch a method of a per-exchange module to inject a defect or count
# calls: compiled (mypyc) code calls its methods directly, past the patch. .ci/run runs the
# suite on both builds, so these still run on every change.
interpreted_only = pytest.mark.skipif(
    compiled(), reason="patches a method that the compiled data plane calls directly"
)


def dotted(overrides: dict[str, Any]) -> dict[tuple[str, ...], Any]:
    return {tuple(key.split(".")): value for key, value in overrides.items()}


@dataclass
class RunningProxy:
    server: ProxyServer
    log: LogCapture

    @property
    def port(self) -> int:
        assert self.server.listen_address is not None
        return self.server.listen_address[1]

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def admin_url(self) -> str:
        assert self.server.admin_address is not None
        return f"http://{LOOPBACK}:{self.server.admin_address[1]}"

    @property
    def stats(self) -> Any:
        """The proxy's stats, with every exchange finished so far settled into them."""
        assert self.server.ctx is not None
        self.server.settle()
        return self.server.telemetry.stats

    @property
    def pool(self) -> Any:
        assert self.server.ctx is not None
        return self.server.ctx.pool

    def access_log(self) -> list[dict[str, Any]]:
        telemetry = self.server.telemetry
        assert telemetry is not None and telemetry.access_log is not None
        telemetry.settle()
        return self.log.lines()

    async def settle(self, timeout: float = 5.0) -> None:
        """Wait until no exchange is in flight (the proxy has recorded everything)."""
        deadline = time.monotonic() + timeout
        while self.stats.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert self.stats.in_flight == 0, f"{self.stats.in_flight} exchanges still in flight"

    async def last_log(self, timeout: float = 5.0) -> dict[str, Any]:
        await self.settle(timeout)
        lines = self.access_log()
        assert lines, "no access-log line"
        return lines[-1]


async def start_proxy(upstream: str, **overrides: Any) -> RunningProxy:
    """The proxy in this process and loop, on 127.0.0.1 ports chosen by the kernel.

    Overrides use dotted keys: start_proxy(url, **{"timeouts.connect": "1s"}).
    """
    flags = {
        ("listen",): f"{LOOPBACK}:0",
        ("admin", "listen"): f"{LOOPBACK}:0",
        ("upstream",): upstream,
        ("log", "format"): "json",
    }
    flags.update(dotted(overrides))
    config = load_config(env={}, flags=flags)
    capture = LogCapture()
    server = ProxyServer(config, access_stream=capture)
    await server.start()
    return RunningProxy(server, capture)


# -- a byte-level origin ---------------------------------------------------------------------

Script = Callable[["OriginConnection"], Awaitable[None]]


@dataclass
class OriginConnection:
    """One accepted connection of a scripted origin, with helpers to misbehave on it."""

    index: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    origin: ScriptedOrigin

    async def read_request(self, timeout: float = 5.0) -> bytes | None:
        """One whole request (head and body); None at EOF."""
        try:
            head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        body = b""
        lower = head.lower()
        if b"transfer-encoding: chunked" in lower:
            while True:
                size_line = await self.reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                chunk = await self.reader.readexactly(size + 2)
                body += chunk[:-2]
                if size == 0:
                    break
        elif b"content-length:" in lower:
            length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
            body = await self.reader.readexactly(length)
        request = head + body
        self.origin.requests.append(request)
        return request

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    async def respond(self, status: int = 200, body: bytes = b"ok", headers: str = "") -> None:
        self.write(
            f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body
        )
        await self.drain()

    def close(self) -> None:
        self.writer.close()

    def reset(self) -> None:
        """Abort with a TCP RST (SO_LINGER 0)."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def hold(self, seconds: float = 30.0) -> None:
        """Keep the connection open without sending, until the peer leaves or time is up."""
        with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
            await asyncio.wait_for(self.reader.read(), seconds)


@dataclass
class ScriptedOrigin:
    """An origin whose every connection runs `script`; counts connections and requests."""

    script: Script
    ssl: Any = None
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    server: asyncio.AbstractServer | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> ScriptedOrigin:
        self.server = await asyncio.start_server(self._accept, LOOPBACK, 0, ssl=self.ssl)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl else 'http'}://{LOOPBACK}:{self.port}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.connections
        self.connections += 1
        conn = OriginConnection(index, reader, writer, self)
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)  # type: ignore[arg-type]
        try:
            await self.script(conn)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.tasks.discard(task)  # type: ignore[arg-type]
            if not writer.transport.is_closing():
                writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.sleep(0)


# -- a raw client ------------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    complete: bool = True

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return ", ".join(values) if values else None

    def json(self) -> Any:
        return orjson.loads(self.body)


class _ResponseCollector:
    def __init__(self, head_request: bool = False) -> None:
        self.responses: list[Response] = []
        self.head_request = head_request
        self._headers: list[tuple[str, str]] = []
        self._body = bytearray()
        self.parser = httptools.HttpResponseParser(self)
        self.in_message = False

    def on_message_begin(self) -> None:
        self._headers = []
        self._body = bytearray()
        self.in_message = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self.in_message = False
        status = self.parser.get_status_code()
        self.responses.append(Response(status, self._headers, bytes(self._body)))


def parse_responses(data: bytes, *, eof: bool = True) -> tuple[list[Response], bool]:
    """Every complete response in `data`; and whether bytes of an unfinished one remain.

    With `eof`, a last response framed by the end of the connection (no Content-Length,
    not chunked) is complete, as RFC 9112 §6.3 says.
    """
    collector = _ResponseCollector()
    with contextlib.suppress(httptools.HttpParserError, httptools.HttpParserUpgrade):
        collector.parser.feed_data(data)
    if eof and collector.in_message:
        framing = {name.lower() for name, _ in collector._headers}
        if framing.isdisjoint({"content-length", "transfer-encoding"}):
            collector.on_message_complete()
    return collector.responses, collector.in_message


def proxy_status_members(value: str) -> list[str]:
    """Split a Proxy-Status list into members (commas inside quoted strings stay)."""
    members, current, quoted, escaped = [], [], False, False
    for ch in value:
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            members.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    members.append("".join(current).strip())
    return members


async def raw_request(
    port: int, data: bytes, *, timeout: float = 10.0, half_close: bool = False
) -> bytes:
    """Send raw bytes, read until the server closes (or the timeout); return what came."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write(data)
    if half_close:
        writer.write_eof()
    received = bytearray()
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                received += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    finally:
        writer.close()
    return bytes(received)


async def read_until_reset(
    reader: asyncio.StreamReader, timeout: float = 10.0
) -> tuple[bytes, str]:
    """Read everything; return (bytes, how it ended: 'eof' | 'reset' | 'timeout')."""
    received = bytearray()
    try:
        async with asyncio.timeout(timeout):
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return bytes(received), "eof"
                received += chunk
    except ConnectionResetError:
        return bytes(received), "reset"
    except TimeoutError:
        return bytes(received), "timeout"


# -- the proxy as a process --------------------------------------------------------------------


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ports below the ephemeral range: the kernel never gives one to an outgoing connection (a
# proxy's upstream, pip, a browser) between the moment a test picks it and the moment its
# server binds it, as it can with a port from bind(("127.0.0.1", 0)).
_PORTS = range(max(1024, _ephemeral_low() - 12000), _ephemeral_low())
_handed_out: set[int] = set()


def free_port() -> int:
    """A port free on 127.0.0.1 now, and never handed out before in this test run (two
    calls in a row cannot return the same port)."""
    for _ in range(500):
        port = random.choice(_PORTS)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port on {LOOPBACK} in {_PORTS.start}-{_PORTS.stop - 1}")


def read_terminal(master: int, done: Callable[[bytes], bool], timeout_s: float) -> bytes:
    """What a process wrote to a pseudo-terminal, read until `done(output)` or the timeout."""
    output = b""
    deadline = time.monotonic() + timeout_s
    while not done(output) and time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            output += os.read(master, 65536)
    return output


@dataclass
class ProxyProcess:
    proc: subprocess.Popen[bytes]
    port: int
    admin_port: int

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}"

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def peak_rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def spawn_proxy(
    upstream: str,
    *args: str,
    env: dict[str, str] | None = None,
    stdout: Any = subprocess.DEVNULL,
    wait: bool = True,
) -> ProxyProcess:
    """`python -m proxy serve` as a child process, waiting until its admin port answers."""
    port, admin_port = free_port(), free_port()
    cmd = [
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--upstream",
        upstream,
        "--listen",
        f"{LOOPBACK}:{port}",
        "--admin",
        f"{LOOPBACK}:{admin_port}",
        *args,
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=stdout,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    proxy = ProxyProcess(proc, port, admin_port)
    if wait:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"proxy exited: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
            with (
                contextlib.suppress(OSError),
                socket.create_connection((LOOPBACK, admin_port), 0.2),
            ):
                return proxy
            time.sleep(0.05)
        proxy.stop(signal.SIGKILL)
        raise RuntimeError("proxy did not start in 15 s")
    return proxy


# -- the words of a detail -----------------------------------------------------------------------

# The setting each timeout fault names, with its configured value, in its detail.
TIMEOUT_SETTINGS = {
    "http_response_timeout": "timeouts.response_headers",
    "connection_read_timeout": "timeouts.upstream_read",
    "connection_timeout": "timeouts.connect",
    "dns_timeout": "timeouts.dns",
    "connection_limit_reached": "timeouts.pool_wait",
}


def check_detail(detail: str, advice: str = "", meaning: str = "") -> None:
    """A fault's detail is one sentence of fact: no bracket inside a bracket, no phrase
    said twice, neither the row's advice nor its meaning pasted in."""
    depth = 0
    for char in detail:
        depth += char == "("
        depth -= char == ")"
        assert 0 <= depth <= 1, f"nested or unbalanced brackets: {detail!r}"
    assert depth == 0, f"unbalanced brackets: {detail!r}"
    words = re.findall(r"[\w.]+", detail.lower())
    runs = [" ".join(words[i : i + 4]) for i in range(len(words) - 3)]
    assert len(runs) == len(set(runs)), f"a phrase said twice: {detail!r}"
    for text in (advice, meaning):
        if text:
            assert text not in detail, f"{detail!r} repeats {text!r}"
            if len(words) >= 4:
                assert detail not in text, f"{detail!r} repeats {text!r}"
    assert "\n" not in detail


async def curl(*args: str) -> tuple[int, bytes, bytes]:
    """curl with `args` (silent but for errors, 10 s at most): exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        "curl", "-s", "-S", "--max-time", "10", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    return proc.returncode or 0, out, err


async def held_in_io_callback(seconds: float) -> None:
    """Hold the running loop for `seconds` inside an I/O callback (as a slow
    `data_received` would): when it returns, libuv runs the timers that fell due before it
    polls for I/O again."""
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    done = loop.create_future()

    def held() -> None:
        loop.remove_reader(a.fileno())
        time.sleep(seconds)
        done.set_result(None)

    loop.add_reader(a.fileno(), held)
    b.send(b"x")
    await done
    a.close()
    b.close()


def load_bench_module(name: str) -> Any:
    """bench/NAME.py, imported as a module (bench/ is scripts, not a package)."""
    path = ROOT / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
