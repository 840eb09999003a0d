"""Header rules on bytes: hop-by-hop removal, Via/X-Forwarded-*, Proxy-Status, Server-Timing.

Rule 1: header names are compared lower-cased, as bytes; values are never decoded on the
hot path.
Rule 2: every value Faultline writes itself passes `safe_value` (no CR, LF or NUL can reach
the wire: header injection is impossible by construction).
"""

from __future__ import annotations

import re

# RFC 9110 §7.6.1: connection-specific fields never forwarded; plus the fields that only
# make sense for one hop (Proxy-Authorization is addressed to a proxy, Trailer/TE describe
# the framing of this connection).
HOP_BY_HOP = frozenset(
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
CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive", b"upgrade"})

_UNSAFE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:@/+=\-]{1,200}$")


def safe_value(value: bytes) -> bytes:
    """Reject control characters in a value we write (header injection guard)."""
    if _UNSAFE.search(value):
        raise ValueError(f"refusing to write a header value with control characters: {value!r}")
    return value


def valid_request_id(value: bytes) -> bool:
    return _REQUEST_ID.match(value) is not None


def connection_tokens(value: bytes) -> set[bytes]:
    """The lower-cased tokens of a Connection header value."""
    return {token.strip().lower() for token in value.split(b",") if token.strip()}


def sf_string(text: str) -> str:
    """An RFC 8941 sf-string (printable ASCII, quotes and backslashes escaped)."""
    cleaned = "".join(ch if " " <= ch <= "~" else "?" for ch in text)
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"') + '"'


def proxy_status_received(name: str, next_hop: str) -> tuple[bytes, bytes]:
    """The two halves of a received-status member, to be joined around the status digits."""
    prefix = f"{name}; received-status=".encode()
    suffix = f"; next-hop={sf_string(next_hop)}".encode()
    return safe_value(prefix), safe_value(suffix)


def proxy_status_error(
    name: str,
    token: str,
    details: str | None,
    next_hop: str | None,
    params: dict[str, str] | None = None,
) -> bytes:
    """A Proxy-Status member for a response the proxy made (RFC 9209 §2.1)."""
    parts = [f"{name}; error={token}"]
    if next_hop:
        parts.append(f"next-hop={sf_string(next_hop)}")
    for key, value in (params or {}).items():
        parts.append(f"{key}={sf_string(value)}")
    if details:
        parts.append(f"details={sf_string(details[:300])}")
    return safe_value("; ".join(parts).encode())


def server_timing(connect_ns: int, ttfb_ns: int, proxy_ns: int) -> bytes:
    """W3C Server-Timing for the phases known when the response head goes out (ms)."""
    parts = []
    if connect_ns:
        parts.append(f"connect;dur={connect_ns / 1e6:.3f}")
    if ttfb_ns:
        parts.append(f"ttfb;dur={ttfb_ns / 1e6:.3f}")
    parts.append(f"proxy;dur={max(proxy_ns, 0) / 1e6:.3f}")
    return ", ".join(parts).encode()


def prefers_html(accept: bytes | None) -> bool:
    """True when the client asks for HTML before any JSON type (a browser, typically)."""
    if not accept:
        return False
    accept = accept.lower()
    html = accept.find(b"text/html")
    if html < 0:
        return False
    json = accept.find(b"json")
    return json < 0 or html < json


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
    ) -> None:
        self.proxy_name = proxy_name
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
        self._via_response_line = _line(b"Via", self.via_response)
        self._ps_prefix, self._ps_suffix = proxy_status_received(proxy_name, upstream_authority)
        self._received_lines: dict[int, bytes] = {}
        self._status_lines: dict[tuple[int, bytes], bytes] = {}

    # -- request to the upstream ----------------------------------------------------------

    def request_head(
        self,
        method: bytes,
        target: bytes,
        lines: list[bytes],
        *,
        host: bytes | None,
        client_ip: bytes,
        trusted: bool,
        xff: bytes | None,
        xfp: bytes | None,
        xfh: bytes | None,
        via: bytes | None,
        request_id: bytes,
        content_length: int | None,
        chunked: bool,
        upgrade: bytes | None,
    ) -> bytes:
        """The request head sent upstream (always HTTP/1.1, keep-alive)."""
        host = host or self.upstream_authority
        parts = [method, b" ", target, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
        parts.extend(lines)
        if self.forwarded:
            if trusted and xff:
                parts += [b"X-Forwarded-For: ", xff, b", ", client_ip, b"\r\n"]
            else:
                parts += [b"X-Forwarded-For: ", client_ip, b"\r\n"]
            parts += [
                b"X-Forwarded-Proto: ",
                (xfp if trusted and xfp else b"http"),
                b"\r\nX-Forwarded-Host: ",
                (xfh if trusted and xfh else host),
                b"\r\n",
            ]
        if self.via:
            parts += [b"Via: ", via + b", " if via else b"", self.via_request, b"\r\n"]
        parts += [b"X-Request-Id: ", request_id, b"\r\n"]
        if chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        elif content_length is not None:
            parts.append(b"Content-Length: %d\r\n" % content_length)
        if upgrade is not None:
            parts += [b"Connection: upgrade\r\nUpgrade: ", upgrade, b"\r\n"]
        parts.append(b"\r\n")
        return b"".join(parts)

    def is_loop(self, via: bytes | None) -> bool:
        return bool(via) and self.instance_id in via  # type: ignore[operator]

    # -- response to the client -----------------------------------------------------------

    def status_line(self, status: int, reason: bytes) -> bytes:
        key = (status, reason)
        line = self._status_lines.get(key)
        if line is None:
            line = b"HTTP/1.1 %d %s\r\n" % (status, reason)
            if len(self._status_lines) < 256:  # origins choose reasons; bound the cache
                self._status_lines[key] = line
        return line

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
        self, token: str, details: str | None, next_hop: str | None, params: dict[str, str] | None
    ) -> bytes:
        return _line(
            b"Proxy-Status",
            proxy_status_error(self.proxy_name, token, details, next_hop, params),
        )

    def timing(self, connect_ns: int, ttfb_ns: int, proxy_ns: int) -> bytes:
        return _line(b"Server-Timing", server_timing(connect_ns, ttfb_ns, proxy_ns))

    def via_response_line(self, upstream_via: bytes) -> bytes:
        if not self.via:
            return _line(b"Via", upstream_via) if upstream_via else b""
        if upstream_via:
            return _line(b"Via", upstream_via + b", " + self.via_response)
        return self._via_response_line
