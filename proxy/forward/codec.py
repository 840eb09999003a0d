"""The seam between the forwarding core and the protocol codecs: what a codec gives the core
and what the core calls on it. A protocol is a codec package beside `proxy.http1` that
implements these; the core (`Forwarder`, `UpstreamPool`) imports no codec.

Calls are synchronous callbacks both ways, as httpcore's pool talks to its connections
and hypercorn's `HTTPStream` to its protocols: no task per exchange on the hot path.

    client codec --on_request_*-->  Forwarder  --begin/send_*-->  origin codec
    client codec <--send_*/abort--  Forwarder  <--on_response_*--  origin codec

Neutral data: a request head is read through `RequestHead` (HTTP/1.1-style field lines:
the message model both codecs speak, as in httpcore); an origin's response head reaches the
client codec as an opaque `ResponseHead` the origin codec made (an HTTP/1.1 origin's head,
filtered once and memoised, which an HTTP/1.1 client codec writes as it is). Failures
reach the core as exceptions that `proxy.diagnosis.classify` understands.
"""

from __future__ import annotations

from typing import Any, Final, Protocol

from ..diagnosis.faults import FaultInfo

# The exchange a codec reports to and is called for: the core's `Forwarder`. This module
# sits below it (the forwarder implements the core's side of the seam), so it is named here,
# not imported; codecs, which sit above the core, type it as `Forwarder` themselves.
Forwarder = Any

# Why a client codec stops reading (`ClientConnection.pause_reading`): one bit each, reading
# resumes when none is left. Codecs add their own bits from PAUSE_CODEC up.
PAUSE_BUFFER: Final = 1  # request body buffered while the upstream connects
PAUSE_UPLOAD: Final = 2  # the upstream connection's write buffer is full
PAUSE_CODEC: Final = 4


class RequestHead(Protocol):
    """A client's request head as the core and an origin codec read it."""

    method: bytes
    target: bytes
    http11: bool  # the client speaks HTTP/1.1 (interim responses may be relayed)
    keep_alive: bool  # the client wants the connection kept after this exchange
    host: bytes | None  # the authority the client asked for
    lines: list[bytes]  # end-to-end field lines to forward, each `name: value\r\n`
    content_length: int | None
    chunked: bool  # the body's length is not known in advance
    upgrade: bytes | None  # the protocol an Upgrade request asks for
    via: bytes | None
    xff: bytes | None
    xfp: bytes | None
    xfh: bytes | None
    accept: bytes | None
    content_type: bytes | None
    content_encoding: bytes | None
    loop_marker: bool  # the request already passed through this proxy
    grpc: bool  # a gRPC call (its outcome travels in trailers: HTTP/2 only)
    upstream_fixed: bytes  # an origin codec's cache of this head's own part of its request

    def retarget(self, target: bytes) -> RequestHead: ...  # the head with another target


class ResponseHead(Protocol):
    """An origin's response head, made by the origin codec for the client codec."""

    raw: bytes  # status line and field lines in HTTP/1.1 form: the diagnosis evidence
    # What an HTTP/1.1 client is sent for it: the status line, the end-to-end field lines,
    # Proxy-Status and Via (and a Date the origin left out); another client codec turns
    # these lines into its own fields.
    prefix: bytes


class ClientConnection(Protocol):
    """The client side of an exchange, as the core drives it: an HTTP/1.1 connection, or
    one HTTP/2 stream (whose reading pauses alone)."""

    client_ip: str
    client_ip_b: bytes
    trusted: bool  # the client is a trusted proxy (its X-Forwarded-* are kept)
    read_pauses: int  # why reading is paused (PAUSE_* bits); 0: reading

    @property
    def write_paused(self) -> bool: ...  # the client is not reading fast enough
    @property
    def in_feed(self) -> bool: ...  # inside one read's callbacks: upstream bytes wait for it

    def pause_reading(self, reason: int) -> None: ...
    def resume_reading(self, reason: int) -> None: ...
    def exchange_finished(self, ex: Forwarder) -> None: ...
    def has_queued(self) -> bool: ...  # requests wait behind the current one
    def close(self) -> None: ...


