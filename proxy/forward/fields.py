"""The values of the fields Faultline adds to a message, whatever protocol carries them:
Proxy-Status (RFC 9209), Server-Timing (W3C). A codec writes them in its own framing.

Rule: every value Faultline writes itself passes `safe_value` (no CR, LF or NUL can reach
the wire: header injection is impossible by construction).
"""

from __future__ import annotations

import re
from typing import Final

from ..base.text import ms_text

_UNSAFE: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_REQUEST_ID: Final = re.compile(rb"^[A-Za-z0-9._:@/+=\-]{1,200}$")


def valid_request_id(value: bytes) -> bool:
    """A client's X-Request-Id that is kept (else the proxy makes one)."""
    return _REQUEST_ID.match(value) is not None


def safe_value(value: bytes) -> bytes:
    """Reject control characters in a value we write (header injection guard)."""
    if _UNSAFE.search(value):
        raise ValueError(f"refusing to write a header value with control characters: {value!r}")
    return value


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


# Each Server-Timing metric carries a short `desc` (what DevTools shows as its label).
ST_WAIT_DESC: Final = b';desc="held: upstream refused"'
ST_CONNECT_DESC: Final = b';desc="upstream connect"'
ST_TTFB_DESC: Final = b';desc="upstream first byte"'
ST_PROXY_DESC: Final = b';desc="in proxy"'


def server_timing(connect_ns: int, ttfb_ns: int, proxy_ns: int, wait_ns: int = 0) -> bytes:
    """W3C Server-Timing for the phases known when the response head goes out (ms)."""
    proxy = b"proxy;dur=" + ms_text(max(proxy_ns, 0) // 1000) + ST_PROXY_DESC
    if ttfb_ns:
        proxy = b"ttfb;dur=" + ms_text(ttfb_ns // 1000) + ST_TTFB_DESC + b", " + proxy
    if connect_ns:
        proxy = b"connect;dur=" + ms_text(connect_ns // 1000) + ST_CONNECT_DESC + b", " + proxy
    if wait_ns:
        proxy = b"wait;dur=" + ms_text(wait_ns // 1000) + ST_WAIT_DESC + b", " + proxy
    return proxy
