"""KV cache tensors shaped and strided the way the engines kvtier supports register them."""

from __future__ import annotations

import torch

from kvtier.layout import KVLayout

# The backend each kind comes from in these tests (any backend of the kind would do).
BACKEND = {"cpu_lbhnc": "CPU_ATTN", "packed_nhd": "FLASH_ATTN", "packed_hnd": "FLASHINFER", "mla": "AMX_MLA"}


def layout_of(kind: str, layers: int, heads: int, head_size: int, block: int, dtype: str) -> KVLayout:
    """A layout of ``kind``; for MLA one latent of the same bytes per token (``2 * heads * head_size``)."""
    if kind == "mla":
        return KVLayout(kind, layers, 1, 2 * heads * head_size, block, dtype)
    return KVLayout(kind, layers, heads, head_size, block, dtype)


def engine_layers(layout: KVLayout, num_blocks: int, device: str = "cpu", seed: int = 0) -> list[torch.Tensor]:
    """Random per-layer KV tensors of logical shape [blocks, heads, block_size, 2*head_size]; for
    ``packed_nhd`` stored as [blocks, block_size, heads, 2*head_size], as vLLM allocates them; for
    MLA [blocks, 1, block_size, latent], as vLLM-CPU's AMX_MLA does."""
    gen = torch.Generator().manual_seed(seed)
    heads, block, head = layout.num_kv_heads, layout.block_size, layout.head_size
    layers = []
    for _ in range(layout.num_layers):
        if layout.kind == "mla":
            tensor = torch.randn(num_blocks, 1, block, head, generator=gen)
        elif layout.kind == "packed_nhd":
            tensor = torch.randn(num_blocks, block, heads, 2 * head, generator=gen).permute(0, 2, 1, 3)
        else:
            tensor = torch.randn(num_blocks, heads, block, 2 * head, generator=gen)
        layers.append(tensor.to(getattr(torch, layout.dtype)).to(device))
    return layers


def pages(layers: list[torch.Tensor], kind: str, ids: list[int]) -> list[torch.Tensor]:
    """Blocks ``ids`` of every layer as [len(ids), page] words in the engine's physical order."""
    out = []
    for tensor in layers:
        chosen = tensor.view(torch.int16)[torch.tensor(ids, device=tensor.device)]
        if kind == "packed_nhd":
            chosen = chosen.permute(0, 2, 1, 3)
        out.append(chosen.contiguous().view(len(ids), -1))
    return out
