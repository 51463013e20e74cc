"""The int8 slot format (``memory.kv_format: int8``): quantises pages on the device that holds them.

Pure torch, no custom kernel: ``ChunkMover`` quantises a group of gathered chunks on the engine's
device before the device->host copy and dequantises after the host->device copy, so PCIe carries
the int8 bytes. Each call is a handful of element-wise kernels over the whole tensor it is given.

Format of one slot (``KVLayout.chunk_bytes`` bytes, ``kv_format`` int8):

==========  =====================================================================================
values      int8 [layers, blocks, page]: ``round(x / scale)``, -127..127
scales      float32 [layers, blocks, page / INT8_GROUP_ELEMS]: ``max |x| / 127`` of each group of
            ``INT8_GROUP_ELEMS`` contiguous elements of a page (0 for a group of zeros)
==========  =====================================================================================

Error: symmetric rounding, so every element decodes within ``scale / 2`` of its value (in float32),
plus the rounding of the engine's dtype when written back (half a unit in the last place of the
value: 2^-9 of it for bf16, 2^-12 for fp16). Values must be finite (an inf or nan spoils its group).
"""

from __future__ import annotations

import torch

from kvtier.layout import INT8_GROUP_ELEMS, KVLayout

LEVELS = 127  # symmetric levels -127..127


class Int8SlotCodec:
    """Quantises and restores the pages of one layout's chunks (``blocks_per_chunk`` blocks each).

    Stateless apart from its shape: safe from any thread; each call queues its kernels on the
    current stream of the tensors' device.
    """

    def __init__(self, layout: KVLayout, blocks_per_chunk: int) -> None:
        if layout.kv_format != "int8":
            raise ValueError(f"Int8SlotCodec needs an int8 layout, got kv_format {layout.kv_format!r}")
        self.layout = layout
        self.blocks_per_chunk = blocks_per_chunk
        self.dtype: torch.dtype = getattr(torch, layout.dtype)
        self.page_elems = layout.block_elems_per_layer
        self.groups_per_page = self.page_elems // INT8_GROUP_ELEMS
        self._values_bytes = layout.num_layers * blocks_per_chunk * self.page_elems
        self.slot_bytes = layout.num_layers * blocks_per_chunk * layout.slot_page_bytes

    def split(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of ``slots`` (uint8 [n, slot_bytes or more], rows may be strided, on any device):
        values int8 [n, layers, blocks, page] and scales float32 [n, layers, blocks, groups]."""
        n, layers, per = slots.shape[0], self.layout.num_layers, self.blocks_per_chunk
        values = slots[:, :self._values_bytes].view(torch.int8).view(n, layers, per, self.page_elems)
        scales = slots[:, self._values_bytes:self.slot_bytes].view(torch.float32)
        return values, scales.view(n, layers, per, self.groups_per_page)

    def encode(self, src: torch.Tensor, values: torch.Tensor, scales: torch.Tensor) -> None:
        """Quantise ``src`` ([..., page] in the layout's dtype, any strides with a dense last dim)
        into ``values`` (int8, same shape) and ``scales`` (float32 [..., groups]), all on one device.
        Allocates two float32 temporaries the size of ``src``'s groups and of ``src``."""
        grouped = src.unflatten(-1, (self.groups_per_page, INT8_GROUP_ELEMS))
        # max |x| without a temporary as large as src: max and -min are exact in the dtype
        peak = torch.maximum(grouped.amax(dim=-1), grouped.amin(dim=-1).neg()).float()
        step = peak / LEVELS
        inverse = torch.where(step > 0, step.reciprocal(), torch.zeros_like(step))
        scaled = grouped * inverse.unsqueeze(-1)  # float32
        scaled.round_().clamp_(-LEVELS, LEVELS)
        values.copy_(scaled.flatten(-2))
        scales.copy_(step)

    def decode(self, values: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> None:
        """Restore ``values`` (int8 [..., page]) and ``scales`` (float32 [..., groups]) into ``out``
        ([..., page] in the layout's dtype, any strides with a dense last dim): one kernel, computed
        in float32 and rounded once to the dtype, no temporary the size of ``out``."""
        torch.mul(values.unflatten(-1, (self.groups_per_page, INT8_GROUP_ELEMS)), scales.unsqueeze(-1),
                  out=out.unflatten(-1, (self.groups_per_page, INT8_GROUP_ELEMS)))
