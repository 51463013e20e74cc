"""Worker-side data path: moves whole blocks between the engine's paged KV cache and host slots.

This is the one module (with the engine integrations) that touches torch tensors. A ``HostPool`` is
a preallocated array of fixed-size slots, one chunk each (pinned on CUDA machines, allocated once).
``PagedKV`` wraps the engine's per-layer KV tensors, checks them against the expected ``KVLayout``
(``kvtier.layout.derive_kind``: backend, shape, strides) and copies blocks with vectorised
``index_select`` / ``index_copy_`` / ``index_put_`` (one call per layer, never a loop per block).
``ChunkMover`` executes a step's store and load ops in batches: on CUDA, groups of chunks cross
PCIe as one copy per run of adjacent slots through device staging buffers on dedicated streams
(``kvtier.staged_copies``, over ``kvtier.staging.StagingRing``), with one kernel per layer and
group on the GPU; on CPU it copies straight between the engine's blocks and the slots.

Slot layout (bytes of one chunk), for every kind: [layers, blocks, page]; ``page`` is one block of
one layer, in the engine's own byte order. With ``kv_format`` int8 (``memory.kv_format``) a slot
holds the pages quantised (``kvtier.slotcodec``): ``ChunkMover`` quantises on the engine's device
after the gather and dequantises there after the copy in, so the host<->device copies move int8.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from kvtier.errors import LayoutError
from kvtier.layout import KVLayout, derive_kind
from kvtier.plans import LoadOp, StoreOp
from kvtier.slotcodec import Int8SlotCodec
from kvtier.staged_copies import StagedCopies, encode_layers
from kvtier.staging import StagingRing

_BIT_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
# ChunkMover's transfer groups on CUDA. Smaller groups overlap more kernels with copies, larger
# ones cost less CPU (one kernel per layer and group). On an H200 (benchmarks/gpu_datapath.py
# --group-mib, 2026-12-03): load/raw at 8K tokens 0.86 (1 GiB), 0.91 (512 MiB), 0.94 (128 MiB);
# CPU to queue a 32K load 3-4 ms, 5-7 ms, 11-21 ms.
DEFAULT_GROUP_BYTES = 512 << 20


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


class PagedKV:
    """The engine's KV cache of one worker, as a list of per-layer block tables.

    Each layer's tensor is checked against the expected ``KVLayout`` through ``derive_kind`` (the
    attention backend's name, shape and strides) and then viewed as [num_blocks, page] integer
    words over its own storage: every known kind keeps a block of one layer as one contiguous page,
    whatever the order of the dims inside it.
    """

    def __init__(self, layers: Sequence[torch.Tensor], layout: KVLayout, backend: str) -> None:
        if len(layers) != layout.num_layers:
            raise LayoutError(f"expected {layout.num_layers} KV layers, the engine has {len(layers)}")
        for tensor in layers:
            kind = derive_kind(backend, tuple(tensor.shape), tuple(tensor.stride()), layout.num_kv_heads,
                               layout.block_size, layout.head_size)
            if kind != layout.kind:
                raise LayoutError(f"expected KV layout {layout.kind}, the engine's {backend} backend uses {kind}")
            if dtype_name(tensor.dtype) != layout.dtype:
                raise LayoutError(f"expected KV dtype {layout.dtype}, the engine uses {tensor.dtype}")
        self.layout = layout
        self.backend = backend
        self.device = layers[0].device
        self._bits = bit_dtype(layout.dtype_bytes)
        self._pages = [_as_pages(t.view(self._bits)) for t in layers]

    def slot_view(self, slot: torch.Tensor, blocks_per_chunk: int) -> torch.Tensor:
        """View a slot's bytes as [layers, blocks, page] of KV-sized integer words."""
        return slot.view(self._bits).view(self.layout.num_layers, blocks_per_chunk, -1)

    def block_ids(self, block_ids: Sequence[int]) -> torch.Tensor:
        """``block_ids`` as an index tensor on the engine's device (a blocking upload on CUDA)."""
        return torch.tensor(block_ids, dtype=torch.long, device=self.device)

    def gather(self, block_ids: Sequence[int], dst: torch.Tensor) -> None:
        """Copy engine blocks ``block_ids`` (a whole chunk) into ``dst``, a ``slot_view`` on the
        engine's device: one ``index_select`` per layer, no temporary."""
        ids = self.block_ids(block_ids)
        for layer, pages in enumerate(self._pages):
            torch.index_select(pages, 0, ids, out=dst[layer])

    def scatter(self, src: torch.Tensor, first_block: int, block_ids: Sequence[int]) -> None:
        """Copy blocks ``first_block..`` of ``src`` (a ``slot_view`` on the engine's device) into
        engine blocks ``block_ids``: one ``index_copy_`` per layer."""
        ids = self.block_ids(block_ids)
        for layer, pages in enumerate(self._pages):
            pages.index_copy_(0, ids, src[layer].narrow(0, first_block, ids.numel()))

    @property
    def word_dtype(self) -> torch.dtype:
        """The integer dtype of the KV dtype's width, in which blocks are moved."""
        return self._bits

    def gather_layer(self, layer: int, ids: torch.Tensor, out: torch.Tensor) -> None:
        """Copy blocks ``ids`` (an index tensor on the engine's device) of one layer into ``out``
        ([len(ids), page], contiguous): one kernel."""
        torch.index_select(self._pages[layer], 0, ids, out=out)

    def scatter_layer(self, layer: int, ids: torch.Tensor, src: torch.Tensor) -> None:
        """Write ``src`` ([..., page], any strides, on the engine's device) into the blocks ``ids``
        (an index tensor of ``src``'s leading shape) of one layer: one kernel."""
        self._pages[layer].index_put_((ids,), src)


