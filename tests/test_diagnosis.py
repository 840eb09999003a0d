"""Diagnosis beyond the next hop: every signature recognises its product's real error
response (samples written after each product's actual pages and headers), nothing is
blamed on a product that only forwarded the response, Proxy-Status members name their
author, and the mis-blamed 5xx hints; then end to end through the proxy (log, /stats,
/metrics, headers)."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import time
import zlib
from dataclasses import dataclass

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.diagnosis.faults import Fault
from proxy.diagnosis.hops import (
    FAULT_BEHIND_ORIGIN,
    HINT_TEXT,
    HOP_NAMES_MAX,
    HOP_OTHER,
    HOPS,
    ORIGIN_5XX_FOR_CLIENT_ERROR,
    PROXY_LOOP_STALLED,
    SIGNATURES,
    Evidence,
    OriginResponse,
    diagnose,
    hop_product,
    is_invalid_json_request,
    proxy_status_author,
    recognise,
)
from proxy.diagnosis.record import Exchange
from proxy.telemetry.stats import Stats

from support import OriginConnection, ScriptedOrigin, proxy_status_members, spawn_proxy

DATE = "Date: Sat, 21 Nov 2026 10:15:02 GMT"


@dataclass(frozen=True)
class Sample:
    """One origin response as raw bytes: what the forwarder hands to `diagnose`."""

    head: bytes
    body: bytes = b""

    @property
    def status(self) -> int:
        return int(self.head.split(b" ", 2)[1])

    def evidence(self, **request: bytes | None) -> Evidence:
        return Evidence(self.status, self.head, bytearray(self.body), **request)  # type: ignore[arg-type]

    def wire(self) -> bytes:
        return self.head + b"\r\n" + self.body


def sample(status_line: str, headers: list[str], body: bytes | str = b"") -> Sample:
    data = body.encode() if isinstance(body, str) else body
    lines = [status_line, *headers]
    if not any(h.lower().startswith(("content-length:", "transfer-encoding:")) for h in headers):
        lines.append(f"Content-Length: {len(data)}")
    return Sample(("\r\n".join(lines) + "\r\n").encode("latin-1"), data)


def crlf(text: str) -> str:
    return text.replace("\n", "\r\n")


# -- the products' own error responses ------------------------------------------------------------

NGINX_502_PAGE = crlf(
    "<html>\n<head><title>502 Bad Gateway</title></head>\n<body>\n"
    "<center><h1>502 Bad Gateway</h1></center>\n<hr><center>nginx/1.25.3</center>\n"
    "</body>\n</html>\n"
)
NGINX_PADDING = crlf("<!-- a padding to disable MSIE and Chrome friendly error page -->\n" * 6)


def nginx_page(code: str, server_line: str = "nginx") -> str:
    return crlf(
        f"<html>\n<head><title>{code}</title></head>\n<body>\n<center><h1>{code}</h1></center>\n"
        f"<hr><center>{server_line}</center>\n</body>\n</html>\n"
    )


HAPROXY_PAGE = "<html><body><h1>{code}</h1>\n{sentence}\n</body></html>\n"

APACHE_PROXY_ERROR = """<!DOCTYPE HTML PUBLIC "-//IETF//DTD HTML 2.0//EN">
<html><head>
<title>502 Proxy Error</title>
</head><body>
<h1>Proxy Error</h1>
<p>The proxy server received an invalid
response from an upstream server.<br />
The proxy server could not handle the request<p>Reason: <strong>Error reading from remote \
server</strong></p></p>
<hr>
<address>Apache/2.4.57 (Debian) Server at shop.example.com Port 80</address>
</body></html>
"""

APACHE_503 = """<!DOCTYPE HTML PUBLIC "-//IETF//DTD HTML 2.0//EN">
<html><head>
<title>503 Service Unavailable</title>
</head><body>
<h1>Service Unavailable</h1>
<p>The server is temporarily unable to service your
request due to maintenance downtime or capacity
problems. Please try again later.</p>
</body></html>
"""

VARNISH_503 = """<!DOCTYPE html>
<html>
  <head>
    <title>503 Backend fetch failed</title>
  </head>
  <body>
    <h1>Error 503 Backend fetch failed</h1>
    <p>Backend fetch failed</p>
    <h3>Guru Meditation:</h3>
    <p>XID: 10389692</p>
    <hr>
    <p>Varnish cache server</p>
  </body>
</html>
"""

GOOGLE_502 = """<!DOCTYPE html>
<html lang=en>
  <meta charset=utf-8>
  <meta name=viewport content="initial-scale=1, minimum-scale=1, width=device-width">
  <title>Error 502 (Server Error)!!1</title>
  <style>
    *{margin:0;padding:0}html,code{font:15px/22px arial,sans-serif}
  </style>
  <a href=//www.google.com/><span id=logo aria-label=Google></span></a>
  <p><b>502.</b> <ins>That\u2019s an error.</ins>
  <p>The server encountered a temporary error and could not complete your request.\
