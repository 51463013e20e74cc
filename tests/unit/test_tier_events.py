"""Tier events (``kvtier.events``): what the books announce matches what they hold, per tier.

A consumer that applies the events in order (stored: add, removed: discard, cleared: forget the
tier) must end with exactly the entries lookups can see: memory entries ready and not doomed,
disk entries ready, the remote chunks the manager knows. Then the vLLM translation: chunk chains,
hashes as vLLM publishes them, tokens per chunk.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.config import NamespaceLimits
from kvtier.events import EventLog, TierEvent
from kvtier.manager import RemoteKnowledge
from kvtier.plans import WorkerReport
from kvtier.store import DiskSettings, State, TieredStore
from tests.unit.test_store import NS, Clock, key, make

TIERS = ("memory", "disk", "remote")


def replay(events: list[TierEvent], view: dict[str, set[bytes]]) -> None:
    for event in events:
        if event.kind == "cleared":
            view[event.tier].clear()
        elif event.kind == "stored":
            assert not view[event.tier] & set(event.keys), "stored twice without a removal"
            view[event.tier] |= set(event.keys)
        else:
            assert set(event.keys) <= view[event.tier], "removed what was never announced"
            view[event.tier] -= set(event.keys)


def books(store: TieredStore) -> dict[str, set[bytes]]:
    """What lookups can see, per tier (white box: the store's own maps)."""
    now = store._clock()
    memory = {k for k, e in store._memory.items()
              if e.state is State.READY and not e.doomed and not store.tenants.expired(e, now)}
    disk = {k for k, e in store._disk.items() if e.state is State.READY}
    return {"memory": memory, "disk": disk}


def traced_store(**kwargs: object) -> tuple[TieredStore, EventLog]:
    store = make(**kwargs)  # type: ignore[arg-type]
    log = EventLog(TIERS)
    store.events = log
    return store, log


def test_a_store_an_eviction_and_an_invalidation() -> None:
    store, log = traced_store(num_slots=2, disk=DiskSettings(8, write_through=True))
    store.prepare_store(key(0), NS)
    assert log.take() == []  # pending: not announced
    store.complete(WorkerReport(stored=[key(0)]))
    assert log.take() == [TierEvent("stored", "memory", (key(0),))]
    store.complete(WorkerReport(disk_written=[key(0)]))
    assert log.take() == [TierEvent("stored", "disk", (key(0),))]
    for i in (1, 2):
        store.prepare_store(key(i), NS)
    assert log.take() == [TierEvent("removed", "memory", (key(0),))]  # evicted for key 2; still on disk
    store.complete(WorkerReport(stored=[key(1), key(2)], disk_written=[key(1), key(2)]))
    assert log.take() == [TierEvent("stored", "memory", (key(1), key(2))), TierEvent("stored", "disk", (key(1), key(2)))]
    store.tenants.invalidate(NS, {key(1)})
    assert log.take() == [TierEvent("removed", "memory", (key(1),)), TierEvent("removed", "disk", (key(1),))]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["store", "report", "promote", "fail_promote", "fail_disk", "invalidate",
                                           "expire", "lease", "release"]),
                          st.integers(0, 9)), max_size=60))
def test_replayed_events_equal_the_books(ops: list[tuple[str, int]]) -> None:
    clock = Clock()
    store, log = traced_store(num_slots=3, disk=DiskSettings(5, write_through=True), clock=clock,
                              limits={"short": NamespaceLimits(ttl_s=5)})
    view: dict[str, set[bytes]] = {tier: set() for tier in TIERS}
    pending: list[bytes] = []
    for op, i in ops:
        namespace = "short" if i % 3 == 0 else NS
        if op == "store" and store.prepare_store(key(i), namespace) is not None:
            pending.append(key(i))
        elif op == "report":
            store.complete(WorkerReport(stored=pending, promoted=pending, disk_written=pending))
            pending = []
        elif op == "promote" and store.on_disk(key(i)) and not store.in_memory(key(i)):
            pending += [slot_op.key for slot_op in store.prepare_promote("r", namespace, [key(i)])]
        elif op == "fail_promote":
            store.complete(WorkerReport(promote_failed=[key(i)]))
        elif op == "fail_disk":
            store.complete(WorkerReport(disk_failed=[key(i)]))
        elif op == "invalidate":
            store.tenants.invalidate(namespace, None if i > 7 else {key(i)})
        elif op == "expire":
            clock.now += 3
            store.tenants.expire()
        elif op == "lease":
            store.leases.acquire("r", [key(i)])
        elif op == "release":
            store.leases.release("r")
            store._memory.reap()
        replay(log.take(), view)
        expected = books(store)
        assert view["memory"] == expected["memory"] and view["disk"] == expected["disk"]


