"""Opening a connection to the origin, the parts the pool (`proxy.forward.pool`) delegates:
what the resolver and the TLS library report, as neutral failures `classify` reads; the
client TLS context (ALPN); and the protocol a TLS connection has until ALPN chose its codec.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any, Final, Protocol

from ..config import Config
from ..diagnosis.classify import HandshakeFailed, NameNotResolved


class Pool(Protocol):
    def on_closed(self, conn: Any, busy: bool) -> None: ...


# getaddrinfo errors -> DNS rcode names (RFC 9209 dns_error carries `rcode`).
_GAI_RCODE: Final = {
    socket.EAI_NONAME: "NXDOMAIN",
    getattr(socket, "EAI_NODATA", -5): "NOERROR",  # name exists, no address record
    socket.EAI_FAIL: "SERVFAIL",
}


def name_failure(error: socket.gaierror) -> NameNotResolved:
    """What a failed getaddrinfo means, as a fact `classify` reads."""
    if error.errno == socket.EAI_AGAIN:
        return NameNotResolved("SERVFAIL", temporary=True)
    return NameNotResolved(_GAI_RCODE.get(error.errno or 0, "SERVFAIL"))


def handshake_failure(error: ssl.SSLError) -> HandshakeFailed:
    """What a failed TLS handshake means, as a fact `classify` reads."""
    if isinstance(error, ssl.SSLCertVerificationError):
        reason = (
            getattr(error, "verify_message", None)
            or getattr(error, "reason", None)
            or "verification failed"
        )
        return HandshakeFailed(str(reason), certificate=True)
    return HandshakeFailed(str(getattr(error, "reason", None) or error))


class Handshaking(asyncio.Protocol):
    """The protocol of a TLS connection until ALPN chose its codec: it keeps what arrives
    meanwhile and hands the connection (and those bytes, or its loss) to the codec."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: Any = None
        self.closed = False
        self.received: list[bytes] = []
        self.codec: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.codec is None:
            self.pool.on_closed(self, busy=False)
        else:
            self.codec.connection_lost(exc)

    def hand_over(self, codec: Any) -> None:
        self.codec = codec
        transport = self.transport
        transport.set_protocol(codec)
        codec.connection_made(transport)
        received, self.received = self.received, []
        for data in received:
            codec.data_received(data)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def make_ssl_context(config: Config, h2: bool = False) -> ssl.SSLContext:
    tls = config.tls
    context = ssl.create_default_context(cafile=tls.ca_file)
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2", "http/1.1"] if h2 else ["http/1.1"])
    return context
