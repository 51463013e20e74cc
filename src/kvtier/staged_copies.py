"""Grouped transfers through device staging buffers, for ``kvtier.datapath.ChunkMover`` (CUDA).

A step's store or load ops move in groups of up to ``group_chunks`` chunks through the buffers of
a ``StagingRing``, so the CPU cost grows with the chunks and the layers, not with their product:
- a store group runs one ``index_select`` per layer (every block of the group, into a layer-major
  staging buffer) on the work stream, then one device->host copy per run of adjacent slots on the
  copy stream;
- a load group runs one host->device copy per run of adjacent slots (the staging buffer is
  chunk-major, laid out like the slots), then one ``index_put_`` per layer (two for a group with a
  partial chunk).
With int8 slots a staging buffer holds a group twice: in the engine's dtype, then quantised, laid
out like the slots (from ``slots_offset``); a store group quantises after its gathers (a few
calls: ``encode_layers``), a load group dequantises (one call) before its ``index_put_``s. Block
indices go up in one pinned, asynchronous upload per call (``PinnedIndices``). Single-threaded:
the thread that runs the engine's forward calls everything here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Protocol

import torch

from kvtier.layout import KVLayout
from kvtier.plans import LoadOp, StoreOp
from kvtier.slotcodec import Int8SlotCodec
from kvtier.staging import StagingRing

# int8 slots: elements quantised per call (its float32 temporaries: 4 bytes each), so a store group
# of a large model costs a few calls, not one per layer, and no more than 256 MiB of device memory.
ENCODE_SLICE_ELEMS = 64 << 20


def encode_layers(codec: Int8SlotCodec, src: torch.Tensor, slots: torch.Tensor, num_layers: int) -> None:
    """Quantise ``src`` ([chunks, layers, blocks, page] in the dtype, any strides) into ``slots``
    (uint8 [chunks, slot bytes]), a slice of layers per call (``ENCODE_SLICE_ELEMS``)."""
    values, scales = codec.split(slots)
    step = max(1, ENCODE_SLICE_ELEMS // max(1, src[:, :1].numel()))
    for first in range(0, num_layers, step):
        last = min(num_layers, first + step)
        codec.encode(src[:, first:last], values[:, first:last], scales[:, first:last])


class PagedBlocks(Protocol):
    """The engine's paged KV cache, one layer at a time (``kvtier.datapath.PagedKV``)."""

    layout: KVLayout
    device: torch.device

    @property
    def word_dtype(self) -> torch.dtype: ...

    def gather_layer(self, layer: int, ids: torch.Tensor, out: torch.Tensor) -> None: ...

    def scatter_layer(self, layer: int, ids: torch.Tensor, src: torch.Tensor) -> None: ...


class SlotArray(Protocol):
    """The host slots (``kvtier.datapath.HostPool``): ``data`` is uint8 [num_slots, slot_bytes]."""

    num_slots: int
    slot_bytes: int
    data: torch.Tensor