class ServedConnection(Protocol):
    """A client connection as the server's sweep and drain drive it (`ForwardContext.
    connections`), never reading its state from outside."""

    def check_deadline(self, now: int) -> None: ...
    def drain(self) -> None: ...  # draining starts: close now if idle, or a tunnel
    def cut_by_drain(self) -> None: ...  # the drain deadline passed
    def abort(self) -> None: ...


class ResponseSink:
    """Where the core sends the current exchange's response on a client connection.

    A base class, not a protocol: a client codec's sink subclasses it, so the compiled
    core calls it through a vtable rather than by name (four calls per exchange).
    """

    # `head`: the `ResponseHead` an origin codec made; a client codec knows the origin
    # codecs it is paired with and reads their heads as their own type.
    def send_interim(self, ex: Forwarder, status: int, head: Any) -> None:
        raise NotImplementedError

    def send_head(self, ex: Forwarder, status: int, head: Any, now: int) -> None:
        raise NotImplementedError

    def send_data(self, data: bytes) -> None:
        raise NotImplementedError

    def send_end(self) -> None:
        """The response is complete: its end, and what is still queued, leave now."""
        raise NotImplementedError

    def flush(self) -> None:
        """What was sent so far leaves in one write."""
        raise NotImplementedError

    def send_trailers(self, fields: list[tuple[bytes, bytes]]) -> None:
        """The origin's trailers, sent with the end (a codec that cannot carry them drops
        them: HTTP/1.1 here, where no gRPC call can arrive)."""

    def send_reply(
        self, ex: Forwarder, row: FaultInfo, detail: str | None, params: dict[str, str] | None
    ) -> None:
        """A whole response the proxy made, from the taxonomy row."""
        raise NotImplementedError

    def send_raw(self, data: bytes) -> None:
        """Tunnel bytes, untouched."""
        raise NotImplementedError

    def abort(self) -> None:
        """The peer must see a reset: a cut response never looks whole."""
        raise NotImplementedError


class OriginConnection(Protocol):
    """The origin side of one exchange: an HTTP/1.1 connection, serving one exchange at a
    time (`UpstreamPool` keeps it for the next), or one stream of a `SharedConnection`
    (`closed` once its exchange is over: never kept)."""

    transport: Any  # the pool opens it (TCP, then TLS); only the codec writes to it
    closed: bool
    bytes_seen: bool  # any response byte arrived for the current exchange
    close_delimited: bool  # the current response's body ends when the origin closes
    idle_since_ns: int
    handler: Forwarder | None  # the exchange it serves (None: idle, set by the pool)

    def begin(self, handler: Forwarder, head: RequestHead) -> None: ...  # writes the head
    def send_data(self, data: bytes) -> None: ...
    # The end of a request body whose length was not known (`RequestHead.chunked`); a
    # request with a Content-Length, or none, ends by itself, and the core does not call it.
    def send_end(self) -> None: ...
    def flush(self) -> None: ...
    def send_raw(self, chunks: list[bytes]) -> None: ...  # tunnel bytes, untouched
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class SharedConnection(Protocol):
    """A connection to the origin that carries several exchanges at once (HTTP/2): the pool
    opens a stream on it per exchange, and that stream is the exchange's
    `OriginConnection`. A codec whose factory has `multiplexed = True` makes these."""

    transport: Any
    closed: bool
    idle_since_ns: int  # when its last stream was let go
    active: int  # streams handed out and not yet let go

    def ready(self) -> Any: ...  # an awaitable: the peer's settings came, streams may open
    def open_stream(self) -> OriginConnection | None: ...  # None: full, or going away
    def close(self) -> None: ...
    def abort(self) -> None: ...
