"""The fault taxonomy: the one place that names a fault, its status, its layer and its advice.

Rule 1: every RFC 9209 error token Faultline can emit is a member of `Fault`, and nothing
outside this module spells a token or decides a fault's status.
Rule 2: every fault has a row in `TAXONOMY`; a test proves the table complete.
Rule 3: `http_request_error` covers four client problems (malformed, too slow, body or
headers too large); each has its own status, title and advice in `REQUEST_PROBLEMS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, StrEnum


class Layer(StrEnum):
    """Where along the path the fault lies."""

    CLIENT = "client"
    PROXY = "proxy"
    TRANSPORT = "transport"
    UPSTREAM = "upstream"
    ORIGIN = "origin"


class Source(StrEnum):
    """Who produced the status the client got (client: nothing was sent, 499)."""

    ORIGIN = "origin"
    PROXY = "proxy"
    CLIENT = "client"


class Fault(StrEnum):
    """RFC 9209 error tokens (values are the tokens as they appear on the wire)."""

    DNS_ERROR = "dns_error"
    DNS_TIMEOUT = "dns_timeout"
    CONNECTION_REFUSED = "connection_refused"
    CONNECTION_TIMEOUT = "connection_timeout"
    TLS_CERTIFICATE_ERROR = "tls_certificate_error"
    TLS_PROTOCOL_ERROR = "tls_protocol_error"
    CONNECTION_TERMINATED = "connection_terminated"
    HTTP_PROTOCOL_ERROR = "http_protocol_error"
    HTTP_RESPONSE_HEADER_SECTION_SIZE = "http_response_header_section_size"
    HTTP_RESPONSE_TIMEOUT = "http_response_timeout"
    HTTP_RESPONSE_INCOMPLETE = "http_response_incomplete"
    CONNECTION_READ_TIMEOUT = "connection_read_timeout"
    HTTP_UPGRADE_FAILED = "http_upgrade_failed"
    CONNECTION_LIMIT_REACHED = "connection_limit_reached"
    PROXY_LOOP_DETECTED = "proxy_loop_detected"
    DESTINATION_NOT_FOUND = "destination_not_found"  # no route matches (`routes`)
    PROXY_CONFIGURATION_ERROR = "proxy_configuration_error"  # sent where it cannot go
    PROXY_INTERNAL_ERROR = "proxy_internal_error"
    # RFC 9209 names no "the intermediary is shutting down"; of its tokens this is the one
    # that is true and charges nobody else: the proxy made the response itself (the 503)
    # or cut it. connection_terminated or http_response_incomplete would blame the next
    # hop, proxy_internal_error a defect, proxy_configuration_error a wrong setting.
    PROXY_INTERNAL_RESPONSE = "proxy_internal_response"  # the drain deadline cut it
    HTTP_REQUEST_ERROR = "http_request_error"
    CLIENT_CLOSED_REQUEST = "client_closed_request"


class RequestProblem(Enum):
    """The kinds of `http_request_error`: what was wrong with the client's request."""

    MALFORMED = "malformed"
    TIMEOUT = "timeout"
    BODY_TOO_LARGE = "body_too_large"
    HEADERS_TOO_LARGE = "headers_too_large"
    NOT_IMPLEMENTED = "not_implemented"  # a transfer coding the proxy does not apply (501)


@dataclass(frozen=True, slots=True)
class FaultInfo:
    """One row of the taxonomy.

    `status` is what the proxy sends; None when nothing can be sent any more (the response
    had already started, or the client is gone). `hop` says in plain words which hop
    failed; `advice` is what to check first; `hint` is the same in a few words for one
    terminal line (`{upstream}` stands for the upstream's host:port).
    """

    fault: Fault
    status: int | None
    layer: Layer
    source: Source
    title: str
    hop: str
    meaning: str
    advice: str
    hint: str = ""

    @property
    def token(self) -> str:
        return self.fault.value

    def hint_for(self, upstream: str) -> str:
        """The short hint with the upstream's host:port filled in."""
        return self.hint.replace("{upstream}", upstream)


_UPSTREAM_HOP = "between Faultline and the upstream"


def _row(
    fault: Fault,
    status: int | None,
    layer: Layer,
    title: str,
    meaning: str,
    advice: str,
    *,
    source: Source = Source.PROXY,
    hop: str = _UPSTREAM_HOP,
    hint: str = "",
) -> FaultInfo:
    return FaultInfo(fault, status, layer, source, title, hop, meaning, advice, hint)


