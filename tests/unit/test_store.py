"""The tiered store's books: two-phase visibility, leases, eviction, spill, promotion, failures."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.config import NamespaceLimits
from kvtier.metrics import Metrics
from kvtier.plans import EntryRef, WorkerReport
from kvtier.store import DiskItem, DiskSettings, TieredStore

NS = "tenant-a"
CHUNK_BYTES = 100


class Clock:
    """A settable wall clock."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def stored(store: TieredStore, *ids: int) -> None:
    """Plan stores of ``ids`` and report them done, as one engine step would."""
    for i in ids:
        assert store.prepare_store(key(i), NS) is not None
    store.complete(WorkerReport(stored=[key(i) for i in ids]))


def make(num_slots: int = 4, disk: DiskSettings | None = None, world_size: int = 1,
         limits: dict[str, NamespaceLimits] | None = None, clock: Clock | None = None) -> TieredStore:
    return TieredStore(num_slots, "lru", disk, world_size, Metrics(), CHUNK_BYTES, limits or {}, clock or Clock())


def test_entries_are_invisible_until_the_worker_reports_them() -> None:
    store = make()
    store.prepare_store(key(0), NS)
    assert store.lookup([key(0)]).num_chunks == 0  # planned, not in place yet
    store.complete(WorkerReport(stored=[key(0)]))
    assert store.lookup([key(0), key(1)]).num_chunks == 1


def test_lookup_is_the_longest_prefix() -> None:
    store = make()
    stored(store, 0, 1, 3)
    assert store.lookup([key(0), key(1), key(2), key(3)]).num_chunks == 2


def test_storing_a_held_key_plans_nothing() -> None:
    store = make()
    stored(store, 0)
    assert store.prepare_store(key(0), NS) is None


def test_leased_entries_are_never_evicted_and_full_memory_drops_stores() -> None:
    store = make(num_slots=2)
    stored(store, 0, 1)
    store.leases.acquire("req", [key(0), key(1)])
    assert store.prepare_store(key(2), NS) is None  # dropped, counted
    store.leases.release("req")
    assert store.prepare_store(key(2), NS) is not None
    assert store.num_memory_entries == 2


def test_tensor_parallel_commit_needs_every_rank() -> None:
    store = make(world_size=2)
    store.prepare_store(key(0), NS)
    store.complete(WorkerReport(stored=[key(0)]))
    assert store.lookup([key(0)]).num_chunks == 0
    store.complete(WorkerReport(stored=[key(0)]))
    assert store.lookup([key(0)]).num_chunks == 1


def test_spill_on_evict_then_promote_from_disk() -> None:
    store = make(num_slots=1, disk=DiskSettings(capacity_entries=4, write_through=False))
    stored(store, 0)
    slot0 = store.slot_of(key(0))
    stored(store, 1)  # evicts 0: spilled to disk from its slot
    ops = store.take_ops()
    assert [(op.key, op.slot) for op in ops.spills] == [(key(0), slot0)]
    assert store.lookup([key(0)]).num_chunks == 0  # disk write not confirmed yet
    store.complete(WorkerReport(disk_written=[key(0)]))
    found = store.lookup([key(0)])
    assert found.num_chunks == 1 and found.disk_only == (0,)
    planned = store.prepare_promote("req", NS, [key(0)])
    assert [(op.key, op.slot, op.namespace) for op in planned] == [(key(0), slot0, NS)]
    store.complete(WorkerReport(promoted=[key(0)]))
    assert store.lookup([key(0)]).disk_only == ()
    assert store.in_memory(key(0)) and not store.in_memory(key(1))


def test_an_abandoned_promote_frees_its_slot_and_keeps_the_disk_entry() -> None:
    store = make(num_slots=1, disk=DiskSettings(capacity_entries=4, write_through=True, initial=[DiskItem(key(7), NS, 0.0)]))
    planned = store.prepare_promote("req", NS, [key(7)])
    assert len(planned) == 1 and store.is_pending(key(7))
    store.abandon([key(7)])
    store.leases.release("req")
    assert not store.in_memory(key(7)) and store.lookup([key(7)]).disk_only == (0,)
    stored(store, 1)  # the one slot is free again
    assert store.in_memory(key(1))


