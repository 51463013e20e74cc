"""Tenants on the store's books (``kvtier.store``): limits, TTL expiry and invalidation per namespace.

Every entry belongs to one namespace. Per namespace (``NamespaceLimits``): a TTL (older entries
are misses and are removed), and byte quotas in memory and on disk (a namespace at its quota
evicts its own entries, never another's). ``invalidate`` makes a namespace's entries, or some of
its keys, unreachable at once. An entry that a request has leased (its load is planned) or whose
data is still in flight cannot give its slot back at once: it is *doomed* (never found again) and
its slot is freed when the lease ends, so a slot is never reused under a planned load. Disk
entries are removed from the books at once and their files' deletes planned. Pure bookkeeping,
called from the store's thread; the store owns the books and hands them in.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from kvtier.config import NamespaceLimits
from kvtier.disk_books import DiskBooks
from kvtier.leases import Leases
from kvtier.metrics import Metrics
from kvtier.plans import Invalidation, StepPlan
from kvtier.slot_books import SlotBooks
from kvtier.store_types import DiskEntry, Invalidated, MemoryEntry, State
from kvtier.tenant_books import TenantBooks, Usage


class TenantControl:
    """Limits, expiry and invalidation of the namespaces' entries in memory and on disk."""

    def __init__(self, books: TenantBooks, memory: SlotBooks, disk: DiskBooks, leases: Leases, metrics: Metrics,
                 clock: Callable[[], float], plan: Callable[[], StepPlan]) -> None:
        """``clock``: wall-clock seconds, the time base of TTLs; ``plan``: the store's part of
        the next step plan (a new one after each ``TieredStore.take_ops``)."""
        self._books = books
        self._memory = memory
        self._disk = disk
        self._leases = leases
        self._metrics = metrics
        self._clock = clock
        self._plan = plan

    def ttl_of(self, namespace: str) -> int:
        return self._books.ttl_of(namespace)

    def limits(self) -> dict[str, NamespaceLimits]:
        return self._books.limits()

    def usage(self) -> dict[str, Usage]:
        """Entries per namespace (those holding any)."""
        return self._books.usage()

    def expired(self, entry: MemoryEntry | DiskEntry, now: float) -> bool:
        """Whether ``entry`` is older than its namespace's TTL at ``now``."""
        return self._books.expired(entry.namespace, entry.created, now)

    def set_limits(self, namespace: str, limits: NamespaceLimits) -> Invalidated:
        """Replace ``namespace``'s limits; entries now over its quotas or expired are removed
        (those in use are doomed). Returns how many were removed per tier."""
        self._books.set_limits(namespace, limits)
        memory, disk = self._memory.trim(namespace), self._disk.trim(namespace)
        expired = self.expire()
        return Invalidated(memory + expired.memory, disk + expired.disk)

    def invalidate(self, namespace: str, keys: Collection[bytes] | None = None) -> Invalidated:
        """Make ``namespace``'s entries (all, or those among ``keys``) unreachable now, on memory
        and disk; plans the disk deletes (all of the namespace's files with ``keys`` None)."""
        def selected(key: bytes, owner: str) -> bool:
            return owner == namespace and (keys is None or key in keys)

        memory = [key for key, entry in self._memory.items() if selected(key, entry.namespace) and not entry.doomed]
        for key in memory:
            self._memory.doom(key)
        disk = [key for key, entry in self._disk.items() if selected(key, entry.namespace)]
        for key in disk:
            self._disk.remove(key)
        plan = self._plan()
        if keys is None and self._disk.settings is not None:
            plan.purges.append(namespace)
        plan.invalidations.append(Invalidation(namespace, None if keys is None else tuple(sorted(keys))))
        self._memory.reap()
        self._metrics.invalidated.labels(tier="memory").inc(len(memory))
        self._metrics.invalidated.labels(tier="disk").inc(len(disk))
        return Invalidated(len(memory), len(disk))

    def expire(self) -> Invalidated:
        """Remove every entry older than its namespace's TTL (memory: doomed; disk: deleted)."""
        if not self._books.any_ttl():
            return Invalidated(0, 0)
        now = self._clock()
        memory = [key for key, entry in self._memory.items() if not entry.doomed and self.expired(entry, now)]
        for key in memory:
            self._memory.doom(key)
        disk = [key for key, entry in self._disk.items()
                if entry.state is State.READY and self.expired(entry, now) and not self._leases.is_leased(key)]
        for key in disk:
            self._disk.remove(key)
        self._memory.reap()
        self._metrics.expired.labels(tier="memory").inc(len(memory))
        self._metrics.expired.labels(tier="disk").inc(len(disk))
        return Invalidated(len(memory), len(disk))