<p>Please try again in 30 seconds.  <ins>That\u2019s all we know.</ins>
"""

CLOUDFRONT_502 = """<!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 4.01 Transitional//EN" \
"http://www.w3.org/TR/html4/loose.dtd">
<HTML><HEAD><META HTTP-EQUIV="Content-Type" CONTENT="text/html; charset=iso-8859-1">
<TITLE>ERROR: The request could not be satisfied</TITLE>
</HEAD><BODY>
<H1>502 ERROR</H1>
<H2>The request could not be satisfied.</H2>
<HR noshade size="1px">
CloudFront wasn't able to connect to the origin.
<BR clear="all">
<HR noshade size="1px">
<PRE>
Generated by cloudfront (CloudFront)
Request ID: 3xT8m0Qm2fJ1Yk9s7rZ0bC4dE5fG6hI7jK8lM9nO0pQ1rS2tU3vW4x==
</PRE>
<ADDRESS>
</ADDRESS>
</BODY></HTML>"""

CLOUDFLARE_1102 = """<!DOCTYPE html>
<html class="no-js" lang="en-US">
<head><title>Worker exceeded resource limits | shop.example.com | Cloudflare</title></head>
<body>
<div id="cf-wrapper">
<div id="cf-error-details" class="cf-error-details-wrapper">
<h1><span class="cf-error-type">Error</span> <span class="cf-error-code">1102</span></h1>
<h2 class="cf-subheadline">Worker exceeded resource limits</h2>
</div>
</div>
</body>
</html>
"""

CLOUDFLARE_400_COOKIES = crlf(
    "<html>\n<head><title>400 Request Header Or Cookie Too Large</title></head>\n<body>\n"
    "<center><h1>400 Bad Request</h1></center>\n"
    "<center>Request Header Or Cookie Too Large</center>\n"
    "<hr><center>cloudflare</center>\n</body>\n</html>\n"
)

AKAMAI_503 = """<HTML><HEAD><TITLE>Error</TITLE></HEAD><BODY>
An error occurred while processing your request.<p>
Reference&#32;&#35;97&#46;8a3c1002&#46;1763720102&#46;1b2c3d4e
<P>https&#58;&#47;&#47;errors&#46;edgesuite&#46;net&#47;97&#46;8a3c1002&#46;1763720102&#46;1b2c3d4e</P>
</BODY></HTML>
"""

ALB_502 = crlf(
    "<html>\n<head><title>502 Bad Gateway</title></head>\n<body>\n"
    "<center><h1>502 Bad Gateway</h1></center>\n</body>\n</html>\n"
)
ALB_503 = (
    "<html>\n<head><title>503 Service Temporarily Unavailable</title></head>\n<body>\n"
    "<center><h1>503 Service Temporarily Unavailable</h1></center>\n</body>\n</html>\n"
)

ENVOY_UF = (
    "upstream connect error or disconnect/reset before headers. reset reason: connection failure"
)
ISTIO_UF = (
    "upstream connect error or disconnect/reset before headers. retried and the latest reset "
    "reason: remote connection failure, transport failure reason: delayed connect error: 111"
)

# Signature name -> real-looking responses that only that signature recognises.
SAMPLES: dict[str, list[Sample]] = {
    "envoy-local-reply": [
        sample(
            "HTTP/1.1 503 Service Unavailable",
            ["content-type: text/plain", DATE, "server: envoy"],
            ENVOY_UF,
        ),
        sample(
            "HTTP/1.1 503 Service Unavailable",
            ["content-type: text/plain", DATE, "server: istio-envoy"],
            ISTIO_UF,
        ),
        sample(
            "HTTP/1.1 503 Service Unavailable",
            ["content-type: text/plain", DATE, "server: envoy"],
            "no healthy upstream",
        ),
        sample(
            "HTTP/1.1 504 Gateway Timeout",
            ["content-type: text/plain", DATE, "server: envoy"],
            "upstream request timeout",
        ),
        sample(
            "HTTP/1.1 429 Too Many Requests",
            ["content-type: text/plain", "x-ratelimit-limit: 10", DATE, "server: envoy"],
            "local_rate_limited",
        ),
    ],
    "envoy-overloaded": [
        sample(
            "HTTP/1.1 503 Service Unavailable",
            ["x-envoy-overloaded: true", "content-type: text/plain", DATE, "server: envoy"],
            "envoy overloaded",
        ),
    ],
    "nginx-error-page": [
        sample(
            "HTTP/1.1 502 Bad Gateway",
            ["Server: nginx/1.25.3", DATE, "Content-Type: text/html", "Connection: keep-alive"],
            NGINX_502_PAGE + NGINX_PADDING,
        ),
        sample(
            "HTTP/1.1 504 Gateway Time-out",
            ["Server: nginx", DATE, "Content-Type: text/html"],
            nginx_page("504 Gateway Time-out") + NGINX_PADDING,
        ),
        sample(  # ingress-nginx with no ready endpoint
            "HTTP/1.1 503 Service Temporarily Unavailable",
            [DATE, "Content-Type: text/html", "Connection: keep-alive"],
            nginx_page("503 Service Temporarily Unavailable", "nginx") + NGINX_PADDING,
        ),
        sample(
            "HTTP/1.1 500 Internal Server Error",
            ["Server: openresty/1.21.4.1", DATE, "Content-Type: text/html"],
            nginx_page("500 Internal Server Error", "openresty/1.21.4.1"),
        ),
        sample(  # gzip on, and the client accepted gzip
            "HTTP/1.1 502 Bad Gateway",
            ["Server: nginx", DATE, "Content-Type: text/html", "Content-Encoding: gzip"],
            gzip.compress(NGINX_502_PAGE.encode()),
        ),
        sample(  # a client-side refusal made by nginx: named, but no fault behind the origin
            "HTTP/1.1 413 Request Entity Too Large",
            ["Server: nginx", DATE, "Content-Type: text/html", "Connection: close"],
            nginx_page("413 Request Entity Too Large"),
        ),
    ],
    "haproxy-error-page": [
        sample(
            "HTTP/1.1 503 Service Unavailable",
            ["content-length: 107", "cache-control: no-cache", "content-type: text/html"],
            HAPROXY_PAGE.format(
                code="503 Service Unavailable",
                sentence="No server is available to handle this request.",
            ),
        ),
        sample(
            "HTTP/1.0 504 Gateway Time-out",
            ["Cache-Control: no-cache", "Connection: close", "Content-Type: text/html"],
            HAPROXY_PAGE.format(
                code="504 Gateway Time-out", sentence="The server didn't respond in time."
            ),
        ),
        sample(
            "HTTP/1.1 502 Bad Gateway",
            ["cache-control: no-cache", "content-type: text/html"],
            HAPROXY_PAGE.format(
                code="502 Bad Gateway",
                sentence="The server returned an invalid or incomplete response.",
            ),
        ),
    ],
    "apache-error-page": [
        sample(
            "HTTP/1.1 502 Proxy Error",
            [DATE, "Server: Apache/2.4.57 (Debian)", "Content-Type: text/html; charset=iso-8859-1"],
            APACHE_PROXY_ERROR,
        ),
        sample(
            "HTTP/1.1 503 Service Unavailable",
            [DATE, "Server: Apache", "Content-Type: text/html; charset=iso-8859-1"],
            APACHE_503,
        ),
    ],
    "varnish-guru-meditation": [
        sample(
            "HTTP/1.1 503 Backend fetch failed",
            [
                DATE,
                "Server: Varnish",
                "Content-Type: text/html; charset=utf-8",
                "Retry-After: 5",
                "X-Varnish: 10389691",
                "Age: 0",
                "Via: 1.1 varnish (Varnish/6.2)",
                "Connection: close",
            ],
            VARNISH_503,
        ),
    ],
    "varnish-backend-fetch-failed": [
        sample(  # a site's own synthetic page, but Varnish's status line and headers
            "HTTP/1.1 503 Backend fetch failed",
            [DATE, "Content-Type: text/html", "X-Varnish: 32770", "Via: 1.1 varnish (Varnish/7.4)"],
            "<h1>We'll be right back</h1>",
        ),
    ],
    "google-error-page": [
        sample(
            "HTTP/1.1 502 Bad Gateway",
            ["Content-Type: text/html; charset=UTF-8", "Referrer-Policy: no-referrer", DATE],
            GOOGLE_502.encode(),
        ),
    ],
    "cloudfront-error-page": [
        sample(
            "HTTP/1.1 502 Bad Gateway",
            [
                "Server: CloudFront",
                DATE,
                "Content-Type: text/html",
                "Connection: keep-alive",
                "X-Cache: Error from cloudfront",
                "Via: 1.1 9f2a1c0e8b7d6a5f4e3d2c1b0a998877.cloudfront.net (CloudFront)",
                "X-Amz-Cf-Pop: FRA56-P1",
            ],
            CLOUDFRONT_502,
        ),
    ],
    "cloudflare-error-header": [
        sample(
            "HTTP/1.1 503 Service Unavailable",
            [
                DATE,
                "Content-Type: text/html; charset=UTF-8",
                "cf-error-type: 1102",
                "Server: cloudflare",
                "CF-RAY: 8f1c2a3b4d5e6f70-FRA",
            ],
            CLOUDFLARE_1102,
        ),
    ],
    "cloudflare-52x": [
        sample(  # what Cloudflare sends a non-browser client
            "HTTP/1.1 524 A Timeout Occurred",
            [DATE, "Content-Type: text/plain; charset=UTF-8", "Server: cloudflare"],
            "error code: 524",
        ),
        sample(
            "HTTP/1.1 521 Origin Down",
            [DATE, "Content-Type: text/html", "Server: cloudflare", "CF-RAY: 8f1c-AMS"],
            '<div id="cf-error-details"><h1>Web server is down</h1></div>',
        ),
    ],
    "cloudflare-error-page": [
        sample(
            "HTTP/1.1 400 Bad Request",
            [DATE, "Content-Type: text/html", "Connection: close", "Server: cloudflare"],
            CLOUDFLARE_400_COOKIES,
        ),
    ],
    "akamai-error-page": [
        sample(
            "HTTP/1.1 503 Service Unavailable",
            ["Server: AkamaiGHost", "Mime-Version: 1.0", "Content-Type: text/html", DATE],
            AKAMAI_503,
        ),
    ],
    "kong-response-latency": [
        sample(
            "HTTP/1.1 502 Bad Gateway",
            [
                DATE,
                "Content-Type: application/json; charset=utf-8",
                "X-Kong-Response-Latency: 2",
                "Server: kong/3.4.2",
            ],
            '{\n  "message":"An invalid response was received from the upstream server"\n}',
        ),
    ],
    "kong-server": [
        sample(
            "HTTP/1.1 503 Service Unavailable",
            [DATE, "Content-Type: application/json; charset=utf-8", "Server: kong/2.8.1"],
            '{"message":"failure to get a peer from the ring-balancer"}',
        ),
    ],
    "aws-elb-server": [
        sample(
            "HTTP/1.1 502 Bad Gateway",
            ["Server: awselb/2.0", DATE, "Content-Type: text/html"],
            ALB_502,
        ),
        sample(
            "HTTP/1.1 503 Service Temporarily Unavailable",
            ["Server: awselb/2.0", DATE, "Content-Type: text/html", "Connection: keep-alive"],
            ALB_503,
        ),
    ],
    "traefik-no-available-server": [
        sample(
            "HTTP/1.1 503 Service Unavailable",
            ["Content-Type: text/plain; charset=utf-8", "X-Content-Type-Options: nosniff", DATE],
            "no available server\n",
        ),
    ],
    "traefik-status-text": [
        sample(
            "HTTP/1.1 502 Bad Gateway",
            [DATE, "Content-Type: text/plain; charset=utf-8"],
            "Bad Gateway",
        ),
        sample(
            "HTTP/1.1 504 Gateway Timeout",
            [DATE, "Content-Type: text/plain; charset=utf-8"],
            "Gateway Timeout",
        ),
    ],
    "caddy-empty-gateway-error": [
        sample("HTTP/1.1 502 Bad Gateway", ["Server: Caddy", DATE]),
    ],
}

# Every alternative of every signature, and each end of a status range: a signature that
# lost one of its phrases or statuses must fail a sample of its own.
ENVOY_PHRASES = [
    "upstream max stream duration reached",
    "upstream_reset_before_response_started{connection_termination}",
    "RBAC: access denied",
]
HAPROXY_SENTENCES = [
    ("500 Internal Server Error", "An internal server error occurred."),
    ("403 Forbidden", "Request forbidden by administrative rules."),
    ("400 Bad request", "Your browser sent an invalid request."),
    ("408 Request Time-out", "Your browser didn't send a complete request in time."),
    ("429 Too Many Requests", "You have sent too many requests in a given amount of time."),
]
SAMPLES["envoy-local-reply"] += [
    sample("HTTP/1.1 503 Service Unavailable", ["content-type: text/plain", "server: envoy"], text)
    for text in ENVOY_PHRASES
]
SAMPLES["haproxy-error-page"] += [
    sample(
        f"HTTP/1.1 {code}",
        ["cache-control: no-cache", "content-type: text/html"],
        HAPROXY_PAGE.format(code=code, sentence=sentence),
    )
    for code, sentence in HAPROXY_SENTENCES
]
SAMPLES["varnish-guru-meditation"] += [
    sample(  # Varnish 3's wording, no footer
        "HTTP/1.1 503 Service Unavailable",
        [DATE, "Server: Varnish", "Content-Type: text/html; charset=utf-8", "X-Varnish: 77"],
        "<html><body><h1>Error 503 Service Unavailable</h1>\n<h3>Guru meditation:</h3>\n"
        "<p>XID: 1234</p></body></html>",
    ),
    sample(  # the footer alone
        "HTTP/1.1 503 Service Unavailable",
        [DATE, "Content-Type: text/html; charset=utf-8", "X-Varnish: 78"],
        "<html><body><h1>Error 503</h1>\n<hr>\n<p>Varnish cache server</p></body></html>",
    ),
]
SAMPLES["apache-error-page"] += [
    sample(  # ISO-8859-1, as Apache declares it: a byte that is not UTF-8 must not stop it
        "HTTP/1.1 503 Service Unavailable",
        [DATE, "Server: Apache", "Content-Type: text/html; charset=iso-8859-1"],
        APACHE_503.replace("maintenance", "maintenance (r\u00e9seau)").encode("latin-1"),
    ),
]
SAMPLES["nginx-error-page"] += [
    sample(  # the old name of gzip (RFC 9110 §8.4.1.3)
        "HTTP/1.1 502 Bad Gateway",
        ["Server: nginx", "Content-Type: text/html", "Content-Encoding: x-gzip"],
        gzip.compress(NGINX_502_PAGE.encode(), mtime=0),
    ),
]
SAMPLES["varnish-guru-meditation"] += [
    sample(  # a site's own synthetic template that kept the Guru Meditation line only
        "HTTP/1.1 503 Service Unavailable",
        [DATE, "Content-Type: text/html; charset=utf-8", "X-Varnish: 79"],
        "<html><body><h1>Down for a moment</h1><h3>Guru Meditation:</h3><p>XID: 5</p>",
    ),
]
SAMPLES["nginx-error-page"] += [
    sample(  # identity is no coding at all
        "HTTP/1.1 502 Bad Gateway",
        ["Server: nginx", "Content-Type: text/html", "Content-Encoding: identity"],
        NGINX_502_PAGE,
    ),
]
SAMPLES["google-error-page"] += [
    sample(
        "HTTP/1.1 503 Service Unavailable",
        ["Content-Type: text/html; charset=UTF-8"],
        "<!DOCTYPE html><title>Error 503 (Service Unavailable)!!1</title><p>Unavailable.",
    ),
    sample(
        "HTTP/1.1 500 Internal Server Error",
        ["Content-Type: text/html; charset=UTF-8"],
        "<p><b>500.</b> <ins>That\u2019s an error.</ins>",
    ),
]
SAMPLES["cloudflare-52x"] += [
    sample(
        f"HTTP/1.1 {code} {reason}",
        [DATE, "Content-Type: text/plain; charset=UTF-8", "Server: cloudflare"],
        f"error code: {code}",
    )
    for code, reason in ((520, "Unknown Error"), (530, "Origin DNS Error"))  # the range's ends
]
SAMPLES["cloudflare-error-page"] += [
    sample(  # a block page: not 52x, no cf-error-type
        "HTTP/1.1 403 Forbidden",
        [DATE, "Content-Type: text/html; charset=UTF-8", "Server: cloudflare"],
        '<div id="cf-wrapper"><div id="cf-error-details"><h1>Sorry, you have been blocked</h1>',
    ),
]
SAMPLES["aws-elb-server"] += [
    sample("HTTP/1.1 504 Gateway Time-out", ["Server: awselb", "Content-Type: text/html"], ALB_502),
]
SAMPLES["traefik-status-text"] += [
    sample(
        "HTTP/1.1 500 Internal Server Error",
        [DATE, "Content-Type: text/plain; charset=utf-8"],
        "Internal Server Error",
    ),
]
SAMPLES["caddy-empty-gateway-error"] += [
    sample(f"HTTP/1.1 {status}", ["Server: Caddy", DATE])
    for status in ("503 Service Unavailable", "504 Gateway Timeout")
]

# Errors an application made, merely forwarded by a product: nobody behind the origin.
FORWARDED_ONLY = {
    "the app's 500 behind nginx": sample(
        "HTTP/1.1 500 Internal Server Error",
        ["Server: nginx/1.25.3", "Content-Type: application/json", DATE],
        '{"error": "database is locked"}',
    ),
    "the app's 503 behind Envoy": sample(
        "HTTP/1.1 503 Service Unavailable",
        ["content-type: application/json", "x-envoy-upstream-service-time: 12", "server: envoy"],
        '{"error": "maintenance"}',
    ),
    "Envoy's words relayed by another Envoy": sample(
        "HTTP/1.1 503 Service Unavailable",
        ["content-type: text/plain", "x-envoy-upstream-service-time: 3", "server: envoy"],
        ENVOY_UF,
    ),
    "the app's 500 behind Cloudflare": sample(
        "HTTP/1.1 500 Internal Server Error",
        ["Server: cloudflare", "CF-RAY: 8f1c2a3b4d5e6f70-FRA", "Content-Type: application/json"],
        '{"error": "boom"}',
    ),
    "the target's 502 behind an ALB": sample(
        "HTTP/1.1 502 Bad Gateway",
        ["Server: gunicorn", "Content-Type: text/html"],
        "<h1>Bad Gateway</h1>",
    ),
    "the app's 503 behind Caddy": sample(
        "HTTP/1.1 503 Service Unavailable",
        ["Server: Caddy", "Content-Type: application/json"],
        '{"error": "warming up"}',
    ),
    "a Go app's bare 502 with a Server header": sample(
        "HTTP/1.1 502 Bad Gateway",
        ["Server: api/1.2", "Content-Type: text/plain; charset=utf-8"],
        "Bad Gateway",
    ),
    "the app's own 404": sample(
        "HTTP/1.1 404 Not Found", ["Content-Type: text/plain"], "no such order"
    ),
    "a 502 page compressed with brotli (unreadable here)": sample(
        "HTTP/1.1 502 Bad Gateway",
        ["Server: nginx", "Content-Encoding: br", "Content-Type: text/html"],
        b"\x1b\x8f\x00\xf8\x2d\x0e\x6c\x8b",
    ),
}


def test_every_signature_has_samples_and_every_hop_a_product():
    assert set(SAMPLES) == {sig.name for sig in SIGNATURES}
    assert {sig.hop for sig in SIGNATURES} == set(HOPS)
    for hop in HOPS:
        assert hop == hop.lower() and " " not in hop  # a clean metrics label value


CASES = [(name, i, s) for name, samples in SAMPLES.items() for i, s in enumerate(samples)]


@pytest.mark.parametrize(
    ("name", "index", "response"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES]
)
def test_each_signature_recognises_its_product(name: str, index: int, response: Sample):
    parsed = OriginResponse.parse(response.status, response.head, response.body)
    sig = recognise(parsed)
    assert sig is not None and sig.name == name
    hop, hints = diagnose(response.evidence())
    assert hop == sig.hop
    expected = (FAULT_BEHIND_ORIGIN,) if response.status >= 500 else ()
    assert hints == expected


def plain_id(words: str) -> str:
    """A test id from words: lower-case letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9]+", "-", words.lower()).strip("-")


