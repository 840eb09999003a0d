"""The live counts the forwarding core keeps and the stats report: one object, shared.

Why an object of its own: the core updates `in_flight` twice per exchange; as a concrete
class the compiled core reads and writes it directly, where a structural type (a protocol
the stats satisfy) costs a generic attribute lookup each time.
"""

from __future__ import annotations


class Gauges:
    __slots__ = ("in_flight", "refused_connections")

    def __init__(self) -> None:
        self.in_flight = 0  # exchanges started and not finished
        self.refused_connections = 0  # client connections closed unread (max_connections)
