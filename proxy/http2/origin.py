"""The origin side of the HTTP/2 codec: an `h2c://` upstream (HTTP/2 with prior knowledge).
One connection carries many exchanges at once, each on its own stream
(`proxy.http2.origin_stream`); the pool opens streams on it as httpcore's does
(`SharedConnection` of `proxy.forward.codec`).

Rules:
1. A connection is ready once the origin's SETTINGS came (the pool waits for them while
   connecting): its SETTINGS_MAX_CONCURRENT_STREAMS bounds the streams opened on it from the
   first request on.
2. The response head reaches the client codec as an `OriginHead` (`proxy.forward.heads`):
   the head in HTTP/1.1 form (`raw`, `prefix`), for an HTTP/1.1 client and for the
   diagnosis, with the proxy's Proxy-Status and Via added. Trailers (gRPC's status) go to
   the core (`on_response_trailers`).
3. A GOAWAY: no new stream opens on the connection. Streams above its last stream id were
   never processed (their failure says so, and the core may send them again); with
   NO_ERROR the others finish (`GracefulH2Connection`), with an error code they fail.
   The connection closes once its last stream is done.
4. RST_STREAM fails its stream only, classified by the phase it came in like any reset.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Final

from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import H2Error, ProtocolError

from .. import replies
from ..base.text import http_date
from ..diagnosis.classify import StreamReset as ResetByPeer
from ..diagnosis.classify import UpstreamProtocolError
from ..diagnosis.record import perf_ns
from ..forward.codec import RequestHead
from ..forward.fields import proxy_status_received
from ..forward.forwarder import Forwarder
from ..forward.heads import OriginHead, ResponseFields
from ..forward.outbox import Outbox
from ..forward.pool import UpstreamPool
from .graceful import GracefulH2Connection
from .origin_stream import H2OriginStream, code_name
from .stream import CONNECTION_WINDOW

_CONNECTION_SPECIFIC: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te"}
)
_OWN_RESPONSE: Final = frozenset({b"proxy-status", b"via"})
# Streams on one connection when the origin sets no lower limit (it may say "unlimited").
MAX_STREAMS: Final = 1000
# What a connection holds before it connects, shared: h2's connection is a reference cycle
# (its frame dispatch table) until `release`, which only a connection that connected gets;
# one made for a connect that failed went to the garbage collector (issue 20).
_NO_H2: Final = GracefulH2Connection(H2Configuration(client_side=True, header_encoding=None))


class H2OriginSide:
    """What every HTTP/2 origin connection shares; called with the pool, it makes one."""

    multiplexed = True  # the pool opens streams on its connections (`SharedConnection`)

    def __init__(
        self,
        outbox: Outbox,
        proxy_name: str,
        authority: str,
        proxy_status: bool,
        instance: str,
        scheme: bytes = b"http",
        forwarded: bool = True,
        via: bool = True,
        client_proto: bytes = b"http",
    ) -> None:
        self.outbox = outbox
        self.scheme = scheme  # :scheme towards the origin: https over TLS
        self.forwarded = forwarded  # headers.forwarded: X-Forwarded-For/-Proto/-Host
        self.add_via = via  # headers.via
        self.client_proto = client_proto  # X-Forwarded-Proto: https on a TLS listen port
        self.proxy_status = proxy_status
        self.ps_prefix, self.ps_suffix = proxy_status_received(proxy_name, authority)
        self.via = b"2 " + proxy_name.encode()
        # The comment carries this process's id: seeing it come back means a loop.
        self.via_request = self.via + b" (faultline " + instance.encode() + b")"

    def __call__(self, pool: UpstreamPool) -> H2OriginConnection:
        return H2OriginConnection(pool, self)

    def request_fields(
        self, head: RequestHead, handler: Forwarder, host: str
    ) -> list[tuple[bytes, bytes]]:
        """The request's HEADERS: pseudo-fields first, then the end-to-end fields."""
        authority = head.host or host.encode()
        fields = [
            (b":method", head.method),
            (b":scheme", self.scheme),
            (b":authority", authority),
            (b":path", head.target),
        ]
        for line in head.lines:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name not in _CONNECTION_SPECIFIC and name != b"host":
                fields.append((name, value.strip()))
        if self.forwarded:
            down = handler.down
            ip = down.client_ip_b
            if down.trusted:  # a trusted proxy's X-Forwarded-* are kept, its list extended
                fields.append((b"x-forwarded-for", head.xff + b", " + ip if head.xff else ip))
                fields.append((b"x-forwarded-proto", head.xfp or self.client_proto))
                fields.append((b"x-forwarded-host", head.xfh or authority))
            else:
                fields.append((b"x-forwarded-for", ip))
                fields.append((b"x-forwarded-proto", self.client_proto))
                fields.append((b"x-forwarded-host", authority))
        request_id = handler.request_id_line.partition(b":")[2].strip()
        fields.append((b"x-request-id", request_id))
        if head.content_length is not None:
            fields.append((b"content-length", b"%d" % head.content_length))
        if head.grpc:
            fields.append((b"te", b"trailers"))  # gRPC servers require it (PROTOCOL-HTTP2.md)
        if self.add_via:
            via = self.via_request
            fields.append((b"via", head.via + b", " + via if head.via else via))
        return fields

    def head(self, headers: list[tuple[bytes, bytes]]) -> OriginHead:
        """The response head in HTTP/1.1 form, with Proxy-Status and Via added."""
        status = _pseudo(headers, b":status") or b"502"
        kept = [(n, v) for n, v in headers if n[:1] != b":" and n not in _OWN_RESPONSE]
        upstream_ps = [v for n, v in headers if n == b"proxy-status"]
        via = [v for n, v in headers if n == b"via"]
        lines = [n + b": " + v + b"\r\n" for n, v in kept]
        phrase = replies.reason(int(status)).encode() if status.isdigit() else b""
        raw = b"HTTP/1.1 " + status + b" " + phrase + b"\r\n" + b"".join(lines)
        member = self.ps_prefix + status + self.ps_suffix
        extra = []
        if self.proxy_status:
            extra.append(b"Proxy-Status: " + b", ".join([*upstream_ps, member]) + b"\r\n")
        extra.append(b"Via: " + b", ".join([*via, self.via]) + b"\r\n")
        if not any(n == b"date" for n, _ in kept):
            extra.append(b"Date: " + http_date() + b"\r\n")
        prefix = raw + b"".join(extra)
        length = any(n == b"content-length" for n, _ in kept)
        return OriginHead(raw, prefix, ResponseFields(content_length=length))


