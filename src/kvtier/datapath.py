"""Worker-side data path: moves whole blocks between the engine's paged KV cache and host slots.

This is the one module (with the vLLM worker) that touches torch tensors. A ``HostPool`` is a
preallocated array of fixed-size slots, one chunk each (pinned on CUDA machines, allocated once).
``PagedKV`` wraps the engine's per-layer KV tensors, checks them against the expected
``KVLayout`` and copies blocks with vectorised ``index_select`` / ``index_copy_`` (one call per
layer, never a loop per token).

Slot layout (bytes of one chunk): for ``cpu_lbhnc`` [layers, blocks, page]; for ``cuda_flash``
[layers, 2 (K, V), blocks, page]; ``page`` is one block's elements of one layer (and one of K/V).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from kvtier.errors import LayoutError
from kvtier.layout import KVLayout


_BIT_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def bit_dtype(num_bytes: int) -> torch.dtype:
    """An integer dtype of the same width: copies move bits without float conversion paths
    (index_select on bf16 is several times slower than on int16 on CPU)."""
    return _BIT_DTYPES[num_bytes]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class HostPool:
    """``num_slots`` slots of ``slot_bytes`` each, in one allocation made at start-up."""

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

    def gather(self, block_ids: Sequence[int], dst: torch.Tensor) -> None:
        """Copy engine blocks ``block_ids`` (a whole chunk) into ``dst`` (a ``slot_view``)."""
        ids = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        axis = 0 if self.layout.kind == "cpu_lbhnc" else 1
        for layer, pages in enumerate(self._pages):
            if axis == 0 and dst.device == self.device:
                torch.index_select(pages, 0, ids, out=dst[layer])
            else:
                dst[layer].copy_(pages.index_select(axis, ids), non_blocking=True)

    def scatter(self, src: torch.Tensor, first_block: int, block_ids: Sequence[int]) -> None:
        """Copy blocks ``first_block..`` of ``src`` (a ``slot_view``) into engine blocks ``block_ids``."""
        ids = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        end = first_block + len(block_ids)
        for layer, pages in enumerate(self._pages):
            if self.layout.kind == "cpu_lbhnc":
                pages.index_copy_(0, ids, src[layer, first_block:end].to(self.device, non_blocking=True))
            else:
                pages.index_copy_(1, ids, src[layer, :, first_block:end].to(self.device, non_blocking=True))


def ordered_layers(kv_caches: Mapping[str, torch.Tensor], layer_names: Sequence[str]) -> list[torch.Tensor]:
    """The engine's KV tensors in the order of ``layer_names`` (the KV cache group's order)."""
    missing = [name for name in layer_names if name not in kv_caches]
    if missing:
        raise LayoutError(f"the engine registered no KV cache for layers {missing[:3]}")
    return [kv_caches[name] for name in layer_names]
