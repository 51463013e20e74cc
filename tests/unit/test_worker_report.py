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
