"""End to end in CUDA vLLM (runs where a GPU and CUDA vLLM are present; skipped elsewhere).

A small Llama-shaped model with dummy weights, CUDA graphs on. A prompt runs cold (kvtier stores
it), then again from vLLM's own prefix cache (the oracle), then again after ``reset_prefix_cache``
so that its prefix comes from kvtier's host memory: the greedy output must equal the oracle's at
the same cached length, and kvtier's counters must show the memory hits. Also checks that
``reset_prefix_cache`` succeeds once kvtier's stores are done, on steps without a forward (vLLM
0.26 skips ``wait_for_save`` there).
"""

from __future__ import annotations

import json
import random
import re
import socket
import urllib.request
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
vllm = pytest.importorskip("vllm")

from tests.e2e.tiny_models import RANK, make_adapter  # noqa: E402

pytestmark = pytest.mark.e2e

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 512, "intermediate_size": 1024,
    "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
    "vocab_size": 32000, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "bos_token_id": 1, "eos_token_id": 2,
}


@pytest.fixture(autouse=True)
def one_engine_per_test():
    """Each test builds its own engine in this process (V1 multiprocessing off), but vLLM keeps a
    worker's KV connector in a process global: shut it down after each test, or the next engine
    would be handed the last one's connector."""
    yield
    import gc

    from vllm.distributed.kv_transfer import ensure_kv_transfer_shutdown

    ensure_kv_transfer_shutdown()
    gc.collect()
    torch.cuda.empty_cache()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kvtier_counter(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


# A tiny DeepSeek-V2 (multi-head latent attention) with the real latent width (512 + 64 rope dims),
# dense layers only: kvtier keeps one latent per token and layer.
TINY_DEEPSEEK = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "hidden_size": 1024,
    "intermediate_size": 2048, "moe_intermediate_size": 256, "num_hidden_layers": 2, "first_k_dense_replace": 2,
    "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2, "num_attention_heads": 16,
    "num_key_value_heads": 16, "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128, "v_head_dim": 128, "vocab_size": 32000, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
}


def write_model(path: Path, config: dict) -> str:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def kvtier_engine(model: str, port: int, enforce_eager: bool, enable_lora: bool = False):
    from vllm import LLM

    lora = {"enable_lora": True, "max_lora_rank": RANK, "max_loras": 2} if enable_lora else {}
    return LLM(model=model, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", max_model_len=4096,
               gpu_memory_utilization=0.2, enable_prefix_caching=True, seed=0, enforce_eager=enforce_eager,
               kv_transfer_config={"kv_connector": "KVTierConnector", "kv_role": "kv_both",
                                   # the GPU machine runs kvtier from its source tree: no entry point
                                   "kv_connector_module_path": "kvtier.integrations.vllm.connector",
                                   "kv_connector_extra_config": {"memory": {"capacity": "1GiB"},
                                                                 "metrics": {"port": port}}}, **lora)


def reset_prefix_cache(llm) -> None:
    """vLLM's prefix cache emptied, once kvtier's stores (and delayed frees) are done."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, detokenize=False)
    for attempt in range(50):
        if llm.reset_prefix_cache():
            return
        llm.generate([{"prompt_token_ids": [5 + attempt] * 8}], params, use_tqdm=False)
    raise AssertionError("reset_prefix_cache never succeeded: kvtier kept blocks")


def test_mla_latents_from_kvtier_equal_vllms_own_prefix_cache(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm import SamplingParams

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    port = free_port()
    llm = kvtier_engine(write_model(tmp_path / "tiny-deepseek", TINY_DEEPSEEK), port, enforce_eager=True)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, detokenize=False)
    prompt = [random.Random(5).randrange(100, 31000) for _ in range(4 * 256 + 1)]

    def run() -> tuple[int, list[int]]:
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
        return out.num_cached_tokens or 0, list(out.outputs[0].token_ids)

    run()
    oracle = run()
    assert oracle[0] == 1024
    reset_prefix_cache(llm)
    hits_before = kvtier_counter(port, 'kvtier_hits_total{tier="memory"}')
    assert run() == oracle
    assert kvtier_counter(port, 'kvtier_hits_total{tier="memory"}') - hits_before == 4


def test_another_lora_adapter_never_gets_kvtiers_kv_in_cuda_vllm(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    port = free_port()
    model = write_model(tmp_path / "tiny-llama", TINY_LLAMA)
    llm = kvtier_engine(model, port, enforce_eager=True, enable_lora=True)
    sql = LoRARequest("sql", 1, make_adapter(model, tmp_path / "sql", seed=1))
    chat = LoRARequest("chat", 2, make_adapter(model, tmp_path / "chat", seed=2))
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, detokenize=False)
    prompt = [random.Random(7).randrange(100, 31000) for _ in range(4 * 256 + 1)]

    def run(lora: LoRARequest) -> tuple[int, list[int]]:
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False, lora_request=lora)[0]
        return out.num_cached_tokens or 0, list(out.outputs[0].token_ids)

    run(sql)  # kvtier stores sql's KV
    oracle = run(sql)
    assert oracle[0] == 1024
    reset_prefix_cache(llm)
    assert run(chat)[0] == 0  # the same tokens under another adapter: nothing from kvtier
    reset_prefix_cache(llm)
    assert run(sql) == oracle  # sql's own KV, from kvtier's memory


def test_memory_hit_in_cuda_vllm_equals_its_own_prefix_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm import LLM, SamplingParams

    # this process has initialised CUDA (the skip check): the engine core must not be a fork of it
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    model = tmp_path / "tiny-llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_LLAMA))
    port = free_port()
    llm = LLM(model=str(model), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=4096, gpu_memory_utilization=0.3, enable_prefix_caching=True, seed=0,
              kv_transfer_config={"kv_connector": "KVTierConnector", "kv_role": "kv_both",
                                  "kv_connector_module_path": "kvtier.integrations.vllm.connector",
                                  "kv_connector_extra_config": {"memory": {"capacity": "1GiB"},
                                                                "metrics": {"port": port}}})
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, detokenize=False)
    rng = random.Random(3)
    prompt = [rng.randrange(100, 31000) for _ in range(5 * 256 + 1)]  # five whole chunks and one token

    def run() -> tuple[int, list[int]]:
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
        return out.num_cached_tokens or 0, list(out.outputs[0].token_ids)

    run()  # cold: kvtier stores the five whole 256-token chunks
    oracle = run()  # vLLM's own prefix cache
    assert oracle[0] == 1280  # the last prompt token is always recomputed
    for attempt in range(50):  # steps without work release kvtier's delayed frees
        if llm.reset_prefix_cache():
            break
        llm.generate([{"prompt_token_ids": [5 + attempt] * 8}], params, use_tqdm=False)
    else:
        raise AssertionError("reset_prefix_cache never succeeded: kvtier kept blocks")
    hits_before = kvtier_counter(port, 'kvtier_hits_total{tier="memory"}')
    assert run() == oracle
    assert kvtier_counter(port, 'kvtier_hits_total{tier="memory"}') - hits_before == 5
    assert kvtier_counter(port, "kvtier_loaded_tokens_total") == 1280
