"""httptools' callbacks for one client connection: each request head built field by field,
judged once whole, and handed to the connection (`DownstreamProtocol.head_parsed`); body
bytes and the end of each request passed to the exchange receiving them.

Rules:
1. The head's size is counted as it comes: over `limits.max_request_header_bytes` the
   request is refused (431) before the rest is read.
2. A head is judged once (`RequestHead.complete`, then `refusal`): never forwarded when
   ambiguous, malformed or announcing a body over the limit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, Protocol, cast

from ..diagnosis.faults import RequestProblem
from .request import (
    METHOD_NAMES,
    NOT_IMPLEMENTED_CODING,
    REQUEST_SPECIAL,
    RequestHead,
    RequestRejected,
)

if TYPE_CHECKING:
    from ..forward.context import ForwardContext
    from ..forward.forwarder import Forwarder
    from .headers import HeaderPolicy


class Connection(Protocol):
    """What the reader needs of its client connection (`DownstreamProtocol`)."""

    ctx: ForwardContext
    headers: HeaderPolicy
    parser: Any
    parsing: Forwarder | None  # the exchange whose head is being read
    receiving: Forwarder | None  # the exchange whose body is being read

    def new_exchange(self) -> Forwarder: ...
    def failed(self, error: Exception) -> Exception: ...
    def head_parsed(
        self, fw: Forwarder, head: RequestHead, refusal: tuple[RequestProblem, str] | None
    ) -> None: ...


class StopParsing(Exception):
    """Raised from a callback to stop parsing after a refused head (answered in turn)."""


class Discard:
    """Parser sink for a connection whose request stream is broken."""


# What a reader holds in place of its connection once that has closed (`detach`).
DETACHED: Final = cast("Connection", Discard())


def refusal(
    head: RequestHead, problem: str | None, max_body_bytes: int
) -> tuple[RequestProblem, str] | None:
    """Why a whole head is refused (its problem, or a body announced over the limit)."""
    if problem is not None:
        if problem.startswith(NOT_IMPLEMENTED_CODING):
            return RequestProblem.NOT_IMPLEMENTED, problem
        return RequestProblem.MALFORMED, problem
    length = head.content_length
    if max_body_bytes and length is not None and length > max_body_bytes:
        return RequestProblem.BODY_TOO_LARGE, f"Content-Length {length} over {max_body_bytes}"
    return None


class RequestReader:
    """The parser's callback object for one client connection."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.url = b""
        self.head = RequestHead()
        self.head_bytes = 0
        self.head_fed = -1  # bytes read since the current head began (-1: none yet)
        self.heads_in_feed = 0  # heads completed while parsing the current read
        # The last head parsed, when it may be remembered; set by every head, so that with
        # heads_in_feed == 1 it is this read's head (never reset around feed_data: mypyc
        # would take the reset as the type of the value read after the callbacks ran).
        self.repeatable: RequestHead | None = None

    def detach(self) -> None:
        """The connection is gone (`DownstreamProtocol.connection_lost`): the reference
        back to it goes. With the connection's own references to this reader and to its
        parser (which holds bound methods of this reader), it made cycles that only the
        garbage collector freed: ~17 objects a closed connection, a young-generation pause
        every ~1,300 connections under churn (issue 20)."""
        self.conn = DETACHED

    def on_message_begin(self) -> None:
        conn = self.conn
        conn.parsing = conn.new_exchange()
        self.url = b""
        self.head = RequestHead()
        self.head_bytes = 0
        self.head_fed = -1

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_bytes += len(url)
        if self.head_bytes > self.conn.ctx.max_request_header_bytes:
            raise self.conn.failed(
                RequestRejected(RequestProblem.HEADERS_TOO_LARGE, "request target too long")
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        conn = self.conn
        if conn.parsing is None:
            return  # trailer fields of a chunked body: not forwarded
        self.head_bytes += len(name) + len(value) + 4
        limit = conn.ctx.max_request_header_bytes
        if self.head_bytes > limit:
            raise self.conn.failed(
                RequestRejected(
                    RequestProblem.HEADERS_TOO_LARGE, f"request head over {limit} bytes"
                )
            )
        code = REQUEST_SPECIAL.get(name.lower())
        if code is None:
            self.head.lines.append(name + b": " + value + b"\r\n")
        else:
            self.head.add(code, name, value)

    def on_headers_complete(self) -> None:
        conn = self.conn
        fw = conn.parsing
        assert fw is not None
        conn.parsing = None
        head = self.head
        problem = head.complete(conn.parser, self.url)
        method = head.method
        head.method_name = METHOD_NAMES.get(method) or method.decode("latin-1")
        head.target_text = head.target.decode("latin-1")
        if problem is None and head.via is not None:
            head.loop_marker = conn.headers.is_loop(head.via)
        self.heads_in_feed += 1
        self.repeatable = (
            head
            if problem is None
            and not head.content_length
            and not head.chunked
            and head.keep_alive
            and head.upgrade is None
            else None
        )
        conn.head_parsed(fw, head, refusal(head, problem, conn.ctx.max_request_body_bytes))

    def on_body(self, body: bytes) -> None:
        fw = self.conn.receiving
        if fw is not None:
            fw.on_request_body(body)

    def on_message_complete(self) -> None:
        conn = self.conn
        fw = conn.receiving
        conn.receiving = None
        if fw is not None:
            fw.on_request_complete()
