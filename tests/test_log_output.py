"""The access log never holds the proxy (issue 20: bookkeeping never stands in front of a
request; `proxy.telemetry.logoutput`).

Real processes: `python -m proxy serve` (one process, and two workers) whose stdout is a
pipe that nobody reads, the demo origin, an aiohttp client. Before, the proxy blocked in
write(2) once the pipe was full: it served a few exchanges and then nothing, not even
`/healthz`. Now:
- every request is answered while the pipe stays full, and the admin port answers;
- what could not wait is dropped as whole lines and counted the same in `/stats`
  (`access_log.dropped_lines`) and `/metrics`;
- once somebody reads the pipe, the lines that waited come out whole and in one piece, the
  lines read plus the lines dropped are every exchange exactly once, a warning names the
  count, SIGTERM still exits 0, and the pipe is blocking again for whoever shares it next;
- the process's own log on stderr behaves the same: 150 HTTP/2 flood connections, each
  worth a warning, against a stderr pipe of 4 KiB that nobody reads: each is answered, the
  proxy keeps serving, and once stderr is read every warning comes out whole.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import threading

import aiohttp
import orjson
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection

from proxy.demo import start_demo_origin
from proxy.telemetry.logoutput import WAITING_MAX

from support import LOOPBACK, spawn_proxy

# A query long enough that the lines outgrow what may wait with few requests (~6.4 KB a line).
PAD = "x" * 6000
# ~13 MB of lines: more than WAITING_MAX (each worker's) plus the pipe's buffer
REQUESTS = 2000
F_SETPIPE_SZ = 1031
FLOODS = 150  # HTTP/2 connections that each earn a warning on stderr


async def _load(url: str, n: int) -> list[int]:
    statuses: list[int] = []
    timeout = aiohttp.ClientTimeout(total=10)  # a proxy blocked in write(2) fails here
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def client(k: int) -> None:
            for i in range(k, n, 10):
                async with session.get(f"{url}/hello?i={i}&pad={PAD}") as response:
                    await response.read()
                    statuses.append(response.status)

        await asyncio.gather(*(client(k) for k in range(10)))
    return statuses


async def _get(url: str) -> tuple[int, bytes]:
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(url) as response:
            return response.status, await response.read()


def _read_all(fd: int, into: bytearray) -> None:
    while chunk := os.read(fd, 1 << 16):
        into += chunk


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_stalled_stdout_reader_never_stops_the_proxy(workers: str) -> None:
    assert REQUESTS * (len(PAD) + 300) > WAITING_MAX + (1 << 16)
    origin = await start_demo_origin()
    read_end, write_end = os.pipe()
    fcntl.fcntl(read_end, F_SETPIPE_SZ, 1 << 16)
    proxy = spawn_proxy(origin.url, "--log-format", "json", "--workers", workers, stdout=write_end)
    reader: threading.Thread | None = None
    try:
        statuses = await _load(proxy.url, REQUESTS)
        assert statuses.count(200) == REQUESTS
        status, _ = await _get(proxy.admin_url + "/healthz")
        assert status == 200
        _, body = await _get(proxy.admin_url + "/stats")
        stats = orjson.loads(body)
        assert stats["requests"]["total"] == REQUESTS
        dropped = stats["access_log"]["dropped_lines"]
        assert 0 < dropped < REQUESTS
        _, metrics = await _get(proxy.admin_url + "/metrics")
        counted = [
            line
            for line in metrics.decode().splitlines()
            if line.startswith("faultline_access_log_dropped_lines_total ")
        ]
        assert counted == [f"faultline_access_log_dropped_lines_total {dropped}.0"]

        # Somebody reads the pipe again: what waited comes out, whole.
        out = bytearray()
        reader = threading.Thread(target=_read_all, args=(read_end, out), daemon=True)
        reader.start()
        deadline = asyncio.get_running_loop().time() + 10
        while out.count(b"\n") < REQUESTS - dropped:
            assert asyncio.get_running_loop().time() < deadline, out.count(b"\n")
            await asyncio.sleep(0.05)
        assert proxy.stop() == 0
        # The pipe is blocking again for whoever shares it next (a shell's next command).
        assert os.get_blocking(write_end)
        os.close(write_end)
        write_end = -1
        reader.join(5)
        assert not reader.is_alive()
        lines = [orjson.loads(line) for line in bytes(out).splitlines()]
        seen = sorted(int(line["path"].split("i=")[1].split("&")[0]) for line in lines)
        assert len(seen) == len(set(seen)) == REQUESTS - dropped
        assert all(line["status"] == 200 and line["path"].endswith(PAD) for line in lines)
        assert proxy.proc.stderr is not None
        words = proxy.proc.stderr.read().decode()
        assert "line(s) were dropped" in words, words
        reported = [
            int(line.split("fell behind and ")[1].split()[0])
            for line in words.splitlines()
            if "fell behind and " in line
        ]
        assert sum(reported) == dropped, words
    finally:
        proxy.stop()
        if write_end >= 0:
            os.close(write_end)
        if reader is not None:
            reader.join(5)
        os.close(read_end)
        await origin.close()


def _ping_flood() -> bytes:
    """An HTTP/2 client's preface and 300 PINGs: the proxy answers GOAWAY ENHANCE_YOUR_CALM
    and logs one warning line to stderr for the connection."""
    h2 = H2Connection(H2Configuration(client_side=True))
    h2.initiate_connection()
    for i in range(300):
        h2.ping(i.to_bytes(8, "big"))
    return h2.data_to_send()


async def _flood(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), timeout=10)  # until the proxy closes
    finally:
        writer.close()


async def test_a_stalled_stderr_reader_never_stops_the_proxy() -> None:
    origin = await start_demo_origin()
    proxy = spawn_proxy(origin.url, "--log-format", "json")
    assert proxy.proc.stderr is not None
    stderr = proxy.proc.stderr.fileno()
    fcntl.fcntl(stderr, F_SETPIPE_SZ, 4096)  # ~35 warning lines fill it
    try:
        flood = _ping_flood()
        for _ in range(FLOODS):  # one at a time: each is answered before the next
            assert b"\x07" in await _flood(proxy.port, flood)  # a GOAWAY frame (type 7)
        status, _ = await _get(proxy.url + "/hello")
        assert status == 200
        status, _ = await _get(proxy.admin_url + "/healthz")
        assert status == 200
        # Somebody reads stderr again: what waited comes out, whole.
        out = bytearray()
        reader = threading.Thread(target=_read_all, args=(stderr, out), daemon=True)
        reader.start()
        assert proxy.stop() == 0
        reader.join(5)
        assert not reader.is_alive()
        words = out.decode()
        whole = re.compile(
            r"\d{4}-\d\d-\d\d [\d:,]+ WARNING faultline: HTTP/2 ping flood: .+ from "
            r"127\.0\.0\.1, GOAWAY ENHANCE_YOUR_CALM"
        )
        assert sum(1 for line in words.splitlines() if whole.fullmatch(line)) == FLOODS, words
    finally:
        proxy.stop()
        await origin.close()
