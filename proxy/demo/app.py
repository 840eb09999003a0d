"""The demo origin's aiohttp application, and a running instance of it."""

from __future__ import annotations

import asyncio
import weakref

from aiohttp import web

from . import broken, handlers
from .wire import CLOSING, WEBSOCKETS, quiet_client_disconnects


def make_demo_app() -> web.Application:
    """The demo origin's application (its routes match `ROUTES`)."""
    app = web.Application(middlewares=[quiet_client_disconnects])
    app[CLOSING] = asyncio.Event()
    app[WEBSOCKETS] = weakref.WeakSet()
    for method, path, handler in (*handlers.HANDLERS, *broken.HANDLERS):
        app.router.add_route(method, path, handler)
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
        self._app[CLOSING].set()
        open_websockets = self._app[WEBSOCKETS]
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
    return await serve(runner, app, host, port)


async def serve(runner: web.AppRunner, app: web.Application, host: str, port: int) -> DemoOrigin:
    """`runner` listening on host:port (0: a free port), once it accepts connections."""
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return DemoOrigin(runner, app, host, runner.addresses[0][1])
