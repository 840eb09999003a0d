#!/usr/bin/env python3
"""A 1-connection latency series beside bench.py's load: one small GET every INTERVAL ms.

bench.py starts this on the load CPU next to wrk (under SCHED_FIFO when it may, so that the
probe's own wake-ups do not wait behind wrk and the origin) for one measured rep. It opens one
keep-alive connection to 127.0.0.1:PORT, waits DELAY seconds (wrk's connects), then sends
`GET PATH` on a fixed schedule (start + k x INTERVAL; a late request goes out at once and the
schedule moves on, so the rate never exceeds 1/INTERVAL) until DURATION seconds have passed,
and prints one JSON line: the number of answers, errors, the latencies (send of the first byte
to receipt of the last, in microseconds) as a series of [ms since start, us] pairs, and the CPU
time its requests took (start-up not counted). 100 requests a second next to wrk's ~100k:
about 1% of a core on the test VM (~130 us a request, mostly the sleep and wake-up), a
thousandth of the proxy's requests.

A latency here is a request that arrives at a random moment of the proxy's event loop and
waits for whatever the loop is doing: a stall of the loop (a GC pause, a long settling slice)
shows up as a spike in the series, the loop-lag histogram's counterpart seen from outside.

Stdlib only; raw socket with a fixed request, so that the client's own cost is a few
microseconds and the same for every proxy. Bounded: it stops at DURATION (and every socket
operation has a timeout).
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import sys
import time


def read_response(sock: socket.socket, buf: bytearray) -> tuple[int, bool]:
    """Read one response (Content-Length or chunked body); return (status, keep-alive).
    Leftover bytes stay in `buf` (there should be none: one request at a time)."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the head")
        buf += chunk
    end = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:end]).decode("latin-1").split("\r\n")
    del buf[:end]
    status = int(head[0].split(" ", 2)[1])
    fields = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip().lower()
    keep = fields.get("connection") != "close"
    if "content-length" in fields:
        want = int(fields["content-length"])
        while len(buf) < want:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed in the body")
            buf += chunk
        del buf[:want]
    elif "chunked" in fields.get("transfer-encoding", ""):
        while b"0\r\n\r\n" not in buf:  # small bodies only: GET / is 12 bytes
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed in the chunked body")
            buf += chunk
        del buf[: buf.index(b"0\r\n\r\n") + 5]
    else:
        keep = False  # body until close: read it all
        while sock.recv(65536):
            pass
    return status, keep


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def connect(port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/")
    ap.add_argument("--interval-ms", type=float, default=10.0)
    ap.add_argument("--delay", type=float, default=0.25, help="seconds before the first request")
    ap.add_argument("--duration", type=float, required=True, help="seconds, delay included")
    ap.add_argument("--timeout", type=float, default=5.0, help="per socket operation")
    a = ap.parse_args(argv)

    request = (
        f"GET {a.path} HTTP/1.1\r\nHost: 127.0.0.1:{a.port}\r\nUser-Agent: latprobe\r\n\r\n"
    ).encode()
    interval = a.interval_ms / 1000
    t_start = time.monotonic()
    deadline = t_start + a.duration
    series: list[list[float]] = []
    errors: list[str] = []
    sock: socket.socket | None = None
    buf = bytearray()
    with_errors = 0
    try:
        sock = connect(a.port, a.timeout)
    except OSError as exc:
        with_errors += 1
        errors.append(f"connect: {exc!r}")
    cpu0 = cpu_seconds()  # the interpreter's start-up is not the probe's load
    nxt = t_start + a.delay
    while True:
        now = time.monotonic()
        if nxt >= deadline:
            break
        if nxt > now:
            time.sleep(nxt - now)
        nxt = max(nxt + interval, time.monotonic())
        try:
            if sock is None:
                sock = connect(a.port, a.timeout)
                buf.clear()
            t0 = time.perf_counter_ns()
            sock.sendall(request)
            status, keep = read_response(sock, buf)
            t1 = time.perf_counter_ns()
        except (OSError, ValueError, IndexError) as exc:
            with_errors += 1
            if len(errors) < 5:
                errors.append(repr(exc))
            if sock is not None:
                sock.close()
            sock = None
            continue
        if not 200 <= status < 300:
            with_errors += 1
            if len(errors) < 5:
                errors.append(f"status {status}")
        series.append([round((time.monotonic() - t_start) * 1000, 1), round((t1 - t0) / 1000, 1)])
        if not keep:
            sock.close()
            sock = None
    if sock is not None:
        sock.close()
    out = {
        "answers": len(series),
        "errors": with_errors,
        "error_samples": errors,
        "interval_ms": a.interval_ms,
        "elapsed_s": round(time.monotonic() - t_start, 3),
        "cpu_s": round(cpu_seconds() - cpu0, 3),
        "series": series,
    }
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
