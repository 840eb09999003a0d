"""Start the proxy and admin listeners, run the deadline sweep, and drain on SIGTERM.

Lifecycle (CONTRACT.md): on SIGTERM or SIGINT
  1. `/readyz` turns 503 at once;
  2. new connections keep being served for `timeouts.shutdown_delay`;
  3. the listener closes;
  4. idle keep-alive connections close, busy ones close after their exchange;
  5. in-flight exchanges may finish for up to `timeouts.drain`; the rest are cut by the
     proxy and recorded as its own (`proxy_internal_response`: a 503 + close, or a reset);
  6. the access log is flushed and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import signal
import socket
import ssl
from collections.abc import Callable
from typing import Any

import msgspec

from . import __version__
from .base.memo import Memo
from .config import Config, format_address
from .config_routes import RouteConfig
from .diagnosis.record import perf_ns
from .forward.context import ForwardContext, Route, Router
from .forward.outbox import Outbox
from .forward.pool import OriginFactory
from .forward.sweep import Sweep
from .http1.client import DownstreamProtocol
from .http1.headers import HeaderPolicy
from .http1.origin import OriginSide
from .http1.request import RequestHead
from .http2.client import H2ClientConnection, H2Shared
from .http2.origin import H2OriginSide
from .telemetry import gcwatch
from .telemetry.breakdown import RouteStats
from .telemetry.console import make_access_log
from .telemetry.looplag import LoopWatch
from .telemetry.sink import Telemetry
from .telemetry.stats import Stats

log = logging.getLogger("faultline")


class StartupError(Exception):
    """The proxy cannot start (an address is busy or unusable); one line for the user."""


GC_YOUNG_THRESHOLD = 20_000  # allocations between young-generation collections
DRAIN_REPLY_S = 0.2  # after the drain deadline: time for the proxy's 503s to go out


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def build_context(
    config: Config,
    loop: asyncio.AbstractEventLoop,
    telemetry: Telemetry,
    instance_id: str,
    outbox: Outbox | None = None,
) -> tuple[ForwardContext, HeaderPolicy, Memo[bytes, RequestHead]]:
    """The core's shared context, wired to its sinks and to the HTTP/1.1 codec's origin
    side; and what every HTTP/1.1 client connection shares (`DownstreamProtocol`)."""
    if not config.upstream:  # routes and no default route: this context forwards nothing
        config = msgspec.structs.replace(config, upstream=config.routes[0].upstream)
    diagnostics = config.diagnostics
    client_proto = b"https" if config.tls.cert else b"http"  # the listen port's scheme
    headers = HeaderPolicy(
        proxy_name=config.proxy_name,
        instance_id=instance_id,
        upstream_authority=config.upstream_authority,
        proxy_status=config.headers.proxy_status and diagnostics,
        server_timing=config.headers.server_timing and diagnostics,
        forwarded=config.headers.forwarded,
        via=config.headers.via,
        client_proto=client_proto,
    )
    outbox = outbox or Outbox(loop)
    scheme = config.upstream_scheme
    h2_origins: OriginFactory | None = None
    if scheme in ("h2c", "https"):  # HTTP/2 with prior knowledge, or if ALPN chooses it
        h2_origins = H2OriginSide(
            outbox,
            config.proxy_name,
            config.upstream_authority,
            config.headers.proxy_status and diagnostics,
            instance_id,
            scheme=b"https" if scheme == "https" else b"http",
            forwarded=config.headers.forwarded,
            via=config.headers.via,
            client_proto=client_proto,
        )
    origins: OriginFactory
    if scheme == "h2c" and h2_origins is not None:
        origins, h2_origins = h2_origins, None
    else:
        origins = OriginSide(headers, outbox, config.limits.max_response_header_bytes)
    ctx = ForwardContext(
        config,
        loop,
        outbox,
        telemetry.record,
        telemetry.stats.gauges,
        origins,
        instance_id,
        h2_factory=h2_origins,
    )
    # Reads that were one whole bodiless request head -> that head, parsed and validated
    # under this configuration: at most 1024 heads of at most 4 KiB.
    known_heads: Memo[bytes, RequestHead] = Memo(1024, 4096)
    return ctx, headers, known_heads


def route_config(config: Config, route: RouteConfig) -> Config:
    """The configuration a route's context is built from: the top level's, with what the
    route sets (upstream, proxy_name, upstream_wait, the upstream timeouts)."""
    return msgspec.structs.replace(
        config,
        upstream=route.upstream,
        proxy_name=route.proxy_name or config.proxy_name,
        upstream_wait=config.upstream_wait if route.upstream_wait is None else route.upstream_wait,
        timeouts=msgspec.structs.replace(config.timeouts, **route.timeouts),
        routes=[],
    )


def build_router(
    config: Config, loop: asyncio.AbstractEventLoop, telemetry: Telemetry, main: ForwardContext
) -> list[ForwardContext]:
    """With routes: a context per route (its own pool), the router on `main` (the client
    connections' context, the default route when `upstream` is set); every context."""
    if not config.routes:
        return [main]
    routes = []
    contexts = [main]
    for given in config.routes:
        ctx, _, _ = build_context(
            route_config(config, given), loop, telemetry, main.instance_id, main.outbox
        )
        ctx.route = given.name
        ctx.connections = main.connections
        contexts.append(ctx)
        prefix = given.prefix
        routes.append(
            Route(given.name, ctx, given.host, prefix, given.strip_prefix, given.describe())
        )
    if config.upstream:
        main.route = "default"
        routes.append(Route("default", main, None, None, False, "every other request"))
    else:  # no default route: the client side's context forwards nothing, names no upstream
        main.upstream = main.upstream_authority = ""
    main.router = Router(routes)
    return contexts


def client_factory(
    ctx: ForwardContext, headers: HeaderPolicy, known_heads: Memo[bytes, RequestHead]
) -> Callable[[], DownstreamProtocol]:
    """What the listener makes for each client connection: the HTTP/1.1 codec, which hands
    a connection that opens with the HTTP/2 preface to the HTTP/2 codec."""
    shared = H2Shared(ctx, headers.proxy_status, headers.server_timing)

    def to_http2(conn: DownstreamProtocol, first: bytes) -> None:
        h2 = H2ClientConnection(shared)
        conn.transport.set_protocol(h2)
        h2.connection_made(conn.transport)
        h2.data_received(first)

    return lambda: DownstreamProtocol(ctx, headers, known_heads, to_http2)


def listen_tls(config: Config) -> ssl.SSLContext | None:
    """TLS for the listen port (`tls.cert`, `tls.key`), offering h2 then http/1.1 (ALPN);
    a client that picks h2 opens with the preface, and the HTTP/1.1 codec hands it over."""
    if config.tls.cert is None or config.tls.key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.tls.cert, config.tls.key)
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise StartupError(
            f"cannot use tls.cert {config.tls.cert} with tls.key {config.tls.key}: {reason}"
        ) from None
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


