"""What every count of finished exchanges is broken down by, and one route's share.

A count is keyed by (status, source, error token or None): `breakdown` derives by_source,
by_layer, by_error, by_status and by_class from it when read, so they never disagree.
`RouteStats` holds a route's share (`routes`, issue 21) in the same keys, with its
durations by source: `Stats.record_batch` feeds it the common exchange inline (`ok`,
with the bucket it already found) and any other one through `record`.
"""

from __future__ import annotations

from typing import Any, Final

from ..diagnosis.faults import TAXONOMY, Fault, Layer, Source
from .histogram import Histogram

CounterKey = tuple[int, str, str | None]  # (status, source, error token or None)
_ORIGIN: Final = Source.ORIGIN.value


def layer_of(error: str | None) -> str:
    if error is None:
        return Layer.ORIGIN.value
    return TAXONOMY[Fault(error)].layer.value


def status_class(status: int) -> str:
    return f"{status // 100}xx"


def breakdown(counts: dict[CounterKey, int]) -> dict[str, dict[str, int]]:
    by_source: dict[str, int] = {}
    by_layer: dict[str, int] = {}
    by_error: dict[str, int] = {}
    by_status: dict[str, int] = {}
    by_class: dict[str, int] = {}
    for (status, source, error), n in counts.items():
        by_source[source] = by_source.get(source, 0) + n
        layer = layer_of(error)
        by_layer[layer] = by_layer.get(layer, 0) + n
        if error is not None:
            by_error[error] = by_error.get(error, 0) + n
        code = str(status)
        by_status[code] = by_status.get(code, 0) + n
        cls = status_class(status)
        by_class[cls] = by_class.get(cls, 0) + n
    return {
        "by_source": by_source,
        "by_layer": by_layer,
        "by_error": by_error,
        "by_status": dict(sorted(by_status.items())),
        "by_class": dict(sorted(by_class.items())),
    }


class RouteStats:
    """One route's share: its exchanges by (status, source, error) and their durations by
    source, recorded beside the totals. The common exchange is counted by status alone
    (`ok`: an int key, no tuple to hash) and folded into `counts` when they are read."""

    __slots__ = ("_counts", "durations", "ok_counts", "origin")

    def __init__(self) -> None:
        self._counts: dict[CounterKey, int] = {}
        self.ok_counts: dict[int, int] = {}  # status -> common exchanges not yet folded
        self.durations: dict[str, Histogram] = {s.value: Histogram() for s in Source}
        self.origin = self.durations[_ORIGIN]

    @property
    def counts(self) -> dict[CounterKey, int]:
        counts = self._counts
        if self.ok_counts:
            for status, n in self.ok_counts.items():
                key = (status, _ORIGIN, None)
                counts[key] = counts.get(key, 0) + n
            self.ok_counts.clear()
        return counts

    def ok(self, status: int, bucket: int, duration: int) -> None:
        """A common exchange (the origin answered, no fault): `bucket` is its duration's."""
        ok_counts = self.ok_counts
        ok_counts[status] = ok_counts.get(status, 0) + 1
        h = self.origin
        h.counts[bucket] += 1
        h.sum_ns += duration
        if duration > h.max_ns:
            h.max_ns = duration

    def record(self, key: CounterKey, source: str, duration: int) -> None:
        """Any other exchange."""
        self._counts[key] = self._counts.get(key, 0) + 1
        self.durations[source].observe_ns(duration)

    def document(self) -> dict[str, Any]:
        """`/stats` `by_route[name]`: the totals' shape for this route."""
        counts = self.counts
        total = sum(counts.values())
        latency = Histogram.merged(list(self.durations.values()))
        return {
            "requests": {"total": total},
            "responses": breakdown(counts),
            "latency_ms": {
                "total": latency.summary(),
                "by_source": {name: h.summary() for name, h in self.durations.items()},
            },
        }
