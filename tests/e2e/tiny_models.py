"""Tiny random models of other families and LoRA adapters for the end-to-end tests (CPU and
CUDA). Models are saved with the tiny Llama's tokenizer: the tests feed token ids, the tokenizer
only has to load. Imports nothing but the standard library at module level."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


RANK = 8


def make_adapter(model: str, out: Path, seed: int) -> str:
    """A random rank-8 adapter on the K and V projections of every layer (what changes the KV)."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((Path(model) / "config.json").read_text())
    hidden = config["hidden_size"]
    kv_width = config["num_key_value_heads"] * (hidden // config["num_attention_heads"])
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for name in ("k_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, hidden, generator=generator) * 0.05
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(kv_width, RANK, generator=generator) * 0.05
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": 16, "target_modules": ["k_proj", "v_proj"], "bias": "none",
        "base_model_name_or_path": model, "task_type": "CAUSAL_LM", "lora_dropout": 0.0}))
    return str(out)


def save_random_model(model: object, out: Path, tokenizer_from: str) -> str:
    """Save ``model`` (a transformers model with random weights) in bf16 to ``out``, with the
    tokenizer files of the model folder ``tokenizer_from``."""
    import torch

    model.to(torch.bfloat16).save_pretrained(str(out))  # type: ignore[attr-defined]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tokenizer_from) / name, out / name)
    return str(out)


def make_mamba_hybrid(out: Path, tokenizer_from: str) -> str:
    """A tiny random IBM Granite 4.0 hybrid (``granitemoehybrid``): a Mamba-2 layer, then an
    attention layer; vLLM-CPU runs it natively (its Mamba-2 CPU kernels)."""
    import torch
    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    config = GraniteMoeHybridConfig(
        vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, layer_types=["mamba", "attention"], mamba_n_heads=8, mamba_d_head=32,
        mamba_n_groups=1, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, num_local_experts=0,
        shared_intermediate_size=256, max_position_embeddings=4096, position_embedding_type="rope",
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return save_random_model(GraniteMoeHybridForCausalLM(config), out, tokenizer_from)




def make_linear_attention_hybrid(out: Path, tokenizer_from: str) -> str:
    """A tiny random Qwen3-Next (``qwen3_next``): gated delta net (linear attention) layers between
    full-attention layers, a small MoE; vLLM-CPU runs it natively (head dims of 64: its attention
    refuses 32)."""
    import torch
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    config = Qwen3NextConfig(
        vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, linear_num_value_heads=4, linear_num_key_heads=2,
        linear_key_head_dim=64, linear_value_head_dim=64, linear_conv_kernel_dim=4, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return save_random_model(Qwen3NextForCausalLM(config), out, tokenizer_from)


IMAGE_SIZE = 112  # pixels a side
QUERY_TOKENS = 32  # image tokens per image: BLIP-2's learned queries


def make_vision_language(out: Path, tokenizer_from: str) -> str:
    """A tiny random BLIP-2 (vision tower, Q-Former, OPT text model) with its processor, built
    offline from the tiny Llama's tokenizer plus an ``<image>`` token. vLLM puts an image's 32
    query tokens in front of the prompt. BLIP-2 is a vision-language family whose vLLM module and
    processor need no torchvision (absent here): vLLM 0.32's LLaVA, PaliGemma, Qwen2-VL, Gemma 3
    and others import it (directly or through the Pixtral encoder info)."""
    import torch
    from transformers import (AutoTokenizer, Blip2Config, Blip2ForConditionalGeneration, Blip2Processor,
                              Blip2QFormerConfig, Blip2VisionConfig, BlipImageProcessor, OPTConfig)

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    processor = Blip2Processor(image_processor=BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
                               tokenizer=tokenizer, num_query_tokens=QUERY_TOKENS)
    vision = Blip2VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                               image_size=IMAGE_SIZE, patch_size=14)
    qformer = Blip2QFormerConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                 encoder_hidden_size=64, vocab_size=len(tokenizer))
    text = OPTConfig(vocab_size=len(tokenizer), hidden_size=256, ffn_dim=512, num_hidden_layers=2,
                     num_attention_heads=4, word_embed_proj_dim=256, max_position_embeddings=4096, bos_token_id=1,
                     eos_token_id=2, pad_token_id=3)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                         num_query_tokens=QUERY_TOKENS, image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(str(out))
    processor.save_pretrained(str(out))
    return str(out)
