"""Bounded memos of pure functions whose inputs repeat: origin response heads, request heads
a client sends again, Host values, JSON literals.

A memo is a dict, so a hit on the hot path is one `get`; `remember` keeps memory bounded
by forgetting everything once full (no bookkeeping per hit, unlike an LRU: inputs that
repeat are back within a few exchanges) and by never keeping oversized keys.
"""

from __future__ import annotations

from collections.abc import Sized
from typing import TypeVar

K = TypeVar("K", bound=Sized)
V = TypeVar("V")


class Memo(dict[K, V]):
    __slots__ = ("max_entries", "max_key_len")

    def __init__(self, max_entries: int, max_key_len: int) -> None:
        super().__init__()
        self.max_entries = max_entries
        self.max_key_len = max_key_len

    def remember(self, key: K, value: V) -> None:
        if len(key) > self.max_key_len:
            return
        if len(self) >= self.max_entries:
            self.clear()
        self[key] = value
