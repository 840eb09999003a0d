"""Diagnosis beyond the next hop: who, behind the origin, made an error response, and
which statuses are mis-blamed.

Rules:
1. Pure functions over evidence the forwarder collected (the origin's raw response head,
   the first bytes of its body, the request's content type and first body bytes); no I/O.
2. Runs only for origin responses with status >= 400, so a healthy exchange pays nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BODY_SAMPLE_BYTES = 8192  # how much of an error body is kept to recognise its author
REQUEST_SAMPLE_BYTES = 65536  # how much of a JSON request body is kept to judge it

FAULT_BEHIND_ORIGIN = "fault_behind_origin"
ORIGIN_5XX_FOR_CLIENT_ERROR = "origin_5xx_for_client_error"


@dataclass(slots=True)
class Evidence:
    """What the forwarder kept of an origin error response (and of its request)."""

    status: int
    head: bytes  # the origin's status line and header lines, raw
    body: bytearray = field(default_factory=bytearray)  # up to BODY_SAMPLE_BYTES
    request_content_type: bytes | None = None
    request_body: bytes | None = None  # up to REQUEST_SAMPLE_BYTES, JSON requests only


def diagnose(evidence: Evidence) -> tuple[str | None, tuple[str, ...]]:
    """(hop, hints) for an origin error response."""
    hints: list[str] = []
    if evidence.status in (502, 504):
        hints.append(FAULT_BEHIND_ORIGIN)
    return None, tuple(hints)
