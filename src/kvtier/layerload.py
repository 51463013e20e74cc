"""Loads pipelined layer by layer: a memory hit's forward starts before the whole prefix is on the GPU.

``ChunkMover.scatter_chunks`` moves a load chunk by chunk: the forward may start only once every
layer of every chunk is in the engine's blocks. ``LayeredLoads`` queues the same copies layer
group by layer group instead (all chunks of layers 0..7, then 8..15, ...) and records one CUDA
event per layer group. vLLM calls ``wait_for_layer_load(layer)`` before each attention layer
runs, where the attention op runs eagerly (prefill steps, PIECEWISE CUDA graphs); the worker then
makes the engine's stream wait for that layer's group only, so the first layers compute while
the later ones still cross PCIe. Where vLLM will not call the hook (a FULL CUDA-graph replay, a
step without attention metadata) the caller must not use this path (``kvtier.integrations.vllm
.compat.layer_hooks_run``) or must ``fence_all`` before the forward.

Slot layout is [layers, blocks, page], so the bytes of a layer group inside one slot are
contiguous: one host->device copy per chunk and layer group, into a staging buffer laid out
[chunks, layers of the group, blocks, page], then one ``index_put_`` per layer. Exact slots only
(int8 slots keep values and scales apart; they load through ``ChunkMover``).

Single-threaded: the engine's thread calls every method (as for ``ChunkMover``, whose staging
ring and streams this shares, so stores and loads keep their order).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from kvtier.datapath import HostPool, PagedKV
from kvtier.plans import LoadOp
from kvtier.staging import StagingRing


def layer_groups(num_layers: int, num_groups: int) -> list[range]:
    """``num_layers`` layers cut into ``num_groups`` consecutive groups whose sizes differ by at
    most one (fewer groups when there are fewer layers)."""
    if num_layers < 1 or num_groups < 1:
        raise ValueError(f"layer groups need layers and groups, got {num_layers} layers, {num_groups} groups")
    count = min(num_groups, num_layers)
    size, extra = divmod(num_layers, count)
    groups, start = [], 0
    for index in range(count):
        stop = start + size + (1 if index < extra else 0)
        groups.append(range(start, stop))
        start = stop
    return groups


def partitions(num_chunks: int, per_fill: int) -> list[range]:
    """Chunk indices ``0..num_chunks`` in consecutive fills of at most ``per_fill`` chunks."""
    if per_fill < 1:
        raise ValueError(f"a staging fill must hold a chunk, got {per_fill}")
    return [range(first, min(num_chunks, first + per_fill)) for first in range(0, num_chunks, per_fill)]


class LayeredLoads:
    """Host slots -> engine blocks, queued layer group by layer group, with a CUDA event per group.

    ``scatter`` queues a load and returns; ``wait_layer`` orders the caller's current stream (the
    forward) after the group holding a layer; ``fence_all`` after every group; ``wait`` blocks the
    CPU until the slots read so far may be overwritten.
    """

    def __init__(self, paged: PagedKV, pool: HostPool, ring: StagingRing, blocks_per_chunk: int,
                 num_groups: int) -> None:
        layout = paged.layout
        if layout.kv_format != "exact":
            raise ValueError(f"layered loads read exact slots, not kv_format {layout.kv_format}")
        self.paged = paged
        self.pool = pool
        self.ring = ring
        self.blocks_per_chunk = blocks_per_chunk
        self.groups = layer_groups(layout.num_layers, num_groups)
        self._group_of = [index for index, group in enumerate(self.groups) for _ in group]
        self._layer_bytes = blocks_per_chunk * layout.block_bytes_per_layer  # one layer of one slot
        self._host = pool.data.view(-1)
        widest = max(len(group) for group in self.groups)
        self.chunks_per_fill = max(1, ring.buffer_bytes // (widest * self._layer_bytes))
        self._fences: list[torch.cuda.Event | None] = []
        self._waited: list[bool] = []
        self._done: torch.cuda.Event | None = None

    @property
    def pending(self) -> bool:
        """Whether a load's layer groups are queued that the forward has not waited for yet."""
        return not all(self._waited)

    def scatter(self, ops: Sequence[LoadOp]) -> None:
        """Queue ``ops`` (blocks ``first_block..`` of each op's slot into its engine blocks), layer
        group by layer group. The forward must then ``wait_layer`` (or ``fence_all``) before it
        reads a loaded layer."""
        if not ops:
            return
        if self.pending:
            self.fence_all()  # one load per step; a second would otherwise lose the first's fences
        self.ring.begin()
        fills = partitions(len(ops), self.chunks_per_fill)
        targets = [self._targets([ops[i] for i in fill]) for fill in fills]
        self._fences, self._waited = [], []
        for group in self.groups:
            for fill, (dst, rows) in zip(fills, targets):
                slots = [ops[i].slot for i in fill]
                self.ring.from_host(functools.partial(self._copy_in, slots, group),
                                    functools.partial(self._scatter, len(fill), group, dst, rows))
            self._fences.append(self.ring.mark())
            self._waited.append(False)
        self._done = self._fences[-1]

    def wait_layer(self, layer: int) -> None:
        """Order the caller's current stream (the forward) after the layer group of ``layer``."""
        group = self._group_of[layer]
        if group < len(self._waited) and not self._waited[group]:
            fence = self._fences[group]
            if fence is not None:
                torch.cuda.current_stream(self.paged.device).wait_event(fence)
            self._waited[group] = True

    def fence_all(self) -> None:
        """Order the caller's current stream after every group queued so far."""
        for layer_group in range(len(self._waited)):
            self.wait_layer(self.groups[layer_group].start)

    def wait(self) -> None:
        """Block until every queued load has read its slots (they may then be overwritten)."""
        if self._done is not None:
            self._done.synchronize()
            self._done = None

    def last_event(self) -> "torch.cuda.Event | None":
        return self._done

    def _targets(self, fill: Sequence[LoadOp]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The engine blocks of a fill, and (for a fill with a partial chunk) the rows of the
        staged chunks to take, as index tensors on the engine's device."""
        per = self.blocks_per_chunk
        dst = [block for op in fill for block in op.block_ids]
        whole = all(op.first_block == 0 and len(op.block_ids) == per for op in fill)
        rows = None if whole else [i * per + op.first_block + j for i, op in enumerate(fill)
                                   for j in range(len(op.block_ids))]
        return self._upload(dst), None if rows is None else self._upload(rows)

    def _upload(self, values: list[int]) -> torch.Tensor:
        """An index tensor on the engine's device, uploaded on the work stream (pinned on CUDA:
        the caching host allocator keeps the source alive until the copy is done)."""
        pin = self.paged.device.type == "cuda"
        host = torch.tensor(values, dtype=torch.long).pin_memory() if pin else torch.tensor(values, dtype=torch.long)
        if not pin:
            return host
        with torch.cuda.stream(self.ring.work_stream):
            return host.to(self.paged.device, non_blocking=True)

    def _copy_in(self, slots: Sequence[int], group: range, buffer: torch.Tensor) -> None:
        """The group's layers of each slot, chunk-major: one host->device copy per chunk."""
        size = len(group) * self._layer_bytes
        start = group.start * self._layer_bytes
        host = self._host  # flat views: one narrow per side per copy (the engine thread pays per call)
        for index, slot in enumerate(slots):
            buffer.narrow(0, index * size, size).copy_(host.narrow(0, slot * self.pool.slot_bytes + start, size),
                                                       non_blocking=True)

    def _scatter(self, num_chunks: int, group: range, dst: torch.Tensor, rows: torch.Tensor | None,
                 buffer: torch.Tensor) -> None:
        """One ``index_put_`` per layer of the group from the staged chunks."""
        per, words = self.blocks_per_chunk, self.paged.layout.block_elems_per_layer
        count = num_chunks * len(group) * per * words
        staged = buffer.view(self.paged.word_dtype)[:count].view(num_chunks, len(group), per, words)
        for offset, layer in enumerate(group):
            src = staged[:, offset]  # [chunks, blocks, page], strided
            if rows is None:
                self.paged.scatter_layer(layer, dst.view(num_chunks, per), src)
            else:
                self.paged.scatter_layer(layer, dst, src.reshape(num_chunks * per, -1).index_select(0, rows))
