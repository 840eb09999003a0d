"""The demo origin: a built-in HTTP server that produces, on request, every fault Faultline names.

`faultline demo` runs it behind the proxy so a user can click through what each failure
looks like from the client's side and what Faultline says about it.

Rules:
- `ROUTES` is the one description of the demo: the landing page is rendered from it, and the
  end-to-end tests drive every entry through the proxy and compare what the proxy reports
  with `expect_*`. The expectations assume the demo's proxy settings:
  `timeouts.response_headers` 2s, `timeouts.upstream_read` 2s, and the default
  `limits.max_response_header_bytes` (64 KiB).
- Normal routes are ordinary aiohttp handlers. Byte-level routes write raw bytes to the
  connection's transport and close or abort it themselves; they then return
  `_RawBytesSent`, whose prepare/write_eof do nothing, so aiohttp adds no framing of its
  own, does not keep the connection alive and logs nothing.
- No deliberate misbehaviour produces a traceback in aiohttp's logs: a client that leaves
  mid-response is normal here (the proxy gives up on /hang, /stall, ...), so it cancels the
  handler (`handler_cancellation`) or is swallowed by `_quiet_client_disconnects`.
- Every wait is bounded: the holding routes give up after `_HOLD_LIMIT_S`, and
  `DemoOrigin.close()` releases all of them at once, so closing takes well under a second.
- Listens where told, 127.0.0.1 by default; the landing page is self-contained (no CDN).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import html
import http
import json
import socket
import struct
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

from aiohttp import WSMsgType, web

from .diagnosis import FAULT_BEHIND_ORIGIN, ORIGIN_5XX_FOR_CLIENT_ERROR
from .faults import Fault

__all__ = ["ROUTES", "DemoOrigin", "DemoRoute", "make_demo_app", "start_demo_origin"]


# --------------------------------------------------------------------------------------
# The route table
# --------------------------------------------------------------------------------------

SECTION_NORMAL = "Normal traffic"
SECTION_ORIGIN_ERRORS = "The origin's own errors"
SECTION_BEHIND = "Errors made behind the origin"
SECTION_SLOW = "Slow answers"
SECTION_BROKEN = "Broken before the response starts"
SECTION_MID_BODY = "Broken in the middle of the body"

_WEBSOCKET_HANDSHAKE = (
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("Sec-WebSocket-Version", "13"),
)


@dataclass(frozen=True, slots=True)
class DemoRoute:
    """One thing the demo origin can do, and what a correct Faultline reports for it.

    `path` is a concrete request target (with its query when one matters), ready to send.
    `expect_status` is the status the client gets, or None when the response is aborted
    mid-body (the origin's 200 had already gone out, so the client sees a broken body).
    `expect_source`/`expect_error`/`expect_layer`/`hop`/`expect_hints` are the
    access-log fields (`hop`: who behind the origin made the response; `expect_hints`:
    the diagnosis hints, in order).
    The request needs `body` and `request_headers` (a WebSocket handshake for the upgrade
    routes); `section` and `note` are for the landing page.
    """

    path: str
    method: str
    title: str
    expect_status: int | None
    expect_source: str
    expect_error: str | None
    expect_layer: str
    hop: str | None = None
    section: str = SECTION_NORMAL
    expect_hints: tuple[str, ...] = ()
    body: bytes = b""
    request_headers: tuple[tuple[str, str], ...] = ()
    note: str = ""

    @property
    def is_websocket(self) -> bool:
        return any(name.lower() == "upgrade" for name, _ in self.request_headers)


def _origin(
    path: str,
    status: int,
    title: str,
    *,
    method: str = "GET",
    section: str = SECTION_NORMAL,
    **extra: Any,
) -> DemoRoute:
    """A route the origin answers itself: the status passes through, nobody is at fault."""
    return DemoRoute(
        path, method, title, status, "origin", None, "origin", section=section, **extra
    )


def _proxy_fault(
    path: str,
    status: int,
    error: str,
    title: str,
    *,
    section: str = SECTION_BROKEN,
    **extra: Any,
) -> DemoRoute:
    """A route whose upstream fails before any valid response head: the proxy answers."""
    return DemoRoute(
        path, "GET", title, status, "proxy", error, "upstream", section=section, **extra
    )


def _mid_body_fault(path: str, error: str, title: str) -> DemoRoute:
    """A route that breaks after the origin's 200 went out: the client's body is aborted."""
    return DemoRoute(
        path, "GET", title, None, "origin", error, "upstream", section=SECTION_MID_BODY
    )


ROUTES: list[DemoRoute] = [
    # -- normal traffic -------------------------------------------------------------
    _origin("/", 200, "This landing page"),
    _origin("/hello", 200, "Plain text hello"),
    _origin("/api/items", 200, "A JSON list of items"),
    _origin(
        "/echo",
        200,
        "Echo method, headers and body as JSON (any method)",
        method="POST",
        body=b'{"hello": "faultline"}',
        request_headers=(("Content-Type", "application/json"),),
        note="Shows the request exactly as the origin received it: look for the "
        "X-Forwarded-*, Via and X-Request-Id headers the proxy added.",
    ),
    _origin("/stream", 200, "A chunked response trickling over about a second"),
    _origin("/sse", 200, "Server-Sent Events: five events 200 ms apart"),
    _origin(
        "/ws",
        101,
        "WebSocket echo",
        request_headers=_WEBSOCKET_HANDSHAKE,
        note="The proxy relays the 101 and then tunnels the frames both ways.",
    ),
    _origin("/bytes/1048576", 200, "1 MiB of bytes, streamed (/bytes/N, up to 100 MiB)"),
    # -- the origin's own errors -----------------------------------------------------
    _origin(
        "/status/404",
        404,
        "The app's own 404",
        section=SECTION_ORIGIN_ERRORS,
        note="Any 4xx/5xx works: /status/401, /status/429, ...",
    ),
    _origin("/status/500", 500, "The app's own 500", section=SECTION_ORIGIN_ERRORS),
    _origin(
        "/status/503", 503, "The app's own 503 with Retry-After", section=SECTION_ORIGIN_ERRORS
    ),
    _origin(
        "/origin-502",
        502,
        "The app itself answers 502",
        section=SECTION_ORIGIN_ERRORS,
        expect_hints=(FAULT_BEHIND_ORIGIN,),
        note="A 502 that the proxy did not make: source=origin, never confused with a proxy "
        "fault. Faultline adds the hint fault_behind_origin: the app reports a failure of "
        "something it depends on.",
    ),
    _origin(
        "/origin-504",
        504,
        "The app itself answers 504",
        section=SECTION_ORIGIN_ERRORS,
        expect_hints=(FAULT_BEHIND_ORIGIN,),
    ),
    _origin(
        "/json",
        200,
        "POST well-formed JSON: 200",
        method="POST",
        section=SECTION_ORIGIN_ERRORS,
        body=b'{"item": "teapot", "quantity": 1}',
        request_headers=(("Content-Type", "application/json"),),
    ),
    _origin(
        "/json",
        500,
        "POST malformed JSON: the app answers 500 with a stack trace",
        method="POST",
        section=SECTION_ORIGIN_ERRORS,
        body=b'{"item": "teapot",',
        request_headers=(("Content-Type", "application/json"),),
        expect_hints=(ORIGIN_5XX_FOR_CLIENT_ERROR,),
        note="The classic anti-pattern: invalid input reported as a server error (it "
        "should be a 400) and a stack trace shown to the client. Faultline can tell the "
        "body is not JSON and adds the hint origin_5xx_for_client_error.",
    ),
    # -- errors made behind the origin -------------------------------------------------
    _origin(
        "/nginx-502",
        502,
        "An nginx behind the origin failed (nginx's 502 page)",
        section=SECTION_BEHIND,
        hop="nginx",
        expect_hints=(FAULT_BEHIND_ORIGIN,),
        note="The origin's response is nginx's own error page: the fault lies behind "
        "the origin, and Faultline names the hop.",
    ),
    _origin(
        "/envoy-503",
        503,
        "An Envoy behind the origin could not reach its upstream",
        section=SECTION_BEHIND,
        hop="envoy",
        expect_hints=(FAULT_BEHIND_ORIGIN,),
        note="Envoy's own reply, 'upstream connect error or disconnect/reset before "
        "headers', recognisable because it lacks x-envoy-upstream-service-time.",
    ),
    _origin(
        "/haproxy-503",
        503,
        "An HAProxy behind the origin has no server left",
        section=SECTION_BEHIND,
        hop="haproxy",
        expect_hints=(FAULT_BEHIND_ORIGIN,),
    ),
    _origin(
        "/cloudflare-522",
        522,
        "A Cloudflare behind the origin timed out reaching its own origin (522)",
        section=SECTION_BEHIND,
        hop="cloudflare",
        expect_hints=(FAULT_BEHIND_ORIGIN,),
    ),
    _origin(
        "/alb-502",
        502,
        "An AWS load balancer behind the origin got a bad answer from its target",
        section=SECTION_BEHIND,
        hop="aws-alb",
        expect_hints=(FAULT_BEHIND_ORIGIN,),
    ),
    _origin(
        "/gateway-504",
        504,
        "A gateway behind the origin reports its fault in Proxy-Status (RFC 9209)",
        section=SECTION_BEHIND,
        hop="payments-gateway",
        expect_hints=(FAULT_BEHIND_ORIGIN,),
        note="The intermediary's own Proxy-Status member names it; Faultline appends its "
        "member after it, so the header reads the path from the origin outwards.",
    ),
    # -- slow answers ------------------------------------------------------------------
    _origin(
        "/slow",
        200,
        "Answers after 1.5 s (/slow?ms=N, up to 30 s)",
        section=SECTION_SLOW,
        note="Slow but within the proxy's 2 s timeouts.response_headers.",
    ),
    _proxy_fault(
        "/slow?ms=3000",
        504,
        Fault.HTTP_RESPONSE_TIMEOUT,
        "Answers after 3 s: longer than the proxy waits",
        section=SECTION_SLOW,
    ),
    _proxy_fault(
        "/hang",
        504,
        Fault.HTTP_RESPONSE_TIMEOUT,
        "Accepts the request and never answers",
        section=SECTION_SLOW,
    ),
    # -- broken before the response starts -----------------------------------------------
    _proxy_fault(
        "/hangup", 502, Fault.CONNECTION_TERMINATED, "Closes the connection without sending a byte"
    ),
    _proxy_fault(
        "/reset",
        502,
        Fault.CONNECTION_TERMINATED,
        "Resets the connection (TCP RST) without sending a byte",
    ),
    _proxy_fault(
        "/garbage",
        502,
        Fault.HTTP_PROTOCOL_ERROR,
        "Answers with bytes that are not HTTP (an SSH banner)",
    ),
    _proxy_fault(
        "/bad-header", 502, Fault.HTTP_PROTOCOL_ERROR, "A response header carrying a NUL byte"
    ),
    _proxy_fault(
        "/huge-headers",
        502,
        Fault.HTTP_RESPONSE_HEADER_SECTION_SIZE,
        "About 100 KiB of response headers",
    ),
    _proxy_fault(
        "/bad-upgrade",
        502,
        Fault.HTTP_UPGRADE_FAILED,
        "Breaks the WebSocket handshake: a 101 without an Upgrade header",
        request_headers=_WEBSOCKET_HANDSHAKE,
        note="Without a WebSocket handshake the route answers 426 itself.",
    ),
    # -- broken in the middle of the body ------------------------------------------------
    _mid_body_fault(
        "/truncated", Fault.HTTP_RESPONSE_INCOMPLETE, "Promises 100000 bytes, sends 1000, closes"
    ),
    _mid_body_fault(
        "/stall",
        Fault.CONNECTION_READ_TIMEOUT,
        "Sends part of the body, then goes silent without closing",
    ),
    _mid_body_fault(
        "/bad-chunk",
        Fault.HTTP_PROTOCOL_ERROR,
        "A chunked body with an invalid chunk-size line after some data",
    ),
]


# --------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------

# How long /hang and /stall hold a connection when nobody gives up first.
_HOLD_LIMIT_S = 300.0
# Pause between the valid part of a broken response and the break, so the proxy has
# forwarded the origin's status before the fault: the fault is then truly mid-body.
_MID_BODY_PAUSE_S = 0.25
_BYTES_CAP = 100 * 1024 * 1024
_SLOW_DEFAULT_MS = 1500
_SLOW_CAP_MS = 30_000
_ECHO_BODY_SHOWN = 64 * 1024

_CLOSING = web.AppKey("closing", asyncio.Event)
_WEBSOCKETS: web.AppKey[weakref.WeakSet[web.WebSocketResponse]] = web.AppKey("websockets")


class _RawBytesSent(web.StreamResponse):
    """What a byte-level handler returns: its bytes already went out on the bare transport.

    aiohttp must write nothing more (no status line, no chunk terminator); an unprepared
    response is not keep-alive, so aiohttp also drops the connection afterwards.
    """

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


@web.middleware
async def _quiet_client_disconnects(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    # A client (usually the proxy, giving up on purpose) that leaves while we stream makes
    # writes fail; aiohttp would log that as an unhandled error with a traceback.
    try:
        return await handler(request)
    except ConnectionError:
        return _RawBytesSent()


def _http_date() -> str:
    return formatdate(usegmt=True)


def _live_transport(request: web.Request) -> asyncio.Transport | None:
    transport = request.transport
    if transport is None or transport.is_closing():
        return None
    return transport


async def _hold(request: web.Request, seconds: float) -> None:
    """Wait `seconds`, less if the demo origin closes (a leaving client cancels us)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(request.app[_CLOSING].wait(), seconds)


def _raw_head(status_line: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [status_line, f"Date: {_http_date()}", "Server: faultline-demo-origin"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# -- normal traffic --------------------------------------------------------------------


async def _landing(request: web.Request) -> web.Response:
    return web.Response(
        text=_LANDING_HTML,
        content_type="text/html",
        charset="utf-8",
        headers={"Cache-Control": "no-store"},
    )


async def _hello(request: web.Request) -> web.Response:
    return web.Response(text="Hello from the Faultline demo origin.\n")


async def _items(request: web.Request) -> web.Response:
    items = [
        {"id": 1, "name": "teapot", "price": 18.5},
        {"id": 2, "name": "kettle", "price": 42.0},
        {"id": 3, "name": "strainer", "price": 4.25},
    ]
    return web.json_response({"items": items, "count": len(items)})


async def _echo(request: web.Request) -> web.Response:
    # Stream the body through a hash rather than buffering it: uploads of any size can be
    # checked end to end by length and digest, and only the first 64 KiB are shown.
    digest = hashlib.sha256()
    size = 0
    shown = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        digest.update(chunk)
        size += len(chunk)
        if len(shown) < _ECHO_BODY_SHOWN:
            shown += chunk[: _ECHO_BODY_SHOWN - len(shown)]
    return web.json_response(
        {
            "method": request.method,
            "path": request.path,
            "query": request.query_string,
            "http_version": f"{request.version.major}.{request.version.minor}",
            "headers": [[name, value] for name, value in request.headers.items()],
            "body": bytes(shown).decode("utf-8", errors="replace"),
            "body_truncated": size > len(shown),
            "body_bytes": size,
            "body_sha256": digest.hexdigest(),
        }
    )


async def _stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    parts = 10
    for number in range(1, parts + 1):
        await response.write(f"chunk {number}/{parts}\n".encode())
        if number < parts:
            await asyncio.sleep(0.1)
    await response.write_eof()
    return response


async def _sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
        }
    )
    await response.prepare(request)
    events = 5
    for number in range(1, events + 1):
        data = json.dumps({"event": number, "of": events})
        await response.write(f"id: {number}\nevent: tick\ndata: {data}\n\n".encode())
        if number < events:
            await asyncio.sleep(0.2)
    await response.write_eof()
    return response


async def _websocket_echo(request: web.Request) -> web.StreamResponse:
    websocket = web.WebSocketResponse(heartbeat=30.0)
    if not websocket.can_prepare(request).ok:
        return web.json_response(
            {"error": "this route speaks WebSocket only: send an Upgrade: websocket request"},
            status=426,
            headers={"Upgrade": "websocket", "Connection": "Upgrade"},
        )
    await websocket.prepare(request)
    request.app[_WEBSOCKETS].add(websocket)
    async for message in websocket:
        if message.type == WSMsgType.TEXT:
            await websocket.send_str(message.data)
        elif message.type == WSMsgType.BINARY:
            await websocket.send_bytes(message.data)
    return websocket


# A fixed 64 KiB block (0x00..0xff repeated): /bytes bodies are predictable, so a test can
# check every byte that came through the proxy.
_BYTES_BLOCK = bytes(range(256)) * 256


async def _bytes(request: web.Request) -> web.StreamResponse:
    requested = int(request.match_info["n"])
    size = min(requested, _BYTES_CAP)
    headers = {"Content-Type": "application/octet-stream"}
    if size < requested:
        headers["X-Demo-Capped-To"] = str(_BYTES_CAP)
    response = web.StreamResponse(headers=headers)
    response.content_length = size
    await response.prepare(request)
    remaining = size
    while remaining > 0:
        block = _BYTES_BLOCK[: min(remaining, len(_BYTES_BLOCK))]
        await response.write(block)
        remaining -= len(block)
    await response.write_eof()
    return response


# -- the origin's own errors -------------------------------------------------------------


async def _status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    if not 400 <= code <= 599:
        return web.json_response(
            {"error": f"/status/{code}: this route only produces 4xx and 5xx codes"},
            status=400,
        )
    try:
        reason = http.HTTPStatus(code).phrase
    except ValueError:
        reason = "Unknown"
    headers: dict[str, str] = {}
    # The headers a real app sends with these codes, so the demo looks like the real thing.
    if code in (429, 503):
        headers["Retry-After"] = "5"
    elif code == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="demo"'
    elif code == 405:
        headers["Allow"] = "GET"
    return web.json_response(
        {"status": code, "reason": reason, "produced_by": "the demo origin's application"},
        status=code,
        headers=headers,
    )


async def _origin_502(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "error": "bad_gateway",
            "message": "payment provider returned an invalid answer",
            "produced_by": "the demo origin's application",
        },
        status=502,
    )


