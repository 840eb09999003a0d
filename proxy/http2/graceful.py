"""h2's connection, as both sides of the HTTP/2 codec use it: taught RFC 9113 §6.8's
graceful GOAWAY on the receiving side, and able to let go of what it holds.

h2 closes its whole state machine on any GOAWAY it receives (python-hyper/h2#1181), so the
frames of streams the peer still means to finish raise `ProtocolError`. A GOAWAY with
NO_ERROR is a graceful shutdown: streams at or below its last stream id may complete, only
new streams are forbidden. This subclass reports that GOAWAY as the usual
`ConnectionTerminated` event and leaves the connection open; the codec opens (or accepts)
no new stream on it. A GOAWAY with an error code still closes the connection.
"""

from __future__ import annotations

import contextlib
from typing import Any

from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated
from h2.exceptions import H2Error
from h2.frame_buffer import FrameBuffer
from hpack import Encoder


def acknowledge(h2: H2Connection, stream_id: int, size: int) -> None:
    """`size` received bytes of a stream were taken: the peer may send them again (h2 sends
    the WINDOW_UPDATE when it decides to); a stream that closed meanwhile needs none."""
    with contextlib.suppress(H2Error):
        h2.acknowledge_received_data(size, stream_id)


class PlainEncoder(Encoder):
    """HPACK without Huffman coding: pure-Python Huffman was 7-9% of the proxy's CPU under
    h2load (bench/RESULTS.md, issue 19), for ~30% fewer header bytes; a proxy next to its
    peers spends CPU, not bandwidth."""

    def encode(self, headers: Any, huffman: bool = False) -> bytes:
        return super().encode(headers, huffman=False)


class GracefulH2Connection(H2Connection):
    """An `H2Connection` that keeps serving open streams after a graceful GOAWAY, and
    remembers the last GOAWAY it received (`goaway`): when frames follow an error GOAWAY in
    one read, h2 raises before it reports the event."""

    goaway: ConnectionTerminated | None = None

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.encoder = PlainEncoder()

    def _receive_goaway_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
        if frame.error_code != ErrorCodes.NO_ERROR:
            frames, events = super()._receive_goaway_frame(frame)
            last = events[-1]
            if isinstance(last, ConnectionTerminated):
                self.goaway = last
            return frames, events
        event = self.goaway = ConnectionTerminated()
        event.error_code = ErrorCodes.NO_ERROR
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]

    def release(self) -> None:
        """The connection is gone: what h2 holds for it goes now. Its frame dispatch table
        (bound methods) makes an h2 connection a reference cycle, freed only by the cyclic
        GC, which the proxy runs seldom (server.tune_gc): dead connections, and the 1 MiB
        of a CONTINUATION flood each, would pile up until it did."""
        self.incoming_buffer = FrameBuffer(server=not self.config.client_side)
        self.data_to_send()
        self.streams.clear()
        self._frame_dispatch_table = {}  # the cycle
