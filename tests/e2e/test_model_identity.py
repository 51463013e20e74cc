"""A checkpoint swapped in at the same path never meets the old checkpoint's KV: the model's
fingerprint (weights sampled, config, dtype, KV dtype) is in every key. Before, the second engine
loaded the first checkpoint's KV from disk: wrong output, silently."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.e2e.engines import run_engine
from tests.e2e.test_vllm_connector import CHUNK, P, S2

pytestmark = pytest.mark.e2e


def test_a_swapped_checkpoint_gets_no_hit_from_the_old_ones_disk_entries(tiny_model: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    config = {"memory.capacity": "64MiB", "disk.path": str(tmp_path / "disk")}
    first = run_engine({"model": str(model), "kvtier": config,
                        "actions": [{"op": "generate", "prompts": [P + S2]}]}, tmp_path, "checkpoint-a")
    assert first[0][0]["num_cached_tokens"] == 0
    weights = model / "model.safetensors"
    tensors = load_file(str(weights))
    for name, tensor in tensors.items():  # a fine-tune: every weight moves a little
        if name.endswith("proj.weight"):
            tensors[name] = tensor + 0.01
    save_file(tensors, str(weights), metadata={"format": "pt"})
    second = run_engine({"model": str(model), "kvtier": config, "actions": [
        {"op": "generate", "prompts": [P + S2]},
        {"op": "generate", "prompts": [P + S2]},  # its own KV: a hit (vLLM's cache, then kvtier's)
    ]}, tmp_path, "checkpoint-b")
    assert second[0][0]["num_cached_tokens"] == 0  # nothing from checkpoint A's entries
    assert second[1][0]["num_cached_tokens"] >= 4 * CHUNK
    again = run_engine({"model": str(model), "kvtier": config,
                        "actions": [{"op": "generate", "prompts": [P + S2]}]}, tmp_path, "checkpoint-b-restart")
    assert again[0][0]["num_cached_tokens"] == 4 * CHUNK  # checkpoint B's own entries load after a restart
    assert again[0][0]["tokens"] == second[1][0]["tokens"]  # the oracle: vLLM's own prefix cache
