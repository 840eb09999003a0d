"""gRPC's side of attribution, as tables: which gRPC status a proxy-made answer carries
(CONTRACT.md, "HTTP/2 and gRPC"), and which one a client infers from a non-gRPC HTTP
status (gRPC's "HTTP to gRPC status code mapping", doc/http-grpc-status-mapping.md).

Rule: pure data and functions, like the rest of `proxy.diagnosis`.
"""

from __future__ import annotations

from typing import Final

from .faults import Fault, RequestProblem

OK: Final = 0
CANCELLED: Final = 1
UNKNOWN: Final = 2
DEADLINE_EXCEEDED: Final = 4
RESOURCE_EXHAUSTED: Final = 8
UNIMPLEMENTED: Final = 12
INTERNAL: Final = 13
UNAVAILABLE: Final = 14
UNAUTHENTICATED: Final = 16
PERMISSION_DENIED: Final = 7

# gRPC's status codes by number (doc/statuscodes.md), for people reading a log.
NAMES: Final = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)


def name_of(status: int) -> str:
    """`NOT_FOUND` for 5; the number itself for a code gRPC does not define."""
    return NAMES[status] if 0 <= status < len(NAMES) else str(status)


# The gRPC status of each answer the proxy makes itself (faults without a row cannot be
# answered: the response had started, or the client is gone).
_BY_FAULT: Final = {
    Fault.DNS_ERROR: UNAVAILABLE,
    Fault.DNS_TIMEOUT: UNAVAILABLE,
    Fault.CONNECTION_REFUSED: UNAVAILABLE,
    Fault.CONNECTION_TIMEOUT: UNAVAILABLE,
    Fault.TLS_CERTIFICATE_ERROR: UNAVAILABLE,
    Fault.TLS_PROTOCOL_ERROR: UNAVAILABLE,
    Fault.CONNECTION_TERMINATED: UNAVAILABLE,
    Fault.HTTP_PROTOCOL_ERROR: UNAVAILABLE,
    Fault.HTTP_RESPONSE_HEADER_SECTION_SIZE: UNAVAILABLE,
    Fault.HTTP_RESPONSE_TIMEOUT: UNAVAILABLE,
    Fault.HTTP_RESPONSE_INCOMPLETE: UNAVAILABLE,
    Fault.CONNECTION_READ_TIMEOUT: UNAVAILABLE,
    Fault.HTTP_UPGRADE_FAILED: UNAVAILABLE,
    Fault.CONNECTION_LIMIT_REACHED: UNAVAILABLE,
    Fault.PROXY_LOOP_DETECTED: UNAVAILABLE,
    Fault.PROXY_CONFIGURATION_ERROR: UNAVAILABLE,
    Fault.DESTINATION_NOT_FOUND: UNIMPLEMENTED,  # gRPC's own mapping of HTTP 404
    Fault.PROXY_INTERNAL_RESPONSE: UNAVAILABLE,
    Fault.PROXY_INTERNAL_ERROR: INTERNAL,
    Fault.CLIENT_CLOSED_REQUEST: CANCELLED,
}

# gRPC's mapping for an HTTP status that came without a grpc-status.
_BY_HTTP_STATUS: Final = {
    400: INTERNAL,
    401: UNAUTHENTICATED,
    403: PERMISSION_DENIED,
    404: UNIMPLEMENTED,
    429: UNAVAILABLE,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: UNAVAILABLE,
}


def is_grpc(content_type: bytes | None) -> bool:
    """A gRPC call: its request's content-type is application/grpc, alone or with a
    `+format` or parameters (application/grpc-web is another protocol)."""
    if content_type is None:
        return False
    lowered = content_type.lower()
    return lowered[:16] == b"application/grpc" and lowered[16:17] in (b"", b"+", b";")


# grpc-timeout units (PROTOCOL-HTTP2.md: "Timeout → TimeoutValue TimeoutUnit"), in ns.
_TIMEOUT_UNITS: Final = {
    ord("H"): 3_600_000_000_000,
    ord("M"): 60_000_000_000,
    ord("S"): 1_000_000_000,
    ord("m"): 1_000_000,
    ord("u"): 1_000,
    ord("n"): 1,
}


def timeout_ns(value: bytes) -> int | None:
    """A grpc-timeout value (at most 8 digits and a unit) in nanoseconds; None if malformed
    (it is forwarded untouched, and the server judges it)."""
    value = value.strip()
    digits = value[:-1]
    unit = _TIMEOUT_UNITS.get(value[-1]) if value else None
    if unit is None or not 1 <= len(digits) <= 8 or not digits.isdigit():
        return None
    return int(digits) * unit


def status_of_fault(fault: Fault, problem: RequestProblem | None = None) -> int:
    """The grpc-status the proxy answers a failed gRPC call with."""
    if fault is Fault.HTTP_REQUEST_ERROR:
        too_large = problem in (RequestProblem.BODY_TOO_LARGE, RequestProblem.HEADERS_TOO_LARGE)
        return RESOURCE_EXHAUSTED if too_large else INTERNAL
    return _BY_FAULT.get(fault, UNKNOWN)


def status_of_http(status: int) -> int:
    """What a gRPC client makes of an HTTP status that came without a grpc-status."""
    return _BY_HTTP_STATUS.get(status, UNKNOWN)


def message_of_fault(token: str, detail: str | None, proxy_name: str) -> str:
    """The grpc-message of a proxy-made answer: the fault, and that the proxy made it."""
    text = f"{proxy_name} (proxy) answered: {token}"
    return f"{text}: {detail}" if detail else text


def percent_encode(message: str) -> bytes:
    """grpc-message encoding (gRPC's PROTOCOL-HTTP2.md): UTF-8, percent-encoding every byte
    outside printable ASCII and the percent sign itself."""
    out = bytearray()
    for byte in message.encode():
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)
