"""Fixed-bucket latency histograms: one bucket increment per observation, percentiles
interpolated from the buckets when read (nothing sorted, nothing kept per exchange).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Final

# Bucket upper bounds in seconds: 1-1.5-2-3-5-7 per decade, 50 µs .. 300 s.
BUCKETS_S: Final[tuple[float, ...]] = (
    *(
        round(m * 10.0**e, 9)
        for e in range(-5, 3)
        for m in (1, 1.5, 2, 3, 5, 7)
        if 5e-5 <= m * 10.0**e < 300
    ),
    300.0,
)
BUCKETS_NS: Final = tuple(int(b * 1e9) for b in BUCKETS_S)


class Histogram:
    """Counts per fixed bucket (the last bucket is +Inf), plus sum and max, in seconds.

    `Stats.record_batch` updates `counts`, `sum_ns` and `max_ns` in place (inlined there
    for speed); the number of observations is derived when read.
    """

    __slots__ = ("counts", "max_ns", "sum_ns")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS_NS) + 1)
        self.sum_ns = 0
        self.max_ns = 0

    def observe_ns(self, value_ns: int) -> None:
        self.counts[bisect_left(BUCKETS_NS, value_ns)] += 1
        self.sum_ns += value_ns
        if value_ns > self.max_ns:
            self.max_ns = value_ns

    @property
    def count(self) -> int:
        return sum(self.counts)

    @classmethod
    def merged(cls, parts: list[Histogram]) -> Histogram:
        total = cls()
        for part in parts:
            total.counts = [a + b for a, b in zip(total.counts, part.counts, strict=True)]
            total.sum_ns += part.sum_ns
            total.max_ns = max(total.max_ns, part.max_ns)
        return total

    @property
    def sum_s(self) -> float:
        return self.sum_ns / 1e9

    def quantile_ms(self, q: float) -> float | None:
        """Linear interpolation inside the bucket holding the q-th observation."""
        count = self.count
        if not count:
            return None
        rank = q * count
        seen = 0
        lower = 0.0
        for i, n in enumerate(self.counts):
            upper = BUCKETS_S[i] if i < len(BUCKETS_S) else self.max_ns / 1e9
            if n and seen + n >= rank:
                value = lower + (upper - lower) * ((rank - seen) / n)
                return round(min(value, self.max_ns / 1e9) * 1e3, 3)
            seen += n
            lower = upper
        return round(self.max_ns / 1e6, 3)

    def summary(self) -> dict[str, Any]:
        count = self.count
        return {
            "count": count,
            "p50": self.quantile_ms(0.5),
            "p90": self.quantile_ms(0.9),
            "p99": self.quantile_ms(0.99),
            "max": round(self.max_ns / 1e6, 3) if count else None,
        }
