"""The tiered store's books: two-phase visibility, leases, eviction, spill, promotion, failures."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.metrics import Metrics
from kvtier.plans import WorkerReport
from kvtier.store import DiskSettings, TieredStore


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def stored(store: TieredStore, *ids: int) -> None:
    """Plan stores of ``ids`` and report them done, as one engine step would."""
    for i in ids:
        assert store.prepare_store(key(i)) is not None
    store.complete(WorkerReport(stored=[key(i) for i in ids]))


def make(num_slots: int = 4, disk: DiskSettings | None = None, world_size: int = 1) -> TieredStore:
    return TieredStore(num_slots, "lru", disk, world_size, Metrics())


def test_entries_are_invisible_until_the_worker_reports_them() -> None:
    store = make()
    store.prepare_store(key(0))
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
    assert store.prepare_store(key(0)) is None


def test_leased_entries_are_never_evicted_and_full_memory_drops_stores() -> None:
    store = make(num_slots=2)
    stored(store, 0, 1)
    store.leases.acquire("req", [key(0), key(1)])
    assert store.prepare_store(key(2)) is None  # dropped, counted
    store.leases.release("req")
    assert store.prepare_store(key(2)) is not None
    assert store.num_memory_entries == 2


def test_tensor_parallel_commit_needs_every_rank() -> None:
    store = make(world_size=2)
    store.prepare_store(key(0))
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
    planned = store.prepare_promote("req", [key(0)])
    assert planned == [key(0)]
    store.complete(WorkerReport(promoted=[key(0)]))
    assert store.lookup([key(0)]).disk_only == ()
    assert store.in_memory(key(0)) and not store.in_memory(key(1))


def test_failed_promote_drops_the_entry_everywhere() -> None:
    store = make(num_slots=2, disk=DiskSettings(capacity_entries=4, write_through=True, initial_keys=[key(7)]))
    assert store.lookup([key(7)]).disk_only == (0,)
    store.prepare_promote("req", [key(7)])
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
    assert ops.deletes == [key(0)] and store.num_disk_entries == 2


def test_dropped_disk_write_forgets_the_entry() -> None:
    store = make(num_slots=8, disk=DiskSettings(capacity_entries=2, write_through=True))
    stored(store, 0)
    store.complete(WorkerReport(disk_failed=[key(0)]))
    assert not store.on_disk(key(0))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["store", "lease", "release", "promote"]),
                          st.integers(min_value=0, max_value=12)), max_size=80))
def test_capacity_is_never_exceeded(ops: list[tuple[str, int]]) -> None:
    store = make(num_slots=3, disk=DiskSettings(capacity_entries=5, write_through=False))
    for op, i in ops:
        if op == "store" and store.prepare_store(key(i)) is not None:
            store.complete(WorkerReport(stored=[key(i)]))
        elif op == "lease" and store.in_memory(key(i)):
            store.leases.acquire(f"r{i % 3}", [key(i)])
        elif op == "release":
            store.leases.release(f"r{i % 3}")
        elif op == "promote" and store.on_disk(key(i)) and not store.in_memory(key(i)):
            store.prepare_promote(f"r{i % 3}", [key(i)])
            store.complete(WorkerReport(promoted=[key(i)]))
        spills = store.take_ops().spills
        store.complete(WorkerReport(disk_written=[s.key for s in spills]))
        assert store.num_memory_entries <= 3
        assert store.num_disk_entries <= 5
