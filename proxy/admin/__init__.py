"""The admin server (its own port, 127.0.0.1 by default): health, stats, metrics, the fault
taxonomy and the live dashboard. HTTP/1.1 itself is `listener`'s job; this module routes a
request to its handler.

Endpoints (CONTRACT.md, "Admin server"):
  GET /healthz    200 while the process serves                       (never needs the token)
  GET /readyz     200 when ready, 503 while draining                 (never needs the token)
  GET /stats      the contract's JSON; `?source=&error=&limit=` filter `recent_errors` only
  GET /metrics    Prometheus text format (OpenMetrics when the scraper asks for it)
  GET /faults     the fault taxonomy as JSON: what the dashboard explains each fault with
  GET /series     responses per second by source over `?seconds=` (<= 300): the chart
  GET /latency    every latency histogram summarised (total, each phase, each source)
  GET /dashboard  the live page over the endpoints above

The token (`admin.token`): when set, every endpoint but /healthz and /readyz wants
`Authorization: Bearer <token>`, compared in constant time. A browser cannot send a header
when it navigates, so /dashboard (only it) also takes the token as `?token=`: open
`http://127.0.0.1:9901/dashboard?token=<token>`; the page reads it from its address once
and sends it as a bearer header on every fetch it makes. The page is served with
`Referrer-Policy: no-referrer` and `Cache-Control: no-store` so the token does not travel on.

Rules: a handler reads the in-memory aggregates and renders them; nothing here sorts raw
samples or blocks, so the admin port never stalls the data plane sharing its loop. Errors
(bad query parameters, a missing token, an unknown path) are `application/problem+json`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import re
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from .. import __version__
from ..diagnosis.faults import REQUEST_PROBLEMS, TAXONOMY, Fault, FaultInfo, Source
from ..replies import reason
from ..telemetry.metrics import make_registry, render
from ..telemetry.sink import Telemetry
from ..telemetry.stats import WINDOWS_S
from .listener import AdminListener, AdminRequest, AdminResponse, Handler, Prepare, problem

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from ..config import Config

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
DASHBOARD_PATH = "/dashboard"
MAX_LIMIT = 1_000_000
ALLOWED_METHODS = ("GET", "HEAD")
TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
HTML = "text/html; charset=utf-8"
NO_STORE = (("Cache-Control", "no-store"),)


# -- query parameters ----------------------------------------------------------------------


class BadQuery(Exception):
    def __init__(self, parameter: str, detail: str, allowed: list[str] | None = None) -> None:
        super().__init__(detail)
        self.parameter = parameter
        self.detail = detail
        self.allowed = allowed


def _one(request: AdminRequest, name: str) -> str | None:
    values = request.query.get(name, [])
    if len(values) > 1:
        raise BadQuery(name, f"{name} is given {len(values)} times; give it once")
    return values[0] if values else None


def _check_names(request: AdminRequest, known: tuple[str, ...]) -> None:
    for name in request.query:
        if name not in known:
            shown = ", ".join(known) if known else "none"
            raise BadQuery(name, f"unknown query parameter {name!r} (this endpoint takes: {shown})")


def _choice(request: AdminRequest, name: str, allowed: list[str]) -> str | None:
    value = _one(request, name)
    if value is not None and value not in allowed:
        raise BadQuery(name, f"{name}={value!r} is not one of: {', '.join(allowed)}", allowed)
    return value


def _integer(request: AdminRequest, name: str, low: int, high: int) -> int | None:
    value = _one(request, name)
    if value is None:
        return None
    if not value.isascii() or not value.isdigit() or not low <= int(value) <= high:
        raise BadQuery(name, f"{name}={value!r} must be an integer from {low} to {high}")
    return int(value)


# -- the taxonomy as data ------------------------------------------------------------------------


def _fault_doc(row: FaultInfo) -> dict[str, Any]:
    return {
        "status": row.status,
        "layer": row.layer.value,
        "source": row.source.value,
        "title": row.title,
        "hop": row.hop,
        "meaning": row.meaning,
        "advice": row.advice,
        "hint": row.hint,
    }


def faults_document() -> dict[str, Any]:
    """Every fault with its words, from `faults.TAXONOMY` (the page never spells them).

    `http_request_error` lists its kinds under `variants`, one per status it is sent with.
    """
    faults = []
    for fault, row in TAXONOMY.items():
        doc = {"error": fault.value, **_fault_doc(row)}
        variants = [_fault_doc(v) for v in REQUEST_PROBLEMS.values() if v.fault is fault]
        if variants:
            doc["variants"] = variants
        faults.append(doc)
    return {"faults": faults}


# -- the dashboard page --------------------------------------------------------------------------


def _csp_hash(pattern: str, page: str) -> str:
    match = re.search(pattern, page, re.DOTALL)
    if match is None:
        return "'none'"
    digest = hashlib.sha256(match.group(1).encode()).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


def load_dashboard() -> tuple[bytes, str]:
    """The page and a Content-Security-Policy allowing exactly its inline script and style."""
    page = (resources.files(__package__) / "dashboard" / "index.html").read_text("utf-8")
    script = _csp_hash(r"<script>(.*?)</script>", page)
    style = _csp_hash(r"<style>(.*?)</style>", page)
    csp = (
        f"default-src 'none'; script-src {script}; style-src {style}; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
    return page.encode(), csp


# Asked for the token: a page (package data) with a form that opens the dashboard with it.
_DASHBOARD_LOGIN = (resources.files(__package__) / "dashboard" / "login.html").read_text("utf-8")


# -- the application ----------------------------------------------------------------------------


class Workers(NamedTuple):
    """What the supervisor of several worker processes adds to its admin server: `refresh`
    gathers every worker's counts into the telemetry before a reading endpoint answers,
    `listing` is `/stats` `proxy.workers`, `collector` the workers' own metric families."""

    refresh: Prepare
    listing: Callable[[], list[dict[str, Any]]]
    collector: Collector


