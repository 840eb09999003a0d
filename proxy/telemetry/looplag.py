"""The proxy watching its own event loop: how late it gets to an event that is due (Envoy's
watchdog misses, Node's `monitorEventLoopDelay`).

Every `INTERVAL_S` a timer writes one byte into a socket pair whose other end the loop
reads. A sample is the time from that write to the read callback: how long an I/O event
that became ready waited behind the loop's other work of that turn (callbacks, other
connections' reads, bookkeeping), which is what a client's request waits for too.
Measured with `perf_counter_ns` from the write: libuv's timers are millisecond-granular
(measured against their due time, an idle loop showed a p99 of 2.9 ms of pure timer
rounding), so the timer only says when to sample.

A stall between two samples delays the timer itself, and the byte written after it comes
back at once: so the timer's own lateness beyond `TIMER_SLACK_NS` (libuv's rounding, as
measured on an idle loop) is added to the sample it starts, and a stall of any length is
seen. A stretch of at least `STALL_NS` without the loop running (a timer that late, or a
byte read that late) is noted in `LoopLag.stalls` (`proxy.diagnosis.stalls`: the last few,
bounded), which the deadline sweep consults when a timeout fires, and `/stats` shows, with
how much of it the loop's thread waited for a CPU (`CpuWait`: the kernel's schedstat, read
once at each write and each read of the byte, ~0.4 µs each).

Rules: one sample per interval, one histogram per second for the windows (the last
`WINDOW_MAX_S` of them) and one for the whole run; nothing per exchange.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections import deque
from time import perf_counter_ns, time
from typing import Any, Final

from ..diagnosis.stalls import STALL_NS, UNKNOWN, LoopStalls, unwatch_loop, watch_loop
from .histogram import Histogram

INTERVAL_S: Final = 0.02  # 50 samples a second: a stall of a few ms is seen within a second
INTERVAL_NS: Final = int(INTERVAL_S * 1e9)
TIMER_SLACK_NS: Final = 5_000_000  # an idle loop's timer fired up to ~4 ms late (rounding)
WINDOWS_S: Final = (60, 300)
WINDOW_MAX_S: Final = max(WINDOWS_S)


class LoopLag:
    """The lag samples: a histogram for the run and one per second for the windows."""

    def __init__(self) -> None:
        self.total = Histogram()
        self.seconds: deque[tuple[int, Histogram]] = deque()
        self.stalls = LoopStalls(INTERVAL_NS)

    def observe(self, lag_ns: int, now_ns: int) -> None:
        self.total.observe_ns(lag_ns)
        second = now_ns // 1_000_000_000
        seconds = self.seconds
        if not seconds or seconds[-1][0] != second:
            seconds.append((second, Histogram()))
            while seconds[0][0] <= second - WINDOW_MAX_S:
                seconds.popleft()
        seconds[-1][1].observe_ns(lag_ns)

    def summary(self, now_ns: int) -> dict[str, Any]:
        """`/stats` `loop_lag_ms`: p50, p99, max and the sample count, per window and in all."""
        second = now_ns // 1_000_000_000
        out = {}
        for span in WINDOWS_S:
            parts = [h for s, h in self.seconds if s > second - span]
            out[f"{span}s"] = _summary(Histogram.merged(parts))
        out["total"] = _summary(self.total)
        out["stalls"] = _stalls(self.stalls, now_ns)
        return out


def _summary(h: Histogram) -> dict[str, Any]:
    count = h.count
    return {
        "samples": count,
        "p50": h.quantile_ms(0.5),
        "p99": h.quantile_ms(0.99),
        "max": round(h.max_ns / 1e6, 3) if count else None,
    }


def _stalls(stalls: LoopStalls, now_ns: int) -> dict[str, Any]:
    """`loop_lag_ms.stalls`: how many stalls of at least 50 ms, the longest, and the last
    few (newest first), each with its wall-clock start and length."""
    wall = time() - now_ns / 1e9
    return {
        "count": stalls.count,
        "longest": round(stalls.longest_ns / 1e6, 3) if stalls.count else None,
        "recent": [
            {
                "at": round(wall + stall.start / 1e9, 3),
                "ms": round(stall.length / 1e6, 3),
                "cpu_wait_ms": (
                    round(stall.waiting_ns / 1e6, 3) if stall.waiting_ns >= 0 else None
                ),
            }
            for stall in reversed(stalls.recent)
        ],
    }


class CpuWait:
    """How long the thread that made it has waited, runnable, for a CPU since it started
    (ns): the second figure of Linux's `/proc/thread-self/schedstat`. `UNKNOWN` where the
    kernel does not say (another OS, no CONFIG_SCHED_INFO)."""

    PATH: Final = "/proc/thread-self/schedstat"

    def __init__(self) -> None:
        try:
            self.fd = os.open(self.PATH, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.fd = -1

    def read_ns(self) -> int:
        if self.fd < 0:
            return UNKNOWN
        try:
            return int(os.pread(self.fd, 96, 0).split()[1])
        except (OSError, ValueError, IndexError):
            return UNKNOWN

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class LoopWatch:
    """Samples the loop's lag into a `LoopLag` while it runs (`start`/`stop`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, lag: LoopLag) -> None:
        self.loop = loop
        self.lag = lag
        self.reader: socket.socket | None = None
        self.writer: socket.socket | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.sent_ns = 0  # when the byte on its way was written
        self.late_ns = 0  # how late the timer that wrote it fired, beyond the slack
        self.due_ns = 0  # when the timer is due
        self.stalls = lag.stalls
        self.cpu_wait: CpuWait | None = None
        self.waited_ns = UNKNOWN  # the thread's CPU wait when the watch last ran
        self.sent_waited_ns = UNKNOWN  # ... when the byte on its way was written

    def start(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)
        self.loop.add_reader(self.reader.fileno(), self._woken)
        self.cpu_wait = CpuWait()  # opened on the loop's thread: its schedstat
        self.waited_ns = self.cpu_wait.read_ns()
        self._arm(perf_counter_ns())
        watch_loop(self.loop, self.stalls)

    def _arm(self, now: int) -> None:
        self.due_ns = now + INTERVAL_NS
        self.stalls.alive_ns = now
        self.timer = self.loop.call_later(INTERVAL_S, self._tick)

    def stop(self) -> None:
        unwatch_loop(self.loop, self.stalls)
        self.stalls.alive_ns = 0
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.reader is not None:
            with contextlib.suppress(Exception):  # the loop may be closing
                self.loop.remove_reader(self.reader.fileno())
            self.reader.close()
            self.reader = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.cpu_wait is not None:
            self.cpu_wait.close()
            self.cpu_wait = None

    def _waited(self) -> tuple[int, int]:
        """The thread's CPU wait now, and since the watch last ran (`UNKNOWN` if unknown)."""
        cpu_wait = self.cpu_wait
        now = cpu_wait.read_ns() if cpu_wait is not None else UNKNOWN
        before, self.waited_ns = self.waited_ns, now
        return now, (now - before if now >= 0 and before >= 0 else UNKNOWN)

    def _tick(self) -> None:
        now = perf_counter_ns()
        late = now - self.due_ns
        waited, since = self._waited()
        if late >= STALL_NS:
            # It ran nothing from the due time to now. The thread's CPU wait is known since
            # the watch last ran, at most an interval before the due time.
            self.stalls.note(self.due_ns, now, since)
        self._arm(now)
        writer = self.writer
        if writer is not None and not self.sent_ns:
            self.sent_ns = now
            self.sent_waited_ns = waited
            self.late_ns = late if late > TIMER_SLACK_NS else 0
            with contextlib.suppress(BlockingIOError, InterruptedError):
                writer.send(b"\0")

    def _woken(self) -> None:
        now = perf_counter_ns()
        waited, _ = self._waited()
        self.stalls.polled_ns = now
        reader = self.reader
        if reader is not None:
            with contextlib.suppress(BlockingIOError, InterruptedError):
                reader.recv(64)
        sent = self.sent_ns
        if sent:
            self.sent_ns = 0
            lag = now - sent
            if lag >= STALL_NS:
                before = self.sent_waited_ns
                self.stalls.note(
                    sent, now, waited - before if before >= 0 and waited >= 0 else UNKNOWN
                )
            self.lag.observe(lag + self.late_ns, now)