def test_failed_promote_drops_the_entry_everywhere() -> None:
    store = make(num_slots=2, disk=DiskSettings(capacity_entries=4, write_through=True, initial=[DiskItem(key(7), NS, 0.0)]))
    assert store.lookup([key(7)]).disk_only == (0,)
    store.prepare_promote("req", NS, [key(7)])
    store.complete(WorkerReport(promote_failed=[key(7)]))
    assert store.lookup([key(7)]).num_chunks == 0
    assert not store.on_disk(key(7)) and not store.in_memory(key(7))


def test_write_through_and_disk_eviction() -> None:
    store = make(num_slots=8, disk=DiskSettings(capacity_entries=2, write_through=True))
    stored(store, 0, 1)
    ops = store.take_ops()
    assert [op.key for op in ops.write_through] == [key(0), key(1)]
    store.complete(WorkerReport(disk_written=[key(0), key(1)]))
    stored(store, 2)
    ops = store.take_ops()
    assert ops.deletes == [EntryRef(key(0), NS)] and store.num_disk_entries == 2


def test_dropped_disk_write_forgets_the_entry() -> None:
    store = make(num_slots=8, disk=DiskSettings(capacity_entries=2, write_through=True))
    stored(store, 0)
    store.complete(WorkerReport(disk_failed=[key(0)]))
    assert not store.on_disk(key(0))


def test_a_slot_under_a_write_through_is_never_reused_before_the_write_is_reported() -> None:
    # the disk writer reads the chunk straight from its memory slot (no copy on the engine thread)
    store = make(num_slots=2, disk=DiskSettings(capacity_entries=8, write_through=True), world_size=2)
    for i in (0, 1):
        store.prepare_store(key(i), NS)
        store.complete(WorkerReport(stored=[key(i)]))
        store.complete(WorkerReport(stored=[key(i)]))
    assert store.prepare_store(key(2), NS) is None  # both slots are being written: no eviction
    store.complete(WorkerReport(disk_written=[key(0)]))
    assert store.prepare_store(key(2), NS) is None  # one rank of two is not enough
    store.complete(WorkerReport(disk_failed=[key(0)]))
    assert store.prepare_store(key(2), NS) is not None  # key 0's write is over (failed on a rank)
    slot_of_1 = store.slot_of(key(1))
    store.tenants.invalidate(NS, {key(1)})  # dropped from the books while its write still reads the slot
    assert not store.in_memory(key(1))
    assert store.prepare_store(key(3), NS) is None
    store.complete(WorkerReport(disk_written=[key(1), key(1)]))
    assert store.prepare_store(key(3), NS) == slot_of_1


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["store", "lease", "release", "promote"]),
                          st.integers(min_value=0, max_value=12)), max_size=80))
def test_capacity_is_never_exceeded(ops: list[tuple[str, int]]) -> None:
    store = make(num_slots=3, disk=DiskSettings(capacity_entries=5, write_through=False))
    for op, i in ops:
        if op == "store" and store.prepare_store(key(i), NS) is not None:
            store.complete(WorkerReport(stored=[key(i)]))
        elif op == "lease" and store.in_memory(key(i)):
            store.leases.acquire(f"r{i % 3}", [key(i)])
        elif op == "release":
            store.leases.release(f"r{i % 3}")
        elif op == "promote" and store.on_disk(key(i)) and not store.in_memory(key(i)):
            store.prepare_promote(f"r{i % 3}", NS, [key(i)])
            store.complete(WorkerReport(promoted=[key(i)]))
        spills = store.take_ops().spills
        store.complete(WorkerReport(disk_written=[s.key for s in spills]))
        assert store.num_memory_entries <= 3
        assert store.num_disk_entries <= 5


# ----- tenants: quotas, TTL, invalidation ------------------------------------------------------

def stored_in(store: TieredStore, namespace: str, *ids: int) -> list[int]:
    """Store ``ids`` in ``namespace``, one engine step each; the ids whose store was planned."""
    planned = []
    for i in ids:
        if store.prepare_store(key(i), namespace) is not None:
            store.complete(WorkerReport(stored=[key(i)]))
            planned.append(i)
    return planned


def test_a_namespace_at_its_memory_quota_evicts_only_its_own_entries() -> None:
    store = make(num_slots=6, limits={"small": NamespaceLimits(memory_bytes=2 * CHUNK_BYTES)})
    stored_in(store, "big", 0, 1, 2)
    stored_in(store, "small", 10, 11, 12, 13)
    assert store.tenants.usage()["small"].memory == 2 and store.tenants.usage()["big"].memory == 3
    assert store.lookup([key(0), key(1), key(2)]).num_chunks == 3  # untouched by "small"
    assert store.lookup([key(12), key(13)]).num_chunks == 2  # its newest two
    assert store.lookup([key(10)]).num_chunks == 0


