"""The CPU cost of one exchange through Faultline's own code, without sockets.

`bench.py` measures the whole proxy against nginx and HAProxy; on a shared machine its
figures move by several percent between runs. This harness isolates what Faultline adds
per exchange: the real `DownstreamProtocol`, `UpstreamConnection`, `Forwarder`, header
policy, stats and access log, driven by a fixed request and a fixed origin response through
in-memory transports (no event loop turns, no syscalls). Use it to compare two versions of
the hot path; use `bench.py` for the figures that matter to users.

    python3 bench/hotpath.py                # µs per exchange, best of 3, three configurations
    python3 bench/hotpath.py --profile      # cProfile of the PS/ST configuration
    valgrind --tool=callgrind PYTHON bench/hotpath.py --only pst -n 2000
        # instructions per exchange: run it with -n 1000 and -n 3000 and divide the
        # difference of callgrind's totals by 3 x 2000 (three repetitions per run);
        # deterministic, the steadier figure on a noisy machine. PYTHON is the interpreter
        # itself, not a pyenv shim (valgrind would measure the shim). Fix PYTHONHASHSEED
        # (a random seed moves the interpreted figure by up to 5%) and take the mean over
        # a few seeds; run once before measuring, so that writing .pyc files does not
        # land in one of the two runs; measure a copy of the tree (`git archive REV`),
        # not a checkout others are editing.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import os
import pstats
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.config import load_config
from proxy.http1.client import DownstreamProtocol
from proxy.server import GC_YOUNG_THRESHOLD, build_context, build_router
from proxy.telemetry.console import make_access_log
from proxy.telemetry.sink import Telemetry
from proxy.telemetry.stats import Stats

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:28080\r\n\r\n"  # what wrk sends
RESPONSE = (  # what bench.py's nginx origin answers
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sat, 21 Nov 2026 22:13:29 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 12\r\nConnection: keep-alive\r\n\r\n"
    b"hello world\n"
)
ORIGIN = "http://127.0.0.1:28999"
_WEB = f'{{"name": "web", "path_prefix": "/", "upstream": "{ORIGIN}"}}'
_NINE = ", ".join(
    f'{{"name": "r{i}", "path_prefix": "/r{i}/", "upstream": "{ORIGIN}"}}' for i in range(1, 10)
)
CONFIGURATIONS = {
    "full": {},  # the defaults: diagnostics and the JSON access log
    "pst": {"FAULTLINE_LOG_ACCESS": "false"},  # Proxy-Status and Server-Timing, no log
    "nodiag": {"FAULTLINE_DIAGNOSTICS": "false", "FAULTLINE_LOG_ACCESS": "false"},
    # Routes (issue 21), as "full": one route for every path; ten, the request's the last.
    "routes1": {"FAULTLINE_ROUTES": f"[{_WEB}]"},
    "routes10": {"FAULTLINE_ROUTES": f"[{_NINE}, {_WEB}]"},
}


class MemoryTransport:
    """Counts what the proxy writes; everything else a transport does is a no-op."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def writelines(self, chunks: list[bytes]) -> None:
        self.written += sum(map(len, chunks))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


class TurnlessLoop:
    """Stands in for the event loop of the outbox: `Rig.run` flushes it by hand."""

    def call_soon(self, callback: Any) -> None:
        pass


class Rig:
    """One client connection and one pooled origin connection, wired through a context."""

    def __init__(self, env: dict[str, str]) -> None:
        self.loop = asyncio.new_event_loop()
        flags: dict[tuple[str, ...], Any] = {("log", "format"): "json"}
        if "FAULTLINE_ROUTES" not in env:
            flags[("upstream",)] = ORIGIN
        config = load_config(env=env, flags=flags)
        self.log_sink = open(os.devnull, "wb")  # noqa: SIM115 (closed in close())
        self.telemetry = Telemetry(Stats(), make_access_log(config, self.log_sink))
        self.ctx, headers, known_heads = build_context(
            config, self.loop, self.telemetry, "0123456789abcdef"
        )
        self.client = MemoryTransport()
        self.down = DownstreamProtocol(self.ctx, headers, known_heads)
        self.down.connection_made(self.client)
        self.origin = MemoryTransport()
        # With routes, the origin connection waits in the pool of the route that matches.
        routed = build_router(config, self.loop, self.telemetry, self.ctx)
        pool = next((c for c in routed if c.route == "web"), self.ctx).pool
        upstream = pool.factory(pool)
        upstream.connection_made(self.origin)
        self.up = upstream
        pool.idle.append(upstream)
        pool.open = 1
        # No loop turns here: run() flushes the outbox itself after each read, as the
        # loop would at the end of a turn that had one read ready.
        self.ctx.outbox.loop = TurnlessLoop()

    def run(self, n: int) -> float:
        """Seconds per exchange for `n` exchanges (the telemetry settled as the proxy does)."""
        down, up, settle = self.down.data_received, self.up.data_received, self.telemetry.settle
        flush = self.ctx.outbox.flush
        start = time.perf_counter()
        for i in range(n):
            down(REQUEST)
            flush()
            up(RESPONSE)
            flush()
            if not i % 512:
                settle()
        settle()
        return (time.perf_counter() - start) / n

    def close(self) -> None:
        self.log_sink.close()
        self.loop.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=20000, help="exchanges per repetition")
    ap.add_argument("--only", choices=sorted(CONFIGURATIONS), help="one configuration")
    ap.add_argument("--profile", action="store_true", help="cProfile one repetition")
    args = ap.parse_args(argv)
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)  # as `faultline serve` runs
    names = [args.only] if args.only else list(CONFIGURATIONS)
    for name in names:
        rig = Rig(CONFIGURATIONS[name])
        try:
            rig.run(200)  # warm the memo of response heads and the caches
            if args.profile:
                profile = cProfile.Profile()
                profile.runcall(rig.run, args.n)
                pstats.Stats(profile).sort_stats("tottime").print_stats(20)
                continue
            best = min(rig.run(args.n) for _ in range(3))
            total = rig.telemetry.stats.total
            print(f"{name:7s} {best * 1e6:6.2f} us/exchange  ({total} exchanges)")
        finally:
            rig.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