@pytest.mark.parametrize(
    "response", FORWARDED_ONLY.values(), ids=[plain_id(k) for k in FORWARDED_ONLY]
)
def test_a_product_that_only_forwarded_the_error_is_not_blamed(response: Sample):
    hop, hints = diagnose(response.evidence())
    assert hop is None
    assert hints == ((FAULT_BEHIND_ORIGIN,) if response.status in (502, 504) else ())


def test_the_body_sample_may_be_cut():
    """The forwarder keeps the first 8 KiB: a long page or a cut gzip stream still counts."""
    page = NGINX_502_PAGE + "<!-- padding -->" * 2000
    cut = gzip.compress(page.encode())[:300]
    response = sample("HTTP/1.1 502 Bad Gateway", ["Content-Encoding: gzip"], cut)
    assert diagnose(response.evidence())[0] == "nginx"
    deflated = zlib.compress(NGINX_502_PAGE.encode())
    response = sample("HTTP/1.1 502 Bad Gateway", ["Content-Encoding: deflate"], deflated)
    assert diagnose(response.evidence())[0] == "nginx"
    raw = zlib.compressobj(wbits=-15)
    deflated_raw = raw.compress(NGINX_502_PAGE.encode()) + raw.flush()
    response = sample("HTTP/1.1 502 Bad Gateway", ["Content-Encoding: deflate"], deflated_raw)
    assert diagnose(response.evidence())[0] == "nginx"


