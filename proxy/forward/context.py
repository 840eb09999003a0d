"""What every connection and exchange shares, built once at start-up by `proxy.server`: the
configuration as ready-to-use values, the pool, the outbox, and the sinks.

Rule: the core is handed its sinks (`record`, and the `gauges` it keeps) here; it never
imports `proxy.telemetry`.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from ..base.gauges import Gauges
from ..base.memo import Memo
from ..config import Config
from .outbox import Outbox
from .pool import OriginFactory, UpstreamPool

if TYPE_CHECKING:
    from ..diagnosis.record import Exchange
    from .codec import ServedConnection


# The last two hex digits of a request id's counter (`new_request_id`).
_ID_LOW: Final = tuple(b"%02x" % low for low in range(256))


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class ForwardContext:
    """Shared by every connection: limits and timeouts (in ns), the upstream pool, the
    outbox, the finished-record sink, and the connections being served."""

    def __init__(
        self,
        config: Config,
        loop: asyncio.AbstractEventLoop,
        outbox: Outbox,
        record: Callable[[Exchange], None],
        gauges: Gauges,
        origin_factory: OriginFactory,
        instance_id: str,
        h2_factory: OriginFactory | None = None,
    ) -> None:
        self.config = config
        self.record = record
        self.gauges = gauges
        self.outbox = outbox
        self.pool = UpstreamPool(config, loop, origin_factory, h2_factory)
        self.connections: set[ServedConnection] = set()
        self.draining = False
        self.instance_id = instance_id
        self.diagnostics = config.diagnostics
        self.upstream = config.upstream
        self.upstream_authority = config.upstream_authority
        # With routes: the router the forwarder asks (on the client connections' context),
        # and the name of the route a route's context serves.
        self.router: Router | None = None
        self.route: str | None = None
        self.proxy_name = config.proxy_name
        limits, timeouts = config.limits, config.timeouts
        self.max_in_flight = limits.max_in_flight
        self.max_connections = limits.max_connections
        self.max_request_body_bytes = limits.max_request_body_bytes
        self.max_request_header_bytes = limits.max_request_header_bytes
        self.connect_ns = _ns(timeouts.connect)
        self.dns_ns = _ns(timeouts.dns)
        self.response_headers_ns = _ns(timeouts.response_headers)
        self.upstream_read_ns = _ns(timeouts.upstream_read)
        self.client_headers_ns = _ns(timeouts.client_headers)
        self.client_body_ns = _ns(timeouts.client_body)
        self.keepalive_ns = _ns(timeouts.keepalive)
        self.pool_wait_ns = _ns(timeouts.pool_wait)
        self.drain_ns = _ns(timeouts.drain)
        self.upstream_wait_ns = _ns(config.upstream_wait)
        self.upstream_wait = config.upstream_wait > 0
        self._trusted = [ipaddress.ip_network(n, strict=False) for n in config.trusted_proxies]
        self._id_prefix = instance_id[:8].encode()
        self._id_counter = 0
        self._id_high = self._id_prefix + b"-000000"  # all but the counter's last byte

    def new_request_id(self) -> bytes:
        """`<instance>-<counter>`, the counter in at least 8 hex digits. Its last byte
        comes from a table and the rest is formatted once per 256 ids: a bytes format per
        request was 4% of a compiled exchange's instructions (issue 20)."""
        n = self._id_counter + 1
        self._id_counter = n
        low = n & 0xFF
        if not low:
            self._id_high = b"%s-%06x" % (self._id_prefix, n >> 8)
        return self._id_high + _ID_LOW[low]

    def is_trusted(self, address: str) -> bool:
        return client_is_trusted(address, self._trusted)

    def sweep_interval_s(self) -> float:
        t = self.config.timeouts
        shortest = min(
            t.connect,
            t.dns,
            t.response_headers,
            t.upstream_read,
            t.client_headers,
            t.client_body,
            t.keepalive,
            t.pool_wait,
        )
        return min(max(shortest / 20, 0.01), 0.25)


