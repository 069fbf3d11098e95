"""An optional in-memory response cache: the same image bytes to the same model version, answered once.

Keyed by (model, version, sha256 of the encoded bytes, top_k) and looked up before any decoding, so
a hit costs a hash. A result never crosses versions: the version is in the key, and a swap makes
the old version's keys unreachable (they age out of the LRU). The cache is per process: with
several front-end workers each keeps its own.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CacheKey = tuple[str, int, str, int]
_COUNTER_OF = {"hit": "hits", "miss": "misses", "eviction": "evictions"}


def image_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class CacheCounters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class ResponseCache:
    """A bounded LRU of results.

    Args:
        max_entries: most results kept; 0 turns the cache off (every lookup misses, nothing is kept).
        on_event: called with "hit", "miss" or "eviction" (the metrics hook).
    """

    def __init__(self, max_entries: int, on_event: Callable[[str], None] | None = None) -> None:
        if max_entries < 0:
            raise ValueError(f"max_entries must be >= 0, got {max_entries}")
        self.max_entries = max_entries
        self.counters = CacheCounters()
        self._on_event = on_event
        self._entries: OrderedDict[CacheKey, Any] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey) -> Any | None:
        if not self.enabled:
            return None
        value = self._entries.get(key)
        if value is None:
            self._count("miss")
            return None
        self._entries.move_to_end(key)
        self._count("hit")
        return value

    def put(self, key: CacheKey, value: Any) -> None:
        if not self.enabled:
            return
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self._count("eviction")

    def drop_version(self, model: str, version: int) -> None:
        """Forget every result of one model version (it was unloaded)."""
        for key in [k for k in self._entries if k[0] == model and k[1] == version]:
            del self._entries[key]

    def _count(self, event: str) -> None:
        field = _COUNTER_OF[event]
        setattr(self.counters, field, getattr(self.counters, field) + 1)
        if self._on_event is not None:
            self._on_event(event)
