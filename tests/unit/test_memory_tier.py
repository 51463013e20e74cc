"""The memory tier in one process (``kvtier.tiers.memory``): what the contract suite
(tests/contract) does not cover: a full memory, and input it refuses."""

from __future__ import annotations

import time

import pytest

from kvtier.config import NamespaceLimits
from kvtier.datapath import HostPool
from kvtier.metrics import Metrics
from kvtier.store import TieredStore
from kvtier.tiers.contract import ReadResult
from kvtier.tiers.memory import MemoryTier

LAYOUT = bytes(range(16))
SLOT_BYTES = 1024
NS = "tenant-a"


def memory_tier(num_slots: int, limits: dict[str, NamespaceLimits] | None = None) -> MemoryTier:
    books = TieredStore(num_slots, "lru", None, 1, Metrics(), SLOT_BYTES, limits or {}, time.time)
    return MemoryTier(books, HostPool(num_slots, SLOT_BYTES, pin_memory=False), LAYOUT)


def key_of(i: int) -> bytes:
    return i.to_bytes(16, "little")


def test_a_full_memory_evicts_the_least_recently_used_entry() -> None:
    tier = memory_tier(2)
    assert tier.put_many([(key_of(i), bytes([i]) * SLOT_BYTES) for i in range(2)], 0, LAYOUT, namespace=NS) == [True] * 2
    assert tier.exists_prefix([key_of(0)], 0, namespace=NS) == 1  # a lookup does not touch
    out = bytearray(SLOT_BYTES)
    assert tier.get_many_into([(key_of(0), memoryview(out))], 0, LAYOUT, namespace=NS) == [ReadResult.OK]
    assert tier.put_many([(key_of(2), bytes([2]) * SLOT_BYTES)], 0, LAYOUT, namespace=NS) == [True]
    held = [tier.exists_prefix([key_of(i)], 0, namespace=NS) for i in range(3)]
    assert held == [1, 0, 1]  # key 0 was read since: key 1 was the least recently used


def test_a_namespace_at_its_quota_evicts_its_own_entries_only() -> None:
    tier = memory_tier(4, {"small": NamespaceLimits(memory_bytes=SLOT_BYTES)})
    assert tier.put_many([(key_of(9), bytes(SLOT_BYTES))], 0, LAYOUT, namespace=NS) == [True]
    # one batch: its entries become visible together, so the second finds the first still pending
    assert tier.put_many([(key_of(i), bytes(SLOT_BYTES)) for i in range(2)], 0, LAYOUT, namespace="small") == \
        [True, False]
    assert tier.put_many([(key_of(1), bytes(SLOT_BYTES))], 0, LAYOUT, namespace="small") == [True]
    assert [tier.exists_prefix([key_of(i)], 0, namespace="small") for i in range(2)] == [0, 1]
    assert tier.exists_prefix([key_of(9)], 0, namespace=NS) == 1


def test_another_namespace_holding_the_key_makes_a_write_fail() -> None:
    tier = memory_tier(4)
    assert tier.put_many([(key_of(1), bytes(SLOT_BYTES))], 0, LAYOUT, namespace=NS) == [True]
    assert tier.put_many([(key_of(1), bytes(SLOT_BYTES))], 0, LAYOUT, namespace="other") == [False]
    assert tier.exists_prefix([key_of(1)], 0, namespace="other") == 0
    assert tier.put_many([(key_of(2), bytes(SLOT_BYTES))], 1, LAYOUT, namespace=NS) == [False]  # one rank


def test_bad_input_is_refused() -> None:
    tier = memory_tier(2)
    with pytest.raises(ValueError, match="1024 bytes, got 10"):
        tier.put_many([(key_of(1), bytes(10))], 0, LAYOUT, namespace=NS)
    with pytest.raises(ValueError, match="layout"):
        tier.get_many_into([(key_of(1), memoryview(bytearray(SLOT_BYTES)))], 0, bytes(16), namespace=NS)
    with pytest.raises(ValueError, match="namespace"):
        tier.put_many([(key_of(1), bytes(SLOT_BYTES))], 0, LAYOUT, namespace="../x")
    assert tier.exists_prefix([key_of(1)], 0, namespace=NS) == 0