def client_is_trusted(
    address: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    if not networks or not address:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


# -- routes -------------------------------------------------------------------------------------
# Which route serves a request (`routes`, issue 21): first match wins.
#
# Each route has its own `ForwardContext` (its upstream, pool, timeouts, upstream_wait and
# proxy_name), built at start-up by `proxy.server`; the forwarder asks the `Router` once per
# exchange, when the request head is complete, and from then on works in the route's
# context. Without routes there is no router and the forwarder asks nothing.
#
# Matching (CONTRACT.md, config_routes.py): a path prefix on a segment boundary, a Host exact
# or `*.suffix` (the port ignored, case-insensitive); `strip_prefix` sends the rest of the
# path upstream (`/api/items?q` as `/items?q`).


def host_name(host: bytes | None) -> bytes:
    """`Example.com:8080` -> `example.com`; `[::1]:8080` -> `[::1]`."""
    if not host:
        return b""
    if host[:1] == b"[":
        end = host.find(b"]")
        return host[: end + 1].lower() if end > 0 else host.lower()
    return host.partition(b":")[0].lower()


def path_of(target: bytes) -> bytes:
    """The path of an origin-form target (absolute-form: the part after the authority)."""
    if target[:1] != b"/" and b"://" in target:
        slash = target.find(b"/", target.find(b"://") + 3)
        target = target[slash:] if slash >= 0 else b"/"
    q = target.find(b"?")
    return target if q < 0 else target[:q]


class Route:
    """One route: what it matches and the context that serves it."""

    __slots__ = ("ctx", "describe", "host", "name", "prefix", "prefix_slash", "strip", "suffix")

    def __init__(
        self,
        name: str,
        ctx: ForwardContext,
        host: str | None,
        prefix: str | None,
        strip: bool,
        describe: str,
    ) -> None:
        self.name = name
        self.ctx = ctx
        self.describe = describe
        wildcard = host is not None and host.startswith("*.")
        self.host = None if host is None or wildcard else host.encode()
        self.suffix = host[1:].encode() if host is not None and wildcard else None
        self.prefix = None if prefix is None else prefix.encode()
        self.prefix_slash = None if prefix is None else prefix.encode() + b"/"
        self.strip = strip and bool(prefix)

    def matches(self, host: bytes, path: bytes) -> bool:
        if self.host is not None and host != self.host:
            return False
        suffix = self.suffix
        if suffix is not None and (not host.endswith(suffix) or len(host) <= len(suffix)):
            return False
        prefix = self.prefix
        if not prefix:  # None (no path_prefix) or b"" (`/`): every path
            return True
        assert self.prefix_slash is not None
        return path == prefix or path.startswith(self.prefix_slash)

    def stripped(self, target: bytes) -> bytes:
        """The target sent upstream when the prefix is stripped."""
        assert self.prefix is not None
        start = target.find(self.prefix) if target[:1] != b"/" else 0
        rest = target[start + len(self.prefix) :]
        return rest if rest[:1] == b"/" else b"/" + rest


class Router:
    """The routes in the order they are tried; the default route (`upstream`) is last.

    When no route names a host, the path alone decides, and the route is found by looking
    up the path's segment prefixes, longest first, in a table (a couple of look-ups however
    many routes there are): in a table without shadowed routes (config_routes refuses
    them), the first route that matches is the one with the longest prefix.
    """

    __slots__ = ("by_prefix", "chosen", "routes")

    def __init__(self, routes: list[Route]) -> None:
        self.routes = routes
        # A target seen before -> its route (path-only tables): at most 1024 targets of at
        # most 512 bytes; one dictionary look-up for a client that asks again.
        self.chosen: Memo[bytes, Route] = Memo(1024, 512)
        self.by_prefix: dict[bytes, Route] | None = None
        if all(r.host is None and r.suffix is None for r in routes):
            table: dict[bytes, Route] = {}
            for route in routes:
                table.setdefault(route.prefix or b"", route)
            self.by_prefix = table

    def choose(self, host: bytes | None, target: bytes) -> Route | None:
        table = self.by_prefix
        if table is not None:
            route = self.chosen.get(target)
            if route is not None:
                return route
            path = path_of(target)
            route = table.get(path)
            end = len(path)
            while route is None and end > 0:
                end = path.rfind(b"/", 0, end)
                if end < 0:  # not a path (`*`): only a route for every path matches
                    return table.get(b"")
                route = table.get(path[:end])
            if route is not None:
                self.chosen.remember(target, route)
            return route
        path = path_of(target)
        name = host_name(host)
        for route in self.routes:
            if route.matches(name, path):
                return route
        return None

    def not_found(self, host: bytes | None, target: bytes) -> str:
        """The details of a 404 destination_not_found: what was asked, and the routes."""
        shown = host_name(host).decode("latin-1") or "(no host)"
        path = path_of(target).decode("latin-1")
        routes = "; ".join(f"{r.name}: {r.describe}" for r in self.routes)
        return f"no route matches host {shown} and path {path}; the routes are {routes}"
