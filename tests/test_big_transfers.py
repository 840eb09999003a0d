"""1 GiB each way through the proxy process with its RSS under 80 MB: bodies stream with
back-pressure (the proxy pauses the sending side while the receiving side is full)."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from support import LOOPBACK, OriginConnection, ScriptedOrigin, spawn_proxy

GIB = 1 << 30
BLOCK = bytes(range(256)) * 4096  # 1 MiB
RSS_LIMIT = 80 * 1024 * 1024


async def big_origin(conn: OriginConnection) -> None:
    while True:
        try:
            head = await conn.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        if head.startswith(b"GET /download"):
            conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % GIB)
            for _ in range(GIB // len(BLOCK)):
                conn.write(BLOCK)
                await conn.writer.drain()
        else:
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            received = 0
            while received < length:
                chunk = await conn.reader.read(min(1 << 20, length - received))
                if not chunk:
                    return
                received += len(chunk)
            await conn.respond(200, str(received).encode())


@pytest.fixture
async def big_proxy():
    origin = await ScriptedOrigin(big_origin).start()
    proxy = spawn_proxy(origin.url, env={"FAULTLINE_LOG_ACCESS": "false"})
    yield proxy
    proxy.stop()
    await origin.close()


async def test_one_gib_download_streams_in_bounded_memory(big_proxy):
    reader, writer = await asyncio.open_connection(LOOPBACK, big_proxy.port)
    writer.write(b"GET /download HTTP/1.1\r\nHost: a\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    received = 0
    async with asyncio.timeout(120):
        while received < GIB:
            chunk = await reader.read(1 << 20)
            assert chunk, "connection closed early"
            received += len(chunk)
    writer.close()
    assert received == GIB
    assert big_proxy.peak_rss_bytes() < RSS_LIMIT, big_proxy.peak_rss_bytes()


async def test_one_gib_upload_streams_in_bounded_memory(big_proxy):
    reader, writer = await asyncio.open_connection(LOOPBACK, big_proxy.port)
    writer.write(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % GIB)
    async with asyncio.timeout(120):
        for _ in range(GIB // len(BLOCK)):
            writer.write(BLOCK)
            await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        body = await reader.read(64)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200")
    assert body == str(GIB).encode()
    assert big_proxy.peak_rss_bytes() < RSS_LIMIT, big_proxy.peak_rss_bytes()


# -- the same over HTTP/2 (curl with prior knowledge: a client that keeps up) -------------------


async def _curl(*args: str) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-s", "-S", "--http2-prior-knowledge", "--max-time", "150", *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    return out


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_one_gib_download_over_http2_streams_in_bounded_memory(big_proxy):
    out = await _curl(
        "-o", "/dev/null", "-w", "%{http_version} %{http_code} %{size_download}",
        f"http://{LOOPBACK}:{big_proxy.port}/download",
    )  # fmt: skip
    assert out.split() == [b"2", b"200", str(GIB).encode()]
    assert big_proxy.peak_rss_bytes() < RSS_LIMIT, big_proxy.peak_rss_bytes()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_one_gib_upload_over_http2_streams_in_bounded_memory(big_proxy, tmp_path):
    upload = tmp_path / "gib"
    with upload.open("wb") as f:
        f.truncate(GIB)  # sparse: no disk written, reads as zeros
    out = await _curl(
        "-T", str(upload), "-w", " %{http_version} %{http_code}",
        f"http://{LOOPBACK}:{big_proxy.port}/upload",
    )  # fmt: skip
    assert out.split() == [str(GIB).encode(), b"2", b"200"]
    assert big_proxy.peak_rss_bytes() < RSS_LIMIT, big_proxy.peak_rss_bytes()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_one_gib_download_h2_to_h2_streams_in_bounded_memory(h2_server):
    """HTTP/2 on both sides (an h2c:// origin on the h2 library): each side's window holds
    the other back, and the proxy's memory stays flat."""

    async def stream_gib(conn, sid, head, body) -> None:
        h2 = conn.h2
        h2.send_headers(sid, [(b":status", b"200"), (b"content-length", b"%d" % GIB)])
        sent = 0
        while sent < GIB:
            size = min(h2.local_flow_control_window(sid), h2.max_outbound_frame_size, GIB - sent)
            if size <= 0:
                conn.flush()
                conn.window.clear()
                await conn.window.wait()
                continue
            h2.send_data(sid, BLOCK[:size], end_stream=sent + size == GIB)
            sent += size
            if sent % (1 << 20) == 0:  # a MiB at a time into the socket
                conn.flush()
                await conn.writer.drain()
        conn.flush()

    origin = await h2_server(stream_gib)
    proxy = spawn_proxy(origin.url, env={"FAULTLINE_LOG_ACCESS": "false"})
    try:
        out = await _curl(
            "-o", "/dev/null", "-w", "%{http_version} %{http_code} %{size_download}",
            f"http://{LOOPBACK}:{proxy.port}/download",
        )  # fmt: skip
        assert out.split() == [b"2", b"200", str(GIB).encode()]
        assert proxy.peak_rss_bytes() < RSS_LIMIT, proxy.peak_rss_bytes()
    finally:
        proxy.stop()
