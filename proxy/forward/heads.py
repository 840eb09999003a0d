"""The response head an origin codec hands to a client codec through the core: the head in
HTTP/1.1 form, made once per distinct head by the origin codec (`OriginHead`: the raw
status line and fields, and `prefix`, what an HTTP/1.1 client is sent for it with the
proxy's Proxy-Status and Via), and the framing facts its fields state (`ResponseFields`).

An HTTP/1.1 origin's head passes to an HTTP/1.1 client as it is (the fast path); an
HTTP/2 origin makes the same form from its fields, and an HTTP/2 client codec turns the
prefix's lines back into fields.
"""

from __future__ import annotations


class ResponseFields:
    """What the proxy needs to know of an origin's response header block."""

    __slots__ = ("chunked", "codings", "content_length", "proxy_status", "upgrade", "via")

    def __init__(self, content_length: bool = False) -> None:
        self.content_length = content_length
        self.chunked = False
        self.codings = b""  # transfer codings other than chunked (the body then ends at close)
        self.upgrade = b""
        self.via = b""
        self.proxy_status: list[bytes] | None = None


class OriginHead:
    """An origin's response head (the core's `ResponseHead`): the raw head (status line
    and field lines), what an HTTP/1.1 client is sent for it (`prefix`: status line,
    filtered lines, Proxy-Status, Via) and what its fields said."""

    __slots__ = ("fields", "prefix", "raw", "status")

    def __init__(self, raw: bytes, prefix: bytes, fields: ResponseFields, status: int = 0) -> None:
        self.raw = raw
        self.prefix = prefix
        self.fields = fields
        self.status = status  # the status code its line states (0: not recorded)
