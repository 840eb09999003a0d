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
3. What a connection's streams may hold and send unasked is bounded here: response bytes
   held for the client's windows (`hold_back`: past `HELD_HIGH_BYTES` every stream that
   holds some stops reading its origin, until the connection holds under
   `HELD_LOW_BYTES`), and frames that ask for no work (`FloodBudget`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Final, Protocol

from h2.config import H2Configuration
from h2.connection import AllowedStreamIDs, H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import DenialOfServiceError, ProtocolError
from h2.stream import H2Stream

from ..diagnosis.faults import RequestProblem
from ..forward.codec import ResponseSink
from .graceful import GracefulH2Connection, acknowledge

if TYPE_CHECKING:
    from ..diagnosis.faults import FaultInfo
    from ..forward.forwarder import Forwarder

# The connection's receive window (the streams' stays at the default 65,535): 100 paused
# streams hold at most 6.4 MiB of it.
CONNECTION_WINDOW: Final = 16 * 1024 * 1024
# Response bytes a connection holds for its client's windows (rule 3): 8 streams' worth.
HELD_HIGH_BYTES: Final = 2 * 1024 * 1024
HELD_LOW_BYTES: Final = 1024 * 1024
FLOOD_WINDOW_NS: Final = 10_000_000_000
# Per kind and connection within FLOOD_WINDOW_NS; a browser or a gRPC client stays far below.
FLOOD_BUDGET: Final = {"reset": 200, "ping": 100, "settings": 100}


def _unchecked(length: int, end_stream: bool) -> None:
    """In place of h2's content-length check of a stream (rule 2)."""


# Header checks are this codec's (http2.request): h2's would end the connection. What goes
# out is built from checked parts (request.py, httptools): h2's second look cost 5% of an
# exchange (bench/h2cost.py).
SERVER_CONFIG: Final = H2Configuration(
    client_side=False,
    header_encoding=None,
    validate_inbound_headers=False,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
)


class H2ServerConnection(GracefulH2Connection):
    """h2's connection (graceful GOAWAY, `release`), whose streams leave the content-length
    check to the codec (rule 2; h2 offers no setting for it, so each new stream's check is
    replaced)."""

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
        acknowledge(self.conn.h2, self.stream_id, size)

    def exchange_finished(self, ex: Forwarder) -> None:
        self.conn.exchange_finished(ex)

    def has_queued(self) -> bool:
        return False  # streams never wait for each other

    def close(self) -> None:
        self.conn.close()


class Unanswered(ResponseSink):
    """The sink of an exchange that stands for a whole connection the proxy ended (a
    defence, a protocol error): GOAWAY was its answer, nothing more is sent."""

    def send_interim(self, ex: Forwarder, status: int, head: object) -> None:
        pass

    def send_head(self, ex: Forwarder, status: int, head: object, now: int) -> None:
        pass

    def send_data(self, data: bytes) -> None:
        pass

    def send_end(self) -> None:
        pass

    def flush(self) -> None:
        pass

    def send_reply(
        self, ex: Forwarder, row: FaultInfo, detail: str | None, params: dict[str, str] | None
    ) -> None:
        pass

    def send_raw(self, data: bytes) -> None:
        pass

    def abort(self) -> None:
        pass


class Held(Protocol):
    """What `hold_back` reads of a stream's response sink (`http2.respond.StreamSink`)."""

    buffered: int  # bytes waiting for the client's window
    holding: Forwarder | None  # set while the sink itself paused its origin
    ended: bool  # the response is all in: its end waits to go out


def hold_back(
    streams: Mapping[int, Forwarder], waiting: Mapping[int, Held], paused: bool, capped: bool
) -> tuple[bool, bool]:
    """Pause or resume each stream's origin reading (rule 3): paused while its sink holds
    bytes and the connection is over its cap, or while its sink holds too much on its
    own; while the client's socket is not taken (`paused`: the connection paused them
    all) none is resumed. A stream whose response is all in always reads: its origin
    connection goes back to the pool. Returns whether the connection is (still) over its
    cap, and whether any stream is held."""
    held = 0
    for held_back in waiting.values():
        held += held_back.buffered
    if held > HELD_HIGH_BYTES:
        capped = True
    elif held < HELD_LOW_BYTES:
        capped = False
    holding = paused
    for stream_id, fw in list(streams.items()):
        sink = waiting.get(stream_id)
        if sink is not None and sink.ended:
            hold = False
        elif paused:
            continue
        else:
            hold = sink is not None and (capped or sink.holding is not None)
        holding = holding or hold
        if hold != fw.client_held:
            fw.client_write_paused(hold)
    return capped, holding


class FloodBudget:
    """Frames a client sent without asking for work, per kind, in windows of
    `FLOOD_WINDOW_NS` (rule 3)."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[str, tuple[int, int]] = {}  # kind -> (window start, count)

    def spend(self, kind: str, now: int) -> str | None:
        """Count one; past the budget, what the flood was (else None)."""
        start, count = self.counts.get(kind, (now, 0))
        if now - start > FLOOD_WINDOW_NS:
            start, count = now, 0
        self.counts[kind] = (start, count + 1)
        if count + 1 <= FLOOD_BUDGET[kind]:
            return None
        return f"HTTP/2 {kind} flood: over {FLOOD_BUDGET[kind]} in {FLOOD_WINDOW_NS // 10**9}s"


def stalled(stalls: dict[int, int], waiting: Mapping[int, Held], now: int, limit: int) -> list[int]:
    """The streams whose response has waited for the client's window longer than `limit`
    (`stalls`: since when each has waited; a WINDOW_UPDATE takes a stream out of it)."""
    for stream_id in [sid for sid in stalls if sid not in waiting]:
        del stalls[stream_id]
    return [sid for sid in waiting if now - stalls.setdefault(sid, now) > limit]


def connection_error(exc: ProtocolError) -> tuple[RequestProblem, str]:
    """What a connection error of the client's is, as a record says it."""
    code = ErrorCodes(exc.error_code).name if exc.error_code is not None else "?"
    problem = RequestProblem.MALFORMED
    if isinstance(exc, DenialOfServiceError):  # the decoded header list's limit
        problem = RequestProblem.HEADERS_TOO_LARGE
    return problem, f"HTTP/2 connection error, GOAWAY {code}: {str(exc)[:120]}"
