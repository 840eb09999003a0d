"""Readable, coloured access-log lines for a human at a terminal.

Rules:
1. One line per exchange: time, status, method, path, duration, who produced it; for a
   fault its token and the taxonomy's short hint (the upstream filled in); for an origin
   error the hop behind the origin and the diagnosis hints; a request held while the
   upstream restarted says how long.
2. After a burst, once traffic pauses (`SUMMARY_IDLE_S`), one summary line of the burst:
   how many responses, who made the errors and which faults. Nothing for a lone request;
   a burst that never pauses is summarised every `SUMMARY_MAX_S`.
3. Nothing a client or an origin sent reaches the terminal unescaped (no control bytes).
4. Colour unless NO_COLOR is set (https://no-color.org).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from ..config import Config
from ..diagnosis import grpc
from ..diagnosis.faults import REQUEST_PROBLEMS, Fault, FaultInfo, Source, info
from ..diagnosis.hops import HINT_TEXT, ORIGIN_5XX_FOR_CLIENT_ERROR, hop_product
from .accesslog import AccessLog, Clock, json_line_of, log_record
from .logoutput import LineOutput
from .sink import Telemetry

if TYPE_CHECKING:
    from ..diagnosis.record import Exchange

RESET = "\x1b[0m"
DIM = "\x1b[2m"
BOLD = "\x1b[1m"
RED = "\x1b[31m"
GREEN = "\x1b[32m"
YELLOW = "\x1b[33m"
MAGENTA = "\x1b[35m"
CYAN = "\x1b[36m"

COLOUR = not os.environ.get("NO_COLOR")
PATH_MAX = 80  # longer paths are shortened on the terminal (the JSON log keeps them whole)
DETAILS_MAX = 72

SUMMARY_IDLE_S = 2.5  # a pause this long ends a burst
SUMMARY_MAX_S = 60.0  # a burst that never pauses is summarised this often
SUMMARY_MIN_RESPONSES = 2  # a lone request gets no summary of its own
SUMMARY_TICK_S = 0.5
TIMES = "\u00d7"  # the multiplication sign, as in "connection_refused (times) 3"

# Control characters (C0, DEL, C1) -> "?": no escape sequence from a request or an origin.
_CONTROL = {i: "?" for i in (*range(0x20), *range(0x7F, 0xA0))}


def _clean(text: str, limit: int = 0) -> str:
    text = text.translate(_CONTROL)
    if limit and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def _status_colour(status: int) -> str:
    if status >= 500:
        return RED
    if status >= 400:
        return YELLOW
    if status >= 300:
        return CYAN
    return GREEN


def _duration(ms: float) -> str:
    return f"{ms:.1f}ms" if ms < 1000 else f"{ms / 1000:.2f}s"


def fault_row(error: str, status: int) -> FaultInfo:
    """The taxonomy row of a logged fault (http_request_error: the row of its status)."""
    fault = Fault(error)
    if fault is Fault.HTTP_REQUEST_ERROR:
        for row in REQUEST_PROBLEMS.values():
            if row.status == status:
                return row
    return info(fault)


def pretty_line_of(ex: Exchange, clock: Clock, secret_params: frozenset[str]) -> bytes:
    """The access log's line maker for a terminal."""
    return pretty_line(log_record(ex, clock, secret_params))