TAXONOMY: dict[Fault, FaultInfo] = {
    row.fault: row
    for row in (
        _row(
            Fault.DNS_ERROR,
            502,
            Layer.TRANSPORT,
            "Upstream name does not resolve",
            "The upstream's host name could not be resolved to an address.",
            "Check the upstream host name in the configuration for typos, and that the "
            "service or DNS record exists from where Faultline runs.",
            hint="the name in {upstream} does not resolve — a typo, or no such service/DNS record?",
        ),
        _row(
            Fault.DNS_TIMEOUT,
            504,
            Layer.TRANSPORT,
            "Upstream name resolution timed out",
            "The resolver did not answer in time for the upstream's host name.",
            "Check the DNS resolver's health and reachability (resolv.conf, CoreDNS "
            "pods), then retry.",
            hint="no DNS answer for {upstream} in time — is the resolver reachable?",
        ),
        _row(
            Fault.CONNECTION_REFUSED,
            502,
            Layer.TRANSPORT,
            "Nothing listens at the upstream",
            "The upstream address refused the TCP connection: no process is listening "
            "on that port, or it is restarting.",
            "Check that the upstream process is running and listening on the configured "
            "host and port; look at its logs for a crash or a restart.",
            hint="nothing is listening on {upstream} — is the dev server running?",
        ),
        _row(
            Fault.CONNECTION_TIMEOUT,
            504,
            Layer.TRANSPORT,
            "Upstream connect timed out",
            "The TCP (or TLS) connection to the upstream did not complete within timeouts.connect.",
            "Check that the upstream is not overloaded (full accept backlog), and for "
            "firewalls or network policies dropping packets on the path.",
            hint="{upstream} did not accept the connection in time — overloaded, or a firewall?",
        ),
        _row(
            Fault.TLS_CERTIFICATE_ERROR,
            502,
            Layer.TRANSPORT,
            "Upstream certificate rejected",
            "The upstream's TLS certificate failed verification (untrusted issuer, "
            "expired, or the name does not match).",
            "Check the upstream's certificate chain and expiry, the CA bundle Faultline "
            "trusts (tls.ca_file) and the server name it verifies (tls.server_name).",
            hint="{upstream}'s certificate was rejected — expired, wrong name or unknown CA?",
        ),
        _row(
            Fault.TLS_PROTOCOL_ERROR,
            502,
            Layer.TRANSPORT,
            "TLS handshake with upstream failed",
            "The TLS handshake with the upstream failed for a reason other than its "
            "certificate (protocol or cipher mismatch, or the upstream does not speak TLS).",
            "Check that the upstream really serves TLS on that port (http:// vs https://) "
            "and that its TLS versions and ciphers overlap with Faultline's.",
            hint="TLS with {upstream} failed — does that port really speak https?",
        ),
        _row(
            Fault.CONNECTION_TERMINATED,
            502,
            Layer.UPSTREAM,
            "Upstream closed the connection",
            "The upstream closed or reset the connection before sending any byte of a response.",
            "Check the upstream's logs for a crash or a killed worker while handling this "
            "request, and its keep-alive timeout against Faultline's pool.",
            hint="{upstream} hung up without answering — did the app crash on this request?",
        ),
        _row(
            Fault.HTTP_PROTOCOL_ERROR,
            502,
            Layer.UPSTREAM,
            "Upstream sent invalid HTTP",
            "The upstream's response is not valid HTTP/1.x (bad status line, bad header "
            "bytes, broken chunked framing).",
            "Check that the upstream port speaks HTTP/1.1 (not TLS, HTTP/2-only or another "
            "protocol) and the code that writes raw responses.",
            hint="{upstream} did not answer in valid HTTP/1.1 — right port, right protocol?",
        ),
        _row(
            Fault.HTTP_RESPONSE_HEADER_SECTION_SIZE,
            502,
            Layer.UPSTREAM,
            "Upstream response headers too large",
            "The upstream's response header section exceeded limits.max_response_header_bytes.",
            "Check the upstream for runaway headers (huge cookies, repeated headers), or "
            "raise the limit if they are legitimate.",
            hint="{upstream} sent oversized response headers — runaway cookies?",
        ),
        _row(
            Fault.HTTP_RESPONSE_TIMEOUT,
            504,
            Layer.UPSTREAM,
            "Upstream response timed out",
            "The upstream accepted the request but sent no complete response headers "
            "within timeouts.response_headers.",
            "Check the upstream's response times and slow-query logs for this path, and "
            "compare timeouts along the path (client, Faultline, upstream).",
            hint="{upstream} did not answer in time — a slow query or a stuck handler?",
        ),
        _row(
            Fault.HTTP_RESPONSE_INCOMPLETE,
            None,
            Layer.UPSTREAM,
            "Upstream response cut short",
            "The upstream closed the connection in the middle of the response body; the "
            "client connection was aborted so the client cannot mistake it for complete.",
            "Check the upstream's logs for a crash, an out-of-memory kill or a write "
            "timeout while it streamed this response.",
            hint="{upstream} died in the middle of the body — a crash or an OOM kill?",
            source=Source.ORIGIN,
        ),
        _row(
            Fault.CONNECTION_READ_TIMEOUT,
            None,
            Layer.UPSTREAM,
            "Upstream stalled mid-response",
            "The upstream stopped sending the response body for longer than "
            "timeouts.upstream_read; the client connection was aborted.",
            "Check what the upstream waits on while streaming (a slow dependency, a "
            "blocked worker), or raise timeouts.upstream_read for long polls.",
            hint="{upstream} went silent mid-body — what is the handler waiting on?",
            source=Source.ORIGIN,
        ),
        _row(
            Fault.HTTP_UPGRADE_FAILED,
            502,
            Layer.UPSTREAM,
            "Upstream broke the upgrade",
            "The upstream did not complete the protocol upgrade (WebSocket) handshake.",
            "Check that the upstream route supports WebSocket upgrades and that nothing "
            "in front of it strips the Upgrade and Connection headers.",
            hint="{upstream} broke the WebSocket handshake — does this route accept upgrades?",
        ),
        _row(
            Fault.CONNECTION_LIMIT_REACHED,
            503,
            Layer.PROXY,
            "Faultline is at its limit",
            "Faultline refused the request because its in-flight or upstream connection "
            "limit was reached.",
            "Check capacity: the upstream's latency (slow responses pile up), "
            "limits.max_in_flight and the pool size; the client should retry later.",
            hint="Faultline is at limits.max_in_flight — a slow upstream or a traffic spike?",
            hop="inside Faultline",
        ),
        _row(
            Fault.PROXY_LOOP_DETECTED,
            502,
            Layer.PROXY,
            "Request loop detected",
            "The request already passed through this Faultline: the upstream points back "
            "at the proxy itself.",
            "Check the upstream setting: it must point at the application, not at "
            "Faultline's own listen address or a route that leads back to it.",
            hint="the upstream leads back to Faultline itself — check the upstream setting",
            hop="inside Faultline",
        ),
        _row(
            Fault.DESTINATION_NOT_FOUND,
            404,
            Layer.PROXY,
            "No route for this request",
            "No route of Faultline's configuration matches this request's host and path, "
            "and there is no default upstream: Faultline answered it itself, nothing was "
            "sent upstream.",
            "Check the routes (faultline check-config FILE prints them in the order they "
            "are tried): add one for this path or host, fix a path_prefix or host, or set "
            "upstream as the default route.",
            hint="no route matches this host and path — check the routes",
            hop="inside Faultline",
        ),
        _row(
            Fault.PROXY_CONFIGURATION_ERROR,
            502,
            Layer.PROXY,
            "Sent where it cannot go",
            "Faultline's configuration sends this request to an upstream that cannot carry "
            "it: a gRPC call needs HTTP/2 to the upstream (its status travels in trailers), "
            "and the upstream is HTTP/1.1.",
            "Check the upstream setting: gRPC needs an HTTP/2 upstream, h2c://host:port "
            "(HTTP/2 with prior knowledge, what gRPC servers speak), not http://.",
            hint="gRPC needs an HTTP/2 upstream — use h2c:// for {upstream}",
            hop="inside Faultline",
        ),
        _row(
            Fault.PROXY_INTERNAL_ERROR,
            500,
            Layer.PROXY,
            "Faultline failed",
            "Faultline failed this request itself: an internal defect, or its own event "
            "loop stalled across a timeout (the details say which).",
            "A stalled loop (hint proxy_loop_stalled): Faultline was paused or starved of "
            "CPU; check its CPU limit and throttling, and loop_lag_ms in /stats. Otherwise "
            "it is a bug in Faultline: the traceback is in its log under this request id. "
            "Please report it.",
            hint="Faultline itself failed — a stalled loop or a bug; see the details and its log",
            hop="inside Faultline",
        ),
        _row(
            Fault.PROXY_INTERNAL_RESPONSE,
            503,
            Layer.PROXY,
            "Cut by the proxy's shutdown",
            "Faultline was shutting down and its drain deadline passed before this "
            "exchange finished, so Faultline ended it: a 503 if no response had started, "
            "a reset if one had.",
            "The drain deadline cut this exchange: raise timeouts.drain, and the pod's "
            "terminationGracePeriodSeconds with it, above the slowest request you expect.",
            hint="the drain deadline cut this — raise timeouts.drain and the grace period",
            hop="inside Faultline",
        ),
        _row(
            Fault.HTTP_REQUEST_ERROR,
            400,
            Layer.CLIENT,
            "Bad request",
            "The request is not valid HTTP/1.1 or is ambiguous, so it was not forwarded.",
            "Fix the request: check the client's serialisation, headers and framing.",
            hint="malformed request — check the client's serialisation and headers",
            hop="between the client and Faultline",
        ),
        _row(
            Fault.CLIENT_CLOSED_REQUEST,
            None,
            Layer.CLIENT,
            "Client closed the request",
            "The client went away before the response was complete.",
            "Check the client's timeout against the upstream's latency for this path.",
            hint="the client gave up first — its timeout is shorter than the response took",
            source=Source.CLIENT,
            hop="between the client and Faultline",
        ),
    )
}

