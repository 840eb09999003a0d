"""The demo's route table: what each route does and what a correct Faultline reports for it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..diagnosis.faults import Fault
from ..diagnosis.hops import FAULT_BEHIND_ORIGIN, ORIGIN_5XX_FOR_CLIENT_ERROR

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
