"""The access log: one JSON object per exchange, or one readable coloured line on a terminal.

Rules:
1. Finished exchanges arrive in batches (`Telemetry.settle`: by a timer, or when the
   batch is full): never a write per request on the hot path.
2. Only the record's own fields are logged; headers are never logged, so Authorization,
   Cookie and Set-Cookie cannot leak; configured query parameters are redacted.
3. Fields beyond the contract's list appear only when they say something: `waited_ms`,
   how long a request was held while the upstream refused connections (`upstream_wait`;
   the same as `phases_ms.wait`), and `wait_expired` when the upstream never accepted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import parse_qsl, quote

import orjson

from ..base.memo import Memo
from ..base.text import MS_TABLE, MS_TABLE_SIZE, ms_text
from ..diagnosis.faults import TAXONOMY
from ..diagnosis.record import Exchange
from .logoutput import LineOutput

LAYERS: Final = {fault: row.layer._value_ for fault, row in TAXONOMY.items()}

REDACTED: Final = "REDACTED"


def redact_target(target: str, secret_params: frozenset[str]) -> str:
    """The request target with the values of secret query parameters replaced."""
    path, sep, query = target.partition("?")
    if not sep or not secret_params:
        return target
    pairs = parse_qsl(query, keep_blank_values=True)
    if not any(name.lower() in secret_params for name, _ in pairs):
        return target
    redacted = "&".join(
        f"{quote(name, safe='')}={REDACTED if name.lower() in secret_params else quote(value)}"
        for name, value in pairs
    )
    return f"{path}?{redacted}"


class Clock:
    """Turns perf_counter_ns marks into wall-clock times (one anchor, taken at start)."""

    def __init__(self) -> None:
        self.offset_ns = time.time_ns() - time.perf_counter_ns()  # mark + offset = wall time
        self.second = -1
        self.prefix = ""
        self.prefix_bytes = b""

    def roll(self, second: int) -> None:
        """The part of the time up to the second is formatted once per second."""
        self.second = second
        self.prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        self.prefix_bytes = self.prefix.encode()

    def iso(self, mark_ns: int) -> str:
        """RFC 3339 UTC with milliseconds."""
        second, millis = divmod((mark_ns + self.offset_ns) // 1_000_000, 1000)
        if second != self.second:
            self.roll(second)
        return f"{self.prefix}.{millis:03d}Z"


def log_record(ex: Exchange, clock: Clock, secret_params: frozenset[str]) -> dict[str, Any]:
    """The JSON access-log object of CONTRACT.md for one finished exchange."""
    fault = ex.fault
    target = ex.target
    record = {
        "time": clock.iso(ex.t_end),
        "request_id": ex.request_id,
        "method": ex.method,
        "path": redact_target(target, secret_params) if "?" in target else target,
        "status": ex.status,
        "source": ex.source._value_,
        "layer": "origin" if fault is None else LAYERS[fault],
        "error": None if fault is None else fault._value_,
        "details": ex.details,
        "upstream": ex.upstream,
        "route": ex.route,
        "client": ex.client,
        "protocol": ex.protocol,
        "bytes_in": ex.body_bytes_in,
        "bytes_out": ex.body_bytes_out,
        "duration_ms": (ex.t_end - ex.t_start) // 1000 / 1000,
        "phases_ms": ex.phases_ms(),
        "reused": ex.reused,
        "retried": ex.retried,
        "hop": ex.hop,
        "hints": list(ex.hints),
    }
    if ex.grpc_status is not None:  # a gRPC call (CONTRACT.md, "HTTP/2 and gRPC")
        record["grpc_status"] = ex.grpc_status
        record["grpc_message"] = ex.grpc_message
    if ex.t_wait:
        record["waited_ms"] = ex.wait_ns() // 1000 / 1000
        if ex.wait_expired:
            record["wait_expired"] = True
    return record


# Its middle, from the method to the client, repeats for a client that asks for the same
# thing again: formatted once per (method, target, status, client, upstream, route,
# redaction, protocol) and remembered (targets up to 1 KiB; 1024 of them), a third of the
# line's cost.
_POOLED_OK_MIDDLE: Final = (
    b'","method":"%s","path":%s,"status":%d,"source":"origin","layer":"origin","error":null,'
    b'"details":null,"upstream":%s,"route":%s,"client":"%s","protocol":"%s","bytes_in":'
)
_MIDDLES: Final[Memo[tuple[Any, ...], bytes]] = Memo(1024, 8)  # keys are 8-tuples: bounded by count
_MIDDLE_MAX_TARGET: Final = 1024
_MILLIS: Final = tuple(b"%03d" % ms for ms in range(1000))
_dumps: Final = orjson.dumps


def _middle_of(key: tuple[Any, ...]) -> bytes:
    method, target, status, client, upstream, route, secret_params, protocol = key
    path = redact_target(target, secret_params) if "?" in target else target
    # request_id (validated or ours), method (llhttp's list) and the client's address
    # need no escaping; the path and the configured upstream go through orjson.
    middle = _POOLED_OK_MIDDLE % (
        method.encode(),
        _dumps(path),
        status,
        _dumps(upstream),
        _dumps(route),
        client.encode(),
        protocol.encode(),
    )
    if len(target) <= _MIDDLE_MAX_TARGET:
        _MIDDLES.remember(key, middle)
    return middle


def json_line_of(ex: Exchange, clock: Clock, secret_params: frozenset[str]) -> bytes:
    """One JSON line for a finished exchange (`log_record`'s object)."""
    t_head = ex.t_response_head
    if not (
        ex.reused
        and t_head
        and ex.fault is None
        and ex.hop is None
        and not ex.t_pool
        and not ex.retried
        and not ex.hints
        and not ex.t_wait
        and ex.details is None
        and ex.grpc_status is None
    ):
        return _dumps(log_record(ex, clock, secret_params)) + b"\n"
    t_end = ex.t_end
    second, millis = divmod((t_end + clock.offset_ns) // 1_000_000, 1000)
    if second != clock.second:
        clock.roll(second)
    key = (
        ex.method,
        ex.target,
        ex.status,
        ex.client,
        ex.upstream,
        ex.route,
        secret_params,
        ex.protocol,
    )
    total_us = (t_end - ex.t_start) // 1000
    ttfb_us = (t_head - ex.t_sent) // 1000
    body_us = (t_end - t_head) // 1000
    # The line of the common exchange: the origin answered on a pooled connection, nothing
    # failed, nothing was diagnosed. It is `log_record`'s object formatted directly as
    # bytes (a test holds the two equal): building the dict for orjson costs twice as
    # much. The format is a literal here with only %s and %d: mypyc compiles that into one
    # copy of the pieces (CPyBytes_Build), where a format held in a name was parsed at
    # every call (3,100 instructions, 7% of a compiled exchange; issue 20).
    return (
        b'{"time":"%s.%sZ","request_id":"%s%s%d,"bytes_out":%d,"duration_ms":%s,"phases_ms":'
        b'{"wait":null,"dns":null,"connect":null,"tls":null,"queue":null,"ttfb":%s,"body":%s},'
        b'"reused":true,"retried":false,"hop":null,"hints":[]}\n'
        % (
            clock.prefix_bytes,
            _MILLIS[millis],
            ex.request_id.encode(),
            _MIDDLES.get(key) or _middle_of(key),
            ex.body_bytes_in,
            ex.body_bytes_out,
            MS_TABLE[total_us] if total_us < MS_TABLE_SIZE else ms_text(total_us),
            MS_TABLE[ttfb_us] if ttfb_us < MS_TABLE_SIZE else ms_text(ttfb_us),
            MS_TABLE[body_us] if body_us < MS_TABLE_SIZE else ms_text(body_us),
        )
    )


LineOf = Callable[[Exchange, Clock, frozenset[str]], bytes]


class AccessLog:
    """Writer of access-log lines, a batch of finished exchanges at a time (one write per
    batch, to a `LineOutput`: never waiting for a slow reader); `line_of` turns an exchange
    into one line (`json_line_of`, or the console's pretty line)."""

    def __init__(
        self,
        output: LineOutput,
        line_of: LineOf,
        secret_params: Iterable[str] = (),
    ) -> None:
        self.output = output
        self.line_of = line_of
        self.secret_params = frozenset(p.lower() for p in secret_params)
        self.clock = Clock()

    def write(self, batch: list[Exchange]) -> None:
        clock, secrets, line_of = self.clock, self.secret_params, self.line_of
        self.output.write(b"".join([line_of(ex, clock, secrets) for ex in batch]))

    def write_raw(self, data: bytes) -> None:
        self.output.write(data)