READING_PATHS = frozenset({"/stats", "/metrics", "/series", "/latency"})


def build_app(
    config: Config,
    telemetry: Telemetry,
    ready: Callable[[], bool],
    pool_counts: Callable[[], tuple[int, int]],
    workers: Workers | None = None,
) -> Handler:
    """The admin app: one synchronous function from a request to its response. `ready`
    says whether the proxy takes new traffic (/readyz); `pool_counts` gives the upstream
    pool's idle and busy connections (/metrics)."""
    token = config.admin.token.encode() if config.admin.token else None
    registry = make_registry(telemetry, pool_counts)
    if workers is not None:
        registry.register(workers.collector)
    dashboard_page, dashboard_csp = load_dashboard()
    faults_body = orjson.dumps(faults_document())
    sources = [s.value for s in Source]
    tokens = [f.value for f in Fault]
    upstream = config.upstream or None  # None: routes, and no default route
    proxy_info = {"name": config.proxy_name, "version": __version__, "upstream": upstream}

    def refusal(request: AdminRequest) -> tuple[str, bool] | None:
        """None when the request may pass; else why not, and whether a token was given."""
        assert token is not None
        header = request.headers.get("authorization")
        given: str | None = None
        if header is not None:
            scheme, _, credentials = header.partition(" ")
            if scheme.lower() != "bearer" or not credentials.strip():
                return "the Authorization header does not carry a bearer token", True
            given = credentials.strip()
        elif request.path == DASHBOARD_PATH:
            given = next(iter(request.query.get("token", ())), None)
        if given is None:
            return "no admin token was given", False
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), token):
            return "the admin token is wrong", True
        return None

    def unauthorised(request: AdminRequest, why: str, invalid: bool) -> AdminResponse:
        challenge = 'Bearer realm="faultline admin"'
        if invalid:
            challenge += ', error="invalid_token"'
        if request.path == DASHBOARD_PATH and "text/html" in request.headers.get("accept", ""):
            body = _DASHBOARD_LOGIN.format(detail=html.escape(why[0].upper() + why[1:]))
            return AdminResponse(
                401,
                HTML,
                body.encode(),
                (
                    ("WWW-Authenticate", challenge),
                    ("Cache-Control", "no-store"),
                    ("Referrer-Policy", "no-referrer"),
                ),
            )
        return problem(
            401,
            "unauthorised",
            "Admin token required",
            f"{why}: send Authorization: Bearer <admin.token>",
            headers={"WWW-Authenticate": challenge},
        )

    def healthz(request: AdminRequest) -> AdminResponse:
        return AdminResponse(200, TEXT, b"ok\n")

    def readyz(request: AdminRequest) -> AdminResponse:
        if ready():
            return AdminResponse(200, TEXT, b"ready\n")
        return AdminResponse(503, TEXT, b"draining\n")

    def json(doc: Any) -> AdminResponse:
        return AdminResponse(200, JSON, orjson.dumps(doc), NO_STORE)

    def stats_handler(request: AdminRequest) -> AdminResponse:
        _check_names(request, ("source", "error", "limit"))
        source = _choice(request, "source", sources)
        error = _choice(request, "error", tokens)
        limit = _integer(request, "limit", 0, MAX_LIMIT)
        telemetry.settle()
        info = proxy_info if workers is None else {**proxy_info, "workers": workers.listing()}
        doc = telemetry.stats.snapshot(proxy=info, source=source, error=error, limit=limit)
        return json(doc)

    def metrics_handler(request: AdminRequest) -> AdminResponse:
        body, content_type = render(registry, request.headers.get("accept"))
        return AdminResponse(200, content_type, body)

    def faults_handler(request: AdminRequest) -> AdminResponse:
        _check_names(request, ())
        return AdminResponse(200, JSON, faults_body)

    def series_handler(request: AdminRequest) -> AdminResponse:
        _check_names(request, ("seconds",))
        seconds = _integer(request, "seconds", 1, WINDOWS_S[-1])
        telemetry.settle()
        return json(telemetry.stats.series(seconds or WINDOWS_S[-1]))

    def latency_handler(request: AdminRequest) -> AdminResponse:
        _check_names(request, ())
        telemetry.settle()
        return json(telemetry.stats.latency())

    def dashboard(request: AdminRequest) -> AdminResponse:
        _check_names(request, ("token",))
        return AdminResponse(
            200,
            HTML,
            dashboard_page,
            (
                ("Content-Security-Policy", dashboard_csp),
                ("Referrer-Policy", "no-referrer"),
                ("Cache-Control", "no-store"),
                ("X-Content-Type-Options", "nosniff"),
                ("X-Frame-Options", "DENY"),
            ),
        )

    def index(request: AdminRequest) -> AdminResponse:
        return AdminResponse(302, TEXT, b"302: Found", (("Location", DASHBOARD_PATH),))

    routes: dict[str, Handler] = {
        "/": index,
        "/healthz": healthz,
        "/readyz": readyz,
        "/stats": stats_handler,
        "/metrics": metrics_handler,
        "/faults": faults_handler,
        "/series": series_handler,
        "/latency": latency_handler,
        DASHBOARD_PATH: dashboard,
    }
    endpoints = sorted(routes)

    def not_routed(request: AdminRequest, status: int, headers: dict[str, str]) -> AdminResponse:
        title = reason(status)
        return problem(
            status,
            f"http-{status}",
            title,
            f"{request.method} {request.path}: {title.lower()}",
            headers=headers,
            endpoints=endpoints,
        )

    def app(request: AdminRequest) -> AdminResponse:
        # The token is checked first: without it, not even which paths exist is told.
        if token is not None and request.path not in OPEN_PATHS:
            refused = refusal(request)
            if refused is not None:
                return unauthorised(request, *refused)
        handler = routes.get(request.path)
        if handler is None:
            return not_routed(request, 404, {})
        if request.method not in ALLOWED_METHODS:
            return not_routed(request, 405, {"Allow": ", ".join(ALLOWED_METHODS)})
        try:
            return handler(request)
        except BadQuery as exc:
            extra: dict[str, Any] = {"allowed": exc.allowed} if exc.allowed else {}
            return problem(
                400,
                "bad-query",
                "Bad query parameter",
                exc.detail,
                parameter=exc.parameter,
                **extra,
            )

    return app


async def start_admin(
    config: Config,
    telemetry: Telemetry,
    ready: Callable[[], bool],
    pool_counts: Callable[[], tuple[int, int]],
    workers: Workers | None = None,
) -> tuple[AdminListener, tuple[str, int]]:
    """Listen on `admin.listen` (OSError when the address is busy or unusable): the
    listener, whose `cleanup()` closes it and every admin connection, and its address."""
    timeouts = config.timeouts
    app = build_app(config, telemetry, ready, pool_counts, workers)
    prepare: Prepare | None = None
    if workers is not None:
        refresh = workers.refresh

        async def prepare(request: AdminRequest) -> None:
            if request.path in READING_PATHS:
                await refresh(request)

    listener = AdminListener(app, timeouts.client_headers, timeouts.keepalive, prepare=prepare)
    host, port = config.admin.listen
    return listener, await listener.listen(host, port)
