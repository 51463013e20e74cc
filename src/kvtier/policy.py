"""Eviction policies: pure bookkeeping over hashable keys, no data, no I/O, no locks.

A policy holds the keys its owner (the store, on the scheduler thread) tells it about and picks
victims when the owner needs room; it never evicts on its own. The owner decides what may be
evicted (leases, pending states) through the ``is_evictable`` predicate it passes.

- ``lru``: least recently inserted or touched first.
- ``s3fifo``: S3-FIFO (Yang et al., SOSP 2023): a small FIFO (about 10% of capacity) that
  filters one-hit keys, a main FIFO with a 2-bit hit counter (reinsertion instead of promotion),
  and a ghost FIFO of keys recently evicted from the small queue. Scan resistant: a one-pass
  scan flows through the small queue without displacing keys that were hit.
"""

from __future__ import annotations

import abc
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

POLICY_NAMES = ("lru", "s3fifo")


class EvictionPolicy(abc.ABC, Generic[K]):
    """The interface every policy implements. Single-threaded: the caller serialises calls."""

    @abc.abstractmethod
    def insert(self, key: K) -> None:
        """Start tracking ``key``, which must be absent (ValueError otherwise). Never evicts."""

    @abc.abstractmethod
    def touch(self, key: K) -> None:
        """Record a hit on ``key``. A key the policy does not hold is ignored."""

    @abc.abstractmethod
    def remove(self, key: K) -> None:
        """Stop tracking ``key`` (dropped by its owner, not evicted). No-op if absent."""

    @abc.abstractmethod
    def choose_victim(self, is_evictable: Callable[[K], bool]) -> K | None:
        """Pick a present key for which ``is_evictable`` is true, remove it and return it.

        If None is returned, no key is evictable and no state changes are made.
        ``is_evictable`` must be pure; it may be called several times per key. Always
        terminates; O(n) in the worst case (every key leased), amortised O(1) when few are.
        """

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of keys held (ghost history not included)."""

    @abc.abstractmethod
    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is held (ghost history not included)."""


def make_policy(name: str, capacity_entries: int) -> EvictionPolicy:
    """The policy called ``name`` for a tier of ``capacity_entries`` entries."""
    if capacity_entries < 1:
        raise ValueError(f"capacity_entries must be positive, got {capacity_entries}")
    if name == "lru":
        return LRUPolicy()
    if name == "s3fifo":
        return S3FIFOPolicy(capacity_entries)
    raise ValueError(f"unknown eviction policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")


class LRUPolicy(EvictionPolicy[K]):
    """Least recently used first. Leased keys are usually recently touched, so the scan from the
    old end rarely passes many of them."""

    def __init__(self) -> None:
        self._order: OrderedDict[K, None] = OrderedDict()  # oldest first

    def insert(self, key: K) -> None:
        _require_absent(self, key)
        self._order[key] = None

    def touch(self, key: K) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: K) -> None:
        self._order.pop(key, None)

    def choose_victim(self, is_evictable: Callable[[K], bool]) -> K | None:
        for key in self._order:
            if is_evictable(key):
                del self._order[key]
                return key
        return None

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order


class S3FIFOPolicy(EvictionPolicy[K]):
    """S3-FIFO over three FIFOs: small, main (key -> hit count, capped at 3) and ghost.

    A key found in ghost on insert goes to main. A small-queue key hit at least once moves to main
    when it reaches the old end; a main key with hits is reinserted with one hit fewer. A key that
    is not evictable is passed over (rotated to the young end of its queue, count unchanged).
    """

    MAX_FREQ = 3

    def __init__(self, capacity_entries: int) -> None:
        self._small_target = max(1, capacity_entries // 10)
        self._ghost_capacity = capacity_entries
        self._small: OrderedDict[K, int] = OrderedDict()  # oldest first; value = hits
        self._main: OrderedDict[K, int] = OrderedDict()
        self._ghost: OrderedDict[K, None] = OrderedDict()

    def insert(self, key: K) -> None:
        _require_absent(self, key)
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = 0
        else:
            self._small[key] = 0

    def touch(self, key: K) -> None:
        for queue in (self._small, self._main):
            if key in queue:
                queue[key] = min(queue[key] + 1, self.MAX_FREQ)
                return

    def remove(self, key: K) -> None:
        if self._small.pop(key, None) is None:
            self._main.pop(key, None)

    def choose_victim(self, is_evictable: Callable[[K], bool]) -> K | None:
        # Checked first so that a None result leaves the queues untouched.
        if not self._has_evictable(is_evictable):
            return None
        prefer_small = len(self._small) >= self._small_target or not self._main
        # If an evictable key exists, the last step of each sequence finds one: a small pass
        # either evicts or moves every evictable small key into main.
        steps = (self._evict_small, self._evict_main) if prefer_small else (
            self._evict_main, self._evict_small, self._evict_main)
        for step in steps:
            victim = step(is_evictable)
            if victim is not None:
                return victim
        raise AssertionError("an evictable key was found but no victim was chosen")

    def _evict_small(self, is_evictable: Callable[[K], bool]) -> K | None:
        """One pass over small: hit keys move to main, an evictable unhit key goes to ghost."""
        for _ in range(len(self._small)):
            key, hits = self._small.popitem(last=False)
            if hits > 0:
                self._main[key] = 0
            elif is_evictable(key):
                self._remember(key)
                return key
            else:
                self._small[key] = hits
        return None

    def _evict_main(self, is_evictable: Callable[[K], bool]) -> K | None:
        """Rotate main until an evictable key without hits reaches the old end; None after a
        full rotation of keys that are all not evictable."""
        num_skipped = 0
        while num_skipped < len(self._main):
            key, hits = self._main.popitem(last=False)
            if not is_evictable(key):
                self._main[key] = hits
                num_skipped += 1
            elif hits > 0:
                self._main[key] = hits - 1
                num_skipped = 0
            else:
                return key
        return None

    def _remember(self, key: K) -> None:
        self._ghost[key] = None
        if len(self._ghost) > self._ghost_capacity:
            self._ghost.popitem(last=False)

    def _has_evictable(self, is_evictable: Callable[[K], bool]) -> bool:
        """Stops at the first evictable key: O(1) unless the old ends are leased."""
        for queue in (self._small, self._main):
            for key in queue:
                if is_evictable(key):
                    return True
        return False

    def __len__(self) -> int:
        return len(self._small) + len(self._main)

    def __contains__(self, key: object) -> bool:
        return key in self._small or key in self._main


def _require_absent(policy: EvictionPolicy, key: Hashable) -> None:
    if key in policy:
        raise ValueError(f"key {key!r} is already tracked by the policy")
