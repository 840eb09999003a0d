"""What the demo's handlers share: limits, raw bytes on the bare transport, bounded holds."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Awaitable, Callable
from email.utils import formatdate

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# How long /hang and /stall hold a connection when nobody gives up first.
HOLD_LIMIT_S = 300.0
# Pause between the valid part of a broken response and the break, so the proxy has
# forwarded the origin's status before the fault: the fault is then truly mid-body.
MID_BODY_PAUSE_S = 0.25
BYTES_CAP = 100 * 1024 * 1024
SLOW_DEFAULT_MS = 1500
SLOW_CAP_MS = 30_000
ECHO_BODY_SHOWN = 64 * 1024

CLOSING = web.AppKey("closing", asyncio.Event)
WEBSOCKETS: web.AppKey[weakref.WeakSet[web.WebSocketResponse]] = web.AppKey("websockets")


class RawBytesSent(web.StreamResponse):
    """What a byte-level handler returns: its bytes already went out on the bare transport.

    aiohttp must write nothing more (no status line, no chunk terminator); an unprepared
    response is not keep-alive, so aiohttp also drops the connection afterwards.
    """

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


@web.middleware
async def quiet_client_disconnects(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    # A client (usually the proxy, giving up on purpose) that leaves while we stream makes
    # writes fail; aiohttp would log that as an unhandled error with a traceback.
    try:
        return await handler(request)
    except ConnectionError:
        return RawBytesSent()


def http_date() -> str:
    return formatdate(usegmt=True)


def live_transport(request: web.Request) -> asyncio.Transport | None:
    transport = request.transport
    if transport is None or transport.is_closing():
        return None
    return transport


async def hold(request: web.Request, seconds: float) -> None:
    """Wait `seconds`, less if the demo origin closes (a leaving client cancels us)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(request.app[CLOSING].wait(), seconds)


def raw_head(status_line: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [status_line, f"Date: {http_date()}", "Server: faultline-demo-origin"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


BYTES_BLOCK = bytes(range(256)) * 256