def test_remote_knowledge_announces_what_it_learns_and_forgets() -> None:
    known = RemoteKnowledge(capacity=2)
    log = EventLog(TIERS)
    known.events = log
    known.remember(key(0))
    known.remember(key(0))  # known already: nothing new
    known.remember(key(1))
    known.remember(key(2))  # over capacity: the oldest is forgotten
    known.forget(key(9))  # never known: nothing
    known.clear()
    assert log.take() == [TierEvent("stored", "remote", (key(0), key(1), key(2))),
                          TierEvent("removed", "remote", (key(0), key(1), key(2)))]


def test_an_overflowing_log_clears_every_tier() -> None:
    log = EventLog(TIERS, max_events=3)
    for i in range(5):
        log.stored("memory", key(i))
    assert log.take() == [TierEvent("cleared", tier) for tier in TIERS]
    log.removed("disk", key(0))
    assert log.take() == [TierEvent("removed", "disk", (key(0),))]


def test_an_overflow_is_one_all_blocks_cleared_for_the_instance() -> None:
    """vLLM's AllBlocksCleared names no medium: a consumer forgets the whole instance on each.
    One per overflow, not one per tier (review finding: three in a row)."""
    from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved

    from kvtier.integrations.vllm.events import ChunkTokens, EventTranslator

    translator = EventTranslator(256, ChunkTokens(8), int_hashes=False)
    cleared = [TierEvent("cleared", tier) for tier in TIERS]
    assert translator.translate(cleared) == [AllBlocksCleared()]
    out = translator.translate([*cleared, TierEvent("removed", "disk", (b"\x01" * 16,)), *cleared])
    assert [type(event) for event in out] == [AllBlocksCleared, BlockRemoved, AllBlocksCleared]


def test_chunks_of_different_adapters_are_announced_apart() -> None:
    """A LoRA adapter's KV is other KV: vLLM names the adapter in its own events, and a router
    keeps each adapter's chains apart; kvtier's events carry it the same way."""
    from vllm.distributed.kv_events import BlockStored

    from kvtier.integrations.vllm.events import Adapter, ChunkTokens, EventTranslator, adapter_of

    chunks = ChunkTokens(8)
    chunks.remember(key(0), None, [0, 0], None)
    chunks.remember(key(1), key(0), [1, 1], None)
    chunks.remember(key(2), key(1), [2, 2], Adapter(5, "sql"))  # continues the chain, another adapter
    chunks.remember(key(3), key(2), [3, 3], Adapter(5, "sql"))
    out = EventTranslator(2, chunks, int_hashes=False).translate([TierEvent("stored", "memory", (key(0), key(1),
                                                                                                  key(2), key(3)))])
    assert [(e.block_hashes, e.parent_block_hash, e.token_ids, e.lora_id, e.lora_name) for e in out] == [
        ([key(0), key(1)], None, [0, 0, 1, 1], None, None), ([key(2), key(3)], key(1), [2, 2, 3, 3], 5, "sql")]
    assert all(isinstance(e, BlockStored) and e.medium == "CPU" for e in out)

    class Request:  # what adapter_of reads of vLLM's Request
        lora_request = None

    assert adapter_of(Request()) is None
    from vllm.lora.request import LoRARequest

    Request.lora_request = LoRARequest("sql", 5, "/adapters/sql")
    assert adapter_of(Request()) == Adapter(5, "sql")