async def _origin_504(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "error": "gateway_timeout",
            "message": "inventory service did not answer within 3s",
            "produced_by": "the demo origin's application",
        },
        status=504,
    )


# nginx's own 502 page, byte for byte as nginx 1.2x with `server_tokens off` sends it,
# including the padding it adds so browsers show it instead of their "friendly" page.
_NGINX_502_PAGE = (
    "<html>\r\n"
    "<head><title>502 Bad Gateway</title></head>\r\n"
    "<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n"
    "<hr><center>nginx</center>\r\n"
    "</body>\r\n"
    "</html>\r\n" + "<!-- a padding to disable MSIE and Chrome friendly error page -->\r\n" * 6
)


async def _nginx_502(request: web.Request) -> web.Response:
    return web.Response(
        status=502,
        text=_NGINX_502_PAGE,
        content_type="text/html",
        headers={"Server": "nginx", "Connection": "keep-alive"},
    )


# -- errors made behind the origin, byte for byte as each product sends them -------------------


async def _product_response(
    request: web.Request, status_line: str, headers: list[tuple[str, str]], body: bytes
) -> web.StreamResponse:
    """Write a product's own error response as is (no Server header of ours), then close."""
    if (transport := _live_transport(request)) is not None:
        lines = [status_line, *(f"{name}: {value}" for name, value in headers)]
        lines.append(f"Content-Length: {len(body)}")
        lines.append("Connection: close")
        transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        transport.close()
    return _RawBytesSent()


