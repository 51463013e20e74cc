"""kvtier for Hugging Face transformers: store and reuse the KV cache of a prompt's prefix.

``PrefixKVCache`` keeps the KV of whole chunks of ``chunk_tokens`` tokens in a host memory pool
(pinned on CUDA, allocated once), keyed by kvtier's chained chunk keys (``kvtier.keys``): a key names
the whole prefix up to the end of its chunk, and the namespace (tenant, model id, KV shape, dtype,
chunk size) is in every key, so a different model or shape misses instead of colliding.
``generate_with_prefix_cache`` runs a prefill that loads the longest cached prefix and computes only
the rest.

The books are kvtier's engine-neutral core, as for vLLM: a ``KVManager`` (``manager``) says which
chunk is in which slot and evicts (LRU or S3-FIFO over whole chunks, never a leased or pending one).
A store is ``plan_store`` per chunk (a slot each), the copies, then ``complete`` with what was
copied; a load is ``plan_load`` (the chunks held, leased to the load), the copies, then
``load_finished`` and ``release``. So the admin service (``kvtier.admin.service.AdminService``
over ``manager``) sees and invalidates what this cache holds.

Supported caches: ``transformers.DynamicCache`` (transformers 5) with full-attention layers whose keys
and values are [batch=1, kv_heads, seq, head_dim]. Sliding-window layers are refused (LayoutError).

Data moves between the cache's tensors and the host slots in ``kvtier.integrations.
transformers_copies`` (``CacheCopies``: a slot is [layers, 2 (K, V), kv_heads, chunk_tokens,
head_dim] in the model's dtype; staged units of up to ``staging_chunks`` chunks times
``load_group_layers`` layers). Loads go layer group by layer group with an event per group, so a
forward can start on the first layers while later layers are still crossing PCIe
(``generate_with_prefix_cache`` waits per decoder layer).

Threading: one thread runs the model and uses a ``PrefixKVCache``; every public call holds
``lock``, which an admin service over ``manager`` takes too (``AdminService(cache.lock,
cache.manager, ...)``), so the books change atomically with respect to stores and loads.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import xxhash
from transformers import DynamicCache

from kvtier.config import load_config
from kvtier.datapath import HostPool
from kvtier.errors import ConfigError, LayoutError
from kvtier.integrations.transformers_copies import CacheCopies, ChunkShape, KVTensors, PendingLoad
from kvtier.keys import ChunkKey, Namespace, chunk_keys
from kvtier.manager import KVManager, LoadRequest
from kvtier.metrics import Metrics
from kvtier.plans import WorkerReport

__all__ = ["PendingLoad", "PrefixForward", "PrefixKVCache", "generate_with_prefix_cache"]

GiB = 1 << 30


@dataclass(frozen=True)
class PrefixForward:
    """Result of ``generate_with_prefix_cache``: the first token's logits and the filled cache."""

    logits: torch.Tensor  # [1, vocab]: logits after the last prompt token
    past_key_values: DynamicCache
    num_cached_tokens: int  # prompt tokens loaded from kvtier instead of computed


