"""A client's HTTP/1.1 request head: built field by field as httptools reports them, judged
once whole (RFC 9112 §3, §6), and the neutral `RequestHead` the core reads
(`proxy.forward.codec`).

Rules:
1. Ambiguous or malformed heads are never forwarded: `RequestHead.complete` says why.
2. Fields the proxy handles itself (`REQUEST_SPECIAL`) are taken out of the forwarded
   lines as they come; everything else passes as the client wrote it.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import urlsplit

from httptools import HttpRequestParser

from ..base.memo import Memo
from ..diagnosis.faults import RequestProblem
from ..forward.fields import valid_request_id
from .headers import CONNECTION_OPTIONS, HOP_BY_HOP, connection_tokens

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
METHOD_NAMES: Final = {
    m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
}
REQUEST_SPECIAL: Final = {
    **dict.fromkeys(HOP_BY_HOP, _Q_DROP),
    b"forwarded": _Q_DROP,  # rewritten as X-Forwarded-*; a client's own is not trusted
    b"host": _Q_HOST,
    b"connection": _Q_CONNECTION,
    b"content-length": _Q_CL,
    b"transfer-encoding": _Q_TE,
    b"upgrade": _Q_UPGRADE,
    # The h2c upgrade's settings (RFC 7540 §3.2.1): connection-specific, never forwarded.
    b"http2-settings": _Q_DROP,
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
        "grpc",
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
        self.grpc = False  # gRPC is HTTP/2 only
        self.problem: str | None = None
        self.method_name = ""  # method and target as text, for the exchange's record
        self.target_text = ""
        self.upstream_fixed = b""  # HeaderPolicy.request_head's per-head part, once built

    def retarget(self, target: bytes) -> RequestHead:
        """This head with another target (a route's `strip_prefix`): a copy, since a head
        may be shared by every request of the same bytes (`known_heads`)."""
        head = RequestHead()
        head.lines, head.method, head.target, head.http11 = (
            self.lines,
            self.method,
            target,
            self.http11,
        )
        head.keep_alive, head.host, head.hosts = self.keep_alive, self.host, self.hosts
        head.content_length, head.chunked = self.content_length, self.chunked
        head.te_values, head.nominated, head.upgrade = self.te_values, self.nominated, self.upgrade
        head.xff, head.xfp, head.xfh, head.via = self.xff, self.xfp, self.xfh, self.via
        head.request_id, head.accept = self.request_id, self.accept
        head.content_type, head.content_encoding = self.content_type, self.content_encoding
        head.loop_marker, head.grpc, head.problem = self.loop_marker, self.grpc, self.problem
        head.method_name, head.target_text = self.method_name, self.target_text
        return head

    def add(self, code: int, name: bytes, value: bytes) -> None:
        """A header field the proxy handles itself (`REQUEST_SPECIAL`); RFC 9112 §3 and
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
        upgrade = self.upgrade
        if upgrade is not None and not (
            nominated and b"upgrade" in nominated and parser.should_upgrade()
        ):
            self.upgrade = None
        elif upgrade is not None and b"h2c" in connection_tokens(upgrade):
            # Never honoured nor forwarded (RFC 9113 §3.1 retired it): an origin that
            # switched would carry HTTP/2 requests past every check, log and count of the
            # proxy ("h2c smuggling"). The request is answered as HTTP/1.1; llhttp has taken
            # the connection as upgraded, so it closes after this response.
            self.upgrade = None
            self.keep_alive = False
        if self.upgrade is not None and (self.chunked or self.content_length):
            # Origins disagree on where such a request ends: llhttp takes the bytes after
            # the head as the new protocol's, others read the body first (a desync).
            return "an Upgrade request with a body (the origin may take it for the new protocol)"
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
