"""Issue 14 #2: a model with recurrent-state layers (Mamba, linear attention: vLLM's ``MambaSpec``
KV cache groups) stops kvtier at start-up with an error naming the model type and the kind of
state; an attention-only model passes. (The end-to-end check with a real engine is in
tests/e2e/test_startup_errors.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum
from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec, MLAAttentionSpec

from kvtier.errors import LayoutError
from kvtier.integrations.vllm.state_layers import refuse_recurrent_state

ATTENTION = FullAttentionSpec(block_size=128, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)


def state(kind: MambaAttentionBackendEnum) -> MambaSpec:
    return MambaSpec(block_size=128, shapes=((3, 256), (8, 32, 16)), dtypes=(torch.bfloat16, torch.float32),
                     mamba_type=kind)


def test_a_mamba_hybrid_is_refused_naming_its_model_type_and_state() -> None:
    with pytest.raises(LayoutError) as refused:
        refuse_recurrent_state("bamba", [ATTENTION, state(MambaAttentionBackendEnum.MAMBA2)], False)
    message = str(refused.value)
    assert "model type 'bamba'" in message and "(MAMBA2)" in message and "without kvtier" in message


def test_a_linear_attention_hybrid_is_refused() -> None:
    with pytest.raises(LayoutError, match=r"'qwen3_next'.*\(GDN_ATTN\)"):
        refuse_recurrent_state("qwen3_next", [state(MambaAttentionBackendEnum.GDN_ATTN), ATTENTION], False)


def test_a_model_that_says_it_keeps_a_state_is_refused_whatever_its_groups() -> None:
    with pytest.raises(LayoutError, match="'mamba'"):
        refuse_recurrent_state("mamba", [], True)


def test_attention_only_models_pass() -> None:
    refuse_recurrent_state("llama", [ATTENTION], False)
    mla = MLAAttentionSpec(block_size=128, num_kv_heads=1, head_size=576, dtype=torch.bfloat16)
    refuse_recurrent_state("deepseek_v2", [mla], False)


def test_the_connector_refuses_a_mamba_hybrid_from_its_config_before_vllm_sizes_the_kv_cache(tmp_path) -> None:
    # with the hybrid manager off (this connector lacks hybrid support), vLLM fails right after
    # this call with "Failed to promote local KV cache specs to one unified type": kvtier speaks first
    from transformers import GraniteMoeHybridConfig, LlamaConfig
    from vllm.config import ModelConfig

    from kvtier.integrations.vllm.connector import KVTierConnector

    GraniteMoeHybridConfig(layer_types=["mamba", "attention"], num_hidden_layers=2).save_pretrained(tmp_path / "hybrid")
    LlamaConfig(num_hidden_layers=2).save_pretrained(tmp_path / "llama")
    hybrid = SimpleNamespace(model_config=ModelConfig(model=str(tmp_path / "hybrid"), tokenizer=None,
                                                      skip_tokenizer_init=True))
    with pytest.raises(LayoutError, match="model type 'granitemoehybrid'"):
        KVTierConnector.get_required_kvcache_layout(hybrid)  # type: ignore[arg-type]
    llama = SimpleNamespace(model_config=ModelConfig(model=str(tmp_path / "llama"), skip_tokenizer_init=True))
    assert KVTierConnector.get_required_kvcache_layout(llama) == "HND"  # type: ignore[arg-type]
