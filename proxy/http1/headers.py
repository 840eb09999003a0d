"""Header rules on bytes: hop-by-hop removal, Via/X-Forwarded-*, Proxy-Status, Server-Timing.

Rule 1: header names are compared lower-cased, as bytes; values are never decoded on the
hot path.
Rule 2: every value Faultline writes itself passes `safe_value` (no CR, LF or NUL can reach
the wire: header injection is impossible by construction).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final

from ..base.memo import Memo
from ..base.text import http_date
from ..forward.fields import (
    proxy_status_error,
    proxy_status_received,
    safe_value,
    server_timing,
)
from ..forward.heads import OriginHead, ResponseFields

if TYPE_CHECKING:
    from ..forward.codec import RequestHead

# RFC 9110 §7.6.1: connection-specific fields never forwarded; plus the fields that only
# make sense for one hop (Proxy-Authorization is addressed to a proxy, Trailer/TE describe
# the framing of this connection).
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)

# Tokens of Connection that are not header names (they are dropped with Connection itself).
CONNECTION_OPTIONS: Final = frozenset({b"close", b"keep-alive", b"upgrade"})

# llhttp lets control bytes through in a reason phrase: they are never passed on.
_STATUS_CONTROL: Final = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def connection_tokens(value: bytes) -> set[bytes]:
    """The lower-cased tokens of a Connection header value."""
    return {token.strip().lower() for token in value.split(b",") if token.strip()}


# Response header lines Faultline must see or drop; everything else passes through as the
# origin wrote it. The scan runs on a lower-cased copy of the head (same offsets), and each
# match starts at the CRLF that ends the previous line, a literal the regex engine finds fast.
_RESPONSE_SPECIAL: Final = re.compile(
    rb"\r\n("
    + b"|".join(sorted(HOP_BY_HOP | {b"proxy-status", b"via", b"x-request-id", b"content-length"}))
    + rb")[ \t]*:[ \t]*([^\r\n]*?)[ \t]*(?=\r\n)"
)
_PLAIN_CONNECTION: Final = frozenset({b"keep-alive", b"close"})
_DATE_FIELD: Final = re.compile(rb"\r\ndate:", re.IGNORECASE)  # searched without a lowered copy


CONTENT_LENGTH_FIELDS: Final = ResponseFields(content_length=True)  # shared: the common head


# Names that send a head down the full scan; most responses carry none of them.
_RARE_RESPONSE_FIELD: Final = re.compile(
    rb"\r\n(?:"
    + b"|".join(sorted(HOP_BY_HOP - {b"connection"} | {b"proxy-status", b"via", b"x-request-id"}))
    + rb")[ \t]*:"
)
_PLAIN_FIELDS: Final = ResponseFields()


def filter_response_block(head: bytes, line_end: int) -> tuple[bytes, ResponseFields]:
    """The header lines of `head` (after the status line ending at `line_end`, each line
    ending in CRLF), without hop-by-hop and proxy-owned fields; and what they said."""
    low = head.lower()
    if _RARE_RESPONSE_FIELD.search(low, line_end - 2) is None:
        # The common head: at most Content-Length and one plain Connection line.
        fields = CONTENT_LENGTH_FIELDS if low.find(b"\r\ncontent-length") >= 0 else _PLAIN_FIELDS
        # The name with its colon: `Connection-Info: close` is an end-to-end field (llhttp
        # has refused a name with blanks before the colon already).
        start = low.find(b"\r\nconnection:", line_end - 2)
        if start < 0:
            return head[line_end:], fields
        end = low.find(b"\r\n", start + 2)
        value = low[start + 2 : end].partition(b":")[2].strip()
        if value in _PLAIN_CONNECTION and low.find(b"\r\nconnection:", end) < 0:
            return head[line_end : start + 2] + head[end + 2 :], fields
    return _scan_response_block(head, low, line_end)


def _scan_response_block(head: bytes, low: bytes, line_end: int) -> tuple[bytes, ResponseFields]:
    fields = ResponseFields()
    kept: list[bytes] = []
    position = line_end
    nominated: set[bytes] | None = None
    for match in _RESPONSE_SPECIAL.finditer(low, line_end - 2):
        name = match.group(1)
        if name == b"content-length":
            fields.content_length = True
            continue
        start, end = match.span()
        kept.append(head[position : start + 2])
        position = end + 2
        value = head[match.start(2) : match.end(2)]
        if name == b"transfer-encoding":
            # Chunked last: llhttp de-chunks it. Any other final coding means the body
            # runs to the end of the connection, and its codings must be passed on.
            codings = [c.strip() for c in match.group(2).split(b",") if c.strip()]
            if codings and codings[-1] == b"chunked":
                fields.chunked = True
                codings.pop()
            if codings:
                fields.codings = b", ".join(codings)
        elif name == b"connection":
            lowered = match.group(2)
            if lowered not in _PLAIN_CONNECTION:
                tokens = connection_tokens(lowered) - CONNECTION_OPTIONS
                if tokens:
                    nominated = tokens if nominated is None else nominated | tokens
        elif name == b"proxy-status":
            fields.proxy_status = [*(fields.proxy_status or ()), value]
        elif name == b"via":
            fields.via = value if not fields.via else fields.via + b", " + value
        elif name == b"upgrade":
            fields.upgrade = value
    if kept:
        kept.append(head[position:])
        block = b"".join(kept)
    else:
        block = head[line_end:]
    if nominated:
        block = b"".join(
            line + b"\r\n"
            for line in block.split(b"\r\n")[:-1]
            if line.split(b":", 1)[0].strip().lower() not in nominated
        )
    return block, fields


def _line(name: bytes, value: bytes) -> bytes:
    return name + b": " + value + b"\r\n"


class HeaderPolicy:
    """What Faultline adds to and removes from each message, precomputed from the config."""

    def __init__(
        self,
        *,
        proxy_name: str,
        instance_id: str,
        upstream_authority: str,
        proxy_status: bool,
        server_timing: bool,
        forwarded: bool,
        via: bool,
        client_proto: bytes = b"http",
    ) -> None:
        self.proxy_name = proxy_name
        self.client_proto = client_proto  # X-Forwarded-Proto: https on a TLS listen port
        self.instance_id = instance_id.encode()
        self.upstream_authority = upstream_authority.encode()
        self.proxy_status = proxy_status
        self.server_timing = server_timing
        self.forwarded = forwarded
        self.via = via
        name = safe_value(proxy_name.encode())
        # The comment carries this process's id: seeing it come back means a loop.
        self.via_request = b"1.1 " + name + b" (faultline " + self.instance_id + b")"
        self.via_response = b"1.1 " + name
        self._via_request_line = _line(b"Via", self.via_request)
        self._xfp_xfh = b"\r\nX-Forwarded-Proto: " + client_proto + b"\r\nX-Forwarded-Host: "
        self._via_response_line = _line(b"Via", self.via_response)
        self._ps_prefix, self._ps_suffix = proxy_status_received(proxy_name, upstream_authority)
        self._received_lines: dict[int, bytes] = {}
        # Raw origin head -> what is sent for it and its fields: see `origin_head`.
        # At most 256 heads of at most 2 KiB.
        self.origin_heads: Memo[bytes, OriginHead] = Memo(256, 2048)

    # -- request to the upstream ----------------------------------------------------------

    def request_head(
        self, head: RequestHead, client_ip: bytes, trusted: bool, request_id_line: bytes
    ) -> bytes:
        """The request head sent upstream (always HTTP/1.1, keep-alive)."""
        fixed = head.upstream_fixed
        if not fixed:  # once per head: a head the client repeats is shared (`known_heads`)
            fixed = head.upstream_fixed = self._fixed_lines(head)
        if not self.forwarded:
            return b"".join((fixed, request_id_line, b"\r\n"))
        host = head.host or self.upstream_authority
        if trusted:
            return b"".join(
                (fixed, *self._trusted_forwarded(head, client_ip, host), request_id_line, b"\r\n")
            )
        return b"".join(
            (
                fixed,
                b"X-Forwarded-For: ",
                client_ip,
                self._xfp_xfh,
                host,
                b"\r\n",
                request_id_line,
                b"\r\n",
            )
        )

    def _fixed_lines(self, head: RequestHead) -> bytes:
        """The part of the upstream head that depends on the request head alone."""
        host = head.host or self.upstream_authority
        parts = [head.method, b" ", head.target, b" HTTP/1.1\r\nHost: ", host, b"\r\n", *head.lines]
        if self.via:
            via = head.via
            parts.append(
                self._via_request_line
                if via is None
                else b"Via: " + via + b", " + self.via_request + b"\r\n"
            )
        if head.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        elif head.content_length is not None:
            parts.append(b"Content-Length: %d\r\n" % head.content_length)
        if head.upgrade is not None:
            parts += (b"Connection: upgrade\r\nUpgrade: ", head.upgrade, b"\r\n")
        return b"".join(parts)

    def _trusted_forwarded(self, head: RequestHead, client_ip: bytes, host: bytes) -> list[bytes]:
        """From a trusted proxy: append to its X-Forwarded-For, keep its proto and host."""
        xff = head.xff + b", " + client_ip if head.xff else client_ip
        return [
            b"X-Forwarded-For: ",
            xff,
            b"\r\nX-Forwarded-Proto: ",
            head.xfp or self.client_proto,
            b"\r\nX-Forwarded-Host: ",
            head.xfh or host,
            b"\r\n",
        ]

    def is_loop(self, via: bytes | None) -> bool:
        return bool(via) and self.instance_id in via  # type: ignore[operator]

    # -- response to the client -----------------------------------------------------------

    def origin_head(self, head: bytes, status: int) -> OriginHead:
        """What goes out for the origin's raw head (status line and header lines): the
        status line, the filtered header lines, Proxy-Status and Via; and what the head
        said. A pure function of the head, so it is memoised: an origin repeats its heads
        (within a second even the Date matches), and the filter is a third of the cost
        of an exchange otherwise."""
        line_end = head.find(b"\r\n") + 2
        block, fields = filter_response_block(head, line_end)
        rest = head[9:line_end]
        if _STATUS_CONTROL.search(rest) is not None:
            rest = rest[:3] + b" Faultline-Sanitised\r\n"
        parts = [b"HTTP/1.1 ", rest, block]
        if self.proxy_status:
            parts.append(self.received_status(status, fields.proxy_status))
        elif fields.proxy_status:
            parts.extend(b"Proxy-Status: " + v + b"\r\n" for v in fields.proxy_status)
        parts.append(self.via_response_line(fields.via))
        if _DATE_FIELD.search(head, line_end - 2) is None:
            # RFC 9110 §6.6.1: a recipient with a clock adds the Date an origin left out.
            # Such a head is not remembered: its Date line would go stale.
            parts.append(b"Date: " + http_date() + b"\r\n")
            return OriginHead(head, b"".join(parts), fields, status)
        entry = OriginHead(head, b"".join(parts), fields, status)
        self.origin_heads.remember(head, entry)
        return entry

    def received_status(self, status: int, upstream: list[bytes] | None) -> bytes:
        """The Proxy-Status line for a response the origin produced (ours appended last)."""
        if upstream:
            member = self._ps_prefix + b"%d" % status + self._ps_suffix
            return _line(b"Proxy-Status", b", ".join([*upstream, member]))
        line = self._received_lines.get(status)
        if line is None:
            line = self._received_lines[status] = _line(
                b"Proxy-Status", self._ps_prefix + b"%d" % status + self._ps_suffix
            )
        return line

    def error_status(
        self,
        token: str,
        details: str | None,
        next_hop: str | None,
        params: dict[str, str] | None,
        proxy_name: str | None = None,
    ) -> bytes:
        """`proxy_name`: a route's own, when it sets one."""
        name = proxy_name or self.proxy_name
        return _line(b"Proxy-Status", proxy_status_error(name, token, details, next_hop, params))

    def timing(self, connect_ns: int, ttfb_ns: int, proxy_ns: int, wait_ns: int = 0) -> bytes:
        return _line(b"Server-Timing", server_timing(connect_ns, ttfb_ns, proxy_ns, wait_ns))

    def via_response_line(self, upstream_via: bytes) -> bytes:
        if not self.via:
            return _line(b"Via", upstream_via) if upstream_via else b""
        if upstream_via:
            return _line(b"Via", upstream_via + b", " + self.via_response)
        return self._via_response_line
