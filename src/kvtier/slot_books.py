"""The memory tier's books (``kvtier.store``): which chunk is in which host slot, and what to evict.

Keys and slot numbers only, no bytes: ``num_slots`` fixed-size slots (one chunk each), free or
held by one entry. An entry is PENDING from its plan until every rank reported its data in the
slot, then READY (visible to lookups). Eviction follows the policy (``memory.policy``); a leased,
pending or doomed-but-unreaped entry, or one whose slot a write-through still reads
(``SlotWrites``), is never evicted; a namespace at its memory quota evicts its own entries, never
another's. A doomed entry (invalidated or expired) is never found again, and its slot is freed once
it is ready and unleased (``reap``). What happens to an evicted entry's data (a spill to disk) is
the store's decision (``evicted``). Called by ``TieredStore`` only, from its thread.
"""

from __future__ import annotations

from collections.abc import Callable

from kvtier.acks import SlotWrites
from kvtier.events import EventLog
from kvtier.leases import Leases
from kvtier.metrics import Metrics
from kvtier.policy import EvictionPolicy, make_policy
from kvtier.store_types import MemoryEntry, State
from kvtier.tenant_books import TenantBooks, uncount


class SlotBooks:
    """Entries of the memory tier and its free slots."""

    def __init__(self, num_slots: int, policy: str, tenants: TenantBooks, leases: Leases, slot_writes: SlotWrites,
                 metrics: Metrics, evicted: Callable[[bytes, MemoryEntry], None]) -> None:
        """``evicted(key, entry)``: called for each entry evicted to free its slot, after it left
        the books (the store plans its spill there)."""
        self._free_slots = list(range(num_slots - 1, -1, -1))
        self._entries: dict[bytes, MemoryEntry] = {}
        self._policy: EvictionPolicy = make_policy(policy, num_slots)
        self._doomed: set[bytes] = set()
        self._tenants = tenants
        self._leases = leases
        self._slot_writes = slot_writes  # write-throughs in flight, reading their slots
        self._metrics = metrics
        self._evicted = evicted
        self.events: EventLog | None = None  # where entries becoming visible or invisible are recorded

    def get(self, key: bytes) -> MemoryEntry | None:
        return self._entries.get(key)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[bytes, MemoryEntry]]:
        return list(self._entries.items())

    @property
    def free_slots(self) -> list[int]:
        """The slots no entry holds (a copy)."""
        return list(self._free_slots)

    def is_pending(self, key: bytes) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry.state is State.PENDING

    def touch(self, key: bytes) -> None:
        """A use of ``key`` (if held): the eviction policy hears of it."""
        if key in self._entries:
            self._policy.touch(key)

    def add(self, key: bytes, entry: MemoryEntry) -> None:
        """A new entry in a slot that ``allocate`` gave."""
        self._entries[key] = entry
        self._tenants.in_memory[entry.namespace] += 1

    def set_ready(self, key: bytes) -> None:
        """Every rank has the entry's data in its slot: lookups may find it (unless doomed)."""
        entry = self._entries.get(key)
        if entry is None or entry.state is State.READY:
            return
        entry.state = State.READY
        self._policy.insert(key)
        if self.events is not None and not entry.doomed:
            self.events.stored("memory", key)

    def doom(self, key: bytes) -> None:
        """Never find ``key`` again; its slot is freed once it is ready and unleased (``reap``)."""
        entry = self._entries[key]
        if self.events is not None and entry.state is State.READY and not entry.doomed:
            self.events.removed("memory", key)
        entry.doomed = True
        self._doomed.add(key)

    def drop(self, key: bytes) -> None:
        """Forget the entry (if held) and free its slot, unless a write-through still reads it
        (then the slot is freed when every rank reported that write: ``free``)."""
        if key in self._entries:
            entry = self._pop(key)
            self._policy.remove(key)
            if not self._slot_writes.hold(key, entry.slot):
                self._free_slots.append(entry.slot)

    def free(self, slot: int) -> None:
        """``slot`` holds nothing any more (a write-through of a dropped entry is done)."""
        self._free_slots.append(slot)

    def off_disk(self, key: bytes) -> None:
        """The disk books dropped ``key``: its memory entry, if any, is no longer on disk."""
        entry = self._entries.get(key)
        if entry is not None:
            entry.on_disk = False

    def reap(self) -> None:
        """Free the slots of doomed entries that are ready and no longer leased."""
        for key in list(self._doomed):
            entry = self._entries.get(key)
            if entry is None or not entry.doomed:
                self._doomed.discard(key)
            elif entry.state is State.READY and not self._leases.is_leased(key):
                self._doomed.discard(key)
                self.drop(key)

    def allocate(self, namespace: str) -> int | None:
        """A slot for a new entry of ``namespace`` (a free one, or an evicted entry's); None when
        none can be freed (memory full of entries in use, or the namespace's own at its quota)."""
        quota = self._tenants.memory_quota(namespace)
        if quota is not None and self._tenants.in_memory[namespace] >= quota:
            return self._evict(namespace)
        if self._free_slots:
            return self._free_slots.pop()
        return self._evict(None)

    def trim(self, namespace: str) -> int:
        """Evict ``namespace``'s entries down to its quota; returns how many went."""
        quota = self._tenants.memory_quota(namespace)
        num_evicted = 0
        while quota is not None and self._tenants.in_memory[namespace] > quota:
            slot = self._evict(namespace)
            if slot is None:
                break
            self._free_slots.append(slot)
            num_evicted += 1
        return num_evicted

    def _pop(self, key: bytes) -> MemoryEntry:
        entry = self._entries.pop(key)
        uncount(self._tenants.in_memory, entry.namespace)
        if self.events is not None and entry.state is State.READY and not entry.doomed:
            self.events.removed("memory", key)
        return entry

    def _evictable(self, key: bytes) -> bool:
        entry = self._entries[key]
        return entry.state is State.READY and not self._leases.is_leased(key) and key not in self._slot_writes

    def _evict(self, namespace: str | None) -> int | None:
        """Evict one entry (of ``namespace``; None: of any); its slot, or None when none is evictable."""
        if namespace is None:
            victim = self._policy.choose_victim(self._evictable)
        else:
            victim = self._policy.choose_victim(lambda key: self._evictable(key)
                                                and self._entries[key].namespace == namespace)
        if victim is None:
            return None
        entry = self._pop(victim)
        self._metrics.evictions.labels(tier="memory").inc()
        self._evicted(victim, entry)
        return entry.slot