_ENVOY_UF = (
    b"upstream connect error or disconnect/reset before headers. reset reason: connection "
    b"failure, transport failure reason: delayed connect error: 111"
)


async def _envoy_503(request: web.Request) -> web.StreamResponse:
    return await _product_response(
        request,
        "HTTP/1.1 503 Service Unavailable",
        [("content-type", "text/plain"), ("date", _http_date()), ("server", "envoy")],
        _ENVOY_UF,
    )


_HAPROXY_503 = (
    b"<html><body><h1>503 Service Unavailable</h1>\n"
    b"No server is available to handle this request.\n</body></html>\n"
)


async def _haproxy_503(request: web.Request) -> web.StreamResponse:
    return await _product_response(
        request,
        "HTTP/1.1 503 Service Unavailable",
        [("cache-control", "no-cache"), ("content-type", "text/html")],
        _HAPROXY_503,
    )


_CLOUDFLARE_522 = b"""<!DOCTYPE html>
<html class="no-js" lang="en-US">
<head>
<title>shop.example.com | 522: Connection timed out</title>
<meta charset="UTF-8" />
</head>
<body>
<div id="cf-wrapper">
<div id="cf-error-details" class="p-0">
<header class="mx-auto pt-10 lg:pt-6 lg:px-8 w-240 lg:w-full mb-8">
<h1 class="inline-block sm:block sm:mb-2 font-light text-60 lg:text-4xl text-black-dark">
<span class="inline-block">Connection timed out</span>
<span class="code-label">Error code 522</span>
</h1>
</header>
<div class="w-240 lg:w-full mx-auto mb-8 lg:px-8">
<p>The initial connection between Cloudflare's network and the origin web server timed out.
As a result, the web page can not be displayed.</p>
</div>
<p>Cloudflare Ray ID: <strong class="font-semibold">8f1c2a3b4d5e6f70</strong></p>
</div>
</div>
</body>
</html>
"""


