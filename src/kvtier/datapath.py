"""Worker-side data path: moves whole blocks between the engine's paged KV cache and host slots.

This is the one module (with the engine integrations) that touches torch tensors. A ``HostPool`` is
a preallocated array of fixed-size slots, one chunk each (pinned on CUDA machines, allocated once).
``PagedKV`` wraps the engine's per-layer KV tensors, checks them against the expected ``KVLayout``
and copies blocks with vectorised ``index_select`` / ``index_copy_`` (one call per layer, never a
loop per token). ``ChunkMover`` executes a step's store and load ops in batches: on CUDA, each chunk
crosses PCIe as ONE large copy through device staging buffers on dedicated streams
(``StagingRing``); on CPU it copies straight between the engine's blocks and the slots.

Slot layout (bytes of one chunk): for ``cpu_lbhnc`` [layers, blocks, page]; for ``cuda_flash``
[layers, 2 (K, V), blocks, page]; ``page`` is one block's elements of one layer (and one of K/V).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import torch

from kvtier.errors import LayoutError
from kvtier.layout import KVLayout
from kvtier.plans import LoadOp, StoreOp

_BIT_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def bit_dtype(num_bytes: int) -> torch.dtype:
    """An integer dtype of the same width: copies move bits without float conversion paths
    (index_select on bf16 is several times slower than on int16 on CPU)."""
    return _BIT_DTYPES[num_bytes]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class HostPool:
    """``num_slots`` slots of ``slot_bytes`` each, in one allocation made at start-up.

    With ``pin_memory`` the pool is page-locked (CUDA machines): host<->device copies from and to
    it run asynchronously at the PCIe limit. torch's pinned allocator rounds the allocation up to
    a power of two bytes.
    """

    def __init__(self, num_slots: int, slot_bytes: int, pin_memory: bool) -> None:
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.data = torch.empty((num_slots, slot_bytes), dtype=torch.uint8, pin_memory=pin_memory)

    def slot(self, index: int) -> torch.Tensor:
        """The bytes of slot ``index`` (a view, no copy)."""
        return self.data[index]

    def memoryview(self, index: int) -> memoryview:
        """Writable buffer over slot ``index``, for file I/O straight into the pool."""
        return memoryview(self.data[index].numpy()).cast("B")


def detect_kind(tensor: torch.Tensor, layout: KVLayout) -> str:
    """Name the layout kind of one layer's KV tensor, or raise LayoutError describing it."""
    shape = tuple(tensor.shape)
    heads, block, head = layout.num_kv_heads, layout.block_size, layout.head_size
    if len(shape) == 4 and shape[1:] == (heads, block, 2 * head):
        return "cpu_lbhnc"
    if len(shape) == 5 and shape[0] == 2 and shape[2:] == (block, heads, head):
        return "cuda_flash"
    raise LayoutError(
        f"KV cache tensor of shape {shape} on {tensor.device} does not match a layout kvtier knows "
        f"(cpu_lbhnc [blocks, {heads}, {block}, {2 * head}] or cuda_flash [2, blocks, {block}, {heads}, "
        f"{head}]); this attention backend is not supported")


