"""Responses the proxy makes itself: RFC 9457 problem+json, or an HTML page for browsers.

Rule: a proxy-made body says what failed, at which hop, and what to check first (all from
the taxonomy row), plus the request id and upstream; never a stack trace, a file path or
a secret. Every value comes from the taxonomy, the exchange's own sanitised facts, or the
configuration. What a reply is made of is decided here; how it is framed is the codec's.
"""

from __future__ import annotations

import html
from http import HTTPStatus
from importlib.resources import files
from string import Template

import orjson

from ..diagnosis.faults import FaultInfo

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


def problem_document(row: FaultInfo, request_id: str, detail: str | None, upstream: str) -> dict:
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
        "request_id": request_id,
        "upstream": upstream,
    }


# The HTML page for browsers (package data): `$name` placeholders, every value escaped.
_PAGE = Template(files(__package__).joinpath("page.html").read_text(encoding="utf-8"))


def html_page(doc: dict, proxy_name: str) -> bytes:
    values = {key: html.escape(str(value)) for key, value in doc.items()}
    return _PAGE.substitute(values, proxy_name=html.escape(proxy_name)).encode()


def prefers_html(accept: bytes | None) -> bool:
    """True when the client asks for HTML before any JSON type (a browser, typically)."""
    if not accept:
        return False
    accept = accept.lower()
    html = accept.find(b"text/html")
    if html < 0:
        return False
    json = accept.find(b"json")
    return json < 0 or html < json


def body(
    row: FaultInfo,
    request_id: str,
    detail: str | None,
    upstream: str,
    proxy_name: str,
    accept: bytes | None,
) -> tuple[bytes, bytes]:
    """The body of a proxy-made reply and its content type: the HTML page for a client
    that prefers HTML (`accept`: its Accept field), else the problem document."""
    doc = problem_document(row, request_id, detail, upstream)
    if prefers_html(accept):
        return html_page(doc, proxy_name), b"text/html; charset=utf-8"
    return orjson.dumps(doc), b"application/problem+json"