# -- near misses: every signature's evidence with one piece missing ------------------------------
# Signature name -> (what is missing, a response that must be blamed on nobody). Every entry
# of SIGNATURES has at least one: a new signature without one fails the test below.
NEAR_MISSES: dict[str, list[tuple[str, Sample]]] = {
    "envoy-local-reply": [
        (
            "phrase-not-at-the-start",
            sample(
                "HTTP/1.1 503 Service Unavailable",
                ["content-type: text/plain", "server: envoy"],
                "checkout failed: no healthy upstream for payments",
            ),
        ),
        ("relayed-by-envoy", FORWARDED_ONLY["Envoy's words relayed by another Envoy"]),
    ],
    "envoy-overloaded": [
        (
            "relayed-by-envoy",
            sample(
                "HTTP/1.1 503 Service Unavailable",
                ["x-envoy-overloaded: true", "x-envoy-upstream-service-time: 4", "server: envoy"],
                '{"error": "busy"}',
            ),
        ),
    ],
    "nginx-error-page": [
        (
            "not-the-footer",
            sample(
                "HTTP/1.1 502 Bad Gateway",
                ["Content-Type: text/html"],
                "<h1>Oops</h1><hr><center>nginx config guide</center>",
            ),
        ),
        ("server-header-only", FORWARDED_ONLY["the app's 500 behind nginx"]),
    ],
    "haproxy-error-page": [
        (
            "not-a-haproxy-sentence",
            sample(
                "HTTP/1.1 503 Service Unavailable",
                ["content-type: text/html"],
                "<html><body><h1>503 Service Unavailable</h1>\nThe shop is closed today.\n"
                "</body></html>\n",
            ),
        ),
    ],
    "apache-error-page": [
        (
            "title-without-status",
            sample(
                "HTTP/1.1 500 Internal Server Error",
                ["Content-Type: text/html"],
                '<!DOCTYPE HTML PUBLIC "-//IETF//DTD HTML 2.0//EN">\n<html><head>\n'
                "<title>Shop</title>\n</head><body>crashed</body></html>\n",
            ),
        ),
    ],
    "varnish-guru-meditation": [
        (
            "varnish-named-in-the-app-page",
            sample(
                "HTTP/1.1 500 Internal Server Error",
                ["Content-Type: text/html", "X-Varnish: 32770 32771", "Via: 1.1 varnish"],
                "<p>Our cache (Varnish cache server) is fine; the app failed.</p>",
            ),
        ),
    ],
    "varnish-backend-fetch-failed": [
        (
            "x-varnish-on-the-app-503",
            sample(
                "HTTP/1.1 503 Service Unavailable",
                [DATE, "Content-Type: application/json", "X-Varnish: 32770", "Age: 0"],
                '{"error": "maintenance"}',
            ),
        ),
        (
            "reason-without-x-varnish",
            sample(
                "HTTP/1.1 503 Backend fetch failed",
                [DATE, "Content-Type: text/plain"],
                "the app's own words",
            ),
        ),
    ],
    "google-error-page": [
        (
            "plain-apostrophe-and-title",
            sample(
                "HTTP/1.1 502 Bad Gateway",
                ["Content-Type: text/html"],
                "<title>Error 502 (Server Error)!</title><p>That's an error.",
            ),
        ),
    ],
    "cloudfront-error-page": [
        (
            "cloudfront-headers-only",
            sample(
                "HTTP/1.1 502 Bad Gateway",
                ["Server: CloudFront", "X-Cache: Error from cloudfront", "Content-Type: text/html"],
                "<h1>Bad Gateway</h1>",
            ),
        ),
    ],
    "cloudflare-error-header": [
        (
            "cf-ray-only",
            sample(
                "HTTP/1.1 502 Bad Gateway",
                ["CF-RAY: 8f1c2a3b4d5e6f70-FRA", "cf-cache-status: DYNAMIC"],
                '{"error": "upstream"}',
            ),
        ),
    ],
    "cloudflare-52x": [
        (
            "519-below-the-range",
            sample("HTTP/1.1 519 Custom", ["Server: cloudflare"], "error code: 519"),
        ),
        (
            "531-above-the-range",
            sample("HTTP/1.1 531 Custom", ["Server: cloudflare"], "error code: 531"),
        ),
        (
            "52x-from-another-server",
            sample("HTTP/1.1 522 Timeout", ["Server: cloudflare-nginx-lookalike"], "timeout"),
        ),
    ],
    "cloudflare-error-page": [
        (
            "cloudflare-mentioned",
            sample(
                "HTTP/1.1 500 Internal Server Error",
                ["Content-Type: text/html", "Server: cloudflare"],
                "<p>Protected by cloudflare</p><center>cloudflare</center>",
            ),
        ),
    ],
    "akamai-error-page": [
        (
            "reference-not-hex",
            sample(
                "HTTP/1.1 503 Service Unavailable",
                ["Server: AkamaiGHost", "Content-Type: text/html"],
                "Reference&#32;&#35;order-42",
            ),
        ),
    ],
    "kong-response-latency": [
        (
            "proxied-latency-headers",
            sample(
                "HTTP/1.1 502 Bad Gateway",
                ["X-Kong-Upstream-Latency: 3", "X-Kong-Proxy-Latency: 1", "Via: kong/3.4.2"],
                '{"error": "app"}',
            ),
        ),
    ],
    "kong-server": [
        ("kong-inside-another-name", sample("HTTP/1.1 503 Down", ["Server: mykong/2.8.1"], "x")),
    ],
    "aws-elb-server": [
        ("awselb-inside-another-name", sample("HTTP/1.1 502 Bad", ["Server: not-awselb/2.0"], "x")),
    ],
    "traefik-no-available-server": [
        (
            "not-503",
            sample(
                "HTTP/1.1 502 Bad Gateway",
                ["Content-Type: text/plain; charset=utf-8", "X-Content-Type-Options: nosniff"],
                "no available server\n",
            ),
        ),
        (
            "without-nosniff",
            sample(
                "HTTP/1.1 503 Service Unavailable",
                ["Content-Type: text/plain; charset=utf-8"],
                "no available server\n",
            ),
        ),
    ],
    "traefik-status-text": [
        (
            "503-status-text",
            sample(
                "HTTP/1.1 503 Service Unavailable",
                ["Content-Type: text/plain; charset=utf-8"],
                "Bad Gateway",
            ),
        ),
        (
            "html-content-type",
            sample("HTTP/1.1 502 Bad Gateway", ["Content-Type: text/html"], "Bad Gateway"),
        ),
        ("with-a-server-header", FORWARDED_ONLY["a Go app's bare 502 with a Server header"]),
    ],
    "caddy-empty-gateway-error": [
        ("empty-500", sample("HTTP/1.1 500 Internal Server Error", ["Server: Caddy"])),
        ("not-caddy", sample("HTTP/1.1 502 Bad Gateway", ["Server: Caddyish"])),
        ("with-a-body", FORWARDED_ONLY["the app's 503 behind Caddy"]),
    ],
}


