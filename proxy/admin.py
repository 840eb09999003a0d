"""The admin server (aiohttp, its own port): health, readiness, stats.

Minimal first version; metrics, the dashboard, filters and the token come next.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from . import __version__

if TYPE_CHECKING:
    from .config import Config
    from .server import ProxyServer


def build_app(server: ProxyServer, config: Config) -> web.Application:
    app = web.Application()

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        if server.ready:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="draining\n")

    async def stats(request: web.Request) -> web.Response:
        assert server.ctx is not None
        doc = server.ctx.stats.snapshot(
            proxy={
                "name": config.proxy_name,
                "version": __version__,
                "upstream": config.upstream,
            }
        )
        return web.Response(body=orjson.dumps(doc), content_type="application/json")

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/stats", stats)
    return app


async def start_admin(server: ProxyServer, config: Config) -> tuple[Any, tuple[str, int]]:
    runner = web.AppRunner(build_app(server, config), access_log=None)
    await runner.setup()
    host, port = config.admin.listen
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    sockets = site._server.sockets if site._server is not None else []  # type: ignore[union-attr]
    address = sockets[0].getsockname()[:2] if sockets else (host, port)
    return runner, address
