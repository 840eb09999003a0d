"""Helpers for the hardening, slow-client, fuzz, hostile-upstream and soak tests: an origin
that records every byte it receives and parses it strictly, a raw one-shot client, and
/proc readings of a proxy process.

Rules: everything listens on 127.0.0.1; every wait is bounded; nothing here is a mock.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httptools

from support import LOOPBACK, read_until_reset

# Fragments no body the proxy makes may ever contain: a traceback, a source file, our paths.
LEAK_MARKERS = (b"Traceback", b'File "', b".py", b"/work/", b"site-packages", b"proxy/")


def raise_fd_limit(wanted: int = 8192) -> int:
    """Raise this process's soft open-file limit towards `wanted` (never above the hard
    limit); children inherit it. Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- an origin that records what reached it ------------------------------------------------------


@dataclass
class Received:
    """One request as the origin parsed it (llhttp, strict)."""

    method: bytes
    target: bytes
    version: str
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return b", ".join(values) if values else None

    def names(self) -> list[bytes]:
        return [k.lower() for k, _ in self.headers]


class _OriginConn(asyncio.Protocol):
    def __init__(self, origin: RecordingOrigin) -> None:
        self.origin = origin
        self.raw = bytearray()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: Any = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body = bytearray()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if self.origin.keep:
            self.origin.connections.append(self)
        self.origin.accepted += 1
        self.origin.live.add(self)
        self.origin.open += 1
        self.origin.max_open = max(self.origin.max_open, self.origin.open)

    def connection_lost(self, exc: Exception | None) -> None:
        self.origin.open -= 1
        self.origin.live.discard(self)

    def data_received(self, data: bytes) -> None:
        if self.origin.keep:
            self.raw += data
        if self.origin.hold:
            return
        while data:
            try:
                self.parser.feed_data(data)
                return
            except httptools.HttpParserUpgrade as exc:
                # Like most application servers, this origin never switches protocols: it
                # answered the request (on_message_complete) and reads on as HTTP/1.1.
                data = data[exc.args[0] :]
                self.parser = httptools.HttpRequestParser(self)
            except httptools.HttpParserError as exc:
                self.origin.parse_errors.append((bytes(self.raw[:2000]), repr(exc)))
                self.transport.close()
                return

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._body = bytearray()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        request = Received(
            self.parser.get_method(),
            self._url,
            self.parser.get_http_version(),
            self._headers,
            bytes(self._body),
        )
        if self.origin.keep:
            self.origin.requests.append(request)
        self.origin.served += 1
        reply = self.origin.respond(request, self)
        if reply is not None and not self.transport.is_closing():
            self.transport.write(reply)


OK_REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nContent-Type: text/plain\r\n\r\nfrom-app!"


@dataclass
class RecordingOrigin:
    """An origin that keeps every raw byte per connection, parses requests with llhttp and
    answers each with `respond(request, connection)` (default: 200 `from-app!`, keep-alive).

    `parse_errors` lists what the proxy sent that llhttp refused: it must stay empty."""

    respond: Callable[[Received, _OriginConn], bytes | None] = lambda request, conn: OK_REPLY
    hold: bool = False  # accept and read, never answer
    keep: bool = True  # keep every parsed request in `requests` (off for long runs)
    served: int = 0
    accepted: int = 0
    live: set[_OriginConn] = field(default_factory=set)
    connections: list[_OriginConn] = field(default_factory=list)
    requests: list[Received] = field(default_factory=list)
    parse_errors: list[tuple[bytes, str]] = field(default_factory=list)
    open: int = 0
    max_open: int = 0
    server: asyncio.AbstractServer | None = None

    async def start(self, port: int = 0) -> RecordingOrigin:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _OriginConn(self), LOOPBACK, port)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def received_bytes(self) -> bytes:
        return b"".join(bytes(c.raw) for c in self.connections)

    def clear(self) -> None:
        self.connections.clear()
        self.requests.clear()
        self.parse_errors.clear()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in list(self.live):
            if conn.transport is not None:
                conn.transport.abort()
        await asyncio.sleep(0)


# -- a raw client -----------------------------------------------------------------------------


async def send_raw(port: int, data: bytes, timeout: float = 5.0) -> tuple[bytes, str]:
    """Send `data` on a new connection and read until the proxy closes it (or `timeout`):
    (bytes received, 'eof' | 'reset' | 'timeout')."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(data)
        return await read_until_reset(reader, timeout)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


class ResponseReader:
    """Reads responses one at a time off a keep-alive connection (llhttp, strict)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.parser = httptools.HttpResponseParser(self)
        self.done: list[tuple[int, list[tuple[bytes, bytes]], bytes]] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._body = bytearray()

    def on_message_begin(self) -> None:
        self._headers = []
        self._body = bytearray()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self.done.append((self.parser.get_status_code(), self._headers, bytes(self._body)))

    async def next(self, timeout: float = 10.0) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        async with asyncio.timeout(timeout):
            while not self.done:
                chunk = await self.reader.read(65536)
                if not chunk:
                    raise ConnectionResetError("closed before a complete response")
                self.parser.feed_data(chunk)
        return self.done.pop(0)


def header_of(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def vm_rss(pid: int) -> int:
    """A process's resident set (VmRSS in /proc/PID/status), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
