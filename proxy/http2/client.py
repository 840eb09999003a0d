"""The client side of the HTTP/2 codec: one connection that opened with the HTTP/2 preface
(prior knowledge, h2c), many streams, each stream one exchange (a `Forwarder`). The frame
and HPACK state machine is h2's (python-hyper); this module maps its events to the core's
calls and the core's to its sends (a `ServedConnection` of `proxy.forward.codec`; each
stream is the core's `ClientConnection`, `http2.stream.Stream`).

Rules:
1. Every stream starts at once, at the end of the read that opened it: there is no queue,
   streams are independent exchanges. A stream reset (or found malformed) in the read
   that opened it never reaches the upstream (the rapid reset's HEADERS + RST_STREAM).
2. What h2 wants to send goes out once per read (`flush`, through the outbox), as on
   HTTP/1.1.
3. A connection error (h2 raised `ProtocolError`) ends the connection with GOAWAY; the
   streams it carried end as the client's (the client broke the protocol).
4. Draining (RFC 9113 §6.8): an idle connection gets GOAWAY and closes; a busy one GOAWAY
   with last stream id 2^31-1 and a PING, then (the PING's ack, or `DRAIN_ROUND_TRIP_NS`)
   GOAWAY with the real last stream id. Streams up to it finish; one above it is refused
   (REFUSED_STREAM: not forwarded, no exchange); the connection closes when its streams
   are done, or is cut by `timeouts.drain` (`cut_by_drain`, the proxy's). The GOAWAYs are
   hyperframe's, written after h2's output: h2's `close_connection` would stop the
   streams in flight too (it closes on any GOAWAY, python-hyper/h2#1181).
5. h2 itself bounds a header block (64 CONTINUATION frames; the decoded size, set here to
   `limits.max_request_header_bytes`) and the open streams (`MAX_CONCURRENT_STREAMS`): past
   them it ends the connection with GOAWAY, as for any protocol error.
6. Frames a client may send without asking for work (RST_STREAM after opening a stream,
   PING, SETTINGS) have a budget per connection and window (`FLOOD_BUDGET`): beyond it the
   connection ends with GOAWAY ENHANCE_YOUR_CALM (rapid reset, CVE-2023-44487; PING and
   SETTINGS floods), and the streams it carried end as the client's (http2.stream).
7. A connection ended by rules 3, 5 or 6 is recorded once, as the client's
   `http_request_error` (like an HTTP/1.1 request that cannot be parsed), besides the
   streams it carried: each defence shows in `/stats` and the log.
8. Response bytes held for the client's windows are bounded per stream (http2.respond)
   and per connection (http2.stream.hold_back); a stream whose window stays shut for
   `timeouts.client_body` is cut (RST_STREAM CANCEL), charged to the client (timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Final

from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingAckReceived,
    PingReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import H2Error, ProtocolError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame

from ..base.text import duration_text
from ..diagnosis.faults import RequestProblem
from ..diagnosis.record import perf_ns
from ..forward.context import ForwardContext
from ..forward.deadlines import check_deadline
from ..forward.forwarder import Forwarder
from .request import read_head
from .respond import StreamSink
from .stream import (
    CONNECTION_WINDOW,
    SERVER_CONFIG,
    FloodBudget,
    H2ServerConnection,
    Stream,
    Unanswered,
    connection_error,
    hold_back,
    stalled,
)

log: Final = logging.getLogger("faultline")

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_CONCURRENT_STREAMS: Final = 100
MAX_STREAM_ID: Final = 2**31 - 1
DRAIN_PING: Final = b"draining"  # the PING between the two GOAWAYs of a drain
DRAIN_ROUND_TRIP_NS: Final = 1_000_000_000  # the second GOAWAY without the PING's ack


class H2Shared:
    """What every HTTP/2 client connection shares: which fields the proxy adds."""

    def __init__(self, ctx: ForwardContext, proxy_status: bool, server_timing: bool) -> None:
        self.ctx = ctx
        self.proxy_status = proxy_status
        self.server_timing = server_timing
        self.instance_id = ctx.instance_id.encode()


class H2ClientConnection(asyncio.Protocol):
    """One HTTP/2 client connection."""

    def __init__(self, shared: H2Shared) -> None:
        self.shared = shared
        self.ctx = shared.ctx
        self.h2: H2Connection = H2ServerConnection(SERVER_CONFIG)
        header_limit = shared.ctx.max_request_header_bytes
        self.h2.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                SettingCodes.MAX_HEADER_LIST_SIZE: header_limit,
            },
        )
        # The decoded size of a header block (an HPACK bomb expands a few KiB into MiB):
        # past limits.max_request_header_bytes, h2 ends the connection (ENHANCE_YOUR_CALM).
        self.h2.decoder.max_header_list_size = header_limit
        self.transport: Any = None
        self.client_ip = ""
        self.client_ip_b = b""
        self.trusted = False
        self.streams: dict[int, Forwarder] = {}  # the exchanges in flight, by stream
        self.clients: dict[int, Stream] = {}  # their client side (per-stream reading)
        # Responses waiting for the client's window (they may outlive their exchange).
        self.waiting: dict[int, StreamSink] = {}
        self.write_paused = False
        self.in_feed = False
        self.closed = False
        self.goaway = False  # no new streams: draining, or the client said GOAWAY
        self.drain_started_ns = 0  # the drain's first GOAWAY went out (0: not draining)
        self.last_stream_id = MAX_STREAM_ID  # streams above it are refused (drain)
        self.idle_since_ns = perf_ns()
        self.starting: list[Forwarder] = []  # streams opened in this read, to start
        self.floods = FloodBudget()
        self.calmed = False  # the connection was ended for a flood
        self.capped = False  # over HELD_HIGH_BYTES: streams holding bytes pause their origin
        self.holding = False  # some stream's origin reading is paused by this connection
        self.stalls: dict[int, int] = {}  # stream -> since when its window is shut

    # -- connection life cycle ----------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        """Taken over from the HTTP/1.1 codec after its first read (the preface)."""
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else ""
        self.client_ip_b = self.client_ip.encode()
        self.trusted = self.ctx.is_trusted(self.client_ip)
        self.ctx.connections.add(self)
        self.h2.initiate_connection()
        # Streams' windows stay at the default; the connection's is far above their sum.
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.ctx.connections.discard(self)
        streams = list(self.streams.values())
        self.streams.clear()
        for fw in streams:
            fw.client_gone()
        for sink in self.waiting.values():  # no cycle keeps what they held
            sink.chunks.clear()
        self.waiting.clear()
        self.clients.clear()
        self.h2.release()  # type: ignore[attr-defined]

    def pause_writing(self) -> None:
        self.write_paused = True
        for fw in list(self.streams.values()):
            fw.client_write_paused(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        self._hold_back()

    def flush(self) -> None:
        if self.waiting or self.holding:
            self._hold_back()
        data = self.h2.data_to_send()
        if data and not self.closed:
            self.ctx.outbox.send(self.transport, [data], len(data))

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.ctx.outbox.flush()
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- what the streams and the server call ------------------------------------------------

    def exchange_of(self, stream_id: int) -> Forwarder | None:
        return self.streams.get(stream_id)

    def exchange_finished(self, ex: Forwarder) -> None:
        sink = ex.sink
        if isinstance(sink, StreamSink):
            self.streams.pop(sink.stream_id, None)
            self.clients.pop(sink.stream_id, None)
        if not self.streams:
            self.idle_since_ns = perf_ns()
            if self.goaway and not self.waiting:
                self.flush()
                self.close()

    def check_deadline(self, now: int) -> None:
        drain_started = self.drain_started_ns
        if drain_started and not self.goaway and now - drain_started > DRAIN_ROUND_TRIP_NS:
            self._last_goaway()  # the client never acknowledged the drain's PING
        if self.stalls or self.waiting:
            for stream_id in stalled(self.stalls, self.waiting, now, self.ctx.client_body_ns):
                self._stalled(stream_id)
        for fw in list(self.streams.values()):
            check_deadline(fw, now)
        if not self.streams and now - self.idle_since_ns > self.ctx.keepalive_ns:
            self._goaway(ErrorCodes.NO_ERROR)

    def drain(self) -> None:
        if self.goaway or self.drain_started_ns:
            return
        if not self.streams and not self.waiting:
            self._goaway(ErrorCodes.NO_ERROR)  # idle: GOAWAY (the last stream id), close
            return
        self._send_goaway(MAX_STREAM_ID)  # streams on their way are still taken
        self.h2.ping(DRAIN_PING)
        self.drain_started_ns = perf_ns()
        self.flush()

    def _last_goaway(self) -> None:
        """A round trip after the drain's first GOAWAY: the real last stream id."""
        self.goaway = True
        self.last_stream_id = self.h2.highest_inbound_stream_id
        self._send_goaway(self.last_stream_id)
        if not self.streams and not self.waiting:
            self.close()

    def _send_goaway(self, last_stream_id: int) -> None:
        """GOAWAY NO_ERROR after what h2 has queued, h2's state left open (rule 4)."""
        frame = GoAwayFrame(0, last_stream_id=last_stream_id, error_code=ErrorCodes.NO_ERROR)
        data = self.h2.data_to_send() + frame.serialize()
        if not self.closed:
            self.ctx.outbox.send(self.transport, [data], len(data))

    def cut_by_drain(self) -> None:
        for fw in list(self.streams.values()):
            fw.cut_by_drain(answer=True)
        self.flush()
        self.close()

    # -- bytes in -------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:
            # h2 has queued the GOAWAY itself (PROTOCOL_ERROR, FLOW_CONTROL_ERROR, ...).
            log.debug("HTTP/2 connection error from %s: %s", self.client_ip, exc)
            self._refused(*connection_error(exc))
            self.goaway = True
            self.flush()
            self.close()  # connection_lost ends the streams it carried
            return
        touched: dict[int, Forwarder] = {}
        self.in_feed = True
        try:
            for event in events:
                if self.calmed:
                    break  # ended for a flood: nothing more from this client is served
                self._event(event, touched)
            starting, self.starting = self.starting, []
            for fw in starting:
                if not fw.done and not self.calmed:
                    fw.start()
        except Exception:  # a defect: the connection ends, the exchanges are recorded
            log.exception("internal error on an HTTP/2 connection")
            self._goaway(ErrorCodes.INTERNAL_ERROR)
        finally:
            self.in_feed = False
        for fw in touched.values():
            fw.flush_upstream()
        self.flush()

    def _event(self, event: object, touched: dict[int, Forwarder]) -> None:
        if isinstance(event, DataReceived):
            fw = self.streams.get(event.stream_id)
            stream = self.clients.get(event.stream_id)
            if fw is not None and stream is not None:
                ended = event.stream_ended is not None
                problem = stream.body_problem(len(event.data), ended)
                if problem is not None:
                    self._malformed(event.stream_id, fw, problem, ended)
                elif event.data:  # an empty DATA (END_STREAM alone) is no body chunk
                    fw.on_request_body(event.data)
                    touched[event.stream_id] = fw
            size = event.flow_controlled_length
            stream = self.clients.get(event.stream_id)
            if stream is not None:
                stream.received(size)  # its WINDOW_UPDATE, unless the core paused it
            elif size:
                with contextlib.suppress(H2Error):  # the stream closed meanwhile
                    self.h2.acknowledge_received_data(size, event.stream_id)
        elif isinstance(event, RequestReceived):
            if event.stream_id > self.last_stream_id:  # after the drain's last GOAWAY
                with contextlib.suppress(H2Error):
                    self.h2.reset_stream(event.stream_id, ErrorCodes.REFUSED_STREAM)
                return
            self._request(event.stream_id, event.headers, event.stream_ended is not None)
            fw = self.streams.get(event.stream_id)
            if fw is not None:
                touched[event.stream_id] = fw
        elif isinstance(event, StreamEnded):
            fw = self.streams.get(event.stream_id)
            stream = self.clients.get(event.stream_id)
            if fw is not None and stream is not None and stream.expected > stream.seen:
                self._malformed(event.stream_id, fw, stream.body_problem(0, True) or "", True)
            elif fw is not None:
                fw.on_request_complete()
                touched[event.stream_id] = fw
        elif isinstance(event, StreamReset):
            self.waiting.pop(event.stream_id, None)
            self.clients.pop(event.stream_id, None)
            fw = self.streams.pop(event.stream_id, None)
            touched.pop(event.stream_id, None)
            if fw is not None:
                fw.client_gone()
            if event.remote_reset:
                self._budget("reset")
        elif isinstance(event, PingReceived):
            self._budget("ping")
        elif isinstance(event, PingAckReceived):
            if event.ping_data == DRAIN_PING and self.drain_started_ns and not self.goaway:
                self._last_goaway()
        elif isinstance(event, WindowUpdated):
            if event.stream_id:
                self.stalls.pop(event.stream_id, None)
            else:
                self.stalls.clear()
            self._pump_all()
        elif isinstance(event, RemoteSettingsChanged):
            self._pump_all()
            self._budget("settings")
        elif isinstance(event, ConnectionTerminated):
            self.goaway = True
            if not self.streams:
                self.close()

    def _request(self, stream_id: int, fields: Any, ended: bool) -> None:
        """A new stream: its exchange starts now."""
        ctx = self.ctx
        sink = StreamSink(self, stream_id)
        stream = self.clients[stream_id] = Stream(self, stream_id)
        fw = Forwarder(ctx, stream, sink, perf_ns())
        ctx.gauges.in_flight += 1
        fw.protocol = "h2"
        self.streams[stream_id] = fw
        head, problem = read_head(fields, ended, self.shared.instance_id)
        fw.method = head.method_name
        fw.target = head.target_text
        request_id = head.request_id or ctx.new_request_id()
        fw.request_id_line = b"X-Request-Id: " + request_id + b"\r\n"
        fw.request_id = request_id.decode("latin-1")
        if problem is not None:
            fw.attach(head, (RequestProblem.MALFORMED, problem))
        else:
            fw.attach(head)
            limit = ctx.max_request_body_bytes
            length = head.content_length
            if limit and length is not None and length > limit:
                fw.reject = (RequestProblem.BODY_TOO_LARGE, f"content-length {length} over {limit}")
        if head.content_length is not None:
            stream.expected = head.content_length
        self.starting.append(fw)  # once this read's events are in (rule 1)
        if ended:
            fw.on_request_complete()

    def _malformed(self, stream_id: int, fw: Forwarder, detail: str, ended: bool) -> None:
        """A stream error (RFC 9113 §8.1.1): a 400 on the stream if its response has not
        started, else RST_STREAM PROTOCOL_ERROR; the rest of its request is never
        forwarded, and the connection serves its other streams."""
        reset = fw.response_started or not ended  # the client would go on sending
        if fw.response_started:
            with contextlib.suppress(H2Error):
                self.h2.reset_stream(stream_id, ErrorCodes.PROTOCOL_ERROR)
        fw.on_request_error(RequestProblem.MALFORMED, detail)
        if reset and stream_id not in self.waiting:  # the 400 is out: no more of the body
            with contextlib.suppress(H2Error):
                self.h2.reset_stream(stream_id, ErrorCodes.PROTOCOL_ERROR)

    def _budget(self, kind: str) -> None:
        """Count one unasked-for frame; over its budget, the connection ends."""
        flood = self.floods.spend(kind, perf_ns())
        if flood is not None and not self.calmed:
            self.calmed = True
            log.warning("%s from %s, GOAWAY ENHANCE_YOUR_CALM", flood, self.client_ip)
            self._refused(RequestProblem.MALFORMED, f"{flood}, GOAWAY ENHANCE_YOUR_CALM")
            self._goaway(ErrorCodes.ENHANCE_YOUR_CALM)

    def _refused(self, problem: RequestProblem, detail: str) -> None:
        """The connection ends for a defence: recorded once, as the client's (rule 7)."""
        ctx = self.ctx
        fw = Forwarder(ctx, Stream(self, 0), Unanswered(), perf_ns())
        ctx.gauges.in_flight += 1
        fw.protocol = "h2"
        fw.request_id = ctx.new_request_id().decode()
        fw.attach(None, (problem, detail))
        fw.start()

    def _hold_back(self) -> None:  # which streams may read their origin (rule 8)
        paused = self.write_paused
        self.capped, self.holding = hold_back(self.streams, self.waiting, paused, self.capped)

    def _stalled(self, stream_id: int) -> None:
        """The client kept this stream's window shut for timeouts.client_body (rule 8)."""
        self.stalls.pop(stream_id, None)
        with contextlib.suppress(H2Error):
            self.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
        fw = self.streams.get(stream_id)
        waiting = self.waiting.get(stream_id)
        if fw is not None:
            limit = duration_text(self.ctx.client_body_ns)
            detail = f"the client kept its flow-control window shut for {limit}"
            fw.on_request_error(RequestProblem.TIMEOUT, detail + " (timeouts.client_body)")
        elif waiting is not None:
            waiting.abort()  # the exchange was recorded when the origin's response ended
        self.flush()

    def _pump_all(self) -> None:
        for sink in list(self.waiting.values()):
            sink.pump()
        if self.goaway and not self.streams and not self.waiting:
            self.close()

    def _goaway(self, code: ErrorCodes) -> None:
        """No new streams; close once the streams in flight are done (at once on an error)."""
        if not self.goaway:
            self.goaway = True
            with contextlib.suppress(H2Error):
                self.h2.close_connection(error_code=code)
            self.flush()
        if code != ErrorCodes.NO_ERROR:
            self.close()  # connection_lost ends the streams
        elif not self.streams and not self.waiting:
            self.close()
