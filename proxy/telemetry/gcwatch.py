"""How long the cyclic garbage collector holds the process (issue 20): every collection's
pause, timed from `gc.callbacks`' start to its stop, into one histogram per generation;
`/stats` `gc_ms` (count, p50, p99, max, total per generation) and `/metrics`
`faultline_gc_pause_seconds{generation}`.

A collection runs inside whatever allocation crossed the threshold, so its pause holds
the event loop like any other stall (`proxy.server.tune_gc` sets how rarely that is).

Rules: one record per process (the collector is the process's), installed once however
many proxies run in it (`install`/`uninstall` count them); two `perf_counter_ns` calls
and one bucket increment per collection, nothing per exchange.
"""

from __future__ import annotations

import gc
from time import perf_counter_ns
from typing import Any, Final

from .histogram import Histogram

GENERATIONS: Final = ("0", "1", "2")


class GcPauses:
    """The collector's pauses: a histogram per generation, fed by `gc.callbacks`."""

    __slots__ = ("by_generation", "installed", "started_ns")

    def __init__(self) -> None:
        self.by_generation = [Histogram() for _ in GENERATIONS]
        self.started_ns = 0
        self.installed = 0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started_ns = perf_counter_ns()
            return
        started = self.started_ns
        if started:
            self.started_ns = 0
            self.by_generation[info["generation"]].observe_ns(perf_counter_ns() - started)

    def summary(self) -> dict[str, Any]:
        """`/stats` `gc_ms`: per generation, how many collections and how long they held
        the process (p50, p99, max, and in all)."""
        out = {}
        for name, h in zip(GENERATIONS, self.by_generation, strict=True):
            count = h.count
            out[name] = {
                "count": count,
                "p50": h.quantile_ms(0.5),
                "p99": h.quantile_ms(0.99),
                "max": round(h.max_ns / 1e6, 3) if count else None,
                "total": round(h.sum_ns / 1e6, 3),
            }
        return out


GC_PAUSES: Final = GcPauses()


def install() -> None:
    """Start timing collections (a proxy starting in this process)."""
    if not GC_PAUSES.installed:
        gc.callbacks.append(GC_PAUSES)
    GC_PAUSES.installed += 1


def uninstall() -> None:
    """Stop timing them once the last proxy of this process stops."""
    if GC_PAUSES.installed:
        GC_PAUSES.installed -= 1
        if not GC_PAUSES.installed and GC_PAUSES in gc.callbacks:
            gc.callbacks.remove(GC_PAUSES)
            GC_PAUSES.started_ns = 0