class PagedKV:
    """The engine's KV cache of one worker, as a list of per-layer block tables."""

    def __init__(self, layers: Sequence[torch.Tensor], layout: KVLayout) -> None:
        if len(layers) != layout.num_layers:
            raise LayoutError(f"expected {layout.num_layers} KV layers, the engine has {len(layers)}")
        for tensor in layers:
            kind = detect_kind(tensor, layout)
            if kind != layout.kind:
                raise LayoutError(f"expected KV layout {layout.kind}, the engine uses {kind}")
            if dtype_name(tensor.dtype) != layout.dtype:
                raise LayoutError(f"expected KV dtype {layout.dtype}, the engine uses {tensor.dtype}")
        self.layout = layout
        self.device = layers[0].device
        self._bits = bit_dtype(layout.dtype_bytes)
        self._pages = [self._as_pages(t.view(self._bits)) for t in layers]
        self._axis = 0 if layout.kind == "cpu_lbhnc" else 1  # the block axis of ``_pages``

    def _as_pages(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.layout.kind == "cpu_lbhnc":  # [blocks, page]
            return tensor.view(tensor.shape[0], -1)
        return tensor.view(2, tensor.shape[1], -1)  # [2, blocks, page]

    def slot_view(self, slot: torch.Tensor, blocks_per_chunk: int) -> torch.Tensor:
        """View a slot's bytes as [layers, (2,) blocks, page] of KV-sized integer words."""
        typed = slot.view(self._bits)
        if self.layout.kind == "cpu_lbhnc":
            return typed.view(self.layout.num_layers, blocks_per_chunk, -1)
        return typed.view(self.layout.num_layers, 2, blocks_per_chunk, -1)

    def block_ids(self, block_ids: Sequence[int]) -> torch.Tensor:
        """``block_ids`` as an index tensor on the engine's device (a blocking upload on CUDA)."""
        return torch.tensor(block_ids, dtype=torch.long, device=self.device)

    def gather(self, block_ids: Sequence[int], dst: torch.Tensor) -> None:
        """Copy engine blocks ``block_ids`` (a whole chunk) into ``dst`` (a ``slot_view``)."""
        ids = self.block_ids(block_ids)
        if dst.device == self.device:
            self.gather_into(ids, dst)
            return
        for layer, pages in enumerate(self._pages):
            dst[layer].copy_(pages.index_select(self._axis, ids), non_blocking=True)

    def gather_into(self, ids: torch.Tensor, dst: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Copy engine blocks ``ids`` (an index tensor on the engine's device) into ``dst``, a
        ``slot_view`` on the same device or the list of its per-layer views: one ``index_select``
        per layer, no temporary."""
        for layer, pages in enumerate(self._pages):
            torch.index_select(pages, self._axis, ids, out=dst[layer])

    def scatter(self, src: torch.Tensor, first_block: int, block_ids: Sequence[int]) -> None:
        """Copy blocks ``first_block..`` of ``src`` (a ``slot_view``) into engine blocks ``block_ids``."""
        self.scatter_from(src, first_block, self.block_ids(block_ids))

    def scatter_from(self, src: torch.Tensor | Sequence[torch.Tensor], first_block: int, ids: torch.Tensor) -> None:
        """Copy blocks ``first_block .. first_block+len(ids)`` of ``src`` (a ``slot_view`` on any
        device, or the list of its per-layer views) into engine blocks ``ids`` (an index tensor on
        the engine's device): one ``index_copy_`` per layer."""
        num_blocks = ids.numel()
        for layer, pages in enumerate(self._pages):
            part = src[layer]
            if first_block or num_blocks != part.shape[self._axis]:
                part = part.narrow(self._axis, first_block, num_blocks)
            if part.device != self.device:
                part = part.to(self.device, non_blocking=True)
            pages.index_copy_(self._axis, ids, part)


class StagingRing:
    """Device staging buffers passed between a work stream and a copy stream, for one device.

    Every transfer takes the next buffer of the ring and runs in two stages: on the way to the host,
    ``produce(buffer)`` (kernels: gathers) on the work stream, then ``transfer(buffer)`` (the DMA
    copy) on the copy stream; on the way in, ``transfer`` on the copy stream, then ``consume`` on
    the work stream. CUDA events order the two stages of one buffer and its reuse, so with two or
    more buffers the copy of one transfer overlaps the kernels of the next. Nothing here blocks the
    CPU except ``wait``.

    Single-threaded: one thread (the one that owns the engine's stream) calls every method. The
    callables run immediately, under the stream they are given; they must only queue work on the
    current stream. On a CPU device there are no streams: both stages run at once, in order.
    """

    def __init__(self, device: torch.device, buffer_bytes: int, num_buffers: int) -> None:
        if num_buffers < 1 or buffer_bytes < 1:
            raise ValueError(f"a staging ring needs buffers, got {num_buffers} of {buffer_bytes} bytes")
        self.device = device
        self.buffer_bytes = buffer_bytes
        self._buffers = [torch.empty(buffer_bytes, dtype=torch.uint8, device=device) for _ in range(num_buffers)]
        self._next = 0
        self._is_cuda = device.type == "cuda"
        if self._is_cuda:
            self.work_stream = torch.cuda.Stream(device)
            self.copy_stream = torch.cuda.Stream(device)
            self._ready = [torch.cuda.Event() for _ in range(num_buffers)]
            self._free = [torch.cuda.Event() for _ in range(num_buffers)]

    def begin(self) -> None:
        """Order both streams after the work queued so far on the caller's current stream (the
        engine's forward), so that transfers see the KV it wrote. Call before a batch."""
        if self._is_cuda:
            current = torch.cuda.current_stream(self.device)
            self.work_stream.wait_stream(current)
            self.copy_stream.wait_stream(current)

    def to_host(self, produce: Callable[[torch.Tensor], None], transfer: Callable[[torch.Tensor], None]) -> None:
        """Queue ``produce`` (work stream) then ``transfer`` (copy stream) on the next buffer."""
        index, buffer = self._take()
        if not self._is_cuda:
            produce(buffer)
            transfer(buffer)
            return
        self._stage(self.work_stream, self._free[index], produce, buffer, self._ready[index])
        self._stage(self.copy_stream, self._ready[index], transfer, buffer, self._free[index])

    def from_host(self, transfer: Callable[[torch.Tensor], None], consume: Callable[[torch.Tensor], None]) -> None:
        """Queue ``transfer`` (copy stream) then ``consume`` (work stream) on the next buffer."""
        index, buffer = self._take()
        if not self._is_cuda:
            transfer(buffer)
            consume(buffer)
            return
        self._stage(self.copy_stream, self._free[index], transfer, buffer, self._ready[index])
        self._stage(self.work_stream, self._ready[index], consume, buffer, self._free[index])

    def mark(self) -> torch.cuda.Event | None:
        """An event recorded on the work stream after everything queued so far (None on CPU,
        where everything queued is already done)."""
        if not self._is_cuda:
            return None
        event = torch.cuda.Event()
        event.record(self.work_stream)
        return event

    def mark_copies(self) -> torch.cuda.Event | None:
        """An event recorded on the copy stream after everything queued so far: once it completes,
        every ``transfer`` queued so far (device->host copies included) is done. None on CPU."""
        if not self._is_cuda:
            return None
        event = torch.cuda.Event()
        event.record(self.copy_stream)
        return event

    def fence(self) -> None:
        """Make the caller's current stream wait (on the device, not the CPU) for the work stream:
        work queued after this call sees the result of every ``consume`` (and ``produce``) queued
        so far. Copies to the host still in flight are not waited for."""
        if self._is_cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.work_stream)

    def wait(self) -> None:
        """Block the CPU until everything queued so far is done."""
        if self._is_cuda:
            self.work_stream.synchronize()
            self.copy_stream.synchronize()

    def _take(self) -> tuple[int, torch.Tensor]:
        index = self._next
        self._next = (index + 1) % len(self._buffers)
        return index, self._buffers[index]

    @staticmethod
    def _stage(stream: torch.cuda.Stream, after: torch.cuda.Event, work: Callable[[torch.Tensor], None],
               buffer: torch.Tensor, done: torch.cuda.Event) -> None:
        with torch.cuda.stream(stream):
            stream.wait_event(after)  # a no-op for an event never recorded
            work(buffer)
            done.record(stream)


class ChunkMover:
    """Executes a step's store ops (engine blocks -> host slots) and load ops (slots -> blocks).

    Called by the worker, from the thread that runs the engine's forward. On CUDA each chunk moves
    through a device staging buffer laid out exactly like its slot: a store gathers every layer's
    blocks of the chunk on the GPU (one ``index_select`` per layer) and then makes ONE device->host
    copy of the whole chunk; a load makes ONE host->device copy of the slot and then one
    ``index_copy_`` per layer. Copies run on a dedicated stream and overlap the gathers/scatters of
    the next chunk (``num_staging`` buffers, at least two for overlap). On CPU the blocks move
    straight between the engine's tensors and the slots, synchronously.

    ``gather_chunks`` and ``scatter_chunks`` return once the work is queued; results are final
    only after ``wait()``. A store reads the engine's blocks after the forward queued before the
    call; a load is ordered before any work queued on the engine's stream after the call. The
    caller must ``wait()`` before it reports a store, reads a slot on the CPU (disk writes) or
    lets the engine reuse the stored blocks.
    """

    def __init__(self, paged: PagedKV, pool: HostPool, blocks_per_chunk: int, num_staging: int = 4) -> None:
        self.paged = paged
        self.pool = pool
        self.blocks_per_chunk = blocks_per_chunk
        self._ring: StagingRing | None = None
        self._layer_views: dict[int, list[torch.Tensor]] = {}  # staging buffer address -> per-layer views
        if paged.device.type == "cuda":
            self._ring = StagingRing(paged.device, pool.slot_bytes, num_staging)

    def gather_chunks(self, ops: Sequence[StoreOp]) -> None:
        """Copy each op's engine blocks (one whole chunk) into its memory slot."""
        if not ops:
            return
        if self._ring is None:
            for op in ops:
                self.paged.gather(op.block_ids, self._slot_view(self.pool.slot(op.slot)))
            return
        self._ring.begin()
        ids = self._upload_ids([op.block_ids for op in ops])
        for op, chunk_ids in zip(ops, ids):
            self._ring.to_host(functools.partial(self._gather_into, chunk_ids),
                               functools.partial(_copy_from, self.pool.slot(op.slot)))

    def scatter_chunks(self, ops: Sequence[LoadOp]) -> None:
        """Copy blocks ``first_block..`` of each op's slot into its engine blocks."""
        if not ops:
            return
        if self._ring is None:
            for op in ops:
                self.paged.scatter(self._slot_view(self.pool.slot(op.slot)), op.first_block, op.block_ids)
            return
        self._ring.begin()
        ids = self._upload_ids([op.block_ids for op in ops])
        for op, chunk_ids in zip(ops, ids):
            self._ring.from_host(functools.partial(_copy_into, self.pool.slot(op.slot)),
                                 functools.partial(self._scatter_from, op.first_block, chunk_ids))
        self._ring.fence()

    def wait(self) -> None:
        """Block until every queued store and load is done (slots and blocks hold their data)."""
        if self._ring is not None:
            self._ring.wait()

    def mark_stores(self) -> "torch.cuda.Event | None":
        """An event that completes when every store queued so far is in its slot (None on CPU,
        where stores are done when ``gather_chunks`` returns). Lets the caller poll instead of
        blocking, so stores overlap the next forward."""
        return None if self._ring is None else self._ring.mark_copies()

    def _slot_view(self, data: torch.Tensor) -> torch.Tensor:
        return self.paged.slot_view(data[:self.pool.slot_bytes], self.blocks_per_chunk)

    def _upload_ids(self, block_ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Every op's block ids in one pinned, asynchronous upload on the work stream."""
        assert self._ring is not None
        flat = [block for ids in block_ids for block in ids]
        host = torch.tensor(flat, dtype=torch.long).pin_memory()
        with torch.cuda.stream(self._ring.work_stream):
            device_ids = host.to(self.paged.device, non_blocking=True)
        return list(device_ids.split([len(ids) for ids in block_ids]))

    def _staged_layers(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer slot views of a staging buffer, made once per buffer (fewer Python ops per
        chunk keep the CPU ahead of the copy engine)."""
        views = self._layer_views.get(buffer.data_ptr())
        if views is None:
            views = list(self._slot_view(buffer).unbind(0))
            self._layer_views[buffer.data_ptr()] = views
        return views

    def _gather_into(self, ids: torch.Tensor, buffer: torch.Tensor) -> None:
        self.paged.gather_into(ids, self._staged_layers(buffer))

    def _scatter_from(self, first_block: int, ids: torch.Tensor, buffer: torch.Tensor) -> None:
        self.paged.scatter_from(self._staged_layers(buffer), first_block, ids)


def _copy_from(dst: torch.Tensor, buffer: torch.Tensor) -> None:
    dst.copy_(buffer[:dst.numel()], non_blocking=True)


def _copy_into(src: torch.Tensor, buffer: torch.Tensor) -> None:
    buffer[:src.numel()].copy_(src, non_blocking=True)


def ordered_layers(kv_caches: Mapping[str, torch.Tensor], layer_names: Sequence[str]) -> list[torch.Tensor]:
    """The engine's KV tensors in the order of ``layer_names`` (the KV cache group's order)."""
    missing = [name for name in layer_names if name not in kv_caches]
    if missing:
        raise LayoutError(f"the engine registered no KV cache for layers {missing[:3]}")
    return [kv_caches[name] for name in layer_names]
