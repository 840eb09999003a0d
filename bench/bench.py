#!/usr/bin/env python3
"""Faultline's benchmark: Faultline next to nginx, HAProxy and direct-to-origin, on one box.

Layout: the proxy under test runs alone on PROXY_CPU; the origin (nginx, 1 worker) and the
load (wrk or h2load, 1 thread) share LOAD_CPU. The HTTP/2 scenarios send h2c (HTTP/2 in clear
text, prior knowledge) with h2load, through each proxy to the HTTP/1.1 origin (h2c -> HTTP/1.1)
or to the origin's h2c listener (h2c -> h2c: nginx grpc_pass, Faultline --upstream h2c://).
Every variant is measured in the same run, interleaved (A B C A B C ...), and the table shows
medians of the repetitions with ratios to nginx and to direct-to-origin, the CPU time per
request of each proxy's process tree (utime + stime / requests, the steadier figure on a noisy
machine) and its RSS. Then the targets of issue 6 (HTTP/1.1) and issue 19 (HTTP/2) are checked
and printed as PASS/FAIL lines.

Only 127.0.0.1 is ever contacted. Every server is started here, tracked by PID, and stopped
by PID (with its own descendants) at exit, on Ctrl-C and on errors; the servers also get
SIGTERM if this process dies (PR_SET_PDEATHSIG). Every load run is bounded in time.

Stdlib only; needs nginx (Debian nginx-light), haproxy, wrk, taskset and prlimit (util-linux),
and h2load (Debian nghttp2-client) for the HTTP/2 scenarios. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import http.client
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import turns

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1 << 20
HELLO = b"hello world\n"
BODY_16K = hashlib.sha256(b"faultline-bench-16k").digest() * 512  # 16 KiB, deterministic
BODY_1M = bytes(range(256)) * 4096  # 1 MiB
UPLOAD_BYTES = MIB


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "wrk", "h2load" or "idle"
    path: str
    conns: int
    payload: int  # body bytes moved per request (response, or request body for uploads)
    needs: str  # the validation a variant must pass to run it
    desc: str
    lua: str | None = None
    throughput: bool = False  # print MiB/s
    route: str = "h1"  # ROUTES: which listener of each proxy, towards which origin
    streams: int = 1  # h2load -m: concurrent streams per connection
    threads: int = 1  # wrk -t
    probe: bool = False  # a 1-connection latency series beside the load (latprobe.py)


# What a scenario's client speaks to the proxy, and what the proxy speaks to the origin.
ROUTES = {
    "h1": "HTTP/1.1 -> HTTP/1.1",
    "h2": "h2c -> HTTP/1.1",  # the same origin, HTTP/2 on the client side only
    "h2h2": "h2c -> h2c",  # the origin's h2c listener (nginx: grpc_pass)
    # 1 and 2 workers of nginx and Faultline, everything (origin with 2 workers, wrk with 2
    # threads, the proxies) on both CPUs: the --workers scaling row
    "w": "HTTP/1.1 -> HTTP/1.1, both CPUs",
}
WORKER_COUNTS = (1, 2)  # the rows of a "w" scenario: PROXY-w1, PROXY-w2


SCENARIOS = {
    s.name: s
    for s in (
        Scenario(name="small-c50", kind="wrk", path="/", conns=50, payload=len(HELLO),
                 needs="small", probe=True,
                 desc="GET / (12-byte body), 50 connections, saturating"),
        Scenario(name="small-c1", kind="wrk", path="/", conns=1, payload=len(HELLO),
                 needs="small", desc="GET / (12-byte body), 1 connection: latency"),
        Scenario(name="small-r2k", kind="wrk", path="/", conns=20, payload=len(HELLO),
                 needs="small", lua="delay10", probe=True,
                 desc="GET /, 20 connections each pausing 10 ms between requests (~2k req/s): "
                 "the loop below saturation, as a sidecar mostly runs"),
        Scenario(name="16k-c50", kind="wrk", path="/16k.bin", conns=50, payload=len(BODY_16K),
                 needs="16k", desc="GET /16k.bin (16 KiB), 50 connections"),
        Scenario(name="1m-c8", kind="wrk", path="/1m.bin", conns=8, payload=len(BODY_1M),
                 needs="1m", desc="GET /1m.bin (1 MiB), 8 connections: throughput",
                 throughput=True),
        Scenario(name="upload-c8", kind="wrk", path="/upload", conns=8, payload=UPLOAD_BYTES,
                 needs="upload", lua="upload", throughput=True,
                 desc="POST /upload with a 1 MiB body, 8 connections: upload throughput"),
        Scenario(name="h2-c50m10", kind="h2load", route="h2", path="/", conns=50, streams=10,
                 payload=len(HELLO), needs="h2",
                 desc="h2c -> HTTP/1.1: GET / (12-byte body), 50 connections x 10 streams"),
        Scenario(name="h2-c1", kind="h2load", route="h2", path="/", conns=1, payload=len(HELLO),
                 needs="h2", desc="h2c -> HTTP/1.1: GET /, 1 connection, 1 stream: latency"),
        Scenario(name="h2h2-c50m10", kind="h2load", route="h2h2", path="/", conns=50, streams=10,
                 payload=len(HELLO), needs="h2",
                 desc="h2c -> h2c: GET / (12-byte body), 50 connections x 10 streams"),
        Scenario(name="h2h2-c1", kind="h2load", route="h2h2", path="/", conns=1,
                 payload=len(HELLO), needs="h2",
                 desc="h2c -> h2c: GET /, 1 connection, 1 stream: latency"),
        Scenario(name="small-c50-w2", kind="wrk", route="w", path="/", conns=50, threads=2,
                 payload=len(HELLO), needs="small", probe=True,
                 desc="GET / (12-byte body), 50 connections, wrk 2 threads; 1 and 2 workers, "
                 "everything on both CPUs"),
        Scenario(name="idle10k", kind="idle", path="/", conns=0, payload=len(HELLO),
                 needs="small",
                 desc="idle keep-alive connections (one GET each, then held): memory"),
    )
}  # fmt: skip
LUA = {
    "delay10": "-- bench.py: each connection waits 10 ms after a response (wrk calls delay()).\n"
    "delay = function() return 10 end\n",
    "upload": (
        "-- bench.py: POST a 1 MiB body on every request (wrk adds Content-Length).\n"
        'wrk.method = "POST"\n'
        f'wrk.body = string.rep("x", {UPLOAD_BYTES})\n'
        'wrk.headers["Content-Type"] = "application/octet-stream"\n'
    ),
}
# Appended to every wrk script: the tail that --latency leaves out (wrk counts in µs).
LUA_TAIL = (
    "-- bench.py: p99.9 and max, which wrk --latency does not print\n"
    "done = function(summary, latency, requests)\n"
    '  io.write(string.format("TAIL p99.9 %d max %d\\n", latency:percentile(99.9), '
    "latency.max))\n"
    "end\n"
)
PEERS = ("direct", "nginx", "nginx-log", "haproxy")
# nginx-log's access log: Faultline's JSON fields, from nginx's variables (the ones it has).
NGINX_JSON_LOG = (
    "log_format faultline_like escape=json "
    '\'{"time":"$time_iso8601","request_id":"$request_id","method":"$request_method",\''
    ' \'"path":"$request_uri","status":$status,"source":"origin","layer":"origin",\''
    ' \'"error":null,"details":null,"upstream":"$upstream_addr","route":null,\''
    ' \'"client":"$remote_addr","protocol":"$server_protocol","bytes_in":$request_length,\''
    ' \'"bytes_out":$body_bytes_sent,"duration_ms":$request_time,"phases_ms":{"wait":null,\''
    ' \'"dns":null,"connect":"$upstream_connect_time","tls":null,"queue":null,\''
    ' \'"ttfb":"$upstream_header_time","body":"$upstream_response_time"},"reused":true,\''
    ' \'"retried":false,"hop":null,"hints":[]}\';\n'
    "    access_log @RUN@/nginx-log.access.log faultline_like buffer=16k flush=1s;"
)
FAULTLINE = "faultline"  # diagnostics and access log on (the defaults)
FAULTLINE_OFF = "faultline-nodiag"
DEFAULT_NODIAG_ENV = ("FAULTLINE_DIAGNOSTICS=false", "FAULTLINE_LOG_ACCESS=false")
FAULTLINE_ARGS = (
    "serve --listen 127.0.0.1:{PORT} --upstream http://{UPSTREAM} --admin 127.0.0.1:{ADMIN_PORT}"
)

# Issue 6's targets; checked at the end of a run, never in unit tests.
TARGET_RPS_X_NGINX = 0.6  # small-c50, diagnostics + access log on
TARGET_CPU_X_NGINX = 1.6  # small-c50, CPU time per request
TARGET_P50_X_NGINX = 1.3  # small-c1, median latency
TARGET_1M_X_NGINX = 0.8  # 1m-c8, throughput
TARGET_DIAG_COST = 0.10  # small-c50 req/s, on vs off
TARGET_RSS_AFTER_MB = 40.0
TARGET_RSS_IDLE_MB = 100.0
# Issue 19's: h2load -c 50 -m 10, h2c -> HTTP/1.1 and h2c -> h2c, diagnostics + log on.
TARGET_H2_RPS_X_NGINX = 0.5
# Issue 20's: the event loop's lag under small-c50 (from /metrics; the probe cross-checks it),
# and the gain from 1 to 2 workers on both CPUs as a fraction of nginx's.
TARGET_LAG_MAX_MS = 1.0
TARGET_LAG_P99_MS = 0.2
TARGET_WORKERS_GAIN_X_NGINX = 0.9


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes
def descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    for c in map(int, f.read().split()):
                        if c not in out:
                            out.append(c)
                            todo.append(c)
        except OSError:
            pass
    return out


def proc_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return "?"


def cpu_ticks(pids: list[int]) -> int:
    """utime + stime (clock ticks) summed over `pids`."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                s = f.read()
            fields = s[s.rfind(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total


def cpu_wait_ns(pids: list[int]) -> int:
    """How long the threads of `pids` have waited, runnable, for a CPU (the kernel's
    schedstat): time a proxy pinned to its CPU lost to anything else running there."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                        total += int(f.read().split()[1])
    return total


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            pass
    return total


def hwm_bytes(pids: list[int]) -> int:
    """Peak RSS (VmHWM) summed over `pids`."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) * 1024
        except (OSError, IndexError, ValueError):
            pass
    return total


def cpu_jiffies() -> dict[int, tuple[int, int]]:
    """Per CPU: (busy incl. irq/softirq, total) jiffies from /proc/stat."""
    res = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                parts = line.split()
                vals = list(map(int, parts[1:9]))
                res[int(parts[0][3:])] = (sum(vals) - vals[3] - vals[4], sum(vals))
    return res


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM the child if the harness dies (Linux PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))


SERVERS: list[Server] = []


class Server:
    """A server process started under taskset + prlimit, stopped by PID with its descendants."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        port: int,
        cpu: str,
        rundir: str,
        nofile: int,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdout_path: str | None = None,
    ) -> None:
        self.name, self.port = name, port
        self.log_path = os.path.join(rundir, f"{name}.log")
        self.stdout_path = stdout_path
        full = ["taskset", "-c", cpu, "prlimit", f"--nofile={nofile}:{nofile}", *argv]
        with open(self.log_path, "ab") as err:
            # O_APPEND, so the harness may truncate the file between runs
            out = open(stdout_path, "ab") if stdout_path else err  # noqa: SIM115
            try:
                self.proc = subprocess.Popen(
                    full,
                    stdout=out,
                    stderr=err,
                    stdin=subprocess.DEVNULL,
                    cwd=cwd,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                    env={**os.environ, **(env or {})},
                )
            finally:
                if out is not err:
                    out.close()
        self.pid = self.proc.pid
        SERVERS.append(self)

    def pids(self) -> list[int]:
        return [self.pid, *descendants(self.pid)] if self.alive() else []

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        victims = self.pids()
        for p in victims:  # the one we started first: nginx and HAProxy stop their own workers
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        for p in victims:  # whatever is left, by PID
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        # and any orphan still in the process group we created (its id is our child's PID)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log(f"warning: {self.name} (pid {self.pid}) did not exit")


def stop_all() -> None:
    while SERVERS:
        SERVERS.pop().stop()


def port_free(port: int) -> bool:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def wait_ports_free(ports: list[int], patience_s: float = 65.0) -> list[int]:
    """Wait out TIME_WAIT leftovers (60 s on Linux) of client sockets that happened to get one
    of our ports from the ephemeral range; return the ports still busy."""
    end = time.monotonic() + patience_s
    busy = [p for p in ports if not port_free(p)]
    if busy:
        log(f"waiting up to {patience_s:.0f} s for ports {busy} (in use, or TIME_WAIT)")
    while busy and time.monotonic() < end:
        time.sleep(1.0)
        busy = [p for p in busy if not port_free(p)]
    return busy


def http_request(
    port: int, method: str, path: str, body: bytes | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path, body=body)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def wait_ready(srv: Server, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not srv.alive():
            return False
        try:
            if http_request(srv.port, "GET", "/", timeout=1.0)[0] == 200:
                return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def validate(port: int) -> tuple[dict[str, str], str | None]:
    """Check each response kind once. Returns ({needs: reason} of what fails, fatal reason)."""
    bad: dict[str, str] = {}

    def check(
        needs: str,
        method: str,
        path: str,
        want: bytes | None,
        body: bytes | None = None,
        want_status: int = 200,
    ) -> None:
        try:
            st, got = http_request(port, method, path, body, timeout=10)
        except OSError as exc:
            bad[needs] = f"{method} {path}: {exc!r}"
            return
        if st != want_status or (want is not None and got != want):
            bad[needs] = f"{method} {path}: status {st}, {len(got)} bytes"

    check("small", "GET", "/", HELLO)
    check("16k", "GET", "/16k.bin", BODY_16K)
    check("1m", "GET", "/1m.bin", BODY_1M)
    check("upload", "POST", "/upload", b"uploaded\n", b"x" * UPLOAD_BYTES)
    return bad, bad.get("small")


def h2_check(port: int, n: int = 4) -> str | None:
    """GET / `n` times over one h2c connection (prior knowledge) with h2load; None if every
    answer was a 2xx carrying the 12-byte body, else what went wrong."""
    argv = ["h2load", f"-n{n}", "-c1", "-m1", f"http://127.0.0.1:{port}/"]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=15).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"h2load: {exc!r}"
    if "Application protocol: h2c" not in out:
        return "no h2c session (h2load could not connect or negotiate HTTP/2)"
    m = re.search(r"status codes: (\d+) 2xx", out)
    ok = int(m.group(1)) if m else 0
    m = re.search(r"\((\d+)\) data", out)
    data = int(m.group(1)) if m else -1
    if ok != n or data != n * len(HELLO):
        codes = re.search(r"status codes: (.*)", out)
        return (
            f"GET / x{n} over h2c: {ok} 2xx, {data} body bytes (want {n * len(HELLO)}); "
            f"{codes.group(1) if codes else 'no status codes'}"
        )
    return None


def wait_ready_h2(v: Variant, timeout: float) -> str | None:
    """Poll h2_check until it passes (None), the server dies or `timeout` passes (the reason)."""
    end = time.monotonic() + timeout
    why: str | None = "not tried"
    while time.monotonic() < end:
        if v.server and not v.server.alive():
            return f"exited ({v.server.proc.poll()}; log: {v.server.log_path})"
        why = h2_check(v.port)
        if why is None:
            return None
        time.sleep(0.3)
    return why


# ---------------------------------------------------------------- wrk
UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def to_ms(s: str) -> float | None:
    m = re.match(r"([\d.]+)(us|ms|s|m)$", s)
    return float(m.group(1)) * UNIT_MS[m.group(2)] if m else None


def parse_wrk(out: str) -> dict:
    r: dict = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    r["rps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    r["requests"] = int(m.group(1)) if m else 0
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        r[f"p{pct}"] = to_ms(m.group(1)) if m else None
    m = re.search(r"^TAIL p99\.9 (\d+) max (\d+)", out, re.M)
    r["p999"], r["max"] = (int(m.group(1)) / 1000, int(m.group(2)) / 1000) if m else (None, None)
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(map(int, m.groups()))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    r["errors"] = errors
    return r


def parse_h2load(out: str, log_path: str) -> dict:
    """h2load's summary, plus latency percentiles from its per-request log (--log-file: start
    us, status, microseconds until the end of the response), which the summary lacks."""
    r: dict = {}
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    r["rps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, \d+ succeeded, (\d+) failed", out)
    r["requests"] = int(m.group(1)) if m else 0
    errors = int(m.group(2)) if m else 0
    m = re.search(r"status codes: \d+ 2xx, \d+ 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if m:
        errors += int(m.group(1)) + int(m.group(2))
    r["errors"] = errors
    times: list[int] = []
    with contextlib.suppress(OSError), open(log_path) as f:
        for line in f:
            parts = line.split("\t")
            if len(parts) >= 3:
                times.append(int(parts[2]))
    times.sort()
    for pct in ("50", "75", "90", "99", "99.9"):
        key = "p999" if pct == "99.9" else f"p{pct}"
        at = int(len(times) * float(pct) / 100)
        r[key] = times[min(len(times) - 1, at)] / 1000 if times else None
    r["max"] = times[-1] / 1000 if times else None
    return r


@dataclass
class Variant:
    name: str
    port: int
    server: Server | None  # None: direct to the origin
    access_log: str | None = None  # the server's stdout file, emptied after each run
    unsupported: dict[str, str] = field(default_factory=dict)  # scenario needs -> reason
    twin: bool = False  # a Faultline with an h2c upstream, for the h2c -> h2c scenarios
    admin_port: int | None = None  # a Faultline's: its event-loop lag is read from /metrics

    def pids(self) -> list[int]:
        return self.server.pids() if self.server else []


def load_cpus(scen: Scenario, a: argparse.Namespace) -> str:
    """Where the load (and the probe) runs: the load CPU, or both CPUs in a "w" scenario."""
    return a.both_cpus if scen.route == "w" else a.load_cpu


def run_wrk(
    v: Variant,
    scen: Scenario,
    duration: int,
    a: argparse.Namespace,
    rundir: str,
    probe: bool = False,
) -> dict:
    argv = [
        "taskset",
        "-c",
        load_cpus(scen, a),
        "wrk",
        f"-t{scen.threads}",
        f"-c{scen.conns}",
        f"-d{duration}s",
        "--latency",
        "--timeout",
        "5s",
    ]
    path = os.path.join(rundir, f"{scen.lua or 'get'}-tail.lua")
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write((LUA[scen.lua] if scen.lua else "") + LUA_TAIL)
    argv += ["-s", path]
    argv.append(f"http://127.0.0.1:{v.port}{scen.path}")
    return run_load(v, scen, argv, duration, a, parse_wrk, probe)


def run_h2load(
    v: Variant,
    scen: Scenario,
    duration: int,
    a: argparse.Namespace,
    rundir: str,
    probe: bool = False,
) -> dict:
    """h2load on the load CPU, 1 thread, h2c with prior knowledge, for `duration` seconds."""
    log_path = os.path.join(rundir, "h2load-requests.tsv")
    argv = [
        "taskset",
        "-c",
        load_cpus(scen, a),
        "h2load",
        f"-t{scen.threads}",
        f"-c{scen.conns}",
        f"-m{scen.streams}",
        f"-D{duration}",
        f"--log-file={log_path}",
        f"http://127.0.0.1:{v.port}{scen.path}",
    ]
    try:
        parse = lambda out: parse_h2load(out, log_path)  # noqa: E731
        return run_load(v, scen, argv, duration, a, parse, probe)
    finally:  # about 30 bytes a request: do not keep them
        with contextlib.suppress(OSError):
            os.unlink(log_path)


LAG_FAMILY = "faultline_event_loop_lag_seconds_bucket"


def lag_buckets(admin_port: int | None) -> dict[float, float] | None:
    """A Faultline's event-loop lag histogram (cumulative counts by upper bound, s)."""
    if admin_port is None:
        return None
    try:
        conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=5)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
    except (OSError, http.client.HTTPException):
        return None
    out: dict[float, float] = {}
    for m in re.finditer(rf'^{LAG_FAMILY}{{le="([^"]+)"}} (\S+)$', text, re.M):
        out[float(m.group(1))] = float(m.group(2))
    return out or None