def pretty_line(record: dict[str, Any], colour: bool | None = None) -> bytes:
    """One human line for an access-log record."""
    if colour is None:
        colour = COLOUR
    c = (lambda code: code) if colour else (lambda code: "")
    status = record["status"]
    clock = record["time"][11:19]
    source = record["source"]
    who = {"origin": "origin", "proxy": "PROXY", "client": "client"}[source]
    who_colour = MAGENTA if source == "proxy" else (DIM if source == "origin" else YELLOW)
    path = _clean(record["path"] or "-", PATH_MAX)
    route = record.get("route")
    if route:  # routes: which one served it
        path += f" {c(DIM)}[{_clean(route)}]{c(RESET)}"
    line = (
        f"{c(DIM)}{clock}{c(RESET)} {c(BOLD)}{c(_status_colour(status))}{status}{c(RESET)} "
        f"{_clean(record['method'] or '-'):<6} {path} "
        f"{c(DIM)}{_duration(record['duration_ms'])}{c(RESET)} {c(who_colour)}{who}{c(RESET)}"
    )
    hop = record.get("hop")
    if hop:
        line += f" {c(DIM)}←{c(RESET)} {c(MAGENTA)}{_clean(hop_product(hop))}{c(RESET)}"
    error = record.get("error")
    if error:
        row = fault_row(error, status)
        line += f" {c(RED)}{error}{c(RESET)}"
        hint = row.hint_for(record.get("upstream") or "the upstream")
        if hint:
            line += f" {c(YELLOW)}· {_clean(hint)}{c(RESET)}"
        if record.get("details"):
            line += f" {c(DIM)}({_clean(record['details'], DETAILS_MAX)}){c(RESET)}"
    for hint_token in record.get("hints") or ():
        text = HINT_TEXT.get(hint_token, hint_token)
        if hint_token == ORIGIN_5XX_FOR_CLIENT_ERROR or not error:
            line += f" {c(YELLOW)}· {_clean(text)}{c(RESET)}"
    waited = record.get("waited_ms")
    if waited:
        outcome = (
            "; the upstream never accepted"
            if record.get("wait_expired")
            else " until the upstream accepted"
        )
        line += f" {c(CYAN)}[held {_duration(waited)}{outcome}]{c(RESET)}"
    if record.get("retried"):
        line += f" {c(DIM)}[retried]{c(RESET)}"
    grpc_status = record.get("grpc_status")
    if grpc_status is not None:  # a gRPC call: its outcome, whoever made it
        name = grpc.name_of(grpc_status)
        line += f" {c(DIM if grpc_status == 0 else RED)}grpc {grpc_status} {name}{c(RESET)}"
        message = record.get("grpc_message")
        if message and not error:  # a proxy-made message repeats the fault above
            line += f" {c(DIM)}({_clean(message, DETAILS_MAX)}){c(RESET)}"
    return (line + "\n").encode()


# -- the burst summary ----------------------------------------------------------------------------


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _top(counter: Counter[str], limit: int = 3) -> str:
    items = counter.most_common()
    shown = ", ".join(f"{key} {TIMES}{n}" for key, n in items[:limit])
    return shown + (", …" if len(items) > limit else "")