def _as_pages(tensor: torch.Tensor) -> torch.Tensor:
    """[num_blocks, page] over the storage of a layer whose blocks are contiguous pages (checked by
    ``derive_kind``), whatever the strides of its logical view."""
    num_blocks = tensor.shape[0]
    page = tensor.numel() // num_blocks
    return torch.as_strided(tensor, (num_blocks, page), (tensor.stride(0), 1), tensor.storage_offset())


class ChunkMover:
    """Executes a step's store ops (engine blocks -> host slots) and load ops (slots -> blocks).

    Called by the worker, from the thread that runs the engine's forward. On CPU the blocks move
    straight between the engine's tensors and the slots, synchronously. On CUDA the ops move in
    groups of up to ``group_chunks`` chunks through device staging buffers
    (``kvtier.staged_copies.StagedCopies``), so the CPU cost grows with the chunks and the
    layers, not with their product: one kernel per layer and group, one copy per run of adjacent
    slots. Copies run on a dedicated stream and overlap the kernels of the next group.
    With int8 slots (``layout.kv_format``) each staging buffer holds a group twice: in the engine's
    dtype, then quantised, laid out like the slots, so only the int8 bytes cross PCIe. On CPU the
    chunk is quantised on its way between the blocks and the slot.

    ``gather_chunks`` and ``scatter_chunks`` return once the work is queued. Loads are ordered
    before any work queued afterwards on the engine's stream (no CPU wait); ``wait_loads`` blocks
    until the slots they read may be overwritten from the CPU. Stores are final after ``wait()``
    or once ``mark_stores()``'s event completes; the caller must wait before it reports a store,
    reads a slot on the CPU (disk writes) or lets the engine reuse the stored blocks.
    """

    def __init__(self, paged: PagedKV, pool: HostPool, blocks_per_chunk: int, num_staging: int = 2,
                 group_bytes: int = DEFAULT_GROUP_BYTES, staged: bool | None = None) -> None:
        """``staged``: move through staging buffers (default: on CUDA only; tests turn it on for
        CPU tensors to check the grouping on machines without a GPU)."""
        self.paged = paged
        self.pool = pool
        self.blocks_per_chunk = blocks_per_chunk
        layout = paged.layout
        self._codec = Int8SlotCodec(layout, blocks_per_chunk) if layout.kv_format == "int8" else None
        raw_chunk_bytes = blocks_per_chunk * layout.block_bytes_per_layer * layout.num_layers
        slot_bytes = raw_chunk_bytes if self._codec is None else self._codec.slot_bytes
        if pool.slot_bytes < slot_bytes:
            raise LayoutError(f"host slots of {pool.slot_bytes} bytes cannot hold a chunk of {slot_bytes} bytes "
                              f"(kv_format {layout.kv_format})")
        # staging bytes of one chunk: the slot's bytes, and with a codec the chunk in the dtype too
        stage_chunk_bytes = pool.slot_bytes + (0 if self._codec is None else raw_chunk_bytes)
        # the CPU cost of a batch is one copy per chunk plus one kernel per layer and group, so
        # larger groups cost less CPU, smaller ones overlap more (DEFAULT_GROUP_BYTES)
        self.group_chunks = max(1, min(group_bytes // stage_chunk_bytes, pool.num_slots))
        self._staged: StagedCopies | None = None
        self._loads_done: torch.cuda.Event | None = None
        if staged if staged is not None else paged.device.type == "cuda":
            ring = StagingRing(paged.device, self.group_chunks * stage_chunk_bytes, num_staging)
            # with a codec, a staging buffer is [group in the dtype | group of slots]: where the slots start
            slots_offset = 0 if self._codec is None else self.group_chunks * raw_chunk_bytes
            self._staged = StagedCopies(paged, pool, blocks_per_chunk, self._codec, self.group_chunks, slots_offset,
                                        ring)

    @property
    def ring(self) -> StagingRing | None:
        """The staging ring (None when unstaged): ``kvtier.layerload`` queues its loads on it too,
        so they keep their order with this mover's stores."""
        return None if self._staged is None else self._staged.ring

    def gather_chunks(self, ops: Sequence[StoreOp]) -> None:
        """Copy each op's engine blocks (one whole chunk) into its memory slot."""
        if not ops:
            return
        if self._staged is not None:
            self._staged.gather(ops)
        elif self._codec is not None:
            self._gather_encoded(ops)
        else:
            for op in ops:
                self.paged.gather(op.block_ids, self._slot_view(self.pool.slot(op.slot)))

    def scatter_chunks(self, ops: Sequence[LoadOp]) -> None:
        """Copy blocks ``first_block..`` of each op's slot into its engine blocks."""
        if not ops:
            return
        if self._staged is not None:
            self._loads_done = self._staged.scatter(ops)
        elif self._codec is not None:
            self._scatter_decoded(ops)
        else:
            for op in ops:
                self.paged.scatter(self._slot_view(self.pool.slot(op.slot)), op.first_block, op.block_ids)

    def last_load_event(self) -> "torch.cuda.Event | None":
        """An event that completes when every load queued so far is in the engine's blocks (None
        on CPU, where loads are done when ``scatter_chunks`` returns)."""
        return self._loads_done

    def wait_loads(self) -> None:
        """Block until every queued load has read its slots (they may then be overwritten)."""
        if self._loads_done is not None:
            self._loads_done.synchronize()
            self._loads_done = None

    def wait(self) -> None:
        """Block until every queued store and load is done (slots and blocks hold their data)."""
        if self._staged is not None:
            self._staged.ring.wait()
            self._loads_done = None

    def mark_stores(self) -> "torch.cuda.Event | None":
        """An event that completes when every store queued so far is in its slot (None on CPU,
        where stores are done when ``gather_chunks`` returns). Lets the caller poll instead of
        blocking, so stores overlap the next forward."""
        return None if self._staged is None else self._staged.ring.mark_copies()

    def _slot_view(self, data: torch.Tensor) -> torch.Tensor:
        return self.paged.slot_view(data[:self.pool.slot_bytes], self.blocks_per_chunk)

    def _chunk_buffer(self) -> torch.Tensor:
        """One chunk in the dtype, [layers, blocks, page] KV-sized words on the engine's device."""
        layout = self.paged.layout
        return torch.empty((layout.num_layers, self.blocks_per_chunk, layout.block_elems_per_layer),
                           dtype=self.paged.word_dtype, device=self.paged.device)

    def _gather_encoded(self, ops: Sequence[StoreOp]) -> None:
        """Unstaged stores into int8 slots: each chunk gathered, then quantised into its slot."""
        assert self._codec is not None
        chunk = self._chunk_buffer()
        for op in ops:
            self.paged.gather(op.block_ids, chunk)
            encode_layers(self._codec, chunk.view(self._codec.dtype).unsqueeze(0), self.pool.data[op.slot:op.slot + 1],
                          self.paged.layout.num_layers)

    def _scatter_decoded(self, ops: Sequence[LoadOp]) -> None:
        """Unstaged loads from int8 slots: each slot dequantised, then its blocks scattered."""
        assert self._codec is not None
        chunk = self._chunk_buffer()
        for op in ops:
            values, scales = self._codec.split(self.pool.data[op.slot:op.slot + 1])
            self._codec.decode(values, scales, chunk.view(self._codec.dtype).unsqueeze(0))
            self.paged.scatter(chunk, op.first_block, op.block_ids)


def ordered_layers(kv_caches: Mapping[str, torch.Tensor], layer_names: Sequence[str]) -> list[torch.Tensor]:
    """The engine's KV tensors in the order of ``layer_names`` (the KV cache group's order)."""
    missing = [name for name in layer_names if name not in kv_caches]
    if missing:
        raise LayoutError(f"the engine registered no KV cache for layers {missing[:3]}")
    return [kv_caches[name] for name in layer_names]
