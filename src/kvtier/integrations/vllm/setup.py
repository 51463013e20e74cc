"""What both sides of the connector derive from vLLM's config: kvtier config, KV layout, keys.

The scheduler process and the worker process each build an ``EngineSetup`` from the same inputs,
so they agree on slot count, chunk size and key namespace without talking to each other.

With vLLM's hybrid KV cache manager on, a model with sliding-window and full-attention layers has
several KV cache groups: one ``KVGroup`` each (``kvtier.kvgroups``), all in one slot, their plan in
the layout's fingerprint. Refused at start-up, naming what: chunked-local attention groups, groups
whose pages differ in shape, no full-attention group, and ``memory.kv_format: int8`` with several
groups.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from vllm.config import VllmConfig
from vllm.v1.kv_cache_interface import (AttentionSpec, ChunkedLocalAttentionSpec, FullAttentionSpec, KVCacheConfig,
                                        KVCacheGroupSpec, MLAAttentionSpec, SlidingWindowSpec)

from kvtier.config import KVTierConfig, load_config
from kvtier.datapath import dtype_name
from kvtier.crypto import SEAL_OVERHEAD_BYTES
from kvtier.entry import HEADER_BYTES
from kvtier.errors import ConfigError, LayoutError
from kvtier.fingerprint import model_fingerprint
from kvtier.integrations.vllm.compat import window_tokens
from kvtier.integrations.vllm.state_layers import refuse_recurrent_state
from kvtier.keys import Namespace
from kvtier.kvgroups import GroupPlan, KVGroup
from kvtier.layout import KVLayout


@dataclass(frozen=True)
class EngineSetup:
    config: KVTierConfig
    layout: KVLayout
    namespace: Namespace  # of the configured default tenant; requests may name another
    layer_names: tuple[str, ...]
    world_size: int
    chunk_bytes: int
    num_slots: int
    disk_dir: str | None
    disk_capacity_entries: int
    producer: bool = False  # kv_role kv_producer: a prefill instance, announces handoffs
    groups: GroupPlan | None = None  # several KV cache groups (hybrid allocator on); None: one group

    @property
    def chunk_tokens(self) -> int:
        return self.config.chunk_tokens

    @property
    def blocks_per_chunk(self) -> int:
        return self.config.chunk_tokens // self.layout.block_size

    @property
    def num_shards(self) -> int:
        """Shards of a chunk in the disk and remote tiers: one per tensor-parallel rank, or one in
        all when every rank holds the same KV (MLA): rank 0 writes it and every rank reads it."""
        return 1 if self.layout.replicated_across_ranks else self.world_size

    def shard_of(self, rank: int) -> int:
        """The shard that ``rank`` reads (and writes, when ``writes_shard``)."""
        return rank if rank < self.num_shards else 0

    def writes_shard(self, rank: int) -> bool:
        """Whether ``rank`` writes (and deletes) its shard; the others only acknowledge."""
        return rank < self.num_shards


def platform_layout_kind() -> str:
    """The layout kind this engine's KV tensors will have: vLLM-CPU's own, or on CUDA the packed
    HND pages that FlashAttention, FlashInfer and Triton attention all keep under the HND cache
    layout kvtier's connector asks for. The worker checks the real tensors against it
    (``PagedKV``) and refuses anything else."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return "cpu_lbhnc"
    if current_platform.is_cuda():
        return "packed_hnd"
    raise LayoutError(f"kvtier does not know the KV layout of platform {current_platform.device_type!r}")