class BurstSummary:
    """Counts the exchanges of a burst; says them in one line once the burst is over.

    `observe` is a `Telemetry` observer (called once per finished exchange); `tick` is
    called by a timer and returns the summary line when one is due.
    """

    def __init__(self, colour: bool | None = None) -> None:
        self.colour = COLOUR if colour is None else colour
        self._reset()

    def _reset(self) -> None:
        self.count = 0
        self.first_ns = 0
        self.last_ns = 0
        self.ok = 0
        self.origin_4xx = 0
        self.origin_5xx = 0
        self.origin_hops: Counter[str] = Counter()
        self.proxy_errors: Counter[str] = Counter()
        self.cut: Counter[str] = Counter()
        self.client_gone = 0
        self.held = 0
        self.held_max_s = 0.0
        self.mis_blamed = 0

    def observe(self, ex: Exchange) -> None:
        if not self.count:
            self.first_ns = ex.t_start
        self.count += 1
        self.last_ns = max(self.last_ns, ex.t_end)
        fault = ex.fault
        source = ex.source
        if source is Source.PROXY:
            self.proxy_errors[fault.value if fault is not None else "?"] += 1
        elif source is Source.CLIENT:
            self.client_gone += 1
        elif fault is not None:
            self.cut[fault.value] += 1
        elif ex.status >= 500:
            self.origin_5xx += 1
            if ex.hop:
                self.origin_hops[hop_product(ex.hop)] += 1
        elif ex.status >= 400:
            self.origin_4xx += 1
        else:
            self.ok += 1
        if ex.t_wait:
            self.held += 1
            self.held_max_s = max(self.held_max_s, ex.wait_ns() / 1e9)
        if ORIGIN_5XX_FOR_CLIENT_ERROR in ex.hints:
            self.mis_blamed += 1

    def tick(self, now_ns: int) -> bytes | None:
        """The summary line if the burst is over (or has run for SUMMARY_MAX_S), else None."""
        if not self.count:
            return None
        idle = now_ns - self.last_ns >= SUMMARY_IDLE_S * 1e9
        long = now_ns - self.first_ns >= SUMMARY_MAX_S * 1e9
        if not (idle or long):
            return None
        line = self.line() if self.count >= SUMMARY_MIN_RESPONSES else None
        self._reset()
        return line

    def line(self) -> bytes:
        c = (lambda code: code) if self.colour else (lambda code: "")
        span_s = max((self.last_ns - self.first_ns) / 1e9, 0.0)
        span = f"{span_s:.1f}s" if span_s < 10 else f"{span_s:.0f}s"
        parts = [f"{c(BOLD)}{_plural(self.count, 'response')}{c(RESET)}"]
        if self.ok:
            parts.append(f"{c(GREEN)}{self.ok} ok{c(RESET)}")
        if self.origin_4xx:
            parts.append(f"{c(YELLOW)}{self.origin_4xx} origin 4xx{c(RESET)}")
        if self.origin_5xx:
            text = f"{self.origin_5xx} origin 5xx"
            if self.origin_hops:
                text += f" (behind it: {_top(self.origin_hops)})"
            parts.append(f"{c(RED)}{text}{c(RESET)}")
        if self.mis_blamed:
            parts.append(
                f"{c(YELLOW)}{self.mis_blamed} of them for invalid JSON (should be 4xx){c(RESET)}"
            )
        if self.proxy_errors:
            n = sum(self.proxy_errors.values())
            parts.append(f"{c(MAGENTA)}{n} from the proxy ({_top(self.proxy_errors)}){c(RESET)}")
        if self.cut:
            n = sum(self.cut.values())
            parts.append(f"{c(RED)}{n} cut mid-body ({_top(self.cut)}){c(RESET)}")
        if self.client_gone:
            parts.append(f"{c(YELLOW)}{self.client_gone} abandoned by the client{c(RESET)}")
        if self.held:
            parts.append(
                f"{c(CYAN)}{self.held} held for the upstream "
                f"(up to {self.held_max_s:.1f}s){c(RESET)}"
            )
        rule = f"{c(DIM)}──{c(RESET)}"
        return f"{rule} last {span}: {' · '.join(parts)} {rule}\n".encode()


class ConsoleSummary:
    """A `BurstSummary` wired to a running proxy: observer, timer, and the log's stream."""

    def __init__(
        self, telemetry: Telemetry, access_log: AccessLog, summary: BurstSummary | None = None
    ) -> None:
        self.telemetry = telemetry
        self.access_log = access_log
        self.summary = summary or BurstSummary()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(SUMMARY_TICK_S)
            self.emit(time.perf_counter_ns())

    def emit(self, now_ns: int) -> None:
        line = self.summary.tick(now_ns)
        if line is None:
            return
        self.telemetry.settle()  # the burst's own lines first
        self.access_log.write_raw(line)


def make_access_log(
    config: Config, stream: Any = None, whole_lines: bool = False
) -> AccessLog | None:
    """The access log `config.log` asks for (None: off, --quiet, or diagnostics off):
    pretty lines at a terminal, JSON lines otherwise, unless `log.format` says which;
    `whole_lines` when other processes write to the same stream (`LineOutput`)."""
    if not config.log.access or config.log.quiet or not config.diagnostics:
        return None
    stream = stream or sys.stdout.buffer
    fmt = config.log.format
    if fmt == "auto":
        fmt = "pretty" if os.isatty(stream.fileno()) else "json"
    line_of = pretty_line_of if fmt == "pretty" else json_line_of
    return AccessLog(LineOutput(stream, whole_lines), line_of, config.log.redact_query)


def install_summary(telemetry: Telemetry) -> ConsoleSummary | None:
    """Add the burst summary to a running proxy's telemetry whose access log is pretty.

    The summary observes every finished exchange (`Telemetry.observers`) and runs its own
    timer in the running loop; with JSON lines, --quiet or no access log it is not added.
    """
    access_log = telemetry.access_log
    if access_log is None or access_log.line_of is not pretty_line_of:
        return None
    console = ConsoleSummary(telemetry, access_log)
    telemetry.observers.append(console.summary.observe)
    console.start()
    return console
