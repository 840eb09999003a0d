"""A client's HTTP/2 request head (a HEADERS frame, decoded by h2) as the neutral
`RequestHead` the core and an origin codec read: HTTP/1.1-style field lines, the message
model both codecs speak.

Rules:
1. RFC 9113 §8.3: `:method`, `:scheme` and `:path` are required (CONNECT is refused
   anyway); `:authority` stands for Host. A head that breaks them is never forwarded.
2. RFC 9113 §8.2: field names are lower-case tokens; no CR, LF or NUL, and no leading or
   trailing blank, in a value; no connection-specific field, no `te` but `trailers`;
   pseudo-fields known, once each, before the others. These are checked here (h2's own
   checks are off: it would end the whole connection), so a malformed request is a 400
   on its stream (`http_request_error`) and the connection serves its other streams.
   This is where HTTP/2-to-HTTP/1.1 downgrade smuggling would live.
3. Fields the proxy owns (Via, X-Forwarded-*, X-Request-Id, Content-Length, TE, Host) are
   taken out of the forwarded lines, as on HTTP/1.1.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from ..diagnosis.grpc import is_grpc
from ..forward.fields import valid_request_id

_CONNECTION_SPECIFIC: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_PSEUDO: Final = frozenset({b":method", b":scheme", b":authority", b":path"})
_NAME: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+\Z")  # a lower-case token
_BAD_VALUE: Final = re.compile(rb"[\r\n\x00]|\A[ \t]|[ \t]\Z")

# Fields handled here rather than forwarded as they are.
_OWN: Final = frozenset(
    {
        b"host",
        b"content-length",
        b"te",
        b"via",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-request-id",
        b"forwarded",
    }
)


class H2RequestHead:
    """What the proxy needs of one stream's request head (`proxy.forward.codec.RequestHead`)."""

    __slots__ = (
        "accept",
        "chunked",
        "content_encoding",
        "content_length",
        "content_type",
        "grpc",
        "host",
        "http11",
        "keep_alive",
        "lines",
        "loop_marker",
        "method",
        "method_name",
        "request_id",
        "target",
        "target_text",
        "upgrade",
        "upstream_fixed",
        "via",
        "xff",
        "xfh",
        "xfp",
    )

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.http11 = False  # no 1xx relayed, no Connection lines: an HTTP/2 stream
        self.keep_alive = True
        self.host: bytes | None = None
        self.lines: list[bytes] = []
        self.content_length: int | None = None
        self.chunked = False
        self.upgrade: bytes | None = None
        self.via: bytes | None = None
        self.xff: bytes | None = None
        self.xfp: bytes | None = None
        self.xfh: bytes | None = None
        self.accept: bytes | None = None
        self.content_type: bytes | None = None
        self.content_encoding: bytes | None = None
        self.loop_marker = False
        self.grpc = False
        self.upstream_fixed = b""
        self.request_id: bytes | None = None
        self.method_name = ""
        self.target_text = ""

    def retarget(self, target: bytes) -> H2RequestHead:
        """This head with another target (a route's `strip_prefix`): a stream's head is its
        own, so it changes in place."""
        self.target = target
        self.upstream_fixed = b""
        return self


def read_head(
    fields: Iterable[tuple[bytes, bytes]], ended: bool, instance_id: bytes
) -> tuple[H2RequestHead, str | None]:
    """The head of a stream whose HEADERS carried `fields` (`ended`: END_STREAM came with
    them, so there is no body), and why it must be refused (None: it may be forwarded)."""
    head = H2RequestHead()
    scheme = path = None
    lines = head.lines
    seen: set[bytes] = set()
    regular = False
    for name, value in fields:
        if _BAD_VALUE.search(value) is not None:
            return head, f"field {_shown(name)}: CR, LF, NUL or an edge blank in its value"
        if name[:1] == b":":
            if regular or name not in _PSEUDO or name in seen:
                return head, f"pseudo-field {_shown(name)} unknown, repeated or late"
            seen.add(name)
            if name == b":method":
                head.method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                head.host = value
            elif name == b":scheme":
                scheme = value
            continue
        regular = True
        if _NAME.match(name) is None:
            return head, f"field name {_shown(name)} is not a lower-case token"
        if name in _CONNECTION_SPECIFIC or (name == b"te" and value != b"trailers"):
            return head, f"connection-specific field {_shown(name)} (RFC 9113 §8.2.2)"
        if name in _OWN:
            problem = _own(head, name, value)
            if problem is not None:
                return head, problem
            continue
        lines.append(name + b": " + value + b"\r\n")
        if name == b"accept":
            head.accept = value
        elif name == b"content-type":
            head.content_type = value
        elif name == b"content-encoding":
            head.content_encoding = value
    head.method_name = head.method.decode("latin-1")
    head.target = path or b""
    head.target_text = head.target.decode("latin-1")
    if head.method == b"CONNECT":
        return head, "CONNECT is not supported: this is a reverse proxy"
    if not head.method or scheme is None or path is None:
        return head, "a request without :method, :scheme or :path (RFC 9113 §8.3.1)"
    if path[:1] != b"/" and not (path == b"*" and head.method == b"OPTIONS"):
        return head, "invalid :path (RFC 9113 §8.3.1)"
    if not ended and head.content_length is None:
        head.chunked = True  # the length is known only when the stream ends
    if ended and head.content_length:
        return head, f"no DATA for content-length {head.content_length} (RFC 9113 §8.1.1)"
    head.loop_marker = head.via is not None and instance_id in head.via
    head.grpc = is_grpc(head.content_type)
    return head, None


def _shown(name: bytes) -> str:
    """A field name for a detail, never more than 40 characters, control bytes escaped."""
    return repr(name[:40])[2:-1]


def _own(head: H2RequestHead, name: bytes, value: bytes) -> str | None:
    if name == b"host":
        if head.host is None:
            head.host = value
    elif name == b"content-length":
        if head.content_length is not None or not value.isdigit() or len(value) > 18:
            return "invalid or repeated content-length"
        head.content_length = int(value)
    elif name == b"via":
        head.via = value if head.via is None else head.via + b", " + value
    elif name == b"x-forwarded-for":
        head.xff = value if head.xff is None else head.xff + b", " + value
    elif name == b"x-forwarded-proto":
        head.xfp = value
    elif name == b"x-forwarded-host":
        head.xfh = value
    elif name == b"x-request-id":
        head.request_id = value if valid_request_id(value) else None
    return None  # te (h2 allows only "trailers": hop-by-hop) and forwarded: dropped
