"""Shutdown of the proxy process (CONTRACT.md, "Lifecycle"), measured from outside.

SIGTERM or SIGINT: `/readyz` turns 503 at once, new connections keep being served for
`timeouts.shutdown_delay`, then the listener closes, in-flight exchanges finish (up to
`timeouts.drain`), idle keep-alive connections close, and the process exits 0.

The clients model what a well-behaved HTTP client behind a Kubernetes Service does while a
pod goes away: they keep using their keep-alive connections; a connection the proxy closed
(`Connection: close`, or closed while idle) is replaced by a new one; once the listener is
closed a new connection is refused, which stands for "the endpoint is gone, traffic goes to
another pod", and that client stops. A request that came back with no byte at all on a
closed connection is retried (as a new attempt with its own id), because nothing of it was
answered.

The accounting is honest: every attempt carries its own `X-Request-Id`; the proxy's access
log and the origin name every request the proxy read. A failure is any attempt the proxy
read (or the origin saw) that did not get a complete 200 with its own body, any response
that was cut, and any response that is not the origin's 200.

Two tests are regressions of drain bugs found on b128176 (both fixed since): a slow
client's response cut when shutdown aborted connections whose exchange had finished but whose
bytes still sat in the proxy's write buffer; pipelined requests already read dropped (and
logged as 499 client_closed_request) when the current exchange ended during the drain.

Rules: the proxy is a child process on free 127.0.0.1 ports, stopped by PID; every wait is
bounded. The only timing assertions are the lifecycle's own bounds, measured from the
moment the test sends the signal: readiness 503 within 0.5 s, exit within shutdown_delay +
drain (+ 1 s margin), the listener not closed before shutdown_delay nor the process gone
before the drain time when an exchange holds it, and "at once" / "well under a second"
(< 1 s) for a second signal and for an idle proxy without shutdown_delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from support import (
    LOOPBACK,
    OriginConnection,
    ProxyProcess,
    Response,
    ScriptedOrigin,
    parse_responses,
    spawn_proxy,
)

SHUTDOWN_DELAY = 1.0  # FAULTLINE_TIMEOUTS_SHUTDOWN_DELAY
DRAIN = 5.0  # FAULTLINE_TIMEOUTS_DRAIN
SLOW = 2.0  # the origin answers /slow after this long
READY_BOUND = 0.5  # /readyz must say 503 this soon after the signal
EXIT_MARGIN = 1.0  # on top of shutdown_delay + drain
KEEPALIVE_CLIENTS = 6
LONG_BEFORE = 3  # long requests sent before the signal
LONG_DURING_DELAY = 2  # long requests on new connections during shutdown_delay
READ_TIMEOUT = 8.0  # one response, bounded

_RID = re.compile(rb"\r\nx-request-id: *([^\r\n]*)", re.IGNORECASE)


# -- the origin --------------------------------------------------------------------------------


def request_id(raw: bytes) -> str:
    m = _RID.search(raw.split(b"\r\n\r\n", 1)[0])
    return m.group(1).decode() if m else ""


def origin_script(slow: float = SLOW, hold: float = 0.0) -> Any:
    """A keep-alive origin: `/slow` is answered after `slow` s, `/stuck` after `hold` s
    (never, within the test, when hold is large), anything else at once. The body names
    the request id, so a client can tell its own answer from another's."""

    async def script(conn: OriginConnection) -> None:
        while (req := await conn.read_request(timeout=60)) is not None:
            path = req.split(b" ", 2)[1]
            if path.startswith(b"/slow"):
                await asyncio.sleep(slow)
            elif path.startswith(b"/stuck"):
                await conn.hold(hold)
                return
            await conn.respond(200, f"ok {request_id(req)}".encode())

    return script


# -- clients -------------------------------------------------------------------------------------


@dataclass
class Attempt:
    rid: str
    path: str
    sent_at: float
    outcome: str = "pending"  # ok | unanswered | cut | timeout | bad
    response: Response | None = None
    received: bytes = b""
    done_at: float = 0.0


@dataclass
class Traffic:
    """Every attempt the clients made, and when the listener first refused a connection."""

    attempts: dict[str, Attempt] = field(default_factory=dict)
    refused_at: list[float] = field(default_factory=list)
    counter: int = 0

    def new_id(self, name: str) -> str:
        self.counter += 1
        return f"{name}-{self.counter}"