class PrefixKVCache:
    """Host-memory cache of prompt-prefix KV for one model, in whole chunks."""

    def __init__(self, model_id: str, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 chunk_tokens: int = 256, capacity_bytes: int = 4 * GiB, device: str | torch.device = "cpu",
                 policy: str = "lru", tenant: str = "default", load_group_layers: int = 4,
                 staging_chunks: int = 16) -> None:
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                            ("chunk_tokens", chunk_tokens), ("load_group_layers", load_group_layers),
                            ("staging_chunks", staging_chunks)):
            if value < 1:
                raise ConfigError(name, f"must be positive, got {value}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.chunk_tokens, self.device = dtype, chunk_tokens, torch.device(device)
        shape = ChunkShape(num_layers, num_kv_heads, head_dim, chunk_tokens, dtype)
        self.layer_chunk_bytes = shape.layer_chunk_bytes
        self.slot_bytes = num_layers * self.layer_chunk_bytes
        self.num_slots = capacity_bytes // self.slot_bytes
        if self.num_slots < 1:
            raise ConfigError("capacity_bytes", f"{capacity_bytes} holds no chunk of {self.slot_bytes} bytes")
        description = f"hf_bhsd|{num_layers}|{num_kv_heads}|{head_dim}|{chunk_tokens}|{dtype}"
        self.namespace = Namespace(tenant, model_id, xxhash.xxh3_128_digest(description.encode()))
        self._digest = self.namespace.digest()
        self.pool = HostPool(self.num_slots, self.slot_bytes, pin_memory=self.device.type == "cuda")
        self._copies = CacheCopies(shape, self.pool, self.device, load_group_layers, staging_chunks)
        config = load_config({"memory.policy": policy}, {}).config
        self.manager = KVManager.open(config, self.num_slots, chunk_tokens, self.slot_bytes, 1, None, (), Metrics(),
                                      None)
        self._num_owners = 0
        self.lock = threading.RLock()

    @classmethod
    def for_model(cls, model: torch.nn.Module, model_id: str, chunk_tokens: int = 256,
                  capacity_bytes: int = 4 * GiB, policy: str = "lru") -> "PrefixKVCache":
        """A cache shaped for ``model`` (a transformers decoder-only model), on its device."""
        config = model.config.get_text_config(decoder=True)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(model_id, config.num_hidden_layers, kv_heads, head_dim, model.dtype, chunk_tokens,
                   capacity_bytes, model.device, policy)

    def __len__(self) -> int:
        """Number of chunks held."""
        with self.lock:
            return self.manager.store.num_memory_entries

    # ----- books ---------------------------------------------------------------------------
    def keys(self, token_ids: Sequence[int]) -> list[ChunkKey]:
        """Keys of the full chunks of ``token_ids``."""
        return chunk_keys(self._digest, token_ids, self.chunk_tokens)

    def lookup(self, token_ids: Sequence[int]) -> int:
        """Prompt tokens of ``token_ids`` a load would give: the longest held prefix of whole
        chunks that leaves at least one token to compute. Changes nothing."""
        with self.lock:
            return len(self._held_prefix(token_ids)) * self.chunk_tokens

    def _held_prefix(self, token_ids: Sequence[int]) -> list[bytes]:
        keys = self._usable_keys(token_ids)
        return keys[:self.manager.store.lookup(keys).num_chunks]

    def _usable_keys(self, token_ids: Sequence[int]) -> list[bytes]:
        """Keys of the whole chunks of ``token_ids`` that leave at least one token to compute."""
        usable = (len(token_ids) - 1) // self.chunk_tokens * self.chunk_tokens
        return [key.digest for key in self.keys(token_ids[:max(usable, 0)])]

    def _owner(self) -> str:
        self._num_owners += 1
        return f"hf-{self._num_owners}"

    # ----- store ---------------------------------------------------------------------------
    def store(self, token_ids: Sequence[int], cache: DynamicCache) -> int:
        """Copy the KV of the full chunks of ``token_ids`` that ``cache`` covers and kvtier lacks into
        host memory; returns the number of chunks stored.

        ``cache`` holds the KV of ``token_ids`` from position 0 (batch 1). Blocks until the data is
        in host memory: the cache may be changed or freed afterwards. Stops early, storing a prefix
        of the missing chunks, when every held chunk belongs to this prompt and memory is full.
        """
        tensors = self._cache_tensors(cache)
        with self.lock:
            return self._store(token_ids, tensors)

    def _store(self, token_ids: Sequence[int], tensors: KVTensors) -> int:
        num_cached = tensors[0][0].shape[2]
        keys = [key.digest for key in self.keys(token_ids[:num_cached])]
        owner = self._owner()
        store = self.manager.store
        store.leases.acquire(owner, [key for key in keys if store.in_memory(key)])  # never evict its own chunks
        planned: list[tuple[int, int]] = []  # (chunk index, slot)
        try:
            for index, key in enumerate(keys):
                if store.in_memory(key):
                    store.touch([key])
                    continue
                plan = self.manager.plan_store(key, self.namespace.tenant)
                if plan is None:  # memory is full of this prompt's chunks
                    break
                planned.append((index, plan[0]))
            self._copies.copy_in(tensors, planned)
        except BaseException:
            store.abandon([keys[index] for index, _ in planned])
            raise
        finally:
            self.manager.release(owner)
        self.manager.complete(WorkerReport(stored=[keys[index] for index, _ in planned]), 0)
        self.manager.take_ops()  # no workers here: the plan's disk and remote ops are nobody's
        return len(planned)

    # ----- load ----------------------------------------------------------------------------
    def load(self, token_ids: Sequence[int]) -> tuple[int, DynamicCache | None]:
        """The longest cached prefix of ``token_ids`` (whole chunks, leaving at least one token to
        compute) as a ``DynamicCache`` on the cache's device, and its length in tokens; (0, None)
        on a miss. Work queued on the current stream afterwards sees the data; the CPU does not
        wait for the copies."""
        pending = self.load_async(token_ids)
        pending.wait_all()
        return pending.num_tokens, pending.cache

    def load_async(self, token_ids: Sequence[int]) -> PendingLoad:
        """Queue the load of ``load``, layer group by layer group; see ``PendingLoad``."""
        with self.lock:
            return self._load_async(token_ids)

    def _load_async(self, token_ids: Sequence[int]) -> PendingLoad:
        owner = self._owner()
        planned = self.manager.plan_load(LoadRequest(owner, self.namespace.tenant, self._usable_keys(token_ids), 0))
        assert planned is not None and not planned.is_async  # memory only: nothing to wait for
        try:
            return self._copies.queue_load(list(planned.slots))
        finally:
            self.manager.load_finished(owner)
            self.manager.release(owner)

    # ----- helpers -------------------------------------------------------------------------
    def _cache_tensors(self, cache: DynamicCache) -> KVTensors:
        """Per layer (keys, values), checked against this cache's shape."""
        if len(cache.layers) != self.num_layers:
            raise LayoutError(f"expected a cache of {self.num_layers} layers, got {len(cache.layers)}")
        tensors = []
        for index, layer in enumerate(cache.layers):
            if getattr(layer, "is_sliding", False) or layer.keys is None:
                raise LayoutError(f"cache layer {index} ({type(layer).__name__}) is not a filled full-attention "
                                  f"layer; kvtier stores DynamicLayer caches only")
            expected = (1, self.num_kv_heads, layer.keys.shape[2], self.head_dim)
            for tensor in (layer.keys, layer.values):
                if tuple(tensor.shape) != expected or tensor.dtype != self.dtype or tensor.device != self.device:
                    raise LayoutError(f"cache layer {index}: {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}, "
                                      f"expected {expected} {self.dtype} on {self.device}")
            tensors.append((layer.keys, layer.values))
        return tensors


def generate_with_prefix_cache(model: torch.nn.Module, input_ids: torch.Tensor, cache: PrefixKVCache,
                               store: bool = True) -> PrefixForward:
    """Prefill ``input_ids`` ([1, seq], on the model's device): load the longest cached prefix from
    ``cache``, compute only the rest, and return the logits after the last token (the first
    generated token's distribution). The load is layer-pipelined: decoder layer ``i`` waits (on the
    device) only for its own KV. With ``store``, the prompt's new full chunks are stored afterwards
    (that blocks until they are in host memory)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, seq], got {tuple(input_ids.shape)}")
    token_ids = input_ids[0].tolist()
    pending = cache.load_async(token_ids)
    with _layer_waits(model, pending):
        out = model(input_ids=input_ids[:, pending.num_tokens:], past_key_values=pending.cache,
                    use_cache=True, logits_to_keep=1)
    if store:
        cache.store(token_ids, out.past_key_values)
    return PrefixForward(out.logits[:, -1], out.past_key_values, pending.num_tokens)


@contextlib.contextmanager
def _layer_waits(model: torch.nn.Module, pending: PendingLoad) -> Iterator[None]:
    """Make decoder layer ``i`` wait for layer ``i`` of ``pending`` (forward pre-hooks); waits for
    everything up front when the model's decoder layers cannot be found."""
    layers = getattr(model.get_decoder(), "layers", None) if hasattr(model, "get_decoder") else None
    if not pending.layer_ready or layers is None or len(layers) != len(pending.layer_ready):
        pending.wait_all()
        yield
        return
    handles = [layer.register_forward_pre_hook(functools.partial(_wait_hook, pending, index))
               for index, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _wait_hook(pending: PendingLoad, layer: int, module: torch.nn.Module, args: tuple[object, ...]) -> None:
    pending.wait_layer(layer)