def test_a_namespace_at_its_quota_with_every_entry_leased_drops_its_store() -> None:
    store = make(num_slots=6, limits={"small": NamespaceLimits(memory_bytes=CHUNK_BYTES)})
    stored_in(store, "small", 0)
    store.leases.acquire("req", [key(0)])
    assert store.prepare_store(key(1), "small") is None  # free slots exist, the quota says no
    assert store.lookup([key(0)]).num_chunks == 1


def test_disk_quota_keeps_a_namespace_from_evicting_the_rest_of_the_disk() -> None:
    store = make(num_slots=16, disk=DiskSettings(capacity_entries=4, write_through=True),
                 limits={"noisy": NamespaceLimits(disk_bytes=CHUNK_BYTES)})
    stored_in(store, "quiet", 0, 1)
    store.complete(WorkerReport(disk_written=[key(0), key(1)]))
    for i in (10, 11, 12):
        stored_in(store, "noisy", i)
        store.complete(WorkerReport(disk_written=[key(i)]))
    ops = store.take_ops()
    assert [ref.key for ref in ops.deletes] == [key(10), key(11)]  # noisy evicted its own files
    assert store.on_disk(key(0)) and store.on_disk(key(1))
    assert store.tenants.usage()["noisy"].disk == 1


def test_entries_older_than_the_namespace_ttl_are_misses_then_removed() -> None:
    clock = Clock()
    store = make(num_slots=4, disk=DiskSettings(capacity_entries=4, write_through=True),
                 limits={"short": NamespaceLimits(ttl_s=10)}, clock=clock)
    stored_in(store, "short", 0)
    stored_in(store, "long", 1)
    store.complete(WorkerReport(disk_written=[key(0), key(1)]))
    clock.now += 9
    assert store.lookup([key(0)]).num_chunks == 1
    clock.now += 2
    assert store.lookup([key(0)]).num_chunks == 0  # expired: a miss before any sweep
    assert store.lookup([key(1)]).num_chunks == 1  # no TTL in "long"
    removed = store.tenants.expire()
    assert (removed.memory, removed.disk) == (1, 1)
    registry = store._metrics.registry
    assert registry.get_sample_value("kvtier_expired_total", {"tier": "memory"}) == 1
    assert registry.get_sample_value("kvtier_expired_total", {"tier": "disk"}) == 1
    assert not store.in_memory(key(0)) and not store.on_disk(key(0))
    assert store.take_ops().deletes == [EntryRef(key(0), "short")]


def test_a_promoted_entry_keeps_the_age_of_its_disk_copy() -> None:
    clock = Clock()
    store = make(num_slots=2, disk=DiskSettings(capacity_entries=4, write_through=True,
                                                initial=[DiskItem(key(7), "short", clock.now - 8)]),
                 limits={"short": NamespaceLimits(ttl_s=10)}, clock=clock)
    store.prepare_promote("req", "short", [key(7)])
    store.complete(WorkerReport(promoted=[key(7)]))
    assert store.lookup([key(7)]).num_chunks == 1
    clock.now += 3
    assert store.lookup([key(7)]).num_chunks == 0


def test_invalidating_a_namespace_removes_it_from_every_tier_and_spares_the_others() -> None:
    store = make(num_slots=8, disk=DiskSettings(capacity_entries=8, write_through=True))
    stored_in(store, "a", 0, 1)
    stored_in(store, "b", 2)
    store.complete(WorkerReport(disk_written=[key(0), key(1), key(2)]))
    store.take_ops()
    removed = store.tenants.invalidate("a")
    assert (removed.memory, removed.disk) == (2, 2)
    assert store._metrics.registry.get_sample_value("kvtier_invalidated_total", {"tier": "disk"}) == 2
    assert store.lookup([key(0)]).num_chunks == 0 and store.lookup([key(1)]).num_chunks == 0
    assert store.lookup([key(2)]).num_chunks == 1
    ops = store.take_ops()
    assert sorted(ref.key for ref in ops.deletes) == [key(0), key(1)] and ops.purges == ["a"]
    assert "a" not in store.tenants.usage() and store.tenants.usage()["b"].memory == 1


