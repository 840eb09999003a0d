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

Why a stall happened decides what to check first, so each stall says how much of it the
loop's thread was runnable but not running (`Stall.waiting_ns`, from the kernel's
schedstat, read by the watch): mostly waiting, the process was starved of a CPU (a CPU
limit's throttling, a crowded node); mostly not, its own work or a blocking call held the
loop (a slow callback, a long GC pause, a blocking write).

Rules: pure (no I/O); the watch writes a bounded record (the last `STALLS_KEPT`, merged
where they overlap), nothing per exchange; the rule runs only when a timeout fires.
"""

from __future__ import annotations

from collections import deque
from typing import Final, NamedTuple
from weakref import WeakKeyDictionary

STALL_NS: Final = 50_000_000  # a stretch this long without the loop running is a stall
STALLS_KEPT: Final = 32
EDGE_NS: Final = 20_000_000  # a stall's ends are known to within the watch's interval
DEAF_SHARE: Final = 2  # deaf for 1/2 of the limit up to the deadline: the proxy's fault
UNKNOWN: Final = -1  # no schedstat here: how long the thread waited for a CPU is not known


class Stall(NamedTuple):
    """A stretch without the loop running, `perf_counter_ns` ends; `waiting_ns`: how much
    of it the loop's thread spent runnable but waiting for a CPU (`UNKNOWN` if not known)."""

    start: int
    end: int
    waiting_ns: int = UNKNOWN

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def starved(self) -> bool:
        """Waiting for a CPU for at least half of it: starved, not held by its own work."""
        return self.waiting_ns >= 0 and self.waiting_ns * 2 >= self.end - self.start


DEFER: Final = Stall(0, 0)  # `stall_verdict`: not yet (never a stall: it lasts 0 ns)


class LoopStalls:
    """One loop's recent stalls (`Stall`s), oldest first,
    and when its watch last saw it run (`alive_ns`: a stall still under way, not yet
    noted, is the time since then)."""

    __slots__ = ("alive_ns", "count", "interval_ns", "longest_ns", "polled_ns", "recent")

    def __init__(self, interval_ns: int) -> None:
        self.recent: deque[Stall] = deque(maxlen=STALLS_KEPT)
        self.interval_ns = interval_ns  # how often the watch runs while the loop is free
        self.alive_ns = 0
        self.polled_ns = 0  # when the watch last read its probe: the loop polled I/O then
        self.count = 0  # stalls noted since start (merged ones once)
        self.longest_ns = 0

    def note(self, start: int, end: int, waiting_ns: int = UNKNOWN) -> None:
        """The loop ran nothing from `start` to `end`, its thread waiting for a CPU for
        `waiting_ns` of it (merged with an overlapping stall: the timer and the probe see
        adjacent parts of one stall, measured apart, so their waits add up)."""
        if end - start < STALL_NS:
            return
        waiting_ns = min(waiting_ns, end - start)
        recent = self.recent
        if recent and start <= recent[-1].end:
            first = recent.pop()
            start, end = min(start, first.start), max(end, first.end)
            if waiting_ns >= 0 and first.waiting_ns >= 0:
                waiting_ns = min(end - start, waiting_ns + first.waiting_ns)
            else:
                waiting_ns = max(waiting_ns, first.waiting_ns)
        else:
            self.count += 1
        recent.append(Stall(start, end, waiting_ns))
        self.longest_ns = max(self.longest_ns, end - start)

    def spans(self, now: int) -> list[Stall]:
        """The noted stalls, and one under way since the watch last ran, if any (how long
        it has waited for a CPU is known only once it ends)."""
        out = list(self.recent)
        alive = self.alive_ns
        if alive and now - alive > self.interval_ns + STALL_NS:
            begun = alive + self.interval_ns
            if out and begun <= out[-1].end:
                out[-1] = out[-1]._replace(end=now)
            else:
                out.append(Stall(begun, now))
        return out


def stall_verdict(stalls: LoopStalls | None, start: int, limit: int, now: int) -> Stall | None:
    """`DEFER` (not yet: the loop has not polled I/O since its last stall), the stall that
    makes a timeout the proxy's (see the module's rule), or None: it is not."""
    if stalls is None or not start:
        return None
    deadline = start + limit
    spans = stalls.spans(now)
    if spans and spans[-1].end > stalls.polled_ns and now - deadline < limit:
        return DEFER
    for stall in spans:
        first, last = stall.start, stall.end
        if first - EDGE_NS <= deadline <= last + EDGE_NS:
            deaf = min(deadline, last) - max(first, start)
            if deaf * DEAF_SHARE >= limit and last - first >= STALL_NS:
                return stall
    return None


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