def lag_during(before: dict[float, float] | None, after: dict[float, float] | None) -> dict:
    """p99 and max of the loop-lag samples taken during one run, as the upper bound of the
    histogram bucket they fall in (ms): the samples of this run alone, not a window's."""
    if not before or not after:
        return {}
    bounds = sorted(after)
    diff = [after[b] - before.get(b, 0.0) for b in bounds]  # cumulative
    total = diff[-1]
    if total <= 0:
        return {}
    p99 = next(b for b, n in zip(bounds, diff, strict=True) if n >= 0.99 * total)
    top = next(b for b, n in zip(bounds, diff, strict=True) if n >= total)
    return {"lag_p99": p99 * 1e3, "lag_max": top * 1e3, "lag_samples": int(total)}


def start_probe(
    v: Variant, scen: Scenario, duration: int, a: argparse.Namespace
) -> subprocess.Popen | None:
    """latprobe.py on the load CPU(s) for the length of one run: one keep-alive connection,
    one GET every --probe-interval ms, under SCHED_FIFO if --probe-sched fifo."""
    if a.probe_sched == "off":
        return None
    argv = ["taskset", "-c", load_cpus(scen, a)]
    argv += ["chrt", "-f", "1"] if a.probe_sched == "fifo" else []
    argv += [sys.executable, os.path.join(HERE, "latprobe.py"), "--port", str(v.port)]
    argv += ["--path", scen.path, "--interval-ms", str(a.probe_interval)]
    argv += ["--delay", "0.25", "--duration", str(max(0.5, duration - 0.25))]
    try:
        return subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            preexec_fn=_die_with_parent,
        )
    except OSError as exc:
        log(f"  probe did not start: {exc!r}")
        return None


