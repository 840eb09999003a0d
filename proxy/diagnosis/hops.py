"""Diagnosis beyond the next hop: who, behind the origin, made an error response, and
which statuses are mis-blamed.

Rules:
1. Pure functions over evidence the forwarder collected (the origin's raw response head,
   the first bytes of its body, the request's content type and first body bytes); no I/O.
2. Runs only for origin responses with status >= 400, so a healthy exchange pays nothing.
3. The intermediary behind the origin is named from, in this order: a `Proxy-Status`
   member of the origin's response that carries an `error` (RFC 9209: that intermediary
   made the response), then the first entry of `SIGNATURES` that matches. `SIGNATURES` is
   data: every entry names a fixed hop (so `hop` is a bounded metrics label, except for a
   Proxy-Status name, which the metrics collector caps) and every entry has a sample in
   tests/test_diagnosis.py.
4. A signature needs evidence that the product *made* the response, not merely that it
   forwarded it: most products put their `Server` header on what they proxy too, so a
   header alone counts only where the product sets it on its own responses exclusively
   (`Server: awselb/2.0`, `cf-error-type`, `X-Kong-Response-Latency`, ...).
5. A hint is a token for a verdict a human should read (`HINT_TEXT` says it in words):
   `fault_behind_origin` for an origin's own 502/504 or any 5xx made by a recognised hop,
   `origin_5xx_for_client_error` for a 5xx answered to a request body the proxy can tell is
   not JSON although it says it is; `proxy_loop_stalled` for a timeout the proxy charged to
   itself because its event loop was stalled over the deadline (`proxy.diagnosis.stalls`).
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson

BODY_SAMPLE_BYTES = 8192  # how much of an error body is kept to recognise its author
REQUEST_SAMPLE_BYTES = 65536  # how much of a JSON request body is kept to judge it

FAULT_BEHIND_ORIGIN = "fault_behind_origin"
ORIGIN_5XX_FOR_CLIENT_ERROR = "origin_5xx_for_client_error"
PROXY_LOOP_STALLED = "proxy_loop_stalled"

# What each hint means, for the terminal and the dashboard.
HINT_TEXT = {
    FAULT_BEHIND_ORIGIN: "the failure lies behind the origin — check what it forwards to or "
    "depends on",
    ORIGIN_5XX_FOR_CLIENT_ERROR: "the request body is not valid JSON — the origin should answer "
    "400/422, not a 5xx",
    PROXY_LOOP_STALLED: "the proxy's event loop stalled over the deadline, not the peer — "
    "check its CPU throttling, loop_lag_ms and gc_ms",
}

_DECOMPRESSED_MAX = 65536  # an error page is small; never inflate more than this
_HOP_NAME_MAX = 48


@dataclass(slots=True)
class Evidence:
    """What the forwarder kept of an origin error response (and of its request)."""

    status: int
    head: bytes  # the origin's status line and header lines, raw
    body: bytearray = field(default_factory=bytearray)  # up to BODY_SAMPLE_BYTES
    request_content_type: bytes | None = None
    request_body: bytes | None = None  # up to REQUEST_SAMPLE_BYTES, JSON requests only


# -- the signature table -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Signature:
    """One recognisable way a product makes its own error response.

    Every condition given must hold: `statuses` contains the status; each `headers` entry
    (lower-case name, pattern) fullmatches one value of that header (case-insensitive);
    no header of `absent` is present; `reason` fullmatches the status line's reason
    phrase; one of the strings of `body_has` is in the (decoded) body sample; `body` is
    found in it; the body is exactly one of `body_is`. (Plain strings first, as a cheap
    filter: a search through 8 KiB of an application's own 404 page must stay cheap.)
    """

    name: str  # unique: what the tests key their samples by
    hop: str  # what Exchange.hop says (a fixed, bounded name)
    statuses: frozenset[int] | None = None
    headers: tuple[tuple[str, re.Pattern[str]], ...] = ()
    absent: tuple[str, ...] = ()
    reason: re.Pattern[str] | None = None
    body: re.Pattern[str] | None = None
    body_has: tuple[str, ...] = ()
    body_is: frozenset[str] | None = None


def _h(name: str, pattern: str = r".*") -> tuple[str, re.Pattern[str]]:
    return name, re.compile(pattern, re.I | re.S)


def _re(pattern: str, flags: int = 0) -> re.Pattern[str]:
    return re.compile(pattern, flags)


_GATEWAY = frozenset({502, 503, 504})

# hop -> the product's name, for humans
HOP_NAMES_MAX = 16  # distinct Proxy-Status names given a metric label value of their own
HOP_OTHER = "other"

HOPS: dict[str, str] = {
    "envoy": "Envoy",
    "nginx": "nginx",
    "haproxy": "HAProxy",
    "apache": "Apache httpd",
    "varnish": "Varnish",
    "google-frontend": "Google Front End",
    "cloudfront": "Amazon CloudFront",
    "cloudflare": "Cloudflare",
    "akamai": "Akamai",
    "kong": "Kong",
    "aws-alb": "AWS ALB",
    "traefik": "Traefik",
    "caddy": "Caddy",
}

SIGNATURES: tuple[Signature, ...] = (
    # Envoy's local replies (also Istio, Contour, Emissary, Gloo...). A response Envoy only
    # forwarded carries x-envoy-upstream-service-time; one it made itself does not.
    Signature(
        "envoy-local-reply",
        "envoy",
        body=_re(
            r"\A\s*(?:upstream connect error or disconnect/reset before headers"
            r"|no healthy upstream|upstream request timeout|upstream max stream duration reached"
            r"|upstream_reset_before_response_started|local_rate_limited|RBAC: access denied)"
        ),
        absent=("x-envoy-upstream-service-time",),
    ),
    Signature(
        "envoy-overloaded",
        "envoy",
        headers=(_h("x-envoy-overloaded"),),
        absent=("x-envoy-upstream-service-time",),
    ),
    # nginx's built-in error pages (and OpenResty's, which is nginx): the last line names it.
    Signature(
        "nginx-error-page",
        "nginx",
        body_has=("<hr><center>nginx", "<hr><center>openresty"),
        body=_re(r"<hr><center>(?:nginx|openresty)(?:/[\w.]+)?</center>"),
    ),
    # HAProxy's built-in error files: no <head>, the status as <h1>, one fixed sentence.
    Signature(
        "haproxy-error-page",
        "haproxy",
        body_has=("<html><body><h1>",),
        body=_re(
            r"<html><body><h1>\d{3} [^<]*</h1>\s*(?:No server is available to handle this "
            r"request|The server returned an invalid or incomplete response|The server "
            r"didn't respond in time|An internal server error occurred|Request forbidden by "
            r"administrative rules|Your browser sent an invalid request|Your browser didn't "
            r"send a complete request in time|You have sent too many requests)"
        ),
    ),
    # Apache httpd (mod_proxy included): HTML 2.0 error documents.
    Signature(
        "apache-error-page",
        "apache",
        body_has=('"-//IETF//DTD HTML 2.0//EN">',),
        body=_re(
            r'<!DOCTYPE HTML PUBLIC "-//IETF//DTD HTML 2\.0//EN">\s*<html><head>\s*'
            r"<title>\d{3} [^<]*</title>"
        ),
    ),
    # Varnish's synthetic responses (builtin.vcl).
    Signature(
        "varnish-guru-meditation",
        "varnish",
        body_has=("Guru Meditation:", "Guru meditation:", "<p>Varnish cache server</p>"),
    ),
    Signature(
        "varnish-backend-fetch-failed",
        "varnish",
        headers=(_h("x-varnish"),),
        reason=_re(r"Backend fetch failed", re.I),
    ),
    # Google's front end (Google Cloud load balancers, App Engine, Cloud Run, ...).
    Signature(
        "google-error-page",
        "google-frontend",
        body_has=(")!!1</title>", "<ins>That\u2019s an error.</ins>"),
    ),
    Signature(
        "cloudfront-error-page",
        "cloudfront",
        body_has=("Generated by cloudfront (CloudFront)",),
    ),
    # Cloudflare: its error headers, its 52x codes, its error pages.
    Signature("cloudflare-error-header", "cloudflare", headers=(_h("cf-error-type"),)),
    Signature(
        "cloudflare-52x",
        "cloudflare",
        statuses=frozenset(range(520, 531)),
        headers=(_h("server", r"cloudflare"),),
    ),
    Signature(
        "cloudflare-error-page",
        "cloudflare",
        body_has=('id="cf-error-details"', "<hr><center>cloudflare</center>"),
    ),
    Signature(
        "akamai-error-page",
        "akamai",
        body_has=("Reference&#32;&#35;",),
        body=_re(r"Reference&#32;&#35;[0-9a-f]+(?:&#46;[0-9a-f]+)+"),
    ),
    # Kong marks what it generated itself (Via marks what it proxied).
    Signature("kong-response-latency", "kong", headers=(_h("x-kong-response-latency"),)),
    Signature("kong-server", "kong", headers=(_h("server", r"kong/[\w.]+"),)),
    # AWS ALB and ELB pass the target's headers on; `Server: awselb` is only on their own.
    Signature("aws-elb-server", "aws-alb", headers=(_h("server", r"awselb(?:/[\w.]+)?"),)),
    # Traefik: Go's net/http answers, the bare status text, no Server header.
    Signature(
        "traefik-no-available-server",
        "traefik",
        statuses=frozenset({503}),
        body_is=frozenset({"no available server\n"}),
        headers=(_h("x-content-type-options", "nosniff"),),
    ),
    Signature(
        "traefik-status-text",
        "traefik",
        statuses=frozenset({500, 502, 504}),
        body_is=frozenset({"Internal Server Error", "Bad Gateway", "Gateway Timeout"}),
        headers=(_h("content-type", r"text/plain; charset=utf-8"),),
        absent=("server",),
    ),
    # Caddy: `Server: Caddy` on everything, an empty body on its own proxy errors.
    Signature(
        "caddy-empty-gateway-error",
        "caddy",
        statuses=_GATEWAY,
        headers=(_h("server", "Caddy"), _h("content-length", "0")),
        body_is=frozenset({""}),
    ),
)

assert len({s.name for s in SIGNATURES}) == len(SIGNATURES), "signature names must be unique"
assert {s.hop for s in SIGNATURES} == set(HOPS), "every hop has a product name"


# -- reading the evidence ----------------------------------------------------------------------


@dataclass(slots=True)
class OriginResponse:
    """The origin's error response as the signatures see it."""

    status: int
    reason: str
    headers: dict[str, list[str]]  # lower-case name -> values in order
    text: str | None  # the body sample, decoded; None when it cannot be read (compressed)

    @classmethod
    def parse(cls, status: int, head: bytes, body: bytes | bytearray) -> OriginResponse:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        reason = parts[2].decode("latin-1").strip() if len(parts) > 2 else ""
        headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if sep and name:
                key = name.strip().lower().decode("latin-1")
                headers.setdefault(key, []).append(value.strip().decode("latin-1"))
        text = _body_text(bytes(body), headers.get("content-encoding", ()))
        return cls(status, reason, headers, text)


def _body_text(body: bytes, encodings: Sequence[str]) -> str | None:
    coding = ",".join(encodings).strip().lower()
    if coding and coding != "identity":
        body = _decompress(body, coding)  # type: ignore[assignment]
        if body is None:
            return None
    return body.decode("utf-8", "replace")


def _decompress(body: bytes, coding: str) -> bytes | None:
    """The start of a gzip or deflate body (the sample may be cut: that is fine)."""
    attempts: tuple[int, ...]
    if coding in ("gzip", "x-gzip"):
        attempts = (zlib.MAX_WBITS | 16,)
    elif coding == "deflate":
        attempts = (zlib.MAX_WBITS, -zlib.MAX_WBITS)  # zlib-wrapped, or raw as some send it
    else:
        return None  # br, zstd, stacked codings: the headers alone must do
    for wbits in attempts:
        try:
            return zlib.decompressobj(wbits).decompress(body, _DECOMPRESSED_MAX)
        except zlib.error:
            continue
    return None


def _matches(sig: Signature, r: OriginResponse) -> bool:
    if sig.statuses is not None and r.status not in sig.statuses:
        return False
    for name, pattern in sig.headers:
        if not any(pattern.fullmatch(value) for value in r.headers.get(name, ())):
            return False
    if any(name in r.headers for name in sig.absent):
        return False
    if sig.reason is not None and not sig.reason.fullmatch(r.reason):
        return False
    if sig.body_has and (r.text is None or not any(s in r.text for s in sig.body_has)):
        return False
    if sig.body is not None and (r.text is None or not sig.body.search(r.text)):
        return False
    return sig.body_is is None or r.text in sig.body_is


def recognise(r: OriginResponse) -> Signature | None:
    """The first signature the response matches."""
    for sig in SIGNATURES:
        if _matches(sig, r):
            return sig
    return None


# -- Proxy-Status (RFC 9209) -----------------------------------------------------------------------

_MEMBER_NAME = re.compile(r'\s*(?:"((?:[^"\\]|\\.)*)"|([A-Za-z*][\w:/!#$%&\'*+.^`|~-]*))')
_PARAM = re.compile(r'\s*;\s*([a-z*][a-z0-9_.*-]*)(?:=(?:"(?:[^"\\]|\\.)*"|[^;,\s]*))?')
_HOP_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def proxy_status_author(values: Sequence[str]) -> str | None:
    """The name of the intermediary that made the response, from the origin's own
    Proxy-Status members: the last (closest to us) member carrying an `error` parameter.
    Members that only relayed the response (`received-status`) made nothing."""
    author = None
    for value in values:
        pos = 0
        while pos < len(value):
            m = _MEMBER_NAME.match(value, pos)
            if m is None:
                break  # not a structured-field list we can read: stop, keep what we have
            name = m.group(1) if m.group(1) is not None else m.group(2)
            pos = m.end()
            params = set()
            while (p := _PARAM.match(value, pos)) is not None:
                params.add(p.group(1))
                pos = p.end()
            if "error" in params:
                safe = _safe_hop_name(name)
                if safe:
                    author = safe
            rest = value.find(",", pos)
            if rest < 0:
                break
            pos = rest + 1
    return author


def _safe_hop_name(name: str) -> str:
    """A name fit for a log line, a terminal and a metrics label: [A-Za-z0-9._-], short."""
    return _HOP_UNSAFE.sub("-", name).strip("-")[:_HOP_NAME_MAX]


# -- the mis-blamed 5xx --------------------------------------------------------------------------

# One JSON document: application/json, text/json, or a structured +json type (RFC 6839).
# Not application/x-ndjson, json-seq and the like: several documents in one body.
_JSON_MEDIA = re.compile(rb"\s*(?:application/json|text/json|[\w!#$&^.-]+/[\w!#$&^.-]+\+json)\s*")
# gzip, zstd and zlib: a JSON body never starts with these bytes.
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"\x28\xb5\x2f\xfd", b"\x78\x01", b"\x78\x5e", b"\x78\x9c")


