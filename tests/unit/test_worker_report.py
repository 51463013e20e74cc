"""Loads are counted as the engine sees them under tensor parallelism: a chunk reached the engine
only if every rank loaded it; vLLM recomputes what failed on any rank. Ranks settle an
asynchronous load in different steps, so the manager counts it once all ranks reported."""

from __future__ import annotations

import time

from kvtier.config import load_config
from kvtier.manager import KVManager
from kvtier.metrics import Metrics
from kvtier.plans import WorkerReport
from kvtier.store import TieredStore
from tests.unit.test_store import CHUNK_BYTES

CHUNK = 256


def manager(world_size: int) -> tuple[KVManager, Metrics]:
    config = load_config({"chunk_tokens": CHUNK}, {}).config
    metrics = Metrics()
    store = TieredStore(4, "lru", None, world_size, metrics, CHUNK_BYTES, {}, time.time)
    return KVManager(config, store, metrics, None, CHUNK, CHUNK_BYTES, world_size), metrics


def counted(metrics: Metrics) -> tuple[float, float]:
    return metrics.loaded_tokens._value.get(), metrics.failed_load_tokens._value.get()


def test_a_chunk_failed_on_one_rank_is_failed_for_all_even_when_ranks_settle_apart() -> None:
    kv, metrics = manager(world_size=2)
    kv.complete(WorkerReport(settled_loads=[("r", 4 * CHUNK, 4 * CHUNK)]), 0)  # rank 0: all four chunks
    assert counted(metrics) == (0, 0)  # rank 1 has not settled yet
    kv.complete(WorkerReport(settled_loads=[("r", 4 * CHUNK, CHUNK)]), 0)  # rank 1: its second chunk failed
    assert counted(metrics) == (CHUNK, 3 * CHUNK)


def test_ranks_that_agree_count_once_and_memory_copies_count_once() -> None:
    kv, metrics = manager(world_size=2)
    both = WorkerReport(settled_loads=[("r", 2 * CHUNK, 2 * CHUNK)]).aggregate(
        WorkerReport(settled_loads=[("r", 2 * CHUNK, 2 * CHUNK)]))
    kv.complete(both, 0)
    copies = WorkerReport(copied_tokens=CHUNK).aggregate(WorkerReport(copied_tokens=CHUNK))
    kv.complete(copies, 0)
    assert counted(metrics) == (3 * CHUNK, 0)


def test_a_request_whose_remote_load_failed_is_not_planned_from_the_remote_again() -> None:
    """vLLM reschedules a request whose load failed and asks the connector again. Asking the
    remote again planned the same reads, which failed at once while the worker's remote tier
    backed off: the request looped through failed loads, one per step, for 24 s (a 3 s
    deadline on a slow link). Now it is recomputed."""
    from kvtier.manager import LoadRequest
    from tests.dict_tier import DictTier
    from tests.unit.test_store import NS, key

    config = load_config({"chunk_tokens": CHUNK, "remote.cost_gate": False}, {}).config
    metrics = Metrics()
    store = TieredStore(4, "lru", None, 1, metrics, CHUNK_BYTES, {}, time.time)
    remote = DictTier()
    kv = KVManager(config, store, metrics, remote, CHUNK, CHUNK_BYTES, 1)
    for i in (1, 2):
        assert remote.put(key(i), 0, bytes(CHUNK_BYTES), b"\x01" * 16, namespace=NS)

    def plan(owner: str):
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the remote answers on a background thread
            planned = kv.plan_load(LoadRequest(owner, NS, [key(1), key(2), key(3)], 0, 0))
            if planned is not None:
                return planned
            time.sleep(0.005)
        raise AssertionError("no answer from the remote")

    first = plan("r1")
    assert len(first.remote) == 2
    kv.complete(WorkerReport(promote_failed=[key(1), key(2)], remote_failed=[key(1), key(2)],
                             settled_loads=[("r1", 2 * CHUNK, 0)]), 0)
    kv.load_finished("r1")
    assert plan("r1").remote == ()  # rescheduled after the failure: recomputed
    assert len(plan("r2").remote) == 2  # another request still may
    kv.close()


def by_tier(metrics: Metrics) -> dict[str, float]:
    return {tier: metrics.loaded_tier_tokens.labels(tier=tier)._value.get() for tier in ("memory", "disk", "remote")}


def test_tier_counters_count_what_reached_the_engine() -> None:
    """A load planned as memory, disk, disk, remote whose third chunk failed on rank 1: only the
    memory chunk and the first disk chunk reached the engine, and only they are credited."""
    kv, metrics = manager(world_size=2)
    tiers = (("memory", CHUNK), ("disk", CHUNK), ("disk", CHUNK), ("remote", CHUNK))
    kv.complete(WorkerReport(settled_loads=[("r", 4 * CHUNK, 4 * CHUNK)], settled_tiers=[("r", tiers)]), 0)
    assert by_tier(metrics) == {"memory": 0, "disk": 0, "remote": 0}  # rank 1 has not settled yet
    kv.complete(WorkerReport(settled_loads=[("r", 4 * CHUNK, 2 * CHUNK)], settled_tiers=[("r", tiers)]), 0)
    assert by_tier(metrics) == {"memory": CHUNK, "disk": CHUNK, "remote": 0}
    assert sum(by_tier(metrics).values()) == counted(metrics)[0]
    # a first chunk the engine held in part (a partial chunk of blocks) and synchronous memory copies
    kv.complete(WorkerReport(settled_loads=[("s", CHUNK, CHUNK)], settled_tiers=[("s", (("disk", CHUNK // 2),
                                                                                          ("disk", CHUNK // 2)))])
                .aggregate(WorkerReport(settled_loads=[("s", CHUNK, CHUNK)])), 0)
    kv.complete(WorkerReport(copied_tokens=CHUNK).aggregate(WorkerReport(copied_tokens=CHUNK)), 0)
    assert by_tier(metrics) == {"memory": 2 * CHUNK, "disk": 2 * CHUNK, "remote": 0}
    assert sum(by_tier(metrics).values()) == counted(metrics)[0]
