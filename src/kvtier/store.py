"""The tiered store's books: which chunk lives in which memory slot or disk file, what to evict.

Pure bookkeeping, no bytes, no torch: the scheduler-side engine integration calls it from one
thread, and it answers with plan operations (``kvtier.plans``) that the worker executes. Entries
become visible to lookups only when the worker reports the data in place (two phases: prepare in
the plan, complete from the ``WorkerReport``), so a lookup never promises data that is not there.

Memory tier: ``num_slots`` fixed-size slots (one chunk each), an eviction policy, leases.
Disk tier (optional): up to ``capacity_entries`` entries, LRU, written by spill-on-evict or
write-through. A disk hit is promoted into a memory slot (and verified) before the engine loads it.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvtier.leases import Leases
from kvtier.metrics import Metrics
from kvtier.plans import SlotOp, WorkerReport
from kvtier.policy import EvictionPolicy, make_policy


class State(enum.Enum):
    PENDING = "pending"  # planned, the worker has not reported the data in place yet
    READY = "ready"


@dataclass
class MemoryEntry:
    slot: int
    state: State
    on_disk: bool = False


@dataclass(frozen=True)
class Lookup:
    """The longest prefix of looked-up keys held by any tier."""

    num_chunks: int
    disk_only: tuple[int, ...]  # indices (within the prefix) held on disk but not in memory


@dataclass(frozen=True)
class DiskSettings:
    capacity_entries: int
    write_through: bool
    initial_keys: Sequence[bytes] = ()  # oldest first, from the scan of the directory


@dataclass
class _PendingOps:
    spills: list[SlotOp] = field(default_factory=list)
    promotes: list[SlotOp] = field(default_factory=list)
    remote_fetches: list[SlotOp] = field(default_factory=list)
    write_through: list[SlotOp] = field(default_factory=list)
    deletes: list[bytes] = field(default_factory=list)


class TieredStore:
    """Books of the memory and disk tiers for one engine (all tensor-parallel ranks)."""

    def __init__(self, num_slots: int, memory_policy: str, disk: DiskSettings | None,
                 world_size: int, metrics: Metrics) -> None:
        self._free_slots = list(range(num_slots - 1, -1, -1))
        self._memory: dict[bytes, MemoryEntry] = {}
        self._memory_policy: EvictionPolicy = make_policy(memory_policy, num_slots)
        self._disk_settings = disk
        self._disk: dict[bytes, State] = {}
        self._disk_policy: EvictionPolicy | None = None
        if disk is not None:
            self._disk_policy = make_policy("lru", max(disk.capacity_entries, 1))
            for key in disk.initial_keys[-disk.capacity_entries:] if disk.capacity_entries else ():
                self._disk[key] = State.READY
                self._disk_policy.insert(key)
        self.leases = Leases()
        self._world_size = world_size
        self._acks: Counter[tuple[str, bytes]] = Counter()
        self._ops = _PendingOps()
        self._metrics = metrics

    # ----- queries -------------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes]) -> Lookup:
        """Longest prefix of ``keys`` that memory (ready) or disk (ready) holds."""
        disk_only: list[int] = []
        for i, key in enumerate(keys):
            entry = self._memory.get(key)
            if entry is not None and entry.state is State.READY:
                continue
            if entry is None and self._disk.get(key) is State.READY:
                disk_only.append(i)
                continue
            return Lookup(i, tuple(disk_only))
        return Lookup(len(keys), tuple(disk_only))

    def slot_of(self, key: bytes) -> int:
        return self._memory[key].slot

    def is_pending(self, key: bytes) -> bool:
        entry = self._memory.get(key)
        return entry is not None and entry.state is State.PENDING

    def in_memory(self, key: bytes) -> bool:
        return key in self._memory

    def on_disk(self, key: bytes) -> bool:
        return key in self._disk

    @property
    def num_memory_entries(self) -> int:
        return len(self._memory)

    @property
    def num_disk_entries(self) -> int:
        return len(self._disk)

    # ----- planning ------------------------------------------------------------------------
    def touch(self, keys: Sequence[bytes]) -> None:
        for key in keys:
            if key in self._memory:
                self._memory_policy.touch(key)
            if self._disk_policy is not None and key in self._disk:
                self._disk_policy.touch(key)

    def prepare_promote(self, owner: str, keys: Sequence[bytes], from_remote: bool = False) -> list[bytes]:
        """Plan disk -> memory (or remote -> memory) reads of ``keys`` for ``owner``.

        Returns the keys actually planned, a prefix of ``keys`` (shorter when memory is full of
        leased entries). Planned entries are pending and leased to ``owner``.
        """
        planned: list[bytes] = []
        for key in keys:
            slot = self._allocate_slot()
            if slot is None:
                self._metrics.dropped_stores.labels(tier="memory").inc()
                break
            self._memory[key] = MemoryEntry(slot, State.PENDING, on_disk=not from_remote)
            (self._ops.remote_fetches if from_remote else self._ops.promotes).append(SlotOp(key, slot))
            planned.append(key)
        self.leases.acquire(owner, planned)
        return planned

    def prepare_store(self, key: bytes) -> int | None:
        """Plan a store of chunk ``key`` from the engine; returns the slot, or None when the key is
        already held in memory or no slot can be freed (the store is dropped and counted)."""
        if key in self._memory:
            self._memory_policy.touch(key)
            return None
        slot = self._allocate_slot()
        if slot is None:
            self._metrics.dropped_stores.labels(tier="memory").inc()
            return None
        on_disk = key in self._disk
        self._memory[key] = MemoryEntry(slot, State.PENDING, on_disk=on_disk)
        if self._disk_settings is not None and self._disk_settings.write_through and not on_disk:
            if self._reserve_disk(key):
                self._ops.write_through.append(SlotOp(key, slot))
                self._memory[key].on_disk = True
        return slot

    def take_ops(self) -> _PendingOps:
        ops, self._ops = self._ops, _PendingOps()
        return ops

    # ----- completion ----------------------------------------------------------------------
    def complete(self, report: WorkerReport) -> None:
        """Apply what the workers reported: commit what every rank did, drop what failed."""
        for key in self._acked("stored", report.stored):
            self._set_ready(key)
        for key in self._acked("promoted", report.promoted):
            self._set_ready(key)
        for key in set(report.promote_failed):
            self._drop_memory(key)
            self._drop_disk(key)
        for key in self._acked("disk", report.disk_written):
            if key in self._disk:
                self._disk[key] = State.READY
        for key in set(report.disk_failed):
            self._drop_disk(key)
            entry = self._memory.get(key)
            if entry is not None:
                entry.on_disk = False

    # ----- internals -----------------------------------------------------------------------
    def _acked(self, kind: str, keys: Sequence[bytes]) -> list[bytes]:
        done: list[bytes] = []
        for key in keys:
            self._acks[(kind, key)] += 1
            if self._acks[(kind, key)] >= self._world_size:
                del self._acks[(kind, key)]
                done.append(key)
        return done

    def _set_ready(self, key: bytes) -> None:
        entry = self._memory.get(key)
        if entry is None or entry.state is State.READY:
            return
        entry.state = State.READY
        self._memory_policy.insert(key)

    def _drop_memory(self, key: bytes) -> None:
        entry = self._memory.pop(key, None)
        if entry is not None:
            self._memory_policy.remove(key)
            self._free_slots.append(entry.slot)

    def _drop_disk(self, key: bytes) -> None:
        if self._disk.pop(key, None) is not None and self._disk_policy is not None:
            self._disk_policy.remove(key)

    def _memory_evictable(self, key: bytes) -> bool:
        entry = self._memory[key]
        return entry.state is State.READY and not self.leases.is_leased(key)

    def _allocate_slot(self) -> int | None:
        if self._free_slots:
            return self._free_slots.pop()
        victim = self._memory_policy.choose_victim(self._memory_evictable)
        if victim is None:
            return None
        entry = self._memory.pop(victim)
        self._metrics.evictions.labels(tier="memory").inc()
        settings = self._disk_settings
        if settings is not None and not settings.write_through and not entry.on_disk:
            if self._reserve_disk(victim):
                self._ops.spills.append(SlotOp(victim, entry.slot))
        return entry.slot

    def _disk_evictable(self, key: bytes) -> bool:
        return self._disk[key] is State.READY and not self.leases.is_leased(key)

    def _reserve_disk(self, key: bytes) -> bool:
        """Make room for and add a pending disk entry; False when the disk tier cannot take it."""
        assert self._disk_settings is not None and self._disk_policy is not None
        if key in self._disk:
            return False
        while len(self._disk) >= self._disk_settings.capacity_entries:
            victim = self._disk_policy.choose_victim(self._disk_evictable)
            if victim is None:
                self._metrics.dropped_stores.labels(tier="disk").inc()
                return False
            del self._disk[victim]
            if victim in self._memory:
                self._memory[victim].on_disk = False
            self._ops.deletes.append(victim)
            self._metrics.evictions.labels(tier="disk").inc()
        self._disk[key] = State.PENDING
        self._disk_policy.insert(key)
        return True
