"""One HTTP/2 stream as the core sees its client (`ClientConnection`): reading a stream is
paused by holding back its WINDOW_UPDATE, so an upload that the origin cannot take holds
its own stream only, never the connection's other streams.

Rules:
1. The client may send a stream at most its window (64 KiB) beyond what the core took;
   the connection's window is set far above the sum of those, so paused streams never
   starve the others.
2. A request body that disagrees with its content-length (RFC 9113 §8.1.1) is a stream
   error, judged here (`Stream.body_problem`): h2 would make it a connection error and
   end every stream of the connection, so its own check is off (`H2ServerConnection`).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Final, Protocol

from h2.connection import AllowedStreamIDs, H2Connection
from h2.exceptions import H2Error
from h2.stream import H2Stream

if TYPE_CHECKING:
    from ..forward.forwarder import Forwarder

# The connection's receive window (the streams' stays at the default 65,535): 100 paused
# streams hold at most 6.4 MiB of it.
CONNECTION_WINDOW: Final = 16 * 1024 * 1024


def _unchecked(length: int, end_stream: bool) -> None:
    """In place of h2's content-length check of a stream (rule 2)."""


class H2ServerConnection(H2Connection):
    """h2's connection, whose streams leave the content-length check to the codec (rule 2;
    h2 offers no setting for it, so each new stream's check is replaced)."""

    def _begin_new_stream(self, stream_id: int, allowed_ids: AllowedStreamIDs) -> H2Stream:
        stream = super()._begin_new_stream(stream_id, allowed_ids)
        stream._track_content_length = _unchecked  # type: ignore[method-assign]
        return stream


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
        "expected",
        "read_pauses",
        "seen",
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
        self.expected = -1  # the request's content-length (-1: none)
        self.seen = 0  # request body bytes received

    def body_problem(self, size: int, ended: bool) -> str | None:
        """`size` more body bytes came (`ended`: and the stream ended): why they disagree
        with the content-length (RFC 9113 §8.1.1), or None."""
        self.seen += size
        expected = self.expected
        if expected < 0:
            return None
        if self.seen > expected:
            return f"DATA past content-length {expected} (RFC 9113 §8.1.1)"
        if ended and self.seen < expected:
            return f"DATA ended at {self.seen} of content-length {expected} (RFC 9113 §8.1.1)"
        return None

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
