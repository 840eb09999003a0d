"""The demo's second upstream: a small JSON API that `faultline demo` routes `/api/` to, so
the dashboard shows two routes from the first click (issue 21). The pages stay on the demo
origin (`app`), the default route.
"""

from __future__ import annotations

import asyncio
import weakref

from aiohttp import web

from .app import DemoOrigin, serve
from .handlers import items
from .wire import CLOSING, WEBSOCKETS

USERS = {1: "ada", 2: "grace", 3: "linus"}
SLOW_S = 1.0


async def _users(request: web.Request) -> web.Response:
    return web.json_response({"users": [{"id": i, "name": n} for i, n in USERS.items()]})


async def _user(request: web.Request) -> web.Response:
    user_id = int(request.match_info["id"])
    if user_id not in USERS:  # the API's own 404: source origin, not a proxy fault
        return web.json_response({"error": f"no user {user_id}"}, status=404)
    return web.json_response({"id": user_id, "name": USERS[user_id]})


async def _slow(request: web.Request) -> web.Response:
    await asyncio.sleep(SLOW_S)
    return web.json_response({"slow": True, "seconds": SLOW_S})


def make_demo_api() -> web.Application:
    app = web.Application()
    app[CLOSING] = asyncio.Event()  # what DemoOrigin.close sets and closes
    app[WEBSOCKETS] = weakref.WeakSet()
    app.router.add_get("/api/items", items)
    app.router.add_get("/api/users", _users)
    app.router.add_get(r"/api/users/{id:\d+}", _user)
    app.router.add_get("/api/slow", _slow)
    return app


async def start_demo_api(host: str = "127.0.0.1", port: int = 0) -> DemoOrigin:
    """Start the demo API on host:port (0: a free port) and return once it accepts."""
    app = make_demo_api()
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    return await serve(runner, app, host, port)
