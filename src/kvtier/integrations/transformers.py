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

Host layout of one chunk (one slot): [layers, 2 (K, V), kv_heads, chunk_tokens, head_dim] in the
model's dtype, so the chunk's slice for a group of consecutive layers is one contiguous byte range.
Data moves through a ``kvtier.staging.StagingRing`` in units of up to ``staging_chunks`` consecutive
chunks times ``load_group_layers`` layers: one host<->device copy per chunk and unit, and one copy
kernel per layer and K/V between the staging buffer and the layer's tensor. Loads go layer group by
layer group with an event per group, so a forward can start on the first layers while later layers
are still crossing PCIe (``generate_with_prefix_cache`` waits per decoder layer).

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
from transformers.cache_utils import DynamicLayer

from kvtier.config import load_config
from kvtier.datapath import HostPool
from kvtier.staging import StagingRing
from kvtier.errors import ConfigError, LayoutError
from kvtier.keys import ChunkKey, Namespace, chunk_keys
from kvtier.manager import KVManager, LoadRequest
from kvtier.metrics import Metrics
from kvtier.plans import WorkerReport

GiB = 1 << 30


@dataclass(frozen=True)
class PrefixForward:
    """Result of ``generate_with_prefix_cache``: the first token's logits and the filled cache."""

    logits: torch.Tensor  # [1, vocab]: logits after the last prompt token
    past_key_values: DynamicCache
    num_cached_tokens: int  # prompt tokens loaded from kvtier instead of computed


