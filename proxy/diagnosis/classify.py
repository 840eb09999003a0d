"""Turn an upstream failure into a fault: the phase it happened in plus what the OS said.

Rule 1: this is the one place where failures become faults; the map is ordered, most
specific first. A failure is a fact: an OSError as the OS reported it (errno), an EOF
(None), or one of the `UpstreamError`s below, which the codecs and the pool raise for what
they detect themselves and for what a library reported in its own types (a resolver's
gaierror, an ssl error: `proxy.forward.pool` translates those, so nothing here knows a
socket or ssl type).
Rule 2: pure functions, no I/O: the core reports (phase, failure, facts) and gets a fault
and a one-line detail for Proxy-Status and the logs.
"""

from __future__ import annotations

import errno

from ..base.text import duration_text
from .faults import Fault
from .record import Phase
from .stalls import Stall


class UpstreamError(Exception):
    """Base of the failures the upstream side detects itself (not raised by the OS)."""


class DeadlineExpired(UpstreamError, TimeoutError):
    """A phase's timeout passed (which one is told by the phase): `limit_ns` is how long
    it was, `setting` the configuration key(s) that set it, for the detail."""

    def __init__(self, limit_ns: int = 0, setting: str = "") -> None:
        super().__init__(setting)
        self.limit_ns = limit_ns
        self.setting = setting

    def within(self) -> str:
        """'within 700ms (timeouts.response_headers)', or '' when the limit is unknown."""
        if not self.setting:
            return ""
        return f" within {duration_text(self.limit_ns)} ({self.setting})"


class UploadStalled(DeadlineExpired):
    """The upstream took no request body bytes for the limit (its TCP or HTTP/2 window
    stayed shut), while the client had more to send."""


class LoopStalled(DeadlineExpired):
    """A timeout fired, but the proxy's event loop was stalled over its deadline for most
    of the time `peer` had (`proxy.diagnosis.stalls`): the proxy held the exchange up.
    `stall` is the stall; `instead` the fault charged otherwise."""

    def __init__(
        self, limit_ns: int, setting: str, stall: Stall, instead: Fault, peer: str
    ) -> None:
        super().__init__(limit_ns, setting)
        self.stall = stall
        self.instead = instead
        self.peer = peer

    def detail(self) -> str:
        return (
            f"a timeout of the proxy's own (not charged to {self.peer} as "
            f"{self.instead.value}): its event loop was stalled for "
            f"{duration_text(self.stall.length)} across the deadline of {self.setting} "
            f"({duration_text(self.limit_ns)}), over half the time {self.peer} had"
            f"{stall_cause(self.stall)}"
        )


def stall_cause(stall: Stall) -> str:
    """'; starved: ... waiting for a CPU ...': what the stall's thread did meanwhile, where
    known (what to check first: the CPU the process gets, or its own work)."""
    if stall.waiting_ns < 0:
        return ""
    waited = duration_text(stall.waiting_ns)
    if stall.starved:
        return f"; starved: {waited} of it waiting for a CPU (CPU limit throttling, a busy node)"
    return (
        f"; not starved ({waited} of it waiting for a CPU): its own work or a blocking call "
        "held the loop"
    )


class UpstreamProtocolError(UpstreamError):
    """The upstream sent bytes that are not valid HTTP/1.x."""


class ResponseHeadersTooLarge(UpstreamError):
    """The upstream's response header section exceeded the configured limit."""


class UpgradeBroken(UpstreamError):
    """The upstream answered an Upgrade request with a malformed 101."""