# The status logged for an exchange the client abandoned (nginx's convention).
CLIENT_CLOSED_STATUS = 499

REQUEST_PROBLEMS: dict[RequestProblem, FaultInfo] = {
    RequestProblem.MALFORMED: TAXONOMY[Fault.HTTP_REQUEST_ERROR],
    RequestProblem.TIMEOUT: _row(
        Fault.HTTP_REQUEST_ERROR,
        408,
        Layer.CLIENT,
        "Request timeout",
        "The client did not send its request headers or body in time.",
        "Check the client's network and upload speed, and idle timeouts of load "
        "balancers in front (timeouts.client_headers / client_body).",
        hint="the client was too slow to send its request",
        hop="between the client and Faultline",
    ),
    RequestProblem.BODY_TOO_LARGE: _row(
        Fault.HTTP_REQUEST_ERROR,
        413,
        Layer.CLIENT,
        "Request body too large",
        "The request body exceeds limits.max_request_body_bytes.",
        "Send a smaller body, or raise the limit at every layer if the size is legitimate.",
        hint="request body over limits.max_request_body_bytes",
        hop="between the client and Faultline",
    ),
    RequestProblem.HEADERS_TOO_LARGE: _row(
        Fault.HTTP_REQUEST_ERROR,
        431,
        Layer.CLIENT,
        "Request headers too large",
        "The request header section exceeds limits.max_request_header_bytes.",
        "Check the client's cookies and headers for growth (too many or too long "
        "cookies are the usual cause).",
        hint="request headers too large — too many or too long cookies?",
        hop="between the client and Faultline",
    ),
    RequestProblem.NOT_IMPLEMENTED: _row(
        Fault.HTTP_REQUEST_ERROR,
        501,
        Layer.CLIENT,
        "Transfer coding not implemented",
        "The request body is sent with a transfer coding other than chunked (RFC 9112 "
        "§6.1), which the proxy does not apply, so it was not forwarded.",
        "Send the body with only `Transfer-Encoding: chunked` (compress it with "
        "Content-Encoding instead), or with a Content-Length.",
        hint="request transfer coding not implemented — send plain chunked",
        hop="between the client and Faultline",
    ),
}

# Upstream faults before any response byte: a reused connection failing this way may be stale.
STALE_CONNECTION_FAULTS = frozenset({Fault.CONNECTION_TERMINATED})


def info(fault: Fault, problem: RequestProblem | None = None) -> FaultInfo:
    """The taxonomy row for a fault (and, for http_request_error, its problem kind)."""
    if problem is not None:
        return REQUEST_PROBLEMS[problem]
    return TAXONOMY[fault]