def test_every_signature_has_a_near_miss():
    assert set(NEAR_MISSES) == {sig.name for sig in SIGNATURES}


NEAR_CASES = [(name, why, s) for name, misses in NEAR_MISSES.items() for why, s in misses]


@pytest.mark.parametrize(
    ("name", "response"),
    [(c[0], c[2]) for c in NEAR_CASES],
    ids=[f"{c[0]}-{c[1]}" for c in NEAR_CASES],
)
def test_a_near_miss_is_blamed_on_nobody(name: str, response: Sample):
    parsed = OriginResponse.parse(response.status, response.head, response.body)
    assert recognise(parsed) is None
    hop, hints = diagnose(response.evidence())
    assert hop is None
    assert hints == ((FAULT_BEHIND_ORIGIN,) if response.status in (502, 504) else ())


@pytest.mark.parametrize(
    ("status", "hints"),
    [
        (500, ()),
        (501, ()),
        (502, (FAULT_BEHIND_ORIGIN,)),
        (503, ()),  # the origin's own 503 says it is unavailable; nothing points behind it
        (504, (FAULT_BEHIND_ORIGIN,)),
        (505, ()),
        (404, ()),
    ],
)
def test_an_origin_gateway_status_points_behind_the_origin(status, hints):
    response = sample(f"HTTP/1.1 {status} X", ["Content-Type: text/plain"], "plain words")
    assert diagnose(response.evidence()) == (None, hints)


# -- what the forwarder keeps: the samples' and the inflater's bounds -----------------------------

# The documented bounds, spelled out (not imported: a changed constant must fail here).
BODY_SAMPLE = 8 * 1024  # of an origin's error body, kept to recognise its author
INFLATE_CAP = 64 * 1024  # of a compressed error body, inflated at most
REQUEST_SAMPLE = 64 * 1024  # of a JSON request body, kept to judge it
NGINX_FOOTER = "<hr><center>nginx</center>"


def footer_ending_at(end: int) -> str:
    """An nginx page whose footer ends at byte `end` of the (decoded) body."""
    return "x" * (end - len(NGINX_FOOTER)) + NGINX_FOOTER + "\n</body></html>\n"


@pytest.mark.parametrize("coding", ["gzip", "deflate", "deflate-raw"])
@pytest.mark.parametrize(("end", "hop"), [(INFLATE_CAP, "nginx"), (INFLATE_CAP + 1, None)])
def test_the_inflater_reads_up_to_its_cap(coding, end, hop):
    """A compressed error page is inflated up to the cap and no further: the footer ending
    exactly at the cap is read, one byte later it is not (and a bomb costs nothing)."""
    page = footer_ending_at(end).encode()
    if coding == "gzip":
        body = gzip.compress(page, mtime=0)
    else:
        packer = zlib.compressobj(wbits=-15 if coding == "deflate-raw" else 15)
        body = packer.compress(page) + packer.flush()
    assert len(body) < BODY_SAMPLE  # all of it is in the sample
    header = "gzip" if coding == "gzip" else "deflate"
    response = sample("HTTP/1.1 502 Bad Gateway", [f"Content-Encoding: {header}"], body)
    assert diagnose(response.evidence()) == (hop, (FAULT_BEHIND_ORIGIN,))
    parsed = OriginResponse.parse(response.status, response.head, response.body)
    assert parsed.text is not None and len(parsed.text) == INFLATE_CAP


