"""The tiered store's books: which chunk lives in which memory slot or disk file, what to evict.

Pure bookkeeping, no bytes, no torch: the scheduler-side engine integration calls it from one
thread, and it answers with plan operations (``kvtier.plans``) that the worker executes. Entries
become visible to lookups only when the worker reports the data in place (two phases: prepare in
the plan, complete from the ``WorkerReport``), so a lookup never promises data that is not there.

Memory tier: ``num_slots`` fixed-size slots (one chunk each), an eviction policy, leases.
Disk tier (optional): up to ``capacity_entries`` entries, LRU, written by spill-on-evict or
write-through. A disk hit is promoted into a memory slot (and verified) before the engine loads it.

Tenants (``kvtier.tenant_control``, ``store.tenants``): per namespace a TTL, memory and disk
quotas, and invalidation; an invalidated or expired entry in use is *doomed* (never found again)
and its slot freed when its lease ends, so a slot is never reused under a planned load.

Its parts: the entries and answers (``kvtier.store_types``, re-exported here), the memory tier's
books (``kvtier.slot_books``: slots, eviction, doomed entries), the disk tier's books
(``kvtier.disk_books``), limits, expiry and invalidation per namespace (``kvtier.tenant_control``
over ``kvtier.tenant_books``), and what the ranks reported (``kvtier.acks``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from kvtier.acks import RankAcks, SlotWrites
from kvtier.config import NamespaceLimits
from kvtier.disk_books import DiskBooks
from kvtier.events import EventLog
from kvtier.leases import Leases
from kvtier.metrics import Metrics
from kvtier.plans import EntryRef, SlotOp, StepPlan, WorkerReport
from kvtier.slot_books import SlotBooks
from kvtier.store_types import DiskEntry, DiskItem, DiskSettings, Invalidated, Lookup, MemoryEntry, State
from kvtier.tenant_books import TenantBooks, Usage
from kvtier.tenant_control import TenantControl

__all__ = ["DiskEntry", "DiskItem", "DiskSettings", "Invalidated", "Lookup", "MemoryEntry", "State",
           "TieredStore", "Usage"]


class TieredStore:
    """Books of the memory and disk tiers for one engine (all tensor-parallel ranks)."""

    def __init__(self, num_slots: int, memory_policy: str, disk: DiskSettings | None, world_size: int,
                 metrics: Metrics, chunk_bytes: int, limits: Mapping[str, NamespaceLimits],
                 clock: Callable[[], float]) -> None:
        """``limits``: per-namespace TTL and quotas (others: none); ``clock``: wall-clock seconds
        (``time.time``), the time base of TTLs and of the disk files' modification times."""
        self._slot_writes = SlotWrites(world_size)  # write-throughs in flight, reading their slots
        books = TenantBooks(limits, chunk_bytes)  # limits and entries per namespace
        self._clock = clock
        self.leases = Leases()
        self._memory = SlotBooks(num_slots, memory_policy, books, self.leases, self._slot_writes, metrics,
                                 self._spill)
        self._disk = DiskBooks(disk, books, self.leases, metrics, lambda entry: self._ops.deletes.append(entry),
                               self._memory.off_disk)
        #: limits, expiry and invalidation per namespace
        self.tenants = TenantControl(books, self._memory, self._disk, self.leases, metrics, clock, lambda: self._ops)
        self._world_size = world_size
        self._acks = RankAcks(world_size)  # what some ranks, not yet all, reported done
        self._ops = StepPlan()  # the store's part of the next plan: spills, writes, deletes
        self._metrics = metrics
        self._events: EventLog | None = None

    @property
    def events(self) -> EventLog | None:
        """Where entries becoming visible or invisible to lookups are recorded, per tier (memory,
        disk; entries found on disk at start-up are not recorded: the integration announces
        them itself); None: nowhere."""
        return self._events

    @events.setter
    def events(self, events: EventLog | None) -> None:
        self._events = events
        self._memory.events = events
        self._disk.events = events

    @property
    def disk_books(self) -> DiskBooks:
        """The disk tier's books (read them only: ``items``, ``get``), for KV events."""
        return self._disk

    # ----- queries -------------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes]) -> Lookup:
        """Longest prefix of ``keys`` that memory (ready) or disk (ready) holds, unexpired."""
        now = self._clock()
        disk_only: list[int] = []
        for i, key in enumerate(keys):
            entry = self._memory.get(key)
            if entry is not None:
                if entry.state is State.READY and not entry.doomed and not self.tenants.expired(entry, now):
                    continue
                return Lookup(i, tuple(disk_only))
            on_disk = self._disk.get(key)
            if on_disk is not None and on_disk.state is State.READY and not self.tenants.expired(on_disk, now):
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
                    or self.tenants.expired(entry, now):
                return i
        return len(keys)

    def slot_of(self, key: bytes) -> int:
        entry = self._memory.get(key)
        if entry is None:
            raise KeyError(key)
        return entry.slot

    def is_pending(self, key: bytes) -> bool:
        return self._memory.is_pending(key)

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

    # ----- planning ------------------------------------------------------------------------
    def touch(self, keys: Sequence[bytes]) -> None:
        for key in keys:
            self._memory.touch(key)
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
            slot = self._memory.allocate(namespace)
            if slot is None:
                self._metrics.dropped_stores.labels(tier="memory").inc()
                break
            on_disk = self._disk.get(key)
            if from_remote or on_disk is None:
                created = now - (ages_s[index] if index < len(ages_s) else 0.0)
            else:
                created = on_disk.created
            self._memory.add(key, MemoryEntry(slot, State.PENDING, namespace, created, on_disk=not from_remote))
            planned.append(SlotOp(key, slot, namespace))
        self.leases.acquire(owner, [op.key for op in planned])
        return planned

    def abandon(self, keys: Sequence[bytes]) -> None:
        """Drop the pending entries of reads that were planned (``prepare_promote``) but never
        handed to a worker: their slots are free again."""
        for key in keys:
            if self._memory.is_pending(key):
                self._memory.drop(key)

    def prepare_store(self, key: bytes, namespace: str) -> int | None:
        """Plan a store of chunk ``key`` of ``namespace`` from the engine; returns the slot, or
        None when the key is already held in memory or no slot can be freed (the store is dropped
        and counted)."""
        if key in self._memory:
            self._memory.touch(key)
            return None
        slot = self._memory.allocate(namespace)
        if slot is None:
            self._metrics.dropped_stores.labels(tier="memory").inc()
            return None
        on_disk = key in self._disk
        entry = MemoryEntry(slot, State.PENDING, namespace, self._clock(), on_disk=on_disk)
        self._memory.add(key, entry)
        if self._disk.settings is not None and self._disk.settings.write_through and not on_disk:
            if self._disk.reserve(key, namespace, entry.created):
                self._ops.write_through.append(SlotOp(key, slot, namespace))
                self._slot_writes.begin(key, slot)
                entry.on_disk = True
        return slot

    def take_ops(self) -> StepPlan:
        """The operations planned since the last call (loads, stores and uploads are the
        caller's); frees the slots of doomed entries whose leases have ended first."""
        self._memory.reap()
        ops, self._ops = self._ops, StepPlan()
        return ops

    # ----- completion ----------------------------------------------------------------------
    def complete(self, report: WorkerReport) -> None:
        """Apply what the workers reported: commit what every rank did, drop what failed. With
        tensor parallelism, a write or promote that fails on one rank fails for all: what the
        other ranks acknowledged of it is forgotten (and their later acknowledgements ignored),
        and a failed disk write plans the delete of every rank's file of the entry."""
        for key in self._acks.count("stored", report.stored):
            self._memory.set_ready(key)
        for key in self._acks.count("promoted", [key for key in report.promoted if self._memory.is_pending(key)]):
            self._memory.set_ready(key)
        for key in set(report.promote_failed):
            self._acks.forget("promoted", key)
            self._memory.drop(key)
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
                self._memory.free(slot)

    # ----- internals -----------------------------------------------------------------------
    def _spill(self, key: bytes, entry: MemoryEntry) -> None:
        """An entry was evicted from memory: plan its spill to disk when the disk tier keeps
        evicted entries (not write-through) and does not hold it yet."""
        settings = self._disk.settings
        if settings is not None and not settings.write_through and not entry.on_disk and not entry.doomed:
            if self._disk.reserve(key, entry.namespace, entry.created):
                self._ops.spills.append(SlotOp(key, entry.slot, entry.namespace))
