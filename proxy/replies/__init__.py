"""Responses the proxy makes itself: RFC 9457 problem+json, or an HTML page for browsers.

Rule: a proxy-made body says what failed, at which hop, and what to check first (all from
the taxonomy row), plus the request id and upstream; never a stack trace, a file path or
a secret. Every value comes from the taxonomy, the exchange's own sanitised facts, or the
configuration.
"""

from __future__ import annotations

import html
from http import HTTPStatus
from importlib.resources import files
from string import Template
from typing import TYPE_CHECKING

import orjson

from ..faults import CLIENT_CLOSED_STATUS, Fault, FaultInfo, RequestProblem, info
from ..headers import http_date, prefers_html

if TYPE_CHECKING:
    from ..downstream import RequestHead
    from ..exchange import Exchange
    from ..server import ProxyContext

__all__ = ["CLIENT_CLOSED_STATUS", "http_date", "render"]

PROBLEM_TYPE_BASE = "urn:faultline:fault:"
# Reason phrases for every reply the proxy and its admin port make: RFC 9110's names where
# Python 3.11's http.HTTPStatus still has older ones.
_RFC9110_NAMES = {413: "Content Too Large", 422: "Unprocessable Content"}
REASONS = {s.value: _RFC9110_NAMES.get(s.value, s.phrase) for s in HTTPStatus}


def reason(status: int) -> str:
    return REASONS.get(status, "Error")


RETRY_AFTER_S = 1


def sentence(fact: str) -> str:
    """A detail (a fact in lower case, as in Proxy-Status and the log) as a sentence."""
    fact = fact.strip()
    text = fact[:1].upper() + fact[1:]
    return text if text.endswith((".", "?", "!")) else text + "."


def problem_document(row: FaultInfo, ex: Exchange, detail: str | None, upstream: str) -> dict:
    assert row.status is not None
    return {
        "type": PROBLEM_TYPE_BASE + row.token,
        "title": row.title,
        "status": row.status,
        "detail": sentence(detail) if detail else row.meaning,
        "error": row.token,
        "layer": row.layer.value,
        "source": "proxy",
        "hop": row.hop,
        "check_first": row.advice,
        "request_id": ex.request_id,
        "upstream": upstream,
    }


# The HTML page for browsers (package data): `$name` placeholders, every value escaped.
_PAGE = Template(files(__package__).joinpath("page.html").read_text(encoding="utf-8"))


def html_page(doc: dict, proxy_name: str) -> bytes:
    values = {key: html.escape(str(value)) for key, value in doc.items()}
    return _PAGE.substitute(values, proxy_name=html.escape(proxy_name)).encode()


def render(
    ctx: ProxyContext,
    ex: Exchange,
    head: RequestHead | None,
    fault: Fault,
    problem: RequestProblem | None,
    detail: str | None,
    params: dict[str, str] | None,
    *,
    close: bool,
) -> bytes:
    """The whole response (head and body) for a fault; sets the exchange's status."""
    row = info(fault, problem)
    assert row.status is not None, f"{fault} has no status of its own"
    ex.status = row.status
    upstream = ctx.config.upstream
    doc = problem_document(row, ex, detail, upstream)
    if head is not None and prefers_html(head.accept) and head.method != b"HEAD":
        body, content_type = html_page(doc, ctx.config.proxy_name), b"text/html; charset=utf-8"
    else:
        body, content_type = orjson.dumps(doc), b"application/problem+json"
    hp = ctx.headers
    lines = [
        b"HTTP/1.1 %d %s\r\n" % (row.status, reason(row.status).encode()),
        b"Date: " + http_date() + b"\r\n",
        b"Content-Type: " + content_type + b"\r\n",
        b"Content-Length: %d\r\n" % len(body),
        b"Cache-Control: no-store\r\n",
    ]
    if hp.proxy_status:
        next_hop = (
            ctx.config.upstream_authority if row.layer.value in ("transport", "upstream") else None
        )
        lines.append(hp.error_status(row.token, detail, next_hop, params))
    if hp.server_timing:
        lines.append(hp.timing(ex.connect_ns(), ex.ttfb_ns(), ex.own_ns(0), ex.wait_ns()))
    lines.append(b"X-Request-Id: " + ex.request_id.encode() + b"\r\n")
    if fault is Fault.CONNECTION_LIMIT_REACHED:
        lines.append(b"Retry-After: %d\r\n" % RETRY_AFTER_S)
    if close:
        lines.append(b"Connection: close\r\n")
    elif head is not None and not head.http11:
        lines.append(b"Connection: keep-alive\r\n")
    lines.append(b"\r\n")
    if head is None or head.method != b"HEAD":
        lines.append(body)
    return b"".join(lines)