ZEROS = 10 * 1024 * 1024


def bomb(coding: str) -> bytes:
    """10 MiB of zeros, compressed to about 10 KiB."""
    if coding == "gzip":
        return gzip.compress(bytes(ZEROS), mtime=0)
    return zlib.compress(bytes(ZEROS))


# -- Proxy-Status ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "author"),
    [
        (['shop-gw; error=connection_refused; details="connect to 10.0.0.7:8080"'], "shop-gw"),
        # first member = closest to the origin: the inner gateway made it, the cache relayed it
        (["inner-gw; error=connection_timeout, edge-cache; received-status=504"], "inner-gw"),
        (["edge-cache; received-status=502", "gw; error=dns_error; rcode=NXDOMAIN"], "gw"),
        (['gw; error=http_protocol_error; details="a, b; c", cdn; received-status=502'], "gw"),
        (['"edge proxy (eu)"; error=connection_terminated'], "edge-proxy-eu"),
        (['ExampleCDN; error=connection_timeout; details="\\"quoted\\""'], "ExampleCDN"),
        (["cache; received-status=503; next-hop=backend"], None),  # relayed only
        (["faultline-edge; received-status=200"], None),
        (["not a structured field ,,, ;;"], None),
        ([""], None),
        # in one field value, the last member with an error is the closest author
        (["inner-gw; error=connection_timeout, edge; error=http_response_timeout"], "edge"),
        (["cdn; received-status=502,gw; error=connection_refused"], "gw"),  # no space
        (['"X-Cache-Gw"; error=connection_refused'], "X-Cache-Gw"),
        (['"!!!"; error=connection_refused'], None),  # nothing printable left of the name
        (['gw; error=dns_error, "???"; error=connection_refused'], "gw"),
    ],
)
def test_proxy_status_names_the_member_that_made_the_error(values, author):
    assert proxy_status_author(values) == author


def test_proxy_status_comes_before_signatures():
    members = f"mesh-gateway; error={Fault.CONNECTION_REFUSED.value}"
    response = sample(
        "HTTP/1.1 503 Service Unavailable",
        ["content-type: text/plain", "server: envoy", f"proxy-status: {members}"],
        ENVOY_UF,
    )
    assert diagnose(response.evidence()) == ("mesh-gateway", (FAULT_BEHIND_ORIGIN,))
    relayed = sample(
        "HTTP/1.1 502 Bad Gateway",
        ["Server: nginx", "Proxy-Status: cdn; received-status=502"],
        NGINX_502_PAGE,
    )
    assert diagnose(relayed.evidence())[0] == "nginx"  # relayed only: the page still says nginx


def test_a_proxy_status_name_cannot_reach_a_terminal_or_a_label_raw():
    hop = proxy_status_author(['"gw\x1b[31m\u202e/../x"; error=connection_refused'])
    assert hop == "gw-31m-..-x"
    long = proxy_status_author([f"{'a' * 200}; error=connection_refused"])
    assert long is not None and len(long) <= 48


# -- the mis-blamed 5xx ---------------------------------------------------------------------------

APP_500 = sample(
    "HTTP/1.1 500 Internal Server Error",
    ["Content-Type: text/plain"],
    "Traceback (most recent call last):\n  ...\njson.decoder.JSONDecodeError: Expecting value",
)


JSON_CASES = [
    ("unterminated-object", b"application/json", b'{"item": "teapot",', True),
    ("single-quotes", b"application/json; charset=utf-8", b"{'item': 'teapot'}", True),
    ("form-body-upper-case-type", b"APPLICATION/JSON", b"item=teapot&quantity=1", True),
    ("trailing-comma-plus-json", b"application/vnd.api+json", b'{"data": [1, 2,]}', True),
    ("not-utf-8", b"application/problem+json", b"\xff\xfe not utf-8", True),
    ("nan-text-json", b"text/json", b'{"a": NaN}', True),  # NaN is not JSON (RFC 8259)
    ("charset-utf8-spelling", b"application/json; charset=utf8", b'{"a":', True),
    ("valid-object", b"application/json", b'{"item": "teapot", "quantity": 1}', False),
    ("valid-array", b"application/json", b'  [1, 2.5e3, null, true, "\\u00e9"]\n', False),
    ("valid-with-bom", b"application/json", b'\xef\xbb\xbf{"bom": true}', False),  # may be ignored
    ("deep-but-valid", b"application/json", b"[" * 3000 + b"]" * 3000, False),
    ("empty-body", b"application/json", b"", False),  # no body: undecidable
    ("blank-body", b"application/json", b"  \r\n", False),
    # the sample's end: a body as long as the sample may be a cut prefix (undecidable)
    ("invalid-one-byte-inside-the-sample", b"application/json", b"x" * (REQUEST_SAMPLE - 1), True),
    ("invalid-as-long-as-the-sample", b"application/json", b"x" * REQUEST_SAMPLE, False),
    ("gzip-body", b"application/json", gzip.compress(b'{"a": 1}', mtime=0), False),
    ("utf-16-charset", b"application/json; charset=utf-16", '{"a": 1}'.encode("utf-16"), False),
    ("ndjson", b"application/x-ndjson", b'{"a": 1}\n{"a": 2}\n', False),  # several documents
    ("json-seq", b"application/json-seq", b'\x1e{"a": 1}\n', False),
    ("text-plain", b"text/plain", b'{"item": "teapot",', False),
    ("no-content-type", None, b'{"item": "teapot",', False),
    ("no-body", b"application/json", None, False),
]


@pytest.mark.parametrize(
    ("content_type", "body", "invalid"),
    [c[1:] for c in JSON_CASES],
    ids=[c[0] for c in JSON_CASES],  # plain names: a body's bytes never make an id
)
def test_invalid_json_is_told_apart(content_type, body, invalid):
    assert is_invalid_json_request(content_type, body) is invalid


def test_a_5xx_to_invalid_json_is_flagged():
    bad = {"request_content_type": b"application/json", "request_body": b'{"item": "teapot",'}
    good = {"request_content_type": b"application/json", "request_body": b'{"item": "teapot"}'}
    assert diagnose(APP_500.evidence(**bad)) == (None, (ORIGIN_5XX_FOR_CLIENT_ERROR,))
    assert diagnose(APP_500.evidence(**good)) == (None, ())
    app_502 = sample("HTTP/1.1 502 Bad Gateway", ["Content-Type: text/plain"], "upstream down")
    assert diagnose(app_502.evidence(**bad)) == (
        None,
        (FAULT_BEHIND_ORIGIN, ORIGIN_5XX_FOR_CLIENT_ERROR),
    )
    app_422 = sample("HTTP/1.1 422 Unprocessable Content", [], '{"error": "invalid JSON"}')
    assert diagnose(app_422.evidence(**bad)) == (None, ())  # the right answer: nothing to say
    # A 5xx made by an intermediary is not the app's verdict on the body.
    nginx = SAMPLES["nginx-error-page"][0]
    assert diagnose(nginx.evidence(**bad)) == ("nginx", (FAULT_BEHIND_ORIGIN,))


