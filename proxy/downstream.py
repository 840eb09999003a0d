"""The client side: parse requests with httptools, answer them in order on one connection.

Rules:
1. One exchange is answered at a time (`current`); pipelined requests wait in `queue`
   with reading paused, so a client cannot make the proxy buffer more than one read.
2. A request is judged when its head is complete (`RequestHead.complete`): ambiguous or
   malformed heads are never forwarded; they become a proxy-made 4xx in turn.
3. Reading is paused for several independent reasons (a bit each) and resumes only when
   none is left.
4. Bytes for the upstream produced while parsing one read are written in one go after
   `feed_data` returns (`in_feed`), so a head and a small body leave in one syscall.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from collections import deque
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpRequestParser,
)

from .classify import duration_text
from .exchange import Phase, perf_ns
from .faults import RequestProblem
from .forward import Forwarder
from .headers import CONNECTION_OPTIONS, HOP_BY_HOP, connection_tokens, valid_request_id
from .memo import Memo
from .upstream import parser_error_text

if TYPE_CHECKING:
    from .server import ProxyContext

log: Final = logging.getLogger("faultline")

# Request header names handled specially (anything else passes through as is); Final
# ints are constants in compiled code.
_Q_DROP: Final = 0
_Q_HOST: Final = 1
_Q_CONNECTION: Final = 2
_Q_CL: Final = 3
_Q_TE: Final = 4
_Q_UPGRADE: Final = 5
_Q_XFF: Final = 6
_Q_XFP: Final = 7
_Q_XFH: Final = 8
_Q_VIA: Final = 9
_Q_RID: Final = 10
_Q_ACCEPT: Final = 11
_Q_CONTENT_TYPE: Final = 12
_Q_CONTENT_ENCODING: Final = 13
_METHOD_NAMES: Final = {
    m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
}
_REQUEST_SPECIAL: Final = {
    **dict.fromkeys(HOP_BY_HOP, _Q_DROP),
    b"forwarded": _Q_DROP,  # rewritten as X-Forwarded-*; a client's own is not trusted
    b"host": _Q_HOST,
    b"connection": _Q_CONNECTION,
    b"content-length": _Q_CL,
    b"transfer-encoding": _Q_TE,
    b"upgrade": _Q_UPGRADE,
    b"x-forwarded-for": _Q_XFF,
    b"x-forwarded-proto": _Q_XFP,
    b"x-forwarded-host": _Q_XFH,
    b"via": _Q_VIA,
    b"x-request-id": _Q_RID,
    b"accept": _Q_ACCEPT,
    b"content-type": _Q_CONTENT_TYPE,
    b"content-encoding": _Q_CONTENT_ENCODING,
}


# RFC 9112 §3.2 / RFC 3986: uri-host [ ":" port ] (IP-literal, IPv4 or reg-name).
_HOST: Final = re.compile(
    rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]+)(?::[0-9]{0,5})?\Z"
)
_FRAGMENT_MARK: Final = ord("#")
_SLASH: Final = ord("/")
# Host values that matched _HOST (a client repeats its own); at most a DNS name and a port.
_VALID_HOSTS: Final[Memo[bytes, bool]] = Memo(1024, 262)


# The start of a refusal's detail for a transfer coding the proxy does not implement (501).
NOT_IMPLEMENTED_CODING: Final = "the request's transfer coding is not implemented here: "


class RequestRejected(Exception):
    """Raised inside a parser callback to stop parsing a request we will not forward."""

    def __init__(self, problem: RequestProblem, detail: str) -> None:
        super().__init__(detail)
        self.problem = problem
        self.detail = detail


class RequestHead:
    """What the proxy needs of a client's request head, built header by header as the
    parser reports them; the forwarded header lines are already filtered."""

    __slots__ = (
        "accept",
        "chunked",
        "content_encoding",
        "content_length",
        "content_type",
        "host",
        "hosts",
        "http11",
        "keep_alive",
        "lines",
        "loop_marker",
        "method",
        "method_name",
        "nominated",
        "problem",
        "request_id",
        "target",
        "target_text",
        "te_values",
        "upgrade",
        "upstream_fixed",
        "via",
        "xff",
        "xfh",
        "xfp",
    )

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.method = b""
        self.target = b""
        self.http11 = True
        self.keep_alive = True
        self.host: bytes | None = None
        self.hosts = 0
        self.content_length: int | None = None
        self.chunked = False
        self.te_values: list[bytes] | None = None
        self.nominated: set[bytes] | None = None
        self.upgrade: bytes | None = None
        self.xff: bytes | None = None
        self.xfp: bytes | None = None
        self.xfh: bytes | None = None
        self.via: bytes | None = None
        self.request_id: bytes | None = None  # the client's own, when valid
        self.accept: bytes | None = None
        self.content_type: bytes | None = None
        self.content_encoding: bytes | None = None
        self.loop_marker = False
        self.problem: str | None = None
        self.method_name = ""  # method and target as text, for the exchange's record
        self.target_text = ""
        self.upstream_fixed = b""  # HeaderPolicy.request_head's per-head part, once built

    def add(self, code: int, name: bytes, value: bytes) -> None:
        """A header field the proxy handles itself (`_REQUEST_SPECIAL`); RFC 9112 §3 and
        §6.3 checks as they come."""
        if code == _Q_HOST:
            self.hosts += 1
            self.host = value
            if value not in _VALID_HOSTS:
                if _HOST.match(value) is None:
                    self.problem = self.problem or "invalid Host header (expected host[:port])"
                else:
                    _VALID_HOSTS.remember(value, True)
        elif code == _Q_CL:
            value = value.strip(b" \t")  # llhttp allows optional whitespace around it
            if self.content_length is not None:
                self.problem = self.problem or "more than one Content-Length"
            elif not value.isdigit() or len(value) > 18:
                self.problem = self.problem or "invalid Content-Length"
            else:
                self.content_length = int(value)
        elif code == _Q_CONNECTION:
            tokens = connection_tokens(value)
            self.nominated = tokens if self.nominated is None else self.nominated | tokens
        elif code == _Q_TE:
            self.te_values = [value] if self.te_values is None else [*self.te_values, value]
        elif code == _Q_UPGRADE:
            self.upgrade = value
        elif code == _Q_XFF:
            self.xff = value if self.xff is None else self.xff + b", " + value
        elif code == _Q_XFP:
            self.xfp = value
        elif code == _Q_XFH:
            self.xfh = value
        elif code == _Q_VIA:
            self.via = value if self.via is None else self.via + b", " + value
        elif code == _Q_RID:
            self.request_id = value if valid_request_id(value) else None
        elif code == _Q_ACCEPT:
            self.accept = value
            self.lines.append(name + b": " + value + b"\r\n")
        elif code == _Q_CONTENT_TYPE:
            self.content_type = value
            self.lines.append(name + b": " + value + b"\r\n")
        elif code == _Q_CONTENT_ENCODING:
            self.content_encoding = value
            self.lines.append(name + b": " + value + b"\r\n")

    def complete(self, parser: HttpRequestParser, target: bytes) -> str | None:
        """The head is whole: None when it may be forwarded, else why it must be refused."""
        self.method = method = parser.get_method()
        self.target = target
        version = parser.get_http_version()
        self.http11 = version == "1.1"
        self.keep_alive = parser.should_keep_alive()
        if self.problem:
            return self.problem
        if not self.http11 and version != "1.0":
            return f"unsupported HTTP version {version}"
        if self.hosts > 1:
            return "more than one Host header"
        if self.hosts == 0 and self.http11:
            return "HTTP/1.1 request without a Host header"
        if self.te_values is not None:
            # Empty list elements are allowed (RFC 9110 §5.6.1) and mean nothing.
            codings = [
                c.strip().lower() for v in self.te_values for c in v.split(b",") if c.strip()
            ]
            if codings != [b"chunked"]:
                if codings.count(b"chunked") == 1 and codings[-1] == b"chunked":
                    # Framed (chunked last), but with a coding the proxy does not apply:
                    # RFC 9112 §6.1 says 501. Passed on unannounced, the origin would take
                    # coded bytes for the content.
                    other = b", ".join(codings[:-1]).decode("latin-1")
                    return f"{NOT_IMPLEMENTED_CODING}{other} (only chunked is)"
                # chunked not last, twice, or missing: the body's length cannot be known
                # (§6.3: 400, then close).
                return "Transfer-Encoding whose final coding is not a single chunked"
            if not self.http11:
                return "Transfer-Encoding in an HTTP/1.0 request"
            if self.content_length is not None:
                return "both Content-Length and Transfer-Encoding"
            self.chunked = True
        if method == b"CONNECT":
            return "CONNECT is not supported: this is a reverse proxy"
        nominated = self.nominated
        if self.upgrade is not None and not (
            nominated and b"upgrade" in nominated and parser.should_upgrade()
        ):
            self.upgrade = None
        if nominated:
            nominated = nominated - CONNECTION_OPTIONS
            if nominated:
                self.lines = [
                    line for line in self.lines if line.split(b":", 1)[0].lower() not in nominated
                ]
        # An int operand: `bytes in bytes` first tries the operand as an int on 3.11 and
        # pays for a formatted TypeError (~2k instructions) before searching.
        if _FRAGMENT_MARK in target:
            return "a request target cannot carry a fragment"
        if not target or target[0] != _SLASH:
            return self._absolute_form()
        return None

    def _absolute_form(self) -> str | None:
        """RFC 9112 §3.2.2: accept absolute-form, forward it in origin-form."""
        target = self.target
        if target == b"*" and self.method == b"OPTIONS":
            return None
        lowered = target[:8].lower()
        if not (lowered.startswith(b"http://") or lowered.startswith(b"https://")):
            return "invalid request target"
        parts = urlsplit(target.decode("latin-1"))
        if not parts.netloc or "@" in parts.netloc:
            return "invalid absolute-form request target"
        path = parts.path or "/"
        self.target = (path + ("?" + parts.query if parts.query else "")).encode("latin-1")
        self.host = parts.netloc.encode("latin-1")
        return None


class DownstreamProtocol(asyncio.Protocol):
    """One client connection."""

    PAUSE_PIPELINE = 1  # an earlier exchange is still being answered
    PAUSE_BUFFER = 2  # request body buffered while the upstream connects
    PAUSE_UPLOAD = 4  # the upstream connection's write buffer is full
    PAUSE_BROKEN = 8  # the request stream is unparseable; nothing more is read

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self.transport: Any = None
        self.parser = HttpRequestParser(self)
        self.client_ip = ""
        self.client_ip_b = b""
        self.trusted = False
        # Per-connection state
        self.current: Forwarder | None = None  # the exchange being answered
        self.receiving: Forwarder | None = None  # the exchange whose body is being read
        self.queue: deque[Forwarder] = deque()
        self.read_pauses = 0
        self.write_paused = False
        self.in_feed = False
        self.raw = False  # after an Upgrade request: bytes go through unparsed
        self.upgrading: Forwarder | None = None  # the exchange that asked to upgrade
        self.closed = False
        self.idle_since_ns = 0
        self.served = 0
        # Per-request (parsing) state
        self.parsing: Forwarder | None = None  # the exchange whose head is being read
        self.url = b""
        self.head = RequestHead()
        self.head_bytes = 0
        self.head_fed = -1
        self.heads_in_feed = 0  # heads completed while parsing the current read
        # The last head parsed, when it may be remembered; set by every head, so that with
        # heads_in_feed == 1 it is this read's head (never reset around feed_data: mypyc
        # would take the reset as the type of the value read after the callbacks ran).
        self.repeatable: RequestHead | None = None

    # -- connection life cycle --------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        ctx = self.ctx
        if len(ctx.connections) >= ctx.max_connections:
            # Over limits.max_connections: refuse before reading a byte (no exchange).
            ctx.stats.refused_connections += 1
            self.closed = True
            transport.abort()
            return
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else ""
        self.client_ip_b = self.client_ip.encode()
        self.trusted = self.ctx.is_trusted(self.client_ip)
        self.idle_since_ns = perf_ns()
        self.ctx.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed and self not in self.ctx.connections:
            return  # refused in connection_made
        self.closed = True
        self.ctx.connections.discard(self)
        if self.parsing is not None:
            # A request whose head never completed: the client left in the middle of it.
            self.parsing.client_gone()
            self.parsing = None
        pending = [fw for fw in (self.current, *self.queue, self.receiving) if fw is not None]
        self.current = self.receiving = None
        self.queue.clear()
        for fw in dict.fromkeys(pending):
            fw.client_gone()

    def close_tunnel(self) -> None:
        """Shutting down: an upgraded connection closes both ways. Its exchange (the 101)
        stays the origin's; the record says the proxy ended the tunnel."""
        fw = self.upgrading
        if fw is not None and not fw.done:
            fw.details = "tunnel closed by the proxy's shutdown"
        self.close()

    def cut_by_drain(self) -> None:
        """The drain deadline passed: every exchange still open on this connection is cut
        by the proxy (Forwarder.cut_by_drain), then the connection closes."""
        current = self.current
        behind = [fw for fw in (*self.queue, self.receiving, self.parsing) if fw is not None]
        self.queue.clear()
        self.receiving = self.parsing = None
        for fw in dict.fromkeys(behind):
            if fw is not current:
                fw.cut_by_drain(answer=False)
        if current is not None:
            current.cut_by_drain(answer=True)  # closes the connection (Connection: close)
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.ctx.outbox.flush()  # bytes queued for this client go out before the FIN
            self.transport.close()

    def pause_reading(self, reason: int) -> None:
        if not self.read_pauses and not self.closed:
            self.transport.pause_reading()
        self.read_pauses |= reason

    def resume_reading(self, reason: int) -> None:
        if self.read_pauses & reason:
            self.read_pauses &= ~reason
            if not self.read_pauses and not self.closed:
                self.transport.resume_reading()

    def pause_writing(self) -> None:
        self.write_paused = True
        fw = self.current
        if fw is not None and fw.up is not None and fw.up.transport is not None:
            fw.up.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        fw = self.current
        if fw is not None and fw.up is not None and fw.up.transport is not None:
            fw.up.transport.resume_reading()

    # -- bytes in ---------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.raw:
            fw = self.upgrading
            if fw is not None:
                try:
                    fw.on_client_tunnel_data(data)
                except Exception as exc:
                    fw.on_internal_error(exc)
            return
        at_boundary = self.parsing is None and self.receiving is None and not self.read_pauses
        known_heads = self.ctx.known_heads
        if at_boundary and len(data) <= known_heads.max_key_len:  # no hashing a long read
            head = known_heads.get(data)
            if head is not None:
                self.in_feed = True
                try:
                    self._known_head(head)
                except Exception as exc:
                    self._defect(exc)
                finally:
                    self.in_feed = False
                self._flush_upstream()
                return
        self.heads_in_feed = 0
        self.in_feed = True
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            # Whatever follows an Upgrade request is held until the origin switches
            # protocols; if it refuses, those bytes are never forwarded (no smuggling).
            self.raw = True
            rest = data[exc.args[0] :]
            if rest and self.upgrading is not None:
                self.upgrading.on_client_tunnel_data(rest)
        except HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, RequestRejected):
                self._broken(cause.problem, cause.detail)
            elif isinstance(cause, _StopParsing):
                self.parser = HttpRequestParser(_Discard())
            else:
                self._defect(cause or exc)
        except HttpParserError as exc:
            self._broken(RequestProblem.MALFORMED, self._parse_error_detail(exc))
        except Exception as exc:  # a defect in our callbacks outside the parser's wrapping
            self._defect(exc)
        else:
            if (
                self.repeatable is not None
                and at_boundary
                and self.heads_in_feed == 1
                and self.parsing is None
                and self.receiving is None
                and data.endswith(b"\r\n\r\n")
            ):
                # Exactly one whole bodiless head, from a parser at rest to a parser at
                # rest: the same bytes will always parse to the same head.
                known_heads.remember(data, self.repeatable)
        finally:
            self.in_feed = False
        if self.parsing is not None:
            # The head is still incomplete: everything read since it began counts.
            if self.head_fed < 0:
                self.head_fed = 0
            else:
                self.head_fed += len(data)
                if self.head_fed > self.ctx.max_request_header_bytes:
                    self._broken(
                        RequestProblem.HEADERS_TOO_LARGE,
                        f"request head over {self.ctx.max_request_header_bytes} bytes",
                    )
        self._flush_upstream()

    def _flush_upstream(self) -> None:
        """Bytes for the upstream produced while handling one read leave in one write."""
        try:
            current = self.current
            if current is not None and current.up_out:
                current.flush_upstream()
            receiving = self.receiving
            if receiving is not None and receiving.up_out:
                receiving.flush_upstream()
        except Exception as exc:
            self._defect(exc)

    def eof_received(self) -> bool:
        # Like nginx, a client that closes its side has given up on the answer: the
        # exchange ends as 499 (connection_lost reports it).
        return False

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.parsing = Forwarder(self, perf_ns())
        self.ctx.stats.in_flight += 1
        self.url = b""
        self.head = RequestHead()
        self.head_bytes = 0
        self.head_fed = -1

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_bytes += len(url)
        if self.head_bytes > self.ctx.max_request_header_bytes:
            raise RequestRejected(RequestProblem.HEADERS_TOO_LARGE, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.parsing is None:
            return  # trailer fields of a chunked body: not forwarded
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > self.ctx.max_request_header_bytes:
            raise RequestRejected(
                RequestProblem.HEADERS_TOO_LARGE,
                f"request head over {self.ctx.max_request_header_bytes} bytes",
            )
        code = _REQUEST_SPECIAL.get(name.lower())
        if code is None:
            self.head.lines.append(name + b": " + value + b"\r\n")
        else:
            self.head.add(code, name, value)

    def on_headers_complete(self) -> None:
        fw = self.parsing
        assert fw is not None
        self.parsing = None
        head = self.head
        problem = head.complete(self.parser, self.url)
        method = head.method
        head.method_name = _METHOD_NAMES.get(method) or method.decode("latin-1")
        head.target_text = head.target.decode("latin-1")
        ctx = self.ctx
        if problem is None and head.via is not None:
            head.loop_marker = ctx.headers.is_loop(head.via)
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
        if problem is None and not (
            ctx.max_request_body_bytes
            and head.content_length is not None
            and head.content_length > ctx.max_request_body_bytes
        ):
            self._head_complete(fw, head)
            return
        self._identify(fw, head)
        self.receiving = fw
        if problem is not None:
            kind = (
                RequestProblem.NOT_IMPLEMENTED
                if problem.startswith(NOT_IMPLEMENTED_CODING)
                else RequestProblem.MALFORMED
            )
            fw.attach(head, (kind, problem))
        else:
            fw.attach(
                head,
                (
                    RequestProblem.BODY_TOO_LARGE,
                    f"Content-Length {head.content_length} over {ctx.max_request_body_bytes}",
                ),
            )
        # Nothing after a refused head can be trusted to be framed right.
        self.pause_reading(self.PAUSE_BROKEN)
        self._enqueue(fw)
        raise _StopParsing

    def _identify(self, fw: Forwarder, head: RequestHead) -> None:
        """The exchange's method, target and request id (the client's, or a new one)."""
        fw.method = head.method_name
        fw.target = head.target_text
        request_id = head.request_id or self.ctx.new_request_id()
        fw.request_id_line = b"X-Request-Id: " + request_id + b"\r\n"
        fw.request_id = request_id.decode("latin-1")

    def _head_complete(self, fw: Forwarder, head: RequestHead) -> None:
        """A head that may be forwarded: the exchange is answered now or in turn."""
        self._identify(fw, head)
        self.receiving = fw
        fw.attach(head)
        if head.upgrade is not None:
            self.upgrading = fw
        if self.current is None:
            self.current = fw
            fw.start()
        else:
            self._enqueue(fw)

    def _known_head(self, head: RequestHead) -> None:
        """`data` repeats a bodiless request head already parsed and validated on this
        proxy: the exchange starts from that head, as the parser would have made it."""
        fw = Forwarder(self, perf_ns())
        self.ctx.stats.in_flight += 1
        self._head_complete(fw, head)
        self.receiving = None
        fw.on_request_complete()

    def on_body(self, body: bytes) -> None:
        fw = self.receiving
        if fw is not None:
            fw.on_request_body(body)

    def on_message_complete(self) -> None:
        fw = self.receiving
        self.receiving = None
        if fw is not None:
            fw.on_request_complete()

    # -- answering in order ------------------------------------------------------------------

    def _enqueue(self, fw: Forwarder) -> None:
        if self.current is None:
            self.current = fw
            fw.start()
        else:
            fw.phase = Phase.QUEUED
            self.queue.append(fw)
            self.pause_reading(self.PAUSE_PIPELINE)

    def exchange_finished(self, fw: Forwarder) -> None:
        if fw is not self.current:
            return
        self.current = None
        self.served += 1
        if self.read_pauses:
            self.resume_reading(self.PAUSE_UPLOAD | self.PAUSE_BUFFER)
        if self.closed:
            return
        if fw.close_after or (self.ctx.draining and not self.queue):
            # Draining: requests already read and queued are still answered first.
            self.close()
            return
        if self.queue:
            nxt = self.queue.popleft()
            self.current = nxt
            if not self.queue:
                self.resume_reading(self.PAUSE_PIPELINE)
            # Not called directly: a long pipeline must not recurse.
            asyncio.get_running_loop().call_soon(self._start_queued, nxt)
        else:
            self.idle_since_ns = fw.t_end

    def _start_queued(self, fw: Forwarder) -> None:
        if self.current is fw and not fw.done and not self.closed:
            fw.start()

    # -- bad input ---------------------------------------------------------------------------

    def _parse_error_detail(self, exc: HttpParserError) -> str:
        """llhttp's words for a parse error, unless they would mislead: a Content-Length
        among the trailer fields of a chunked body is reported by llhttp as one beside
        Transfer-Encoding, as if it were in the head."""
        text = parser_error_text(exc)
        receiving = self.receiving
        if (
            self.parsing is None
            and receiving is not None
            and receiving.head is not None
            and receiving.head.chunked
            and "Content-Length" in text
        ):
            return "Content-Length in the trailer section of a chunked body (RFC 9112 §7.1.2)"
        return text

    def _broken(self, problem: RequestProblem, detail: str) -> None:
        """The request stream cannot be parsed any further: answer in turn, then close."""
        self.pause_reading(self.PAUSE_BROKEN)
        self.parser = HttpRequestParser(_Discard())
        fw = self.parsing
        if fw is not None:
            self.parsing = None
            fw.request_id = self.ctx.new_request_id().decode()
            fw.attach(None, (problem, detail))
            self._enqueue(fw)
            return
        fw = self.receiving
        if fw is not None:
            self.receiving = None
            fw.on_request_error(problem, detail)
            return
        last = self.queue[-1] if self.queue else self.current
        if last is not None and (last.reject is not None or last.close_after):
            # Already refused (the same bad stream), or bytes after a request that closes
            # the connection: nobody will read an answer, so no exchange is made up.
            return
        fw = Forwarder(self, perf_ns())
        self.ctx.stats.in_flight += 1
        fw.request_id = self.ctx.new_request_id().decode()
        fw.attach(None, (problem, detail))
        self._enqueue(fw)

    def _defect(self, exc: BaseException) -> None:
        """A defect in our own code while handling this connection's bytes."""
        self.pause_reading(self.PAUSE_BROKEN)
        self.parser = HttpRequestParser(_Discard())
        fw = self.current or self.receiving
        if fw is None and self.parsing is not None:
            fw = self.current = self.parsing
            self.parsing = None
        if fw is None:
            log.error("internal error on a client connection", exc_info=exc)
            self.transport.abort()
            return
        fw.on_internal_error(exc)

    # -- deadlines -----------------------------------------------------------------------------

    def check_deadline(self, now: int) -> None:
        fw = self.current
        if fw is not None:
            fw.check_deadline(now)
            return
        ctx = self.ctx
        parsing = self.parsing
        if parsing is not None:
            if now - parsing.t_start > ctx.client_headers_ns:
                self._broken(
                    RequestProblem.TIMEOUT,
                    "client did not finish its request head within "
                    f"{duration_text(ctx.client_headers_ns)} (timeouts.client_headers)",
                )
        elif self.served:
            if now - self.idle_since_ns > ctx.keepalive_ns:
                self.close()
        elif now - self.idle_since_ns > ctx.client_headers_ns:
            self.close()


class _StopParsing(Exception):
    """Raised from a callback to stop parsing after a refused head (already answered)."""


class _Discard:
    """Parser sink for a connection whose request stream is broken."""


def client_is_trusted(
    address: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    if not networks or not address:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)