async def _cloudflare_522(request: web.Request) -> web.StreamResponse:
    return await _product_response(
        request,
        "HTTP/1.1 522 Origin Connection Time-out",
        [
            ("Date", _http_date()),
            ("Content-Type", "text/html; charset=UTF-8"),
            ("Cache-Control", "private, max-age=0, no-store, no-cache, must-revalidate"),
            ("Expires", "Thu, 01 Jan 1970 00:00:01 GMT"),
            ("Server", "cloudflare"),
            ("CF-RAY", "8f1c2a3b4d5e6f70-FRA"),
        ],
        _CLOUDFLARE_522,
    )


_ALB_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n</body>\r\n</html>\r\n"
)


async def _alb_502(request: web.Request) -> web.StreamResponse:
    return await _product_response(
        request,
        "HTTP/1.1 502 Bad Gateway",
        [("Server", "awselb/2.0"), ("Date", _http_date()), ("Content-Type", "text/html")],
        _ALB_502,
    )


async def _gateway_504(request: web.Request) -> web.Response:
    member = (
        f'payments-gateway; error={Fault.CONNECTION_TIMEOUT.value}; details="connect to '
        f'payments.internal:443 timed out after 2s"'
    )
    return web.json_response(
        {
            "type": "about:blank",
            "title": "Gateway Timeout",
            "status": 504,
            "detail": "the payments service did not accept a connection in time",
        },
        status=504,
        content_type="application/problem+json",
        headers={"Proxy-Status": member, "Server": "payments-gateway"},
    )


