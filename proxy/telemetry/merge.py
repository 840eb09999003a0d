"""Several workers' telemetry as one: what each worker process exports (`state_of`) and how
the supervisor adds those exports into one `Stats` that `/stats` and `/metrics` render
(`absorb`), so the merge is exact.

Rules:
1. A state is plain data (dicts, lists, ints): counters as they are, histograms as their
   bucket counts, sum and max. Merging adds counters and bucket counts and takes the larger
   max; percentiles are read from the merged buckets afterwards, never averaged.
2. The windows' per-second slots are keyed by the monotonic clock's second
   (`perf_counter_ns`, CLOCK_MONOTONIC: one clock for every process of the machine), so the
   same second of two workers lands in one slot.
3. `recent_errors` is the newest N of all workers' entries, by their wall-clock time.
4. Nothing here runs per exchange: a worker builds its state when the supervisor asks.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from .breakdown import RouteStats
from .gcwatch import GcPauses
from .histogram import Histogram
from .looplag import LoopLag
from .metrics import ProtocolSplit
from .sink import Telemetry
from .stats import Stats

State = dict[str, Any]


def _hist(h: Histogram) -> tuple[list[int], int, int]:
    return (list(h.counts), h.sum_ns, h.max_ns)


def _add_hist(into: Histogram, part: tuple[list[int], int, int]) -> None:
    counts, sum_ns, max_ns = part
    into.counts = [a + b for a, b in zip(into.counts, counts, strict=True)]
    into.sum_ns += sum_ns
    into.max_ns = max(into.max_ns, max_ns)


def _add_counts(into: dict[Any, int], part: dict[Any, int]) -> None:
    for key, n in part.items():
        into[key] = into.get(key, 0) + n


def state_of(telemetry: Telemetry, pool: tuple[int, int]) -> State:
    """Everything this process counted, settled first, as plain data."""
    telemetry.settle()
    stats = telemetry.stats
    split = ProtocolSplit.of(telemetry)
    lag = stats.loop_lag
    return {
        "total": stats.total,
        "retries": stats.retries,
        "held": stats.held,
        "held_expired": stats.held_expired,
        "log_dropped": stats.log_dropped,
        "h2": stats.h2,
        "in_flight": stats.gauges.in_flight,
        "refused_connections": stats.gauges.refused_connections,
        "counts": dict(stats.counts),
        "grpc_counts": dict(stats.grpc_counts),
        "hop_counts": dict(stats.hop_counts),
        "durations": {k: _hist(h) for k, h in stats.duration_by_source.items()},
        "phases": {k: _hist(h) for k, h in stats.phases.items()},
        "slots": [(second, dict(counts)) for second, counts in stats._slots],
        "recent": list(stats.recent),
        "lag_total": _hist(lag.total),
        "lag_seconds": [(second, _hist(h)) for second, h in lag.seconds],
        "stalls": (lag.stalls.count, lag.stalls.longest_ns, list(lag.stalls.recent)),
        "split_counts": dict(split.counts),
        "split_durations": {k: _hist(h) for k, h in split.durations.items()},
        "split_route_counts": dict(split.route_counts),
        "split_route_durations": {k: _hist(h) for k, h in split.route_durations.items()},
        "gc": [_hist(h) for h in stats.gc.by_generation],
        "routes": {
            name: (dict(route.counts), {k: _hist(h) for k, h in route.durations.items()})
            for name, route in stats.routes.items()
        },
        "pool": pool,
    }


def reset(telemetry: Telemetry) -> None:
    """Empty the supervisor's stats (kept: when it started) before the states are added."""
    old = telemetry.stats
    fresh = Stats(old.recent.maxlen or 100)
    fresh.started_at, fresh.started_ns = old.started_at, old.started_ns
    fresh.gc = GcPauses()  # the workers' pauses, added up (not this process's own)
    telemetry.stats = fresh
    split = ProtocolSplit.of(telemetry)
    split.counts.clear()
    split.durations = {k: Histogram() for k in split.durations}
    split.route_counts.clear()
    split.route_durations.clear()


def absorb(telemetry: Telemetry, state: State) -> None:
    """Add one worker's state into the supervisor's stats."""
    stats = telemetry.stats
    for name in ("total", "retries", "held", "held_expired", "log_dropped", "h2"):
        setattr(stats, name, getattr(stats, name) + state[name])
    stats.gauges.in_flight += state["in_flight"]
    stats.gauges.refused_connections += state["refused_connections"]
    _add_counts(stats.counts, state["counts"])
    _add_counts(stats.grpc_counts, state["grpc_counts"])
    _add_counts(stats.hop_counts, state["hop_counts"])
    for name, part in state["durations"].items():
        _add_hist(stats.duration_by_source[name], part)
    for name, part in state["phases"].items():
        _add_hist(stats.phases[name], part)
    _merge_slots(stats, state["slots"])
    recent = sorted([*stats.recent, *state["recent"]], key=lambda e: e["time"], reverse=True)
    stats.recent = deque(recent[: stats.recent.maxlen], maxlen=stats.recent.maxlen)
    _merge_lag(stats.loop_lag, state)
    for h, part in zip(stats.gc.by_generation, state["gc"], strict=True):
        _add_hist(h, part)
    for name, (counts, durations) in state["routes"].items():
        route = stats.routes.get(name)
        if route is None:
            route = stats.routes[name] = RouteStats()
        _add_counts(route.counts, counts)
        for source, part in durations.items():
            _add_hist(route.durations[source], part)
    split = ProtocolSplit.of(telemetry)
    _add_counts(split.counts, state["split_counts"])
    for name, part in state["split_durations"].items():
        _add_hist(split.durations[name], part)
    _add_counts(split.route_counts, state["split_route_counts"])
    for key, part in state["split_route_durations"].items():
        _add_hist(split.route_durations.setdefault(key, Histogram()), part)


def _merge_slots(stats: Stats, slots: list[tuple[int, dict[Any, int]]]) -> None:
    by_second: dict[int, dict[Any, int]] = {second: counts for second, counts in stats._slots}
    for second, counts in slots:
        _add_counts(by_second.setdefault(second, {}), counts)
    stats._slots = deque([second, by_second[second]] for second in sorted(by_second))


def _merge_lag(lag: LoopLag, state: State) -> None:
    _add_hist(lag.total, state["lag_total"])
    by_second = dict(lag.seconds)
    for second, part in state["lag_seconds"]:
        _add_hist(by_second.setdefault(second, Histogram()), part)
    lag.seconds = deque((second, by_second[second]) for second in sorted(by_second))
    stalls = lag.stalls  # each worker's stalls, side by side (one clock: the machine's)
    count, longest_ns, recent = state["stalls"]
    stalls.count += count
    stalls.longest_ns = max(stalls.longest_ns, longest_ns)
    kept = stalls.recent.maxlen
    stalls.recent = deque(sorted([*stalls.recent, *recent])[-(kept or 1) :], maxlen=kept)