def test_hints_are_the_contracts_tokens():
    assert (FAULT_BEHIND_ORIGIN, ORIGIN_5XX_FOR_CLIENT_ERROR) == (
        "fault_behind_origin",
        "origin_5xx_for_client_error",
    )


def test_each_hop_is_told_by_its_products_name():
    """What the log line and the dashboard say for a hop: the product, or the name given."""
    products = {
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
    assert {hop: hop_product(hop) for hop in HOPS} == products
    assert hop_product("pay-gw") == "pay-gw"


def test_hints_have_words():
    assert set(HINT_TEXT) == {FAULT_BEHIND_ORIGIN, ORIGIN_5XX_FOR_CLIENT_ERROR, PROXY_LOOP_STALLED}
    assert all(text and "\n" not in text for text in HINT_TEXT.values())
    assert HINT_TEXT == {  # what the terminal and the dashboard say, word for word
        "fault_behind_origin": "the failure lies behind the origin \u2014 check what it forwards "
        "to or depends on",
        "origin_5xx_for_client_error": "the request body is not valid JSON \u2014 the origin "
        "should answer 400/422, not a 5xx",
        "proxy_loop_stalled": "the proxy's event loop stalled over the deadline, not the peer "
        "\u2014 check its CPU throttling, loop_lag_ms and gc_ms",
    }


# -- end to end through the proxy -----------------------------------------------------------------


def serve_by_path(responses: dict[bytes, Sample]):
    async def script(conn: OriginConnection) -> None:
        while (request := await conn.read_request()) is not None:
            path = request.split(b" ", 2)[1]
            conn.write(responses[path].wire())
            await conn.drain()

    return script


async def test_the_hop_reaches_the_log_stats_metrics_and_headers(origin_factory, proxy_factory):
    responses = {
        b"/nginx": SAMPLES["nginx-error-page"][0],
        b"/envoy": SAMPLES["envoy-local-reply"][0],
        b"/envoy-again": SAMPLES["envoy-local-reply"][2],
        b"/gw": sample(
            "HTTP/1.1 504 Gateway Timeout",
            [f"Proxy-Status: pay-gw; error={Fault.CONNECTION_TIMEOUT.value}"],
            "timeout",
        ),
        b"/app": FORWARDED_ONLY["the app's 500 behind nginx"],
        b"/ok": sample("HTTP/1.1 200 OK", ["Content-Type: text/plain"], "fine"),
    }
    origin = await origin_factory(serve_by_path(responses))
    proxy = await proxy_factory(origin.url, proxy_name="edge")
    seen = {}
    async with aiohttp.ClientSession() as session:
        for path in responses:
            async with session.get(proxy.url + path.decode()) as resp:
                await resp.read()
                seen[path] = (resp.status, resp.headers.getall("Proxy-Status"))
        await proxy.settle()
        records = {r["path"]: r for r in proxy.access_log()}
        async with session.get(proxy.admin_url + "/stats") as resp:
            stats = await resp.json()
        async with session.get(proxy.admin_url + "/metrics") as resp:
            metrics = await resp.text()

    expected = {
        "/nginx": (502, "nginx", [FAULT_BEHIND_ORIGIN]),
        "/envoy": (503, "envoy", [FAULT_BEHIND_ORIGIN]),
        "/envoy-again": (503, "envoy", [FAULT_BEHIND_ORIGIN]),
        "/gw": (504, "pay-gw", [FAULT_BEHIND_ORIGIN]),
        "/app": (500, None, []),
        "/ok": (200, None, []),
    }
    for path, (status, hop, hints) in expected.items():
        record = records[path]
        assert (record["status"], record["source"], record["error"]) == (status, "origin", None)
        assert (record["hop"], record["hints"]) == (hop, hints), path
    # The origin's own Proxy-Status member stays first; ours is appended.
    members = proxy_status_members(", ".join(seen[b"/gw"][1]))
    assert members[0].startswith("pay-gw; error=") and members[-1].startswith("edge;")
    assert "received-status=504" in members[-1]
    recent = {e["path"]: e for e in stats["recent_errors"]}
    assert recent["/nginx"]["hop"] == "nginx" and recent["/gw"]["hop"] == "pay-gw"
    assert recent["/nginx"]["hints"] == [FAULT_BEHIND_ORIGIN]

    hops = {}
    for family in text_string_to_metric_families(metrics):
        if family.name == "faultline_origin_hop_responses":
            assert family.type == "counter"
            for s in family.samples:
                if s.name.endswith("_total"):
                    hops[s.labels["hop"], s.labels["code"]] = s.value
    assert hops == {("nginx", "502"): 1, ("envoy", "503"): 2, ("pay-gw", "504"): 1}


async def test_invalid_json_answered_with_a_500_is_flagged_end_to_end(
    origin_factory, proxy_factory
):
    async def app(conn: OriginConnection) -> None:
        while (request := await conn.read_request()) is not None:
            body = request.split(b"\r\n\r\n", 1)[1]
            try:  # the anti-pattern: a parse error becomes a 500
                json.loads(body)
                await conn.respond(200, b"{}")
            except ValueError:
                await conn.respond(500, b"Traceback (most recent call last): ...")

    origin = await origin_factory(app)
    proxy = await proxy_factory(origin.url)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/orders", data=b'{"item":', headers=headers) as r:
            assert r.status == 500
        async with session.post(proxy.url + "/orders", data=b'{"a": 1,', headers=headers) as r:
            assert r.status == 500

        async def chunked():
            yield b'{"item": "tea'
            yield b'pot",'

        async with session.post(proxy.url + "/orders", data=chunked(), headers=headers) as r:
            assert r.status == 500
        async with session.post(proxy.url + "/orders", data=b'{"item": 1}', headers=headers) as r:
            assert r.status == 200
    await proxy.settle()
    records = proxy.access_log()
    assert [r["hints"] for r in records] == [[ORIGIN_5XX_FOR_CLIENT_ERROR]] * 3 + [[]]
    assert all(r["source"] == "origin" and r["error"] is None for r in records)


def test_hop_label_values_stay_bounded():
    """Products are always their own label value; Proxy-Status names up to a cap, then
    "other": an origin inventing names cannot grow /metrics without bound."""
    stats = Stats()

    def record(hop: str | None) -> None:
        ex = Exchange(0, "127.0.0.1", "127.0.0.1:3000")
        ex.hop, ex.status, ex.t_end = hop, 502, 1
        stats.record_batch([ex])

    for i in range(HOP_NAMES_MAX + 10):
        record(f"gw-{i}")
    record("nginx")
    record(None)  # no hop: not counted
    labels = {hop for hop, _ in stats.hop_counts}
    assert len(labels) == HOP_NAMES_MAX + 2 and {"nginx", HOP_OTHER} <= labels
    assert stats.hop_counts[HOP_OTHER, 502] == 10
    assert sum(stats.hop_counts.values()) == HOP_NAMES_MAX + 11


async def test_a_decompression_bomb_as_an_error_body_costs_nothing():
    """An origin answers a JSON request with a 500 whose body is 10 MiB of zeros, gzip or
    deflate (about 10 KiB on the wire): the client gets the bytes as sent, the verdict comes
    out as for any 500 to invalid JSON, and the proxy inflates at most its cap (its peak RSS
    does not move; without the cap it would inflate the whole 8 KiB sample, 8 MiB)."""
    bodies = {"/gzip": ("gzip", bomb("gzip")), "/deflate": ("deflate", bomb("deflate"))}

    async def app(conn: OriginConnection) -> None:
        while (request := await conn.read_request()) is not None:
            path = request.split(b" ", 2)[1].decode()
            coding, body = bodies.get(path, ("gzip", gzip.compress(b'{"error": "bad"}')))
            headers = f"Content-Type: application/json\r\nContent-Encoding: {coding}\r\n"
            await conn.respond(500, body, headers)

    origin = await ScriptedOrigin(app).start()
    proxy = spawn_proxy(origin.url, "--log-format", "json")
    try:
        async with aiohttp.ClientSession(auto_decompress=False) as session:

            async def post(path: str) -> bytes:
                headers = {"Content-Type": "application/json"}
                async with session.post(proxy.url + path, data=b'{"a":', headers=headers) as r:
                    assert r.status == 500
                    return await r.read()

            for _ in range(3):  # warm: the same path with a small body
                await post("/small")
            peak = proxy.peak_rss_bytes()
            for path, (_, body) in bodies.items():
                started = time.monotonic()
                assert await post(path) == body
                assert time.monotonic() - started < 1.0
            grown = proxy.peak_rss_bytes() - peak
            async with session.get(proxy.admin_url + "/stats") as resp:
                stats = await resp.json()
    finally:
        proxy.stop()
        await origin.close()
    assert grown < 3 * 1024 * 1024, f"peak RSS grew by {grown} bytes"
    recent = {e["path"]: e for e in stats["recent_errors"]}
    for path in bodies:
        assert (recent[path]["hop"], recent[path]["hints"]) == (None, [ORIGIN_5XX_FOR_CLIENT_ERROR])


@pytest.mark.parametrize(
    "status_line",
    [
        b"HTTP/1.1 502",
        b"HTTP/1.1 503 ",
        b"HTTP/1.1 504",
        b"HTTP/1.0 502",
        b"HTTP/1.1 502 Bad Gateway",
    ],
    ids=[
        "502-no-reason",
        "503-empty-reason",
        "504-no-reason",
        "http10-502-no-reason",
        "502-reason",
    ],
)
async def test_a_status_line_without_a_reason_is_still_diagnosed(
    status_line, origin_factory, proxy_factory, caplog
):
    """RFC 9112 §4: the reason phrase may be empty. The verdict is the same as with one."""
    status = int(status_line.split(b" ")[1])
    made_by = {  # one signature per kind of evidence: a header, a body, Proxy-Status
        b"/alb": (
            b"Server: awselb/2.0\r\nContent-Type: text/html\r\n",
            ALB_502.encode(),
            "aws-alb",
        ),
        b"/nginx": (b"Content-Type: text/html\r\n", NGINX_502_PAGE.encode(), "nginx"),
        b"/gw": (b"Proxy-Status: pay-gw; error=connection_timeout\r\n", b"timeout", "pay-gw"),
    }

    async def app(conn: OriginConnection) -> None:
        while (request := await conn.read_request()) is not None:
            headers, body, _ = made_by[request.split(b" ", 2)[1]]
            conn.write(
                status_line + b"\r\n" + headers + b"Content-Length: %d\r\n\r\n" % len(body) + body
            )
            await conn.drain()

    origin = await origin_factory(app)
    proxy = await proxy_factory(origin.url)
    async with aiohttp.ClientSession() as session:
        for path in made_by:
            async with session.get(proxy.url + path.decode()) as resp:
                assert resp.status == status
                await resp.read()
    await proxy.settle()
    records = {r["path"]: r for r in proxy.access_log()}
    for path, (_, _, hop) in made_by.items():
        record = records[path.decode()]
        assert (record["status"], record["source"], record["error"]) == (status, "origin", None)
        assert (record["hop"], record["hints"]) == (hop, [FAULT_BEHIND_ORIGIN]), path
    assert "diagnosis failed" not in caplog.text


@pytest.mark.parametrize(
    ("footer_end", "hop"),
    [(BODY_SAMPLE, "nginx"), (BODY_SAMPLE + 1, None)],
    ids=["footer-ends-at-the-sample-end", "footer-one-byte-beyond"],
)
async def test_the_body_sample_ends_where_it_says(footer_end, hop, origin_factory, proxy_factory):
    """The forwarder keeps the first BODY_SAMPLE of an error body, sent in pieces:
    evidence ending on its last byte is read, one byte further it is not."""
    page = footer_ending_at(footer_end).encode() + b"<!-- more -->" * 500

    async def app(conn: OriginConnection) -> None:
        while await conn.read_request() is not None:
            conn.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: %d\r\n\r\n" % len(page))
            for i in range(0, len(page), 3000):  # in pieces that straddle the sample's end
                conn.write(page[i : i + 3000])
                await conn.drain()
                await asyncio.sleep(0.005)

    origin = await origin_factory(app)
    proxy = await proxy_factory(origin.url)
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/page") as resp:
            assert resp.status == 502 and await resp.read() == page
    record = await proxy.last_log()
    assert (record["hop"], record["hints"]) == (hop, [FAULT_BEHIND_ORIGIN])


async def test_the_request_sample_ends_where_it_says(origin_factory, proxy_factory):
    """Invalid JSON shorter than REQUEST_SAMPLE is judged; a body as long as the
    sample or longer is only partly kept, so it cannot be judged: no hint."""

    async def app(conn: OriginConnection) -> None:
        while await conn.read_request() is not None:
            await conn.respond(500, b"Traceback ...")

    origin = await origin_factory(app)
    proxy = await proxy_factory(origin.url)
    sizes = [REQUEST_SAMPLE - 1, REQUEST_SAMPLE, REQUEST_SAMPLE + 1]
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        for size in sizes:
            body = b'{"a": "' + b"x" * (size - 7)  # an unterminated string: never valid
            assert len(body) == size
            async with session.post(f"{proxy.url}/{size}", data=body, headers=headers) as resp:
                assert resp.status == 500
                await resp.read()
    await proxy.settle()
    hints = {r["path"]: r["hints"] for r in proxy.access_log()}
    assert hints == {
        f"/{REQUEST_SAMPLE - 1}": [ORIGIN_5XX_FOR_CLIENT_ERROR],
        f"/{REQUEST_SAMPLE}": [],
        f"/{REQUEST_SAMPLE + 1}": [],
    }


async def test_an_origins_own_gateway_status_keeps_its_hint_end_to_end(
    origin_factory, proxy_factory
):
    """The origin's own 502 and 504 (no product recognised) point behind the origin; its own
    500 and 503 do not: they are source=origin with no error token either way."""
    statuses = [500, 502, 503, 504]

    async def app(conn: OriginConnection) -> None:
        while (request := await conn.read_request()) is not None:
            await conn.respond(int(request.split(b" ", 2)[1][1:]), b"plain words")

    origin = await origin_factory(app)
    proxy = await proxy_factory(origin.url)
    async with aiohttp.ClientSession() as session:
        for status in statuses:
            async with session.get(f"{proxy.url}/{status}") as resp:
                assert resp.status == status
                assert f"received-status={status}" in resp.headers["Proxy-Status"]
                await resp.read()
    await proxy.settle()
    records = {r["path"]: r for r in proxy.access_log()}
    for status in statuses:
        record = records[f"/{status}"]
        assert (record["source"], record["error"], record["hop"]) == ("origin", None, None)
        expected = [FAULT_BEHIND_ORIGIN] if status in (502, 504) else []
        assert record["hints"] == expected, status