def request_bytes(path: str, rid: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: faultline.test\r\nX-Request-Id: {rid}\r\n\r\n".encode()


async def read_response(reader: asyncio.StreamReader) -> tuple[Response | None, bytes, str]:
    """One response: (it, the bytes read, how the read ended: done | eof | reset | timeout)."""
    data = b""
    try:
        async with asyncio.timeout(READ_TIMEOUT):
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return None, data, "eof"
                data += chunk
                responses, _ = parse_responses(data, eof=False)
                if responses:
                    return responses[0], data, "done"
    except ConnectionError:
        return None, data, "reset"
    except TimeoutError:
        return None, data, "timeout"


def wants_close(response: Response) -> bool:
    return "close" in (response.header("Connection") or "").lower()


async def exchange(
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], traffic: Traffic, name: str, path: str
) -> Attempt:
    """Send one request on `conn` and record what came back."""
    reader, writer = conn
    rid = traffic.new_id(name)
    attempt = traffic.attempts[rid] = Attempt(rid, path, time.monotonic())
    writer.write(request_bytes(path, rid))
    response, data, how = await read_response(reader)
    attempt.done_at = time.monotonic()
    attempt.received = data
    attempt.response = response
    if response is not None:
        good = response.status == 200 and response.body == f"ok {rid}".encode()
        attempt.outcome = "ok" if good else "bad"
    elif how == "timeout":
        attempt.outcome = "timeout"
    elif data:
        attempt.outcome = "cut"  # some of the response came, then the connection ended
    else:
        attempt.outcome = "unanswered"  # closed with no byte of an answer: may be retried
    return attempt


async def connect(port: int, traffic: Traffic) -> Any:
    """A new connection; None when refused (the listener is closed: the endpoint is gone)."""
    try:
        async with asyncio.timeout(2):
            return await asyncio.open_connection(LOOPBACK, port)
    except ConnectionRefusedError:
        traffic.refused_at.append(time.monotonic())
        return None


def close(conn: Any) -> None:
    if conn is not None:
        conn[1].close()


async def keepalive_client(port: int, traffic: Traffic, name: str, stop: asyncio.Event) -> None:
    """Steady requests on one keep-alive connection at a time, reconnecting when the proxy
    closes it, until the listener refuses a new connection or the test stops."""
    conn = None
    try:
        while not stop.is_set():
            if conn is not None and conn[0].at_eof():
                close(conn)  # closed while idle, noticed before sending: reconnect
                conn = None
            if conn is None:
                conn = await connect(port, traffic)
                if conn is None:
                    return
            attempt = await exchange(conn, traffic, name, "/fast")
            if attempt.outcome != "ok" or wants_close(attempt.response):  # type: ignore[arg-type]
                close(conn)
                conn = None
            await asyncio.sleep(0.005)
    finally:
        close(conn)


async def one_request(port: int, traffic: Traffic, name: str, path: str) -> Attempt | None:
    conn = await connect(port, traffic)
    if conn is None:
        return None
    try:
        return await exchange(conn, traffic, name, path)
    finally:
        close(conn)


# -- the admin port and the process ---------------------------------------------------------------