class PinnedIndices:
    """Index lists uploaded to the device in one pinned, asynchronous copy on the work stream.

    Two pinned host buffers are reused in turn (a fresh pinned tensor per call costs a host
    allocation); a buffer is reused once its last upload is done. On a CPU device (staged moves
    tested without a GPU) the indices stay on the host."""

    def __init__(self, device: torch.device, work_stream: torch.cuda.Stream | None, size: int) -> None:
        """``size``: the elements each pinned buffer holds at first (it grows when needed)."""
        self._device = device
        self._work_stream = work_stream
        self._host: list[torch.Tensor] = []
        self._used: list[torch.cuda.Event | None] = []
        self._next = 0
        if device.type == "cuda":
            self._host = [torch.empty(size, dtype=torch.long, pin_memory=True) for _ in range(2)]
            self._used = [None, None]

    def upload(self, indices: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """``indices`` as index tensors on the device, one per list."""
        flat = torch.tensor([i for part in indices for i in part], dtype=torch.long)
        if not self._host:  # staged on a CPU device
            return list(flat.split([len(part) for part in indices]))
        turn = self._next
        self._next = (turn + 1) % len(self._host)
        used = self._used[turn]
        if used is not None:
            used.synchronize()  # its last upload is done (long since, in practice)
        if flat.numel() > self._host[turn].numel():
            self._host[turn] = torch.empty(2 * flat.numel(), dtype=torch.long, pin_memory=True)
        host = self._host[turn][:flat.numel()]
        host.copy_(flat)
        with torch.cuda.stream(self._work_stream):
            device_ids = host.to(self._device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._work_stream)
        self._used[turn] = event
        return list(device_ids.split([len(part) for part in indices]))


class StagedCopies:
    """Store and load groups through a ring of staging buffers (module docstring)."""

    def __init__(self, paged: PagedBlocks, pool: SlotArray, blocks_per_chunk: int,
                 codec: Int8SlotCodec | None, group_chunks: int, slots_offset: int, ring: StagingRing) -> None:
        """``slots_offset``: where the slot-like part of a staging buffer starts (0 without a
        codec); ``ring``: buffers of ``group_chunks`` chunks each."""
        self.paged = paged
        self.pool = pool
        self.blocks_per_chunk = blocks_per_chunk
        self.group_chunks = group_chunks
        self.ring = ring
        self._codec = codec
        self._slots_offset = slots_offset
        self._page_words = paged.layout.block_elems_per_layer
        work_stream = ring.work_stream if paged.device.type == "cuda" else None
        self._indices = PinnedIndices(paged.device, work_stream, 2 * pool.num_slots * blocks_per_chunk)

    def gather(self, ops: Sequence[StoreOp]) -> None:
        """Queue the copies of each op's engine blocks into its slot, group by group."""
        self.ring.begin()
        groups = self._groups(ops)
        ids = self._indices.upload([[block for op in group for block in op.block_ids] for group in groups])
        for group, group_ids in zip(groups, ids):
            self.ring.to_host(functools.partial(self._gather_group, group_ids),
                              functools.partial(self._copy_out, [op.slot for op in group]))

    def scatter(self, ops: Sequence[LoadOp]) -> torch.cuda.Event | None:
        """Queue the copies of blocks ``first_block..`` of each op's slot into its engine blocks;
        returns an event that completes once they are in the blocks."""
        self.ring.begin()
        groups = self._groups(ops)
        indices: list[list[int]] = []
        for group in groups:
            indices.append([block for op in group for block in op.block_ids])
            if not _whole(group, self.blocks_per_chunk):  # rows of the staged chunks to take
                indices.append([i * self.blocks_per_chunk + op.first_block + j
                                for i, op in enumerate(group) for j in range(len(op.block_ids))])
        uploaded = iter(self._indices.upload(indices))
        for group in groups:
            dst = next(uploaded)
            rows = None if _whole(group, self.blocks_per_chunk) else next(uploaded)
            self.ring.from_host(functools.partial(self._copy_in, [op.slot for op in group]),
                                functools.partial(self._scatter_group, len(group), dst, rows))
        self.ring.fence()
        return self.ring.mark()

    def _groups(self, ops: Sequence[StoreOp] | Sequence[LoadOp]) -> list:
        return [ops[i:i + self.group_chunks] for i in range(0, len(ops), self.group_chunks)]

    def _slots_staged(self, buffer: torch.Tensor, num_chunks: int) -> torch.Tensor:
        """The part of a staging buffer laid out like ``num_chunks`` slots: uint8 [chunks, slot bytes]."""
        size = self.pool.slot_bytes
        return buffer[self._slots_offset:self._slots_offset + num_chunks * size].view(num_chunks, size)

    def _staged(self, buffer: torch.Tensor, *shape: int) -> torch.Tensor:
        """The start of a staging buffer as KV-sized words of ``shape`` (its last dim: a page)."""
        return buffer.view(self.paged.word_dtype)[:math.prod(shape)].view(*shape)

    def _gather_group(self, ids: torch.Tensor, buffer: torch.Tensor) -> None:
        """Every block of the group, layer-major: [layers, blocks of the group, page]."""
        staged = self._staged(buffer, self.paged.layout.num_layers, ids.numel(), self._page_words)
        for layer in range(self.paged.layout.num_layers):
            self.paged.gather_layer(layer, ids, staged[layer])
        if self._codec is not None:  # quantise into the slot-like part, chunk-major
            num_chunks = ids.numel() // self.blocks_per_chunk
            src = staged.view(self._codec.dtype).unflatten(1, (num_chunks, self.blocks_per_chunk)).transpose(0, 1)
            encode_layers(self._codec, src, self._slots_staged(buffer, num_chunks), self.paged.layout.num_layers)

    def _copy_out(self, slots: Sequence[int], buffer: torch.Tensor) -> None:
        """Layer-major staging into the slots: one device->host copy per run of adjacent slots."""
        if self._codec is not None:  # the quantised chunks are laid out like the slots already
            encoded = self._slots_staged(buffer, len(slots))
            for first, slot, count in _runs(slots):
                self.pool.data[slot:slot + count].copy_(encoded[first:first + count], non_blocking=True)
            return
        per, layers = self.blocks_per_chunk, self.paged.layout.num_layers
        staged = self._staged(buffer, layers, len(slots), per, self._page_words)
        for first, slot, count in _runs(slots):
            dst = self.pool.data[slot:slot + count].view(self.paged.word_dtype).view(count, layers, per, -1)
            dst.copy_(staged[:, first:first + count].transpose(0, 1), non_blocking=True)

    def _copy_in(self, slots: Sequence[int], buffer: torch.Tensor) -> None:
        """The group's slots, chunk-major: staging chunk ``i`` is byte for byte slot ``slots[i]``;
        one host->device copy per run of adjacent slots."""
        size, base = self.pool.slot_bytes, self._slots_offset
        for first, slot, count in _runs(slots):
            buffer[base + first * size:base + (first + count) * size].copy_(
                self.pool.data[slot:slot + count].view(-1), non_blocking=True)

    def _scatter_group(self, num_chunks: int, dst: torch.Tensor, rows: torch.Tensor | None,
                       buffer: torch.Tensor) -> None:
        per, layers = self.blocks_per_chunk, self.paged.layout.num_layers
        staged = self._staged(buffer, num_chunks, layers, per, self._page_words)
        if self._codec is not None:  # dequantise the slot-like part into the dtype part, one call
            values, scales = self._codec.split(self._slots_staged(buffer, num_chunks))
            self._codec.decode(values, scales, staged.view(self._codec.dtype))
        for layer in range(layers):
            src = staged[:, layer]  # [chunks, blocks, page], strided
            if rows is None:
                self.paged.scatter_layer(layer, dst.view(num_chunks, per), src)
            else:
                self.paged.scatter_layer(layer, dst, src.reshape(num_chunks * per, -1).index_select(0, rows))


def _runs(slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """``slots`` cut into runs of adjacent slots: (index of the run's first, its slot, length)."""
    runs: list[tuple[int, int, int]] = []
    for index, slot in enumerate(slots):
        if runs and runs[-1][1] + runs[-1][2] == slot:
            first, start, count = runs[-1]
            runs[-1] = (first, start, count + 1)
        else:
            runs.append((index, slot, 1))
    return runs


def _whole(group: Sequence[LoadOp], blocks_per_chunk: int) -> bool:
    """Whether every load of the group fills a whole chunk from its first block."""
    return all(op.first_block == 0 and len(op.block_ids) == blocks_per_chunk for op in group)