def finish_probe(proc: subprocess.Popen | None, timeout: float) -> dict:
    """The probe's run as {"probe": {...}}: its latencies (us) and [ms since start, us] series,
    answers, errors and CPU time; {} if there was no probe."""
    if proc is None:
        return {}
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return {"probe": {"error": "timed out", "stderr": err[-300:]}}
    try:
        res = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"probe": {"error": f"exit {proc.returncode}", "stderr": err[-300:]}}
    lat = sorted(x[1] for x in res["series"])
    res["lat_us"] = {k: pct(lat, q) for k, q in PROBE_PCTS}
    return {"probe": res}


PROBE_PCTS = (("p50", 50.0), ("p99", 99.0), ("p999", 99.9), ("max", 100.0))


def pct(sorted_vals: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank) of sorted values; None if there are none."""
    if not sorted_vals:
        return None
    at = min(len(sorted_vals) - 1, max(0, int(len(sorted_vals) * q / 100 + 0.999999) - 1))
    return sorted_vals[at]


def run_load(
    v: Variant,
    scen: Scenario,
    argv: list[str],
    duration: int,
    a: argparse.Namespace,
    parse: Callable[[str], dict],
    probe: bool = False,
) -> dict:
    """Run the load command `argv` against `v` and measure the proxy's side meanwhile: CPU
    time of its process tree, its peak RSS, how busy each CPU was, the machine's load; and,
    with `probe`, a 1-connection latency series beside the load (latprobe.py)."""
    pids = v.pids()
    peak = [rss_bytes(pids)]
    stop = threading.Event()

    def sample_rss() -> None:
        while not stop.wait(0.25):
            peak[0] = max(peak[0], rss_bytes(pids))

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    lag0 = lag_buckets(v.admin_port)
    each0 = {p: cpu_ticks([p]) for p in pids}
    ticks0, jiffies0, t0 = cpu_ticks(pids), cpu_jiffies(), time.monotonic()
    wait0 = cpu_wait_ns(pids)
    prober = start_probe(v, scen, duration, a) if probe else None
    tracer, trace_path = None, os.path.join(a.rundir, f"turns-{v.name}.data")
    if probe and a.turns == "on" and pids:  # the middle of the run: 1 s in to 1 s before the end
        tracer = turns.record(pids, max(1.0, duration - 1.0), trace_path, delay=1.0)
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30).stdout
    except subprocess.TimeoutExpired:
        out = ""
    elapsed = time.monotonic() - t0
    ticks1, jiffies1 = cpu_ticks(pids), cpu_jiffies()
    r_wait = (cpu_wait_ns(pids) - wait0) / 1e6
    each = sorted((cpu_ticks([p]) - t for p, t in each0.items()), reverse=True)
    # how the proxy's CPU time split between its processes (%, largest first): 2 workers
    # that share the load evenly show 50/50 (nginx: 0 for its master)
    r_split = [round(100 * t / sum(each)) for t in each] if sum(each) else []
    lag = lag_during(lag0, lag_buckets(v.admin_port))
    lag.update(finish_probe(prober, timeout=30))
    if tracer is not None:
        _, err = tracer.communicate()
        lag["turns"] = (
            turns.summarize(trace_path)
            if not tracer.returncode
            else {"error": err.decode(errors="replace").strip()[-200:]}
        )
    stop.set()
    sampler.join()
    r = parse(out)
    r.update(lag)
    r["raw"] = out
    r["loadavg"] = round(os.getloadavg()[0], 2)
    r["procs"] = len(pids)  # the proxy's process tree (its workers)
    r["cpu_split"] = r_split
    r["cpu_wait_ms"] = r_wait if pids else None
    cpu_s = (ticks1 - ticks0) / CLK_TCK
    r["mib_s"] = r["rps"] * scen.payload / MIB
    r["rss_mb"] = peak[0] / MIB if pids else None
    r["cpu_pct"] = 100.0 * cpu_s / elapsed if pids else None
    r["us_per_req"] = 1e6 * cpu_s / r["requests"] if pids and r["requests"] else None
    busy = {
        c: 100.0 * (jiffies1[c][0] - jiffies0[c][0]) / max(1, jiffies1[c][1] - jiffies0[c][1])
        for c in jiffies1
    }
    r["cpu_busy"] = {c: round(b, 1) for c, b in busy.items()}
    r["core_pct"] = busy.get(int(a.proxy_cpu)) if a.proxy_cpu.isdigit() else None
    r["load_pct"] = busy.get(int(a.load_cpu)) if a.load_cpu.isdigit() else None
    if v.access_log:
        try:
            r["access_log_bytes"] = os.path.getsize(v.access_log)
            os.truncate(v.access_log, 0)
        except OSError:
            pass
    return r


def run_idle(v: Variant, a: argparse.Namespace) -> dict:
    """Hold `a.idle_conns` keep-alive connections to the variant and measure its RSS."""
    res: dict = {"conns": a.idle_conns}
    res["rss_before_mb"] = rss_bytes(v.pids()) / MIB
    argv = [
        "taskset",
        "-c",
        a.load_cpu,
        sys.executable,
        os.path.join(HERE, "idleconns.py"),
        "--port",
        str(v.port),
        "--conns",
        str(a.idle_conns),
        "--concurrency",
        str(a.idle_concurrency),
        "--timeout",
        "170",
    ]
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, preexec_fn=_die_with_parent
    )
    try:
        ready = proc.stdout.readline().strip()  # the client exits by itself within --timeout
        m = re.match(r"READY ok=(\d+) failed=(\d+) elapsed_s=([\d.]+) limit=(\d+)", ready)
        if not m:
            res["error"] = f"idle client said {ready!r}"
            return res
        res["held"], res["failed"] = int(m.group(1)), int(m.group(2))
        res["setup_s"], res["client_nofile"] = float(m.group(3)), int(m.group(4))
        time.sleep(1.0)  # let the proxy settle (buffers released, pool idle)
        samples = []
        for _ in range(5):
            samples.append(rss_bytes(v.pids()))
            time.sleep(0.2)
        res["rss_hold_mb"] = max(samples) / MIB
        proc.stdin.write("check\n")
        proc.stdin.flush()
        m = re.match(r"OPEN (\d+)", proc.stdout.readline().strip())
        res["open_at_check"] = int(m.group(1)) if m else None
        proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):  # killed below if still there
            proc.wait(timeout=30)
        time.sleep(1.0)
        res["rss_after_mb"] = rss_bytes(v.pids()) / MIB
        delta = res["rss_hold_mb"] - res["rss_before_mb"]
        res["kb_per_conn"] = delta * 1024 / res["held"] if res["held"] else None
        return res
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def ready_variants(variants: list[Variant], a: argparse.Namespace, meta: dict) -> list[Variant]:
    """The variants whose server answers and passes `validate` (each response kind once), their
    process trees noted in `meta`; the others are stopped and said so."""
    ready = []
    for v in variants:
        if v.server and not wait_ready(v.server, a.ready_timeout):
            log(
                f"SKIP {v.name}: not ready on 127.0.0.1:{v.port} "
                f"(exit {v.server.proc.poll()}; log: {v.server.log_path})"
            )
            v.server.stop()
            continue
        v.unsupported, fatal = validate(v.port)
        if fatal:
            log(f"SKIP {v.name}: {fatal}")
            continue
        for needs, why in v.unsupported.items():
            log(f"note: {v.name} skips scenarios needing {needs!r}: {why}")
        if v.access_log:
            os.truncate(v.access_log, 0)
        meta.setdefault("process_trees", {})[v.name] = [f"{p} {proc_name(p)}" for p in v.pids()]
        ready.append(v)
    return ready


# ---------------------------------------------------------------- environment
def render(src: str, dst: str, subs: dict[str, object]) -> None:
    with open(src) as f:
        s = f.read()
    for k, val in subs.items():
        s = s.replace(f"@{k}@", str(val))
    with open(dst, "w") as f:
        f.write(s)


def substitute(template: str, port: int, admin_port: int, origin_port: int) -> str:
    return (
        template.replace("{PORT}", str(port))
        .replace("{ADMIN_PORT}", str(admin_port))
        .replace("{UPSTREAM}", f"127.0.0.1:{origin_port}")
        .replace("{ORIGIN_PORT}", str(origin_port))
    )


def default_faultline_cmd() -> str:
    exe = shutil.which("faultline")
    prog = shlex.quote(exe) if exe else f"{shlex.quote(sys.executable)} -m proxy"
    return f"{prog} {FAULTLINE_ARGS}"


def command_dir(template: str) -> str:
    """Where a command template runs its proxy: DIR for `cd DIR && ...` (a copy of the
    sources, whose workers `python -m` from there), else "/"."""
    with contextlib.suppress(ValueError):
        words = shlex.split(template)
        if words[:1] == ["cd"] and words[2:3] == ["&&"]:
            return words[1]
    return "/"


def command_python(template: str) -> str:
    """The interpreter a candidate command runs under (for its versions), else ours."""
    try:
        words = shlex.split(template)
    except ValueError:
        return sys.executable
    if words[:1] == ["cd"] and words[2:3] == ["&&"]:
        del words[:3]
    while words and (words[0] == "env" or "=" in words[0]):
        words.pop(0)
    if not words:
        return sys.executable
    path = shutil.which(words[0]) or words[0]
    if os.path.basename(path).startswith("python"):
        return path
    try:
        with open(path, "rb") as f:
            first = f.readline().decode(errors="replace").strip()
    except OSError:
        return sys.executable
    if first.startswith("#!") and "python" in first:
        shebang = first[2:].split()
        return shebang[-1] if os.path.basename(shebang[0]) == "env" else shebang[0]
    return sys.executable


PROBE = """import json, platform
r = {"python": platform.python_version()}
for m in ("uvloop", "httptools", "h2"):
    try:
        r[m] = __import__(m).__version__
    except Exception:
        r[m] = None
try:
    from importlib.metadata import version
    r["faultline"] = version("faultline")
except Exception:
    r["faultline"] = None