_FAKE_TRACEBACK = """\
Traceback (most recent call last):
  File "/srv/shop/app/views.py", line 88, in create_order
    order = json.loads(request.body)
            ^^^^^^^^^^^^^^^^^^^^^^^^
  File "/usr/lib/python3.11/json/__init__.py", line 346, in loads
    return _default_decoder.decode(s)
           ^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/usr/lib/python3.11/json/decoder.py", line 337, in decode
    obj, end = self.raw_decode(s, idx=_w(s, 0).end())
               ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/usr/lib/python3.11/json/decoder.py", line 353, in raw_decode
    obj, end = self.scan_once(s, idx)
               ^^^^^^^^^^^^^^^^^^^^^^
{exception}
"""


async def _json(request: web.Request) -> web.Response:
    body = await request.read()
    try:
        document = json.loads(body)
    except ValueError as exc:
        # Deliberately wrong: a client's invalid input reported as a 500 with a stack
        # trace (it should be a 400). The proxy is expected to flag it.
        exception = f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"
        return web.Response(
            status=500,
            text=_FAKE_TRACEBACK.replace("{exception}", exception),
            content_type="text/plain",
        )
    return web.json_response({"received": document, "type": type(document).__name__})


# -- slow answers -------------------------------------------------------------------------


async def _slow(request: web.Request) -> web.Response:
    raw = request.query.get("ms", str(_SLOW_DEFAULT_MS))
    try:
        delay_ms = min(max(int(raw), 0), _SLOW_CAP_MS)
    except ValueError:
        return web.json_response({"error": f"ms must be an integer, got {raw!r}"}, status=400)
    await _hold(request, delay_ms / 1000)
    return web.json_response({"slept_ms": delay_ms})


async def _hang(request: web.Request) -> web.StreamResponse:
    await _hold(request, _HOLD_LIMIT_S)
    # Still nobody gave up: end as it began, without a word.
    if (transport := _live_transport(request)) is not None:
        transport.close()
    return _RawBytesSent()


# -- byte-level misbehaviour ---------------------------------------------------------------


async def _hangup(request: web.Request) -> web.StreamResponse:
    if (transport := _live_transport(request)) is not None:
        transport.close()  # FIN with nothing written before it
    return _RawBytesSent()


async def _reset(request: web.Request) -> web.StreamResponse:
    if (transport := _live_transport(request)) is not None:
        sock = transport.get_extra_info("socket")
        # Linger on, timeout 0: closing the socket sends RST instead of FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    return _RawBytesSent()


