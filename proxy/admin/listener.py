"""HTTP/1.1 for the admin port: httptools on an asyncio.Protocol, every request answered at
once by one synchronous handler (the admin app only reads in-memory aggregates).

Rules:
1. Requests have no body. A head that announces one (Content-Length > 0, any
   Transfer-Encoding) is answered 413 and the connection closed: its bytes are never
   parsed as a next request.
2. Requests are answered in the order they came, each as soon as it is parsed; a head that
   cannot be parsed, or is over `MAX_HEAD_BYTES`, is answered in turn and the connection
   closed.
3. A client cannot make the server buffer more than one read of requests: while answers
   wait in the transport above its high-water mark, parsed requests wait in `pending` and
   reading is paused.
4. One deadline a connection: `client_headers_s` to send a whole head (and for a new
   connection to send its first byte), `keepalive_s` while idle or while not reading its
   answers. A client cannot hold an admin socket forever.
5. At most `MAX_CONNECTIONS` connections; more are dropped unread, so the admin port cannot
   starve the data plane sharing the loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote

import orjson
from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserInvalidURLError,
    HttpParserUpgrade,
    HttpRequestParser,
    parse_url,
)

from ..base.text import http_date
from ..http1.errors import parser_error_text
from ..replies import reason

log = logging.getLogger("faultline")

MAX_HEAD_BYTES = 16 * 1024
MAX_CONNECTIONS = 128
PROBLEM_JSON = "application/problem+json"
PROBLEM_TYPE_BASE = "urn:faultline:admin:"


class AdminRequest(NamedTuple):
    """A request head as the admin app sees it: path and query percent-decoded, header
    names lower-cased (the first of repeated fields wins)."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    http11: bool
    keep_alive: bool


class AdminResponse(NamedTuple):
    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[AdminRequest], AdminResponse]
# Run before a request's handler, on the loop (the supervisor of several workers fetches
# their counts here); the handler itself stays synchronous.
Prepare = Callable[[AdminRequest], Awaitable[None]]