def is_invalid_json_request(content_type: bytes | None, body: bytes | None) -> bool:
    """True when the request says it is JSON and its (whole) body is not JSON.

    Undecidable cases are False: no or empty body, a body longer than the sample, a
    charset other than UTF-8, a body that looks compressed, a media type that is JSON
    lines or a JSON sequence (several values) rather than one JSON document.
    """
    if content_type is None or not body or len(body) >= REQUEST_SAMPLE_BYTES:
        return False
    media, _, params = content_type.lower().partition(b";")
    if _JSON_MEDIA.fullmatch(media) is None:
        return False
    charset = re.search(rb"charset\s*=\s*\"?([\w-]+)", params)
    if charset is not None and charset.group(1) not in (b"utf-8", b"utf8"):
        return False
    if body.startswith(b"\xef\xbb\xbf"):
        body = body[3:]  # RFC 8259 §8.1: a parser may ignore a byte order mark
    if not body.strip() or body.startswith(_COMPRESSED_MAGIC):
        return False
    try:
        orjson.loads(body)
        return False
    except orjson.JSONDecodeError:
        pass
    # orjson refuses what is valid but unusual (nesting deeper than 1024 levels): ask again.
    try:
        json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except RecursionError:
        return False  # too deep for either parser: undecidable
    except ValueError:
        return True
    return False


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


# -- the verdict -----------------------------------------------------------------------------------


def diagnose(evidence: Evidence) -> tuple[str | None, tuple[str, ...]]:
    """(hop, hints) for an origin error response."""
    status = evidence.status
    response = OriginResponse.parse(status, evidence.head, evidence.body)
    hop = None
    proxy_status = response.headers.get("proxy-status")
    if proxy_status:
        hop = proxy_status_author(proxy_status)
    if hop is None:
        sig = recognise(response)
        if sig is not None:
            hop = sig.hop
    hints: list[str] = []
    if status in (502, 504) or (hop is not None and status >= 500):
        hints.append(FAULT_BEHIND_ORIGIN)
    if (
        status >= 500
        and hop is None
        and is_invalid_json_request(evidence.request_content_type, evidence.request_body)
    ):
        hints.append(ORIGIN_5XX_FOR_CLIENT_ERROR)
    return hop, tuple(hints)


def hop_product(hop: str) -> str:
    """The hop in words: the product's name, or the Proxy-Status member name as given."""
    return HOPS.get(hop, hop)
