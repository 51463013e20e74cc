"""kvtier for transformers: a prefix loaded from kvtier gives the logits of a full prefill."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kvtier.admin.service import AdminService, StoreShape
from kvtier.errors import ConfigError, LayoutError
from kvtier.integrations.transformers import PrefixKVCache, generate_with_prefix_cache

CHUNK = 16
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tiny_model(dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(dtype).eval()


def prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def full_logits(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, logits_to_keep=1).logits[:, -1].float()


def store_prompt(model: LlamaForCausalLM, cache: PrefixKVCache, ids: torch.Tensor) -> int:
    past = model(input_ids=ids, use_cache=True).past_key_values
    return cache.store(ids[0].tolist(), past)


@torch.no_grad()
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_cached_prefix_gives_the_logits_of_a_full_prefill(dtype: torch.dtype, atol: float, device: str) -> None:
    # on CUDA the load goes through the staging ring and each decoder layer waits for its own KV
    model = tiny_model(dtype).to(device)
    cache = PrefixKVCache.for_model(model, "tiny", chunk_tokens=CHUNK, capacity_bytes=1 << 20)
    ids = prompt(100, seed=1).to(device)
    first = generate_with_prefix_cache(model, ids, cache)  # a miss: computes all, stores 6 chunks
    assert first.num_cached_tokens == 0 and len(cache) == 6
    second = generate_with_prefix_cache(model, ids, cache)  # loads 96 tokens, computes 4
    assert second.num_cached_tokens == 96
    reference = full_logits(model, ids)
    torch.testing.assert_close(second.logits.float(), reference, atol=atol, rtol=0)
    torch.testing.assert_close(first.logits.float(), reference, atol=atol, rtol=0)


@torch.no_grad()
def test_partial_hit_loads_only_the_shared_whole_chunks() -> None:
    model = tiny_model(torch.float32)
    cache = PrefixKVCache.for_model(model, "tiny", chunk_tokens=CHUNK, capacity_bytes=1 << 20)
    a = prompt(80, seed=2)
    assert store_prompt(model, cache, a) == 5
    # b shares a's first 40 tokens: two whole chunks (32 tokens) hit, the third chunk differs
    b = torch.cat([a[:, :40], prompt(30, seed=3)], dim=1)
    assert cache.lookup(b[0].tolist()) == 32
    out = generate_with_prefix_cache(model, b, cache, store=False)
    assert out.num_cached_tokens == 32
    torch.testing.assert_close(out.logits, full_logits(model, b), atol=1e-4, rtol=0)
    # a prompt of exactly 5 chunks leaves its last chunk to compute (at least one token)
    assert cache.lookup(a[0].tolist()) == 64
    # an unrelated prompt misses
    assert cache.load(prompt(50, seed=4)[0].tolist()) == (0, None)


@torch.no_grad()
def test_loaded_cache_keeps_decoding_like_the_full_one() -> None:
    model = tiny_model(torch.float32)
    cache = PrefixKVCache.for_model(model, "tiny", chunk_tokens=CHUNK, capacity_bytes=1 << 20)
    ids = prompt(70, seed=5)
    store_prompt(model, cache, ids)
    num_tokens, loaded = cache.load(ids[0].tolist())
    assert num_tokens == 64 and loaded is not None and loaded.get_seq_length() == 64
    out = model(input_ids=ids[:, 64:], past_key_values=loaded, use_cache=True)
    reference = model(input_ids=ids, use_cache=True)
    next_token = out.logits[:, -1:].argmax(-1)
    step = model(input_ids=next_token, past_key_values=out.past_key_values).logits[:, -1]
    expected = model(input_ids=next_token, past_key_values=reference.past_key_values).logits[:, -1]
    torch.testing.assert_close(step, expected, atol=1e-4, rtol=0)


@torch.no_grad()
def test_full_memory_evicts_least_recently_used_chunks_and_lookups_stop_at_a_gap() -> None:
    model = tiny_model(torch.float32)
    one_chunk = PrefixKVCache.for_model(model, "tiny", chunk_tokens=CHUNK, capacity_bytes=1 << 20).slot_bytes
    cache = PrefixKVCache.for_model(model, "tiny", chunk_tokens=CHUNK, capacity_bytes=4 * one_chunk)
    a, b = prompt(49, seed=6), prompt(49, seed=7)
    assert store_prompt(model, cache, a) == 3
    assert store_prompt(model, cache, b) == 3  # the free slot, then a's two oldest chunks
    assert len(cache) == 4
    assert cache.lookup(b[0].tolist()) == 48
    assert cache.lookup(a[0].tolist()) == 0  # a's first chunk was evicted: its later chunks are useless
    # a prompt longer than memory stores a prefix of itself and never evicts its own chunks
    assert store_prompt(model, cache, prompt(120, seed=8)) == 4


def test_bad_shapes_and_capacity_are_refused() -> None:
    with pytest.raises(ConfigError, match="capacity_bytes"):
        PrefixKVCache("m", 2, 2, 8, torch.float32, chunk_tokens=CHUNK, capacity_bytes=100)
    cache = PrefixKVCache("m", 2, 2, 8, torch.float32, chunk_tokens=CHUNK, capacity_bytes=1 << 20)
    wrong = DynamicCache()
    for _ in range(2):
        wrong.update(torch.zeros(1, 3, 16, 8), torch.zeros(1, 3, 16, 8), len(wrong.layers))
    with pytest.raises(LayoutError, match="expected \\(1, 2, 16, 8\\)"):
        cache.store(list(range(16)), wrong)


def test_namespaces_keep_models_apart() -> None:
    a = PrefixKVCache("model-a", 2, 2, 8, torch.float32, chunk_tokens=CHUNK, capacity_bytes=1 << 20)
    b = PrefixKVCache("model-b", 2, 2, 8, torch.float32, chunk_tokens=CHUNK, capacity_bytes=1 << 20)
    tokens = list(range(40))
    assert a.keys(tokens) != b.keys(tokens)


@torch.no_grad()
def test_the_admin_api_sees_and_invalidates_what_the_cache_stores() -> None:
    """One set of books: the transformers integration and the admin service share its KVManager."""
    model = tiny_model(torch.float32)
    cache = PrefixKVCache.for_model(model, "tiny", chunk_tokens=CHUNK, capacity_bytes=1 << 20)
    admin = AdminService(cache.lock, cache.manager, cache.namespace,
                         StoreShape(CHUNK, cache.slot_bytes, cache.num_slots, 0, 1), None, None)
    ids = prompt(49, seed=9)
    assert store_prompt(model, cache, ids) == 3
    found = admin.lookup("default", "", ids[0].tolist())
    assert found["cached_chunks"] == 3 and found["by_tier"] == {"memory": 3, "disk": 0, "remote": 0}
    assert admin.stats()["namespaces"]["default"]["memory_entries"] == 3
    assert admin.invalidate("default", None)["memory"]["entries"] == 3
    assert cache.lookup(ids[0].tolist()) == 0 and len(cache) == 0
    assert generate_with_prefix_cache(model, ids, cache).num_cached_tokens == 0  # recomputed, then stored again
    assert cache.lookup(ids[0].tolist()) == 48 and admin.lookup("default", "", ids[0].tolist())["cached_chunks"] == 3
