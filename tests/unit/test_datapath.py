"""Block moves between a paged KV cache and host slots: exact, for both known layouts."""

from __future__ import annotations

import pytest
import torch

from kvtier.datapath import HostPool, PagedKV, detect_kind
from kvtier.errors import LayoutError
from kvtier.layout import KVLayout

NUM_BLOCKS = 12


def engine_layers(layout: KVLayout) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    heads, block, head = layout.num_kv_heads, layout.block_size, layout.head_size
    if layout.kind == "cpu_lbhnc":
        shape: tuple[int, ...] = (NUM_BLOCKS, heads, block, 2 * head)
    else:
        shape = (2, NUM_BLOCKS, block, heads, head)
    return [torch.randn(shape, generator=gen).to(torch.bfloat16) for _ in range(layout.num_layers)]


def block(layers: list[torch.Tensor], kind: str, index: int) -> list[torch.Tensor]:
    return [t[index] if kind == "cpu_lbhnc" else t[:, index] for t in layers]


@pytest.mark.parametrize("kind", ["cpu_lbhnc", "cuda_flash"])
def test_store_then_load_into_other_blocks_is_bit_exact(kind: str) -> None:
    layout = KVLayout(kind, 3, 2, 8, 16, "bfloat16")
    layers = engine_layers(layout)
    paged = PagedKV(layers, layout)
    pool = HostPool(2, layout.chunk_bytes(64), pin_memory=False)
    src_blocks, dst_blocks = [7, 2, 9, 4], [0, 1, 10, 11]
    paged.gather(src_blocks, paged.slot_view(pool.slot(1), 4))
    # load only the last three blocks of the chunk (a partial hit after the engine's own prefix)
    paged.scatter(paged.slot_view(pool.slot(1), 4), 1, dst_blocks[1:])
    for src, dst in zip(src_blocks[1:], dst_blocks[1:]):
        for a, b in zip(block(layers, kind, src), block(layers, kind, dst)):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert not torch.equal(block(layers, kind, 0)[0], block(layers, kind, src_blocks[0])[0])


def test_unknown_layout_is_refused_with_its_shape() -> None:
    layout = KVLayout("cpu_lbhnc", 1, 2, 8, 16, "bfloat16")
    with pytest.raises(LayoutError, match=r"\(12, 16, 2, 8\)"):
        detect_kind(torch.zeros(NUM_BLOCKS, 16, 2, 8), layout)


def test_layout_mismatch_is_refused() -> None:
    layout = KVLayout("cuda_flash", 2, 2, 8, 16, "bfloat16")
    cpu_layers = engine_layers(KVLayout("cpu_lbhnc", 2, 2, 8, 16, "bfloat16"))
    with pytest.raises(LayoutError, match="cuda_flash"):
        PagedKV(cpu_layers, layout)
    with pytest.raises(LayoutError, match="3 KV layers"):
        PagedKV(engine_layers(layout), KVLayout("cuda_flash", 3, 2, 8, 16, "bfloat16"))