async def readyz(proxy: ProxyProcess) -> int | None:
    """/readyz's status on a fresh connection (as the kubelet probes); None if unreachable."""
    try:
        async with asyncio.timeout(1):
            reader, writer = await asyncio.open_connection(LOOPBACK, proxy.admin_port)
            try:
                writer.write(b"GET /readyz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
                data = await reader.read()
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return None
    responses, _ = parse_responses(data)
    return responses[0].status if responses else None


@dataclass
class Readiness:
    """/readyz polled every 20 ms from the signal on: when it first said 503, and whether it
    ever said 200 again after that."""

    first_503_at: float | None = None
    ready_again: bool = False


async def watch_readiness(proxy: ProxyProcess, seen: Readiness, stop: asyncio.Event) -> None:
    while not stop.is_set() and proxy.proc.poll() is None:
        status = await readyz(proxy)
        if status == 503 and seen.first_503_at is None:
            seen.first_503_at = time.monotonic()
        elif status == 200 and seen.first_503_at is not None:
            seen.ready_again = True
        await asyncio.sleep(0.02)


def accepts(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port."""
    with socket.socket() as s:
        return s.connect_ex((LOOPBACK, port)) == 0


async def wait_exit(proxy: ProxyProcess, timeout: float) -> int | None:
    """The exit code, polled without blocking the loop; None if still running."""
    deadline = time.monotonic() + timeout
    while proxy.proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return proxy.proc.poll()


def end(proxy: ProxyProcess) -> str:
    """Make sure the child we started is gone (killed by PID if it is still running,
    whatever the test found); return the end of its stderr."""
    if proxy.proc.poll() is None:
        proxy.proc.kill()
        proxy.proc.wait(5)
    assert proxy.proc.stderr is not None
    with proxy.proc.stderr:
        return proxy.proc.stderr.read().decode(errors="replace")[-2000:]


def access_log(path: Path) -> dict[str, list[dict[str, Any]]]:
    by_id: dict[str, list[dict[str, Any]]] = {}
    for line in path.read_bytes().splitlines():
        if line.strip():
            entry = orjson.loads(line)
            by_id.setdefault(entry["request_id"], []).append(entry)
    return by_id


def spawn(origin: ScriptedOrigin, log: Path, delay: float, drain: float) -> ProxyProcess:
    """The proxy process in front of `origin`, its access log (JSON lines) into `log`."""
    with log.open("wb") as stdout:
        return spawn_proxy(
            origin.url,
            "--log-format",
            "json",
            env={
                "FAULTLINE_TIMEOUTS_SHUTDOWN_DELAY": f"{delay}s",
                "FAULTLINE_TIMEOUTS_DRAIN": f"{drain}s",
            },
            stdout=stdout,
        )


async def gather_bounded(tasks: list[asyncio.Task[Any]], timeout: float) -> list[Any]:
    try:
        async with asyncio.timeout(timeout):
            return await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for task in tasks:
            task.cancel()


def failures(traffic: Traffic, logged: dict[str, list[dict]], seen_by_origin: set[str]) -> list:
    """The attempts the proxy read that did not get their complete 200, and any log line
    that is not an answered 200."""
    bad = []
    for a in traffic.attempts.values():
        read_by_proxy = a.rid in logged or a.rid in seen_by_origin
        if a.outcome in ("cut", "timeout", "bad", "pending") or (
            a.outcome == "unanswered" and read_by_proxy
        ):
            status = a.response.status if a.response else None
            bad.append((a.rid, a.path, a.outcome, status, a.received[:120], logged.get(a.rid)))
    for rid, entries in logged.items():
        attempt = traffic.attempts.get(rid)
        for entry in entries:
            if entry["status"] != 200 or attempt is None or attempt.outcome != "ok":
                bad.append((rid, "access log", entry["status"], entry["error"], entry["details"]))
    return bad


# -- the tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_drain_under_load_fails_no_request(origin_factory, tmp_path, sig):
    """Steady keep-alive traffic and long in-flight requests through a signal: not one
    request the proxy read fails; readiness turns 503 at once; new connections are served
    during shutdown_delay; the long requests finish during the drain; exit 0 in time."""
    origin = await origin_factory(origin_script())
    log = tmp_path / "access.jsonl"
    proxy = spawn(origin, log, SHUTDOWN_DELAY, DRAIN)
    traffic, seen, stop = Traffic(), Readiness(), asyncio.Event()
    try:
        assert await readyz(proxy) == 200
        clients = [
            asyncio.create_task(keepalive_client(proxy.port, traffic, f"ka{i}", stop))
            for i in range(KEEPALIVE_CLIENTS)
        ]
        long_before = [
            asyncio.create_task(one_request(proxy.port, traffic, f"long{i}", "/slow"))
            for i in range(LONG_BEFORE)
        ]
        async with asyncio.timeout(5):  # traffic flows, the long requests are at the origin
            while sum(r.startswith(b"GET /slow") for r in origin.requests) < LONG_BEFORE:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)

        signalled = time.monotonic()
        proxy.proc.send_signal(sig)
        watcher = asyncio.create_task(watch_readiness(proxy, seen, stop))
        await asyncio.sleep(SHUTDOWN_DELAY / 2)
        # Half-way through shutdown_delay: new connections must still be served.
        long_during = [
            asyncio.create_task(one_request(proxy.port, traffic, f"late{i}", "/slow"))
            for i in range(LONG_DURING_DELAY)
        ]
        code = await wait_exit(proxy, SHUTDOWN_DELAY + DRAIN + EXIT_MARGIN)
        exited = time.monotonic()
        stop.set()
        long_results = await gather_bounded(long_before + long_during, READ_TIMEOUT)
        await gather_bounded([*clients, watcher], READ_TIMEOUT)
    finally:
        stop.set()
        err = end(proxy)

    assert code == 0, f"exit code {code} (None: still running after the drain time)\n{err}"
    assert exited - signalled <= SHUTDOWN_DELAY + DRAIN + EXIT_MARGIN
    assert seen.first_503_at is not None, "/readyz never said 503"
    assert seen.first_503_at - signalled <= READY_BOUND, seen.first_503_at - signalled
    assert not seen.ready_again, "/readyz said 200 again during the drain"

    # The long requests: all answered 200 with their own body, on connections that the
    # proxy then closes (the last response of a draining connection says so).
    for result in long_results:
        assert isinstance(result, Attempt), result
        assert result.done_at > signalled, "answered before the signal: not in flight"
        assert result.outcome == "ok", (result.rid, result.outcome, result.received[:200])
        assert wants_close(result.response), result.response  # type: ignore[arg-type]
    # Served after the signal: keep-alive traffic went on during shutdown_delay.
    answered = [a for a in traffic.attempts.values() if a.outcome == "ok"]
    assert any(a.sent_at > signalled + SHUTDOWN_DELAY / 2 for a in answered)
    # The listener closed, and not before shutdown_delay.
    assert traffic.refused_at, "no client was ever refused: did the listener close?"
    assert min(traffic.refused_at) >= signalled + SHUTDOWN_DELAY - 0.05

    logged = access_log(log)
    by_origin = {request_id(r) for r in origin.requests}
    bad = failures(traffic, logged, by_origin)
    assert not bad, f"{len(bad)} failed of {len(traffic.attempts)}: {bad[:10]}\n{err}"
    assert len(answered) == sum(len(v) for v in logged.values())


async def test_second_signal_during_drain_exits_at_once(origin_factory, tmp_path):
    """An impatient operator: the second SIGTERM, while an exchange holds the drain open,
    ends the process at once, still with exit code 0."""
    origin = await origin_factory(origin_script(hold=30))
    proxy = spawn(origin, tmp_path / "access.jsonl", 0.2, 20)
    try:
        stuck = asyncio.create_task(one_request(proxy.port, Traffic(), "stuck", "/stuck"))
        async with asyncio.timeout(5):
            while not origin.requests:
                await asyncio.sleep(0.01)
        proxy.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(3):  # the first signal took: draining, listener closed
            while await readyz(proxy) != 503:
                await asyncio.sleep(0.02)
            while accepts(proxy.port):
                await asyncio.sleep(0.02)
        assert proxy.proc.poll() is None, "exited before the in-flight exchange finished"
        second = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        code = await wait_exit(proxy, 5)
        took = time.monotonic() - second
        await gather_bounded([stuck], READ_TIMEOUT)
    finally:
        err = end(proxy)
    assert code == 0, (code, err)
    assert took < 1.0, f"the second SIGTERM took {took:.2f} s (the drain had 20 s left)"


async def test_idle_exit_without_delay_is_prompt(origin_factory, tmp_path):
    """No traffic, shutdown_delay 0: SIGTERM ends the process with 0 well under a second
    (nothing to drain, so the 20 s drain time is not waited for)."""
    origin = await origin_factory(origin_script())
    proxy = spawn(origin, tmp_path / "access.jsonl", 0, 20)
    try:
        assert await readyz(proxy) == 200
        signalled = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        code = await wait_exit(proxy, 5)
        took = time.monotonic() - signalled
    finally:
        err = end(proxy)
    assert code == 0, (code, err)
    assert took < 1.0, f"idle SIGTERM took {took:.2f} s"


async def test_drain_time_bounds_a_stuck_exchange(origin_factory, tmp_path):
    """An exchange that outlives the drain is cut by the proxy when the drain time is up,
    and the process still exits 0 within shutdown_delay + drain (+ margin). The record and
    the reply say the proxy cut it (it was blamed on the client: 499)."""
    origin = await origin_factory(origin_script(hold=30))
    log = tmp_path / "access.jsonl"
    delay, drain = 0.2, 1.0
    proxy = spawn(origin, log, delay, drain)
    traffic = Traffic()
    try:
        stuck = asyncio.create_task(one_request(proxy.port, traffic, "stuck", "/stuck"))
        async with asyncio.timeout(5):
            while not origin.requests:
                await asyncio.sleep(0.01)
        signalled = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        code = await wait_exit(proxy, delay + drain + EXIT_MARGIN)
        took = time.monotonic() - signalled
        (attempt,) = await gather_bounded([stuck], READ_TIMEOUT)
    finally:
        err = end(proxy)
    assert code == 0, (code, err)
    assert took >= delay + drain - 0.05, f"exited after {took:.2f} s: the drain was not waited"
    assert isinstance(attempt, Attempt), attempt
    # No response had started: the proxy answers 503 + close, and says it cut the exchange.
    assert attempt.response is not None, (attempt.outcome, attempt.received)
    assert attempt.response.status == 503, attempt.received[:300]
    assert attempt.response.header("Connection") == "close"
    assert "error=proxy_internal_response" in (attempt.response.header("Proxy-Status") or "")
    (record,) = access_log(log)[attempt.rid]
    assert (record["status"], record["source"], record["layer"], record["error"]) == (
        503,
        "proxy",
        "proxy",
        "proxy_internal_response",
    ), record


def tcp_queues(local: tuple[str, int], remote: tuple[str, int]) -> tuple[int, int]:
    """(tx_queue, rx_queue) of the IPv4 TCP socket local -> remote, from /proc/net/tcp:
    bytes the kernel holds unacknowledged for sending, and bytes received and not read.
    (The table can hold thousands of TIME_WAIT lines after a test run: searched, not split.)"""

    def hexaddr(addr: tuple[str, int]) -> bytes:
        return f"{socket.inet_aton(addr[0])[::-1].hex().upper()}:{addr[1]:04X}".encode()

    pattern = rb" %s %s [0-9A-F]{2} ([0-9A-F]{8}):([0-9A-F]{8}) " % (
        hexaddr(local),
        hexaddr(remote),
    )
    m = re.search(pattern, Path("/proc/net/tcp").read_bytes())
    if m is None:
        raise RuntimeError(f"no TCP socket {local} -> {remote} in /proc/net/tcp")
    return int(m.group(1), 16), int(m.group(2), 16)


async def in_flight(proxy: ProxyProcess) -> int | None:
    """/stats' count of exchanges in flight; None when the admin port does not answer."""
    try:
        async with asyncio.timeout(2):
            reader, writer = await asyncio.open_connection(LOOPBACK, proxy.admin_port)
            try:
                writer.write(b"GET /stats HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
                data = await reader.read()
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return None
    responses, _ = parse_responses(data)
    return responses[0].json()["requests"]["in_flight"] if responses else None


PIECE = 32 * 1024  # a chunk of the origin's body: half the write buffer's high-water mark


async def test_slow_client_gets_the_whole_response_during_drain(origin_factory, tmp_path):
    """A client that is slow to read (a phone on a bad network): the proxy has the origin's
    whole response, but part of it still waits in the proxy's own write buffer because the
    kernel's buffers towards the client are full. SIGTERM then: the client reads on 0.5 s
    later, well inside the 5 s drain, and must get every byte.

    Deterministic: the origin streams 32 KiB chunks, each only once the proxy has read the
    previous one, and ends the body as soon as /proc/net/tcp shows that the kernel (the
    proxy's send queue plus the client's receive queue) holds less than the proxy was
    given. Regression: shutdown used to stop waiting when stats.in_flight was 0 and abort
    every connection, dropping what was still in the write buffer (a truncated body, then a
    clean FIN)."""
    loop = asyncio.get_running_loop()
    conn_ready: asyncio.Future[OriginConnection] = loop.create_future()

    async def streaming_origin(conn: OriginConnection) -> None:
        if await conn.read_request(timeout=10) is not None:
            conn.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            conn_ready.set_result(conn)
            await conn.hold(30)  # the test writes the body

    origin = await origin_factory(streaming_origin)
    proxy = spawn(origin, tmp_path / "access.jsonl", 0, DRAIN)
    client = socket.socket()
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        client.setblocking(False)
        await loop.sock_connect(client, (LOOPBACK, proxy.port))
        await loop.sock_sendall(client, request_bytes("/stream", "slow-1"))
        conn = await asyncio.wait_for(conn_ready, 5)
        upstream = (conn.writer.get_extra_info("sockname"), conn.writer.get_extra_info("peername"))
        downstream = (client.getsockname(), client.getpeername())
        data = b""
        async with asyncio.timeout(5):
            while b"\r\n\r\n" not in data:
                data += await loop.sock_recv(client, 1024)
        read_body = len(data) - data.index(b"\r\n\r\n") - 4  # the client now stops reading

        def held_back() -> int:
            """At least this many body bytes are in the proxy's user-space write buffer: it
            was given `payload`, the client read `read_body`, the kernel holds the rest
            (bytes delivered but not yet acknowledged are counted twice: a lower bound)."""
            proxy_tx, _ = tcp_queues(downstream[1], downstream[0])
            _, client_rx = tcp_queues(downstream[0], downstream[1])
            return payload - read_body - proxy_tx - client_rx

        async def send_and_see_it_read(data: bytes) -> None:
            conn.write(data)
            while True:  # loopback delivers at once: the origin's bytes are in the proxy's
                _, proxy_rx = tcp_queues(upstream[1], upstream[0])  # receive queue or read
                if not proxy_rx and not conn.writer.transport.get_write_buffer_size():
                    return
                await asyncio.sleep(0.001)

        payload = 0
        try:
            async with asyncio.timeout(10):
                while held_back() < 1024:
                    await send_and_see_it_read(b"%x\r\n%s\r\n" % (PIECE, b"y" * PIECE))
                    payload += PIECE
                await send_and_see_it_read(b"0\r\n\r\n")  # the end of the body
                while await in_flight(proxy) != 0:
                    await asyncio.sleep(0.01)
        except TimeoutError:
            pytest.fail(f"set-up: the proxy stopped reading the origin ({payload} bytes given)")
        held = held_back()

        proxy.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)  # the client is slow
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(READ_TIMEOUT):
                while chunk := await loop.sock_recv(client, 65536):
                    data += chunk
        code = await wait_exit(proxy, DRAIN + EXIT_MARGIN)
    finally:
        client.close()
        err = end(proxy)
    if code != 0:
        pytest.fail(f"exit code {code}\n{err}")
    responses, _ = parse_responses(data)
    if responses:
        got = f"a complete response with {len(responses[0].body)} body bytes"
    else:
        got = f"an incomplete response: {len(data)} bytes, head and chunk framing included"
    assert responses and len(responses[0].body) == payload, (
        f"the client got {got}, for a {payload}-byte body; when the proxy had finished the "
        f"exchange and got SIGTERM, it still held at least {held} bytes in its write buffer"
    )


async def test_pipelined_request_read_before_the_drain_is_answered(origin_factory, tmp_path):
    """Two pipelined requests in one write, the first slow; SIGTERM while the first is at
    the origin. The proxy has read both (its access log names both), so both are in
    flight and both must be answered before the connection closes. Regression: the
    connection used to close after the first, the second logged as a 499 "client" fault."""
    origin = await origin_factory(origin_script(slow=1.0))
    log = tmp_path / "access.jsonl"
    proxy = spawn(origin, log, 0.2, DRAIN)
    try:
        reader, writer = await asyncio.open_connection(LOOPBACK, proxy.port)
        writer.write(request_bytes("/slow", "pipe-1") + request_bytes("/fast", "pipe-2"))
        async with asyncio.timeout(5):
            while not origin.requests:
                await asyncio.sleep(0.01)
        proxy.proc.send_signal(signal.SIGTERM)
        data = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(READ_TIMEOUT):
                while chunk := await reader.read(65536):
                    data += chunk
        writer.close()
        code = await wait_exit(proxy, 0.2 + DRAIN + EXIT_MARGIN)
    finally:
        err = end(proxy)
    if code != 0:
        pytest.fail(f"exit code {code}\n{err}")
    logged = access_log(log)
    if not {"pipe-1", "pipe-2"} <= logged.keys():
        pytest.fail(f"set-up: the proxy did not read both requests: {logged}")
    responses, _ = parse_responses(data)
    answers = [(r.status, r.body) for r in responses]
    outcome = {rid: [(e["status"], e["error"]) for e in logged[rid]] for rid in logged}
    assert answers == [(200, b"ok pipe-1"), (200, b"ok pipe-2")], (answers, outcome)