class H2OriginConnection(asyncio.Protocol):
    """One HTTP/2 connection to the origin, carrying up to its peer's limit of streams."""

    def __init__(self, pool: UpstreamPool, side: H2OriginSide) -> None:
        self.pool = pool
        self.side = side
        self.h2 = _NO_H2  # its own from connection_made (h2's is a cycle till `release`)
        self.transport: Any = None
        self.closed = False
        self.idle_since_ns = 0
        self.streams: dict[int, H2OriginStream] = {}  # by id, once their HEADERS went out
        self.active = 0  # streams handed out and not yet let go
        self.going_away = False  # a GOAWAY came (or the proxy is closing it)
        self.settings: asyncio.Future[None] | None = None

    # -- life cycle ----------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.settings = self.pool.loop.create_future()
        self.h2 = GracefulH2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.h2.initiate_connection()
        # Streams' windows stay at the default; the connection's is far above their sum.
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()

    def ready(self) -> asyncio.Future[None]:
        """Done when the origin's SETTINGS came: the connection may carry streams."""
        assert self.settings is not None
        return self.settings

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._settle(exc or ConnectionResetError("the origin closed the connection"))
        self.pool.on_closed(self, busy=False)  # its streams are let go one by one
        for stream in list(self.streams.values()):
            stream.fail(exc)
        self.h2.release()

    def open_stream(self) -> H2OriginStream | None:
        """A stream for one exchange, or None when the connection is full or going away."""
        if self.closed or self.going_away:
            return None
        limit = min(self.h2.remote_settings.max_concurrent_streams, MAX_STREAMS)
        if self.active >= limit:
            return None
        self.active += 1
        return H2OriginStream(self)

    def stream_released(self) -> None:
        """A stream was let go: its slot is free for a waiting exchange."""
        self.active -= 1
        if self.active:
            pass
        elif self.going_away:
            self.close()
            return
        else:
            self.idle_since_ns = perf_ns()
        if not self.closed:
            self.pool.offer(self)

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.closed:
            self.side.outbox.send(self.transport, [data], len(data))

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.going_away = True
            with contextlib.suppress(H2Error):
                self.h2.close_connection()
            self.flush()
            self.side.outbox.flush()
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def _settle(self, error: BaseException | None) -> None:
        settings = self.settings
        if settings is not None and not settings.done():
            if error is None:
                settings.set_result(None)
            else:
                settings.set_exception(error)

    # -- bytes in --------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        settings = self.settings
        if data[:5] == b"HTTP/" and settings is not None and not settings.done():
            # h2 would wait for the rest of a "frame" megabytes long.
            self._settle(
                UpstreamProtocolError(
                    "the upstream answered in HTTP/1.x: it does not speak HTTP/2 with prior "
                    "knowledge (h2c://); use http:// for it"
                )
            )
            self.abort()
            return
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:
            self.flush()
            goaway = self.h2.goaway
            if goaway is not None:
                # A GOAWAY came first in this read (h2 refuses what follows an error
                # GOAWAY): the origin went away, it did not break the protocol.
                self._goaway(goaway, cut=True)
            else:
                error = UpstreamProtocolError(f"HTTP/2: {exc}")
                self._settle(error)
                for each in list(self.streams.values()):
                    each.fail(error)
            self.abort()
            return
        touched: list[H2OriginStream] = []
        for event in events:
            stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
            try:
                self._event(event, stream)
            except Exception as exc:  # a defect: never let it kill the transport silently
                handler = stream.handler if stream is not None else None
                if handler is not None:
                    handler.on_internal_error(exc)
            if stream is not None and stream not in touched:
                touched.append(stream)
        self.flush()
        for stream in touched:
            handler = stream.handler
            if handler is not None and not stream.done:
                handler.flush()

    def _event(self, event: object, stream: H2OriginStream | None) -> None:
        if isinstance(event, DataReceived):
            if stream is not None:
                stream.on_data(event.data or b"", event.flow_controlled_length or 0)
            else:
                with contextlib.suppress(H2Error):
                    self.h2.acknowledge_received_data(
                        event.flow_controlled_length or 0, event.stream_id or 0
                    )
        elif stream is not None:
            if isinstance(event, ResponseReceived):
                headers = list(event.headers or ())
                status = int(_pseudo(headers, b":status") or b"0")
                stream.on_head(status, headers, event.stream_ended is not None)
            elif isinstance(event, TrailersReceived):
                stream.on_trailers(list(event.headers or ()))
            elif isinstance(event, StreamEnded):
                stream.on_end()
            elif isinstance(event, StreamReset):
                stream.on_reset(event.error_code)
            elif isinstance(event, WindowUpdated):
                stream.pump()
        elif isinstance(event, WindowUpdated):  # the connection's window
            for each in list(self.streams.values()):
                each.pump()
        elif isinstance(event, RemoteSettingsChanged):
            settings = self.settings
            if settings is not None and not settings.done():
                settings.set_result(None)  # the pool's connect goes on from here
            else:
                self.pool.offer(self)  # the stream limit may have grown
        elif isinstance(event, ConnectionTerminated):
            self._goaway(event)

    def _goaway(self, event: ConnectionTerminated, cut: bool = False) -> None:
        """No stream opens here any more; those the origin did not process fail as such,
        and the others too unless the GOAWAY is graceful (`cut`: the connection is lost)."""
        self.going_away = True
        code = event.error_code
        last = event.last_stream_id or 0
        name = code_name(code)
        self._settle(ResetByPeer(f"GOAWAY {name} before the connection was ready"))
        graceful = code == ErrorCodes.NO_ERROR and not cut
        for sid, stream in list(self.streams.items()):
            if sid > last:
                why = f"GOAWAY {name}: the origin did not process it (last stream {last})"
                stream.fail(ResetByPeer(why, unprocessed=True))
            elif not graceful:
                stream.fail(ResetByPeer(f"GOAWAY {name}"))
        if not graceful:
            self.abort()
        elif not self.active:
            self.close()


def _pseudo(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for n, v in headers:
        if n == name:
            return v
    return None
