"""The demo origin's slow answers and byte-level misbehaviour: each handler writes raw
bytes and breaks the connection the way a real origin does."""

from __future__ import annotations

import asyncio
import socket
import struct

from aiohttp import web

from .wire import (
    BYTES_BLOCK,
    HOLD_LIMIT_S,
    MID_BODY_PAUSE_S,
    SLOW_CAP_MS,
    SLOW_DEFAULT_MS,
    Handler,
    RawBytesSent,
    hold,
    live_transport,
    raw_head,
)

# -- slow answers -------------------------------------------------------------------------


async def _slow(request: web.Request) -> web.Response:
    raw = request.query.get("ms", str(SLOW_DEFAULT_MS))
    try:
        delay_ms = min(max(int(raw), 0), SLOW_CAP_MS)
    except ValueError:
        return web.json_response({"error": f"ms must be an integer, got {raw!r}"}, status=400)
    await hold(request, delay_ms / 1000)
    return web.json_response({"slept_ms": delay_ms})


async def _hang(request: web.Request) -> web.StreamResponse:
    await hold(request, HOLD_LIMIT_S)
    # Still nobody gave up: end as it began, without a word.
    if (transport := live_transport(request)) is not None:
        transport.close()
    return RawBytesSent()


# -- byte-level misbehaviour ---------------------------------------------------------------


async def _hangup(request: web.Request) -> web.StreamResponse:
    if (transport := live_transport(request)) is not None:
        transport.close()  # FIN with nothing written before it
    return RawBytesSent()


async def _reset(request: web.Request) -> web.StreamResponse:
    if (transport := live_transport(request)) is not None:
        sock = transport.get_extra_info("socket")
        # Linger on, timeout 0: closing the socket sends RST instead of FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    return RawBytesSent()


async def _garbage(request: web.Request) -> web.StreamResponse:
    if (transport := live_transport(request)) is not None:
        # What a proxy gets when its upstream port is really an SSH server.
        transport.write(b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n")
        transport.close()
    return RawBytesSent()


async def _bad_header(request: web.Request) -> web.StreamResponse:
    if (transport := live_transport(request)) is not None:
        head = raw_head(
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
    return RawBytesSent()


async def _huge_headers(request: web.Request) -> web.StreamResponse:
    if (transport := live_transport(request)) is not None:
        # 100 cookies of 1 KiB each: the runaway Set-Cookie that outgrows every limit.
        cookies = [
            ("Set-Cookie", f"session_part_{number:03d}={'x' * 1000}; Path=/")
            for number in range(100)
        ]
        transport.write(
            raw_head(
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
    return RawBytesSent()


async def _bad_upgrade(request: web.Request) -> web.StreamResponse:
    if request.headers.get("Upgrade", "").lower() != "websocket":
        return web.json_response(
            {"error": "send a WebSocket handshake (Upgrade: websocket) to see it broken"},
            status=426,
            headers={"Upgrade": "websocket", "Connection": "Upgrade"},
        )
    if (transport := live_transport(request)) is not None:
        # A 101 MUST name the protocol switched to (RFC 9110 §15.2.2); this one does not,
        # and carries no Sec-WebSocket-Accept either.
        transport.write(
            raw_head(
                "HTTP/1.1 101 Switching Protocols",
                [
                    ("Connection", "Upgrade"),
                ],
            )
        )
        transport.close()
    return RawBytesSent()


async def _truncated(request: web.Request) -> web.StreamResponse:
    if (transport := live_transport(request)) is not None:
        transport.write(
            raw_head(
                "HTTP/1.1 200 OK",
                [
                    ("Content-Type", "application/octet-stream"),
                    ("Content-Length", "100000"),
                ],
            )
            + BYTES_BLOCK[:1000]
        )
        await asyncio.sleep(MID_BODY_PAUSE_S)
        transport.close()  # clean FIN, 99000 bytes short
    return RawBytesSent()


async def _stall(request: web.Request) -> web.StreamResponse:
    if (transport := live_transport(request)) is not None:
        transport.write(
            raw_head(
                "HTTP/1.1 200 OK",
                [
                    ("Content-Type", "application/octet-stream"),
                    ("Content-Length", "100000"),
                ],
            )
            + BYTES_BLOCK[:1000]
        )
        await hold(request, HOLD_LIMIT_S)
        transport.abort()
    return RawBytesSent()


async def _bad_chunk(request: web.Request) -> web.StreamResponse:
    if (transport := live_transport(request)) is not None:
        line = b"The first chunks of this body are fine.\n"
        chunk = f"{len(line):x}\r\n".encode() + line + b"\r\n"
        transport.write(
            raw_head(
                "HTTP/1.1 200 OK",
                [
                    ("Content-Type", "text/plain"),
                    ("Transfer-Encoding", "chunked"),
                ],
            )
            + chunk * 3
        )
        await asyncio.sleep(MID_BODY_PAUSE_S)
        # "zz" is not a hexadecimal chunk size.
        transport.write(b"zz\r\nthis is not a chunk\r\n")
        transport.close()
    return RawBytesSent()


HANDLERS: list[tuple[str, str, Handler]] = [
    ("GET", "/slow", _slow),
    ("GET", "/hang", _hang),
    ("GET", "/hangup", _hangup),
    ("GET", "/reset", _reset),
    ("GET", "/garbage", _garbage),
    ("GET", "/bad-header", _bad_header),
    ("GET", "/huge-headers", _huge_headers),
    ("GET", "/bad-upgrade", _bad_upgrade),
    ("GET", "/truncated", _truncated),
    ("GET", "/stall", _stall),
    ("GET", "/bad-chunk", _bad_chunk),
]