try:
    try:
        from proxy.cli import compiled
    except ImportError:  # before the package root stopped importing its sub-packages
        from proxy import compiled
    r["faultline_build"] = "compiled" if compiled() else "interpreted"
except Exception:
    r["faultline_build"] = None
print(json.dumps(r))
"""


def first_line(argv: list[str]) -> str | None:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (p.stdout + p.stderr).strip()
    return text.splitlines()[0] if text else None


def machine_and_versions(fl_template: str) -> dict:
    info: dict = {"kernel": platform.release(), "cores": os.cpu_count(), "cpu": None}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ngx = first_line(["nginx", "-v"]) or ""
    info["nginx"] = ngx.rsplit("/", 1)[-1] if "/" in ngx else ngx
    ha = first_line(["haproxy", "-v"]) or ""
    m = re.search(r"version (\S+)", ha)
    info["haproxy"] = m.group(1) if m else ha
    wrk = first_line(["wrk", "-v"]) or ""
    m = re.match(r"wrk (\S+)", wrk)
    info["wrk"] = m.group(1) if m else wrk
    h2load = first_line(["h2load", "--version"]) or ""
    info["h2load"] = h2load.split()[-1] if h2load else None
    info["harness_python"] = platform.python_version()
    py = command_python(fl_template)
    info["faultline_python_path"] = py
    try:
        # Not from the repository: there `import proxy` would find the work tree, while the
        # faultline command imports whatever is installed (an editable install may point
        # at another checkout); but from DIR for `cd DIR && ...`, where the command runs.
        cwd = command_dir(fl_template)
        p = subprocess.run([py, "-c", PROBE], capture_output=True, text=True, timeout=20, cwd=cwd)
        info.update(json.loads(p.stdout))
    except (OSError, ValueError, subprocess.TimeoutExpired):
        info.update(
            python=None, uvloop=None, httptools=None, h2=None, faultline=None, faultline_build=None
        )
    rev = first_line(["git", "-C", REPO, "rev-parse", "--short", "HEAD"])
    if rev and re.fullmatch(r"[0-9a-f]+", rev):
        dirty = subprocess.run(
            ["git", "-C", REPO, "status", "--porcelain"], capture_output=True, text=True
        ).stdout.strip()
        info["git"] = rev + ("+dirty" if dirty else "")
    else:
        info["git"] = None
    return info


def nginx_http2(version: str) -> dict[str, str]:
    """How this nginx spells an h2c listener: `listen ... http2` before 1.25.1, `http2 on;` since
    (the old spelling still works there, with a warning)."""
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    new = bool(m) and tuple(map(int, m.groups())) >= (1, 25, 1)
    return {"LISTEN_HTTP2": "" if new else " http2", "HTTP2_ON": "http2 on;" if new else ""}


def h2c_twin(template: str) -> str | None:
    """The command of a Faultline's twin for the h2c -> h2c scenarios: the same command with its
    `http://{UPSTREAM}` made `h2c://{UPSTREAM}` ({UPSTREAM} is then the origin's h2c listener);
    None when the template does not name its upstream that way."""
    if "http://{UPSTREAM}" not in template:
        return None
    return template.replace("http://{UPSTREAM}", "h2c://{UPSTREAM}")


def nofile_limit() -> int:
    """The RLIMIT_NOFILE every server gets: our hard limit, capped at 65536."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return 65536
    return min(hard, 65536)


# ---------------------------------------------------------------- report
def med(vals: list) -> float | None:
    vals = [x for x in vals if x is not None]
    return statistics.median(vals) if vals else None


def lag_cell(m: dict) -> str:
    """'≤0.2/≤0.7': a Faultline's loop lag during the reps (bucket bounds; the worst rep)."""
    if m.get("lag_max") is None:
        return "-"
    return f"≤{bound(m['lag_p99'])}/≤{bound(m['lag_max'])}"


def bound(ms: float) -> str:
    """A histogram bucket's upper bound in ms, short: 0.07, 0.5, 1.5, 10, 150."""
    return f"{ms:.0f}" if ms >= 10 else f"{ms:.2g}"


def ratio(x: float | None, base: float | None) -> float | None:
    return x / base if x is not None and base else None


def num(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(headers: list[str], rows: list[list[str]], markdown: bool, left: int = 1) -> list[str]:
    """Fixed-width text (first `left` columns left-aligned) or a Markdown table."""
    if markdown:
        out = [
            "| " + " | ".join(headers) + " |",
            "|" + "|".join("---" if i < left else "---:" for i in range(len(headers))) + "|",
        ]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return out
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(headers)] + [line(r) for r in rows]


def summarize(results: dict, names: list[str]) -> dict:
    summary: dict = {}
    keys = (
        "rps",
        "mib_s",
        "p50",
        "p99",
        "p999",
        "us_per_req",
        "cpu_pct",
        "rss_mb",
        "core_pct",
        "load_pct",
        "loadavg",
    )
    for s, per in results.items():
        summary[s] = {}
        for n in names:
            runs = per.get(n, [])
            if not runs:
                continue
            m = {k: med([r.get(k) for r in runs]) for k in keys}
            maxima = [r["max"] for r in runs if r.get("max") is not None]
            m["max"] = max(maxima) if maxima else None  # the worst rep's, not a median
            lag_p99 = [r["lag_p99"] for r in runs if r.get("lag_p99") is not None]
            lag_max = [r["lag_max"] for r in runs if r.get("lag_max") is not None]
            m["lag_p99"] = max(lag_p99) if lag_p99 else None
            m["lag_max"] = max(lag_max) if lag_max else None
            m["errors"] = sum(r["errors"] for r in runs)
            logged = [r["access_log_bytes"] for r in runs if "access_log_bytes" in r]
            requests = sum(r["requests"] for r in runs if "access_log_bytes" in r)
            m["log_bytes_per_req"] = sum(logged) / requests if logged and requests else None
            m["rps_runs"] = [round(r["rps"]) for r in runs]
            m["procs"] = max(r.get("procs", 0) for r in runs)
            m["cpu_split"] = runs[-1].get("cpu_split", [])  # the last rep's
            waits = [r["cpu_wait_ms"] for r in runs if r.get("cpu_wait_ms") is not None]
            m["cpu_wait_ms"] = max(waits) if waits else None  # the worst rep's
            traced = [r["turns"] for r in runs if "p99" in r.get("turns", {})]
            if traced:  # medians of the reps, the worst rep's max
                m["turns"] = {k: med([t[k] for t in traced]) for k in ("p50", "p99", "events")}
                m["turns"]["max"] = max(t["max"] for t in traced)
            probes = [r["probe"] for r in runs if "series" in r.get("probe", {})]
            if probes:  # the reps' series pooled: ~100 samples a second of load
                lat = sorted(x[1] for p in probes for x in p["series"])
                elapsed = sum(p["elapsed_s"] for p in probes)
                m["probe"] = {
                    **{k: None if x is None else x / 1000 for k, q in PROBE_PCTS
                       for x in [pct(lat, q)]},
                    "answers": len(lat),
                    "errors": sum(p["errors"] for p in probes),
                    "cpu_pct": 100 * sum(p["cpu_s"] for p in probes) / elapsed if elapsed else None,
                    "max_runs": [p["lat_us"]["max"] / 1000 for p in probes if p["series"]],
                }  # fmt: skip
            summary[s][n] = m
    return summary


def nginx_row(scen: Scenario, summ: dict, n: str) -> dict:
    """The row a variant's "x nginx" ratios are taken against: nginx, or in a "w" scenario
    nginx with as many workers as the variant (nginx-w1 for direct)."""
    if scen.route != "w":
        return summ.get("nginx", {})
    m = re.search(r"-w(\d+)$", n)
    return summ.get(f"nginx-w{m.group(1) if m else WORKER_COUNTS[0]}", {})


def scenario_lines(
    s: str, summ: dict, names: list[str], a: argparse.Namespace, md: bool
) -> list[str]:
    scen = SCENARIOS[s]
    direct = summ.get("direct", {})
    headers = ["variant", "req/s", *(["MiB/s"] if scen.throughput else [])]
    busy = ["core%", "load%"]
    if scen.route == "w":  # everything on both CPUs: each CPU's busy
        busy = [f"cpu{a.proxy_cpu}%", f"cpu{a.load_cpu}%"]
    headers += [
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "loop lag p99/max ms",
        "CPU us/req",
        "cpu%",
        "RSS MB",
        "x nginx",
        "x direct",
        "p50 x nginx",
        "p99 x nginx",
        "CPU x nginx",
        *busy,
        "loadavg",
        "errors",
        "req/s per rep",
    ]
    rows = []
    for n in names:
        m = summ.get(n)
        if not m:
            continue
        ngx = nginx_row(scen, summ, n)
        rows.append(
            [n, num(m["rps"], ".0f")]
            + ([num(m["mib_s"], ".0f")] if scen.throughput else [])
            + [
                num(m["p50"], ".3f"),
                num(m["p99"], ".3f"),
                num(m["p999"], ".3f"),
                num(m["max"], ".3f"),
                lag_cell(m),
                num(m["us_per_req"], ".1f"),
                num(m["cpu_pct"], ".0f"),
                num(m["rss_mb"], ".1f"),
                num(ratio(m["rps"], ngx.get("rps")), ".2f"),
                num(ratio(m["rps"], direct.get("rps")), ".2f"),
                num(ratio(m["p50"], ngx.get("p50")), ".2f"),
                num(ratio(m["p99"], ngx.get("p99")), ".2f"),
                num(ratio(m["us_per_req"], ngx.get("us_per_req")), ".2f"),
                num(m["core_pct"], ".0f"),
                num(m["load_pct"], ".0f"),
                num(m["loadavg"], ".1f"),
                str(m["errors"]),
                " ".join(map(str, m["rps_runs"])),
            ]
        )
    title = f"{s}: {scen.desc}; median of {a.reps} x {a.duration} s"
    head = [f"### {title}", ""] if md else [f"[{title}]"]
    out = head + table(headers, rows, md) + [""]
    if any("probe" in summ.get(n, {}) for n in names):
        out += probe_lines(s, summ, names, a, md)
    if scen.route == "w":
        out += workers_lines(s, summ, md)
    return out


def probe_lines(s: str, summ: dict, names: list[str], a: argparse.Namespace, md: bool) -> list[str]:
    """The 1-connection latency series beside the load (latprobe.py), every variant, next to
    the loop lag the Faultline variants report themselves and wrk's own tail."""
    scen = SCENARIOS[s]
    headers = [
        "variant",
        "probe answers",
        "probe p50 ms",
        "probe p99 ms",
        "probe p99.9 ms",
        "probe max ms",
        "p50 x nginx",
        "p99 x nginx",
        "max x nginx",
        "p99/max over nginx ms",
        "loop lag p99/max ms",
        "turn p50/p99/max ms",
        "turn p99 x nginx",
        "events a poll",
        "CPU wait ms",
        "wrk p99 ms",
        "wrk max ms",
        "probe max per rep",
        "probe cpu%",
        "probe errors",
    ]
    rows = []
    for n in names:
        m = summ.get(n, {})
        p = m.get("probe")
        if not p:
            continue
        base = nginx_row(scen, summ, n).get("probe", {})
        base_t = nginx_row(scen, summ, n).get("turns", {})
        rows.append(
            [
                n,
                str(p["answers"]),
                num(p["p50"], ".3f"),
                num(p["p99"], ".3f"),
                num(p["p999"], ".3f"),
                num(p["max"], ".3f"),
                num(ratio(p["p50"], base.get("p50")), ".2f"),
                num(ratio(p["p99"], base.get("p99")), ".2f"),
                num(ratio(p["max"], base.get("max")), ".2f"),
                excess(p, base),
                lag_cell(m),
                turn_cell(m),
                num(ratio(m.get("turns", {}).get("p99"), base_t.get("p99")), ".2f"),
                num(m.get("turns", {}).get("events"), ".1f"),
                num(m.get("cpu_wait_ms"), ".1f"),
                num(m["p99"], ".3f"),
                num(m["max"], ".3f"),
                " ".join(f"{x:.2f}" for x in p["max_runs"]),
                num(p["cpu_pct"], ".1f"),
                str(p["errors"]),
            ]
        )
    title = (
        f"{s} probe: one more keep-alive connection, one GET every {a.probe_interval:g} ms "
        f"beside the load (sched {a.probe_sched}); latencies pooled over the reps"
    )
    head = [f"#### {title}", ""] if md else [f"[{title}]"]
    return head + table(headers, rows, md) + [""]


def turn_cell(m: dict) -> str:
    """'0.150/0.240/0.400': the loop's turns from outside (bench/turns.py), every variant."""
    t = m.get("turns")
    if not t:
        return "-"
    return "/".join(f"{t[k]:.3f}" for k in ("p50", "p99", "max"))


def excess(p: dict, base: dict) -> str:
    """'+0.12/+0.40': how much later than nginx's probe this one's p99 and max came (ms), to
    hold against the loop lag (a request waits for the loop twice: request and response)."""
    if base.get("max") is None or p.get("max") is None or p is base:
        return "-"
    return f"{p['p99'] - base['p99']:+.2f}/{p['max'] - base['max']:+.2f}"


def worker_gains(summ: dict) -> dict[str, dict]:
    """Per proxy with a -w1 and a -w2 row: its gain from 1 to 2 workers (req/s ratio, the
    median reps' and each round's) and how its CPU per request moved."""
    lo, hi = WORKER_COUNTS
    out: dict[str, dict] = {}
    for n in summ:
        if not n.endswith(f"-w{lo}") or n[: -len(f"-w{lo}")] + f"-w{hi}" not in summ:
            continue
        proxy = n[: -len(f"-w{lo}")]
        one, two = summ[n], summ[f"{proxy}-w{hi}"]
        per_round = [
            b / x for x, b in zip(one["rps_runs"], two["rps_runs"], strict=False) if x
        ]  # the same round of the interleaved reps: w1 and w2 ran seconds apart
        out[proxy] = {
            "w1": one["rps"],
            "w2": two["rps"],
            "gain": ratio(two["rps"], one["rps"]),
            "gain_runs": per_round,
            "cpu_w1": one["us_per_req"],
            "cpu_w2": two["us_per_req"],
            "cpu_growth": ratio(two["us_per_req"], one["us_per_req"]),
            "procs": f"{one['procs']}/{two['procs']}",
            "split": "/".join(map(str, two.get("cpu_split", []))),
        }
    return out


def workers_lines(s: str, summ: dict, md: bool) -> list[str]:
    lo, hi = WORKER_COUNTS
    gains = worker_gains(summ)
    ngx = gains.get("nginx", {})
    headers = [
        "proxy",
        f"w{lo} req/s",
        f"w{hi} req/s",
        "gain",
        "gain x nginx's",
        "gain per round",
        f"CPU us/req w{lo}",
        f"CPU us/req w{hi}",
        f"CPU w{hi}/w{lo}",
        "processes",
        f"w{hi} CPU split %",
    ]
    rows = [
        [
            p,
            num(g["w1"], ".0f"),
            num(g["w2"], ".0f"),
            num(g["gain"], ".2f"),
            num(ratio(g["gain"], ngx.get("gain")), ".2f"),
            " ".join(f"{x:.2f}" for x in g["gain_runs"]),
            num(g["cpu_w1"], ".1f"),
            num(g["cpu_w2"], ".1f"),
            num(g["cpu_growth"], ".2f"),
            g["procs"],
            g["split"] or "-",
        ]
        for p, g in gains.items()
    ]
    title = f"{s}: the gain from {lo} to {hi} workers (w{hi} req/s / w{lo} req/s)"
    head = [f"#### {title}", ""] if md else [f"[{title}]"]
    return head + table(headers, rows, md) + [""]


def idle_lines(idle: dict, a: argparse.Namespace, md: bool) -> list[str]:
    ngx = idle.get("nginx", {}).get("rss_hold_mb")
    headers = [
        "variant",
        "held",
        "open at check",
        "RSS before MB",
        "RSS holding MB",
        "RSS after close MB",
        "KB/conn",
        "x nginx",
        "setup s",
    ]
    rows = []
    for n, r in idle.items():
        if "error" in r:
            before = num(r.get("rss_before_mb"), ".1f")
            rows.append([n, "-", "-", before, "-", "-", "-", "-", r["error"][:40]])
            continue
        rows.append(
            [
                n,
                f"{r['held']}/{r['conns']}",
                num(r.get("open_at_check"), "d"),
                num(r["rss_before_mb"], ".1f"),
                num(r["rss_hold_mb"], ".1f"),
                num(r.get("rss_after_mb"), ".1f"),
                num(r.get("kb_per_conn"), ".1f"),
                num(ratio(r["rss_hold_mb"], ngx), ".2f"),
                num(r["setup_s"], ".1f"),
            ]
        )
    title = (
        f"idle10k: {a.idle_conns} idle keep-alive connections, one GET each, then held; "
        "RSS of the proxy's process tree"
    )
    head = [f"### {title}", ""] if md else [f"[{title}]"]
    return head + table(headers, rows, md) + [""]


def memory_lines(rss_after: dict, hwm: dict, md: bool) -> list[str]:
    headers = ["variant", "RSS after load MB", "peak RSS (VmHWM) MB"]
    rows = [[n, num(rss_after.get(n), ".1f"), num(hwm.get(n), ".1f")] for n in rss_after]
    title = "memory: RSS of each proxy's process tree after the load scenarios; peak over the run"
    head = [f"### {title}", ""] if md else [f"[{title}]"]
    return head + table(headers, rows, md) + [""]


def check_targets(summary: dict, idle: dict, rss_after: dict, fl: str, off: str) -> list[str]:
    """Issue 6's targets (and issue 19's for HTTP/2) as PASS/FAIL/SKIP lines."""
    out = []

    def get(s: str, n: str, k: str) -> float | None:
        return summary.get(s, {}).get(n, {}).get(k)

    def verdict(ok: bool | None, text: str) -> None:
        out.append(f"{'SKIP' if ok is None else 'PASS' if ok else 'FAIL'}  {text}")

    def vs_nginx(s: str, k: str, label: str, limit: float, higher_better: bool, spec: str) -> None:
        x, base = get(s, fl, k), get(s, "nginx", k)
        r = ratio(x, base)
        sign = ">=" if higher_better else "<="
        text = f"{s}: {fl} {label} {sign} {limit}x nginx's"
        if r is None:
            verdict(None, text + " (no data)")
            return
        verdict(
            r >= limit if higher_better else r <= limit,
            f"{text}: {r:.2f}x ({format(x, spec)} vs {format(base, spec)})",
        )

    vs_nginx("small-c50", "rps", "req/s", TARGET_RPS_X_NGINX, True, ".0f")
    vs_nginx("small-c50", "us_per_req", "CPU us/req", TARGET_CPU_X_NGINX, False, ".1f")
    vs_nginx("small-c1", "p50", "median latency (ms)", TARGET_P50_X_NGINX, False, ".3f")
    vs_nginx("1m-c8", "mib_s", "throughput (MiB/s)", TARGET_1M_X_NGINX, True, ".0f")
    vs_nginx("h2-c50m10", "rps", "req/s", TARGET_H2_RPS_X_NGINX, True, ".0f")
    vs_nginx("h2h2-c50m10", "rps", "req/s", TARGET_H2_RPS_X_NGINX, True, ".0f")

    on, offv = get("small-c50", fl, "rps"), get("small-c50", off, "rps")
    text = f"small-c50: diagnostics cost <= {TARGET_DIAG_COST:.0%} of req/s ({fl} vs {off})"
    if on is None or not offv:
        verdict(None, text + " (no data)")
    else:
        cost = 1 - on / offv
        extra = ""
        cpu_on, cpu_off = get("small-c50", fl, "us_per_req"), get("small-c50", off, "us_per_req")
        if cpu_on and cpu_off:
            extra = f"; CPU/req {cpu_on / cpu_off - 1:+.0%}"
        verdict(cost <= TARGET_DIAG_COST, f"{text}: {cost:+.1%} ({on:.0f} vs {offv:.0f}{extra})")

    lag = summary.get("small-c50", {}).get(fl, {})
    probe = lag.get("probe") or {}
    outside = (
        f"; probe p99 {probe['p99']:.3f} ms, max {probe['max']:.3f} ms"
        if probe.get("max") is not None
        else ""
    )
    if lag.get("cpu_wait_ms") is not None:
        outside += f"; waited for its CPU up to {lag['cpu_wait_ms']:.1f} ms a rep"
    for key, limit in (("lag_max", TARGET_LAG_MAX_MS), ("lag_p99", TARGET_LAG_P99_MS)):
        text = f"small-c50: {fl} event-loop lag {key[4:]} <= {limit} ms"
        x = lag.get(key)
        if x is None:
            verdict(None, text + " (no data)")
        else:  # the histogram gives a bucket's upper bound: the lag is at most this
            verdict(x <= limit, f"{text}: <= {bound(x)} ms (histogram bucket){outside}")
    ngx_t = summary.get("small-c50", {}).get("nginx", {}).get("turns", {})
    fl_t = lag.get("turns", {})
    if ngx_t and fl_t:  # the same instrument for both: how long a loop turn is, p99 and max
        out.append(
            f"NOTE  small-c50 loop turns (perf, every proxy alike): nginx p99 "
            f"{ngx_t['p99']:.3f} max {ngx_t['max']:.3f} ms, {fl} p99 {fl_t['p99']:.3f} max "
            f"{fl_t['max']:.3f} ms ({fl_t['p99'] / ngx_t['p99']:.2f}x nginx's p99)"
        )
    for scen in ("small-c50", "16k-c50"):  # the same work: nginx with Faultline's access log
        x, logged = get(scen, fl, "rps"), get(scen, "nginx-log", "rps")
        if x and logged:
            cost = ratio(logged, get(scen, "nginx", "rps"))
            out.append(
                f"NOTE  {scen}: {fl} makes {x / logged:.2f}x the req/s of nginx with the same "
                f"JSON access log (nginx-log, {logged:.0f} req/s"
                + (f", {cost:.2f}x nginx's without one)" if cost else ")")
            )
    calm = summary.get("small-r2k", {})
    if calm.get(fl, {}).get("lag_p99") is not None:  # the same bars, below saturation
        m = calm[fl]
        text = (
            f"small-r2k ({m['rps']:.0f} req/s): {fl} event-loop lag p99 <= {bound(m['lag_p99'])}"
            f" ms, max <= {bound(m['lag_max'])} ms"
        )
        turned = [f"{n} {calm[n]['turns']['p99']:.3f}" for n in calm if calm[n].get("turns")]
        out.append(f"NOTE  {text}" + (f"; turn p99 ms: {', '.join(turned)}" if turned else ""))

    gains = worker_gains(summary.get("small-c50-w2", {}))
    lo, hi = WORKER_COUNTS
    fl_w = FAULTLINE  # the w rows run the default command (--workers-cmd)
    text = (
        f"small-c50-w2: {fl_w}'s gain from {lo} to {hi} workers >= "
        f"{TARGET_WORKERS_GAIN_X_NGINX}x nginx's"
    )
    g, gn = gains.get(fl_w, {}).get("gain"), gains.get("nginx", {}).get("gain")
    if g is None or not gn:
        verdict(None, text + " (no data)")
    else:
        verdict(
            g / gn >= TARGET_WORKERS_GAIN_X_NGINX,
            f"{text}: {g / gn:.2f}x ({g:.2f} vs {gn:.2f})",
        )

    rss = rss_after.get(fl)
    text = f"{fl} RSS after the load scenarios <= {TARGET_RSS_AFTER_MB:.0f} MB"
    verdict(
        None if rss is None else rss <= TARGET_RSS_AFTER_MB,
        text + (" (no data)" if rss is None else f": {rss:.1f} MB"),
    )

    r = idle.get(fl)
    text = f"{fl} RSS holding idle keep-alive connections <= {TARGET_RSS_IDLE_MB:.0f} MB"
    if not r or "rss_hold_mb" not in r:
        verdict(None, text + " (no data)")
    else:
        complete = r["held"] == r["conns"] and r.get("open_at_check") == r["conns"]
        note = (
            ""
            if complete
            else (
                f" -- {r['held']} of {r['conns']} established, "
                f"{r.get('open_at_check')} still open at the check"
            )
        )
        verdict(
            r["rss_hold_mb"] <= TARGET_RSS_IDLE_MB and complete,
            f"{text}: {r['rss_hold_mb']:.1f} MB with {r['conns']} connections{note}",
        )
    return out


def report(
    meta: dict,
    summary: dict,
    idle: dict,
    rss_after: dict,
    hwm: dict,
    checks: list[str],
    names: list[str],
    a: argparse.Namespace,
    md: bool,
) -> str:
    v = meta["versions"]
    lines = []
    if md:
        lines += ["## Faultline benchmark", ""]
    machine = (
        f"machine: {v['cpu']}, {v['cores']} cores; kernel {v['kernel']}; proxy on CPU "
        f"{a.proxy_cpu}, origin + wrk/h2load on CPU {a.load_cpu}"
    )
    if any(SCENARIOS[s].route == "w" for s in summary):
        machine += (
            f"; workers scenarios: origin (2 workers), wrk (2 threads), probe and proxies "
            f"all on CPUs {a.both_cpus}"
        )
    own = (FAULTLINE, FAULTLINE_OFF, *(f"{FAULTLINE}-w{k}" for k in WORKER_COUNTS))
    ran = "" if set(own) & set(names) else " -- not run, candidates only"
    vers = (
        f"versions: faultline {v['faultline'] or '(not installed)'} "
        f"({v.get('faultline_build') or 'build unknown'}, git {v['git']}{ran}), "
        f"python {v['python']}, "
        f"uvloop {v['uvloop']}, httptools {v['httptools']}; nginx {v['nginx']}, "
        f"haproxy {v['haproxy']}, wrk {v['wrk']}, h2load {v.get('h2load')}, h2 {v.get('h2')}"
    )
    cmd = f"command: {meta['command']}"
    when = (
        f"date: {meta['date']}; {a.reps} rep(s) x {a.duration} s per variant and scenario, "
        "interleaved; load average (1, 5, 15 min) "
        + " at start, ".join(
            " ".join(f"{x:.2f}" for x in meta[k]) for k in ("loadavg_start", "loadavg_end")
        )
        + " at end"
    )
    if md:
        lines += [f"- {machine}", f"- {vers}", f"- command: `{meta['command']}`", f"- {when}", ""]
    else:
        lines += [machine, vers, cmd, when, ""]
    for s in summary:
        lines += scenario_lines(s, summary[s], names, a, md)
    if idle:
        lines += idle_lines(idle, a, md)
    if rss_after:
        lines += memory_lines(rss_after, hwm, md)
    if md:
        lines += ["### Targets (issues 6, 19 and 20)", "", "```", *checks, "```", ""]
    else:
        lines += ["[targets (issues 6, 19 and 20)]", *checks, ""]
    notes = [
        "CPU us/req and cpu% = utime+stime of the proxy's process tree during the run / requests;",
        "softirq work for loopback TCP is not charged to it. core% / load% = whole-CPU busy",
        "(incl. softirq and anything else running) of the proxy CPU / the load CPU (origin+wrk):",
        "load% near 100 means the load side, not the proxy, limits req/s. RSS MB = peak during",
        "the run. Figures are noisy on a shared 2-core box: compare ratios within one run.",
        "loadavg = the 1-minute load average at the end of each run (median), the benchmark's",
        "own 2 or so included: above 3 someone else was busy on the box.",
        "h2c scenarios: h2load, 1 thread; p50/p99 from its per-request log.",
        "probe = one more keep-alive connection beside the load, one GET every "
        f"{a.probe_interval:g} ms (bench/latprobe.py, sched {a.probe_sched}), on the load CPU "
        "(both CPUs in the workers scenarios); its latencies are pooled over the reps.",
        "loop lag = the Faultline variant's own faultline_event_loop_lag_seconds samples taken "
        "during the reps (/metrics before and after each), as the upper bound of the bucket "
        "their p99 and max fall in, the worst rep's; in the workers scenarios it includes the "
        "time a worker waited for a CPU (every process shares both).",
        "turn = the time a proxy's event loop spends between two polls (epoll_wait return to "
        "the next call), traced the same way for every variant from 1 s into each rep to 1 s "
        "before its end (bench/turns.py, perf tracepoints); an event that becomes ready, or a "
        "timer that falls due, during a turn waits for the rest of it. p50/p99 are the reps' "
        "medians, max the worst rep's; events a poll = what one epoll_wait returned, mean.",
        "CPU wait = how long the proxy's threads were runnable but waiting for a CPU during a "
        "rep (the kernel's schedstat), the worst rep's: time the pinned proxy lost to anything "
        "else running on its CPU (kernel threads, neighbours). It explains a loop-lag or probe "
        "maximum far above the rest.",
        "workers scenarios: PROXY-wN runs N workers (nginx worker_processes, faultline "
        "--workers); x nginx compares with nginx-wN; gain = w2 req/s / w1 req/s; CPU w2/w1 = "
        "how much more CPU a request costs with 2 workers.",
    ]
    for n in names:  # show that the access log was really written (or not)
        per_req = [summary[s][n].get("log_bytes_per_req") for s in summary if n in summary[s]]
        per_req = [x for x in per_req if x is not None]
        if per_req:
            warn = ""
            if n == FAULTLINE and not any(per_req):
                warn = " WARNING: nothing logged -- is the access log on?"
            elif n == FAULTLINE_OFF and any(per_req):
                warn = " WARNING: it logs although its access log should be off."
            notes.append(
                f"{n} wrote {statistics.median(per_req):.0f} bytes of access log per request "
                f"({'to a file' if n == 'nginx-log' else 'to stdout'}, median over "
                f"scenarios).{warn}"
            )
    if md:
        lines += ["> " + " ".join(notes[:8]), "", *(f"- {n}" for n in notes[8:])]  # 8: the prose
    else:
        lines += notes
    return "\n".join(lines)


# ---------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Command templates (--faultline-cmd, --candidate) are run as "
        "`taskset -c PROXY_CPU prlimit --nofile=N:N bash -c COMMAND` from the repository "
        "root, with {PORT} (listen port on 127.0.0.1), {ADMIN_PORT}, {UPSTREAM} (origin "
        "host:port) and {ORIGIN_PORT} substituted. For the h2c -> h2c scenarios each such command "
        "also runs as a twin process with `http://{UPSTREAM}` made `h2c://{UPSTREAM}`, "
        "pointing at the origin's h2c listener.",
    )
    ap.add_argument("--duration", type=int, help="seconds per measured run (default 8; quick 2)")
    ap.add_argument("--reps", type=int, help="repetitions per variant (default 3; quick 1)")
    ap.add_argument(
        "--warmup",
        type=int,
        help="seconds of load per variant before each scenario's reps (default 1)",
    )
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: --duration 2 --reps 1 unless given"
    )
    ap.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help="comma list from: " + ", ".join(SCENARIOS)
    )
    ap.add_argument(
        "--variants",
        help="comma list to run (default: direct,nginx,haproxy,faultline,"
        "faultline-nodiag and every --candidate)",
    )
    ap.add_argument(
        "--faultline-cmd",
        default=None,
        help=f"command template for Faultline (default: `faultline {FAULTLINE_ARGS}` "
        "if on PATH, else `PYTHON -m proxy ...` from the repository root)",
    )
    ap.add_argument(
        "--nodiag-env",
        action="append",
        metavar="KEY=VALUE",
        help="environment of the faultline-nodiag variant (repeatable; default "
        + " ".join(DEFAULT_NODIAG_ENV)
        + ")",
    )
    ap.add_argument(
        "--access-log",
        choices=("file", "devnull"),
        default="file",
        help="where faultline's stdout (the access log) goes: a file in the run dir, "
        "emptied after each run (default), or /dev/null",
    )
    ap.add_argument(
        "--candidate",
        action="append",
        default=[],
        metavar="NAME=COMMAND",
        help="an extra proxy to measure (repeatable), a command template as above",
    )
    ap.add_argument(
        "--workers-cmd",
        help="command template for the Faultline rows of the --workers scenarios, with "
        "{WORKERS} (1 or 2) besides the others (default: the Faultline command "
        "followed by `--workers {WORKERS}`)",
    )
    ap.add_argument(
        "--probe-sched",
        choices=("fifo", "normal", "off"),
        default="fifo",
        help="the 1-connection latency probe beside the load of small-c50 and small-c50-w2: "
        "under SCHED_FIFO priority 1 (chrt; default: its own wake-ups then do not queue "
        "behind wrk and the origin), under the normal scheduler, or not at all",
    )
    ap.add_argument(
        "--turns",
        choices=("on", "off"),
        default="on",
        help="trace every variant's event-loop turns during small-c50, small-r2k and small-c50-w2 "
        "(bench/turns.py, perf's epoll_wait tracepoints; skipped with a note where perf "
        "cannot trace): the loop lag of nginx and HAProxy measured as Faultline's",
    )
    ap.add_argument(
        "--probe-interval",
        type=float,
        default=10.0,
        metavar="MS",
        help="the probe's period: one GET every MS milliseconds (default 10)",
    )
    ap.add_argument(
        "--base-port",
        type=int,
        default=39500,
        help="first of the ports used on 127.0.0.1 (default 39500; uses up to +71)",
    )
    ap.add_argument("--proxy-cpu", default="1")
    ap.add_argument("--load-cpu", default="0")
    ap.add_argument(
        "--both-cpus",
        help="the CPUs of everything in the --workers scenarios (default LOAD_CPU,PROXY_CPU)",
    )
    ap.add_argument("--idle-conns", type=int, default=10000)
    ap.add_argument(
        "--idle-concurrency",
        type=int,
        default=50,
        help="requests in flight while the idle connections are set up",
    )
    ap.add_argument("--ready-timeout", type=float, default=30)
    ap.add_argument("--out", help="run directory (default: a new /tmp/faultline-bench.XXXX)")
    ap.add_argument(
        "--markdown",
        action="store_true",
        help="print the report as Markdown (for bench/RESULTS.md)",
    )
    ap.add_argument("--strict", action="store_true", help="exit 1 if a target FAILs")
    ap.add_argument(
        "--target",
        default=FAULTLINE,
        metavar="NAME",
        help=f"the variant the targets are checked for (default {FAULTLINE}; e.g. a candidate)",
    )
    a = ap.parse_args(argv)
    a.duration = a.duration or (2 if a.quick else 8)
    a.reps = a.reps or (1 if a.quick else 3)
    a.warmup = 1 if a.warmup is None else a.warmup
    a.both_cpus = a.both_cpus or f"{a.load_cpu},{a.proxy_cpu}"
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    scens = [s for s in a.scenarios.split(",") if s]
    unknown = [s for s in scens if s not in SCENARIOS]
    if unknown:
        log(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")
        return 2
    routes = {SCENARIOS[s].route for s in scens}
    pinned = bool(routes - {"w"})  # scenarios with the proxy alone on the proxy CPU
    tools = ["nginx", "haproxy", "wrk", "taskset", "prlimit", "bash"]
    tools += ["h2load"] if routes & {"h2", "h2h2"} else []
    tools += ["chrt"] if a.probe_sched == "fifo" else []
    for tool in tools:
        if not shutil.which(tool):
            log(
                f"missing tool: {tool} "
                "(apt-get install -y nginx-light haproxy wrk nghttp2-client util-linux)"
            )
            return 2
    fl_cmd = a.faultline_cmd or default_faultline_cmd()
    a.workers_cmd = a.workers_cmd or f"{fl_cmd} --workers {{WORKERS}}"
    if a.probe_sched == "fifo" and subprocess.run(["chrt", "-f", "1", "true"]).returncode:
        log("note: chrt -f (SCHED_FIFO) not permitted here; the probe runs under the normal one")
        a.probe_sched = "normal"
    if a.turns == "on" and (why := turns.available()):
        log(f"note: loop turns not traced: {why}")
        a.turns = "off"
    nodiag_env = dict(kv.split("=", 1) for kv in (a.nodiag_env or DEFAULT_NODIAG_ENV))
    candidates = []
    for c in a.candidate:
        name, sep, cmd = c.partition("=")
        if not sep or not name.strip():
            log(f"--candidate must be NAME=COMMAND: {c!r}")
            return 2
        candidates.append((name.strip(), cmd))
    wanted = (
        a.variants.split(",")
        if a.variants
        else [*PEERS, FAULTLINE, FAULTLINE_OFF, *(n for n, _ in candidates)]
    )

    rundir = (
        os.path.abspath(a.out) if a.out else tempfile.mkdtemp(prefix="faultline-bench.", dir="/tmp")
    )
    # nginx's workers drop root for an unprivileged user: it must be able to read the files.
    os.makedirs(rundir, exist_ok=True)
    os.chmod(rundir, 0o755)
    a.rundir = rundir
    for d in ("docroot", "tmp-origin", "tmp-proxy", "tmp-proxy-body"):
        os.makedirs(os.path.join(rundir, d), exist_ok=True)
    for fname, data in (("16k.bin", BODY_16K), ("1m.bin", BODY_1M)):
        with open(os.path.join(rundir, "docroot", fname), "wb") as f:
            f.write(data)

    bp = a.base_port
    ports = {
        "origin": bp,
        "nginx": bp + 1,
        "haproxy": bp + 2,
        "nginx-log": bp + 36,
        "nginx-log-h2": bp + 37,
        "nginx-log-h2h2": bp + 38,
        "origin-h2c": bp + 7,
        "nginx-h2": bp + 8,
        "nginx-h2h2": bp + 9,
        "haproxy-h2": bp + 30,
        "haproxy-h2h2": bp + 31,
    }
    # (name, command, port, admin port, env, access log path, route): route "h1" serves the
    # HTTP/1.1 and the h2c -> HTTP/1.1 scenarios on one port, "h2h2" is the twin with an h2c
    # upstream (its own process) for the h2c -> h2c scenarios.
    fl_specs: list[tuple[str, str, int, int, dict[str, str], str | None, str]] = []
    access_log = (
        (lambda n: os.path.join(rundir, f"{n}.access.log"))
        if a.access_log == "file"
        else (lambda n: "/dev/null")
    )
    if FAULTLINE in wanted and pinned:
        fl_specs.append((FAULTLINE, fl_cmd, bp + 3, bp + 4, {}, access_log(FAULTLINE), "h1"))
    if FAULTLINE_OFF in wanted and pinned:
        fl_specs.append(
            (FAULTLINE_OFF, fl_cmd, bp + 5, bp + 6, nodiag_env, access_log(FAULTLINE_OFF), "h1")
        )
    for i, (name, cmd) in enumerate(candidates):
        if name in wanted and pinned:
            fl_specs.append(
                (name, cmd, bp + 10 + 2 * i, bp + 11 + 2 * i, {}, access_log(name), "h1")
            )
    if "h2h2" in routes:
        twin_ports = {FAULTLINE: bp + 32, FAULTLINE_OFF: bp + 34}
        twin_ports |= {name: bp + 40 + 2 * i for i, (name, _) in enumerate(candidates)}
        for name, cmd, _port, _admin, env, alog, _route in list(fl_specs):
            twin = h2c_twin(cmd)
            if twin is None:
                log(f"note: {name} has no h2c twin: its command has no http://{{UPSTREAM}}")
                continue
            tp = twin_ports[name]
            talog = access_log(f"{name}-h2c") if alog else None
            fl_specs.append((name, twin, tp, tp + 1, env, talog, "h2h2"))
    # The "w" scenarios' servers, all on both CPUs: an origin with 2 workers, nginx and
    # Faultline with each worker count (PROXY-wN; `--variants nginx` takes them all).
    w_ports = {"origin-w": bp + 60, "origin-w-h2c": bp + 61}
    w_specs: list[tuple[str, str, int, int]] = []  # (name, proxy, workers, port)
    if "w" in routes:
        for i, k in enumerate(WORKER_COUNTS):
            for proxy, port in (("nginx", bp + 62 + 3 * i), (FAULTLINE, bp + 68 + 2 * i)):
                if proxy in wanted or f"{proxy}-w{k}" in wanted:
                    w_specs.append((f"{proxy}-w{k}", proxy, k, port))
    used = [ports["origin"], ports["origin-h2c"]]
    used += [p for k, p in ports.items() if k.split("-")[0] in wanted and pinned]
    used += [p for spec in fl_specs for p in spec[2:4]]
    if "w" in routes:
        used += list(w_ports.values())
        for _name, proxy, _k, port in w_specs:
            used += [port, port + 1, port + 2] if proxy == "nginx" else [port, port + 1]
    busy = wait_ports_free(used)
    if busy:
        log(f"ports busy on 127.0.0.1: {busy}; pick another --base-port")
        return 2

    nofile = nofile_limit()
    worker_conns = max(1024, nofile - 200)
    versions = machine_and_versions(fl_cmd)
    subs = {
        "RUN": rundir,
        "ORIGIN_PORT": ports["origin"],
        "H2C_ORIGIN_PORT": ports["origin-h2c"],
        "NOFILE": nofile,
        "WORKER_CONNECTIONS": worker_conns,
        "MAXCONN": a.idle_conns + 1000,
        "WORKERS": 1,
        **nginx_http2(versions["nginx"]),
    }
    render(
        os.path.join(HERE, "nginx-origin.conf"),
        os.path.join(rundir, "nginx-origin.conf"),
        {**subs, "NAME": "origin"},
    )
    for name, conf, access in (
        ("nginx", "nginx-proxy", "access_log off;"),
        ("nginx-log", "nginx-log", NGINX_JSON_LOG.replace("@RUN@", rundir)),
    ):
        render(
            os.path.join(HERE, "nginx-proxy.conf"),
            os.path.join(rundir, f"{conf}.conf"),
            {**subs, "PORT": ports[name], "H2_PORT": ports[f"{name}-h2"],
             "H2H2_PORT": ports[f"{name}-h2h2"], "NAME": conf, "ACCESS_LOG": access},
        )  # fmt: skip
    if "w" in routes:
        w_subs = {**subs, "ORIGIN_PORT": w_ports["origin-w"],
                  "H2C_ORIGIN_PORT": w_ports["origin-w-h2c"]}  # fmt: skip
        render(
            os.path.join(HERE, "nginx-origin.conf"),
            os.path.join(rundir, "nginx-origin-w.conf"),
            {**w_subs, "NAME": "origin-w", "WORKERS": max(WORKER_COUNTS)},
        )
        for name, proxy, k, port in w_specs:
            if proxy == "nginx":
                render(
                    os.path.join(HERE, "nginx-proxy.conf"),
                    os.path.join(rundir, f"{name}.conf"),
                    {**w_subs, "NAME": name, "WORKERS": k, "PORT": port, "H2_PORT": port + 1,
                     "H2H2_PORT": port + 2, "ACCESS_LOG": "access_log off;"},
                )  # fmt: skip
    render(
        os.path.join(HERE, "haproxy.cfg"),
        os.path.join(rundir, "haproxy.cfg"),
        {**subs, "PORT": ports["haproxy"], "H2_PORT": ports["haproxy-h2"],
         "H2H2_PORT": ports["haproxy-h2h2"]},
    )  # fmt: skip

    meta = {
        "command": shlex.join([os.path.basename(sys.executable), *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "rundir": rundir,
        "faultline_cmd": fl_cmd,
        "workers_cmd": a.workers_cmd,
        "probe": {"sched": a.probe_sched, "interval_ms": a.probe_interval},
        "nodiag_env": nodiag_env,
        "nofile": nofile,
        "versions": versions,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "faultline_env": {k: v for k, v in os.environ.items() if k.startswith("FAULTLINE_")},
    }

    def on_signal(signum: int, _frame: object) -> None:
        log(f"signal {signum}: stopping servers")
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    # Ctrl-C stops the run even when started from a shell that ignores SIGINT in the background
    signal.signal(signal.SIGINT, signal.default_int_handler)
    results: dict = {s: {} for s in scens if SCENARIOS[s].kind != "idle"}
    idle: dict = {}
    rss_after: dict = {}
    hwm: dict = {}
    names: list[str] = []
    try:

        def ngx(conf: str, name: str) -> list[str]:
            return [
                "nginx",
                "-p",
                rundir,
                "-e",
                os.path.join(rundir, f"{name}-error.log"),
                "-c",
                os.path.join(rundir, conf),
                "-g",
                "daemon off;",
            ]

        origin = Server(
            "origin",
            ngx("nginx-origin.conf", "origin"),
            ports["origin"],
            a.load_cpu,
            rundir,
            nofile,
        )
        if not wait_ready(origin, a.ready_timeout):
            log(f"origin did not start; see {rundir}/origin.log and origin-error.log")
            return 1
        # One list of variants per route (ROUTES); a proxy's variants share its server.
        by_route: dict[str, list[Variant]] = {r: [] for r in ROUTES}
        twins: list[Variant] = []  # Faultline processes with an h2c upstream (route h2h2)
        if "direct" in wanted and pinned:
            by_route["h1"].append(Variant("direct", ports["origin"], None))
            by_route["h2h2"].append(Variant("direct", ports["origin-h2c"], None))
        peers = {
            "nginx": ngx("nginx-proxy.conf", "nginx-proxy"),
            "nginx-log": ngx("nginx-log.conf", "nginx-log"),
            "haproxy": ["haproxy", "-db", "-f", os.path.join(rundir, "haproxy.cfg")],
        }
        for name, peer_argv in peers.items():
            if name in wanted and pinned:
                srv = Server(name, peer_argv, ports[name], a.proxy_cpu, rundir, nofile)
                alog = os.path.join(rundir, "nginx-log.access.log") if name == "nginx-log" else None
                by_route["h1"].append(Variant(name, ports[name], srv, access_log=alog))
                by_route["h2"].append(Variant(name, ports[f"{name}-h2"], srv))
                by_route["h2h2"].append(Variant(name, ports[f"{name}-h2h2"], srv))
        for name, cmd, port, admin, env, alog, route in fl_specs:
            upstream = ports["origin"] if route == "h1" else ports["origin-h2c"]
            cmd = substitute(cmd, port, admin, upstream)
            label = name if route == "h1" else f"{name}-h2c"
            meta.setdefault("commands", {})[label] = {"cmd": cmd, "env": env}
            srv = Server(
                label,
                ["bash", "-c", cmd],
                port,
                a.proxy_cpu,
                rundir,
                nofile,
                env=env,
                cwd=REPO,
                stdout_path=alog,
            )
            alog = alog if alog and alog != "/dev/null" else None
            if route == "h1":  # one port for HTTP/1.1 and h2c clients
                by_route["h1"].append(Variant(name, port, srv, access_log=alog, admin_port=admin))
                by_route["h2"].append(Variant(name, port, srv, access_log=alog, admin_port=admin))
            else:
                twins.append(Variant(name, port, srv, access_log=alog, twin=True, admin_port=admin))
                by_route["h2h2"].append(twins[-1])

        if "w" in routes:
            origin_w = Server(
                "origin-w",
                ngx("nginx-origin-w.conf", "origin-w"),
                w_ports["origin-w"],
                a.both_cpus,
                rundir,
                nofile,
            )
            if not wait_ready(origin_w, a.ready_timeout):
                log(f"origin-w did not start; see {rundir}/origin-w.log and origin-w-error.log")
                return 1
            if "direct" in wanted:
                by_route["w"].append(Variant("direct", w_ports["origin-w"], None))
        for name, proxy, k, port in w_specs:
            if proxy == "nginx":
                srv = Server(name, ngx(f"{name}.conf", name), port, a.both_cpus, rundir, nofile)
                by_route["w"].append(Variant(name, port, srv))
                continue
            cmd = substitute(a.workers_cmd.replace("{WORKERS}", str(k)), port, port + 1,
                             w_ports["origin-w"])  # fmt: skip
            meta.setdefault("commands", {})[name] = {"cmd": cmd, "env": {}}
            wlog = access_log(name)
            srv = Server(
                name,
                ["bash", "-c", cmd],
                port,
                a.both_cpus,
                rundir,
                nofile,
                cwd=REPO,
                stdout_path=wlog,
            )
            wlog = wlog if wlog != "/dev/null" else None
            by_route["w"].append(Variant(name, port, srv, access_log=wlog, admin_port=port + 1))

        for route in ("h1", "w"):
            by_route[route] = ready_variants(by_route[route], a, meta)
        for route in ("h2", "h2h2"):
            ok = []
            for v in by_route[route] if route in routes else []:
                if v.server and not v.server.alive():
                    continue  # said above
                why = wait_ready_h2(v, a.ready_timeout)
                if why:
                    log(f"SKIP {v.name} in the {ROUTES[route]} scenarios: {why}")
                    if v.twin and v.server:
                        v.server.stop()
                    continue
                if v.twin:
                    if v.access_log:
                        os.truncate(v.access_log, 0)
                    meta.setdefault("process_trees", {})[f"{v.name}-h2c"] = [
                        f"{p} {proc_name(p)}" for p in v.pids()
                    ]
                ok.append(v)
            by_route[route] = ok
        names = list(dict.fromkeys(v.name for r in ROUTES for v in by_route[r]))
        load_scens = [s for s in scens if SCENARIOS[s].kind != "idle"]
        est = sum(len(by_route[SCENARIOS[s].route]) for s in load_scens)
        est *= a.reps * a.duration + a.warmup
        log(
            f"run dir: {rundir}\nvariants: {names}\nscenarios: {scens}; {a.reps} rep(s) x "
            f"{a.duration} s, interleaved; load runs take about {est // 60} min {est % 60} s"
        )

        for s in load_scens:
            scen = SCENARIOS[s]
            runnable = [v for v in by_route[scen.route] if scen.needs not in v.unsupported]
            run = run_wrk if scen.kind == "wrk" else run_h2load
            if a.warmup:
                for v in runnable:
                    run(v, scen, a.warmup, a, rundir)
            for rep in range(a.reps):
                for v in runnable:
                    if v.server and not v.server.alive():
                        log(f"  {v.name} died (log: {v.server.log_path}); skipping")
                        continue
                    r = run(v, scen, a.duration, a, rundir, scen.probe)
                    results[s].setdefault(v.name, []).append(r)
                    lat = r.get("probe", {}).get("lat_us") or {}
                    log(
                        f"  {s} rep{rep + 1} {v.name:>16}: {r['rps']:9.0f} req/s "
                        f"{r['mib_s']:7.0f} MiB/s p50 {num(r['p50'], '.3f')} ms "
                        f"p99 {num(r['p99'], '.3f')} ms cpu {num(r['cpu_pct'], '.0f')}% "
                        f"{num(r['us_per_req'], '.1f')} us/req core {num(r['core_pct'], '.0f')}% "
                        f"load {num(r['load_pct'], '.0f')}% err {r['errors']} "
                        f"loadavg {r['loadavg']:.2f}"
                        + (
                            f" probe p99 {lat['p99'] / 1000:.3f} max {lat['max'] / 1000:.3f} ms"
                            if lat.get("max") is not None
                            else ""
                        )
                        + (f" lag p99/max {lag_cell(r)}" if r.get("lag_max") is not None else "")
                        + (
                            f" log {r['access_log_bytes'] / r['requests']:.0f} B/req"
                            if r.get("access_log_bytes") is not None and r["requests"]
                            else ""
                        )
                    )

        time.sleep(1.0)
        variants = by_route["h1"]
        for v in [*variants, *twins]:
            label = f"{v.name} (h2c upstream)" if v.twin else v.name
            if v.server and v.server.alive():
                rss_after[label] = rss_bytes(v.pids()) / MIB
                hwm[label] = hwm_bytes(v.pids()) / MIB

        if "idle10k" in scens:
            for v in variants:
                if not v.server or "small" in v.unsupported:
                    continue  # direct: no proxy to measure
                if not v.server.alive():
                    log(f"  {v.name} died (log: {v.server.log_path}); skipping idle")
                    continue
                idle[v.name] = r = run_idle(v, a)
                log(f"  idle10k {v.name:>16}: {r}")
            for v in variants:
                if v.server and v.server.alive():
                    hwm[v.name] = hwm_bytes(v.pids()) / MIB
    except KeyboardInterrupt:
        log("interrupted; stopping servers")
        return 130
    finally:
        stop_all()

    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    summary = summarize(results, names)
    checks = check_targets(summary, idle, rss_after, a.target, FAULTLINE_OFF)
    text = report(meta, summary, idle, rss_after, hwm, checks, names, a, md=False)
    markdown = report(meta, summary, idle, rss_after, hwm, checks, names, a, md=True)
    text += f"\nrun dir (logs, configs, results.json): {rundir}"
    print(markdown if a.markdown else text)
    with open(os.path.join(rundir, "table.txt"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(rundir, "table.md"), "w") as f:
        f.write(markdown + "\n")
    with open(os.path.join(rundir, "results.json"), "w") as f:
        json.dump(
            {
                "meta": meta,
                "args": vars(a),
                "summary": summary,
                "idle": idle,
                "rss_after_load_mb": rss_after,
                "peak_rss_mb": hwm,
                "checks": checks,
                "runs": results,
            },
            f,
            indent=1,
        )
    return 1 if a.strict and any(c.startswith("FAIL") for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
