"""The sink the forwarding core is given at start-up: every finished exchange goes through
`Telemetry.record`, then in batches to the stats, the access log and any observers.

Rules:
1. `record` only queues the exchange; `settle` hands the queue to the sinks in one batch,
   and whoever reads the stats settles first.
2. A defect in one sink never stops the others, the sweep, or the exchange.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Final

from ..diagnosis.record import Exchange
from .accesslog import AccessLog
from .stats import Stats

log: Final = logging.getLogger("faultline")

# Finished exchanges held before the sinks take them (the sweep settles sooner when idle).
BATCH_MAX: Final = 512


class Telemetry:
    """The sinks every finished exchange goes to: stats, the access log, observers."""

    def __init__(
        self,
        stats: Stats,
        access_log: AccessLog | None,
        observers: list[Callable[[Exchange], None]] | None = None,
    ) -> None:
        self.stats = stats
        self.access_log = access_log
        self.observers = observers or []
        self.pending: list[Exchange] = []

    def record(self, ex: Exchange) -> None:
        pending = self.pending
        pending.append(ex)
        if len(pending) >= BATCH_MAX:
            self.settle()

    def settle(self) -> None:
        batch = self.pending
        if not batch:
            return
        self.pending = []
        sinks: list[Callable[[list[Exchange]], None]] = [self.stats.record_batch]
        if self.access_log is not None:
            sinks.append(self.access_log.write)
        sinks += (partial(_each, observer) for observer in self.observers)
        for sink in sinks:
            try:
                sink(batch)
            except Exception:  # a defect in one sink must not stop the others or the sweep
                log.exception("internal error while recording %d exchanges", len(batch))


def _each(observer: Callable[[Exchange], None], batch: list[Exchange]) -> None:
    for ex in batch:
        observer(ex)