class StreamReset(ConnectionResetError):
    """An HTTP/2 peer reset the exchange's stream (RST_STREAM) or ended the connection
    under it (GOAWAY): `reason` names the frame and its error code. `unprocessed`: the peer
    says it never processed the request (REFUSED_STREAM, or a stream above a GOAWAY's last
    stream id), so it may be sent again whatever its method (RFC 9113 §8.7)."""

    def __init__(self, reason: str, unprocessed: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unprocessed = unprocessed


class NameNotResolved(UpstreamError):
    """Name resolution failed: `rcode` names the answer (NXDOMAIN, NOERROR: no address
    record, SERVFAIL), `temporary` a resolver that could not answer now (EAI_AGAIN)."""

    def __init__(self, rcode: str, temporary: bool = False) -> None:
        super().__init__(rcode)
        self.rcode = rcode
        self.temporary = temporary


class HandshakeFailed(UpstreamError):
    """The TLS handshake failed: `reason` as the TLS library put it, `certificate` when
    the upstream's certificate was rejected."""

    def __init__(self, reason: str, certificate: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.certificate = certificate


def _errno_name(exc: BaseException) -> str:
    code = getattr(exc, "errno", None)
    if isinstance(code, int) and code in errno.errorcode:
        return errno.errorcode[code]
    return type(exc).__name__


def classify(
    phase: Phase,
    error: BaseException | None,
    *,
    response_bytes_seen: bool = False,
    upgrade: bool = False,
) -> tuple[Fault, str]:
    """The fault and a short detail for a failure in `phase`.

    `error` None means the upstream closed the connection cleanly (EOF).
    `response_bytes_seen`: part of the response head had arrived before the failure.
    """
    if isinstance(error, LoopStalled):
        return Fault.PROXY_INTERNAL_ERROR, error.detail()
    if phase is Phase.POOL_WAIT:
        within = error.within() if isinstance(error, DeadlineExpired) else ""
        return (
            Fault.CONNECTION_LIMIT_REACHED,
            f"no upstream connection slot became free{within or ' in time'}",
        )
    if phase is Phase.DNS:
        return _classify_dns(error)
    if phase is Phase.CONNECT:
        return _classify_connect(error)
    if phase is Phase.TLS:
        return _classify_tls(error)
    if phase in (Phase.SEND, Phase.AWAIT_HEAD):
        fault, detail = _classify_before_head(phase, error, response_bytes_seen)
        if upgrade and fault in (Fault.CONNECTION_TERMINATED, Fault.HTTP_PROTOCOL_ERROR):
            return Fault.HTTP_UPGRADE_FAILED, detail
        return fault, detail
    if phase is Phase.TUNNEL:
        return Fault.HTTP_UPGRADE_FAILED, _describe(error, "upstream closed the tunnel")
    # Phase.BODY: the response had started
    if isinstance(error, DeadlineExpired):
        if error.setting:
            limit = duration_text(error.limit_ns)
            return (
                Fault.CONNECTION_READ_TIMEOUT,
                f"upstream sent nothing for {limit} ({error.setting})",
            )
        return Fault.CONNECTION_READ_TIMEOUT, "upstream sent nothing for too long"
    if isinstance(error, UpstreamProtocolError):
        return Fault.HTTP_PROTOCOL_ERROR, f"invalid response body framing: {error}"
    return Fault.HTTP_RESPONSE_INCOMPLETE, _describe(error, "upstream closed mid-body")


def _describe(error: BaseException | None, eof_text: str) -> str:
    if error is None:
        return eof_text
    if isinstance(error, StreamReset):
        return f"{eof_text} ({error.reason})"
    if isinstance(error, ConnectionResetError):
        return f"{eof_text} (connection reset)"
    if isinstance(error, OSError):
        return f"{eof_text} ({_errno_name(error)})"
    return f"{eof_text} ({error})" if str(error) else eof_text


def _classify_dns(error: BaseException | None) -> tuple[Fault, str]:
    if isinstance(error, DeadlineExpired) and error.setting:
        return Fault.DNS_TIMEOUT, f"name resolution did not finish{error.within()}"
    if isinstance(error, TimeoutError):
        return Fault.DNS_TIMEOUT, "name resolution did not finish in time"
    if isinstance(error, NameNotResolved):
        if error.temporary:
            return Fault.DNS_TIMEOUT, "temporary failure in name resolution (EAI_AGAIN)"
        return Fault.DNS_ERROR, error.rcode
    return Fault.DNS_ERROR, "SERVFAIL"


def _classify_connect(error: BaseException | None) -> tuple[Fault, str]:
    if isinstance(error, DeadlineExpired) and error.setting:
        return Fault.CONNECTION_TIMEOUT, f"TCP connect did not finish{error.within()}"
    if isinstance(error, TimeoutError) or getattr(error, "errno", None) == errno.ETIMEDOUT:
        return Fault.CONNECTION_TIMEOUT, "TCP connect timed out (ETIMEDOUT)"
    if isinstance(error, ConnectionRefusedError):
        return Fault.CONNECTION_REFUSED, "connection refused (ECONNREFUSED)"
    # Connected, but the connection never became usable (HTTP/2: no SETTINGS came).
    if isinstance(error, UpstreamProtocolError):
        return Fault.HTTP_PROTOCOL_ERROR, str(error)
    if isinstance(error, ConnectionResetError):
        return Fault.CONNECTION_TERMINATED, _describe(
            error, "upstream closed the connection before it was ready"
        )
    return Fault.CONNECTION_REFUSED, f"connect failed ({_errno_name(error or OSError())})"


def _classify_tls(error: BaseException | None) -> tuple[Fault, str]:
    if isinstance(error, DeadlineExpired) and error.setting:
        return Fault.CONNECTION_TIMEOUT, f"TLS handshake did not finish{error.within()}"
    if isinstance(error, TimeoutError):
        return Fault.CONNECTION_TIMEOUT, "TLS handshake timed out"
    if isinstance(error, HandshakeFailed):
        if error.certificate:
            return Fault.TLS_CERTIFICATE_ERROR, f"certificate rejected: {error.reason}"
        return Fault.TLS_PROTOCOL_ERROR, f"TLS handshake failed: {error.reason}"
    return Fault.TLS_PROTOCOL_ERROR, _describe(error, "connection closed during the TLS handshake")


def _classify_before_head(
    phase: Phase, error: BaseException | None, response_bytes_seen: bool
) -> tuple[Fault, str]:
    if isinstance(error, UploadStalled):
        return (
            Fault.HTTP_RESPONSE_TIMEOUT,
            f"the upstream took no request body bytes{error.within()}: it stopped reading "
            "the upload (its window stayed shut) and never answered",
        )
    if isinstance(error, DeadlineExpired):
        return Fault.HTTP_RESPONSE_TIMEOUT, f"no response headers{error.within() or ' in time'}"
    if isinstance(error, ResponseHeadersTooLarge):
        return Fault.HTTP_RESPONSE_HEADER_SECTION_SIZE, str(error)
    if isinstance(error, UpgradeBroken):
        return Fault.HTTP_UPGRADE_FAILED, str(error)
    if isinstance(error, UpstreamProtocolError):
        return Fault.HTTP_PROTOCOL_ERROR, str(error)
    if response_bytes_seen:
        return (
            Fault.HTTP_PROTOCOL_ERROR,
            _describe(error, "upstream closed inside the response header section"),
        )
    when = "while the request was sent" if phase is Phase.SEND else "before responding"
    return Fault.CONNECTION_TERMINATED, _describe(error, f"upstream closed the connection {when}")