@dataclass(frozen=True)
class PendingLoad:
    """A load queued on the device. ``cache`` is usable by work queued on the current stream after
    ``wait_layer(i)`` (layer ``i``) or ``wait_all()``; neither blocks the CPU."""

    num_tokens: int
    cache: DynamicCache | None
    device: torch.device
    layer_ready: tuple[torch.cuda.Event, ...]  # one per layer on CUDA; empty when all is in place

    def wait_layer(self, layer: int) -> None:
        if self.layer_ready:
            torch.cuda.current_stream(self.device).wait_event(self.layer_ready[layer])

    def wait_all(self) -> None:
        for layer in range(len(self.layer_ready)):
            self.wait_layer(layer)


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
        self.layer_chunk_bytes = 2 * num_kv_heads * chunk_tokens * head_dim * dtype.itemsize
        self.slot_bytes = num_layers * self.layer_chunk_bytes
        self.num_slots = capacity_bytes // self.slot_bytes
        if self.num_slots < 1:
            raise ConfigError("capacity_bytes", f"{capacity_bytes} holds no chunk of {self.slot_bytes} bytes")
        shape = f"hf_bhsd|{num_layers}|{num_kv_heads}|{head_dim}|{chunk_tokens}|{dtype}"
        self.namespace = Namespace(tenant, model_id, xxhash.xxh3_128_digest(shape.encode()))
        self._digest = self.namespace.digest()
        self._groups = [(first, min(first + load_group_layers, num_layers))
                        for first in range(0, num_layers, load_group_layers)]
        self._staging_chunks = staging_chunks
        self.pool = HostPool(self.num_slots, self.slot_bytes, pin_memory=self.device.type == "cuda")
        unit_bytes = min(staging_chunks, self.num_slots) * min(load_group_layers, num_layers) * self.layer_chunk_bytes
        self._ring = StagingRing(self.device, unit_bytes, 2)
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

    def _store(self, token_ids: Sequence[int], tensors: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
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
            self._copy_in(tensors, planned)
        except BaseException:
            store.abandon([keys[index] for index, _ in planned])
            raise
        finally:
            self.manager.release(owner)
        self.manager.complete(WorkerReport(stored=[keys[index] for index, _ in planned]), 0)
        self.manager.take_ops()  # no workers here: the plan's disk and remote ops are nobody's
        return len(planned)

    def _copy_in(self, tensors: list[tuple[torch.Tensor, torch.Tensor]], planned: list[tuple[int, int]]) -> None:
        """Copy the planned chunks into their slots; returns once they are in host memory."""
        self._ring.begin()
        for first, last in self._groups:
            for run in _runs(planned, self._staging_chunks):
                self._ring.to_host(functools.partial(self._pack, tensors, first, last, run[0][0], len(run)),
                                   functools.partial(self._copy_to_slots, [slot for _, slot in run], first, last))
        self._ring.wait()

    def _pack(self, tensors: list[tuple[torch.Tensor, torch.Tensor]], first: int, last: int, first_chunk: int,
              num_chunks: int, buffer: torch.Tensor) -> None:
        """Work stream: layers ``first..last`` of chunks ``first_chunk..`` -> staging buffer."""
        staged = self._staged(buffer, num_chunks, last - first)
        start, end = first_chunk * self.chunk_tokens, (first_chunk + num_chunks) * self.chunk_tokens
        for j, layer in enumerate(range(first, last)):
            for kv in (0, 1):
                src = tensors[layer][kv][0, :, start:end].reshape(self.num_kv_heads, num_chunks, self.chunk_tokens, -1)
                staged[:, j, kv].copy_(src.transpose(0, 1))

    def _copy_to_slots(self, slots: list[int], first: int, last: int, buffer: torch.Tensor) -> None:
        """Copy stream: one device->host copy per chunk of the unit."""
        size = (last - first) * self.layer_chunk_bytes
        for j, slot in enumerate(slots):
            dst = self.pool.slot(slot)[first * self.layer_chunk_bytes:last * self.layer_chunk_bytes]
            dst.copy_(buffer[j * size:(j + 1) * size], non_blocking=True)

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
            return self._queue_load(list(planned.slots))
        finally:
            self.manager.load_finished(owner)
            self.manager.release(owner)

    def _queue_load(self, slots: list[int]) -> PendingLoad:
        if not slots:
            return PendingLoad(0, None, self.device, ())
        num_tokens = len(slots) * self.chunk_tokens
        shape = (1, self.num_kv_heads, num_tokens, self.head_dim)
        tensors = [(torch.empty(shape, dtype=self.dtype, device=self.device),
                    torch.empty(shape, dtype=self.dtype, device=self.device)) for _ in range(self.num_layers)]
        self._ring.begin()
        layer_ready: list[torch.cuda.Event] = []
        for first, last in self._groups:
            for start in range(0, len(slots), self._staging_chunks):
                run = slots[start:start + self._staging_chunks]
                self._ring.from_host(functools.partial(self._copy_from_slots, run, first, last),
                                     functools.partial(self._unpack, tensors, first, last, start, len(run)))
            event = self._ring.mark()
            if event is not None:
                layer_ready.extend([event] * (last - first))
        if self.device.type == "cuda":
            for pair in tensors:
                for tensor in pair:
                    tensor.record_stream(self._ring.work_stream)
        return PendingLoad(num_tokens, _dynamic_cache(tensors), self.device, tuple(layer_ready))

    def _copy_from_slots(self, slots: list[int], first: int, last: int, buffer: torch.Tensor) -> None:
        """Copy stream: one host->device copy per chunk of the unit."""
        size = (last - first) * self.layer_chunk_bytes
        for j, slot in enumerate(slots):
            src = self.pool.slot(slot)[first * self.layer_chunk_bytes:last * self.layer_chunk_bytes]
            buffer[j * size:(j + 1) * size].copy_(src, non_blocking=True)

    def _unpack(self, tensors: list[tuple[torch.Tensor, torch.Tensor]], first: int, last: int, first_chunk: int,
                num_chunks: int, buffer: torch.Tensor) -> None:
        """Work stream: staging buffer -> layers ``first..last`` of chunks ``first_chunk..``."""
        staged = self._staged(buffer, num_chunks, last - first)
        start, end = first_chunk * self.chunk_tokens, (first_chunk + num_chunks) * self.chunk_tokens
        for j, layer in enumerate(range(first, last)):
            for kv in (0, 1):
                dst = tensors[layer][kv][0, :, start:end].view(self.num_kv_heads, num_chunks, self.chunk_tokens, -1)
                dst.copy_(staged[:, j, kv].transpose(0, 1))

    # ----- helpers -------------------------------------------------------------------------
    def _staged(self, buffer: torch.Tensor, num_chunks: int, num_layers: int) -> torch.Tensor:
        """A staging buffer as [chunks, layers, 2, kv_heads, chunk_tokens, head_dim]."""
        size = num_chunks * num_layers * self.layer_chunk_bytes
        return buffer[:size].view(self.dtype).view(num_chunks, num_layers, 2, self.num_kv_heads,
                                                   self.chunk_tokens, self.head_dim)

    def _cache_tensors(self, cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
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


def _runs(planned: list[tuple[int, int]], max_len: int) -> Iterator[list[tuple[int, int]]]:
    """Split (chunk index, slot) pairs, in chunk order, into runs of consecutive chunks of at
    most ``max_len``."""
    run: list[tuple[int, int]] = []
    for item in planned:
        if run and (item[0] != run[-1][0] + 1 or len(run) == max_len):
            yield run
            run = []
        run.append(item)
    if run:
        yield run


def _dynamic_cache(tensors: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A DynamicCache holding ``tensors`` as they are (``DynamicCache(ddp_cache_data=...)``
    would copy every layer once more)."""
    cache = DynamicCache()
    for keys, values in tensors:
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    return cache


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
