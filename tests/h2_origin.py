"""A real HTTP/2 origin on the h2 library (h2c, prior knowledge), scripted per request: each
request, once its body is in, is answered by an `answer(conn, stream_id, head, body)`
coroutine, which may respond, hold, reset the stream or send GOAWAY. It counts its
connections, the streams open at once and the resets it received."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import DataReceived, RequestReceived, StreamEnded, StreamReset, WindowUpdated
from h2.settings import SettingCodes

from support import LOOPBACK

Answer = Callable[["OriginConn", int, dict[bytes, bytes], bytes], Awaitable[None]]


class OriginConn:
    """One connection of `H2Server`: h2's server side, each request answered in a task."""

    def __init__(self, server: H2Server, reader, writer) -> None:
        self.server = server
        self.reader, self.writer = reader, writer
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.open: set[int] = set()
        self.window = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()

    def flush(self) -> None:
        if not self.writer.is_closing():
            self.writer.write(self.h2.data_to_send())

    async def run(self) -> None:
        self.h2.initiate_connection()
        if self.server.max_streams is not None:
            self.h2.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: self.server.max_streams})
        self.flush()
        heads: dict[int, dict[bytes, bytes]] = {}
        bodies: dict[int, bytearray] = {}
        with contextlib.suppress(ConnectionError):
            while data := await self.reader.read(65536):
                for event in self.h2.receive_data(data):
                    if isinstance(event, RequestReceived):
                        heads[event.stream_id] = dict(event.headers)
                        bodies[event.stream_id] = bytearray()
                        self.open.add(event.stream_id)
                        self.server.peak = max(self.server.peak, len(self.open))
                    elif isinstance(event, DataReceived):
                        bodies[event.stream_id] += event.data
                        if self.server.ack_data:
                            self.h2.acknowledge_received_data(
                                event.flow_controlled_length, event.stream_id
                            )
                    elif isinstance(event, StreamEnded) and event.stream_id in heads:
                        sid = event.stream_id
                        head = heads.pop(sid)
                        self.server.requests.append(head)
                        task = asyncio.create_task(
                            self.server.answer(self, sid, head, bytes(bodies.pop(sid)))
                        )
                        self.tasks.add(task)
                        task.add_done_callback(self.tasks.discard)
                    elif isinstance(event, StreamReset):
                        self.open.discard(event.stream_id)
                        self.server.resets.append(event.stream_id)
                    elif isinstance(event, WindowUpdated):
                        self.window.set()
                self.flush()
        self.writer.close()

    async def respond(self, sid: int, status: int, body: bytes = b"") -> None:
        """Head, then the body within the proxy's windows, then the end."""
        fields = [(b":status", b"%d" % status), (b"content-length", b"%d" % len(body))]
        self.h2.send_headers(sid, fields, end_stream=not body)
        self.flush()
        while body:
            size = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
            if size <= 0:
                self.window.clear()
                await self.window.wait()
                continue
            chunk, body = body[:size], body[size:]
            self.h2.send_data(sid, chunk, end_stream=not body)
            self.flush()
            await asyncio.sleep(0)
        self.open.discard(sid)

    def goaway(self, last_stream_id: int, code: ErrorCodes = ErrorCodes.NO_ERROR) -> None:
        self.h2.close_connection(error_code=code, last_stream_id=last_stream_id)
        # h2 refuses to send after its own GOAWAY: the graceful tests keep the connection
        # open on the origin's side as a real server would.
        self.h2.state_machine.state = self.h2.state_machine.state.__class__.SERVER_OPEN
        self.flush()


class H2Server:
    def __init__(
        self, answer: Answer, max_streams: int | None = None, ssl=None, ack_data: bool = True
    ) -> None:
        self.answer = answer
        self.ack_data = ack_data  # False: it never opens its window (an upload stalls)
        self.ssl = ssl  # an SSLContext offering ALPN h2: an https:// origin
        self.max_streams = max_streams
        self.connections: list[OriginConn] = []
        self.requests: list[dict[bytes, bytes]] = []
        self.resets: list[int] = []
        self.peak = 0  # the most streams open at once on one connection
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> H2Server:
        self.server = await asyncio.start_server(self._serve, LOOPBACK, 0, ssl=self.ssl)
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        scheme = "https" if self.ssl else "h2c"
        return f"{scheme}://{LOOPBACK}:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader, writer) -> None:
        conn = OriginConn(self, reader, writer)
        self.connections.append(conn)
        await conn.run()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in self.connections:
            conn.writer.close()
            for task in list(conn.tasks):
                task.cancel()
