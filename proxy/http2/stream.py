"""One HTTP/2 stream as the core sees its client (`ClientConnection`): reading a stream is
paused by holding back its WINDOW_UPDATE, so an upload that the origin cannot take holds
its own stream only, never the connection's other streams.

Rule: the client may send a stream at most its window (64 KiB) beyond what the core took;
the connection's window is set far above the sum of those, so paused streams never starve
the others.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Final, Protocol

from h2.connection import H2Connection
from h2.exceptions import H2Error

if TYPE_CHECKING:
    from ..forward.forwarder import Forwarder

# The connection's receive window (the streams' stays at the default 65,535): 100 paused
# streams hold at most 6.4 MiB of it.
CONNECTION_WINDOW: Final = 16 * 1024 * 1024


class Connection(Protocol):
    """What a stream needs of its connection (`H2ClientConnection`)."""

    h2: H2Connection
    client_ip: str
    client_ip_b: bytes
    trusted: bool
    write_paused: bool
    in_feed: bool

    def flush(self) -> None: ...
    def exchange_finished(self, ex: Forwarder) -> None: ...
    def close(self) -> None: ...


class Stream:
    """The client side of one exchange on an HTTP/2 connection."""

    __slots__ = (
        "client_ip",
        "client_ip_b",
        "conn",
        "read_pauses",
        "stream_id",
        "trusted",
        "unacked",
    )

    def __init__(self, conn: Connection, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.client_ip = conn.client_ip
        self.client_ip_b = conn.client_ip_b
        self.trusted = conn.trusted
        self.read_pauses = 0
        self.unacked = 0  # request bytes taken while paused, their WINDOW_UPDATE held back

    @property
    def write_paused(self) -> bool:
        return self.conn.write_paused

    @property
    def in_feed(self) -> bool:
        return self.conn.in_feed

    def received(self, size: int) -> None:
        """`size` flow-controlled bytes of this stream were taken by the core."""
        if self.read_pauses:
            self.unacked += size
        else:
            self._ack(size)

    def pause_reading(self, reason: int) -> None:
        self.read_pauses |= reason

    def resume_reading(self, reason: int) -> None:
        if self.read_pauses & reason:
            self.read_pauses &= ~reason
            if not self.read_pauses and self.unacked:
                size, self.unacked = self.unacked, 0
                self._ack(size)
                self.conn.flush()

    def _ack(self, size: int) -> None:
        with contextlib.suppress(H2Error):  # the stream closed meanwhile
            self.conn.h2.acknowledge_received_data(size, self.stream_id)

    def exchange_finished(self, ex: Forwarder) -> None:
        self.conn.exchange_finished(ex)

    def has_queued(self) -> bool:
        return False  # streams never wait for each other

    def close(self) -> None:
        self.conn.close()
