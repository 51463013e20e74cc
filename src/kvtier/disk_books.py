"""The disk tier's books (``kvtier.store``): which chunks have entry files, and which to evict.

Keys only, no bytes: an entry is PENDING from the plan of its write until every rank reported the
file written, then READY. Capacity is ``DiskSettings.capacity_entries`` entries, evicted in LRU
order; a namespace at its disk quota evicts its own entries, never another's; a leased or pending
entry is never evicted. Removing an entry plans the delete of its files (``plan_delete``: the
store puts it in the next step plan) and tells the store (``dropped``), whose memory entry of the
same key is then no longer on disk. Called by ``TieredStore`` only, from its thread.
"""

from __future__ import annotations

from collections.abc import Callable

from kvtier.events import EventLog
from kvtier.leases import Leases
from kvtier.metrics import Metrics
from kvtier.plans import EntryRef
from kvtier.policy import EvictionPolicy, make_policy
from kvtier.store_types import DiskEntry, DiskSettings, State
from kvtier.tenant_books import TenantBooks, uncount


class DiskBooks:
    """Entries of the disk tier (none when ``settings`` is None: no disk tier)."""

    def __init__(self, settings: DiskSettings | None, tenants: TenantBooks, leases: Leases, metrics: Metrics,
                 plan_delete: Callable[[EntryRef], None], dropped: Callable[[bytes], None]) -> None:
        self.settings = settings
        self._entries: dict[bytes, DiskEntry] = {}
        self._policy: EvictionPolicy | None = None
        self._tenants = tenants
        self._leases = leases
        self._metrics = metrics
        self._plan_delete = plan_delete
        self._dropped = dropped
        self.events: EventLog | None = None  # where entries becoming visible or invisible are recorded
        if settings is not None:
            self._policy = make_policy("lru", max(settings.capacity_entries, 1))
            for item in settings.initial[-settings.capacity_entries:] if settings.capacity_entries else ():
                self._add(item.key, DiskEntry(State.READY, item.namespace, item.created))

    def get(self, key: bytes) -> DiskEntry | None:
        return self._entries.get(key)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[bytes, DiskEntry]]:
        return list(self._entries.items())

    def is_pending(self, key: bytes) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry.state is State.PENDING

    def touch(self, key: bytes) -> None:
        if self._policy is not None and key in self._entries:
            self._policy.touch(key)

    def set_ready(self, key: bytes) -> None:
        """Every rank wrote the entry's files: lookups may find it."""
        entry = self._entries.get(key)
        if entry is not None and entry.state is State.PENDING:
            entry.state = State.READY
            if self.events is not None:
                self.events.stored("disk", key)

    def reserve(self, key: bytes, namespace: str, created: float) -> bool:
        """Make room for and add a pending entry; False when the disk tier cannot take it."""
        assert self.settings is not None
        if key in self._entries:
            return False
        quota = self._tenants.disk_quota(namespace)
        while quota is not None and self._tenants.on_disk[namespace] >= quota:
            if not self._make_room(namespace):
                return False
        while len(self._entries) >= self.settings.capacity_entries:
            if not self._make_room(None):
                return False
        self._add(key, DiskEntry(State.PENDING, namespace, created))
        return True

    def trim(self, namespace: str) -> int:
        """Evict ``namespace``'s entries down to its quota; returns how many went."""
        quota = self._tenants.disk_quota(namespace)
        num_evicted = 0
        while quota is not None and self._tenants.on_disk[namespace] > quota:
            victim = self._victim(namespace)
            if victim is None:
                break
            self._evict(victim)
            num_evicted += 1
        return num_evicted

    def remove(self, key: bytes) -> None:
        """Drop the entry and plan the delete of its files."""
        namespace = self._entries[key].namespace
        self.drop(key)
        self._plan_delete(EntryRef(key, namespace))

    def drop(self, key: bytes) -> None:
        """Forget the entry (its files are left as they are)."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        if self.events is not None and entry.state is State.READY:
            self.events.removed("disk", key)
        if self._policy is not None:
            self._policy.remove(key)
        uncount(self._tenants.on_disk, entry.namespace)
        self._dropped(key)

    def _add(self, key: bytes, entry: DiskEntry) -> None:
        assert self._policy is not None
        self._entries[key] = entry
        self._policy.insert(key)
        self._tenants.on_disk[entry.namespace] += 1

    def _evictable(self, key: bytes) -> bool:
        return self._entries[key].state is State.READY and not self._leases.is_leased(key)

    def _victim(self, namespace: str | None) -> bytes | None:
        assert self._policy is not None
        if namespace is None:
            return self._policy.choose_victim(self._evictable)
        return self._policy.choose_victim(lambda key: self._evictable(key)
                                          and self._entries[key].namespace == namespace)

    def _evict(self, victim: bytes) -> None:
        """Remove a victim the policy already gave up, and plan its files' delete."""
        self.remove(victim)
        self._metrics.evictions.labels(tier="disk").inc()

    def _make_room(self, namespace: str | None) -> bool:
        victim = self._victim(namespace)
        if victim is None:
            self._metrics.dropped_stores.labels(tier="disk").inc()
            return False
        self._evict(victim)
        return True
