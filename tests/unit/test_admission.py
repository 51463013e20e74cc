"""Store admission: traffic without reuse stores nothing, a prefix that comes back is stored on its
second sight, and traffic with reuse stores everything at first sight (kvtier.admission)."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvtier.admission import Admission
from kvtier.config import load_config
from kvtier.manager import KVManager, LoadRequest
from kvtier.metrics import Metrics
from kvtier.store import TieredStore
from tests.unit.test_store import CHUNK_BYTES

CHUNK = 256


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def unique_requests(admission: Admission, count: int, start: int = 0, per_request: int = 2) -> int:
    """Observe ``count`` requests of never-seen keys; returns the next unused key number."""
    for r in range(count):
        admission.observe([key(start + r * per_request + i) for i in range(per_request)])
    return start + count * per_request


def test_always_admits_every_chunk_whatever_the_traffic() -> None:
    admission = Admission("always", 0.5, 8, 100)
    unique_requests(admission, 20)
    assert admission.admit(key(10_000))


def test_adaptive_admits_everything_while_it_is_still_learning() -> None:
    admission = Admission("adaptive", 0.1, 16, 100)  # judges after 4 keys
    unique_requests(admission, 1, per_request=3)
    assert admission.learning and admission.admit(key(10_000))
    unique_requests(admission, 1, start=3, per_request=1)
    assert not admission.learning


def test_adaptive_without_reuse_stores_only_what_comes_back() -> None:
    admission = Admission("adaptive", 0.1, 16, 100)
    nxt = unique_requests(admission, 10)
    assert admission.reuse_ratio == 0.0
    fresh = key(nxt)
    admission.observe([fresh])
    assert not admission.admit(fresh)  # first sight: computed, not stored
    admission.observe([fresh])
    assert admission.admit(fresh)  # second sight: stored, served from the third


def test_adaptive_with_reuse_stores_at_first_sight() -> None:
    admission = Admission("adaptive", 0.1, 16, 100)
    for r in range(8):  # a chat: each turn resends the previous turns' chunks
        admission.observe([key(i) for i in range(r + 1)])
    assert admission.reuse_ratio is not None and admission.reuse_ratio > 0.5
    admission.observe([key(500)])
    assert admission.admit(key(500))


def test_second_sight_waits_even_with_reuse() -> None:
    admission = Admission("second_sight", 0.0, 16, 100)
    admission.observe([key(1)])
    assert not admission.admit(key(1))
    admission.observe([key(1)])
    assert admission.admit(key(1))


def test_a_key_repeated_within_one_prompt_is_one_sighting() -> None:
    admission = Admission("second_sight", 0.0, 16, 100)
    admission.observe([key(1), key(1), key(1)])
    assert not admission.admit(key(1))
    assert admission.reuse_ratio == 0.0


def test_memory_is_bounded_and_forgets_the_oldest_sightings_first() -> None:
    admission = Admission("second_sight", 0.0, 16, 3)
    admission.observe([key(1)])
    admission.observe([key(2), key(3), key(4)])  # key 1 is forgotten
    admission.observe([key(1), key(4)])
    assert not admission.admit(key(1)) and admission.admit(key(4))


@pytest.mark.parametrize("args", [("sometimes", 0.1, 8, 8), ("adaptive", 1.5, 8, 8), ("adaptive", 0.1, 0, 8),
                                  ("adaptive", 0.1, 8, 0)])
def test_bad_settings_are_refused(args: tuple[str, float, int, int]) -> None:
    with pytest.raises(ValueError):
        Admission(*args)


@given(st.lists(st.lists(st.integers(0, 12), max_size=6), max_size=30), st.integers(1, 20))
def test_reuse_ratio_is_the_share_of_keys_seen_in_an_earlier_request(requests: list[list[int]], window: int) -> None:
    admission = Admission("adaptive", 0.1, window, 10_000)
    seen: set[int] = set()
    flags: list[bool] = []
    for request in requests:
        admission.observe([key(i) for i in request])
        for i in dict.fromkeys(request):
            flags.append(i in seen)
        seen.update(request)
    recent = flags[-window:]
    expected = sum(recent) / len(recent) if recent else None
    assert admission.reuse_ratio == expected


# ---- through the manager: what the vLLM and transformers integrations call ------------------

def manager(policy: str) -> tuple[KVManager, Metrics]:
    config = load_config({"chunk_tokens": CHUNK, "admission": {"policy": policy, "window": 8}}, {}).config
    metrics = Metrics()
    store = TieredStore(64, "lru", None, 1, metrics, CHUNK_BYTES, {}, time.time)
    return KVManager(config, store, metrics, None, CHUNK, CHUNK_BYTES, 1), metrics


def look_up(kv: KVManager, owner: str, keys: list[bytes]) -> None:
    kv.plan_load(LoadRequest(owner, "default", keys, 0))


def test_the_manager_declines_first_sight_stores_on_traffic_without_reuse() -> None:
    kv, metrics = manager("adaptive")
    for r in range(6):
        keys = [key(2 * r), key(2 * r + 1)]
        look_up(kv, f"warm{r}", keys)
        for k in keys:
            kv.plan_store(k, "default")
    assert metrics.unadmitted_stores._value.get() == 12  # 2 keys seen: learning is over at the first request
    fresh = [key(100), key(101)]
    look_up(kv, "a", fresh)
    assert [kv.plan_store(k, "default") for k in fresh] == [None, None]
    assert metrics.unadmitted_stores._value.get() == 14
    assert metrics.reuse_ratio._value.get() == 0.0
    look_up(kv, "b", fresh)  # the prefix came back: stored now
    assert all(kv.plan_store(k, "default") is not None for k in fresh)
    kv.release("a")
    look_up(kv, "c", fresh)
    assert kv.store.in_memory(fresh[0]) and kv.store.in_memory(fresh[1])


def test_the_manager_with_always_stores_at_first_sight() -> None:
    kv, metrics = manager("always")
    for r in range(6):
        look_up(kv, f"warm{r}", [key(2 * r), key(2 * r + 1)])
    look_up(kv, "a", [key(100)])
    assert kv.plan_store(key(100), "default") is not None
    assert metrics.unadmitted_stores._value.get() == 0


def test_a_request_looked_up_again_is_observed_once() -> None:
    kv, _ = manager("second_sight")
    look_up(kv, "a", [key(1)])
    look_up(kv, "a", [key(1)])  # vLLM asks again (async wait): not a second sighting
    assert kv.plan_store(key(1), "default") is None