class ProxyServer:
    """The running proxy: data-plane listener, admin listener, sweep, drain."""

    def __init__(
        self,
        config: Config,
        access_stream: Any = None,
        *,
        sock: socket.socket | None = None,
        admin: bool = True,
        whole_lines: bool = False,
    ) -> None:
        """`sock`: a listening socket to serve (a worker's, bound by the supervisor) instead
        of binding `listen`; `admin`: whether this process serves the admin port (a worker
        does not: the supervisor serves the merge of every worker's counts); `whole_lines`:
        other processes write access-log lines to the same stream (workers)."""
        self.config = config
        self.access_stream = access_stream
        self.whole_lines = whole_lines
        self.sock = sock
        self.with_admin = admin
        self.ctx: ForwardContext | None = None
        self.telemetry: Telemetry | None = None
        self.headers: HeaderPolicy | None = None
        self.known_heads: Memo[bytes, RequestHead] | None = None
        self.ready = False
        self.listen_address: tuple[str, int] | None = None
        self.admin_address: tuple[str, int] | None = None
        self._server: asyncio.AbstractServer | None = None
        self._admin: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping: asyncio.Event | None = None
        self.contexts: list[ForwardContext] = []  # the client connections', then each route's
        self.sweep: Sweep | None = None  # deadlines and idle upstream connections
        self._watch: LoopWatch | None = None  # the event loop's lag, sampled

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        config = self.config
        stats = Stats(config.stats.recent_errors)
        access_log = make_access_log(config, self.access_stream, self.whole_lines)
        telemetry = Telemetry(stats, access_log)
        self.telemetry = telemetry
        ctx, headers, known_heads = build_context(config, loop, telemetry, os.urandom(8).hex())
        self.ctx, self.headers, self.known_heads = ctx, headers, known_heads
        self.contexts = build_router(config, loop, telemetry, ctx)
        for each in self.contexts:  # /stats by_route lists every route from the start
            if each.route is not None:
                stats.routes.setdefault(each.route, RouteStats())
        host, port = config.listen
        tls = listen_tls(config)
        factory = client_factory(ctx, headers, known_heads)
        try:
            if self.sock is not None:
                self._server = await loop.create_server(
                    factory, sock=self.sock, backlog=4096, ssl=tls
                )
            else:
                self._server = await loop.create_server(
                    factory, host, port, backlog=4096, reuse_address=True, ssl=tls
                )
        except OSError as exc:
            raise StartupError(bind_error("listen", config.listen, exc)) from None
        self.listen_address = self._server.sockets[0].getsockname()[:2]
        if self.with_admin:
            from .admin import start_admin  # prometheus_client only when the proxy starts

            try:
                self._admin, self.admin_address = await start_admin(
                    config, telemetry, lambda: self.ready, self.pool_counts
                )
            except OSError as exc:
                self._server.close()
                raise StartupError(bind_error("admin.listen", config.admin.listen, exc)) from None
        self._stopping = asyncio.Event()
        self.sweep = Sweep(ctx, self.contexts, telemetry.settle)
        self._tasks.append(loop.create_task(self.sweep.run()))
        self._watch = LoopWatch(loop, stats.loop_lag)
        self._watch.start()
        gcwatch.install()  # the collector's pauses, timed
        if access_log is not None:
            access_log.output.start(loop)  # a pipe's reader never holds the loop
        self.ready = True

    def pool_counts(self) -> tuple[int, int]:
        """Idle and busy upstream connections, every route's pool together."""
        idle = busy = 0
        for each in self.contexts:
            i, b = each.pool.counts()
            idle, busy = idle + i, busy + b
        return idle, busy

    def close_idle(self) -> None:
        for each in self.contexts:
            each.pool.close_idle()

    def settle(self) -> None:
        """Finished exchanges go to the sinks now (whoever reads the stats does this)."""
        if self.telemetry is not None:
            self.telemetry.settle()

    def request_stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()

    async def serve_until_stopped(self) -> None:
        assert self._stopping is not None
        await self._stopping.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        """The contract's drain sequence; returns when the process may exit 0."""
        ctx = self.ctx
        assert ctx is not None
        timeouts = self.config.timeouts
        # 1. Not ready any more: load balancers stop sending new traffic.
        self.ready = False
        # 2. Keep serving while endpoints propagate.
        if timeouts.shutdown_delay > 0:
            await asyncio.sleep(timeouts.shutdown_delay)
        # 3. Stop accepting.
        if self._server is not None:
            self._server.close()
        # 4. Idle keep-alive connections close now; busy ones after their exchange. An
        #    Upgrade tunnel (a WebSocket: a dev server's HMR socket) never ends by itself,
        #    so waiting for it would only hold the exit for the whole drain: it closes now.
        for each in self.contexts:
            each.draining = True
        for conn in list(ctx.connections):
            conn.drain()
        self.close_idle()
        # 5. Let in-flight exchanges finish and their connections flush and close (a slow
        #    client still reading its response is in flight too), up to the drain time.
        deadline = perf_ns() + _ns(timeouts.drain)
        while (ctx.gauges.in_flight > 0 or ctx.connections) and perf_ns() < deadline:
            await asyncio.sleep(0.02)
        # 6. The deadline passed: what is still in flight is cut by the proxy, and recorded
        #    as the proxy's (a 503 + close where no response had started, else a reset).
        for conn in list(ctx.connections):
            conn.cut_by_drain()
        ctx.outbox.flush()
        closing = perf_ns() + _ns(DRAIN_REPLY_S)
        while ctx.connections and perf_ns() < closing:
            await asyncio.sleep(0.01)  # the 503s reach their clients
        for conn in list(ctx.connections):
            conn.abort()
        await asyncio.sleep(0)
        # 7. Flush what is left and stop the admin server.
        self._stop_watch()
        for task in self._tasks:
            task.cancel()
        self._close_log()
        if self._admin is not None:
            await self._admin.cleanup()
        self.close_idle()

    def _stop_watch(self) -> None:
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
            gcwatch.uninstall()

    def _close_log(self) -> None:
        """The last lines go out (a slow reader gets a second for them)."""
        self.settle()
        telemetry = self.telemetry
        if telemetry is not None and telemetry.access_log is not None:
            telemetry.access_log.output.close()
            telemetry.settle()  # the count of lines that could not go out

    async def close(self) -> None:
        """Stop at once (tests, errors): no drain."""
        self._stop_watch()
        for task in self._tasks:
            task.cancel()
        if self._server is not None:
            self._server.close()
        if self.ctx is not None:
            for conn in list(self.ctx.connections):
                conn.abort()
            self.close_idle()
        self._close_log()
        if self._admin is not None:
            await self._admin.cleanup()
        await asyncio.sleep(0)

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        if self._stopping is not None and self._stopping.is_set():
            log.warning(
                "second %s: exiting without waiting for the drain", signal.Signals(sig).name
            )
            self._close_log()  # what finished is still logged
            os._exit(0)
        log.info("%s: draining (readyz now 503)", signal.Signals(sig).name)
        self.request_stop()


def bind_error(key: str, address: tuple[str, int], exc: OSError) -> str:
    shown = format_address(address)
    reason = {
        errno.EADDRINUSE: "address already in use",
        errno.EADDRNOTAVAIL: "address not available on this machine",
        errno.EACCES: "permission denied (ports below 1024 need privileges)",
    }.get(exc.errno or 0, exc.strerror or str(exc))
    return f"cannot listen on {shown} ({key}): {reason}"


def tune_gc() -> None:
    """Collect cyclic garbage less often. Exchanges wait in `Telemetry.pending` until the
    next settle, so with the default threshold (700) the young generation is traversed
    every ~100 exchanges: ~4% of the proxy's instructions, measured. Exchanges form no
    cycles; what does (tracebacks, tasks) is still collected, in bigger steps. Objects
    from start-up are frozen out of every collection."""
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)


async def run(config: Config, on_started: Callable[[ProxyServer], None] | None = None) -> None:
    server = ProxyServer(config)
    await server.start()
    tune_gc()
    server.install_signal_handlers()
    if on_started is not None:
        on_started(server)
    with contextlib.suppress(asyncio.CancelledError):
        await server.serve_until_stopped()


__all__ = ["ProxyServer", "StartupError", "__version__", "run"]
