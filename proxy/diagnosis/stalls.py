"""The event loop's recent stalls, and the rule that charges a proxy-made timeout to the
proxy when the loop was stalled over its deadline (issue 20).

A stall is a stretch of at least `STALL_NS` in which the loop ran nothing else: the loop
watch (`proxy.telemetry.looplag`) notes one from a timer that fired that late, or from a
probe byte read that late. While the loop is stalled the proxy reads nothing, so an
upstream that answered during the stall is not heard until it ends, and libuv runs due
timers before it polls for I/O: the deadline sweep can fire a timeout before the loop
reads the answer that came in time.

First, a timeout due right after a stall waits for the loop to poll I/O once
(`DEFER`: to the next sweep, at most until twice its limit): an answer that arrived during
the stall is then read and delivered, not lost to a timeout that only ran first.

Then the rule (`stall_verdict`), for a timeout of `limit` whose clock started at `start` and
whose deadline is `start + limit`: the timeout is the proxy's, not the upstream's, when a
stall was under way at the deadline (within `EDGE_NS`, how precisely a stall's ends are
known) and the proxy had been deaf from that stall's start (or the clock's, if later) to
the deadline for at least `1 / DEAF_SHARE` of the limit. A stall that ended before the
deadline blinds nothing: what came during it was read when it ended, and the upstream was
heard silent past its deadline. A stall that began after the deadline only delayed the
verdict. A short stall over a long timeout leaves the upstream heard silent for most of
it, and the upstream stays charged.

Rules: pure (no I/O); the watch writes a bounded record (the last `STALLS_KEPT`, merged
where they overlap), nothing per exchange; the rule runs only when a timeout fires.
"""

from __future__ import annotations

from collections import deque
from typing import Final
from weakref import WeakKeyDictionary

STALL_NS: Final = 50_000_000  # a stretch this long without the loop running is a stall
STALLS_KEPT: Final = 32
EDGE_NS: Final = 20_000_000  # a stall's ends are known to within the watch's interval
DEAF_SHARE: Final = 2  # deaf for 1/2 of the limit up to the deadline: the proxy's fault
DEFER: Final = -1


class LoopStalls:
    """One loop's recent stalls as (start, end) `perf_counter_ns` pairs, oldest first,
    and when its watch last saw it run (`alive_ns`: a stall still under way, not yet
    noted, is the time since then)."""

    __slots__ = ("alive_ns", "count", "interval_ns", "longest_ns", "polled_ns", "recent")

    def __init__(self, interval_ns: int) -> None:
        self.recent: deque[tuple[int, int]] = deque(maxlen=STALLS_KEPT)
        self.interval_ns = interval_ns  # how often the watch runs while the loop is free
        self.alive_ns = 0
        self.polled_ns = 0  # when the watch last read its probe: the loop polled I/O then
        self.count = 0  # stalls noted since start (merged ones once)
        self.longest_ns = 0

    def note(self, start: int, end: int) -> None:
        """The loop ran nothing from `start` to `end` (merged with an overlapping stall)."""
        if end - start < STALL_NS:
            return
        recent = self.recent
        if recent and start <= recent[-1][1]:
            first, last = recent.pop()
            start, end = min(start, first), max(end, last)
        else:
            self.count += 1
        recent.append((start, end))
        self.longest_ns = max(self.longest_ns, end - start)

    def spans(self, now: int) -> list[tuple[int, int]]:
        """The noted stalls, and one under way since the watch last ran, if any."""
        out = list(self.recent)
        alive = self.alive_ns
        if alive and now - alive > self.interval_ns + STALL_NS:
            begun = alive + self.interval_ns
            if out and begun <= out[-1][1]:
                out[-1] = (out[-1][0], now)
            else:
                out.append((begun, now))
        return out


def stall_verdict(stalls: LoopStalls | None, start: int, limit: int, now: int) -> int:
    """`DEFER` (not yet: the loop has not polled I/O since its last stall), the length of
    the stall that makes a timeout the proxy's (see the module's rule), or 0: it is not."""
    if stalls is None or not start:
        return 0
    deadline = start + limit
    spans = stalls.spans(now)
    if spans and spans[-1][1] > stalls.polled_ns and now - deadline < limit:
        return DEFER
    for first, last in spans:
        if first - EDGE_NS <= deadline <= last + EDGE_NS:
            deaf = min(deadline, last) - max(first, start)
            if deaf * DEAF_SHARE >= limit and last - first >= STALL_NS:
                return last - first
    return 0


# Each running loop's record, written by its watch (several proxies in one loop share the
# first one's), read by the deadline sweep when a timeout fires.
_BY_LOOP: WeakKeyDictionary[object, list[LoopStalls]] = WeakKeyDictionary()


def watch_loop(loop: object, stalls: LoopStalls) -> None:
    _BY_LOOP.setdefault(loop, []).append(stalls)


def unwatch_loop(loop: object, stalls: LoopStalls) -> None:
    watched = _BY_LOOP.get(loop)
    if watched is not None and stalls in watched:
        watched.remove(stalls)
        if not watched:
            del _BY_LOOP[loop]


def stalls_of(loop: object) -> LoopStalls | None:
    watched = _BY_LOOP.get(loop)
    return watched[0] if watched else None
