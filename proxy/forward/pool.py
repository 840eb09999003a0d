"""The bounded pool of upstream connections, and how one is opened: DNS, TCP, TLS.

Rules:
1. Connections are counted once in `UpstreamPool.open` from the moment a connect starts
   until the connection is lost (or the connect fails); the pool never exceeds
   `max_connections`.
2. The pool knows no protocol: it makes connections with the origin codec's factory and
   sees them as `OriginConnection`s, or, when the factory is `multiplexed`, as
   `SharedConnection`s it opens a stream on per exchange (HTTP/2): it connects only when
   no connection has a free stream and none is being connected, and an exchange that waits
   gets the next stream that frees.
3. What the resolver and the TLS library report in their own types becomes a neutral
   failure on the way (`proxy.forward.connecting`), so `classify` knows neither.
4. Over TLS with an `h2_factory`, ALPN offers h2 then http/1.1, and the codec connection is
   made after the handshake, by the factory of the protocol the origin chose (bytes that
   arrive before it exists are kept for it: `Handshaking`). The pool follows the last
   choice: streams on shared connections after h2, a connection per exchange after
   http/1.1 (`trailers` tells the core whether a gRPC call can be carried).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any, Final, Protocol

from ..config import Config
from ..diagnosis.record import Phase, perf_ns
from .codec import OriginConnection, SharedConnection
from .connecting import Handshaking, handshake_failure, make_ssl_context, name_failure

# Connect failures that mean "nothing is listening yet" (a dev server restarting).
_NOT_LISTENING: Final = (ConnectionRefusedError,)
_RETRY_WAIT_S: Final = 0.1
# Exchanges that wait for one multiplexed connection being connected before another opens.
_STREAMS_PER_CONNECT: Final = 100


class Waiter(Protocol):
    """What the pool reads and marks on an exchange it connects for (the core's
    `Forwarder`): its connect phases and timing marks, and where to report."""

    phase: Phase
    done: bool
    may_wait: bool
    wait_expired: bool
    connect_task: asyncio.Task[None] | None
    t_start: int
    t_pool: int
    t_dns: int
    t_wait: int
    t_connect: int
    t_connected: int
    t_tls_done: int

    def on_upstream_connected(self, conn: OriginConnection, reused: bool) -> None: ...
    def on_upstream_failed(self, error: BaseException | None) -> None: ...


# The origin codec's connection class (or any callable): called with the pool, it makes an
# unconnected protocol instance for `loop.create_connection`.
OriginFactory = Callable[["UpstreamPool"], Any]


class UpstreamPool:
    """A bounded set of connections to the one origin: idle ones reused newest first."""

    def __init__(
        self,
        config: Config,
        loop: asyncio.AbstractEventLoop,
        factory: OriginFactory,
        h2_factory: OriginFactory | None = None,
    ) -> None:
        self.loop = loop
        self.factory = factory
        self.h2_factory = h2_factory  # the codec for ALPN h2 (https:// upstreams)
        self.host = config.upstream_host
        self.port = config.upstream_port
        self.max_connections = config.pool.max_connections
        self.max_idle = config.pool.max_idle
        self.idle_timeout_ns = int(config.pool.idle_timeout * 1e9)
        self.upstream_wait_s = config.upstream_wait
        self.ssl_context: ssl.SSLContext | None = None
        self.server_hostname: str | None = None
        if config.upstream_scheme == "https":
            self.ssl_context = make_ssl_context(config, h2=h2_factory is not None)
            self.server_hostname = config.tls.server_name or self.host
        try:
            ipaddress.ip_address(self.host)
            self.host_is_ip = True
        except ValueError:
            self.host_is_ip = False
        self.idle: list[OriginConnection] = []
        self.open = 0  # connecting + idle + busy
        self.busy = 0  # exchanges holding a connection (or a stream)
        self.connecting = 0
        self.waiters: deque[Waiter] = deque()
        self.multiplexed = bool(getattr(factory, "multiplexed", False))
        # The upstream can carry trailers (a gRPC call's status): HTTP/2, or maybe (ALPN).
        self.trailers = self.multiplexed or h2_factory is not None
        self.shared: list[SharedConnection] = []  # multiplexed connections, oldest first

    # -- acquiring and releasing ------------------------------------------------------------

    def acquire(self, forwarder: Waiter, fresh: bool = False) -> OriginConnection | None:
        """A ready idle connection, or None when one is being connected or waited for."""
        if self.multiplexed:
            return self._open_stream(forwarder)
        if not fresh:
            idle = self.idle
            while idle:
                conn = idle.pop()
                if not conn.closed:
                    self.busy += 1
                    return conn
        if self.open < self.max_connections:
            self._start_connect(forwarder)
        else:
            self._wait(forwarder)
        return None

    def _wait(self, forwarder: Waiter, first: bool = False) -> None:
        """`forwarder` waits for a connection (or a stream) to free."""
        forwarder.phase = Phase.POOL_WAIT
        forwarder.t_pool = perf_ns()
        if first:
            self.waiters.appendleft(forwarder)
        else:
            self.waiters.append(forwarder)

    def release(self, conn: OriginConnection, reusable: bool) -> None:
        """The exchange is done with `conn`; keep it for the next one or close it."""
        self.busy -= 1
        conn.handler = None
        if not reusable or conn.closed:
            conn.close()
            return
        waiter = self._next_waiter() if self.waiters else None
        if waiter is not None:
            self.busy += 1
            waiter.on_upstream_connected(conn, reused=True)
        elif len(self.idle) < self.max_idle:
            conn.idle_since_ns = perf_ns()
            self.idle.append(conn)
        else:
            conn.close()

    def _open_stream(self, forwarder: Waiter) -> OriginConnection | None:
        for shared in self.shared:
            stream = shared.open_stream()
            if stream is not None:
                self.busy += 1
                return stream
        queued = len(self.waiters)
        if self.open < self.max_connections and (
            not self.connecting or queued >= self.connecting * _STREAMS_PER_CONNECT
        ):
            self._start_connect(forwarder)
        else:
            self._wait(forwarder)
        return None

    def offer(self, shared: SharedConnection) -> None:
        """`shared` may have free streams (one was let go, or its limit grew): waiting
        exchanges take them."""
        while self.waiters and not shared.closed:
            waiter = self._next_waiter()
            if waiter is None:
                return
            stream = shared.open_stream()
            if stream is None:
                self.waiters.appendleft(waiter)
                return
            self.busy += 1
            waiter.on_upstream_connected(stream, reused=True)

    def forget_waiter(self, forwarder: object) -> None:
        """`forwarder` no longer waits for a slot (it gave up)."""
        with contextlib.suppress(ValueError):
            self.waiters.remove(forwarder)  # type: ignore[arg-type]

    def on_closed(self, conn: OriginConnection | SharedConnection, busy: bool) -> None:
        """`connection_lost` of a connection: its slot (and busy mark) is freed here."""
        self.open -= 1
        if busy:
            self.busy -= 1
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)  # type: ignore[arg-type]
        with contextlib.suppress(ValueError):
            self.shared.remove(conn)  # type: ignore[arg-type]
        waiter = self._next_waiter()
        if waiter is not None:
            self._start_connect(waiter)

    def sweep(self, now_ns: int) -> None:
        """Close idle connections older than the pool's idle timeout."""
        limit = now_ns - self.idle_timeout_ns
        for conn in [c for c in self.idle if c.idle_since_ns < limit]:
            self.idle.remove(conn)
            conn.close()
        for shared in [c for c in self.shared if not c.active and c.idle_since_ns < limit]:
            shared.close()  # its connection_lost takes it off the list

    def counts(self) -> tuple[int, int]:
        """Idle (kept for reuse) and busy (serving an exchange; a multiplexed one: at least
        one) connections."""
        idle = sum(1 for conn in self.idle if not conn.closed)
        busy = self.busy  # exchanges holding a connection or a stream
        for shared in self.shared:
            busy -= shared.active
            if not shared.closed:
                if shared.active:
                    busy += 1
                else:
                    idle += 1
        return idle, busy

    def close_idle(self) -> None:
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()
        for shared in [c for c in self.shared if not c.active]:
            shared.close()

    def _next_waiter(self) -> Waiter | None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done:
                return waiter
        return None

    # -- connecting ---------------------------------------------------------------------------

    def _start_connect(self, forwarder: Waiter) -> None:
        # The slot taken here belongs to the attempt until TCP connects, then to the
        # connection (released by its connection_lost).
        self.open += 1
        self.connecting += 1
        attempt = _Attempt(self)
        task = self.loop.create_task(self._connect(forwarder, attempt))
        forwarder.connect_task = task
        task.add_done_callback(attempt.cancelled_unstarted)

    async def _connect(self, forwarder: Waiter, attempt: _Attempt) -> None:
        attempt.started = True
        try:
            conn, multiplexed = await self._open(forwarder, attempt)
            if multiplexed:
                await conn.ready()  # type: ignore[attr-defined]
        except asyncio.CancelledError:
            # The exchange gave up (deadline or client gone) and has already reported it.
            self._give_up(attempt)
            return
        except Exception as exc:
            forwarder.connect_task = None
            self._give_up(attempt)
            forwarder.on_upstream_failed(exc)
            return
        forwarder.connect_task = None
        self.connecting -= 1
        if multiplexed:
            shared: SharedConnection = conn  # type: ignore[assignment]
            self.shared.append(shared)
            stream = shared.open_stream()
            if stream is None:  # full (or going away) already: first in line for a stream
                self._wait(forwarder, first=True)
                return
            self.busy += 1
            forwarder.on_upstream_connected(stream, reused=False)
            self.offer(shared)
            return
        self.busy += 1
        forwarder.on_upstream_connected(conn, reused=False)

    def _give_up(self, attempt: _Attempt) -> None:
        self.connecting -= 1
        if attempt.conn is not None:
            attempt.conn.abort()  # its connection_lost frees the slot
        else:
            self.open -= 1
        # A multiplexed pool's waiters may all have waited for this connect: each tries its
        # own now and learns its own fault (not, one by one, the pool's deadline).
        while self.waiters and self.open < self.max_connections:
            waiter = self._next_waiter()
            if waiter is None:
                break
            self._start_connect(waiter)
            if not self.multiplexed:
                break

    async def _open(self, forwarder: Waiter, attempt: _Attempt) -> tuple[OriginConnection, bool]:
        """DNS, TCP connect (every address in turn), then TLS; marks and phases on the way.
        The connection, and whether it is multiplexed (a `SharedConnection`)."""
        ex = forwarder
        loop = self.loop
        if self.host_is_ip:
            addresses = [self.host]
        else:
            ex.phase = Phase.DNS
            ex.t_dns = perf_ns()
            try:
                infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise name_failure(exc) from exc
            addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        ex.phase = Phase.CONNECT
        ex.t_connect = perf_ns()
        wait_until = ex.t_start + int(self.upstream_wait_s * 1e9) if forwarder.may_wait else 0
        alpn = self.ssl_context is not None and self.h2_factory is not None
        while True:
            try:
                conn = await self._connect_any(addresses, Handshaking(self) if alpn else None)
                break
            except _NOT_LISTENING:
                if not wait_until:
                    raise
                # upstream_wait holds the request: the hold is the `wait` phase, and
                # `connect` stays the one attempt that succeeds (none, if it never does).
                if not ex.t_wait:
                    ex.t_wait = ex.t_connect
                now = perf_ns()
                if now >= wait_until:
                    ex.t_connect = now
                    ex.wait_expired = True
                    raise
                await asyncio.sleep(_RETRY_WAIT_S)
                ex.t_connect = perf_ns()
        attempt.conn = conn
        ex.t_connected = perf_ns()
        if self.ssl_context is None:
            return conn, self.multiplexed
        ex.phase = Phase.TLS
        try:
            protocol: Any = conn  # an asyncio protocol, seen here as an OriginConnection
            conn.transport = await loop.start_tls(
                conn.transport, protocol, self.ssl_context, server_hostname=self.server_hostname
            )
        except ssl.SSLError as exc:
            raise handshake_failure(exc) from exc
        ex.t_tls_done = perf_ns()
        if not alpn:
            return conn, False
        # The origin chose: its codec takes the connection over.
        handshaking: Any = conn
        if handshaking.closed:  # its loss already freed the slot
            raise ConnectionResetError("the origin closed the connection after the handshake")
        chosen = conn.transport.get_extra_info("ssl_object").selected_alpn_protocol()
        h2 = chosen == "h2"
        factory = self.h2_factory if h2 else self.factory
        assert factory is not None
        codec = factory(self)
        attempt.conn = codec
        self.multiplexed = self.trailers = h2
        handshaking.hand_over(codec)
        return codec, h2

    async def _connect_any(self, addresses: list[str], first: Any = None) -> OriginConnection:
        error: BaseException | None = None
        for address in addresses:
            conn = first or self.factory(self)
            try:
                # The factory runs inside this call, before the loop moves on.
                await self.loop.create_connection(lambda: conn, address, self.port)  # noqa: B023
                return conn
            except OSError as exc:
                error = exc
        assert error is not None
        try:
            raise error
        finally:
            error = None  # else this frame, its traceback's, and the error make a cycle


class _Attempt:
    """What a connect attempt holds: the connection once TCP is up."""

    __slots__ = ("conn", "pool", "started")

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.conn: OriginConnection | None = None
        self.started = False

    def cancelled_unstarted(self, task: asyncio.Task[None]) -> None:
        """A task cancelled before its first step never runs `_connect`'s own clean-up:
        the slot it was given is freed here instead."""
        if not self.started and task.cancelled():
            self.pool._give_up(self)
