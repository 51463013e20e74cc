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
