"""Endpoint store: a bounded map ``peer path -> endpoint`` with SIEVE or FIFO eviction.

As in Mooncake (``MC_ENDPOINT_STORE_TYPE``), the store caps how many endpoints (QP sets) one
device context keeps (``MC_MAX_EP_PER_CTX``).  Eviction only picks the victim: the caller
retires it, and it is destroyed once its in-flight work has drained.

SIEVE (Zhang et al., NSDI '24): entries sit in insertion order with a "visited" bit set on every
hit; a hand walks from the oldest entry towards the newest, clearing visited bits, and evicts
the first unvisited entry, then stays where it stopped.  FIFO evicts the oldest entry.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Any

from mooncake.errors import ConfigError

__all__ = ["EndpointStore", "STORE_TYPES"]

STORE_TYPES = ("SIEVE", "FIFO")


class _Node:
    __slots__ = ("key", "value", "visited", "newer", "older")

    def __init__(self, key: Hashable, value: Any) -> None:
        self.key = key
        self.value = value
        self.visited = False
        self.newer: _Node | None = None
        self.older: _Node | None = None


class EndpointStore:
    """Bounded ``key -> endpoint`` map; not thread-safe (the transport holds its lock)."""

    def __init__(self, capacity: int, policy: str = "SIEVE") -> None:
        policy = str(policy).upper()
        if policy not in STORE_TYPES:
            raise ConfigError(f"MC_ENDPOINT_STORE_TYPE={policy!r} is not allowed; "
                              f"use one of {', '.join(STORE_TYPES)}")
        if capacity < 1:
            raise ConfigError(f"MC_MAX_EP_PER_CTX={capacity} is not allowed; must be >= 1")
        self.capacity = capacity
        self.policy = policy
        self._map: dict[Hashable, _Node] = {}
        self._newest: _Node | None = None
        self._oldest: _Node | None = None
        self._hand: _Node | None = None
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._map)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._map

    def keys(self) -> list[Hashable]:
        """Keys from oldest to newest."""
        return [n.key for n in self._walk()]

    def values(self) -> list[Any]:
        return [n.value for n in self._walk()]

    def _walk(self) -> Iterator[_Node]:
        n = self._oldest
        while n is not None:
            yield n
            n = n.newer

    def get(self, key: Hashable) -> Any:
        """The endpoint for ``key`` or None; a hit marks it visited."""
        n = self._map.get(key)
        if n is None:
            return None
        n.visited = True
        return n.value

    def insert(self, key: Hashable, value: Any) -> list[Any]:
        """Store ``value`` under ``key``; return what was displaced (a replaced entry and/or
        the eviction victim), for the caller to retire."""
        out = []
        old = self.remove(key)
        if old is not None:
            out.append(old)
        if len(self._map) >= self.capacity:
            out.append(self._evict())
        n = _Node(key, value)
        n.older = self._newest
        if self._newest is not None:
            self._newest.newer = n
        self._newest = n
        if self._oldest is None:
            self._oldest = n
        self._map[key] = n
        return out

    def remove(self, key: Hashable, value: Any = None) -> Any:
        """Drop ``key`` (only if it maps to ``value``, when given); the removed endpoint."""
        n = self._map.get(key)
        if n is None or (value is not None and n.value is not value):
            return None
        del self._map[key]
        if self._hand is n:
            self._hand = n.newer
        if n.older is not None:
            n.older.newer = n.newer
        else:
            self._oldest = n.newer
        if n.newer is not None:
            n.newer.older = n.older
        else:
            self._newest = n.older
        n.older = n.newer = None
        return n.value

    def _evict(self) -> Any:
        self.evictions += 1
        if self.policy == "FIFO":
            victim = self._oldest
        else:
            n = self._hand or self._oldest
            while n.visited:
                n.visited = False
                n = n.newer or self._oldest
            victim = n
            self._hand = n.newer
        assert victim is not None
        return self.remove(victim.key)
