"""The tiered store's books: which chunk lives in which memory slot or disk file, what to evict.

Pure bookkeeping, no bytes, no torch: the scheduler-side engine integration calls it from one
thread, and it answers with plan operations (``kvtier.plans``) that the worker executes. Entries
become visible to lookups only when the worker reports the data in place (two phases: prepare in
the plan, complete from the ``WorkerReport``), so a lookup never promises data that is not there.

Memory tier: ``num_slots`` fixed-size slots (one chunk each), an eviction policy, leases.
Disk tier (optional): up to ``capacity_entries`` entries, LRU, written by spill-on-evict or
write-through. A disk hit is promoted into a memory slot (and verified) before the engine loads it.

Tenants: every entry belongs to one namespace. Per namespace (``NamespaceLimits``): a TTL (older
entries are misses and are removed), and byte quotas in memory and on disk (a namespace at its
quota evicts its own entries, never another's). ``invalidate`` makes a namespace's entries, or
some of its keys, unreachable at once. An entry that a request has leased (its load is planned)
or whose data is still in flight cannot give its slot back at once: it is *doomed* (never found
again) and its slot is freed when the lease ends (``reap``), so a slot is never reused under a
planned load.

Its parts: the entries and answers (``kvtier.store_types``, re-exported here), the disk tier's
books (``kvtier.disk_books``), limits and entry counts per namespace (``kvtier.tenant_books``),
and what the ranks reported (``kvtier.acks``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

from kvtier.acks import RankAcks, SlotWrites
from kvtier.config import NamespaceLimits
from kvtier.disk_books import DiskBooks
from kvtier.events import EventLog
from kvtier.leases import Leases
from kvtier.metrics import Metrics
from kvtier.plans import EntryRef, Invalidation, SlotOp, StepPlan, WorkerReport
from kvtier.policy import EvictionPolicy, make_policy
from kvtier.store_types import DiskEntry, DiskItem, DiskSettings, Invalidated, Lookup, MemoryEntry, State
from kvtier.tenant_books import TenantBooks, Usage, uncount

__all__ = ["DiskEntry", "DiskItem", "DiskSettings", "Invalidated", "Lookup", "MemoryEntry", "State",
           "TieredStore", "Usage"]


class TieredStore:
    """Books of the memory and disk tiers for one engine (all tensor-parallel ranks)."""

    def __init__(self, num_slots: int, memory_policy: str, disk: DiskSettings | None, world_size: int,
                 metrics: Metrics, chunk_bytes: int, limits: Mapping[str, NamespaceLimits],
                 clock: Callable[[], float]) -> None:
        """``limits``: per-namespace TTL and quotas (others: none); ``clock``: wall-clock seconds
        (``time.time``), the time base of TTLs and of the disk files' modification times."""
        self._free_slots = list(range(num_slots - 1, -1, -1))
        self._memory: dict[bytes, MemoryEntry] = {}
        self._memory_policy: EvictionPolicy = make_policy(memory_policy, num_slots)
        self._doomed: set[bytes] = set()
        self._slot_writes = SlotWrites(world_size)  # write-throughs in flight, reading their slots
        self._tenants = TenantBooks(limits, chunk_bytes)  # limits and entries per namespace
        self._clock = clock
        self.leases = Leases()
        self._disk = DiskBooks(disk, self._tenants, self.leases, metrics, lambda entry: self._ops.deletes.append(entry),
                               self._off_disk)
        self._world_size = world_size
        self._acks = RankAcks(world_size)  # what some ranks, not yet all, reported done
        self._ops = StepPlan()  # the store's part of the next plan: spills, writes, deletes
        self._metrics = metrics
        self._events: EventLog | None = None

    @property
    def events(self) -> EventLog | None:
        """Where entries becoming visible or invisible to lookups are recorded, per tier (memory,
        disk; entries found on disk at start-up are not announced); None: nowhere."""
        return self._events

    @events.setter
    def events(self, events: EventLog | None) -> None:
        self._events = events
        self._disk.events = events

    # ----- queries -------------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes]) -> Lookup:
        """Longest prefix of ``keys`` that memory (ready) or disk (ready) holds, unexpired."""
        now = self._clock()
        disk_only: list[int] = []
        for i, key in enumerate(keys):
            entry = self._memory.get(key)
            if entry is not None:
                if entry.state is State.READY and not entry.doomed and not self._expired(entry, now):
                    continue
                return Lookup(i, tuple(disk_only))
            on_disk = self._disk.get(key)
            if on_disk is not None and on_disk.state is State.READY and not self._expired(on_disk, now):
                disk_only.append(i)
                continue
            return Lookup(i, tuple(disk_only))
        return Lookup(len(keys), tuple(disk_only))

    def memory_prefix(self, keys: Sequence[bytes], namespace: str) -> int:
        """How many consecutive ``keys`` from the start memory holds ready for ``namespace``,
        unexpired (the memory tier's prefix lookup; ``lookup`` also counts disk)."""
        now = self._clock()
        for i, key in enumerate(keys):
            entry = self._memory.get(key)
            if entry is None or entry.state is not State.READY or entry.doomed or entry.namespace != namespace \
                    or self._expired(entry, now):
                return i
        return len(keys)

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
    def has_disk(self) -> bool:
        return self._disk.settings is not None

    @property
    def num_memory_entries(self) -> int:
        return len(self._memory)

    @property
    def num_disk_entries(self) -> int:
        return len(self._disk)

    def usage(self) -> dict[str, Usage]:
        """Entries per namespace (those holding any)."""
        return self._tenants.usage()

    def limits(self) -> dict[str, NamespaceLimits]:
        return self._tenants.limits()

    # ----- planning ------------------------------------------------------------------------
    def touch(self, keys: Sequence[bytes]) -> None:
        for key in keys:
            if key in self._memory:
                self._memory_policy.touch(key)
            self._disk.touch(key)

    def prepare_promote(self, owner: str, namespace: str, keys: Sequence[bytes],
                        from_remote: bool = False, ages_s: Sequence[float] = ()) -> list[SlotOp]:
        """Plan disk -> memory (or remote -> memory) reads of ``keys`` of ``namespace`` for
        ``owner``: one memory slot each. A promoted entry keeps its write time (a read never
        restarts its TTL): a disk entry's own, a remote one's ``ages_s`` (seconds since it was
        written there, per key; missing ages count as written now).

        Returns the reads planned, for a prefix of ``keys`` (shorter when memory is full of
        leased entries or the namespace is at its quota). Their entries are pending and leased
        to ``owner``; the caller hands the reads to the transfer executor, whose report makes
        them ready (``complete``), or gives them back unread (``abandon``).
        """
        planned: list[SlotOp] = []
        now = self._clock()
        for index, key in enumerate(keys):
            slot = self._allocate_slot(namespace)
            if slot is None:
                self._metrics.dropped_stores.labels(tier="memory").inc()
                break
            on_disk = self._disk.get(key)
            if from_remote or on_disk is None:
                created = now - (ages_s[index] if index < len(ages_s) else 0.0)
            else:
                created = on_disk.created
            self._add_memory(key, MemoryEntry(slot, State.PENDING, namespace, created, on_disk=not from_remote))
            planned.append(SlotOp(key, slot, namespace))
        self.leases.acquire(owner, [op.key for op in planned])
        return planned

    def abandon(self, keys: Sequence[bytes]) -> None:
        """Drop the pending entries of reads that were planned (``prepare_promote``) but never
        handed to a worker: their slots are free again."""
        for key in keys:
            if self.is_pending(key):
                self._drop_memory(key)

    def prepare_store(self, key: bytes, namespace: str) -> int | None:
        """Plan a store of chunk ``key`` of ``namespace`` from the engine; returns the slot, or
        None when the key is already held in memory or no slot can be freed (the store is dropped
        and counted)."""
        if key in self._memory:
            self._memory_policy.touch(key)
            return None
        slot = self._allocate_slot(namespace)
        if slot is None:
            self._metrics.dropped_stores.labels(tier="memory").inc()
            return None
        on_disk = key in self._disk
        entry = MemoryEntry(slot, State.PENDING, namespace, self._clock(), on_disk=on_disk)
        self._add_memory(key, entry)
        if self._disk.settings is not None and self._disk.settings.write_through and not on_disk:
            if self._disk.reserve(key, namespace, entry.created):
                self._ops.write_through.append(SlotOp(key, slot, namespace))
                self._slot_writes.begin(key, slot)
                entry.on_disk = True
        return slot

    def take_ops(self) -> StepPlan:
        """The operations planned since the last call (loads, stores and uploads are the
        caller's); frees the slots of doomed entries whose leases have ended first (``reap``)."""
        self.reap()
        ops, self._ops = self._ops, StepPlan()
        return ops

    # ----- tenants ---------------------------------------------------------------------------
    def ttl_of(self, namespace: str) -> int:
        return self._tenants.ttl_of(namespace)

    def set_limits(self, namespace: str, limits: NamespaceLimits) -> Invalidated:
        """Replace ``namespace``'s limits; entries now over its quotas or expired are removed
        (those in use are doomed). Returns how many were removed per tier."""
        self._tenants.set_limits(namespace, limits)
        memory, disk = self._trim(namespace), self._disk.trim(namespace)
        expired = self.expire()
        return Invalidated(memory + expired.memory, disk + expired.disk)

    def invalidate(self, namespace: str, keys: Collection[bytes] | None = None) -> Invalidated:
        """Make ``namespace``'s entries (all, or those among ``keys``) unreachable now, on memory
        and disk; plans the disk deletes (all of the namespace's files with ``keys`` None)."""
        def selected(key: bytes, owner: str) -> bool:
            return owner == namespace and (keys is None or key in keys)

        memory = [key for key, entry in self._memory.items() if selected(key, entry.namespace) and not entry.doomed]
        for key in memory:
            self._doom(key)
        disk = [key for key, entry in self._disk.items() if selected(key, entry.namespace)]
        for key in disk:
            self._disk.remove(key)
        if keys is None and self._disk.settings is not None:
            self._ops.purges.append(namespace)
        self._ops.invalidations.append(Invalidation(namespace, None if keys is None else tuple(sorted(keys))))
        self.reap()
        self._metrics.invalidated.labels(tier="memory").inc(len(memory))
        self._metrics.invalidated.labels(tier="disk").inc(len(disk))
        return Invalidated(len(memory), len(disk))

    def expire(self) -> Invalidated:
        """Remove every entry older than its namespace's TTL (memory: doomed; disk: deleted)."""
        if not self._tenants.any_ttl():
            return Invalidated(0, 0)
        now = self._clock()
        memory = [key for key, entry in self._memory.items() if not entry.doomed and self._expired(entry, now)]
        for key in memory:
            self._doom(key)
        disk = [key for key, entry in self._disk.items()
                if entry.state is State.READY and self._expired(entry, now) and not self.leases.is_leased(key)]
        for key in disk:
            self._disk.remove(key)
        self.reap()
        self._metrics.expired.labels(tier="memory").inc(len(memory))
        self._metrics.expired.labels(tier="disk").inc(len(disk))
        return Invalidated(len(memory), len(disk))

    def reap(self) -> None:
        """Free the slots of doomed entries that are ready and no longer leased."""
        for key in list(self._doomed):
            entry = self._memory.get(key)
            if entry is None or not entry.doomed:
                self._doomed.discard(key)
            elif entry.state is State.READY and not self.leases.is_leased(key):
                self._doomed.discard(key)
                self._drop_memory(key)

    # ----- completion ----------------------------------------------------------------------
    def complete(self, report: WorkerReport) -> None:
        """Apply what the workers reported: commit what every rank did, drop what failed. With
        tensor parallelism, a write or promote that fails on one rank fails for all: what the
        other ranks acknowledged of it is forgotten (and their later acknowledgements ignored),
        and a failed disk write plans the delete of every rank's file of the entry."""
        for key in self._acks.count("stored", report.stored):
            self._set_ready(key)
        for key in self._acks.count("promoted", [key for key in report.promoted if self.is_pending(key)]):
            self._set_ready(key)
        for key in set(report.promote_failed):
            self._acks.forget("promoted", key)
            self._drop_memory(key)
            self._disk.drop(key)  # the files stay (an unreadable entry is left in place)
        failed_writes = set(report.disk_failed)
        for key in failed_writes:
            self._acks.forget("disk", key)
            entry = self._disk.get(key)
            if entry is not None and entry.state is State.PENDING and self._world_size > 1:
                self._ops.deletes.append(EntryRef(key, entry.namespace))  # the ranks that wrote it
            self._disk.drop(key)
        written = [key for key in report.disk_written if key not in failed_writes and self._disk.is_pending(key)]
        for key in self._acks.count("disk", written):
            self._disk.set_ready(key)
        for key in [*report.disk_written, *report.disk_failed]:
            slot = self._slot_writes.reported(key)  # the slot of a write-through whose entry is gone
            if slot is not None:
                self._free_slots.append(slot)

    # ----- internals -----------------------------------------------------------------------
    def _expired(self, entry: MemoryEntry | DiskEntry, now: float) -> bool:
        return self._tenants.expired(entry.namespace, entry.created, now)

    def _off_disk(self, key: bytes) -> None:
        """The disk books dropped ``key``: its memory entry, if any, is no longer on disk."""
        memory_entry = self._memory.get(key)
        if memory_entry is not None:
            memory_entry.on_disk = False

    def _set_ready(self, key: bytes) -> None:
        entry = self._memory.get(key)
        if entry is None or entry.state is State.READY:
            return
        entry.state = State.READY
        self._memory_policy.insert(key)
        if self.events is not None and not entry.doomed:
            self.events.stored("memory", key)

    def _doom(self, key: bytes) -> None:
        entry = self._memory[key]
        if self.events is not None and entry.state is State.READY and not entry.doomed:
            self.events.removed("memory", key)
        entry.doomed = True
        self._doomed.add(key)

    def _add_memory(self, key: bytes, entry: MemoryEntry) -> None:
        self._memory[key] = entry
        self._tenants.in_memory[entry.namespace] += 1

    def _pop_memory(self, key: bytes) -> MemoryEntry:
        entry = self._memory.pop(key)
        uncount(self._tenants.in_memory, entry.namespace)
        if self.events is not None and entry.state is State.READY and not entry.doomed:
            self.events.removed("memory", key)
        return entry

    def _drop_memory(self, key: bytes) -> None:
        if key in self._memory:
            entry = self._pop_memory(key)
            self._memory_policy.remove(key)
            if not self._slot_writes.hold(key, entry.slot):
                self._free_slots.append(entry.slot)

    def _memory_evictable(self, key: bytes) -> bool:
        entry = self._memory[key]
        return entry.state is State.READY and not self.leases.is_leased(key) and key not in self._slot_writes

    def _allocate_slot(self, namespace: str) -> int | None:
        quota = self._tenants.memory_quota(namespace)
        if quota is not None and self._tenants.in_memory[namespace] >= quota:
            return self._evict_memory(namespace)
        if self._free_slots:
            return self._free_slots.pop()
        return self._evict_memory(None)

    def _evict_memory(self, namespace: str | None) -> int | None:
        """Evict one entry (of ``namespace``; None: of any), spilling it to disk when the policy
        says so; its slot, or None when none is evictable."""
        if namespace is None:
            victim = self._memory_policy.choose_victim(self._memory_evictable)
        else:
            victim = self._memory_policy.choose_victim(lambda key: self._memory_evictable(key)
                                                       and self._memory[key].namespace == namespace)
        if victim is None:
            return None
        entry = self._pop_memory(victim)
        self._metrics.evictions.labels(tier="memory").inc()
        settings = self._disk.settings
        if settings is not None and not settings.write_through and not entry.on_disk and not entry.doomed:
            if self._disk.reserve(victim, entry.namespace, entry.created):
                self._ops.spills.append(SlotOp(victim, entry.slot, entry.namespace))
        return entry.slot

    def _trim(self, namespace: str) -> int:
        """Evict ``namespace``'s memory entries down to its quota; returns how many went."""
        quota = self._tenants.memory_quota(namespace)
        num_evicted = 0
        while quota is not None and self._tenants.in_memory[namespace] > quota:
            slot = self._evict_memory(namespace)
            if slot is None:
                break
            self._free_slots.append(slot)
            num_evicted += 1
        return num_evicted