def problem(
    status: int,
    kind: str,
    title: str,
    detail: str,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> AdminResponse:
    """An RFC 9457 problem document."""
    doc = {
        "type": PROBLEM_TYPE_BASE + kind,
        "title": title,
        "status": status,
        "detail": detail,
        **extensions,
    }
    extra = (("Cache-Control", "no-store"), *(headers or {}).items())
    return AdminResponse(status, PROBLEM_JSON, orjson.dumps(doc), extra)


def encode(response: AdminResponse, *, head_only: bool, close: bool, http11: bool) -> bytes:
    status, content_type, body, headers = response
    lines = [
        b"HTTP/1.1 %d %s\r\n" % (status, reason(status).encode()),
        b"Date: " + http_date() + b"\r\n",
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n",
        b"Content-Length: %d\r\n" % len(body),
    ]
    lines += (f"{name}: {value}\r\n".encode("latin-1") for name, value in headers)
    if close:
        lines.append(b"Connection: close\r\n")
    elif not http11:
        lines.append(b"Connection: keep-alive\r\n")  # HTTP/1.0 closes unless told
    lines.append(b"\r\n")
    if not head_only:
        lines.append(body)
    return b"".join(lines)


def _refusal(status: int, kind: str, detail: str) -> AdminResponse:
    """What a request the server will not read to the end is answered with."""
    return problem(status, kind, reason(status), detail)


def _head_too_large() -> AdminResponse:
    return _refusal(431, "head-too-large", f"the request head is over {MAX_HEAD_BYTES} bytes")


def _bad_request(detail: str) -> AdminResponse:
    return _refusal(400, "bad-request", detail)


class Refused(Exception):
    """Raised in a parser callback: the request is answered with `answer`, then the
    connection closes."""

    def __init__(self, answer: AdminResponse) -> None:
        super().__init__(answer.status)
        self.answer = answer


class AdminConnection(asyncio.Protocol):
    """One client of the admin port."""

    def __init__(self, listener: AdminListener) -> None:
        self.listener = listener
        self.transport: Any = None
        self.parser = HttpRequestParser(self)
        # Per-connection state
        self.pending: deque[AdminRequest] = deque()  # parsed, not answered yet
        self.stopped = False  # nothing more is parsed: answer `pending`, `last_answer`, close
        self.last_answer: AdminResponse | None = None
        self.closing = False
        self.write_paused = False
        self.read_paused = False
        self.deadline: asyncio.TimerHandle | None = None
        # Per-request state
        self.in_head = False
        self.url = b""
        self.headers: dict[str, str] = {}
        self.hosts = 0
        self.head_bytes = 0  # of the head's completed parts, counted by the callbacks
        self.head_fed = -1  # bytes of the reads after the one the head began in
        self.prepared: AdminRequest | None = None  # the next request, prepared (`Prepare`)
        self.preparing = False

    # -- connection life cycle --------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        connections = self.listener.connections
        if len(connections) >= self.listener.max_connections:
            self.closing = True
            transport.abort()
            return
        connections.add(self)
        self._arm(self.listener.client_headers_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.connections.discard(self)
        self.closing = True
        self.pending.clear()
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._answer()

    def abort(self) -> None:
        self.closing = True
        self.transport.abort()

    def _close(self) -> None:
        self.closing = True
        self.pending.clear()
        self.transport.close()
        # close() waits for the client to read what is left: that wait has a deadline too.
        self._arm(self.listener.client_headers_s)

    def _arm(self, timeout_s: float) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        loop = asyncio.get_running_loop()
        self.deadline = loop.call_later(timeout_s, self._deadline_passed)

    def _deadline_passed(self) -> None:
        self.deadline = None
        if self.closing or self.pending or self.transport.get_write_buffer_size():
            self.abort()  # it does not read its answers
        elif self.in_head:
            detail = f"the request head did not arrive within {self.listener.client_headers_s} s"
            self._stop(_refusal(408, "request-timeout", detail))
            self._answer()
        else:
            self._close()  # idle

    def _set_reading(self, reading: bool) -> None:
        if self.read_paused != reading or self.transport.is_closing():
            return  # already so, or no more reading at all
        self.read_paused = not reading
        if reading:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()

    # -- bytes in ---------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.stopped:
            return
        try:
            self.parser.feed_data(data)
        except HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, Refused):
                self._stop(cause.answer)
            else:
                self._stop(self._defect(cause or exc))
        except HttpParserUpgrade:
            self._stop(None)  # what follows is another protocol: answer, then close
        except HttpParserError as exc:
            self._stop(_bad_request(f"malformed request: {parser_error_text(exc)}"))
        else:
            if self.in_head:
                # The parser holds part of a head the callbacks have not counted yet.
                self.head_fed = 0 if self.head_fed < 0 else self.head_fed + len(data)
                if self.head_fed > MAX_HEAD_BYTES:
                    self._stop(_head_too_large())
        self._answer()

    def _stop(self, last_answer: AdminResponse | None) -> None:
        if not self.stopped:
            self.stopped = True
            self.in_head = False
            self.last_answer = last_answer

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_head = True
        self.url = b""
        self.headers = {}
        self.hosts = 0
        self.head_bytes = 0
        self.head_fed = -1
        self._arm(self.listener.client_headers_s)

    def _count(self, n: int) -> None:
        self.head_bytes += n
        if self.head_bytes > MAX_HEAD_BYTES:
            raise Refused(_head_too_large())

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        key = name.decode("latin-1").lower()
        if key == "host":
            self.hosts += 1
        # surrogateescape: a credential's bytes survive the round trip to compare them.
        self.headers.setdefault(key, value.decode("utf-8", "surrogateescape"))

    def on_headers_complete(self) -> None:
        self.in_head = False
        parser, headers = self.parser, self.headers
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise Refused(_bad_request(f"unsupported HTTP version {version}"))
        if self.hosts > 1 or (self.hosts == 0 and version == "1.1"):
            raise Refused(_bad_request("an HTTP/1.1 request needs exactly one Host header"))
        length = headers.get("content-length")
        if "transfer-encoding" in headers or (length is not None and int(length) > 0):
            detail = "the admin server takes no request bodies"
            raise Refused(_refusal(413, "body-not-accepted", detail))
        try:
            target = parse_url(self.url)
        except HttpParserInvalidURLError:
            raise Refused(_bad_request("invalid request target")) from None
        query = target.query.decode("utf-8", "replace") if target.query else ""
        self.pending.append(
            AdminRequest(
                parser.get_method().decode("ascii"),
                unquote((target.path or b"/").decode("utf-8", "replace")),
                parse_qs(query, keep_blank_values=True),
                headers,
                http11=version == "1.1",
                keep_alive=parser.should_keep_alive(),
            )
        )

    # -- answers out ------------------------------------------------------------------------

    def _answer(self) -> None:
        """Answer parsed requests in order while the client keeps reading its answers."""
        if self.closing or self.transport.is_closing():
            return
        write = self.transport.write
        while self.pending and not self.write_paused:
            request = self.pending[0]
            if self.listener.prepare is not None and self.prepared is not request:
                self._prepare(request, self.listener.prepare)
                return
            self.pending.popleft()
            response = self._respond(request)
            last = self.stopped and not self.pending and self.last_answer is None
            close = last or not request.keep_alive
            head_only = request.method == "HEAD"
            write(encode(response, head_only=head_only, close=close, http11=request.http11))
            if close:
                self._close()
                return
        if self.stopped and not self.pending:
            if self.last_answer is not None:
                write(encode(self.last_answer, head_only=False, close=True, http11=True))
            self._close()
            return
        self._set_reading(not self.pending and not self.write_paused)
        if not self.in_head:
            self._arm(self.listener.keepalive_s)

    def _prepare(self, request: AdminRequest, prepare: Prepare) -> None:
        """Answer `request` (and what follows) once `prepare` has run for it."""
        if self.preparing:
            return
        self.preparing = True
        self._set_reading(False)

        def done(task: asyncio.Future[None]) -> None:
            self.preparing = False
            self.prepared = request
            if not task.cancelled() and task.exception() is not None:
                log.error("internal error in the admin server", exc_info=task.exception())
            self._answer()

        asyncio.ensure_future(prepare(request)).add_done_callback(done)

    def _respond(self, request: AdminRequest) -> AdminResponse:
        try:
            return self.listener.handler(request)
        except Exception as exc:
            return self._defect(exc)

    def _defect(self, exc: BaseException) -> AdminResponse:
        log.error("internal error in the admin server", exc_info=exc)
        detail = "the admin server failed to answer; the proxy's log has the details"
        return _refusal(500, "internal-error", detail)


class AdminListener:
    """The admin port's listening socket and its connections; `cleanup` ends both."""

    def __init__(
        self,
        handler: Handler,
        client_headers_s: float,
        keepalive_s: float,
        max_connections: int = MAX_CONNECTIONS,
        prepare: Prepare | None = None,
    ) -> None:
        self.handler = handler
        self.prepare = prepare
        self.client_headers_s = client_headers_s
        self.keepalive_s = keepalive_s
        self.max_connections = max_connections
        self.connections: set[AdminConnection] = set()
        self.server: asyncio.AbstractServer | None = None

    async def listen(self, host: str, port: int) -> tuple[str, int]:
        """Bind (OSError when the address is busy or unusable); the address bound."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: AdminConnection(self), host, port, backlog=128, reuse_address=True
        )
        return self.server.sockets[0].getsockname()[:2]

    async def cleanup(self) -> None:
        """Stop accepting and drop every connection. Answers are written as soon as they
        are made, so only bytes a client has not read yet are lost."""
        if self.server is not None:
            self.server.close()
        for connection in list(self.connections):
            connection.abort()
        if self.server is not None:
            await self.server.wait_closed()
