"""Data movement of the transformers integration (``kvtier.integrations.transformers``).

``CacheCopies`` moves the KV of whole chunks between a transformers cache's per-layer tensors and
host slots (``kvtier.datapath.HostPool``), through a ``kvtier.staging.StagingRing``, in units of
up to ``staging_chunks`` consecutive chunks times one layer group: one host<->device copy per chunk
and unit, and one copy kernel per layer and K/V between the staging buffer and the layer's tensor.
Loads go layer group by layer group with an event per group (``PendingLoad``), so a forward can
start on the first layers while later layers are still crossing PCIe.

Host layout of one chunk (one slot): [layers, 2 (K, V), kv_heads, chunk_tokens, head_dim] in the
model's dtype, so the chunk's slice for a group of consecutive layers is one contiguous byte range.
It never decides what to copy: ``PrefixKVCache`` plans with its books and passes slots in. Called
from the one thread that runs the model.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from kvtier.datapath import HostPool
from kvtier.staging import StagingRing

KVTensors = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [1, kv_heads, seq, head_dim]


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


@dataclass(frozen=True)
class ChunkShape:
    """The shape of one chunk of a model's KV: what a slot holds."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    chunk_tokens: int
    dtype: torch.dtype

    @property
    def layer_chunk_bytes(self) -> int:
        """Bytes of one layer of one chunk (K and V)."""
        return 2 * self.num_kv_heads * self.chunk_tokens * self.head_dim * self.dtype.itemsize


class CacheCopies:
    """Copies between a model's KV tensors on ``device`` and the slots of ``pool``."""

    def __init__(self, shape: ChunkShape, pool: HostPool, device: torch.device, load_group_layers: int,
                 staging_chunks: int) -> None:
        self.shape = shape
        self.pool = pool
        self.device = device
        self._groups = [(first, min(first + load_group_layers, shape.num_layers))
                        for first in range(0, shape.num_layers, load_group_layers)]
        self._staging_chunks = staging_chunks
        unit_bytes = min(staging_chunks, pool.num_slots) * min(load_group_layers, shape.num_layers) \
            * shape.layer_chunk_bytes
        self._ring = StagingRing(device, unit_bytes, 2)

    # ----- store ---------------------------------------------------------------------------
    def copy_in(self, tensors: KVTensors, planned: list[tuple[int, int]]) -> None:
        """Copy the planned ``(chunk index, slot)`` chunks of ``tensors`` into their slots;
        returns once they are in host memory."""
        self._ring.begin()
        for first, last in self._groups:
            for run in _runs(planned, self._staging_chunks):
                self._ring.to_host(functools.partial(self._pack, tensors, first, last, run[0][0], len(run)),
                                   functools.partial(self._copy_to_slots, [slot for _, slot in run], first, last))
        self._ring.wait()

    def _pack(self, tensors: KVTensors, first: int, last: int, first_chunk: int, num_chunks: int,
              buffer: torch.Tensor) -> None:
        """Work stream: layers ``first..last`` of chunks ``first_chunk..`` -> staging buffer."""
        shape = self.shape
        staged = self._staged(buffer, num_chunks, last - first)
        start, end = first_chunk * shape.chunk_tokens, (first_chunk + num_chunks) * shape.chunk_tokens
        for j, layer in enumerate(range(first, last)):
            for kv in (0, 1):
                src = tensors[layer][kv][0, :, start:end].reshape(shape.num_kv_heads, num_chunks,
                                                                  shape.chunk_tokens, -1)
                staged[:, j, kv].copy_(src.transpose(0, 1))

    def _copy_to_slots(self, slots: list[int], first: int, last: int, buffer: torch.Tensor) -> None:
        """Copy stream: one device->host copy per chunk of the unit."""
        layer_bytes = self.shape.layer_chunk_bytes
        size = (last - first) * layer_bytes
        for j, slot in enumerate(slots):
            dst = self.pool.slot(slot)[first * layer_bytes:last * layer_bytes]
            dst.copy_(buffer[j * size:(j + 1) * size], non_blocking=True)

    # ----- load ----------------------------------------------------------------------------
    def queue_load(self, slots: Sequence[int]) -> PendingLoad:
        """Queue the copies of ``slots`` (consecutive chunks from position 0) into new tensors,
        layer group by layer group; see ``PendingLoad``."""
        if not slots:
            return PendingLoad(0, None, self.device, ())
        shape = self.shape
        num_tokens = len(slots) * shape.chunk_tokens
        size = (1, shape.num_kv_heads, num_tokens, shape.head_dim)
        tensors = [(torch.empty(size, dtype=shape.dtype, device=self.device),
                    torch.empty(size, dtype=shape.dtype, device=self.device)) for _ in range(shape.num_layers)]
        self._ring.begin()
        layer_ready: list[torch.cuda.Event] = []
        for first, last in self._groups:
            for start in range(0, len(slots), self._staging_chunks):
                run = list(slots[start:start + self._staging_chunks])
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
        layer_bytes = self.shape.layer_chunk_bytes
        size = (last - first) * layer_bytes
        for j, slot in enumerate(slots):
            src = self.pool.slot(slot)[first * layer_bytes:last * layer_bytes]
            buffer[j * size:(j + 1) * size].copy_(src, non_blocking=True)

    def _unpack(self, tensors: KVTensors, first: int, last: int, first_chunk: int, num_chunks: int,
                buffer: torch.Tensor) -> None:
        """Work stream: staging buffer -> layers ``first..last`` of chunks ``first_chunk..``."""
        shape = self.shape
        staged = self._staged(buffer, num_chunks, last - first)
        start, end = first_chunk * shape.chunk_tokens, (first_chunk + num_chunks) * shape.chunk_tokens
        for j, layer in enumerate(range(first, last)):
            for kv in (0, 1):
                dst = tensors[layer][kv][0, :, start:end].view(shape.num_kv_heads, num_chunks, shape.chunk_tokens, -1)
                dst.copy_(staged[:, j, kv].transpose(0, 1))

    def _staged(self, buffer: torch.Tensor, num_chunks: int, num_layers: int) -> torch.Tensor:
        """A staging buffer as [chunks, layers, 2, kv_heads, chunk_tokens, head_dim]."""
        shape = self.shape
        size = num_chunks * num_layers * shape.layer_chunk_bytes
        return buffer[:size].view(shape.dtype).view(num_chunks, num_layers, 2, shape.num_kv_heads,
                                                    shape.chunk_tokens, shape.head_dim)


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


def _dynamic_cache(tensors: KVTensors) -> DynamicCache:
    """A DynamicCache holding ``tensors`` as they are (``DynamicCache(ddp_cache_data=...)``
    would copy every layer once more)."""
    cache = DynamicCache()
    for keys, values in tensors:
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    return cache