def build_setup(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> EngineSetup:
    """Parse kvtier's config and describe the engine's KV cache; raise a clear error if unusable."""
    transfer = vllm_config.kv_transfer_config
    extra = dict(transfer.kv_connector_extra_config or {}) if transfer is not None else {}
    config = load_config(extra, os.environ).config
    model = vllm_config.model_config
    refuse_recurrent_state(str(model.hf_config.model_type), [g.kv_cache_spec for g in kv_cache_config.kv_cache_groups],
                           bool(model.has_inner_state))
    layout, layer_names, kv_groups = _layout_of(kv_cache_config, config.memory.kv_format)
    if config.chunk_tokens % layout.block_size:
        raise ConfigError("chunk_tokens", f"{config.chunk_tokens} is not a multiple of the engine's block "
                          f"size {layout.block_size}; use e.g. {layout.block_size * 2}")
    groups = None
    if len(kv_groups) > 1:
        groups = GroupPlan(kv_groups, layout.block_size, config.chunk_tokens // layout.block_size)
    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size > 1:
        raise ConfigError("engine", "kvtier does not support pipeline parallelism yet")
    world_size = parallel.tensor_parallel_size
    num_shards = 1 if layout.replicated_across_ranks else world_size  # MLA: one copy, whatever the TP size
    namespace = Namespace(config.namespace, model_identity(vllm_config, config.model_id), layout.fingerprint(),
                          num_shards)
    chunk_bytes = layout.chunk_bytes(config.chunk_tokens)
    num_slots = config.memory.capacity_bytes // chunk_bytes
    if num_slots < 1:
        raise ConfigError("memory.capacity", f"{config.memory.capacity_bytes} bytes is smaller than one "
                          f"chunk ({chunk_bytes} bytes for this model)")
    disk_dir, disk_entries = None, 0
    if config.disk.path:
        disk_dir = os.path.join(config.disk.path, layout.fingerprint().hex()[:16])
        encrypted = config.encryption.key_file is not None or config.encryption.key_env is not None
        entry_bytes = HEADER_BYTES + chunk_bytes + (SEAL_OVERHEAD_BYTES if encrypted else 0)
        disk_entries = config.disk.capacity_bytes // (num_shards * entry_bytes)
        if disk_entries < 1:
            raise ConfigError("disk.capacity", f"{config.disk.capacity_bytes} bytes is smaller than one "
                              f"entry ({entry_bytes} bytes per rank)")
    producer = transfer is not None and transfer.kv_role == "kv_producer"
    return EngineSetup(config, layout, namespace, layer_names, world_size, chunk_bytes, num_slots,
                       disk_dir, disk_entries, producer, groups)


def model_identity(vllm_config: VllmConfig, model_id: str | None) -> str:
    """The model part of every key: ``model_id`` (else the model's name or path) and a fingerprint
    of its weights, config, dtype, KV cache dtype, quantization and revision, so that a checkpoint
    swapped in at the same path, or another dtype, never meets the old KV."""
    model_config = vllm_config.model_config
    fingerprint = model_fingerprint(model_config.model, model_config.revision, dtype_name(model_config.dtype),
                                    str(vllm_config.cache_config.cache_dtype), model_config.quantization)
    return f"{model_id or model_config.model}#{fingerprint}"


def _layout_of(kv_cache_config: KVCacheConfig,
               kv_format: str) -> tuple[KVLayout, tuple[str, ...], tuple[KVGroup, ...]]:
    """The engine's KV layout with kvtier's slot format ``kv_format`` (``LayoutError`` where the
    format cannot hold this engine's KV, e.g. int8 slots of an fp8 cache), its layers (group after
    group) and its KV cache groups."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) > 1:
        return _hybrid_layout_of(groups, kv_format)
    if not groups:
        raise LayoutError("the engine has no KV cache group")
    spec = groups[0].kv_cache_spec
    names = tuple(groups[0].layer_names)
    if isinstance(spec, MLAAttentionSpec):  # one latent vector per token, whatever the platform
        layout = KVLayout("mla", len(names), 1, spec.head_size, spec.block_size, dtype_name(spec.dtype), kv_format)
        return layout, names, (KVGroup(names),)
    if not isinstance(spec, FullAttentionSpec):
        raise LayoutError(f"kvtier does not support KV cache spec {type(spec).__name__} yet")
    layout = KVLayout(platform_layout_kind(), len(names), spec.num_kv_heads, spec.head_size,
                      spec.block_size, dtype_name(spec.dtype), kv_format)
    return layout, names, (KVGroup(names),)


def _hybrid_layout_of(groups: list[KVCacheGroupSpec],
                      kv_format: str) -> tuple[KVLayout, tuple[str, ...], tuple[KVGroup, ...]]:
    """Several KV cache groups (vLLM's hybrid allocator): full-attention and sliding-window groups of
    one page shape, or a ``LayoutError`` / ``ConfigError`` naming what kvtier cannot store."""
    kv_groups: list[KVGroup] = []
    for index, group in enumerate(groups):
        spec = group.kv_cache_spec
        if isinstance(spec, ChunkedLocalAttentionSpec):
            raise LayoutError(f"KV cache group {index} is chunked-local attention (attention_chunk_size "
                              f"{spec.attention_chunk_size}, e.g. Llama 4): kvtier does not store it; run with "
                              "--disable-hybrid-kv-cache-manager or without kvtier")
        if "MLA" in type(spec).__name__ or not isinstance(spec, (FullAttentionSpec, SlidingWindowSpec)):
            raise LayoutError(f"KV cache group {index} has spec {type(spec).__name__}: kvtier stores full-attention "
                              "and sliding-window groups only")
        window = window_tokens(spec) if isinstance(spec, SlidingWindowSpec) else None
        kv_groups.append(KVGroup(tuple(group.layer_names), window))
    shapes = {_page_shape(group.kv_cache_spec) for group in groups}
    if len(shapes) > 1:
        described = "; ".join(f"group {index}: {_page_shape(group.kv_cache_spec)}" for index, group in enumerate(groups))
        raise LayoutError(f"kvtier needs one page shape (heads, head size, block size, dtype) in every KV cache "
                          f"group, this model's differ ({described})")
    if kv_format == "int8":
        raise ConfigError("memory.kv_format", f"int8 slots hold one KV cache group, this model has {len(groups)} "
                          "(hybrid allocator on); set memory.kv_format: exact")
    spec = groups[0].kv_cache_spec
    assert isinstance(spec, AttentionSpec)
    plan_text = ";".join(group.describe() for group in kv_groups)
    names = tuple(name for group in kv_groups for name in group.layer_names)
    layout = KVLayout(platform_layout_kind(), len(names), spec.num_kv_heads, spec.head_size, spec.block_size,
                      dtype_name(spec.dtype), kv_format, groups=plan_text)
    return layout, names, tuple(kv_groups)


def _page_shape(spec: object) -> tuple[object, ...]:
    if not isinstance(spec, AttentionSpec):
        return (type(spec).__name__,)
    return (spec.num_kv_heads, spec.head_size, spec.head_size_v, spec.block_size, dtype_name(spec.dtype))
