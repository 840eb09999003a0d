"""The demo origin's well-formed answers: normal traffic, its own errors, and errors made
behind it, byte for byte as each product sends them."""

from __future__ import annotations

import asyncio
import hashlib
import http
import json

from aiohttp import WSMsgType, web

from ..diagnosis.faults import Fault
from .landing import LANDING_HTML
from .wire import (
    BYTES_BLOCK,
    BYTES_CAP,
    ECHO_BODY_SHOWN,
    WEBSOCKETS,
    Handler,
    RawBytesSent,
    http_date,
    live_transport,
)

# -- normal traffic --------------------------------------------------------------------


async def _landing(request: web.Request) -> web.Response:
    return web.Response(
        text=LANDING_HTML,
        content_type="text/html",
        charset="utf-8",
        headers={"Cache-Control": "no-store"},
    )


async def _hello(request: web.Request) -> web.Response:
    return web.Response(text="Hello from the Faultline demo origin.\n")


async def items(request: web.Request) -> web.Response:
    rows = [
        {"id": 1, "name": "teapot", "price": 18.5},
        {"id": 2, "name": "kettle", "price": 42.0},
        {"id": 3, "name": "strainer", "price": 4.25},
    ]
    return web.json_response({"items": rows, "count": len(rows)})


async def _echo(request: web.Request) -> web.Response:
    # Stream the body through a hash rather than buffering it: uploads of any size can be
    # checked end to end by length and digest, and only the first 64 KiB are shown.
    digest = hashlib.sha256()
    size = 0
    shown = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        digest.update(chunk)
        size += len(chunk)
        if len(shown) < ECHO_BODY_SHOWN:
            shown += chunk[: ECHO_BODY_SHOWN - len(shown)]
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
    request.app[WEBSOCKETS].add(websocket)
    async for message in websocket:
        if message.type == WSMsgType.TEXT:
            await websocket.send_str(message.data)
        elif message.type == WSMsgType.BINARY:
            await websocket.send_bytes(message.data)
    return websocket


# A fixed 64 KiB block (0x00..0xff repeated): /bytes bodies are predictable, so a test can
# check every byte that came through the proxy.


async def _bytes(request: web.Request) -> web.StreamResponse:
    requested = int(request.match_info["n"])
    size = min(requested, BYTES_CAP)
    headers = {"Content-Type": "application/octet-stream"}
    if size < requested:
        headers["X-Demo-Capped-To"] = str(BYTES_CAP)
    response = web.StreamResponse(headers=headers)
    response.content_length = size
    await response.prepare(request)
    remaining = size
    while remaining > 0:
        block = BYTES_BLOCK[: min(remaining, len(BYTES_BLOCK))]
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
    if (transport := live_transport(request)) is not None:
        lines = [status_line, *(f"{name}: {value}" for name, value in headers)]
        lines.append(f"Content-Length: {len(body)}")
        lines.append("Connection: close")
        transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        transport.close()
    return RawBytesSent()


_ENVOY_UF = (
    b"upstream connect error or disconnect/reset before headers. reset reason: connection "
    b"failure, transport failure reason: delayed connect error: 111"
)


async def _envoy_503(request: web.Request) -> web.StreamResponse:
    return await _product_response(
        request,
        "HTTP/1.1 503 Service Unavailable",
        [("content-type", "text/plain"), ("date", http_date()), ("server", "envoy")],
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
            ("Date", http_date()),
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
        [("Server", "awselb/2.0"), ("Date", http_date()), ("Content-Type", "text/html")],
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


HANDLERS: list[tuple[str, str, Handler]] = [
    ("GET", "/", _landing),
    ("GET", "/hello", _hello),
    ("GET", "/api/items", items),
    ("*", "/echo", _echo),
    ("GET", "/stream", _stream),
    ("GET", "/sse", _sse),
    ("GET", "/ws", _websocket_echo),
    ("GET", r"/bytes/{n:\d+}", _bytes),
    ("*", r"/status/{code:\d{3}}", _status),
    ("GET", "/origin-502", _origin_502),
    ("GET", "/origin-504", _origin_504),
    ("GET", "/nginx-502", _nginx_502),
    ("GET", "/envoy-503", _envoy_503),
    ("GET", "/haproxy-503", _haproxy_503),
    ("GET", "/cloudflare-522", _cloudflare_522),
    ("GET", "/alb-502", _alb_502),
    ("GET", "/gateway-504", _gateway_504),
    ("POST", "/json", _json),
]
