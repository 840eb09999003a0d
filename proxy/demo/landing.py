"""The demo's landing page: `landing.html` with one card per route of `routes.ROUTES`."""

from __future__ import annotations

import html
import json
from importlib.resources import files

from .routes import ROUTES, DemoRoute


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
    template = files(__package__).joinpath("landing.html").read_text(encoding="utf-8")
    return template.replace("@@SECTIONS@@", body)


LANDING_HTML = _render_landing()