async def _garbage(request: web.Request) -> web.StreamResponse:
    if (transport := _live_transport(request)) is not None:
        # What a proxy gets when its upstream port is really an SSH server.
        transport.write(b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n")
        transport.close()
    return _RawBytesSent()


async def _bad_header(request: web.Request) -> web.StreamResponse:
    if (transport := _live_transport(request)) is not None:
        head = _raw_head(
            "HTTP/1.1 200 OK",
            [
                ("Content-Type", "text/plain"),
                ("Content-Length", "3"),
                ("Connection", "close"),
            ],
        )
        # A header value with a NUL in it, as when an app copies a C string into a header.
        transport.write(head[:-2] + b"X-Trace-Id: 4bf92f35\x0077a1\r\n\r\nok\n")
        transport.close()
    return _RawBytesSent()


async def _huge_headers(request: web.Request) -> web.StreamResponse:
    if (transport := _live_transport(request)) is not None:
        # 100 cookies of 1 KiB each: the runaway Set-Cookie that outgrows every limit.
        cookies = [
            ("Set-Cookie", f"session_part_{number:03d}={'x' * 1000}; Path=/")
            for number in range(100)
        ]
        transport.write(
            _raw_head(
                "HTTP/1.1 200 OK",
                [
                    ("Content-Type", "text/plain"),
                    ("Content-Length", "3"),
                    ("Connection", "close"),
                    *cookies,
                ],
            )
            + b"ok\n"
        )
        transport.close()
    return _RawBytesSent()


async def _bad_upgrade(request: web.Request) -> web.StreamResponse:
    if request.headers.get("Upgrade", "").lower() != "websocket":
        return web.json_response(
            {"error": "send a WebSocket handshake (Upgrade: websocket) to see it broken"},
            status=426,
            headers={"Upgrade": "websocket", "Connection": "Upgrade"},
        )
    if (transport := _live_transport(request)) is not None:
        # A 101 MUST name the protocol switched to (RFC 9110 §15.2.2); this one does not,
        # and carries no Sec-WebSocket-Accept either.
        transport.write(
            _raw_head(
                "HTTP/1.1 101 Switching Protocols",
                [
                    ("Connection", "Upgrade"),
                ],
            )
        )
        transport.close()
    return _RawBytesSent()


async def _truncated(request: web.Request) -> web.StreamResponse:
    if (transport := _live_transport(request)) is not None:
        transport.write(
            _raw_head(
                "HTTP/1.1 200 OK",
                [
                    ("Content-Type", "application/octet-stream"),
                    ("Content-Length", "100000"),
                ],
            )
            + _BYTES_BLOCK[:1000]
        )
        await asyncio.sleep(_MID_BODY_PAUSE_S)
        transport.close()  # clean FIN, 99000 bytes short
    return _RawBytesSent()


async def _stall(request: web.Request) -> web.StreamResponse:
    if (transport := _live_transport(request)) is not None:
        transport.write(
            _raw_head(
                "HTTP/1.1 200 OK",
                [
                    ("Content-Type", "application/octet-stream"),
                    ("Content-Length", "100000"),
                ],
            )
            + _BYTES_BLOCK[:1000]
        )
        await _hold(request, _HOLD_LIMIT_S)
        transport.abort()
    return _RawBytesSent()


async def _bad_chunk(request: web.Request) -> web.StreamResponse:
    if (transport := _live_transport(request)) is not None:
        line = b"The first chunks of this body are fine.\n"
        chunk = f"{len(line):x}\r\n".encode() + line + b"\r\n"
        transport.write(
            _raw_head(
                "HTTP/1.1 200 OK",
                [
                    ("Content-Type", "text/plain"),
                    ("Transfer-Encoding", "chunked"),
                ],
            )
            + chunk * 3
        )
        await asyncio.sleep(_MID_BODY_PAUSE_S)
        # "zz" is not a hexadecimal chunk size.
        transport.write(b"zz\r\nthis is not a chunk\r\n")
        transport.close()
    return _RawBytesSent()


def make_demo_app() -> web.Application:
    """The demo origin's application (its routes match `ROUTES`)."""
    app = web.Application(middlewares=[_quiet_client_disconnects])
    app[_CLOSING] = asyncio.Event()
    app[_WEBSOCKETS] = weakref.WeakSet()
    add = app.router.add_route
    add("GET", "/", _landing)
    add("GET", "/hello", _hello)
    add("GET", "/api/items", _items)
    add("*", "/echo", _echo)
    add("GET", "/stream", _stream)
    add("GET", "/sse", _sse)
    add("GET", "/ws", _websocket_echo)
    add("GET", r"/bytes/{n:\d+}", _bytes)
    add("*", r"/status/{code:\d{3}}", _status)
    add("GET", "/origin-502", _origin_502)
    add("GET", "/origin-504", _origin_504)
    add("GET", "/nginx-502", _nginx_502)
    add("GET", "/envoy-503", _envoy_503)
    add("GET", "/haproxy-503", _haproxy_503)
    add("GET", "/cloudflare-522", _cloudflare_522)
    add("GET", "/alb-502", _alb_502)
    add("GET", "/gateway-504", _gateway_504)
    add("POST", "/json", _json)
    add("GET", "/slow", _slow)
    add("GET", "/hang", _hang)
    add("GET", "/hangup", _hangup)
    add("GET", "/reset", _reset)
    add("GET", "/garbage", _garbage)
    add("GET", "/bad-header", _bad_header)
    add("GET", "/huge-headers", _huge_headers)
    add("GET", "/bad-upgrade", _bad_upgrade)
    add("GET", "/truncated", _truncated)
    add("GET", "/stall", _stall)
    add("GET", "/bad-chunk", _bad_chunk)
    return app


class DemoOrigin:
    """A running demo origin. `port` is the port actually bound (port 0 picks a free one)."""

    host: str
    port: int

    def __init__(self, runner: web.AppRunner, app: web.Application, host: str, port: int):
        self._runner = runner
        self._app = app
        self._closed = False
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        """Stop serving; connections held by /hang, /stall and WebSockets end at once."""
        if self._closed:
            return
        self._closed = True
        self._app[_CLOSING].set()
        open_websockets = self._app[_WEBSOCKETS]
        for websocket in list(open_websockets):
            await websocket.close(code=1001, message=b"demo origin shutting down")
        await self._runner.cleanup()

    async def __aenter__(self) -> DemoOrigin:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def start_demo_origin(host: str = "127.0.0.1", port: int = 0) -> DemoOrigin:
    """Start the demo origin on host:port and return once it accepts connections."""
    app = make_demo_app()
    runner = web.AppRunner(
        app,
        # The proxy's access log is the one to read; the origin's would only add noise.
        access_log=None,
        # A client that leaves (the proxy giving up on /hang or /stall) ends the handler.
        handler_cancellation=True,
        shutdown_timeout=1.0,
        # Never be the hop that refuses a large request header: the proxy's own limit
        # (32 KiB by default) is the one the demo should show.
        max_line_size=65536,
        max_field_size=65536,
        max_headers=1024,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = runner.addresses[0][1]
    return DemoOrigin(runner, app, host, bound_port)


# --------------------------------------------------------------------------------------
# The landing page (rendered once from ROUTES)
# --------------------------------------------------------------------------------------


def _expectation_html(route: DemoRoute) -> str:
    if route.expect_status is None:
        status = '<span class="badge bad">aborted mid-body</span>'
    else:
        tone = "ok" if route.expect_status < 400 else "bad"
        status = f'<span class="badge {tone}">{route.expect_status}</span>'
    parts = [
        status,
        f'<span class="badge">source={route.expect_source}</span>',
        f'<span class="badge">layer={route.expect_layer}</span>',
    ]
    if route.expect_error:
        parts.append(f'<span class="badge err">error={html.escape(route.expect_error)}</span>')
    if route.hop:
        parts.append(f'<span class="badge err">hop={html.escape(route.hop)}</span>')
    for hint in route.expect_hints:
        parts.append(f'<span class="badge err">hint={html.escape(hint)}</span>')
    return " ".join(parts)


def _route_card(route: DemoRoute) -> str:
    path = html.escape(route.path)
    if route.method == "GET" and not route.is_websocket:
        target = f'<a href="{path}"><code>{path}</code></a>'
    else:
        target = f"<code>{path}</code>"
    headers = json.dumps(dict(route.request_headers))
    note = f'<p class="note">{html.escape(route.note)}</p>' if route.note else ""
    return (
        f'<article class="route" data-method="{route.method}" data-path="{path}"'
        f' data-ws="{int(route.is_websocket)}"'
        f' data-body="{html.escape(route.body.decode())}"'
        f' data-headers="{html.escape(headers)}">'
        f'<div class="target"><span class="method">{route.method}</span> {target}</div>'
        f"<h3>{html.escape(route.title)}</h3>"
        f'<p class="expect">Faultline says: {_expectation_html(route)}</p>'
        f"{note}"
        f'<button type="button" class="try">Try it</button>'
        f'<pre class="out" hidden></pre>'
        f"</article>"
    )


def _render_landing() -> str:
    sections: dict[str, list[DemoRoute]] = {}
    for route in ROUTES:
        sections.setdefault(route.section, []).append(route)
    body = "".join(
        f'<section><h2>{html.escape(name)}</h2><div class="grid">'
        + "".join(_route_card(route) for route in routes)
        + "</div></section>"
        for name, routes in sections.items()
    )
    return _LANDING_TEMPLATE.replace("@@SECTIONS@@", body)


_LANDING_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Faultline demo origin</title>
<link rel="icon" href="data:,">
<style>
:root { color-scheme: light dark; --bg: #f6f7f9; --card: #fff; --ink: #1d2330;
  --muted: #5b6475; --line: #dde1e8; --ok: #1f7a4d; --bad: #b3261e; --err: #8a4b00;
  --accent: #3056d3; }
@media (prefers-color-scheme: dark) { :root { --bg: #14171d; --card: #1d2129;
  --ink: #e6e9ef; --muted: #9aa3b2; --line: #2e3440; --ok: #5fd39a; --bad: #ff8a80;
  --err: #ffb74d; --accent: #8ab4ff; } }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif;
  background: var(--bg); color: var(--ink); }
header.top { padding: 2rem 1.5rem 1rem; max-width: 72rem; margin: 0 auto; }
header.top h1 { margin: 0 0 .25rem; font-size: 1.7rem; }
header.top p { margin: .25rem 0; color: var(--muted); max-width: 48rem; }
#via { display: inline-block; margin-top: .5rem; padding: .35rem .7rem; border-radius: .5rem;
  border: 1px solid var(--line); background: var(--card); font-size: .9rem; }
main { max-width: 72rem; margin: 0 auto; padding: 0 1.5rem 3rem; }
h2 { font-size: 1.15rem; margin: 2rem 0 .75rem; border-bottom: 1px solid var(--line);
  padding-bottom: .3rem; }
.grid { display: grid; gap: .9rem; align-items: start;
  grid-template-columns: repeat(auto-fill, minmax(20rem, 1fr)); }
.route { background: var(--card); border: 1px solid var(--line); border-radius: .75rem;
  padding: .9rem 1rem; display: flex; flex-direction: column; gap: .35rem; }
.route h3 { margin: 0; font-size: 1rem; font-weight: 600; }
.target { font-size: .9rem; }
.method { font: 600 .72rem/1 ui-monospace, monospace; padding: .2rem .4rem;
  border-radius: .3rem; background: var(--accent); color: var(--card); }
code, pre { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; }
a { color: var(--accent); }
.expect { margin: 0; font-size: .85rem; color: var(--muted); }
.badge { display: inline-block; margin: .1rem 0; padding: .05rem .45rem; border-radius: 1rem;
  border: 1px solid var(--line); font: .78rem ui-monospace, monospace; color: var(--ink); }
.badge.ok { color: var(--ok); border-color: var(--ok); }
.badge.bad { color: var(--bad); border-color: var(--bad); }
.badge.err { color: var(--err); border-color: var(--err); }
.note { margin: 0; font-size: .85rem; color: var(--muted); }
button.try { align-self: flex-start; margin-top: .25rem; font: inherit; font-size: .85rem;
  padding: .3rem .8rem; border-radius: .4rem; border: 1px solid var(--accent);
  background: transparent; color: var(--accent); cursor: pointer; }
button.try:hover { background: var(--accent); color: var(--card); }
pre.out { margin: .35rem 0 0; padding: .6rem; border-radius: .4rem; background: var(--bg);
  border: 1px solid var(--line); font-size: .78rem; white-space: pre-wrap;
  word-break: break-all; max-height: 18rem; overflow: auto; }
footer { color: var(--muted); font-size: .85rem; text-align: center; padding: 1rem; }
</style>
</head>
<body>
<header class="top">
<h1>Faultline demo origin</h1>
<p>Every route below makes this origin behave well or badly in one specific way. Open this
page <strong>through Faultline</strong> (the proxy URL <code>faultline demo</code> printed),
press <em>Try it</em>, and compare the <code>Proxy-Status</code> header and the access log with
what Faultline should say.</p>
<span id="via">checking whether this page came through Faultline&hellip;</span>
</header>
<main>
@@SECTIONS@@
</main>
<footer>Faultline demo origin &middot; every response here is made on purpose</footer>
<script>
"use strict";
const SHOWN_HEADERS = ["proxy-status", "server-timing", "x-request-id", "server", "content-type"];

function isText(type) {
  return /^text\\/|json|html|xml|event-stream/.test(type || "");
}

async function tryHttp(card, out) {
  const d = card.dataset;
  const started = performance.now();
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), 35000);
  const lines = [];
  try {
    const init = {method: d.method, headers: JSON.parse(d.headers || "{}"),
                  cache: "no-store", signal: abort.signal};
    if (d.body) init.body = d.body;
    const resp = await fetch(d.path, init);
    lines.push("HTTP " + resp.status + " " + resp.statusText);
    for (const name of SHOWN_HEADERS) {
      const value = resp.headers.get(name);
      if (value) lines.push(name + ": " + value);
    }
    if (!resp.headers.get("proxy-status")) {
      lines.push("(no Proxy-Status: this request did not go through Faultline)");
    }
    out.textContent = lines.join("\\n") + "\\n\\nreading the body\\u2026";
    if (isText(resp.headers.get("content-type"))) {
      const text = await resp.text();
      lines.push("", text.length > 800 ? text.slice(0, 800) + "\\u2026" : text);
    } else {
      const body = await resp.arrayBuffer();
      lines.push("", "(" + body.byteLength + " bytes of binary body)");
    }
  } catch (err) {
    lines.push("", "the response broke off: " + err);
  } finally {
    clearTimeout(timer);
  }
  lines.push("", Math.round(performance.now() - started) + " ms");
  out.textContent = lines.join("\\n");
}

function tryWebSocket(card, out) {
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const lines = ["opening " + card.dataset.path + " \\u2026"];
  const show = () => { out.textContent = lines.join("\\n"); };
  const socket = new WebSocket(scheme + location.host + card.dataset.path);
  socket.onopen = () => { lines.push("open; sending \\"hello\\""); show(); socket.send("hello"); };
  socket.onmessage = (ev) => { lines.push("echo: " + ev.data); show(); socket.close(); };
  socket.onerror = () => { lines.push("the WebSocket handshake failed"); show(); };
  socket.onclose = (ev) => { lines.push("closed (code " + ev.code + ")"); show(); };
  show();
}

document.addEventListener("click", (ev) => {
  const button = ev.target.closest("button.try");
  if (!button) return;
  const card = button.closest(".route");
  const out = card.querySelector(".out");
  out.hidden = false;
  out.textContent = "waiting\\u2026";
  if (card.dataset.ws === "1") tryWebSocket(card, out); else tryHttp(card, out);
});

fetch("/hello", {cache: "no-store"}).then((resp) => {
  const status = resp.headers.get("proxy-status");
  document.getElementById("via").textContent = status
    ? "Served through Faultline: Proxy-Status: " + status
    : "You are talking to the demo origin directly: open the proxy's URL to see Faultline at work.";
}).catch(() => {});
</script>
</body>
</html>
"""

_LANDING_HTML = _render_landing()