def test_invalidating_keys_removes_only_those_keys_of_that_namespace() -> None:
    store = make(num_slots=8)
    stored_in(store, "a", 0, 1)
    stored_in(store, "b", 2)
    removed = store.tenants.invalidate("a", {key(1), key(2)})  # key 2 belongs to "b": untouched
    assert (removed.memory, removed.disk) == (1, 0)
    assert store.lookup([key(0), key(1)]).num_chunks == 1 and store.lookup([key(2)]).num_chunks == 1


def test_an_invalidated_entry_under_a_planned_load_keeps_its_slot_until_the_lease_ends() -> None:
    store = make(num_slots=2)
    stored_in(store, "a", 0)
    slot = store.slot_of(key(0))
    store.leases.acquire("req", [key(0)])  # its load is in this step's plan
    store.tenants.invalidate("a")
    assert store.lookup([key(0)]).num_chunks == 0  # never found again
    stored_in(store, "a", 1, 2)  # 2 evicts 1: the doomed slot is not reused meanwhile
    assert store.slot_of(key(2)) != slot and store.slot_of(key(0)) == slot
    store.leases.release("req")
    store.take_ops()  # reaps
    assert not store.in_memory(key(0))
    assert store.prepare_store(key(3), "a") == slot


def test_an_invalidated_entry_still_in_flight_is_dropped_once_its_data_lands() -> None:
    store = make(num_slots=2)
    slot = store.prepare_store(key(0), "a")
    store.tenants.invalidate("a")
    store.complete(WorkerReport(stored=[key(0)]))
    assert store.lookup([key(0)]).num_chunks == 0
    store.take_ops()
    assert not store.in_memory(key(0)) and slot is not None


def test_lowering_a_quota_trims_the_namespace_at_once() -> None:
    store = make(num_slots=8)
    stored_in(store, "a", 0, 1, 2, 3)
    removed = store.tenants.set_limits("a", NamespaceLimits(memory_bytes=CHUNK_BYTES))
    assert removed.memory == 3 and store.tenants.usage()["a"].memory == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["store", "lease", "release", "invalidate", "expire", "tick"]),
                          st.integers(0, 9), st.sampled_from(["a", "b"])), max_size=60))
def test_tenant_books_stay_consistent(steps: list[tuple[str, int, str]]) -> None:
    """Any mix of stores, leases, invalidations and expiries: usage matches the entries, no slot
    is held twice, a leased entry keeps its slot, quotas hold."""
    clock = Clock()
    store = make(num_slots=5, disk=DiskSettings(capacity_entries=6, write_through=True), clock=clock,
                 limits={"a": NamespaceLimits(ttl_s=5, memory_bytes=3 * CHUNK_BYTES, disk_bytes=4 * CHUNK_BYTES)})
    leased: dict[bytes, int] = {}
    for op, i, namespace in steps:
        if op == "store":
            if store.prepare_store(key(i), namespace) is not None:
                store.complete(WorkerReport(stored=[key(i)], disk_written=[key(i)]))
        elif op == "lease" and store.lookup([key(i)]).num_chunks:
            store.leases.acquire("req", [key(i)])
            leased[key(i)] = store.slot_of(key(i))
        elif op == "release":
            store.leases.release("req")
            leased.clear()
        elif op == "invalidate":
            store.tenants.invalidate(namespace)
        elif op == "expire":
            store.tenants.expire()
        else:
            clock.now += 3
        store.take_ops()
        slots = [entry.slot for _, entry in store._memory.items()]
        assert len(slots) == len(set(slots)) and not set(slots) & set(store._memory.free_slots)
        assert len(slots) + len(store._memory.free_slots) == 5
        for leased_key, slot in leased.items():
            assert store.in_memory(leased_key) and store.slot_of(leased_key) == slot
        usage = store.tenants.usage()
        assert sum(u.memory for u in usage.values()) == store.num_memory_entries
        assert sum(u.disk for u in usage.values()) == store.num_disk_entries
        assert usage.get("a", None) is None or (usage["a"].memory <= 3 and usage["a"].disk <= 4)


def test_an_invalidation_is_planned_for_the_upload_queue_too() -> None:
    from kvtier.plans import Invalidation

    store = make()
    stored(store, 0)
    store.tenants.invalidate(NS, {key(0)})
    store.tenants.invalidate("tenant-b")
    assert store.take_ops().invalidations == [Invalidation(NS, (key(0),)), Invalidation("tenant-b", None)]
