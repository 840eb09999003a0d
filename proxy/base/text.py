"""How Faultline writes times: durations in milliseconds, configured durations as a user
wrote them, and the HTTP date. Pure functions (the date is cached for one second)."""

from __future__ import annotations

from email.utils import formatdate
from time import time
from typing import Final

# Every whole microsecond below MS_TABLE_SIZE as milliseconds with three decimals: the
# Server-Timing of a typical exchange is two lookups instead of two float formats (those
# were ~5% of an exchange's instructions). ~190 KB.
MS_TABLE_SIZE: Final = 4096
MS_TABLE: Final = tuple(b"%d.%03d" % divmod(us, 1000) for us in range(MS_TABLE_SIZE))


def ms_text(us: int) -> bytes:
    """Microseconds as milliseconds with three decimals ("0.150")."""
    if us < MS_TABLE_SIZE:
        return MS_TABLE[us]
    return b"%d.%03d" % (us // 1000, us % 1000)


def duration_text(ns: int) -> str:
    """A configured duration as its user wrote it: 700ms, 5s, 1.5s, 2m."""
    ms = round(ns / 1e6)
    if ms < 1000:
        return f"{ms}ms"
    if ms % 60_000 == 0 and ms >= 120_000:
        return f"{ms // 60_000}m"
    return f"{ms / 1000:g}s"


_date_cache: tuple[int, bytes] = (-1, b"")


def http_date() -> bytes:
    """The IMF-fixdate for now (RFC 9110 §5.6.7), recomputed at most once a second."""
    global _date_cache
    now = int(time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True).encode())
    return _date_cache[1]
